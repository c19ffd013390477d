//! # tooltrain-train
//!
//! What every trainer shares (`tooltrain-sft`, `tooltrain-rl`), so that a trainer's own
//! crate holds only its loss, its data and a loop that reads: open or resume a run, step,
//! log, save, finish.
//!
//! | concept | where |
//! |---|---|
//! | the output directory: lock, checkpoints (`latest`, pruning, stale temp directories), resume with config checks, final export | [`run`]: [`RunDir`] |
//! | metrics JSONL, cut back to the checkpoint on resume | [`run`]: [`Metrics`] |
//! | SIGTERM / SIGINT stop flag, why a run stopped | [`signals`]: [`StopSignals`], [`StopReason`] |
//! | AdamW over f32 master weights, hyper-parameter checks | [`optim`]: [`Optimizer`], [`OptimSettings`] |
//! | learning-rate schedules, clipping (from the model crate) | [`LrSchedule`], [`clip_grad_norm`] |
//! | token-budget micro-batch planning | [`batch`]: [`batch::plan_micro_batches`] |
//! | layered TOML configs: `--config`, `--set`, `--print-config`, unknown keys rejected | [`config`]: [`config::ConfigArgs`], [`config::load`] |
//! | progress with throughput and ETA (bar, or log lines off a terminal) | [`Progress`] (from `tooltrain-util`) |

pub mod batch;
pub mod config;
pub mod optim;
pub mod run;
pub mod signals;

pub use optim::{OptimSettings, Optimizer};
pub use run::{diverged, ensure_finite, load_model, save_model, Metrics, RunDir, ADAPTER_DIR};
pub use signals::{after_step, stopped_report, StopReason, StopSignals};
pub use tooltrain_model::{clip_grad_norm, LrSchedule};
pub use tooltrain_util::Progress;

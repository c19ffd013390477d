//! # tooltrain-sft
//!
//! Supervised fine-tuning of a `tooltrain-model` decoder on rejection-sampled agent
//! trajectories (the first stage of the ToolTrain recipe).
//!
//! | concept | where |
//! |---|---|
//! | the JSONL examples (`input_ids` + `loss_mask`, written by `tooltrain sample`), truncation, validation split, micro-batch tensors | [`data`] |
//! | the typed config, the masked loss, the training loop | [`train`] |
//!
//! Run directory, checkpoints, exact resume, metrics, stop signals, the optimizer and
//! micro-batch planning come from `tooltrain-train`; rejection sampling lives in
//! `tooltrain-rollout` (`sample`), beside the episode runners it shares with RL.
//!
//! ```no_run
//! use tooltrain_sft::train::{train, SftConfig};
//! let cfg = SftConfig {
//!     train_file: "sft.jsonl".into(),
//!     init: Some("Qwen2.5-Coder-7B-Instruct".into()),
//!     output_dir: "runs/sft".into(),
//!     ..SftConfig::default()
//! };
//! let summary = train(&cfg, false, true)?;
//! println!("final loss {:?}", summary.loss);
//! # anyhow::Ok(())
//! ```
//!
//! The loss is the mean next-token cross-entropy over every target with mask 1 of an
//! optimizer step's `global_batch` sequences, however they are split into micro-batches.
//! A run interrupted (SIGTERM, `stop_at_step`) and resumed from its latest checkpoint
//! produces bit-identical losses to an uninterrupted run.

pub mod data;
pub mod train;

pub use data::{load_examples, SftExample, Truncation};
pub use tooltrain_train::{StopReason, StopSignals};
pub use train::{train, train_with_stop, SftConfig, TrainSummary};

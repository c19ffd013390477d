//! # tooltrain-sft
//!
//! Supervised fine-tuning of a `tooltrain-model` decoder on rejection-sampled agent
//! trajectories (the first stage of the ToolTrain recipe).
//!
//! | concept | where |
//! |---|---|
//! | the JSONL examples (`input_ids` + `loss_mask`), truncation, shuffle, packing | [`data`] |
//! | the typed config, the training loop, checkpoints and exact resume | [`train`] |
//! | rejection sampling (`tooltrain sample`): K episodes per instance, keep rule, dedup | [`sample`] |
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
pub mod sample;
pub mod train;

pub use data::{load_examples, SftExample, Truncation};
pub use train::{train, train_with_stop, SftConfig, StopReason, StopSignals, TrainSummary};

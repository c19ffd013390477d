//! `train-sft`: supervised fine-tuning on sampled trajectories (`tooltrain_sft`).
//!
//! ```sh
//! train-sft --config configs/sft-cpu-small.toml [--set lr=2e-4 ...] [--resume] [--print-config]
//! ```
//!
//! Exit status: 0 when the run completed (or stopped at `stop_at_step`, with a
//! checkpoint); 143 when SIGTERM (or 130 when SIGINT) stopped it: the trainer stops at
//! the next micro-batch boundary (abandoning a partly done optimizer step) and saves a
//! checkpoint of the last finished step first, and `--resume` continues the run
//! exactly. A second signal exits at once (same status, nothing saved). 1 on errors.

use clap::Parser;
use std::process::ExitCode;
use tooltrain_sft::train::{train_with_stop, SftConfig};
use tooltrain_train::config::TrainerArgs;
use tooltrain_train::{stopped_report, StopSignals};

/// Supervised fine-tuning of a tooltrain model on JSONL examples (`input_ids` +
/// `loss_mask`). Writes checkpoints, metrics.jsonl and the final HF model under
/// `output_dir`.
#[derive(Parser)]
#[command(name = "train-sft", version)]
struct Args {
    #[command(flatten)]
    trainer: TrainerArgs,
}

fn main() -> ExitCode {
    Args::parse().trainer.main(run)
}

fn run(cfg: SftConfig, args: &TrainerArgs) -> anyhow::Result<ExitCode> {
    cfg.validate()?;
    // SIGTERM (a preempted cluster job) and SIGINT set the stop flag; the trainer saves
    // a checkpoint after the current optimizer step. A second signal exits at once.
    let signals = StopSignals::install()?;
    let summary = train_with_stop(&cfg, args.resume, !args.no_progress, signals.flag())?;
    match summary.stopped {
        Some(reason) => {
            let (line, code) = stopped_report(
                "train-sft",
                reason,
                summary.step,
                summary.total_steps,
                summary.checkpoint.as_deref(),
                &cfg.output_dir,
                &signals,
            );
            eprintln!("{line}");
            Ok(code)
        }
        None => {
            let fmt = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.4}"));
            eprintln!(
                "done: {} steps, loss {}, val_loss {}, {:.0} tokens/s; model in {}",
                summary.step,
                fmt(summary.loss),
                fmt(summary.val_loss),
                summary.tokens_per_s,
                summary
                    .final_dir
                    .as_ref()
                    .map(|p| p.display().to_string())
                    .unwrap_or_default()
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}

//! `train-rl`: tool-integrated RL on live RepoSearcher episodes (`tooltrain_rl`).
//!
//! ```sh
//! train-rl --config configs/rl-smollm2-synthetic.toml [--set lr=1e-5 ...] [--resume] [--print-config]
//! ```
//!
//! Exit status: 0 when the run completed (or stopped at `stop_at_step`, with a
//! checkpoint); 143 when SIGTERM (130 for SIGINT) stopped it: a step whose rollouts were
//! interrupted is abandoned, the last finished step is saved, and `--resume` continues
//! the run exactly. A second signal exits at once. 1 on errors.

use clap::Parser;
use std::process::ExitCode;
use tooltrain_rl::{train_with_stop, RlConfig};
use tooltrain_train::config::TrainerArgs;
use tooltrain_train::{stopped_report, StopSignals};

/// GRPO-family RL of a tooltrain model on RepoSearcher episodes: reward nDCG@5 of the
/// answer, loss on the model's own tokens. Writes checkpoints, metrics.jsonl and the
/// final HF model under `output_dir`.
#[derive(Parser)]
#[command(name = "train-rl", version)]
struct Args {
    #[command(flatten)]
    trainer: TrainerArgs,
}

fn main() -> ExitCode {
    Args::parse().trainer.main(run)
}

fn run(cfg: RlConfig, args: &TrainerArgs) -> anyhow::Result<ExitCode> {
    cfg.validate()?;
    let signals = StopSignals::install()?;
    let summary = train_with_stop(&cfg, args.resume, !args.no_progress, signals.flag())?;
    let fmt = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.4}"));
    match summary.stopped {
        Some(reason) => {
            let (line, code) = stopped_report(
                "train-rl",
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
            eprintln!(
                "done: {} steps, last reward {}, validation reward {} (before: {}); model in {}",
                summary.step,
                fmt(summary.reward),
                fmt(summary.val_reward),
                fmt(summary.first_val_reward),
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

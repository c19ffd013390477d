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
use tooltrain_train::config;
use tooltrain_train::{stopped_report, StopSignals};

/// Supervised fine-tuning of a tooltrain model on JSONL examples (`input_ids` +
/// `loss_mask`). Writes checkpoints, metrics.jsonl and the final HF model under
/// `output_dir`.
#[derive(Parser)]
#[command(name = "train-sft", version)]
struct Args {
    #[command(flatten)]
    config: config::ConfigArgs,
    /// Continue from `output_dir/checkpoints/latest` (a fresh start when there is none).
    #[arg(long)]
    resume: bool,
    /// No progress output (a bar on a terminal; periodic lines otherwise).
    #[arg(long)]
    no_progress: bool,
    /// Log filter (e.g. `info`, `debug`); overrides RUST_LOG. Default: RUST_LOG, else `info`.
    #[arg(long, value_name = "FILTER")]
    log_level: Option<String>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    if let Err(e) = tooltrain_util::init_logging(args.log_level.as_deref(), "info") {
        eprintln!("error: {e}");
        return ExitCode::FAILURE;
    }
    match run(args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> anyhow::Result<ExitCode> {
    let cfg: SftConfig = config::load(args.config.config.as_deref(), &args.config.set)?;
    if args.config.print_config {
        print!("{}", config::to_toml(&cfg)?);
        return Ok(ExitCode::SUCCESS);
    }
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

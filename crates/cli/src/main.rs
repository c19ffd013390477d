//! `tooltrain`: command-line front end of tooltrain (text generation and sequence
//! scoring with the `tooltrain-model` crate; repository indexing with
//! `tooltrain-rollout`).

mod common;
mod convert;
mod eval;
mod generate;
mod gtcheck;
mod index;
mod plot;
mod repos;
mod sample;
mod score;
mod synth;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

#[derive(Parser)]
#[command(name = "tooltrain", version, about = "LLM agent training on candle")]
struct Cli {
    /// Log filter (e.g. `info`, `debug`, `tooltrain_model=trace`); overrides RUST_LOG.
    /// Logs go to stderr. Default: RUST_LOG, else `warn`.
    #[arg(long, global = true, value_name = "FILTER")]
    log_level: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate a reply to a prompt or a chat with a checkpoint.
    Generate(generate::Args),
    /// Score token sequences from a JSONL file: per-token log-probs and entropies.
    Score(score::Args),
    /// Write a checkpoint (HF directory or GGUF) as a Hugging Face directory.
    Convert(convert::Args),
    /// Run a policy over benchmark instances: trajectories, predictions, the metric table.
    Eval(eval::Args),
    /// Rejection sampling: K episodes per instance, keep those that hit the GT, write the SFT dataset.
    Sample(sample::Args),
    /// Index a Python repository and print classes, methods and functions as JSON.
    Index(index::Args),
    /// Materialise instance repositories at their base commits (`repos prepare`).
    Repos(repos::Args),
    /// Compare ground truth derived from gold patches on prepared trees with a shipped GT file.
    GtCheck(gtcheck::Args),
    /// Write seeded synthetic localisation tasks (Python packages, bug reports, patches, GT).
    Synth(synth::Args),
    /// Render a run's metric curves (metrics.jsonl) to a PNG grid of charts.
    Plot(plot::Args),
}

fn run(cli: Cli) -> anyhow::Result<()> {
    tooltrain_util::init_logging(cli.log_level.as_deref(), "warn").map_err(anyhow::Error::msg)?;
    match cli.command {
        Command::Generate(a) => generate::run(a),
        Command::Score(a) => score::run(a),
        Command::Convert(a) => convert::run(a),
        Command::Index(a) => index::run(a),
        Command::Eval(a) => eval::run(a),
        Command::Sample(a) => sample::run(a),
        Command::Repos(a) => repos::run(a),
        Command::GtCheck(a) => gtcheck::run(a),
        Command::Synth(a) => synth::run(a),
        Command::Plot(a) => plot::run(a),
    }
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // The message and its causes on one line, without a backtrace; a cause that
            // the message already spells out (`{path}: {io error}`) is not repeated.
            let mut msg = e.to_string();
            for cause in e.chain().skip(1) {
                let c = cause.to_string();
                if !msg.contains(&c) {
                    msg = format!("{msg}: {c}");
                }
            }
            eprintln!("error: {msg}");
            ExitCode::FAILURE
        }
    }
}

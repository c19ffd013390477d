//! `tooltrain`: command-line front end of tooltrain (text generation and sequence
//! scoring with the `tooltrain-model` crate; repository indexing with
//! `tooltrain-rollout`).

mod common;
mod convert;
mod generate;
mod index;
mod score;

use clap::{Parser, Subcommand};
use std::process::ExitCode;
use tracing_subscriber::EnvFilter;

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
    /// Index a Python repository and print classes, methods and functions as JSON.
    Index(index::Args),
}

fn init_logging(level: Option<&str>) -> anyhow::Result<()> {
    let filter = match level {
        Some(l) => {
            EnvFilter::try_new(l).map_err(|e| anyhow::anyhow!("invalid --log-level `{l}`: {e}"))?
        }
        None => EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn")),
    };
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    Ok(())
}

fn run(cli: Cli) -> anyhow::Result<()> {
    init_logging(cli.log_level.as_deref())?;
    match cli.command {
        Command::Generate(a) => generate::run(a),
        Command::Score(a) => score::run(a),
        Command::Convert(a) => convert::run(a),
        Command::Index(a) => index::run(a),
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

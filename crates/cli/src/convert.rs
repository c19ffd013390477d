//! `tooltrain convert`: write a checkpoint (HF directory or GGUF) as a Hugging Face
//! directory that transformers and vLLM load as is.

use crate::common::ModelArgs;
use anyhow::{Context, Result};
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Output directory (config.json, model.safetensors, tokenizer files).
    #[arg(long, value_name = "DIR")]
    pub output: PathBuf,
}

pub fn run(a: Args) -> Result<()> {
    let ck = a.model.load()?;
    let _lock = tooltrain_util::RunLock::acquire(&a.output, "tooltrain convert")
        .map_err(anyhow::Error::msg)?;
    tooltrain_model::save(&ck.model, ck.tokenizer.as_ref(), &a.output)
        .with_context(|| format!("writing {}", a.output.display()))?;
    eprintln!(
        "wrote {} ({} parameters, {:?}{})",
        a.output.display(),
        ck.model.num_params(),
        ck.model.dtype(),
        if ck.tokenizer.is_some() {
            ", with tokenizer"
        } else {
            ""
        }
    );
    Ok(())
}

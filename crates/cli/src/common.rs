//! Options and helpers shared by the subcommands.

use anyhow::Result;
use std::path::PathBuf;
use std::time::Instant;
use tooltrain_model::{default_device, parse_dtype, Checkpoint};

/// Which checkpoint to load, and where.
#[derive(clap::Args, Debug)]
pub struct ModelArgs {
    /// A Hugging Face checkpoint directory or a `.gguf` file.
    #[arg(long, value_name = "PATH")]
    pub model: PathBuf,
    /// Compute dtype: f32, bf16 or f16.
    #[arg(long, default_value = "f32", value_parser = ["f32", "bf16", "f16"])]
    pub dtype: String,
    /// Run on the CPU even when a CUDA device is available.
    #[arg(long)]
    pub cpu: bool,
}

impl ModelArgs {
    /// Loads the checkpoint on the chosen device.
    pub fn load(&self) -> Result<Checkpoint> {
        let dtype = parse_dtype(&self.dtype)?;
        let device = default_device(self.cpu)?;
        let t0 = Instant::now();
        let ckpt = tooltrain_model::load(&self.model, dtype, &device).map_err(|e| {
            // Most load errors name the file already; add the checkpoint where not.
            let p = self.model.display().to_string();
            if e.to_string().contains(&p) {
                anyhow::Error::new(e)
            } else {
                anyhow::Error::new(e).context(format!("loading checkpoint {p}"))
            }
        })?;
        tracing::info!(
            model = %self.model.display(),
            params = ckpt.model.num_params(),
            ?dtype,
            ?device,
            tokenizer = ckpt.tokenizer.is_some(),
            secs = t0.elapsed().as_secs_f64(),
            "loaded checkpoint"
        );
        Ok(ckpt)
    }
}

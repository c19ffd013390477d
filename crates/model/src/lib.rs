//! # tooltrain-model
//!
//! The shared model crate of tooltrain: decoder LLMs (Llama, Qwen2/2.5, Qwen3) on
//! candle that are trainable end to end.
//!
//! | concept | where |
//! |---|---|
//! | architecture hyper-parameters (`config.json`) | [`ModelConfig`] |
//! | the network, packed batches, KV cache, checkpointed backward | [`CausalLM`], [`SeqLayout`], [`KvCache`] |
//! | differentiable fused ops (RMSNorm, RoPE, softmax, SwiGLU, bias add, cross-entropy) | [`ops`] |
//! | loading HF directories / GGUF, saving HF format | [`load()`], [`save()`], [`Checkpoint`] |
//! | tokenizer and chat template | [`Tokenizer`], [`ChatTemplate`] |
//! | per-token log-probs and entropy, vocabulary-chunked | [`chunked_logprobs`], [`CausalLM::score`] |
//! | batched sampling (shared prefixes computed once) | [`CausalLM::generate`], [`SamplingParams`] |
//! | reusing earlier turns' keys and values (multi-turn episodes) | [`CausalLM::generate_reusing`], [`PrefixCache`] |
//! | CPU kernels (baseline, AVX2 or AVX-512, chosen at run time: [`simd_level`], capped by `TOOLTRAIN_SIMD`) | `kernels/` (private): `mod.rs` (dispatch, shared helpers), `norm.rs`, `bias.rs`, `softmax.rs`, `swiglu.rs`, `rope.rs`, `cross_entropy.rs`, `attention.rs`, `decode_attention.rs`, `reduce.rs` |
//! | bf16 products (AMX tiles or AVX512-BF16, [`bf16_kernel`]); a weight packed once for them | `kernels/amx.rs`, `kernels/bf16_layout.rs`: [`AmxMatrix`] |
//! | products of few rows (decoding); f32 layer weights repacked in column panels for them | `kernels/skinny.rs`: [`PanelMatrix`] |
//! | recycled CPU buffers of KV caches and cached prefixes; freeing them | `kvbuf.rs`: [`release_kv_buffers`] |
//! | allocator and thread-pool tuning; decoding loops on a pool worker | `runtime.rs`: [`tune_runtime`] |
//! | AdamW, clipping, LR schedules | [`AdamW`], [`clip_grad_norm`], [`LrSchedule`] |

pub mod config;
pub mod error;
pub mod generate;
mod kernels;
mod kvbuf;
pub mod load;
pub mod logprobs;
pub mod lora;
pub mod model;
pub mod ops;
pub mod optim;
mod runtime;
pub mod tokenizer;

pub use candle_core::{DType, Device, Tensor, Var};
pub use config::{Arch, ModelConfig};
pub use error::{Error, Result};
pub use generate::{FinishReason, GenStats, Generation, PrefixCache, SamplingParams};
pub use kernels::{
    bf16_available, bf16_kernel, detected_simd_level, set_simd_level, simd_level, simd_summary,
    Bf16Kernel, SimdLevel,
};
pub use kernels::{AmxMatrix, PanelMatrix};
pub use kvbuf::release_kv_buffers;
pub use load::{load, save, Checkpoint};
pub use logprobs::{
    chunked_logprobs, chunked_logprobs_with, pack_rows, SequenceScores, DEFAULT_VOCAB_CHUNK,
};
pub use lora::{dropout_mask, LoraConfig};
pub use model::{CausalLM, KvCache, SeqLayout};
pub use optim::{clip_grad_norm, AdamW, AdamWConfig, LrSchedule};
pub use runtime::tune_runtime;
pub use tokenizer::{ChatTemplate, Tokenizer};

/// The device to run on: CUDA device 0 when built with `cuda` and the driver and a
/// device are present (unless `cpu` is asked for), else the CPU.
pub fn default_device(cpu: bool) -> Result<Device> {
    if cpu {
        return Ok(Device::Cpu);
    }
    #[cfg(feature = "cuda")]
    {
        use candle_core::cuda_backend::cudarc;
        // The CUDA libraries are opened at run time (vendor/README.md): a CUDA build on
        // a machine without the driver or without a device runs on the CPU.
        // SAFETY: only tries to open the driver library, calling nothing in it.
        if unsafe { cudarc::driver::sys::is_culib_present() } {
            if let Ok(d) = Device::new_cuda(0) {
                return Ok(d);
            }
        }
    }
    Ok(Device::Cpu)
}

/// Parses a dtype name (`f32`, `bf16`, `f16`, `f64`).
pub fn parse_dtype(s: &str) -> Result<DType> {
    match s {
        "f32" | "float32" => Ok(DType::F32),
        "bf16" | "bfloat16" => Ok(DType::BF16),
        "f16" | "float16" => Ok(DType::F16),
        "f64" | "float64" => Ok(DType::F64),
        other => Err(Error::Invalid(format!(
            "unknown dtype `{other}` (f32, bf16, f16, f64)"
        ))),
    }
}

//! LoRA adapters (Hu et al., 2021) on the decoder's projections, in the layout HF PEFT
//! uses: for a target projection `W: [out, in]`, `A: [rank, in]` and `B: [out, rank]`,
//! and the layer computes `x W^T + (alpha / rank) (x A^T) B^T`. `A` starts uniform in
//! `±1/sqrt(in)` (PEFT's default Kaiming-uniform bound), `B` at zero, so a fresh adapter
//! leaves the model unchanged.
//!
//! With adapters on, the base weights are frozen: forward passes use them without
//! recording a graph, so the backward pass computes no weight gradient for them, and
//! [`crate::CausalLM::trainable`] names only the adapters. [`crate::CausalLM::hf_tensors`]
//! (and so [`crate::save`]) gives the merged weights `W + (alpha / rank) B A`, a plain HF
//! checkpoint; [`save_adapter`] writes the adapters as a PEFT directory
//! (`adapter_config.json`, `adapter_model.safetensors`) that `PeftModel.from_pretrained`
//! loads on the base model.

use crate::error::{Error, Result};
use candle_core::{DType, Tensor, Var};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;

/// The projections an adapter can target, in the order the model keeps them.
pub const TARGETS: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

/// LoRA settings (the `[lora]` table of the trainers).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LoraConfig {
    /// Rank of the adapters; 0 = no adapters (full fine-tuning).
    pub rank: usize,
    /// Scale numerator: the update is `alpha / rank * B A`.
    pub alpha: f64,
    /// Dropout on the adapters' input in training passes (`forward_backward`), as PEFT's
    /// `lora_dropout`: each adapter's input element is zeroed with this probability and
    /// the rest scaled by `1 / (1 - dropout)`. Masks are a function of the seed set
    /// with [`crate::CausalLM::set_dropout_seed`], the layer and the projection, so a
    /// recomputed (checkpointed) layer and a resumed run draw the same ones. Inference
    /// (generation, scoring) never drops.
    pub dropout: f64,
    /// Projections to adapt (names from [`TARGETS`]).
    pub targets: Vec<String>,
}

impl Default for LoraConfig {
    fn default() -> Self {
        LoraConfig {
            rank: 0,
            alpha: 16.0,
            dropout: 0.0,
            targets: TARGETS.iter().map(|s| s.to_string()).collect(),
        }
    }
}

impl LoraConfig {
    /// Whether adapters are on.
    pub fn enabled(&self) -> bool {
        self.rank > 0
    }

    /// Rejects impossible settings, naming the key.
    pub fn validate(&self) -> std::result::Result<(), String> {
        if !self.enabled() {
            return Ok(());
        }
        if !(self.alpha.is_finite() && self.alpha > 0.0) {
            return Err(format!("lora.alpha must be > 0 (got {})", self.alpha));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(format!(
                "lora.dropout must be in [0, 1) (got {})",
                self.dropout
            ));
        }
        if self.targets.is_empty() {
            return Err("lora.targets must name at least one projection".into());
        }
        for t in &self.targets {
            if !TARGETS.contains(&t.as_str()) {
                return Err(format!(
                    "lora.targets: unknown projection `{t}` (one of {})",
                    TARGETS.join(", ")
                ));
            }
        }
        Ok(())
    }

    /// `alpha / rank`.
    pub fn scale(&self) -> f64 {
        self.alpha / self.rank as f64
    }
}

/// A dropout mask of `n` values: 0 with probability `p`, else `1 / (1 - p)`, drawn from
/// `seed` (the same seed gives the same mask).
pub fn dropout_mask(seed: u64, n: usize, p: f64) -> Vec<f32> {
    let mut rng = tooltrain_util::Rng::new(seed);
    let keep = (1.0 / (1.0 - p)) as f32;
    // Compare 53-bit uniforms with p: exact for any p, one draw per element.
    let threshold = (p * (1u64 << 53) as f64) as u64;
    (0..n)
        .map(|_| {
            if (rng.next_u64() >> 11) < threshold {
                0.0
            } else {
                keep
            }
        })
        .collect()
}

/// One adapter: `A: [rank, in]`, `B: [out, rank]`.
#[derive(Clone)]
pub(crate) struct Adapter {
    pub a: Var,
    pub b: Var,
}

/// The adapters of a model.
pub(crate) struct Lora {
    pub cfg: LoraConfig,
    /// Per layer, per entry of [`TARGETS`].
    pub layers: Vec<[Option<Adapter>; 7]>,
    /// PEFT tensor name -> variable.
    pub params: BTreeMap<String, Var>,
}

/// The PEFT name of layer `i`'s adapter matrix (`"A"` or `"B"`) on `target`.
pub(crate) fn peft_name(i: usize, target: &str, ab: &str) -> String {
    let block =
        if target.ends_with("_proj") && ["gate_proj", "up_proj", "down_proj"].contains(&target) {
            "mlp"
        } else {
            "self_attn"
        };
    format!("base_model.model.model.layers.{i}.{block}.{target}.lora_{ab}.weight")
}

/// The HF name of layer `i`'s base weight of `target`.
pub(crate) fn hf_name(i: usize, target: &str) -> String {
    let block = if ["gate_proj", "up_proj", "down_proj"].contains(&target) {
        "mlp"
    } else {
        "self_attn"
    };
    format!("model.layers.{i}.{block}.{target}.weight")
}

/// `(in, out)` of `target` in a model of `cfg`.
pub(crate) fn dims(cfg: &crate::ModelConfig, target: &str) -> (usize, usize) {
    let (h, hd) = (cfg.hidden_size, cfg.head_dim);
    let (nq, nkv) = (cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd);
    let inter = cfg.intermediate_size;
    match target {
        "q_proj" => (h, nq),
        "k_proj" | "v_proj" => (h, nkv),
        "o_proj" => (nq, h),
        "gate_proj" | "up_proj" => (h, inter),
        _ => (inter, h),
    }
}

/// Fresh adapters for `cfg` (`A` seeded uniform, `B` zero) in `dtype`.
pub(crate) fn init(
    model_cfg: &crate::ModelConfig,
    cfg: &LoraConfig,
    dtype: DType,
    device: &candle_core::Device,
    seed: u64,
) -> Result<Lora> {
    cfg.validate().map_err(Error::Invalid)?;
    let mut rng = tooltrain_util::Rng::new(seed ^ 0x4c6f_5241);
    let mut layers = Vec::with_capacity(model_cfg.num_hidden_layers);
    let mut params = BTreeMap::new();
    for i in 0..model_cfg.num_hidden_layers {
        let mut slots: [Option<Adapter>; 7] = Default::default();
        for (k, target) in TARGETS.iter().enumerate() {
            if !cfg.targets.iter().any(|t| t == target) {
                continue;
            }
            let (fan_in, out) = dims(model_cfg, target);
            let bound = 1.0 / (fan_in as f64).sqrt();
            let vals: Vec<f32> = (0..cfg.rank * fan_in)
                .map(|_| {
                    let u = (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
                    ((2.0 * u - 1.0) * bound) as f32
                })
                .collect();
            let a = Tensor::from_vec(vals, (cfg.rank, fan_in), device)?.to_dtype(dtype)?;
            let b = Tensor::zeros((out, cfg.rank), dtype, device)?;
            let ad = Adapter {
                a: Var::from_tensor(&a)?,
                b: Var::from_tensor(&b)?,
            };
            params.insert(peft_name(i, target, "A"), ad.a.clone());
            params.insert(peft_name(i, target, "B"), ad.b.clone());
            slots[k] = Some(ad);
        }
        layers.push(slots);
    }
    Ok(Lora {
        cfg: cfg.clone(),
        layers,
        params,
    })
}

/// Writes `lora` as a PEFT adapter directory: `adapter_config.json` and
/// `adapter_model.safetensors` (f32), written to temporary names and renamed.
pub(crate) fn save_adapter(lora: &Lora, base: &str, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let cfg = serde_json::json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base,
        "r": lora.cfg.rank,
        "lora_alpha": lora.cfg.alpha,
        "lora_dropout": lora.cfg.dropout,
        "target_modules": lora.cfg.targets,
        "bias": "none",
        "fan_in_fan_out": false,
        "inference_mode": true,
        "use_rslora": false,
        "init_lora_weights": true,
    });
    let text = serde_json::to_string_pretty(&cfg).expect("json");
    tooltrain_util::write_atomic(&dir.join("adapter_config.json"), text.as_bytes())
        .map_err(|e| Error::io(dir.join("adapter_config.json"), e))?;
    let ts: std::collections::HashMap<String, Tensor> = lora
        .params
        .iter()
        .map(|(k, v)| Ok((k.clone(), v.as_tensor().to_dtype(DType::F32)?)))
        .collect::<Result<_>>()?;
    let path = dir.join("adapter_model.safetensors");
    let tmp = dir.join(".adapter_model.safetensors.tmp");
    candle_core::safetensors::save(&ts, &tmp)?;
    std::fs::rename(&tmp, &path).map_err(|e| Error::io(&path, e))?;
    Ok(())
}

/// Reads the adapter matrices of a PEFT directory into `lora` (same rank and targets).
pub(crate) fn load_adapter(lora: &Lora, dir: &Path) -> Result<()> {
    let path = dir.join("adapter_model.safetensors");
    let ts = candle_core::safetensors::load(&path, &candle_core::Device::Cpu)?;
    for (name, v) in &lora.params {
        let t = ts.get(name).ok_or_else(|| Error::BadFile {
            path: path.clone(),
            msg: format!("missing tensor `{name}`"),
        })?;
        if t.dims() != v.dims() {
            return Err(Error::BadFile {
                path: path.clone(),
                msg: format!("`{name}` has shape {:?}, expected {:?}", t.dims(), v.dims()),
            });
        }
        v.set(&t.to_device(v.device())?.to_dtype(v.dtype())?)?;
    }
    Ok(())
}

//! The optimizer every trainer uses: AdamW (from `tooltrain-model`) over f32 master
//! weights when the model is in half precision, global-norm clipping, and the checks of
//! its hyper-parameters.

use anyhow::{anyhow, bail, Context, Result};
use candle_core::backprop::GradStore;
use std::collections::BTreeMap;
use std::path::Path;
use tooltrain_model::{AdamW, AdamWConfig, CausalLM, DType, Var};

/// The optimizer's hyper-parameters (a trainer's config holds them at its top level).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct OptimSettings {
    /// Peak learning rate.
    pub lr: f64,
    /// AdamW (beta1, beta2).
    pub betas: [f64; 2],
    /// AdamW epsilon.
    pub eps: f64,
    /// Decoupled weight decay (matrices only; not norms and biases).
    pub weight_decay: f64,
    /// Clip the global gradient norm to this (0: no clipping).
    pub max_grad_norm: f64,
    /// Keep f32 master weights for a half-precision model.
    pub master_weights: bool,
}

impl OptimSettings {
    /// Rejects impossible or non-finite values, naming the config key.
    pub fn validate(&self) -> Result<()> {
        let bad = |key: &str, msg: String| Err(anyhow!("invalid config: `{key}` {msg}"));
        if !(self.lr > 0.0 && self.lr.is_finite()) {
            return bad("lr", format!("must be finite and > 0 (got {})", self.lr));
        }
        if !self.betas.iter().all(|b| (0.0..1.0).contains(b)) {
            return bad("betas", format!("must be in [0, 1) (got {:?})", self.betas));
        }
        if !(self.eps > 0.0 && self.eps.is_finite()) {
            return bad("eps", format!("must be finite and > 0 (got {})", self.eps));
        }
        if !(self.weight_decay >= 0.0 && self.weight_decay.is_finite()) {
            return bad(
                "weight_decay",
                format!("must be finite and >= 0 (got {})", self.weight_decay),
            );
        }
        if !(self.max_grad_norm >= 0.0 && self.max_grad_norm.is_finite()) {
            return bad(
                "max_grad_norm",
                format!(
                    "must be finite and >= 0 (0: no clipping; got {})",
                    self.max_grad_norm
                ),
            );
        }
        Ok(())
    }

    /// The clipping threshold for [`tooltrain_model::clip_grad_norm`] (infinite: none).
    pub fn clip_threshold(&self) -> f64 {
        if self.max_grad_norm > 0.0 {
            self.max_grad_norm
        } else {
            f64::INFINITY
        }
    }
}

/// AdamW over the model's trainable parameters ([`CausalLM::trainable`]: the LoRA
/// adapters when it has them, else every weight), over f32 master copies when the model
/// is in half precision and `master_weights` is on.
pub struct Optimizer {
    adamw: AdamW,
    /// Parameter name -> f32 master copy.
    master: Option<BTreeMap<String, Var>>,
}

impl Optimizer {
    /// AdamW over `model`'s parameters (and their f32 masters when the model is in
    /// half precision and `s.master_weights` is on).
    pub fn new(model: &CausalLM, s: &OptimSettings) -> Result<Self> {
        let half = !matches!(model.dtype(), DType::F32 | DType::F64);
        let master = if half && s.master_weights {
            let mut m = BTreeMap::new();
            for (name, v) in model.trainable() {
                m.insert(
                    name.clone(),
                    Var::from_tensor(&v.as_tensor().to_dtype(DType::F32)?)?,
                );
            }
            Some(m)
        } else {
            None
        };
        let adamw = AdamW::new(
            master.as_ref().unwrap_or(model.trainable()),
            AdamWConfig {
                beta1: s.betas[0],
                beta2: s.betas[1],
                eps: s.eps,
                weight_decay: s.weight_decay,
            },
        )?;
        Ok(Optimizer { adamw, master })
    }

    /// Updates done.
    pub fn steps(&self) -> u64 {
        self.adamw.steps()
    }

    /// One update from the model's gradients `grads` (scaled by `scale`). Marks the
    /// model's weights as changed, so caches of the old weights' keys and values
    /// ([`tooltrain_model::PrefixCache`]) are not reused.
    pub fn step(&mut self, model: &CausalLM, grads: &GradStore, lr: f64, scale: f64) -> Result<()> {
        let res = self.update(model, grads, lr, scale);
        model.weights_changed();
        res
    }

    fn update(&mut self, model: &CausalLM, grads: &GradStore, lr: f64, scale: f64) -> Result<()> {
        let Some(master) = &self.master else {
            self.adamw.step(grads, lr, scale)?;
            return Ok(());
        };
        let mut g32 = GradStore::default();
        for (name, v) in model.trainable() {
            if let Some(g) = grads.get(v.as_tensor()) {
                g32.insert(master[name].as_tensor(), g.to_dtype(DType::F32)?);
            }
        }
        self.adamw.step(&g32, lr, scale)?;
        for (name, v) in model.trainable() {
            v.set(&master[name].as_tensor().to_dtype(v.dtype())?)?;
        }
        Ok(())
    }

    /// Writes `optimizer.safetensors` (and `master.safetensors`) into `dir`.
    pub fn save(&self, dir: &Path) -> Result<()> {
        self.adamw.save(&dir.join("optimizer.safetensors"))?;
        if let Some(master) = &self.master {
            let ts: std::collections::HashMap<String, candle_core::Tensor> = master
                .iter()
                .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
                .collect();
            let p = dir.join("master.safetensors");
            candle_core::safetensors::save(&ts, &p)
                .with_context(|| format!("writing {}", p.display()))?;
        }
        Ok(())
    }

    /// Restores the state [`Optimizer::save`] wrote into the checkpoint `dir`.
    pub fn load(&mut self, dir: &Path, model: &CausalLM) -> Result<()> {
        self.adamw.load(&dir.join("optimizer.safetensors"))?;
        if let Some(master) = &self.master {
            let p = dir.join("master.safetensors");
            let ts = candle_core::safetensors::load(&p, model.device())
                .with_context(|| format!("reading {} (master weights)", p.display()))?;
            for (name, v) in master {
                let t = ts
                    .get(name)
                    .ok_or_else(|| anyhow!("{}: missing `{name}`", p.display()))?;
                if t.dims() != v.dims() {
                    bail!("{}: `{name}` has shape {:?}", p.display(), t.dims());
                }
                v.set(t)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok() -> OptimSettings {
        OptimSettings {
            lr: 1e-5,
            betas: [0.9, 0.95],
            eps: 1e-8,
            weight_decay: 0.01,
            max_grad_norm: 1.0,
            master_weights: true,
        }
    }

    #[test]
    fn non_finite_and_negative_values_are_rejected_by_key() {
        assert!(ok().validate().is_ok());
        let cases: Vec<(&str, OptimSettings)> = vec![
            (
                "lr",
                OptimSettings {
                    lr: f64::INFINITY,
                    ..ok()
                },
            ),
            ("lr", OptimSettings { lr: 0.0, ..ok() }),
            (
                "lr",
                OptimSettings {
                    lr: f64::NAN,
                    ..ok()
                },
            ),
            (
                "eps",
                OptimSettings {
                    eps: f64::INFINITY,
                    ..ok()
                },
            ),
            ("eps", OptimSettings { eps: 0.0, ..ok() }),
            (
                "weight_decay",
                OptimSettings {
                    weight_decay: f64::INFINITY,
                    ..ok()
                },
            ),
            (
                "weight_decay",
                OptimSettings {
                    weight_decay: -1.0,
                    ..ok()
                },
            ),
            (
                "max_grad_norm",
                OptimSettings {
                    max_grad_norm: f64::INFINITY,
                    ..ok()
                },
            ),
            (
                "max_grad_norm",
                OptimSettings {
                    max_grad_norm: f64::NAN,
                    ..ok()
                },
            ),
            (
                "betas",
                OptimSettings {
                    betas: [0.9, 1.0],
                    ..ok()
                },
            ),
        ];
        for (key, s) in cases {
            let e = s.validate().unwrap_err().to_string();
            assert!(e.contains(&format!("`{key}`")), "{key}: {e}");
        }
        assert_eq!(
            OptimSettings {
                max_grad_norm: 0.0,
                ..ok()
            }
            .clip_threshold(),
            f64::INFINITY
        );
    }

    #[test]
    fn a_step_changes_the_weights_version() {
        let cfg = tooltrain_model::ModelConfig::from_json(&serde_json::json!({
            "model_type": "qwen2", "vocab_size": 32, "hidden_size": 8,
            "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
            "num_key_value_heads": 1, "tie_word_embeddings": true
        }))
        .unwrap();
        let dev = tooltrain_model::Device::Cpu;
        let model = CausalLM::new_random(&cfg, DType::F32, &dev, 1).unwrap();
        let mut opt = Optimizer::new(&model, &ok()).unwrap();
        let ids = candle_core::Tensor::new(&[[1u32, 2, 3, 4]], &dev).unwrap();
        let layout = tooltrain_model::SeqLayout::left_padded(&[4], 4, &dev).unwrap();
        let (_, grads) = model
            .forward_backward(&ids, &layout, false, |h| Ok(h.sqr()?.sum_all()?))
            .unwrap();
        let before = model.weights_version();
        opt.step(&model, &grads, 1e-2, 1.0).unwrap();
        assert_ne!(
            model.weights_version(),
            before,
            "caches of the old weights must go"
        );
    }
}

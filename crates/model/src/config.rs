//! Model configuration, read from a Hugging Face `config.json`.

use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::path::Path;

/// Supported decoder architectures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Arch {
    /// Llama (and SmolLM2): no biases.
    Llama,
    /// Qwen2 / Qwen2.5: bias on q, k and v projections.
    Qwen2,
    /// Qwen3: RMSNorm on q and k per head, no biases.
    Qwen3,
}

impl Arch {
    /// The `model_type` string of HF configs.
    pub fn model_type(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Qwen2 => "qwen2",
            Arch::Qwen3 => "qwen3",
        }
    }
    fn hf_class(self) -> &'static str {
        match self {
            Arch::Llama => "LlamaForCausalLM",
            Arch::Qwen2 => "Qwen2ForCausalLM",
            Arch::Qwen3 => "Qwen3ForCausalLM",
        }
    }
}

/// Hyper-parameters of a decoder LLM.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub arch: Arch,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// q/k/v projections carry a bias (Qwen2, or Llama with `attention_bias`).
    pub attention_bias: bool,
    pub bos_token_id: Option<u32>,
    /// All end-of-sequence ids (HF allows a list).
    pub eos_token_ids: Vec<u32>,
}

impl ModelConfig {
    /// Reads and validates `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let v: Value = serde_json::from_str(&text)
            .map_err(|e| Error::bad_file(path, format!("not valid JSON: {e}")))?;
        Self::from_json(&v).map_err(|e| match e {
            Error::Invalid(m) | Error::Unsupported(m) => Error::bad_file(path, m),
            other => other,
        })
    }

    /// Parses a HF config from JSON.
    pub fn from_json(v: &Value) -> Result<Self> {
        let model_type = v
            .get("model_type")
            .and_then(Value::as_str)
            .ok_or_else(|| Error::Invalid("missing string field `model_type`".into()))?;
        let arch = match model_type {
            "llama" | "mistral" => Arch::Llama,
            "qwen2" => Arch::Qwen2,
            "qwen3" => Arch::Qwen3,
            other => {
                return Err(Error::Unsupported(format!(
                    "model_type `{other}` (supported: llama, qwen2, qwen3)"
                )))
            }
        };
        let usize_field = |k: &str| -> Result<usize> {
            v.get(k)
                .and_then(Value::as_u64)
                .map(|x| x as usize)
                .ok_or_else(|| Error::Invalid(format!("missing or non-integer field `{k}`")))
        };
        let opt_usize = |k: &str| v.get(k).and_then(Value::as_u64).map(|x| x as usize);
        let hidden_size = usize_field("hidden_size")?;
        let num_attention_heads = usize_field("num_attention_heads")?;
        let num_key_value_heads = opt_usize("num_key_value_heads").unwrap_or(num_attention_heads);
        if num_attention_heads == 0 || num_key_value_heads == 0 {
            return Err(Error::Invalid("head counts must be positive".into()));
        }
        if num_attention_heads % num_key_value_heads != 0 {
            return Err(Error::Invalid(format!(
                "num_attention_heads {num_attention_heads} is not a multiple of num_key_value_heads {num_key_value_heads}"
            )));
        }
        let head_dim = opt_usize("head_dim").unwrap_or(hidden_size / num_attention_heads);
        if head_dim % 2 != 0 {
            return Err(Error::Invalid(format!("head_dim {head_dim} must be even")));
        }
        let rope_params = v.get("rope_parameters");
        let rope_theta = v
            .get("rope_theta")
            .and_then(Value::as_f64)
            .or_else(|| {
                rope_params
                    .and_then(|r| r.get("rope_theta"))
                    .and_then(Value::as_f64)
            })
            .unwrap_or(10000.0);
        for scaling in [v.get("rope_scaling"), rope_params] {
            if let Some(s) = scaling.filter(|s| !s.is_null()) {
                let ty = s
                    .get("rope_type")
                    .or_else(|| s.get("type"))
                    .and_then(Value::as_str)
                    .unwrap_or("default");
                if ty != "default" {
                    return Err(Error::Unsupported(format!("rope scaling type `{ty}`")));
                }
            }
        }
        if let Some(act) = v.get("hidden_act").and_then(Value::as_str) {
            if act != "silu" {
                return Err(Error::Unsupported(format!(
                    "hidden_act `{act}` (only silu)"
                )));
            }
        }
        if v.get("use_sliding_window").and_then(Value::as_bool) == Some(true) {
            return Err(Error::Unsupported("sliding-window attention".into()));
        }
        let eos_token_ids = match v.get("eos_token_id") {
            Some(Value::Number(n)) => n.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
            Some(Value::Array(a)) => a
                .iter()
                .filter_map(|x| x.as_u64().map(|x| x as u32))
                .collect(),
            _ => vec![],
        };
        let cfg = ModelConfig {
            arch,
            vocab_size: usize_field("vocab_size")?,
            hidden_size,
            intermediate_size: usize_field("intermediate_size")?,
            num_hidden_layers: usize_field("num_hidden_layers")?,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            rms_norm_eps: v
                .get("rms_norm_eps")
                .and_then(Value::as_f64)
                .unwrap_or(1e-6),
            rope_theta,
            max_position_embeddings: opt_usize("max_position_embeddings").unwrap_or(32768),
            tie_word_embeddings: v
                .get("tie_word_embeddings")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            attention_bias: match arch {
                Arch::Qwen2 => true,
                _ => v
                    .get("attention_bias")
                    .and_then(Value::as_bool)
                    .unwrap_or(false),
            },
            bos_token_id: v
                .get("bos_token_id")
                .and_then(Value::as_u64)
                .map(|x| x as u32),
            eos_token_ids,
        };
        if cfg.vocab_size == 0 || cfg.hidden_size == 0 || cfg.num_hidden_layers == 0 {
            return Err(Error::Invalid(
                "vocab_size, hidden_size and num_hidden_layers must be positive".into(),
            ));
        }
        Ok(cfg)
    }

    /// The HF `config.json` this configuration saves as (loadable by transformers and vLLM).
    pub fn to_json(&self, dtype: &str) -> Value {
        let mut v = serde_json::json!({
            "architectures": [self.arch.hf_class()],
            "model_type": self.arch.model_type(),
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": "silu",
            "torch_dtype": dtype,
            "use_cache": true,
        });
        let m = v.as_object_mut().expect("object");
        if self.arch == Arch::Llama {
            m.insert("attention_bias".into(), self.attention_bias.into());
            m.insert("mlp_bias".into(), false.into());
        }
        if let Some(b) = self.bos_token_id {
            m.insert("bos_token_id".into(), b.into());
        }
        match self.eos_token_ids.as_slice() {
            [] => {}
            [one] => {
                m.insert("eos_token_id".into(), (*one).into());
            }
            many => {
                m.insert("eos_token_id".into(), many.to_vec().into());
            }
        }
        v
    }

    /// Number of query heads per key/value head.
    pub fn gqa_groups(&self) -> usize {
        self.num_attention_heads / self.num_key_value_heads
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_fixture_configs_and_round_trips() {
        for (dir, arch, tied, bias) in [
            ("tiny-llama", Arch::Llama, false, false),
            ("tiny-qwen2", Arch::Qwen2, true, true),
            ("tiny-qwen3", Arch::Qwen3, false, false),
        ] {
            let p = Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../../data/fixtures")
                .join(dir)
                .join("config.json");
            let c = ModelConfig::from_file(&p).unwrap();
            assert_eq!(c.arch, arch);
            assert_eq!(c.tie_word_embeddings, tied);
            assert_eq!(c.attention_bias, bias);
            assert_eq!(c.num_key_value_heads, 2);
            assert_eq!(c.head_dim, 16);
            let back = ModelConfig::from_json(&c.to_json("float32")).unwrap();
            assert_eq!(back, c);
        }
    }

    #[test]
    fn bad_configs_name_the_problem() {
        let e = ModelConfig::from_json(&serde_json::json!({"model_type": "gpt2"})).unwrap_err();
        assert!(e.to_string().contains("gpt2"), "{e}");
        let e =
            ModelConfig::from_json(&serde_json::json!({"model_type": "llama", "hidden_size": 8}))
                .unwrap_err();
        assert!(e.to_string().contains("num_attention_heads"), "{e}");
        let e = ModelConfig::from_json(&serde_json::json!({
            "model_type": "llama", "hidden_size": 8, "num_attention_heads": 3, "num_key_value_heads": 2,
            "vocab_size": 4, "intermediate_size": 4, "num_hidden_layers": 1}))
        .unwrap_err();
        assert!(e.to_string().contains("multiple"), "{e}");
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("config.json");
        std::fs::write(&p, "{not json").unwrap();
        let e = ModelConfig::from_file(&p).unwrap_err();
        assert!(
            e.to_string().contains("config.json") && e.to_string().contains("JSON"),
            "{e}"
        );
    }
}

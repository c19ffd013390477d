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

/// The `model_type` of a HF config, read first so an unsupported architecture is named
/// before any missing field.
#[derive(Deserialize)]
struct ModelType {
    model_type: String,
}

/// The fields of a HF `config.json` that a [`ModelConfig`] is made from; missing
/// optional fields take the HF defaults. Unknown fields are ignored (HF configs carry
/// many that do not change the network).
#[derive(Debug, Clone, Deserialize)]
pub struct HfConfig {
    pub hidden_size: usize,
    pub num_attention_heads: usize,
    pub vocab_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    /// Default: `num_attention_heads` (no grouped-query attention).
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    /// Default: `hidden_size / num_attention_heads`.
    #[serde(default)]
    pub head_dim: Option<usize>,
    #[serde(default = "default_rms_norm_eps")]
    pub rms_norm_eps: f64,
    /// Default: `rope_parameters.rope_theta`, else 10000.
    #[serde(default)]
    pub rope_theta: Option<f64>,
    #[serde(default)]
    pub rope_parameters: Option<RopeScaling>,
    #[serde(default)]
    pub rope_scaling: Option<RopeScaling>,
    #[serde(default)]
    pub hidden_act: Option<String>,
    #[serde(default)]
    pub use_sliding_window: Option<bool>,
    #[serde(default)]
    pub max_position_embeddings: Option<usize>,
    #[serde(default)]
    pub tie_word_embeddings: Option<bool>,
    #[serde(default)]
    pub attention_bias: Option<bool>,
    #[serde(default)]
    pub bos_token_id: Option<u32>,
    /// One id or a list.
    #[serde(default)]
    pub eos_token_id: Option<EosTokenIds>,
}

fn default_rms_norm_eps() -> f64 {
    1e-6
}

/// `rope_scaling` / `rope_parameters`: only the default (unscaled) RoPE is supported.
#[derive(Debug, Clone, Deserialize)]
pub struct RopeScaling {
    #[serde(default)]
    pub rope_theta: Option<f64>,
    #[serde(default)]
    pub rope_type: Option<String>,
    #[serde(default, rename = "type")]
    pub kind: Option<String>,
}

/// `eos_token_id`: HF allows one id or a list.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum EosTokenIds {
    One(u32),
    Many(Vec<u32>),
}

impl HfConfig {
    /// The model config of architecture `arch`, after checking that the network is one
    /// this crate implements.
    pub fn validate(self, arch: Arch) -> Result<ModelConfig> {
        let heads = self.num_attention_heads;
        let kv_heads = self.num_key_value_heads.unwrap_or(heads);
        if heads == 0 || kv_heads == 0 {
            return Err(Error::Invalid("head counts must be positive".into()));
        }
        if heads % kv_heads != 0 {
            return Err(Error::Invalid(format!(
                "num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}"
            )));
        }
        let head_dim = self.head_dim.unwrap_or(self.hidden_size / heads);
        if head_dim % 2 != 0 {
            return Err(Error::Invalid(format!("head_dim {head_dim} must be even")));
        }
        for s in [&self.rope_scaling, &self.rope_parameters]
            .into_iter()
            .flatten()
        {
            let ty = s
                .rope_type
                .as_deref()
                .or(s.kind.as_deref())
                .unwrap_or("default");
            if ty != "default" {
                return Err(Error::Unsupported(format!("rope scaling type `{ty}`")));
            }
        }
        if let Some(act) = self.hidden_act.as_deref().filter(|a| *a != "silu") {
            return Err(Error::Unsupported(format!(
                "hidden_act `{act}` (only silu)"
            )));
        }
        if self.use_sliding_window == Some(true) {
            return Err(Error::Unsupported("sliding-window attention".into()));
        }
        if self.vocab_size == 0 || self.hidden_size == 0 || self.num_hidden_layers == 0 {
            return Err(Error::Invalid(
                "vocab_size, hidden_size and num_hidden_layers must be positive".into(),
            ));
        }
        let rope_theta = self
            .rope_theta
            .or_else(|| self.rope_parameters.as_ref().and_then(|r| r.rope_theta))
            .unwrap_or(10000.0);
        Ok(ModelConfig {
            arch,
            vocab_size: self.vocab_size,
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            num_hidden_layers: self.num_hidden_layers,
            num_attention_heads: heads,
            num_key_value_heads: kv_heads,
            head_dim,
            rms_norm_eps: self.rms_norm_eps,
            rope_theta,
            max_position_embeddings: self.max_position_embeddings.unwrap_or(32768),
            tie_word_embeddings: self.tie_word_embeddings.unwrap_or(false),
            attention_bias: arch == Arch::Qwen2 || self.attention_bias.unwrap_or(false),
            bos_token_id: self.bos_token_id,
            eos_token_ids: match self.eos_token_id {
                Some(EosTokenIds::One(id)) => vec![id],
                Some(EosTokenIds::Many(ids)) => ids,
                None => vec![],
            },
        })
    }
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

    /// Parses a HF config from JSON ([`HfConfig`], then [`HfConfig::validate`]).
    pub fn from_json(v: &Value) -> Result<Self> {
        let kind: ModelType = serde_json::from_value(v.clone())
            .map_err(|e| Error::Invalid(format!("`model_type`: {e}")))?;
        let arch = match kind.model_type.as_str() {
            "llama" | "mistral" => Arch::Llama,
            "qwen2" => Arch::Qwen2,
            "qwen3" => Arch::Qwen3,
            other => {
                return Err(Error::Unsupported(format!(
                    "model_type `{other}` (supported: llama, qwen2, qwen3)"
                )))
            }
        };
        let hf: HfConfig =
            serde_json::from_value(v.clone()).map_err(|e| Error::Invalid(e.to_string()))?;
        hf.validate(arch)
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

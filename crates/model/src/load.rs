//! Checkpoint input and output: HF directories (safetensors, sharded or not), GGUF files
//! (dequantised), and saving in HF format.

use crate::config::{Arch, ModelConfig};
use crate::error::{write_atomic, Error, Result};
use crate::model::CausalLM;
use crate::tokenizer::Tokenizer;
use candle_core::quantized::gguf_file;
use candle_core::{DType, Device, Tensor};
use serde_json::Value;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

/// A model with its tokenizer, as loaded from a checkpoint.
pub struct Checkpoint {
    pub model: CausalLM,
    /// `None` for a weights-only directory without `tokenizer.json`.
    pub tokenizer: Option<Tokenizer>,
}

/// Loads a checkpoint: a HF directory (`config.json`, `model.safetensors` or
/// `model.safetensors.index.json`, `tokenizer.json`, ...) or a `.gguf` file. Weights of
/// any stored dtype are converted to `dtype`.
pub fn load(path: &Path, dtype: DType, device: &Device) -> Result<Checkpoint> {
    crate::tune_runtime();
    if path.is_file() && path.extension().is_some_and(|e| e == "gguf") {
        return load_gguf(path, dtype, device);
    }
    if !path.is_dir() {
        return Err(Error::bad_file(
            path,
            "not a checkpoint directory or a .gguf file",
        ));
    }
    let cfg = ModelConfig::from_file(&path.join("config.json"))?;
    let tensors = read_safetensors_dir(path, device)?;
    let model = CausalLM::from_tensors(cfg, tensors, dtype, device, &path.display().to_string())?;
    let tokenizer = if path.join("tokenizer.json").exists() {
        Some(Tokenizer::from_dir(path)?)
    } else {
        None
    };
    Ok(Checkpoint { model, tokenizer })
}

/// Reads every tensor of `model.safetensors` or of the shards listed in
/// `model.safetensors.index.json`.
fn read_safetensors_dir(dir: &Path, device: &Device) -> Result<BTreeMap<String, Tensor>> {
    let index = dir.join("model.safetensors.index.json");
    let files: Vec<std::path::PathBuf> = if index.exists() {
        let text = std::fs::read_to_string(&index).map_err(|e| Error::io(&index, e))?;
        let v: Value = serde_json::from_str(&text)
            .map_err(|e| Error::bad_file(&index, format!("not valid JSON: {e}")))?;
        let map = v
            .get("weight_map")
            .and_then(Value::as_object)
            .ok_or_else(|| Error::bad_file(&index, "missing object `weight_map`"))?;
        let mut names: Vec<&str> = map.values().filter_map(Value::as_str).collect();
        names.sort();
        names.dedup();
        let mut files = Vec::with_capacity(names.len());
        for n in names {
            if !is_plain_file_name(n) {
                return Err(Error::bad_file(
                    &index,
                    format!("shard `{n}` is not a file name inside the checkpoint directory"),
                ));
            }
            files.push(dir.join(n));
        }
        files
    } else {
        vec![dir.join("model.safetensors")]
    };
    let mut out = BTreeMap::new();
    for f in files {
        if !f.exists() {
            return Err(Error::bad_file(&f, "missing weights file"));
        }
        let ts = candle_core::safetensors::load(&f, device).map_err(|e| Error::bad_file(&f, e))?;
        out.extend(ts);
    }
    Ok(out)
}

/// A shard name that stays inside its directory: one normal path component.
fn is_plain_file_name(n: &str) -> bool {
    let mut c = Path::new(n).components();
    matches!(
        (c.next(), c.next()),
        (Some(std::path::Component::Normal(_)), None)
    )
}

/// Files of an earlier checkpoint in `dir` that would make it load as something else than
/// what [`save`] writes: a shard index (it takes precedence over `model.safetensors`) and
/// its shards, a `chat_template.jinja` (it takes precedence over the template saved in
/// `tokenizer_config.json`), and, when no tokenizer is saved, the tokenizer files.
fn remove_stale(dir: &Path, with_tokenizer: bool) -> Result<()> {
    let index = dir.join("model.safetensors.index.json");
    let mut stale = vec![dir.join("chat_template.jinja")];
    if let Ok(text) = std::fs::read_to_string(&index) {
        if let Ok(v) = serde_json::from_str::<Value>(&text) {
            let shards = v.get("weight_map").and_then(Value::as_object);
            for n in shards
                .into_iter()
                .flat_map(|m| m.values())
                .filter_map(Value::as_str)
            {
                if is_plain_file_name(n) && n != "model.safetensors" {
                    stale.push(dir.join(n));
                }
            }
        }
        stale.push(index);
    }
    if !with_tokenizer {
        stale.extend(["tokenizer.json", "tokenizer_config.json"].map(|f| dir.join(f)));
    }
    for p in stale {
        match std::fs::remove_file(&p) {
            Ok(()) => tracing::info!("removed stale {}", p.display()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io(&p, e)),
        }
    }
    Ok(())
}

/// Saves the model in HF format into `dir`: `config.json`, `model.safetensors` (in the
/// model's dtype) and the tokenizer files. Every file is written atomically, and files of
/// an earlier checkpoint there that would change what loads are removed, so the directory
/// loads as exactly what was saved.
pub fn save(model: &CausalLM, tokenizer: Option<&Tokenizer>, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let dtype_name = match model.dtype() {
        DType::F32 => "float32",
        DType::BF16 => "bfloat16",
        DType::F16 => "float16",
        DType::F64 => "float64",
        other => return Err(Error::Unsupported(format!("saving dtype {other:?}"))),
    };
    let tensors = model.hf_tensors()?;
    let weights = dir.join("model.safetensors");
    let tmp = dir.join(format!(".model.safetensors.{}.tmp", std::process::id()));
    let mut meta = HashMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    let views: Vec<(String, Tensor)> = tensors.into_iter().collect();
    safetensors::tensor::serialize_to_file(
        views.iter().map(|(n, t)| (n.as_str(), TensorView(t))),
        Some(meta),
        &tmp,
    )
    .map_err(|e| Error::bad_file(&tmp, e))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o644))
            .map_err(|e| Error::io(&tmp, e))?;
    }
    std::fs::rename(&tmp, &weights).map_err(|e| Error::io(&weights, e))?;
    remove_stale(dir, tokenizer.is_some())?;
    let cfg = serde_json::to_string_pretty(&model.config().to_json(dtype_name)).expect("json");
    write_atomic(&dir.join("config.json"), cfg.as_bytes())?;
    if let Some(t) = tokenizer {
        t.save(dir)?;
    }
    Ok(())
}

/// Adapter so candle tensors serialise with the `safetensors` crate.
struct TensorView<'a>(&'a Tensor);

impl safetensors::View for TensorView<'_> {
    fn dtype(&self) -> safetensors::Dtype {
        match self.0.dtype() {
            DType::F32 => safetensors::Dtype::F32,
            DType::F64 => safetensors::Dtype::F64,
            DType::BF16 => safetensors::Dtype::BF16,
            DType::F16 => safetensors::Dtype::F16,
            DType::U32 => safetensors::Dtype::U32,
            DType::I64 => safetensors::Dtype::I64,
            DType::U8 => safetensors::Dtype::U8,
            _ => safetensors::Dtype::F32,
        }
    }
    fn shape(&self) -> &[usize] {
        self.0.dims()
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        let t = self
            .0
            .flatten_all()
            .and_then(|t| t.to_device(&Device::Cpu))
            .expect("tensor to cpu");
        let bytes = match t.dtype() {
            DType::F32 => bytes_of(&t.to_vec1::<f32>().expect("f32")),
            DType::F64 => bytes_of(&t.to_vec1::<f64>().expect("f64")),
            DType::BF16 => bytes_of(&t.to_vec1::<half::bf16>().expect("bf16")),
            DType::F16 => bytes_of(&t.to_vec1::<half::f16>().expect("f16")),
            DType::U32 => bytes_of(&t.to_vec1::<u32>().expect("u32")),
            DType::I64 => bytes_of(&t.to_vec1::<i64>().expect("i64")),
            _ => bytes_of(&t.to_vec1::<u8>().expect("u8")),
        };
        std::borrow::Cow::Owned(bytes)
    }
    fn data_len(&self) -> usize {
        self.0.elem_count() * self.0.dtype().size_in_bytes()
    }
}

fn bytes_of<T: Copy>(v: &[T]) -> Vec<u8> {
    let n = std::mem::size_of_val(v);
    // SAFETY: plain-old-data numbers reinterpreted as their little-endian bytes.
    unsafe { std::slice::from_raw_parts(v.as_ptr() as *const u8, n) }.to_vec()
}

fn gguf_meta<'a>(
    c: &'a gguf_file::Content,
    path: &Path,
    key: &str,
) -> Result<&'a gguf_file::Value> {
    c.metadata
        .get(key)
        .ok_or_else(|| Error::bad_file(path, format!("missing GGUF metadata `{key}`")))
}

fn gguf_usize(c: &gguf_file::Content, path: &Path, key: &str) -> Result<usize> {
    let v = gguf_meta(c, path, key)?;
    v.to_u64()
        .or_else(|_| v.to_u32().map(u64::from))
        .or_else(|_| v.to_i32().map(|x| x as u64))
        .map(|x| x as usize)
        .map_err(|e| Error::bad_file(path, format!("GGUF metadata `{key}`: {e}")))
}

fn gguf_f64(c: &gguf_file::Content, key: &str) -> Option<f64> {
    let v = c.metadata.get(key)?;
    v.to_f32().map(f64::from).or_else(|_| v.to_f64()).ok()
}

/// Loads a GGUF file: weights dequantised to `dtype`, config and tokenizer from metadata.
pub fn load_gguf(path: &Path, dtype: DType, device: &Device) -> Result<Checkpoint> {
    let mut file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let content = gguf_file::Content::read(&mut file)
        .map_err(|e| Error::bad_file(path, format!("not a GGUF file: {e}")))?;
    let arch_name = gguf_meta(&content, path, "general.architecture")?
        .to_string()
        .map_err(|e| Error::bad_file(path, e))?
        .clone();
    let arch = match arch_name.as_str() {
        "llama" => Arch::Llama,
        "qwen2" => Arch::Qwen2,
        "qwen3" => Arch::Qwen3,
        other => {
            return Err(Error::bad_file(
                path,
                format!("unsupported GGUF architecture `{other}`"),
            ))
        }
    };
    let k = |s: &str| format!("{arch_name}.{s}");
    let hidden = gguf_usize(&content, path, &k("embedding_length"))?;
    let heads = gguf_usize(&content, path, &k("attention.head_count"))?;
    let kv_heads = gguf_usize(&content, path, &k("attention.head_count_kv")).unwrap_or(heads);
    let head_dim = gguf_usize(&content, path, &k("attention.key_length")).unwrap_or(hidden / heads);
    let embd = content
        .tensor_infos
        .get("token_embd.weight")
        .ok_or_else(|| Error::bad_file(path, "missing tensor `token_embd.weight`"))?;
    let vocab = embd.shape.dims()[0];
    let tied = !content.tensor_infos.contains_key("output.weight");
    let tokenizer = Tokenizer::from_gguf(&content, path)?;
    let mut cfg_json = serde_json::json!({
        "model_type": arch.model_type(),
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": gguf_usize(&content, path, &k("feed_forward_length"))?,
        "num_hidden_layers": gguf_usize(&content, path, &k("block_count"))?,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "rms_norm_eps": gguf_f64(&content, &k("attention.layer_norm_rms_epsilon")).unwrap_or(1e-6),
        "rope_theta": gguf_f64(&content, &k("rope.freq_base")).unwrap_or(10000.0),
        "max_position_embeddings": gguf_usize(&content, path, &k("context_length")).unwrap_or(4096),
        "tie_word_embeddings": tied,
        "eos_token_id": tokenizer.eos_ids(),
    });
    if let Some(b) = tokenizer.bos_id() {
        cfg_json["bos_token_id"] = b.into();
    }
    let cfg = ModelConfig::from_json(&cfg_json).map_err(|e| Error::bad_file(path, e))?;
    let mut tensors = BTreeMap::new();
    for name in content.tensor_infos.keys() {
        let Some(hf) = gguf_to_hf_name(name) else {
            continue;
        };
        let q = content
            .tensor(&mut file, name, &Device::Cpu)
            .map_err(|e| Error::bad_file(path, format!("tensor `{name}`: {e}")))?;
        let mut t = q.dequantize(&Device::Cpu)?;
        // llama.cpp permutes q/k rows of llama models for its interleaved RoPE: undo it.
        if arch == Arch::Llama
            && (name.ends_with("attn_q.weight") || name.ends_with("attn_k.weight"))
        {
            let n = if name.ends_with("attn_q.weight") {
                heads
            } else {
                kv_heads
            };
            let (out, inp) = t.dims2()?;
            t = t
                .reshape((n, head_dim / 2, 2, inp))?
                .transpose(1, 2)?
                .reshape((out, inp))?;
        }
        tensors.insert(hf, t);
    }
    let model = CausalLM::from_tensors(cfg, tensors, dtype, device, &path.display().to_string())?;
    Ok(Checkpoint {
        model,
        tokenizer: Some(tokenizer),
    })
}

fn gguf_to_hf_name(name: &str) -> Option<String> {
    let fixed = match name {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(f) = fixed {
        return Some(f.to_string());
    }
    let rest = name.strip_prefix("blk.")?;
    let (idx, tail) = rest.split_once('.')?;
    let mapped = match tail {
        "attn_norm.weight" => "input_layernorm.weight",
        "attn_q.weight" => "self_attn.q_proj.weight",
        "attn_k.weight" => "self_attn.k_proj.weight",
        "attn_v.weight" => "self_attn.v_proj.weight",
        "attn_output.weight" => "self_attn.o_proj.weight",
        "attn_q.bias" => "self_attn.q_proj.bias",
        "attn_k.bias" => "self_attn.k_proj.bias",
        "attn_v.bias" => "self_attn.v_proj.bias",
        "attn_q_norm.weight" => "self_attn.q_norm.weight",
        "attn_k_norm.weight" => "self_attn.k_norm.weight",
        "ffn_norm.weight" => "post_attention_layernorm.weight",
        "ffn_gate.weight" => "mlp.gate_proj.weight",
        "ffn_up.weight" => "mlp.up_proj.weight",
        "ffn_down.weight" => "mlp.down_proj.weight",
        _ => return None,
    };
    Some(format!("model.layers.{idx}.{mapped}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> CausalLM {
        let p = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../data/fixtures/tiny-qwen2/config.json");
        let cfg = crate::ModelConfig::from_file(&p).unwrap();
        CausalLM::new_random(&cfg, DType::F32, &Device::Cpu, 5).unwrap()
    }

    #[test]
    fn a_save_over_another_checkpoint_loads_as_what_was_saved() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path();
        // An earlier sharded checkpoint with a tokenizer and a template file.
        let other = CausalLM::new_random(tiny().config(), DType::F32, &Device::Cpu, 9).unwrap();
        save(&other, None, dir).unwrap();
        std::fs::rename(
            dir.join("model.safetensors"),
            dir.join("model-00001-of-00001.safetensors"),
        )
        .unwrap();
        let names: Vec<String> = other.hf_tensors().unwrap().keys().cloned().collect();
        let map: serde_json::Map<String, Value> = names
            .iter()
            .map(|n| (n.clone(), Value::from("model-00001-of-00001.safetensors")))
            .collect();
        std::fs::write(
            dir.join("model.safetensors.index.json"),
            serde_json::json!({"weight_map": map}).to_string(),
        )
        .unwrap();
        std::fs::write(dir.join("tokenizer.json"), "{}").unwrap();
        std::fs::write(dir.join("chat_template.jinja"), "x").unwrap();
        let m = tiny();
        save(&m, None, dir).unwrap();
        let back = load(dir, DType::F32, &Device::Cpu).unwrap();
        assert!(back.tokenizer.is_none());
        let (a, b) = (m.hf_tensors().unwrap(), back.model.hf_tensors().unwrap());
        assert_eq!(a.len(), b.len());
        for (k, t) in &a {
            let diff = (t - &b[k])
                .unwrap()
                .abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert_eq!(diff, 0.0, "{k}");
        }
        for stale in [
            "model.safetensors.index.json",
            "model-00001-of-00001.safetensors",
            "tokenizer.json",
            "chat_template.jinja",
        ] {
            assert!(!dir.join(stale).exists(), "{stale}");
        }
    }

    #[test]
    fn a_shard_index_cannot_name_files_outside_its_directory() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("ck");
        save(&tiny(), None, &dir).unwrap();
        for bad in [
            "../model.safetensors",
            "/etc/passwd",
            "a/../../b.safetensors",
        ] {
            let idx = serde_json::json!({"weight_map": {"lm_head.weight": bad}});
            std::fs::write(dir.join("model.safetensors.index.json"), idx.to_string()).unwrap();
            let e = load(&dir, DType::F32, &Device::Cpu)
                .err()
                .unwrap()
                .to_string();
            assert!(e.contains("not a file name inside"), "{bad}: {e}");
        }
        assert!(is_plain_file_name("model-00001-of-00002.safetensors"));
    }
}

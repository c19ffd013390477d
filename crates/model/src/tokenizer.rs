//! Tokenizer (`tokenizer.json` via the `tokenizers` crate, or a GGUF file's vocabulary)
//! and the checkpoint's chat template rendered with minijinja the way HF
//! `apply_chat_template` renders it.

use crate::error::{write_atomic, Error, Result};
use candle_core::quantized::gguf_file;
use serde_json::{Map, Value};
use std::path::Path;

/// A tokenizer plus the special tokens and chat template of its checkpoint.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    template: Option<ChatTemplate>,
    bos_token: Option<String>,
    eos_token: Option<String>,
    /// `tokenizer_config.json` as read (saved back unchanged but for the template).
    config: Map<String, Value>,
}

fn special_token(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(Value::as_str).map(str::to_string),
        _ => None,
    }
}

impl Tokenizer {
    /// Reads `tokenizer.json`, and where present `tokenizer_config.json` (special tokens,
    /// `chat_template`) and `chat_template.jinja` (which takes precedence).
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let tj = dir.join("tokenizer.json");
        if !tj.exists() {
            return Err(Error::bad_file(&tj, "missing tokenizer file"));
        }
        let inner = tokenizers::Tokenizer::from_file(&tj).map_err(|e| Error::bad_file(&tj, e))?;
        let tc = dir.join("tokenizer_config.json");
        let config: Map<String, Value> = if tc.exists() {
            let text = std::fs::read_to_string(&tc).map_err(|e| Error::io(&tc, e))?;
            serde_json::from_str(&text)
                .map_err(|e| Error::bad_file(&tc, format!("not a JSON object: {e}")))?
        } else {
            Map::new()
        };
        let jinja = dir.join("chat_template.jinja");
        let source = if jinja.exists() {
            Some((
                std::fs::read_to_string(&jinja).map_err(|e| Error::io(&jinja, e))?,
                jinja,
            ))
        } else {
            match config.get("chat_template") {
                Some(Value::String(s)) => Some((s.clone(), tc.clone())),
                Some(Value::Array(list)) => list
                    .iter()
                    .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                    .and_then(|t| t.get("template").and_then(Value::as_str))
                    .map(|s| (s.to_string(), tc.clone())),
                _ => None,
            }
        };
        let template = match source {
            Some((src, path)) => {
                Some(ChatTemplate::new(&src).map_err(|e| Error::bad_file(&path, e))?)
            }
            None => None,
        };
        Ok(Tokenizer {
            inner,
            template,
            bos_token: special_token(config.get("bos_token")),
            eos_token: special_token(config.get("eos_token")),
            config,
        })
    }

    /// Builds the tokenizer stored in a GGUF file's metadata (`tokenizer.ggml.*`, GPT-2
    /// style byte-level BPE) and its `tokenizer.chat_template`.
    pub fn from_gguf(c: &gguf_file::Content, path: &Path) -> Result<Self> {
        let get = |k: &str| {
            c.metadata
                .get(k)
                .ok_or_else(|| Error::bad_file(path, format!("missing GGUF metadata `{k}`")))
        };
        let model = get("tokenizer.ggml.model")?
            .to_string()
            .map_err(|e| Error::bad_file(path, e))?;
        if model != "gpt2" {
            return Err(Error::bad_file(
                path,
                format!(
                    "GGUF tokenizer model `{model}` is not supported (only gpt2 byte-level BPE)"
                ),
            ));
        }
        let strings = |k: &str| -> Result<Vec<String>> {
            get(k)?
                .to_vec()
                .map_err(|e| Error::bad_file(path, e))?
                .iter()
                .map(|v| {
                    v.to_string()
                        .cloned()
                        .map_err(|e| Error::bad_file(path, format!("{k}: {e}")))
                })
                .collect()
        };
        let tokens = strings("tokenizer.ggml.tokens")?;
        let merges = strings("tokenizer.ggml.merges")?;
        let types: Vec<i64> = match c.metadata.get("tokenizer.ggml.token_type") {
            Some(v) => v
                .to_vec()
                .map_err(|e| Error::bad_file(path, e))?
                .iter()
                .map(|x| x.to_i32().map(i64::from).unwrap_or(1))
                .collect(),
            None => vec![1; tokens.len()],
        };
        let id_of = |k: &str| c.metadata.get(k).and_then(|v| v.to_u32().ok());
        let vocab: Map<String, Value> = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), Value::from(i)))
            .collect();
        let added: Vec<Value> = tokens
            .iter()
            .enumerate()
            .filter(|(i, _)| types.get(*i) == Some(&3))
            .map(|(i, t)| serde_json::json!({"id": i, "content": t, "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}))
            .collect();
        let json = serde_json::json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": added,
            "normalizer": null,
            "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
            "post_processor": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true},
            "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
            "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                      "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                      "vocab": vocab, "merges": merges},
        });
        let inner: tokenizers::Tokenizer = json
            .to_string()
            .parse()
            .map_err(|e| Error::bad_file(path, format!("GGUF tokenizer: {e}")))?;
        let tok_name = |id: Option<u32>| id.and_then(|i| tokens.get(i as usize).cloned());
        let bos_token = tok_name(id_of("tokenizer.ggml.bos_token_id"));
        let eos_token = tok_name(id_of("tokenizer.ggml.eos_token_id"));
        let template = match c.metadata.get("tokenizer.chat_template") {
            Some(v) => {
                let src = v.to_string().map_err(|e| Error::bad_file(path, e))?;
                Some(ChatTemplate::new(src).map_err(|e| Error::bad_file(path, e))?)
            }
            None => None,
        };
        let mut config = Map::new();
        config.insert("tokenizer_class".into(), "PreTrainedTokenizerFast".into());
        config.insert("add_bos_token".into(), false.into());
        config.insert("bos_token".into(), bos_token.clone().into());
        config.insert("eos_token".into(), eos_token.clone().into());
        Ok(Tokenizer {
            inner,
            template,
            bos_token,
            eos_token,
            config,
        })
    }

    /// Writes `tokenizer.json` and `tokenizer_config.json` (with the chat template).
    pub fn save(&self, dir: &Path) -> Result<()> {
        let tj = self
            .inner
            .to_string(false)
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        write_atomic(&dir.join("tokenizer.json"), tj.as_bytes())?;
        let mut cfg = self.config.clone();
        if let Some(t) = &self.template {
            cfg.insert("chat_template".into(), t.source.clone().into());
        }
        let text = serde_json::to_string_pretty(&cfg).expect("json");
        write_atomic(&dir.join("tokenizer_config.json"), text.as_bytes())
    }

    /// A fingerprint of the vocabulary, merges, special tokens and chat template: equal
    /// for tokenizers that turn every conversation into the same ids (FNV-1a over the
    /// serialised tokenizer and the template source).
    pub fn fingerprint(&self) -> Result<u64> {
        let tj = self
            .inner
            .to_string(false)
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        let tpl = self.template.as_ref().map_or("", |t| t.source.as_str());
        let h = tooltrain_util::fnv1a(0, tj.bytes());
        Ok(tooltrain_util::fnv1a(h, tpl.bytes()))
    }

    /// Token ids of `text`, without special tokens added.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        Ok(self
            .inner
            .encode(text, false)
            .map_err(|e| Error::Tokenizer(e.to_string()))?
            .get_ids()
            .to_vec())
    }

    /// Text of `ids`; special tokens are kept unless `skip_special`.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special)
            .map_err(|e| Error::Tokenizer(e.to_string()))
    }

    /// The id of a token string, if it is in the vocabulary.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The id of the beginning-of-sequence token.
    pub fn bos_id(&self) -> Option<u32> {
        self.bos_token.as_deref().and_then(|t| self.token_id(t))
    }

    /// Ids that end a generation: the eos token and, where the vocabulary has them, the
    /// chat end markers `<|im_end|>`, `<|eot_id|>` and `<|endoftext|>`.
    pub fn eos_ids(&self) -> Vec<u32> {
        let mut out: Vec<u32> = self
            .eos_token
            .iter()
            .filter_map(|t| self.token_id(t))
            .collect();
        for t in ["<|im_end|>", "<|eot_id|>", "<|endoftext|>"] {
            if let Some(id) = self.token_id(t) {
                if !out.contains(&id) {
                    out.push(id);
                }
            }
        }
        out
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The chat template, if the checkpoint ships one.
    pub fn chat_template(&self) -> Option<&ChatTemplate> {
        self.template.as_ref()
    }

    /// Renders a conversation with the checkpoint's chat template (see
    /// [`ChatTemplate::render`]), with `bos_token`/`eos_token` set.
    pub fn apply_chat_template(
        &self,
        messages: &[Value],
        tools: Option<&[Value]>,
        add_generation_prompt: bool,
        extra: &Map<String, Value>,
    ) -> Result<String> {
        let t = self
            .template
            .as_ref()
            .ok_or_else(|| Error::Template("the checkpoint has no chat template".into()))?;
        let mut ctx = extra.clone();
        ctx.insert(
            "bos_token".into(),
            self.bos_token.clone().unwrap_or_default().into(),
        );
        ctx.insert(
            "eos_token".into(),
            self.eos_token.clone().unwrap_or_default().into(),
        );
        t.render(messages, tools, add_generation_prompt, &ctx)
    }
}

/// A Jinja chat template, rendered like HF transformers does: `trim_blocks`,
/// `lstrip_blocks`, Python string methods, `raise_exception`, and a `tojson` that
/// formats like Python's `json.dumps` (`", "`/`": "` separators, no HTML escaping).
pub struct ChatTemplate {
    env: minijinja::Environment<'static>,
    source: String,
}

impl ChatTemplate {
    /// Parses a template; errors carry the line of the problem.
    pub fn new(source: &str) -> Result<Self> {
        let mut env = minijinja::Environment::new();
        let syntax = minijinja::syntax::SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .map_err(|e| Error::Template(describe(&e)))?;
        env.set_syntax(syntax);
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_filter("tojson", tojson);
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<String, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    msg,
                ))
            },
        );
        env.add_function("strftime_now", |_fmt: String| "26 Nov 2026".to_string());
        env.add_template_owned("chat", source.to_string())
            .map_err(|e| Error::Template(describe(&e)))?;
        Ok(ChatTemplate {
            env,
            source: source.to_string(),
        })
    }

    /// The template source.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Renders `messages` (OpenAI-style message objects, including `tool_calls` and `tool`
    /// role messages) with optional `tools` (function schemas) and extra variables.
    pub fn render(
        &self,
        messages: &[Value],
        tools: Option<&[Value]>,
        add_generation_prompt: bool,
        extra: &Map<String, Value>,
    ) -> Result<String> {
        let mut ctx = extra.clone();
        ctx.insert("messages".into(), Value::Array(messages.to_vec()));
        if let Some(t) = tools {
            ctx.insert("tools".into(), Value::Array(t.to_vec()));
        }
        ctx.insert("add_generation_prompt".into(), add_generation_prompt.into());
        let tmpl = self
            .env
            .get_template("chat")
            .map_err(|e| Error::Template(describe(&e)))?;
        tmpl.render(minijinja::Value::from(minijinja::value::Serde(&ctx)))
            .map_err(|e| Error::Template(describe(&e)))
    }
}

fn describe(e: &minijinja::Error) -> String {
    let mut s = e.to_string();
    if let Some(line) = e.line() {
        s.push_str(&format!(" (template line {line})"));
    }
    s
}

/// Python `json.dumps(x, ensure_ascii=False, indent=indent)`.
fn tojson(
    value: minijinja::Value,
    kwargs: minijinja::value::Kwargs,
) -> std::result::Result<minijinja::Value, minijinja::Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    let _: Option<bool> = kwargs.get("ensure_ascii")?;
    let _: Option<bool> = kwargs.get("sort_keys")?;
    kwargs.assert_all_used()?;
    let v = serde_json::to_value(&value).map_err(|e| {
        minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, e.to_string())
    })?;
    let mut out = String::new();
    py_json(&v, indent, 0, &mut out);
    Ok(minijinja::Value::from_safe_string(out))
}

fn py_json(v: &Value, indent: Option<usize>, depth: usize, out: &mut String) {
    let newline = |out: &mut String, d: usize| {
        if let Some(n) = indent {
            out.push('\n');
            out.push_str(&" ".repeat(n * d));
        }
    };
    let item_sep = if indent.is_some() { "," } else { ", " };
    match v {
        Value::Array(a) if !a.is_empty() => {
            out.push('[');
            for (i, x) in a.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, depth + 1);
                py_json(x, indent, depth + 1, out);
            }
            newline(out, depth);
            out.push(']');
        }
        Value::Object(o) if !o.is_empty() => {
            out.push('{');
            for (i, (k, x)) in o.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, depth + 1);
                out.push_str(&serde_json::to_string(k).expect("string"));
                out.push_str(": ");
                py_json(x, indent, depth + 1, out);
            }
            newline(out, depth);
            out.push('}');
        }
        Value::Number(n) if n.is_f64() => {
            let f = n.as_f64().unwrap_or(0.0);
            if f.fract() == 0.0 && f.abs() < 1e16 {
                out.push_str(&format!("{f:.1}"));
            } else {
                out.push_str(&n.to_string());
            }
        }
        other => out.push_str(&serde_json::to_string(other).expect("json")),
    }
}

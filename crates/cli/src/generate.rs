//! `tooltrain generate`: one reply to a prompt or a chat.

use crate::common::ModelArgs;
use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Map, Value};
use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;
use tooltrain_model::{SamplingParams, Tokenizer};

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The user message (or, with --raw, the whole prompt text).
    #[arg(long)]
    pub prompt: Option<String>,
    /// A JSON file holding an array of OpenAI-style messages (`{"role", "content"}`).
    #[arg(long, value_name = "FILE.json")]
    pub chat: Option<PathBuf>,
    /// A system message placed before the conversation.
    #[arg(long)]
    pub system: Option<String>,
    /// At most this many new tokens.
    #[arg(long, default_value_t = 256)]
    pub max_new_tokens: usize,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.7)]
    pub temperature: f64,
    /// Nucleus sampling threshold, in (0, 1].
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f64,
    /// Keep only the K most likely tokens (0 = no limit).
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    /// Random seed.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Encode --prompt as-is instead of rendering it with the chat template.
    #[arg(long)]
    pub raw: bool,
    /// Linear layers in bf16 on AMX tiles or AVX512-BF16 (f32 without either).
    #[arg(long)]
    pub bf16: bool,
    /// Keys and values cached in bf16 (f32 models): half the KV cache's memory.
    #[arg(long)]
    pub kv_bf16: bool,
}

/// What to feed the model, as asked on the command line.
enum Input {
    Raw(String),
    Chat(Vec<Value>),
}

/// Checks the options and reads the --chat file (before the checkpoint is loaded, so
/// that usage errors come fast).
fn input(a: &Args) -> Result<Input> {
    match (&a.prompt, &a.chat) {
        (Some(_), Some(_)) => bail!("give either --prompt or --chat, not both"),
        (None, None) => bail!("nothing to generate from: give --prompt TEXT or --chat FILE.json"),
        _ => {}
    }
    if !(a.temperature >= 0.0 && a.temperature.is_finite()) {
        bail!("--temperature must be >= 0 (got {})", a.temperature);
    }
    if !(a.top_p > 0.0 && a.top_p <= 1.0) {
        bail!("--top-p must be in (0, 1] (got {})", a.top_p);
    }
    if a.max_new_tokens == 0 {
        bail!("--max-new-tokens must be at least 1");
    }
    if a.raw {
        if a.chat.is_some() {
            bail!("--raw needs --prompt (a --chat file is always rendered with the chat template)");
        }
        if a.system.is_some() {
            bail!("--raw cannot be combined with --system (put the system text in --prompt)");
        }
        return Ok(Input::Raw(a.prompt.clone().unwrap_or_default()));
    }
    let mut messages = Vec::new();
    if let Some(s) = &a.system {
        messages.push(json!({"role": "system", "content": s}));
    }
    if let Some(p) = &a.prompt {
        messages.push(json!({"role": "user", "content": p}));
    }
    if let Some(path) = &a.chat {
        let chat = read_chat(path)?;
        if a.system.is_some() && chat.first().and_then(|m| m.get("role")) == Some(&json!("system"))
        {
            bail!(
                "{}: the chat already starts with a system message; drop --system",
                path.display()
            );
        }
        messages.extend(chat);
    }
    Ok(Input::Chat(messages))
}

/// Reads a JSON array of message objects (or an object with a `messages` array).
fn read_chat(path: &PathBuf) -> Result<Vec<Value>> {
    let p = path.display();
    let text = std::fs::read_to_string(path).with_context(|| format!("{p}: cannot read"))?;
    let v: Value = serde_json::from_str(&text).map_err(|e| anyhow!("{p}: not valid JSON: {e}"))?;
    let arr = match v {
        Value::Array(a) => a,
        Value::Object(mut o) => match o.remove("messages") {
            Some(Value::Array(a)) => a,
            _ => bail!("{p}: expected a JSON array of messages"),
        },
        _ => bail!("{p}: expected a JSON array of messages"),
    };
    if arr.is_empty() {
        bail!("{p}: the chat has no messages");
    }
    for (i, m) in arr.iter().enumerate() {
        if !m.get("role").is_some_and(Value::is_string) {
            bail!("{p}: message {i} is not an object with a string `role`");
        }
    }
    Ok(arr)
}

fn prompt_ids(tok: &Tokenizer, input: &Input, model: &std::path::Path) -> Result<Vec<u32>> {
    let text = match input {
        Input::Raw(t) => t.clone(),
        Input::Chat(messages) => {
            if tok.chat_template().is_none() {
                bail!(
                    "{}: the checkpoint has no chat template; pass --raw to encode the prompt as-is",
                    model.display()
                );
            }
            tok.apply_chat_template(messages, None, true, &Map::new())
                .context("rendering the chat template")?
        }
    };
    tracing::debug!(prompt = %text, "prompt text");
    let ids = tok.encode(&text).context("encoding the prompt")?;
    if ids.is_empty() {
        bail!("the prompt encodes to no tokens");
    }
    Ok(ids)
}

pub fn run(a: Args) -> Result<()> {
    let input = input(&a)?;
    let ckpt = a.model.load()?;
    let tok = ckpt.tokenizer.as_ref().ok_or_else(|| {
        anyhow!(
            "{}: the checkpoint has no tokenizer (tokenizer.json); generate needs one",
            a.model.model.display()
        )
    })?;
    let ids = prompt_ids(tok, &input, &a.model.model)?;
    let params = SamplingParams {
        temperature: a.temperature,
        top_p: a.top_p,
        top_k: a.top_k,
        max_new_tokens: a.max_new_tokens,
        stop_token_ids: tok.eos_ids(),
        stop_strings: vec![],
        seed: a.seed,
        row_seeds: vec![],
        bf16: a.bf16,
        kv_bf16: a.kv_bf16,
    };
    let t0 = Instant::now();
    let g = ckpt
        .model
        .generate(std::slice::from_ref(&ids), &params, Some(tok))
        .context("generating")?
        .into_iter()
        .next()
        .ok_or_else(|| anyhow!("the model returned no generation"))?;
    let secs = t0.elapsed().as_secs_f64();
    let text = tok.decode(&g.tokens, true).context("decoding the reply")?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "{text}")?;
    out.flush()?;
    let n = g.tokens.len();
    eprintln!(
        "[{} prompt tokens, {n} new tokens in {secs:.2} s, {:.1} tokens/s, finish: {:?}]",
        ids.len(),
        n as f64 / secs.max(1e-9),
        g.finish
    );
    Ok(())
}

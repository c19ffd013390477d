//! `tooltrain score`: per-token log-probs and entropies of sequences from a JSONL file.

use crate::common::ModelArgs;
use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Value};
use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;
use tooltrain_model::{Tokenizer, DEFAULT_VOCAB_CHUNK};
use tooltrain_util::Progress;

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArgs,
    /// JSONL input: one `{"input_ids": [...]}` or `{"text": "..."}` per line.
    #[arg(long, value_name = "FILE.jsonl")]
    pub input: PathBuf,
    /// JSONL output (written atomically); stdout when absent.
    #[arg(long, value_name = "FILE.jsonl")]
    pub output: Option<PathBuf>,
    /// Sequences scored per forward pass.
    #[arg(long, default_value_t = 16)]
    pub batch: usize,
}

/// One input line before tokenisation.
enum Item {
    Ids(Vec<u64>),
    Text(String),
}

/// Reads and parses the input file: `(line number, item)`, blank lines skipped.
fn read_input(path: &Path) -> Result<Vec<(usize, Item)>> {
    let p = path.display();
    let f = File::open(path).with_context(|| format!("{p}: cannot open"))?;
    let mut out = Vec::new();
    for (i, line) in BufReader::new(f).lines().enumerate() {
        let ln = i + 1;
        let line = line.with_context(|| format!("{p}:{ln}: cannot read"))?;
        if line.trim().is_empty() {
            continue;
        }
        let v: Value =
            serde_json::from_str(&line).map_err(|e| anyhow!("{p}:{ln}: not valid JSON: {e}"))?;
        let item = if let Some(ids) = v.get("input_ids") {
            let arr = ids
                .as_array()
                .ok_or_else(|| anyhow!("{p}:{ln}: `input_ids` is not an array"))?;
            let ids = arr
                .iter()
                .enumerate()
                .map(|(j, x)| {
                    x.as_u64().ok_or_else(|| {
                        anyhow!("{p}:{ln}: input_ids[{j}] = {x} is not a non-negative integer")
                    })
                })
                .collect::<Result<Vec<u64>>>()?;
            Item::Ids(ids)
        } else if let Some(t) = v.get("text") {
            let t = t
                .as_str()
                .ok_or_else(|| anyhow!("{p}:{ln}: `text` is not a string"))?;
            Item::Text(t.to_string())
        } else {
            bail!("{p}:{ln}: expected an object with `input_ids` or `text`");
        };
        out.push((ln, item));
    }
    Ok(out)
}

/// Token ids of every item, checked against the vocabulary.
fn tokenize(
    path: &Path,
    items: Vec<(usize, Item)>,
    tok: Option<&Tokenizer>,
    vocab: usize,
) -> Result<Vec<Vec<u32>>> {
    let p = path.display();
    items
        .into_iter()
        .map(|(ln, item)| {
            let ids: Vec<u32> = match item {
                Item::Ids(ids) => ids
                    .iter()
                    .enumerate()
                    .map(|(j, &id)| {
                        if id >= vocab as u64 {
                            bail!("{p}:{ln}: input_ids[{j}] = {id} is outside the vocabulary (size {vocab})");
                        }
                        Ok(id as u32)
                    })
                    .collect::<Result<_>>()?,
                Item::Text(t) => {
                    let tok = tok.ok_or_else(|| {
                        anyhow!("{p}:{ln}: `text` input needs a tokenizer, but the checkpoint has none (give `input_ids` instead)")
                    })?;
                    let ids = tok
                        .encode(&t)
                        .map_err(|e| anyhow!("{p}:{ln}: cannot tokenize: {e}"))?;
                    if let Some(&id) = ids.iter().find(|&&id| id as usize >= vocab) {
                        bail!("{p}:{ln}: the tokenizer gave id {id}, outside the model vocabulary (size {vocab})");
                    }
                    ids
                }
            };
            if ids.is_empty() {
                bail!("{p}:{ln}: empty sequence (at least 1 token is needed)");
            }
            Ok(ids)
        })
        .collect()
}

/// Where the JSONL goes: stdout, or a temporary file beside the target that is renamed
/// into place on success and removed otherwise.
enum Sink {
    Stdout(std::io::StdoutLock<'static>),
    File {
        w: BufWriter<File>,
        tmp: PathBuf,
        dst: PathBuf,
        done: bool,
    },
}

impl Sink {
    fn new(output: Option<&Path>) -> Result<Sink> {
        let Some(dst) = output else {
            return Ok(Sink::Stdout(std::io::stdout().lock()));
        };
        let name = dst
            .file_name()
            .ok_or_else(|| anyhow!("{}: not a file path", dst.display()))?;
        let dir = match dst.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let tmp = dir.join(format!(
            ".{}.{}.tmp",
            name.to_string_lossy(),
            std::process::id()
        ));
        let f = File::create(&tmp).with_context(|| format!("{}: cannot create", tmp.display()))?;
        Ok(Sink::File {
            w: BufWriter::new(f),
            tmp,
            dst: dst.to_path_buf(),
            done: false,
        })
    }

    fn writer(&mut self) -> &mut dyn Write {
        match self {
            Sink::Stdout(w) => w,
            Sink::File { w, .. } => w,
        }
    }

    fn finish(mut self) -> Result<()> {
        match &mut self {
            Sink::Stdout(w) => w.flush()?,
            Sink::File { w, tmp, dst, done } => {
                w.flush()
                    .with_context(|| format!("{}: cannot write", tmp.display()))?;
                w.get_ref()
                    .sync_all()
                    .with_context(|| format!("{}: cannot write", tmp.display()))?;
                std::fs::rename(&*tmp, &*dst).with_context(|| {
                    format!("cannot rename {} to {}", tmp.display(), dst.display())
                })?;
                *done = true;
            }
        }
        Ok(())
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        if let Sink::File {
            tmp, done: false, ..
        } = self
        {
            let _ = std::fs::remove_file(tmp);
        }
    }
}

pub fn run(a: Args) -> Result<()> {
    if a.batch == 0 {
        bail!("--batch must be at least 1");
    }
    let items = read_input(&a.input)?;
    let ckpt = a.model.load()?;
    let vocab = ckpt.model.config().vocab_size;
    let seqs = tokenize(&a.input, items, ckpt.tokenizer.as_ref(), vocab)?;
    let total_tokens: usize = seqs.iter().map(Vec::len).sum();
    tracing::info!(sequences = seqs.len(), tokens = total_tokens, "scoring");

    let mut sink = Sink::new(a.output.as_deref())?;
    let pb = Progress::new("score", Some(seqs.len() as u64), "seqs");
    let t0 = Instant::now();
    let mut tokens_done = 0usize;
    for (b, chunk) in seqs.chunks(a.batch).enumerate() {
        let scores = ckpt
            .model
            .score(chunk, DEFAULT_VOCAB_CHUNK)
            .with_context(|| format!("scoring batch {b}"))?;
        let w = sink.writer();
        for (ids, s) in chunk.iter().zip(&scores) {
            let line = json!({
                "input_ids": ids,
                "logprobs": s.logprobs,
                "entropies": s.entropies,
            });
            serde_json::to_writer(&mut *w, &line)?;
            w.write_all(b"\n")?;
        }
        tokens_done += chunk.iter().map(Vec::len).sum::<usize>();
        let secs = t0.elapsed().as_secs_f64().max(1e-9);
        pb.set_message(format!("{:.0} tokens/s", tokens_done as f64 / secs));
        pb.inc(chunk.len() as u64);
    }
    pb.finish();
    sink.finish()?;
    let secs = t0.elapsed().as_secs_f64();
    tracing::info!(
        sequences = seqs.len(),
        tokens = total_tokens,
        secs,
        "scored"
    );
    eprintln!(
        "[scored {} sequences, {total_tokens} tokens in {secs:.2} s, {:.0} tokens/s]",
        seqs.len(),
        total_tokens as f64 / secs.max(1e-9)
    );
    Ok(())
}

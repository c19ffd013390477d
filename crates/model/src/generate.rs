//! Batched sampling with a KV cache over prompts of different lengths.

use crate::error::{invalid, Result};
use crate::model::{CausalLM, KvCache, RowKv, SeqLayout};
use crate::tokenizer::Tokenizer;
use candle_core::{DType, Tensor};
use rand::{RngExt, SeedableRng};
use rayon::prelude::*;
use std::sync::Arc;

/// Sampling options.
#[derive(Debug, Clone)]
pub struct SamplingParams {
    /// 0 means greedy (argmax).
    pub temperature: f64,
    /// Nucleus sampling: keep the smallest set of tokens whose probability reaches `top_p`.
    pub top_p: f64,
    /// Keep only the `top_k` most likely tokens (0 = no limit).
    pub top_k: usize,
    pub max_new_tokens: usize,
    /// Generation of a sequence ends after one of these tokens.
    pub stop_token_ids: Vec<u32>,
    /// Generation of a sequence ends once its decoded text contains one of these.
    pub stop_strings: Vec<String>,
    /// Sequence `i` of a batch samples with the seed `seed + i`, so a batch gives the
    /// same tokens as each prompt run alone with its own seed.
    pub seed: u64,
    /// When not empty (one per prompt): sequence `i` samples with `row_seeds[i]`
    /// instead, so that a row's stream does not depend on its place in a batch.
    pub row_seeds: Vec<u64>,
    /// Linear layers and the output projection in bf16 on AMX tiles or AVX512-BF16 (f32
    /// weights on a CPU that has either; otherwise f32 as usual): 1.5x faster decoding on
    /// the CPUs measured, with log-probs a few hundredths of a nat from f32's (greedy
    /// choices can differ on near-ties).
    pub bf16: bool,
    /// Keys and values cached in bf16 (f32 models on the CPU): half the cache memory, with
    /// log-probs within rounding noise of an f32 cache's (on the tiny test model 0.01 nat
    /// on average, up to 0.11; test `bf16_kv_cache_tracks_the_f32_cache`). Decoding is not
    /// faster for it on the CPUs measured (README, "Speed").
    pub kv_bf16: bool,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            max_new_tokens: 256,
            stop_token_ids: vec![],
            stop_strings: vec![],
            seed: 0,
            row_seeds: vec![],
            bf16: false,
            kv_bf16: false,
        }
    }
}

/// Why a sequence stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    StopToken,
    StopString,
    Length,
}

/// One generated continuation.
#[derive(Debug, Clone)]
pub struct Generation {
    /// Sampled token ids (including the stop token, if any).
    pub tokens: Vec<u32>,
    /// log p(token) under `softmax(logits / T)` at the sampling temperature `T > 0`
    /// (`softmax(logits)` when greedy), before any top-k / top-p truncation: with
    /// `top_k = 0` and `top_p = 1` exactly the distribution sampled from, which a
    /// trainer recomputes by dividing its logits by the same `T`.
    pub logprobs: Vec<f32>,
    pub finish: FinishReason,
}

/// Picks the next token from `logits` (f32, one row) under the sampling options and
/// returns it with its log-prob under `softmax(logits / T)` (`T = 1` when greedy).
///
/// Without top-k / top-p truncation the draw is one pass over the vocabulary (inverse
/// transform sampling in vocabulary order, sharing its sum with the log-prob); with
/// truncation the candidates are sorted first.
fn sample_token(logits: &[f32], p: &SamplingParams, rng: &mut rand::rngs::StdRng) -> (u32, f32) {
    let full = p.top_k == 0 && p.top_p >= 1.0;
    if p.temperature > 0.0 && !full {
        let tok = sample(logits, p, rng);
        return (tok, log_softmax_at(logits, tok, p.temperature));
    }
    let inv_t = if p.temperature > 0.0 {
        1.0 / p.temperature
    } else {
        1.0
    };
    let (mut best, mut mx) = (0usize, f32::NEG_INFINITY);
    for (i, &z) in logits.iter().enumerate() {
        if z > mx {
            (best, mx) = (i, z);
        }
    }
    let mx = mx as f64;
    let total: f64 = logits
        .iter()
        .map(|&z| ((z as f64 - mx) * inv_t).exp())
        .sum();
    let tok = if p.temperature <= 0.0 {
        best
    } else {
        let u: f64 = rng.random::<f64>() * total;
        let mut acc = 0.0;
        let mut pick = best;
        for (i, &z) in logits.iter().enumerate() {
            acc += ((z as f64 - mx) * inv_t).exp();
            if u < acc {
                pick = i;
                break;
            }
        }
        pick
    };
    let lp = (logits[tok] as f64 - mx) * inv_t - total.ln();
    (tok as u32, lp as f32)
}

/// Picks the next token with top-k / top-p truncation (candidates sorted by logit).
fn sample(logits: &[f32], p: &SamplingParams, rng: &mut rand::rngs::StdRng) -> u32 {
    if p.temperature <= 0.0 {
        return argmax(logits);
    }
    let inv_t = 1.0 / p.temperature as f32;
    let mut idx: Vec<u32> = (0..logits.len() as u32).collect();
    let k = if p.top_k == 0 {
        logits.len()
    } else {
        p.top_k.min(logits.len())
    };
    if k < logits.len() {
        idx.select_nth_unstable_by(k - 1, |&a, &b| {
            logits[b as usize].total_cmp(&logits[a as usize])
        });
        idx.truncate(k);
    }
    idx.sort_by(|&a, &b| {
        logits[b as usize]
            .total_cmp(&logits[a as usize])
            .then(a.cmp(&b))
    });
    let mx = logits[idx[0] as usize];
    let mut probs: Vec<f64> = idx
        .iter()
        .map(|&i| (((logits[i as usize] - mx) * inv_t) as f64).exp())
        .collect();
    let total: f64 = probs.iter().sum();
    probs.iter_mut().for_each(|x| *x /= total);
    if p.top_p < 1.0 {
        let mut acc = 0.0;
        let mut keep = probs.len();
        for (i, &q) in probs.iter().enumerate() {
            acc += q;
            if acc >= p.top_p {
                keep = i + 1;
                break;
            }
        }
        probs.truncate(keep);
        let s: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|x| *x /= s);
    }
    let u: f64 = rng.random();
    let mut acc = 0.0;
    for (i, &q) in probs.iter().enumerate() {
        acc += q;
        if u < acc {
            return idx[i];
        }
    }
    idx[probs.len() - 1]
}

fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, x) in v.iter().enumerate() {
        if *x > v[best] {
            best = i;
        }
    }
    best as u32
}

/// `log softmax(row / temperature)[tok]` (temperature 1 when it is not positive).
fn log_softmax_at(row: &[f32], tok: u32, temperature: f64) -> f32 {
    let inv_t = if temperature > 0.0 {
        1.0 / temperature
    } else {
        1.0
    };
    let mx = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let lse: f64 = row
        .iter()
        .map(|&x| ((x as f64 - mx) * inv_t).exp())
        .sum::<f64>()
        .ln();
    ((row[tok as usize] as f64 - mx) * inv_t - lse) as f32
}

/// For each prompt, the index of the first prompt equal to it, and the distinct
/// prompts' indices in order: identical prompts (the samples of one task) are computed
/// once, and their rows repeated.
fn distinct_prompts(prompts: &[Vec<u32>]) -> (Vec<usize>, Vec<usize>) {
    let mut first: std::collections::HashMap<&[u32], usize> = std::collections::HashMap::new();
    let mut uniq = Vec::new();
    let map = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| {
            *first.entry(p.as_slice()).or_insert_with(|| {
                uniq.push(i);
                uniq.len() - 1
            })
        })
        .collect();
    (uniq, map)
}

/// Shortest common prefix worth computing once for a whole batch.
const MIN_SHARED_PREFIX: usize = 16;

/// Length of the longest prefix all prompts share.
fn shared_prefix(prompts: &[Vec<u32>]) -> usize {
    let first = &prompts[0];
    prompts[1..].iter().fold(first.len(), |n, pr| {
        first[..n]
            .iter()
            .zip(pr)
            .take_while(|(a, b)| a == b)
            .count()
    })
}

/// Layout of query rows `c0..c1` of left-padded suffixes (`pads[r]` padding tokens in row
/// `r`) after cached positions `0..width`, of which row `r` owns `0..pre[r]` (the rest is
/// masked): a suffix token sees its row's cached prefix and its own suffix causally; a
/// padding token sees the prefix and itself.
fn suffix_layout(
    pre: &[usize],
    width: usize,
    pads: &[usize],
    c0: usize,
    c1: usize,
    dev: &candle_core::Device,
) -> Result<SeqLayout> {
    let (b, n, keys) = (pads.len(), c1 - c0, width + c1);
    let mut positions = Vec::with_capacity(b * n);
    let mut mask = vec![f32::NEG_INFINITY; b * n * keys];
    let mut segments = Vec::with_capacity(b);
    for (r, &pad) in pads.iter().enumerate() {
        let mut seg = Vec::with_capacity(n);
        for t in c0..c1 {
            let row = &mut mask[(r * n + t - c0) * keys..(r * n + t - c0 + 1) * keys];
            row[..pre[r]].fill(0.0);
            if t < pad {
                row[width + t] = 0.0;
                positions.push(0.0);
                seg.push(None);
            } else {
                row[width + pad..=width + t].fill(0.0);
                positions.push((pre[r] + t - pad) as f32);
                seg.push(Some(0));
            }
        }
        segments.push(seg);
    }
    Ok(SeqLayout {
        positions: Tensor::from_vec(positions, (b, n), dev)?,
        mask: Tensor::from_vec(mask, (b, 1, n, keys), dev)?,
        segments,
        kv_share: vec![],
    })
}

/// Keys and values of sequences that [`CausalLM::generate_reusing`] processed, so that a
/// later prompt extending one of them (the next turn of a multi-turn episode: the same
/// conversation plus the reply and a tool result) computes only its new tokens.
///
/// An entry is consumed when a prompt extends all of it (the longer sequence replaces
/// it); a prompt that shares only part of it (another sample of the same task, in a later
/// batch) copies that part and leaves the entry. Entries nobody reused during a whole
/// round ([`PrefixCache::begin_round`], e.g. one turn of a batch of episodes, which may
/// take several calls) are dropped at the next round, which bounds the memory to about
/// two turns' sequences.
///
/// Entries belong to the weights they were computed with: when the model's
/// [`CausalLM::weights_version`] changes (an optimizer step), they are all dropped.
#[derive(Default)]
pub struct PrefixCache {
    entries: Vec<CachedSeq>,
    round: u64,
    /// The weights version the entries were computed with.
    weights: Option<u64>,
    /// Prompt tokens not computed for their row so far (taken from the cache, a prefix
    /// shared with the rest of the batch, or an identical prompt of the same batch).
    pub reused_tokens: u64,
    /// Prompt tokens computed so far.
    pub computed_tokens: u64,
    /// Rows whose whole prompt equalled another row's of the same call (computed once).
    pub duplicate_rows: u64,
    /// Entries dropped because the weights changed.
    pub invalidated: u64,
    /// Where generation time went.
    pub stats: GenStats,
}

/// Counters and phase times of [`CausalLM::generate_reusing`] calls (seconds of wall
/// time on the calling thread).
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct GenStats {
    pub calls: u64,
    /// Prompt tokens computed, and the time of those forward passes (copying cached
    /// prefixes in included).
    pub prefill_tokens: u64,
    pub prefill_s: f64,
    /// Decoding steps (one token for each active row), tokens sampled, and the time of
    /// the decoding forward passes.
    pub decode_steps: u64,
    pub sampled_tokens: u64,
    pub decode_s: f64,
    /// The output projection and the sampling of each step.
    pub sample_s: f64,
    /// Keeping finished rows' keys and values, and dropping rows from the batch.
    pub bookkeeping_s: f64,
}

struct CachedSeq {
    tokens: Vec<u32>,
    /// The first positions' keys and values, when they are those of a group of samples
    /// (one copy for the group), and `kv` the rest; else `kv` holds them all. Per layer
    /// `(k, v)`, `[1, kv_heads, n, head_dim]`.
    prefix: Option<Arc<KvSegment>>,
    kv: Vec<(Tensor, Tensor)>,
    round: u64,
    /// `kv` is this entry's own (not a view of another entry's): its buffers go back to
    /// the pool of [`crate::kvbuf`] when it is dropped.
    owned: bool,
}

impl CachedSeq {
    /// The keys and values in position order: the prefix's, then the entry's own.
    fn parts(&self) -> Vec<&[(Tensor, Tensor)]> {
        let own = std::iter::once(self.kv.as_slice());
        self.prefix
            .iter()
            .map(|p| p.kv.as_slice())
            .chain(own)
            .collect()
    }
}

/// Keys and values that the sequences of a group share (a prompt sampled several times),
/// kept once for all of their [`CachedSeq`]s.
struct KvSegment {
    kv: Vec<(Tensor, Tensor)>,
}

impl Drop for KvSegment {
    fn drop(&mut self) {
        for (k, v) in &self.kv {
            crate::kvbuf::recycle(k);
            crate::kvbuf::recycle(v);
        }
    }
}

impl Drop for CachedSeq {
    fn drop(&mut self) {
        if self.owned {
            for (k, v) in &self.kv {
                crate::kvbuf::recycle(k);
                crate::kvbuf::recycle(v);
            }
        }
    }
}

impl PrefixCache {
    /// Starts a round: drops the entries of rounds before the last one.
    pub fn begin_round(&mut self) {
        let last = self.round;
        self.entries.retain(|e| e.round >= last);
        self.round += 1;
    }

    /// Drops every entry when `version` is not the weights they were computed with.
    fn sync_weights(&mut self, version: u64) {
        if self.weights != Some(version) {
            self.invalidated += self.entries.len() as u64;
            self.entries.clear();
            self.weights = Some(version);
        }
    }

    /// Drops every cached sequence; the counters stay.
    pub fn clear(&mut self) {
        self.entries.clear();
    }

    /// Number of cached sequences.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The entry sharing the longest prefix with `prompt`, and that length.
    fn best(&self, prompt: &[u32]) -> Option<(usize, usize)> {
        self.entries
            .iter()
            .enumerate()
            .map(|(i, e)| {
                let n = e
                    .tokens
                    .iter()
                    .zip(prompt)
                    .take_while(|(a, b)| a == b)
                    .count();
                (i, n)
            })
            .max_by_key(|&(_, n)| n)
    }
}

impl CausalLM {
    /// Generates a continuation of every prompt, in one batch with a KV cache. Prompts may
    /// differ in length (left padding with per-sequence positions). A prefix that all
    /// prompts share (16 tokens or more: a system prompt, or one prompt sampled several
    /// times) is computed once for the batch. `tokenizer` is needed only for stop strings.
    pub fn generate(
        &self,
        prompts: &[Vec<u32>],
        params: &SamplingParams,
        tokenizer: Option<&Tokenizer>,
    ) -> Result<Vec<Generation>> {
        self.generate_reusing(prompts, params, tokenizer, None)
    }

    /// [`CausalLM::generate`], taking the keys and values of each prompt's longest cached
    /// prefix (16 tokens or more) from `reuse` and adding every processed sequence (prompt
    /// and sampled tokens) to it. Results equal [`CausalLM::generate`]'s.
    pub fn generate_reusing(
        &self,
        prompts: &[Vec<u32>],
        params: &SamplingParams,
        tokenizer: Option<&Tokenizer>,
        mut reuse: Option<&mut PrefixCache>,
    ) -> Result<Vec<Generation>> {
        if prompts.iter().any(Vec::is_empty) {
            invalid!("every prompt needs at least one token");
        }
        if !params.row_seeds.is_empty() && params.row_seeds.len() != prompts.len() {
            invalid!(
                "{} row seeds for {} prompts",
                params.row_seeds.len(),
                prompts.len()
            );
        }
        if !params.stop_strings.is_empty() && tokenizer.is_none() {
            invalid!("stop strings need a tokenizer");
        }
        let b = prompts.len();
        let mut out: Vec<Generation> = (0..b)
            .map(|_| Generation {
                tokens: vec![],
                logprobs: vec![],
                finish: FinishReason::Length,
            })
            .collect();
        if b == 0 || params.max_new_tokens == 0 {
            return Ok(out);
        }
        let dev = self.device();
        let mut st = GenStats {
            calls: 1,
            ..GenStats::default()
        };
        let t0 = std::time::Instant::now();
        if let Some(pc) = reuse.as_deref_mut() {
            pc.sync_weights(self.weights_version());
        }
        // Identical prompts are computed once, then their rows repeated (storing what a
        // group shares once, below).
        let (uniq, map) = distinct_prompts(prompts);
        let distinct: Vec<Vec<u32>> = uniq.iter().map(|&i| prompts[i].clone()).collect();
        let mut plan = PrefixPlan::new(&distinct, reuse.as_deref_mut());
        let repeated = distinct.len() < b;
        let Prefill {
            mut cache,
            mut last,
        } = self.prefill(&distinct, &mut plan, params, reuse.as_deref_mut(), repeated)?;
        st.prefill_tokens = (plan.shared
            + (0..distinct.len())
                .map(|u| plan_len(&distinct[u], &plan, u))
                .sum::<usize>()) as u64;
        if repeated {
            plan.expand(&map);
        }
        // Rows whose first cached columns hold the same tokens (the samples of a prompt):
        // the attention reads those from the group's first row (its holder) alone.
        let groups = kv_groups(prompts, &plan);
        if repeated {
            // Only a group's holder stores what the group shares.
            let idx: Vec<u32> = map.iter().map(|&u| u as u32).collect();
            let n = cache.len();
            let skipping = self.skips_shared_columns();
            let skip: Vec<usize> = (0..b).map(|r| left_out(&groups, r, n, skipping)).collect();
            cache.select_rows_storing(&idx, &skip)?;
            let rows = Tensor::new(idx.as_slice(), dev)?;
            last = last.contiguous()?.index_select(&rows, 0)?;
            if let Some(pc) = reuse.as_deref_mut() {
                pc.duplicate_rows += (b - distinct.len()) as u64;
                let dup: usize = (0..b)
                    .filter(|&i| uniq[map[i]] != i)
                    .map(|i| prompts[i].len())
                    .sum();
                pc.reused_tokens += dup as u64;
            }
        }
        st.prefill_s = t0.elapsed().as_secs_f64();
        let w = self.lm_head_weight(false);
        let amx = if params.bf16 {
            self.amx_weights()?
        } else {
            None
        };
        let mut rngs: Vec<rand::rngs::StdRng> = (0..b)
            .map(|i| {
                let seed = match params.row_seeds.get(i) {
                    Some(&s) => s,
                    None => params.seed.wrapping_add(i as u64),
                };
                rand::rngs::StdRng::seed_from_u64(seed)
            })
            .collect();
        // Rows of the cache: (sequence index, its padding `pad`, next position) while the
        // sequence is generating, `None` once it has finished. A finished row stays in
        // place (a hole the attention skips) until half the rows are holes: dropping a
        // row copies every other row's keys and values. `row_seq`: each row's sequence.
        // `holder[g]`: the sequence whose row stores what group `g` shares (at first its
        // first sequence, `g`); when the batch is compacted, a group whose holder has
        // finished hands that to its first live row.
        let mut slots: Vec<Option<(usize, usize, usize)>> = (0..b)
            .map(|i| Some((i, plan.pads[i], plan.lens[i])))
            .collect();
        let mut row_seq: Vec<usize> = (0..b).collect();
        let mut holder: Vec<usize> = (0..b).collect();
        // Per group, what its members share, kept once for their cached sequences.
        let mut segments: std::collections::HashMap<usize, Arc<KvSegment>> = Default::default();
        // The decoding steps, many short parallel kernels each, run on a worker of the
        // thread pool (`runtime::on_pool`).
        crate::runtime::on_pool(dev, || -> Result<()> {
            for step in 0..params.max_new_tokens {
                let ts = std::time::Instant::now();
                let live: Vec<usize> = (0..slots.len()).filter(|&r| slots[r].is_some()).collect();
                let hid = if live.len() < slots.len() {
                    let rows =
                        Tensor::new(live.iter().map(|&r| r as u32).collect::<Vec<_>>(), dev)?;
                    last.contiguous()?.index_select(&rows, 0)?
                } else {
                    last
                };
                let logits = match &amx {
                    Some(a) => hid
                        .contiguous()?
                        .apply_op1_no_bwd(&crate::kernels::AmxLinear(a.lm_head.clone()))?,
                    None => crate::ops::linear_product(&hid, &w, true)?,
                };
                let logits: Vec<Vec<f32>> = logits.to_dtype(DType::F32)?.to_vec2()?;
                let mut next = vec![0u32; slots.len()];
                let mut ended = Vec::new();
                // Each row draws from its own generator, so the rows can sample in parallel.
                let mut rng_of: Vec<Option<&mut rand::rngs::StdRng>> =
                    rngs.iter_mut().map(Some).collect();
                let draws: Vec<(u32, f32)> = live
                    .iter()
                    .map(|&r| {
                        rng_of[slots[r].expect("live row").0]
                            .take()
                            .expect("one row each")
                    })
                    .zip(&logits)
                    .collect::<Vec<_>>()
                    .into_par_iter()
                    .map(|(rng, row)| sample_token(row, params, rng))
                    .collect();
                for (k, &r) in live.iter().enumerate() {
                    let (i, pad, pos) = slots[r].expect("live row");
                    let (tok, lp) = draws[k];
                    let done = record_token(&mut out[i], tok, lp, params, tokenizer)?;
                    if done || step + 1 == params.max_new_tokens {
                        ended.push(r);
                    } else {
                        slots[r] = Some((i, pad, pos + 1));
                        next[r] = tok;
                    }
                }
                st.sampled_tokens += live.len() as u64;
                st.sample_s += ts.elapsed().as_secs_f64();
                let tb = std::time::Instant::now();
                // Rows that end here: keep their keys and values for a later prompt.
                let cached = cache.len();
                for &r in &ended {
                    let (i, pad, _) = slots[r].take().expect("live row");
                    if let Some(pc) = reuse.as_deref_mut() {
                        // The prompt and the sampled tokens fed so far (all but the last):
                        // what the row's group shares (copied once, from its holder), and
                        // the row's own.
                        let real =
                            |i: usize, pad: usize| [(0, plan.pre[i]), (plan.width + pad, cached)];
                        let (g, cols) = groups[i];
                        let prefix = match (cols, segments.get(&g)) {
                            (0, _) => None,
                            (_, Some(seg)) => Some(seg.clone()),
                            (_, None) => {
                                let h = holder[g];
                                let hr = row_seq.iter().position(|&s| s == h);
                                let hr = hr.expect("a group's holder stays in the batch");
                                let ranges = clip(&real(h, plan.pads[h]), 0, cols);
                                let kv = cache.extract_row(hr, &ranges)?;
                                let seg = Arc::new(KvSegment { kv });
                                segments.insert(g, seg.clone());
                                Some(seg)
                            }
                        };
                        let kv = cache.extract_row(r, &clip(&real(i, pad), cols, cached))?;
                        let fed = out[i].tokens.len() - 1;
                        pc.entries.push(CachedSeq {
                            tokens: [&prompts[i][..], &out[i].tokens[..fed]].concat(),
                            prefix,
                            kv,
                            round: pc.round,
                            owned: true,
                        });
                    }
                }
                let alive: Vec<usize> = (0..slots.len()).filter(|&r| slots[r].is_some()).collect();
                if alive.is_empty() {
                    st.bookkeeping_s += tb.elapsed().as_secs_f64();
                    break;
                }
                if alive.len() * 2 <= slots.len() {
                    // A group whose holder has finished: its first live row takes over.
                    let row_of: std::collections::HashMap<usize, usize> =
                        row_seq.iter().enumerate().map(|(r, &i)| (i, r)).collect();
                    for &r in &alive {
                        let (g, cols) = groups[row_seq[r]];
                        let hr = row_of[&holder[g]];
                        if cols > 0 && slots[hr].is_none() {
                            cache.copy_first_positions(hr, r, cols)?;
                            holder[g] = row_seq[r];
                        }
                    }
                    let rows =
                        Tensor::new(alive.iter().map(|&r| r as u32).collect::<Vec<_>>(), dev)?;
                    cache.select_rows(&rows)?;
                    slots = alive.iter().map(|&r| slots[r]).collect();
                    next = alive.iter().map(|&r| next[r]).collect();
                    row_seq = alive.iter().map(|&r| row_seq[r]).collect();
                }
                st.bookkeeping_s += tb.elapsed().as_secs_f64();
                let td = std::time::Instant::now();
                let s = cache.len() + 1;
                let layout = decode_layout(&slots, &row_seq, &holder, &plan, &groups, s, dev)?;
                let x = Tensor::from_vec(next, (slots.len(), 1), dev)?;
                last = self.forward_cached(&x, &layout, &mut cache)?.squeeze(1)?;
                st.decode_steps += 1;
                st.decode_s += td.elapsed().as_secs_f64();
            }
            Ok(())
        })?;
        if let Some(pc) = reuse {
            pc.stats.add(&st);
        }
        Ok(out)
    }

    /// Whether the rows of a group leave what they share out of the cache: f32 models on
    /// the CPU, whose attention always reads it from the group's leader (the decode
    /// kernel, or copies into the other path's operands); elsewhere every row stores it.
    fn skips_shared_columns(&self) -> bool {
        self.device().is_cpu() && self.dtype() == DType::F32
    }

    /// Computes every prompt's suffix after its cached prefix (taken from the cache, or
    /// the batch's shared prefix computed once) and returns the cache with the last
    /// position's hidden state of each row. In an f32 model's cache on the CPU, the rows
    /// of a [`kv_groups`] group but its leader leave out what they share with it (the
    /// attention reads that from the leader), unless `store_all` (rows of this batch are
    /// repeated afterwards, which needs every position of the repeated rows).
    fn prefill(
        &self,
        prompts: &[Vec<u32>],
        plan: &mut PrefixPlan,
        params: &SamplingParams,
        reuse: Option<&mut PrefixCache>,
        store_all: bool,
    ) -> Result<Prefill> {
        // The taken entries are copied into the batch's cache and freed here.
        let taken = std::mem::take(&mut plan.taken);
        let dev = self.device();
        let b = prompts.len();
        let (pre, width, pads, lens) = (&plan.pre, plan.width, &plan.pads, &plan.lens);
        let p = plan.suffix_len;
        let mut ids = Vec::with_capacity(b * p);
        for (i, pr) in prompts.iter().enumerate() {
            ids.extend(std::iter::repeat_n(0u32, pads[i]));
            ids.extend(&pr[pre[i]..]);
        }
        let ids = Tensor::from_vec(ids, (b, p), dev)?;
        let reserve = p + params.max_new_tokens;
        let mut cache = KvCache::reserving(reserve)
            .with_bf16(params.bf16)
            .with_kv_bf16(params.kv_bf16);
        if let Some(pc) = reuse {
            pc.reused_tokens += pre.iter().sum::<usize>() as u64;
            pc.computed_tokens += (0..b).map(|i| lens[i] - pre[i]).sum::<usize>() as u64;
        }
        if width == 0 {
            let layout = SeqLayout::left_padded(lens, p, dev)?;
            let hid = self.forward_cached(&ids, &layout, &mut cache)?;
            let last = hid.narrow(1, p - 1, 1)?.squeeze(1)?;
            return Ok(Prefill { cache, last });
        }
        // Rows whose cached prefixes hold the same tokens read them once, from the leader.
        let share = kv_groups(prompts, plan);
        let skipping = !store_all && self.skips_shared_columns();
        let skip = |i: usize| left_out(&share, i, pre[i], skipping);
        if plan.shared > 0 {
            let prefix = Tensor::new(&prompts[0][..plan.shared], dev)?.unsqueeze(0)?;
            let layout = SeqLayout::left_padded(&[plan.shared], plan.shared, dev)?;
            self.forward_cached(&prefix, &layout, &mut cache)?;
            let skips: Vec<usize> = (0..b).map(skip).collect();
            cache.select_rows_storing(&vec![0; b], &skips)?;
        } else {
            let rows: Vec<_> = taken
                .iter()
                .enumerate()
                .map(|(i, t)| {
                    t.as_ref().map(|e| RowKv {
                        parts: e.parts(),
                        len: pre[i],
                        skip: skip(i),
                    })
                })
                .collect();
            cache = KvCache::from_rows(&rows, width, reserve, (self.dtype(), params.kv_bf16))?
                .with_bf16(params.bf16);
        }
        drop(taken);
        // The suffixes attend to the cached prefixes and to themselves, in chunks of
        // query rows: as many as the attention takes in blocks (each chunk lays out the
        // cache's keys and values once), else chunks that bound the `[b, heads, rows,
        // keys]` scores to ~256 MB.
        let heads = self.config().num_attention_heads;
        let rows = match crate::ops::cached_attention_blocked(dev, self.dtype(), params.bf16) {
            Some(n) => n.min(p),
            None => ((1usize << 26) / (b * heads * (width + p))).max(16).min(p),
        };
        let mut hid = None;
        for c0 in (0..p).step_by(rows) {
            let c1 = (c0 + rows).min(p);
            let mut layout = suffix_layout(pre, width, pads, c0, c1, dev)?;
            layout.kv_share.clone_from(&share);
            hid = Some(self.forward_cached(&ids.narrow(1, c0, c1 - c0)?, &layout, &mut cache)?);
        }
        let hid = hid.expect("p >= 1");
        let n = hid.dim(1)?;
        let last = hid.narrow(1, n - 1, 1)?.squeeze(1)?;
        Ok(Prefill { cache, last })
    }
}

/// Where each prompt of a batch starts computing: row `r` has a cached prefix
/// `0..pre[r]` (from a [`PrefixCache`] entry in `taken[r]`, or the `shared` prefix of all
/// prompts), then a suffix left-padded by `pads[r]` to `suffix_len` tokens.
struct PrefixPlan {
    lens: Vec<usize>,
    taken: Vec<Option<CachedSeq>>,
    pre: Vec<usize>,
    shared: usize,
    width: usize,
    suffix_len: usize,
    pads: Vec<usize>,
}

impl PrefixPlan {
    /// Each prompt's longest cached prefix from `reuse` (taken out of it), else the prefix
    /// all prompts share (a system prompt; one prompt sampled several times). Each prompt
    /// keeps at least its last token to compute.
    fn new(prompts: &[Vec<u32>], reuse: Option<&mut PrefixCache>) -> PrefixPlan {
        let b = prompts.len();
        let lens: Vec<usize> = prompts.iter().map(Vec::len).collect();
        let mut taken: Vec<Option<CachedSeq>> = (0..b).map(|_| None).collect();
        let mut pre = vec![0usize; b];
        if let Some(pc) = reuse {
            for (i, pr) in prompts.iter().enumerate() {
                if let Some((e, full)) = pc.best(pr) {
                    let n = full.min(lens[i] - 1);
                    if n >= MIN_SHARED_PREFIX {
                        pre[i] = n;
                        // A prompt that extends the whole entry replaces it; one that
                        // shares part of it (another sample of the same prompt) copies.
                        taken[i] = Some(if full == pc.entries[e].tokens.len() {
                            pc.entries.swap_remove(e)
                        } else {
                            CachedSeq {
                                tokens: Vec::new(),
                                prefix: pc.entries[e].prefix.clone(),
                                kv: pc.entries[e].kv.clone(),
                                round: pc.round,
                                owned: false,
                            }
                        });
                    }
                }
            }
        }
        let mut shared = 0;
        if taken.iter().all(Option::is_none) && b > 1 {
            let n = shared_prefix(prompts).min(lens.iter().min().expect("non-empty") - 1);
            if n >= MIN_SHARED_PREFIX {
                shared = n;
                pre.fill(n);
            }
        }
        let width = *pre.iter().max().expect("non-empty");
        let suffix_len = (0..b).map(|i| lens[i] - pre[i]).max().expect("non-empty");
        let pads = (0..b).map(|i| suffix_len - (lens[i] - pre[i])).collect();
        PrefixPlan {
            lens,
            taken,
            pre,
            shared,
            width,
            suffix_len,
            pads,
        }
    }
}

/// Tokens of distinct prompt `u` that were computed (not taken from a cached prefix).
fn plan_len(prompt: &[u32], plan: &PrefixPlan, u: usize) -> usize {
    prompt.len() - plan.pre[u]
}

impl GenStats {
    /// Adds `o` into `self`.
    pub fn add(&mut self, o: &GenStats) {
        self.calls += o.calls;
        self.prefill_tokens += o.prefill_tokens;
        self.prefill_s += o.prefill_s;
        self.decode_steps += o.decode_steps;
        self.sampled_tokens += o.sampled_tokens;
        self.decode_s += o.decode_s;
        self.sample_s += o.sample_s;
        self.bookkeeping_s += o.bookkeeping_s;
    }
}

impl PrefixPlan {
    /// The plan of a batch whose row `i` is the distinct prompt `map[i]` of this plan.
    fn expand(&mut self, map: &[usize]) {
        let pick = |v: &[usize]| map.iter().map(|&u| v[u]).collect::<Vec<_>>();
        self.lens = pick(&self.lens);
        self.pre = pick(&self.pre);
        self.pads = pick(&self.pads);
    }
}

/// The KV cache after the prompts, and each row's last hidden state.
struct Prefill {
    cache: KvCache,
    last: Tensor,
}

/// Appends a sampled token and its log-prob to `g`; true when the sequence ends on it (a
/// stop token or a stop string).
fn record_token(
    g: &mut Generation,
    tok: u32,
    logprob: f32,
    params: &SamplingParams,
    tokenizer: Option<&Tokenizer>,
) -> Result<bool> {
    g.tokens.push(tok);
    g.logprobs.push(logprob);
    if params.stop_token_ids.contains(&tok) {
        g.finish = FinishReason::StopToken;
        return Ok(true);
    }
    if let (false, Some(t)) = (params.stop_strings.is_empty(), tokenizer) {
        let text = t.decode(&g.tokens, false)?;
        if params
            .stop_strings
            .iter()
            .any(|s| text.contains(s.as_str()))
        {
            g.finish = FinishReason::StopString;
            return Ok(true);
        }
    }
    Ok(false)
}

/// Shortest prefix worth reading once for a group of rows in decoding.
const MIN_KV_GROUP: usize = 64;
/// Most rows in a group: the attention runs one task per group and kv head, so groups
/// must stay small enough for every thread to have work.
const MAX_KV_GROUP: usize = 8;

/// Rows whose first cached columns hold the same tokens at the same positions (the
/// samples of one prompt, in any turn): per sequence `(group, columns)`, the group named
/// by its first sequence, `columns` the group's common part (0 for a row alone). Those
/// keys and values are equal (copies of one computation, or the same tokens computed
/// again), so decoding reads them once per group. A row joins the leader it shares most
/// with, unless that would halve the group's common part (rows of other tasks that share
/// only the system prompt start their own group) or the group is full.
fn kv_groups(prompts: &[Vec<u32>], plan: &PrefixPlan) -> Vec<(usize, usize)> {
    let b = prompts.len();
    let full = plan.width + plan.suffix_len;
    let common = |i: usize, l: usize| {
        let same_row = plan.pre[i] == plan.pre[l] && plan.pads[i] == plan.pads[l];
        if same_row && prompts[i] == prompts[l] {
            return full;
        }
        let n = prompts[i]
            .iter()
            .zip(&prompts[l])
            .take_while(|(a, b)| a == b)
            .count();
        n.min(plan.pre[i]).min(plan.pre[l])
    };
    // Groups: (leader, members, common columns; 0 while the leader is alone), and each
    // row's group.
    let mut open: Vec<(usize, usize, usize)> = Vec::new();
    let mut of_row = Vec::with_capacity(b);
    for i in 0..b {
        let best = open
            .iter()
            .enumerate()
            .filter(|(_, &(_, size, _))| size < MAX_KV_GROUP)
            .map(|(k, &(l, _, cols))| (k, common(i, l), cols))
            .filter(|&(_, n, cols)| n >= MIN_KV_GROUP && (cols == 0 || 2 * n >= cols))
            .max_by_key(|&(_, n, _)| n);
        match best {
            Some((k, n, cols)) => {
                open[k].1 += 1;
                open[k].2 = if cols == 0 { n } else { cols.min(n) };
                of_row.push(k);
            }
            None => {
                of_row.push(open.len());
                open.push((i, 1, 0));
            }
        }
    }
    of_row.iter().map(|&k| (open[k].0, open[k].2)).collect()
}

/// Layout of one decoding step: one new token per row of the cache, attending to all of
/// the `s` keys but the ones of other rows' prefixes and its own padding. A finished row
/// (`None`) sees only its own new key, so the attention skips its cache. Rows of one
/// [`kv_groups`] group `g` read their first columns from its holder, the row of sequence
/// `holder[g]` (`row_seq`: each row's sequence), finished or not (then it takes no part in
/// the group's products).
fn decode_layout(
    slots: &[Option<(usize, usize, usize)>],
    row_seq: &[usize],
    holder: &[usize],
    plan: &PrefixPlan,
    groups: &[(usize, usize)],
    s: usize,
    dev: &candle_core::Device,
) -> Result<SeqLayout> {
    let nb = slots.len();
    let mut mask = vec![0f32; nb * s];
    let mut pos = Vec::with_capacity(nb);
    let mut share = Vec::with_capacity(nb);
    let row_of: std::collections::HashMap<usize, usize> =
        row_seq.iter().enumerate().map(|(r, &i)| (i, r)).collect();
    for (r, slot) in slots.iter().enumerate() {
        match *slot {
            Some((i, pad, ps)) => {
                let (g, cols) = groups[i];
                mask[r * s + plan.pre[i]..r * s + plan.width + pad].fill(f32::NEG_INFINITY);
                pos.push((ps - 1) as f32);
                if cols == 0 {
                    share.push((r, 0));
                    continue;
                }
                let Some(&lead) = row_of.get(&holder[g]) else {
                    invalid!("the holder of row {r}'s group has left the batch");
                };
                share.push((lead, cols));
            }
            None => {
                mask[r * s..(r + 1) * s - 1].fill(f32::NEG_INFINITY);
                pos.push(0.0);
                // Alone; a finished holder still sources its group (its members name it).
                share.push((r, 0));
            }
        }
    }
    Ok(SeqLayout {
        positions: Tensor::from_vec(pos, (nb, 1), dev)?,
        mask: Tensor::from_vec(mask, (nb, 1, 1, s), dev)?,
        segments: vec![vec![Some(0)]; nb],
        kv_share: share,
    })
}

/// The cached positions, of at most `len`, that row `r` leaves out of the cache when
/// `skipping`: what it shares with the leader of its [`kv_groups`] group (none for a
/// leader).
fn left_out(groups: &[(usize, usize)], r: usize, len: usize, skipping: bool) -> usize {
    match groups[r] {
        (lead, cols) if lead != r && skipping => cols.min(len),
        _ => 0,
    }
}

/// The parts of the position ranges `ranges` within `lo..hi`.
fn clip(ranges: &[(usize, usize)], lo: usize, hi: usize) -> Vec<(usize, usize)> {
    ranges
        .iter()
        .map(|&(a, b)| (a.max(lo), b.min(hi)))
        .filter(|(a, b)| b > a)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kv_groups_join_rows_with_the_same_cached_tokens() {
        let x: Vec<u32> = (0..100).collect();
        let cat = |a: &[u32], n: usize, from: u32| -> Vec<u32> {
            a.iter().copied().chain(from..from + n as u32).collect()
        };
        // Row 1 shares 90 tokens with row 0, row 3 is row 0 again, row 4 only 50 (below
        // the 64 worth sharing), row 2 nothing.
        let prompts = vec![
            x.clone(),
            cat(&x[..90], 20, 500),
            (200..300).collect(),
            x.clone(),
            cat(&x[..50], 60, 700),
        ];
        let pre = vec![95, 90, 0, 95, 50];
        let lens: Vec<usize> = prompts.iter().map(Vec::len).collect();
        let suffix_len = (0..5).map(|i| lens[i] - pre[i]).max().unwrap();
        let plan = PrefixPlan {
            pads: (0..5).map(|i| suffix_len - (lens[i] - pre[i])).collect(),
            lens,
            taken: (0..5).map(|_| None).collect(),
            pre,
            shared: 0,
            width: 95,
            suffix_len,
        };
        assert_eq!(
            kv_groups(&prompts, &plan),
            vec![(0, 90), (0, 90), (2, 0), (0, 90), (4, 0)]
        );
        // At most 8 rows a group; a row sharing much less than a group's common part
        // does not shrink it (here it joins the ninth sample, alone in its group).
        let long: Vec<u32> = (0..200).collect();
        let mut prompts = vec![long.clone(); 9];
        prompts.push(cat(&long[..80], 70, 900));
        let pre = vec![190, 190, 190, 190, 190, 190, 190, 190, 190, 140];
        let plan = PrefixPlan {
            lens: prompts.iter().map(Vec::len).collect(),
            taken: (0..10).map(|_| None).collect(),
            pre,
            shared: 0,
            width: 190,
            suffix_len: 10,
            pads: vec![0; 10],
        };
        let mut want = vec![(0, 200); 8];
        want.extend([(8, 80), (8, 80)]);
        assert_eq!(kv_groups(&prompts, &plan), want);
        // Identical prompts alone share every prefilled column.
        let same = vec![x.clone(), x.clone()];
        let plan = PrefixPlan::new(&same, None);
        assert_eq!(kv_groups(&same, &plan), vec![(0, 100), (0, 100)]);
    }
}

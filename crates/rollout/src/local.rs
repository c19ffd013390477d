//! The local-model policy: a `tooltrain-model` checkpoint generating every turn of a
//! batch together (batched KV-cached sampling over prompts of different lengths).
//!
//! It continues the episode's exact tokens ([`TurnRequest::prompt_tokens`]), so episodes
//! must be run with a [`crate::episode::Renderer`] built from the same tokenizer. A turn
//! stops at the tokenizer's end-of-turn/eos tokens or at its token budget; the sampled
//! ids and their log-probs are returned for RL: `log softmax(logits / T)` at the
//! sampling temperature (the raw model's when greedy), before top-k / top-p, so they are
//! the sampled distribution's exactly when `top_k = 0` and `top_p = 1`
//! ([`LocalSampling::logprobs_exact`]).

use crate::policy::{Policy, PolicyError, TurnReply, TurnRequest};
use serde::{Deserialize, Serialize};
use std::sync::{Arc, Mutex};
use tooltrain_model::{CausalLM, PrefixCache, SamplingParams, Tokenizer};

/// Sampling settings of the local model (the `[policy.model]` table).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LocalSampling {
    /// 0 = greedy.
    pub temperature: f64,
    pub top_p: f64,
    pub top_k: usize,
    /// Most sequences generated in one batch.
    pub max_batch: usize,
    /// Keep each episode's keys and values between its turns, so that a turn computes
    /// only its new tokens (the last reply and the tool result) instead of the whole
    /// conversation again. Costs the memory of about two turns' KV caches.
    pub reuse_prefixes: bool,
    /// Linear layers and the output projection in bf16 on AMX tiles or AVX512-BF16, on a
    /// CPU that has either (f32 models): faster decoding and prefill; the log-probs move by
    /// a few hundredths of a nat (an RL run logs the mismatch to the trainer's). Without
    /// either it changes nothing.
    pub bf16: bool,
    /// Keys and values cached in bf16 (f32 models): half the memory of the KV caches and
    /// of the kept prefixes, at a log-prob mismatch of rounding size.
    pub kv_bf16: bool,
}

impl Default for LocalSampling {
    fn default() -> Self {
        LocalSampling {
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            max_batch: 16,
            reuse_prefixes: true,
            bf16: false,
            kv_bf16: false,
        }
    }
}

impl LocalSampling {
    /// Whether the recorded log-probs are those of the distribution actually sampled:
    /// no top-k / top-p truncation (greedy counts as exact: its log-probs are the
    /// model's at temperature 1, which is what a greedy evaluation scores).
    pub fn logprobs_exact(&self) -> bool {
        self.top_k == 0 && self.top_p >= 1.0
    }
}

/// A checkpoint as a policy.
pub struct LocalModel {
    model: Arc<CausalLM>,
    tokenizer: Arc<Tokenizer>,
    sampling: LocalSampling,
    name: String,
    prefixes: Mutex<PrefixCache>,
}

impl LocalModel {
    /// `name` appears in outputs (e.g. the checkpoint path).
    pub fn new(
        model: Arc<CausalLM>,
        tokenizer: Arc<Tokenizer>,
        sampling: LocalSampling,
        name: impl Into<String>,
    ) -> Result<LocalModel, String> {
        if sampling.max_batch == 0 {
            return Err("policy.model.max_batch must be at least 1".into());
        }
        if !(sampling.temperature >= 0.0) || !(sampling.top_p > 0.0 && sampling.top_p <= 1.0) {
            return Err(format!(
                "policy.model: temperature must be >= 0 and top_p in (0, 1] (got {} and {})",
                sampling.temperature, sampling.top_p
            ));
        }
        if tokenizer.vocab_size() > model.config().vocab_size {
            return Err(format!(
                "the tokenizer has {} tokens but the model's vocabulary is {}",
                tokenizer.vocab_size(),
                model.config().vocab_size
            ));
        }
        Ok(LocalModel {
            model,
            tokenizer,
            sampling,
            name: name.into(),
            prefixes: Mutex::new(PrefixCache::default()),
        })
    }

    pub fn tokenizer(&self) -> &Arc<Tokenizer> {
        &self.tokenizer
    }

    pub fn model(&self) -> &Arc<CausalLM> {
        &self.model
    }
}

/// Prompt-token reuse of a [`LocalModel`] so far (see [`PrefixCache`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct PrefixStats {
    /// Prompt tokens not computed for their row: taken from an earlier turn or sample, a
    /// prefix shared by the batch, or an identical prompt of the same batch.
    pub reused_tokens: u64,
    /// Prompt tokens computed.
    pub computed_tokens: u64,
    /// Rows whose prompt equalled another row's of the same batch (computed once).
    pub duplicate_rows: u64,
    /// Cached sequences dropped because the weights changed.
    pub invalidated: u64,
    /// Generation counters and phase times.
    pub generation: tooltrain_model::GenStats,
}

impl LocalModel {
    /// Prompt-token reuse so far.
    pub fn prefix_stats(&self) -> PrefixStats {
        let p = self.prefixes.lock().unwrap_or_else(|e| e.into_inner());
        PrefixStats {
            reused_tokens: p.reused_tokens,
            computed_tokens: p.computed_tokens,
            duplicate_rows: p.duplicate_rows,
            invalidated: p.invalidated,
            generation: p.stats,
        }
    }

    /// Drops every cached sequence (the counters stay): the next turns compute their
    /// prompts afresh, so results do not depend on what ran before.
    pub fn clear_prefixes(&self) {
        self.prefixes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }

    /// The sampling settings.
    pub fn sampling(&self) -> &LocalSampling {
        &self.sampling
    }
}

impl Policy for LocalModel {
    fn name(&self) -> String {
        format!("model:{}", self.name)
    }

    /// Each request samples with its own seed ([`TurnRequest::seed`]), so a reply does not
    /// depend on the batch it ran in. Requests with the same prompt are best put in one
    /// batch (the runners keep a task's samples together): the prompt is computed once.
    fn stats(&self) -> Option<serde_json::Value> {
        serde_json::to_value(self.prefix_stats()).ok()
    }

    fn respond(&self, requests: &[TurnRequest<'_>]) -> Vec<Result<TurnReply, PolicyError>> {
        let mut out: Vec<Result<TurnReply, PolicyError>> = Vec::with_capacity(requests.len());
        let stops = self.tokenizer.eos_ids();
        let mut prefixes = self.prefixes.lock().unwrap_or_else(|e| e.into_inner());
        prefixes.begin_round();
        for chunk in requests.chunks(self.sampling.max_batch) {
            let prompts: Result<Vec<Vec<u32>>, PolicyError> = chunk
                .iter()
                .map(|r| {
                    r.prompt_tokens.map(<[u32]>::to_vec).ok_or_else(|| {
                        PolicyError(
                            "the local model needs token-level episodes (run with a renderer)"
                                .into(),
                        )
                    })
                })
                .collect();
            let prompts = match prompts {
                Ok(p) => p,
                Err(e) => {
                    out.extend(chunk.iter().map(|_| Err(e.clone())));
                    continue;
                }
            };
            let max_new = chunk.iter().map(|r| r.max_new_tokens).max().unwrap_or(1);
            let params = SamplingParams {
                temperature: self.sampling.temperature,
                top_p: self.sampling.top_p,
                top_k: self.sampling.top_k,
                max_new_tokens: max_new.max(1),
                stop_token_ids: stops.clone(),
                stop_strings: vec![],
                seed: 0,
                row_seeds: chunk.iter().map(|r| r.seed).collect(),
                bf16: self.sampling.bf16,
                kv_bf16: self.sampling.kv_bf16,
            };
            let reuse = self.sampling.reuse_prefixes.then_some(&mut *prefixes);
            match self.model.generate_reusing(&prompts, &params, None, reuse) {
                Ok(gens) => {
                    for (g, r) in gens.into_iter().zip(chunk) {
                        out.push(self.reply(g.tokens, g.logprobs, r.max_new_tokens, &stops));
                    }
                }
                Err(e) => out.extend(
                    chunk
                        .iter()
                        .map(|_| Err(PolicyError(format!("generate: {e}")))),
                ),
            }
        }
        if self.sampling.reuse_prefixes {
            tracing::debug!(
                reused_tokens = prefixes.reused_tokens,
                computed_tokens = prefixes.computed_tokens,
                "prefix reuse so far (prompt tokens taken from earlier turns vs computed)"
            );
        }
        out
    }
}

impl LocalModel {
    /// The reply of one generated row, cut to its own budget (`max_new`; a batch runs to
    /// its longest request's).
    fn reply(
        &self,
        mut tokens: Vec<u32>,
        mut logprobs: Vec<f32>,
        max_new: usize,
        stops: &[u32],
    ) -> Result<TurnReply, PolicyError> {
        let mut truncated = false;
        if tokens.len() > max_new {
            tokens.truncate(max_new);
            logprobs.truncate(max_new);
            truncated = true;
        }
        let stopped = tokens.last().is_some_and(|t| stops.contains(t));
        truncated |= !stopped;
        let body = if stopped {
            &tokens[..tokens.len() - 1]
        } else {
            &tokens[..]
        };
        let text = self
            .tokenizer
            .decode(body, false)
            .map_err(|e| PolicyError(format!("decode: {e}")))?;
        Ok(TurnReply {
            text,
            tokens: Some(tokens),
            logprobs: Some(logprobs),
            truncated,
        })
    }
}

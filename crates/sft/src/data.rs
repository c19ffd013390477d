//! Training data: the JSONL examples `tooltrain sample` writes, length limits, the
//! deterministic split, and the tensors of a planned micro-batch
//! (`tooltrain_train::batch` plans them).
//!
//! One example a line, a [`SftRecord`]:
//! `{"instance_id": str, "sample": int, "reward": float, "messages": [...],
//!   "input_ids": [u32, ...], "loss_mask": [0 | 1, ...]}`.
//! `input_ids` and `loss_mask` are required and have the same length; the other keys are
//! optional and `messages` is not used (examples are trained on as stored, never
//! re-tokenised). The loss of an example is the next-token loss at every position `i`
//! whose *target* `i + 1` has mask 1.

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::io::BufRead;
use std::path::Path;
use tooltrain_rollout::sample::SftRecord;

pub use tooltrain_util::Rng;

/// One training sequence.
#[derive(Debug, Clone, PartialEq)]
pub struct SftExample {
    /// The benchmark instance it was sampled for (`""` when absent).
    pub instance_id: String,
    /// Sample index of the instance (0 when absent).
    pub sample: i64,
    /// Reward of the sampled trajectory (0 when absent).
    pub reward: f64,
    /// Token ids of the whole conversation.
    pub input_ids: Vec<u32>,
    /// 1 on tokens the assistant generated (trained on), 0 elsewhere.
    pub loss_mask: Vec<u8>,
    /// `file:line` the example came from, for error messages.
    pub origin: String,
}

/// What to do with examples longer than `max_len`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Truncation {
    /// Keep the last `max_len` tokens (the paper's choice: the final answer survives).
    #[default]
    Left,
    /// Leave the example out.
    Drop,
}

impl SftExample {
    /// Number of tokens.
    pub fn len(&self) -> usize {
        self.input_ids.len()
    }

    /// Whether the example has no tokens (never true for loaded examples).
    pub fn is_empty(&self) -> bool {
        self.input_ids.is_empty()
    }

    /// Number of loss targets: positions `i >= 1` with mask 1 (the first token is
    /// never a target: nothing precedes it).
    pub fn num_targets(&self) -> usize {
        self.loss_mask.iter().skip(1).filter(|&&m| m == 1).count()
    }

    /// The example cut to `max_len` tokens: its last `max_len` tokens (`Left`), or `None`
    /// when it is longer and `mode` is `Drop`.
    pub fn truncated(mut self, max_len: usize, mode: Truncation) -> Option<Self> {
        let n = self.len();
        if n <= max_len {
            return Some(self);
        }
        match mode {
            Truncation::Drop => None,
            Truncation::Left => {
                self.input_ids.drain(..n - max_len);
                self.loss_mask.drain(..n - max_len);
                Some(self)
            }
        }
    }
}

/// Reads a JSONL file of examples (blank lines are skipped). Malformed lines, length
/// mismatches, empty examples and mask values other than 0/1 are errors naming
/// `file:line`.
pub fn load_examples(path: &Path) -> Result<Vec<SftExample>> {
    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut out = Vec::new();
    for (i, line) in std::io::BufReader::new(file).lines().enumerate() {
        let origin = format!("{}:{}", path.display(), i + 1);
        let line = line.with_context(|| format!("{origin}: reading"))?;
        if line.trim().is_empty() {
            continue;
        }
        let raw: SftRecord =
            serde_json::from_str(&line).with_context(|| format!("{origin}: bad example"))?;
        if raw.input_ids.len() != raw.loss_mask.len() {
            bail!(
                "{origin}: input_ids has {} tokens but loss_mask has {}",
                raw.input_ids.len(),
                raw.loss_mask.len()
            );
        }
        if raw.input_ids.is_empty() {
            bail!("{origin}: empty input_ids");
        }
        if let Some(p) = raw.loss_mask.iter().position(|&m| m > 1) {
            bail!(
                "{origin}: loss_mask[{p}] = {} (must be 0 or 1)",
                raw.loss_mask[p]
            );
        }
        out.push(SftExample {
            instance_id: raw.instance_id,
            sample: raw.sample,
            reward: raw.reward.unwrap_or(0.0),
            input_ids: raw.input_ids,
            loss_mask: raw.loss_mask,
            origin,
        });
    }
    Ok(out)
}

/// Fails, naming the example's `file:line`, if any token id is outside the vocabulary.
pub fn check_vocab(examples: &[SftExample], vocab_size: usize) -> Result<()> {
    for ex in examples {
        if let Some(p) = ex.input_ids.iter().position(|&t| t as usize >= vocab_size) {
            bail!(
                "{}: token id {} (position {p}) is outside the model's vocabulary of {vocab_size}",
                ex.origin,
                ex.input_ids[p]
            );
        }
    }
    Ok(())
}

/// What [`prepare`] did to a set of examples.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PrepareStats {
    /// Examples cut to their last `max_len` tokens.
    pub truncated: usize,
    /// Examples left out for being longer than `max_len` (`truncation = "drop"`).
    pub dropped_long: usize,
    /// Examples left out because no target with mask 1 remained.
    pub dropped_no_target: usize,
}

/// Applies the length limit and leaves out examples without any loss target.
pub fn prepare(
    examples: Vec<SftExample>,
    max_len: usize,
    mode: Truncation,
) -> (Vec<SftExample>, PrepareStats) {
    let mut stats = PrepareStats::default();
    let mut out = Vec::with_capacity(examples.len());
    for ex in examples {
        let long = ex.len() > max_len;
        let Some(ex) = ex.truncated(max_len, mode) else {
            stats.dropped_long += 1;
            continue;
        };
        if ex.num_targets() == 0 {
            stats.dropped_no_target += 1;
            continue;
        }
        stats.truncated += long as usize;
        out.push(ex);
    }
    (out, stats)
}

/// Splits `0..n` into (train, validation) indices, `fraction` of them (rounded, at least
/// one and at most `n - 1`) held out, chosen by `seed`; both lists ascending.
pub fn split_indices(n: usize, fraction: f64, seed: u64) -> (Vec<usize>, Vec<usize>) {
    if fraction <= 0.0 || n < 2 {
        return ((0..n).collect(), Vec::new());
    }
    let mut perm: Vec<usize> = (0..n).collect();
    Rng::new(seed ^ 0x7661_6c5f_7370_6c74).shuffle(&mut perm);
    let k = ((n as f64 * fraction).round() as usize).clamp(1, n - 1);
    let mut val = perm[..k].to_vec();
    let mut train = perm[k..].to_vec();
    val.sort_unstable();
    train.sort_unstable();
    (train, val)
}

impl tooltrain_train::batch::TokenSeq for SftExample {
    fn ids(&self) -> &[u32] {
        &self.input_ids
    }
    fn mask(&self) -> &[u8] {
        &self.loss_mask
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ex(ids: &[u32], mask: &[u8]) -> SftExample {
        SftExample {
            instance_id: String::new(),
            sample: 0,
            reward: 0.0,
            input_ids: ids.to_vec(),
            loss_mask: mask.to_vec(),
            origin: "t:1".into(),
        }
    }

    #[test]
    fn left_truncation_keeps_the_last_tokens() {
        let e = ex(&[1, 2, 3, 4, 5, 6], &[0, 0, 1, 0, 1, 1]);
        let t = e.clone().truncated(4, Truncation::Left).unwrap();
        assert_eq!(t.input_ids, vec![3, 4, 5, 6]);
        assert_eq!(t.loss_mask, vec![1, 0, 1, 1]);
        // The first kept token is context only.
        assert_eq!(t.num_targets(), 2);
        assert!(e.clone().truncated(4, Truncation::Drop).is_none());
        assert_eq!(e.clone().truncated(6, Truncation::Drop), Some(e));
    }

    #[test]
    fn prepare_counts_and_drops() {
        let v = vec![
            ex(&[1, 2, 3], &[0, 1, 1]),
            ex(&[1, 2, 3, 4, 5], &[0, 1, 0, 0, 0]),
            ex(&[1, 2], &[1, 0]),
        ];
        let (kept, st) = prepare(v.clone(), 4, Truncation::Left);
        // The second loses its targets to truncation, the third has none at all.
        assert_eq!(kept, vec![v[0].clone()]);
        assert_eq!(
            st,
            PrepareStats {
                truncated: 0,
                dropped_long: 0,
                dropped_no_target: 2
            }
        );
        let (kept, st) = prepare(v.clone(), 4, Truncation::Drop);
        assert_eq!(kept.len(), 1);
        assert_eq!(st.dropped_long, 1);
    }

    #[test]
    fn loader_names_file_and_line() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.jsonl");
        std::fs::write(
            &p,
            "{\"input_ids\": [1, 2], \"loss_mask\": [0, 1], \"messages\": [{\"role\": \"user\"}]}\n\n{\"input_ids\": [1], \"loss_mask\": [0, 1]}\n",
        )
        .unwrap();
        let e = format!("{:#}", load_examples(&p).unwrap_err());
        assert!(e.contains("d.jsonl:3"), "{e}");
        std::fs::write(&p, "{\"input_ids\": [1, 2], \"loss_mask\": [0, 2]}\n").unwrap();
        let e = format!("{:#}", load_examples(&p).unwrap_err());
        assert!(e.contains("d.jsonl:1") && e.contains("loss_mask[1]"), "{e}");
        std::fs::write(
            &p,
            "{\"input_ids\": [1, 2], \"loss_mask\": [0, 1]}\nnot json\n",
        )
        .unwrap();
        let e = format!("{:#}", load_examples(&p).unwrap_err());
        assert!(e.contains("d.jsonl:2"), "{e}");
        std::fs::write(&p, "{\"input_ids\": [1, 99], \"loss_mask\": [0, 1]}\n").unwrap();
        let v = load_examples(&p).unwrap();
        let e = check_vocab(&v, 64).unwrap_err().to_string();
        assert!(e.contains("d.jsonl:1") && e.contains("99"), "{e}");
    }

    #[test]
    fn split_is_deterministic() {
        let (t1, v1) = split_indices(20, 0.1, 3);
        assert_eq!((t1.len(), v1.len()), (18, 2));
        assert_eq!(split_indices(20, 0.1, 3), (t1, v1));
    }

    #[test]
    fn micro_batch_tensors_count_tokens_and_targets() {
        let lens = [5, 3, 8, 2, 7, 1];
        // Packed: 8 | 7+1 | 5+3 | 2 -> rows of 8 tokens, two per micro-batch.
        let plan = tooltrain_train::batch::plan_micro_batches(&lens, 8, 16, true);
        assert_eq!(plan.len(), 2);
        let seqs: Vec<SftExample> = lens.iter().map(|&n| ex(&vec![3; n], &vec![1; n])).collect();
        let refs: Vec<&SftExample> = seqs.iter().collect();
        let t = tooltrain_train::batch::build_micro_batch(
            &refs,
            &plan[0],
            &tooltrain_model::Device::Cpu,
        )
        .unwrap();
        assert_eq!(t.ids.dims(), &[2, 8]);
        assert_eq!(t.tokens, 16);
        // 7 targets in the lone 8, 6 in the other row (7+1 or 5+3: 6+0 or 4+2).
        assert_eq!(t.kept, 13);
        // Each target names its sequence and token, in row order.
        assert_eq!(t.owners.len(), 13);
        assert_eq!(
            &t.owners[..7],
            &(1..8).map(|j| (2, j)).collect::<Vec<_>>()[..]
        );
    }
}

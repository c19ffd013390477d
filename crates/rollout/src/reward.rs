//! Rewards (`docs/reposearcher.md` §6): nDCG@k with binary relevance (the paper's reward), and
//! recall@k and F1@k as alternatives, behind [`RewardFn`].
//!
//! Predictions are de-duplicated in order before scoring (a repeated location can never
//! count twice) and ground truth is treated as a set. Empty ground truth scores 0.

use std::collections::HashSet;

/// A reward function over a ranked prediction list and a ground-truth set.
pub trait RewardFn {
    fn score(&self, predicted: &[String], gt: &[String]) -> f64;
}

/// The built-in rewards. In TOML: `reward = { kind = "ndcg", k = 5 }`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Reward {
    /// nDCG@k, binary relevance (paper: k = 5).
    Ndcg { k: usize },
    /// |top-k ∩ GT| / |GT|.
    Recall { k: usize },
    /// F1 of the top-k predictions against GT.
    F1 { k: usize },
}

impl Default for Reward {
    fn default() -> Self {
        Reward::Ndcg { k: 5 }
    }
}

impl RewardFn for Reward {
    fn score(&self, predicted: &[String], gt: &[String]) -> f64 {
        match *self {
            Reward::Ndcg { k } => ndcg_at_k(predicted, gt, k),
            Reward::Recall { k } => recall_at_k(predicted, gt, k),
            Reward::F1 { k } => f1_at_k(predicted, gt, k),
        }
    }
}

/// Ranked predictions without duplicates (first occurrence kept).
pub fn dedup<S: AsRef<str>>(items: &[S]) -> Vec<&str> {
    let mut seen = HashSet::new();
    items
        .iter()
        .map(AsRef::as_ref)
        .filter(|s| seen.insert(*s))
        .collect()
}

fn gt_set<S: AsRef<str>>(gt: &[S]) -> HashSet<&str> {
    gt.iter().map(AsRef::as_ref).collect()
}

/// nDCG@k: DCG = sum over the first k (deduplicated) predictions that are in GT of
/// 1/log2(rank+1); IDCG = sum of 1/log2(rank+1) for rank 1..=min(|GT|, k).
pub fn ndcg_at_k<S: AsRef<str>, T: AsRef<str>>(predicted: &[S], gt: &[T], k: usize) -> f64 {
    let gt = gt_set(gt);
    if gt.is_empty() || k == 0 {
        return 0.0;
    }
    let dcg: f64 = dedup(predicted)
        .iter()
        .take(k)
        .enumerate()
        .filter(|(_, p)| gt.contains(*p))
        .map(|(i, _)| 1.0 / ((i + 2) as f64).log2())
        .sum();
    let idcg: f64 = (0..gt.len().min(k))
        .map(|i| 1.0 / ((i + 2) as f64).log2())
        .sum();
    dcg / idcg
}

/// Number of the first k (deduplicated) predictions that are in GT.
pub fn hits_at_k<S: AsRef<str>, T: AsRef<str>>(predicted: &[S], gt: &[T], k: usize) -> usize {
    let gt = gt_set(gt);
    dedup(predicted)
        .iter()
        .take(k)
        .filter(|p| gt.contains(*p))
        .count()
}

/// Recall@k = hits in the top k / |GT| (0 when GT is empty).
pub fn recall_at_k<S: AsRef<str>, T: AsRef<str>>(predicted: &[S], gt: &[T], k: usize) -> f64 {
    let n = gt_set(gt).len();
    if n == 0 {
        return 0.0;
    }
    hits_at_k(predicted, gt, k) as f64 / n as f64
}

/// F1 of the top-k (deduplicated) predictions against GT (0 when GT or the
/// predictions are empty).
pub fn f1_at_k<S: AsRef<str>, T: AsRef<str>>(predicted: &[S], gt: &[T], k: usize) -> f64 {
    let n_gt = gt_set(gt).len();
    let n_pred = dedup(predicted).len().min(k);
    let hits = hits_at_k(predicted, gt, k);
    if n_gt == 0 || n_pred == 0 || hits == 0 {
        return 0.0;
    }
    let p = hits as f64 / n_pred as f64;
    let r = hits as f64 / n_gt as f64;
    2.0 * p * r / (p + r)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::answer::parse_answer;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }
    fn close(a: f64, b: f64) {
        assert!((a - b).abs() < 1e-9, "{a} != {b}");
    }

    #[test]
    fn ndcg_hand_computed() {
        let gt = s(&["a.py::f", "b.py::g"]);
        // hits at ranks 1 and 3: (1 + 1/log2 4) / (1 + 1/log2 3) = 1.5 / 1.6309297535714575
        close(
            ndcg_at_k(&s(&["a.py::f", "x", "b.py::g"]), &gt, 5),
            1.5 / 1.6309297535714575,
        );
        // duplicates do not count twice and do not take a rank: hit at rank 1 only
        close(
            ndcg_at_k(&s(&["a.py::f", "a.py::f", "y"]), &gt, 5),
            1.0 / 1.6309297535714575,
        );
        // hit at rank 6 is outside k = 5
        close(
            ndcg_at_k(&s(&["1", "2", "3", "4", "5", "a.py::f"]), &gt, 5),
            0.0,
        );
        // one GT, hit at rank 2: 1/log2(3)
        close(
            ndcg_at_k(&s(&["x", "a.py::f"]), &s(&["a.py::f"]), 5),
            1.0 / 3f64.log2(),
        );
        // empty GT -> 0, perfect -> 1, |GT| > k caps IDCG at k
        close(ndcg_at_k(&s(&["a"]), &s(&[]), 5), 0.0);
        close(ndcg_at_k(&s(&["b.py::g", "a.py::f"]), &gt, 5), 1.0);
        let gt7 = s(&["1", "2", "3", "4", "5", "6", "7"]);
        close(ndcg_at_k(&s(&["1", "2", "3", "4", "5"]), &gt7, 5), 1.0);
    }

    #[test]
    fn reward_on_a_tricky_answer() {
        // interleaved files, a duplicate, a line entry, trailing spaces, unclosed fence
        let text =
            "```\nb.py  \nfunction: g\n\na.py\nline: 10\nfunction: f \n\nb.py\nfunction: g\n";
        let pred = parse_answer(text).locations;
        assert_eq!(pred, ["b.py::g", "a.py::10", "a.py::f"]);
        let gt = s(&["a.py::f", "b.py::g"]);
        // hits at ranks 1 and 3
        close(
            Reward::default().score(&pred, &gt),
            1.5 / 1.6309297535714575,
        );
        close(Reward::Recall { k: 1 }.score(&pred, &gt), 0.5);
        close(Reward::Recall { k: 3 }.score(&pred, &gt), 1.0);
        // top-5 = 3 predictions, 2 hits: P = 2/3, R = 1, F1 = 0.8
        close(Reward::F1 { k: 5 }.score(&pred, &gt), 0.8);
        // no fence -> nothing -> 0
        close(
            Reward::default().score(&parse_answer("b.py\nfunction: g").locations, &gt),
            0.0,
        );
        close(Reward::F1 { k: 5 }.score(&pred, &s(&[])), 0.0);
    }
}

//! How per-token losses of a mini-batch become one number: the weight of each token, so
//! that the loss is `sum_i sum_t w_it l_it`.

use serde::{Deserialize, Serialize};

/// The aggregation modes (the names verl uses).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Aggregation {
    /// Mean over all tokens of the batch: `1 / N`.
    #[default]
    TokenMean,
    /// Mean over sequences of each sequence's token mean: `1 / (B n_i)` (GRPO's
    /// original form; favours short sequences).
    SeqMeanTokenMean,
    /// Mean over sequences of each sequence's token sum: `1 / B`.
    SeqMeanTokenSum,
    /// Token sum divided by a constant length, then the mean over sequences:
    /// `1 / (B L)` (Dr.GRPO; `L` is the generation budget).
    SeqMeanTokenSumNorm,
}

/// The weight of every token of sequences of `lens` tokens; `norm_len` is `L` of
/// [`Aggregation::SeqMeanTokenSumNorm`]. Sequences without tokens get none.
pub fn token_weights(lens: &[usize], mode: Aggregation, norm_len: usize) -> Vec<Vec<f64>> {
    let b = lens.iter().filter(|&&n| n > 0).count().max(1) as f64;
    let total = lens.iter().sum::<usize>().max(1) as f64;
    lens.iter()
        .map(|&n| {
            let w = match mode {
                Aggregation::TokenMean => 1.0 / total,
                Aggregation::SeqMeanTokenMean => 1.0 / (b * n.max(1) as f64),
                Aggregation::SeqMeanTokenSum => 1.0 / b,
                Aggregation::SeqMeanTokenSumNorm => 1.0 / (b * norm_len.max(1) as f64),
            };
            vec![w; n]
        })
        .collect()
}

/// `sum_i sum_t w_it l_it`.
pub fn aggregate(losses: &[Vec<f64>], weights: &[Vec<f64>]) -> f64 {
    losses
        .iter()
        .zip(weights)
        .flat_map(|(l, w)| l.iter().zip(w).map(|(l, w)| l * w))
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_by_hand() {
        // Two sequences: losses [1, 2, 3] and [4].
        let l = vec![vec![1.0, 2.0, 3.0], vec![4.0]];
        let lens = [3, 1];
        let agg = |m, n| aggregate(&l, &token_weights(&lens, m, n));
        assert_eq!(agg(Aggregation::TokenMean, 0), 10.0 / 4.0);
        assert_eq!(agg(Aggregation::SeqMeanTokenMean, 0), (2.0 + 4.0) / 2.0);
        assert_eq!(agg(Aggregation::SeqMeanTokenSum, 0), (6.0 + 4.0) / 2.0);
        assert_eq!(
            agg(Aggregation::SeqMeanTokenSumNorm, 5),
            (6.0 / 5.0 + 4.0 / 5.0) / 2.0
        );
    }
}

//! KL estimators of `KL(pi || pi_ref)` from the sampled token's log-probabilities `x`
//! (current policy) and `r` (reference), per token (Schulman, "Approximating KL
//! divergence"). Each returns the value and its derivative in `x`.

use serde::{Deserialize, Serialize};

/// Which estimator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum KlEstimator {
    /// `x - r`: unbiased, high variance, can be negative.
    K1,
    /// `(x - r)^2 / 2`: biased, low variance.
    K2,
    /// `exp(r - x) - (r - x) - 1`: unbiased and non-negative.
    #[default]
    K3,
}

/// The estimate at one token and its derivative in `x`.
pub fn kl(x: f64, r: f64, est: KlEstimator) -> (f64, f64) {
    let d = x - r;
    match est {
        KlEstimator::K1 => (d, 1.0),
        KlEstimator::K2 => (0.5 * d * d, d),
        KlEstimator::K3 => ((-d).exp() + d - 1.0, 1.0 - (-d).exp()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn estimators_by_hand_and_by_finite_differences() {
        let (x, r) = (-1.0, -1.5);
        assert_eq!(kl(x, r, KlEstimator::K1), (0.5, 1.0));
        assert_eq!(kl(x, r, KlEstimator::K2), (0.125, 0.5));
        let (v, g) = kl(x, r, KlEstimator::K3);
        assert!((v - ((-0.5f64).exp() + 0.5 - 1.0)).abs() < 1e-15);
        for est in [KlEstimator::K1, KlEstimator::K2, KlEstimator::K3] {
            let h = 1e-6;
            let fd = (kl(x + h, r, est).0 - kl(x - h, r, est).0) / (2.0 * h);
            let g = kl(x, r, est).1;
            assert!((g - fd).abs() < 1e-6, "{est:?}");
        }
        assert!(g > 0.0);
        // Equal policies: every estimator is 0.
        for est in [KlEstimator::K1, KlEstimator::K2, KlEstimator::K3] {
            assert_eq!(kl(-2.0, -2.0, est).0, 0.0);
        }
    }
}

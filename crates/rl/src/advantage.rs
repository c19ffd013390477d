//! Advantages of a group of samples of one task, from their rewards. Every token a
//! sample generated gets its sample's advantage.

use serde::{Deserialize, Serialize};

/// How a group's rewards become advantages.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Estimator {
    /// GRPO: `(r - mean) / (std + eps)`, with the population standard deviation
    /// (divisor n; `sample_std` uses n - 1, as `torch.std` does by default).
    Grpo {
        #[serde(default = "default_eps")]
        eps: f64,
        #[serde(default)]
        sample_std: bool,
    },
    /// Dr.GRPO: `r - mean`, no division by the standard deviation (no bias towards
    /// groups with little spread).
    DrGrpo,
    /// RLOO: `r_i - mean of the others`, i.e. `n / (n - 1) * (r_i - mean)`.
    Rloo,
}

fn default_eps() -> f64 {
    1e-6
}

impl Default for Estimator {
    fn default() -> Self {
        Estimator::Grpo {
            eps: default_eps(),
            sample_std: false,
        }
    }
}

/// The advantages of one group's rewards (`rewards.len() >= 2`; a group of one has no
/// baseline and gets zeros).
pub fn advantages(rewards: &[f64], est: Estimator) -> Vec<f64> {
    let n = rewards.len();
    if n < 2 {
        return vec![0.0; n];
    }
    let mean = rewards.iter().sum::<f64>() / n as f64;
    match est {
        Estimator::Grpo { eps, sample_std } => {
            let ss: f64 = rewards.iter().map(|r| (r - mean) * (r - mean)).sum();
            let div = if sample_std { n - 1 } else { n } as f64;
            let std = (ss / div).sqrt();
            rewards.iter().map(|r| (r - mean) / (std + eps)).collect()
        }
        Estimator::DrGrpo => rewards.iter().map(|r| r - mean).collect(),
        Estimator::Rloo => {
            let sum: f64 = rewards.iter().sum();
            rewards
                .iter()
                .map(|r| r - (sum - r) / (n - 1) as f64)
                .collect()
        }
    }
}

/// What a group's rewards say about its learning signal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum GroupKind {
    /// Rewards differ: the group has a gradient.
    Mixed,
    /// Every reward is 0 (within 1e-9).
    AllZero,
    /// Every reward is 1 (within 1e-9).
    AllOne,
    /// Every reward is the same other value.
    Uniform,
}

/// The reward a sample is trained on: the answer's reward (nDCG@5) minus `penalty` per
/// invalid turn (a malformed tool call or a reply that parses as neither a call nor an
/// answer). `penalty = 0` is the paper's reward; more is a format-shaping ablation that
/// makes skipping the tools through a malformed call cost something.
pub fn shaped_reward(reward: f64, invalid_turns: usize, penalty: f64) -> f64 {
    reward - penalty * invalid_turns as f64
}

/// The kind of a group (zero-variance groups carry no signal and are filtered).
pub fn group_kind(rewards: &[f64]) -> GroupKind {
    let first = rewards.first().copied().unwrap_or(0.0);
    if rewards.iter().any(|r| (r - first).abs() > 1e-9) {
        GroupKind::Mixed
    } else if first.abs() <= 1e-9 {
        GroupKind::AllZero
    } else if (first - 1.0).abs() <= 1e-9 {
        GroupKind::AllOne
    } else {
        GroupKind::Uniform
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: &[f64], b: &[f64]) {
        assert_eq!(a.len(), b.len());
        for (x, y) in a.iter().zip(b) {
            assert!((x - y).abs() < 1e-12, "{a:?} vs {b:?}");
        }
    }

    #[test]
    fn grpo_by_hand() {
        // r = [1, 0, 0, 1]: mean 0.5, population std 0.5 -> +-1 (eps 0).
        let a = advantages(
            &[1.0, 0.0, 0.0, 1.0],
            Estimator::Grpo {
                eps: 0.0,
                sample_std: false,
            },
        );
        close(&a, &[1.0, -1.0, -1.0, 1.0]);
        // Sample std: sqrt(1 / 3) = 0.57735...; (1 - 0.5) / 0.57735 = 0.866025...
        let a = advantages(
            &[1.0, 0.0, 0.0, 1.0],
            Estimator::Grpo {
                eps: 0.0,
                sample_std: true,
            },
        );
        let v = 0.5 / (1.0f64 / 3.0).sqrt();
        close(&a, &[v, -v, -v, v]);
        // r = [0.2, 0.5, 0.8]: mean 0.5, std sqrt(0.06) = 0.244949; eps 1e-6.
        let a = advantages(&[0.2, 0.5, 0.8], Estimator::default());
        let s = 0.06f64.sqrt() + 1e-6;
        close(&a, &[-0.3 / s, 0.0, 0.3 / s]);
        // A zero-variance group: all advantages 0.
        close(&advantages(&[0.4, 0.4], Estimator::default()), &[0.0, 0.0]);
    }

    #[test]
    fn dr_grpo_and_rloo_by_hand() {
        close(
            &advantages(&[1.0, 0.0, 0.5], Estimator::DrGrpo),
            &[0.5, -0.5, 0.0],
        );
        // RLOO: 1 - (0 + 0.5) / 2 = 0.75; 0 - 0.75 = -0.75; 0.5 - 0.5 = 0.
        close(
            &advantages(&[1.0, 0.0, 0.5], Estimator::Rloo),
            &[0.75, -0.75, 0.0],
        );
        close(&advantages(&[0.7], Estimator::Rloo), &[0.0]);
    }

    #[test]
    fn shaped_reward_by_hand() {
        assert_eq!(shaped_reward(0.63, 0, 0.1), 0.63);
        assert!((shaped_reward(0.63, 2, 0.1) - 0.43).abs() < 1e-12);
        assert_eq!(shaped_reward(0.0, 3, 0.25), -0.75);
        // The paper's setting: invalid turns cost nothing.
        assert_eq!(shaped_reward(0.5, 4, 0.0), 0.5);
        // A penalty separates two equal answers, one reached through an invalid turn.
        assert_eq!(
            group_kind(&[shaped_reward(1.0, 0, 0.1), shaped_reward(1.0, 1, 0.1)]),
            GroupKind::Mixed
        );
    }

    #[test]
    fn group_kinds() {
        assert_eq!(group_kind(&[0.0, 0.0]), GroupKind::AllZero);
        assert_eq!(group_kind(&[1.0, 1.0, 1.0]), GroupKind::AllOne);
        assert_eq!(group_kind(&[0.3, 0.3]), GroupKind::Uniform);
        assert_eq!(group_kind(&[0.0, 1.0]), GroupKind::Mixed);
    }
}

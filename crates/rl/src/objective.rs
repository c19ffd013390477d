//! One sequence's share of the RL objective: the policy-gradient term (PPO clip or
//! GSPO, with the trust-region mask and truncated importance sampling), the KL penalty
//! against a reference and the entropy bonus, as values and derivatives in each token's
//! log-probability `x_t` and entropy `H_t`.
//!
//! A trainer computes `x_t` and `H_t` with a graph, calls [`sequence`] on their values,
//! and back-propagates `sum_t d_x[t] * x_t + d_entropy[t] * H_t`: its gradient is the
//! gradient of the objective, because the derivatives are constants of the graph.
//!
//! Per token `t` with aggregation weight `w_t` (see [`crate::aggregate`]):
//!
//! ```text
//! loss = sum_t w_t * [ is_t * pg_t + kl_coef * kl(x_t, ref_t) - entropy_coef * H_t ]
//! ```
//!
//! `pg_t` is [`crate::loss::ppo`] of `(x_t, old_t, advantage)`, 0 for tokens outside the
//! trust region `|exp(x_t) - exp(old_t)| <= delta`; `is_t` is
//! [`crate::loss::truncated_is`]`(old_t, rollout_t, cap)` when the old log-probs were
//! recomputed by the trainer, else 1. With GSPO the policy term is the sequence's
//! [`crate::loss::gspo`] weighted by `sum_t w_t`, with the sequence-level weight
//! `min(exp(mean_t(old_t - rollout_t)), cap)`.

use crate::kl::{kl, KlEstimator};
use crate::loss::{gspo, in_trust_region, ppo, truncated_is, Clip, Clipped};
use serde::{Deserialize, Serialize};

/// The policy-gradient term.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum PolicyLoss {
    /// Token-level PPO clipped surrogate.
    #[default]
    Ppo,
    /// Sequence-level ratio (GSPO).
    Gspo,
}

/// The settings of the objective.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Settings {
    pub loss: PolicyLoss,
    pub clip: Clip,
    /// Trust-region `delta` (DPPO): 0 = off.
    pub trust_region: f64,
    /// Cap of truncated importance sampling: `Some` when the old log-probs are the
    /// trainer's recomputation and `rollout` differs from them.
    pub tis_cap: Option<f64>,
    /// KL penalty `(coefficient, estimator)` against the reference (`None`: off).
    pub kl: Option<(f64, KlEstimator)>,
    pub entropy_coef: f64,
}

/// One sequence's inputs (generated tokens only, in order).
#[derive(Debug, Clone, Copy)]
pub struct SeqIn<'a> {
    /// Current log-probs.
    pub x: &'a [f64],
    /// Old log-probs (the behaviour policy of the ratio).
    pub old: &'a [f64],
    /// Log-probs recorded by the sampler.
    pub rollout: &'a [f64],
    /// Reference log-probs (needed when the KL penalty is on).
    pub reference: Option<&'a [f64]>,
    /// Entropies of the next-token distributions.
    pub entropy: &'a [f64],
    pub advantage: f64,
    /// Aggregation weight of each token.
    pub weights: &'a [f64],
}

/// Counters of a sequence (summed over a batch by the trainer).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Stats {
    pub tokens: usize,
    pub clipped_low: usize,
    pub clipped_high: usize,
    pub clipped_dual: usize,
    /// Tokens outside the trust region.
    pub masked: usize,
    pub ratio_min: f64,
    pub ratio_max: f64,
    pub ratio_sum: f64,
    /// Sum over tokens of k3(old || current), the approximate KL of the update.
    pub approx_kl_sum: f64,
    /// Sum over tokens of the KL estimate against the reference.
    pub ref_kl_sum: f64,
    pub entropy_sum: f64,
    /// Weighted policy, KL and entropy parts of the loss.
    pub pg_loss: f64,
    pub kl_loss: f64,
    pub entropy_loss: f64,
}

impl Stats {
    /// Adds `o` into `self`.
    pub fn merge(&mut self, o: &Stats) {
        if o.tokens == 0 {
            return;
        }
        if self.tokens == 0 {
            self.ratio_min = o.ratio_min;
            self.ratio_max = o.ratio_max;
        } else {
            self.ratio_min = self.ratio_min.min(o.ratio_min);
            self.ratio_max = self.ratio_max.max(o.ratio_max);
        }
        self.tokens += o.tokens;
        self.clipped_low += o.clipped_low;
        self.clipped_high += o.clipped_high;
        self.clipped_dual += o.clipped_dual;
        self.masked += o.masked;
        self.ratio_sum += o.ratio_sum;
        self.approx_kl_sum += o.approx_kl_sum;
        self.ref_kl_sum += o.ref_kl_sum;
        self.entropy_sum += o.entropy_sum;
        self.pg_loss += o.pg_loss;
        self.kl_loss += o.kl_loss;
        self.entropy_loss += o.entropy_loss;
    }

    /// The whole loss.
    pub fn loss(&self) -> f64 {
        self.pg_loss + self.kl_loss + self.entropy_loss
    }
}

/// A sequence's loss, its derivatives in each `x_t` and `H_t`, and its counters.
#[derive(Debug, Clone, PartialEq)]
pub struct SeqOut {
    pub d_x: Vec<f64>,
    pub d_entropy: Vec<f64>,
    pub stats: Stats,
}

/// The objective of one sequence (see the module docs).
pub fn sequence(s: &SeqIn<'_>, cfg: &Settings) -> SeqOut {
    let n = s.x.len();
    assert!(
        s.old.len() == n && s.rollout.len() == n && s.entropy.len() == n && s.weights.len() == n,
        "every per-token input has one value per token"
    );
    let mut d_x = vec![0.0; n];
    let mut d_entropy = vec![0.0; n];
    let mut st = Stats {
        tokens: n,
        ratio_min: f64::INFINITY,
        ratio_max: f64::NEG_INFINITY,
        ..Stats::default()
    };
    if n == 0 {
        st.ratio_min = 0.0;
        st.ratio_max = 0.0;
        return SeqOut {
            d_x,
            d_entropy,
            stats: st,
        };
    }
    let count = |c: Clipped, st: &mut Stats| match c {
        Clipped::No => {}
        Clipped::Low => st.clipped_low += 1,
        Clipped::High => st.clipped_high += 1,
        Clipped::Dual => st.clipped_dual += 1,
    };
    for t in 0..n {
        let r = (s.x[t] - s.old[t]).exp();
        st.ratio_min = st.ratio_min.min(r);
        st.ratio_max = st.ratio_max.max(r);
        st.ratio_sum += r;
        // KL(old || current) from the old policy's samples (Schulman's k3 with ratio
        // r = p / p_old): r - 1 - ln r. Bounded by ln(1/r) for a token whose probability
        // fell; the reverse orientation (1/r - 1 + ln r) grows as 1/r and lets one token
        // dominate a step's mean.
        st.approx_kl_sum += kl(s.old[t], s.x[t], KlEstimator::K3).0;
        st.entropy_sum += s.entropy[t];
    }
    match cfg.loss {
        PolicyLoss::Ppo => {
            for t in 0..n {
                if cfg.trust_region > 0.0 && !in_trust_region(s.x[t], s.old[t], cfg.trust_region) {
                    st.masked += 1;
                    continue;
                }
                let is = cfg
                    .tis_cap
                    .map_or(1.0, |c| truncated_is(s.old[t], s.rollout[t], c));
                let term = ppo(s.x[t], s.old[t], s.advantage, &cfg.clip);
                count(term.clipped, &mut st);
                st.pg_loss += s.weights[t] * is * term.loss;
                d_x[t] += s.weights[t] * is * term.grad;
            }
        }
        PolicyLoss::Gspo => {
            let (loss, grads, clipped) = gspo(s.x, s.old, s.advantage, &cfg.clip);
            if clipped != Clipped::No {
                // A sequence-level clip silences all of its tokens.
                for _ in 0..n {
                    count(clipped, &mut st);
                }
            }
            let w: f64 = s.weights.iter().sum();
            let is = cfg.tis_cap.map_or(1.0, |c| {
                let m = s.old.iter().zip(s.rollout).map(|(o, r)| o - r).sum::<f64>() / n as f64;
                truncated_is(m, 0.0, c)
            });
            st.pg_loss += w * is * loss;
            for (d, g) in d_x.iter_mut().zip(grads) {
                *d += w * is * g;
            }
        }
    }
    if let (Some((coef, est)), Some(reference)) = (cfg.kl, s.reference) {
        for t in 0..n {
            let (v, d) = kl(s.x[t], reference[t], est);
            st.ref_kl_sum += v;
            st.kl_loss += s.weights[t] * coef * v;
            d_x[t] += s.weights[t] * coef * d;
        }
    }
    if cfg.entropy_coef != 0.0 {
        for t in 0..n {
            st.entropy_loss -= s.weights[t] * cfg.entropy_coef * s.entropy[t];
            d_entropy[t] = -s.weights[t] * cfg.entropy_coef;
        }
    }
    SeqOut {
        d_x,
        d_entropy,
        stats: st,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> Settings {
        Settings {
            loss: PolicyLoss::Ppo,
            clip: Clip {
                clip_low: 0.2,
                clip_high: 0.28,
                dual_clip: Some(3.0),
            },
            trust_region: 0.0,
            tis_cap: None,
            kl: None,
            entropy_coef: 0.0,
        }
    }

    fn near(a: f64, b: f64) {
        assert!((a - b).abs() < 1e-12, "{a} vs {b}");
    }

    #[test]
    fn on_policy_ppo_is_minus_the_weighted_advantage() {
        let x = [-1.0, -0.5, -2.0];
        let w = [0.25; 3];
        let o = sequence(
            &SeqIn {
                x: &x,
                old: &x,
                rollout: &x,
                reference: None,
                entropy: &[1.0, 2.0, 3.0],
                advantage: 2.0,
                weights: &w,
            },
            &settings(),
        );
        // ratio 1 everywhere: loss -a per token, gradient -a w.
        near(o.stats.loss(), -2.0 * 0.75);
        assert_eq!(o.d_x, vec![-0.5; 3]);
        assert_eq!((o.stats.ratio_min, o.stats.ratio_max), (1.0, 1.0));
        assert_eq!(o.stats.clipped_low + o.stats.clipped_high, 0);
        near(o.stats.approx_kl_sum, 0.0);
        near(o.stats.entropy_sum, 6.0);
    }

    #[test]
    fn clipping_masking_tis_kl_and_entropy_by_hand() {
        // Token 0: ratio 1.5 with a > 0 -> clipped high. Token 1: ratio 1.
        let x = [1.5f64.ln(), -1.0];
        let old = [0.0, -1.0];
        let rollout = [0.0, -1.5];
        let reference = [0.0, -1.2];
        let w = [0.5, 0.5];
        let mut cfg = settings();
        cfg.tis_cap = Some(1.2);
        cfg.kl = Some((0.1, KlEstimator::K2));
        cfg.entropy_coef = 0.01;
        let run = |cfg: &Settings| {
            sequence(
                &SeqIn {
                    x: &x,
                    old: &old,
                    rollout: &rollout,
                    reference: Some(&reference),
                    entropy: &[2.0, 4.0],
                    advantage: 1.0,
                    weights: &w,
                },
                cfg,
            )
        };
        let o = run(&cfg);
        assert_eq!(o.stats.clipped_high, 1);
        // approx KL: r - 1 - ln r per token (r = 1.5 and 1).
        near(o.stats.approx_kl_sum, 0.5 - 1.5f64.ln());
        // Token 0: IS min(exp(0), 1.2) = 1; clipped loss -1.28, gradient 0.
        // Token 1: IS min(exp(0.5), 1.2) = 1.2; loss -1 * 1.2, gradient -1.2.
        near(o.stats.pg_loss, 0.5 * -1.28 + 0.5 * 1.2 * -1.0);
        // K2: (x - ref)^2 / 2 with derivative x - ref.
        let (d0, d1) = (1.5f64.ln(), 0.2);
        near(o.stats.kl_loss, 0.5 * 0.1 * (d0 * d0 / 2.0 + d1 * d1 / 2.0));
        near(o.d_x[0], 0.5 * 0.1 * d0);
        near(o.d_x[1], 0.5 * 1.2 * -1.0 + 0.5 * 0.1 * d1);
        near(o.stats.entropy_loss, -0.01 * 0.5 * 6.0);
        assert_eq!(o.d_entropy, vec![-0.005, -0.005]);
        // A trust region of 0.1 drops token 0 (probability 1.5 vs 1.0) from the policy
        // term only.
        cfg.trust_region = 0.1;
        let m = run(&cfg);
        assert_eq!(m.stats.masked, 1);
        near(m.stats.pg_loss, 0.5 * 1.2 * -1.0);
        near(m.d_x[0], 0.5 * 0.1 * d0);
    }

    #[test]
    fn gspo_spreads_the_sequence_gradient() {
        let x = [-1.0, -2.0];
        let mut cfg = settings();
        cfg.loss = PolicyLoss::Gspo;
        let o = sequence(
            &SeqIn {
                x: &x,
                old: &x,
                rollout: &x,
                reference: None,
                entropy: &[0.0, 0.0],
                advantage: -1.0,
                weights: &[0.25, 0.25],
            },
            &cfg,
        );
        // s = 1: loss -a = 1 weighted by 0.5; gradient -a / n * 0.5 per token.
        near(o.stats.pg_loss, 0.5);
        assert_eq!(o.d_x, vec![0.25, 0.25]);
    }

    #[test]
    fn derivatives_match_finite_differences() {
        let old = [-1.0, -0.7, -2.0];
        let rollout = [-1.1, -0.6, -2.0];
        let reference = [-0.9, -1.0, -1.5];
        let ent = [1.0, 0.5, 2.0];
        let w = [0.2, 0.3, 0.5];
        for loss in [PolicyLoss::Ppo, PolicyLoss::Gspo] {
            for est in [KlEstimator::K1, KlEstimator::K2, KlEstimator::K3] {
                let cfg = Settings {
                    loss,
                    clip: Clip::default(),
                    trust_region: 0.0,
                    tis_cap: Some(2.0),
                    kl: Some((0.05, est)),
                    entropy_coef: 0.02,
                };
                let x = [-1.05, -0.72, -1.9];
                let f = |x: &[f64], e: &[f64]| {
                    sequence(
                        &SeqIn {
                            x,
                            old: &old,
                            rollout: &rollout,
                            reference: Some(&reference),
                            entropy: e,
                            advantage: 0.8,
                            weights: &w,
                        },
                        &cfg,
                    )
                };
                let o = f(&x, &ent);
                let h = 1e-6;
                for t in 0..3 {
                    let (mut xp, mut xm) = (x, x);
                    xp[t] += h;
                    xm[t] -= h;
                    let fd = (f(&xp, &ent).stats.loss() - f(&xm, &ent).stats.loss()) / (2.0 * h);
                    assert!((o.d_x[t] - fd).abs() < 1e-6, "{loss:?} {est:?} x{t}");
                    let (mut ep, mut em) = (ent, ent);
                    ep[t] += h;
                    em[t] -= h;
                    let fd = (f(&x, &ep).stats.loss() - f(&x, &em).stats.loss()) / (2.0 * h);
                    assert!((o.d_entropy[t] - fd).abs() < 1e-6, "{loss:?} H{t}");
                }
            }
        }
    }
}

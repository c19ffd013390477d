//! Per-token policy losses. Each function returns the loss value and its derivative with
//! respect to the token's new log-probability `x` (the only quantity with a gradient), so
//! a trainer can form the surrogate `sum_t c_t * x_t` with `c_t` = weight x derivative,
//! whose gradient equals the loss's; the value is reported as computed here.
//!
//! Notation: `x` the trainer's log-probability of the sampled token under the current
//! weights, `o` the old (behaviour) log-probability, `a` the advantage,
//! `r = exp(x - o)` the ratio.

use serde::{Deserialize, Serialize};

/// The clipping of the PPO surrogate.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Clip {
    /// The ratio is clipped below at `1 - clip_low`.
    pub clip_low: f64,
    /// ... and above at `1 + clip_high` (clip-higher: `clip_high > clip_low` lets
    /// unlikely tokens with positive advantage grow faster).
    pub clip_high: f64,
    /// Dual clip `c > 1` (negative advantages only): the loss is at most `-c * a`, so a
    /// huge ratio on a bad token cannot dominate; `None`: off.
    #[serde(default)]
    pub dual_clip: Option<f64>,
}

impl Default for Clip {
    fn default() -> Self {
        Clip {
            clip_low: 0.2,
            clip_high: 0.2,
            dual_clip: None,
        }
    }
}

/// Which bound, if any, made the gradient of a token zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Clipped {
    /// The unclipped branch is active.
    No,
    /// `a < 0` and `r < 1 - clip_low`.
    Low,
    /// `a > 0` and `r > 1 + clip_high`.
    High,
    /// `a < 0` and `r > c` (dual clip).
    Dual,
}

/// A token's loss, its derivative in `x`, and the clip event.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Term {
    pub loss: f64,
    pub grad: f64,
    pub clipped: Clipped,
}

/// The PPO clipped surrogate of one token: `max(-a r, -a clip(r, 1 - lo, 1 + hi))`,
/// then `min(., -c a)` for `a < 0` with a dual clip.
pub fn ppo(x: f64, o: f64, a: f64, clip: &Clip) -> Term {
    let r = (x - o).exp();
    let rc = r.clamp(1.0 - clip.clip_low, 1.0 + clip.clip_high);
    let (l1, l2) = (-a * r, -a * rc);
    let mut t = if l1 >= l2 {
        Term {
            loss: l1,
            grad: -a * r,
            clipped: Clipped::No,
        }
    } else {
        Term {
            loss: l2,
            grad: 0.0,
            clipped: if a < 0.0 { Clipped::Low } else { Clipped::High },
        }
    };
    if let (Some(c), true) = (clip.dual_clip, a < 0.0) {
        if t.loss > -c * a {
            t = Term {
                loss: -c * a,
                grad: 0.0,
                clipped: Clipped::Dual,
            };
        }
    }
    t
}

/// GSPO (a sequence-level ratio): `s = exp(mean_t(x_t - o_t))`, and the clipped surrogate
/// of `s` with the sequence's advantage. Returns the sequence's loss, its derivative in
/// each `x_t` (`-a s / n` on the unclipped branch, else 0), and the clip event.
pub fn gspo(xs: &[f64], os: &[f64], a: f64, clip: &Clip) -> (f64, Vec<f64>, Clipped) {
    let n = xs.len();
    if n == 0 {
        return (0.0, Vec::new(), Clipped::No);
    }
    let mean = xs.iter().zip(os).map(|(x, o)| x - o).sum::<f64>() / n as f64;
    // The token-level PPO term of a "token" whose log-ratio is the sequence's mean has
    // the same value and clipping; its derivative in the mean spreads as 1/n per token.
    let t = ppo(mean, 0.0, a, clip);
    (t.loss, vec![t.grad / n as f64; n], t.clipped)
}

/// The trust-region mask of DPPO-style training: keep a token only when its probability
/// moved by at most `delta` from the rollout's, `|exp(x) - exp(o)| <= delta`.
pub fn in_trust_region(x: f64, o: f64, delta: f64) -> bool {
    (x.exp() - o.exp()).abs() <= delta
}

/// Truncated importance-sampling weight of a token whose rollout log-probability
/// (`rollout`, from the sampler) differs from the trainer's old one (`old`):
/// `min(exp(old - rollout), cap)`, a constant factor of the token's loss.
pub fn truncated_is(old: f64, rollout: f64, cap: f64) -> f64 {
    (old - rollout).exp().min(cap)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn near(a: f64, b: f64) {
        assert!((a - b).abs() < 1e-12, "{a} vs {b}");
    }

    /// The derivative in `x` by central differences.
    fn fd(f: impl Fn(f64) -> f64, x: f64) -> f64 {
        let h = 1e-6;
        (f(x + h) - f(x - h)) / (2.0 * h)
    }

    #[test]
    fn ppo_by_hand() {
        let c = Clip {
            clip_low: 0.2,
            clip_high: 0.28,
            dual_clip: Some(3.0),
        };
        // On-policy: r = 1, loss -a, gradient -a.
        let t = ppo(-1.3, -1.3, 0.5, &c);
        near(t.loss, -0.5);
        near(t.grad, -0.5);
        assert_eq!(t.clipped, Clipped::No);
        // a > 0, r = 1.5 > 1.28: clipped high, loss -a * 1.28.
        let t = ppo(1.5f64.ln(), 0.0, 2.0, &c);
        near(t.loss, -2.0 * 1.28);
        assert_eq!((t.grad, t.clipped), (0.0, Clipped::High));
        // a > 0, r = 0.5 < 0.8: the unclipped branch is the larger (-0.5 a > -0.8 a).
        let t = ppo(0.5f64.ln(), 0.0, 2.0, &c);
        near(t.loss, -1.0);
        near(t.grad, -1.0);
        // a < 0, r = 0.5 < 0.8: clipped low, loss -a * 0.8.
        let t = ppo(0.5f64.ln(), 0.0, -1.0, &c);
        near(t.loss, 0.8);
        assert_eq!((t.grad, t.clipped), (0.0, Clipped::Low));
        // a < 0, r = 2: unclipped (2 > 1.28 but the max picks -a r = 2).
        let t = ppo(2f64.ln(), 0.0, -1.0, &c);
        near(t.loss, 2.0);
        near(t.grad, 2.0);
        // a < 0, r = 5 > c = 3: dual clip, loss -c a = 3.
        let t = ppo(5f64.ln(), 0.0, -1.0, &c);
        near(t.loss, 3.0);
        assert_eq!((t.grad, t.clipped), (0.0, Clipped::Dual));
        // Without the dual clip the same token is unclipped.
        let t = ppo(
            5f64.ln(),
            0.0,
            -1.0,
            &Clip {
                dual_clip: None,
                ..c
            },
        );
        near(t.loss, 5.0);
        // The derivative matches finite differences away from the kinks.
        for (x, o, a) in [
            (-0.1, 0.0, 1.0),
            (0.3, 0.1, -0.7),
            (-0.9, -1.0, 0.4),
            (1.2, 0.0, -2.0),
        ] {
            let t = ppo(x, o, a, &c);
            assert!(
                (t.grad - fd(|x| ppo(x, o, a, &c).loss, x)).abs() < 1e-6,
                "{x} {o} {a}"
            );
        }
    }

    #[test]
    fn gspo_by_hand() {
        let c = Clip {
            clip_low: 3e-4,
            clip_high: 4e-4,
            dual_clip: None,
        };
        // Log-ratios 0.1 and -0.1: mean 0, s = 1: loss -a, gradient -a / 2 each.
        let (l, g, k) = gspo(&[0.1, -0.3], &[0.0, -0.2], 1.5, &c);
        near(l, -1.5);
        near(g[0], -0.75);
        near(g[1], -0.75);
        assert_eq!(k, Clipped::No);
        // Mean log-ratio 0.01: s = e^0.01 > 1.0004, a > 0: clipped.
        let (l, g, k) = gspo(&[0.01, 0.01], &[0.0, 0.0], 1.0, &c);
        near(l, -1.0004);
        assert_eq!((g, k), (vec![0.0, 0.0], Clipped::High));
        // Finite differences on one token, unclipped.
        let c = Clip::default();
        let xs = [0.05, -0.02, 0.01];
        let os = [0.0; 3];
        let (_, g, _) = gspo(&xs, &os, -0.8, &c);
        let f = |x0: f64| gspo(&[x0, xs[1], xs[2]], &os, -0.8, &c).0;
        assert!((g[0] - fd(f, xs[0])).abs() < 1e-6);
    }

    #[test]
    fn trust_region_and_truncated_is() {
        assert!(in_trust_region(0.5f64.ln(), 0.55f64.ln(), 0.1));
        assert!(!in_trust_region(0.5f64.ln(), 0.65f64.ln(), 0.1));
        near(truncated_is(-1.0, -1.5, 2.0), 0.5f64.exp());
        near(truncated_is(-1.0, -3.0, 2.0), 2.0);
    }
}

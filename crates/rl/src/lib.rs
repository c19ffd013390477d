//! # tooltrain-rl
//!
//! The second stage of the ToolTrain recipe: policy-gradient RL on live RepoSearcher
//! episodes. This crate holds the algorithms as small pure functions over plain numbers,
//! each tested against hand-computed values; a trainer turns their per-token gradient
//! coefficients into a surrogate loss whose gradient is exact.
//!
//! | concept | where |
//! |---|---|
//! | group advantages: GRPO, Dr.GRPO, RLOO; group kinds (mixed, all-0, all-1) | [`advantage`] |
//! | per-token policy losses: PPO clip with clip-higher and dual clip, GSPO, the DPPO trust-region mask | [`loss`] |
//! | loss aggregation: token-mean, seq-mean-token-mean, seq-mean-token-sum, seq-mean-token-sum-norm | [`aggregate`] |
//! | KL estimators k1, k2, k3 against a reference policy | [`kl`] |

pub mod advantage;
pub mod aggregate;
pub mod kl;
pub mod loss;

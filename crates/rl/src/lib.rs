//! # tooltrain-rl
//!
//! The second stage of the ToolTrain recipe: policy-gradient RL on live RepoSearcher
//! episodes (`train-rl`). The algorithms are small pure functions over plain numbers,
//! each tested against hand-computed values; the trainer turns their per-token
//! derivatives into a surrogate whose gradient is exactly the objective's.
//!
//! | concept | where |
//! |---|---|
//! | group advantages: GRPO, Dr.GRPO, RLOO; group kinds (mixed, all-0, all-1) | [`advantage`] |
//! | per-token policy losses: PPO clip with clip-higher and dual clip, GSPO, the DPPO trust-region mask | [`loss`] |
//! | loss aggregation: token-mean, seq-mean-token-mean, seq-mean-token-sum, seq-mean-token-sum-norm | [`aggregate`] |
//! | KL estimators k1, k2, k3 against a reference policy | [`kl`] |
//! | one sequence's objective (policy term, trust region, truncated IS, KL, entropy) and its derivatives | [`objective`] |
//! | the config and its validation | [`config`] |
//! | the loop: rollouts, groups, mini-batch updates, validation, checkpoints, metrics | [`train`] |

pub mod advantage;
pub mod aggregate;
pub mod config;
pub mod kl;
pub mod loss;
pub mod objective;
pub mod train;

pub use config::RlConfig;
pub use train::{minibatch_objective, train, train_with_stop, RlSummary, Sample};

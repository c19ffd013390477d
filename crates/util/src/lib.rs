//! # tooltrain-util
//!
//! The small helpers that every layer of tooltrain uses, each written once. Nothing here
//! knows about models, episodes or training.
//!
//! | concept | where |
//! |---|---|
//! | SplitMix64 generator (state is one `u64`, saved in checkpoints) | [`rng`]: [`Rng`] |
//! | FNV-1a hashing (cache keys, content hashes), lower-case hex | [`hash`]: [`fnv1a`], [`hex`] |
//! | write to a temporary file then rename; exclusive locks on output directories | [`fs`]: [`write_atomic`], [`RunLock`] |
//! | retries with exponential back-off and jitter | [`retry`]: [`retry::Backoff`], [`retry::retry`] |
//! | progress: a bar on a terminal, periodic log lines otherwise | [`progress`]: [`Progress`] |
//! | logging setup of the binaries | [`log`]: [`init_logging`] |

pub mod fs;
pub mod hash;
pub mod log;
pub mod progress;
pub mod retry;
pub mod rng;

pub use fs::{write_atomic, RunLock};
pub use hash::{fnv1a, hex};
pub use log::init_logging;
pub use progress::Progress;
pub use rng::{derive_seed, Rng};

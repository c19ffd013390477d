//! Stop signals: SIGTERM (a preempted cluster job) and SIGINT set a flag that the
//! trainers check; the run saves a checkpoint of its last finished step and returns. A
//! second signal exits the process at once.

use anyhow::Result;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::Arc;

/// Why a run ended before its last step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// SIGTERM / SIGINT (or the caller's stop flag).
    Signal,
    /// `stop_at_step` was reached.
    StopAtStep,
}

/// SIGTERM / SIGINT handlers that set a stop flag (which trainers check between steps and
/// micro-batches, and rollouts between turns); a second
/// signal, once the flag is set, exits the process at once with status 128 + signal.
/// The handlers are removed on drop.
pub struct StopSignals {
    flag: Arc<AtomicBool>,
    which: Arc<AtomicI32>,
    ids: Vec<signal_hook::SigId>,
}

impl StopSignals {
    /// Installs the handlers.
    pub fn install() -> Result<Self> {
        use signal_hook::consts::{SIGINT, SIGTERM};
        let flag = Arc::new(AtomicBool::new(false));
        let which = Arc::new(AtomicI32::new(0));
        let mut ids = Vec::new();
        for sig in [SIGTERM, SIGINT] {
            // The shutdown first: it only fires when the flag is already set.
            ids.push(signal_hook::flag::register_conditional_shutdown(
                sig,
                128 + sig,
                Arc::clone(&flag),
            )?);
            let (f, w) = (Arc::clone(&flag), Arc::clone(&which));
            // SAFETY: the action only stores to atomics (async-signal-safe).
            ids.push(unsafe {
                signal_hook::low_level::register(sig, move || {
                    w.store(sig, Ordering::SeqCst);
                    f.store(true, Ordering::SeqCst);
                })
            }?);
        }
        Ok(StopSignals { flag, which, ids })
    }

    /// The flag the handlers set.
    pub fn flag(&self) -> &AtomicBool {
        &self.flag
    }

    /// The signal that arrived last (`"SIGTERM"`, `"SIGINT"`), if any, and the exit
    /// status that conventionally reports it (128 + its number: 143, 130).
    pub fn received(&self) -> Option<(&'static str, u8)> {
        use signal_hook::consts::{SIGINT, SIGTERM};
        match self.which.load(Ordering::SeqCst) {
            s if s == SIGTERM => Some(("SIGTERM", (128 + SIGTERM) as u8)),
            s if s == SIGINT => Some(("SIGINT", (128 + SIGINT) as u8)),
            _ => None,
        }
    }
}

impl Drop for StopSignals {
    fn drop(&mut self) {
        for id in self.ids.drain(..) {
            signal_hook::low_level::unregister(id);
        }
    }
}

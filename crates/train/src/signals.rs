//! Stop signals: SIGTERM (a preempted cluster job) and SIGINT set a flag that the
//! trainers check; the run saves a checkpoint of its last finished step and returns. A
//! second signal exits the process at once.

use anyhow::Result;
use std::path::Path;
use std::process::ExitCode;
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

/// After a trainer finished step `step` of `total`: whether to save a checkpoint now
/// (every `save_every` steps, 0: never on a schedule, and after the last step) and
/// whether to stop (the stop flag, or `stop_at_step`, 0: never, reached before the end).
pub fn after_step(
    step: u64,
    total: u64,
    save_every: u64,
    stop_at_step: u64,
    stop: &AtomicBool,
) -> (bool, Option<StopReason>) {
    let last = step >= total;
    let save = last || (save_every > 0 && step % save_every == 0);
    let reason = if stop.load(Ordering::SeqCst) {
        Some(StopReason::Signal)
    } else if stop_at_step > 0 && step >= stop_at_step && !last {
        Some(StopReason::StopAtStep)
    } else {
        None
    };
    (save, reason)
}

/// How a trainer binary ends when its run stopped early: the line for stderr and the exit
/// status (the signal's conventional status, 0 for `stop_at_step`).
pub fn stopped_report(
    command: &str,
    reason: StopReason,
    step: u64,
    total: u64,
    checkpoint: Option<&Path>,
    output_dir: &Path,
    signals: &StopSignals,
) -> (String, ExitCode) {
    let ckpt = checkpoint.map_or_else(
        || "none (no step done)".to_string(),
        |p| p.display().to_string(),
    );
    let hint = format!(
        "resume with: {command} --config ... --resume (output_dir {})",
        output_dir.display()
    );
    match reason {
        StopReason::Signal => {
            let (name, code) = signals.received().unwrap_or(("SIGTERM", 143));
            (
                format!("stopped by {name} after step {step}/{total}: checkpoint: {ckpt}; {hint}"),
                ExitCode::from(code),
            )
        }
        StopReason::StopAtStep => (
            format!("stopped at step {step}/{total} (stop_at_step): checkpoint: {ckpt}; {hint}"),
            ExitCode::SUCCESS,
        ),
    }
}

impl Drop for StopSignals {
    fn drop(&mut self) {
        for id in self.ids.drain(..) {
            signal_hook::low_level::unregister(id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn after_step_saves_on_schedule_and_stops_before_the_end() {
        let no = AtomicBool::new(false);
        let yes = AtomicBool::new(true);
        assert_eq!(after_step(3, 10, 0, 0, &no), (false, None));
        assert_eq!(after_step(4, 10, 2, 0, &no), (true, None));
        assert_eq!(after_step(10, 10, 0, 0, &no), (true, None));
        assert_eq!(
            after_step(5, 10, 0, 5, &no),
            (false, Some(StopReason::StopAtStep))
        );
        // The last step completes the run even at stop_at_step.
        assert_eq!(after_step(10, 10, 0, 10, &no), (true, None));
        assert_eq!(
            after_step(2, 10, 0, 0, &yes),
            (false, Some(StopReason::Signal))
        );
    }
}

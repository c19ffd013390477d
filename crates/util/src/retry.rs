//! Retries with exponential back-off and jitter, for network calls (PyPI and git
//! downloads, OpenAI-compatible endpoints).

use std::time::Duration;

/// When to wait how long between tries.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Backoff {
    /// Retries after the first try (so `max_retries + 1` tries in all).
    pub max_retries: u32,
    /// Wait before the first retry, in seconds; doubled for each further one.
    pub base_secs: f64,
    /// Upper bound of one wait, in seconds.
    pub max_secs: f64,
    /// Multiply each wait by a uniform factor in [0.5, 1) ("equal jitter"), so that many
    /// clients do not retry in step.
    pub jitter: bool,
}

impl Backoff {
    /// Seconds to wait before retry `attempt + 1` (`attempt` counts from 0).
    pub fn wait_secs(&self, attempt: u32) -> f64 {
        let d = (self.base_secs * 2f64.powi(attempt.min(30) as i32)).min(self.max_secs);
        if !self.jitter {
            return d;
        }
        use std::hash::{BuildHasher, Hasher};
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u32(attempt);
        let u = (h.finish() >> 11) as f64 / (1u64 << 53) as f64;
        d * (0.5 + 0.5 * u)
    }
}

/// What one try gave.
pub enum Attempt<T, E> {
    /// Success.
    Done(T),
    /// A failure worth another try; `after` overrides the back-off (a `Retry-After`).
    Retry { error: E, after: Option<f64> },
    /// A failure that another try will not fix.
    Fatal(E),
}

/// Runs `op(attempt)` until it succeeds, fails fatally, or the retries are spent. The
/// error is returned with the number of retries made.
pub fn retry<T, E>(
    backoff: &Backoff,
    mut op: impl FnMut(u32) -> Attempt<T, E>,
) -> Result<T, (E, u32)> {
    let mut attempt = 0u32;
    loop {
        match op(attempt) {
            Attempt::Done(v) => return Ok(v),
            Attempt::Fatal(e) => return Err((e, attempt)),
            Attempt::Retry { error, after } => {
                if attempt >= backoff.max_retries {
                    return Err((error, attempt));
                }
                let wait = after.map_or_else(|| backoff.wait_secs(attempt), |s| s.min(600.0));
                std::thread::sleep(Duration::from_secs_f64(wait.max(0.0)));
                attempt += 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FAST: Backoff = Backoff {
        max_retries: 2,
        base_secs: 0.0,
        max_secs: 0.0,
        jitter: false,
    };

    #[test]
    fn retries_until_success_or_the_limit() {
        let mut calls = 0;
        let r: Result<u32, (String, u32)> = retry(&FAST, |a| {
            calls += 1;
            if a < 2 {
                Attempt::Retry {
                    error: format!("try {a}"),
                    after: None,
                }
            } else {
                Attempt::Done(a)
            }
        });
        assert_eq!(r.unwrap(), 2);
        assert_eq!(calls, 3);
        let r: Result<(), (String, u32)> = retry(&FAST, |a| Attempt::Retry {
            error: format!("try {a}"),
            after: Some(0.0),
        });
        assert_eq!(r.unwrap_err(), ("try 2".to_string(), 2));
        let r: Result<(), (&str, u32)> = retry(&FAST, |_| Attempt::Fatal("no"));
        assert_eq!(r.unwrap_err(), ("no", 0));
    }

    #[test]
    fn waits_double_up_to_the_cap_and_jitter_stays_in_half_to_one() {
        let b = Backoff {
            max_retries: 9,
            base_secs: 1.0,
            max_secs: 5.0,
            jitter: false,
        };
        let w: Vec<f64> = (0..5).map(|a| b.wait_secs(a)).collect();
        assert_eq!(w, vec![1.0, 2.0, 4.0, 5.0, 5.0]);
        let j = Backoff { jitter: true, ..b };
        for a in 0..5 {
            let x = j.wait_secs(a);
            assert!(x >= 0.5 * w[a as usize] && x <= w[a as usize], "{x}");
        }
    }
}

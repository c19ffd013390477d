//! Progress of long work. On a terminal: an indicatif bar with position, throughput and
//! ETA. Otherwise (a cluster job logging to a file, CI): a plain line on stderr every
//! `TOOLTRAIN_PROGRESS_SECS` seconds (default 30), from a background ticker, so a log
//! shows signs of life even when one unit of work takes minutes:
//!
//! ```text
//! [eval] 12/100 episodes (12%), 0.41/s, elapsed 29s, ETA 3m35s | reward 0.31
//! ```
//!
//! `CI=true` counts as "not a terminal". [`Progress::hidden`] reports nothing.

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::IsTerminal;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

struct State {
    label: String,
    unit: String,
    pos: u64,
    len: Option<u64>,
    msg: String,
    start: Instant,
    /// Position and time when the run of this process started counting (a resumed run
    /// starts at a position > 0; its rate counts from there).
    base_pos: u64,
    done: bool,
}

impl State {
    fn line(&self) -> String {
        let el = self.start.elapsed().as_secs_f64();
        let rate = (self.pos - self.base_pos.min(self.pos)) as f64 / el.max(1e-9);
        let mut s = format!("[{}] {}", self.label, self.pos);
        if let Some(len) = self.len {
            s.push_str(&format!("/{len}"));
        }
        s.push_str(&format!(" {}", self.unit));
        if let Some(len) = self.len.filter(|&l| l > 0) {
            s.push_str(&format!(" ({:.0}%)", 100.0 * self.pos as f64 / len as f64));
        }
        s.push_str(&format!(", {}, elapsed {}", fmt_rate(rate), fmt_secs(el)));
        if let Some(len) = self.len {
            if rate > 0.0 && self.pos < len {
                s.push_str(&format!(
                    ", ETA {}",
                    fmt_secs((len - self.pos) as f64 / rate)
                ));
            }
        }
        if !self.msg.is_empty() {
            s.push_str(" | ");
            s.push_str(&self.msg);
        }
        s
    }
}

fn fmt_rate(r: f64) -> String {
    if r >= 1.0 || r == 0.0 {
        format!("{r:.2}/s")
    } else {
        format!("{:.1}s each", 1.0 / r)
    }
}

/// `1h02m03s`, `3m35s`, `29s`.
pub fn fmt_secs(s: f64) -> String {
    let s = s.max(0.0).round() as u64;
    match (s / 3600, s / 60 % 60, s % 60) {
        (0, 0, sec) => format!("{sec}s"),
        (0, m, sec) => format!("{m}m{sec:02}s"),
        (h, m, sec) => format!("{h}h{m:02}m{sec:02}s"),
    }
}

/// A progress reporter (see the module docs). Cheap to clone; clones share the state.
#[derive(Clone)]
pub struct Progress {
    bar: Option<ProgressBar>,
    state: Option<Arc<(Mutex<State>, Condvar)>>,
}

/// Seconds between log lines when stderr is not a terminal.
fn interval() -> Duration {
    let s = std::env::var("TOOLTRAIN_PROGRESS_SECS")
        .ok()
        .and_then(|v| v.parse::<f64>().ok())
        .filter(|v| v.is_finite() && *v > 0.0)
        .unwrap_or(30.0);
    Duration::from_secs_f64(s)
}

fn interactive() -> bool {
    std::io::stderr().is_terminal() && !std::env::var("CI").is_ok_and(|v| v == "true")
}

impl Progress {
    /// Progress over `len` units (`None`: unknown), labelled `label` (the command) and
    /// counted in `unit` (`episodes`, `steps`).
    pub fn new(label: &str, len: Option<u64>, unit: &str) -> Progress {
        Self::with_mode(label, len, unit, interactive())
    }

    /// Reports nothing.
    pub fn hidden() -> Progress {
        Progress {
            bar: None,
            state: None,
        }
    }

    /// [`Progress::new`] with the mode chosen by the caller: a bar (`true`) or log lines.
    pub fn with_mode(label: &str, len: Option<u64>, unit: &str, bar: bool) -> Progress {
        let state = Arc::new((
            Mutex::new(State {
                label: label.to_string(),
                unit: unit.to_string(),
                pos: 0,
                len,
                msg: String::new(),
                start: Instant::now(),
                base_pos: 0,
                done: false,
            }),
            Condvar::new(),
        ));
        if bar {
            let pb = ProgressBar::with_draw_target(len, ProgressDrawTarget::stderr());
            pb.set_style(
                ProgressStyle::with_template(&format!(
                    "{{elapsed_precise}} [{{bar:30}}] {{pos}}/{{len}} {unit} ({{per_sec}}, ETA {{eta}}) {{msg}}"
                ))
                .expect("a valid template")
                .progress_chars("=> "),
            );
            return Progress {
                bar: Some(pb),
                state: Some(state),
            };
        }
        let weak = Arc::downgrade(&state);
        let every = interval();
        std::thread::spawn(move || loop {
            let Some(st) = weak.upgrade() else { return };
            let (lock, cv) = &*st;
            let guard = lock.lock().unwrap_or_else(|e| e.into_inner());
            let (guard, _) = cv
                .wait_timeout_while(guard, every, |s| !s.done)
                .unwrap_or_else(|e| e.into_inner());
            if guard.done {
                return;
            }
            eprintln!("{}", guard.line());
        });
        Progress {
            bar: None,
            state: Some(state),
        }
    }

    fn with_state(&self, f: impl FnOnce(&mut State)) {
        if let Some(st) = &self.state {
            f(&mut st.0.lock().unwrap_or_else(|e| e.into_inner()));
        }
    }

    /// Advances by `n`.
    pub fn inc(&self, n: u64) {
        self.with_state(|s| s.pos += n);
        if let Some(b) = &self.bar {
            b.inc(n);
        }
    }

    /// Sets the position.
    pub fn set_position(&self, pos: u64) {
        self.with_state(|s| s.pos = pos);
        if let Some(b) = &self.bar {
            b.set_position(pos);
        }
    }

    /// Sets the position a resumed run starts from: the rate and ETA count from here.
    pub fn start_at(&self, pos: u64) {
        self.with_state(|s| {
            s.pos = pos;
            s.base_pos = pos;
            s.start = Instant::now();
        });
        if let Some(b) = &self.bar {
            b.set_position(pos);
            b.reset_eta();
        }
    }

    /// Sets the total.
    pub fn set_length(&self, len: u64) {
        self.with_state(|s| s.len = Some(len));
        if let Some(b) = &self.bar {
            b.set_length(len);
        }
    }

    /// Sets the message shown after the counts (latest loss, reward, ...).
    pub fn set_message(&self, msg: impl Into<String>) {
        let msg = msg.into();
        if let Some(b) = &self.bar {
            b.set_message(msg.clone());
        }
        self.with_state(|s| s.msg = msg);
    }

    /// Prints a line above the bar (or as is, without one).
    pub fn println(&self, line: impl AsRef<str>) {
        match &self.bar {
            Some(b) => b.println(line.as_ref()),
            None => eprintln!("{}", line.as_ref()),
        }
    }

    /// Runs `f` (which may log) with the bar hidden.
    pub fn suspend<R>(&self, f: impl FnOnce() -> R) -> R {
        match &self.bar {
            Some(b) => b.suspend(f),
            None => f(),
        }
    }

    /// The current line, as the log mode prints it.
    pub fn line(&self) -> String {
        self.state
            .as_ref()
            .map(|st| st.0.lock().unwrap_or_else(|e| e.into_inner()).line())
            .unwrap_or_default()
    }

    /// Removes the bar and stops the ticker; in log mode prints a last line.
    pub fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
        if let Some(st) = &self.state {
            let mut s = st.0.lock().unwrap_or_else(|e| e.into_inner());
            if !s.done {
                s.done = true;
                if self.bar.is_none() {
                    eprintln!("{}", s.line());
                }
            }
            st.1.notify_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_line_has_counts_rate_eta_and_message() {
        let p = Progress::with_mode("eval", Some(100), "episodes", false);
        p.set_position(0);
        std::thread::sleep(Duration::from_millis(20));
        p.inc(12);
        p.set_message("reward 0.31");
        let l = p.line();
        assert!(l.starts_with("[eval] 12/100 episodes (12%), "), "{l}");
        assert!(l.contains("ETA "), "{l}");
        assert!(l.ends_with("| reward 0.31"), "{l}");
        p.finish();
        // Finished: no ETA at the end of the work.
        p.set_position(100);
        assert!(!p.line().contains("ETA"), "{}", p.line());
    }

    #[test]
    fn durations_read_as_hours_minutes_seconds() {
        assert_eq!(fmt_secs(29.4), "29s");
        assert_eq!(fmt_secs(215.0), "3m35s");
        assert_eq!(fmt_secs(3723.0), "1h02m03s");
    }
}

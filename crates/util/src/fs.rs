//! Files that are never half-written, and output directories that two runs never share
//! unnoticed.

use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

/// Writes `bytes` to `path` atomically: to a temporary file beside it (unique per
/// process and call), then a rename. A crash leaves the old file or the new one, never
/// a mix; the temporary file is removed on failure.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "out".into());
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = dir.join(format!(".{name}.{}.{n}.tmp", std::process::id()));
    let res = std::fs::write(&tmp, bytes).and_then(|()| std::fs::rename(&tmp, path));
    if res.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    res
}

/// An exclusive lock on an output directory, held until dropped (or until the process
/// dies: the operating system releases it, so a killed run leaves no lock behind that
/// blocks the next one).
///
/// The lock is an advisory `flock` on `DIR/.tooltrain.lock`, which also records the
/// holder (command, process id, start time) so that a second run can name it.
#[derive(Debug)]
pub struct RunLock {
    file: std::fs::File,
    path: PathBuf,
    /// What the lock file said when it was taken over from a process that no longer
    /// holds it (a run that was killed), if anything.
    pub stale: Option<String>,
}

/// The lock file's name inside a locked directory.
pub const LOCK_FILE: &str = ".tooltrain.lock";

impl RunLock {
    /// Creates `dir` if needed and locks it for `command` (e.g. `"tooltrain eval"`).
    /// Fails at once, naming the holder, when another process holds the lock.
    pub fn acquire(dir: &Path, command: &str) -> Result<RunLock, String> {
        std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
        Self::acquire_file(&dir.join(LOCK_FILE), dir, command)
    }

    /// Locks `guarded` (an output that is replaced as a whole, so it cannot hold its own
    /// lock) through the lock file `path` beside it; otherwise as [`RunLock::acquire`].
    pub fn acquire_file(path: &Path, guarded: &Path, command: &str) -> Result<RunLock, String> {
        let path = path.to_path_buf();
        let dir = guarded;
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        let mut previous = String::new();
        let _ = file.read_to_string(&mut previous);
        let previous = previous.trim().to_string();
        if fs2::FileExt::try_lock_exclusive(&file).is_err() {
            let holder = if previous.is_empty() {
                "another process".to_string()
            } else {
                previous
            };
            return Err(format!(
                "{} is in use by {holder} (lock {}); wait for it to finish, or choose another \
                 output directory",
                dir.display(),
                path.display()
            ));
        }
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let me = format!(
            "`{command}` (pid {}, started at unix time {now})",
            std::process::id()
        );
        let res = file
            .set_len(0)
            .and_then(|()| file.rewind())
            .and_then(|()| file.write_all(me.as_bytes()))
            .and_then(|()| file.flush());
        res.map_err(|e| format!("{}: {e}", path.display()))?;
        if !previous.is_empty() {
            tracing::warn!(
                "{}: taking over the lock that {previous} left behind (that process is gone)",
                dir.display()
            );
        }
        Ok(RunLock {
            file,
            path,
            stale: (!previous.is_empty()).then_some(previous),
        })
    }

    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for RunLock {
    fn drop(&mut self) {
        // Emptied first: a lock file with text in it and no holder is one a killed run
        // left behind.
        let _ = self.file.set_len(0);
        let _ = fs2::FileExt::unlock(&self.file);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_atomic_replaces_and_leaves_no_temp() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("a.json");
        write_atomic(&p, b"one").unwrap();
        write_atomic(&p, b"two").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        let names: Vec<_> = std::fs::read_dir(d.path()).unwrap().collect();
        assert_eq!(names.len(), 1);
        assert!(write_atomic(&d.path().join("missing/x"), b"x").is_err());
    }

    #[test]
    fn second_lock_fails_naming_the_holder_and_drop_releases() {
        let d = tempfile::tempdir().unwrap();
        let a = RunLock::acquire(d.path(), "tooltrain eval").unwrap();
        assert!(a.stale.is_none());
        // flock locks belong to the open file: a second open in this process conflicts
        // as a second process would.
        let e = RunLock::acquire(d.path(), "tooltrain sample").unwrap_err();
        assert!(e.contains("tooltrain eval"), "{e}");
        assert!(e.contains(&format!("pid {}", std::process::id())), "{e}");
        drop(a);
        let b = RunLock::acquire(d.path(), "tooltrain sample").unwrap();
        assert!(b.stale.is_none(), "a clean release is not stale");
    }

    #[test]
    fn a_lock_left_by_a_dead_process_is_detected_and_taken_over() {
        let d = tempfile::tempdir().unwrap();
        // What a killed process leaves: the file with its holder line, no flock.
        std::fs::write(d.path().join(LOCK_FILE), "`train-sft` (pid 999999999)").unwrap();
        let l = RunLock::acquire(d.path(), "train-sft").unwrap();
        assert!(l.stale.as_deref().unwrap().contains("999999999"));
    }
}

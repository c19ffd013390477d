//! The output directory of [`super::generate_opts`]: which existing directory may be
//! replaced, and the atomic write (a temporary sibling directory, then a rename).

use super::{io_err, SynthConfig, SynthError, Task};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The parent directory and file name of `out_dir`.
fn parent_and_name(out_dir: &Path) -> Result<(PathBuf, String), SynthError> {
    let parent = match out_dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = out_dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .ok_or_else(|| SynthError::Output(format!("{} has no file name", out_dir.display())))?;
    Ok((parent, name))
}

/// Locks `out_dir` for this run (through the lock file `.NAME.synth.lock` beside it,
/// since `out_dir` itself is replaced by a rename), then removes what runs that were
/// killed left beside it: temporary trees (`.NAME.synth-tmp.*`), and an old tree moved
/// aside (`.NAME.synth-old.*`), which is put back first when `out_dir` is missing.
pub(super) fn lock_and_clean(out_dir: &Path) -> Result<tooltrain_util::RunLock, SynthError> {
    let (parent, name) = parent_and_name(out_dir)?;
    std::fs::create_dir_all(&parent).map_err(io_err(&parent))?;
    let lock_file = parent.join(format!(".{name}.synth.lock"));
    let lock = tooltrain_util::RunLock::acquire_file(&lock_file, out_dir, "tooltrain synth")
        .map_err(SynthError::Output)?;
    let tmp_prefix = format!(".{name}.synth-tmp.");
    let old_prefix = format!(".{name}.synth-old.");
    let rd = std::fs::read_dir(&parent).map_err(io_err(&parent))?;
    for e in rd.flatten() {
        let n = e.file_name().to_string_lossy().into_owned();
        let p = e.path();
        if n.starts_with(&old_prefix) && !out_dir.exists() {
            std::fs::rename(&p, out_dir).map_err(io_err(out_dir))?;
        } else if n.starts_with(&tmp_prefix) || n.starts_with(&old_prefix) {
            std::fs::remove_dir_all(&p).map_err(io_err(&p))?;
        }
    }
    Ok(lock)
}

/// Checks that `out_dir` may be written: absent, empty, or (with `overwrite`) a previous
/// synth output. Returns whether it exists and is to be replaced.
pub(super) fn check_out_dir(out_dir: &Path, overwrite: bool) -> Result<bool, SynthError> {
    if !out_dir.exists() {
        return Ok(false);
    }
    if !out_dir.is_dir() {
        return Err(SynthError::Output(format!(
            "{} exists and is not a directory",
            out_dir.display()
        )));
    }
    let non_empty = std::fs::read_dir(out_dir)
        .map_err(io_err(out_dir))?
        .next()
        .is_some();
    if non_empty {
        if !overwrite {
            return Err(SynthError::Output(format!(
                "{} exists and is not empty (use --force to replace a previous synth output)",
                out_dir.display()
            )));
        }
        if !out_dir.join("dataset.jsonl").is_file() {
            return Err(SynthError::Output(format!(
                "refusing to replace {}: it is not a synth output (no dataset.jsonl)",
                out_dir.display()
            )));
        }
    }
    Ok(true)
}

/// Writes `tasks` into a temporary sibling of `out_dir` and renames it into place
/// (`replace`: moving the existing `out_dir` aside first, restored if the rename
/// fails). The temporary directory is removed on failure.
pub(super) fn install(
    cfg: &SynthConfig,
    tasks: &[Task],
    out_dir: &Path,
    replace: bool,
) -> Result<(), SynthError> {
    let (parent, name) = parent_and_name(out_dir)?;
    std::fs::create_dir_all(&parent).map_err(io_err(&parent))?;
    let tmp = parent.join(format!(".{name}.synth-tmp.{}", std::process::id()));
    let res = write_tree(cfg, tasks, &tmp).and_then(|()| {
        if replace {
            let old = parent.join(format!(".{name}.synth-old.{}", std::process::id()));
            if old.exists() {
                std::fs::remove_dir_all(&old).map_err(io_err(&old))?;
            }
            std::fs::rename(out_dir, &old).map_err(io_err(out_dir))?;
            if let Err(e) = std::fs::rename(&tmp, out_dir) {
                let _ = std::fs::rename(&old, out_dir);
                return Err(io_err(out_dir)(e));
            }
            std::fs::remove_dir_all(&old).map_err(io_err(&old))
        } else {
            std::fs::rename(&tmp, out_dir).map_err(io_err(out_dir))
        }
    });
    if res.is_err() && tmp.exists() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    res
}

/// `dataset.jsonl`, `gt.json`, `config.json` and `repos/<instance_id>/` under `dir`
/// (emptied first).
fn write_tree(cfg: &SynthConfig, tasks: &[Task], dir: &Path) -> Result<(), SynthError> {
    if dir.exists() {
        std::fs::remove_dir_all(dir).map_err(io_err(dir))?;
    }
    std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    let write = |p: &Path, bytes: &[u8]| -> Result<(), SynthError> {
        if let Some(d) = p.parent() {
            std::fs::create_dir_all(d).map_err(io_err(d))?;
        }
        std::fs::write(p, bytes).map_err(io_err(p))
    };
    let mut jsonl = String::new();
    let mut gt: BTreeMap<&str, &[String]> = BTreeMap::new();
    for t in tasks {
        jsonl.push_str(&serde_json::to_string(&t.instance).expect("serialisable"));
        jsonl.push('\n');
        gt.insert(&t.instance.instance_id, &t.gt);
        let root = dir.join("repos").join(&t.instance.instance_id);
        for f in &t.files {
            write(&root.join(&f.path), f.text.as_bytes())?;
        }
    }
    write(&dir.join("dataset.jsonl"), jsonl.as_bytes())?;
    let mut g = serde_json::to_string_pretty(&gt).expect("serialisable");
    g.push('\n');
    write(&dir.join("gt.json"), g.as_bytes())?;
    let mut c = serde_json::to_string_pretty(cfg).expect("serialisable");
    c.push('\n');
    write(&dir.join("config.json"), c.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_killed_run_leaves_nothing_and_a_running_one_blocks_the_next() {
        let d = tempfile::tempdir().unwrap();
        let out = d.path().join("data");
        // What a run killed mid-write leaves: a temp tree (~20 MB in real runs).
        let tmp = d.path().join(".data.synth-tmp.4242");
        std::fs::create_dir_all(tmp.join("repos/x")).unwrap();
        std::fs::write(tmp.join("repos/x/a.py"), "x = 1\n").unwrap();
        // And one killed while replacing: the old tree moved aside, the new not in place.
        let old = d.path().join(".data.synth-old.4243");
        std::fs::create_dir_all(&old).unwrap();
        std::fs::write(old.join("dataset.jsonl"), "").unwrap();
        let lock = lock_and_clean(&out).unwrap();
        assert!(!tmp.exists());
        assert!(!old.exists());
        assert!(
            out.join("dataset.jsonl").exists(),
            "the old tree is put back"
        );
        let e = lock_and_clean(&out).err().unwrap().to_string();
        assert!(e.contains("in use by `tooltrain synth`"), "{e}");
        drop(lock);
        lock_and_clean(&out).unwrap();
    }
}

//! The output directory of [`super::generate_opts`]: which existing directory may be
//! replaced, and the atomic write (a temporary sibling directory, then a rename).

use super::{io_err, SynthConfig, SynthError, Task};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

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
    let parent = match out_dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&parent).map_err(io_err(&parent))?;
    let name = out_dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .ok_or_else(|| SynthError::Output(format!("{} has no file name", out_dir.display())))?;
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

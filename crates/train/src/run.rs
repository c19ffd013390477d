//! A trainer's output directory: locked for one run at a time, checkpoints written
//! atomically, exact resume with config checks, metrics cut back to the checkpoint.
//!
//! ```text
//! OUT/.tooltrain.lock              held while a run writes here (names the holder)
//! OUT/config.toml                  the resolved config of the (latest) run
//! OUT/metrics.jsonl                one flat JSON object per step
//! OUT/checkpoints/step-N/          what the trainer saves (model, optimizer, state.json,
//!                                  config.toml)
//! OUT/checkpoints/latest           the name of the newest complete checkpoint ("step-N")
//! OUT/final/                       the trained model in HF format
//! ```
//!
//! A checkpoint is written into `step-N.tmp/` and renamed to `step-N/` once complete;
//! `latest` is then replaced atomically, so a crash at any moment leaves the previous
//! checkpoint usable. Temp directories a crash left are removed when a run opens the
//! directory (it holds the lock, so nobody else is writing them).
//!
//! A trainer's loop with it:
//!
//! ```no_run
//! # use tooltrain_train::{RunDir, Metrics};
//! # #[derive(serde::Serialize, serde::Deserialize)] struct State { step: u64 }
//! # fn demo(cfg: &toml::Table) -> anyhow::Result<()> {
//! let run = RunDir::open("runs/x".as_ref(), cfg, /* resume */ true, &["output_dir"], "train-x")?;
//! let mut state: State = run.resumed_state()?.unwrap_or(State { step: 0 });
//! let mut metrics = run.start(run.resumed().map(|_| state.step))?;
//! while state.step < 100 {
//!     state.step += 1; // ... one optimizer step ...
//!     metrics.log(&serde_json::json!({"step": state.step}))?;
//!     if state.step % 10 == 0 {
//!         run.save_checkpoint(state.step, &state, |dir| Ok(())/* model, optimizer */)?;
//!     }
//! }
//! run.export_final(|dir| Ok(()) /* the model in HF format */)?;
//! # Ok(()) }
//! ```

use crate::config::check_resume;
use anyhow::{bail, Context, Result};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::io::Write;
use std::path::{Path, PathBuf};
use tooltrain_util::RunLock;

/// Fails when a parameter of `model` is not finite after step `step`: a checkpoint is
/// never written from such weights (the previous one stays the latest).
pub fn ensure_finite(model: &tooltrain_model::CausalLM, step: u64) -> Result<()> {
    for (name, v) in model.params().iter().chain(model.trainable()) {
        // Any inf or NaN makes the sum non-finite; no copy of the weights is made.
        let sum = v
            .as_tensor()
            .sum_all()?
            .to_dtype(tooltrain_model::DType::F64)?
            .to_scalar::<f64>()?;
        if !sum.is_finite() {
            bail!(
                "the run diverged: parameter `{name}` is not finite after step {step}; not \
                 saving (the previous checkpoint stays the latest). Lower `lr`"
            );
        }
    }
    Ok(())
}

/// Where a checkpoint or the final export keeps a model's LoRA adapters (a PEFT
/// directory), beside the merged HF weights.
pub const ADAPTER_DIR: &str = "adapter";

/// The model a trainer works on: `init` for a fresh run, else the checkpoint `resumed`.
/// With LoRA (`lora.rank > 0`) the base is always `init` (frozen), and the adapters are
/// fresh (seeded by `seed`) or the checkpoint's `adapter/`.
pub fn load_model(
    init: &Path,
    resumed: Option<&Path>,
    lora: &tooltrain_model::LoraConfig,
    seed: u64,
    dtype: tooltrain_model::DType,
    device: &tooltrain_model::Device,
) -> Result<tooltrain_model::Checkpoint> {
    lora.validate()
        .map_err(|e| anyhow::anyhow!("invalid config: {e}"))?;
    let from = match resumed {
        Some(ck) if !lora.enabled() => ck,
        _ => init,
    };
    let mut ck = tooltrain_model::load(from, dtype, device)
        .with_context(|| format!("loading checkpoint {}", from.display()))?;
    if lora.enabled() {
        ck.model.add_lora(lora, seed)?;
        if let Some(dir) = resumed {
            let a = dir.join(ADAPTER_DIR);
            ck.model
                .load_adapter(&a)
                .with_context(|| format!("loading the adapters {}", a.display()))?;
        }
    }
    Ok(ck)
}

/// Writes `model` into `dir` as a HF checkpoint (merged weights when it has adapters) and,
/// with adapters, the PEFT directory `dir/adapter/` (whose config names `base`).
pub fn save_model(
    model: &tooltrain_model::CausalLM,
    tokenizer: Option<&tooltrain_model::Tokenizer>,
    dir: &Path,
    base: &Path,
) -> Result<()> {
    tooltrain_model::save(model, tokenizer, dir)?;
    if model.lora_config().is_some() {
        model.save_adapter(&base.display().to_string(), &dir.join(ADAPTER_DIR))?;
    }
    Ok(())
}

/// The error that ends a run after too many skipped steps (`what` says which step and
/// why); names the last good checkpoint under `run`.
pub fn diverged(run: &RunDir, what: &str) -> anyhow::Error {
    let last = latest_checkpoint(&run.path().join("checkpoints"))
        .ok()
        .flatten();
    anyhow::anyhow!(
        "the run diverged: {what}; stopped without saving. Last good checkpoint: {}. Lower \
         `lr`, or raise `max_bad_steps` to skip more such steps",
        last.map_or_else(|| "none".to_string(), |p| p.display().to_string())
    )
}

/// Name of the file in a checkpoint that holds the trainer's state.
pub const STATE_FILE: &str = "state.json";

/// An opened output directory (see the module docs).
pub struct RunDir {
    out: PathBuf,
    ckpt_root: PathBuf,
    resumed: Option<PathBuf>,
    cfg_toml: String,
    keep: usize,
    _lock: RunLock,
}

impl RunDir {
    /// Locks `out` for `command` and finds where the run starts. Without `resume`, a
    /// directory that already holds checkpoints is an error (a run never overwrites
    /// another unnoticed); with it, the latest checkpoint is continued (a fresh start
    /// when there is none), after checking that `cfg` equals the checkpoint's config in
    /// every key but `free_keys`.
    pub fn open<C: Serialize>(
        out: &Path,
        cfg: &C,
        resume: bool,
        free_keys: &[&str],
        command: &str,
    ) -> Result<RunDir> {
        let lock = RunLock::acquire(out, command).map_err(anyhow::Error::msg)?;
        let ckpt_root = out.join("checkpoints");
        std::fs::create_dir_all(&ckpt_root)
            .with_context(|| format!("creating {}", ckpt_root.display()))?;
        remove_stale_tmp(&ckpt_root)?;
        let existing = latest_checkpoint(&ckpt_root)?;
        if let (false, Some(ck)) = (resume, &existing) {
            bail!(
                "{} already holds checkpoints (latest {}): pass --resume to continue that run, \
                 or choose another output_dir",
                ckpt_root.display(),
                ck.display()
            );
        }
        if resume && existing.is_none() {
            tracing::info!("no checkpoint in {}: starting fresh", ckpt_root.display());
        }
        if let Some(ck) = &existing {
            check_resume(
                &ck.join("config.toml"),
                cfg,
                free_keys,
                &ck.display().to_string(),
            )?;
        }
        Ok(RunDir {
            out: out.to_path_buf(),
            ckpt_root,
            resumed: existing,
            cfg_toml: crate::config::to_toml(cfg)?,
            keep: 0,
            _lock: lock,
        })
    }

    /// Keep the newest `keep` checkpoints (0: all).
    pub fn keep_checkpoints(mut self, keep: usize) -> Self {
        self.keep = keep;
        self
    }

    /// The output directory.
    pub fn path(&self) -> &Path {
        &self.out
    }

    /// The checkpoint this run continues, if it resumes one.
    pub fn resumed(&self) -> Option<&Path> {
        self.resumed.as_deref()
    }

    /// The trainer state saved in the resumed checkpoint.
    pub fn resumed_state<S: DeserializeOwned>(&self) -> Result<Option<S>> {
        let Some(ck) = &self.resumed else {
            return Ok(None);
        };
        let p = ck.join(STATE_FILE);
        let text =
            std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?;
        Ok(Some(
            serde_json::from_str(&text).with_context(|| p.display().to_string())?,
        ))
    }

    /// Writes `config.toml` and opens `metrics.jsonl`: empty for a fresh run, cut back
    /// to the lines up to `resumed_at` (the checkpoint's step) for a resumed one.
    pub fn start(&self, resumed_at: Option<u64>) -> Result<Metrics> {
        write_file(&self.out.join("config.toml"), self.cfg_toml.as_bytes())?;
        Metrics::open(&self.out.join("metrics.jsonl"), resumed_at)
    }

    /// Writes checkpoint `step-N` atomically: `write` fills the directory (model,
    /// optimizer), then the trainer `state` and the config are added, the directory is
    /// renamed into place, `latest` points at it, and old checkpoints are pruned (and
    /// any later ones, left by an abandoned trajectory).
    pub fn save_checkpoint<S: Serialize>(
        &self,
        step: u64,
        state: &S,
        write: impl FnOnce(&Path) -> Result<()>,
    ) -> Result<PathBuf> {
        let root = &self.ckpt_root;
        let name = format!("step-{step}");
        let tmp = root.join(format!("{name}.tmp"));
        remove_dir_if_exists(&tmp)?;
        std::fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        write(&tmp)?;
        let st = serde_json::to_string_pretty(state).context("trainer state to JSON")?;
        write_file(&tmp.join(STATE_FILE), st.as_bytes())?;
        write_file(&tmp.join("config.toml"), self.cfg_toml.as_bytes())?;
        let dir = root.join(&name);
        remove_dir_if_exists(&dir)?;
        std::fs::rename(&tmp, &dir).with_context(|| format!("renaming {}", tmp.display()))?;
        write_file(&root.join("latest"), format!("{name}\n").as_bytes())?;
        let all = list_checkpoints(root)?;
        let older: Vec<&(u64, PathBuf)> = all.iter().filter(|(s, _)| *s <= step).collect();
        let cut = if self.keep == 0 {
            0
        } else {
            older.len().saturating_sub(self.keep)
        };
        let doomed = older[..cut]
            .iter()
            .map(|(_, p)| p)
            .chain(all.iter().filter(|(s, _)| *s > step).map(|(_, p)| p));
        for p in doomed {
            std::fs::remove_dir_all(p).with_context(|| format!("removing {}", p.display()))?;
        }
        Ok(dir)
    }

    /// Writes `OUT/final` (via `final.tmp` and a rename); `write` fills the directory.
    pub fn export_final(&self, write: impl FnOnce(&Path) -> Result<()>) -> Result<PathBuf> {
        let dir = self.out.join("final");
        let tmp = self.out.join("final.tmp");
        remove_dir_if_exists(&tmp)?;
        write(&tmp)?;
        remove_dir_if_exists(&dir)?;
        std::fs::rename(&tmp, &dir).with_context(|| format!("renaming {}", tmp.display()))?;
        Ok(dir)
    }
}

/// Appends one JSON object a line to `metrics.jsonl`, flushed after each.
pub struct Metrics {
    file: std::fs::File,
    path: PathBuf,
}

impl Metrics {
    /// Opens `path`: emptied when `resumed_at` is `None`, else keeping the lines whose
    /// `step` is at most `resumed_at` (later ones were written after the checkpoint and
    /// will be redone; a line cut short by a crash is dropped).
    pub fn open(path: &Path, resumed_at: Option<u64>) -> Result<Metrics> {
        let kept = match resumed_at {
            None => String::new(),
            Some(step) => {
                let text = match std::fs::read_to_string(path) {
                    Ok(t) => t,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
                    Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
                };
                let mut kept = String::new();
                for line in text.lines() {
                    let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
                        continue;
                    };
                    if v.get("step")
                        .and_then(|s| s.as_u64())
                        .is_some_and(|s| s <= step)
                    {
                        kept.push_str(line);
                        kept.push('\n');
                    }
                }
                kept
            }
        };
        write_file(path, kept.as_bytes())?;
        let file = std::fs::OpenOptions::new()
            .append(true)
            .open(path)
            .with_context(|| format!("opening {}", path.display()))?;
        Ok(Metrics {
            file,
            path: path.to_path_buf(),
        })
    }

    /// Appends `line` (a flat JSON object with a `step` key).
    pub fn log<T: Serialize>(&mut self, line: &T) -> Result<()> {
        let text = serde_json::to_string(line).context("metrics to JSON")?;
        writeln!(self.file, "{text}")
            .and_then(|()| self.file.flush())
            .with_context(|| format!("writing {}", self.path.display()))
    }
}

/// The newest complete checkpoint under `root`: the one `latest` names, else the highest
/// `step-N` that has a state file.
pub fn latest_checkpoint(root: &Path) -> Result<Option<PathBuf>> {
    let latest = root.join("latest");
    if latest.exists() {
        let name = std::fs::read_to_string(&latest)
            .with_context(|| format!("reading {}", latest.display()))?;
        let dir = root.join(name.trim());
        if !dir.join(STATE_FILE).exists() {
            bail!(
                "{} names {}, which is not a complete checkpoint",
                latest.display(),
                dir.display()
            );
        }
        return Ok(Some(dir));
    }
    Ok(list_checkpoints(root)?
        .into_iter()
        .rev()
        .map(|(_, p)| p)
        .find(|p| p.join(STATE_FILE).exists()))
}

/// `(step, dir)` of every `step-N` directory, ascending.
pub fn list_checkpoints(root: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let mut v = Vec::new();
    for e in std::fs::read_dir(root).with_context(|| format!("listing {}", root.display()))? {
        let e = e?;
        let name = e.file_name().to_string_lossy().into_owned();
        if let Some(n) = name
            .strip_prefix("step-")
            .and_then(|s| s.parse::<u64>().ok())
        {
            if e.path().is_dir() {
                v.push((n, e.path()));
            }
        }
    }
    v.sort();
    Ok(v)
}

/// Removes `*.tmp` leftovers of checkpoints a crash interrupted.
fn remove_stale_tmp(root: &Path) -> Result<()> {
    for e in std::fs::read_dir(root).with_context(|| format!("listing {}", root.display()))? {
        let p = e?.path();
        if p.is_dir() && p.extension().is_some_and(|x| x == "tmp") {
            std::fs::remove_dir_all(&p).with_context(|| format!("removing {}", p.display()))?;
        }
    }
    Ok(())
}

fn remove_dir_if_exists(p: &Path) -> Result<()> {
    if p.exists() {
        std::fs::remove_dir_all(p).with_context(|| format!("removing {}", p.display()))?;
    }
    Ok(())
}

/// [`tooltrain_util::write_atomic`] with the path in the error.
fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    tooltrain_util::write_atomic(path, bytes).with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Serialize, Deserialize, PartialEq, Debug)]
    struct Cfg {
        lr: f64,
        output_dir: String,
    }

    #[derive(Serialize, Deserialize, PartialEq, Debug)]
    struct St {
        step: u64,
    }

    fn save(run: &RunDir, step: u64) -> PathBuf {
        run.save_checkpoint(step, &St { step }, |d| {
            std::fs::write(d.join("weights"), step.to_string())?;
            Ok(())
        })
        .unwrap()
    }

    #[test]
    fn fresh_save_prune_resume_and_refusals() {
        let d = tempfile::tempdir().unwrap();
        let out = d.path().join("run");
        let cfg = Cfg {
            lr: 0.1,
            output_dir: "a".into(),
        };
        let run = RunDir::open(&out, &cfg, false, &["output_dir"], "t")
            .unwrap()
            .keep_checkpoints(2);
        assert!(run.resumed().is_none());
        let mut m = run.start(None).unwrap();
        for s in 1..=3 {
            m.log(&serde_json::json!({"step": s})).unwrap();
            save(&run, s);
        }
        // A second run on the same directory while the first holds it.
        let e = RunDir::open(&out, &cfg, true, &[], "t2")
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("in use by `t`"), "{e}");
        drop(run);
        let steps: Vec<u64> = list_checkpoints(&out.join("checkpoints"))
            .unwrap()
            .iter()
            .map(|x| x.0)
            .collect();
        assert_eq!(steps, vec![2, 3]);
        // Without resume: refused. With a changed key: refused. Free key: fine.
        let e = RunDir::open(&out, &cfg, false, &[], "t")
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("--resume"), "{e}");
        let e = RunDir::open(&out, &Cfg { lr: 0.2, ..cfg }, true, &["output_dir"], "t")
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("lr: 0.1 -> 0.2"), "{e}");
        let cfg2 = Cfg {
            lr: 0.1,
            output_dir: "b".into(),
        };
        // A crash left a temp checkpoint: removed on open.
        std::fs::create_dir_all(out.join("checkpoints/step-9.tmp")).unwrap();
        std::fs::write(
            out.join("metrics.jsonl"),
            "{\"step\":1}\n{\"step\":2}\n{\"step\":3}\n{\"st",
        )
        .unwrap();
        let run = RunDir::open(&out, &cfg2, true, &["output_dir"], "t").unwrap();
        assert!(!out.join("checkpoints/step-9.tmp").exists());
        assert!(run.resumed().unwrap().ends_with("step-3"));
        let st: St = run.resumed_state().unwrap().unwrap();
        assert_eq!(st, St { step: 3 });
        let _m = run.start(Some(2)).unwrap();
        assert_eq!(
            std::fs::read_to_string(out.join("metrics.jsonl")).unwrap(),
            "{\"step\":1}\n{\"step\":2}\n"
        );
        // Saving step 2 again (a resumed earlier trajectory) drops the later step 3.
        save(&run, 2);
        let steps: Vec<u64> = list_checkpoints(&out.join("checkpoints"))
            .unwrap()
            .iter()
            .map(|x| x.0)
            .collect();
        assert_eq!(steps, vec![2]);
        assert_eq!(
            std::fs::read_to_string(out.join("checkpoints/latest")).unwrap(),
            "step-2\n"
        );
        let f = run
            .export_final(|d| {
                std::fs::create_dir_all(d)?;
                std::fs::write(d.join("model"), "m")?;
                Ok(())
            })
            .unwrap();
        assert_eq!(std::fs::read_to_string(f.join("model")).unwrap(), "m");
        assert!(!out.join("final.tmp").exists());
    }
}

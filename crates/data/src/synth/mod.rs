//! Seeded synthetic localisation tasks (`tooltrain synth`): small Python packages with a
//! planted bug, a GitHub-style bug report, the gold patch that fixes it and the
//! ground-truth locations, in the format of the real benchmark data (SWE-bench JSONL,
//! RepoDeepSearch `gt_verified.json`, one source tree per instance id), small enough that
//! a tiny model can learn the task on a CPU.
//!
//! | file | what it holds |
//! |---|---|
//! | `mod.rs` | [`SynthConfig`] and its checks, [`SynthError`], [`Task`], [`Summary`], [`generate`], [`generate_opts`] |
//! | `output.rs` | the output directory: what may be replaced, the atomic write |
//! | `task.rs` | [`make_task`]: the steps from `(config, seed, index)` to a [`Task`] |
//! | `names.rs` | the domains' word lists; identifier and wording helpers |
//! | `recipes/` | the 12 recipe bodies, each with its bug and symptom (`raising.rs`, `values.rs`) |
//! | `model.rs` | the repository model: modules, classes, definitions |
//! | `builder.rs` | building the package from recipes; finding and inserting definitions |
//! | `decoys.rs`, `wrappers.rs` | look-alikes of GT definitions; public wrappers that call them |
//! | `render.rs` | source text: modules (base and fixed), tests, `__init__.py`, `errors.py`, `setup.py` |
//! | `report.rs` | the bug report |
//! | `patch.rs` | git blob ids, the gold diff writer, [`apply_patch`] |
//! | `check.rs` | [`check_task`]: the consistency check every generated task passes |
//!
//! A task is a function of `(config, seed, index)` only ([`make_task`]): the same inputs
//! give byte-identical output on every machine with this crate's locked dependencies (the
//! RNG is `rand`'s `StdRng`, whose stream may change with a `rand` major version).
//!
//! What a task holds:
//! - a package `<pkg>/` of `files` modules (word lists of 8 domains: inventory, billing,
//!   parsing, geometry, scheduling, shipping, weather, library), each with
//!   `classes_per_file` classes (`__init__`, sometimes `__repr__`, and
//!   `methods_per_class` methods) and `functions_per_file` module functions, plus
//!   `<pkg>/__init__.py` (re-exports), `<pkg>/errors.py`, `setup.py` and up to two
//!   `tests/test_<module>.py` files. Bodies come from 12 small recipes (limit check,
//!   case-insensitive lookup, required fields, wrap-around index, sum, percentage,
//!   `key=value` parsing, pagination, clamping, top-n, counting, average), each with a
//!   docstring and error messages that name the domain's nouns;
//! - `gt_min..=gt_max` planted one-line bugs, each in a different method or function;
//!   the gold patch replaces each buggy line by the original (3 lines of context, git
//!   headers, real blob ids), so [`tooltrain_rollout::gt::locations_from_patch`] derives
//!   exactly the ground truth by the rules of docs/reposearcher.md §1 (checked by
//!   [`check_task`] for every generated task);
//! - `decoys` definitions per task that look like a ground-truth location: the same
//!   method name in another class, the same class name in another module, the same
//!   function name in another module, or a similar name (`parse_zone_options` vs
//!   `parse_zone_options_strict`), usually with the same recipe, so the same error
//!   message shape;
//! - with probability `indirect_prob` per ground-truth location, the report calls a
//!   public wrapper in another module that calls the buggy code, so the location is
//!   one hop away from what the report names;
//! - the bug report: title, description, a reproduction snippet calling the public API
//!   with concrete arguments, expected vs actual result (the exception message that is
//!   literally in the buggy body, or the wrong value), an environment section. Each
//!   explicit pointer to the location (a module import path instead of a package-level
//!   import, a traceback whose frames name the file and function, a remark naming the
//!   file) appears with probability `mention_prob`.
//!
//! [`generate`] writes `dataset.jsonl`, `gt.json`, `config.json` and `repos/<instance_id>/`
//! into a temporary sibling directory and renames it into place.

mod builder;
mod check;
mod decoys;
mod model;
mod names;
mod output;
mod patch;
mod recipes;
mod render;
mod report;
mod task;
mod wrappers;

pub use check::check_task;
pub use patch::apply_patch;
pub use task::make_task;

use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use tooltrain_rollout::dataset::Instance;

/// Generation settings (difficulty knobs). Loadable from JSON; unknown fields are
/// rejected, missing ones take the [`Default`] values.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SynthConfig {
    /// Number of tasks.
    pub n: usize,
    /// Master seed; task `i` uses a seed derived from `(seed, i)`.
    pub seed: u64,
    /// Modules in the package (besides `__init__.py` and `errors.py`), 1..=10.
    pub files: usize,
    /// Classes per module.
    pub classes_per_file: usize,
    /// Methods per class, besides `__init__` (and sometimes `__repr__`).
    pub methods_per_class: usize,
    /// Module-level functions per module.
    pub functions_per_file: usize,
    /// Look-alike definitions added per task (spread over the GT locations).
    pub decoys: usize,
    /// Fewest ground-truth locations (planted bugs) per task.
    pub gt_min: usize,
    /// Most ground-truth locations per task.
    pub gt_max: usize,
    /// Probability of each explicit pointer to a GT location in the report (module
    /// import path, traceback frames, a remark naming the file).
    pub mention_prob: f64,
    /// Probability that the report calls a public wrapper in another module instead of
    /// the buggy definition itself.
    pub indirect_prob: f64,
    /// Owner part of `repo` and prefix of `instance_id` (`<prefix>__<pkg>-00042`).
    pub prefix: String,
}

impl Default for SynthConfig {
    fn default() -> Self {
        SynthConfig {
            n: 100,
            seed: 0,
            files: 4,
            classes_per_file: 2,
            methods_per_class: 3,
            functions_per_file: 2,
            decoys: 2,
            gt_min: 1,
            gt_max: 2,
            mention_prob: 0.5,
            indirect_prob: 0.3,
            prefix: "synth".into(),
        }
    }
}

/// Most modules a package may have (the smallest domain module list).
pub const MAX_FILES: usize = 10;

impl SynthConfig {
    /// Checks the knobs; the message names the offending field.
    pub fn validate(&self) -> Result<(), SynthError> {
        let bad = |m: String| Err(SynthError::Config(m));
        if self.files == 0 || self.files > MAX_FILES {
            return bad(format!(
                "files must be in 1..={MAX_FILES}, got {}",
                self.files
            ));
        }
        if self.classes_per_file > 8 || self.methods_per_class > 12 || self.functions_per_file > 12
        {
            return bad(format!(
                "at most 8 classes_per_file, 12 methods_per_class and 12 functions_per_file \
                 (got {}, {}, {})",
                self.classes_per_file, self.methods_per_class, self.functions_per_file
            ));
        }
        if self.classes_per_file > 0 && self.methods_per_class == 0 {
            return bad("methods_per_class must be at least 1 when classes_per_file > 0".into());
        }
        let defs =
            self.files * (self.classes_per_file * self.methods_per_class + self.functions_per_file);
        if defs == 0 {
            return bad(
                "classes_per_file and functions_per_file are both 0: no definitions".into(),
            );
        }
        if self.gt_min == 0 || self.gt_min > self.gt_max || self.gt_max > 5 {
            return bad(format!(
                "need 1 <= gt_min <= gt_max <= 5, got gt_min {} gt_max {}",
                self.gt_min, self.gt_max
            ));
        }
        if self.gt_max > defs {
            return bad(format!(
                "gt_max {} exceeds the {defs} methods and functions a task has",
                self.gt_max
            ));
        }
        if self.decoys > 20 {
            return bad(format!("decoys must be at most 20, got {}", self.decoys));
        }
        for (name, p) in [
            ("mention_prob", self.mention_prob),
            ("indirect_prob", self.indirect_prob),
        ] {
            if !(0.0..=1.0).contains(&p) {
                return bad(format!("{name} must be in [0, 1], got {p}"));
            }
        }
        let ok = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '.';
        if self.prefix.is_empty() || self.prefix.starts_with('.') || !self.prefix.chars().all(ok) {
            return bad(format!(
                "prefix must be non-empty, not start with '.', and use only [A-Za-z0-9_.-], got {:?}",
                self.prefix
            ));
        }
        Ok(())
    }
}

/// Error of [`generate`].
#[derive(Debug, thiserror::Error)]
pub enum SynthError {
    #[error("invalid synth config: {0}")]
    Config(String),
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Output(String),
    /// A generated task failed its self-check (a generator bug).
    #[error("task {id} failed its consistency check: {msg}")]
    Check { id: String, msg: String },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> SynthError + '_ {
    move |source| SynthError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// One file of a task's repository.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceFile {
    /// Repository-relative path with `/` separators.
    pub path: String,
    pub text: String,
}

/// One generated task.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Task {
    /// The dataset row (`instance_id`, `repo`, `base_commit`, `problem_statement`, `patch`).
    pub instance: Instance,
    /// Ground-truth locations `path.py::Class.method` / `path.py::function`, in the order
    /// [`locations_from_patch`] derives them (files by path, then by line).
    pub gt: Vec<String>,
    /// The repository at the base commit, sorted by path.
    pub files: Vec<SourceFile>,
    /// Look-alike definitions (`path.py::name`), for analysis.
    pub decoys: Vec<String>,
    /// The public callable the report uses for each GT location (`Class.method`,
    /// `function`, or a wrapper's name), in GT order.
    pub entry_points: Vec<String>,
}

/// What [`generate`] wrote.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    pub out_dir: PathBuf,
    pub tasks: usize,
    pub python_files: usize,
    pub gt_locations: usize,
    pub decoys: usize,
    pub mean_problem_chars: f64,
    pub mean_python_lines: f64,
}

impl Summary {
    fn of(out_dir: &Path, tasks: &[Task]) -> Summary {
        let n = tasks.len().max(1) as f64;
        Summary {
            out_dir: out_dir.to_path_buf(),
            tasks: tasks.len(),
            python_files: tasks
                .iter()
                .map(|t| t.files.iter().filter(|f| f.path.ends_with(".py")).count())
                .sum(),
            gt_locations: tasks.iter().map(|t| t.gt.len()).sum(),
            decoys: tasks.iter().map(|t| t.decoys.len()).sum(),
            mean_problem_chars: tasks
                .iter()
                .map(|t| t.instance.problem_statement.len() as f64)
                .sum::<f64>()
                / n,
            mean_python_lines: tasks
                .iter()
                .flat_map(|t| &t.files)
                .map(|f| f.text.lines().count() as f64)
                .sum::<f64>()
                / n,
        }
    }
}

/// Writes `cfg.n` tasks into `out_dir` (see the module documentation); fails if
/// `out_dir` exists and is not empty.
pub fn generate(cfg: &SynthConfig, out_dir: &Path) -> Result<Summary, SynthError> {
    generate_opts(cfg, out_dir, false)
}

/// [`generate`]; with `overwrite`, a previous synth output in `out_dir` (a directory
/// holding `dataset.jsonl`) is replaced. Every task passes [`check_task`] before
/// anything is written.
pub fn generate_opts(
    cfg: &SynthConfig,
    out_dir: &Path,
    overwrite: bool,
) -> Result<Summary, SynthError> {
    cfg.validate()?;
    let _lock = output::lock_and_clean(out_dir)?;
    let replace = output::check_out_dir(out_dir, overwrite)?;
    let tasks: Vec<Task> = (0..cfg.n)
        .into_par_iter()
        .map(|i| make_task(cfg, i))
        .collect();
    tasks.par_iter().try_for_each(|t| {
        check_task(t).map_err(|msg| SynthError::Check {
            id: t.instance.instance_id.clone(),
            msg,
        })
    })?;
    output::install(cfg, &tasks, out_dir, replace)?;
    Ok(Summary::of(out_dir, &tasks))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tooltrain_rollout::dataset::load_dataset;
    use tooltrain_rollout::gt::{locations_from_patch, GroundTruth};
    use tooltrain_rollout::index::RepoIndex;

    fn cfg() -> SynthConfig {
        SynthConfig::default()
    }

    #[test]
    fn invalid_configs_are_rejected() {
        for c in [
            SynthConfig { files: 0, ..cfg() },
            SynthConfig { files: 11, ..cfg() },
            SynthConfig {
                gt_min: 3,
                gt_max: 2,
                ..cfg()
            },
            SynthConfig { gt_min: 0, ..cfg() },
            SynthConfig {
                mention_prob: 1.5,
                ..cfg()
            },
            SynthConfig {
                classes_per_file: 0,
                functions_per_file: 0,
                ..cfg()
            },
            SynthConfig {
                prefix: "a/b".into(),
                ..cfg()
            },
            SynthConfig {
                files: 1,
                classes_per_file: 0,
                functions_per_file: 1,
                gt_min: 2,
                gt_max: 2,
                ..cfg()
            },
        ] {
            assert!(c.validate().is_err(), "{c:?}");
        }
        let e = serde_json::from_str::<SynthConfig>(r#"{"n": 3, "bogus": 1}"#).unwrap_err();
        assert!(e.to_string().contains("bogus"), "{e}");
        let c: SynthConfig = serde_json::from_str(r#"{"n": 3}"#).unwrap();
        assert_eq!(c, SynthConfig { n: 3, ..cfg() });
    }

    #[test]
    fn generate_writes_loadable_files_atomically() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        let c = SynthConfig { n: 6, ..cfg() };
        let s = generate(&c, &out).unwrap();
        assert_eq!(s.tasks, 6);
        let ds = load_dataset(&out.join("dataset.jsonl")).unwrap();
        let gt = GroundTruth::load(&out.join("gt.json")).unwrap();
        assert_eq!(ds.len(), 6);
        for inst in &ds {
            let locs = gt.get(&inst.instance_id).unwrap();
            let idx = RepoIndex::build(&out.join("repos").join(&inst.instance_id));
            let derived = locations_from_patch(&inst.patch, &idx).unwrap();
            assert_eq!(derived, locs);
        }
        // No temp directories are left beside the output (only the lock file).
        let mut names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, [".out.synth.lock", "out"]);
        // A non-empty output is not replaced without `overwrite`, and is with it.
        assert!(generate(&c, &out).is_err());
        let c2 = SynthConfig { n: 2, ..c };
        generate_opts(&c2, &out, true).unwrap();
        assert_eq!(load_dataset(&out.join("dataset.jsonl")).unwrap().len(), 2);
        // Never replace a directory that is not a synth output.
        let other = dir.path().join("other");
        std::fs::create_dir(&other).unwrap();
        std::fs::write(other.join("keep.txt"), "x").unwrap();
        assert!(generate_opts(&c2, &other, true).is_err());
        assert!(other.join("keep.txt").exists());
    }
}

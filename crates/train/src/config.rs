//! Layered TOML configs shared by every command that takes `--config`: a base file,
//! then `--set key.path=value` overrides (the value is parsed as TOML: `--set lr=1e-5`,
//! `--set policy.kind="bm25"` or `--set policy.kind=bm25`, `--set instances=["a","b"]`),
//! deserialised into a typed config whose structs deny unknown keys. Errors name the
//! file and the key path (`policy.bm25.k3: unknown field ...`). Relative paths in a
//! config are relative to the working directory.
//!
//! A trainer resuming a run compares its config with the checkpoint's
//! ([`resume_conflicts`]): keys that change the run's trajectory must be equal.

use anyhow::{anyhow, bail, Context, Result};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::path::Path;
use toml::{Table, Value};

/// Options every config-driven command takes.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct ConfigArgs {
    /// The TOML config file.
    #[arg(long, value_name = "FILE")]
    pub config: Option<std::path::PathBuf>,
    /// Override a key of the config: `--set episode.max_turns=5` (repeatable; applied in
    /// order, after the file).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// Print the resolved config as TOML and exit.
    #[arg(long)]
    pub print_config: bool,
}

/// The command line of a trainer binary (`train-sft`, `train-rl`).
#[derive(clap::Args, Debug, Clone, Default)]
pub struct TrainerArgs {
    #[command(flatten)]
    pub config: ConfigArgs,
    /// Continue from `output_dir/checkpoints/latest` (a fresh start when there is none).
    #[arg(long)]
    pub resume: bool,
    /// No progress output (a bar on a terminal; periodic lines otherwise).
    #[arg(long)]
    pub no_progress: bool,
    /// Log filter (e.g. `info`, `debug`); overrides RUST_LOG. Default: RUST_LOG, else `info`.
    #[arg(long, value_name = "FILTER")]
    pub log_level: Option<String>,
}

impl TrainerArgs {
    /// The `main` of a trainer binary: sets up logging, runs `run` with the typed config
    /// (or prints it with `--print-config`), and turns an error into exit status 1.
    pub fn main<C: DeserializeOwned + Serialize>(
        self,
        run: impl FnOnce(C, &TrainerArgs) -> Result<std::process::ExitCode>,
    ) -> std::process::ExitCode {
        use std::process::ExitCode;
        if let Err(e) = tooltrain_util::init_logging(self.log_level.as_deref(), "info") {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
        let res = load::<C>(self.config.config.as_deref(), &self.config.set).and_then(|cfg| {
            if self.config.print_config {
                print!("{}", to_toml(&cfg)?);
                return Ok(ExitCode::SUCCESS);
            }
            run(cfg, &self)
        });
        res.unwrap_or_else(|e| {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        })
    }
}

/// Parses `value` as a TOML value; a bare word that is not valid TOML is a string.
fn parse_value(value: &str) -> Value {
    match toml::from_str::<Table>(&format!("v = {value}")) {
        Ok(mut t) => t.remove("v").unwrap_or(Value::String(value.to_string())),
        Err(_) => Value::String(value.to_string()),
    }
}

/// Sets `path` (dotted) in `table` to `value`, creating tables on the way.
pub fn set_path(table: &mut Table, path: &str, value: Value) -> Result<()> {
    let parts: Vec<&str> = path.split('.').collect();
    if parts.iter().any(|p| p.trim().is_empty()) {
        bail!("--set {path}: empty key component");
    }
    let mut cur = table;
    for (i, p) in parts.iter().enumerate() {
        if i + 1 == parts.len() {
            cur.insert(p.to_string(), value);
            return Ok(());
        }
        let entry = cur
            .entry(p.to_string())
            .or_insert_with(|| Value::Table(Table::new()));
        cur = match entry {
            Value::Table(t) => t,
            other => bail!(
                "--set {path}: `{}` is a {} in the config, not a table",
                parts[..=i].join("."),
                other.type_str()
            ),
        };
    }
    Ok(())
}

/// The merged TOML table: the file (if any), then each `KEY=VALUE` override.
pub fn layered_table(file: Option<&Path>, sets: &[String]) -> Result<Table> {
    let mut table = match file {
        Some(p) => {
            let text = std::fs::read_to_string(p)
                .with_context(|| format!("reading config {}", p.display()))?;
            toml::from_str::<Table>(&text).map_err(|e| anyhow!("config {}: {e}", p.display()))?
        }
        None => Table::new(),
    };
    for s in sets {
        let (k, v) = s
            .split_once('=')
            .ok_or_else(|| anyhow!("--set {s:?}: expected KEY=VALUE"))?;
        set_path(&mut table, k.trim(), parse_value(v.trim()))?;
    }
    Ok(table)
}

/// Deserialises the layered config into `T`, naming the key path on error.
pub fn load<T: DeserializeOwned>(file: Option<&Path>, sets: &[String]) -> Result<T> {
    let table = layered_table(file, sets)?;
    let origin = file
        .map(|p| format!("config {}", p.display()))
        .unwrap_or_else(|| "config".into());
    let de = Value::Table(table);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if path == "." || path.is_empty() {
            anyhow!("{origin}: {inner}")
        } else {
            anyhow!("{origin}: {path}: {inner}")
        }
    })
}

/// The resolved config as TOML text.
pub fn to_toml<T: Serialize>(cfg: &T) -> Result<String> {
    toml::to_string_pretty(cfg).map_err(|e| anyhow!("printing the config: {e}"))
}

/// The keys (top level) in which `saved` and `now` differ, ignoring `free` keys, as
/// `key: old -> new` lines; empty when a run with `now` continues one with `saved`.
pub fn resume_conflicts(saved: &Table, now: &Table, free: &[&str]) -> Vec<String> {
    let mut keys: Vec<&String> = saved.keys().chain(now.keys()).collect();
    keys.sort();
    keys.dedup();
    let show = |v: Option<&Value>| v.map_or("(unset)".to_string(), |v| v.to_string());
    keys.into_iter()
        .filter(|k| !free.contains(&k.as_str()) && saved.get(*k) != now.get(*k))
        .map(|k| format!("{k}: {} -> {}", show(saved.get(k)), show(now.get(k))))
        .collect()
}

/// Fails unless `now` would continue the run whose config is in `path` (see
/// [`resume_conflicts`]); `what` names the run in the message.
pub fn check_resume<T: Serialize>(path: &Path, now: &T, free: &[&str], what: &str) -> Result<()> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let saved: Table =
        toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    let now = Table::try_from(now).map_err(|e| anyhow!("config to TOML: {e}"))?;
    let differ = resume_conflicts(&saved, &now, free);
    if !differ.is_empty() {
        bail!(
            "cannot resume {what}: the config differs from the one it was started with in keys \
             that change the run ({}); only {} may change",
            differ.join(", "),
            if free.is_empty() {
                "nothing".to_string()
            } else {
                free.join(", ")
            }
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Deserialize, Serialize, Default, PartialEq)]
    #[serde(deny_unknown_fields, default)]
    struct Inner {
        k1: f64,
        name: String,
    }

    #[derive(Debug, Deserialize, Serialize, Default, PartialEq)]
    #[serde(deny_unknown_fields, default)]
    struct Outer {
        steps: usize,
        inner: Inner,
        list: Vec<String>,
    }

    #[test]
    fn layers_and_names_bad_keys() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("c.toml");
        std::fs::write(&f, "steps = 3\n[inner]\nk1 = 1.5\n").unwrap();
        let c: Outer = load(
            Some(&f),
            &[
                "inner.name=bm25".into(),
                "steps=7".into(),
                "list=[\"a\", \"b\"]".into(),
            ],
        )
        .unwrap();
        assert_eq!(
            c,
            Outer {
                steps: 7,
                inner: Inner {
                    k1: 1.5,
                    name: "bm25".into()
                },
                list: vec!["a".into(), "b".into()]
            }
        );
        let e = load::<Outer>(Some(&f), &["inner.k3=1".into()])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("inner.k3") || (e.contains("inner") && e.contains("k3")),
            "{e}"
        );
        assert!(e.contains("unknown field"), "{e}");
        let e = load::<Outer>(Some(&f), &["steps=-1".into()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("steps"), "{e}");
        let e = load::<Outer>(Some(&f), &["steps.x=1".into()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("`steps` is a integer"), "{e}");
        let e = load::<Outer>(Some(&f), &["nokey".into()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("KEY=VALUE"), "{e}");
        // The printed config parses back to the same value.
        let back: Outer = toml::from_str(&to_toml(&c).unwrap()).unwrap();
        assert_eq!(back, c);
    }

    #[test]
    fn resume_conflicts_name_changed_keys_but_not_free_ones() {
        let a: Table = toml::from_str("lr = 1e-5\nout = \"a\"\nsteps = 3").unwrap();
        let b: Table = toml::from_str("lr = 2e-5\nout = \"b\"\nseed = 1\nsteps = 3").unwrap();
        assert_eq!(
            resume_conflicts(&a, &b, &["out"]),
            vec![
                "lr: 0.00001 -> 0.00002".to_string(),
                "seed: (unset) -> 1".to_string()
            ]
        );
        assert!(resume_conflicts(&a, &a, &[]).is_empty());
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("config.toml");
        std::fs::write(&p, "steps = 3\n[inner]\nk1 = 1.0\nname = \"\"\nlist = []\n").unwrap();
        let now = Outer {
            steps: 3,
            ..Default::default()
        };
        let e = check_resume(&p, &now, &[], "run x")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("cannot resume run x") && e.contains("inner"),
            "{e}"
        );
    }
}

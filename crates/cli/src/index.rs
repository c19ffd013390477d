//! `tooltrain index`: index a Python repository (`docs/reposearcher.md` §2) and print it as JSON:
//! `{"files": [{"path", "classes": [{"name", "start_line", "end_line", "methods": [...]}],
//! "functions": [...]}]}` (1-based inclusive lines, `def`/`class` line first).

use anyhow::{bail, Context, Result};
use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;
use tooltrain_rollout::RepoIndex;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Root directory of the Python repository.
    #[arg(long, value_name = "DIR")]
    pub repo: PathBuf,
    /// Write the JSON here (atomically: temp file, then rename); stdout when absent.
    #[arg(long, value_name = "FILE")]
    pub output: Option<PathBuf>,
}

pub fn run(args: Args) -> Result<()> {
    let repo = &args.repo;
    if !repo.exists() {
        bail!("repository directory {} does not exist", repo.display());
    }
    if !repo.is_dir() {
        bail!("repository path {} is not a directory", repo.display());
    }
    let t0 = Instant::now();
    let idx = RepoIndex::build(repo);
    let secs = t0.elapsed().as_secs_f64();
    let n_classes: usize = idx.files.iter().map(|f| f.classes.len()).sum();
    let n_methods: usize = idx
        .files
        .iter()
        .flat_map(|f| &f.classes)
        .map(|c| c.methods.len())
        .sum();
    let n_funcs: usize = idx.files.iter().map(|f| f.functions.len()).sum();
    let json = serde_json::to_string(&idx).context("serialise the index")?;
    match &args.output {
        Some(out) => {
            let tmp = out.with_extension("tmp-index");
            std::fs::write(&tmp, json.as_bytes())
                .with_context(|| format!("{}: cannot write", tmp.display()))?;
            std::fs::rename(&tmp, out)
                .with_context(|| format!("{}: cannot write", out.display()))?;
        }
        None => {
            let mut so = std::io::stdout().lock();
            so.write_all(json.as_bytes())?;
            so.write_all(b"\n")?;
        }
    }
    eprintln!(
        "indexed {} in {secs:.3} s: {} files, {n_classes} classes, {n_methods} methods, {n_funcs} module functions",
        repo.display(),
        idx.files.len()
    );
    Ok(())
}

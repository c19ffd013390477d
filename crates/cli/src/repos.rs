//! `tooltrain repos prepare`: materialise each instance's repository at its base commit
//! as `<repos-dir>/<instance_id>/` (git, or the PyPI fallback offline); see
//! `tooltrain_data::repos` for the layout, resumption and how a PyPI release is
//! chosen.

use anyhow::{bail, Context, Result};
use std::path::PathBuf;
use std::sync::Mutex;
use tooltrain_data::repos::{self, Outcome, PrepareOptions, SourceKind, Status};
use tooltrain_util::Progress;

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(subcommand)]
    pub command: ReposCommand,
}

#[derive(clap::Subcommand, Debug)]
pub enum ReposCommand {
    /// Make `<repos-dir>/<instance_id>/` for each instance (resumable, parallel).
    Prepare(PrepareArgs),
}

#[derive(clap::Args, Debug)]
pub struct PrepareArgs {
    /// SWE-bench style JSONL (`instance_id`, `repo`, `base_commit`, `patch`).
    #[arg(long, value_name = "FILE")]
    pub dataset: PathBuf,
    /// Output directory: one tree per instance id, plus `<id>.source.json` markers.
    #[arg(long, value_name = "DIR")]
    pub repos_dir: PathBuf,
    /// git: clone and check out; pypi: nearest PyPI release (offline fallback);
    /// auto: git, PyPI where git fails.
    #[arg(long, default_value = "auto", value_parser = ["git", "pypi", "auto"])]
    pub source: String,
    /// Comma-separated instance ids (default: the whole dataset).
    #[arg(long, value_name = "ID,ID", conflicts_with = "instances_file")]
    pub instances: Option<String>,
    /// File of instance ids, one a line (`#` comments).
    #[arg(long, value_name = "FILE")]
    pub instances_file: Option<PathBuf>,
    /// Only the first N selected instances.
    #[arg(long, value_name = "N")]
    pub limit: Option<usize>,
    /// Instances prepared at the same time.
    #[arg(long, default_value_t = 4, value_name = "N")]
    pub jobs: usize,
    /// Clone URL; `{repo}` is `owner/name` (`{owner}`, `{name}` work too).
    #[arg(
        long,
        default_value = "https://github.com/{repo}.git",
        value_name = "TEMPLATE"
    )]
    pub git_url_template: String,
    /// Base URL of the PyPI JSON API.
    #[arg(long, default_value = "https://pypi.org/pypi", value_name = "URL")]
    pub pypi_index: String,
    /// Clones and downloads (default: `<repos-dir>/.cache`).
    #[arg(long, value_name = "DIR")]
    pub cache: Option<PathBuf>,
    /// Start no further instance with less free disk space than this (GB).
    #[arg(long, default_value_t = 2.0, value_name = "GB")]
    pub min_free_gb: f64,
    /// Pinned PyPI releases: JSON `{instance_id: {"project": ..., "version": ...}}`.
    #[arg(long, value_name = "FILE")]
    pub manifest: Option<PathBuf>,
    /// Most PyPI releases read per instance while searching.
    #[arg(long, default_value_t = 24, value_name = "N")]
    pub max_candidates: usize,
    /// Rebuild instances that already have a tree and marker.
    #[arg(long)]
    pub force: bool,
}

pub fn run(args: Args) -> Result<()> {
    match args.command {
        ReposCommand::Prepare(a) => prepare(a),
    }
}

fn prepare(a: PrepareArgs) -> Result<()> {
    if a.jobs == 0 {
        bail!("--jobs must be at least 1");
    }
    if a.min_free_gb.is_nan() || a.min_free_gb < 0.0 {
        bail!("--min-free-gb must be a non-negative number");
    }
    let dataset = tooltrain_rollout::load_dataset(&a.dataset)?;
    let ids = match (&a.instances, &a.instances_file) {
        (Some(s), _) => Some(repos::parse_id_list(s)),
        (None, Some(f)) => {
            let text = std::fs::read_to_string(f)
                .with_context(|| format!("{}: cannot read the instance list", f.display()))?;
            Some(repos::parse_id_list(&text))
        }
        (None, None) => None,
    };
    let (instances, unknown) = repos::select_instances(&dataset, ids.as_deref(), a.limit);
    let source: SourceKind = a.source.parse().map_err(anyhow::Error::msg)?;
    let mut opts = PrepareOptions::new(&a.repos_dir);
    if let Some(c) = &a.cache {
        opts.cache_dir = c.clone();
    }
    opts.source = source;
    opts.jobs = a.jobs;
    opts.git_url_template = a.git_url_template.clone();
    opts.pypi_index = a.pypi_index.clone();
    opts.min_free_gb = a.min_free_gb;
    opts.max_candidates = a.max_candidates.max(1);
    opts.force = a.force;
    if let Some(m) = &a.manifest {
        opts.manifest = repos::load_manifest(m).map_err(anyhow::Error::msg)?;
    }
    let total = instances.len() + unknown.len();
    eprintln!(
        "preparing {total} instances into {} (source {source}, {} jobs)",
        a.repos_dir.display(),
        a.jobs
    );
    let bar = Progress::new("repos prepare", Some(total as u64), "instances");
    let failures = Mutex::new(0usize);
    let progress = |o: &Outcome| {
        if o.status == Status::Failed {
            *failures.lock().unwrap_or_else(|e| e.into_inner()) += 1;
            bar.println(format!("failed {}: {}", o.instance_id, o.detail));
        }
        let n = *failures.lock().unwrap_or_else(|e| e.into_inner());
        bar.set_message(format!("{n} failed; last {}", o.instance_id));
        bar.inc(1);
    };
    let report = repos::prepare(&instances, &unknown, &opts, &progress)?;
    bar.finish();
    eprintln!(
        "prepared {}, skipped {} (already there), failed {}, not started {} in {:.1} s",
        report.prepared, report.skipped, report.failed, report.not_started, report.seconds
    );
    for o in report
        .instances
        .iter()
        .filter(|o| o.status == Status::Prepared)
    {
        eprintln!("  ok      {}: {}", o.instance_id, o.detail);
    }
    for o in report
        .instances
        .iter()
        .filter(|o| o.status == Status::Failed)
    {
        eprintln!("  FAILED  {}: {}", o.instance_id, o.detail);
    }
    if let Some(why) = &report.stopped {
        eprintln!("stopped early: {why}");
    }
    let report_path = a.repos_dir.join("prepare-report.json");
    eprintln!("report: {}", report_path.display());
    if report.failed > 0 || report.not_started > 0 {
        bail!(
            "{} of {total} instances failed and {} not started (see {})",
            report.failed,
            report.not_started,
            report_path.display()
        );
    }
    Ok(())
}

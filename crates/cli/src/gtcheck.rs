//! `tooltrain gt-check`: ground truth derived from the gold patches on prepared trees
//! against a shipped ground-truth file (`tooltrain_data::gtcheck`): counts,
//! exact and file-level agreement, location precision / recall, the disagreements.

use anyhow::{bail, Context, Result};
use std::path::PathBuf;
use tooltrain_data::gtcheck::gt_check;
use tooltrain_rollout::GroundTruth;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// SWE-bench style JSONL with the gold patches.
    #[arg(long, value_name = "FILE")]
    pub dataset: PathBuf,
    /// One tree per instance id (what `tooltrain repos prepare` makes).
    #[arg(long, value_name = "DIR")]
    pub repos_dir: PathBuf,
    /// Shipped ground truth `{instance_id: ["file.py::Class.method", ...]}`.
    #[arg(long, value_name = "FILE")]
    pub gt: PathBuf,
    /// Write the full report as JSON here.
    #[arg(long, value_name = "FILE")]
    pub out: Option<PathBuf>,
}

fn pct(a: usize, b: usize) -> String {
    if b == 0 {
        "-".into()
    } else {
        format!("{:.1}%", 100.0 * a as f64 / b as f64)
    }
}

pub fn run(a: Args) -> Result<()> {
    if !a.repos_dir.is_dir() {
        bail!("repos directory {} does not exist", a.repos_dir.display());
    }
    let dataset = tooltrain_rollout::load_dataset(&a.dataset)?;
    let gt = GroundTruth::load(&a.gt)?;
    let r = gt_check(&dataset, &a.repos_dir, &gt);
    println!(
        "instances with a tree     {} of {} in the dataset ({} without shipped GT)",
        r.with_tree, r.dataset_instances, r.without_shipped_gt
    );
    println!("compared                  {}", r.compared);
    println!(
        "exact set agreement       {} / {} ({})",
        r.exact,
        r.compared,
        pct(r.exact, r.compared)
    );
    println!(
        "file-level agreement      {} / {} ({})",
        r.files_agree,
        r.compared,
        pct(r.files_agree, r.compared)
    );
    println!(
        "locations                 precision {:.3}  recall {:.3}  (derived {}, shipped {}, common {})",
        r.precision, r.recall, r.derived_locations, r.shipped_locations, r.common_locations
    );
    println!(
        "hunks relocated           {} moved to other lines of their tree, {} not found in it",
        r.hunks_moved, r.hunks_unplaced
    );
    if !r.disagreements.is_empty() {
        println!("disagreements:");
        for c in r.instances.iter().filter(|c| !c.exact) {
            println!("  {}", c.instance_id);
            println!("    derived only: {:?}", c.derived_only());
            println!("    shipped only: {:?}", c.shipped_only());
            if let Some(s) = &c.source {
                println!("    tree: {s}");
            }
            if c.relocation.moved + c.relocation.unplaced > 0 {
                println!(
                    "    hunks: {} moved, {} not found in the tree",
                    c.relocation.moved, c.relocation.unplaced
                );
            }
            if let Some(e) = &c.error {
                println!("    error: {e}");
            }
        }
    }
    if let Some(out) = &a.out {
        let json = serde_json::to_string_pretty(&r).context("serialise the report")?;
        tooltrain_util::write_atomic(out, json.as_bytes())
            .with_context(|| format!("{}: cannot write", out.display()))?;
        eprintln!("report: {}", out.display());
    }
    if r.with_tree == 0 {
        bail!(
            "no instance of {} has a tree in {}",
            a.dataset.display(),
            a.repos_dir.display()
        );
    }
    Ok(())
}

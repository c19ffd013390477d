//! `tooltrain eval`: run a policy over benchmark instances and print the paper's table.

use anyhow::{anyhow, bail, Result};
use std::path::PathBuf;
use tooltrain_rollout::eval::{run_eval, EvalConfig, PolicyKind};
use tooltrain_train::config::{self, ConfigArgs};
use tooltrain_util::Progress;

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub config: ConfigArgs,
    /// Instances (SWE-bench-style JSONL); overrides `dataset`.
    #[arg(long, value_name = "FILE")]
    pub dataset: Option<PathBuf>,
    /// Ground truth JSON (`{id: ["file.py::name"]}`); overrides `gt`.
    #[arg(long, value_name = "FILE")]
    pub gt: Option<PathBuf>,
    /// One directory per instance id; overrides `repos_dir`.
    #[arg(long, value_name = "DIR")]
    pub repos_dir: Option<PathBuf>,
    /// oracle, bm25, model or openai; overrides `policy.kind`.
    #[arg(long)]
    pub policy: Option<PolicyKind>,
    /// Output directory; overrides `out`.
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// First N instances; overrides `limit`.
    #[arg(long)]
    pub limit: Option<usize>,
}

pub fn run(a: Args) -> Result<()> {
    let mut cfg: EvalConfig = config::load(a.config.config.as_deref(), &a.config.set)?;
    if let Some(d) = a.dataset {
        cfg.data.dataset = d;
    }
    if let Some(g) = a.gt {
        cfg.data.gt = Some(g);
    }
    if let Some(r) = a.repos_dir {
        cfg.data.repos_dir = r;
    }
    if let Some(p) = a.policy {
        cfg.policy.kind = p;
    }
    if let Some(o) = a.out {
        cfg.out = o;
    }
    if let Some(l) = a.limit {
        cfg.data.limit = l;
    }
    if a.config.print_config {
        print!("{}", config::to_toml(&cfg)?);
        return Ok(());
    }
    let pb = Progress::new("eval", None, "episodes");
    let reward_sum = std::sync::Mutex::new((0.0f64, 0usize));
    let summary = run_eval(&cfg, &|n| pb.set_length(n as u64), &|t| {
        let mut r = reward_sum.lock().unwrap();
        r.0 += t.reward.unwrap_or(0.0);
        r.1 += 1;
        pb.set_message(format!("mean reward {:.3}", r.0 / r.1 as f64));
        pb.inc(1);
    })
    .map_err(|e| anyhow!(e))?;
    pb.finish();
    print!("{}", summary.report.table());
    println!(
        "episodes: {}  mean reward: {:.4}  mean turns: {:.2}  tool calls/episode: {:.2}  invalid turns: {:.1}%  drift episodes: {}  failures: {}  missing GT: {}  time: {:.1}s",
        summary.episodes,
        summary.mean_reward,
        summary.mean_turns,
        summary.mean_tool_calls,
        100.0 * summary.invalid_turn_rate,
        summary.drift_episodes,
        summary.failures.len(),
        summary.missing_gt.len(),
        summary.seconds
    );
    for (id, e) in summary.failures.iter().take(10) {
        println!("  failed {id}: {e}");
    }
    println!("outputs in {}", cfg.out.display());
    if summary.episodes > 0 && summary.failed_episodes == summary.episodes {
        let first = summary
            .failures
            .iter()
            .next()
            .map(|(id, e)| format!("; the first: {id}: {e}"))
            .unwrap_or_default();
        bail!(
            "every episode failed ({} of {}){first}",
            summary.failed_episodes,
            summary.episodes
        );
    }
    Ok(())
}

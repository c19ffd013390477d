//! `tooltrain sample`: rejection sampling of RepoSearcher trajectories into an SFT
//! dataset (see `tooltrain_rollout::sample`).

use anyhow::{anyhow, bail, Result};
use tooltrain_rollout::sample::{run_sample, SampleConfig};
use tooltrain_train::config::{self, ConfigArgs};
use tooltrain_util::Progress;

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub config: ConfigArgs,
}

pub fn run(a: Args) -> Result<()> {
    let cfg: SampleConfig = config::load(a.config.config.as_deref(), &a.config.set)?;
    if a.config.print_config {
        print!("{}", config::to_toml(&cfg)?);
        return Ok(());
    }
    let pb = Progress::new("sample", None, "episodes");
    let kept = std::sync::Mutex::new((0usize, 0usize));
    let s = run_sample(&cfg, &|n| pb.set_length(n as u64), &|t| {
        let mut k = kept.lock().unwrap();
        k.0 += t.gt_hits.unwrap_or(0).min(1);
        k.1 += 1;
        pb.set_message(format!("with a GT hit {}/{}", k.0, k.1));
        pb.inc(1);
    })
    .map_err(|e| anyhow!(e))?;
    pb.finish();
    println!(
        "sampled {} episodes ({} from earlier runs, {} failed) over {} instances; kept {} ({} duplicates dropped) from {} instances; mean reward {:.4}; {:.1}s",
        s.sampled, s.resumed, s.failed, s.instances, s.kept, s.duplicates, s.instances_with_kept, s.mean_reward, s.seconds
    );
    println!(
        "reward histogram (0.0-0.1 ... 0.9-1.0): {:?}",
        s.reward_histogram
    );
    println!("SFT dataset: {}", cfg.out.join("sft.jsonl").display());
    if s.sampled > 0 && s.failed == s.sampled {
        bail!(
            "every episode failed ({} of {}): see the `error` of each line of {}",
            s.failed,
            s.sampled,
            cfg.out.join("trajectories.jsonl").display()
        );
    }
    Ok(())
}

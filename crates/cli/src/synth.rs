//! `tooltrain synth`: write seeded synthetic localisation tasks (small Python packages
//! with a planted bug, a bug report, the gold patch and the ground truth) in the format
//! of the real data: `DIR/dataset.jsonl`, `DIR/gt.json`, `DIR/config.json` and
//! `DIR/repos/<instance_id>/` (see `tooltrain_data::synth`).

use anyhow::{Context, Result};
use std::path::PathBuf;
use std::time::Instant;
use tooltrain_data::synth::{generate_opts, SynthConfig};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Output directory (written atomically: a temporary sibling, then a rename).
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// A JSON file with `SynthConfig` fields; the flags below override it.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Number of tasks [default: 100].
    #[arg(long)]
    pub n: Option<usize>,
    /// Master seed [default: 0]; the same seed and knobs give byte-identical output.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Modules per package, 1..=10 [default: 4].
    #[arg(long)]
    pub files: Option<usize>,
    /// Classes per module [default: 2].
    #[arg(long)]
    pub classes_per_file: Option<usize>,
    /// Methods per class besides `__init__` [default: 3].
    #[arg(long)]
    pub methods_per_class: Option<usize>,
    /// Module-level functions per module [default: 2].
    #[arg(long)]
    pub functions_per_file: Option<usize>,
    /// Look-alike definitions per task (same or similar names) [default: 2].
    #[arg(long)]
    pub decoys: Option<usize>,
    /// Fewest ground-truth locations per task [default: 1].
    #[arg(long)]
    pub gt_min: Option<usize>,
    /// Most ground-truth locations per task, at most 5 [default: 2].
    #[arg(long)]
    pub gt_max: Option<usize>,
    /// Probability of each explicit pointer to a location in the report (module import
    /// path, traceback frames, a remark naming the file) [default: 0.5].
    #[arg(long)]
    pub mention_prob: Option<f64>,
    /// Probability that the report calls a wrapper in another module instead of the
    /// buggy definition [default: 0.3].
    #[arg(long)]
    pub indirect_prob: Option<f64>,
    /// Owner of `repo` and prefix of instance ids [default: synth].
    #[arg(long)]
    pub prefix: Option<String>,
    /// Replace DIR when it holds a previous synth output.
    #[arg(long)]
    pub force: bool,
}

impl Args {
    /// The configuration: defaults, then `--config`, then the flags.
    pub fn config(&self) -> Result<SynthConfig> {
        let mut c = match &self.config {
            Some(p) => {
                let text = std::fs::read_to_string(p)
                    .with_context(|| format!("{}: cannot read", p.display()))?;
                serde_json::from_str(&text)
                    .with_context(|| format!("{}: not a synth config", p.display()))?
            }
            None => SynthConfig::default(),
        };
        macro_rules! set {
            ($($f:ident),*) => { $( if let Some(v) = self.$f.clone() { c.$f = v; } )* };
        }
        set!(
            n,
            seed,
            files,
            classes_per_file,
            methods_per_class,
            functions_per_file,
            decoys,
            gt_min,
            gt_max,
            mention_prob,
            indirect_prob,
            prefix
        );
        Ok(c)
    }
}

pub fn run(args: Args) -> Result<()> {
    let cfg = args.config()?;
    let t0 = Instant::now();
    let summary = generate_opts(&cfg, &args.out, args.force)?;
    eprintln!(
        "wrote {} tasks ({} Python files, {} GT locations, {} decoys) to {} in {:.2} s",
        summary.tasks,
        summary.python_files,
        summary.gt_locations,
        summary.decoys,
        args.out.display(),
        t0.elapsed().as_secs_f64()
    );
    println!("{}", serde_json::to_string(&summary)?);
    Ok(())
}

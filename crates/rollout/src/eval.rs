//! Evaluation runs (`tooltrain eval`) and the batch machinery that sampling reuses:
//! instances + ground truth + repository trees -> episodes with a policy ->
//! trajectories, predictions, the paper's metric table.
//!
//! Output directory of a run:
//! - `trajectories.jsonl`: one [`Trajectory`] a line (messages, tokens and loss mask
//!   when a tokenizer renders the episodes, reward, counters, error);
//! - `predictions.jsonl`: one [`PredictionLine`] a line: `instance_id`, `found_files`,
//!   `found_related_locs` (per found file, one `function: name` line for each name
//!   located in it, as Agentless/LocAgent write them; names of classes and methods
//!   alike) and `found_locations` (`file::name`);
//! - `metrics.json`: the [`Report`] (file / function / strict function level, percent,
//!   averaged over ALL selected instances: failures count 0), failures and run facts;
//! - `table.txt`: the table as printed.
//!
//! Every selected instance stays in the denominator. An instance whose tree is missing,
//! whose episode fails, or which has no ground truth is listed under `failures` /
//! `missing_gt` in `metrics.json`, never dropped.

use crate::bm25::{Bm25, Bm25Config};
use crate::cache;
use crate::dataset::{load_dataset, Instance};
use crate::episode::{run_episodes, EpisodeConfig, EpisodeJob, Renderer, Trajectory};
use crate::gt::{locations_from_patch, GroundTruth, Location};
use crate::index::RepoIndex;
use crate::local::{LocalModel, LocalSampling};
use crate::metrics::{evaluate, Prediction, Report};
use crate::openai::{OpenAiConfig, OpenAiPolicy};
use crate::policy::{Oracle, Policy};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tooltrain_model::Tokenizer;

/// Which policy writes the turns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum PolicyKind {
    Oracle,
    #[default]
    Bm25,
    Model,
    Openai,
}

impl std::str::FromStr for PolicyKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "oracle" => Ok(PolicyKind::Oracle),
            "bm25" => Ok(PolicyKind::Bm25),
            "model" => Ok(PolicyKind::Model),
            "openai" => Ok(PolicyKind::Openai),
            _ => Err(format!(
                "unknown policy {s:?}: expected oracle, bm25, model or openai"
            )),
        }
    }
}

/// The local model policy's checkpoint and sampling (`[policy.model]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelPolicyConfig {
    /// HF checkpoint directory or GGUF file.
    pub path: PathBuf,
    /// f32, bf16 or f16.
    pub dtype: String,
    /// Stay on the CPU even when a GPU is available.
    pub cpu: bool,
    #[serde(flatten)]
    pub sampling: LocalSampling,
}

impl Default for ModelPolicyConfig {
    fn default() -> Self {
        ModelPolicyConfig {
            path: PathBuf::new(),
            dtype: "f32".into(),
            cpu: false,
            sampling: LocalSampling::default(),
        }
    }
}

/// The oracle's options (`[policy.oracle]`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OracleConfig {
    /// Write a sentence of reasoning before each call.
    pub reasoning: bool,
}

/// `[policy]`: the kind, and each kind's table.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PolicyConfig {
    pub kind: PolicyKind,
    pub oracle: OracleConfig,
    pub bm25: Bm25Config,
    pub openai: OpenAiConfig,
    pub model: ModelPolicyConfig,
}

/// Where instances, ground truth and trees come from (shared by eval and sampling).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataConfig {
    /// SWE-bench-style JSONL.
    pub dataset: PathBuf,
    /// Ground truth (`{id: ["file.py::name", ...]}`); when empty, derived from each
    /// instance's gold patch at its tree.
    pub gt: Option<PathBuf>,
    /// One directory per instance id (what `tooltrain repos prepare` makes).
    pub repos_dir: PathBuf,
    /// Index cache directory (optional; used for trees with a `repos prepare` marker).
    pub index_cache: Option<PathBuf>,
    /// Only these instance ids (in dataset order); empty = all.
    pub instances: Vec<String>,
    /// First N selected instances (0 = all).
    pub limit: usize,
}

impl Default for DataConfig {
    fn default() -> Self {
        DataConfig {
            dataset: PathBuf::new(),
            gt: None,
            repos_dir: PathBuf::new(),
            index_cache: None,
            instances: vec![],
            limit: 0,
        }
    }
}

/// An eval config (`configs/eval-*.toml`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EvalConfig {
    #[serde(flatten)]
    pub data: DataConfig,
    /// Output directory.
    pub out: PathBuf,
    /// Episodes per instance.
    pub samples: usize,
    pub seed: u64,
    /// Episodes run together (one policy batch per turn).
    pub batch_size: usize,
    /// Tokenizer directory for token-level records with text policies (the model
    /// policy always uses its own).
    pub tokenizer: Option<PathBuf>,
    pub policy: PolicyConfig,
    pub episode: EpisodeConfig,
}

impl Default for EvalConfig {
    fn default() -> Self {
        EvalConfig {
            data: DataConfig::default(),
            out: PathBuf::from("runs/eval"),
            samples: 1,
            seed: 0,
            batch_size: 16,
            tokenizer: None,
            policy: PolicyConfig::default(),
            episode: EpisodeConfig::default(),
        }
    }
}

impl EvalConfig {
    /// Checks the config before anything runs; errors name the key.
    pub fn validate(&self) -> Result<(), String> {
        if self.data.dataset.as_os_str().is_empty() {
            return Err("dataset: missing (a JSONL file of instances)".into());
        }
        if self.data.repos_dir.as_os_str().is_empty() {
            return Err("repos_dir: missing (one directory per instance id)".into());
        }
        if self.samples == 0 {
            return Err("samples must be at least 1".into());
        }
        if self.batch_size == 0 {
            return Err("batch_size must be at least 1".into());
        }
        self.episode.validate()
    }
}

/// Instances selected by a [`DataConfig`], their ground truth, and what is missing.
pub struct Selection {
    pub instances: Vec<Arc<Instance>>,
    /// GT of the selected instances that have one.
    pub gt: BTreeMap<String, Vec<Location>>,
    /// Whether GT comes from gold patches (derived when each tree is indexed).
    pub derive_gt: bool,
}

/// Loads the dataset and GT and applies `instances` / `limit`. Unknown ids in
/// `instances` are an error naming them.
pub fn select(data: &DataConfig) -> Result<Selection, String> {
    let all = load_dataset(&data.dataset).map_err(|e| e.to_string())?;
    let mut chosen: Vec<Instance> = if data.instances.is_empty() {
        all
    } else {
        let by_id: BTreeMap<&str, &Instance> =
            all.iter().map(|i| (i.instance_id.as_str(), i)).collect();
        let unknown: Vec<&String> = data
            .instances
            .iter()
            .filter(|id| !by_id.contains_key(id.as_str()))
            .collect();
        if !unknown.is_empty() {
            return Err(format!(
                "instances: {} unknown instance id(s) not in {}: {}",
                unknown.len(),
                data.dataset.display(),
                unknown
                    .iter()
                    .map(|s| s.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        data.instances
            .iter()
            .map(|id| by_id[id.as_str()].clone())
            .collect()
    };
    if data.limit > 0 {
        chosen.truncate(data.limit);
    }
    if chosen.is_empty() {
        return Err(format!(
            "no instance to run: {} selects none (an empty dataset, or `instances` / `limit` \
             select nothing)",
            data.dataset.display()
        ));
    }
    let (gt, derive_gt) = match &data.gt {
        Some(p) => {
            let g = GroundTruth::load(p).map_err(|e| e.to_string())?;
            let gt = chosen
                .iter()
                .filter_map(|i| {
                    g.get(&i.instance_id)
                        .map(|l| (i.instance_id.clone(), l.to_vec()))
                })
                .collect();
            (gt, false)
        }
        None => (BTreeMap::new(), true),
    };
    Ok(Selection {
        instances: chosen.into_iter().map(Arc::new).collect(),
        gt,
        derive_gt,
    })
}

/// The index of an instance's tree (`repos_dir/<instance_id>`), through the cache when
/// the tree has a `repos prepare` marker (`<instance_id>.source.json`) to key it.
pub fn load_index(data: &DataConfig, inst: &Instance) -> Result<RepoIndex, String> {
    if !crate::dataset::valid_instance_id(&inst.instance_id) {
        return Err(format!(
            "instance id {:?} cannot name a directory under {} (letters, digits, `-_.+`, no \
             leading `.`)",
            inst.instance_id,
            data.repos_dir.display()
        ));
    }
    let root = data.repos_dir.join(&inst.instance_id);
    if !root.is_dir() {
        return Err(format!(
            "repository tree {} is missing (run `tooltrain repos prepare` or point --repos-dir at a directory with one tree per instance id)",
            root.display()
        ));
    }
    let marker = data
        .repos_dir
        .join(format!("{}.source.json", inst.instance_id));
    if let (Some(dir), Ok(bytes)) = (&data.index_cache, std::fs::read(&marker)) {
        let h = tooltrain_util::fnv1a(0, bytes.iter().copied());
        let key = format!("{}@{}#{h:016x}", inst.repo, inst.base_commit);
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        return cache::load_or_build(&root, dir, &key)
            .map(|(idx, _)| idx)
            .map_err(|e| format!("index cache {}: {e}", dir.display()));
    }
    Ok(RepoIndex::build(&root))
}

/// Builds the policy a config names, with the tokenizer of its model when it has one
/// (the local-model policy), which then renders the episodes.
pub fn build_policy(
    cfg: &PolicyConfig,
) -> Result<(Box<dyn Policy>, Option<Arc<Tokenizer>>), String> {
    Ok(match cfg.kind {
        PolicyKind::Oracle => (
            Box::new(Oracle {
                reasoning: cfg.oracle.reasoning,
            }),
            None,
        ),
        PolicyKind::Bm25 => (
            Box::new(Bm25::new(cfg.bm25.clone()).map_err(|e| format!("policy.bm25: {e}"))?),
            None,
        ),
        PolicyKind::Openai => (
            Box::new(
                OpenAiPolicy::new(cfg.openai.clone()).map_err(|e| format!("policy.openai: {e}"))?,
            ),
            None,
        ),
        PolicyKind::Model => {
            let m = &cfg.model;
            if m.path.as_os_str().is_empty() {
                return Err(
                    "policy.model.path: missing (a checkpoint directory or .gguf file)".into(),
                );
            }
            let dtype = tooltrain_model::parse_dtype(&m.dtype)
                .map_err(|e| format!("policy.model.dtype: {e}"))?;
            let device = tooltrain_model::default_device(m.cpu).map_err(|e| e.to_string())?;
            let ckpt = tooltrain_model::load(&m.path, dtype, &device)
                .map_err(|e| format!("policy.model.path {}: {e}", m.path.display()))?;
            let tok = Arc::new(ckpt.tokenizer.ok_or_else(|| {
                format!(
                    "policy.model.path {}: the checkpoint has no tokenizer",
                    m.path.display()
                )
            })?);
            let policy = LocalModel::new(
                Arc::new(ckpt.model),
                tok.clone(),
                m.sampling.clone(),
                m.path.display().to_string(),
            )?;
            (Box::new(policy), Some(tok))
        }
    })
}

/// One finished instance-sample: its trajectory (a failed setup gives a trajectory with
/// only `error` set).
pub type Finished = Trajectory;

/// How the samples of one instance get their prompts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Prompts {
    /// One prompt for all samples of an instance (its random candidate files drawn once):
    /// the samples are comparable, and the prompt is computed once.
    Shared,
    /// A prompt per sample (other random candidate files): more varied trajectories, as
    /// rejection sampling wants.
    PerSample,
}

/// Runs every (instance, sample) episode in batches of `batch_size`: indexes the trees
/// of a batch in parallel, derives GT when asked, runs the episodes, and hands each
/// finished trajectory to `sink` (in order within a batch).
#[allow(clippy::too_many_arguments)]
pub fn run_batches(
    sel: &Selection,
    data: &DataConfig,
    samples: usize,
    seed: u64,
    prompts: Prompts,
    batch_size: usize,
    policy: &dyn Policy,
    renderer: Option<&Renderer>,
    episode: &EpisodeConfig,
    skip: &dyn Fn(&str, usize) -> bool,
    sink: &mut dyn FnMut(Finished, Option<&[Location]>),
) {
    let mut work: Vec<(Arc<Instance>, usize)> = Vec::new();
    for inst in &sel.instances {
        for s in 0..samples {
            if !skip(&inst.instance_id, s) {
                work.push((inst.clone(), s));
            }
        }
    }
    for chunk in work.chunks(batch_size) {
        // Index each distinct instance of the chunk once, in parallel.
        let mut ids: Vec<&Arc<Instance>> = Vec::new();
        for (i, _) in chunk {
            if !ids.iter().any(|x| x.instance_id == i.instance_id) {
                ids.push(i);
            }
        }
        let built: Vec<(
            String,
            Result<(Arc<RepoIndex>, Option<Vec<Location>>), String>,
        )> = ids
            .par_iter()
            .map(|inst| {
                let r = load_index(data, inst).and_then(|idx| {
                    let gt = if sel.derive_gt {
                        Some(
                            locations_from_patch(&inst.patch, &idx)
                                .map_err(|e| format!("deriving GT from the gold patch: {e}"))?,
                        )
                    } else {
                        sel.gt.get(&inst.instance_id).cloned()
                    };
                    Ok((Arc::new(idx), gt))
                });
                (inst.instance_id.clone(), r)
            })
            .collect();
        let built: BTreeMap<String, _> = built.into_iter().collect();
        // Results in work order: setup failures and finished episodes interleaved as
        // the instances come in the dataset.
        let mut slots: Vec<Option<(Trajectory, Option<Vec<Location>>)>> = vec![None; chunk.len()];
        let mut jobs: Vec<EpisodeJob> = Vec::new();
        let mut job_slot: Vec<usize> = Vec::new();
        for (k, (inst, s)) in chunk.iter().enumerate() {
            match &built[&inst.instance_id] {
                Ok((idx, gt)) => {
                    jobs.push(EpisodeJob {
                        instance: inst.clone(),
                        index: idx.clone(),
                        gt: gt.clone(),
                        sample: *s,
                        seed: episode_seed(seed, &inst.instance_id, *s),
                        prompt_seed: match prompts {
                            Prompts::Shared => episode_seed(seed, &inst.instance_id, 0),
                            Prompts::PerSample => episode_seed(seed, &inst.instance_id, *s),
                        },
                    });
                    job_slot.push(k);
                }
                Err(e) => {
                    slots[k] = Some((
                        Trajectory {
                            instance_id: inst.instance_id.clone(),
                            sample: *s,
                            policy: policy.name(),
                            error: Some(e.clone()),
                            ..Trajectory::default()
                        },
                        None,
                    ))
                }
            }
        }
        if !jobs.is_empty() {
            let trajs = run_episodes(&jobs, policy, renderer, episode, None, &|_| {});
            for ((t, j), k) in trajs.into_iter().zip(&jobs).zip(job_slot) {
                slots[k] = Some((t, j.gt.clone()));
            }
        }
        for (t, gt) in slots.into_iter().flatten() {
            sink(t, gt.as_deref());
        }
    }
}

/// The seed of one episode: a hash of the run seed, the instance id and the sample.
pub fn episode_seed(seed: u64, id: &str, sample: usize) -> u64 {
    tooltrain_util::fnv1a(
        seed.wrapping_mul(0x9E37_79B9_7F4A_7C15),
        id.bytes().chain((sample as u64).to_le_bytes()),
    )
}

/// One line of `predictions.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PredictionLine {
    pub instance_id: String,
    /// Files of the answer, in order (file-only locations and files of named ones).
    pub found_files: Vec<String>,
    /// Per found file, its named locations as `function: name` lines.
    pub found_related_locs: Vec<String>,
    /// The answer's locations, `file::name` or `file`.
    pub found_locations: Vec<String>,
}

impl PredictionLine {
    /// The prediction line of a trajectory.
    pub fn of(t: &Trajectory) -> PredictionLine {
        let mut files: Vec<String> = t.files.clone();
        for l in &t.locations {
            let f = Location::parse(l).file;
            if !files.contains(&f) {
                files.push(f);
            }
        }
        let related: Vec<String> = files
            .iter()
            .map(|f| {
                t.locations
                    .iter()
                    .map(|l| Location::parse(l))
                    .filter(|l| &l.file == f)
                    .filter_map(|l| l.name)
                    .map(|n| format!("function: {n}"))
                    .collect::<Vec<_>>()
                    .join("\n")
            })
            .collect();
        PredictionLine {
            instance_id: t.instance_id.clone(),
            found_files: files,
            found_related_locs: related,
            found_locations: t.locations.clone(),
        }
    }

    /// What the metrics score.
    pub fn prediction(&self) -> Prediction {
        Prediction {
            found_files: self.found_files.clone(),
            found_locations: self.found_locations.clone(),
        }
    }
}

/// What an eval run produced.
#[derive(Debug, Clone, Serialize)]
pub struct EvalSummary {
    pub report: Report,
    /// Instance ids whose episode (sample 0) failed, with the reason.
    pub failures: BTreeMap<String, String>,
    /// Selected instances without ground truth (scored 0).
    pub missing_gt: Vec<String>,
    pub episodes: usize,
    pub mean_reward: f64,
    pub mean_turns: f64,
    pub mean_tool_calls: f64,
    pub invalid_turn_rate: f64,
    /// Episodes whose re-rendered tokens differ from the recorded ones.
    pub drift_episodes: usize,
    /// Episodes that failed (all samples; they score 0).
    pub failed_episodes: usize,
    pub seconds: f64,
    /// The policy's own counters ([`Policy::stats`]), e.g. a local model's prompt reuse
    /// and generation phase times.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub policy_stats: Option<serde_json::Value>,
}

/// A JSONL output written to `NAME.partial` and renamed to `NAME` once complete; the
/// first write error is kept and reported at the end.
struct PartialJsonl {
    w: std::io::BufWriter<std::fs::File>,
    tmp: PathBuf,
    path: PathBuf,
    err: Option<String>,
}

impl PartialJsonl {
    fn create(dir: &Path, name: &str) -> Result<PartialJsonl, String> {
        let tmp = dir.join(format!("{name}.partial"));
        let f = std::fs::File::create(&tmp).map_err(|e| format!("{}: {e}", tmp.display()))?;
        Ok(PartialJsonl {
            w: std::io::BufWriter::new(f),
            tmp,
            path: dir.join(name),
            err: None,
        })
    }

    fn write<T: Serialize>(&mut self, v: &T) {
        if self.err.is_some() {
            return;
        }
        let r = serde_json::to_string(v)
            .map_err(|e| e.to_string())
            .and_then(|l| writeln!(self.w, "{l}").map_err(|e| e.to_string()));
        if let Err(e) = r {
            self.err = Some(format!("{}: {e}", self.tmp.display()));
        }
    }

    /// Flushes, syncs and renames into place.
    fn finish(self) -> Result<(), String> {
        if let Some(e) = self.err {
            return Err(e);
        }
        let path = self.path;
        self.w
            .into_inner()
            .map_err(|e| e.to_string())
            .and_then(|f| f.sync_all().map_err(|e| e.to_string()))
            .and_then(|()| std::fs::rename(&self.tmp, &path).map_err(|e| e.to_string()))
            .map_err(|e| format!("{}: {e}", path.display()))
    }
}

/// What an eval run adds up over its episodes.
#[derive(Default)]
struct Tally {
    n: usize,
    reward: f64,
    turns: usize,
    calls: usize,
    invalid: usize,
    drift: usize,
    failed: usize,
    /// Sample 0 of each instance: its prediction, or its failure.
    preds: BTreeMap<String, Prediction>,
    failures: BTreeMap<String, String>,
}

impl Tally {
    fn add(&mut self, t: &Trajectory) {
        self.n += 1;
        self.reward += t.reward.unwrap_or(0.0);
        self.turns += t.turns;
        self.calls += t.tool_calls;
        self.invalid += t.invalid_turns;
        self.drift += t.tokens.as_ref().is_some_and(|r| r.drift > 0) as usize;
        self.failed += t.error.is_some() as usize;
        if let (0, Some(e)) = (t.sample, &t.error) {
            self.failures.insert(t.instance_id.clone(), e.clone());
        }
    }
}

/// The tokenizer that renders an eval's episodes: the model policy's own, else the
/// configured one, else none (text only).
fn eval_tokenizer(
    cfg: &EvalConfig,
    model_tok: Option<Arc<Tokenizer>>,
) -> Result<Option<Arc<Tokenizer>>, String> {
    Ok(match (model_tok, &cfg.tokenizer) {
        (Some(t), _) => Some(t),
        (None, Some(dir)) => Some(Arc::new(
            Tokenizer::from_dir(dir).map_err(|e| format!("tokenizer {}: {e}", dir.display()))?,
        )),
        (None, None) => None,
    })
}

/// Runs an eval: all selected instances, `samples` episodes each (sample 0 is scored
/// in the table; every sample's reward is in the means), writing the outputs under
/// `cfg.out`. `on_done` is called after each episode (for a progress bar).
pub fn run_eval(
    cfg: &EvalConfig,
    on_start: &dyn Fn(usize),
    on_done: &dyn Fn(&Trajectory),
) -> Result<EvalSummary, String> {
    cfg.validate()?;
    let t0 = std::time::Instant::now();
    let sel = select(&cfg.data)?;
    let (policy, model_tok) = build_policy(&cfg.policy)?;
    let renderer = eval_tokenizer(cfg, model_tok)?
        .map(Renderer::new)
        .transpose()?;
    // One run at a time writes here; `*.partial` files an interrupted run left are
    // replaced (they are renamed into place only when complete).
    let _lock = tooltrain_util::RunLock::acquire(&cfg.out, "tooltrain eval")?;
    let mut traj_w = PartialJsonl::create(&cfg.out, "trajectories.jsonl")?;
    let mut pred_w = PartialJsonl::create(&cfg.out, "predictions.jsonl")?;
    on_start(sel.instances.len() * cfg.samples);
    let mut gt_seen: BTreeMap<String, Vec<Location>> = sel.gt.clone();
    let mut tally = Tally::default();
    run_batches(
        &sel,
        &cfg.data,
        cfg.samples,
        cfg.seed,
        Prompts::Shared,
        cfg.batch_size,
        policy.as_ref(),
        renderer.as_ref(),
        &cfg.episode,
        &|_, _| false,
        &mut |t, gt| {
            tally.add(&t);
            if let (true, Some(gt)) = (sel.derive_gt, gt) {
                gt_seen.insert(t.instance_id.clone(), gt.to_vec());
            }
            if t.sample == 0 {
                let p = PredictionLine::of(&t);
                tally.preds.insert(t.instance_id.clone(), p.prediction());
                pred_w.write(&p);
            }
            traj_w.write(&t);
            on_done(&t);
        },
    );
    traj_w.finish()?;
    pred_w.finish()?;
    // Denominator: every selected instance (no GT = empty GT = 0).
    let missing_gt: Vec<String> = sel
        .instances
        .iter()
        .filter(|i| !gt_seen.contains_key(&i.instance_id))
        .map(|i| i.instance_id.clone())
        .collect();
    let gt = GroundTruth {
        instances: sel
            .instances
            .iter()
            .map(|i| {
                let locs = gt_seen.get(&i.instance_id).cloned().unwrap_or_default();
                (i.instance_id.clone(), locs)
            })
            .collect(),
    };
    let d = tally.n.max(1) as f64;
    let summary = EvalSummary {
        report: evaluate(&tally.preds, &gt),
        failures: tally.failures,
        missing_gt,
        episodes: tally.n,
        mean_reward: tally.reward / d,
        mean_turns: tally.turns as f64 / d,
        mean_tool_calls: tally.calls as f64 / d,
        invalid_turn_rate: tally.invalid as f64 / (tally.turns.max(1) as f64),
        drift_episodes: tally.drift,
        failed_episodes: tally.failed,
        seconds: t0.elapsed().as_secs_f64(),
        policy_stats: policy.stats(),
    };
    write_eval_outputs(cfg, &summary, &policy.name())?;
    Ok(summary)
}

/// `metrics.json` (the summary, the policy, the config) and `table.txt`.
fn write_eval_outputs(cfg: &EvalConfig, summary: &EvalSummary, policy: &str) -> Result<(), String> {
    let mut metrics = serde_json::to_value(summary).map_err(|e| e.to_string())?;
    metrics["policy"] = json!(policy);
    metrics["config"] = serde_json::to_value(cfg).map_err(|e| e.to_string())?;
    let write = |name: &str, bytes: &[u8]| {
        crate::write_atomic(&cfg.out.join(name), bytes)
            .map_err(|e| format!("{}: {e}", cfg.out.join(name).display()))
    };
    let text = serde_json::to_string_pretty(&metrics).map_err(|e| e.to_string())?;
    write("metrics.json", text.as_bytes())?;
    write("table.txt", summary.report.table().as_bytes())
}

/// Reads a run's `metrics.json` back (for tests and tools).
pub fn read_metrics(out: &Path) -> Result<serde_json::Value, String> {
    let p = out.join("metrics.json");
    let text = std::fs::read_to_string(&p).map_err(|e| format!("{}: {e}", p.display()))?;
    serde_json::from_str(&text).map_err(|e| format!("{}: {e}", p.display()))
}

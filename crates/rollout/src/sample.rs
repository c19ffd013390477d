//! Rejection sampling (`tooltrain sample`): K episodes per instance with any policy,
//! recorded with the student's tokenizer, kept by a rule, de-duplicated, written as the
//! SFT dataset.
//!
//! Output directory:
//! - `trajectories.jsonl`: every sampled episode (appended batch by batch: each batch's
//!   lines go out in one write followed by a flush and fsync). A rerun skips the
//!   (instance, sample) pairs already there; a trailing partial line left by a crash is
//!   cut off first.
//! - `sft.jsonl`: the kept examples, `{"instance_id", "sample", "reward", "messages",
//!   "input_ids", "loss_mask"}`, rebuilt from all trajectories at the end (atomically).
//! - `summary.json`: sampled / kept counts, the reward histogram, failures.
//! - `run.json`: the settings that define the run (policy, the student tokenizer's
//!   fingerprint, episode settings, seed, data sources). A rerun into the same directory
//!   resumes only when they are equal; `samples`, the instance selection, the keep rule
//!   and `batch_size` may change (more samples or instances extend the run).
//! - `.tooltrain.lock`: held while a run writes here; a second run fails at once.

use crate::episode::{EpisodeConfig, Renderer, Trajectory};
use crate::eval::{build_policy, run_batches, select, DataConfig, PolicyConfig, Prompts};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashSet};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tooltrain_model::Tokenizer;

/// One line of `sft.jsonl`: a kept trajectory as the tokens the student model sees and
/// its loss mask (1 on tokens the assistant generated). `tooltrain sample` writes it and
/// `train-sft` reads it; hand-made files may leave out everything but the token lists.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SftRecord {
    /// The benchmark instance it was sampled for.
    #[serde(default)]
    pub instance_id: String,
    /// Sample index of the instance.
    #[serde(default)]
    pub sample: i64,
    /// Reward of the trajectory.
    #[serde(default)]
    pub reward: Option<f64>,
    /// The conversation as chat messages (for reading; training uses the tokens).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub messages: Vec<Value>,
    /// Token ids of the whole conversation.
    pub input_ids: Vec<u32>,
    /// 1 on tokens the assistant generated (trained on), 0 elsewhere.
    pub loss_mask: Vec<u8>,
}

/// Which trajectories become SFT examples.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "rule", rename_all = "snake_case", deny_unknown_fields)]
pub enum KeepRule {
    /// At least one GT location in the answer's top 5 (the paper).
    AnyHit,
    /// Reward at least `threshold`.
    RewardAtLeast { threshold: f64 },
    /// The best of the K samples of an instance, if its reward is above 0.
    BestOfK,
}

/// A `tooltrain sample` config (`configs/sample-*.toml`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SampleConfig {
    #[serde(flatten)]
    pub data: DataConfig,
    /// Output directory.
    pub out: PathBuf,
    /// Episodes per instance (K).
    pub samples: usize,
    pub seed: u64,
    /// Episodes run together.
    pub batch_size: usize,
    /// The student's tokenizer directory: token ids and loss masks are recorded with it
    /// (the model policy uses its own tokenizer when this is empty).
    pub tokenizer: Option<PathBuf>,
    pub keep: KeepRule,
    /// Drop examples whose token ids repeat an earlier kept example.
    pub dedup: bool,
    pub policy: PolicyConfig,
    pub episode: EpisodeConfig,
}

impl Default for SampleConfig {
    fn default() -> Self {
        SampleConfig {
            data: DataConfig::default(),
            out: PathBuf::from("runs/sample"),
            samples: 4,
            seed: 0,
            batch_size: 16,
            tokenizer: None,
            keep: KeepRule::AnyHit,
            dedup: true,
            policy: PolicyConfig::default(),
            episode: EpisodeConfig {
                candidates: crate::episode::Candidates::GtPlusRandom,
                ..EpisodeConfig::default()
            },
        }
    }
}

impl SampleConfig {
    pub fn validate(&self) -> Result<(), String> {
        if self.samples == 0 {
            return Err("samples must be at least 1".into());
        }
        if self.batch_size == 0 {
            return Err("batch_size must be at least 1".into());
        }
        if let KeepRule::RewardAtLeast { threshold } = self.keep {
            if !(0.0..=1.0).contains(&threshold) {
                return Err(format!(
                    "keep.threshold must be in [0, 1] (got {threshold})"
                ));
            }
        }
        self.episode.validate().map_err(|e| format!("episode: {e}"))
    }
}

/// What a sampling run produced.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SampleSummary {
    pub instances: usize,
    pub sampled: usize,
    /// Episodes sampled by earlier runs (resumed).
    pub resumed: usize,
    pub failed: usize,
    pub kept: usize,
    pub duplicates: usize,
    pub instances_with_kept: usize,
    pub mean_reward: f64,
    /// Counts of rewards in [0, 0.1), [0.1, 0.2), ..., [0.9, 1.0].
    pub reward_histogram: [usize; 10],
    pub seconds: f64,
}

/// Reads finished trajectories, cutting a trailing partial line (from a crash).
fn read_existing(path: &Path) -> Result<Vec<Trajectory>, String> {
    let Ok(mut f) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
    else {
        return Ok(vec![]);
    };
    let mut text = String::new();
    f.read_to_string(&mut text)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let complete = text.rfind('\n').map_or(0, |i| i + 1);
    if complete < text.len() {
        tracing::warn!(path = %path.display(), bytes = text.len() - complete, "cutting a partial last line");
        f.set_len(complete as u64)
            .and_then(|()| f.seek(SeekFrom::End(0)).map(|_| ()))
            .map_err(|e| format!("{}: {e}", path.display()))?;
    }
    text[..complete]
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str::<Trajectory>(l)
                .map_err(|e| format!("{}:{}: {e}", path.display(), i + 1))
        })
        .collect()
}

/// The settings that define a sampling run's trajectories (see the module docs).
fn run_identity(cfg: &SampleConfig, policy: &str, tok: &Tokenizer) -> Result<Value, String> {
    let fp = tok.fingerprint().map_err(|e| format!("tokenizer: {e}"))?;
    let to = |v: Result<Value, serde_json::Error>| v.map_err(|e| e.to_string());
    Ok(json!({
        "policy": policy,
        "policy_config": to(serde_json::to_value(&cfg.policy))?,
        "tokenizer": format!("{fp:016x}"),
        "episode": to(serde_json::to_value(&cfg.episode))?,
        "seed": cfg.seed,
        "dataset": cfg.data.dataset,
        "gt": cfg.data.gt,
        "repos_dir": cfg.data.repos_dir,
    }))
}

/// Writes `identity` to `path` for a fresh run; for a run that resumes earlier
/// trajectories, fails naming every setting that differs from the recorded ones.
fn check_identity(path: &Path, identity: &Value, resuming: bool) -> Result<(), String> {
    let recorded: Option<Value> = match std::fs::read_to_string(path) {
        Ok(t) => Some(serde_json::from_str(&t).map_err(|e| format!("{}: {e}", path.display()))?),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(format!("{}: {e}", path.display())),
    };
    if resuming {
        let Some(old) = recorded else {
            return Err(format!(
                "{} holds trajectories but no run.json, so it cannot be checked that they \
                 come from the same settings; use another output directory",
                path.parent().unwrap_or(path).display()
            ));
        };
        let (Some(old), Some(new)) = (old.as_object(), identity.as_object()) else {
            return Err(format!("{}: not a JSON object", path.display()));
        };
        let differ: Vec<&str> = new
            .keys()
            .chain(old.keys())
            .filter(|k| old.get(*k) != new.get(*k))
            .map(String::as_str)
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        if !differ.is_empty() {
            return Err(format!(
                "cannot resume the sampling run in {}: its trajectories were sampled with other \
                 settings ({} differ from {}); use another output directory",
                path.parent().unwrap_or(path).display(),
                differ.join(", "),
                path.display()
            ));
        }
        return Ok(());
    }
    let text = serde_json::to_string_pretty(identity).map_err(|e| e.to_string())?;
    crate::write_atomic(path, text.as_bytes()).map_err(|e| format!("{}: {e}", path.display()))
}

/// Runs rejection sampling. `on_start(total new episodes)`, `on_done(trajectory)`.
pub fn run_sample(
    cfg: &SampleConfig,
    on_start: &dyn Fn(usize),
    on_done: &dyn Fn(&Trajectory),
) -> Result<SampleSummary, String> {
    cfg.validate()?;
    let t0 = std::time::Instant::now();
    let sel = select(&cfg.data)?;
    let (policy, model_tok) = build_policy(&cfg.policy)?;
    let tok = student_tokenizer(cfg, model_tok)?;
    let identity = run_identity(cfg, &policy.name(), &tok)?;
    let renderer = Renderer::new(tok).map_err(|e| format!("tokenizer: {e}"))?;
    let _lock = tooltrain_util::RunLock::acquire(&cfg.out, "tooltrain sample")?;
    let traj_path = cfg.out.join("trajectories.jsonl");
    let existing = read_existing(&traj_path)?;
    check_identity(&cfg.out.join("run.json"), &identity, !existing.is_empty())?;
    let done: HashSet<(String, usize)> = existing
        .iter()
        .map(|t| (t.instance_id.clone(), t.sample))
        .collect();
    let todo = sel.instances.len() * cfg.samples
        - sel
            .instances
            .iter()
            .flat_map(|i| (0..cfg.samples).map(move |s| (i.instance_id.clone(), s)))
            .filter(|k| done.contains(k))
            .count();
    on_start(todo);
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&traj_path)
        .map_err(|e| format!("{}: {e}", traj_path.display()))?;
    let mut new: Vec<Trajectory> = Vec::new();
    let mut pending = String::new();
    let mut io_err: Option<String> = None;
    let mut flush = |pending: &mut String, io_err: &mut Option<String>| {
        if pending.is_empty() || io_err.is_some() {
            return;
        }
        let r = file
            .write_all(pending.as_bytes())
            .and_then(|()| file.flush())
            .and_then(|()| file.sync_data());
        if let Err(e) = r {
            *io_err = Some(format!("{}: {e}", traj_path.display()));
        }
        pending.clear();
    };
    let batch = cfg.batch_size;
    // Each sample gets its own random candidate files: more varied SFT data.
    run_batches(
        &sel,
        &cfg.data,
        cfg.samples,
        cfg.seed,
        Prompts::PerSample,
        batch,
        policy.as_ref(),
        Some(&renderer),
        &cfg.episode,
        &|id, s| done.contains(&(id.to_string(), s)),
        &mut |t, _gt| {
            match serde_json::to_string(&t) {
                Ok(line) => {
                    pending.push_str(&line);
                    pending.push('\n');
                }
                Err(e) => {
                    io_err.get_or_insert(e.to_string());
                }
            }
            on_done(&t);
            new.push(t);
            if new.len() % batch == 0 {
                flush(&mut pending, &mut io_err);
            }
        },
    );
    flush(&mut pending, &mut io_err);
    if let Some(e) = io_err {
        return Err(e);
    }
    let resumed = existing.len();
    let mut all = existing;
    all.extend(new);
    let ids: HashSet<&str> = sel
        .instances
        .iter()
        .map(|i| i.instance_id.as_str())
        .collect();
    all.retain(|t| ids.contains(t.instance_id.as_str()) && t.sample < cfg.samples);
    all.sort_by(|a, b| (&a.instance_id, a.sample).cmp(&(&b.instance_id, b.sample)));
    let (kept, mut summary) = keep(&all, cfg.keep, cfg.dedup);
    summary.instances = sel.instances.len();
    summary.resumed = resumed;
    summary.seconds = t0.elapsed().as_secs_f64();
    write_dataset(cfg, &kept, &summary, &policy.name())?;
    Ok(summary)
}

/// The student's tokenizer: the configured directory, else the model policy's own.
fn student_tokenizer(
    cfg: &SampleConfig,
    model_tok: Option<Arc<Tokenizer>>,
) -> Result<Arc<Tokenizer>, String> {
    match (&cfg.tokenizer, model_tok) {
        (Some(dir), _) => Ok(Arc::new(
            Tokenizer::from_dir(dir).map_err(|e| format!("tokenizer {}: {e}", dir.display()))?,
        )),
        (None, Some(t)) => Ok(t),
        (None, None) => Err(
            "tokenizer: missing (the student's tokenizer directory; SFT examples are stored as its token ids)"
                .into(),
        ),
    }
}

/// `sft.jsonl` (the kept trajectories as [`SftRecord`]s) and `summary.json`, atomically.
fn write_dataset(
    cfg: &SampleConfig,
    kept: &[&Trajectory],
    summary: &SampleSummary,
    policy: &str,
) -> Result<(), String> {
    let mut text = String::new();
    for t in kept {
        let rec = t.tokens.as_ref().expect("kept trajectories have tokens");
        let line = SftRecord {
            instance_id: t.instance_id.clone(),
            sample: t.sample as i64,
            reward: t.reward,
            messages: t.messages.clone(),
            input_ids: rec.tokens.clone(),
            loss_mask: rec.loss_mask.clone(),
        };
        text.push_str(&serde_json::to_string(&line).map_err(|e| e.to_string())?);
        text.push('\n');
    }
    let write = |name: &str, bytes: &[u8]| {
        crate::write_atomic(&cfg.out.join(name), bytes)
            .map_err(|e| format!("{}: {e}", cfg.out.join(name).display()))
    };
    write("sft.jsonl", text.as_bytes())?;
    let mut s = serde_json::to_value(summary).map_err(|e| e.to_string())?;
    s["policy"] = json!(policy);
    s["keep"] = serde_json::to_value(cfg.keep).map_err(|e| e.to_string())?;
    let text = serde_json::to_string_pretty(&s).map_err(|e| e.to_string())?;
    write("summary.json", text.as_bytes())
}

/// Applies the keep rule and de-duplication to all trajectories (sorted by instance,
/// then sample). Failed episodes and episodes without tokens are never kept.
pub fn keep(all: &[Trajectory], rule: KeepRule, dedup: bool) -> (Vec<&Trajectory>, SampleSummary) {
    let mut s = SampleSummary {
        sampled: all.len(),
        ..SampleSummary::default()
    };
    let mut reward_sum = 0.0;
    for t in all {
        let r = t.reward.unwrap_or(0.0);
        reward_sum += r;
        s.reward_histogram[((r * 10.0) as usize).min(9)] += 1;
        s.failed += t.error.is_some() as usize;
    }
    s.mean_reward = reward_sum / all.len().max(1) as f64;
    let usable = |t: &&Trajectory| t.error.is_none() && t.tokens.is_some();
    let mut chosen: Vec<&Trajectory> = match rule {
        KeepRule::AnyHit => all
            .iter()
            .filter(usable)
            .filter(|t| t.gt_hits.unwrap_or(0) > 0)
            .collect(),
        KeepRule::RewardAtLeast { threshold } => all
            .iter()
            .filter(usable)
            .filter(|t| t.reward.unwrap_or(0.0) >= threshold && t.reward.unwrap_or(0.0) > 0.0)
            .collect(),
        KeepRule::BestOfK => {
            let mut best: BTreeMap<&str, &Trajectory> = BTreeMap::new();
            for t in all.iter().filter(usable) {
                let r = t.reward.unwrap_or(0.0);
                if r <= 0.0 {
                    continue;
                }
                let e = best.entry(&t.instance_id).or_insert(t);
                if r > e.reward.unwrap_or(0.0) {
                    *e = t;
                }
            }
            best.into_values().collect()
        }
    };
    if dedup {
        let mut seen = HashSet::new();
        let before = chosen.len();
        chosen.retain(|t| seen.insert(&t.tokens.as_ref().expect("usable").tokens));
        s.duplicates = before - chosen.len();
    }
    s.kept = chosen.len();
    s.instances_with_kept = chosen
        .iter()
        .map(|t| t.instance_id.as_str())
        .collect::<HashSet<_>>()
        .len();
    (chosen, s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::episode::TokenRecord;

    fn t(id: &str, sample: usize, reward: f64, hits: usize, tokens: Vec<u32>) -> Trajectory {
        Trajectory {
            instance_id: id.into(),
            sample,
            reward: Some(reward),
            gt_hits: Some(hits),
            tokens: Some(TokenRecord {
                loss_mask: vec![1; tokens.len()],
                logprobs: vec![0.0; tokens.len()],
                tokens,
                drift: 0,
                has_logprobs: false,
            }),
            ..Trajectory::default()
        }
    }

    #[test]
    fn keep_rules() {
        let mut failed = t("b", 1, 1.0, 1, vec![9]);
        failed.error = Some("x".into());
        let all = vec![
            t("a", 0, 0.0, 0, vec![1]),
            t("a", 1, 0.5, 1, vec![2]),
            t("a", 2, 0.9, 2, vec![2]),
            t("b", 0, 0.3, 1, vec![3]),
            failed,
        ];
        let ids = |v: &[&Trajectory]| {
            v.iter()
                .map(|t| (t.instance_id.clone(), t.sample))
                .collect::<Vec<_>>()
        };
        let (k, s) = keep(&all, KeepRule::AnyHit, false);
        assert_eq!(ids(&k), [("a".into(), 1), ("a".into(), 2), ("b".into(), 0)]);
        assert_eq!(
            (s.sampled, s.kept, s.failed, s.instances_with_kept),
            (5, 3, 1, 2)
        );
        assert_eq!(s.reward_histogram, [1, 0, 0, 1, 0, 1, 0, 0, 0, 2]);
        let (k, s) = keep(&all, KeepRule::AnyHit, true);
        assert_eq!(ids(&k), [("a".into(), 1), ("b".into(), 0)]);
        assert_eq!(s.duplicates, 1);
        let (k, _) = keep(&all, KeepRule::RewardAtLeast { threshold: 0.5 }, false);
        assert_eq!(ids(&k), [("a".into(), 1), ("a".into(), 2)]);
        let (k, _) = keep(&all, KeepRule::BestOfK, false);
        assert_eq!(ids(&k), [("a".into(), 2), ("b".into(), 0)]);
    }

    #[test]
    fn partial_last_line_is_cut() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.jsonl");
        let line = serde_json::to_string(&t("a", 0, 1.0, 1, vec![1, 2])).unwrap();
        std::fs::write(&p, format!("{line}\n{{\"instance_id\": \"b\", \"sam")).unwrap();
        let got = read_existing(&p).unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!(std::fs::read_to_string(&p).unwrap(), format!("{line}\n"));
        std::fs::write(&p, format!("{line}\nnot json\n")).unwrap();
        let e = read_existing(&p).unwrap_err();
        assert!(e.contains("t.jsonl:2:"), "{e}");
    }
}

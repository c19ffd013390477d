//! The RL loop: live RepoSearcher episodes on the current weights, group advantages,
//! mini-batch policy-gradient updates, validation, checkpoints and exact resume.
//!
//! ## One step
//!
//! 1. Take the next `tasks_per_step` tasks of the (per-pass shuffled) task order and run
//!    `group_size` episodes of each with the policy, which shares the trainer's weights
//!    (no copy, no reload). Episode `s` of task `k` at step `t` samples with seeds
//!    derived from `(seed, t, k, s, turn)`; the samples of a task share one prompt.
//! 2. Drop failed episodes (counted); a group left with fewer than 2 is skipped. With
//!    `filter_zero_variance`, groups whose rewards are all equal are left out (counted as
//!    all-0, all-1 or uniform); `dynamic_sampling_rounds` refills the batch from the
//!    next tasks. Advantages come from each group's rewards.
//! 3. Episodes longer than `max_len` are dropped (counted); with `truncated = "mask"`,
//!    episodes cut by a budget leave the loss. The rest are shuffled into
//!    `mini_batches` parts; each part is one optimizer step (gradients accumulated over
//!    token-budget micro-batches), `ppo_epochs` times over.
//! 4. The next step samples from the new weights: the optimizer marks the weights as
//!    changed, so no cached keys or values of the old ones are reused.
//!
//! ## Stopping and resuming
//!
//! The stop flag (SIGTERM, SIGINT) is checked before every rollout turn: a step it
//! interrupts during its rollouts is abandoned, the last finished step is saved, and
//! the run returns. Once the updates of a step began, the step finishes first. A
//! checkpoint holds the weights, the optimizer, the step, the task order's position and
//! its RNG state; every other random choice is derived from the seed and the step, so a
//! resumed run repeats an uninterrupted one bit for bit (the timing keys aside).
//!
//! ## Metrics (`metrics.jsonl`, one line per step)
//!
//! `step`, `lr`, `reward_mean`, `reward_std` (over all finished episodes),
//! `groups_mixed` / `groups_all0` / `groups_all1` / `groups_uniform` (fractions of the
//! step's groups), `groups_filtered`, `groups_too_small`, `resample_rounds`, `adv_mean`,
//! `adv_std`, `adv_abs_max`, `loss` and its parts `pg_loss`, `kl_loss`, `entropy_loss`
//! (means over the step's optimizer steps), `clip_low_frac`, `clip_high_frac`,
//! `clip_dual_frac`, `trust_masked_frac`, `approx_kl` (KL(old || current) per token, k3: r - 1 - ln r),
//! `ratio_min` / `ratio_mean` / `ratio_max`, `ref_kl` (with a reference), `entropy`,
//! `grad_norm` (mean before clipping), `logprob_mismatch_mean` / `_max` (|Δ log p|
//! between the sampler and the trainer on the same weights), `turns`, `tool_calls`,
//! `invalid_turns` (per episode), `exit_rate`, `truncation_rate`, `response_len_mean` /
//! `_max` (generated tokens per episode), `drift`, `episodes`, `failed_episodes`,
//! `dropped_long`, `masked_truncated`, `trained_episodes`, `rollout_s`, `train_s`,
//! `val_s`, `rollout_tokens_per_s` (generated tokens), `train_tokens_per_s`,
//! `rollout_prefill_s` / `rollout_decode_s` / `rollout_sample_s` (generation phases),
//! `prefill_tokens_per_s`, `prefix_reused_tokens`, `prefix_computed_tokens`,
//! `skipped_updates`, `elapsed_s`, and
//! on validation steps `val/reward` and `val/<level>/<metric>` (the paper's table).

use crate::advantage::{advantages, group_kind, shaped_reward, GroupKind};
use crate::aggregate::token_weights;
use crate::config::{OldLogprobs, RlConfig, Truncated, RESUME_FREE_KEYS};
use crate::kl::kl;
use crate::objective::{self, SeqIn, Stats};
use anyhow::{anyhow, bail, Context, Result};
use candle_core::backprop::GradStore;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;
use tooltrain_model::{
    chunked_logprobs_with, default_device, parse_dtype, CausalLM, DType, LrSchedule, Tensor,
    Tokenizer, Var, DEFAULT_VOCAB_CHUNK,
};
use tooltrain_rollout::episode::{run_episodes, EpisodeJob, Renderer, Trajectory};
use tooltrain_rollout::eval::{
    load_index, run_batches, select, PredictionLine, Prompts, Selection,
};
use tooltrain_rollout::gt::locations_from_patch;
use tooltrain_rollout::local::{LocalModel, LocalSampling};
use tooltrain_rollout::metrics::evaluate;
use tooltrain_rollout::{GroundTruth, Location};
use tooltrain_train::batch::{
    build_micro_batch, plan_micro_batches, plan_shared_micro_batches, MicroBatch, TokenSeq,
};
use tooltrain_train::{
    after_step, clip_grad_norm, diverged, ensure_finite, load_model, save_model, Optimizer,
    Progress, RunDir, StopReason, StopSignals,
};
use tooltrain_util::{derive_seed, Rng};

/// What a call of [`train`] did.
#[derive(Debug, Clone)]
pub struct RlSummary {
    /// Steps done in total (including those before a resume).
    pub step: u64,
    pub total_steps: u64,
    /// Mean reward of the last step's episodes.
    pub reward: Option<f64>,
    /// Validation reward before training (when run in this call) and the last one.
    pub first_val_reward: Option<f64>,
    pub val_reward: Option<f64>,
    /// `Some` when the run stopped early (a checkpoint was saved when a step was done).
    pub stopped: Option<StopReason>,
    pub checkpoint: Option<PathBuf>,
    pub final_dir: Option<PathBuf>,
}

/// Trainer state saved with each checkpoint (`state.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct RlState {
    step: u64,
    /// Pass over the tasks (0-based), the position of the next task in its order, and
    /// the order RNG's state at the start of the pass.
    epoch: u64,
    index: usize,
    epoch_rng: u64,
    /// Optimizer steps done, including skipped ones.
    updates: u64,
    /// Optimizer steps skipped for a non-finite loss or gradient norm.
    bad_steps: u64,
    episodes: u64,
    elapsed_s: f64,
    num_tasks: usize,
    /// FNV-1a of the training tasks' ids: a resume on other tasks fails.
    tasks_hash: u64,
}

/// One episode in the loss: its tokens, the mask of the generated ones, and per
/// generated token (in order) the sampler's, the old policy's and the reference's
/// log-probs.
#[derive(Debug, Clone)]
pub struct Sample {
    ids: Vec<u32>,
    mask: Vec<u8>,
    /// Index among the generated tokens of each position (`usize::MAX` elsewhere).
    gen_index: Vec<usize>,
    rollout: Vec<f64>,
    old: Vec<f64>,
    reference: Option<Vec<f64>>,
    advantage: f64,
}

impl TokenSeq for Sample {
    fn ids(&self) -> &[u32] {
        &self.ids
    }
    fn mask(&self) -> &[u8] {
        &self.mask
    }
}

impl Sample {
    /// The episode's advantage.
    pub fn advantage(&self) -> f64 {
        self.advantage
    }

    /// A sample from its tokens and mask (position 0 never counts as generated: it has no
    /// context); `rollout`, `old` and `reference` give one value per generated token.
    pub fn new(
        ids: Vec<u32>,
        mut mask: Vec<u8>,
        rollout: Vec<f64>,
        old: Vec<f64>,
        reference: Option<Vec<f64>>,
        advantage: f64,
    ) -> Result<Sample> {
        if mask.len() != ids.len() {
            bail!("{} mask values for {} tokens", mask.len(), ids.len());
        }
        if let Some(m) = mask.first_mut() {
            *m = 0;
        }
        let mut gen_index = vec![usize::MAX; ids.len()];
        let mut k = 0;
        for (j, &m) in mask.iter().enumerate() {
            if m == 1 {
                gen_index[j] = k;
                k += 1;
            }
        }
        let lens_ok =
            rollout.len() == k && old.len() == k && reference.as_ref().is_none_or(|r| r.len() == k);
        if !lens_ok {
            bail!("a sample with {k} generated tokens needs {k} log-probs of each kind");
        }
        Ok(Sample {
            ids,
            mask,
            gen_index,
            rollout,
            old,
            reference,
            advantage,
        })
    }

    fn generated(&self) -> usize {
        self.rollout.len()
    }
}

/// The objective of one mini-batch (the loss `cfg` describes, aggregated over these
/// samples) and its gradients: what one optimizer step of the trainer uses.
pub fn minibatch_objective(
    model: &CausalLM,
    samples: &[&Sample],
    cfg: &RlConfig,
) -> Result<(Stats, GradStore)> {
    let (stats, grads, _, _) = forward_backward(
        model,
        samples,
        cfg,
        &cfg.objective(),
        1.0 / cfg.rollout.temperature,
        0,
    )?;
    Ok((stats, grads))
}

/// Everything a run works with once it is set up.
struct Session {
    /// The starting checkpoint (the base of LoRA adapters).
    init: PathBuf,
    model: Arc<CausalLM>,
    tokenizer: Arc<Tokenizer>,
    renderer: Renderer,
    policy: LocalModel,
    greedy: LocalModel,
    reference: Option<CausalLM>,
    train: Selection,
    val: Option<Selection>,
    opt: Optimizer,
    vars: Vec<Var>,
    schedule: LrSchedule,
    state: RlState,
    pb: Progress,
}

/// Trains as `cfg` says; SIGTERM / SIGINT stop it as described in the module docs.
pub fn train(cfg: &RlConfig, resume: bool, progress: bool) -> Result<RlSummary> {
    let signals = StopSignals::install()?;
    train_with_stop(cfg, resume, progress, signals.flag())
}

/// [`train`] with a caller-owned stop flag (no signal handlers are installed).
pub fn train_with_stop(
    cfg: &RlConfig,
    resume: bool,
    progress: bool,
    stop: &AtomicBool,
) -> Result<RlSummary> {
    cfg.validate()?;
    let run = RunDir::open(
        &cfg.output_dir,
        cfg,
        resume || cfg.resume,
        RESUME_FREE_KEYS,
        "train-rl",
    )?
    .keep_checkpoints(cfg.keep_checkpoints);
    let mut s = setup(cfg, &run, progress)?;
    let mut metrics = run.start(run.resumed().map(|_| s.state.step))?;
    let total = cfg.max_steps;
    let elapsed_before = s.state.elapsed_s;
    let run_start = Instant::now();
    let mut summary = RlSummary {
        step: s.state.step,
        total_steps: total,
        reward: None,
        first_val_reward: None,
        val_reward: None,
        stopped: None,
        checkpoint: run.resumed().map(Path::to_path_buf),
        final_dir: None,
    };
    let mut last_saved = run.resumed().map(|_| s.state.step);
    s.pb.set_length(total);
    s.pb.start_at(s.state.step);
    // Validation of the starting point (a fresh run only: a resumed run did it).
    if s.val.is_some() && run.resumed().is_none() {
        let t0 = Instant::now();
        let mut line = Map::new();
        let r = validate(&s, cfg, &mut line)?;
        line.insert("step".into(), json!(0));
        line.insert("val_s".into(), json!(t0.elapsed().as_secs_f64()));
        metrics.log(&line)?;
        summary.first_val_reward = Some(r);
        summary.val_reward = Some(r);
    }
    while s.state.step < total {
        let Some(mut line) = rl_step(&mut s, cfg, &run, stop)? else {
            summary.stopped = Some(StopReason::Signal);
            break;
        };
        let last = s.state.step == total;
        if s.val.is_some() && (last || (cfg.val_every > 0 && s.state.step % cfg.val_every == 0)) {
            let t0 = Instant::now();
            let r = validate(&s, cfg, &mut line)?;
            line.insert("val_s".into(), json!(t0.elapsed().as_secs_f64()));
            summary.val_reward = Some(r);
        }
        s.state.elapsed_s = elapsed_before + run_start.elapsed().as_secs_f64();
        line.insert("elapsed_s".into(), json!(s.state.elapsed_s));
        summary.reward = line.get("reward_mean").and_then(Value::as_f64);
        s.pb.set_position(s.state.step);
        s.pb.set_message(progress_message(&line));
        metrics.log(&line)?;
        let (save_now, stopped) =
            after_step(s.state.step, total, cfg.save_every, cfg.stop_at_step, stop);
        if save_now {
            summary.checkpoint = Some(save(&s, &run)?);
            last_saved = Some(s.state.step);
        }
        summary.stopped = stopped;
        if summary.stopped.is_some() {
            break;
        }
    }
    if summary.stopped.is_some() && s.state.step > 0 && last_saved != Some(s.state.step) {
        summary.checkpoint = Some(save(&s, &run)?);
    }
    summary.step = s.state.step;
    if summary.stopped.is_none() {
        let dir = run.export_final(|d| save_model(&s.model, Some(&s.tokenizer), d, &cfg.init))?;
        say(&s.pb, format!("final model in {}", dir.display()));
        summary.final_dir = Some(dir);
    }
    s.pb.finish();
    Ok(summary)
}

fn progress_message(line: &Map<String, Value>) -> String {
    let f = |k: &str| line.get(k).and_then(Value::as_f64).unwrap_or(f64::NAN);
    let mut m = format!(
        "reward {:.3} | mixed {:.2} | rollout {:.0} s ({:.1} tok/s) | train {:.0} s",
        f("reward_mean"),
        f("groups_mixed"),
        f("rollout_s"),
        f("rollout_tokens_per_s"),
        f("train_s")
    );
    if let Some(v) = line.get("val/reward").and_then(Value::as_f64) {
        m.push_str(&format!(" | val {v:.3}"));
    }
    m
}

/// Opens the model, tasks, optimizer and state of a fresh or resumed run.
fn setup(cfg: &RlConfig, run: &RunDir, progress: bool) -> Result<Session> {
    let device = default_device(cfg.cpu)?;
    let dtype = parse_dtype(&cfg.dtype)?;
    tooltrain_model::tune_runtime();
    let pb = if progress {
        Progress::new("train-rl", None, "steps")
    } else {
        Progress::hidden()
    };
    let from = run.resumed().map_or(cfg.init.clone(), Path::to_path_buf);
    if cfg.lora.enabled() && cfg.lora.dropout > 0.0 {
        tracing::warn!(
            "lora.dropout = {}: training passes drop adapter inputs that the rollouts kept, \
             so the trainer's log-probs differ from the rollout's (logprob_mismatch_*) and \
             the on-policy ratio is not 1",
            cfg.lora.dropout
        );
    }
    let ck = load_model(
        &cfg.init,
        run.resumed(),
        &cfg.lora,
        cfg.seed,
        dtype,
        &device,
    )?;
    let tokenizer = Arc::new(ck.tokenizer.ok_or_else(|| {
        anyhow!(
            "{}: the checkpoint has no tokenizer (tokenizer.json); RL renders episodes with it",
            from.display()
        )
    })?);
    let model = Arc::new(ck.model);
    if cfg.bf16_matmuls && !model.set_bf16_matmuls(true) {
        tracing::warn!(
            "bf16_matmuls: neither AMX nor AVX512-BF16 on this CPU (or the model is not f32): training in f32"
        );
    }
    let renderer =
        Renderer::new(tokenizer.clone()).map_err(|e| anyhow!("{}: {e}", from.display()))?;
    let sampling = LocalSampling {
        temperature: cfg.rollout.temperature,
        top_p: 1.0,
        top_k: 0,
        max_batch: cfg.rollout.max_batch,
        reuse_prefixes: cfg.rollout.reuse_prefixes,
        bf16: cfg.rollout.bf16,
        kv_bf16: cfg.rollout.kv_bf16,
    };
    let name = cfg.init.display().to_string();
    let policy = LocalModel::new(model.clone(), tokenizer.clone(), sampling.clone(), &name)
        .map_err(|e| anyhow!("rollout: {e}"))?;
    let greedy = LocalModel::new(
        model.clone(),
        tokenizer.clone(),
        LocalSampling {
            temperature: 0.0,
            ..sampling
        },
        &name,
    )
    .map_err(|e| anyhow!("validation policy: {e}"))?;
    // The reference is loaded only when the KL term is on.
    let reference = if cfg.kl_coef > 0.0 {
        let p = cfg.reference.clone().unwrap_or_else(|| cfg.init.clone());
        let r = tooltrain_model::load(&p, dtype, &device)
            .with_context(|| format!("loading the reference {}", p.display()))?;
        for (name, v) in r.model.params() {
            let mine = model.params().get(name).map(|m| m.dims().to_vec());
            if mine.as_deref() != Some(v.dims()) {
                bail!(
                    "the reference {} does not match the policy: `{name}` has shape {:?} vs {mine:?}",
                    p.display(),
                    v.dims()
                );
            }
        }
        Some(r.model)
    } else {
        None
    };
    let train = select(&cfg.train_data).map_err(|e| anyhow!("train_data: {e}"))?;
    let val = if cfg.has_validation() {
        Some(select(&cfg.val_data).map_err(|e| anyhow!("val_data: {e}"))?)
    } else {
        None
    };
    let num_tasks = train.instances.len();
    let tasks_hash = tooltrain_util::fnv1a(
        0,
        train
            .instances
            .iter()
            .flat_map(|i| i.instance_id.bytes().chain([0u8])),
    );
    let schedule = LrSchedule::WarmupCosine {
        lr: cfg.lr,
        warmup_steps: cfg.warmup_steps,
        // Constant after the warm-up: a cosine over an endless span.
        total_steps: u64::MAX,
        min_lr: cfg.lr,
    };
    let mut opt = Optimizer::new(&model, &cfg.optim())?;
    let state = match (run.resumed_state::<RlState>()?, run.resumed()) {
        (Some(st), Some(ck)) => {
            if st.num_tasks != num_tasks || st.tasks_hash != tasks_hash {
                bail!(
                    "{}: the training tasks changed since the checkpoint ({} tasks, hash \
                     {:016x}; now {num_tasks}, hash {tasks_hash:016x})",
                    ck.display(),
                    st.num_tasks,
                    st.tasks_hash
                );
            }
            opt.load(ck, &model)?;
            if opt.steps() + st.bad_steps != st.updates {
                bail!(
                    "{}: optimizer state is at update {} ({} skipped), trainer state at {}",
                    ck.display(),
                    opt.steps(),
                    st.bad_steps,
                    st.updates
                );
            }
            st
        }
        _ => RlState {
            step: 0,
            epoch: 0,
            index: 0,
            epoch_rng: cfg.seed,
            updates: 0,
            bad_steps: 0,
            episodes: 0,
            elapsed_s: 0.0,
            num_tasks,
            tasks_hash,
        },
    };
    say(
        &pb,
        format!(
            "{} parameters; {num_tasks} training tasks, {} validation tasks; {} tasks x {} \
             episodes a step, {} steps{}",
            model.num_params(),
            val.as_ref().map_or(0, |v| v.instances.len()),
            cfg.tasks_per_step,
            cfg.group_size,
            cfg.max_steps,
            if run.resumed().is_some() {
                format!("; resuming at step {}", state.step)
            } else {
                String::new()
            }
        ),
    );
    let vars: Vec<Var> = model.trainable().values().cloned().collect();
    Ok(Session {
        init: cfg.init.clone(),
        model,
        tokenizer,
        renderer,
        policy,
        greedy,
        reference,
        train,
        val,
        opt,
        vars,
        schedule,
        state,
        pb,
    })
}

/// The next `k` tasks of the order (a new shuffled pass when one ends).
fn next_tasks(st: &mut RlState, n: usize, k: usize, shuffle: bool) -> Vec<usize> {
    let mut out = Vec::with_capacity(k);
    while out.len() < k {
        if st.index >= n {
            st.epoch += 1;
            st.index = 0;
            st.epoch_rng = Rng::new(st.epoch_rng).next_u64();
        }
        let order = task_order(st.epoch_rng, n, shuffle);
        let take = (k - out.len()).min(n - st.index);
        out.extend_from_slice(&order[st.index..st.index + take]);
        st.index += take;
    }
    out
}

fn task_order(rng_state: u64, n: usize, shuffle: bool) -> Vec<usize> {
    let mut v: Vec<usize> = (0..n).collect();
    if shuffle {
        Rng::new(rng_state).shuffle(&mut v);
    }
    v
}

/// The episodes of `tasks` (indices into the training selection), `n` each.
fn rollout(
    s: &Session,
    cfg: &RlConfig,
    tasks: &[usize],
    stop: &AtomicBool,
) -> Result<Vec<Vec<Trajectory>>> {
    let step = s.state.step;
    let built: Vec<Result<(Arc<tooltrain_rollout::RepoIndex>, Option<Vec<Location>>), String>> =
        tasks
            .par_iter()
            .map(|&k| {
                let inst = &s.train.instances[k];
                let idx = load_index(&cfg.train_data, inst)?;
                let gt = if s.train.derive_gt {
                    Some(
                        locations_from_patch(&inst.patch, &idx)
                            .map_err(|e| format!("deriving GT from the gold patch: {e}"))?,
                    )
                } else {
                    s.train.gt.get(&inst.instance_id).cloned()
                };
                Ok((Arc::new(idx), gt))
            })
            .collect();
    let mut jobs = Vec::new();
    let mut failed: BTreeMap<usize, String> = BTreeMap::new();
    for (g, (&k, b)) in tasks.iter().zip(built).enumerate() {
        match b {
            Ok((index, gt)) if gt.is_some() => {
                for sample in 0..cfg.group_size {
                    jobs.push(EpisodeJob {
                        instance: s.train.instances[k].clone(),
                        index: index.clone(),
                        gt: gt.clone(),
                        sample,
                        seed: derive_seed(&[cfg.seed, step, k as u64, sample as u64]),
                        prompt_seed: derive_seed(&[cfg.seed, step, k as u64]),
                    });
                }
            }
            Ok(_) => {
                failed.insert(g, "no ground truth for this task".into());
            }
            Err(e) => {
                failed.insert(g, e);
            }
        }
    }
    // Results depend only on the weights and the seeds, not on what ran before.
    s.policy.clear_prefixes();
    let mut trajs = run_episodes(
        &jobs,
        &s.policy,
        Some(&s.renderer),
        &cfg.episode,
        Some(stop),
        &|_| {},
    )
    .into_iter();
    let mut groups = Vec::with_capacity(tasks.len());
    for (g, &k) in tasks.iter().enumerate() {
        match failed.get(&g) {
            Some(e) => groups.push(
                (0..cfg.group_size)
                    .map(|sample| Trajectory {
                        instance_id: s.train.instances[k].instance_id.clone(),
                        sample,
                        error: Some(e.clone()),
                        ..Trajectory::default()
                    })
                    .collect(),
            ),
            None => groups.push(trajs.by_ref().take(cfg.group_size).collect()),
        }
    }
    Ok(groups)
}

/// Per-step counters of the rollouts.
#[derive(Default)]
struct RolloutTally {
    episodes: usize,
    failed: usize,
    rewards: Vec<f64>,
    /// The rewards with `invalid_turn_penalty` (what the advantages are computed from).
    shaped: Vec<f64>,
    turns: usize,
    tool_calls: usize,
    invalid: usize,
    exited: usize,
    truncated: usize,
    drift: usize,
    gen_tokens: usize,
    gen_max: usize,
    groups: usize,
    kinds: [usize; 4],
    too_small: usize,
    filtered: usize,
}

impl RolloutTally {
    fn add_episode(&mut self, t: &Trajectory, penalty: f64) {
        self.episodes += 1;
        if t.error.is_some() {
            self.failed += 1;
            return;
        }
        self.rewards.push(t.reward.unwrap_or(0.0));
        self.shaped.push(shaped_reward(
            t.reward.unwrap_or(0.0),
            t.invalid_turns,
            penalty,
        ));
        self.turns += t.turns;
        self.tool_calls += t.tool_calls;
        self.invalid += t.invalid_turns;
        self.exited += t.exited as usize;
        self.truncated += is_truncated(t) as usize;
        if let Some(r) = &t.tokens {
            self.drift += r.drift;
            let g = r.loss_mask.iter().filter(|&&m| m == 1).count();
            self.gen_tokens += g;
            self.gen_max = self.gen_max.max(g);
        }
    }
}

/// An episode cut by a budget: a turn hit its token cap, or the context ran out.
fn is_truncated(t: &Trajectory) -> bool {
    t.truncated_turns > 0 || t.context_exhausted
}

/// A kept group: its finished episodes and their rewards.
struct Group {
    trajs: Vec<Trajectory>,
    rewards: Vec<f64>,
}

/// One RL step; `None` when the stop flag interrupted its rollouts (nothing changed).
fn rl_step(
    s: &mut Session,
    cfg: &RlConfig,
    run: &RunDir,
    stop: &AtomicBool,
) -> Result<Option<Map<String, Value>>> {
    let t_roll = Instant::now();
    let prefix0 = s.policy.prefix_stats();
    let mut st = s.state.clone();
    let n_tasks = s.train.instances.len();
    let mut tally = RolloutTally::default();
    let mut kept: Vec<Group> = Vec::new();
    let mut rounds = 0usize;
    let mut dumped: Vec<Trajectory> = Vec::new();
    loop {
        let want = cfg.tasks_per_step - kept.len();
        let tasks = next_tasks(&mut st, n_tasks, want, cfg.shuffle);
        let groups = rollout(s, cfg, &tasks, stop)?;
        if stop.load(Ordering::SeqCst) {
            return Ok(None);
        }
        for g in groups {
            tally.groups += 1;
            for t in &g {
                tally.add_episode(t, cfg.invalid_turn_penalty);
            }
            let ok: Vec<Trajectory> = g
                .iter()
                .filter(|t| t.error.is_none() && t.tokens.is_some() && t.reward.is_some())
                .cloned()
                .collect();
            if cfg.dump_rollouts {
                dumped.extend(g);
            }
            if ok.len() < 2 {
                tally.too_small += 1;
                continue;
            }
            let rewards: Vec<f64> = ok
                .iter()
                .map(|t| {
                    let r = t.reward.unwrap_or(0.0);
                    shaped_reward(r, t.invalid_turns, cfg.invalid_turn_penalty)
                })
                .collect();
            let kind = group_kind(&rewards);
            tally.kinds[kind as usize] += 1;
            if cfg.filter_zero_variance && kind != GroupKind::Mixed {
                tally.filtered += 1;
                continue;
            }
            kept.push(Group { trajs: ok, rewards });
        }
        let refill = cfg.filter_zero_variance
            && rounds < cfg.dynamic_sampling_rounds
            && kept.len() < cfg.tasks_per_step;
        if !refill {
            break;
        }
        rounds += 1;
    }
    let rollout_s = t_roll.elapsed().as_secs_f64();
    let prefix1 = s.policy.prefix_stats();
    // The update needs the memory the rollouts' caches held: the kept prefixes (the
    // rollouts', and the last validation's) are stale once the weights change (both
    // start without them anyway), and the KV buffers they and the finished caches gave
    // back to the pool are freed.
    s.policy.clear_prefixes();
    s.greedy.clear_prefixes();
    // So are the weights' copies decoding made (bf16 tiles, f32 panels).
    s.model.release_decoding_weights();
    let released_kv = tooltrain_model::release_kv_buffers();
    tracing::debug!(
        "freed {:.0} MiB of KV buffers before the update",
        released_kv as f64 / 1048576.0
    );
    let t_train = Instant::now();
    let (samples, adv, counts) = build_samples(s, cfg, &mut kept)?;
    let mismatch = if cfg.old_logprobs == OldLogprobs::Recompute {
        Some(recompute_old(s, cfg, &samples)?)
    } else {
        None
    };
    let mut samples = samples;
    if let Some(m) = &mismatch {
        for (smp, old) in samples.iter_mut().zip(&m.old) {
            smp.old = old.clone();
        }
    }
    let upd = update(s, cfg, &mut st, &samples, run)?;
    let train_s = t_train.elapsed().as_secs_f64();
    st.step += 1;
    st.episodes += tally.episodes as u64;
    s.state = st;
    if cfg.dump_rollouts {
        dump(run, s.state.step, &dumped, &kept, &adv)?;
    }
    // The metrics line.
    let mut m = Map::new();
    let put = |m: &mut Map<String, Value>, k: &str, v: f64| {
        m.insert(k.into(), json!(if v.is_finite() { Some(v) } else { None }));
    };
    m.insert("step".into(), json!(s.state.step));
    put(
        &mut m,
        "lr",
        s.schedule.lr_at(s.state.updates.saturating_sub(1)),
    );
    let fin = tally.rewards.len().max(1) as f64;
    // (`+ 0.0`: an empty f64 sum is -0.0.)
    let rmean = tally.rewards.iter().sum::<f64>() / fin + 0.0;
    let rstd = (tally
        .rewards
        .iter()
        .map(|r| (r - rmean).powi(2))
        .sum::<f64>()
        / fin)
        .sqrt();
    put(&mut m, "reward_mean", rmean);
    put(&mut m, "reward_std", rstd);
    if cfg.invalid_turn_penalty > 0.0 {
        let shaped = tally.shaped.iter().sum::<f64>() / fin + 0.0;
        put(&mut m, "shaped_reward_mean", shaped);
    }
    let g = tally.groups.max(1) as f64;
    put(
        &mut m,
        "groups_mixed",
        tally.kinds[GroupKind::Mixed as usize] as f64 / g,
    );
    put(
        &mut m,
        "groups_all0",
        tally.kinds[GroupKind::AllZero as usize] as f64 / g,
    );
    put(
        &mut m,
        "groups_all1",
        tally.kinds[GroupKind::AllOne as usize] as f64 / g,
    );
    put(
        &mut m,
        "groups_uniform",
        tally.kinds[GroupKind::Uniform as usize] as f64 / g,
    );
    m.insert("groups".into(), json!(tally.groups));
    m.insert("groups_filtered".into(), json!(tally.filtered));
    m.insert("groups_too_small".into(), json!(tally.too_small));
    m.insert("resample_rounds".into(), json!(rounds));
    let na = adv.len().max(1) as f64;
    let amean = adv.iter().sum::<f64>() / na;
    put(&mut m, "adv_mean", amean);
    put(
        &mut m,
        "adv_std",
        (adv.iter().map(|a| (a - amean).powi(2)).sum::<f64>() / na).sqrt(),
    );
    put(
        &mut m,
        "adv_abs_max",
        adv.iter().fold(0.0, |x: f64, a| x.max(a.abs())),
    );
    // Without an update (every group filtered) the update keys are null (0 / 0).
    let u = upd.updates as f64;
    let tok = upd.stats.tokens as f64;
    put(&mut m, "loss", upd.stats.loss() / u);
    put(&mut m, "pg_loss", upd.stats.pg_loss / u);
    put(&mut m, "kl_loss", upd.stats.kl_loss / u);
    put(&mut m, "entropy_loss", upd.stats.entropy_loss / u);
    put(&mut m, "clip_low_frac", upd.stats.clipped_low as f64 / tok);
    put(
        &mut m,
        "clip_high_frac",
        upd.stats.clipped_high as f64 / tok,
    );
    put(
        &mut m,
        "clip_dual_frac",
        upd.stats.clipped_dual as f64 / tok,
    );
    put(&mut m, "trust_masked_frac", upd.stats.masked as f64 / tok);
    put(&mut m, "approx_kl", upd.stats.approx_kl_sum / tok);
    let none = upd.stats.tokens == 0;
    put(
        &mut m,
        "ratio_min",
        if none { f64::NAN } else { upd.stats.ratio_min },
    );
    put(&mut m, "ratio_mean", upd.stats.ratio_sum / tok);
    put(
        &mut m,
        "ratio_max",
        if none { f64::NAN } else { upd.stats.ratio_max },
    );
    if s.reference.is_some() {
        put(&mut m, "ref_kl", counts.ref_kl_mean);
    }
    put(&mut m, "entropy", upd.stats.entropy_sum / tok);
    put(&mut m, "grad_norm", upd.grad_norm_sum / u);
    let mm = mismatch.map_or(upd.mismatch, |m| (m.mean, m.max));
    put(&mut m, "logprob_mismatch_mean", mm.0);
    put(&mut m, "logprob_mismatch_max", mm.1);
    let ep = (tally.episodes - tally.failed).max(1) as f64;
    put(&mut m, "turns", tally.turns as f64 / ep);
    put(&mut m, "tool_calls", tally.tool_calls as f64 / ep);
    put(&mut m, "invalid_turns", tally.invalid as f64 / ep);
    put(&mut m, "exit_rate", tally.exited as f64 / ep);
    put(&mut m, "truncation_rate", tally.truncated as f64 / ep);
    put(&mut m, "response_len_mean", tally.gen_tokens as f64 / ep);
    m.insert("response_len_max".into(), json!(tally.gen_max));
    put(&mut m, "drift", tally.drift as f64 / ep);
    m.insert("episodes".into(), json!(tally.episodes));
    m.insert("failed_episodes".into(), json!(tally.failed));
    m.insert("dropped_long".into(), json!(counts.dropped_long));
    m.insert("masked_truncated".into(), json!(counts.masked_truncated));
    m.insert("trained_episodes".into(), json!(samples.len()));
    put(&mut m, "rollout_s", rollout_s);
    put(&mut m, "train_s", train_s);
    put(
        &mut m,
        "rollout_tokens_per_s",
        tally.gen_tokens as f64 / rollout_s.max(1e-9),
    );
    put(
        &mut m,
        "train_tokens_per_s",
        upd.tokens as f64 / train_s.max(1e-9),
    );
    m.insert(
        "prefix_reused_tokens".into(),
        json!(prefix1.reused_tokens - prefix0.reused_tokens),
    );
    m.insert(
        "prefix_computed_tokens".into(),
        json!(prefix1.computed_tokens - prefix0.computed_tokens),
    );
    let (g0, g1) = (prefix0.generation, prefix1.generation);
    put(&mut m, "rollout_prefill_s", g1.prefill_s - g0.prefill_s);
    put(&mut m, "rollout_decode_s", g1.decode_s - g0.decode_s);
    put(&mut m, "rollout_sample_s", g1.sample_s - g0.sample_s);
    put(
        &mut m,
        "prefill_tokens_per_s",
        (g1.prefill_tokens - g0.prefill_tokens) as f64 / (g1.prefill_s - g0.prefill_s).max(1e-9),
    );
    m.insert("skipped_updates".into(), json!(s.state.bad_steps));
    Ok(Some(m))
}

/// Counters of [`build_samples`].
#[derive(Default)]
struct SampleCounts {
    dropped_long: usize,
    masked_truncated: usize,
    ref_kl_mean: f64,
}

/// The episodes of the kept groups as loss samples with their advantages (the KL
/// penalty folded into the rewards first when `kl_in_reward`), and the advantages of
/// every kept episode.
fn build_samples(
    s: &Session,
    cfg: &RlConfig,
    kept: &mut [Group],
) -> Result<(Vec<Sample>, Vec<f64>, SampleCounts)> {
    let mut counts = SampleCounts::default();
    let t_inv = 1.0 / cfg.rollout.temperature;
    // Reference log-probs of every kept episode (the KL needs them).
    let refs: Vec<Vec<Option<Vec<f64>>>> = match &s.reference {
        Some(r) => kept
            .iter()
            .map(|g| {
                let seqs: Vec<&Trajectory> = g.trajs.iter().collect();
                score_generated(r, &seqs, t_inv, cfg.micro_batch_tokens, cfg.share_prefixes)
                    .map(|v| v.into_iter().map(Some).collect())
            })
            .collect::<Result<_>>()?,
        None => kept.iter().map(|g| vec![None; g.trajs.len()]).collect(),
    };
    let (mut kl_sum, mut kl_n) = (0.0, 0usize);
    for (g, rg) in kept.iter_mut().zip(&refs) {
        for ((t, r), reward) in g.trajs.iter().zip(rg).zip(g.rewards.iter_mut()) {
            let (Some(r), Some(rec)) = (r, &t.tokens) else {
                continue;
            };
            let lp = generated_logprobs(rec);
            let k: f64 = lp
                .iter()
                .zip(r)
                .map(|(&x, &y)| kl(x, y, cfg.kl_estimator).0)
                .sum();
            kl_sum += k;
            kl_n += lp.len();
            if cfg.kl_in_reward {
                *reward -= cfg.kl_coef * k;
            }
        }
    }
    counts.ref_kl_mean = kl_sum / kl_n.max(1) as f64;
    let mut samples = Vec::new();
    let mut all_adv = Vec::new();
    for (g, rg) in kept.iter().zip(refs) {
        let adv = advantages(&g.rewards, cfg.advantage);
        for ((t, a), r) in g.trajs.iter().zip(&adv).zip(rg) {
            all_adv.push(*a);
            let rec = t.tokens.as_ref().expect("kept episodes have tokens");
            if rec.tokens.len() > cfg.max_len {
                counts.dropped_long += 1;
                continue;
            }
            if cfg.truncated == Truncated::Mask && is_truncated(t) {
                counts.masked_truncated += 1;
                continue;
            }
            if !rec.has_logprobs {
                bail!(
                    "episode {} sample {}: the rollout has no log-probs",
                    t.instance_id,
                    t.sample
                );
            }
            let rollout = generated_logprobs(rec);
            if rollout.is_empty() {
                continue;
            }
            samples.push(Sample::new(
                rec.tokens.clone(),
                rec.loss_mask.clone(),
                rollout.clone(),
                rollout,
                r,
                *a,
            )?);
        }
    }
    Ok((samples, all_adv, counts))
}

/// The recorded log-probs of an episode's generated tokens (position 0 never counts: it
/// has no context).
fn generated_logprobs(rec: &tooltrain_rollout::episode::TokenRecord) -> Vec<f64> {
    rec.loss_mask
        .iter()
        .zip(&rec.logprobs)
        .enumerate()
        .filter(|(j, (&m, _))| m == 1 && *j > 0)
        .map(|(_, (_, &lp))| lp as f64)
        .collect()
}

/// Log-probs (at temperature `1 / t_inv`) of the generated tokens of `trajs` under
/// `model`, without gradients.
fn score_generated(
    model: &CausalLM,
    trajs: &[&Trajectory],
    t_inv: f64,
    budget: usize,
    share: bool,
) -> Result<Vec<Vec<f64>>> {
    let samples: Vec<Sample> = trajs
        .iter()
        .map(|t| {
            let rec = t.tokens.as_ref().expect("scored episodes have tokens");
            let lp = generated_logprobs(rec);
            Sample::new(
                rec.tokens.clone(),
                rec.loss_mask.clone(),
                lp.clone(),
                lp,
                None,
                0.0,
            )
        })
        .collect::<Result<_>>()?;
    let refs: Vec<&Sample> = samples.iter().collect();
    score_samples(model, &refs, t_inv, budget, share)
}

/// The micro-batches of `samples` within `budget` tokens each (at least the longest
/// sample): with prefix sharing, rows as long as the budget; else packed or one a row.
fn plan(samples: &[&Sample], budget: usize, packing: bool, share: bool) -> Vec<MicroBatch> {
    let cap = samples.iter().map(|s| s.ids.len()).max().unwrap_or(1);
    let budget = budget.max(cap);
    if share {
        plan_shared_micro_batches(samples, budget, budget)
    } else {
        let lens: Vec<usize> = samples.iter().map(|s| s.ids.len()).collect();
        plan_micro_batches(&lens, cap, budget, packing)
    }
}

/// Per sample, the log-probs of its mask-1 tokens (in order) at temperature `1/t_inv`.
fn score_samples(
    model: &CausalLM,
    samples: &[&Sample],
    t_inv: f64,
    budget: usize,
    share: bool,
) -> Result<Vec<Vec<f64>>> {
    let mut out: Vec<Vec<f64>> = vec![Vec::new(); samples.len()];
    let w = head_weight(model, false)?;
    let hidden = model.config().hidden_size;
    for mb in plan(samples, budget, true, share) {
        let t = build_micro_batch(samples, &mb, model.device())?;
        if t.kept == 0 {
            continue;
        }
        let hid = model.hidden_states(&t.ids, &t.layout)?;
        let h = scaled(
            &hid.reshape(((), hidden))?.index_select(&t.positions, 0)?,
            t_inv,
        )?;
        // The head in the precision of the layers (bf16 products under `bf16_matmuls`).
        let bf16 = model.bf16_matmuls_active();
        let lp: Vec<Vec<f32>> =
            chunked_logprobs_with(&h, &w, &t.targets, DEFAULT_VOCAB_CHUNK, bf16)?.to_vec2()?;
        // Each sequence lies in one micro-batch, its tokens in order.
        for ((i, _), v) in t.owners.iter().zip(lp) {
            out[*i].push(v[0] as f64);
        }
    }
    Ok(out)
}

/// The output projection in f32 (half-precision weights are upcast: a log-softmax over
/// the vocabulary in bf16 is too coarse).
fn head_weight(model: &CausalLM, track: bool) -> candle_core::Result<Tensor> {
    let w = model.lm_head_weight(track);
    Ok(if w.dtype() == DType::F32 {
        w
    } else {
        w.to_dtype(DType::F32)?
    })
}

/// Hidden states in f32 divided by the temperature (logits / T = (h / T) W^T).
fn scaled(h: &Tensor, t_inv: f64) -> candle_core::Result<Tensor> {
    let h = if h.dtype() == DType::F32 {
        h.clone()
    } else {
        h.to_dtype(DType::F32)?
    };
    Ok(if t_inv == 1.0 { h } else { (h * t_inv)? })
}

/// Old log-probs recomputed by the trainer, and their distance to the rollout's.
struct Recomputed {
    old: Vec<Vec<f64>>,
    mean: f64,
    max: f64,
}

fn recompute_old(s: &Session, cfg: &RlConfig, samples: &[Sample]) -> Result<Recomputed> {
    let refs: Vec<&Sample> = samples.iter().collect();
    let old = score_samples(
        &s.model,
        &refs,
        1.0 / cfg.rollout.temperature,
        cfg.micro_batch_tokens,
        cfg.share_prefixes,
    )?;
    let (mut sum, mut max, mut n) = (0.0, 0.0f64, 0usize);
    for (o, smp) in old.iter().zip(samples) {
        for (a, b) in o.iter().zip(&smp.rollout) {
            let d = (a - b).abs();
            sum += d;
            max = max.max(d);
            n += 1;
        }
    }
    Ok(Recomputed {
        old,
        mean: sum / n.max(1) as f64,
        max,
    })
}

/// What the updates of a step did.
#[derive(Default)]
struct UpdateOut {
    updates: usize,
    stats: Stats,
    grad_norm_sum: f64,
    tokens: usize,
    /// |Δ log p| between the rollout and the trainer before the first update.
    mismatch: (f64, f64),
}

/// `ppo_epochs` passes over `samples` in `mini_batches` optimizer steps each.
fn update(
    s: &mut Session,
    cfg: &RlConfig,
    st: &mut RlState,
    samples: &[Sample],
    run: &RunDir,
) -> Result<UpdateOut> {
    let mut out = UpdateOut::default();
    if samples.is_empty() {
        out.mismatch = (f64::NAN, f64::NAN);
        return Ok(out);
    }
    let obj = cfg.objective();
    let t_inv = 1.0 / cfg.rollout.temperature;
    let (mut mm_sum, mut mm_max, mut mm_n) = (0.0, 0.0f64, 0usize);
    for epoch in 0..cfg.ppo_epochs {
        let mut order: Vec<usize> = (0..samples.len()).collect();
        Rng::new(derive_seed(&[cfg.seed, st.step, epoch as u64, 0x6d62])).shuffle(&mut order);
        if cfg.share_prefixes {
            keep_prompts_together(&mut order, samples);
        }
        let parts = cfg.mini_batches.min(samples.len());
        for p in 0..parts {
            let lo = p * order.len() / parts;
            let hi = (p + 1) * order.len() / parts;
            let mb: Vec<&Sample> = order[lo..hi].iter().map(|&i| &samples[i]).collect();
            let first = epoch == 0 && p == 0;
            let (stats, grads, tokens, mm) =
                forward_backward(&s.model, &mb, cfg, &obj, t_inv, st.updates)?;
            if first {
                (mm_sum, mm_max, mm_n) = mm;
            }
            let (grad_norm, scale) = clip_grad_norm(&grads, &s.vars, cfg.optim().clip_threshold())?;
            let lr = s.schedule.lr_at(st.updates);
            let loss = stats.loss();
            st.updates += 1;
            if loss.is_finite() && grad_norm.is_finite() {
                s.opt.step(&s.model, &grads, lr, scale)?;
            } else {
                st.bad_steps += 1;
                check_divergence(st, cfg, run, loss, grad_norm, &s.pb)?;
            }
            out.updates += 1;
            out.stats.merge(&stats);
            out.grad_norm_sum += grad_norm;
            out.tokens += tokens;
        }
    }
    out.mismatch = (mm_sum / mm_n.max(1) as f64, mm_max);
    Ok(out)
}

/// Reorders `order` so that samples with the same prompt (the tokens before the first
/// generated one: a group's) follow each other, groups in the order of their first sample:
/// mini-batches then split few groups, and prefix sharing computes each prompt once.
fn keep_prompts_together(order: &mut [usize], samples: &[Sample]) {
    let prompt = |i: usize| {
        let s = &samples[i];
        let n = s.mask.iter().position(|&m| m == 1).unwrap_or(s.ids.len());
        &s.ids[..n]
    };
    let mut first: Vec<(&[u32], usize)> = Vec::new();
    let rank: Vec<usize> = order
        .iter()
        .map(|&i| match first.iter().find(|(p, _)| *p == prompt(i)) {
            Some(&(_, r)) => r,
            None => {
                first.push((prompt(i), first.len()));
                first.len() - 1
            }
        })
        .collect();
    let mut keyed: Vec<(usize, usize)> = rank.into_iter().zip(order.iter().copied()).collect();
    keyed.sort_by_key(|&(r, _)| r);
    for (o, (_, i)) in order.iter_mut().zip(keyed) {
        *o = i;
    }
}

/// After a skipped update: warns, or fails once more than `max_bad_steps` were skipped.
fn check_divergence(
    st: &RlState,
    cfg: &RlConfig,
    run: &RunDir,
    loss: f64,
    grad_norm: f64,
    pb: &Progress,
) -> Result<()> {
    let what = format!(
        "step {}, update {}: loss {loss}, gradient norm {grad_norm} (not finite); the update \
         was skipped ({} of {} allowed skips)",
        st.step + 1,
        st.updates,
        st.bad_steps,
        cfg.max_bad_steps
    );
    if st.bad_steps <= cfg.max_bad_steps {
        pb.suspend(|| tracing::warn!("{what}"));
        return Ok(());
    }
    Err(diverged(run, &what))
}

/// The objective of one mini-batch and its gradients, accumulated over token-budget
/// micro-batches; also the input tokens and the |Δ log p| between the rollout and these
/// log-probs (sum, max, count).
fn forward_backward(
    model: &CausalLM,
    mb: &[&Sample],
    cfg: &RlConfig,
    obj: &objective::Settings,
    t_inv: f64,
    update: u64,
) -> Result<(Stats, GradStore, usize, (f64, f64, usize))> {
    let gen: Vec<usize> = mb.iter().map(|s| s.generated()).collect();
    let weights = token_weights(&gen, cfg.aggregation, cfg.norm_len());
    let plan = plan(mb, cfg.micro_batch_tokens, cfg.packing, cfg.share_prefixes);
    let hidden = model.config().hidden_size;
    let mut acc = GradStore::default();
    let mut stats = Stats::default();
    let mut tokens = 0;
    let mut mm = (0.0, 0.0f64, 0usize);
    let w = head_weight(model, true)?;
    for (k, plan_mb) in plan.iter().enumerate() {
        // LoRA dropout masks: a function of (run seed, update, micro-batch), so a resumed
        // run draws the same ones.
        model.set_dropout_seed(derive_seed(&[cfg.seed, update, k as u64, 0x64726f70]));
        let t = build_micro_batch(mb, plan_mb, model.device())?;
        tokens += t.tokens;
        if t.kept == 0 {
            continue;
        }
        let mut mb_stats = Stats::default();
        let (_, mut grads) =
            model.forward_backward(&t.ids, &t.layout, cfg.checkpointing, |hid| {
                let h = hid.reshape(((), hidden))?.index_select(&t.positions, 0)?;
                let h = scaled(&h, t_inv)?;
                let bf16 = model.bf16_matmuls_active();
                let out = chunked_logprobs_with(&h, &w, &t.targets, DEFAULT_VOCAB_CHUNK, bf16)?;
                let vals: Vec<Vec<f32>> = out.to_vec2()?;
                let mut coef = vec![0f32; 2 * t.kept];
                // The kept positions of one sequence are contiguous, in token order.
                let mut k0 = 0;
                while k0 < t.kept {
                    let i = t.owners[k0].0;
                    let mut k1 = k0;
                    while k1 < t.kept && t.owners[k1].0 == i {
                        k1 += 1;
                    }
                    let smp = mb[i];
                    let idx: Vec<usize> = (k0..k1).map(|k| smp.gen_index[t.owners[k].1]).collect();
                    let x: Vec<f64> = (k0..k1).map(|k| vals[k][0] as f64).collect();
                    let ent: Vec<f64> = (k0..k1).map(|k| vals[k][1] as f64).collect();
                    let pick = |v: &[f64]| idx.iter().map(|&g| v[g]).collect::<Vec<f64>>();
                    let (old, roll) = (pick(&smp.old), pick(&smp.rollout));
                    let reference = smp.reference.as_ref().map(|r| pick(r));
                    let wts: Vec<f64> = idx.iter().map(|&g| weights[i][g]).collect();
                    for (a, b) in x.iter().zip(&roll) {
                        let d = (a - b).abs();
                        mm.0 += d;
                        mm.1 = mm.1.max(d);
                        mm.2 += 1;
                    }
                    let o = objective::sequence(
                        &SeqIn {
                            x: &x,
                            old: &old,
                            rollout: &roll,
                            reference: reference.as_deref(),
                            entropy: &ent,
                            advantage: smp.advantage,
                            weights: &wts,
                        },
                        obj,
                    );
                    for (j, k) in (k0..k1).enumerate() {
                        coef[2 * k] = o.d_x[j] as f32;
                        coef[2 * k + 1] = o.d_entropy[j] as f32;
                    }
                    mb_stats.merge(&o.stats);
                    k0 = k1;
                }
                let coef = Tensor::from_vec(coef, (t.kept, 2), out.device())?;
                Ok((out * coef)?.sum_all()?)
            })?;
        stats.merge(&mb_stats);
        for v in model.trainable().values() {
            if let Some(g) = grads.remove(v.as_tensor()) {
                acc.accumulate(v.as_tensor(), &g)?;
            }
        }
    }
    Ok((stats, acc, tokens, mm))
}

/// Greedy episodes on the validation tasks: adds `val/reward` and the paper's table
/// (`val/<level>/<metric>`) to `line` and returns the mean reward.
fn validate(s: &Session, cfg: &RlConfig, line: &mut Map<String, Value>) -> Result<f64> {
    let sel = s.val.as_ref().expect("validation is configured");
    let mut preds = BTreeMap::new();
    let mut gts: BTreeMap<String, Vec<Location>> = sel.gt.clone();
    let (mut sum, mut n, mut failed) = (0.0, 0usize, 0usize);
    s.greedy.clear_prefixes();
    run_batches(
        sel,
        &cfg.val_data,
        1,
        cfg.seed,
        Prompts::Shared,
        cfg.rollout.max_batch,
        &s.greedy,
        Some(&s.renderer),
        &cfg.episode,
        &|_, _| false,
        &mut |t, gt| {
            n += 1;
            sum += t.reward.unwrap_or(0.0);
            failed += t.error.is_some() as usize;
            if let Some(gt) = gt {
                gts.entry(t.instance_id.clone())
                    .or_insert_with(|| gt.to_vec());
            }
            preds.insert(t.instance_id.clone(), PredictionLine::of(&t).prediction());
        },
    );
    let gt = GroundTruth { instances: gts };
    let report = evaluate(&preds, &gt);
    let reward = sum / n.max(1) as f64;
    line.insert("val/reward".into(), json!(reward));
    line.insert("val/failed".into(), json!(failed));
    for (level, sc) in [
        ("file", &report.file),
        ("function", &report.function),
        ("function_strict", &report.function_strict),
    ] {
        for (k, v) in [
            ("acc1", sc.acc[0]),
            ("acc3", sc.acc[1]),
            ("acc5", sc.acc[2]),
            ("recall5", sc.recall[2]),
            ("map", sc.map),
            ("mrr", sc.mrr),
            ("ndcg5", sc.ndcg5),
        ] {
            line.insert(format!("val/{level}/{k}"), json!(v));
        }
    }
    say(
        &s.pb,
        format!(
            "validation after step {}: mean reward {reward:.4} over {n} tasks\n{}",
            s.state.step,
            report.table()
        ),
    );
    Ok(reward)
}

/// Writes the step's episodes with their advantages (`OUT/rollouts/step-N.jsonl`).
/// `adv` holds the advantages of the kept groups' episodes, in their order.
fn dump(run: &RunDir, step: u64, all: &[Trajectory], kept: &[Group], adv: &[f64]) -> Result<()> {
    let adv: BTreeMap<(&str, usize), f64> = kept
        .iter()
        .flat_map(|g| &g.trajs)
        .zip(adv)
        .map(|(t, &a)| ((t.instance_id.as_str(), t.sample), a))
        .collect();
    let mut text = String::new();
    for t in all {
        let mut v = serde_json::to_value(t)?;
        let a = adv.get(&(t.instance_id.as_str(), t.sample));
        v["kept_group"] = json!(a.is_some());
        v["advantage"] = json!(a);
        text.push_str(&serde_json::to_string(&v)?);
        text.push('\n');
    }
    let dir = run.path().join("rollouts");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let p = dir.join(format!("step-{step}.jsonl"));
    tooltrain_util::write_atomic(&p, text.as_bytes())
        .with_context(|| format!("writing {}", p.display()))?;
    Ok(())
}

/// Saves a checkpoint; refuses weights that are not finite.
fn save(s: &Session, run: &RunDir) -> Result<PathBuf> {
    ensure_finite(&s.model, s.state.step)?;
    let dir = run.save_checkpoint(s.state.step, &s.state, |d| {
        save_model(&s.model, Some(&s.tokenizer), d, &s.init)?;
        s.opt.save(d)
    })?;
    say(&s.pb, format!("saved checkpoint {}", dir.display()));
    Ok(dir)
}

fn say(pb: &Progress, msg: String) {
    pb.suspend(|| tracing::info!("{msg}"));
}

//! The SFT training loop: config, model initialisation, masked next-token loss over
//! packed micro-batches with gradient accumulation, AdamW with warm-up + cosine,
//! clipping, validation, metrics, atomic checkpoints and bit-exact resume.
//!
//! ## Output directory
//!
//! ```text
//! OUT/config.toml                  the resolved config of the (latest) run
//! OUT/metrics.jsonl                one flat JSON object per optimizer step
//! OUT/checkpoints/step-N/          model (HF format), optimizer.safetensors (AdamW
//!                                  moments and step), master.safetensors (f32 master
//!                                  weights of a bf16/f16 model), state.json (step, data
//!                                  position, RNG, schedule, data hash), config.toml
//! OUT/checkpoints/latest           the name of the newest complete checkpoint ("step-N")
//! OUT/final/                       the trained model in HF format (config.json,
//!                                  model.safetensors, tokenizer files)
//! ```
//!
//! A checkpoint is written into `step-N.tmp/` and renamed to `step-N/` once complete;
//! `latest` is then replaced atomically, so a crash at any moment leaves the previous
//! checkpoint usable.
//!
//! ## Metrics
//!
//! `{"step", "epoch", "loss", "lr", "grad_norm", "tokens", "tokens_per_s", "elapsed_s"}`
//! and `"val_loss"` on evaluation steps. `step` counts optimizer steps from 1; `epoch`
//! is fractional progress (epochs done + share of the current one); `loss` is the mean
//! over all targets of the step's global batch (before the update); `lr` the rate the
//! step used; `grad_norm` the global norm before clipping; `tokens` the input tokens
//! trained on so far (cumulative); `tokens_per_s` the step's throughput (forward,
//! backward and optimizer); `elapsed_s` wall time since the run started (summed over
//! resumes).
//!
//! ## Exact resume
//!
//! All randomness is the seeded initialisation and the per-epoch shuffle, drawn from a
//! [`Rng`] whose state at the start of the current epoch is saved with the data
//! position; together with the weights (and master weights), AdamW moments and step, a
//! resumed run repeats the computations of an uninterrupted one and its metrics (all but
//! the timing keys) are bit-identical. On resume `metrics.jsonl` is cut back to the
//! checkpoint's step, and a config that differs in a key that changes the trajectory, or
//! changed training data, is refused.
//!
//! ## Loss
//!
//! For each sequence, position `i` predicts token `i + 1` and counts when
//! `loss_mask[i + 1] == 1`. Only those positions go through the output projection (in
//! f32 for half-precision models). A micro-batch's mean is weighted by its share of the
//! step's targets, so the step's loss is the mean over all of them however the batch is
//! split or packed.

use crate::data::{
    build_micro_batch, check_vocab, load_examples, plan_micro_batches, prepare, split_indices, Rng,
    SftExample, Truncation,
};
use anyhow::{anyhow, bail, Context, Result};
use candle_core::backprop::GradStore;
use indicatif::{ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::Arc;
use std::time::Instant;
use tooltrain_model::{
    clip_grad_norm, default_device, ops, parse_dtype, AdamW, AdamWConfig, CausalLM, DType, Device,
    LrSchedule, ModelConfig, Tokenizer, Var,
};

/// The SFT config (TOML; every key optional but `train_file` and one of `init` /
/// `model_config`). Defaults are the paper's settings (ToolTrain SFT of
/// Qwen2.5-Coder-7B): lr 1e-5 with 10% warm-up and cosine decay, AdamW betas
/// (0.9, 0.95), weight decay 0.01, clipping at 1.0, global batch 128, 3 epochs,
/// sequences of at most 16,384 tokens truncated on the left.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SftConfig {
    /// Training examples: JSONL with `input_ids` and `loss_mask` (`tooltrain sample`).
    pub train_file: PathBuf,
    /// Held-out examples for the validation loss (same format).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub val_file: Option<PathBuf>,
    /// Share of `train_file` held out for validation instead (chosen by `seed`); 0: none.
    pub val_fraction: f64,
    /// Where checkpoints, metrics and the final model go.
    pub output_dir: PathBuf,
    /// Start from this checkpoint (HF directory or `.gguf`), with its tokenizer.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub init: Option<PathBuf>,
    /// Or start from a random initialisation (seeded by `seed`) of this `config.json`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model_config: Option<PathBuf>,
    /// Tokenizer directory (`tokenizer.json`, ...) saved with the checkpoints; with
    /// `init` it replaces the checkpoint's own.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tokenizer: Option<PathBuf>,
    /// With `model_config`: take `vocab_size` from the tokenizer instead of the JSON.
    pub vocab_from_tokenizer: bool,
    /// Weight dtype: `f32`, `bf16` (or `f16`, `f64`).
    pub dtype: String,
    /// Run on the CPU even when a CUDA device is present.
    pub cpu: bool,
    /// Seed of the random initialisation, the shuffle and the validation split.
    pub seed: u64,
    /// Longest sequence trained on (tokens).
    pub max_len: usize,
    /// Longer sequences: `"left"` keeps the last `max_len` tokens, `"drop"` leaves them out.
    pub truncation: Truncation,
    /// Pack several sequences into one row (each attending only to itself, positions
    /// restarting at 0); `false`: one sequence per row.
    pub packing: bool,
    /// Token budget of one forward/backward pass (rows x row length); `>= max_len`.
    pub micro_batch_tokens: usize,
    /// Sequences per optimizer step (gradients accumulated over micro-batches).
    pub global_batch: usize,
    /// Passes over the training data (ignored when `max_steps` is set).
    pub epochs: usize,
    /// Optimizer steps to run instead of `epochs` passes (the data is cycled, an epoch
    /// at a time). `0` trains nothing and exports the initial model (a baseline with
    /// the same initialisation). The last batch of an epoch may be smaller than
    /// `global_batch`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_steps: Option<u64>,
    /// Shuffle the training examples every epoch.
    pub shuffle: bool,
    /// Peak learning rate.
    pub lr: f64,
    /// Learning rate at the end of the cosine decay.
    pub min_lr: f64,
    /// Share of the total steps spent on linear warm-up, in [0, 1].
    pub warmup_ratio: f64,
    /// AdamW (beta1, beta2).
    pub betas: [f64; 2],
    /// AdamW epsilon.
    pub eps: f64,
    /// Decoupled weight decay (matrices only; not norms and biases).
    pub weight_decay: f64,
    /// Clip the global gradient norm to this (0: no clipping).
    pub max_grad_norm: f64,
    /// With `bf16` / `f16` weights: keep f32 master weights that the optimizer updates,
    /// the model getting their rounded copy after each step. Without them, updates
    /// below half precision's resolution are lost (at lr 1e-5, nearly all of them).
    /// Costs 4 bytes a parameter; ignored for f32.
    pub master_weights: bool,
    /// Recompute each layer's activations in the backward pass (less memory, ~1/3
    /// more compute; identical gradients).
    pub checkpointing: bool,
    /// Validation loss every this many steps (0: only at the end).
    pub eval_every: u64,
    /// Checkpoint every this many steps (0: only at the end and when stopped).
    pub save_every: u64,
    /// Keep the newest this many checkpoints (0: keep all).
    pub keep_checkpoints: usize,
    /// Continue from `output_dir/checkpoints/latest` (a fresh start when there is none).
    pub resume: bool,
    /// Stop (with a checkpoint, as if preempted) once this many steps are done
    /// (0: never); resume later with `resume`. For time-sliced jobs.
    pub stop_at_step: u64,
}

impl Default for SftConfig {
    fn default() -> Self {
        SftConfig {
            train_file: PathBuf::new(),
            val_file: None,
            val_fraction: 0.0,
            output_dir: PathBuf::from("runs/sft"),
            init: None,
            model_config: None,
            tokenizer: None,
            vocab_from_tokenizer: false,
            dtype: "f32".into(),
            cpu: false,
            seed: 0,
            max_len: 16384,
            truncation: Truncation::Left,
            packing: true,
            micro_batch_tokens: 16384,
            global_batch: 128,
            epochs: 3,
            max_steps: None,
            shuffle: true,
            lr: 1e-5,
            min_lr: 0.0,
            warmup_ratio: 0.1,
            betas: [0.9, 0.95],
            eps: 1e-8,
            weight_decay: 0.01,
            max_grad_norm: 1.0,
            master_weights: true,
            checkpointing: false,
            eval_every: 0,
            save_every: 0,
            keep_checkpoints: 2,
            resume: false,
            stop_at_step: 0,
        }
    }
}

/// Keys that may differ between a checkpoint's config and the one resuming it: they do
/// not change the trajectory.
const RESUME_FREE_KEYS: &[&str] = &[
    "output_dir",
    "resume",
    "stop_at_step",
    "save_every",
    "keep_checkpoints",
    "eval_every",
];

impl SftConfig {
    /// Rejects impossible values, naming the key.
    pub fn validate(&self) -> Result<()> {
        let bad = |key: &str, msg: String| Err(anyhow!("invalid config: `{key}` {msg}"));
        if self.train_file.as_os_str().is_empty() {
            return bad("train_file", "is required".into());
        }
        if self.output_dir.as_os_str().is_empty() {
            return bad("output_dir", "must not be empty".into());
        }
        match (&self.init, &self.model_config) {
            (Some(_), Some(_)) => {
                return bad(
                    "init",
                    "and `model_config` exclude each other (a checkpoint or a random init)".into(),
                )
            }
            (None, None) => {
                return bad(
                    "init",
                    "or `model_config` is required (a checkpoint or a random init)".into(),
                )
            }
            _ => {}
        }
        if self.vocab_from_tokenizer && (self.model_config.is_none() || self.tokenizer.is_none()) {
            return bad(
                "vocab_from_tokenizer",
                "needs `model_config` and `tokenizer`".into(),
            );
        }
        if !(0.0..1.0).contains(&self.val_fraction) {
            return bad(
                "val_fraction",
                format!("must be in [0, 1) (got {})", self.val_fraction),
            );
        }
        if self.val_file.is_some() && self.val_fraction > 0.0 {
            return bad("val_fraction", "and `val_file` exclude each other".into());
        }
        if let Err(e) = parse_dtype(&self.dtype) {
            return bad("dtype", e.to_string());
        }
        if self.max_len < 2 {
            return bad("max_len", format!("must be >= 2 (got {})", self.max_len));
        }
        if self.micro_batch_tokens < self.max_len {
            return bad(
                "micro_batch_tokens",
                format!(
                    "must be >= max_len = {} so a sequence fits a micro-batch (got {})",
                    self.max_len, self.micro_batch_tokens
                ),
            );
        }
        if self.global_batch == 0 {
            return bad("global_batch", "must be >= 1 (got 0)".into());
        }
        if self.epochs == 0 && self.max_steps.is_none() {
            return bad("epochs", "must be >= 1 unless `max_steps` is set".into());
        }
        if !(self.lr > 0.0 && self.lr.is_finite()) {
            return bad("lr", format!("must be > 0 (got {})", self.lr));
        }
        if !(self.min_lr >= 0.0 && self.min_lr <= self.lr) {
            return bad(
                "min_lr",
                format!("must be in [0, lr = {}] (got {})", self.lr, self.min_lr),
            );
        }
        if !(0.0..=1.0).contains(&self.warmup_ratio) {
            return bad(
                "warmup_ratio",
                format!("must be in [0, 1] (got {})", self.warmup_ratio),
            );
        }
        if !self.betas.iter().all(|b| (0.0..1.0).contains(b)) {
            return bad("betas", format!("must be in [0, 1) (got {:?})", self.betas));
        }
        if self.eps.is_nan() || self.eps <= 0.0 {
            return bad("eps", format!("must be > 0 (got {})", self.eps));
        }
        if self.weight_decay.is_nan() || self.weight_decay < 0.0 {
            return bad(
                "weight_decay",
                format!("must be >= 0 (got {})", self.weight_decay),
            );
        }
        if self.max_grad_norm.is_nan() || self.max_grad_norm < 0.0 {
            return bad(
                "max_grad_norm",
                format!("must be >= 0 (0: no clipping; got {})", self.max_grad_norm),
            );
        }
        Ok(())
    }

    /// The resolved config as TOML.
    pub fn to_toml(&self) -> Result<String> {
        toml::to_string_pretty(self).map_err(|e| anyhow!("printing the config: {e}"))
    }
}

/// Why a run ended before its last step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// SIGTERM / SIGINT (or the caller's stop flag).
    Signal,
    /// `stop_at_step` was reached.
    StopAtStep,
}

/// What a call of [`train`] did.
#[derive(Debug, Clone)]
pub struct TrainSummary {
    /// Optimizer steps done in total (including those before a resume).
    pub step: u64,
    /// Steps of the whole run.
    pub total_steps: u64,
    /// Loss of the last step of this call.
    pub loss: Option<f64>,
    /// The last validation loss computed in this call.
    pub val_loss: Option<f64>,
    /// Input tokens trained on (whole run).
    pub tokens: u64,
    /// Mean training throughput of this call.
    pub tokens_per_s: f64,
    /// `Some` when the run stopped early (a checkpoint was saved; resume to continue).
    pub stopped: Option<StopReason>,
    /// The newest checkpoint.
    pub checkpoint: Option<PathBuf>,
    /// The exported model (`OUT/final`) when the run completed.
    pub final_dir: Option<PathBuf>,
}

/// Trainer state saved with each checkpoint (`state.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct TrainState {
    /// Optimizer steps done.
    step: u64,
    total_steps: u64,
    /// Current epoch (0-based) and the position of the next sequence in its order.
    epoch: u64,
    index: usize,
    /// State of the shuffle RNG at the start of the current epoch.
    epoch_rng: u64,
    /// Input tokens trained on.
    tokens: u64,
    elapsed_s: f64,
    num_train: usize,
    /// FNV-1a of the training examples' ids and masks: a resume on changed data fails.
    data_hash: u64,
    schedule: LrSchedule,
}

/// Trains as `cfg` says. SIGTERM and SIGINT (while it runs) stop it as described at
/// [`train_with_stop`] and it returns with `stopped = Some(Signal)`; a second signal
/// exits the process at once (status 143 / 130). `resume` (or `cfg.resume`)
/// continues from the latest checkpoint in `cfg.output_dir`. `progress` shows a
/// progress bar on stderr (never when the environment has `CI=true`).
pub fn train(cfg: &SftConfig, resume: bool, progress: bool) -> Result<TrainSummary> {
    let signals = StopSignals::install()?;
    train_with_stop(cfg, resume, progress, signals.flag())
}

/// SIGTERM / SIGINT handlers that set a stop flag (for [`train_with_stop`]); a second
/// signal, once the flag is set, exits the process at once with status 128 + signal.
/// The handlers are removed on drop.
pub struct StopSignals {
    flag: Arc<AtomicBool>,
    which: Arc<AtomicI32>,
    ids: Vec<signal_hook::SigId>,
}

impl StopSignals {
    /// Installs the handlers.
    pub fn install() -> Result<Self> {
        use signal_hook::consts::{SIGINT, SIGTERM};
        let flag = Arc::new(AtomicBool::new(false));
        let which = Arc::new(AtomicI32::new(0));
        let mut ids = Vec::new();
        for sig in [SIGTERM, SIGINT] {
            // The shutdown first: it only fires when the flag is already set.
            ids.push(signal_hook::flag::register_conditional_shutdown(
                sig,
                128 + sig,
                Arc::clone(&flag),
            )?);
            let (f, w) = (Arc::clone(&flag), Arc::clone(&which));
            // SAFETY: the action only stores to atomics (async-signal-safe).
            ids.push(unsafe {
                signal_hook::low_level::register(sig, move || {
                    w.store(sig, Ordering::SeqCst);
                    f.store(true, Ordering::SeqCst);
                })
            }?);
        }
        Ok(StopSignals { flag, which, ids })
    }

    /// The flag the handlers set.
    pub fn flag(&self) -> &AtomicBool {
        &self.flag
    }

    /// The signal that arrived last (`"SIGTERM"`, `"SIGINT"`), if any, and the exit
    /// status that conventionally reports it (128 + its number: 143, 130).
    pub fn received(&self) -> Option<(&'static str, u8)> {
        use signal_hook::consts::{SIGINT, SIGTERM};
        match self.which.load(Ordering::SeqCst) {
            s if s == SIGTERM => Some(("SIGTERM", (128 + SIGTERM) as u8)),
            s if s == SIGINT => Some(("SIGINT", (128 + SIGINT) as u8)),
            _ => None,
        }
    }
}

impl Drop for StopSignals {
    fn drop(&mut self) {
        for id in self.ids.drain(..) {
            signal_hook::low_level::unregister(id);
        }
    }
}

/// [`train`] with a caller-owned stop flag (no signal handlers are installed). The flag
/// is checked before every micro-batch and after every optimizer step: a step it
/// interrupts part-way is abandoned (so a long step does not outlast a preemption grace
/// period), and the run saves a checkpoint of the last finished step (unless that step
/// is already saved, or none was done) and returns.
pub fn train_with_stop(
    cfg: &SftConfig,
    resume: bool,
    progress: bool,
    stop: &AtomicBool,
) -> Result<TrainSummary> {
    cfg.validate()?;
    let resume = resume || cfg.resume;
    let out = &cfg.output_dir;
    let ckpt_root = out.join("checkpoints");
    std::fs::create_dir_all(&ckpt_root)
        .with_context(|| format!("creating {}", ckpt_root.display()))?;
    remove_stale_tmp(&ckpt_root)?;
    let existing = latest_checkpoint(&ckpt_root)?;
    if !resume {
        if let Some(ck) = &existing {
            bail!(
                "{} already holds checkpoints (latest {}): pass --resume to continue that run, \
                 or choose another output_dir",
                ckpt_root.display(),
                ck.display()
            );
        }
    }
    let device = default_device(cfg.cpu)?;
    let dtype = parse_dtype(&cfg.dtype)?;
    tooltrain_model::tune_runtime();
    let pb = progress_bar(progress);
    let cfg_toml = cfg.to_toml()?;

    // Model: from the checkpoint being resumed, or initialised.
    let resumed = match (resume, &existing) {
        (true, Some(ck)) => Some(ck.clone()),
        (true, None) => {
            say(
                &pb,
                format!("no checkpoint in {}: starting fresh", ckpt_root.display()),
            );
            None
        }
        _ => None,
    };
    let (model, tokenizer, saved_state) = match &resumed {
        Some(ck) => {
            check_resume_config(cfg, ck)?;
            let c = tooltrain_model::load(ck, dtype, &device)
                .with_context(|| format!("loading checkpoint {}", ck.display()))?;
            let state: TrainState = serde_json::from_str(
                &std::fs::read_to_string(ck.join("state.json"))
                    .with_context(|| format!("reading {}/state.json", ck.display()))?,
            )
            .with_context(|| format!("{}/state.json", ck.display()))?;
            (c.model, c.tokenizer, Some(state))
        }
        None => {
            let (m, t) = init_model(cfg, dtype, &device)?;
            (m, t, None)
        }
    };
    if tokenizer.is_none() {
        pb.suspend(|| {
            tracing::warn!(
                "no tokenizer: checkpoints and the final model will lack tokenizer files"
            )
        });
    }
    let vocab = model.config().vocab_size;

    // Data.
    let (train_set, val_set) = load_data(cfg, vocab, &pb)?;
    if train_set.is_empty() {
        bail!("{}: no trainable examples", cfg.train_file.display());
    }
    let n = train_set.len();
    let data_hash = hash_examples(&train_set);
    let steps_per_epoch = n.div_ceil(cfg.global_batch) as u64;
    let total_steps = cfg.max_steps.unwrap_or(steps_per_epoch * cfg.epochs as u64);
    let schedule = LrSchedule::WarmupCosine {
        lr: cfg.lr,
        warmup_steps: (cfg.warmup_ratio * total_steps as f64).ceil() as u64,
        total_steps,
        min_lr: cfg.min_lr,
    };
    let mut opt = Optimizer::new(&model, cfg)?;
    let mut state = match saved_state {
        Some(s) => {
            let ck = resumed.as_ref().expect("resumed");
            if s.num_train != n || s.data_hash != data_hash || s.total_steps != total_steps {
                bail!(
                    "{}: the training data changed since the checkpoint ({} examples, {} steps, \
                     hash {:016x}; now {n} examples, {total_steps} steps, hash {data_hash:016x})",
                    ck.display(),
                    s.num_train,
                    s.total_steps,
                    s.data_hash
                );
            }
            if s.schedule != schedule {
                bail!(
                    "{}: the learning-rate schedule changed since the checkpoint",
                    ck.display()
                );
            }
            opt.load(ck, &model)?;
            if opt.steps() != s.step {
                bail!(
                    "{}: optimizer state is at step {}, trainer state at {}",
                    ck.display(),
                    opt.steps(),
                    s.step
                );
            }
            s
        }
        None => TrainState {
            step: 0,
            total_steps,
            epoch: 0,
            index: 0,
            epoch_rng: cfg.seed,
            tokens: 0,
            elapsed_s: 0.0,
            num_train: n,
            data_hash,
            schedule,
        },
    };
    write_file(&out.join("config.toml"), cfg_toml.as_bytes())?;
    let metrics_path = out.join("metrics.jsonl");
    prepare_metrics(&metrics_path, resumed.as_ref().map(|_| state.step))?;
    let mut metrics = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&metrics_path)
        .with_context(|| format!("opening {}", metrics_path.display()))?;

    say(
        &pb,
        format!(
            "{} parameters; {n} training / {} validation examples; {steps_per_epoch} steps per \
             epoch, {total_steps} in total{}",
            model.num_params(),
            val_set.len(),
            if resumed.is_some() {
                format!("; resuming at step {}", state.step)
            } else {
                String::new()
            }
        ),
    );

    let mut rng = Rng::new(state.epoch_rng);
    let mut order = epoch_order(&mut rng, n, cfg.shuffle);
    let vars: Vec<Var> = model.params().values().cloned().collect();
    let elapsed_before = state.elapsed_s;
    let run_start = Instant::now();
    let (mut run_tokens, mut run_train_s) = (0u64, 0f64);
    let mut summary = TrainSummary {
        step: state.step,
        total_steps,
        loss: None,
        val_loss: None,
        tokens: state.tokens,
        tokens_per_s: 0.0,
        stopped: None,
        checkpoint: existing.clone().filter(|_| resumed.is_some()),
        final_dir: None,
    };
    let mut last_saved = resumed.as_ref().map(|_| state.step);
    let save = |state: &TrainState, model: &CausalLM, opt: &Optimizer| -> Result<PathBuf> {
        let dir = save_checkpoint(
            &ckpt_root,
            state,
            model,
            tokenizer.as_ref(),
            opt,
            &cfg_toml,
            cfg.keep_checkpoints,
        )?;
        say(&pb, format!("saved checkpoint {}", dir.display()));
        Ok(dir)
    };
    pb.set_length(total_steps);
    pb.set_position(state.step);
    pb.reset_eta();
    let mut rate_ema: Option<f64> = None;

    while state.step < total_steps {
        if state.index >= n {
            state.epoch += 1;
            state.index = 0;
            state.epoch_rng = rng.state();
            order = epoch_order(&mut rng, n, cfg.shuffle);
        }
        let end = (state.index + cfg.global_batch).min(n);
        let batch: Vec<&SftExample> = order[state.index..end]
            .iter()
            .map(|&i| &train_set[i])
            .collect();
        let t0 = Instant::now();
        let Some((loss, grads, tokens)) = forward_backward_batch(&model, &batch, cfg, stop)? else {
            // A signal arrived mid-step: the step is abandoned (weights, optimizer and
            // data position are those of the last finished step).
            summary.stopped = Some(StopReason::Signal);
            break;
        };
        let max_norm = if cfg.max_grad_norm > 0.0 {
            cfg.max_grad_norm
        } else {
            f64::INFINITY
        };
        let (grad_norm, scale) = clip_grad_norm(&grads, &vars, max_norm)?;
        let lr = schedule.lr_at(state.step);
        opt.step(&model, &grads, lr, scale)?;
        drop(grads);
        let dt = t0.elapsed().as_secs_f64();
        state.step += 1;
        state.index = end;
        state.tokens += tokens as u64;
        run_tokens += tokens as u64;
        run_train_s += dt;
        let step_rate = tokens as f64 / dt.max(1e-9);
        rate_ema = Some(rate_ema.map_or(step_rate, |r| 0.9 * r + 0.1 * step_rate));

        let last = state.step == total_steps;
        let val_loss = if !val_set.is_empty()
            && (last || (cfg.eval_every > 0 && state.step % cfg.eval_every == 0))
        {
            Some(evaluate(&model, &val_set, cfg)?)
        } else {
            None
        };
        state.elapsed_s = elapsed_before + run_start.elapsed().as_secs_f64();
        let mut line = serde_json::json!({
            "step": state.step,
            "epoch": state.epoch as f64 + state.index as f64 / n as f64,
            "loss": loss,
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens": state.tokens,
            "tokens_per_s": step_rate,
            "elapsed_s": state.elapsed_s,
        });
        if let Some(v) = val_loss {
            line["val_loss"] = v.into();
            summary.val_loss = Some(v);
        }
        writeln!(metrics, "{line}")
            .and_then(|()| metrics.flush())
            .with_context(|| format!("writing {}", metrics_path.display()))?;
        summary.loss = Some(loss);
        pb.set_position(state.step);
        pb.set_message(format!(
            "loss {loss:.4}{} | {:.0} tok/s",
            val_loss.map(|v| format!(" val {v:.4}")).unwrap_or_default(),
            rate_ema.unwrap_or(0.0)
        ));

        if last || (cfg.save_every > 0 && state.step % cfg.save_every == 0) {
            summary.checkpoint = Some(save(&state, &model, &opt)?);
            last_saved = Some(state.step);
        }
        if stop.load(Ordering::SeqCst) {
            summary.stopped = Some(StopReason::Signal);
        } else if cfg.stop_at_step > 0 && state.step >= cfg.stop_at_step && !last {
            summary.stopped = Some(StopReason::StopAtStep);
        }
        if summary.stopped.is_some() {
            break;
        }
    }
    if summary.stopped.is_some() && state.step > 0 && last_saved != Some(state.step) {
        summary.checkpoint = Some(save(&state, &model, &opt)?);
    }
    summary.step = state.step;
    summary.tokens = state.tokens;
    summary.tokens_per_s = run_tokens as f64 / run_train_s.max(1e-9);
    if summary.stopped.is_none() {
        if total_steps == 0 {
            say(&pb, "max_steps = 0: exporting the initial model".into());
        } else if run_tokens == 0 {
            // Resumed a finished run: nothing to train, the checkpoint is the final state.
            say(&pb, format!("the run was complete ({} steps)", state.step));
        }
        let dir = export_final(out, &model, tokenizer.as_ref())?;
        say(&pb, format!("final model in {}", dir.display()));
        summary.final_dir = Some(dir);
    }
    pb.finish_and_clear();
    Ok(summary)
}

/// The loss (mean over every target of `batch`) and its gradients, accumulated over
/// the micro-batches of `batch`; also the number of input tokens. `None` when `stop`
/// is set before a micro-batch (the step is abandoned).
fn forward_backward_batch(
    model: &CausalLM,
    batch: &[&SftExample],
    cfg: &SftConfig,
    stop: &AtomicBool,
) -> Result<Option<(f64, GradStore, usize)>> {
    let lens: Vec<usize> = batch.iter().map(|e| e.len()).collect();
    let kept_global: usize = batch.iter().map(|e| e.num_targets()).sum();
    let plan = plan_micro_batches(&lens, cfg.max_len, cfg.micro_batch_tokens, cfg.packing);
    let hidden = model.config().hidden_size;
    let mut acc = GradStore::default();
    let (mut loss_sum, mut tokens) = (0f64, 0usize);
    for mb in &plan {
        if stop.load(Ordering::SeqCst) {
            return Ok(None);
        }
        let t = build_micro_batch(batch, mb, model.device())?;
        // Each micro-batch's token mean weighted by its share of the batch's targets:
        // the sum over micro-batches is the token mean over the whole batch.
        let weight = t.kept as f64 / kept_global as f64;
        let w = model.lm_head_weight(true);
        let (loss, mut grads) =
            model.forward_backward(&t.ids, &t.layout, cfg.checkpointing, |hid| {
                // Only positions with a target reach the output projection.
                let h = hid.reshape(((), hidden))?.index_select(&t.positions, 0)?;
                Ok((head_loss(&h, &w, &t.targets)? * weight)?)
            })?;
        loss_sum += loss;
        tokens += t.tokens;
        for v in model.params().values() {
            if let Some(g) = grads.remove(v.as_tensor()) {
                acc.accumulate(v.as_tensor(), &g)?;
            }
        }
    }
    Ok(Some((loss_sum, acc, tokens)))
}

/// Mean cross-entropy of `targets` under the logits `h @ w^T`. Half-precision
/// weights are upcast to f32 first: a log-softmax summed in bf16 over a 150k vocabulary
/// stalls (bf16 has 8 significant bits) and the loss would be wrong.
fn head_loss(
    h: &candle_core::Tensor,
    w: &candle_core::Tensor,
    targets: &candle_core::Tensor,
) -> candle_core::Result<candle_core::Tensor> {
    if matches!(h.dtype(), DType::F32 | DType::F64) {
        return ops::linear_cross_entropy(h, w, targets, None);
    }
    ops::linear_cross_entropy(
        &h.to_dtype(DType::F32)?,
        &w.to_dtype(DType::F32)?,
        targets,
        None,
    )
}

/// Mean loss over every target of `set` (no gradients).
fn evaluate(model: &CausalLM, set: &[SftExample], cfg: &SftConfig) -> Result<f64> {
    let refs: Vec<&SftExample> = set.iter().collect();
    let lens: Vec<usize> = set.iter().map(SftExample::len).collect();
    let hidden = model.config().hidden_size;
    let w = model.lm_head_weight(false);
    let (mut sum, mut kept) = (0f64, 0usize);
    for mb in plan_micro_batches(&lens, cfg.max_len, cfg.micro_batch_tokens, cfg.packing) {
        let t = build_micro_batch(&refs, &mb, model.device())?;
        let hid = model.hidden_states(&t.ids, &t.layout)?;
        let h = hid.reshape(((), hidden))?.index_select(&t.positions, 0)?;
        let loss = head_loss(&h, &w, &t.targets)?;
        sum += loss.to_dtype(DType::F64)?.to_scalar::<f64>()? * t.kept as f64;
        kept += t.kept;
    }
    Ok(sum / kept.max(1) as f64)
}

/// AdamW, over f32 master copies of the parameters when the model is in half precision
/// and `master_weights` is on.
struct Optimizer {
    adamw: AdamW,
    /// Parameter name -> f32 master copy.
    master: Option<BTreeMap<String, Var>>,
}

impl Optimizer {
    fn new(model: &CausalLM, cfg: &SftConfig) -> Result<Self> {
        let half = !matches!(model.dtype(), DType::F32 | DType::F64);
        let master = if half && cfg.master_weights {
            let mut m = BTreeMap::new();
            for (name, v) in model.params() {
                m.insert(
                    name.clone(),
                    Var::from_tensor(&v.as_tensor().to_dtype(DType::F32)?)?,
                );
            }
            Some(m)
        } else {
            None
        };
        let adamw = AdamW::new(
            master.as_ref().unwrap_or(model.params()),
            AdamWConfig {
                beta1: cfg.betas[0],
                beta2: cfg.betas[1],
                eps: cfg.eps,
                weight_decay: cfg.weight_decay,
            },
        )?;
        Ok(Optimizer { adamw, master })
    }

    fn steps(&self) -> u64 {
        self.adamw.steps()
    }

    /// One update from the model's gradients `grads` (scaled by `scale`).
    fn step(&mut self, model: &CausalLM, grads: &GradStore, lr: f64, scale: f64) -> Result<()> {
        let Some(master) = &self.master else {
            self.adamw.step(grads, lr, scale)?;
            return Ok(());
        };
        let mut g32 = GradStore::default();
        for (name, v) in model.params() {
            if let Some(g) = grads.get(v.as_tensor()) {
                g32.insert(master[name].as_tensor(), g.to_dtype(DType::F32)?);
            }
        }
        self.adamw.step(&g32, lr, scale)?;
        for (name, v) in model.params() {
            v.set(&master[name].as_tensor().to_dtype(v.dtype())?)?;
        }
        Ok(())
    }

    /// Writes `optimizer.safetensors` (and `master.safetensors`) into `dir`.
    fn save(&self, dir: &Path) -> Result<()> {
        self.adamw.save(&dir.join("optimizer.safetensors"))?;
        if let Some(master) = &self.master {
            let ts: std::collections::HashMap<String, candle_core::Tensor> = master
                .iter()
                .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
                .collect();
            let p = dir.join("master.safetensors");
            candle_core::safetensors::save(&ts, &p)
                .with_context(|| format!("writing {}", p.display()))?;
        }
        Ok(())
    }

    /// Restores the state [`Optimizer::save`] wrote into the checkpoint `dir`.
    fn load(&mut self, dir: &Path, model: &CausalLM) -> Result<()> {
        self.adamw.load(&dir.join("optimizer.safetensors"))?;
        if let Some(master) = &self.master {
            let p = dir.join("master.safetensors");
            let ts = candle_core::safetensors::load(&p, model.device())
                .with_context(|| format!("reading {} (master weights)", p.display()))?;
            for (name, v) in master {
                let t = ts
                    .get(name)
                    .ok_or_else(|| anyhow!("{}: missing `{name}`", p.display()))?;
                if t.dims() != v.dims() {
                    bail!("{}: `{name}` has shape {:?}", p.display(), t.dims());
                }
                v.set(t)?;
            }
        }
        Ok(())
    }
}

/// FNV-1a (64-bit) over every example's length, ids and mask, in order.
fn hash_examples(set: &[SftExample]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |x: u32| {
        for b in x.to_le_bytes() {
            h = (h ^ b as u64).wrapping_mul(0x0100_0000_01b3);
        }
    };
    for e in set {
        eat(e.len() as u32);
        e.input_ids.iter().for_each(|&t| eat(t));
        e.loss_mask.iter().for_each(|&m| eat(m as u32));
    }
    h
}

/// The order of the training examples in one epoch (advances `rng` when shuffling).
fn epoch_order(rng: &mut Rng, n: usize, shuffle: bool) -> Vec<usize> {
    let mut v: Vec<usize> = (0..n).collect();
    if shuffle {
        rng.shuffle(&mut v);
    }
    v
}

/// The model and tokenizer a fresh run starts from.
fn init_model(
    cfg: &SftConfig,
    dtype: DType,
    device: &Device,
) -> Result<(CausalLM, Option<Tokenizer>)> {
    let tok = match &cfg.tokenizer {
        Some(dir) => Some(
            Tokenizer::from_dir(dir)
                .with_context(|| format!("loading tokenizer {}", dir.display()))?,
        ),
        None => None,
    };
    if let Some(p) = &cfg.init {
        let ck = tooltrain_model::load(p, dtype, device)
            .with_context(|| format!("loading init checkpoint {}", p.display()))?;
        return Ok((ck.model, tok.or(ck.tokenizer)));
    }
    let p = cfg.model_config.as_ref().expect("validated");
    let mut mc = ModelConfig::from_file(p)?;
    if cfg.vocab_from_tokenizer {
        mc.vocab_size = tok.as_ref().expect("validated").vocab_size();
    }
    let model = CausalLM::new_random(&mc, dtype, device, cfg.seed)?;
    Ok((model, tok))
}

/// Training and validation examples, length-limited and checked against the vocabulary.
fn load_data(
    cfg: &SftConfig,
    vocab: usize,
    pb: &ProgressBar,
) -> Result<(Vec<SftExample>, Vec<SftExample>)> {
    let load = |p: &Path| -> Result<Vec<SftExample>> {
        let v = load_examples(p)?;
        check_vocab(&v, vocab)?;
        let total = v.len();
        let (v, st) = prepare(v, cfg.max_len, cfg.truncation);
        say(
            pb,
            format!(
                "{}: {total} examples; {} truncated to {} tokens, {} dropped as too long, {} \
                 dropped without any target",
                p.display(),
                st.truncated,
                cfg.max_len,
                st.dropped_long,
                st.dropped_no_target
            ),
        );
        Ok(v)
    };
    let all = load(&cfg.train_file)?;
    if let Some(vf) = &cfg.val_file {
        return Ok((all, load(vf)?));
    }
    let (ti, vi) = split_indices(all.len(), cfg.val_fraction, cfg.seed);
    let mut slots: Vec<Option<SftExample>> = all.into_iter().map(Some).collect();
    let val = vi.iter().map(|&i| slots[i].take().expect("once")).collect();
    let train = ti.iter().map(|&i| slots[i].take().expect("once")).collect();
    Ok((train, val))
}

/// Fails unless `cfg` would continue the checkpoint's trajectory: every key but
/// [`RESUME_FREE_KEYS`] must equal the checkpoint's `config.toml`.
fn check_resume_config(cfg: &SftConfig, ck: &Path) -> Result<()> {
    let path = ck.join("config.toml");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let mut saved: toml::Table =
        toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    let mut now = toml::Table::try_from(cfg).map_err(|e| anyhow!("config to TOML: {e}"))?;
    for k in RESUME_FREE_KEYS {
        saved.remove(*k);
        now.remove(*k);
    }
    let mut keys: Vec<&String> = saved.keys().chain(now.keys()).collect();
    keys.sort();
    keys.dedup();
    let differ: Vec<String> = keys
        .into_iter()
        .filter(|k| saved.get(*k) != now.get(*k))
        .map(|k| {
            let show = |v: Option<&toml::Value>| v.map_or("(unset)".to_string(), |v| v.to_string());
            format!("{k}: {} -> {}", show(saved.get(k)), show(now.get(k)))
        })
        .collect();
    if !differ.is_empty() {
        bail!(
            "cannot resume {}: the config differs from the checkpoint's in keys that change \
             the run ({}); only {} may change",
            ck.display(),
            differ.join(", "),
            RESUME_FREE_KEYS.join(", ")
        );
    }
    Ok(())
}

/// The newest complete checkpoint: the one `latest` names, else the highest `step-N`.
fn latest_checkpoint(root: &Path) -> Result<Option<PathBuf>> {
    let latest = root.join("latest");
    if latest.exists() {
        let name = std::fs::read_to_string(&latest)
            .with_context(|| format!("reading {}", latest.display()))?;
        let dir = root.join(name.trim());
        if !dir.join("state.json").exists() {
            bail!(
                "{} names {}, which is not a complete checkpoint",
                latest.display(),
                dir.display()
            );
        }
        return Ok(Some(dir));
    }
    Ok(list_checkpoints(root)?
        .into_iter()
        .rev()
        .map(|(_, p)| p)
        .find(|p| p.join("state.json").exists()))
}

/// `(step, dir)` of every `step-N` directory, ascending.
fn list_checkpoints(root: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let mut v = Vec::new();
    for e in std::fs::read_dir(root).with_context(|| format!("listing {}", root.display()))? {
        let e = e?;
        let name = e.file_name().to_string_lossy().into_owned();
        if let Some(n) = name
            .strip_prefix("step-")
            .and_then(|s| s.parse::<u64>().ok())
        {
            if e.path().is_dir() {
                v.push((n, e.path()));
            }
        }
    }
    v.sort();
    Ok(v)
}

/// Removes `*.tmp` leftovers of checkpoints a crash interrupted.
fn remove_stale_tmp(root: &Path) -> Result<()> {
    for e in std::fs::read_dir(root).with_context(|| format!("listing {}", root.display()))? {
        let p = e?.path();
        if p.is_dir() && p.extension().is_some_and(|x| x == "tmp") {
            std::fs::remove_dir_all(&p).with_context(|| format!("removing {}", p.display()))?;
        }
    }
    Ok(())
}

/// Writes checkpoint `step-N` atomically, points `latest` at it and prunes old ones.
fn save_checkpoint(
    root: &Path,
    state: &TrainState,
    model: &CausalLM,
    tokenizer: Option<&Tokenizer>,
    opt: &Optimizer,
    cfg_toml: &str,
    keep: usize,
) -> Result<PathBuf> {
    let name = format!("step-{}", state.step);
    let tmp = root.join(format!("{name}.tmp"));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).with_context(|| format!("removing {}", tmp.display()))?;
    }
    std::fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    tooltrain_model::save(model, tokenizer, &tmp)?;
    opt.save(&tmp)?;
    let st = serde_json::to_string_pretty(state).expect("json");
    write_file(&tmp.join("state.json"), st.as_bytes())?;
    write_file(&tmp.join("config.toml"), cfg_toml.as_bytes())?;
    let dir = root.join(&name);
    if dir.exists() {
        std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    std::fs::rename(&tmp, &dir).with_context(|| format!("renaming {}", tmp.display()))?;
    write_file(&root.join("latest"), format!("{name}\n").as_bytes())?;
    // Prune: checkpoints of an abandoned later trajectory, and all but the newest `keep`.
    let all = list_checkpoints(root)?;
    let older: Vec<&(u64, PathBuf)> = all.iter().filter(|(s, _)| *s <= state.step).collect();
    let cut = if keep == 0 {
        0
    } else {
        older.len().saturating_sub(keep)
    };
    let doomed = older[..cut]
        .iter()
        .map(|(_, p)| p)
        .chain(all.iter().filter(|(s, _)| *s > state.step).map(|(_, p)| p));
    for p in doomed {
        std::fs::remove_dir_all(p).with_context(|| format!("removing {}", p.display()))?;
    }
    Ok(dir)
}

/// Saves the model in HF format to `OUT/final` (via `final.tmp` and a rename).
fn export_final(out: &Path, model: &CausalLM, tokenizer: Option<&Tokenizer>) -> Result<PathBuf> {
    let dir = out.join("final");
    let tmp = out.join("final.tmp");
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).with_context(|| format!("removing {}", tmp.display()))?;
    }
    tooltrain_model::save(model, tokenizer, &tmp)?;
    if dir.exists() {
        std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    std::fs::rename(&tmp, &dir).with_context(|| format!("renaming {}", tmp.display()))?;
    Ok(dir)
}

/// A fresh run starts an empty `metrics.jsonl`; a resumed one keeps the lines up to the
/// checkpoint's step (later ones were written after it and will be redone).
fn prepare_metrics(path: &Path, resumed_at: Option<u64>) -> Result<()> {
    let Some(step) = resumed_at else {
        return write_file(path, b"");
    };
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let mut kept = String::new();
    for line in text.lines() {
        let v: serde_json::Value = match serde_json::from_str(line) {
            Ok(v) => v,
            Err(_) => continue, // a line cut short by a crash
        };
        if v.get("step")
            .and_then(|s| s.as_u64())
            .is_some_and(|s| s <= step)
        {
            kept.push_str(line);
            kept.push('\n');
        }
    }
    write_file(path, kept.as_bytes())
}

fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    tooltrain_model::error::write_atomic_io(path, bytes)
        .with_context(|| format!("writing {}", path.display()))
}

fn progress_bar(progress: bool) -> ProgressBar {
    let ci = std::env::var("CI").is_ok_and(|v| v == "true");
    if !progress || ci {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::new(0);
    pb.set_style(bar_style());
    pb
}

fn bar_style() -> ProgressStyle {
    ProgressStyle::with_template(
        "{elapsed_precise} [{wide_bar}] step {pos}/{len} | {msg} | ETA {eta}",
    )
    .expect("a valid template")
    .progress_chars("=> ")
}

/// Logs `msg` (info) without tearing the progress bar.
fn say(pb: &ProgressBar, msg: String) {
    pb.suspend(|| tracing::info!("{msg}"));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_but_for_the_paths_and_print_back() {
        let e = SftConfig::default().validate().unwrap_err().to_string();
        assert!(e.contains("`train_file`"), "{e}");
        let cfg = SftConfig {
            train_file: "t.jsonl".into(),
            model_config: Some("m.json".into()),
            ..SftConfig::default()
        };
        cfg.validate().unwrap();
        let back: SftConfig = toml::from_str(&cfg.to_toml().unwrap()).unwrap();
        assert_eq!(back, cfg);
        bar_style();
    }
}

//! The SFT training loop: config, model initialisation, masked next-token loss over
//! packed micro-batches with gradient accumulation, AdamW with warm-up + cosine,
//! clipping, validation, metrics, atomic checkpoints and bit-exact resume.
//!
//! ## Output directory
//!
//! As every trainer's ([`tooltrain_train::run`]): `config.toml`, `metrics.jsonl`,
//! `checkpoints/step-N/` and `latest`, `final/`. An SFT checkpoint holds the model (HF
//! format), `optimizer.safetensors` (AdamW moments and step), `master.safetensors` (f32
//! master weights of a bf16/f16 model), `state.json` (step, data position, RNG, schedule,
//! data hash) and `config.toml`.
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

use crate::data::{check_vocab, load_examples, prepare, split_indices, Rng, SftExample};
use anyhow::{bail, Context, Result};
use candle_core::backprop::GradStore;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;
use tooltrain_model::{
    default_device, ops, parse_dtype, CausalLM, DType, Device, LrSchedule, ModelConfig, Tokenizer,
    Var,
};
use tooltrain_train::batch::build_micro_batch;
use tooltrain_train::batch::plan_micro_batches;
use tooltrain_train::{
    after_step, clip_grad_norm, diverged, ensure_finite, save_model, OptimSettings, Optimizer,
    Progress, RunDir, StopReason, StopSignals, ADAPTER_DIR,
};

use crate::data::Truncation;

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
    /// The linear layers' forward and both gradients take bf16-rounded operands with
    /// f32 sums (AMX tiles or AVX512-BF16): mixed precision, with f32 weights, gradients
    /// and optimizer. f32 models on CPUs with either; elsewhere a warning, and f32.
    pub bf16_matmuls: bool,
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
    /// Steps whose loss or gradient norm is not finite that are skipped (no update,
    /// counted in `skipped_steps`); one more stops the run with an error, without saving
    /// (0: the first one does).
    pub max_bad_steps: u64,
    /// LoRA adapters on a frozen base (`rank = 0`: full fine-tuning); checkpoints and the
    /// final export hold the merged HF weights and the PEFT directory `adapter/`.
    pub lora: tooltrain_model::LoraConfig,
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
            bf16_matmuls: false,
            eval_every: 0,
            save_every: 0,
            keep_checkpoints: 2,
            resume: false,
            stop_at_step: 0,
            max_bad_steps: 3,
            lora: tooltrain_model::LoraConfig::default(),
        }
    }
}

/// Keys that may differ between a checkpoint's config and the one resuming it: they do
/// not change the trajectory.
const RESUME_FREE_KEYS: &[&str] = &[
    "output_dir",
    "resume",
    "stop_at_step",
    "max_bad_steps",
    "save_every",
    "keep_checkpoints",
    "eval_every",
];

impl SftConfig {
    /// Rejects impossible values, naming the key.
    pub fn validate(&self) -> Result<()> {
        let bad = |key: &str, msg: String| Err(anyhow::anyhow!("invalid config: `{key}` {msg}"));
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
        self.optim().validate()?;
        if let Err(e) = self.lora.validate() {
            return bad("lora", e);
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
        Ok(())
    }

    /// The resolved config as TOML.
    pub fn to_toml(&self) -> Result<String> {
        tooltrain_train::config::to_toml(self)
    }

    /// The optimizer's settings.
    pub fn optim(&self) -> OptimSettings {
        OptimSettings {
            lr: self.lr,
            betas: self.betas,
            eps: self.eps,
            weight_decay: self.weight_decay,
            max_grad_norm: self.max_grad_norm,
            master_weights: self.master_weights,
        }
    }
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
    /// Steps skipped for a non-finite loss or gradient norm (whole run).
    pub bad_steps: u64,
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
    /// Optimizer steps done (including skipped ones).
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
    /// Steps skipped for a non-finite loss or gradient norm.
    #[serde(default)]
    bad_steps: u64,
}

/// Trains as `cfg` says. SIGTERM and SIGINT (while it runs) stop it as described at
/// [`train_with_stop`] and it returns with `stopped = Some(Signal)`; a second signal
/// exits the process at once (status 143 / 130). `resume` (or `cfg.resume`)
/// continues from the latest checkpoint in `cfg.output_dir`. `progress` shows progress
/// on stderr (a bar on a terminal, periodic lines otherwise).
pub fn train(cfg: &SftConfig, resume: bool, progress: bool) -> Result<TrainSummary> {
    let signals = StopSignals::install()?;
    train_with_stop(cfg, resume, progress, signals.flag())
}

/// Everything a run works with once it is set up.
struct Session {
    /// What the model started from (the base of LoRA adapters).
    base: PathBuf,
    model: CausalLM,
    tokenizer: Option<Tokenizer>,
    train_set: Vec<SftExample>,
    val_set: Vec<SftExample>,
    opt: Optimizer,
    vars: Vec<Var>,
    state: TrainState,
    pb: Progress,
}

/// [`train`] with a caller-owned stop flag (no signal handlers are installed). The flag
/// is checked before every micro-batch and after every optimizer step: a step it
/// interrupts part-way is abandoned (so a long step does not outlast a preemption grace
/// period), and the run saves a checkpoint of the last finished step (unless that step
/// is already saved, or none was done) and returns.
///
/// A step whose loss or gradient norm is not finite is skipped (no update) and counted;
/// the run fails once more than `max_bad_steps` were skipped, without saving.
pub fn train_with_stop(
    cfg: &SftConfig,
    resume: bool,
    progress: bool,
    stop: &AtomicBool,
) -> Result<TrainSummary> {
    cfg.validate()?;
    let run = RunDir::open(
        &cfg.output_dir,
        cfg,
        resume || cfg.resume,
        RESUME_FREE_KEYS,
        "train-sft",
    )?
    .keep_checkpoints(cfg.keep_checkpoints);
    let mut s = setup(cfg, &run, progress)?;
    let mut metrics = run.start(run.resumed().map(|_| s.state.step))?;
    let total = s.state.total_steps;
    let elapsed_before = s.state.elapsed_s;
    let run_start = Instant::now();
    let (mut run_tokens, mut run_train_s) = (0u64, 0f64);
    let mut summary = TrainSummary {
        step: s.state.step,
        total_steps: total,
        loss: None,
        val_loss: None,
        tokens: s.state.tokens,
        tokens_per_s: 0.0,
        bad_steps: s.state.bad_steps,
        stopped: None,
        checkpoint: run.resumed().map(Path::to_path_buf),
        final_dir: None,
    };
    let mut last_saved = run.resumed().map(|_| s.state.step);
    let mut rng = Rng::new(s.state.epoch_rng);
    let mut order = epoch_order(&mut rng, s.train_set.len(), cfg.shuffle);
    s.pb.set_length(total);
    s.pb.start_at(s.state.step);

    while s.state.step < total {
        if s.state.index >= s.train_set.len() {
            s.state.epoch += 1;
            s.state.index = 0;
            s.state.epoch_rng = rng.state();
            order = epoch_order(&mut rng, s.train_set.len(), cfg.shuffle);
        }
        let t0 = Instant::now();
        let Some(mut line) = train_step(&mut s, &order, cfg, stop)? else {
            // A signal arrived mid-step: the step is abandoned (weights, optimizer and
            // data position are those of the last finished step).
            summary.stopped = Some(StopReason::Signal);
            break;
        };
        let dt = t0.elapsed().as_secs_f64();
        let tokens = line.tokens;
        run_tokens += tokens;
        run_train_s += dt;
        let last = s.state.step == total;
        if !s.val_set.is_empty()
            && (last || (cfg.eval_every > 0 && s.state.step % cfg.eval_every == 0))
        {
            line.val_loss = Some(evaluate(&s.model, &s.val_set, cfg)?);
            summary.val_loss = line.val_loss;
        }
        s.state.elapsed_s = elapsed_before + run_start.elapsed().as_secs_f64();
        line.tokens = s.state.tokens;
        line.tokens_per_s = tokens as f64 / dt.max(1e-9);
        line.elapsed_s = s.state.elapsed_s;
        metrics.log(&line)?;
        summary.loss = Some(line.loss).filter(|l| l.is_finite());
        s.pb.set_position(s.state.step);
        s.pb.set_message(format!(
            "loss {:.4}{} | {:.0} tok/s",
            line.loss,
            line.val_loss
                .map(|v| format!(" val {v:.4}"))
                .unwrap_or_default(),
            line.tokens_per_s
        ));
        if !(line.loss.is_finite() && line.grad_norm.is_finite()) {
            check_divergence(&s, cfg, &run, &line)?;
        }
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
    summary.tokens = s.state.tokens;
    summary.bad_steps = s.state.bad_steps;
    summary.tokens_per_s = run_tokens as f64 / run_train_s.max(1e-9);
    if summary.stopped.is_none() {
        summary.final_dir = Some(export(&s, &run, run_tokens)?);
    }
    s.pb.finish();
    Ok(summary)
}

/// Exports the final model (`OUT/final`) of a completed run.
fn export(s: &Session, run: &RunDir, run_tokens: u64) -> Result<PathBuf> {
    if s.state.total_steps == 0 {
        say(&s.pb, "max_steps = 0: exporting the initial model".into());
    } else if run_tokens == 0 {
        // Resumed a finished run: nothing to train, the checkpoint is the final state.
        say(
            &s.pb,
            format!("the run was complete ({} steps)", s.state.step),
        );
    }
    let dir = run.export_final(|d| save_model(&s.model, s.tokenizer.as_ref(), d, &s.base))?;
    say(&s.pb, format!("final model in {}", dir.display()));
    Ok(dir)
}

/// One line of `metrics.jsonl` (see the crate docs).
#[derive(Debug, Clone, Serialize)]
struct StepMetrics {
    step: u64,
    epoch: f64,
    loss: f64,
    lr: f64,
    grad_norm: f64,
    tokens: u64,
    tokens_per_s: f64,
    elapsed_s: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    val_loss: Option<f64>,
    /// Steps skipped so far for a non-finite loss or gradient norm (only when > 0).
    #[serde(skip_serializing_if = "is_zero")]
    skipped_steps: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// Opens the model, data, optimizer and state of a fresh or resumed run.
fn setup(cfg: &SftConfig, run: &RunDir, progress: bool) -> Result<Session> {
    let device = default_device(cfg.cpu)?;
    let dtype = parse_dtype(&cfg.dtype)?;
    tooltrain_model::tune_runtime();
    let pb = if progress {
        Progress::new("train-sft", None, "steps")
    } else {
        Progress::hidden()
    };
    let saved_state: Option<TrainState> = run.resumed_state()?;
    // With LoRA the base is always the initial model; the adapters come fresh or from
    // the checkpoint.
    let (mut model, tokenizer) = match run.resumed().filter(|_| !cfg.lora.enabled()) {
        Some(ck) => {
            let c = tooltrain_model::load(ck, dtype, &device)
                .with_context(|| format!("loading checkpoint {}", ck.display()))?;
            (c.model, c.tokenizer)
        }
        None => init_model(cfg, dtype, &device)?,
    };
    if cfg.lora.enabled() {
        model.add_lora(&cfg.lora, cfg.seed)?;
        if let Some(ck) = run.resumed() {
            let a = ck.join(ADAPTER_DIR);
            model
                .load_adapter(&a)
                .with_context(|| format!("loading the adapters {}", a.display()))?;
        }
    }
    if cfg.bf16_matmuls && !model.set_bf16_matmuls(true) {
        pb.suspend(|| {
            tracing::warn!(
                "bf16_matmuls: neither AMX nor AVX512-BF16 on this CPU (or the model is not f32): training in f32"
            )
        });
    }
    if tokenizer.is_none() {
        pb.suspend(|| {
            tracing::warn!(
                "no tokenizer: checkpoints and the final model will lack tokenizer files"
            )
        });
    }
    let (train_set, val_set) = load_data(cfg, model.config().vocab_size, &pb)?;
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
    let mut opt = Optimizer::new(&model, &cfg.optim())?;
    let state = match (saved_state, run.resumed()) {
        (Some(s), Some(ck)) => {
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
            if opt.steps() + s.bad_steps != s.step {
                bail!(
                    "{}: optimizer state is at step {} ({} skipped), trainer state at {}",
                    ck.display(),
                    opt.steps(),
                    s.bad_steps,
                    s.step
                );
            }
            s
        }
        _ => TrainState {
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
            bad_steps: 0,
        },
    };
    say(
        &pb,
        format!(
            "{} parameters; {n} training / {} validation examples; {steps_per_epoch} steps per \
             epoch, {total_steps} in total{}",
            model.num_params(),
            val_set.len(),
            if run.resumed().is_some() {
                format!("; resuming at step {}", state.step)
            } else {
                String::new()
            }
        ),
    );
    let vars: Vec<Var> = model.trainable().values().cloned().collect();
    Ok(Session {
        base: cfg
            .init
            .clone()
            .or_else(|| cfg.model_config.clone())
            .unwrap_or_default(),
        model,
        tokenizer,
        train_set,
        val_set,
        opt,
        vars,
        state,
        pb,
    })
}

/// One optimizer step on the next `global_batch` examples of `order`: forward and
/// backward over the micro-batches, clipping, the update (skipped when the loss or the
/// gradient norm is not finite). Advances the state; `None` when `stop` interrupted it.
fn train_step(
    s: &mut Session,
    order: &[usize],
    cfg: &SftConfig,
    stop: &AtomicBool,
) -> Result<Option<StepMetrics>> {
    let n = s.train_set.len();
    let end = (s.state.index + cfg.global_batch).min(n);
    let batch: Vec<&SftExample> = order[s.state.index..end]
        .iter()
        .map(|&i| &s.train_set[i])
        .collect();
    let Some((loss, grads, tokens)) =
        forward_backward_batch(&s.model, &batch, cfg, stop, s.state.step)?
    else {
        return Ok(None);
    };
    let (grad_norm, scale) = clip_grad_norm(&grads, &s.vars, cfg.optim().clip_threshold())?;
    let lr = s.state.schedule.lr_at(s.state.step);
    if loss.is_finite() && grad_norm.is_finite() {
        s.opt.step(&s.model, &grads, lr, scale)?;
    } else {
        s.state.bad_steps += 1;
    }
    drop(grads);
    s.state.step += 1;
    s.state.index = end;
    s.state.tokens += tokens as u64;
    Ok(Some(StepMetrics {
        step: s.state.step,
        epoch: s.state.epoch as f64 + s.state.index as f64 / n as f64,
        loss,
        lr,
        grad_norm,
        tokens: tokens as u64,
        tokens_per_s: 0.0,
        elapsed_s: 0.0,
        val_loss: None,
        skipped_steps: s.state.bad_steps,
    }))
}

/// After a skipped step: warns, or fails once more than `max_bad_steps` were skipped.
fn check_divergence(s: &Session, cfg: &SftConfig, run: &RunDir, line: &StepMetrics) -> Result<()> {
    let what = format!(
        "step {}: loss {}, gradient norm {} (not finite); the update was skipped ({} of {} \
         allowed skips)",
        line.step, line.loss, line.grad_norm, s.state.bad_steps, cfg.max_bad_steps
    );
    if s.state.bad_steps <= cfg.max_bad_steps {
        s.pb.suspend(|| tracing::warn!("{what}"));
        return Ok(());
    }
    Err(diverged(run, &what))
}

/// Saves a checkpoint of the current state; refuses weights that are not finite (the
/// previous checkpoint stays the latest).
fn save(s: &Session, run: &RunDir) -> Result<PathBuf> {
    ensure_finite(&s.model, s.state.step)?;
    let dir = run.save_checkpoint(s.state.step, &s.state, |d| {
        save_model(&s.model, s.tokenizer.as_ref(), d, &s.base)?;
        s.opt.save(d)
    })?;
    say(&s.pb, format!("saved checkpoint {}", dir.display()));
    Ok(dir)
}

/// The loss (mean over every target of `batch`) and its gradients, accumulated over
/// the micro-batches of `batch`; also the number of input tokens. `None` when `stop`
/// is set before a micro-batch (the step is abandoned).
fn forward_backward_batch(
    model: &CausalLM,
    batch: &[&SftExample],
    cfg: &SftConfig,
    stop: &AtomicBool,
    step: u64,
) -> Result<Option<(f64, GradStore, usize)>> {
    let lens: Vec<usize> = batch.iter().map(|e| e.len()).collect();
    let kept_global: usize = batch.iter().map(|e| e.num_targets()).sum();
    let plan = plan_micro_batches(&lens, cfg.max_len, cfg.micro_batch_tokens, cfg.packing);
    let hidden = model.config().hidden_size;
    let mut acc = GradStore::default();
    let (mut loss_sum, mut tokens) = (0f64, 0usize);
    for (k, mb) in plan.iter().enumerate() {
        if stop.load(Ordering::SeqCst) {
            return Ok(None);
        }
        // LoRA dropout masks: a function of (run seed, step, micro-batch), so a resumed
        // run draws the same ones.
        model.set_dropout_seed(tooltrain_util::derive_seed(&[
            cfg.seed, step, k as u64, 0x64726f70,
        ]));
        let t = build_micro_batch(batch, mb, model.device())?;
        // Each micro-batch's token mean weighted by its share of the batch's targets:
        // the sum over micro-batches is the token mean over the whole batch.
        let weight = t.kept as f64 / kept_global as f64;
        let w = model.lm_head_weight(true);
        let bf16 = model.bf16_matmuls_active();
        let (loss, mut grads) =
            model.forward_backward(&t.ids, &t.layout, cfg.checkpointing, |hid| {
                // Only positions with a target reach the output projection.
                let h = hid.reshape(((), hidden))?.index_select(&t.positions, 0)?;
                Ok((head_loss(&h, &w, &t.targets, bf16)? * weight)?)
            })?;
        loss_sum += loss;
        tokens += t.tokens;
        for v in model.trainable().values() {
            if let Some(g) = grads.remove(v.as_tensor()) {
                acc.accumulate(v.as_tensor(), &g)?;
            }
        }
    }
    Ok(Some((loss_sum, acc, tokens)))
}

/// Mean cross-entropy of `targets` under the logits `h @ w^T` (with `bf16`, its products
/// in bf16 like the layers': `bf16_matmuls`). Half-precision weights are upcast to f32
/// first: a log-softmax summed in bf16 over a 150k vocabulary stalls (bf16 has 8
/// significant bits) and the loss would be wrong.
fn head_loss(
    h: &candle_core::Tensor,
    w: &candle_core::Tensor,
    targets: &candle_core::Tensor,
    bf16: bool,
) -> candle_core::Result<candle_core::Tensor> {
    if matches!(h.dtype(), DType::F32 | DType::F64) {
        return ops::linear_cross_entropy_with(h, w, targets, None, bf16);
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
        let loss = head_loss(&h, &w, &t.targets, false)?;
        sum += loss.to_dtype(DType::F64)?.to_scalar::<f64>()? * t.kept as f64;
        kept += t.kept;
    }
    Ok(sum / kept.max(1) as f64)
}

/// FNV-1a (64-bit) over every example's length, ids and mask (each as 4 little-endian
/// bytes), in order.
fn hash_examples(set: &[SftExample]) -> u64 {
    let words = set.iter().flat_map(|e| {
        std::iter::once(e.len() as u32)
            .chain(e.input_ids.iter().copied())
            .chain(e.loss_mask.iter().map(|&m| m as u32))
    });
    tooltrain_util::fnv1a(0, words.flat_map(u32::to_le_bytes))
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
    pb: &Progress,
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

/// Logs `msg` (info) without tearing the progress bar.
fn say(pb: &Progress, msg: String) {
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
    }
}

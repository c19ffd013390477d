//! The `train-rl` config (TOML; see `configs/rl-*.toml`). Defaults are the paper's RL
//! settings (ToolTrain on Qwen2.5-Coder-7B): groups of 16 samples, 128 tasks a step in
//! 16 mini-batches, lr 1e-6 constant, weight decay 0.01, PPO clip 0.2 with dual clip 3,
//! token-mean aggregation, no KL, no entropy bonus, temperature 1, 10 turns.

use crate::advantage::Estimator;
use crate::aggregate::Aggregation;
use crate::kl::KlEstimator;
use crate::loss::Clip;
use crate::objective::{PolicyLoss, Settings};
use anyhow::{anyhow, Result};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use tooltrain_rollout::episode::{Candidates, EpisodeConfig};
use tooltrain_rollout::eval::DataConfig;
use tooltrain_train::OptimSettings;

/// Where the old log-probs of the ratio come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum OldLogprobs {
    /// The sampler's (no extra pass).
    #[default]
    Rollout,
    /// A forward pass of the trainer before the updates, with truncated importance
    /// sampling (`tis_cap`) correcting the rollout/trainer mismatch.
    Recompute,
}

/// What happens to episodes cut by a budget (a turn that hit its token cap, or a search
/// that ran out of context).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Truncated {
    /// Trained on like any other episode.
    #[default]
    Keep,
    /// Left out of the loss (still part of their group's statistics).
    Mask,
}

/// Sampling of the rollouts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RolloutConfig {
    /// Sampling temperature (> 0); the trainer's log-probs use the same.
    pub temperature: f64,
    /// Most sequences decoded in one batch.
    pub max_batch: usize,
    /// Keep each episode's keys and values between its turns and share a group's prompt.
    pub reuse_prefixes: bool,
    /// Decode with bf16 linear layers on AMX tiles or AVX512-BF16 (f32 without either):
    /// faster rollouts, at a log-prob mismatch to the trainer that the step metrics
    /// report (`logprob_mismatch_*`); with it, `old_logprobs = "recompute"` keeps the
    /// ratios exact.
    pub bf16: bool,
    /// Keep the rollouts' keys and values in bf16 (f32 models): half the memory of the KV
    /// caches and kept prefixes; the mismatch is reported the same way.
    pub kv_bf16: bool,
}

impl Default for RolloutConfig {
    fn default() -> Self {
        RolloutConfig {
            temperature: 1.0,
            max_batch: 64,
            reuse_prefixes: true,
            bf16: false,
            kv_bf16: false,
        }
    }
}

/// The `train-rl` config.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RlConfig {
    /// The checkpoint to start from (HF directory with its tokenizer; an SFT `final/`).
    pub init: PathBuf,
    /// Checkpoints, metrics, rollouts and the final model go here.
    pub output_dir: PathBuf,
    /// Weight dtype: `f32` or `bf16` (with f32 master weights).
    pub dtype: String,
    pub cpu: bool,
    /// Seed of the task order, the prompts and every sample.
    pub seed: u64,
    /// Training tasks.
    pub train_data: DataConfig,
    /// Held-out tasks for validation (greedy episodes); none when the dataset is empty.
    pub val_data: DataConfig,
    /// Validation every this many steps (0: before training and at the end only).
    pub val_every: u64,
    /// Tasks per step (B).
    pub tasks_per_step: usize,
    /// Episodes per task (n): a group.
    pub group_size: usize,
    /// Steps to run.
    pub max_steps: u64,
    /// Shuffle the tasks every pass.
    pub shuffle: bool,
    pub rollout: RolloutConfig,
    pub episode: EpisodeConfig,
    pub advantage: Estimator,
    pub policy_loss: PolicyLoss,
    /// Ratio clip below `1 - clip_low` and above `1 + clip_high`.
    pub clip_low: f64,
    pub clip_high: f64,
    /// Dual clip `c > 1` for negative advantages (absent: off).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dual_clip: Option<f64>,
    /// DPPO trust region: drop tokens whose probability moved more than this from the
    /// old policy's (0: off).
    pub trust_region: f64,
    pub aggregation: Aggregation,
    /// `L` of `seq-mean-token-sum-norm` (0: the episode's generation budget).
    pub norm_len: usize,
    /// KL coefficient against the reference (0: off, and no reference is loaded).
    pub kl_coef: f64,
    pub kl_estimator: KlEstimator,
    /// Put the KL into the reward (per episode, summed over its tokens) instead of the
    /// loss.
    pub kl_in_reward: bool,
    /// The reference checkpoint (default: `init`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reference: Option<PathBuf>,
    pub entropy_coef: f64,
    /// Subtracted from a sample's reward per invalid turn (a malformed tool call or an
    /// unparsable reply). 0, the paper's setting, trains on nDCG@5 alone; more is a
    /// format-shaping ablation. `reward_mean` stays nDCG@5; `shaped_reward_mean` is
    /// logged beside it.
    pub invalid_turn_penalty: f64,
    pub old_logprobs: OldLogprobs,
    /// Cap `C` of truncated importance sampling `min(exp(old - rollout), C)` (with
    /// `old_logprobs = "recompute"`).
    pub tis_cap: f64,
    /// Leave out groups whose rewards are all equal (no signal).
    pub filter_zero_variance: bool,
    /// DAPO dynamic sampling: up to this many more rollout rounds (on the next tasks) to
    /// refill a batch thinned by the filter (0: off).
    pub dynamic_sampling_rounds: usize,
    pub truncated: Truncated,
    /// Longest episode trained on (tokens); longer ones are dropped and counted, never
    /// cut.
    pub max_len: usize,
    /// Optimizer steps per RL step: the step's episodes split into this many parts.
    pub mini_batches: usize,
    /// Passes over the step's episodes.
    pub ppo_epochs: usize,
    /// Token budget of one forward/backward pass.
    pub micro_batch_tokens: usize,
    /// Pack several episodes into one row of a micro-batch.
    pub packing: bool,
    /// Compute a prompt shared by several episodes (a group's) once per micro-batch row:
    /// each episode places only its tokens after the common prefix and attends to the
    /// shared one. Exact; implies packing. Mini-batches then keep a group's episodes
    /// together.
    pub share_prefixes: bool,
    pub lr: f64,
    /// Linear warm-up over this many optimizer steps, then constant.
    pub warmup_steps: u64,
    pub betas: [f64; 2],
    pub eps: f64,
    pub weight_decay: f64,
    pub max_grad_norm: f64,
    pub master_weights: bool,
    /// Recompute activations in the backward pass.
    pub checkpointing: bool,
    /// The trainer's linear layers (forward, backward and recomputed log-probs) take
    /// bf16-rounded operands with f32 sums (AMX tiles or AVX512-BF16): mixed precision,
    /// with f32 weights, gradients and optimizer. f32 models on CPUs with either; f32
    /// elsewhere.
    pub bf16_matmuls: bool,
    /// Checkpoint every this many steps (0: at the end and when stopped).
    pub save_every: u64,
    pub keep_checkpoints: usize,
    pub resume: bool,
    /// Stop with a checkpoint once this many steps are done (0: never).
    pub stop_at_step: u64,
    /// Optimizer steps with a non-finite loss or gradient norm that are skipped; one more
    /// stops the run without saving.
    pub max_bad_steps: u64,
    /// Write every step's episodes to `OUT/rollouts/step-N.jsonl`.
    pub dump_rollouts: bool,
    /// LoRA adapters on a frozen base (`rank = 0`: full fine-tuning). Rollouts run with
    /// the adapters; checkpoints and the final export hold the merged HF weights and the
    /// PEFT directory `adapter/`.
    pub lora: tooltrain_model::LoraConfig,
}

impl Default for RlConfig {
    fn default() -> Self {
        RlConfig {
            init: PathBuf::new(),
            output_dir: PathBuf::from("runs/rl"),
            dtype: "bf16".into(),
            cpu: false,
            seed: 0,
            train_data: DataConfig::default(),
            val_data: DataConfig::default(),
            val_every: 10,
            tasks_per_step: 128,
            group_size: 16,
            max_steps: 100,
            shuffle: true,
            rollout: RolloutConfig::default(),
            episode: EpisodeConfig {
                candidates: Candidates::GtPlusRandom,
                ..EpisodeConfig::default()
            },
            advantage: Estimator::default(),
            policy_loss: PolicyLoss::Ppo,
            clip_low: 0.2,
            clip_high: 0.2,
            dual_clip: Some(3.0),
            trust_region: 0.0,
            aggregation: Aggregation::TokenMean,
            norm_len: 0,
            kl_coef: 0.0,
            kl_estimator: KlEstimator::K3,
            kl_in_reward: false,
            reference: None,
            entropy_coef: 0.0,
            invalid_turn_penalty: 0.0,
            old_logprobs: OldLogprobs::Rollout,
            tis_cap: 2.0,
            filter_zero_variance: true,
            dynamic_sampling_rounds: 0,
            truncated: Truncated::Keep,
            max_len: 32_768,
            mini_batches: 16,
            ppo_epochs: 1,
            micro_batch_tokens: 32_768,
            packing: true,
            share_prefixes: true,
            lr: 1e-6,
            warmup_steps: 0,
            betas: [0.9, 0.999],
            eps: 1e-8,
            weight_decay: 0.01,
            max_grad_norm: 1.0,
            master_weights: true,
            checkpointing: false,
            bf16_matmuls: false,
            save_every: 10,
            keep_checkpoints: 2,
            resume: false,
            stop_at_step: 0,
            max_bad_steps: 3,
            dump_rollouts: false,
            lora: tooltrain_model::LoraConfig::default(),
        }
    }
}

/// Keys that may differ between a checkpoint's config and the run resuming it.
pub const RESUME_FREE_KEYS: &[&str] = &[
    "output_dir",
    "resume",
    "stop_at_step",
    "max_bad_steps",
    "save_every",
    "keep_checkpoints",
    "val_every",
    "val_data",
    "dump_rollouts",
];

impl RlConfig {
    /// Rejects impossible values, naming the key.
    pub fn validate(&self) -> Result<()> {
        let bad = |key: &str, msg: String| Err(anyhow!("invalid config: `{key}` {msg}"));
        if self.init.as_os_str().is_empty() {
            return bad(
                "init",
                "is required (a checkpoint directory with its tokenizer)".into(),
            );
        }
        if self.output_dir.as_os_str().is_empty() {
            return bad("output_dir", "must not be empty".into());
        }
        if self.train_data.dataset.as_os_str().is_empty() {
            return bad("train_data.dataset", "is required".into());
        }
        if self.train_data.repos_dir.as_os_str().is_empty() {
            return bad("train_data.repos_dir", "is required".into());
        }
        if !self.val_data.dataset.as_os_str().is_empty()
            && self.val_data.repos_dir.as_os_str().is_empty()
        {
            return bad(
                "val_data.repos_dir",
                "is required with val_data.dataset".into(),
            );
        }
        if let Err(e) = tooltrain_model::parse_dtype(&self.dtype) {
            return bad("dtype", e.to_string());
        }
        if self.tasks_per_step == 0 {
            return bad("tasks_per_step", "must be >= 1".into());
        }
        if self.group_size < 2 {
            return bad(
                "group_size",
                format!(
                    "must be >= 2: a group of one has no baseline (got {})",
                    self.group_size
                ),
            );
        }
        if !(self.rollout.temperature > 0.0 && self.rollout.temperature.is_finite()) {
            return bad(
                "rollout.temperature",
                format!(
                    "must be > 0: RL needs the sampled tokens' log-probs (got {})",
                    self.rollout.temperature
                ),
            );
        }
        if self.rollout.max_batch == 0 {
            return bad("rollout.max_batch", "must be >= 1".into());
        }
        if !(self.clip_low >= 0.0 && self.clip_low < 1.0 && self.clip_high >= 0.0) {
            return bad(
                "clip_low",
                format!(
                    "must be in [0, 1) and clip_high >= 0 (got {} and {})",
                    self.clip_low, self.clip_high
                ),
            );
        }
        if let Some(c) = self.dual_clip {
            if !(c > 1.0) {
                return bad("dual_clip", format!("must be > 1 (got {c})"));
            }
        }
        if !(self.invalid_turn_penalty >= 0.0 && self.invalid_turn_penalty.is_finite()) {
            return bad(
                "invalid_turn_penalty",
                format!("must be >= 0 (got {})", self.invalid_turn_penalty),
            );
        }
        if !(self.trust_region >= 0.0) {
            return bad(
                "trust_region",
                format!("must be >= 0 (got {})", self.trust_region),
            );
        }
        if !(self.kl_coef >= 0.0 && self.kl_coef.is_finite()) {
            return bad("kl_coef", format!("must be >= 0 (got {})", self.kl_coef));
        }
        if !self.entropy_coef.is_finite() {
            return bad("entropy_coef", "must be finite".into());
        }
        if !(self.tis_cap >= 1.0) {
            return bad("tis_cap", format!("must be >= 1 (got {})", self.tis_cap));
        }
        if self.max_len < 2 {
            return bad("max_len", format!("must be >= 2 (got {})", self.max_len));
        }
        if self.micro_batch_tokens < self.max_len {
            return bad(
                "micro_batch_tokens",
                format!(
                    "must be >= max_len = {} so an episode fits a micro-batch (got {})",
                    self.max_len, self.micro_batch_tokens
                ),
            );
        }
        if self.mini_batches == 0 || self.ppo_epochs == 0 {
            return bad("mini_batches", "and `ppo_epochs` must be >= 1".into());
        }
        self.episode
            .validate()
            .map_err(|e| anyhow!("invalid config: {e}"))?;
        self.lora
            .validate()
            .map_err(|e| anyhow!("invalid config: {e}"))?;
        self.optim().validate()?;
        Ok(())
    }

    /// The resolved config as TOML.
    pub fn to_toml(&self) -> Result<String> {
        tooltrain_train::config::to_toml(self)
    }

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

    /// The objective's settings.
    pub fn objective(&self) -> Settings {
        Settings {
            loss: self.policy_loss,
            clip: Clip {
                clip_low: self.clip_low,
                clip_high: self.clip_high,
                dual_clip: self.dual_clip,
            },
            trust_region: self.trust_region,
            tis_cap: (self.old_logprobs == OldLogprobs::Recompute).then_some(self.tis_cap),
            kl: (self.kl_coef > 0.0 && !self.kl_in_reward)
                .then_some((self.kl_coef, self.kl_estimator)),
            entropy_coef: self.entropy_coef,
        }
    }

    /// `L` of `seq-mean-token-sum-norm`: `norm_len`, else the generation budget of an
    /// episode (every search turn and the answer at their caps).
    pub fn norm_len(&self) -> usize {
        if self.norm_len > 0 {
            return self.norm_len;
        }
        self.episode.max_turns * self.episode.max_new_tokens + self.episode.max_answer_tokens
    }

    /// Whether validation is configured.
    pub fn has_validation(&self) -> bool {
        !self.val_data.dataset.as_os_str().is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_need_paths_and_round_trip() {
        let e = RlConfig::default().validate().unwrap_err().to_string();
        assert!(e.contains("`init`"), "{e}");
        let mut cfg = RlConfig {
            init: "ck".into(),
            ..RlConfig::default()
        };
        cfg.train_data.dataset = "d.jsonl".into();
        cfg.train_data.repos_dir = "repos".into();
        cfg.validate().unwrap();
        let back: RlConfig = toml::from_str(&cfg.to_toml().unwrap()).unwrap();
        assert_eq!(back, cfg);
        cfg.rollout.temperature = 0.0;
        let e = cfg.validate().unwrap_err().to_string();
        assert!(e.contains("rollout.temperature"), "{e}");
        cfg.rollout.temperature = 1.0;
        cfg.group_size = 1;
        assert!(cfg
            .validate()
            .unwrap_err()
            .to_string()
            .contains("group_size"));
        cfg.group_size = 2;
        for bad in [-0.1, f64::NAN, f64::INFINITY] {
            cfg.invalid_turn_penalty = bad;
            let e = cfg.validate().unwrap_err().to_string();
            assert!(e.contains("`invalid_turn_penalty`"), "{e}");
        }
        cfg.invalid_turn_penalty = 0.1;
        cfg.validate().unwrap();
    }
}

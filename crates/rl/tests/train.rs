//! The RL loop end to end on a random one-layer model over the real Qwen vocabulary and
//! chat template, on small Python repositories: on-policy updates have ratio 1 and no
//! clipping, the sampler's log-probs equal the trainer's, a run stopped and resumed is
//! bit-identical to an uninterrupted one, a stop during the rollouts abandons the step.

use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use tooltrain_model::{CausalLM, DType, Device, ModelConfig, Tokenizer};
use tooltrain_rl::config::OldLogprobs;
use tooltrain_rl::{train_with_stop, RlConfig};
use tooltrain_rollout::episode::{Candidates, EpisodeConfig};
use tooltrain_rollout::eval::DataConfig;
use tooltrain_train::StopReason;

fn qwen() -> Option<Tokenizer> {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../assets/qwen-tokenizer");
    if p.exists() {
        return Some(Tokenizer::from_dir(&p).unwrap());
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{} is missing: run scripts/fetch-assets.sh", p.display());
    }
    eprintln!(
        "SKIP: {} missing (run scripts/fetch-assets.sh)",
        p.display()
    );
    None
}

/// A random model saved with the tokenizer, and three tasks on small repositories.
fn setup(dir: &Path, tok: &Tokenizer) -> (PathBuf, DataConfig) {
    let cfgm = ModelConfig::from_json(&json!({
        "model_type": "qwen2", "vocab_size": tok.vocab_size(), "hidden_size": 16,
        "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
        "num_key_value_heads": 1, "max_position_embeddings": 4096, "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0, "tie_word_embeddings": true
    }))
    .unwrap();
    let model = CausalLM::new_random(&cfgm, DType::F32, &Device::Cpu, 5).unwrap();
    let init = dir.join("init");
    tooltrain_model::save(&model, Some(tok), &init).unwrap();
    let repos = dir.join("repos");
    let mut lines = String::new();
    let mut gt = serde_json::Map::new();
    for (i, (file, name, body)) in [
        ("shop/cart.py", "Cart.total", "class Cart:\n    def total(self):\n        return 0\n\n    def add(self, x):\n        pass\n"),
        ("shop/parse.py", "parse", "def parse(s):\n    return s.split(',')\n\n\ndef unused():\n    pass\n"),
        ("shop/tax.py", "Tax.rate", "class Tax:\n    def rate(self):\n        return 0.2\n"),
    ]
    .iter()
    .enumerate()
    {
        let id = format!("demo__shop-{i}");
        let root = repos.join(&id);
        for (f, text) in [
            (*file, *body),
            ("shop/util.py", "def helper(x):\n    return x\n"),
            ("shop/misc.py", "class Misc:\n    def go(self):\n        return 1\n"),
        ] {
            let p = root.join(f);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, text).unwrap();
        }
        lines.push_str(
            &json!({"instance_id": id, "repo": "demo/shop", "base_commit": "0",
                    "problem_statement": format!("{name} is wrong.")})
            .to_string(),
        );
        lines.push('\n');
        gt.insert(id, json!([format!("{file}::{name}")]));
    }
    std::fs::write(dir.join("dataset.jsonl"), lines).unwrap();
    std::fs::write(dir.join("gt.json"), Value::Object(gt).to_string()).unwrap();
    let data = DataConfig {
        dataset: dir.join("dataset.jsonl"),
        gt: Some(dir.join("gt.json")),
        repos_dir: repos,
        ..DataConfig::default()
    };
    (init, data)
}

fn config(init: &Path, data: &DataConfig, out: &Path) -> RlConfig {
    RlConfig {
        init: init.to_path_buf(),
        output_dir: out.to_path_buf(),
        dtype: "f32".into(),
        cpu: true,
        seed: 3,
        train_data: data.clone(),
        val_data: DataConfig {
            limit: 2,
            ..data.clone()
        },
        val_every: 2,
        tasks_per_step: 2,
        group_size: 2,
        max_steps: 3,
        episode: EpisodeConfig {
            candidates: Candidates::GtPlusRandom,
            num_candidates: 2,
            max_turns: 1,
            max_new_tokens: 6,
            max_answer_tokens: 6,
            max_context_tokens: 2048,
            ..EpisodeConfig::default()
        },
        // Random weights score 0 everywhere: keep the groups, and let the entropy bonus
        // move the weights so that later steps sample from changed weights.
        filter_zero_variance: false,
        entropy_coef: 0.05,
        max_len: 2048,
        micro_batch_tokens: 4096,
        mini_batches: 2,
        lr: 1e-2,
        dual_clip: Some(3.0),
        save_every: 1,
        keep_checkpoints: 0,
        ..RlConfig::default()
    }
}

fn metrics(out: &Path) -> Vec<serde_json::Map<String, Value>> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The metrics without the timing keys.
fn untimed(mut m: Vec<serde_json::Map<String, Value>>) -> Vec<serde_json::Map<String, Value>> {
    for line in &mut m {
        line.retain(|k, _| !k.ends_with("_s") && !k.ends_with("tokens_per_s"));
    }
    m
}

fn f(line: &serde_json::Map<String, Value>, k: &str) -> f64 {
    line.get(k)
        .and_then(Value::as_f64)
        .unwrap_or_else(|| panic!("no `{k}` in {line:?}"))
}

#[test]
fn on_policy_updates_have_ratio_one_and_rollout_logprobs_match_the_trainer() {
    let Some(tok) = qwen() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let (init, data) = setup(tmp.path(), &tok);
    for old in [OldLogprobs::Rollout, OldLogprobs::Recompute] {
        let out = tmp.path().join(format!("{old:?}"));
        let cfg = RlConfig {
            max_steps: 1,
            mini_batches: 1,
            val_data: DataConfig::default(),
            old_logprobs: old,
            ..config(&init, &data, &out)
        };
        let s = train_with_stop(&cfg, false, false, &AtomicBool::new(false)).unwrap();
        assert_eq!((s.step, s.stopped), (1, None));
        assert!(s.final_dir.unwrap().join("model.safetensors").exists());
        let m = metrics(&out);
        assert_eq!(m.len(), 1);
        let l = &m[0];
        assert_eq!(f(l, "episodes"), 4.0);
        assert_eq!(f(l, "failed_episodes"), 0.0);
        assert!(f(l, "trained_episodes") == 4.0, "{l:?}");
        // One update on the sampling weights: the ratio is 1, nothing is clipped.
        for k in ["ratio_min", "ratio_mean", "ratio_max"] {
            assert!((f(l, k) - 1.0).abs() < 1e-3, "{k} = {}", f(l, k));
        }
        for k in ["clip_low_frac", "clip_high_frac", "clip_dual_frac"] {
            assert_eq!(f(l, k), 0.0, "{k}");
        }
        // The sampler's log-probs equal the trainer's on the same weights.
        assert!(f(l, "logprob_mismatch_max") < 1e-4, "{l:?}");
        assert!(f(l, "entropy") > 0.0 && f(l, "grad_norm") > 0.0);
        // All rewards are 0 (random weights): advantages 0, the loss is the entropy bonus.
        assert_eq!(f(l, "groups_all0"), 1.0);
        assert!(
            (f(l, "loss") + 0.05 * f(l, "entropy")).abs() < 1e-4,
            "{l:?}"
        );
    }
}

/// Mixed precision (`bf16_matmuls`, on a CPU with AMX): the recomputed old log-probs and
/// the loss pass use the same bf16 layers and head, so one on-policy update has ratio 1;
/// against the f32 rollout they differ (the bf16 products ran).
#[test]
fn bf16_matmuls_recompute_keeps_on_policy_ratios_at_one() {
    let Some(tok) = qwen() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let (init, data) = setup(tmp.path(), &tok);
    let out = tmp.path().join("bf16");
    let cfg = RlConfig {
        max_steps: 1,
        mini_batches: 1,
        val_data: DataConfig::default(),
        old_logprobs: OldLogprobs::Recompute,
        bf16_matmuls: true,
        ..config(&init, &data, &out)
    };
    train_with_stop(&cfg, false, false, &AtomicBool::new(false)).unwrap();
    let l = &metrics(&out)[0];
    for k in ["ratio_min", "ratio_mean", "ratio_max"] {
        assert!((f(l, k) - 1.0).abs() < 1e-4, "{k} = {}", f(l, k));
    }
    let mismatch = f(l, "logprob_mismatch_max");
    if tooltrain_model::bf16_available() {
        assert!(
            mismatch > 1e-4,
            "bf16 trainer equals the f32 rollout: {l:?}"
        );
    } else {
        assert!(mismatch < 1e-4, "{l:?}");
    }
}

/// With `invalid_turn_penalty`, the rewards the advantages see are nDCG@5 minus the
/// penalty per invalid turn: random weights score 0 and reply with text that is neither
/// a call nor an answer, so the shaped mean is `-penalty x invalid turns per episode`.
#[test]
fn invalid_turn_penalty_shapes_the_trained_rewards() {
    let Some(tok) = qwen() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let (init, data) = setup(tmp.path(), &tok);
    let out = tmp.path().join("penalty");
    let cfg = RlConfig {
        max_steps: 1,
        mini_batches: 1,
        val_data: DataConfig::default(),
        invalid_turn_penalty: 0.5,
        ..config(&init, &data, &out)
    };
    train_with_stop(&cfg, false, false, &AtomicBool::new(false)).unwrap();
    let l = &metrics(&out)[0];
    assert_eq!(f(l, "reward_mean"), 0.0, "{l:?}");
    let invalid = f(l, "invalid_turns");
    assert!(
        invalid > 0.0,
        "the random model made no invalid turn: {l:?}"
    );
    let shaped = f(l, "shaped_reward_mean");
    assert!(
        (shaped + 0.5 * invalid).abs() < 1e-9,
        "{shaped} vs {invalid}: {l:?}"
    );
    // The groups are judged on the shaped rewards too: each episode's one turn (of
    // `max_turns = 1`) is invalid, so a group's rewards are all -0.5 ("uniform"), where
    // nDCG alone would make them all 0.
    assert_eq!(invalid, 1.0, "{l:?}");
    assert_eq!(f(l, "groups_uniform"), 1.0, "{l:?}");
    assert_eq!(f(l, "groups_all0"), 0.0, "{l:?}");
}

#[test]
fn stop_and_resume_is_bit_identical_to_an_uninterrupted_run() {
    let Some(tok) = qwen() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let (init, data) = setup(tmp.path(), &tok);
    let no = AtomicBool::new(false);
    let a = tmp.path().join("a");
    let full = train_with_stop(&config(&init, &data, &a), false, false, &no).unwrap();
    assert_eq!(full.step, 3);
    let b = tmp.path().join("b");
    let mut cfg = RlConfig {
        stop_at_step: 1,
        ..config(&init, &data, &b)
    };
    let s1 = train_with_stop(&cfg, false, false, &no).unwrap();
    assert_eq!((s1.step, s1.stopped), (1, Some(StopReason::StopAtStep)));
    // Starting again without `resume` refuses to overwrite the run.
    let e = train_with_stop(&cfg, false, false, &no)
        .unwrap_err()
        .to_string();
    assert!(e.contains("resume"), "{e}");
    cfg.stop_at_step = 2;
    let s2 = train_with_stop(&cfg, true, false, &no).unwrap();
    assert_eq!(s2.step, 2);
    cfg.stop_at_step = 0;
    let s3 = train_with_stop(&cfg, true, false, &no).unwrap();
    assert_eq!((s3.step, s3.stopped), (3, None));
    let (ma, mb) = (untimed(metrics(&a)), untimed(metrics(&b)));
    // Step 0 validation, steps 1-3 (validation at 2 and 3).
    assert_eq!(ma.len(), 4);
    assert!(ma[2].contains_key("val/reward") && ma[3].contains_key("val/reward"));
    assert_eq!(ma, mb);
    let w = |d: &Path| std::fs::read(d.join("final/model.safetensors")).unwrap();
    assert_eq!(w(&a), w(&b), "final weights differ");
    // The weights moved, so later steps sampled from new weights.
    assert_ne!(
        w(&a),
        std::fs::read(init.join("model.safetensors")).unwrap()
    );
    // A stop flag set during the rollouts abandons the step: nothing is trained or saved.
    let c = tmp.path().join("c");
    let s = train_with_stop(
        &config(&init, &data, &c),
        false,
        false,
        &AtomicBool::new(true),
    )
    .unwrap();
    assert_eq!(
        (s.step, s.stopped, s.checkpoint),
        (0, Some(StopReason::Signal), None)
    );
}

#[test]
fn lora_rollouts_use_the_adapters_and_resume_exactly() {
    let Some(tok) = qwen() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let (init, data) = setup(tmp.path(), &tok);
    let lora = tooltrain_model::LoraConfig {
        rank: 2,
        alpha: 4.0,
        ..Default::default()
    };
    let cfg = |out: &str| RlConfig {
        max_steps: 2,
        val_data: DataConfig::default(),
        lora: lora.clone(),
        lr: 5e-2,
        ..config(&init, &data, &tmp.path().join(out))
    };
    let no = AtomicBool::new(false);
    let a = train_with_stop(&cfg("a"), false, false, &no).unwrap();
    assert_eq!(a.step, 2);
    let mut b = cfg("b");
    b.stop_at_step = 1;
    train_with_stop(&b, false, false, &no).unwrap();
    b.stop_at_step = 0;
    train_with_stop(&b, true, false, &no).unwrap();
    let (ma, mb) = (
        untimed(metrics(&tmp.path().join("a"))),
        untimed(metrics(&tmp.path().join("b"))),
    );
    assert_eq!(ma, mb);
    // Only the adapters trained: the merged export differs from the base in the adapted
    // projections only.
    let fin = tmp.path().join("a/final");
    let merged = tooltrain_model::load(&fin, DType::F32, &Device::Cpu)
        .unwrap()
        .model;
    let base = tooltrain_model::load(&init, DType::F32, &Device::Cpu)
        .unwrap()
        .model;
    let (mt, bt) = (merged.hf_tensors().unwrap(), base.hf_tensors().unwrap());
    let e = "model.embed_tokens.weight";
    assert_eq!(
        mt[e]
            .eq(&bt[e])
            .unwrap()
            .min_all()
            .unwrap()
            .to_scalar::<u8>()
            .unwrap(),
        1,
        "the frozen embedding changed"
    );
    let q = "model.layers.0.self_attn.q_proj.weight";
    assert_eq!(
        mt[q]
            .ne(&bt[q])
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<u8>()
            .unwrap(),
        1,
        "the adapted projection did not change"
    );
    assert!(fin.join("adapter/adapter_model.safetensors").exists());
    let w = |d: &str| {
        std::fs::read(
            tmp.path()
                .join(d)
                .join("final/adapter/adapter_model.safetensors"),
        )
        .unwrap()
    };
    assert!(w("a") == w("b"), "adapters differ after resume");
}

//! The trainer's mini-batch objective against an independent PyTorch computation
//! (`scripts/make_rl_fixture.py`, committed as `data/fixtures/rl_objective.*`): the loss
//! and the gradients of the tiny Qwen2 checkpoint on a fixed batch agree to 1e-4 for every
//! advantage estimator x aggregation mode (PPO with clip-higher and dual clip), GSPO,
//! each KL estimator, the entropy bonus, a sampling temperature, truncated importance
//! sampling and the trust-region mask; packed and unpacked micro-batches agree too.

use serde_json::Value;
use std::collections::BTreeMap;
use std::path::PathBuf;
use tooltrain_model::{load, DType, Device, Tensor};
use tooltrain_rl::advantage::{advantages, Estimator};
use tooltrain_rl::aggregate::Aggregation;
use tooltrain_rl::config::OldLogprobs;
use tooltrain_rl::kl::KlEstimator;
use tooltrain_rl::objective::PolicyLoss;
use tooltrain_rl::{minibatch_objective, RlConfig, Sample};
use tooltrain_train::batch::TokenSeq;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../data/fixtures")
}

fn f64s(v: &Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

fn config(set: &Value) -> RlConfig {
    let s = |k: &str| set[k].as_str().unwrap().to_string();
    let n = |k: &str| set[k].as_f64().unwrap();
    let mut cfg = RlConfig {
        max_len: 64,
        micro_batch_tokens: 128,
        ..RlConfig::default()
    };
    cfg.rollout.temperature = n("temperature");
    cfg.clip_low = n("clip_low");
    cfg.clip_high = n("clip_high");
    cfg.dual_clip = set["dual_clip"].as_f64();
    cfg.policy_loss = match s("policy_loss").as_str() {
        "ppo" => PolicyLoss::Ppo,
        _ => PolicyLoss::Gspo,
    };
    cfg.trust_region = n("trust_region");
    if let Some(c) = set["tis_cap"].as_f64() {
        cfg.old_logprobs = OldLogprobs::Recompute;
        cfg.tis_cap = c;
    }
    cfg.kl_coef = n("kl_coef");
    cfg.kl_estimator = match s("kl_estimator").as_str() {
        "k1" => KlEstimator::K1,
        "k2" => KlEstimator::K2,
        _ => KlEstimator::K3,
    };
    cfg.entropy_coef = n("entropy_coef");
    cfg.norm_len = n("norm_len") as usize;
    cfg.aggregation = serde_json::from_value::<Aggregation>(set["aggregation"].clone()).unwrap();
    cfg.advantage = match s("advantage").as_str() {
        "grpo" => Estimator::Grpo {
            eps: 1e-6,
            sample_std: false,
        },
        "dr_grpo" => Estimator::DrGrpo,
        _ => Estimator::Rloo,
    };
    cfg
}

fn samples(fx: &Value, cfg: &RlConfig) -> Vec<Sample> {
    let adv: Vec<f64> = fx["rewards"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|g| advantages(&f64s(g), cfg.advantage))
        .collect();
    fx["sequences"]
        .as_array()
        .unwrap()
        .iter()
        .zip(fx["side"].as_array().unwrap())
        .zip(adv)
        .map(|((s, side), a)| {
            let ids: Vec<u32> = f64s(&s["ids"]).iter().map(|&x| x as u32).collect();
            let mask: Vec<u8> = f64s(&s["mask"]).iter().map(|&x| x as u8).collect();
            Sample::new(
                ids,
                mask,
                f64s(&side["rollout"]),
                f64s(&side["old"]),
                (cfg.kl_coef > 0.0).then(|| f64s(&side["reference"])),
                a,
            )
            .unwrap()
        })
        .collect()
}

/// Largest |a - b| over all gradients, relative to the largest |b|.
fn max_rel_diff(a: &BTreeMap<String, Tensor>, b: &BTreeMap<String, Tensor>) -> f64 {
    let (mut diff, mut scale) = (0f64, 0f64);
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    for (name, x) in a {
        let y = &b[name];
        let d = (x - y).unwrap().abs().unwrap().max_all().unwrap();
        diff = diff.max(d.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap());
        let m = y.abs().unwrap().max_all().unwrap();
        scale = scale.max(m.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap());
    }
    diff / scale.max(1e-12)
}

/// Prefix sharing is exact: groups whose samples share a prompt give the same loss and
/// gradients as the same samples computed one a row, for every fixture setting, with
/// groups split over rows by a small budget too.
#[test]
fn prefix_sharing_matches_separate_rows() {
    let fx: Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("rl_objective.json")).unwrap(),
    )
    .unwrap();
    let model = load(&fixtures().join("tiny-qwen2"), DType::F32, &Device::Cpu)
        .unwrap()
        .model;
    for case in fx["cases"].as_array().unwrap() {
        let mut cfg = config(&case["settings"]);
        cfg.max_len = 128;
        // Each group's samples: the fixture's sequences behind one shared 9-token prompt
        // (the fixture's prompt tokens become part of the generated turn's context).
        let base = samples(&fx, &cfg);
        let prompts = [
            vec![3u32, 17, 29, 4, 88, 61, 7, 12, 40],
            vec![3u32, 17, 29, 5, 9, 2, 14, 71, 33],
        ];
        let smp: Vec<Sample> = base
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let (ids, mask) = (s.ids(), s.mask());
                let p = &prompts[i / 2];
                let ids: Vec<u32> = p.iter().chain(ids).copied().collect();
                let mask: Vec<u8> = std::iter::repeat_n(0, p.len())
                    .chain(mask.iter().copied())
                    .collect();
                let gen = mask.iter().skip(1).filter(|&&m| m == 1).count();
                let side = |v: f64| (0..gen).map(|k| v - 0.01 * k as f64).collect::<Vec<f64>>();
                Sample::new(
                    ids,
                    mask,
                    side(-1.5),
                    side(-1.4),
                    (cfg.kl_coef > 0.0).then(|| side(-1.6)),
                    s.advantage(),
                )
                .unwrap()
            })
            .collect();
        let refs: Vec<&Sample> = smp.iter().collect();
        let mut results: Vec<(f64, BTreeMap<String, Tensor>)> = Vec::new();
        for (share, budget) in [(false, 32), (true, 256), (true, 40)] {
            cfg.packing = false;
            cfg.share_prefixes = share;
            cfg.micro_batch_tokens = budget;
            let (stats, grads) = minibatch_objective(&model, &refs, &cfg).unwrap();
            results.push((stats.loss(), model.hf_grads(&grads).unwrap()));
        }
        let (want_loss, want) = &results[0];
        for (loss, grads) in &results[1..] {
            assert!(
                (loss - want_loss).abs() <= 1e-5 * want_loss.abs().max(1.0),
                "{}: loss {loss} shared vs {want_loss} separate",
                case["settings"]
            );
            let d = max_rel_diff(grads, want);
            assert!(
                d <= 1e-5,
                "{}: gradients differ by {d} (relative)",
                case["settings"]
            );
        }
    }
}

fn norm(t: &Tensor) -> f64 {
    t.to_dtype(DType::F64)
        .unwrap()
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
        .sqrt()
}

#[test]
fn objective_and_gradients_match_pytorch() {
    let fx: Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("rl_objective.json")).unwrap(),
    )
    .unwrap();
    let full =
        candle_core::safetensors::load(fixtures().join("rl_objective.safetensors"), &Device::Cpu)
            .unwrap();
    let model = load(&fixtures().join("tiny-qwen2"), DType::F32, &Device::Cpu)
        .unwrap()
        .model;
    let cases = fx["cases"].as_array().unwrap();
    assert!(cases.len() >= 20);
    for (k, case) in cases.iter().enumerate() {
        let mut cfg = config(&case["settings"]);
        let smp = samples(&fx, &cfg);
        let refs: Vec<&Sample> = smp.iter().collect();
        let want_loss = case["loss"].as_f64().unwrap();
        // Packed rows, one sequence per micro-batch (gradients accumulated), and the
        // prefix-sharing planner.
        let mut results: Vec<(f64, BTreeMap<String, Tensor>)> = Vec::new();
        for (packing, share, budget) in [(true, false, 128), (false, false, 64), (true, true, 64)] {
            cfg.packing = packing;
            cfg.share_prefixes = share;
            cfg.micro_batch_tokens = budget;
            let (stats, grads) = minibatch_objective(&model, &refs, &cfg).unwrap();
            results.push((stats.loss(), model.hf_grads(&grads).unwrap()));
        }
        for (loss, grads) in &results {
            assert!(
                (loss - want_loss).abs() <= 1e-4 * want_loss.abs().max(1.0),
                "case {k} {}: loss {loss} vs PyTorch {want_loss}",
                case["settings"]
            );
            for (name, want) in case["grad_norms"].as_object().unwrap() {
                let want = want.as_f64().unwrap();
                let got = grads.get(name).map_or(0.0, norm);
                assert!(
                    (got - want).abs() <= 1e-4 * want.max(1e-2),
                    "case {k}: |grad {name}| {got} vs PyTorch {want}"
                );
            }
            for name in fx["full_grads"].as_array().unwrap() {
                let name = name.as_str().unwrap();
                let want = &full[&format!("case{k}/{name}")];
                let got = grads[name].to_dtype(DType::F32).unwrap();
                let diff = (&got - want)
                    .unwrap()
                    .abs()
                    .unwrap()
                    .max_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap();
                let scale = want
                    .abs()
                    .unwrap()
                    .max_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap();
                assert!(
                    diff <= 1e-4 * scale.max(1e-2),
                    "case {k}: grad {name} differs by {diff} (scale {scale})"
                );
            }
        }
    }
}

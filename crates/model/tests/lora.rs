//! LoRA adapters against HF PEFT (`scripts/make_lora_fixture.py`: adapters on every
//! projection of the tiny Qwen2, saved by PEFT): the PEFT directory loads, logits, loss
//! and every adapter gradient match PEFT's, the base weights get no gradient, the merged
//! weights equal `merge_and_unload`'s, and a saved adapter directory loads back.

mod common;
use common::*;
use std::collections::BTreeMap;
use tooltrain_model::{load, ops, CausalLM, DType, Device, LoraConfig, SeqLayout, Tensor};

fn model_with_adapters() -> CausalLM {
    let mut m = load(&fixture("tiny-qwen2"), DType::F32, &Device::Cpu)
        .unwrap()
        .model;
    let cfg = LoraConfig {
        rank: 4,
        alpha: 8.0,
        ..LoraConfig::default()
    };
    m.add_lora(&cfg, 1).unwrap();
    m.load_adapter(&fixture("tiny-qwen2-lora")).unwrap();
    m
}

fn ids() -> (Tensor, usize, usize) {
    let r: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixture("tiny-qwen2-lora/reference.json")).unwrap(),
    )
    .unwrap();
    let rows: Vec<Vec<u32>> = r["ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|row| {
            row.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap() as u32)
                .collect()
        })
        .collect();
    let (b, s) = (rows.len(), rows[0].len());
    let flat: Vec<u32> = rows.concat();
    (Tensor::from_vec(flat, (b, s), &Device::Cpu).unwrap(), b, s)
}

/// A training pass over `ids`: the mean next-token loss and the raw gradients.
fn training_pass(m: &CausalLM, checkpoint: bool) -> (f64, candle_core::backprop::GradStore) {
    let (x, b, s) = ids();
    let layout = SeqLayout::left_padded(&vec![s; b], s, &Device::Cpu).unwrap();
    let h = m.config().hidden_size;
    let targets = x.narrow(1, 1, s - 1).unwrap().flatten_all().unwrap();
    let w = m.lm_head_weight(true);
    m.forward_backward(&x, &layout, checkpoint, |hid| {
        let hh = hid.narrow(1, 0, s - 1)?.reshape(((), h))?;
        Ok(ops::linear_cross_entropy(&hh, &w, &targets, None)?)
    })
    .unwrap()
}

/// Mean next-token loss of `ids` and its gradients (optionally with recomputation).
fn loss_and_grads(m: &CausalLM, checkpoint: bool) -> (f64, BTreeMap<String, Tensor>) {
    let (loss, grads) = training_pass(m, checkpoint);
    for v in m.params().values() {
        assert!(
            grads.get(v.as_tensor()).is_none(),
            "a frozen base weight got a gradient"
        );
    }
    (loss, m.hf_grads(&grads).unwrap())
}

#[test]
fn peft_adapters_match_logits_loss_gradients_and_merged_weights() {
    let refs = candle_core::safetensors::load(
        fixture("tiny-qwen2-lora/reference.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let meta: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixture("tiny-qwen2-lora/reference.json")).unwrap(),
    )
    .unwrap();
    let m = model_with_adapters();
    assert_eq!(
        m.trainable().len(),
        meta["trainable_tensors"].as_u64().unwrap() as usize
    );
    // Logits.
    let (x, b, s) = ids();
    let layout = SeqLayout::left_padded(&vec![s; b], s, &Device::Cpu).unwrap();
    let logits = m.logits(&x, &layout).unwrap();
    assert!(rel_err(&logits, &refs["logits"]) < 1e-4);
    // Loss and the adapters' gradients, with and without recomputation.
    for checkpoint in [false, true] {
        let (loss, grads) = loss_and_grads(&m, checkpoint);
        let want = meta["loss"].as_f64().unwrap();
        assert!((loss - want).abs() < 1e-4 * want.abs(), "{loss} vs {want}");
        let mut n = 0;
        for (k, g) in &refs {
            let Some(name) = k.strip_prefix("grad/") else {
                continue;
            };
            let got = grads
                .get(name)
                .unwrap_or_else(|| panic!("no gradient for {name}"));
            assert!(rel_err(got, g) < 1e-3, "{name}: {}", rel_err(got, g));
            n += 1;
        }
        assert_eq!(n, m.trainable().len());
    }
    // The merged HF weights equal PEFT's merge_and_unload.
    let merged = m.hf_tensors().unwrap();
    let mut n = 0;
    for (k, want) in &refs {
        let Some(name) = k.strip_prefix("merged/") else {
            continue;
        };
        assert!(rel_err(&merged[name], want) < 1e-5, "{name}");
        n += 1;
    }
    // Two layers: seven projection weights and Qwen2's q/k/v biases (unchanged).
    assert_eq!(n, 2 * (7 + 3));
}

#[test]
fn a_saved_adapter_loads_back_and_a_fresh_one_changes_nothing() {
    let base = load(&fixture("tiny-qwen2"), DType::F32, &Device::Cpu)
        .unwrap()
        .model;
    let (x, b, s) = ids();
    let layout = SeqLayout::left_padded(&vec![s; b], s, &Device::Cpu).unwrap();
    let plain = base.logits(&x, &layout).unwrap();
    // Fresh adapters (B = 0): the same function.
    let mut fresh = load(&fixture("tiny-qwen2"), DType::F32, &Device::Cpu)
        .unwrap()
        .model;
    let v0 = fresh.weights_version();
    fresh
        .add_lora(
            &LoraConfig {
                rank: 2,
                ..LoraConfig::default()
            },
            3,
        )
        .unwrap();
    assert_ne!(fresh.weights_version(), v0);
    assert!(rel_err(&fresh.logits(&x, &layout).unwrap(), &plain) < 1e-6);
    // Save and load back.
    let m = model_with_adapters();
    let tmp = tempfile::tempdir().unwrap();
    m.save_adapter("tiny-qwen2", tmp.path()).unwrap();
    // `scripts/check_peft_adapter.py DIR` loads such a directory with HF PEFT.
    if let Ok(dir) = std::env::var("TOOLTRAIN_WRITE_ADAPTER") {
        m.save_adapter("data/fixtures/tiny-qwen2", std::path::Path::new(&dir))
            .unwrap();
    }
    let cfg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(tmp.path().join("adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        (cfg["peft_type"].as_str(), cfg["r"].as_u64()),
        (Some("LORA"), Some(4))
    );
    let mut again = load(&fixture("tiny-qwen2"), DType::F32, &Device::Cpu)
        .unwrap()
        .model;
    again.add_lora(m.lora_config().unwrap(), 9).unwrap();
    again.load_adapter(tmp.path()).unwrap();
    let a = again.logits(&x, &layout).unwrap();
    assert_eq!(rel_err(&a, &m.logits(&x, &layout).unwrap()), 0.0);
    assert!(
        rel_err(&a, &plain) > 1e-3,
        "the adapters change the outputs"
    );
    // Bad settings are refused, naming the key.
    let mut bad = load(&fixture("tiny-qwen2"), DType::F32, &Device::Cpu)
        .unwrap()
        .model;
    let e = bad
        .add_lora(
            &LoraConfig {
                rank: 2,
                targets: vec!["qq_proj".into()],
                ..LoraConfig::default()
            },
            0,
        )
        .unwrap_err()
        .to_string();
    assert!(e.contains("qq_proj"), "{e}");
}

/// The adapters of the PEFT fixture with `dropout`, in `dtype`.
fn adapters_with_dropout(dtype: DType, dropout: f64) -> CausalLM {
    let mut m = load(&fixture("tiny-qwen2"), dtype, &Device::Cpu)
        .unwrap()
        .model;
    let cfg = LoraConfig {
        rank: 4,
        alpha: 8.0,
        dropout,
        ..LoraConfig::default()
    };
    m.add_lora(&cfg, 1).unwrap();
    m.load_adapter(&fixture("tiny-qwen2-lora")).unwrap();
    m
}

/// Loss of a training pass (dropout seed `seed`) and the adapters' gradients by name.
fn train_pass(m: &CausalLM, seed: u64, checkpoint: bool) -> (f64, BTreeMap<String, Tensor>) {
    m.set_dropout_seed(seed);
    let (loss, grads) = training_pass(m, checkpoint);
    let named = m
        .trainable()
        .iter()
        .map(|(k, v)| (k.clone(), grads.get(v.as_tensor()).unwrap().clone()))
        .collect();
    (loss, named)
}

#[test]
fn lora_dropout_masks_reproduce_and_gradients_match_finite_differences() {
    // The mask: zeros with probability p, the rest 1 / (1 - p); a seed gives one mask.
    let p = 0.3;
    let mask = tooltrain_model::dropout_mask(7, 100_000, p);
    let zeros = mask.iter().filter(|&&v| v == 0.0).count() as f64 / mask.len() as f64;
    assert!(
        (zeros - p).abs() < 0.01,
        "{zeros} of the mask is zero, not {p}"
    );
    assert!(mask
        .iter()
        .all(|&v| v == 0.0 || (v as f64 - 1.0 / (1.0 - p)).abs() < 1e-6));
    assert_eq!(mask, tooltrain_model::dropout_mask(7, 100_000, p));
    assert_ne!(mask, tooltrain_model::dropout_mask(8, 100_000, p));

    let (x, b, s) = ids();
    let layout = SeqLayout::left_padded(&vec![s; b], s, &Device::Cpu).unwrap();
    let plain = adapters_with_dropout(DType::F64, 0.0);
    let m = adapters_with_dropout(DType::F64, 0.5);
    // Inference never drops: the same logits as without dropout.
    assert!(
        rel_err(
            &m.logits(&x, &layout).unwrap(),
            &plain.logits(&x, &layout).unwrap()
        ) < 1e-12
    );
    // Training passes drop: another loss than without dropout, reproducible by seed, the
    // same with recomputation (a recomputed layer draws the same masks).
    let (l0, _) = train_pass(&plain, 1, false);
    let (l1, g1) = train_pass(&m, 1, false);
    let (l1b, g1b) = train_pass(&m, 1, false);
    let (l1c, g1c) = train_pass(&m, 1, true);
    let (l2, _) = train_pass(&m, 2, false);
    assert!(
        (l1 - l0).abs() > 1e-6,
        "dropout changed nothing ({l1} vs {l0})"
    );
    assert!((l1 - l2).abs() > 1e-9, "two seeds gave the same loss");
    assert_eq!(l1, l1b);
    assert!((l1 - l1c).abs() < 1e-12);
    for (name, g) in &g1 {
        assert!(rel_err(g, &g1b[name]) == 0.0, "{name}: not reproducible");
        assert!(
            rel_err(g, &g1c[name]) < 1e-10,
            "{name}: recomputation differs"
        );
    }
    // With the masks fixed by the seed, the loss is a smooth function of the adapters:
    // its gradient matches central finite differences (f64).
    let params = m.trainable();
    let eps = 1e-5;
    for name in [
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight",
        "base_model.model.model.layers.0.mlp.down_proj.lora_B.weight",
        "base_model.model.model.layers.1.mlp.up_proj.lora_A.weight",
    ] {
        let var = params
            .get(name)
            .unwrap_or_else(|| panic!("no adapter {name}"));
        let orig = var
            .as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        let grad = g1[name].flatten_all().unwrap().to_vec1::<f64>().unwrap();
        for i in [0, orig.len() / 3, orig.len() - 1] {
            let at = |d: f64| {
                let mut v = orig.clone();
                v[i] += d;
                var.set(&Tensor::from_vec(v, var.shape(), &Device::Cpu).unwrap())
                    .unwrap();
                train_pass(&m, 1, false).0
            };
            let fd = (at(eps) - at(-eps)) / (2.0 * eps);
            at(0.0);
            assert!(
                (fd - grad[i]).abs() <= 1e-6 * grad[i].abs().max(1e-3),
                "{name}[{i}]: gradient {} vs finite difference {fd}",
                grad[i]
            );
        }
    }
}

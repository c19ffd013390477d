//! Parity with HF transformers on tiny random checkpoints (fixtures made by
//! scripts/make_fixtures.py): logits, loss, gradients of every parameter, packed
//! batches, and activation recomputation.

mod common;
use common::*;
use tooltrain_model::{load, ops, CausalLM, DType, Device, SeqLayout, Tensor};

const MODELS: [&str; 3] = ["tiny-llama", "tiny-qwen2", "tiny-qwen3"];

fn next_token_loss(
    model: &CausalLM,
    ids: &Tensor,
    checkpoint: bool,
) -> (f64, candle_core::backprop::GradStore) {
    let (b, t) = ids.dims2().unwrap();
    let layout = SeqLayout::packed(&vec![vec![t]; b], t, model.device()).unwrap();
    let targets = ids.narrow(1, 1, t - 1).unwrap().flatten_all().unwrap();
    let w = model.lm_head_weight(true);
    model
        .forward_backward(ids, &layout, checkpoint, |hid| {
            let h = hid.narrow(1, 0, t - 1)?.reshape(((), hid.dim(2)?))?;
            let logits = h.matmul(&w.t()?)?;
            Ok(ops::cross_entropy(&logits, &targets, None)?)
        })
        .unwrap()
}

#[test]
fn logits_match_transformers() {
    for dev in devices() {
        for name in MODELS {
            let r = reference(name);
            let ck = load(&fixture(name), DType::F32, &dev).unwrap();
            let ids = r["input_ids"]
                .to_dtype(DType::U32)
                .unwrap()
                .to_device(&dev)
                .unwrap();
            let (b, t) = ids.dims2().unwrap();
            let layout = SeqLayout::packed(&vec![vec![t]; b], t, &dev).unwrap();
            let logits = ck.model.logits(&ids, &layout).unwrap();
            let e = rel_err(&logits, &r["logits"]);
            assert!(e <= 1e-4, "{name} on {dev:?}: logits relative error {e}");
        }
    }
}

#[test]
fn packed_rows_match_separate_sequences() {
    for name in MODELS {
        let r = reference(name);
        let ck = load(&fixture(name), DType::F32, &Device::Cpu).unwrap();
        let ids = r["input_ids"].to_dtype(DType::U32).unwrap();
        let packed = Tensor::cat(
            &[
                ids.get(0).unwrap().narrow(0, 0, 7).unwrap(),
                ids.get(1).unwrap().narrow(0, 0, 5).unwrap(),
            ],
            0,
        )
        .unwrap()
        .unsqueeze(0)
        .unwrap();
        let layout = SeqLayout::packed(&[vec![7, 5]], 12, &Device::Cpu).unwrap();
        let logits = ck.model.logits(&packed, &layout).unwrap();
        let e = rel_err(&logits, &r["packed_logits"]);
        assert!(e <= 1e-4, "{name}: packed logits relative error {e}");
        // Padding at the end of a row changes nothing for the real tokens.
        let padded = Tensor::cat(
            &[
                &packed,
                &Tensor::zeros((1, 3), DType::U32, &Device::Cpu).unwrap(),
            ],
            1,
        )
        .unwrap();
        let layout = SeqLayout::packed(&[vec![7, 5]], 15, &Device::Cpu).unwrap();
        let lp = ck
            .model
            .logits(&padded, &layout)
            .unwrap()
            .narrow(1, 0, 12)
            .unwrap();
        assert!(rel_err(&lp, &r["packed_logits"]) <= 1e-4);
    }
}

#[test]
fn every_parameter_gets_the_transformers_gradient() {
    for dev in devices() {
        for name in MODELS {
            let r = reference(name);
            let ck = load(&fixture(name), DType::F32, &dev).unwrap();
            let ids = r["input_ids"]
                .to_dtype(DType::U32)
                .unwrap()
                .to_device(&dev)
                .unwrap();
            let (loss, grads) = next_token_loss(&ck.model, &ids, false);
            let want = r["loss"]
                .to_dtype(DType::F64)
                .unwrap()
                .to_scalar::<f64>()
                .unwrap();
            assert!(
                (loss - want).abs() / want < 1e-5,
                "{name}: loss {loss} vs {want}"
            );
            // Every trainable variable got a gradient ...
            for (pname, var) in ck.model.params() {
                assert!(
                    grads.get(var.as_tensor()).is_some(),
                    "{name}: `{pname}` got no gradient"
                );
            }
            // ... and, split into HF parameters, each equals transformers' gradient.
            let hf = ck.model.hf_grads(&grads).unwrap();
            let expected = r.keys().filter(|k| k.starts_with("grad.")).count();
            assert_eq!(
                hf.len(),
                expected,
                "{name}: parameter count differs from transformers"
            );
            for (pname, g) in &hf {
                let e = rel_err(g, &r[&format!("grad.{pname}")]);
                assert!(
                    e <= 1e-4,
                    "{name}: gradient of `{pname}` relative error {e}"
                );
            }
        }
    }
}

#[test]
fn gradient_checkpointing_gives_identical_gradients() {
    for name in MODELS {
        let r = reference(name);
        let ck = load(&fixture(name), DType::F32, &Device::Cpu).unwrap();
        let ids = r["input_ids"].to_dtype(DType::U32).unwrap();
        let (l1, g1) = next_token_loss(&ck.model, &ids, false);
        let (l2, g2) = next_token_loss(&ck.model, &ids, true);
        assert_eq!(l1, l2);
        for (pname, var) in ck.model.params() {
            let a = g1.get(var.as_tensor()).unwrap();
            let b = g2
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("checkpointed: `{pname}` got no gradient"));
            let e = rel_err(a, b);
            assert!(
                e < 1e-6,
                "{name}: `{pname}` differs with checkpointing ({e})"
            );
        }
    }
}

/// The returned gradients are plain values, detached from the graph that computed them:
/// one that still referred to it would keep every activation of the pass alive (measured:
/// recomputation then saved no memory at all).
#[test]
fn gradients_hold_no_graph() {
    let r = reference("tiny-qwen2");
    let ck = load(&fixture("tiny-qwen2"), DType::F32, &Device::Cpu).unwrap();
    let ids = r["input_ids"].to_dtype(DType::U32).unwrap();
    for checkpoint in [false, true] {
        let (_, grads) = next_token_loss(&ck.model, &ids, checkpoint);
        for (pname, var) in ck.model.params() {
            let g = grads.get(var.as_tensor()).unwrap();
            // Back-propagating from a detached tensor reaches no variable: the store
            // holds only the root's own gradient.
            let back = g.sum_all().unwrap().backward().unwrap();
            assert_eq!(
                back.get_ids().count(),
                1,
                "checkpoint={checkpoint}: the gradient of `{pname}` is attached to the graph"
            );
        }
    }
}

#[test]
fn whole_model_gradient_matches_finite_differences_in_f64() {
    // f64 end to end: autograd of the loss against central differences for a few
    // elements of every parameter.
    let ck = load(&fixture("tiny-qwen3"), DType::F64, &Device::Cpu).unwrap();
    let ids = reference("tiny-qwen3")["input_ids"]
        .to_dtype(DType::U32)
        .unwrap()
        .narrow(1, 0, 6)
        .unwrap();
    let (_, grads) = next_token_loss(&ck.model, &ids, false);
    for (pname, var) in ck.model.params() {
        let g: Vec<f64> = grads
            .get(var.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let orig = var.as_tensor().copy().unwrap();
        let flat: Vec<f64> = orig.flatten_all().unwrap().to_vec1().unwrap();
        let j = (pname.len() * 7919) % flat.len();
        let h = 1e-5;
        let eval = |d: f64| {
            let mut v = flat.clone();
            v[j] += d;
            var.set(&Tensor::from_vec(v, orig.dims(), &Device::Cpu).unwrap())
                .unwrap();
            next_token_loss(&ck.model, &ids, false).0
        };
        let fd = (eval(h) - eval(-h)) / (2.0 * h);
        var.set(&orig).unwrap();
        let err = (fd - g[j]).abs() / (1e-7 + fd.abs().max(g[j].abs()));
        assert!(
            err < 1e-4,
            "`{pname}`[{j}]: autograd {} vs finite difference {fd}",
            g[j]
        );
    }
}

#[test]
fn save_load_round_trip_is_lossless() {
    for name in MODELS {
        let ck = load(&fixture(name), DType::F32, &Device::Cpu).unwrap();
        let dir = tempfile::tempdir().unwrap();
        tooltrain_model::save(&ck.model, None, dir.path()).unwrap();
        let back = load(dir.path(), DType::F32, &Device::Cpu).unwrap();
        let cfg2 =
            tooltrain_model::ModelConfig::from_file(&dir.path().join("config.json")).unwrap();
        assert_eq!(&cfg2, ck.model.config());
        // The saved file holds exactly the HF tensors of the fixture, bit for bit.
        let saved =
            candle_core::safetensors::load(dir.path().join("model.safetensors"), &Device::Cpu)
                .unwrap();
        let orig =
            candle_core::safetensors::load(fixture(name).join("model.safetensors"), &Device::Cpu)
                .unwrap();
        assert_eq!(saved.len(), orig.len());
        for (pname, t) in &orig {
            let d = (&saved[pname] - t)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert_eq!(d, 0.0, "`{pname}` changed in the round trip");
        }
        for (pname, var) in back.model.params() {
            let d = (ck.model.params()[pname].as_tensor() - var.as_tensor())
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap();
            assert_eq!(
                d.to_scalar::<f32>().unwrap(),
                0.0,
                "`{pname}` changed in the round trip"
            );
        }
    }
}

#[test]
fn half_precision_runs_close_to_f32() {
    let r = reference("tiny-llama");
    for dtype in [DType::BF16, DType::F16] {
        let ck = load(&fixture("tiny-llama"), dtype, &Device::Cpu).unwrap();
        let ids = r["input_ids"].to_dtype(DType::U32).unwrap();
        let layout = SeqLayout::packed(&[vec![12], vec![12]], 12, &Device::Cpu).unwrap();
        let logits = ck.model.logits(&ids, &layout).unwrap();
        assert_eq!(logits.dtype(), dtype);
        let e = rel_err(&logits, &r["logits"]);
        assert!(e < 5e-2, "{dtype:?} relative error {e}");
    }
}

#[test]
fn sharded_and_other_dtype_checkpoints_load() {
    // Split the tiny Llama over two shards with an index, stored in bf16: it loads as
    // f32 with exactly the bf16-rounded weights.
    let src = candle_core::safetensors::load(fixture("tiny-llama/model.safetensors"), &Device::Cpu)
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        fixture("tiny-llama/config.json"),
        dir.path().join("config.json"),
    )
    .unwrap();
    let mut names: Vec<&String> = src.keys().collect();
    names.sort();
    let (a, b) = names.split_at(names.len() / 2);
    let mut map = serde_json::Map::new();
    for (file, part) in [
        ("model-00001-of-00002.safetensors", a),
        ("model-00002-of-00002.safetensors", b),
    ] {
        let ts: std::collections::HashMap<String, Tensor> = part
            .iter()
            .map(|n| ((*n).clone(), src[*n].to_dtype(DType::BF16).unwrap()))
            .collect();
        candle_core::safetensors::save(&ts, dir.path().join(file)).unwrap();
        for n in part {
            map.insert((*n).clone(), file.into());
        }
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": map});
    std::fs::write(
        dir.path().join("model.safetensors.index.json"),
        index.to_string(),
    )
    .unwrap();
    let ck = load(dir.path(), DType::F32, &Device::Cpu).unwrap();
    for (name, t) in ck.model.hf_tensors().unwrap() {
        assert_eq!(t.dtype(), DType::F32);
        let want = src[&name]
            .to_dtype(DType::BF16)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap();
        assert_eq!(rel_err(&t, &want), 0.0, "{name}");
    }
    // A shard named by the index but absent is named in the error.
    std::fs::remove_file(dir.path().join("model-00002-of-00002.safetensors")).unwrap();
    let e = load(dir.path(), DType::F32, &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("model-00002-of-00002.safetensors"), "{e}");
}

#[test]
fn bad_checkpoints_give_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let e = load(dir.path(), DType::F32, &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("config.json"), "{e}");
    std::fs::write(
        dir.path().join("config.json"),
        r#"{"model_type": "gpt_neox"}"#,
    )
    .unwrap();
    let e = load(dir.path(), DType::F32, &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("config.json") && e.contains("gpt_neox"), "{e}");
    std::fs::copy(
        fixture("tiny-llama/config.json"),
        dir.path().join("config.json"),
    )
    .unwrap();
    let e = load(dir.path(), DType::F32, &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("model.safetensors") && e.contains("missing"),
        "{e}"
    );
    // A weights file from another architecture: the shape mismatch is named.
    std::fs::copy(
        fixture("tiny-qwen2/model.safetensors"),
        dir.path().join("model.safetensors"),
    )
    .unwrap();
    let e = load(dir.path(), DType::F32, &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("shape") || e.contains("missing tensor"), "{e}");
    std::fs::write(dir.path().join("model.safetensors"), b"garbage").unwrap();
    let e = load(dir.path(), DType::F32, &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("model.safetensors"), "{e}");
    let e = load(&dir.path().join("nope.gguf"), DType::F32, &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("nope.gguf"), "{e}");
}

/// Mixed precision on AMX (`set_bf16_matmuls`): the loss and every parameter's gradient
/// stay within bf16 rounding of transformers' f32 values, with and without
/// recomputation; on a CPU without AMX the switch changes nothing.
#[test]
fn bf16_matmuls_train_close_to_transformers() {
    for name in MODELS {
        let r = reference(name);
        let ck = load(&fixture(name), DType::F32, &Device::Cpu).unwrap();
        let ids = r["input_ids"].to_dtype(DType::U32).unwrap();
        let (loss32, grads32) = next_token_loss(&ck.model, &ids, false);
        let on = ck.model.set_bf16_matmuls(true);
        assert_eq!(on, tooltrain_model::bf16_available());
        let want = r["loss"]
            .to_dtype(DType::F64)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        for checkpoint in [false, true] {
            let (loss, grads) = next_token_loss(&ck.model, &ids, checkpoint);
            if !on {
                assert_eq!(loss, loss32);
                continue;
            }
            assert!(
                (loss - want).abs() / want < 2e-3,
                "{name}: loss {loss} vs {want}"
            );
            assert_ne!(
                loss, loss32,
                "{name}: the AMX path gave f32's loss bit for bit"
            );
            let hf = ck.model.hf_grads(&grads).unwrap();
            let (mut worst, mut diff2, mut ref2) = (0f64, 0f64, 0f64);
            for (pname, g) in &hf {
                let want = &r[&format!("grad.{pname}")];
                let e = rel_err(g, want);
                worst = worst.max(e);
                // Up to ~6% on the fixtures' widths of 32-64 (norm and bias gradients
                // are sums with cancellation); a wrong operand is off by ~100%.
                assert!(e < 1e-1, "{name}: `{pname}` gradient relative error {e}");
                let (d, w) = sq_norms(g, want);
                diff2 += d;
                ref2 += w;
            }
            // Over the whole gradient vector, bf16 operands in every product (linear
            // layers and attention) keep the error at 1-3% on the fixtures; scaling the
            // row term of the attention's softmax gradient by 0.98 gives 4.5%.
            let whole = (diff2 / ref2).sqrt();
            eprintln!("{name} (checkpoint {checkpoint}): loss {loss} vs {want}, worst gradient error {worst:.2e}, whole gradient {whole:.2e}");
            assert!(
                whole < 4e-2,
                "{name}: whole-gradient relative error {whole}"
            );
        }
        ck.model.set_bf16_matmuls(false);
        let (loss, _) = next_token_loss(&ck.model, &ids, false);
        assert_eq!(loss, loss32, "{name}: switching back gives f32 again");
        drop(grads32);
    }
}

/// (||a - b||^2, ||b||^2) in f64.
fn sq_norms(a: &Tensor, b: &Tensor) -> (f64, f64) {
    let a = a.to_dtype(DType::F64).unwrap();
    let b = b.to_dtype(DType::F64).unwrap();
    let d = (&a - &b).unwrap().sqr().unwrap().sum_all().unwrap();
    let w = b.sqr().unwrap().sum_all().unwrap();
    (d.to_scalar().unwrap(), w.to_scalar().unwrap())
}

//! AdamW (fused CPU path and tensor path), clipping, schedules, exact resume.

mod common;
use common::*;
use std::collections::BTreeMap;
use tooltrain_model::{
    clip_grad_norm, load, ops, AdamW, AdamWConfig, CausalLM, DType, Device, LrSchedule, SeqLayout,
    Tensor, Var,
};

/// Hand-written scalar AdamW (decoupled decay), the reference.
fn adamw_ref(
    p: &mut [f64],
    g: &[f64],
    m: &mut [f64],
    v: &mut [f64],
    t: i32,
    lr: f64,
    c: &AdamWConfig,
    decay: bool,
) {
    for i in 0..p.len() {
        m[i] = c.beta1 * m[i] + (1.0 - c.beta1) * g[i];
        v[i] = c.beta2 * v[i] + (1.0 - c.beta2) * g[i] * g[i];
        let mh = m[i] / (1.0 - c.beta1.powi(t));
        let vh = v[i] / (1.0 - c.beta2.powi(t));
        let wd = if decay { c.weight_decay } else { 0.0 };
        p[i] -= lr * (mh / (vh.sqrt() + c.eps) + wd * p[i]);
    }
}

#[test]
fn adamw_matches_reference_formula_on_both_paths() {
    let cfg = AdamWConfig {
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
        weight_decay: 0.1,
    };
    // f32 CPU parameters take the fused kernel; f64 parameters the tensor path.
    for dtype in [DType::F32, DType::F64] {
        let w0: Vec<f64> = (0..12).map(|i| (i as f64 * 0.37).sin()).collect();
        let b0: Vec<f64> = (0..4).map(|i| (i as f64 * 0.71).cos()).collect();
        let w = Var::from_tensor(
            &Tensor::from_vec(w0.clone(), (3, 4), &Device::Cpu)
                .unwrap()
                .to_dtype(dtype)
                .unwrap(),
        )
        .unwrap();
        let b = Var::from_tensor(
            &Tensor::from_vec(b0.clone(), 4, &Device::Cpu)
                .unwrap()
                .to_dtype(dtype)
                .unwrap(),
        )
        .unwrap();
        let params: BTreeMap<String, Var> =
            [("w".to_string(), w.clone()), ("b".to_string(), b.clone())].into();
        let mut opt = AdamW::new(&params, cfg).unwrap();
        let (mut rw, mut rb) = (w0.clone(), b0.clone());
        let (mut mw, mut vw, mut mb, mut vb) =
            (vec![0.0; 12], vec![0.0; 12], vec![0.0; 4], vec![0.0; 4]);
        let x = Tensor::new(&[0.5f64, -1.0, 2.0, 0.25], &Device::Cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        for t in 1..=4 {
            // loss = sum((w x + b)^2): gradients computed by autograd, checked by hand.
            let y = (w
                .as_tensor()
                .matmul(&x.unsqueeze(1).unwrap())
                .unwrap()
                .squeeze(1)
                .unwrap()
                + b.as_tensor().narrow(0, 0, 3).unwrap())
            .unwrap();
            let grads = y.sqr().unwrap().sum_all().unwrap().backward().unwrap();
            let gw: Vec<f64> = grads
                .get(w.as_tensor())
                .unwrap()
                .to_dtype(DType::F64)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let gb: Vec<f64> = grads
                .get(b.as_tensor())
                .unwrap()
                .to_dtype(DType::F64)
                .unwrap()
                .to_vec1()
                .unwrap();
            let lr = 0.05;
            opt.step(&grads, lr, 0.5).unwrap();
            let sw: Vec<f64> = gw.iter().map(|g| g * 0.5).collect();
            let sb: Vec<f64> = gb.iter().map(|g| g * 0.5).collect();
            adamw_ref(&mut rw, &sw, &mut mw, &mut vw, t, lr, &cfg, true);
            adamw_ref(&mut rb, &sb, &mut mb, &mut vb, t, lr, &cfg, false);
            let got: Vec<f64> = w
                .as_tensor()
                .to_dtype(DType::F64)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let gotb: Vec<f64> = b
                .as_tensor()
                .to_dtype(DType::F64)
                .unwrap()
                .to_vec1()
                .unwrap();
            let tol = if dtype == DType::F32 { 1e-5 } else { 1e-12 };
            for (a, r) in got.iter().zip(&rw).chain(gotb.iter().zip(&rb)) {
                assert!((a - r).abs() < tol, "{dtype:?} step {t}: {a} vs {r}");
            }
        }
        // b[3] gets a zero gradient and no decay: it never moves (up to f32 rounding).
        let gotb: Vec<f64> = b
            .as_tensor()
            .to_dtype(DType::F64)
            .unwrap()
            .to_vec1()
            .unwrap();
        assert!((gotb[3] - b0[3]).abs() < 1e-7);
    }
}

#[test]
fn clipping_scales_to_max_norm() {
    let a = Var::from_tensor(&Tensor::new(&[3f32, 0.0], &Device::Cpu).unwrap()).unwrap();
    let b = Var::from_tensor(&Tensor::new(&[0f32, 4.0], &Device::Cpu).unwrap()).unwrap();
    let loss = ((a.as_tensor() * a.as_tensor()).unwrap().sum_all().unwrap() * 0.5).unwrap()
        + ((b.as_tensor() * b.as_tensor()).unwrap().sum_all().unwrap() * 0.5).unwrap();
    let grads = loss.unwrap().backward().unwrap();
    let (norm, scale) = clip_grad_norm(&grads, &[a.clone(), b.clone()], 1.0).unwrap();
    assert!((norm - 5.0).abs() < 1e-6);
    assert!((scale - 0.2).abs() < 1e-6);
    let (_, scale) = clip_grad_norm(&grads, &[a, b], 10.0).unwrap();
    assert_eq!(scale, 1.0);
}

/// The global norm of large f32 gradients (summed by the CPU kernel in chunks) and of a
/// non-contiguous one (tensor ops) against an f64 sum.
#[test]
fn clipping_norm_of_large_gradients_matches_f64() {
    let n = 3 * 4096 + 37; // 5 x 2465
    let vals: Vec<f32> = (0..n)
        .map(|i| ((i as f32) * 0.37).sin() * (1.0 + (i % 7) as f32))
        .collect();
    let reference: f64 = 2.0 * vals.iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>();
    let a = Var::from_tensor(&Tensor::zeros(n, DType::F32, &Device::Cpu).unwrap()).unwrap();
    let b =
        Var::from_tensor(&Tensor::zeros((n / 5, 5), DType::F32, &Device::Cpu).unwrap()).unwrap();
    let g = Tensor::from_vec(vals, n, &Device::Cpu).unwrap();
    let mut grads = candle_core::backprop::GradStore::default();
    grads.insert(a.as_tensor(), g.clone());
    // A transposed view: not contiguous, so it takes the tensor path.
    let gt = g.reshape((5, n / 5)).unwrap().t().unwrap();
    assert!(!gt.is_contiguous());
    grads.insert(b.as_tensor(), gt);
    let (norm, scale) = clip_grad_norm(&grads, &[a, b], 1.0).unwrap();
    let want = reference.sqrt();
    assert!((norm - want).abs() <= 1e-6 * want, "norm {norm} vs {want}");
    assert!((scale - 1.0 / (want + 1e-6)).abs() < 1e-9);
}

#[test]
fn schedules_follow_their_formulas() {
    let s = LrSchedule::WarmupCosine {
        lr: 1e-3,
        warmup_steps: 10,
        total_steps: 110,
        min_lr: 0.0,
    };
    assert!((s.lr_at(0) - 1e-4).abs() < 1e-12);
    assert!((s.lr_at(9) - 1e-3).abs() < 1e-12);
    assert!((s.lr_at(10) - 1e-3).abs() < 1e-12);
    assert!((s.lr_at(60) - 5e-4).abs() < 1e-12);
    assert!(s.lr_at(110).abs() < 1e-12);
    assert_eq!(LrSchedule::Constant { lr: 1e-6 }.lr_at(12345), 1e-6);
    let parsed: LrSchedule = serde_json::from_str(r#"{"kind": "warmup_cosine", "lr": 0.001, "warmup_steps": 10, "total_steps": 110, "min_lr": 0.0}"#).unwrap();
    assert_eq!(parsed, s);
}

fn train_steps(m: &CausalLM, opt: &mut AdamW, ids: &Tensor, steps: usize) {
    let (b, t) = ids.dims2().unwrap();
    let layout = SeqLayout::packed(&vec![vec![t]; b], t, m.device()).unwrap();
    let targets = ids.narrow(1, 1, t - 1).unwrap().flatten_all().unwrap();
    let sched = LrSchedule::WarmupCosine {
        lr: 1e-2,
        warmup_steps: 2,
        total_steps: 6,
        min_lr: 1e-4,
    };
    for _ in 0..steps {
        let w = m.lm_head_weight(true);
        let (_, grads) = m
            .forward_backward(ids, &layout, false, |hid| {
                let h = hid.narrow(1, 0, t - 1)?.reshape(((), hid.dim(2)?))?;
                Ok(ops::cross_entropy(&h.matmul(&w.t()?)?, &targets, None)?)
            })
            .unwrap();
        let vars = opt.vars();
        let (_, scale) = clip_grad_norm(&grads, &vars, 1.0).unwrap();
        let lr = sched.lr_at(opt.steps());
        opt.step(&grads, lr, scale).unwrap();
    }
}

#[test]
fn resumed_run_continues_exactly_and_loss_falls() {
    let ids = reference("tiny-llama")["input_ids"]
        .to_dtype(DType::U32)
        .unwrap();
    let a = load(&fixture("tiny-llama"), DType::F32, &Device::Cpu)
        .unwrap()
        .model;
    let mut oa = AdamW::new(a.params(), AdamWConfig::default()).unwrap();
    train_steps(&a, &mut oa, &ids, 3);
    let dir = tempfile::tempdir().unwrap();
    tooltrain_model::save(&a, None, dir.path()).unwrap();
    oa.save(&dir.path().join("optimizer.safetensors")).unwrap();
    train_steps(&a, &mut oa, &ids, 3);

    let b = load(dir.path(), DType::F32, &Device::Cpu).unwrap().model;
    let mut ob = AdamW::new(b.params(), AdamWConfig::default()).unwrap();
    ob.load(&dir.path().join("optimizer.safetensors")).unwrap();
    assert_eq!(ob.steps(), 3);
    train_steps(&b, &mut ob, &ids, 3);
    for (name, v) in a.params() {
        let d = (v.as_tensor() - b.params()[name].as_tensor())
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert_eq!(d, 0.0, "`{name}` differs after resuming");
    }
    // Training actually reduces the loss on this batch.
    let fresh = load(&fixture("tiny-llama"), DType::F32, &Device::Cpu)
        .unwrap()
        .model;
    let loss = |m: &CausalLM| {
        let (bb, t) = ids.dims2().unwrap();
        let layout = SeqLayout::packed(&vec![vec![t]; bb], t, m.device()).unwrap();
        let logits = m
            .logits(&ids, &layout)
            .unwrap()
            .narrow(1, 0, t - 1)
            .unwrap()
            .reshape(((), 128))
            .unwrap();
        ops::cross_entropy(
            &logits,
            &ids.narrow(1, 1, t - 1).unwrap().flatten_all().unwrap(),
            None,
        )
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
    };
    assert!(
        loss(&a) < loss(&fresh) - 0.5,
        "loss {} -> {}",
        loss(&fresh),
        loss(&a)
    );
    // A state file for other parameters is rejected with the name of the problem.
    let c = load(&fixture("tiny-qwen2"), DType::F32, &Device::Cpu)
        .unwrap()
        .model;
    let mut oc = AdamW::new(c.params(), AdamWConfig::default()).unwrap();
    let e = oc
        .load(&dir.path().join("optimizer.safetensors"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("optimizer.safetensors"), "{e}");
}

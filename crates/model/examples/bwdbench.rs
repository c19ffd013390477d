use std::time::Instant;
use tooltrain_model::{ops, DType, Device, SeqLayout, Tensor, Var};
fn time<F: FnMut()>(name: &str, mut f: F) {
    for _ in 0..3 {
        f();
    }
    let it = 20;
    let t0 = Instant::now();
    for _ in 0..it {
        f();
    }
    println!(
        "{name}: {:.2} ms",
        t0.elapsed().as_secs_f64() * 1e3 / it as f64
    );
}
/// <y, g> as a matrix product: its backward hands `g` to `y` without broadcasting.
fn dot(y: &Tensor, g: &Tensor) -> Tensor {
    y.flatten_all()
        .unwrap()
        .unsqueeze(0)
        .unwrap()
        .matmul(&g.flatten_all().unwrap().unsqueeze(1).unwrap())
        .unwrap()
        .squeeze(0)
        .unwrap()
        .squeeze(0)
        .unwrap()
}
fn main() -> tooltrain_model::Result<()> {
    let d = Device::Cpu;
    let (b, s, nh, nkv, hd) = (4, 256, 8, 4, 32);
    let qkv = Var::from_tensor(&Tensor::randn(0f32, 1.0, (b * s, (nh + 2 * nkv) * hd), &d)?)?;
    let layout = SeqLayout::packed(&vec![vec![s]; b], s, &d)?;
    let mask = layout.mask.squeeze(1)?;
    let cos = Tensor::ones((b, s, hd / 2), DType::F32, &d)?;
    let sin = Tensor::zeros((b, s, hd / 2), DType::F32, &d)?;
    let go = Tensor::randn(0f32, 1.0, (b * s, nh * hd), &d)?;
    time("attention fwd", || {
        ops::attention(&qkv.detach(), &cos, &sin, &mask, nh, nkv, hd).unwrap();
    });
    time("attention fwd+bwd", || {
        dot(
            &ops::attention(qkv.as_tensor(), &cos, &sin, &mask, nh, nkv, hd).unwrap(),
            &go,
        )
        .backward()
        .unwrap();
    });
    let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (1024, 256), &d)?)?;
    let w = Var::from_tensor(&Tensor::randn(0f32, 0.02, (256, 2048), &d)?)?;
    let g = Tensor::randn(0f32, 1.0, (1024, 2048), &d)?;
    time("gemm 1024x256x2048", || {
        x.as_tensor().matmul(w.as_tensor()).unwrap();
    });
    time("xT.matmul(g) [256x1024]x[1024x2048]", || {
        x.as_tensor().t().unwrap().matmul(&g).unwrap();
    });
    time("g.matmul(wT) [1024x2048]x[2048x256]", || {
        g.matmul(&w.as_tensor().t().unwrap()).unwrap();
    });
    let xt = x.as_tensor().t().unwrap().contiguous().unwrap();
    time("contiguous xT.matmul(g)", || {
        xt.matmul(&g).unwrap();
    });
    time("zeros_like+add [1024,2048]", || {
        let z = g.zeros_like().unwrap();
        (z + &g).unwrap();
    });
    time("linear fwd+bwd (3 gemms)", || {
        dot(&x.as_tensor().matmul(w.as_tensor()).unwrap(), &g)
            .backward()
            .unwrap();
    });
    let gu = Var::from_tensor(&Tensor::randn(0f32, 1.0, (1024, 2048), &d)?)?;
    let gg = Tensor::randn(0f32, 1.0, (1024, 1024), &d)?;
    time("swiglu fwd+bwd", || {
        dot(&ops::swiglu(gu.as_tensor()).unwrap(), &gg)
            .backward()
            .unwrap();
    });
    let h = Var::from_tensor(&Tensor::randn(0f32, 1.0, (1020, 256), &d)?)?;
    let e = Var::from_tensor(&Tensor::randn(0f32, 0.02, (8192, 256), &d)?)?;
    let t = Tensor::zeros(1020, DType::U32, &d)?;
    time("lm_head + ce fwd", || {
        ops::cross_entropy(
            &h.detach().matmul(&e.detach().t().unwrap()).unwrap(),
            &t,
            None,
        )
        .unwrap();
    });
    time("lm_head + ce fwd+bwd", || {
        ops::cross_entropy(
            &h.as_tensor().matmul(&e.as_tensor().t().unwrap()).unwrap(),
            &t,
            None,
        )
        .unwrap()
        .backward()
        .unwrap();
    });
    Ok(())
}

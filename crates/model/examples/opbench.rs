use std::time::Instant;
use tooltrain_model::{ops, DType, Device, Tensor, Var};
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
fn main() -> tooltrain_model::Result<()> {
    let d = Device::Cpu;
    let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (4, 256, 256), &d)?)?;
    let w = Var::from_tensor(&Tensor::ones(256, DType::F32, &d)?)?;
    let g = Tensor::randn(0f32, 1.0, (4, 256, 256), &d)?;
    time("rmsnorm fwd", || {
        ops::rms_norm(&x.detach(), &w.detach(), 1e-6).unwrap();
    });
    time("rmsnorm fwd+bwd", || {
        (ops::rms_norm(&x, &w, 1e-6).unwrap() * &g)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
    });
    let s = Var::from_tensor(&Tensor::randn(0f32, 1.0, (4, 8, 256, 256), &d)?)?;
    let m = Tensor::zeros((4, 256, 256), DType::F32, &d)?;
    let gs = Tensor::randn(0f32, 1.0, (4, 8, 256, 256), &d)?;
    time("softmax fwd", || {
        ops::masked_softmax(&s.detach(), &m, 0.1).unwrap();
    });
    time("softmax fwd+bwd", || {
        (ops::masked_softmax(&s, &m, 0.1).unwrap() * &gs)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
    });
    time("mul+sum_all+backward only (softmax shape)", || {
        (s.as_tensor() * &gs)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
    });
    let gu = Var::from_tensor(&Tensor::randn(0f32, 1.0, (4, 256, 2048), &d)?)?;
    let gg = Tensor::randn(0f32, 1.0, (4, 256, 1024), &d)?;
    time("swiglu fwd", || {
        ops::swiglu(&gu.detach()).unwrap();
    });
    time("swiglu fwd+bwd", || {
        (ops::swiglu(&gu).unwrap() * &gg)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
    });
    let z = Var::from_tensor(&Tensor::randn(0f32, 1.0, (1020, 8192), &d)?)?;
    let t = Tensor::zeros(1020, DType::U32, &d)?;
    time("ce fwd", || {
        ops::cross_entropy(&z.detach(), &t, None).unwrap();
    });
    time("ce fwd+bwd", || {
        ops::cross_entropy(&z, &t, None)
            .unwrap()
            .backward()
            .unwrap();
    });
    let a = Tensor::randn(0f32, 1.0, (4, 256, 256), &d)?;
    time("add [4,256,256]", || {
        (&a + &g).unwrap();
    });
    let big = Tensor::randn(0f32, 1.0, (4, 256, 2048), &d)?;
    time("add [4,256,2048]", || {
        (&big + &big).unwrap();
    });
    time("zeros [4,256,2048]", || {
        big.zeros_like().unwrap();
    });
    Ok(())
}

use std::time::Instant;
use tooltrain_model::{DType, Device, Tensor};
fn main() -> tooltrain_model::Result<()> {
    for (m, k, n) in [
        (1024, 256, 2048),
        (1024, 1024, 256),
        (1020, 256, 8192),
        (256, 1024, 1024),
    ] {
        let a = Tensor::randn(0f32, 1.0, (m, k), &Device::Cpu)?;
        let b = Tensor::randn(0f32, 1.0, (k, n), &Device::Cpu)?;
        for _ in 0..3 {
            a.matmul(&b)?;
        }
        let it = 20;
        let t0 = Instant::now();
        for _ in 0..it {
            a.matmul(&b)?;
        }
        let s = t0.elapsed().as_secs_f64() / it as f64;
        println!(
            "candle {m}x{k}x{n}: {:.1} GFLOP/s",
            2.0 * (m * k * n) as f64 / s / 1e9
        );
    }
    let _ = DType::F32;
    Ok(())
}

//! Forward / backward time of the fused loss head (`ops::linear_cross_entropy_with`: the
//! output projection and cross-entropy) at SmolLM2-135M's shapes, random values:
//! `cargo run --release -p tooltrain-model --example head_profile -- [TOKENS] [--bf16]`
//! (default 2,047 tokens, the targets of one 2,048-token sequence; hidden 576, vocabulary
//! 49,152).
use std::time::Instant;
use tooltrain_model::{ops, Device, Tensor, Var};
fn main() -> tooltrain_model::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let bf16 = args.iter().any(|a| a == "--bf16");
    let n: usize = args
        .iter()
        .find(|a| !a.starts_with("--"))
        .map_or(2047, |s| s.parse().expect("TOKENS is a number"));
    tooltrain_model::tune_runtime();
    let bf16 = bf16 && tooltrain_model::bf16_available();
    let dev = Device::Cpu;
    let (hd, v) = (576usize, 49152usize);
    println!("head {n} x {hd} x {v}, bf16 products {bf16}");
    let h = Var::from_tensor(&Tensor::randn(0f32, 1.0, (n, hd), &dev)?)?;
    let w = Var::from_tensor(&Tensor::randn(0f32, 0.05, (v, hd), &dev)?)?;
    let t: Vec<u32> = (0..n).map(|i| ((i * 7919) % v) as u32).collect();
    let t = Tensor::from_vec(t, n, &dev)?;
    for it in 0..5 {
        let t0 = Instant::now();
        let loss = ops::linear_cross_entropy_with(h.as_tensor(), w.as_tensor(), &t, None, bf16)?;
        let t1 = Instant::now();
        let grads = loss.backward()?;
        let t2 = Instant::now();
        assert!(grads.get(&h).is_some() && grads.get(&w).is_some());
        println!(
            "it {it}: fwd {:.3} bwd {:.3}",
            (t1 - t0).as_secs_f64(),
            (t2 - t1).as_secs_f64()
        );
    }
    Ok(())
}

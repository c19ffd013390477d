//! Forward / backward time of one layer's fused causal attention (`ops::attention`: RoPE,
//! grouped kv heads) at SmolLM2-135M's shapes, random values:
//! `cargo run --release -p tooltrain-model --example attention_profile -- [TOKENS]
//! [--bf16]` (default one 2,048-token sequence; 9 heads over 3 kv heads of 64).
use std::time::Instant;
use tooltrain_model::{ops, Device, SeqLayout, Tensor, Var};
fn main() -> tooltrain_model::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let bf16 = args.iter().any(|a| a == "--bf16");
    let s: usize = args
        .iter()
        .find(|a| !a.starts_with("--"))
        .map_or(2048, |v| v.parse().expect("TOKENS is a number"));
    tooltrain_model::tune_runtime();
    let bf16 = bf16 && tooltrain_model::bf16_available();
    let dev = Device::Cpu;
    let (nh, nkv, hd) = (9usize, 3usize, 64usize);
    println!("attention 1 x {s}, {nh} heads / {nkv} kv heads x {hd}, bf16 products {bf16}");
    let layout = SeqLayout::packed(&[vec![s]], s, &dev)?;
    let inv: Vec<f32> = (0..hd / 2)
        .map(|i| 10000f32.powf(-2.0 * i as f32 / hd as f32))
        .collect();
    let inv = Tensor::from_vec(inv, (1, 1, hd / 2), &dev)?;
    let freqs = layout
        .positions
        .to_dtype(tooltrain_model::DType::F32)?
        .unsqueeze(2)?
        .broadcast_mul(&inv)?;
    let (cos, sin) = (freqs.cos()?, freqs.sin()?);
    let mask = ops::AttentionMask::new(&layout.mask.squeeze(1)?)?;
    let qkv = Var::from_tensor(&Tensor::randn(0f32, 1.0, (s, (nh + 2 * nkv) * hd), &dev)?)?;
    let r = Tensor::randn(0f32, 1.0, (s, nh * hd), &dev)?;
    let (mut fwd, mut bwd) = (Vec::new(), Vec::new());
    for it in 0..16 {
        let t0 = Instant::now();
        let y = ops::attention(qkv.as_tensor(), &cos, &sin, &mask, nh, nkv, hd, bf16)?;
        let t1 = Instant::now();
        let grads = (y * &r)?.sum_all()?.backward()?;
        let t2 = Instant::now();
        assert!(grads.get(&qkv).is_some());
        let (f, b) = ((t1 - t0).as_secs_f64(), (t2 - t1).as_secs_f64());
        if it > 0 {
            fwd.push(f);
            bwd.push(b);
        }
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (mf, mb) = (median(&mut fwd), median(&mut bwd));
    println!(
        "15 calls after one: fwd median {mf:.4} s, fastest {:.4}; bwd median {mb:.4} s, fastest {:.4}",
        fwd[0], bwd[0]
    );
    Ok(())
}

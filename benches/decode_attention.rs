//! The attention of one decoding step of SmolLM2-135M in a rollout (`ops::cached_attention`
//! over a bf16 KV cache, 30 layers of 9 query heads on 3 kv heads of 64): `--rows` rows in
//! groups of `--group` samples that share their first `--shared` positions, each with
//! `--own` more. Times, alternating in the same run, each group reading its shared
//! positions once, from its first row (`share`, as generation runs it), against every row
//! reading its own copy of them (no `share`), and prints the median of each and the ratio
//! own / shared.
//!
//! `cargo bench -p tooltrain-model --bench decode_attention -- [--rows 64] [--group 8]
//! [--shared 1500] [--own 200] [--rounds 9]`

mod common;
use candle_core::{DType, Device, Tensor};
use common::{cpu_model, median, number_arg};
use tooltrain_model::ops::cached_attention;

fn main() -> candle_core::Result<()> {
    let (rows, group, shared, own) = (
        number_arg("--rows", 64),
        number_arg("--group", 8),
        number_arg("--shared", 1500),
        number_arg("--own", 200),
    );
    let rounds = number_arg("--rounds", 9);
    assert!(
        group > 0 && rows % group == 0,
        "--rows must be a multiple of --group"
    );
    let (heads, kv_heads, hd, layers) = (9, 3, 64, 30);
    let len = shared + own;
    println!(
        "cpu: {}; {}; threads {}",
        cpu_model(),
        tooltrain_model::simd_summary(),
        rayon::current_num_threads()
    );
    println!("{rows} rows in groups of {group}, {shared} shared + {own} own positions, bf16 cache");
    let dev = Device::Cpu;
    let q = Tensor::randn(0f32, 1.0, (rows, heads, 1, hd), &dev)?;
    // One cache per layer, as in a step: they do not fit in any cache together.
    let kv = (0..layers)
        .map(|_| {
            let k = Tensor::randn(0f32, 1.0, (rows, kv_heads, len, hd), &dev)?;
            let v = Tensor::randn(0f32, 1.0, (rows, kv_heads, len, hd), &dev)?;
            Ok((k.to_dtype(DType::BF16)?, v.to_dtype(DType::BF16)?))
        })
        .collect::<candle_core::Result<Vec<_>>>()?;
    let mask = Tensor::zeros((rows, 1, len), DType::F32, &dev)?;
    // Each group's first row holds the shared positions the others read.
    // (The other rows of a group hold copies of its first row's shared positions, as
    // they would without sharing.)
    let kv = kv
        .into_iter()
        .map(|(k, v)| {
            let copy = |t: Tensor| -> candle_core::Result<Tensor> {
                let firsts: Vec<u32> = (0..rows).map(|r| (r / group * group) as u32).collect();
                let idx = Tensor::new(firsts.as_slice(), &dev)?;
                let lead = t.index_select(&idx, 0)?.narrow(2, 0, shared)?;
                Tensor::cat(&[&lead, &t.narrow(2, shared, own)?], 2)
            };
            Ok((copy(k)?, copy(v)?))
        })
        .collect::<candle_core::Result<Vec<_>>>()?;
    let grouped: Vec<(usize, usize)> = (0..rows).map(|r| (r / group * group, shared)).collect();
    let step = |share: &[(usize, usize)]| -> candle_core::Result<Tensor> {
        let mut last = None;
        for (k, v) in &kv {
            last = Some(cached_attention(&q, k, v, &mask, 0.125, share, false)?);
        }
        Ok(last.expect("30 layers"))
    };
    // The same attention up to summation order.
    let (a, b) = (step(&grouped)?, step(&[])?);
    let diff = (a - b)?.abs()?.max_all()?.to_scalar::<f32>()?;
    println!("largest difference of the outputs, shared against own: {diff:.2e}");
    assert!(
        diff < 1e-4,
        "reading the shared positions once is off by {diff}"
    );
    let (mut ts, mut to) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        let t = std::time::Instant::now();
        std::hint::black_box(step(&grouped)?);
        ts.push(t.elapsed().as_secs_f64());
        let t = std::time::Instant::now();
        std::hint::black_box(step(&[])?);
        to.push(t.elapsed().as_secs_f64());
    }
    let (ms, mo) = (median(ts), median(to));
    println!(
        "shared {:.2} ms, own {:.2} ms per step ({layers} layers); own/shared {:.2}x",
        ms * 1e3,
        mo * 1e3,
        mo / ms
    );
    Ok(())
}

//! The products of one decoding step of SmolLM2-135M (8 rows) on the few-row kernels
//! (`ops::linear_product`) against gemm (`Tensor::matmul`), alternating, in the same run.
//! Prints per shape the median time of each, the weight bytes read per second by the
//! kernels, and the ratio gemm / kernels, then the ratio over a whole step's products.
//! The layers' products also run on their weights repacked in column panels
//! ([`PanelMatrix`], as f32 decoding packs them), timed in the same rounds.
//! With `--bf16` (a CPU with AMX or AVX512-BF16) the same products also run on the bf16
//! kernel with weights packed once ([`AmxMatrix`], as generation packs them), timed in
//! the same rounds: its time, bf16 weight bytes per second and the ratio gemm / bf16.
//!
//! `cargo bench -p tooltrain-model --bench decode_products -- [--rows 8] [--rounds 15]
//! [--bf16]`

mod common;
use candle_core::{Device, Tensor};
use common::{cpu_model, median, number_arg};
use tooltrain_model::ops::linear_product;
use tooltrain_model::{AmxMatrix, PanelMatrix};

fn main() -> candle_core::Result<()> {
    let (rows, rounds) = (number_arg("--rows", 8), number_arg("--rounds", 15));
    let bf16 = common::flag("--bf16");
    if bf16 && !tooltrain_model::bf16_available() {
        panic!("--bf16: this CPU has neither AMX nor AVX512-BF16");
    }
    println!(
        "cpu: {}; {}; threads {}",
        cpu_model(),
        tooltrain_model::simd_summary(),
        rayon::current_num_threads()
    );
    // (name, k, n, transposed, times per step): SmolLM2-135M's 30 layers and its output
    // projection (stored [vocab, hidden]).
    let shapes = [
        ("qkv", 576, 960, false, 30),
        ("o", 576, 576, false, 30),
        ("gate_up", 576, 3072, false, 30),
        ("down", 1536, 576, false, 30),
        ("lm_head", 576, 49152, true, 1),
    ];
    let dev = Device::Cpu;
    let (mut step_kernel, mut step_gemm, mut step_bf16, mut step_panels) = (0f64, 0f64, 0f64, 0f64);
    for (name, k, n, transposed, times) in shapes {
        let x = Tensor::randn(0f32, 1.0, (rows, k), &dev)?;
        // One weight per layer, as in a step: they do not fit in any cache together.
        let ws = (0..times)
            .map(|_| {
                if transposed {
                    Tensor::randn(0f32, 0.02, (n, k), &dev)
                } else {
                    Tensor::randn(0f32, 0.02, (k, n), &dev)
                }
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        let packed = if bf16 {
            ws.iter()
                .map(|w| {
                    let v = w.flatten_all()?.to_vec1::<f32>()?;
                    Ok(if transposed {
                        AmxMatrix::pack_transposed(&v, n, k)?
                    } else {
                        AmxMatrix::pack(&v, k, n)?
                    })
                })
                .collect::<candle_core::Result<Vec<_>>>()?
        } else {
            Vec::new()
        };
        let panels = if transposed {
            Vec::new()
        } else {
            ws.iter()
                .map(|w| Ok(PanelMatrix::pack(&w.flatten_all()?.to_vec1::<f32>()?, k, n)))
                .collect::<candle_core::Result<Vec<_>>>()?
        };
        let xv = x.flatten_all()?.to_vec1::<f32>()?;
        let gemm = |x: &Tensor, w: &Tensor| {
            if transposed {
                x.matmul(&w.t()?)
            } else {
                x.matmul(w)
            }
        };
        // Same values up to summation order.
        let (a, b) = (linear_product(&x, &ws[0], transposed)?, gemm(&x, &ws[0])?);
        let diff = (&a - &b)?.abs()?.max_all()?.to_scalar::<f32>()?;
        let scale = b.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(
            diff <= 1e-4 * scale.max(1.0),
            "{name}: kernels and gemm differ by {diff}"
        );
        if let Some(p) = panels.first() {
            // The same sums in the same order as the in-place kernels.
            let got = p.matmul(&xv, rows)?;
            assert!(
                got == a.flatten_all()?.to_vec1::<f32>()?,
                "{name}: panels and in-place kernels differ"
            );
        }
        if let Some(p) = packed.first() {
            // The products of rounded operands: within bf16 rounding of the f32 ones.
            let got = Tensor::from_vec(p.matmul(&xv, rows)?, (rows, n), &dev)?;
            let diff = (got - &b)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(
                diff <= 2e-2 * scale.max(1.0),
                "{name}: bf16 and f32 products differ by {diff}"
            );
        }
        let (mut tk, mut tg, mut tb, mut tp) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for _ in 0..rounds {
            let t = std::time::Instant::now();
            for w in &ws {
                std::hint::black_box(linear_product(&x, w, transposed)?);
            }
            tk.push(t.elapsed().as_secs_f64() / times as f64);
            let t = std::time::Instant::now();
            for w in &ws {
                std::hint::black_box(gemm(&x, w)?);
            }
            tg.push(t.elapsed().as_secs_f64() / times as f64);
            if !transposed {
                let t = std::time::Instant::now();
                for p in &panels {
                    std::hint::black_box(p.matmul(&xv, rows)?);
                }
                tp.push(t.elapsed().as_secs_f64() / times as f64);
            }
            if bf16 {
                let t = std::time::Instant::now();
                for p in &packed {
                    std::hint::black_box(p.matmul(&xv, rows)?);
                }
                tb.push(t.elapsed().as_secs_f64() / times as f64);
            }
        }
        let (mk, mg) = (median(tk), median(tg));
        step_kernel += mk * times as f64;
        step_gemm += mg * times as f64;
        if transposed {
            step_panels += mk * times as f64;
        } else {
            let mp = median(tp);
            step_panels += mp * times as f64;
            println!(
                "{name:8} panels {:7.3} ms ({:5.1} GB/s of weight), in place/panels {:.2}x",
                mp * 1e3,
                (k * n * 4) as f64 / mp / 1e9,
                mk / mp
            );
        }
        if bf16 {
            let mb = median(tb);
            step_bf16 += mb * times as f64;
            println!(
                "{name:8} bf16 {:7.3} ms ({:5.1} GB/s of bf16 weight), gemm/bf16 {:.2}x",
                mb * 1e3,
                (k * n * 2) as f64 / mb / 1e9,
                mg / mb
            );
        }
        println!(
            "{name:8} [{rows}, {k}] x {}: kernels {:7.3} ms ({:5.1} GB/s of weight), gemm {:7.3} ms, gemm/kernels {:.2}x",
            if transposed { format!("[{n}, {k}]^T") } else { format!("[{k}, {n}]") },
            mk * 1e3,
            (k * n * 4) as f64 / mk / 1e9,
            mg * 1e3,
            mg / mk
        );
    }
    println!(
        "one step's products: kernels {:.1} ms, gemm {:.1} ms, gemm/kernels {:.2}x",
        step_kernel * 1e3,
        step_gemm * 1e3,
        step_gemm / step_kernel
    );
    println!(
        "with the layers in panels: {:.1} ms, in place/panels {:.2}x",
        step_panels * 1e3,
        step_kernel / step_panels
    );
    if bf16 {
        println!(
            "one step's products on the bf16 kernel: {:.1} ms, gemm/bf16 {:.2}x",
            step_bf16 * 1e3,
            step_gemm / step_bf16
        );
    }
    Ok(())
}

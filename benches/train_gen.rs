//! Training-step and generation throughput of the candle path on a fixed ~12M-parameter
//! Qwen2 (benches/qwen2-12m.json), f32, all cores. `scripts/bench.sh` runs it beside
//! the PyTorch reference (scripts/bench_torch.py) and prints the ratios.
//!
//! `cargo bench -p tooltrain-model --bench train_gen -- [--steps N] [--checkpoint]
//! [--model HF_DIR | --config HF_CONFIG] [--device cpu|cuda] [--dtype f32|bf16]` prints
//! one JSON line. `--model` measures a real checkpoint (e.g. assets/smollm2-hf),
//! `--config` a random model of that shape; `--steps 0` skips training, `--new-tokens 0`
//! generation. bf16 trains bf16 weights with f32 AdamW moments (the trainers add f32
//! master weights). `--bf16`: f32 weights whose linear layers take bf16-rounded operands
//! on AMX tiles (mixed-precision training, bf16 decoding; f32 without AMX). `--kv-bf16`:
//! generation keeps its KV cache in bf16 (f32 models on the CPU). `--phases`: the timed
//! generation also reports where its time went (prefill, decoding steps, output
//! projection + sampling; it then keeps the finished rows' keys and values in a prefix
//! cache, which adds their copy as bookkeeping). Peak memory: the process's peak RSS
//! (`VmHWM`) after each phase.

use std::time::Instant;
use tooltrain_model::{
    ops, AdamW, AdamWConfig, CausalLM, Device, ModelConfig, SamplingParams, SeqLayout, Tensor,
};

mod common;
use common::number_arg as arg;

fn str_arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    let i = args.iter().position(|a| a == name)?;
    args.get(i + 1).cloned()
}

/// The process's peak resident memory so far (`VmHWM`, bytes; 0 where unknown).
fn peak_rss() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

fn main() -> tooltrain_model::Result<()> {
    let (steps, warmup, batch, seq) = (
        arg("--steps", 5),
        arg("--warmup", 2),
        arg("--batch", 4),
        arg("--seq", 256),
    );
    let checkpoint = common::flag("--checkpoint");
    // bf16 products on AMX tiles: mixed-precision training and bf16 decoding.
    let bf16 = common::flag("--bf16");
    let kv_bf16 = common::flag("--kv-bf16");
    let phases = common::flag("--phases");
    // TOOLTRAIN_REPO_ROOT: a bench binary run from another checkout (scripts/gpu-check.sh).
    let root = std::env::var_os("TOOLTRAIN_REPO_ROOT")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../.."));
    let dev = match str_arg("--device").as_deref() {
        None | Some("cpu") => Device::Cpu,
        Some("cuda") => match tooltrain_model::default_device(false)? {
            Device::Cpu => {
                panic!("--device cuda: no CUDA device (or not built with --features cuda)")
            }
            d => d,
        },
        Some(other) => panic!("--device {other}: expected cpu or cuda"),
    };
    let dtype = tooltrain_model::parse_dtype(&str_arg("--dtype").unwrap_or("f32".into()))?;
    let (cfg, model) = match str_arg("--model") {
        Some(dir) => {
            let ck = tooltrain_model::load(std::path::Path::new(&dir), dtype, &dev)?;
            (ck.model.config().clone(), ck.model)
        }
        None => {
            // A relative path is taken from the working directory, else from the
            // repository root (`cargo bench` runs in crates/model).
            let file = str_arg("--config")
                .map(std::path::PathBuf::from)
                .map(|p| if p.exists() { p } else { root.join(p) })
                .unwrap_or_else(|| root.join("benches/qwen2-12m.json"));
            let cfg = ModelConfig::from_file(&file)?;
            let model = CausalLM::new_random(&cfg, dtype, &dev, 0)?;
            (cfg, model)
        }
    };
    let bf16 = bf16 && model.set_bf16_matmuls(true);
    let mut opt = AdamW::new(
        model.params(),
        AdamWConfig {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
        },
    )?;
    let layout = SeqLayout::packed(&vec![vec![seq]; batch], seq, &dev)?;
    let mut rng_state = 12345u64;
    let mut rand_ids = |n: usize| -> Vec<u32> {
        (0..n)
            .map(|_| {
                rng_state = rng_state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((rng_state >> 33) % cfg.vocab_size as u64) as u32
            })
            .collect()
    };
    let mut step = |ids: Vec<u32>| -> tooltrain_model::Result<f64> {
        let ids = Tensor::from_vec(ids, (batch, seq), &dev)?;
        let targets = ids.narrow(1, 1, seq - 1)?.flatten_all()?;
        let w = model.lm_head_weight(true);
        let (loss, grads) = model.forward_backward(&ids, &layout, checkpoint, |hid| {
            let h = hid.narrow(1, 0, seq - 1)?.reshape(((), cfg.hidden_size))?;
            Ok(ops::linear_cross_entropy_with(
                &h, &w, &targets, None, bf16,
            )?)
        })?;
        opt.step(&grads, 1e-4, 1.0)?;
        Ok(loss)
    };
    for _ in 0..warmup.min(steps) {
        step(rand_ids(batch * seq))?;
    }
    dev.synchronize()?;
    let t0 = Instant::now();
    let mut loss = f64::NAN;
    for _ in 0..steps {
        loss = step(rand_ids(batch * seq))?;
    }
    dev.synchronize()?;
    let train_s = t0.elapsed().as_secs_f64() / steps.max(1) as f64;
    let train_peak = peak_rss();
    drop(opt);

    let (gb, plen, new) = (
        arg("--gen-batch", 4),
        arg("--prompt-len", 32),
        arg("--new-tokens", 64),
    );
    let prompts: Vec<Vec<u32>> = (0..gb).map(|_| rand_ids(plen)).collect();
    let params = SamplingParams {
        temperature: 0.0,
        max_new_tokens: new,
        bf16,
        kv_bf16,
        ..Default::default()
    };
    let (mut gen_s, mut gen_tokens) = (0.0, 0);
    let mut cache = tooltrain_model::PrefixCache::default();
    if new > 0 {
        // Warm-up as scripts/bench_torch.py does: the whole batch, 4 new tokens (a
        // rollout's later turns find the pages and KV buffers its first turn used).
        model.generate(
            &prompts,
            &SamplingParams {
                max_new_tokens: 4,
                ..params.clone()
            },
            None,
        )?;
        dev.synchronize()?;
        let t0 = Instant::now();
        let out = model.generate_reusing(&prompts, &params, None, phases.then_some(&mut cache))?;
        dev.synchronize()?;
        gen_s = t0.elapsed().as_secs_f64();
        gen_tokens = out.iter().map(|g| g.tokens.len()).sum();
    }
    println!(
        "{}",
        serde_json::json!({
            "impl": "tooltrain-candle",
            "params": model.num_params(),
            "threads": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
            "simd": tooltrain_model::simd_summary(),
            "device": if dev.is_cpu() { "cpu" } else { "cuda" },
            "dtype": format!("{dtype:?}").to_lowercase(),
            "checkpoint": checkpoint,
            "bf16_products": bf16,
            "kv_bf16": kv_bf16,
            "train_step_s": train_s,
            "train_tokens_per_s": if steps > 0 { (batch * seq) as f64 / train_s } else { 0.0 },
            "gen_tokens_per_s": if gen_s > 0.0 { gen_tokens as f64 / gen_s } else { 0.0 },
            "train_peak_bytes": train_peak,
            "gen_peak_bytes": peak_rss(),
            "loss": loss,
            "batch": batch,
            "seq": seq,
            "gen_batch": gb,
            "prompt_len": plen,
            "new_tokens": new,
            "gen_phases": phases.then_some(cache.stats),
        })
    );
    Ok(())
}

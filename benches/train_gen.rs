//! Training-step and generation throughput of the candle path on a fixed ~12M-parameter
//! Qwen2 (benches/qwen2-12m.json), f32, all cores. `scripts/bench.sh` runs it beside
//! the PyTorch reference (scripts/bench_torch.py) and prints the ratios.
//!
//! `cargo bench -p tooltrain-model --bench train_gen -- [--steps N] [--checkpoint]
//! [--model HF_DIR]` prints one JSON line. `--model` measures a real checkpoint instead
//! (e.g. assets/smollm2-hf); `--steps 0` skips training.

use std::time::Instant;
use tooltrain_model::{
    ops, AdamW, AdamWConfig, CausalLM, DType, Device, ModelConfig, SamplingParams, SeqLayout,
    Tensor,
};

fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn str_arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    let i = args.iter().position(|a| a == name)?;
    args.get(i + 1).cloned()
}

fn main() -> tooltrain_model::Result<()> {
    let (steps, warmup, batch, seq) = (
        arg("--steps", 5),
        arg("--warmup", 2),
        arg("--batch", 4),
        arg("--seq", 256),
    );
    let checkpoint = std::env::args().any(|a| a == "--checkpoint");
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let dev = Device::Cpu;
    let (cfg, model) = match str_arg("--model") {
        Some(dir) => {
            let ck = tooltrain_model::load(std::path::Path::new(&dir), DType::F32, &dev)?;
            (ck.model.config().clone(), ck.model)
        }
        None => {
            let cfg = ModelConfig::from_file(&root.join("benches/qwen2-12m.json"))?;
            let model = CausalLM::new_random(&cfg, DType::F32, &dev, 0)?;
            (cfg, model)
        }
    };
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
            Ok(ops::linear_cross_entropy(&h, &w, &targets, None)?)
        })?;
        opt.step(&grads, 1e-4, 1.0)?;
        Ok(loss)
    };
    for _ in 0..warmup.min(steps) {
        step(rand_ids(batch * seq))?;
    }
    let t0 = Instant::now();
    let mut loss = 0.0;
    for _ in 0..steps {
        loss = step(rand_ids(batch * seq))?;
    }
    let train_s = t0.elapsed().as_secs_f64() / steps.max(1) as f64;

    let (gb, plen, new) = (
        arg("--gen-batch", 4),
        arg("--prompt-len", 32),
        arg("--new-tokens", 64),
    );
    let prompts: Vec<Vec<u32>> = (0..gb).map(|_| rand_ids(plen)).collect();
    let params = SamplingParams {
        temperature: 0.0,
        max_new_tokens: new,
        ..Default::default()
    };
    model.generate(
        &prompts[..1],
        &SamplingParams {
            max_new_tokens: 4,
            ..params.clone()
        },
        None,
    )?;
    let t0 = Instant::now();
    let out = model.generate(&prompts, &params, None)?;
    let gen_s = t0.elapsed().as_secs_f64();
    let gen_tokens: usize = out.iter().map(|g| g.tokens.len()).sum();
    println!(
        "{}",
        serde_json::json!({
            "impl": "tooltrain-candle",
            "params": model.num_params(),
            "threads": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
            "simd": tooltrain_model::simd_summary(),
            "checkpoint": checkpoint,
            "train_step_s": train_s,
            "train_tokens_per_s": (batch * seq) as f64 / train_s,
            "gen_tokens_per_s": gen_tokens as f64 / gen_s,
            "loss": loss,
        })
    );
    Ok(())
}

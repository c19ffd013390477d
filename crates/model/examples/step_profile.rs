//! Forward / backward / optimizer time split of a training step on a benchmark model:
//! `cargo run --release -p tooltrain-model --example step_profile -- [CONFIG] [BATCH SEQ]
//! [--bf16]` (default benches/qwen2-12m.json, 4 x 256; `--bf16`: bf16 products).
use std::time::Instant;
use tooltrain_model::{
    ops, AdamW, AdamWConfig, CausalLM, DType, Device, ModelConfig, SeqLayout, Tensor,
};
fn main() -> tooltrain_model::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let bf16 = args.iter().any(|a| a == "--bf16");
    let pos: Vec<&String> = args.iter().filter(|a| !a.starts_with("--")).collect();
    let config = pos.first().map_or("benches/qwen2-12m.json", |s| s.as_str());
    let num = |i: usize, d: usize| pos.get(i).map_or(d, |s| s.parse().expect("a number"));
    let (batch, seq) = (num(1, 4), num(2, 256));
    let cfg = ModelConfig::from_file(std::path::Path::new(config))?;
    let dev = Device::Cpu;
    let model = CausalLM::new_random(&cfg, DType::F32, &dev, 0)?;
    let bf16 = bf16 && model.set_bf16_matmuls(true);
    println!("{config}: batch {batch} x {seq}, bf16 products {bf16}");
    let mut opt = AdamW::new(model.params(), AdamWConfig::default())?;
    let layout = SeqLayout::packed(&vec![vec![seq]; batch], seq, &dev)?;
    let ids: Vec<u32> = (0..batch * seq)
        .map(|i| ((i * 7919) % cfg.vocab_size.min(8192)) as u32)
        .collect();
    let ids = Tensor::from_vec(ids, (batch, seq), &dev)?;
    let targets = ids.narrow(1, 1, seq - 1)?.flatten_all()?;
    for it in 0..num(3, 8) {
        let t0 = Instant::now();
        let hid = model.forward_hidden(&ids, &layout)?;
        let w = model.lm_head_weight(true);
        let h = hid.narrow(1, 0, seq - 1)?.reshape(((), cfg.hidden_size))?;
        let loss = ops::linear_cross_entropy_with(&h, &w, &targets, None, bf16)?;
        let t1 = Instant::now();
        let grads = loss.backward()?;
        let t2 = Instant::now();
        opt.step(&grads, 1e-4, 1.0)?;
        let t3 = Instant::now();
        let _nograd = model.hidden_states(&ids, &layout)?;
        let t4 = Instant::now();
        println!(
            "it {it}: fwd {:.3} bwd {:.3} opt {:.3} | inference fwd {:.3}",
            (t1 - t0).as_secs_f64(),
            (t2 - t1).as_secs_f64(),
            (t3 - t2).as_secs_f64(),
            (t4 - t3).as_secs_f64()
        );
    }
    Ok(())
}

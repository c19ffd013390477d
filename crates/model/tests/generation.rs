//! Batched generation with a KV cache, chunked log-probs, and scoring.

mod common;
use common::*;
use tooltrain_model::{
    chunked_logprobs, chunked_logprobs_with, load, ops, CausalLM, DType, Device, Generation,
    PrefixCache, SamplingParams, SeqLayout, Tensor, Var,
};

fn model(dev: &Device) -> CausalLM {
    load(&fixture("tiny-qwen2"), DType::F32, dev).unwrap().model
}

fn prompts() -> Vec<Vec<u32>> {
    vec![
        vec![5, 17, 99, 3, 42, 7, 8],
        vec![11, 2],
        vec![64, 65, 66, 1],
    ]
}

/// `n` deterministic token ids in `3..100`, varying with `seed`.
fn ids(n: usize, seed: u32) -> Vec<u32> {
    (0..n as u32)
        .map(|i| (i * 37 + seed * 11 + 5) % 97 + 3)
        .collect()
}

/// Generates `prompts` as one batch and each prompt alone (with its row's seed `p.seed +
/// i`): same tokens, log-probs within 1e-4. Returns the batch's generations.
fn assert_matches_each_alone(
    m: &CausalLM,
    prompts: &[Vec<u32>],
    p: &SamplingParams,
) -> Vec<Generation> {
    let batch = m.generate(prompts, p, None).unwrap();
    for (i, pr) in prompts.iter().enumerate() {
        let alone = SamplingParams {
            seed: p.seed + i as u64,
            ..p.clone()
        };
        let solo = m.generate(std::slice::from_ref(pr), &alone, None).unwrap();
        assert_eq!(
            batch[i].tokens,
            solo[0].tokens,
            "prompt {i} of {}: batch differs from running alone",
            prompts.len()
        );
        for (a, b) in batch[i].logprobs.iter().zip(&solo[0].logprobs) {
            assert!(
                (a - b).abs() < 1e-4,
                "prompt {i}: log-prob {a} vs {b} alone"
            );
        }
    }
    batch
}

/// The logits at every position of `seq`, computed without any cache.
fn full_logits(m: &CausalLM, seq: &[u32]) -> Vec<Vec<f32>> {
    let t = seq.len();
    let x = Tensor::new(seq, m.device()).unwrap().unsqueeze(0).unwrap();
    let layout = SeqLayout::packed(&[vec![t]], t, m.device()).unwrap();
    m.logits(&x, &layout)
        .unwrap()
        .get(0)
        .unwrap()
        .to_vec2()
        .unwrap()
}

/// Greedy continuation computed without any cache: full recomputation every step.
fn greedy_by_recompute(m: &CausalLM, prompt: &[u32], n: usize) -> Vec<u32> {
    let mut seq = prompt.to_vec();
    for _ in 0..n {
        let logits = full_logits(m, &seq).pop().unwrap();
        let best = (0..logits.len())
            .max_by(|&a, &b| logits[a].total_cmp(&logits[b]).then(b.cmp(&a)))
            .unwrap();
        seq.push(best as u32);
    }
    seq[prompt.len()..].to_vec()
}

/// Prompts that share their first tokens (a system prompt; one prompt sampled several
/// times) compute the shared prefix once: results equal each prompt run alone.
#[test]
fn shared_prefix_batch_equals_each_prompt_alone() {
    let m = model(&Device::Cpu);
    let prefix = ids(20, 1);
    let with = |suffix: Vec<u32>| [prefix.clone(), suffix].concat();
    // Short suffixes of different lengths, and the same prompt twice (a GRPO group); then
    // suffixes long enough that the suffix pass runs in several chunks of query rows.
    let cases = [
        vec![
            with(ids(3, 2)),
            with(ids(7, 3)),
            with(ids(3, 2)),
            prefix.clone(),
        ],
        vec![with(ids(2600, 4)), with(ids(2450, 5)), with(ids(2590, 6))],
    ];
    for prompts in cases {
        let p = SamplingParams {
            temperature: 1.0,
            top_k: 20,
            max_new_tokens: 6,
            seed: 3,
            ..Default::default()
        };
        assert_matches_each_alone(&m, &prompts, &p);
    }
    // Greedy through the shared path equals full recomputation.
    let prompts = vec![with(ids(4, 7)), with(ids(9, 8))];
    let p = SamplingParams {
        temperature: 0.0,
        max_new_tokens: 8,
        ..Default::default()
    };
    for (pr, g) in prompts.iter().zip(m.generate(&prompts, &p, None).unwrap()) {
        assert_eq!(g.tokens, greedy_by_recompute(&m, pr, 8));
    }
}

/// Multi-turn episodes: each turn's prompt is the last prompt plus the reply and a tool
/// result. With a prefix cache only the new tokens are computed; results are unchanged,
/// also for rows that stopped early.
#[test]
fn reused_prefixes_give_the_same_generations() {
    let m = model(&Device::Cpu);
    let mut prompts: Vec<Vec<u32>> = vec![ids(20, 1), ids(27, 2), ids(33, 3)];
    let mut pc = PrefixCache::default();
    for turn in 0..4 {
        let mut p = SamplingParams {
            temperature: 1.0,
            top_k: 30,
            max_new_tokens: 7,
            seed: 11 + turn,
            ..Default::default()
        };
        // From the second turn on, a stop token that ends one row early.
        if turn > 0 {
            let probe = m.generate(&prompts, &p, None).unwrap();
            p.stop_token_ids = vec![probe[turn as usize % 3].tokens[1]];
        }
        let want = m.generate(&prompts, &p, None).unwrap();
        let before = pc.reused_tokens;
        pc.begin_round();
        let got = m
            .generate_reusing(&prompts, &p, None, Some(&mut pc))
            .unwrap();
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert_eq!(g.tokens, w.tokens, "turn {turn}, row {i}");
            assert_eq!(g.finish, w.finish, "turn {turn}, row {i}");
            for (a, b) in g.logprobs.iter().zip(&w.logprobs) {
                assert!((a - b).abs() < 1e-4, "turn {turn}, row {i}: {a} vs {b}");
            }
        }
        // Everything but each reply's last token (never fed) came from the cache.
        let reused = pc.reused_tokens - before;
        let total: usize = prompts.iter().map(Vec::len).sum();
        // Row i's new tokens: the last reply token and a tool result of i + 1 tokens.
        let expected = if turn == 0 { 0 } else { total - (2 + 3 + 4) };
        assert_eq!(reused as usize, expected, "turn {turn}");
        assert_eq!(pc.len(), 3);
        // Next turn: the reply and a "tool result" of a row-dependent length.
        for (i, (pr, g)) in prompts.iter_mut().zip(&got).enumerate() {
            pr.extend(&g.tokens);
            pr.extend(ids(i + 1, 9 + turn as u32));
        }
    }
}

#[test]
fn kv_cache_decoding_equals_full_recomputation() {
    for dev in devices() {
        let m = model(&dev);
        let p = SamplingParams {
            temperature: 0.0,
            max_new_tokens: 10,
            ..Default::default()
        };
        let out = m.generate(&prompts(), &p, None).unwrap();
        for (pr, g) in prompts().iter().zip(&out) {
            assert_eq!(g.tokens, greedy_by_recompute(&m, pr, 10), "prompt {pr:?}");
            // Returned log-probs equal re-scoring the whole sequence.
            let full: Vec<u32> = pr.iter().chain(&g.tokens).copied().collect();
            let s = &m.score(&[full], 50).unwrap()[0];
            for (k, lp) in g.logprobs.iter().enumerate() {
                let want = s.logprobs[pr.len() - 1 + k];
                assert!(
                    (lp - want).abs() < 1e-4,
                    "step {k}: {lp} vs rescored {want}"
                );
            }
        }
    }
}

#[test]
fn batch_equals_each_prompt_alone_and_seeds_reproduce() {
    let m = model(&Device::Cpu);
    let p = SamplingParams {
        temperature: 1.0,
        top_p: 0.9,
        top_k: 20,
        max_new_tokens: 12,
        seed: 7,
        ..Default::default()
    };
    let batch = assert_matches_each_alone(&m, &prompts(), &p);
    let again = m.generate(&prompts(), &p, None).unwrap();
    for (b, a) in batch.iter().zip(&again) {
        assert_eq!(b.tokens, a.tokens, "same seed, same tokens");
    }
    let other = m
        .generate(
            &prompts(),
            &SamplingParams {
                seed: 8,
                ..p.clone()
            },
            None,
        )
        .unwrap();
    assert!(
        other.iter().zip(&batch).any(|(a, b)| a.tokens != b.tokens),
        "a different seed should sample differently"
    );
}

#[test]
fn top_k_one_is_greedy_and_stop_tokens_end_sequences() {
    let m = model(&Device::Cpu);
    let greedy = m
        .generate(
            &prompts(),
            &SamplingParams {
                temperature: 0.0,
                max_new_tokens: 8,
                ..Default::default()
            },
            None,
        )
        .unwrap();
    let k1 = m
        .generate(
            &prompts(),
            &SamplingParams {
                temperature: 1.3,
                top_k: 1,
                max_new_tokens: 8,
                ..Default::default()
            },
            None,
        )
        .unwrap();
    for (a, b) in greedy.iter().zip(&k1) {
        assert_eq!(a.tokens, b.tokens);
    }
    // Stop on the 3rd greedy token of prompt 0: that sequence ends there, others go on.
    let stop = greedy[0].tokens[2];
    let p = SamplingParams {
        temperature: 0.0,
        max_new_tokens: 8,
        stop_token_ids: vec![stop],
        ..Default::default()
    };
    let out = m.generate(&prompts(), &p, None).unwrap();
    let first = greedy[0].tokens.iter().position(|&t| t == stop).unwrap();
    assert_eq!(out[0].tokens, greedy[0].tokens[..=first].to_vec());
    assert_eq!(out[0].finish, tooltrain_model::FinishReason::StopToken);
    for (o, g) in out.iter().zip(&greedy).skip(1) {
        let cut = g
            .tokens
            .iter()
            .position(|&t| t == stop)
            .map(|i| i + 1)
            .unwrap_or(g.tokens.len());
        assert_eq!(o.tokens, g.tokens[..cut].to_vec());
    }
}

#[test]
fn empirical_sampling_distribution_follows_temperature_and_top_p() {
    // One prompt sampled many times (one token each): frequencies approach the
    // softmax(logits / T) restricted to the nucleus.
    let m = model(&Device::Cpu);
    let pr = vec![5u32, 17, 99];
    let x = Tensor::new(pr.as_slice(), &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let logits: Vec<f32> = m
        .logits(&x, &SeqLayout::packed(&[vec![3]], 3, &Device::Cpu).unwrap())
        .unwrap()
        .get(0)
        .unwrap()
        .get(2)
        .unwrap()
        .to_vec1()
        .unwrap();
    let t = 2.0f64;
    let mut probs: Vec<(usize, f64)> = logits
        .iter()
        .enumerate()
        .map(|(i, &z)| (i, (z as f64 / t).exp()))
        .collect();
    let s: f64 = probs.iter().map(|p| p.1).sum();
    probs.iter_mut().for_each(|p| p.1 /= s);
    probs.sort_by(|a, b| b.1.total_cmp(&a.1));
    let n = 3000;
    let batch = vec![pr.clone(); n];
    let out = m
        .generate(
            &batch,
            &SamplingParams {
                temperature: t,
                max_new_tokens: 1,
                seed: 1,
                ..Default::default()
            },
            None,
        )
        .unwrap();
    let mut counts = vec![0usize; logits.len()];
    out.iter().for_each(|g| counts[g.tokens[0] as usize] += 1);
    for &(i, p) in probs.iter().take(3) {
        let f = counts[i] as f64 / n as f64;
        assert!(
            (f - p).abs() < 4.0 * (p * (1.0 - p) / n as f64).sqrt() + 1e-3,
            "token {i}: freq {f} vs p {p}"
        );
    }
    // top_p = the mass of the two most likely tokens: only those two appear.
    let top_p = probs[0].1 + probs[1].1 - 1e-5;
    let out = m
        .generate(
            &batch[..500],
            &SamplingParams {
                temperature: t,
                top_p,
                max_new_tokens: 1,
                seed: 2,
                ..Default::default()
            },
            None,
        )
        .unwrap();
    assert!(out
        .iter()
        .all(|g| g.tokens[0] as usize == probs[0].0 || g.tokens[0] as usize == probs[1].0));
}

#[test]
fn chunked_logprobs_match_full_softmax_values_and_gradients() {
    let dev = Device::Cpu;
    let h = Var::from_tensor(&Tensor::randn(0f64, 1.0, (6, 8), &dev).unwrap()).unwrap();
    let w = Var::from_tensor(&Tensor::randn(0f64, 1.0, (23, 8), &dev).unwrap()).unwrap();
    let targets = Tensor::new(&[0u32, 22, 5, 7, 7, 13], &dev).unwrap();
    let gl = Tensor::randn(0f64, 1.0, 6, &dev).unwrap();
    let ge = Tensor::randn(0f64, 1.0, 6, &dev).unwrap();
    // Reference: the full softmax.
    let logits = h.as_tensor().matmul(&w.as_tensor().t().unwrap()).unwrap();
    let lsm = ops::log_softmax_last_dim(&logits).unwrap();
    let lp_ref = lsm
        .gather(&targets.unsqueeze(1).unwrap(), 1)
        .unwrap()
        .squeeze(1)
        .unwrap();
    let ent_ref = (lsm.exp().unwrap() * &lsm)
        .unwrap()
        .sum(1)
        .unwrap()
        .neg()
        .unwrap();
    let loss_ref = ((&lp_ref * &gl).unwrap().sum_all().unwrap()
        + (&ent_ref * &ge).unwrap().sum_all().unwrap())
    .unwrap();
    let g_ref = loss_ref.backward().unwrap();
    for chunk in [1, 5, 23, 100] {
        let out = chunked_logprobs(h.as_tensor(), w.as_tensor(), &targets, chunk).unwrap();
        let lp = out.narrow(1, 0, 1).unwrap().squeeze(1).unwrap();
        let ent = out.narrow(1, 1, 1).unwrap().squeeze(1).unwrap();
        assert!(
            rel_err(&lp, &lp_ref) < 1e-5 && rel_err(&ent, &ent_ref) < 1e-5,
            "chunk {chunk}: values"
        );
        let gl32 = gl.to_dtype(DType::F32).unwrap();
        let ge32 = ge.to_dtype(DType::F32).unwrap();
        let loss = ((lp * &gl32).unwrap().sum_all().unwrap()
            + (ent * &ge32).unwrap().sum_all().unwrap())
        .unwrap();
        let g = loss.backward().unwrap();
        for v in [&h, &w] {
            let e = rel_err(
                g.get(v.as_tensor()).unwrap(),
                g_ref.get(v.as_tensor()).unwrap(),
            );
            assert!(e < 1e-5, "chunk {chunk}: gradient error {e}");
        }
    }
}

/// With `bf16` (on a CPU with AMX) the chunked log-probs are the f32 ones of the
/// bf16-rounded hidden states and weights, values and gradients, and not the unrounded
/// ones; without AMX they are the f32 ones exactly.
#[test]
fn bf16_chunked_logprobs_are_the_f32_ones_of_rounded_operands() {
    let dev = Device::Cpu;
    // Sizes that are not multiples of the 16 x 32 tiles; 3 chunks of the vocabulary.
    let h = Tensor::randn(0f32, 1.0, (37, 40), &dev).unwrap();
    let w = Tensor::randn(0f32, 1.0, (70, 40), &dev).unwrap();
    let targets = Tensor::new(
        &(0..37u32).map(|i| (i * 29 + 3) % 70).collect::<Vec<_>>()[..],
        &dev,
    )
    .unwrap();
    let (gl, ge) = (
        Tensor::randn(0f32, 1.0, 37, &dev).unwrap(),
        Tensor::randn(0f32, 1.0, 37, &dev).unwrap(),
    );
    let round = |t: &Tensor| {
        t.to_dtype(DType::BF16)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
    };
    let run = |h: &Tensor, w: &Tensor, bf16: bool| {
        let (hv, wv) = (Var::from_tensor(h).unwrap(), Var::from_tensor(w).unwrap());
        let out =
            chunked_logprobs_with(hv.as_tensor(), wv.as_tensor(), &targets, 32, bf16).unwrap();
        let loss = ((out.narrow(1, 0, 1).unwrap().squeeze(1).unwrap() * &gl)
            .unwrap()
            .sum_all()
            .unwrap()
            + (out.narrow(1, 1, 1).unwrap().squeeze(1).unwrap() * &ge)
                .unwrap()
                .sum_all()
                .unwrap())
        .unwrap();
        let g = loss.backward().unwrap();
        let grads = [hv.as_tensor(), wv.as_tensor()].map(|v| g.get(v).unwrap().clone());
        (out, grads)
    };
    let (o32, _) = run(&h, &w, false);
    let (o16, g16) = run(&h, &w, true);
    if !tooltrain_model::bf16_available() {
        assert_eq!(
            o16.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            o32.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        );
        return;
    }
    let (or, gr) = run(&round(&h), &round(&w), false);
    assert!(rel_err(&o16, &or) < 1e-5, "values {}", rel_err(&o16, &or));
    assert!(
        rel_err(&o16, &o32) > 1e-5,
        "the AMX products gave the f32 values"
    );
    for (i, (a, b)) in g16.iter().zip(&gr).enumerate() {
        let e = rel_err(a, b);
        assert!(e < 1e-2, "gradient {i}: relative error {e}");
    }
}

#[test]
fn score_packs_sequences_without_changing_results() {
    let m = model(&Device::Cpu);
    let seqs = prompts();
    let together = m.score(&seqs, 32).unwrap();
    for (s, t) in seqs.iter().zip(&together) {
        let alone = &m.score(std::slice::from_ref(s), 128).unwrap()[0];
        assert_eq!(t.logprobs.len(), s.len() - 1);
        for (a, b) in t.logprobs.iter().zip(&alone.logprobs) {
            assert!((a - b).abs() < 1e-5);
        }
    }
    // Against the transformers logits fixture.
    let r = reference("tiny-qwen2");
    let ids: Vec<u32> = r["input_ids"]
        .get(0)
        .unwrap()
        .to_dtype(DType::U32)
        .unwrap()
        .to_vec1()
        .unwrap();
    let lsm: Vec<Vec<f32>> = ops::log_softmax_last_dim(&r["logits"].get(0).unwrap())
        .unwrap()
        .to_vec2()
        .unwrap();
    let s = &m.score(&[ids.clone()], 16).unwrap()[0];
    for i in 0..ids.len() - 1 {
        assert!((s.logprobs[i] - lsm[i][ids[i + 1] as usize]).abs() < 1e-4);
    }
    let e = m.score(&[vec![1, 500]], 16).err().unwrap().to_string();
    assert!(e.contains("500"), "{e}");
}

/// Sampled log-probs are those of the distribution sampled from, `softmax(logits / T)`;
/// per-row seeds make a row's tokens independent of its place in the batch; identical
/// prompts are computed once and give the same results as distinct computation.
#[test]
fn temperature_logprobs_row_seeds_and_duplicate_prompts() {
    let m = model(&Device::Cpu);
    let t = 0.6;
    let prs = vec![ids(9, 1), ids(12, 2), ids(9, 1), ids(12, 2)];
    let p = SamplingParams {
        temperature: t,
        max_new_tokens: 6,
        row_seeds: vec![40, 41, 42, 43],
        ..Default::default()
    };
    let mut pc = PrefixCache::default();
    let out = m.generate_reusing(&prs, &p, None, Some(&mut pc)).unwrap();
    assert_eq!(pc.duplicate_rows, 2);
    // The counters: the two distinct prompts were computed, every sampled token counted.
    assert_eq!(pc.stats.calls, 1);
    assert_eq!(pc.stats.prefill_tokens, 9 + 12);
    assert_eq!(pc.computed_tokens, 9 + 12);
    assert_eq!(pc.reused_tokens, 9 + 12);
    let sampled: usize = out.iter().map(|g| g.tokens.len()).sum();
    assert_eq!(pc.stats.sampled_tokens as usize, sampled);
    assert!(pc.stats.decode_steps >= 5 && pc.stats.prefill_s > 0.0);
    for (i, (pr, g)) in prs.iter().zip(&out).enumerate() {
        // Alone, with the same row seed: the same tokens.
        let alone = SamplingParams {
            row_seeds: vec![p.row_seeds[i]],
            ..p.clone()
        };
        let solo = m.generate(std::slice::from_ref(pr), &alone, None).unwrap();
        assert_eq!(solo[0].tokens, g.tokens, "row {i}");
        // log softmax(logits / T) of the whole sequence, recomputed.
        let full: Vec<u32> = pr.iter().chain(&g.tokens).copied().collect();
        let n = full.len();
        let layout = SeqLayout::left_padded(&[n], n, &Device::Cpu).unwrap();
        let x = Tensor::new(full.as_slice(), &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let logits: Vec<Vec<f32>> = m
            .logits(&x, &layout)
            .unwrap()
            .squeeze(0)
            .unwrap()
            .to_vec2()
            .unwrap();
        for (k, (&tok, &lp)) in g.tokens.iter().zip(&g.logprobs).enumerate() {
            let row = &logits[pr.len() - 1 + k];
            let mx = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
            let lse = row
                .iter()
                .map(|&z| ((z as f64 - mx) / t).exp())
                .sum::<f64>()
                .ln();
            let want = (row[tok as usize] as f64 - mx) / t - lse;
            assert!(
                (lp as f64 - want).abs() < 1e-4,
                "row {i} step {k}: {lp} vs {want}"
            );
        }
    }
    // Rows 0 and 2 share a prompt but not a seed.
    assert_ne!(out[0].tokens, out[2].tokens);
    // A wrong number of row seeds is refused.
    let bad = SamplingParams {
        row_seeds: vec![1],
        ..p
    };
    assert!(m.generate(&prs, &bad, None).is_err());
}

/// Rows that finish at different steps: a finished row stays in the batch as a hole until
/// half the rows have finished, then the batch is compacted. Every row still equals its
/// prompt run alone, and a later turn reusing the finished rows' keys and values equals a
/// fresh computation.
#[test]
fn rows_finishing_at_different_steps_equal_each_prompt_alone() {
    let m = model(&Device::Cpu);
    let prompts: Vec<Vec<u32>> = (0..7).map(|i| ids(9 + 3 * i, i as u32 + 1)).collect();
    let mut p = SamplingParams {
        temperature: 1.0,
        max_new_tokens: 10,
        seed: 3,
        ..Default::default()
    };
    // Stop tokens taken from the free-running samples at different steps, so rows end one
    // or two at a time.
    let free = m.generate(&prompts, &p, None).unwrap();
    p.stop_token_ids = (0..7).map(|i| free[i].tokens[1 + i % 6]).collect();
    let batch = assert_matches_each_alone(&m, &prompts, &p);
    let lens: std::collections::BTreeSet<usize> = batch.iter().map(|g| g.tokens.len()).collect();
    assert!(
        lens.len() >= 3,
        "rows should end at several different steps: {lens:?}"
    );
    // The same batch through a prefix cache, then a next turn extending every row.
    let q = SamplingParams {
        stop_token_ids: vec![],
        seed: 5,
        ..p.clone()
    };
    assert_two_turns_through_a_cache(&m, &prompts, &batch, &p, &q, |i| ids(2 + i, 40));
}

/// Several samples of each prompt (prompts long enough for decoding to read a group's
/// shared keys and values once): every row equals its prompt run alone, in the first turn
/// (identical prompts) and in the next one (the same conversations continued from a prefix
/// cache, sharing only their first turn).
#[test]
fn samples_of_one_prompt_decoded_as_a_group_equal_each_alone() {
    let m = model(&Device::Cpu);
    let bases: Vec<Vec<u32>> = [70, 85, 100]
        .iter()
        .enumerate()
        .map(|(i, &n)| ids(n, 20 + i as u32))
        .collect();
    let prompts: Vec<Vec<u32>> = (0..9).map(|r| bases[r / 3].clone()).collect();
    let mut p = SamplingParams {
        temperature: 1.0,
        max_new_tokens: 9,
        seed: 21,
        ..Default::default()
    };
    let free = m.generate(&prompts, &p, None).unwrap();
    p.stop_token_ids = vec![free[1].tokens[2], free[5].tokens[4]];
    let first = assert_matches_each_alone(&m, &prompts, &p);
    let q = SamplingParams {
        seed: 4,
        ..p.clone()
    };
    assert_two_turns_through_a_cache(&m, &prompts, &first, &p, &q, |i| ids(3 + i % 4, 50));
}

/// Distinct prompts that share a long prefix (a system prompt): the prefix is computed
/// once and stored only by the first row of each group that reads it; every row equals
/// its prompt run alone.
#[test]
fn distinct_prompts_sharing_a_long_prefix_equal_each_alone() {
    let m = model(&Device::Cpu);
    let system = ids(72, 80);
    let prompts: Vec<Vec<u32>> = (0..5)
        .map(|i| [&system[..], &ids(3 + 2 * i, 81 + i as u32)[..]].concat())
        .collect();
    let p = SamplingParams {
        temperature: 1.0,
        max_new_tokens: 6,
        seed: 8,
        ..Default::default()
    };
    assert_matches_each_alone(&m, &prompts, &p);
}

/// Groups of samples whose first rows (the holders of what each group shares, which the
/// other rows do not store) finish first, while the batch is compacted around them, over
/// three turns through a prefix cache (later turns take each group's shared part from one
/// copy): every row equals a fresh computation, with the KV cache in f32 and in bf16 (whose
/// reused keys and values are rounded, where a fresh computation's prompt attends to its
/// f32 ones).
#[test]
fn group_holders_that_finish_first_still_serve_their_members() {
    let m = model(&Device::Cpu);
    for kv_bf16 in [false, true] {
        let mut prompts: Vec<Vec<u32>> = (0..8)
            .map(|r| ids(80 + 7 * (r / 4), 60 + (r / 4) as u32))
            .collect();
        let mut pc = PrefixCache::default();
        let mut holders_first = 0;
        for turn in 0..3u64 {
            let mut p = SamplingParams {
                temperature: 1.0,
                max_new_tokens: 9,
                seed: 31 + turn,
                kv_bf16,
                ..Default::default()
            };
            // Stop tokens that the free-running rows but the last of each group draw
            // early, so that the holders end first and the batch is compacted.
            let free = m.generate(&prompts, &p, None).unwrap();
            p.stop_token_ids = [0, 1, 2, 4, 5, 6]
                .iter()
                .map(|&r| free[r].tokens[1])
                .collect();
            let want = if turn == 0 {
                assert_matches_each_alone(&m, &prompts, &p)
            } else {
                m.generate(&prompts, &p, None).unwrap()
            };
            pc.begin_round();
            let got = m
                .generate_reusing(&prompts, &p, None, Some(&mut pc))
                .unwrap();
            // A fresh computation attends to its prompt's f32 keys and values, the cached
            // rows to their bf16 copies: close log-probs while the samples agree (they may
            // part at a near tie).
            let rounded = kv_bf16 && turn > 0;
            let tol = if rounded { 0.1 } else { 1e-4 };
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                let same = g
                    .tokens
                    .iter()
                    .zip(&w.tokens)
                    .take_while(|(a, b)| a == b)
                    .count();
                if !rounded {
                    assert_eq!(g.tokens, w.tokens, "turn {turn}, row {i}");
                }
                assert!(
                    g.logprobs.iter().all(|x| x.is_finite()),
                    "turn {turn}, row {i}"
                );
                for (a, b) in g.logprobs.iter().zip(&w.logprobs).take(same) {
                    assert!(
                        (a - b).abs() < tol,
                        "kv_bf16 {kv_bf16}, turn {turn}, row {i}: {a} vs {b}"
                    );
                }
            }
            holders_first += [(0, 3), (4, 7)]
                .iter()
                .filter(|&&(h, last)| got[h].tokens.len() + 2 < got[last].tokens.len())
                .count();
            for (i, (pr, g)) in prompts.iter_mut().zip(&got).enumerate() {
                pr.extend(&g.tokens);
                pr.extend(ids(2 + i % 3, 70 + turn as u32));
            }
        }
        assert!(
            holders_first >= 2,
            "holders should end before their groups' last rows"
        );
    }
}

/// `prompts` through a prefix cache under `p` give `first`; then each row continued by its
/// reply and `tool(i)` gives, under `q`, what a fresh computation gives.
fn assert_two_turns_through_a_cache(
    m: &CausalLM,
    prompts: &[Vec<u32>],
    first: &[Generation],
    p: &SamplingParams,
    q: &SamplingParams,
    tool: impl Fn(usize) -> Vec<u32>,
) {
    let mut pc = PrefixCache::default();
    let got = m.generate_reusing(prompts, p, None, Some(&mut pc)).unwrap();
    for (g, w) in got.iter().zip(first) {
        assert_eq!(g.tokens, w.tokens);
    }
    let next: Vec<Vec<u32>> = prompts
        .iter()
        .zip(&got)
        .enumerate()
        .map(|(i, (pr, g))| [&pr[..], &g.tokens[..], &tool(i)[..]].concat())
        .collect();
    let want = m.generate(&next, q, None).unwrap();
    pc.begin_round();
    let again = m.generate_reusing(&next, q, None, Some(&mut pc)).unwrap();
    for (i, (a, w)) in again.iter().zip(&want).enumerate() {
        assert_eq!(a.tokens, w.tokens, "row {i}");
        for (x, y) in a.logprobs.iter().zip(&w.logprobs) {
            assert!((x - y).abs() < 1e-4, "row {i}: {x} vs {y}");
        }
    }
}

/// Log-probs of `tokens` after `prompt` under the model in f32 (full recomputation,
/// temperature 1).
fn f32_logprobs(m: &CausalLM, prompt: &[u32], tokens: &[u32]) -> Vec<f32> {
    let seq: Vec<u32> = prompt.iter().chain(tokens).copied().collect();
    let logits = full_logits(m, &seq);
    tokens
        .iter()
        .enumerate()
        .map(|(j, &tok)| {
            let row = &logits[prompt.len() + j - 1];
            let mx = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            let lse = mx + row.iter().map(|v| (v - mx).exp()).sum::<f32>().ln();
            row[tok as usize] - lse
        })
        .collect()
}

/// The largest gap between generations' log-probs and a full f32 pass's for their tokens.
fn f32_gap(m: &CausalLM, prompts: &[Vec<u32>], gens: &[tooltrain_model::Generation]) -> f32 {
    let mut worst = 0f32;
    for (pr, g) in prompts.iter().zip(gens) {
        for (a, b) in g.logprobs.iter().zip(f32_logprobs(m, pr, &g.tokens)) {
            worst = worst.max((a - b).abs());
        }
    }
    worst
}

/// bf16 decoding (AMX): each sampled token's log-prob is within a few hundredths of the
/// f32 model's, also after the weights change (the packed copy follows them). Without
/// AMX the option changes nothing.
#[test]
fn bf16_decoding_tracks_the_f32_logprobs_and_the_weights() {
    let m = model(&Device::Cpu);
    let prs = prompts();
    let p = SamplingParams {
        temperature: 1.0,
        max_new_tokens: 10,
        row_seeds: vec![7, 8, 9],
        bf16: true,
        ..Default::default()
    };
    let f32_gen = |m: &CausalLM| {
        let p32 = SamplingParams {
            bf16: false,
            ..p.clone()
        };
        m.generate(&prs, &p32, None).unwrap()
    };
    let gap = |m: &CausalLM, gens: &[tooltrain_model::Generation]| f32_gap(m, &prs, gens);
    let check = |m: &CausalLM| {
        let out = m.generate(&prs, &p, None).unwrap();
        let worst = gap(m, &out);
        if tooltrain_model::bf16_available() {
            eprintln!("bf16 log-probs within {worst} of f32");
            assert!(worst < 0.25, "bf16 log-probs {worst} from f32");
            // The bf16 path ran: the values are not f32's bit for bit.
            assert!(worst > 0.0, "bf16 decoding gave f32's exact log-probs");
        } else {
            eprintln!("no AMX: bf16 decoding is f32 decoding");
            for (a, b) in out.iter().zip(&f32_gen(m)) {
                assert_eq!(a.tokens, b.tokens);
                assert_eq!(a.logprobs, b.logprobs);
            }
        }
    };
    let before = f32_gen(&m);
    check(&m);
    // New weights: every down projection scaled by 3 (a large change of the outputs).
    for (name, v) in m.params() {
        if name.contains("down_proj") {
            v.set(&(v.as_tensor() * 3.0).unwrap()).unwrap();
        }
    }
    m.weights_changed();
    check(&m);
    // What stale packed weights would have given: the old weights' log-probs, far off.
    let moved = gap(&m, &before);
    eprintln!("the weight change moved log-probs by up to {moved}");
    assert!(
        moved > 1.0,
        "the weight change moved log-probs by only {moved}"
    );
}

/// A bf16 KV cache (`kv_bf16`): the log-probs of what it generates stay within rounding
/// noise of the f32 model's for the same tokens, on a first turn and on a
/// second turn whose prefixes come back from the prefix cache; and they are not f32's
/// exactly (the keys and values were rounded).
#[test]
fn bf16_kv_cache_tracks_the_f32_cache() {
    let m = model(&Device::Cpu);
    let prs: Vec<Vec<u32>> = (0..3).map(|i| ids(40 + 9 * i, i as u32)).collect();
    let p = SamplingParams {
        temperature: 1.0,
        max_new_tokens: 12,
        row_seeds: vec![3, 4, 5],
        kv_bf16: true,
        ..Default::default()
    };
    let gap = |prs: &[Vec<u32>], gens: &[Generation]| {
        let (mut worst, mut sum, mut n) = (0f32, 0f32, 0);
        for (pr, g) in prs.iter().zip(gens) {
            assert!(!g.tokens.is_empty());
            for (a, b) in g.logprobs.iter().zip(f32_logprobs(&m, pr, &g.tokens)) {
                worst = worst.max((a - b).abs());
                sum += (a - b).abs();
                n += 1;
            }
        }
        (worst, sum / n as f32)
    };
    let mut pc = PrefixCache::default();
    let first = m.generate_reusing(&prs, &p, None, Some(&mut pc)).unwrap();
    let next: Vec<Vec<u32>> = prs
        .iter()
        .zip(&first)
        .enumerate()
        .map(|(i, (pr, g))| [&pr[..], &g.tokens[..], &ids(5, 7 + i as u32)[..]].concat())
        .collect();
    pc.begin_round();
    let second = m.generate_reusing(&next, &p, None, Some(&mut pc)).unwrap();
    assert!(
        pc.reused_tokens > 0,
        "the second turn reused no cached prefix"
    );
    let ((w1, m1), (w2, m2)) = (gap(&prs, &first), gap(&next, &second));
    eprintln!(
        "bf16 KV cache: log-probs within {w1} (mean {m1}) on the first turn, {w2} (mean \
         {m2}) on the second, of f32"
    );
    // This random tiny model is sensitive (the bf16 weights test sees 0.14): rounding
    // noise gives a few hundredths on average; a misplaced key would give whole nats.
    assert!(
        w1 < 0.25 && w2 < 0.25,
        "bf16 KV cache log-probs {w1}, {w2} from f32"
    );
    assert!(
        m1 < 0.02 && m2 < 0.02,
        "bf16 KV cache log-probs {m1}, {m2} from f32 on average"
    );
    assert!(
        w1.max(w2) > 0.0,
        "the bf16 KV cache gave f32's exact log-probs"
    );
}

/// f32 decoding on the CPU reads the layers' weights repacked in column panels, made once
/// per weights version: its log-probs are those of a full f32 pass over the same tokens,
/// before and after the weights change (stale panels would give the old weights' values).
#[test]
fn f32_decoding_follows_the_weights_through_their_panels() {
    let m = model(&Device::Cpu);
    let prs = prompts();
    let p = SamplingParams {
        temperature: 1.0,
        max_new_tokens: 10,
        row_seeds: vec![7, 8, 9],
        ..Default::default()
    };
    let gap = |m: &CausalLM, gens: &[tooltrain_model::Generation]| f32_gap(m, &prs, gens);
    let before = m.generate(&prs, &p, None).unwrap();
    let worst = gap(&m, &before);
    assert!(
        worst < 1e-4,
        "decoding's log-probs {worst} from a full pass"
    );
    for (name, v) in m.params() {
        if name.contains("down_proj") {
            v.set(&(v.as_tensor() * 3.0).unwrap()).unwrap();
        }
    }
    m.weights_changed();
    let after = m.generate(&prs, &p, None).unwrap();
    let worst = gap(&m, &after);
    assert!(worst < 1e-4, "after the change: {worst} from a full pass");
    let moved = gap(&m, &before);
    assert!(
        moved > 1.0,
        "the weight change moved log-probs by only {moved}"
    );
}

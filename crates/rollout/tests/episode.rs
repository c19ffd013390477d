//! Episodes end to end: the oracle on a small repository, recorded with the real Qwen
//! tokenizer and chat template (token record, loss mask, drift), turn and context
//! budgets, invalid turns, failing policies, and the local model's tokens and log-probs
//! checked against re-scoring the whole sequence.

use serde_json::json;
use std::path::PathBuf;
use std::sync::Arc;
use tooltrain_model::{CausalLM, DType, Device, ModelConfig, Tokenizer};
use tooltrain_rollout::episode::{
    run_episodes, Candidates, EpisodeConfig, EpisodeJob, Renderer, Trajectory,
};
use tooltrain_rollout::local::{LocalModel, LocalSampling};
use tooltrain_rollout::policy::{Oracle, Policy, PolicyError, Stage, TurnReply, TurnRequest};
use tooltrain_rollout::{FileIndex, Instance, Location, RepoIndex};

fn asset(rel: &str) -> Option<PathBuf> {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../assets")
        .join(rel);
    if p.exists() {
        return Some(p);
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{} is missing: run scripts/fetch-assets.sh", p.display());
    }
    eprintln!(
        "SKIP: {} missing (run scripts/fetch-assets.sh)",
        p.display()
    );
    None
}

fn qwen() -> Option<Arc<Tokenizer>> {
    let dir = asset("qwen-tokenizer")?;
    Some(Arc::new(Tokenizer::from_dir(&dir).unwrap()))
}

fn repo() -> RepoIndex {
    let a = b"import os\n\nclass Cart:\n    def add(self, item):\n        self.items.append(item)\n\n    def total(self):\n        return sum(i.price for i in self.items)\n\n\ndef helper(x):\n    return x + 1\n";
    let b = b"class Parser:\n    def parse(self, s):\n        return s.split(',')\n";
    let c = b"def unused():\n    pass\n";
    let t = b"def test_cart():\n    pass\n";
    RepoIndex::from_files(vec![
        FileIndex::parse("shop/cart.py", a),
        FileIndex::parse("shop/parse.py", b),
        FileIndex::parse("shop/misc.py", c),
        FileIndex::parse("tests/test_cart.py", t),
    ])
}

fn job(gt: &[&str], seed: u64) -> EpisodeJob {
    EpisodeJob {
        instance: Arc::new(Instance {
            instance_id: format!("demo-{seed}"),
            repo: "o/shop".into(),
            base_commit: "0".repeat(40),
            problem_statement: "Cart.total() returns the wrong sum when items repeat.".into(),
            patch: String::new(),
        }),
        index: Arc::new(repo()),
        gt: Some(gt.iter().map(|s| Location::parse(s)).collect()),
        sample: 0,
        seed,
        prompt_seed: seed,
    }
}

fn cfg() -> EpisodeConfig {
    EpisodeConfig {
        candidates: Candidates::GtPlusRandom,
        num_candidates: 3,
        ..EpisodeConfig::default()
    }
}

fn run(
    jobs: &[EpisodeJob],
    p: &dyn Policy,
    r: Option<&Renderer>,
    c: &EpisodeConfig,
) -> Vec<Trajectory> {
    run_episodes(jobs, p, r, c, None, &|_| {})
}

/// The text of each maximal run of loss-mask-1 tokens.
fn generated_spans(tok: &Tokenizer, ids: &[u32], mask: &[u8]) -> Vec<String> {
    let mut out = vec![];
    let mut cur: Vec<u32> = vec![];
    for (&t, &m) in ids.iter().zip(mask) {
        if m == 1 {
            cur.push(t);
        } else if !cur.is_empty() {
            out.push(tok.decode(&cur, false).unwrap());
            cur.clear();
        }
    }
    if !cur.is_empty() {
        out.push(tok.decode(&cur, false).unwrap());
    }
    out
}

#[test]
fn oracle_episode_is_recorded_token_by_token() {
    let Some(tok) = qwen() else { return };
    let r = Renderer::new(tok.clone()).unwrap();
    assert_eq!(r.end_of_turn(), Some("<|im_end|>"));
    let gt = [
        "shop/cart.py::Cart.total",
        "shop/cart.py::helper",
        "shop/parse.py::Parser",
    ];
    let jobs = [job(&gt, 7)];
    let t = &run(&jobs, &Oracle { reasoning: true }, Some(&r), &cfg())[0];
    assert_eq!(t.error, None);
    assert_eq!(t.reward, Some(1.0));
    assert_eq!(t.locations, gt);
    // Three reads, then the exit turn; all reads hit.
    assert_eq!(
        (t.turns, t.tool_calls, t.tool_hits, t.invalid_turns),
        (4, 3, 3, 0)
    );
    assert!(t.exited && !t.context_exhausted);
    // Candidates: both GT files plus one non-test file.
    assert_eq!(t.candidate_files.len(), 3);
    assert!(t.candidate_files.contains(&"shop/cart.py".to_string()));
    assert!(!t.candidate_files.iter().any(|f| f.starts_with("tests/")));

    let rec = t.tokens.as_ref().unwrap();
    assert_eq!(rec.drift, 0);
    assert_eq!(rec.tokens.len(), rec.loss_mask.len());
    assert_eq!(rec.tokens.len(), rec.logprobs.len());
    // The recorded tokens are exactly the tokenised final conversation rendered as
    // history (this template, Qwen3's, renders a last assistant turn with an empty
    // think block, so a user message follows)...
    let tools = tooltrain_rollout::tools::tool_schemas();
    let mut history = t.messages.clone();
    history.push(json!({"role": "user", "content": "."}));
    let text = tok
        .apply_chat_template(
            &history,
            Some(tools.as_array().unwrap()),
            false,
            &Default::default(),
        )
        .unwrap();
    let fresh = tok.encode(&text).unwrap();
    assert_eq!(rec.tokens, fresh[..rec.tokens.len()]);
    assert_eq!(
        tok.decode(&fresh[rec.tokens.len()..], false).unwrap(),
        "<|im_start|>user\n.<|im_end|>\n"
    );
    assert!(
        text.contains("<tools>"),
        "the Qwen template renders the tool schemas"
    );
    // ... and the loss mask covers exactly each assistant message plus its <|im_end|>.
    let assistant: Vec<String> = t
        .messages
        .iter()
        .filter(|m| m["role"] == "assistant")
        .map(|m| format!("{}<|im_end|>", m["content"].as_str().unwrap()))
        .collect();
    assert_eq!(assistant.len(), 5, "four search turns and the summary");
    assert_eq!(
        generated_spans(&tok, &rec.tokens, &rec.loss_mask),
        assistant
    );
    // Tool observations are in the tokens but masked.
    let tool_msgs = t.messages.iter().filter(|m| m["role"] == "tool").count();
    assert_eq!(tool_msgs, 3);
    assert!(
        text.contains(
            "<tool_response>\nResult of get_code_of_class_function(file_name=\"shop/cart.py\""
        ),
        "{text}"
    );
}

#[test]
fn file_stage_chooses_candidates() {
    let gt = ["shop/parse.py::Parser.parse", "shop/cart.py::helper"];
    let c = EpisodeConfig {
        candidates: Candidates::FileStage,
        ..EpisodeConfig::default()
    };
    let t = &run(&[job(&gt, 1)], &Oracle::default(), None, &c)[0];
    assert_eq!(t.candidate_files, ["shop/parse.py", "shop/cart.py"]);
    let fs = t.file_stage.as_ref().unwrap();
    assert_eq!(fs.files, t.candidate_files);
    assert!(fs.messages[1]["content"]
        .as_str()
        .unwrap()
        .contains("shop/\n    cart.py\n"));
    assert_eq!(t.reward, Some(1.0));
    assert!(t.tokens.is_none());
}

/// Replies with a fixed script of texts, one per turn, regardless of the request.
struct Script(Vec<&'static str>);

impl Policy for Script {
    fn name(&self) -> String {
        "script".into()
    }
    fn respond(&self, reqs: &[TurnRequest<'_>]) -> Vec<Result<TurnReply, PolicyError>> {
        reqs.iter()
            .map(|r| {
                if r.task.instance.instance_id.ends_with("-13") {
                    return Err(PolicyError("endpoint down".into()));
                }
                let text = match r.stage {
                    Stage::Search { turn } => self.0.get(turn).copied().unwrap_or("nothing"),
                    _ => "```\nshop/cart.py\nfunction: Cart.add\nfunction: Cart.total\n```",
                };
                Ok(TurnReply::text(text))
            })
            .collect()
    }
}

#[test]
fn budgets_invalid_turns_and_failures() {
    let tok = qwen();
    let r = tok.map(|t| Renderer::new(t).unwrap());
    let gt = ["shop/cart.py::Cart.total"];
    let script = Script(vec![
        "I think it is in the cart.",
        "<tool_call>\n{\"name\": \"get_code_of_class\", \"arguments\": {\"file_name\": \"shop/cart.py\"}}\n</tool_call>",
        "<tool_call>{\"name\": \"get_code_of_class_function\", \"parameters\": {\"file_name\": \"shop/cart.py\", \"class_name\": \"Cart\", \"func_name\": \"nope\"}}</tool_call>",
    ]);
    let c = EpisodeConfig {
        max_turns: 3,
        ..cfg()
    };
    let ts = run(&[job(&gt, 1), job(&gt, 13)], &script, r.as_ref(), &c);
    let t = &ts[0];
    assert_eq!(t.error, None);
    assert_eq!(
        (t.turns, t.invalid_turns, t.tool_calls, t.tool_hits),
        (3, 2, 1, 0)
    );
    assert!(!t.exited);
    let obs: Vec<&str> = t
        .messages
        .iter()
        .filter(|m| m["role"] == "tool")
        .map(|m| m["content"].as_str().unwrap())
        .collect();
    assert!(
        obs[0].starts_with("Error: no tool call found"),
        "{}",
        obs[0]
    );
    assert!(
        obs[1].contains("missing the required argument \"class_name\""),
        "{}",
        obs[1]
    );
    assert!(obs[2].contains("nope"), "{}", obs[2]);
    // nDCG@5 of [Cart.add, Cart.total] against {Cart.total}: 1/log2(3).
    assert!((t.reward.unwrap() - 1.0 / 3f64.log2()).abs() < 1e-12);
    if let Some(rec) = &t.tokens {
        assert_eq!(rec.drift, 0);
    }
    // The failing episode is recorded, the other one unaffected.
    assert_eq!(ts[1].error.as_deref(), Some("policy: endpoint down"));
    assert!(ts[1].locations.is_empty());

    // A context budget that fits the prompt but no search turn goes straight to the
    // summary.
    if let Some(r) = &r {
        let c = EpisodeConfig {
            max_context_tokens: 1300,
            max_answer_tokens: 200,
            ..cfg()
        };
        let t = &run(&[job(&gt, 1)], &Oracle::default(), Some(r), &c)[0];
        let used = t.tokens.as_ref().unwrap().tokens.len();
        assert!(t.context_exhausted, "{used} tokens");
        assert!(t.turns < 3 && !t.exited, "{} turns", t.turns);
        assert!(used <= 1300, "{used} tokens");
        assert_eq!(t.reward, Some(1.0));
    }
}

#[test]
fn local_model_tokens_and_logprobs_match_rescoring() {
    let Some(tok) = qwen() else { return };
    let r = Renderer::new(tok.clone()).unwrap();
    let cfgm = ModelConfig::from_json(&json!({
        "model_type": "qwen2", "vocab_size": tok.vocab_size(), "hidden_size": 16,
        "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
        "num_key_value_heads": 1, "max_position_embeddings": 4096, "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0, "tie_word_embeddings": true
    }))
    .unwrap();
    let model = Arc::new(CausalLM::new_random(&cfgm, DType::F32, &Device::Cpu, 3).unwrap());
    let sampling = LocalSampling {
        temperature: 1.0,
        ..LocalSampling::default()
    };
    let policy = LocalModel::new(model.clone(), tok.clone(), sampling, "random").unwrap();
    let c = EpisodeConfig {
        max_turns: 2,
        max_new_tokens: 6,
        max_answer_tokens: 6,
        ..cfg()
    };
    let jobs = [
        job(&["shop/cart.py::Cart.total"], 3),
        job(&["shop/cart.py::helper"], 4),
    ];
    let ts = run(&jobs, &policy, Some(&r), &c);
    for t in &ts {
        assert_eq!(t.error, None);
        let rec = t.tokens.as_ref().unwrap();
        let generated = rec.loss_mask.iter().filter(|&&m| m == 1).count();
        // Two search turns and the summary, each at most 6 tokens.
        assert!(generated > 0 && generated <= 18, "{generated}");
        // Recorded log-probs of the sampled tokens equal a fresh scoring of the sequence.
        let scored = &model
            .score(std::slice::from_ref(&rec.tokens), 4096)
            .unwrap()[0];
        for (i, (&m, &lp)) in rec.loss_mask.iter().zip(&rec.logprobs).enumerate() {
            if m == 1 {
                assert!(i > 0);
                let want = scored.logprobs[i - 1];
                assert!((lp - want).abs() < 1e-3, "position {i}: {lp} vs {want}");
            } else {
                assert_eq!(lp, 0.0);
            }
        }
    }
    // The same seeds give the same episodes.
    let again = run(&jobs, &policy, Some(&r), &c);
    assert_eq!(
        again.iter().map(|t| &t.tokens).collect::<Vec<_>>(),
        ts.iter().map(|t| &t.tokens).collect::<Vec<_>>()
    );
}

/// SmolLM2's template renders no `tools`: the schemas go into the system message, and
/// the token record still has no drift.
#[test]
fn template_without_tools_gets_the_schemas_in_the_system_message() {
    let Some(gguf) = asset("smollm2/SmolLM2-135M-Instruct.Q4_1.gguf") else {
        return;
    };
    let ckpt = tooltrain_model::load(&gguf, DType::F32, &Device::Cpu).unwrap();
    let tok = Arc::new(ckpt.tokenizer.unwrap());
    let r = Renderer::new(tok.clone()).unwrap();
    assert_eq!(r.end_of_turn(), Some("<|im_end|>"));
    let t = &run(
        &[job(&["shop/cart.py::Cart.total"], 5)],
        &Oracle { reasoning: true },
        Some(&r),
        &cfg(),
    )[0];
    assert_eq!(t.error, None);
    let sys = t.messages[0]["content"].as_str().unwrap();
    assert!(
        sys.contains("<tools>") && sys.contains("get_code_of_class_function"),
        "{sys}"
    );
    let rec = t.tokens.as_ref().unwrap();
    assert_eq!(rec.drift, 0);
    let assistant: Vec<String> = t
        .messages
        .iter()
        .filter(|m| m["role"] == "assistant")
        .map(|m| format!("{}<|im_end|>", m["content"].as_str().unwrap()))
        .collect();
    assert_eq!(
        generated_spans(&tok, &rec.tokens, &rec.loss_mask),
        assistant
    );
}

/// Every context budget, from one that cannot hold the prompt to one that holds the
/// whole episode: a record never exceeds its budget, repeats no tool response and
/// re-renders to itself (drift 0); a prompt that cannot fit fails with a message that
/// says so.
#[test]
fn context_budget_never_corrupts_the_record() {
    let Some(tok) = qwen() else { return };
    let r = Renderer::new(tok.clone()).unwrap();
    let gt = [
        "shop/cart.py::Cart.total",
        "shop/parse.py::Parser.parse",
        "shop/cart.py::helper",
    ];
    let full = &run(&[job(&gt, 1)], &Oracle::default(), Some(&r), &cfg())[0];
    let full_len = full.tokens.as_ref().unwrap().tokens.len();
    let (mut exhausted, mut too_small) = (0, 0);
    for budget in (300..full_len + 400).step_by(23) {
        let c = EpisodeConfig {
            max_context_tokens: budget,
            max_answer_tokens: 120,
            ..cfg()
        };
        let t = &run(&[job(&gt, 1)], &Oracle::default(), Some(&r), &c)[0];
        if let Some(e) = &t.error {
            // The scripted oracle writes its reply whatever the turn's cap; a reply that
            // would overrun the budget fails the episode instead of being recorded.
            assert!(
                e.contains("does not fit the context budget") || e.contains("this turn allows"),
                "budget {budget}: {e}"
            );
            too_small += e.contains("does not fit") as usize;
            continue;
        }
        let rec = t.tokens.as_ref().unwrap();
        assert!(
            rec.tokens.len() <= budget,
            "budget {budget}: {} tokens",
            rec.tokens.len()
        );
        assert_eq!(rec.drift, 0, "budget {budget}");
        let text = tok.decode(&rec.tokens, false).unwrap();
        let tools = t.messages.iter().filter(|m| m["role"] == "tool").count();
        assert_eq!(
            text.matches("<tool_response>").count(),
            tools,
            "budget {budget}: {text}"
        );
        assert_eq!(
            text.matches("<|im_start|>assistant").count(),
            t.turns + 1,
            "budget {budget}"
        );
        exhausted += t.context_exhausted as usize;
    }
    assert!(
        too_small > 0 && exhausted > 0,
        "{too_small} too small, {exhausted} exhausted"
    );
}

/// A random 1-layer model over the Qwen vocabulary, its policy and renderer.
fn random_policy(
    tok: &Arc<Tokenizer>,
    sampling: LocalSampling,
) -> (Arc<CausalLM>, LocalModel, Renderer) {
    let cfgm = ModelConfig::from_json(&json!({
        "model_type": "qwen2", "vocab_size": tok.vocab_size(), "hidden_size": 16,
        "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
        "num_key_value_heads": 1, "max_position_embeddings": 4096, "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0, "tie_word_embeddings": true
    }))
    .unwrap();
    let model = Arc::new(CausalLM::new_random(&cfgm, DType::F32, &Device::Cpu, 3).unwrap());
    let policy = LocalModel::new(model.clone(), tok.clone(), sampling, "random").unwrap();
    (model, policy, Renderer::new(tok.clone()).unwrap())
}

fn short_cfg() -> EpisodeConfig {
    EpisodeConfig {
        max_turns: 2,
        max_new_tokens: 6,
        max_answer_tokens: 6,
        ..cfg()
    }
}

/// `n` samples of one task: one prompt seed, distinct sampling seeds.
fn group(gt: &str, task_seed: u64, n: usize) -> Vec<EpisodeJob> {
    (0..n)
        .map(|s| EpisodeJob {
            sample: s,
            seed: task_seed * 100 + s as u64,
            prompt_seed: task_seed,
            ..job(&[gt], task_seed)
        })
        .collect()
}

fn records(ts: &[Trajectory]) -> Vec<Option<tooltrain_rollout::episode::TokenRecord>> {
    ts.iter().map(|t| t.tokens.clone()).collect()
}

/// Equal tokens and masks; log-probs equal up to float summation order (batch shapes).
fn same_episodes(a: &[Trajectory], b: &[Trajectory]) {
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(b) {
        let (x, y) = (x.tokens.as_ref().unwrap(), y.tokens.as_ref().unwrap());
        assert_eq!((&x.tokens, &x.loss_mask), (&y.tokens, &y.loss_mask));
        for (p, q) in x.logprobs.iter().zip(&y.logprobs) {
            assert!((p - q).abs() < 1e-4, "{p} vs {q}");
        }
    }
}

/// The prompt tokens of an episode: everything before the first generated token.
fn prompt_of(t: &Trajectory) -> Vec<u32> {
    let rec = t.tokens.as_ref().unwrap();
    let first = rec.loss_mask.iter().position(|&m| m == 1).unwrap();
    rec.tokens[..first].to_vec()
}

#[test]
fn a_group_shares_one_prompt_and_rows_sample_independently_of_batching() {
    let Some(tok) = qwen() else { return };
    let sampling = |max_batch| LocalSampling {
        temperature: 1.0,
        max_batch,
        ..LocalSampling::default()
    };
    let (_, wide, r) = random_policy(&tok, sampling(16));
    let (_, narrow, _) = random_policy(&tok, sampling(3));
    let (_, alone, _) = random_policy(&tok, sampling(1));
    let mut jobs = group("shop/cart.py::Cart.total", 5, 4);
    jobs.extend(group("shop/parse.py::Parser.parse", 6, 4));
    let c = short_cfg();
    let a = run_episodes(&jobs, &wide, Some(&r), &c, None, &|_| {});
    // Every sample of a task sees the same prompt (candidate files included).
    for g in a.chunks(4) {
        assert!(g.iter().all(|t| t.error.is_none()), "{:?}", g[0].error);
        let p0 = prompt_of(&g[0]);
        assert!(g.iter().all(|t| prompt_of(t) == p0));
        assert!(g.iter().all(|t| t.candidate_files == g[0].candidate_files));
        // ... but samples differ (their own seeds).
        let distinct: std::collections::HashSet<_> = g
            .iter()
            .map(|t| t.tokens.as_ref().unwrap().tokens.clone())
            .collect();
        assert!(distinct.len() > 1, "all samples of a group are identical");
    }
    // A row's tokens do not depend on the batch it ran in: batches of 3 (a group split
    // over chunks) and one row at a time give the same episodes.
    let b = run_episodes(&jobs, &narrow, Some(&r), &c, None, &|_| {});
    let s = run_episodes(&jobs, &alone, Some(&r), &c, None, &|_| {});
    same_episodes(&b, &a);
    same_episodes(&s, &a);
    // The same prompt with the same sampling seed in two chunks repeats itself; with
    // another seed it does not (seeds are per row, not per chunk position).
    let mut twice = group("shop/cart.py::Cart.total", 5, 1);
    twice.push(twice[0].clone());
    twice.push(EpisodeJob {
        seed: 999,
        ..twice[0].clone()
    });
    let t = run_episodes(&twice, &narrow, Some(&r), &c, None, &|_| {});
    assert!(t.iter().all(|t| t.error.is_none()), "{:?}", t[0].error);
    assert_eq!(t[0].tokens, t[1].tokens);
    assert_ne!(t[0].tokens, t[2].tokens);
    // Identical prompts were computed once per batch, and a group split over chunks
    // took its prompt from the earlier chunk.
    let st = wide.prefix_stats();
    assert!(st.duplicate_rows >= 6, "{st:?}");
    let st = narrow.prefix_stats();
    assert!(st.reused_tokens > 0 && st.duplicate_rows > 0, "{st:?}");
    // Every generated token has a real log-prob; the oracle's turns have none.
    assert!(a.iter().all(|t| t.tokens.as_ref().unwrap().has_logprobs));
    let o = run_episodes(
        &jobs[..1],
        &Oracle::default(),
        Some(&r),
        &cfg(),
        None,
        &|_| {},
    );
    assert!(!o[0].tokens.as_ref().unwrap().has_logprobs);
}

#[test]
fn a_weight_update_invalidates_cached_prefixes() {
    let Some(tok) = qwen() else { return };
    let sampling = LocalSampling {
        temperature: 1.0,
        ..LocalSampling::default()
    };
    let (model, policy, r) = random_policy(&tok, sampling.clone());
    let jobs = group("shop/cart.py::Cart.total", 7, 3);
    let c = short_cfg();
    let before = run_episodes(&jobs, &policy, Some(&r), &c, None, &|_| {});
    assert!(policy.prefix_stats().reused_tokens > 0);
    // Change the weights in place, as an optimizer step does.
    let bump = |m: &CausalLM| {
        for v in m.params().values() {
            v.set(&(v.as_tensor() * 1.5).unwrap()).unwrap();
        }
    };
    bump(&model);
    model.weights_changed();
    let after = run_episodes(&jobs, &policy, Some(&r), &c, None, &|_| {});
    assert!(policy.prefix_stats().invalidated > 0);
    // A policy built afresh on the same (updated) weights gives the same episodes.
    let fresh = LocalModel::new(model.clone(), tok.clone(), sampling.clone(), "fresh").unwrap();
    let want = run_episodes(&jobs, &fresh, Some(&r), &c, None, &|_| {});
    assert_eq!(records(&after), records(&want));
    assert_ne!(records(&after), records(&before));
    // Without the notice, the cached keys and values of the old weights would be used:
    // the test above would see a difference.
    bump(&model);
    let stale = run_episodes(&jobs, &policy, Some(&r), &c, None, &|_| {});
    model.weights_changed();
    let fresh = LocalModel::new(model.clone(), tok.clone(), sampling, "fresh").unwrap();
    let want = run_episodes(&jobs, &fresh, Some(&r), &c, None, &|_| {});
    assert_ne!(records(&stale), records(&want));
}

#[test]
fn a_stop_flag_abandons_the_unfinished_episodes() {
    let Some(tok) = qwen() else { return };
    let (_, policy, r) = random_policy(&tok, LocalSampling::default());
    let jobs = group("shop/cart.py::Cart.total", 8, 2);
    let stop = std::sync::atomic::AtomicBool::new(true);
    let ts = run_episodes(&jobs, &policy, Some(&r), &short_cfg(), Some(&stop), &|_| {});
    assert_eq!(ts.len(), 2);
    for t in &ts {
        assert_eq!(
            t.error.as_deref(),
            Some(tooltrain_rollout::episode::STOPPED)
        );
        assert_eq!(t.turns, 0);
    }
}

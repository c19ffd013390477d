//! End-to-end tests of the `tooltrain` binary against the committed tiny fixture and,
//! when fetched, the SmolLM2 GGUF.

mod common;
use common::{root, stderr, tooltrain};

use candle_core::{Device, Tensor};
use serde_json::Value;
use std::path::PathBuf;
use std::process::Output;

fn fixture() -> PathBuf {
    root().join("data/fixtures/tiny-qwen2")
}

/// Fails the test, showing stderr, unless the command succeeded.
fn assert_ok(o: &Output) {
    assert!(o.status.success(), "tooltrain failed: {}", stderr(o));
}

/// Fails the test unless the command failed with a message containing every `needle`.
fn assert_err(o: &Output, needles: &[&str]) {
    let err = stderr(o);
    assert!(!o.status.success(), "expected failure, stderr: {err}");
    for n in needles {
        assert!(err.contains(n), "stderr lacks {n:?}: {err}");
    }
    assert!(!err.contains("panicked"), "panicked: {err}");
}

/// The fixture's reference token ids and the log-probs HF transformers gives them:
/// `expected[b][i]` = log_softmax(logits[b][i])[ids[b][i + 1]], in f64.
fn reference() -> (Vec<Vec<i64>>, Vec<Vec<f64>>) {
    let ts = candle_core::safetensors::load(fixture().join("reference.safetensors"), &Device::Cpu)
        .expect("load reference.safetensors");
    let ids: Vec<Vec<i64>> = ts["input_ids"].to_vec2().unwrap();
    let logits: &Tensor = &ts["logits"];
    let logits: Vec<Vec<Vec<f32>>> = logits.to_vec3().unwrap();
    let expected = ids
        .iter()
        .zip(&logits)
        .map(|(row, lg)| {
            (0..row.len() - 1)
                .map(|i| {
                    let z: Vec<f64> = lg[i].iter().map(|&x| x as f64).collect();
                    let m = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let lse = m + z.iter().map(|x| (x - m).exp()).sum::<f64>().ln();
                    z[row[i + 1] as usize] - lse
                })
                .collect()
        })
        .collect();
    (ids, expected)
}

fn ids_jsonl(ids: &[Vec<i64>]) -> String {
    ids.iter()
        .map(|r| serde_json::json!({ "input_ids": r }).to_string() + "\n")
        .collect()
}

fn check_scores(out: &str, ids: &[Vec<i64>], expected: &[Vec<f64>]) {
    let lines: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).expect("output line is JSON"))
        .collect();
    assert_eq!(lines.len(), ids.len(), "output: {out}");
    for (b, line) in lines.iter().enumerate() {
        let got_ids: Vec<i64> = serde_json::from_value(line["input_ids"].clone()).unwrap();
        assert_eq!(got_ids, ids[b]);
        let lp: Vec<f64> = serde_json::from_value(line["logprobs"].clone()).unwrap();
        let ent: Vec<f64> = serde_json::from_value(line["entropies"].clone()).unwrap();
        assert_eq!(lp.len(), ids[b].len() - 1);
        assert_eq!(ent.len(), ids[b].len() - 1);
        for (i, (g, e)) in lp.iter().zip(&expected[b]).enumerate() {
            assert!((g - e).abs() < 1e-4, "seq {b} token {i}: got {g}, want {e}");
        }
        // Entropy of a 128-way distribution lies in [0, ln 128].
        assert!(ent
            .iter()
            .all(|&h| (-1e-4..=(128f64).ln() + 1e-4).contains(&h)));
    }
}

#[test]
fn score_matches_transformers_reference() {
    let (ids, expected) = reference();
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.jsonl");
    std::fs::write(&input, ids_jsonl(&ids)).unwrap();
    let model = fixture();
    // One batch of two, and two batches of one.
    for batch in ["16", "1"] {
        let o = tooltrain(&[
            "score",
            "--model",
            model.to_str().unwrap(),
            "--input",
            input.to_str().unwrap(),
            "--cpu",
            "--batch",
            batch,
        ]);
        assert_ok(&o);
        check_scores(&String::from_utf8(o.stdout).unwrap(), &ids, &expected);
    }
}

#[test]
fn score_output_file_is_complete() {
    let (ids, expected) = reference();
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.jsonl");
    // A blank line and a 1-token sequence (no log-probs) are fine too.
    let mut text = ids_jsonl(&ids);
    text.push('\n');
    text.push_str("{\"input_ids\": [5]}\n");
    std::fs::write(&input, text).unwrap();
    let output = dir.path().join("out.jsonl");
    let o = tooltrain(&[
        "score",
        "--model",
        fixture().to_str().unwrap(),
        "--input",
        input.to_str().unwrap(),
        "--output",
        output.to_str().unwrap(),
        "--cpu",
    ]);
    assert_ok(&o);
    assert!(o.stdout.is_empty(), "stdout should be empty with --output");
    let out = std::fs::read_to_string(&output).unwrap();
    assert!(out.ends_with('\n'));
    let mut lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 3);
    let last: Value = serde_json::from_str(lines.pop().unwrap()).unwrap();
    assert_eq!(last["input_ids"], serde_json::json!([5]));
    assert_eq!(last["logprobs"], serde_json::json!([]));
    check_scores(&(lines.join("\n") + "\n"), &ids, &expected);
    // Nothing but the input and the output is left in the directory.
    let mut names: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["in.jsonl", "out.jsonl"]);
}

/// Runs `score` on `content` (written as `in.jsonl`), with `--output`, and returns the
/// output; checks that no output file was left behind.
fn score_bad(content: &str) -> Output {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.jsonl");
    std::fs::write(&input, content).unwrap();
    let output = dir.path().join("out.jsonl");
    let o = tooltrain(&[
        "score",
        "--model",
        fixture().to_str().unwrap(),
        "--input",
        input.to_str().unwrap(),
        "--output",
        output.to_str().unwrap(),
        "--cpu",
    ]);
    let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
    assert_eq!(left.len(), 1, "a failed run must leave no output file");
    o
}

#[test]
fn score_rejects_bad_lines_with_file_and_line() {
    let good = "{\"input_ids\": [1, 2, 3]}\n";
    let o = score_bad(&format!("{good}{good}this is not json\n"));
    assert_err(&o, &["in.jsonl:3:", "JSON"]);
    let o = score_bad(&format!("{good}{{\"ids\": [1]}}\n"));
    assert_err(&o, &["in.jsonl:2:", "input_ids", "text"]);
    let o = score_bad(&format!("{good}{{\"input_ids\": [1, 128]}}\n"));
    assert_err(&o, &["in.jsonl:2:", "vocabulary"]);
    let o = score_bad("{\"input_ids\": [1, -1]}\n");
    assert_err(&o, &["in.jsonl:1:"]);
    let o = score_bad(&format!("{good}{good}{good}{{\"input_ids\": []}}\n"));
    assert_err(&o, &["in.jsonl:4:", "empty"]);
}

#[test]
fn score_text_without_tokenizer() {
    let o = score_bad("{\"text\": \"hello world\"}\n");
    assert_err(&o, &["in.jsonl:1:", "tokenizer"]);
}

#[test]
fn generate_usage_errors() {
    let model = fixture();
    let m = model.to_str().unwrap();
    let o = tooltrain(&["generate", "--model", m, "--cpu"]);
    assert_err(&o, &["--prompt", "--chat"]);
    let o = tooltrain(&[
        "generate", "--model", m, "--prompt", "hi", "--chat", "x.json",
    ]);
    assert_err(&o, &["--prompt", "--chat", "not both"]);
    // The fixture is weights-only.
    let o = tooltrain(&["generate", "--model", m, "--prompt", "hi", "--cpu"]);
    assert_err(&o, &["no tokenizer"]);
    let o = tooltrain(&[
        "generate",
        "--model",
        "/nonexistent/model",
        "--prompt",
        "hi",
    ]);
    assert_err(&o, &["/nonexistent/model"]);
}

/// An asset fetched by scripts/fetch-assets.sh (path relative to `assets/`); `None`
/// (after printing SKIP) when it is absent outside CI, a failure in CI (`CI=true`).
fn asset(rel: &str) -> Option<PathBuf> {
    let p = root().join("assets").join(rel);
    if p.exists() {
        return Some(p);
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{} is missing (run scripts/fetch-assets.sh)", p.display());
    }
    eprintln!(
        "SKIP: {} is missing (run scripts/fetch-assets.sh)",
        p.display()
    );
    None
}

fn smollm2() -> Option<PathBuf> {
    asset("smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
}

/// The tiny fixture with the Qwen tokenizer (`tokenizer.json` only, so no chat template).
#[test]
fn tokenizer_without_chat_template() {
    let Some(tok) = asset("qwen-tokenizer/tokenizer.json") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    std::fs::create_dir(&model).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(fixture().join(f), model.join(f)).unwrap();
    }
    std::fs::copy(tok, model.join("tokenizer.json")).unwrap();
    let m = model.to_str().unwrap();
    let o = tooltrain(&["generate", "--model", m, "--prompt", "hi", "--cpu"]);
    assert_err(&o, &["no chat template", "--raw"]);
    // Raw prompts need no template ("!#" is two byte tokens inside the tiny vocabulary).
    let o = tooltrain(&[
        "generate",
        "--model",
        m,
        "--prompt",
        "!#",
        "--raw",
        "--cpu",
        "--max-new-tokens",
        "3",
    ]);
    assert_ok(&o);
    assert!(stderr(&o).contains("3 new tokens"), "{}", stderr(&o));
    // Text input is tokenised; ids beyond the model's 128-token vocabulary are refused.
    let input = dir.path().join("in.jsonl");
    std::fs::write(&input, "{\"text\": \"!#%\"}\n").unwrap();
    let o = tooltrain(&[
        "score",
        "--model",
        m,
        "--input",
        input.to_str().unwrap(),
        "--cpu",
    ]);
    assert_ok(&o);
    let line: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(line["input_ids"], serde_json::json!([0, 2, 4]));
    assert_eq!(line["logprobs"].as_array().unwrap().len(), 2);
    std::fs::write(&input, "{\"text\": \"!#%\"}\n{\"text\": \"hello\"}\n").unwrap();
    let o = tooltrain(&[
        "score",
        "--model",
        m,
        "--input",
        input.to_str().unwrap(),
        "--cpu",
    ]);
    assert_err(&o, &["in.jsonl:2:", "vocabulary"]);
}

#[test]
fn generate_smollm2_knows_paris() {
    let Some(gguf) = smollm2() else { return };
    let o = tooltrain(&[
        "generate",
        "--model",
        gguf.to_str().unwrap(),
        "--prompt",
        "What is the capital of France?",
        "--temperature",
        "0",
        "--max-new-tokens",
        "12",
        "--cpu",
    ]);
    assert_ok(&o);
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(out.contains("Paris"), "reply: {out:?}");
    assert!(stderr(&o).contains("tokens/s"), "stats: {}", stderr(&o));
}

#[test]
fn generate_smollm2_chat_file() {
    let Some(gguf) = smollm2() else { return };
    let dir = tempfile::tempdir().unwrap();
    let chat = dir.path().join("chat.json");
    std::fs::write(
        &chat,
        r#"[{"role": "user", "content": "What is the capital of France?"}]"#,
    )
    .unwrap();
    let o = tooltrain(&[
        "generate",
        "--model",
        gguf.to_str().unwrap(),
        "--chat",
        chat.to_str().unwrap(),
        "--system",
        "You are a helpful assistant.",
        "--temperature",
        "0",
        "--max-new-tokens",
        "12",
        "--cpu",
    ]);
    assert_ok(&o);
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(out.contains("Paris"), "reply: {out:?}");
    // A chat file that is not an array of messages.
    std::fs::write(&chat, r#"{"role": "user"}"#).unwrap();
    let o = tooltrain(&[
        "generate",
        "--model",
        gguf.to_str().unwrap(),
        "--chat",
        chat.to_str().unwrap(),
    ]);
    assert_err(&o, &["chat.json", "array of messages"]);
}

//! The `train-sft` binary: layered config and validation errors, and preemption:
//! SIGTERM saves a checkpoint and exits with 143, `--resume` finishes the run.

use serde_json::{json, Value};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// A tiny random Qwen2, synthetic examples and a config training on them in `dir`.
fn setup(dir: &Path, max_steps: u64) -> std::path::PathBuf {
    let model = json!({
        "model_type": "qwen2", "vocab_size": 256, "hidden_size": 64,
        "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "tie_word_embeddings": true
    });
    std::fs::write(dir.join("model.json"), model.to_string()).unwrap();
    let mut state = 7u64;
    let mut next = |n: u64| {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (state >> 33) % n
    };
    let mut lines = String::new();
    for _ in 0..48 {
        let p = 8 + next(16) as usize;
        let prompt: Vec<u64> = (0..p).map(|_| 4 + next(250)).collect();
        let mut ids = prompt.clone();
        ids.extend(prompt.iter().rev());
        let mask: Vec<u8> = (0..2 * p).map(|i| (i >= p) as u8).collect();
        lines.push_str(&json!({"input_ids": ids, "loss_mask": mask}).to_string());
        lines.push('\n');
    }
    std::fs::write(dir.join("train.jsonl"), lines).unwrap();
    let cfg = format!(
        r#"train_file = "{d}/train.jsonl"
output_dir = "{d}/out"
model_config = "{d}/model.json"
cpu = true
max_len = 64
micro_batch_tokens = 128
global_batch = 8
max_steps = {max_steps}
lr = 1e-3
save_every = 1000
keep_checkpoints = 1
"#,
        d = dir.display()
    );
    let p = dir.join("sft.toml");
    std::fs::write(&p, cfg).unwrap();
    p
}

fn train_sft(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_train-sft"))
        .args(args)
        .env("CI", "true")
        .env_remove("RUST_LOG")
        .output()
        .expect("run train-sft")
}

fn metrics(out: &Path) -> Vec<Value> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

#[test]
fn config_layers_and_errors_name_keys() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = setup(dir.path(), 3);
    let c = cfg.to_str().unwrap();
    let o = train_sft(&["--config", c, "--set", "lr=2e-4", "--print-config"]);
    assert!(o.status.success());
    let printed: toml::Table = toml::from_str(&String::from_utf8_lossy(&o.stdout)).unwrap();
    assert_eq!(printed["lr"].as_float(), Some(2e-4));
    assert_eq!(printed["global_batch"].as_integer(), Some(8));
    for (set, needle) in [
        ("lr=0", "`lr`"),
        ("warmup_ratio=2", "`warmup_ratio`"),
        ("global_batch=0", "`global_batch`"),
        ("bogus=1", "unknown field `bogus`"),
        ("truncation=\"middle\"", "truncation"),
    ] {
        let o = train_sft(&["--config", c, "--set", set]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{set}: {err}");
        assert!(err.contains(needle), "{set}: {err}");
    }
    // A short run completes and exports the model.
    let o = train_sft(&["--config", c]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let out = dir.path().join("out");
    assert_eq!(metrics(&out).len(), 3);
    assert!(out.join("final/model.safetensors").exists());
    assert!(out.join("final/config.json").exists());
}

#[test]
fn sigterm_saves_a_checkpoint_and_resume_finishes() {
    let dir = tempfile::tempdir().unwrap();
    let total = 400;
    let cfg = setup(dir.path(), total);
    let c = cfg.to_str().unwrap();
    let out = dir.path().join("out");
    let mut child = Command::new(env!("CARGO_BIN_EXE_train-sft"))
        .args(["--config", c])
        .env("CI", "true")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Preempt once the first step is logged.
    let t0 = Instant::now();
    while metrics(&out).is_empty() {
        assert!(t0.elapsed() < Duration::from_secs(120), "no metrics line");
        assert!(
            child.try_wait().unwrap().is_none(),
            "train-sft exited early"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let st = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    let o = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(143), "{err}");
    assert!(err.contains("SIGTERM") && err.contains("--resume"), "{err}");
    let latest = std::fs::read_to_string(out.join("checkpoints/latest")).unwrap();
    let step: u64 = latest
        .trim()
        .strip_prefix("step-")
        .unwrap()
        .parse()
        .unwrap();
    assert!(step >= 1 && step < total, "stopped at {step}");
    assert!(out
        .join(format!("checkpoints/step-{step}/optimizer.safetensors"))
        .exists());
    assert_eq!(metrics(&out).len() as u64, step);
    assert!(!out.join("final").exists());

    let o = train_sft(&["--config", c, "--resume"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let m = metrics(&out);
    let steps: Vec<u64> = m.iter().map(|l| l["step"].as_u64().unwrap()).collect();
    assert_eq!(steps, (1..=total).collect::<Vec<_>>());
    assert!(out.join("final/model.safetensors").exists());
    assert_eq!(
        std::fs::read_to_string(out.join("checkpoints/latest")).unwrap(),
        format!("step-{total}\n")
    );

    // Bit-identical to an uninterrupted run (all but the timing keys).
    let out2 = dir.path().join("out2");
    let set = format!("output_dir={:?}", out2.display().to_string());
    let o = train_sft(&["--config", c, "--set", &set]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let untimed = |mut v: Value| {
        let m = v.as_object_mut().unwrap();
        m.remove("tokens_per_s");
        m.remove("elapsed_s");
        v.to_string()
    };
    let straight: Vec<String> = metrics(&out2).into_iter().map(untimed).collect();
    let resumed: Vec<String> = m.into_iter().map(untimed).collect();
    assert_eq!(straight, resumed);
}

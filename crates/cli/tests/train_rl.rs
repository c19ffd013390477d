//! The `train-rl` binary: the presets resolve, config errors name the key, and a run
//! that cannot start says why (training itself is tested in crates/rl/tests).

use std::process::Command;

fn train_rl(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_train-rl"))
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."))
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .expect("run train-rl")
}

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn presets_resolve_and_errors_name_the_key() {
    for preset in [
        "configs/rl-qwen2.5-coder-7b.toml",
        "configs/rl-smollm2-synthetic.toml",
    ] {
        let o = train_rl(&["--config", preset, "--print-config"]);
        assert!(o.status.success(), "{preset}: {}", stderr(&o));
        let text = String::from_utf8_lossy(&o.stdout);
        let back: toml::Table = toml::from_str(&text).unwrap();
        assert!(back.contains_key("group_size") && back.contains_key("episode"));
    }
    // The paper's settings.
    let o = train_rl(&[
        "--config",
        "configs/rl-qwen2.5-coder-7b.toml",
        "--print-config",
    ]);
    let t: toml::Table = toml::from_str(&String::from_utf8_lossy(&o.stdout)).unwrap();
    assert_eq!(t["group_size"].as_integer(), Some(16));
    assert_eq!(t["tasks_per_step"].as_integer(), Some(128));
    assert_eq!(t["mini_batches"].as_integer(), Some(16));
    assert_eq!(t["lr"].as_float(), Some(1e-6));
    assert_eq!(t["dual_clip"].as_float(), Some(3.0));
    assert_eq!(t["kl_coef"].as_float(), Some(0.0));
    assert_eq!(t["episode"]["max_turns"].as_integer(), Some(10));
    // Unknown keys and impossible values are refused, naming the key.
    let o = train_rl(&[
        "--config",
        "configs/rl-smollm2-synthetic.toml",
        "--set",
        "group_sise=4",
    ]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("group_sise"), "{}", stderr(&o));
    for (set, key) in [
        ("group_size=1", "group_size"),
        ("rollout.temperature=0.0", "rollout.temperature"),
        ("dual_clip=0.5", "dual_clip"),
        ("max_len=100000", "micro_batch_tokens"),
        ("lr=inf", "lr"),
    ] {
        let o = train_rl(&[
            "--config",
            "configs/rl-smollm2-synthetic.toml",
            "--set",
            set,
        ]);
        assert!(!o.status.success(), "{set}");
        assert!(stderr(&o).contains(key), "{set}: {}", stderr(&o));
    }
    // A missing checkpoint is an error naming it.
    let tmp = tempfile::tempdir().unwrap();
    let out = format!("output_dir={}", tmp.path().join("out").display());
    let o = train_rl(&[
        "--config",
        "configs/rl-smollm2-synthetic.toml",
        "--set",
        "init=/nonexistent/ckpt",
        "--set",
        &out,
    ]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("/nonexistent/ckpt"), "{}", stderr(&o));
}

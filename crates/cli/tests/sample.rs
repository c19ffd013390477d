//! `tooltrain sample` end to end on synthetic tasks with the scripted teacher and the
//! real Qwen tokenizer: kept examples are token-exact, a rerun resumes (skips what is
//! done, repairs a partial last line), and the keep rule filters.

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn tooltrain(args: &[&str]) -> (String, String, bool) {
    let o = Command::new(env!("CARGO_BIN_EXE_tooltrain"))
        .current_dir(root())
        .args(args)
        .output()
        .unwrap();
    (
        String::from_utf8_lossy(&o.stdout).into(),
        String::from_utf8_lossy(&o.stderr).into(),
        o.status.success(),
    )
}

fn lines(p: &Path) -> Vec<Value> {
    std::fs::read_to_string(p)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn sample_keeps_resumes_and_filters() {
    if !root().join("assets/qwen-tokenizer").exists() {
        assert!(
            std::env::var("CI").map_or(true, |v| v != "true"),
            "assets/qwen-tokenizer missing: run scripts/fetch-assets.sh"
        );
        eprintln!("SKIP: assets/qwen-tokenizer missing");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let data = d.join("data");
    let (_, e, ok) = tooltrain(&[
        "synth",
        "--out",
        data.to_str().unwrap(),
        "--n",
        "6",
        "--seed",
        "3",
    ]);
    assert!(ok, "{e}");
    let out = d.join("sample");
    let sets = |extra: &[&str]| {
        let mut v: Vec<String> = vec![
            "sample".into(),
            "--config".into(),
            "configs/sample-synthetic.toml".into(),
        ];
        for (k, val) in [
            ("dataset", data.join("dataset.jsonl")),
            ("gt", data.join("gt.json")),
            ("repos_dir", data.join("repos")),
            ("out", out.clone()),
            ("tokenizer", "assets/qwen-tokenizer".into()),
        ] {
            v.push("--set".into());
            v.push(format!("{k}=\"{}\"", val.display()));
        }
        // Three candidate files: the random ones make the two samples differ.
        v.push("--set".into());
        v.push("episode.num_candidates=3".into());
        for x in extra {
            v.push((*x).into());
        }
        v
    };
    let run = |extra: &[&str]| {
        let a = sets(extra);
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        tooltrain(&a)
    };
    let (so, e, ok) = run(&["--set", "samples=2", "--set", "limit=4"]);
    assert!(ok, "{e}");
    assert!(
        so.contains("sampled 8 episodes (0 from earlier runs"),
        "{so}"
    );
    let kept = lines(&out.join("sft.jsonl"));
    assert_eq!(kept.len(), 8);
    for k in &kept {
        let ids = k["input_ids"].as_array().unwrap();
        let mask = k["loss_mask"].as_array().unwrap();
        assert_eq!(ids.len(), mask.len());
        let n1 = mask.iter().filter(|m| m.as_u64() == Some(1)).count();
        assert!(n1 > 20 && n1 < ids.len() / 2, "{n1} of {}", ids.len());
        assert_eq!(k["reward"].as_f64(), Some(1.0));
    }
    // Crash mid-write: a partial last line. The rerun with more instances cuts it,
    // skips the 7 complete episodes and samples the rest.
    let traj = out.join("trajectories.jsonl");
    let text = std::fs::read_to_string(&traj).unwrap();
    let cut = text.trim_end().rfind('\n').unwrap() + 1;
    std::fs::write(&traj, &text[..cut + 40]).unwrap();
    let (so, e, ok) = run(&["--set", "samples=2"]);
    assert!(ok, "{e}");
    assert!(
        so.contains("sampled 12 episodes (7 from earlier runs"),
        "{so}"
    );
    assert_eq!(lines(&traj).len(), 12);
    let summary: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    assert_eq!(summary["kept"], 12);
    // Other settings (episode budget, seed, policy) cannot resume these trajectories.
    for change in [
        "episode.max_turns=3",
        "seed=9",
        "policy.oracle.reasoning=false",
    ] {
        let (_, e, ok) = run(&["--set", "samples=3", "--set", change]);
        assert!(
            !ok && e.contains("cannot resume the sampling run"),
            "{change}: {e}"
        );
        let key = change.split(['.', '=']).next().unwrap();
        assert!(e.contains(key), "{change}: {e}");
    }
    assert_eq!(lines(&traj).len(), 12, "a refused run adds nothing");
    // A second run while one holds the directory fails at once, naming the holder.
    let lock = out.join(".tooltrain.lock");
    let held = std::fs::File::open(&lock).unwrap();
    fs2::FileExt::lock_exclusive(&held).unwrap();
    std::fs::write(
        &lock,
        "`tooltrain sample` (pid 4242, started at unix time 0)",
    )
    .unwrap();
    let (_, e, ok) = run(&["--set", "samples=3"]);
    assert!(
        !ok && e.contains("in use by `tooltrain sample` (pid 4242"),
        "{e}"
    );
    fs2::FileExt::unlock(&held).unwrap();
    drop(held);
    // Impossible keep rules are config errors naming the key.
    let (_, e, ok) = run(&[
        "--set",
        "keep={rule = \"reward_at_least\", threshold = 1.5}",
    ]);
    assert!(!ok && e.contains("keep.threshold"), "{e}");
    let (_, e, ok) = run(&["--set", "keep.rule=\"most_of\""]);
    assert!(!ok && e.contains("keep"), "{e}");
}

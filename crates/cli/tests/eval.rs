//! `tooltrain eval` end to end: the oracle and BM25 over a small hand-made benchmark
//! (metrics checked by hand), bad input (missing trees, unknown ids, malformed lines,
//! unknown config keys), and, on the CI subset of SWE-bench Verified prepared from PyPI
//! releases, the oracle scoring 100 and BM25 producing the paper's table.

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_tooltrain"));
    c.current_dir(root());
    c
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn run_ok(c: &mut Command) -> String {
    let out = c.output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "stdout:\n{text}\nstderr:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

fn run_err(c: &mut Command) -> String {
    let out = c.output().unwrap();
    assert!(!out.status.success(), "expected failure");
    String::from_utf8_lossy(&out.stderr).to_string()
}

fn metrics(out: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(out.join("metrics.json")).unwrap()).unwrap()
}

/// Two instances over two small trees, and a third whose tree is missing.
fn bench(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let repos = dir.join("repos");
    let a = repos.join("o__r-1/pkg");
    std::fs::create_dir_all(&a).unwrap();
    std::fs::write(
        a.join("cart.py"),
        "class Cart:\n    def total(self):\n        return 0\n\n    def add(self, x):\n        pass\n\n\ndef price_of(item):\n    return item.price\n",
    )
    .unwrap();
    std::fs::write(a.join("util.py"), "def slugify(s):\n    return s.lower()\n").unwrap();
    let b = repos.join("o__r-2/pkg");
    std::fs::create_dir_all(&b).unwrap();
    std::fs::write(
        b.join("parse.py"),
        "class Parser:\n    def parse(self, s):\n        return s\n",
    )
    .unwrap();
    let ds = dir.join("d.jsonl");
    let line = |id: &str, text: &str| {
        serde_json::json!({"instance_id": id, "repo": "o/r", "base_commit": "c", "problem_statement": text, "patch": ""}).to_string()
    };
    std::fs::write(
        &ds,
        format!(
            "{}\n{}\n{}\n",
            line(
                "o__r-1",
                "Cart total is wrong: Cart.total returns 0 and price_of is ignored."
            ),
            line("o__r-2", "Parser.parse does not parse."),
            line("o__r-3", "The tree of this one is missing.")
        ),
    )
    .unwrap();
    let gt = dir.join("gt.json");
    std::fs::write(
        &gt,
        r#"{"o__r-1": ["pkg/cart.py::Cart.total", "pkg/cart.py::price_of"], "o__r-2": ["pkg/parse.py::Parser.parse"], "o__r-3": ["x.py::f"]}"#,
    )
    .unwrap();
    (ds, gt, repos)
}

#[test]
fn oracle_and_bm25_on_a_small_benchmark() {
    let dir = tempfile::tempdir().unwrap();
    let (ds, gt, repos) = bench(dir.path());
    let out = dir.path().join("oracle");
    let text = run_ok(
        bin()
            .args(["eval", "--policy", "oracle"])
            .arg("--dataset")
            .arg(&ds)
            .arg("--gt")
            .arg(&gt)
            .arg("--repos-dir")
            .arg(&repos)
            .arg("--out")
            .arg(&out),
    );
    assert!(text.contains("function_strict"), "{text}");
    let m = metrics(&out);
    // Three instances in the denominator; the missing tree scores 0: 2/3 = 66.67%.
    let r = &m["report"];
    assert_eq!(r["instances"], 3);
    let close = |v: &Value, want: f64| (v.as_f64().unwrap() - want).abs() < 1e-9;
    assert!(
        close(&r["function"]["acc"][2], 200.0 / 3.0),
        "{}",
        r["function"]
    );
    assert!(close(&r["function"]["ndcg5"], 200.0 / 3.0));
    assert!(close(&r["file"]["acc"][0], 200.0 / 3.0));
    // Recall@1 of instance 1 is 1/2: (0.5 + 1 + 0) / 3.
    assert!(close(&r["function"]["recall"][0], 50.0));
    assert!(m["failures"]["o__r-3"]
        .as_str()
        .unwrap()
        .contains("missing"));
    let preds = std::fs::read_to_string(out.join("predictions.jsonl")).unwrap();
    let first: Value = serde_json::from_str(preds.lines().next().unwrap()).unwrap();
    assert_eq!(first["instance_id"], "o__r-1");
    assert_eq!(first["found_files"], serde_json::json!(["pkg/cart.py"]));
    assert_eq!(
        first["found_related_locs"],
        serde_json::json!(["function: Cart.total\nfunction: price_of"])
    );
    let trajs = std::fs::read_to_string(out.join("trajectories.jsonl")).unwrap();
    assert_eq!(trajs.lines().count(), 3);
    assert!(!out.join("trajectories.jsonl.partial").exists());

    let out = dir.path().join("bm25");
    run_ok(
        bin()
            .args(["eval", "--policy", "bm25", "--limit", "2"])
            .arg("--dataset")
            .arg(&ds)
            .arg("--gt")
            .arg(&gt)
            .arg("--repos-dir")
            .arg(&repos)
            .arg("--out")
            .arg(&out),
    );
    let m = metrics(&out);
    assert_eq!(m["report"]["instances"], 2);
    // Both issues name their culprit: BM25 finds the right file first.
    assert!(
        close(&m["report"]["file"]["acc"][0], 100.0),
        "{}",
        m["report"]["file"]
    );
}

#[test]
fn bad_input_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let (ds, gt, repos) = bench(dir.path());
    let base = |c: &mut Command| {
        c.arg("--dataset")
            .arg(&ds)
            .arg("--gt")
            .arg(&gt)
            .arg("--repos-dir")
            .arg(&repos)
            .arg("--out")
            .arg(dir.path().join("o"));
    };
    let mut c = bin();
    c.args([
        "eval",
        "--policy",
        "oracle",
        "--set",
        "instances=[\"o__r-1\", \"nope\"]",
    ]);
    base(&mut c);
    let e = run_err(&mut c);
    assert!(
        e.contains("unknown instance id") && e.contains("nope"),
        "{e}"
    );
    let mut c = bin();
    c.args(["eval", "--set", "episode.max_turnz=3"]);
    base(&mut c);
    let e = run_err(&mut c);
    assert!(
        e.contains("episode.max_turnz") || (e.contains("episode") && e.contains("max_turnz")),
        "{e}"
    );
    let bad = dir.path().join("bad.jsonl");
    std::fs::write(
        &bad,
        format!(
            "{}\n{{oops\n",
            std::fs::read_to_string(&ds)
                .unwrap()
                .lines()
                .next()
                .unwrap()
        ),
    )
    .unwrap();
    let e = run_err(
        bin()
            .args(["eval", "--policy", "oracle"])
            .arg("--dataset")
            .arg(&bad)
            .arg("--repos-dir")
            .arg(&repos),
    );
    assert!(e.contains("bad.jsonl:2:"), "{e}");
    let e = run_err(bin().args(["eval", "--policy", "nonsense"]));
    assert!(e.contains("nonsense"), "{e}");
}

/// The CI subset of SWE-bench Verified on trees prepared from PyPI releases by
/// `scripts/prepare-ci-repos.sh` (run by `.ci/run`).
#[test]
fn swebench_ci_subset_oracle_scores_100_and_bm25_runs() {
    let repos = root().join("assets/repos-ci");
    if !repos.is_dir() {
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!(
                "{} is missing: run scripts/prepare-ci-repos.sh",
                repos.display()
            );
        }
        eprintln!(
            "SKIP: {} missing (run scripts/prepare-ci-repos.sh)",
            repos.display()
        );
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("oracle");
    let text = run_ok(
        bin()
            .args(["eval", "--config", "configs/eval-oracle-ci.toml"])
            .arg("--out")
            .arg(&out),
    );
    println!("{text}");
    let m = metrics(&out);
    let r = &m["report"];
    let n = r["instances"].as_u64().unwrap();
    assert!(n >= 5, "{n} instances");
    assert_eq!(
        m["failures"].as_object().unwrap().len(),
        0,
        "{}",
        m["failures"]
    );
    for level in ["file", "function", "function_strict"] {
        for key in ["ndcg5", "map", "mrr"] {
            assert_eq!(r[level][key].as_f64().unwrap(), 100.0, "{level} {key}");
        }
        assert_eq!(r[level]["acc"][2].as_f64().unwrap(), 100.0, "{level} Acc@5");
    }
    // Token-level records with the Qwen tokenizer: no drift.
    assert_eq!(m["drift_episodes"], 0);
    assert_eq!(m["mean_reward"].as_f64().unwrap(), 1.0);

    let out = dir.path().join("bm25");
    let text = run_ok(
        bin()
            .args([
                "eval",
                "--config",
                "configs/eval-oracle-ci.toml",
                "--policy",
                "bm25",
            ])
            .arg("--out")
            .arg(&out),
    );
    println!("{text}");
    let m = metrics(&out);
    assert_eq!(m["report"]["instances"].as_u64().unwrap(), n);
    assert_eq!(m["failures"].as_object().unwrap().len(), 0);
    let f = m["report"]["file"]["acc"][2].as_f64().unwrap();
    assert!(f > 0.0 && f <= 100.0, "BM25 file Acc@5 {f}");
}

/// Instance ids that would leave `repos_dir` are per-instance failures (never indexed);
/// a run where every episode fails, or that has no instance, exits non-zero; a second
/// run on a locked output directory fails naming the holder.
#[test]
fn unsafe_ids_failed_runs_and_locked_outputs() {
    let dir = tempfile::tempdir().unwrap();
    let (ds, gt, repos) = bench(dir.path());
    // `eval` with a policy over a dataset (and GT) into `out`; its stderr on failure.
    let eval_err = |policy: &str, ds: &Path, gt: Option<&Path>, repos: &Path, out: &Path| {
        let mut c = bin();
        c.args(["eval", "--policy", policy])
            .arg("--dataset")
            .arg(ds);
        if let Some(g) = gt {
            c.arg("--gt").arg(g);
        }
        c.arg("--repos-dir").arg(repos).arg("--out").arg(out);
        run_err(&mut c)
    };
    // A secret tree beside repos_dir that `../secret` would reach.
    std::fs::create_dir_all(dir.path().join("secret")).unwrap();
    std::fs::write(dir.path().join("secret/key.py"), "def key():\n    pass\n").unwrap();
    let evil = dir.path().join("evil.jsonl");
    let line = |id: &str| {
        serde_json::json!({"instance_id": id, "repo": "o/r", "base_commit": "c", "problem_statement": "key() leaks", "patch": ""}).to_string()
    };
    std::fs::write(&evil, format!("{}\n{}\n", line("../secret"), line("/abs"))).unwrap();
    let out = dir.path().join("evil-out");
    let e = eval_err("bm25", &evil, None, &repos, &out);
    assert!(e.contains("every episode failed (2 of 2)"), "{e}");
    let m = metrics(&out);
    let f = m["failures"]["../secret"].as_str().unwrap();
    assert!(f.contains("cannot name a directory"), "{f}");
    let trajs = std::fs::read_to_string(out.join("trajectories.jsonl")).unwrap();
    assert!(!trajs.contains("key.py"), "{trajs}");

    // A wrong --repos-dir: every tree missing.
    let nowhere = dir.path().join("nowhere");
    let e = eval_err("oracle", &ds, Some(&gt), &nowhere, &dir.path().join("o2"));
    assert!(
        e.contains("every episode failed (3 of 3)") && e.contains("missing"),
        "{e}"
    );

    // An empty dataset.
    let empty = dir.path().join("empty.jsonl");
    std::fs::write(&empty, "").unwrap();
    let e = eval_err("oracle", &empty, None, &repos, &dir.path().join("o3"));
    assert!(e.contains("no instance to run"), "{e}");

    // A held lock.
    let locked = dir.path().join("o4");
    std::fs::create_dir_all(&locked).unwrap();
    let lock = locked.join(".tooltrain.lock");
    std::fs::write(&lock, "`tooltrain eval` (pid 777, started at unix time 0)").unwrap();
    let held = std::fs::File::open(&lock).unwrap();
    fs2::FileExt::lock_exclusive(&held).unwrap();
    let e = eval_err("oracle", &ds, Some(&gt), &repos, &locked);
    assert!(e.contains("in use by `tooltrain eval` (pid 777"), "{e}");
    assert!(!locked.join("trajectories.jsonl.partial").exists());
}

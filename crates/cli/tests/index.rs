//! `tooltrain index` on the committed fixture tree of `crates/rollout`.

mod common;
use common::tooltrain;

use serde_json::Value;
use std::path::{Path, PathBuf};

fn fixture_repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../rollout/tests/fixtures/repo")
}

fn file<'a>(v: &'a Value, path: &str) -> &'a Value {
    v["files"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["path"] == path)
        .unwrap_or_else(|| panic!("{path} missing from the index"))
}

fn check(v: &Value) {
    let paths: Vec<&str> = v["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["path"].as_str().unwrap())
        .collect();
    assert!(paths.contains(&"pkg/nested.py") && paths.contains(&"tests/test_nested.py"));
    let nested = file(v, "pkg/nested.py");
    // Hand-read from the fixture: `@dataclass` on line 7, `class Outer:` on line 8.
    assert_eq!(
        nested["classes"][0],
        serde_json::json!({"name": "Outer", "start_line": 8, "end_line": 22, "methods": [
            {"name": "prop", "start_line": 17, "end_line": 18},
            {"name": "fetch", "start_line": 20, "end_line": 22}]})
    );
    assert_eq!(nested["classes"][1]["name"], "Outer.Inner");
    assert_eq!(
        nested["functions"],
        serde_json::json!([
            {"name": "decorated", "start_line": 27, "end_line": 30},
            {"name": "top_async", "start_line": 33, "end_line": 34}])
    );
    let helpers = file(v, "pkg/sub/helpers.py");
    assert_eq!(
        helpers["functions"],
        serde_json::json!([{"name": "helper", "start_line": 1, "end_line": 2}])
    );
    assert_eq!(helpers["classes"][0]["name"], "Latin1");
    assert_eq!(helpers["classes"][0]["start_line"], 5);
    // Only the documented keys: no text, no imports.
    let keys: Vec<&String> = nested.as_object().unwrap().keys().collect();
    assert_eq!(keys, ["path", "classes", "functions"]);
}

#[test]
fn index_prints_the_fixture_tree() {
    let repo = fixture_repo();
    let o = tooltrain(&["index", "--repo", repo.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "tooltrain index failed: {err}");
    assert!(err.contains("8 files"), "stderr lacks counts: {err}");
    let v: Value = serde_json::from_slice(&o.stdout).expect("stdout is JSON");
    check(&v);
}

#[test]
fn index_writes_output_file() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("index.json");
    let repo = fixture_repo();
    let o = tooltrain(&[
        "index",
        "--repo",
        repo.to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(o.stdout.is_empty());
    let v: Value = serde_json::from_slice(&std::fs::read(&out).unwrap()).unwrap();
    check(&v);
}

#[test]
fn index_missing_repo_is_a_clear_error() {
    let o = tooltrain(&["index", "--repo", "/nonexistent/tooltrain-repo-xyz"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        err.contains("/nonexistent/tooltrain-repo-xyz") && err.contains("does not exist"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
}

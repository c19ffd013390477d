//! `tooltrain synth` end to end: the written dataset, ground truth and trees load with
//! the rollout crate's loaders and agree with each other; same seed, same bytes.

mod common;
use common::{stderr, tooltrain};

use std::collections::BTreeMap;
use std::path::Path;
use tooltrain_rollout::gt::{locations_from_patch, GroundTruth};
use tooltrain_rollout::{load_dataset, RepoIndex};

/// Every file under `root`, relative path -> bytes.
fn tree(root: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
                out.insert(rel, std::fs::read(&p).unwrap());
            }
        }
    }
    out
}

fn synth(out: &Path, extra: &[&str]) {
    let mut args = vec!["synth", "--out", out.to_str().unwrap()];
    args.extend_from_slice(extra);
    let o = tooltrain(&args);
    assert!(o.status.success(), "{}", stderr(&o));
}

#[test]
fn writes_a_consistent_dataset() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("synth");
    synth(&out, &["--n", "20", "--seed", "5"]);
    let ds = load_dataset(&out.join("dataset.jsonl")).unwrap();
    let gt = GroundTruth::load(&out.join("gt.json")).unwrap();
    assert_eq!(ds.len(), 20);
    assert_eq!(gt.instances.len(), 20);
    for inst in &ds {
        assert!(
            inst.instance_id.starts_with("synth__"),
            "{}",
            inst.instance_id
        );
        assert!(inst.repo.starts_with("synth/"));
        assert_eq!(inst.base_commit.len(), 40);
        assert!(inst.base_commit.chars().all(|c| c.is_ascii_hexdigit()));
        assert!(inst.patch.starts_with("diff --git a/"));
        let locs = gt.get(&inst.instance_id).unwrap();
        assert!(!locs.is_empty() && locs.len() <= 2);
        let idx = RepoIndex::build(&out.join("repos").join(&inst.instance_id));
        assert!(idx.files.len() >= 7, "{} files", idx.files.len());
        for l in locs {
            let f = idx.file(&l.file).unwrap();
            let name = l.name.as_deref().unwrap();
            let found = match name.split_once('.') {
                Some((c, m)) => f
                    .class(c)
                    .is_some_and(|c| c.methods.iter().any(|x| x.name == m)),
                None => f.function(name).is_some(),
            };
            assert!(found, "{}: {} not indexed", inst.instance_id, l.key());
        }
        assert_eq!(locations_from_patch(&inst.patch, &idx).unwrap(), locs);
    }
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["seed"], 5);
}

#[test]
fn same_seed_same_bytes_and_knobs_apply() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b, c) = (
        dir.path().join("a"),
        dir.path().join("b"),
        dir.path().join("c"),
    );
    let knobs = [
        "--n", "8", "--seed", "3", "--files", "5", "--gt-min", "2", "--gt-max", "2",
    ];
    synth(&a, &knobs);
    synth(&b, &knobs);
    assert_eq!(tree(&a), tree(&b));
    synth(
        &c,
        &[
            "--n", "8", "--seed", "4", "--files", "5", "--gt-min", "2", "--gt-max", "2",
        ],
    );
    assert_ne!(
        std::fs::read(a.join("dataset.jsonl")).unwrap(),
        std::fs::read(c.join("dataset.jsonl")).unwrap()
    );
    let gt = GroundTruth::load(&a.join("gt.json")).unwrap();
    assert!(gt.instances.values().all(|v| v.len() == 2));
    for id in gt.instances.keys() {
        let pkg_modules = tree(&a.join("repos").join(id))
            .keys()
            .filter(|p| {
                let parts: Vec<&str> = p.split('/').collect();
                parts.len() == 2
                    && parts[0] != "tests"
                    && !["__init__.py", "errors.py"].contains(&parts[1])
            })
            .count();
        assert_eq!(pkg_modules, 5, "{id}");
    }
    // An existing output is kept unless --force.
    let o = tooltrain(&["synth", "--out", a.to_str().unwrap(), "--n", "2"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("--force"), "{}", stderr(&o));
    synth(&a, &["--n", "2", "--force"]);
    assert_eq!(load_dataset(&a.join("dataset.jsonl")).unwrap().len(), 2);
    // Bad knobs are reported.
    let o = tooltrain(&[
        "synth",
        "--out",
        dir.path().join("d").to_str().unwrap(),
        "--gt-min",
        "3",
        "--gt-max",
        "1",
    ]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("gt_min"), "{}", stderr(&o));
}

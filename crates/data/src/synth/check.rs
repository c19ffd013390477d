//! The consistency check every generated task passes ([`check_task`]): the files parse
//! before and after the gold patch, the patch applies exactly, every GT location and
//! decoy is in the repository index, and the locations derived from the patch (by the
//! rules of docs/reposearcher.md §1) are exactly the GT.

use super::patch::apply_patch;
use super::Task;
use tooltrain_rollout::gt::{locations_from_patch, Location};
use tooltrain_rollout::index::{FileIndex, RepoIndex};

fn parses_cleanly(text: &str) -> bool {
    let mut parser = tree_sitter::Parser::new();
    parser
        .set_language(&tree_sitter_python::LANGUAGE.into())
        .expect("tree-sitter-python grammar is compatible with the tree-sitter runtime");
    parser
        .parse(text, None)
        .is_some_and(|t| !t.root_node().has_error())
}

/// The index of a task's files at the base commit.
pub(super) fn index_of(task: &Task) -> RepoIndex {
    RepoIndex::from_files(
        task.files
            .iter()
            .map(|f| FileIndex::parse(f.path.clone(), f.text.as_bytes()))
            .collect(),
    )
}

/// Whether location `key` (`path.py`, `path.py::function` or `path.py::Class.method`)
/// is in `index`.
fn indexed(index: &RepoIndex, key: &str) -> bool {
    let loc = Location::parse(key);
    let Some(file) = index.file(&loc.file) else {
        return false;
    };
    match loc.name.as_deref().map(|n| n.split_once('.')) {
        None => true,
        Some(None) => file
            .function(loc.name.as_deref().unwrap_or_default())
            .is_some(),
        Some(Some((c, m))) => file
            .classes
            .iter()
            .any(|k| k.name == c && k.methods.iter().any(|x| x.name == m)),
    }
}

/// Checks a task's consistency: every file (before and after the patch) parses without
/// errors, the patch applies exactly, the index has every GT location, the locations
/// derived from the patch equal the GT, and every decoy exists.
pub fn check_task(task: &Task) -> Result<(), String> {
    for f in &task.files {
        if !parses_cleanly(&f.text) {
            return Err(format!("{} does not parse", f.path));
        }
    }
    let fixed = apply_patch(task)?;
    for f in &fixed {
        if !parses_cleanly(&f.text) {
            return Err(format!("{} does not parse after the patch", f.path));
        }
    }
    let index = index_of(task);
    for k in task.gt.iter().chain(&task.decoys) {
        if !indexed(&index, k) {
            return Err(format!("{k} is not in the index"));
        }
    }
    let derived: Vec<String> = locations_from_patch(&task.instance.patch, &index)
        .map_err(|e| e.to_string())?
        .iter()
        .map(Location::key)
        .collect();
    if derived != task.gt {
        return Err(format!("patch gives {derived:?}, GT is {:?}", task.gt));
    }
    if task.gt.is_empty() {
        return Err("no GT locations".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::synth::{make_task, SynthConfig};
    use rand::rngs::StdRng;
    use rand::{RngExt, SeedableRng};

    fn cfg() -> SynthConfig {
        SynthConfig::default()
    }

    #[test]
    fn tasks_are_consistent() {
        let c = cfg();
        for i in 0..60 {
            let t = make_task(&c, i);
            check_task(&t).unwrap_or_else(|e| panic!("task {i}: {e}\n{}", t.instance.patch));
            assert!(!t.gt.is_empty() && t.gt.len() <= 2);
            assert_eq!(t.instance.base_commit.len(), 40);
            assert!(t.instance.instance_id.starts_with("synth__"));
            assert!(t.instance.repo.starts_with("synth/"));
        }
    }

    #[test]
    fn random_knobs_stay_consistent() {
        let mut rng = StdRng::seed_from_u64(99);
        let mut tried = 0;
        while tried < 60 {
            let gt_min = rng.random_range(1..=3);
            let c = SynthConfig {
                seed: rng.random_range(0..1000),
                files: rng.random_range(1..=6),
                classes_per_file: rng.random_range(0..=3),
                methods_per_class: rng.random_range(1..=4),
                functions_per_file: rng.random_range(0..=3),
                decoys: rng.random_range(0..=8),
                gt_min,
                gt_max: rng.random_range(gt_min..=5),
                mention_prob: rng.random_range(0.0..=1.0),
                indirect_prob: rng.random_range(0.0..=1.0),
                ..cfg()
            };
            if c.validate().is_err() {
                continue;
            }
            tried += 1;
            for i in 0..3 {
                let t = make_task(&c, i);
                check_task(&t).unwrap_or_else(|e| panic!("{c:?} task {i}: {e}"));
                assert_eq!(t.decoys.len(), c.decoys);
                assert!(t.gt.len() >= c.gt_min && t.gt.len() <= c.gt_max);
            }
        }
    }

    #[test]
    fn hard_and_easy_knobs_stay_consistent() {
        let hard = SynthConfig {
            files: 6,
            classes_per_file: 3,
            methods_per_class: 4,
            functions_per_file: 3,
            decoys: 6,
            gt_min: 2,
            gt_max: 3,
            mention_prob: 0.0,
            indirect_prob: 1.0,
            ..cfg()
        };
        let easy = SynthConfig {
            files: 1,
            classes_per_file: 0,
            methods_per_class: 0,
            functions_per_file: 2,
            decoys: 0,
            gt_min: 1,
            gt_max: 1,
            mention_prob: 1.0,
            indirect_prob: 0.0,
            ..cfg()
        };
        for c in [&hard, &easy] {
            c.validate().unwrap();
            for i in 0..25 {
                let t = make_task(c, i);
                check_task(&t).unwrap_or_else(|e| panic!("task {i}: {e}"));
                assert!(t.gt.len() >= c.gt_min && t.gt.len() <= c.gt_max);
                assert_eq!(t.decoys.len(), c.decoys);
            }
        }
    }

    #[test]
    fn broken_tasks_are_caught() {
        let t = make_task(&cfg(), 0);
        check_task(&t).unwrap();
        let mut bad = t.clone();
        bad.gt.push(t.decoys[0].clone());
        let e = check_task(&bad).unwrap_err();
        assert!(e.starts_with("patch gives"), "{e}");
        let mut bad = t.clone();
        bad.decoys
            .push(format!("{}::no_such_function", t.files[0].path));
        let e = check_task(&bad).unwrap_err();
        assert!(e.ends_with("is not in the index"), "{e}");
        let mut bad = t.clone();
        // The first removed line (not the `---` header) no longer matches the file.
        let patch = &t.instance.patch;
        let (at, _) = patch
            .match_indices("\n-")
            .find(|(i, _)| !patch[i + 2..].starts_with("--"))
            .unwrap();
        bad.instance.patch.insert(at + 2, '#');
        let e = check_task(&bad).unwrap_err();
        assert!(e.contains("patch expects"), "{e}");
        let mut bad = t.clone();
        bad.files[0].text.push_str("def (:\n");
        let e = check_task(&bad).unwrap_err();
        assert!(e.ends_with("does not parse"), "{e}");
    }
}

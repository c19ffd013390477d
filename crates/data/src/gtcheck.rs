//! Agreement of derived ground truth with a shipped one (`tooltrain gt-check`): for each
//! instance whose tree exists under a repos directory, index the tree, derive the
//! locations of the gold patch ([`tooltrain_rollout::gt::locations_from_patch`]) and compare them
//! with the shipped file's (`gt_verified_repodeepsearch.json`).
//!
//! The gold patch's line numbers are those of the base commit. A tree made from a
//! release (the PyPI fallback) may hold the same code at other lines, so before deriving,
//! each hunk is moved to where its old side occurs in the tree
//! ([`super::fit::relocate_patch`]); on a tree of the base commit nothing moves.
//!
//! Counted per instance: exact agreement (same location set) and file-level agreement
//! (same file set); over all locations: precision = |derived ∩ shipped| / |derived| and
//! recall = |derived ∩ shipped| / |shipped| (micro-averaged, locations compared as
//! `file::name` keys).

use crate::repos::fit::{patch_hunks, relocate_patch, Relocation};
use crate::repos::read_marker;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use std::path::Path;
use tooltrain_rollout::dataset::Instance;
use tooltrain_rollout::gt::{locations_from_patch, GroundTruth, Location};
use tooltrain_rollout::index::RepoIndex;

/// One compared instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Compared {
    pub instance_id: String,
    pub derived: Vec<String>,
    pub shipped: Vec<String>,
    pub exact: bool,
    pub files_agree: bool,
    /// How the tree was made (the marker's summary), when it has a marker.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// Hunks moved to other lines of the tree before deriving, and hunks not found.
    pub relocation: Relocation,
    /// Why no derivation was possible (a gold patch that does not parse).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Compared {
    /// Derived locations the shipped GT lacks.
    pub fn derived_only(&self) -> Vec<&str> {
        self.derived
            .iter()
            .filter(|d| !self.shipped.contains(d))
            .map(String::as_str)
            .collect()
    }

    /// Shipped locations the derivation lacks.
    pub fn shipped_only(&self) -> Vec<&str> {
        self.shipped
            .iter()
            .filter(|s| !self.derived.contains(s))
            .map(String::as_str)
            .collect()
    }
}

/// The `gt-check` report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GtCheckReport {
    pub dataset_instances: usize,
    /// Instances with a tree in the repos directory.
    pub with_tree: usize,
    /// Of those, instances without shipped GT (not compared).
    pub without_shipped_gt: usize,
    pub compared: usize,
    pub exact: usize,
    pub files_agree: usize,
    pub derived_locations: usize,
    pub shipped_locations: usize,
    pub common_locations: usize,
    pub precision: f64,
    pub recall: f64,
    /// Hunks moved to other lines of their tree, and hunks not found in it.
    pub hunks_moved: usize,
    pub hunks_unplaced: usize,
    /// Ids of the compared instances whose sets differ.
    pub disagreements: Vec<String>,
    pub instances: Vec<Compared>,
}

fn keys(locs: &[Location]) -> Vec<String> {
    locs.iter().map(Location::key).collect()
}

fn files(keys: &[String]) -> BTreeSet<String> {
    keys.iter().map(|k| Location::parse(k).file).collect()
}

/// Compare derived and shipped GT on every instance of `dataset` whose tree
/// `<repos_dir>/<instance_id>/` exists.
pub fn gt_check(dataset: &[Instance], repos_dir: &Path, shipped: &GroundTruth) -> GtCheckReport {
    let with_tree: Vec<&Instance> = dataset
        .iter()
        .filter(|i| tooltrain_rollout::dataset::valid_instance_id(&i.instance_id))
        .filter(|i| repos_dir.join(&i.instance_id).is_dir())
        .collect();
    let mut instances: Vec<Compared> = with_tree
        .par_iter()
        .filter_map(|inst| {
            let gt = shipped.get(&inst.instance_id)?;
            let source = read_marker(repos_dir, &inst.instance_id).map(|m| m.provenance.summary());
            let root = repos_dir.join(&inst.instance_id);
            let index = RepoIndex::build(&root);
            let shipped = keys(gt);
            let (patch, relocation) = match patch_hunks(&inst.patch) {
                Ok(h) => relocate_patch(&h, |p| {
                    crate::repos::archive::clean_path(p)
                        .and_then(|p| std::fs::read(root.join(p)).ok())
                }),
                Err(_) => (inst.patch.clone(), Relocation::default()),
            };
            let (derived, error) = match locations_from_patch(&patch, &index) {
                Ok(l) => (keys(&l), None),
                Err(e) => (vec![], Some(format!("gold patch: {e}"))),
            };
            let set = |v: &[String]| v.iter().cloned().collect::<BTreeSet<_>>();
            Some(Compared {
                instance_id: inst.instance_id.clone(),
                exact: set(&derived) == set(&shipped),
                files_agree: files(&derived) == files(&shipped),
                derived,
                shipped,
                source,
                relocation,
                error,
            })
        })
        .collect();
    instances.sort_by(|a, b| a.instance_id.cmp(&b.instance_id));
    let compared = instances.len();
    let derived_locations: usize = instances.iter().map(|c| c.derived.len()).sum();
    let shipped_locations: usize = instances.iter().map(|c| c.shipped.len()).sum();
    let common_locations: usize = instances
        .iter()
        .map(|c| c.derived.iter().filter(|d| c.shipped.contains(d)).count())
        .sum();
    let ratio = |a: usize, b: usize| if b == 0 { 0.0 } else { a as f64 / b as f64 };
    GtCheckReport {
        dataset_instances: dataset.len(),
        with_tree: with_tree.len(),
        without_shipped_gt: with_tree.len() - compared,
        compared,
        exact: instances.iter().filter(|c| c.exact).count(),
        files_agree: instances.iter().filter(|c| c.files_agree).count(),
        derived_locations,
        shipped_locations,
        common_locations,
        precision: ratio(common_locations, derived_locations),
        recall: ratio(common_locations, shipped_locations),
        hunks_moved: instances.iter().map(|c| c.relocation.moved).sum(),
        hunks_unplaced: instances.iter().map(|c| c.relocation.unplaced).sum(),
        disagreements: instances
            .iter()
            .filter(|c| !c.exact)
            .map(|c| c.instance_id.clone())
            .collect(),
        instances,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[test]
    fn compares_derived_with_shipped() {
        let d = tempfile::tempdir().unwrap();
        let t = d.path().join("x__y-1");
        std::fs::create_dir_all(t.join("pkg")).unwrap();
        std::fs::write(
            t.join("pkg/m.py"),
            "class A:\n    def f(self):\n        return 1\n\n\ndef g():\n    return 2\n",
        )
        .unwrap();
        let patch = "diff --git a/pkg/m.py b/pkg/m.py\n--- a/pkg/m.py\n+++ b/pkg/m.py\n@@ -2,2 +2,2 @@ class A:\n     def f(self):\n-        return 1\n+        return 3\n@@ -6,2 +6,2 @@\n def g():\n-    return 2\n+    return 4\n";
        let mk = |id: &str| Instance {
            instance_id: id.into(),
            repo: "x/y".into(),
            base_commit: String::new(),
            problem_statement: String::new(),
            patch: patch.into(),
        };
        // The same code two lines further down (a release, not the base commit).
        let t3 = d.path().join("x__y-3");
        std::fs::create_dir_all(t3.join("pkg")).unwrap();
        std::fs::write(
            t3.join("pkg/m.py"),
            "import os\n\nclass A:\n    def f(self):\n        return 1\n\n\ndef g():\n    return 2\n",
        )
        .unwrap();
        let ds = vec![mk("x__y-1"), mk("x__y-2"), mk("x__y-3")];
        let gt = GroundTruth::from_map(BTreeMap::from([
            ("x__y-1".to_string(), vec!["pkg/m.py::A.f".to_string()]),
            ("x__y-2".to_string(), vec!["pkg/m.py::g".to_string()]),
            (
                "x__y-3".to_string(),
                vec!["pkg/m.py::A.f".to_string(), "pkg/m.py::g".to_string()],
            ),
        ]));
        let r = gt_check(&ds, d.path(), &gt);
        assert_eq!((r.dataset_instances, r.with_tree, r.compared), (3, 2, 2));
        assert_eq!((r.exact, r.files_agree), (1, 2));
        assert_eq!(
            (r.derived_locations, r.shipped_locations, r.common_locations),
            (4, 3, 3)
        );
        assert_eq!((r.precision, r.recall), (0.75, 1.0));
        assert_eq!(r.disagreements, ["x__y-1"]);
        // x__y-3 agrees only because both hunks were moved down by 2 lines.
        assert_eq!((r.hunks_moved, r.hunks_unplaced), (2, 0));
        assert!(r.instances[1].exact);
        assert_eq!(r.instances[0].derived_only(), ["pkg/m.py::g"]);
        assert!(r.instances[0].shipped_only().is_empty());
    }
}

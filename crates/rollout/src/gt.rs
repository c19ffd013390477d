//! Ground-truth locations: the RepoDeepSearch `gt_verified.json` (`file.py::Class.method`
//! or `file.py`) and Loc-Bench's `edit_functions.json` (`file.py:Class.method`), loaded
//! into one type.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;

/// A ground-truth (or predicted) location: a file, optionally a name inside it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Location {
    /// Repository-relative path.
    pub file: String,
    /// `Class.method`, `function` or `Class`; `None` for a file-only location.
    pub name: Option<String>,
}

impl Location {
    /// Parse `file.py::name`, `file.py:name` or a bare `file.py`. The split is at the
    /// first `.py::` / `.py:`; strings without one are file-only.
    pub fn parse(s: &str) -> Location {
        let s = s.trim();
        for (sep, skip) in [(".py::", 5), (".py:", 4)] {
            if let Some(i) = s.find(sep) {
                let name = s[i + skip..].trim();
                return Location {
                    file: s[..i + 3].to_string(),
                    name: (!name.is_empty()).then(|| name.to_string()),
                };
            }
        }
        Location {
            file: s.to_string(),
            name: None,
        }
    }

    /// `file::name`, or `file` when file-only.
    pub fn key(&self) -> String {
        match &self.name {
            Some(n) => format!("{}::{n}", self.file),
            None => self.file.clone(),
        }
    }
}

/// Ground truth of a benchmark: instance id -> locations (in file order, deduplicated).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroundTruth {
    pub instances: BTreeMap<String, Vec<Location>>,
}

/// Error loading a ground-truth file.
#[derive(Debug, thiserror::Error)]
pub enum GtError {
    #[error("cannot read ground truth {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("ground truth {path} is not a JSON object of string lists: {source}")]
    Json {
        path: String,
        source: serde_json::Error,
    },
}

impl GroundTruth {
    /// Build from `{instance_id: ["loc", ...]}` in either separator form.
    pub fn from_map(map: BTreeMap<String, Vec<String>>) -> GroundTruth {
        let instances = map
            .into_iter()
            .map(|(id, locs)| {
                let mut v: Vec<Location> = Vec::new();
                for l in locs {
                    let loc = Location::parse(&l);
                    if !v.contains(&loc) {
                        v.push(loc);
                    }
                }
                (id, v)
            })
            .collect();
        GroundTruth { instances }
    }

    /// Load a JSON file `{instance_id: [location strings]}`; both the `::` (gt_verified)
    /// and the `:` (Loc-Bench edit_functions) forms are accepted.
    pub fn load(path: &Path) -> Result<GroundTruth, GtError> {
        let p = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| GtError::Io {
            path: p.clone(),
            source,
        })?;
        let map: BTreeMap<String, Vec<String>> =
            serde_json::from_str(&text).map_err(|source| GtError::Json { path: p, source })?;
        Ok(Self::from_map(map))
    }

    /// Locations of one instance.
    pub fn get(&self, id: &str) -> Option<&[Location]> {
        self.instances.get(id).map(Vec::as_slice)
    }

    /// Distinct files of an instance's locations, in order.
    pub fn files(&self, id: &str) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for l in self.get(id).unwrap_or_default() {
            if !out.contains(&l.file) {
                out.push(l.file.clone());
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    #[test]
    fn parses_both_forms() {
        let a = Location::parse("pkg/a.py::A.m");
        let b = Location::parse("pkg/a.py:A.m");
        assert_eq!(a, b);
        assert_eq!(a.key(), "pkg/a.py::A.m");
        assert_eq!(Location::parse("pkg/a.py").name, None);
        assert_eq!(Location::parse("pkg/a.py").key(), "pkg/a.py");
    }

    fn shared(name: &str) -> PathBuf {
        let p = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../../shared/data/swebench")
            .join(name);
        assert!(
            p.exists(),
            "test data {} is missing: this test expects the `shared` directory beside the repository clone (../shared/data/swebench)",
            p.display()
        );
        p
    }

    #[test]
    fn loads_gt_verified() {
        let gt = GroundTruth::load(&shared("gt_verified_repodeepsearch.json")).unwrap();
        assert_eq!(gt.instances.len(), 500);
        let n: usize = gt.instances.values().map(Vec::len).sum();
        assert_eq!(n, 964);
        let file_only = gt
            .instances
            .values()
            .flatten()
            .filter(|l| l.name.is_none())
            .count();
        assert_eq!(file_only, 15);
        assert_eq!(
            gt.get("astropy__astropy-12907").unwrap(),
            [Location::parse("astropy/modeling/separable.py::_cstack")]
        );
    }

    #[test]
    fn loads_locbench() {
        let gt = GroundTruth::load(&shared("locbench_v1_edit_functions.json")).unwrap();
        assert_eq!(gt.instances.len(), 560);
        assert!(gt.instances.values().all(|v| !v.is_empty()));
        let all: Vec<&Location> = gt.instances.values().flatten().collect();
        assert!(all
            .iter()
            .all(|l| l.file.ends_with(".py") && l.name.is_some()));
        assert_eq!(all.len(), 1149);
    }
}

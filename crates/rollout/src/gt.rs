//! Ground-truth locations: the RepoDeepSearch `gt_verified.json` (`file.py::Class.method`
//! or `file.py`) and Loc-Bench's `edit_functions.json` (`file.py:Class.method`), loaded
//! into one type; and ground truth derived from a gold patch at the base commit
//! ([`locations_from_patch`]).
//!
//! Derivation rules (`docs/reposearcher.md` §1), where the benchmark leaves room:
//! - Only files whose path ends in `.py` count; the location's file is the path at the
//!   base commit (the new path for a file the patch creates).
//! - A changed line is a removed line (old numbering) or the insertion point of a run of
//!   added lines with nothing removed beside it (see [`crate::patch`]).
//! - A removed line belongs to the innermost definition whose span holds it; a span runs
//!   from the first decorator line (lines starting with `@` right above the `def`/`class`
//!   line) to the definition's last line.
//! - An insertion after old line `k` belongs to the innermost definition `D` that holds
//!   it: lines `k` and `k + 1` both inside `D` after its `def` line, or the last non-blank
//!   old line at or before `k` inside `D` and the first non-blank added line indented
//!   deeper than `D`'s `def` line (code appended to the end of a body). Added decorator
//!   lines right above a definition belong to it. Insertions of blank lines only are
//!   ignored for naming.
//! - Definitions are module functions (`func`), classes (`Class`, nested
//!   `Outer.Inner`) and their direct methods (`Class.method`); a class defined inside a
//!   function is not one (its lines belong to the function), nor is a nested function.
//! - A file with changes but none inside a definition (imports, module constants, a new
//!   file) gives the file alone; a file with at least one named location does not also
//!   list the file alone (the shipped `gt_verified` never mixes the two for one file).
//! - Order: files in patch order, locations by line, duplicates dropped.

use crate::index::{FileIndex, RepoIndex};
use crate::patch::{parse_patch, FilePatch, PatchError};
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

/// A definition as a ground-truth target: its location name and line spans.
struct Span {
    name: String,
    /// First decorator line, else the `def`/`class` line (1-based).
    start: usize,
    def_line: usize,
    end: usize,
    indent: usize,
}

fn indent_of(line: &str) -> usize {
    line.len() - line.trim_start_matches([' ', '\t']).len()
}

fn spans(file: &FileIndex, lines: &[&str]) -> Vec<Span> {
    let line = |n: usize| lines.get(n.wrapping_sub(1)).copied().unwrap_or("");
    let mk = |name: String, def_line: usize, end: usize| {
        let mut start = def_line;
        while start > 1 && line(start - 1).trim_start().starts_with('@') {
            start -= 1;
        }
        Span {
            name,
            start,
            def_line,
            end,
            indent: indent_of(line(def_line)),
        }
    };
    let mut out = Vec::new();
    for f in &file.functions {
        out.push(mk(f.name.clone(), f.start_line, f.end_line));
    }
    for c in &file.classes {
        // `Outer.Inner` counts only when every prefix is itself a class of the file.
        let mut parts: Vec<&str> = c.name.split('.').collect();
        parts.pop();
        let in_function =
            (1..=parts.len()).any(|n| !file.classes.iter().any(|k| k.name == parts[..n].join(".")));
        if in_function {
            continue;
        }
        out.push(mk(c.name.clone(), c.start_line, c.end_line));
        for m in &c.methods {
            out.push(mk(
                format!("{}.{}", c.name, m.name),
                m.start_line,
                m.end_line,
            ));
        }
    }
    out
}

/// The innermost span satisfying `holds` (latest `def` line, then shortest).
fn innermost(spans: &[Span], holds: impl Fn(&Span) -> bool) -> Option<&Span> {
    spans
        .iter()
        .filter(|s| holds(s))
        .max_by_key(|s| (s.def_line, std::cmp::Reverse(s.end)))
}

/// Locations of one file's changes against its index at the base commit (`None` when
/// the file does not exist there): see the module documentation for the rules.
pub fn locations_in_file(fp: &FilePatch, base: Option<&FileIndex>) -> Vec<Location> {
    let file = fp.path().to_string();
    let file_only = || {
        vec![Location {
            file: file.clone(),
            name: None,
        }]
    };
    let Some(base) = base else {
        return file_only();
    };
    let lines: Vec<&str> = base.text.split('\n').collect();
    let line = |n: usize| lines.get(n.wrapping_sub(1)).copied().unwrap_or("");
    let spans = spans(base, &lines);
    let mut hits: Vec<(usize, &str)> = Vec::new();
    for &l in &fp.removed {
        if let Some(s) = innermost(&spans, |s| s.start <= l && l <= s.end) {
            hits.push((l, &s.name));
        }
    }
    for ins in &fp.insertions {
        let Some(first) = ins.lines.iter().find(|l| !l.trim().is_empty()) else {
            continue;
        };
        let k = ins.after_old_line;
        let added_indent = indent_of(first);
        let mut prev = k;
        while prev > 0 && line(prev).trim().is_empty() {
            prev -= 1;
        }
        let mut next = k + 1;
        while next <= lines.len() && line(next).trim().is_empty() {
            next += 1;
        }
        let decorators_only = ins
            .lines
            .iter()
            .filter(|l| !l.trim().is_empty())
            .all(|l| l.trim_start().starts_with('@'));
        let hit = innermost(&spans, |s| {
            (s.def_line <= k && k < s.end)
                || (prev > 0 && s.start <= prev && prev <= s.end && added_indent > s.indent)
                || (decorators_only && next == s.start && added_indent == s.indent)
        });
        if let Some(s) = hit {
            hits.push((k, &s.name));
        }
    }
    if hits.is_empty() {
        return file_only();
    }
    hits.sort_by_key(|h| h.0);
    let mut out: Vec<Location> = Vec::new();
    for (_, name) in hits {
        let loc = Location {
            file: file.clone(),
            name: Some(name.to_string()),
        };
        if !out.contains(&loc) {
            out.push(loc);
        }
    }
    out
}

/// Ground-truth locations of a gold patch against the index of the base commit: the
/// innermost enclosing method / function / class of every changed line of every `.py`
/// file, or the file alone when no definition encloses its changes.
pub fn locations_from_patch(patch: &str, base: &RepoIndex) -> Result<Vec<Location>, PatchError> {
    let mut out: Vec<Location> = Vec::new();
    for fp in parse_patch(patch)? {
        if !fp.path().ends_with(".py") {
            continue;
        }
        let file = fp.old_path.as_deref().and_then(|p| base.file(p));
        for loc in locations_in_file(&fp, file) {
            if !out.contains(&loc) {
                out.push(loc);
            }
        }
    }
    Ok(out)
}

/// The `.py` files a patch changes (paths at the base commit), in patch order.
pub fn patch_py_files(patch: &str) -> Result<Vec<String>, PatchError> {
    let mut out: Vec<String> = Vec::new();
    for fp in parse_patch(patch)? {
        let p = fp.path().to_string();
        if p.ends_with(".py") && !out.contains(&p) {
            out.push(p);
        }
    }
    Ok(out)
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

    fn swebench(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../data/swebench")
            .join(name)
    }

    #[test]
    fn loads_gt_verified() {
        let gt = GroundTruth::load(&swebench("gt_verified_repodeepsearch.json")).unwrap();
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
        let gt = GroundTruth::load(&swebench("locbench_v1_edit_functions.json")).unwrap();
        assert_eq!(gt.instances.len(), 560);
        assert!(gt.instances.values().all(|v| !v.is_empty()));
        let all: Vec<&Location> = gt.instances.values().flatten().collect();
        assert!(all
            .iter()
            .all(|l| l.file.ends_with(".py") && l.name.is_some()));
        assert_eq!(all.len(), 1149);
    }

    const BASE: &str = "import os

CONST = 1


class A:
    x = 1

    @property
    def m(self):
        a = 1
        return a

    def n(self):
        def inner():
            return 2
        return inner()


def f(x):
    class Local:
        def lm(self):
            pass
    return x


class B(A):
    class C:
        def cm(self):
            pass
";

    /// A one-file patch of `pkg/m.py` from hunks `(old_start, body lines)`; the header
    /// counts are computed from the bodies.
    fn diff(hunks: &[(usize, &[&str])]) -> String {
        let mut p =
            String::from("diff --git a/pkg/m.py b/pkg/m.py\n--- a/pkg/m.py\n+++ b/pkg/m.py\n");
        for (start, body) in hunks {
            let old = body.iter().filter(|l| !l.starts_with('+')).count();
            let new = body.iter().filter(|l| !l.starts_with('-')).count();
            let start = if old == 0 { start - 1 } else { *start };
            p.push_str(&format!("@@ -{start},{old} +{start},{new} @@\n"));
            for l in *body {
                p.push_str(l);
                p.push('\n');
            }
        }
        p
    }

    fn derive(hunks: &[(usize, &[&str])]) -> Vec<String> {
        let idx = RepoIndex::from_files(vec![FileIndex::parse("pkg/m.py", BASE.as_bytes())]);
        locations_from_patch(&diff(hunks), &idx)
            .unwrap()
            .iter()
            .map(Location::key)
            .collect()
    }

    #[test]
    fn removed_lines_map_to_innermost_definition() {
        let line = |n: usize| BASE.split('\n').nth(n - 1).unwrap();
        let minus = |n: usize| format!("-{}", line(n));
        let ctx = |n: usize| format!(" {}", line(n));
        // Line 12 (`return a`) of A.m.
        let (a, b, c) = (ctx(11), minus(12), "+        return a + 1".to_string());
        assert_eq!(derive(&[(11, &[&a, &b, &c])]), ["pkg/m.py::A.m"]);
        // The decorator of A.m belongs to A.m.
        assert_eq!(derive(&[(9, &[&minus(9)])]), ["pkg/m.py::A.m"]);
        // A nested function's line belongs to the method.
        assert_eq!(derive(&[(16, &[&minus(16)])]), ["pkg/m.py::A.n"]);
        // A class inside a function belongs to the function.
        assert_eq!(derive(&[(23, &[&minus(23)])]), ["pkg/m.py::f"]);
        // Nested class method.
        assert_eq!(derive(&[(30, &[&minus(30)])]), ["pkg/m.py::B.C.cm"]);
        // Module-level change alone: the file.
        assert_eq!(derive(&[(3, &[&minus(3), "+CONST = 2"])]), ["pkg/m.py"]);
        // Module-level change beside a named one: the named one only, in line order.
        assert_eq!(
            derive(&[(3, &[&minus(3)]), (16, &[&minus(16)]), (12, &[&minus(12)])]),
            ["pkg/m.py::A.m", "pkg/m.py::A.n"]
        );
        // The class line and a class attribute belong to the class.
        assert_eq!(derive(&[(6, &[&minus(6), &minus(7)])]), ["pkg/m.py::A"]);
    }

    #[test]
    fn insertions_map_by_position_and_indentation() {
        // Appended at the end of A.m's body (after `return a`, deeper than `def m`).
        assert_eq!(derive(&[(13, &["+        b = 2"])]), ["pkg/m.py::A.m"]);
        // Between two lines of A.m.
        assert_eq!(derive(&[(12, &["+        a += 1"])]), ["pkg/m.py::A.m"]);
        // A new method between two methods: the class.
        assert_eq!(
            derive(&[(14, &["+    def new(self):", "+        pass", "+"])]),
            ["pkg/m.py::A"]
        );
        // A new method after the last one (after a blank line): the class.
        assert_eq!(
            derive(&[(19, &["+    def z(self):", "+        pass"])]),
            ["pkg/m.py::A"]
        );
        // A new module function: the file.
        assert_eq!(
            derive(&[(19, &["+def g():", "+    pass", "+"])]),
            ["pkg/m.py"]
        );
        // A new import: the file.
        assert_eq!(derive(&[(2, &["+import sys"])]), ["pkg/m.py"]);
        // A decorator added right above `def f`: f.
        assert_eq!(derive(&[(20, &["+@cache"])]), ["pkg/m.py::f"]);
        // Appended to the nested class's method at the end of the file.
        assert_eq!(
            derive(&[(31, &["+            return 1"])]),
            ["pkg/m.py::B.C.cm"]
        );
        // Blank lines only: nothing named, so the file.
        assert_eq!(derive(&[(8, &["+"])]), ["pkg/m.py"]);
    }

    #[test]
    fn new_and_non_python_files() {
        let p = "diff --git a/docs/x.rst b/docs/x.rst\n--- a/docs/x.rst\n+++ b/docs/x.rst\n@@ -1 +1 @@\n-a\n+b\ndiff --git a/pkg/new.py b/pkg/new.py\nnew file mode 100644\n--- /dev/null\n+++ b/pkg/new.py\n@@ -0,0 +1,2 @@\n+def f():\n+    pass\n";
        let locs = locations_from_patch(p, &RepoIndex::default()).unwrap();
        assert_eq!(locs, [Location::parse("pkg/new.py")]);
        assert_eq!(patch_py_files(p).unwrap(), ["pkg/new.py"]);
    }

    #[derive(Deserialize)]
    struct Row {
        instance_id: String,
        patch: String,
    }

    /// Every Verified gold patch parses, and the shipped GT's files are a subset of the
    /// patch's `.py` files (PROVENANCE: 500/500). Repositories are not available offline,
    /// so the name-level agreement is measured where trees exist (`tooltrain eval`).
    #[test]
    fn verified_patches_parse_and_cover_gt_files() {
        let gt = GroundTruth::load(&swebench("gt_verified_repodeepsearch.json")).unwrap();
        let text = std::fs::read_to_string(swebench("swebench_verified.jsonl")).unwrap();
        let (mut n, mut equal) = (0, 0);
        for (i, line) in text.lines().enumerate() {
            let row: Row = serde_json::from_str(line).unwrap();
            let files = patch_py_files(&row.patch)
                .unwrap_or_else(|e| panic!("line {}: {}: {e}", i + 1, row.instance_id));
            let fps = parse_patch(&row.patch).unwrap();
            assert!(
                fps.iter().all(|f| !f.removed.is_empty()
                    || !f.insertions.is_empty()
                    || f.old_path != f.new_path),
                "{}: a file without changes",
                row.instance_id
            );
            // Against an empty index every changed .py file gives a file-only location.
            let locs = locations_from_patch(&row.patch, &RepoIndex::default()).unwrap();
            assert_eq!(
                locs.iter().map(|l| l.file.clone()).collect::<Vec<_>>(),
                files
            );
            let gt_files = gt.files(&row.instance_id);
            assert!(
                gt_files.iter().all(|f| files.contains(f)),
                "{}: GT files {gt_files:?} not all in patch files {files:?}",
                row.instance_id
            );
            n += 1;
            if !gt_files.is_empty() {
                let mut a = gt_files.clone();
                let mut b = files.clone();
                a.sort();
                b.sort();
                equal += usize::from(a == b);
            }
        }
        assert_eq!(n, 500);
        eprintln!("GT file set equals the patch's .py files on {equal}/500 instances");
    }
}

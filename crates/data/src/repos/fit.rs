//! How well a source tree matches a gold patch: the patch's hunks with their context
//! ([`patch_hunks`], read by [`tooltrain_rollout::patch`]) and the pre-/post-image fit of
//! a tree ([`patch_fit`]).
//!
//! A hunk's *old side* is its context and removed lines, its *new side* its context and
//! added lines. The old side *fits* a file when it occurs there verbatim as consecutive
//! lines (line ends `\r\n` and `\n` compare equal); it fits *at its line* when it starts
//! exactly at the hunk header's old start line (so the gold patch's line numbers, which
//! ground-truth derivation relies on, are right for this tree). The new side is checked
//! the same way in the file at the new path. Only files that the patch modifies (they
//! exist before and after) are scored; files it creates or deletes are not.

use serde::{Deserialize, Serialize};
use tooltrain_rollout::patch::{self, parse_patch, FilePatch};

/// One hunk: where it starts and its two sides.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hunk {
    /// Old-file start line (1-based; with an empty old side, the line after which the
    /// new lines go).
    pub old_start: usize,
    pub new_start: usize,
    /// Context and removed lines, without their tag.
    pub old: Vec<String>,
    /// Context and added lines, without their tag.
    pub new: Vec<String>,
    /// The hunk's body lines as in the patch (with their ` `/`-`/`+`/`\` tag).
    pub body: Vec<String>,
}

/// The hunks of one file of a patch.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FileHunks {
    /// Path before the change (`None` for a created file).
    pub old_path: Option<String>,
    /// Path after the change (`None` for a deleted file).
    pub new_path: Option<String>,
    pub hunks: Vec<Hunk>,
}

/// The per-file hunks of a unified diff, with their context: [`parse_patch`] read it.
/// Errors name the 1-based line of the patch.
pub fn patch_hunks(patch: &str) -> Result<Vec<FileHunks>, String> {
    let files = parse_patch(patch).map_err(|e| e.to_string())?;
    Ok(files.iter().map(FileHunks::from).collect())
}

impl From<&FilePatch> for FileHunks {
    fn from(f: &FilePatch) -> Self {
        FileHunks {
            old_path: f.old_path.clone(),
            new_path: f.new_path.clone(),
            hunks: f.hunks.iter().map(Hunk::from).collect(),
        }
    }
}

impl From<&patch::Hunk> for Hunk {
    fn from(h: &patch::Hunk) -> Self {
        Hunk {
            old_start: h.old_start,
            new_start: h.new_start,
            old: h.old_side().map(str::to_string).collect(),
            new: h.new_side().map(str::to_string).collect(),
            body: h.lines.iter().map(|(tag, l)| format!("{tag}{l}")).collect(),
        }
    }
}

/// Fit of a tree to a patch: hunk counts over the files the patch modifies.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fit {
    /// Hunks scored (those of files the patch modifies).
    pub hunks: usize,
    /// Hunks whose old side occurs in the tree's file.
    pub pre: usize,
    /// Hunks whose old side occurs at the header's line.
    pub pre_at_line: usize,
    /// Hunks whose new side occurs in the tree's file (the fix is already there).
    pub post: usize,
    /// Files the patch modifies.
    pub files: usize,
    /// Of those, files present in the tree (at the old path).
    pub files_present: usize,
    /// Non-blank old-side lines of the hunks, and how many of them occur somewhere in
    /// their file: a graded similarity that guides the search where no hunk fits.
    #[serde(default)]
    pub old_lines: usize,
    #[serde(default)]
    pub old_lines_found: usize,
}

impl Fit {
    /// Every hunk's old side occurs in the tree (the gold patch applies, maybe with
    /// offsets), and there is at least one hunk.
    pub fn pre_perfect(&self) -> bool {
        self.hunks > 0 && self.pre == self.hunks
    }

    /// [`Self::pre_perfect`] and every hunk at its stated line: the patch applies
    /// without offsets, so line-based ground truth derivation is exact on this tree.
    pub fn exact(&self) -> bool {
        self.pre_perfect() && self.pre_at_line == self.hunks
    }

    /// The fix looks present: more hunks fit as new side than as old side.
    pub fn fixed(&self) -> bool {
        self.post > self.pre
    }

    /// The fix looks absent: more hunks fit as old side than as new side.
    pub fn before(&self) -> bool {
        self.pre > self.post
    }

    /// `pre 3/3 (at line 3) post 0/3, files 2/2`.
    pub fn summary(&self) -> String {
        format!(
            "pre {}/{} (at line {}) post {}/{}, files {}/{}",
            self.pre,
            self.hunks,
            self.pre_at_line,
            self.post,
            self.hunks,
            self.files_present,
            self.files
        )
    }
}

fn split_lines(text: &[u8]) -> Vec<String> {
    let text = String::from_utf8_lossy(text);
    let mut v: Vec<String> = text
        .split('\n')
        .map(|l| l.strip_suffix('\r').unwrap_or(l).to_string())
        .collect();
    if v.last().is_some_and(String::is_empty) {
        v.pop();
    }
    v
}

/// 0-based positions where `block` occurs as consecutive lines of `lines`.
fn occurs(lines: &[String], block: &[String]) -> Vec<usize> {
    if block.is_empty() {
        return (0..=lines.len()).collect();
    }
    if block.len() > lines.len() {
        return vec![];
    }
    (0..=lines.len() - block.len())
        .filter(|&s| lines[s..s + block.len()] == *block)
        .collect()
}

/// The 0-based line where a side stated to start at `start` (1-based header number)
/// begins: for an empty side, the header names the line after which text goes.
fn stated_pos(start: usize, side: &[String]) -> usize {
    if side.is_empty() {
        start
    } else {
        start.saturating_sub(1)
    }
}

/// Score a tree against parsed hunks; `file(path)` returns a file's bytes, `None` when
/// the tree lacks it.
pub fn patch_fit<'a>(files: &[FileHunks], file: impl Fn(&str) -> Option<&'a [u8]>) -> Fit {
    let mut fit = Fit::default();
    for f in files {
        let (Some(old), Some(new)) = (&f.old_path, &f.new_path) else {
            continue;
        };
        if f.hunks.is_empty() {
            continue;
        }
        fit.files += 1;
        fit.hunks += f.hunks.len();
        let old_lines = file(old).map(split_lines);
        if old_lines.is_some() {
            fit.files_present += 1;
        }
        let new_lines = if new == old {
            old_lines.clone()
        } else {
            file(new).map(split_lines)
        };
        let line_set: std::collections::HashSet<&str> =
            old_lines.iter().flatten().map(String::as_str).collect();
        for h in &f.hunks {
            for l in h.old.iter().filter(|l| !l.trim().is_empty()) {
                fit.old_lines += 1;
                fit.old_lines_found += usize::from(line_set.contains(l.as_str()));
            }
            if let Some(lines) = &old_lines {
                let at = occurs(lines, &h.old);
                if !at.is_empty() {
                    fit.pre += 1;
                    if at.contains(&stated_pos(h.old_start, &h.old)) {
                        fit.pre_at_line += 1;
                    }
                }
            }
            if let Some(lines) = &new_lines {
                if !occurs(lines, &h.new).is_empty() {
                    fit.post += 1;
                }
            }
        }
    }
    fit
}

/// Paths of the files whose hunks are scored, at the old side (what the tree must hold).
pub fn scored_paths(files: &[FileHunks]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for f in files {
        if let (Some(o), Some(n)) = (&f.old_path, &f.new_path) {
            if !f.hunks.is_empty() {
                for p in [o, n] {
                    if !out.contains(p) {
                        out.push(p.clone());
                    }
                }
            }
        }
    }
    out
}

/// What [`relocate_patch`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Relocation {
    /// Hunks of modified files.
    pub hunks: usize,
    /// Hunks whose old side was found at another line than the header's.
    pub moved: usize,
    /// Hunks whose old side was not found (left as they were).
    pub unplaced: usize,
}

/// The patch with each hunk's header moved to where its old side occurs in the tree
/// (`file(path)` gives a file's bytes): the occurrence nearest to the header's line
/// shifted by the previous hunk's offset, as `patch` does. The line numbers then fit
/// the tree, so ground truth derived from them names the tree's definitions. Hunks that
/// do not occur, and files the tree lacks, keep their numbers.
pub fn relocate_patch(
    files: &[FileHunks],
    file: impl Fn(&str) -> Option<Vec<u8>>,
) -> (String, Relocation) {
    let mut rel = Relocation::default();
    let mut out = String::new();
    for f in files {
        let old = f.old_path.as_deref();
        let new = f.new_path.as_deref();
        out.push_str(&format!(
            "diff --git a/{} b/{}\n",
            old.or(new).unwrap_or(""),
            new.or(old).unwrap_or("")
        ));
        if f.hunks.is_empty() {
            continue;
        }
        out.push_str(&match old {
            Some(p) => format!("--- a/{p}\n"),
            None => "--- /dev/null\n".into(),
        });
        out.push_str(&match new {
            Some(p) => format!("+++ b/{p}\n"),
            None => "+++ /dev/null\n".into(),
        });
        let lines = match (old, new) {
            (Some(o), Some(_)) => file(o).map(|b| split_lines(&b)),
            _ => None,
        };
        let mut offset: i64 = 0;
        for h in &f.hunks {
            let (mut old_start, mut new_start) = (h.old_start, h.new_start);
            if let Some(lines) = &lines {
                rel.hunks += 1;
                let stated = stated_pos(h.old_start, &h.old) as i64;
                if h.old.is_empty() {
                    old_start = (h.old_start as i64 + offset).max(0) as usize;
                } else {
                    let at = occurs(lines, &h.old);
                    let expected = stated + offset;
                    match at.iter().min_by_key(|&&p| ((p as i64) - expected).abs()) {
                        Some(&p) => {
                            offset = p as i64 - stated;
                            old_start = p + 1;
                            if offset != 0 {
                                rel.moved += 1;
                            }
                        }
                        None => rel.unplaced += 1,
                    }
                }
                new_start = (h.new_start as i64 + offset).max(0) as usize;
            }
            out.push_str(&format!(
                "@@ -{old_start},{} +{new_start},{} @@\n",
                h.old.len(),
                h.new.len()
            ));
            for l in &h.body {
                out.push_str(l);
                out.push('\n');
            }
        }
    }
    (out, rel)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    const OLD: &str = "import os\n\ndef f(x):\n    a = 1\n    return a\n\n\ndef g():\n    pass\n";
    const PATCH: &str = "diff --git a/m.py b/m.py\nindex 1..2 100644\n--- a/m.py\n+++ b/m.py\n@@ -3,3 +3,3 @@ import os\n def f(x):\n-    a = 1\n+    a = 2\n     return a\n@@ -8,2 +8,3 @@ def f(x):\n def g():\n+    print()\n     pass\ndiff --git a/new.py b/new.py\nnew file mode 100644\n--- /dev/null\n+++ b/new.py\n@@ -0,0 +1 @@\n+x = 1\n";

    fn fit_of(files: &HashMap<&str, String>) -> Fit {
        let hunks = patch_hunks(PATCH).unwrap();
        patch_fit(&hunks, |p| files.get(p).map(|s| s.as_bytes()))
    }

    #[test]
    fn parses_hunks_with_context() {
        let h = patch_hunks(PATCH).unwrap();
        assert_eq!(h.len(), 2);
        assert_eq!(h[0].old_path.as_deref(), Some("m.py"));
        assert_eq!(h[0].hunks.len(), 2);
        assert_eq!(
            h[0].hunks[0].old,
            ["def f(x):", "    a = 1", "    return a"]
        );
        assert_eq!(
            h[0].hunks[0].new,
            ["def f(x):", "    a = 2", "    return a"]
        );
        assert_eq!(h[0].hunks[1].new, ["def g():", "    print()", "    pass"]);
        assert_eq!(h[1].old_path, None);
        assert_eq!(scored_paths(&h), ["m.py"]);
        assert!(patch_hunks("--- a/x\n+++ b/x\n@@ -1,3 +1,3 @@\n a\n").is_err());
        let e = patch_hunks("--- a/x\n+++ b/x\n@@ -1,3 +1,3 @@\n a\nX\n").unwrap_err();
        assert!(e.starts_with("patch line 5: hunk ends early"), "{e}");
        // The `\r\n` of a CRLF patch is no part of the lines.
        assert_eq!(patch_hunks(&PATCH.replace('\n', "\r\n")).unwrap(), h);
        // The body keeps `\` lines and gives an empty context line back its space.
        let nl = "--- a/x\n+++ b/x\n@@ -1,3 +1,3 @@\n a\n\n-b\n\\ No newline at end of file\n+c\n";
        let b = &patch_hunks(nl).unwrap()[0].hunks[0];
        assert_eq!(
            b.body,
            [" a", " ", "-b", "\\ No newline at end of file", "+c"]
        );
        assert_eq!(b.old, ["a", "", "b"]);
        assert_eq!(b.new, ["a", "", "c"]);
    }

    #[test]
    fn relocates_hunks_to_the_tree() {
        let hunks = patch_hunks(PATCH).unwrap();
        // Two lines more at the top: both hunks move down by 2.
        let shifted = format!("# a\n# b\n{OLD}");
        let (p, r) = relocate_patch(&hunks, |f| {
            (f == "m.py").then(|| shifted.clone().into_bytes())
        });
        assert_eq!(
            r,
            Relocation {
                hunks: 2,
                moved: 2,
                unplaced: 0
            }
        );
        let again = patch_hunks(&p).unwrap();
        assert_eq!(again[0].hunks[0].old_start, 5);
        assert_eq!(again[0].hunks[1].old_start, 10);
        assert_eq!(again[0].hunks[0].body, hunks[0].hunks[0].body);
        assert_eq!(again[1].old_path, None);
        let fit = patch_fit(&again, |f| (f == "m.py").then_some(shifted.as_bytes()));
        assert!(fit.exact(), "{fit:?}");
        // The same tree as the patch: nothing moves, and the patch parses the same.
        let (p, r) = relocate_patch(&hunks, |f| (f == "m.py").then(|| OLD.as_bytes().to_vec()));
        assert_eq!((r.moved, r.unplaced), (0, 0));
        assert_eq!(
            tooltrain_rollout::patch::parse_patch(&p).unwrap(),
            tooltrain_rollout::patch::parse_patch(PATCH).unwrap()
        );
    }

    #[test]
    fn scores_pre_and_post_images() {
        // The base file itself: both hunks fit at their lines; the fix is absent.
        let mut files = HashMap::from([("m.py", OLD.to_string())]);
        let f = fit_of(&files);
        assert_eq!(
            f,
            Fit {
                hunks: 2,
                pre: 2,
                pre_at_line: 2,
                post: 0,
                files: 1,
                files_present: 1,
                old_lines: 5,
                old_lines_found: 5,
            }
        );
        assert!(f.exact() && !f.fixed());
        // Two lines more at the top: still applies, but not at the stated lines.
        files.insert("m.py", format!("# a\n# b\n{OLD}"));
        let f = fit_of(&files);
        assert!(f.pre_perfect() && !f.exact());
        assert_eq!((f.pre, f.pre_at_line), (2, 0));
        // CRLF line ends compare equal.
        files.insert("m.py", OLD.replace('\n', "\r\n"));
        assert!(fit_of(&files).exact());
        // The fixed file: the new sides fit, not the old ones.
        let fixed = OLD
            .replace("a = 1", "a = 2")
            .replace("def g():\n", "def g():\n    print()\n");
        files.insert("m.py", fixed);
        let f = fit_of(&files);
        assert_eq!((f.pre, f.post), (0, 2));
        assert!(f.fixed());
        // Half-drifted file: one hunk's context changed.
        files.insert("m.py", OLD.replace("def g():", "def g(y):"));
        let f = fit_of(&files);
        assert_eq!((f.pre, f.post), (1, 0));
        assert!(!f.pre_perfect());
        assert_eq!((f.old_lines, f.old_lines_found), (5, 4));
        // Missing file.
        let f = fit_of(&HashMap::new());
        assert_eq!((f.files, f.files_present, f.pre, f.hunks), (1, 0, 0, 2));
    }
}

//! Unified-diff parser for gold patches (`git diff` output, as in SWE-bench's `patch`
//! field): per file, the removed lines (old-file numbering) and the insertion points of
//! pure additions. Used to derive ground truth ([`crate::gt::locations_from_patch`]).
//! Each file also keeps its hunks as they stand ([`Hunk`]: start lines and tagged body
//! lines), for callers that need the hunks' old and new sides.
//!
//! A maximal run of `-`/`+` lines inside a hunk is one *change block*. A block with at
//! least one `-` line contributes its removed line numbers (what it replaces is where
//! the change is); a block of `+` lines only contributes an [`Insertion`] after the old
//! line that precedes it. Hunk bodies are consumed by the counts of the `@@` header, so
//! a removed line that starts with `--` is never mistaken for a file header.

/// A run of added lines with no removed line beside it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Insertion {
    /// The old-file line (1-based) after which the lines are inserted; 0 = file start.
    pub after_old_line: usize,
    /// The added lines, without their `+`.
    pub lines: Vec<String>,
}

/// The changes to one file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FilePatch {
    /// Path before the change (`None` for a new file), without the `a/` prefix.
    pub old_path: Option<String>,
    /// Path after the change (`None` for a deleted file), without the `b/` prefix.
    pub new_path: Option<String>,
    /// Removed lines, 1-based old-file numbering, in order.
    pub removed: Vec<usize>,
    /// Pure insertions, in order.
    pub insertions: Vec<Insertion>,
    /// The hunks as they stand in the patch, in order.
    pub hunks: Vec<Hunk>,
}

/// One hunk as it stands in the patch.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Hunk {
    /// The header's old start line (with an empty old side, the line after which the new
    /// lines go).
    pub old_start: usize,
    /// The header's new start line.
    pub new_start: usize,
    /// The body lines in order: the tag (`' '`, `'-'`, `'+'` or `'\\'`) and the text after
    /// it (no line end). A context line whose single space was stripped is `(' ', "")`.
    pub lines: Vec<(char, String)>,
}

impl Hunk {
    /// The old side: context and removed lines, in order.
    pub fn old_side(&self) -> impl Iterator<Item = &str> {
        self.side('-')
    }

    /// The new side: context and added lines, in order.
    pub fn new_side(&self) -> impl Iterator<Item = &str> {
        self.side('+')
    }

    fn side(&self, tag: char) -> impl Iterator<Item = &str> {
        self.lines
            .iter()
            .filter(move |(t, _)| *t == ' ' || *t == tag)
            .map(|(_, l)| l.as_str())
    }
}

impl FilePatch {
    /// The path at the base commit when the file existed, else the new path.
    pub fn path(&self) -> &str {
        self.old_path
            .as_deref()
            .or(self.new_path.as_deref())
            .unwrap_or("")
    }
}

/// A malformed patch: the 1-based line of the patch text and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("patch line {line}: {msg}")]
pub struct PatchError {
    pub line: usize,
    pub msg: String,
}

/// A `---`/`+++` header path without quotes, tab suffix and `a/`/`b/` prefix;
/// `None` for `/dev/null`.
pub fn strip_prefix_path(p: &str) -> Option<String> {
    let p = p.split('\t').next().unwrap_or(p).trim_end();
    let p = p
        .strip_prefix('"')
        .and_then(|q| q.strip_suffix('"'))
        .unwrap_or(p);
    if p == "/dev/null" {
        return None;
    }
    let p = p
        .strip_prefix("a/")
        .or_else(|| p.strip_prefix("b/"))
        .unwrap_or(p);
    Some(p.to_string())
}

/// A hunk range `start[,count]` (count 1 when left out).
pub fn parse_range(s: &str) -> Option<(usize, usize)> {
    let (a, b) = match s.split_once(',') {
        Some((a, b)) => (a, Some(b)),
        None => (s, None),
    };
    let start = a.parse().ok()?;
    let count = match b {
        Some(b) => b.parse().ok()?,
        None => 1,
    };
    Some((start, count))
}

/// `@@ -a,b +c,d @@ ...` -> ((a, b), (c, d)).
fn parse_hunk_header(line: &str) -> Option<((usize, usize), (usize, usize))> {
    let rest = line.strip_prefix("@@ ")?;
    let end = rest.find(" @@")?;
    let mut parts = rest[..end].split_whitespace();
    let old = parse_range(parts.next()?.strip_prefix('-')?)?;
    let new = parse_range(parts.next()?.strip_prefix('+')?)?;
    Some((old, new))
}

/// Parse a unified diff into per-file changes, in patch order. Text outside hunks
/// (`diff --git`, `index`, mode lines, commit messages) is skipped.
pub fn parse_patch(patch: &str) -> Result<Vec<FilePatch>, PatchError> {
    let lines: Vec<&str> = patch.split('\n').collect();
    let mut files: Vec<FilePatch> = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i].strip_suffix('\r').unwrap_or(lines[i]);
        if let Some(rest) = line.strip_prefix("diff --git ") {
            // Paths from the header, overridden by `---`/`+++` when present.
            let (a, b) = match rest.split_once(" b/") {
                // `b` has lost its `b/` already: put it back, so that a path that itself
                // starts with `a/` or `b/` keeps it.
                Some((a, b)) => (strip_prefix_path(a), strip_prefix_path(&format!("b/{b}"))),
                None => (None, None),
            };
            files.push(FilePatch {
                old_path: a,
                new_path: b,
                ..FilePatch::default()
            });
            i += 1;
            continue;
        }
        if line.starts_with("--- ") && i + 1 < lines.len() && lines[i + 1].starts_with("+++ ") {
            let old = strip_prefix_path(&line[4..]);
            let new_line = lines[i + 1].strip_suffix('\r').unwrap_or(lines[i + 1]);
            let new = strip_prefix_path(&new_line[4..]);
            // A `---`/`+++` pair right after `diff --git` belongs to that file; otherwise
            // it starts a new one (plain `diff -u` output).
            let reuse =
                matches!(files.last(), Some(f) if f.removed.is_empty() && f.insertions.is_empty());
            if !reuse {
                files.push(FilePatch::default());
            }
            let f = files.last_mut().expect("pushed");
            f.old_path = old;
            f.new_path = new;
            i += 2;
            continue;
        }
        if line.starts_with("@@ ") {
            let Some(((old_start, old_count), (new_start, new_count))) = parse_hunk_header(line)
            else {
                return Err(PatchError {
                    line: i + 1,
                    msg: format!("malformed hunk header {line:?}"),
                });
            };
            let Some(f) = files.last_mut() else {
                return Err(PatchError {
                    line: i + 1,
                    msg: "hunk before any file header".into(),
                });
            };
            f.hunks.push(Hunk {
                old_start,
                new_start,
                lines: vec![],
            });
            i += 1;
            // Old line number of the next old line; with count 0 the header names the
            // line *after which* the insertion goes.
            let mut old_no = if old_count == 0 {
                old_start + 1
            } else {
                old_start
            };
            let (mut old_left, mut new_left) = (old_count, new_count);
            let mut block_removed = false;
            let mut block_added: Vec<String> = Vec::new();
            let flush =
                |f: &mut FilePatch, removed: &mut bool, added: &mut Vec<String>, at: usize| {
                    if !*removed && !added.is_empty() {
                        f.insertions.push(Insertion {
                            after_old_line: at - 1,
                            lines: std::mem::take(added),
                        });
                    }
                    added.clear();
                    *removed = false;
                };
            while (old_left > 0 || new_left > 0) && i < lines.len() {
                let l = lines[i].strip_suffix('\r').unwrap_or(lines[i]);
                let (tag, body) = match l.chars().next() {
                    Some(c @ (' ' | '-' | '+' | '\\')) => (c, &l[1..]),
                    // Some tools strip the single space of empty context lines.
                    None => (' ', ""),
                    Some(_) => {
                        return Err(PatchError {
                            line: i + 1,
                            msg: format!(
                                "hunk ends early ({old_left} old / {new_left} new lines missing)"
                            ),
                        })
                    }
                };
                match tag {
                    ' ' => {
                        flush(f, &mut block_removed, &mut block_added, old_no);
                        old_no += 1;
                        old_left = old_left.saturating_sub(1);
                        new_left = new_left.saturating_sub(1);
                    }
                    '-' => {
                        f.removed.push(old_no);
                        block_removed = true;
                        old_no += 1;
                        old_left = old_left.saturating_sub(1);
                    }
                    '+' => {
                        block_added.push(body.to_string());
                        new_left = new_left.saturating_sub(1);
                    }
                    _ => {} // `\ No newline at end of file`
                }
                let hunk = f.hunks.last_mut().expect("pushed");
                hunk.lines.push((tag, body.to_string()));
                i += 1;
            }
            flush(f, &mut block_removed, &mut block_added, old_no);
            if old_left > 0 || new_left > 0 {
                return Err(PatchError {
                    line: i,
                    msg: "patch ends inside a hunk".into(),
                });
            }
            continue;
        }
        i += 1;
    }
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn removed_and_inserted_lines() {
        let p = "diff --git a/pkg/m.py b/pkg/m.py\nindex 1..2 100644\n--- a/pkg/m.py\n+++ b/pkg/m.py\n@@ -3,5 +3,6 @@ def f():\n a\n-b\n+B\n c\n+new\n d\n--x\n+-y\n@@ -20,0 +22,2 @@\n+p\n+q\ndiff --git a/n.py b/n.py\nnew file mode 100644\n--- /dev/null\n+++ b/n.py\n@@ -0,0 +1 @@\n+z\n";
        let fs = parse_patch(p).unwrap();
        assert_eq!(fs.len(), 2);
        assert_eq!(fs[0].path(), "pkg/m.py");
        assert_eq!(fs[0].removed, [4, 7]);
        assert_eq!(
            fs[0].insertions,
            [
                Insertion {
                    after_old_line: 5,
                    lines: vec!["new".into()]
                },
                Insertion {
                    after_old_line: 20,
                    lines: vec!["p".into(), "q".into()]
                }
            ]
        );
        assert_eq!(fs[1].old_path, None);
        assert_eq!(fs[1].path(), "n.py");
        assert_eq!(fs[1].insertions[0].after_old_line, 0);
    }

    #[test]
    fn hunks_keep_their_lines_in_order() {
        let p = "diff --git a/m.py b/m.py\r\n--- a/m.py\r\n+++ b/m.py\r\n@@ -3,4 +3,4 @@ def f():\r\n a\r\n\r\n-b\r\n\\ No newline at end of file\n+B\n c\n@@ -0,0 +9 @@\n+z\n";
        let fs = parse_patch(p).unwrap();
        let h = &fs[0].hunks;
        assert_eq!(h.len(), 2);
        assert_eq!((h[0].old_start, h[0].new_start), (3, 3));
        let tags: String = h[0].lines.iter().map(|(t, _)| *t).collect();
        assert_eq!(tags, "  -\\+ ");
        assert_eq!(
            h[0].lines[3],
            ('\\', " No newline at end of file".to_string())
        );
        assert_eq!(h[0].lines[5], (' ', "c".to_string()));
        assert_eq!(h[0].old_side().collect::<Vec<_>>(), ["a", "", "b", "c"]);
        assert_eq!(h[0].new_side().collect::<Vec<_>>(), ["a", "", "B", "c"]);
        assert_eq!((h[1].old_start, h[1].new_start), (0, 9));
        assert_eq!(h[1].old_side().count(), 0);
        assert_eq!(h[1].new_side().collect::<Vec<_>>(), ["z"]);
        // The changes derived from the same body.
        assert_eq!(fs[0].removed, [5]);
        assert_eq!(fs[0].insertions.len(), 1);
        // A file without hunks keeps the paths of its `diff --git` line, whole.
        let fs = parse_patch("diff --git a/b/x.py b/b/x.py\nold mode 100644\nnew mode 100755\n")
            .unwrap();
        assert_eq!(fs[0].old_path.as_deref(), Some("b/x.py"));
        assert_eq!(fs[0].new_path.as_deref(), Some("b/x.py"));
        assert!(fs[0].hunks.is_empty());
    }

    #[test]
    fn truncated_hunk_is_an_error() {
        let p = "--- a/x.py\n+++ b/x.py\n@@ -1,3 +1,3 @@\n a\n-b\n";
        let e = parse_patch(p).unwrap_err();
        assert!(e.msg.contains("ends inside"), "{e}");
        assert!(parse_patch("@@ -x +1 @@\n").is_err());
    }
}

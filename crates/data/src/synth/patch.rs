//! The gold patch: git object ids, the diff writer ([`unified_diff`]) and the applier
//! ([`apply_patch`]) that the consistency check uses to get the post-fix tree.
//!
//! The applier reads the patch with [`parse_patch`], the one unified-diff parser, with
//! which ground truth is derived too (docs/reposearcher.md §1), and replays each file's
//! [`Hunk`]s on the base text.

use super::{SourceFile, Task};
use sha1::{Digest, Sha1};
use tooltrain_rollout::patch::{parse_patch, FilePatch, Hunk};
use tooltrain_util::hex;

/// SHA-1 of `data` in lower-case hex (git object ids, the synthetic base commit).
pub(super) fn sha1_hex(data: &[u8]) -> String {
    hex(&Sha1::digest(data))
}

/// Git's blob id of `text` (`git hash-object`).
pub(super) fn blob_id(text: &str) -> String {
    let mut data = format!("blob {}\0", text.len()).into_bytes();
    data.extend_from_slice(text.as_bytes());
    sha1_hex(&data)
}

/// A git-style unified diff (3 lines of context) of `old` -> `new`, two texts with the
/// same number of lines that differ by line replacements only.
pub(super) fn unified_diff(path: &str, old: &str, new: &str) -> String {
    let a: Vec<&str> = old.strip_suffix('\n').unwrap_or(old).split('\n').collect();
    let b: Vec<&str> = new.strip_suffix('\n').unwrap_or(new).split('\n').collect();
    assert_eq!(a.len(), b.len(), "line replacements only");
    let changed: Vec<usize> = (0..a.len()).filter(|&i| a[i] != b[i]).collect();
    let mut out = format!(
        "diff --git a/{path} b/{path}\nindex {}..{} 100644\n--- a/{path}\n+++ b/{path}\n",
        &blob_id(old)[..7],
        &blob_id(new)[..7]
    );
    // Hunks: ranges [s, e) around runs of changes, merged when their context touches.
    let mut hunks: Vec<(usize, usize)> = Vec::new();
    for &c in &changed {
        let (s, e) = (c.saturating_sub(3), (c + 4).min(a.len()));
        match hunks.last_mut() {
            Some(h) if s <= h.1 => h.1 = e,
            _ => hunks.push((s, e)),
        }
    }
    for (s, e) in hunks {
        // Git's default hunk heading: the last line before the hunk that starts with a
        // letter, `_` or `$`.
        let heading = a[..s]
            .iter()
            .rev()
            .find(|l| l.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_' || c == '$'))
            .map(|l| format!(" {}", l.trim_end()))
            .unwrap_or_default();
        out.push_str(&format!(
            "@@ -{},{} +{},{} @@{heading}\n",
            s + 1,
            e - s,
            s + 1,
            e - s
        ));
        let mut i = s;
        while i < e {
            if a[i] == b[i] {
                out.push_str(&format!(" {}\n", a[i]));
                i += 1;
            } else {
                let mut j = i;
                while j < e && a[j] != b[j] {
                    j += 1;
                }
                for l in &a[i..j] {
                    out.push_str(&format!("-{l}\n"));
                }
                for l in &b[i..j] {
                    out.push_str(&format!("+{l}\n"));
                }
                i = j;
            }
        }
    }
    out
}

/// 0-based index of the first old line `h` covers; for a hunk with an empty old side,
/// of the line its new lines go before.
fn first_old_line(h: &Hunk) -> usize {
    if h.old_side().next().is_none() {
        h.old_start
    } else {
        h.old_start.saturating_sub(1)
    }
}

/// `text` with the hunks of `fp` applied, checking that every context and removed line
/// matches the text exactly.
fn apply_file(text: &str, fp: &FilePatch) -> Result<String, String> {
    let had_nl = text.ends_with('\n');
    let old: Vec<&str> = text
        .strip_suffix('\n')
        .unwrap_or(text)
        .split('\n')
        .collect();
    let mut out: Vec<String> = Vec::new();
    let mut pos = 0usize; // 0-based next old line to copy
    for h in &fp.hunks {
        let first = first_old_line(h);
        if first < pos {
            return Err(format!("overlapping hunk at line {}", h.old_start));
        }
        out.extend(old[pos..first.min(old.len())].iter().map(|l| l.to_string()));
        pos = first;
        for (tag, line) in &h.lines {
            match tag {
                ' ' | '-' => {
                    if old.get(pos) != Some(&line.as_str()) {
                        return Err(format!(
                            "line {}: patch expects {line:?}, file has {:?}",
                            pos + 1,
                            old.get(pos)
                        ));
                    }
                    if *tag == ' ' {
                        out.push(line.clone());
                    }
                    pos += 1;
                }
                '+' => out.push(line.clone()),
                _ => {} // `\ No newline at end of file`
            }
        }
    }
    out.extend(old[pos.min(old.len())..].iter().map(|l| l.to_string()));
    let mut s = out.join("\n");
    if had_nl {
        s.push('\n');
    }
    Ok(s)
}

/// `files` with `patch` applied (every hunk's old side must match).
fn apply(files: &[SourceFile], patch: &str) -> Result<Vec<SourceFile>, String> {
    let mut out = files.to_vec();
    for fp in parse_patch(patch).map_err(|e| e.to_string())? {
        let path = fp.path();
        let f = out
            .iter_mut()
            .find(|f| f.path == path)
            .ok_or_else(|| format!("patch names missing file {path}"))?;
        f.text = apply_file(&f.text, &fp).map_err(|e| format!("{path}: {e}"))?;
    }
    Ok(out)
}

/// The files of a task with its gold patch applied (every hunk's old side must match).
pub fn apply_patch(task: &Task) -> Result<Vec<SourceFile>, String> {
    apply(&task.files, &task.instance.patch)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sha1_matches_known_vectors() {
        // FIPS 180-1 test vectors.
        assert_eq!(sha1_hex(b"abc"), "a9993e364706816aba3e25717850c26c9cd0d89d");
        assert_eq!(sha1_hex(b""), "da39a3ee5e6b4b0d3255bfef95601890afd80709");
        // `git hash-object` of "hello\n".
        assert_eq!(
            blob_id("hello\n"),
            "ce013625030ba8dba906f756967f9e9ca394464a"
        );
    }

    fn file(path: &str, text: &str) -> SourceFile {
        SourceFile {
            path: path.into(),
            text: text.into(),
        }
    }

    #[test]
    fn written_diffs_apply_and_parse_alike() {
        // Line 17 starts with `--`: its removal reads `--- a/...`, not a file header.
        let old: String = (1..=20)
            .map(|i| match i {
                17 => "-- a/pkg/m.py\n".to_string(),
                _ => format!("line {i}\n"),
            })
            .collect();
        let new = old
            .replace("line 2\n", "LINE 2\n")
            .replace("line 5\n", "LINE 5\n")
            .replace("-- a/pkg/m.py\n", "fixed\n");
        let patch = unified_diff("pkg/m.py", &old, &new);
        // Changes 4 lines apart share a hunk; the one at line 17 gets its own.
        assert_eq!(patch.matches("\n@@ ").count(), 2, "{patch}");
        let parsed = parse_patch(&patch).unwrap();
        assert_eq!(parsed.len(), 1);
        assert_eq!(parsed[0].path(), "pkg/m.py");
        assert_eq!(parsed[0].removed, [2, 5, 17]);
        let files = [file("pkg/m.py", &old), file("other.py", "x = 1\n")];
        let fixed = apply(&files, &patch).unwrap();
        assert_eq!(fixed[0].text, new);
        assert_eq!(fixed[1], files[1]);
    }

    #[test]
    fn mismatched_or_unknown_files_are_errors() {
        let old = "a\nb\nc\n";
        let patch = unified_diff("m.py", old, "a\nB\nc\n");
        let e = apply(&[file("m.py", "a\nx\nc\n")], &patch).unwrap_err();
        assert!(e.contains("patch expects \"b\""), "{e}");
        let e = apply(&[file("n.py", old)], &patch).unwrap_err();
        assert!(e.contains("missing file m.py"), "{e}");
        let truncated = patch.strip_suffix(" c\n").unwrap();
        assert!(apply(&[file("m.py", old)], truncated).is_err());
    }

    #[test]
    fn pure_insertions_go_after_the_named_line() {
        let files = [file("m.py", "a\nb\n")];
        let after_1 = "--- a/m.py\n+++ b/m.py\n@@ -1,0 +2 @@\n+x\n";
        assert_eq!(apply(&files, after_1).unwrap()[0].text, "a\nx\nb\n");
        let at_start = "--- a/m.py\n+++ b/m.py\n@@ -0,0 +1 @@\n+x\n";
        assert_eq!(apply(&files, at_start).unwrap()[0].text, "x\na\nb\n");
    }
}

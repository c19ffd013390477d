//! Answer parser (`docs/reposearcher.md` §6): locations from the fenced blocks of the final answer.
//!
//! Give [`parse_answer`] the text of the final answer (the assistant text after the last
//! tool observation). Only fenced blocks count: a line whose trimmed text starts with
//! ```` ``` ```` opens or closes a block; an opened block that is never closed runs to the
//! end of the text; text with no fence yields nothing. Inside blocks, a (trimmed) line
//! ending in `.py` sets the current file; a following line starting with `function:`,
//! `class:`, `line:` or `variable:` adds `file::value` (value = the trimmed text after
//! the first `:`). Locations keep first-appearance order without duplicates.

/// Locations and files parsed from an answer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ParsedAnswer {
    /// `file::value` entries, first appearance order, deduplicated.
    pub locations: Vec<String>,
    /// Files named in the blocks (lines ending in `.py`), first appearance order,
    /// deduplicated; this is the file-level stage's answer.
    pub files: Vec<String>,
}

const KEYS: [&str; 4] = ["function:", "class:", "line:", "variable:"];

/// The contents of the fenced blocks of `text`, in order.
pub fn fenced_blocks(text: &str) -> Vec<String> {
    let mut blocks = Vec::new();
    let mut cur: Option<Vec<&str>> = None;
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            match cur.take() {
                Some(lines) => blocks.push(lines.join("\n")),
                None => cur = Some(Vec::new()),
            }
        } else if let Some(lines) = cur.as_mut() {
            lines.push(line);
        }
    }
    if let Some(lines) = cur {
        blocks.push(lines.join("\n"));
    }
    blocks
}

/// Parse the final answer text.
pub fn parse_answer(text: &str) -> ParsedAnswer {
    let mut out = ParsedAnswer::default();
    for block in fenced_blocks(text) {
        let mut file: Option<String> = None;
        for line in block.lines() {
            let line = line.trim();
            if line.ends_with(".py") {
                file = Some(line.to_string());
                push_unique(&mut out.files, line.to_string());
                continue;
            }
            let Some(f) = &file else { continue };
            if KEYS.iter().any(|k| line.starts_with(k)) {
                let value = line.split_once(':').map(|x| x.1).unwrap_or("").trim();
                if !value.is_empty() {
                    push_unique(&mut out.locations, format!("{f}::{value}"));
                }
            }
        }
    }
    out
}

fn push_unique(v: &mut Vec<String>, s: String) {
    if !v.contains(&s) {
        v.push(s);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interleaved_files_duplicates_and_line_entries() {
        let text = "Here are the locations:\n```\na.py\nfunction: A.m\nclass: B\n\nb.py\nfunction: helper\nline: 42\n\na.py\nfunction: A.m\nvariable: X\n```\n";
        let a = parse_answer(text);
        assert_eq!(
            a.locations,
            [
                "a.py::A.m",
                "a.py::B",
                "b.py::helper",
                "b.py::42",
                "a.py::X"
            ]
        );
        assert_eq!(a.files, ["a.py", "b.py"]);
    }

    #[test]
    fn several_blocks_unclosed_fence_and_trailing_spaces() {
        let text = "```python\nx/a.py   \nfunction:   f  \n```\nmore text\n```\ny/b.py\n  class: C\nfunction: g";
        let a = parse_answer(text);
        assert_eq!(a.locations, ["x/a.py::f", "y/b.py::C", "y/b.py::g"]);
    }

    #[test]
    fn no_fence_or_no_file_yields_nothing() {
        assert_eq!(parse_answer("a.py\nfunction: f\n"), ParsedAnswer::default());
        let a = parse_answer("```\nfunction: f\nnotes\n```");
        assert!(a.locations.is_empty() && a.files.is_empty());
        let a = parse_answer("```\na.py\nfunction:\nmethod: m\n```");
        assert!(a.locations.is_empty());
        assert_eq!(a.files, ["a.py"]);
    }
}

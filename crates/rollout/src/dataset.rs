//! Benchmark instances: the SWE-bench / Loc-Bench JSONL format (`instance_id`, `repo`,
//! `base_commit`, `problem_statement`, `patch`; other fields ignored), loaded with the
//! line number of every bad line in the error.

use serde::{Deserialize, Serialize};
use std::path::Path;

/// One localisation task.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Instance {
    pub instance_id: String,
    /// `owner/name` on GitHub.
    #[serde(default)]
    pub repo: String,
    #[serde(default)]
    pub base_commit: String,
    pub problem_statement: String,
    /// The gold patch (unified diff); empty when the dataset has none.
    #[serde(default)]
    pub patch: String,
}

/// Error loading a dataset file.
#[derive(Debug, thiserror::Error)]
pub enum DatasetError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}:{line}: {msg}")]
    Line {
        path: String,
        line: usize,
        msg: String,
    },
}

/// Load a JSONL dataset. Blank lines are skipped; a line that is not a JSON object with
/// `instance_id` and `problem_statement`, or a repeated `instance_id`, is an error naming
/// the file and the 1-based line.
pub fn load_dataset(path: &Path) -> Result<Vec<Instance>, DatasetError> {
    let p = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| DatasetError::Io {
        path: p.clone(),
        source,
    })?;
    parse_dataset(&text, &p)
}

/// [`load_dataset`] on text already read; `origin` names it in errors.
pub fn parse_dataset(text: &str, origin: &str) -> Result<Vec<Instance>, DatasetError> {
    let mut out: Vec<Instance> = Vec::new();
    let mut seen = std::collections::HashMap::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let err = |msg: String| DatasetError::Line {
            path: origin.to_string(),
            line: i + 1,
            msg,
        };
        let inst: Instance = serde_json::from_str(line).map_err(|e| err(e.to_string()))?;
        if inst.instance_id.trim().is_empty() {
            return Err(err("empty instance_id".into()));
        }
        if let Some(prev) = seen.insert(inst.instance_id.clone(), i + 1) {
            return Err(err(format!(
                "duplicate instance_id {:?} (first on line {prev})",
                inst.instance_id
            )));
        }
        out.push(inst);
    }
    Ok(out)
}

/// Write instances as JSONL (atomically: temp file, then rename).
pub fn write_dataset(path: &Path, instances: &[Instance]) -> std::io::Result<()> {
    let mut text = String::new();
    for inst in instances {
        text.push_str(&serde_json::to_string(inst).map_err(std::io::Error::other)?);
        text.push('\n');
    }
    crate::write_atomic(path, text.as_bytes())
}

/// An instance id that is safe as a directory name: it can be joined onto a repos
/// directory without leaving it (no `/`, no leading `.`, no `..`).
pub fn valid_instance_id(id: &str) -> bool {
    !id.is_empty()
        && !id.starts_with('.')
        && id.len() <= 200
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.+".contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instance_ids_that_would_leave_the_directory_are_invalid() {
        assert!(valid_instance_id("psf__requests-2317"));
        assert!(!valid_instance_id("../x") && !valid_instance_id(".hidden"));
        assert!(!valid_instance_id("a/b") && !valid_instance_id(""));
        assert!(!valid_instance_id("/abs") && !valid_instance_id(".."));
    }

    #[test]
    fn reports_bad_line_numbers() {
        let ok = r#"{"instance_id": "a", "repo": "o/r", "base_commit": "c", "problem_statement": "p", "patch": ""}"#;
        let text = format!("{ok}\n\n{{not json\n");
        let e = parse_dataset(&text, "d.jsonl").unwrap_err().to_string();
        assert!(e.starts_with("d.jsonl:3:"), "{e}");
        let text = format!("{ok}\n{ok}\n");
        let e = parse_dataset(&text, "d.jsonl").unwrap_err().to_string();
        assert!(e.contains("d.jsonl:2:") && e.contains("duplicate"), "{e}");
        let e = parse_dataset(r#"{"instance_id": "x"}"#, "d")
            .unwrap_err()
            .to_string();
        assert!(e.contains("problem_statement"), "{e}");
    }

    #[test]
    fn loads_the_real_verified_file() {
        let p = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../data/swebench/swebench_verified.jsonl");
        let d = load_dataset(&p).unwrap();
        assert_eq!(d.len(), 500);
        assert!(d
            .iter()
            .all(|i| i.base_commit.len() == 40 && i.repo.contains('/')));
    }
}

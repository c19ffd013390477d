//! On-disk cache of a [`RepoIndex`] per (repository, commit).
//!
//! One JSON file per caller-given key (e.g. `django/django@4a72da7`), holding a format
//! version, the key, and every file's classes, functions, imports and text. A cache file
//! is used only when it parses, its version equals [`CACHE_VERSION`] and its key equals
//! the requested key; otherwise (missing, corrupt, stale) the index is rebuilt from the
//! tree and the file rewritten. Writes go to a temporary file in the same directory and
//! are renamed into place, so a reader never sees a half-written cache.
//!
//! The key must identify the tree's content: the cache does not look at the files again.

use crate::index::{ClassEntry, FileIndex, FunctionEntry, RepoIndex};
use serde::{Deserialize, Serialize};
use std::borrow::Cow;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Format version of the cache files; bump when the index or its serialisation changes.
pub const CACHE_VERSION: u32 = 1;

/// How [`load_or_build`] obtained the index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CacheOutcome {
    /// Loaded from a valid cache file.
    Hit,
    /// No cache file: built and saved.
    Built,
    /// A cache file existed but was unusable (the reason): rebuilt and saved.
    Rebuilt(String),
}

#[derive(Serialize, Deserialize)]
struct CachedFile<'a> {
    path: Cow<'a, str>,
    classes: Cow<'a, [ClassEntry]>,
    functions: Cow<'a, [FunctionEntry]>,
    imports: Cow<'a, [String]>,
    text: Cow<'a, str>,
}

#[derive(Serialize, Deserialize)]
struct CacheFile<'a> {
    version: u32,
    key: Cow<'a, str>,
    files: Vec<CachedFile<'a>>,
}

/// The cache file of `key` under `cache_dir`: the key with every character outside
/// `[A-Za-z0-9._@-]` replaced by `_`, plus a hash of the exact key (so that distinct keys
/// never share a file), `.index.json`.
pub fn cache_path(cache_dir: &Path, key: &str) -> PathBuf {
    let safe: String = key
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._@-".contains(c) {
                c
            } else {
                '_'
            }
        })
        .take(150)
        .collect();
    let h = tooltrain_util::fnv1a(0, key.bytes());
    cache_dir.join(format!("{safe}-{h:016x}.index.json"))
}

/// Read a cache file; `Err(reason)` when it is unreadable, corrupt or stale.
pub fn load(path: &Path, key: &str) -> Result<RepoIndex, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read: {e}"))?;
    let c: CacheFile = serde_json::from_slice(&bytes).map_err(|e| format!("corrupt: {e}"))?;
    if c.version != CACHE_VERSION {
        return Err(format!("version {} (expected {CACHE_VERSION})", c.version));
    }
    if c.key != key {
        return Err(format!("key {:?} (expected {key:?})", c.key));
    }
    let files = c
        .files
        .into_iter()
        .map(|f| FileIndex {
            path: f.path.into_owned(),
            classes: f.classes.into_owned(),
            functions: f.functions.into_owned(),
            imports: f.imports.into_owned(),
            text: f.text.into_owned(),
        })
        .collect();
    Ok(RepoIndex {
        files,
        skipped: Vec::new(),
    })
}

/// Write `index` as the cache file `path` (temp file in the same directory, then rename).
pub fn save(path: &Path, key: &str, index: &RepoIndex) -> std::io::Result<()> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let c = CacheFile {
        version: CACHE_VERSION,
        key: Cow::Borrowed(key),
        files: index
            .files
            .iter()
            .map(|f| CachedFile {
                path: Cow::Borrowed(&f.path),
                classes: Cow::Borrowed(&f.classes),
                functions: Cow::Borrowed(&f.functions),
                imports: Cow::Borrowed(&f.imports),
                text: Cow::Borrowed(&f.text),
            })
            .collect(),
    };
    let bytes = serde_json::to_vec(&c).map_err(std::io::Error::other)?;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
    let tmp = path.with_file_name(format!(
        ".{}.tmp-{}-{}",
        name.unwrap_or_default(),
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let res = std::fs::write(&tmp, &bytes).and_then(|()| std::fs::rename(&tmp, path));
    if res.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    res
}

/// The index of the tree at `root`, from the cache file of `key` under `cache_dir` when
/// it is valid, else built with [`RepoIndex::build`] and saved. An unusable cache file is
/// never an error (it is rebuilt); failing to write the cache is.
pub fn load_or_build(
    root: &Path,
    cache_dir: &Path,
    key: &str,
) -> std::io::Result<(RepoIndex, CacheOutcome)> {
    let path = cache_path(cache_dir, key);
    let outcome = if path.exists() {
        match load(&path, key) {
            Ok(idx) => return Ok((idx, CacheOutcome::Hit)),
            Err(reason) => CacheOutcome::Rebuilt(reason),
        }
    } else {
        CacheOutcome::Built
    };
    let idx = RepoIndex::build(root);
    save(&path, key, &idx).map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!("cannot write index cache {}: {e}", path.display()),
        )
    })?;
    Ok((idx, outcome))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/repo")
    }

    #[test]
    fn second_load_hits_and_equals_first() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_path_buf();
        let key = "owner/repo@0123abc";
        let (a, o1) = load_or_build(&fixture(), &dir, key).unwrap();
        assert_eq!(o1, CacheOutcome::Built);
        let (b, o2) = load_or_build(&fixture(), &dir, key).unwrap();
        assert_eq!(o2, CacheOutcome::Hit);
        assert_eq!(a, b, "texts and imports round-trip too");
        assert!(b.files.iter().any(|f| !f.imports.is_empty()));
        assert!(b
            .files
            .iter()
            .all(|f| !f.text.is_empty() || f.path.ends_with("__init__.py")));
        // A hit does not read the tree: an empty root still gives the cached index.
        let (c, o3) = load_or_build(&dir.join("no-such-tree"), &dir, key).unwrap();
        assert_eq!((o3, c), (CacheOutcome::Hit, a));
        // No temp files left behind.
        let names: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names.len(), 1, "{names:?}");
    }

    #[test]
    fn corrupt_or_stale_cache_is_rebuilt() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_path_buf();
        let key = "r@c";
        let (a, _) = load_or_build(&fixture(), &dir, key).unwrap();
        let path = cache_path(&dir, key);
        let full = std::fs::read(&path).unwrap();
        std::fs::write(&path, &full[..full.len() / 2]).unwrap();
        let (b, o) = load_or_build(&fixture(), &dir, key).unwrap();
        assert!(
            matches!(o, CacheOutcome::Rebuilt(ref r) if r.starts_with("corrupt")),
            "{o:?}"
        );
        assert_eq!(a, b);
        assert_eq!(std::fs::read(&path).unwrap(), full, "rewritten");
        // Wrong version.
        let s = String::from_utf8(full.clone()).unwrap();
        let stale = s.replacen(
            &format!("\"version\":{CACHE_VERSION}"),
            "\"version\":999",
            1,
        );
        assert_ne!(stale, s);
        std::fs::write(&path, stale).unwrap();
        let (_, o) = load_or_build(&fixture(), &dir, key).unwrap();
        assert!(
            matches!(o, CacheOutcome::Rebuilt(ref r) if r.starts_with("version")),
            "{o:?}"
        );
        let (_, o) = load_or_build(&fixture(), &dir, key).unwrap();
        assert_eq!(o, CacheOutcome::Hit);
    }

    #[test]
    fn distinct_keys_distinct_files() {
        let d = Path::new("/c");
        assert_ne!(cache_path(d, "a/b@c"), cache_path(d, "a_b@c"));
        let p = cache_path(d, "django/django@4a72da7");
        let name = p.file_name().unwrap().to_str().unwrap();
        assert!(name.starts_with("django_django@4a72da7-"), "{name}");
    }
}

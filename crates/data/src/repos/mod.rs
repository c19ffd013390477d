//! Source trees of benchmark instances: `tooltrain repos prepare` materialises each
//! instance's repository at its `base_commit` as `<repos-dir>/<instance_id>/`
//! ([`prepare`]), and [`crate::gtcheck`] compares ground truth derived on those trees with a
//! shipped ground-truth file.
//!
//! # Layout of a repos directory
//! - `<instance_id>/`: the source tree, with repository-relative paths exactly as in the
//!   gold patch (`requests/models.py`, `src/flask/app.py`);
//! - `<instance_id>.source.json`: the marker ([`Marker`]): how the tree was made (the
//!   git URL and commit, or the PyPI release, file, sha256, path mapping and patch fit).
//!   It is written last and atomically, so a tree with a marker is complete;
//! - `prepare-report.json`: the last run's outcome per instance ([`PrepareReport`]);
//! - `pypi-manifest.json`: the releases the PyPI source used ([`PinnedRelease`]), to be
//!   committed and passed back with `--manifest` so a later run skips the search;
//! - `.cache/` (default cache): bare git clones and downloaded archives.
//!
//! Consumers (`gt-check`, evaluation) only need `<instance_id>/`, so a user can point
//! them at trees made some other way. `prepare` itself owns its directory: a tree
//! without a marker is taken as half-made and rebuilt.
//!
//! # Running
//! Instances run in parallel (`jobs` threads). Each is built in
//! `<repos-dir>/.tmp-<id>-<pid>/`; only when complete does it replace what was at
//! `<instance_id>/` (a half-made tree, or the old tree with `force`), then the marker is
//! written. A run that dies leaves at most a temp directory (removed by the next run) or
//! a tree without marker (rebuilt); a failed rebuild leaves the old tree in place.
//! Instances with a marker are skipped (resumable).
//! Before starting each instance the free space of the repos and cache directories is
//! checked; below `min_free_gb` no further instance starts (they are reported as
//! `not_started` with the reason). Every per-instance problem (unknown instance id, a
//! repository that cannot be cloned, a missing commit, no usable release) is recorded
//! as that instance's failure; the run itself goes on. One run at a time per repos
//! directory (a lock file, `.prepare.lock`).
//!
//! # The git source
//! One bare clone per repository under `<cache>/git/` (cloned once, even when many
//! instances share the repository, and reused by later runs); a missing base commit is
//! fetched; the tree is `git archive <commit>`, unpacked. The clone URL comes from a
//! template (`https://github.com/{repo}.git`; `{owner}` and `{name}` work too), so a
//! mirror or a local `file://` repository can stand in for GitHub.
//!
//! # The PyPI source (the offline fallback)
//! Without GitHub, the tree is rebuilt from a release of the project on PyPI, which only
//! approximates the base commit. How:
//! 1. Project: a table maps the SWE-bench repositories to their PyPI projects
//!    (`django/django` -> `Django`, `psf/requests` -> `requests`, ...); any other
//!    repository maps to its name.
//! 2. Releases: from `https://pypi.org/pypi/<project>/json`, every release with a PEP 440
//!    version and a readable file, ordered by version. Per release the file is the `.tar.gz` sdist, else a `.zip` sdist,
//!    else a pure-Python wheel, else any wheel. The sdist is preferred because it holds
//!    the whole tree (tests, `setup.py`); its top directory (`name-version/`) is stripped.
//! 3. Paths: among prefix rewrites derived from archive paths and gold-patch paths that
//!    share a file name, the one under which the most gold-patch files exist is used
//!    (identity on ties). This maps a wheel's `flask/` to `src/flask/` for a repository
//!    with a `src/` layout, and the other way.
//! 4. Which release: instances carry no date, so the gold patch dates the tree. For a
//!    release, each hunk of the files the patch modifies is checked: its old side
//!    (context and removed lines) occurring verbatim in the file is a *pre-image* fit,
//!    at the header's line an *at-line* fit, its new side occurring a *post-image* fit
//!    ([`fit::Fit`]). Releases that hold the fix have more post than pre fits. A binary
//!    search over the ordered releases finds the first one holding the fix (about
//!    log2(#releases) downloads); the newest release before it is the candidate. When
//!    releases where nothing fits (too old, or refactored since) mislead the search, a
//!    coarse scan of about 8 evenly spaced releases and a binary search between the
//!    best of them and the next one find the candidate instead. If its fit is not
//!    exact, its two neighbours each side are scored too, then releases further out, up
//!    to `max_candidates` in all; the best fit wins (exact, then all hunks, then most
//!    hunks, then most at their line, newest on ties). Final releases are searched
//!    first; when none fits exactly, pre-releases join (a base commit between a release
//!    candidate and the final release).
//! 5. Archives are downloaded once, sha256-checked against the index, and cached under
//!    `<cache>/pypi/files/<sha256>/`; the index JSON is cached under
//!    `<cache>/pypi/index/` and used when PyPI cannot be reached.
//! 6. `--manifest` pins releases per instance (`{"id": {"project": "requests",
//!    "version": "2.0.1"}}`, optionally with `filename`, `url`, `sha256`, which skip the
//!    index): no search. Each run writes the releases it used to `pypi-manifest.json`.
//!
//! Limits: the tree is a release, not the base commit. Code that changed between the
//! release and the commit differs, files added in between are missing, an sdist may
//! leave out files the repository has (and a wheel leaves out tests and packaging).
//! The marker's fit says how close the tree is where it matters: `pre == hunks` means the
//! gold patch applies, `pre_at_line == hunks` that it applies without offsets, so
//! line-based ground-truth derivation is exact there ([`fit::Fit::exact`]). A fix
//! released only later than every published release (or never released) gets the
//! newest release. Backports to older release branches can confuse the binary search;
//! the neighbour check and the fit recorded in the marker catch most such cases.

pub mod archive;
pub mod fit;
pub mod git;
pub mod pypi;
pub mod version;

use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};
use tooltrain_rollout::dataset::{valid_instance_id, Instance};
use tooltrain_util::retry::{retry, Attempt, Backoff};

pub use fit::Fit;
pub use pypi::PathMapping;

/// Where trees come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SourceKind {
    /// Clone the repository, check out the base commit.
    Git,
    /// The nearest PyPI release (offline fallback).
    Pypi,
    /// Git, and PyPI for the instances where git fails.
    Auto,
}

impl std::str::FromStr for SourceKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "git" => Ok(SourceKind::Git),
            "pypi" => Ok(SourceKind::Pypi),
            "auto" => Ok(SourceKind::Auto),
            _ => Err(format!("unknown source {s:?} (git, pypi or auto)")),
        }
    }
}

impl std::fmt::Display for SourceKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SourceKind::Git => "git",
            SourceKind::Pypi => "pypi",
            SourceKind::Auto => "auto",
        })
    }
}

/// A release pinned for an instance (`--manifest`, `pypi-manifest.json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PinnedRelease {
    pub project: String,
    pub version: String,
    /// With `url` and `sha256`: the file to use, without reading the index.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filename: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    /// Informational: the fit when it was chosen ([`Fit::summary`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fit: Option<String>,
}

/// Load a manifest `{instance_id: {"project": ..., "version": ...}}`.
pub fn load_manifest(path: &Path) -> Result<BTreeMap<String, PinnedRelease>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    serde_json::from_str(&text).map_err(|e| {
        format!(
            "{}: not a manifest {{instance_id: {{\"project\", \"version\"}}}}: {e}",
            path.display()
        )
    })
}

/// Options of [`prepare`].
#[derive(Debug, Clone)]
pub struct PrepareOptions {
    pub repos_dir: PathBuf,
    /// Clones, downloads, index copies.
    pub cache_dir: PathBuf,
    pub source: SourceKind,
    pub jobs: usize,
    /// Clone URL template, `{repo}` = `owner/name`.
    pub git_url_template: String,
    /// Base of the PyPI JSON API (`https://pypi.org/pypi`; `file://` works for tests).
    pub pypi_index: String,
    /// Do not start an instance with less free space than this (GB, 1e9 bytes).
    pub min_free_gb: f64,
    /// Pinned releases, by instance id.
    pub manifest: BTreeMap<String, PinnedRelease>,
    /// Most releases read per instance while searching.
    pub max_candidates: usize,
    /// Rebuild instances even when they have a marker.
    pub force: bool,
}

impl PrepareOptions {
    /// Defaults for a repos directory: cache `<dir>/.cache`, source auto, 4 jobs, GitHub,
    /// pypi.org, 2 GB free at least, 24 candidates.
    pub fn new(repos_dir: impl Into<PathBuf>) -> PrepareOptions {
        let repos_dir = repos_dir.into();
        PrepareOptions {
            cache_dir: repos_dir.join(".cache"),
            repos_dir,
            source: SourceKind::Auto,
            jobs: 4,
            git_url_template: "https://github.com/{repo}.git".into(),
            pypi_index: "https://pypi.org/pypi".into(),
            min_free_gb: 2.0,
            manifest: BTreeMap::new(),
            max_candidates: 24,
            force: false,
        }
    }
}

/// How a tree was made.
// One per instance, serialised to the marker: the size difference does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "source", rename_all = "lowercase")]
pub enum Provenance {
    Git {
        url: String,
        commit: String,
        files_written: usize,
        entries_skipped: usize,
    },
    Pypi {
        project: String,
        version: String,
        filename: String,
        url: String,
        sha256: String,
        packagetype: String,
        mapping: PathMapping,
        /// Fit of the gold patch to this tree.
        fit: Fit,
        /// The release came from the manifest.
        pinned: bool,
        /// Releases scored while choosing (empty when pinned).
        evaluated: Vec<pypi::Evaluated>,
        files_written: usize,
        entries_skipped: usize,
    },
}

impl Provenance {
    /// One line: `git 0123456789ab` or `pypi requests==2.0.1, pre 3/3 ...`.
    pub fn summary(&self) -> String {
        match self {
            Provenance::Git { commit, .. } => format!("git {}", &commit[..commit.len().min(12)]),
            Provenance::Pypi {
                project,
                version,
                fit,
                ..
            } => format!("pypi {project}=={version}, {}", fit.summary()),
        }
    }
}

/// The marker `<repos-dir>/<instance_id>.source.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Marker {
    pub instance_id: String,
    pub repo: String,
    pub base_commit: String,
    #[serde(flatten)]
    pub provenance: Provenance,
    /// Why git was not used (`--source auto` fell back to PyPI).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub git_error: Option<String>,
    /// Seconds spent making the tree.
    pub seconds: f64,
    /// Unix time when it was made.
    pub prepared_at: u64,
    /// `tooltrain-rollout <version>`.
    pub tool: String,
}

/// The marker path of an instance.
pub fn marker_path(repos_dir: &Path, id: &str) -> PathBuf {
    repos_dir.join(format!("{id}.source.json"))
}

/// The marker of a complete tree, `None` when the tree or a readable marker is missing.
pub fn read_marker(repos_dir: &Path, id: &str) -> Option<Marker> {
    if !repos_dir.join(id).is_dir() {
        return None;
    }
    let text = std::fs::read_to_string(marker_path(repos_dir, id)).ok()?;
    serde_json::from_str(&text).ok()
}

/// What happened to one instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Prepared,
    /// Already there (has a marker).
    Skipped,
    Failed,
    /// Not started: the run stopped scheduling (low disk space).
    NotStarted,
}

/// One instance's outcome.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Outcome {
    pub instance_id: String,
    pub status: Status,
    /// The source summary ([`Provenance::summary`]), or why it failed / did not start.
    pub detail: String,
    pub seconds: f64,
}

/// `prepare-report.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PrepareReport {
    pub repos_dir: String,
    pub source: SourceKind,
    pub jobs: usize,
    pub seconds: f64,
    pub prepared: usize,
    pub skipped: usize,
    pub failed: usize,
    pub not_started: usize,
    /// Why the run stopped scheduling, if it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stopped: Option<String>,
    pub instances: Vec<Outcome>,
}

/// A whole-run error (the per-instance ones are in the report).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct PrepareError(pub String);

/// Values computed once per key for the whole run (clones, indexes, downloads); callers
/// of the same key wait for the first one.
pub(crate) struct KeyedOnce<T> {
    map: Mutex<HashMap<String, Arc<OnceLock<T>>>>,
}

impl<T: Clone> KeyedOnce<T> {
    fn new() -> Self {
        KeyedOnce {
            map: Mutex::new(HashMap::new()),
        }
    }

    pub(crate) fn get_or_init(&self, key: &str, f: impl FnOnce() -> T) -> T {
        let cell = {
            let mut m = self.map.lock().unwrap_or_else(|e| e.into_inner());
            m.entry(key.to_string()).or_default().clone()
        };
        cell.get_or_init(f).clone()
    }
}

/// Shared state of a run.
pub(crate) struct Ctx<'a> {
    pub(crate) opts: &'a PrepareOptions,
    agent: ureq::Agent,
    pub(crate) clones: KeyedOnce<Result<PathBuf, String>>,
    pub(crate) git_locks: KeyedOnce<Arc<Mutex<()>>>,
    pub(crate) indexes: KeyedOnce<Result<Arc<Vec<pypi::Release>>, String>>,
    pub(crate) downloads: KeyedOnce<Result<PathBuf, String>>,
}

impl<'a> Ctx<'a> {
    fn new(opts: &'a PrepareOptions) -> Self {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .tls_config(
                ureq::tls::TlsConfig::builder()
                    .root_certs(root_certs())
                    .build(),
            )
            .timeout_connect(Some(Duration::from_secs(30)))
            .timeout_global(Some(Duration::from_secs(600)))
            .user_agent(concat!("tooltrain/", env!("CARGO_PKG_VERSION")))
            .build()
            .into();
        Ctx {
            opts,
            agent,
            clones: KeyedOnce::new(),
            git_locks: KeyedOnce::new(),
            indexes: KeyedOnce::new(),
            downloads: KeyedOnce::new(),
        }
    }

    /// GET with three tries on transport errors, 429 and 5xx ([`get_attempt`]).
    fn get(&self, url: &str) -> Result<ureq::http::Response<ureq::Body>, String> {
        retry(&NET_RETRY, |_| get_attempt(url, self.agent.get(url).call())).map_err(|(e, _)| e)
    }

    /// The text at a URL (`file://` reads a local file).
    pub(crate) fn get_text(&self, url: &str) -> Result<String, String> {
        if let Some(p) = url.strip_prefix("file://") {
            return std::fs::read_to_string(p).map_err(|e| format!("{p}: {e}"));
        }
        self.get(url)?
            .body_mut()
            .with_config()
            .limit(256 << 20)
            .read_to_string()
            .map_err(|e| format!("GET {url}: {e}"))
    }

    /// Download a URL to a file (`file://` copies a local file).
    pub(crate) fn download(&self, url: &str, to: &Path) -> Result<(), String> {
        if let Some(p) = url.strip_prefix("file://") {
            return std::fs::copy(p, to)
                .map(|_| ())
                .map_err(|e| format!("{p}: {e}"));
        }
        // Three tries of the transfer: a failed GET (already retried) ends it, a failure
        // while writing the body is tried again.
        retry(&NET_RETRY, |_| {
            let mut resp = match self.get(url) {
                Ok(r) => r,
                Err(e) => return Attempt::Fatal(e),
            };
            let res = std::fs::File::create(to)
                .map_err(|e| format!("{}: {e}", to.display()))
                .and_then(|mut f| {
                    std::io::copy(&mut resp.body_mut().as_reader(), &mut f)
                        .map_err(|e| format!("GET {url}: {e}"))
                });
            match res {
                Ok(_) => Attempt::Done(()),
                Err(error) => Attempt::Retry { error, after: None },
            }
        })
        .map_err(|(e, _)| e)
    }
}

/// Network retries: three tries, waiting 2 s then 4 s.
const NET_RETRY: Backoff = Backoff {
    max_retries: 2,
    base_secs: 2.0,
    max_secs: 4.0,
    jitter: false,
};

/// One GET's outcome as a try: transport errors (the network, timeouts), 429 and 5xx are
/// worth another; other statuses and errors are not.
fn get_attempt<T>(url: &str, res: Result<T, ureq::Error>) -> Attempt<T, String> {
    match res {
        Ok(r) => Attempt::Done(r),
        Err(ureq::Error::StatusCode(c)) if c != 429 && c < 500 => {
            Attempt::Fatal(format!("GET {url}: HTTP {c}"))
        }
        Err(
            e @ (ureq::Error::StatusCode(_)
            | ureq::Error::Io(_)
            | ureq::Error::Timeout(_)
            | ureq::Error::ConnectionFailed
            | ureq::Error::HostNotFound),
        ) => Attempt::Retry {
            error: format!("GET {url}: {e}"),
            after: None,
        },
        Err(e) => Attempt::Fatal(format!("GET {url}: {e}")),
    }
}

/// Trusted roots for HTTPS: the system bundle (`SSL_CERT_FILE`, else the usual
/// distribution paths), so that a TLS-intercepting proxy whose CA the system trusts
/// works as it does for curl and pip; Mozilla's roots when there is no bundle.
fn root_certs() -> ureq::tls::RootCerts {
    let mut paths: Vec<PathBuf> = Vec::new();
    if let Some(p) = std::env::var_os("SSL_CERT_FILE") {
        paths.push(p.into());
    }
    paths.extend(
        [
            "/etc/ssl/certs/ca-certificates.crt",
            "/etc/pki/tls/certs/ca-bundle.crt",
            "/etc/ssl/cert.pem",
        ]
        .map(PathBuf::from),
    );
    for p in paths {
        let Ok(pem) = std::fs::read(&p) else {
            continue;
        };
        let certs: Vec<ureq::tls::Certificate<'static>> = ureq::tls::parse_pem(&pem)
            .filter_map(|item| match item {
                Ok(ureq::tls::PemItem::Certificate(c)) => Some(c),
                _ => None,
            })
            .collect();
        if !certs.is_empty() {
            return ureq::tls::RootCerts::new_with_certs(&certs);
        }
    }
    ureq::tls::RootCerts::WebPki
}

/// Read an instance-id list: ids separated by newlines, commas or spaces; `#` starts a
/// comment.
pub fn parse_id_list(text: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for line in text.lines() {
        let line = line.split('#').next().unwrap_or("");
        for id in line.split([',', ' ', '\t']) {
            let id = id.trim();
            if !id.is_empty() && !out.iter().any(|x| x == id) {
                out.push(id.to_string());
            }
        }
    }
    out
}

/// The instances to prepare: `ids` in their order (all of the dataset when `None`), the
/// first `limit`. Returns the known instances and the ids the dataset lacks.
pub fn select_instances(
    dataset: &[Instance],
    ids: Option<&[String]>,
    limit: Option<usize>,
) -> (Vec<Instance>, Vec<String>) {
    let limit = limit.unwrap_or(usize::MAX);
    match ids {
        None => (dataset.iter().take(limit).cloned().collect(), vec![]),
        Some(ids) => {
            let by_id: HashMap<&str, &Instance> = dataset
                .iter()
                .map(|i| (i.instance_id.as_str(), i))
                .collect();
            let (mut known, mut unknown) = (vec![], vec![]);
            for id in ids.iter().take(limit) {
                match by_id.get(id.as_str()) {
                    Some(i) => known.push((*i).clone()),
                    None => unknown.push(id.clone()),
                }
            }
            (known, unknown)
        }
    }
}

/// Free space (GB) of the file system holding `path` (or its nearest existing parent),
/// or why it is below `min_gb`.
pub fn check_free_space(path: &Path, min_gb: f64) -> Result<f64, String> {
    let mut p = path;
    while !p.exists() {
        match p.parent() {
            Some(q) if !q.as_os_str().is_empty() => p = q,
            _ => {
                p = Path::new(".");
                break;
            }
        }
    }
    let free = fs2::available_space(p).map_err(|e| format!("{}: free space: {e}", p.display()))?;
    let gb = free as f64 / 1e9;
    if gb < min_gb {
        return Err(format!(
            "only {gb:.1} GB free on {} (below --min-free-gb {min_gb}): no further instance started; free some space or lower --min-free-gb",
            p.display()
        ));
    }
    Ok(gb)
}

fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Remove a file or directory tree if present.
fn remove_path(p: &Path) -> std::io::Result<()> {
    match std::fs::symlink_metadata(p) {
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(p),
        Ok(_) => std::fs::remove_file(p),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Make one instance's tree; `Ok` is the marker written.
fn make_one(ctx: &Ctx, inst: &Instance, t0: Instant) -> Result<Marker, String> {
    let opts = ctx.opts;
    let id = &inst.instance_id;
    let dir = opts.repos_dir.join(id);
    let marker = marker_path(&opts.repos_dir, id);
    let tmp = opts
        .repos_dir
        .join(format!(".tmp-{id}-{}", std::process::id()));
    remove_path(&tmp).map_err(|e| format!("{}: {e}", tmp.display()))?;
    std::fs::create_dir_all(&tmp).map_err(|e| format!("{}: {e}", tmp.display()))?;
    let pinned = opts.manifest.get(id);
    let built = match opts.source {
        SourceKind::Git => git::prepare(ctx, inst, &tmp).map(|p| (p, None)),
        SourceKind::Pypi => pypi::prepare(ctx, inst, pinned, &tmp).map(|p| (p, None)),
        SourceKind::Auto => match git::prepare(ctx, inst, &tmp) {
            Ok(p) => Ok((p, None)),
            Err(git_err) => {
                // Start from an empty directory again.
                let _ = remove_path(&tmp);
                std::fs::create_dir_all(&tmp).map_err(|e| format!("{}: {e}", tmp.display()))?;
                pypi::prepare(ctx, inst, pinned, &tmp)
                    .map(|p| (p, Some(git_err.clone())))
                    .map_err(|e| format!("git: {git_err}; pypi: {e}"))
            }
        },
    };
    let (provenance, git_error) = match built {
        Ok(b) => b,
        Err(e) => {
            let _ = remove_path(&tmp);
            return Err(e);
        }
    };
    // Only now replace what was there (a half-made tree, or the old one with --force):
    // a failed rebuild leaves a complete tree in place.
    let replaced = remove_path(&marker)
        .map_err(|e| format!("{}: {e}", marker.display()))
        .and_then(|()| {
            remove_path(&dir)
                .map_err(|e| format!("{}: cannot remove the old tree: {e}", dir.display()))
        })
        .and_then(|()| std::fs::rename(&tmp, &dir).map_err(|e| format!("{}: {e}", dir.display())));
    if let Err(e) = replaced {
        let _ = remove_path(&tmp);
        return Err(e);
    }
    let m = Marker {
        instance_id: id.clone(),
        repo: inst.repo.clone(),
        base_commit: inst.base_commit.clone(),
        provenance,
        git_error,
        seconds: t0.elapsed().as_secs_f64(),
        prepared_at: now_unix(),
        tool: concat!("tooltrain-rollout ", env!("CARGO_PKG_VERSION")).into(),
    };
    let json = serde_json::to_string_pretty(&m).map_err(|e| e.to_string())?;
    tooltrain_util::write_atomic(&marker, json.as_bytes())
        .map_err(|e| format!("{}: {e}", marker.display()))?;
    Ok(m)
}

/// Prepare `instances` (and record `unknown_ids` as failures) into `opts.repos_dir`;
/// `progress` sees every outcome as it happens. Writes `prepare-report.json` and, when
/// the PyPI source was used, merges the releases into `pypi-manifest.json`.
pub fn prepare(
    instances: &[Instance],
    unknown_ids: &[String],
    opts: &PrepareOptions,
    progress: &(dyn Fn(&Outcome) + Sync),
) -> Result<PrepareReport, PrepareError> {
    let t0 = Instant::now();
    let dir = &opts.repos_dir;
    // Held until the run ends.
    let _lock = lock_repos_dir(dir)?;
    // Temp trees of earlier runs that died (we hold the lock: nobody else is building).
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.file_name().to_string_lossy().starts_with(".tmp-") {
                let _ = remove_path(&e.path());
            }
        }
    }
    let ctx = Ctx::new(opts);
    let stop = Stop::default();
    let mut outcomes: Vec<Outcome> = Vec::new();
    for id in unknown_ids {
        let o = Outcome {
            instance_id: id.clone(),
            status: Status::Failed,
            detail: "unknown instance id: not in the dataset".into(),
            seconds: 0.0,
        };
        progress(&o);
        outcomes.push(o);
    }
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(opts.jobs.max(1))
        .build()
        .map_err(|e| prepare_error("thread pool", e))?;
    let results: Vec<Outcome> = pool.install(|| {
        use rayon::prelude::*;
        instances
            .par_iter()
            .with_max_len(1)
            .map(|inst| {
                let o = prepare_one(&ctx, inst, &stop);
                progress(&o);
                o
            })
            .collect()
    });
    outcomes.extend(results);
    let count = |s: Status| outcomes.iter().filter(|o| o.status == s).count();
    let report = PrepareReport {
        repos_dir: dir.display().to_string(),
        source: opts.source,
        jobs: opts.jobs,
        seconds: t0.elapsed().as_secs_f64(),
        prepared: count(Status::Prepared),
        skipped: count(Status::Skipped),
        failed: count(Status::Failed),
        not_started: count(Status::NotStarted),
        stopped: stop.why.into_inner().unwrap_or_else(|e| e.into_inner()),
        instances: outcomes,
    };
    let json = serde_json::to_string_pretty(&report).map_err(|e| prepare_error("report", e))?;
    let report_path = dir.join("prepare-report.json");
    tooltrain_util::write_atomic(&report_path, json.as_bytes())
        .map_err(|e| prepare_error(report_path.display(), e))?;
    write_pypi_manifest(dir, instances).map_err(PrepareError)?;
    Ok(report)
}

fn prepare_error(what: impl std::fmt::Display, e: impl std::fmt::Display) -> PrepareError {
    PrepareError(format!("{what}: {e}"))
}

/// Create the repos directory and take its lock (`.prepare.lock`): one run at a time.
/// The lock is held while the returned file is open.
fn lock_repos_dir(dir: &Path) -> Result<std::fs::File, PrepareError> {
    std::fs::create_dir_all(dir).map_err(|e| prepare_error(dir.display(), e))?;
    let lock_path = dir.join(".prepare.lock");
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|e| prepare_error(lock_path.display(), e))?;
    fs2::FileExt::try_lock_exclusive(&lock).map_err(|_| {
        PrepareError(format!(
            "another `repos prepare` is running on {} (lock {} is held)",
            dir.display(),
            lock_path.display()
        ))
    })?;
    Ok(lock)
}

/// Whether the run stopped scheduling instances, and why (the first reason).
#[derive(Default)]
struct Stop {
    why: Mutex<Option<String>>,
    stopped: AtomicBool,
}

/// One instance's outcome: failed when its id is unusable, skipped when it has a marker
/// (unless `force`), not started once the run stopped or when disk space is short
/// (which stops the run), else prepared or failed by [`make_one`].
fn prepare_one(ctx: &Ctx, inst: &Instance, stop: &Stop) -> Outcome {
    let opts = ctx.opts;
    let dir = &opts.repos_dir;
    let t = Instant::now();
    let id = &inst.instance_id;
    let out = |status, detail: String| Outcome {
        instance_id: id.clone(),
        status,
        detail,
        seconds: t.elapsed().as_secs_f64(),
    };
    if !valid_instance_id(id) {
        return out(
            Status::Failed,
            "instance id is not usable as a directory name".into(),
        );
    }
    if !opts.force {
        if let Some(m) = read_marker(dir, id) {
            return out(Status::Skipped, m.provenance.summary());
        }
    }
    if stop.stopped.load(Ordering::SeqCst) {
        let why = stop.why.lock().unwrap_or_else(|e| e.into_inner()).clone();
        return out(Status::NotStarted, why.unwrap_or_default());
    }
    for p in [dir, &opts.cache_dir] {
        if let Err(e) = check_free_space(p, opts.min_free_gb) {
            let mut s = stop.why.lock().unwrap_or_else(|e| e.into_inner());
            if s.is_none() {
                *s = Some(e.clone());
            }
            stop.stopped.store(true, Ordering::SeqCst);
            return out(Status::NotStarted, e);
        }
    }
    match make_one(ctx, inst, t) {
        Ok(m) => out(Status::Prepared, m.provenance.summary()),
        Err(e) => out(Status::Failed, e),
    }
}

/// Merge the PyPI releases of `instances`' markers into `<dir>/pypi-manifest.json`.
fn write_pypi_manifest(dir: &Path, instances: &[Instance]) -> Result<(), String> {
    let path = dir.join("pypi-manifest.json");
    let mut manifest = if path.exists() {
        load_manifest(&path)?
    } else {
        BTreeMap::new()
    };
    let mut changed = false;
    for inst in instances {
        let Some(m) = read_marker(dir, &inst.instance_id) else {
            continue;
        };
        if let Provenance::Pypi {
            project,
            version,
            filename,
            url,
            sha256,
            fit,
            ..
        } = m.provenance
        {
            let pin = PinnedRelease {
                project,
                version,
                filename: Some(filename),
                url: Some(url),
                sha256: Some(sha256),
                fit: Some(fit.summary()),
            };
            if manifest.get(&inst.instance_id) != Some(&pin) {
                manifest.insert(inst.instance_id.clone(), pin);
                changed = true;
            }
        }
    }
    if changed {
        let mut json = serde_json::to_string_pretty(&manifest).map_err(|e| e.to_string())?;
        json.push('\n');
        tooltrain_util::write_atomic(&path, json.as_bytes())
            .map_err(|e| format!("{}: {e}", path.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inst(id: &str) -> Instance {
        Instance {
            instance_id: id.into(),
            repo: "o/r".into(),
            base_commit: "0".repeat(40),
            problem_statement: String::new(),
            patch: String::new(),
        }
    }

    #[test]
    fn selects_and_reports_unknown_ids() {
        let ds = vec![inst("a"), inst("b"), inst("c")];
        let ids = parse_id_list("c, a\n# comment\nzz  # trailing\na\n");
        assert_eq!(ids, ["c", "a", "zz"]);
        let (k, u) = select_instances(&ds, Some(&ids), None);
        assert_eq!(
            k.iter().map(|i| i.instance_id.as_str()).collect::<Vec<_>>(),
            ["c", "a"]
        );
        assert_eq!(u, ["zz"]);
        let (k, u) = select_instances(&ds, None, Some(2));
        assert_eq!((k.len(), u.len()), (2, 0));
    }

    #[test]
    fn free_space_check_names_the_limit() {
        let d = tempfile::tempdir().unwrap();
        assert!(check_free_space(d.path(), 0.0).unwrap() > 0.0);
        let e = check_free_space(&d.path().join("not/yet"), 1e12).unwrap_err();
        assert!(
            e.contains("GB free on") && e.contains("--min-free-gb 1000000000000"),
            "{e}"
        );
    }

    #[test]
    fn get_retries_transport_errors_429_and_5xx_only() {
        let kind = |r: Result<(), ureq::Error>| match get_attempt("u", r) {
            Attempt::Done(()) => "done".to_string(),
            Attempt::Retry { error, after } => {
                assert_eq!(after, None);
                format!("retry {error}")
            }
            Attempt::Fatal(e) => format!("fatal {e}"),
        };
        use ureq::Error as E;
        assert_eq!(kind(Ok(())), "done");
        assert_eq!(kind(Err(E::StatusCode(404))), "fatal GET u: HTTP 404");
        assert_eq!(kind(Err(E::StatusCode(499))), "fatal GET u: HTTP 499");
        for retried in [
            E::StatusCode(429),
            E::StatusCode(500),
            E::StatusCode(503),
            E::Io(std::io::Error::other("reset")),
            E::Timeout(ureq::Timeout::Global),
            E::ConnectionFailed,
            E::HostNotFound,
        ] {
            let k = kind(Err(retried));
            assert!(k.starts_with("retry GET u: "), "{k}");
        }
        for fatal in [E::BadUri("x".into()), E::TooManyRedirects, E::TlsRequired] {
            let k = kind(Err(fatal));
            assert!(k.starts_with("fatal GET u: "), "{k}");
        }
        // Three tries, waiting 2 s then 4 s (as `2 * attempt` did).
        assert_eq!(NET_RETRY.max_retries + 1, 3);
        assert_eq!((NET_RETRY.wait_secs(0), NET_RETRY.wait_secs(1)), (2.0, 4.0));
    }
}

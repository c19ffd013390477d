//! The PyPI fallback: build an instance's tree from the sdist (or wheel) of the release
//! nearest to its base commit. See the [module documentation](super) for the method
//! and its limits.

use super::archive::{self, ArchiveKind};
use super::fit::{patch_fit, patch_hunks, scored_paths, FileHunks, Fit};
use super::version::Version;
use super::{Ctx, PinnedRelease, Provenance};
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tooltrain_rollout::dataset::Instance;

/// The PyPI project of a GitHub repository (`owner/name`): the SWE-bench repositories by
/// table, otherwise the repository name.
pub fn pypi_project(repo: &str) -> String {
    const TABLE: [(&str, &str); 12] = [
        ("django/django", "Django"),
        ("psf/requests", "requests"),
        ("pallets/flask", "Flask"),
        ("sympy/sympy", "sympy"),
        ("scikit-learn/scikit-learn", "scikit-learn"),
        ("matplotlib/matplotlib", "matplotlib"),
        ("pytest-dev/pytest", "pytest"),
        ("sphinx-doc/sphinx", "Sphinx"),
        ("astropy/astropy", "astropy"),
        ("pydata/xarray", "xarray"),
        ("pylint-dev/pylint", "pylint"),
        ("mwaskom/seaborn", "seaborn"),
    ];
    let lower = repo.to_ascii_lowercase();
    TABLE
        .iter()
        .find(|(r, _)| *r == lower)
        .map(|(_, p)| p.to_string())
        .unwrap_or_else(|| repo.rsplit('/').next().unwrap_or(repo).to_string())
}

/// One downloadable file of a release.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DistFile {
    pub filename: String,
    pub url: String,
    /// `sdist` or `bdist_wheel`.
    pub packagetype: String,
    pub sha256: String,
    #[serde(default)]
    pub size: u64,
    #[serde(default)]
    pub upload_time: String,
    #[serde(default)]
    pub yanked: bool,
}

/// A release with the file chosen for it.
#[derive(Debug, Clone)]
pub struct Release {
    pub version: String,
    pub parsed: Version,
    pub file: DistFile,
}

/// The file to use of a release: a `.tar.gz` sdist, else a `.zip` sdist, else a pure
/// Python wheel, else any wheel; `None` when there is none we can read.
pub fn choose_file(files: &[DistFile]) -> Option<&DistFile> {
    let rank = |f: &DistFile| -> Option<u8> {
        let kind = ArchiveKind::from_filename(&f.filename)?;
        let wheel = f.filename.ends_with(".whl");
        Some(match (f.packagetype.as_str(), kind, wheel) {
            ("sdist", ArchiveKind::TarGz, _) => 0,
            ("sdist", ArchiveKind::Zip, _) => 1,
            ("bdist_wheel", _, true) if f.filename.contains("-none-any") => 2,
            ("bdist_wheel", _, true) => 3,
            _ => return None,
        })
    };
    files
        .iter()
        .filter(|f| !f.sha256.is_empty())
        .filter_map(|f| rank(f).map(|r| (r, f)))
        .min_by_key(|(r, _)| *r)
        .map(|(_, f)| f)
}

#[derive(Deserialize)]
struct IndexFile {
    filename: String,
    url: String,
    packagetype: String,
    #[serde(default)]
    digests: HashMap<String, String>,
    #[serde(default)]
    size: u64,
    #[serde(default)]
    upload_time: String,
    #[serde(default)]
    yanked: bool,
}

#[derive(Deserialize)]
struct IndexJson {
    releases: HashMap<String, Vec<IndexFile>>,
}

/// Resolve a possibly relative URL against the URL of the document it came from (some
/// PyPI mirrors answer `../../packages/...`).
pub fn resolve_url(base: &str, url: &str) -> String {
    if url.contains("://") {
        return url.to_string();
    }
    let Some((scheme, rest)) = base.split_once("://") else {
        return url.to_string();
    };
    let (host, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let mut parts: Vec<&str> = if url.starts_with('/') {
        vec![]
    } else {
        let dir = &path[..path.rfind('/').map_or(0, |i| i + 1)];
        dir.split('/').filter(|s| !s.is_empty()).collect()
    };
    for seg in url.split('/') {
        match seg {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            s => parts.push(s),
        }
    }
    format!("{scheme}://{host}/{}", parts.join("/"))
}

/// The releases of a PyPI JSON document (`https://pypi.org/pypi/<project>/json`, file
/// URLs resolved against `base`) that have a usable file and a PEP 440 version, oldest
/// first, pre-releases included (see [`Version::is_prerelease`]).
pub fn parse_index(json: &str, base: &str) -> Result<Vec<Release>, String> {
    let idx: IndexJson =
        serde_json::from_str(json).map_err(|e| format!("not a PyPI project JSON: {e}"))?;
    let mut all: Vec<Release> = Vec::new();
    for (version, files) in idx.releases {
        let Some(parsed) = Version::parse(&version) else {
            continue;
        };
        let files: Vec<DistFile> = files
            .into_iter()
            .map(|f| DistFile {
                sha256: f.digests.get("sha256").cloned().unwrap_or_default(),
                filename: f.filename,
                url: resolve_url(base, &f.url),
                packagetype: f.packagetype,
                size: f.size,
                upload_time: f.upload_time,
                yanked: f.yanked,
            })
            .collect();
        if let Some(file) = choose_file(&files) {
            all.push(Release {
                version,
                parsed,
                file: file.clone(),
            });
        }
    }
    all.sort_by(|a, b| a.parsed.cmp(&b.parsed).then(a.version.cmp(&b.version)));
    Ok(all)
}

/// How archive paths become repository paths: strip the sdist's top directory
/// (`requests-2.0.1/`), then replace the prefix `from` by `to` (`""` -> `"src/"` puts a
/// wheel's `flask/` under `src/flask/`; `"src/"` -> `""` the other way). Paths outside
/// `from` are kept as they are.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PathMapping {
    /// The top directory stripped from every path (sdists), with its `/`.
    #[serde(default)]
    pub strip_top: String,
    #[serde(default)]
    pub from: String,
    #[serde(default)]
    pub to: String,
}

impl PathMapping {
    /// The repository path of an archive path; `None` for paths outside `strip_top`.
    pub fn apply(&self, archive_path: &str) -> Option<String> {
        let p = archive_path.strip_prefix(self.strip_top.as_str())?;
        if p.is_empty() {
            return None;
        }
        Some(rewrite(p, &self.from, &self.to))
    }
}

fn rewrite(p: &str, from: &str, to: &str) -> String {
    match p.strip_prefix(from) {
        Some(rest) => format!("{to}{rest}"),
        None => p.to_string(),
    }
}

/// The top directory shared by all paths (`name-version/`), if every path is under one.
pub fn common_top(paths: &[String]) -> Option<String> {
    let first = paths.first()?.split_once('/')?.0;
    paths
        .iter()
        .all(|p| p.split_once('/').is_some_and(|(t, _)| t == first))
        .then(|| format!("{first}/"))
}

fn basename(p: &str) -> &str {
    p.rsplit('/').next().unwrap_or(p)
}

/// The prefix rewrite `(from, to)` under which most `gold` paths exist among `paths`:
/// candidates come from every archive path and gold path with the same file name (their
/// longest common suffix of whole components is kept, the rest is the prefix pair).
/// Ties go to the identity, then to the shortest prefixes. Returns the pair and how many
/// gold paths exist under it.
pub fn choose_mapping(paths: &[String], gold: &[String]) -> ((String, String), usize) {
    let names: HashSet<&str> = gold.iter().map(|g| basename(g)).collect();
    let mut cands: Vec<(String, String)> = vec![(String::new(), String::new())];
    for a in paths.iter().filter(|a| names.contains(basename(a))) {
        for g in gold.iter().filter(|g| basename(g) == basename(a)) {
            let ac: Vec<&str> = a.split('/').collect();
            let gc: Vec<&str> = g.split('/').collect();
            let mut k = 0;
            while k < ac.len() && k < gc.len() && ac[ac.len() - 1 - k] == gc[gc.len() - 1 - k] {
                k += 1;
            }
            let pre = |c: &[&str]| {
                let n = c.len() - k;
                c[..n].iter().map(|s| format!("{s}/")).collect::<String>()
            };
            let cand = (pre(&ac), pre(&gc));
            if !cands.contains(&cand) {
                cands.push(cand);
            }
        }
    }
    // Most gold paths, then the shortest prefixes; the identity (first) wins ties.
    let mut best = ((String::new(), String::new()), 0usize);
    let mut best_key = (0usize, std::cmp::Reverse(usize::MAX));
    for (from, to) in cands {
        let mapped: HashSet<String> = paths.iter().map(|p| rewrite(p, &from, &to)).collect();
        let n = gold.iter().filter(|g| mapped.contains(*g)).count();
        let key = (n, std::cmp::Reverse(from.len() + to.len()));
        if key > best_key {
            best_key = key;
            best = ((from, to), n);
        }
    }
    best
}

/// What a release's archive holds for one gold patch.
pub struct Candidate {
    pub mapping: PathMapping,
    /// Repository path -> bytes, for the files named like a gold patch file.
    pub files: HashMap<String, Vec<u8>>,
    /// Regular files in the archive.
    pub n_files: usize,
}

/// Read an archive once: choose the path mapping for `gold` and keep the files the
/// fit needs.
pub fn read_candidate(
    path: &Path,
    filename: &str,
    packagetype: &str,
    gold: &[String],
) -> Result<Candidate, String> {
    let kind = ArchiveKind::from_filename(filename)
        .ok_or_else(|| format!("{filename}: archive format not supported"))?;
    let names: HashSet<&str> = gold.iter().map(|g| basename(g)).collect();
    let mut paths: Vec<String> = Vec::new();
    let mut kept: Vec<(String, Vec<u8>)> = Vec::new();
    archive::visit(path, kind, &mut |p, _, r| {
        if names.contains(basename(p)) {
            let mut v = Vec::new();
            r.read_to_end(&mut v)?;
            kept.push((p.to_string(), v));
        }
        paths.push(p.to_string());
        Ok(())
    })
    .map_err(|e| format!("{filename}: cannot read archive: {e}"))?;
    let strip_top = if packagetype == "sdist" {
        common_top(&paths).unwrap_or_default()
    } else {
        String::new()
    };
    let stripped: Vec<String> = paths
        .iter()
        .filter_map(|p| p.strip_prefix(strip_top.as_str()).map(str::to_string))
        .collect();
    let ((from, to), _) = choose_mapping(&stripped, gold);
    let mapping = PathMapping {
        strip_top,
        from,
        to,
    };
    let files = kept
        .into_iter()
        .filter_map(|(p, v)| mapping.apply(&p).map(|m| (m, v)))
        .collect();
    Ok(Candidate {
        mapping,
        files,
        n_files: paths.len(),
    })
}

/// A release whose fit was measured while choosing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Evaluated {
    pub version: String,
    pub fit: Fit,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// How good release `i` (oldest first) with fit `f` is as the tree: exact, then all
/// hunks apply, then most hunks, then most at their line, then not holding the fix,
/// then most old-side lines found, then the newest.
pub fn fit_key(i: usize, f: &Fit) -> (bool, bool, usize, usize, bool, usize, usize) {
    (
        f.exact(),
        f.pre_perfect(),
        f.pre,
        f.pre_at_line,
        !f.fixed(),
        f.old_lines_found,
        i,
    )
}

/// Choose among `n` releases (oldest first) with `eval(i)` giving release `i`'s fit.
/// A release is *before* the fix when more hunks fit as old side than as new side
/// ([`Fit::before`]), *after* it when the reverse ([`Fit::fixed`]), and uninformative
/// otherwise (too old, or refactored since).
/// 1. Binary search for the first release after the fix (about log2(n) reads); the one
///    before it is the candidate when it is before the fix.
/// 2. Otherwise (uninformative releases misled the search) a coarse scan of about 8
///    evenly spaced releases (twice as many, and so on, while none is informative and
///    fewer than `max_evals` were read) finds the best one before the fix, and a binary
///    search between it and the next scanned release finds the last release before the
///    fix; with none before the fix, the one before the first scanned release holding it
///    is found the same way; with nothing informative, the release whose files hold
///    most of the hunks' old lines ([`Fit::old_lines_found`]) is the candidate.
/// 3. When the candidate's fit is not exact, its two neighbours each side are read,
///    then, while fewer than `max_evals` releases were read, releases further out
///    (newer and older in turn) until one is exact.
///
/// The best release read wins: exact, then all hunks apply, then most hunks, then most
/// at their line, then not holding the fix; the newest on ties. Returns its index and the
/// fits of every release read, by index.
pub fn search_release(
    n: usize,
    max_evals: usize,
    eval: &mut dyn FnMut(usize) -> Fit,
) -> (usize, Vec<(usize, Fit)>) {
    assert!(n > 0, "search_release needs at least one release");
    let mut memo = Memo {
        fits: vec![None; n],
        eval,
    };
    // 1. The release before the first one holding the fix.
    let fixed_at = memo.first(0, n, |f| f.fixed());
    let mut c = fixed_at.saturating_sub(1);
    // 2. Uninformative releases misled the search: scan, then search a bracket.
    if !memo.get(c).before() {
        coarse_scan(&mut memo, max_evals);
        c = bracket_candidate(&mut memo).unwrap_or(c);
    }
    if !memo.informative() {
        // Nothing fits anywhere read: centre on the release most like the old side.
        c = (0..n)
            .filter_map(|i| memo.fits[i].map(|f| (f.old_lines_found, i)))
            .max()
            .map_or(c, |(_, i)| i);
    }
    // 3. Neighbours, then releases further out, while the best is not exact.
    let fc = memo.get(c);
    let mut best = (c, fc);
    if !fc.exact() {
        read_neighbours(&mut memo, c, &mut best);
        read_further_out(&mut memo, c, max_evals, &mut best);
    }
    // Any release read may beat the candidate (the scans read many).
    for (i, m) in memo.fits.iter().enumerate() {
        if let Some(f) = m {
            keep_better(&mut best, i, *f);
        }
    }
    let evaluated = memo
        .fits
        .iter()
        .enumerate()
        .filter_map(|(i, m)| m.map(|f| (i, f)))
        .collect();
    (best.0, evaluated)
}

/// The fits [`search_release`] has read, by release index; each release is read once.
struct Memo<'e> {
    fits: Vec<Option<Fit>>,
    eval: &'e mut dyn FnMut(usize) -> Fit,
}

impl Memo<'_> {
    fn get(&mut self, i: usize) -> Fit {
        if let Some(f) = self.fits[i] {
            return f;
        }
        let f = (self.eval)(i);
        self.fits[i] = Some(f);
        f
    }

    fn reads(&self) -> usize {
        self.fits.iter().filter(|m| m.is_some()).count()
    }

    /// A release read is before or after the fix.
    fn informative(&self) -> bool {
        self.fits.iter().flatten().any(|f| f.before() || f.fixed())
    }

    /// First index in [lo, hi) where `pred` holds (hi when none), if monotone.
    fn first(&mut self, mut lo: usize, mut hi: usize, pred: fn(&Fit) -> bool) -> usize {
        while lo < hi {
            let mid = (lo + hi) / 2;
            if pred(&self.get(mid)) {
                hi = mid;
            } else {
                lo = mid + 1;
            }
        }
        lo
    }
}

/// Replace `best` by release `j` when `j` is better ([`fit_key`]).
fn keep_better(best: &mut (usize, Fit), j: usize, f: Fit) {
    if fit_key(j, &f) > fit_key(best.0, &best.1) {
        *best = (j, f);
    }
}

/// Read about 8 evenly spaced releases and the newest; while none read is informative
/// and fewer than `max_evals` were read, twice as many, and so on.
fn coarse_scan(memo: &mut Memo<'_>, max_evals: usize) {
    let n = memo.fits.len();
    let mut step = n.div_ceil(8).max(1);
    loop {
        for i in (0..n).step_by(step).chain([n - 1]) {
            if memo.fits[i].is_none() && memo.reads() < max_evals {
                memo.get(i);
            }
        }
        if memo.informative() || step == 1 || memo.reads() >= max_evals {
            break;
        }
        step = step.div_ceil(2);
    }
}

/// After [`coarse_scan`]: the last release before the fix, by a binary search between
/// the best release read that is before the fix and the next release read; with none
/// before the fix, the release before the first one holding it, between that one and
/// the release read before it. `None` when no release read is informative.
fn bracket_candidate(memo: &mut Memo<'_>) -> Option<usize> {
    let n = memo.fits.len();
    let best_before = (0..n)
        .filter_map(|i| memo.fits[i].map(|f| (i, f)))
        .filter(|(_, f)| f.before())
        .max_by_key(|(i, f)| fit_key(*i, f));
    if let Some((a, _)) = best_before {
        let b = (a + 1..n).find(|&i| memo.fits[i].is_some()).unwrap_or(n);
        // The last release before the fix in [a, b): the first one that is not.
        let end = memo.first(a + 1, b, |f| !f.before());
        return Some(end - 1);
    }
    let j = (0..n).find(|&i| memo.fits[i].is_some_and(|f| f.fixed()))?;
    // No release read is before the fix, but one holds it: the release before the first
    // one holding it lies between it and the release read before it.
    let p = (0..j).rev().find(|&i| memo.fits[i].is_some()).unwrap_or(0);
    Some(memo.first(p + 1, j, |f| f.fixed()).saturating_sub(1))
}

/// Read the two neighbours each side of candidate `c` (nearest first).
fn read_neighbours(memo: &mut Memo<'_>, c: usize, best: &mut (usize, Fit)) {
    let n = memo.fits.len();
    let near = [
        c as isize - 1,
        c as isize + 1,
        c as isize - 2,
        c as isize + 2,
    ];
    for j in near {
        if j < 0 || j as usize >= n {
            continue;
        }
        let j = j as usize;
        let f = memo.get(j);
        keep_better(best, j, f);
    }
}

/// Read releases further out from candidate `c`, newer and older in turn, until the best
/// is exact or `max_evals` releases were read.
fn read_further_out(memo: &mut Memo<'_>, c: usize, max_evals: usize, best: &mut (usize, Fit)) {
    let n = memo.fits.len();
    let mut d = 3;
    while !best.1.exact() && memo.reads() < max_evals && (d <= c || c + d < n) {
        for j in [c.checked_add(d).filter(|&j| j < n), c.checked_sub(d)]
            .into_iter()
            .flatten()
        {
            if memo.fits[j].is_some() || memo.reads() >= max_evals {
                continue;
            }
            let f = memo.get(j);
            keep_better(best, j, f);
        }
        d += 1;
    }
}

/// sha256 of a file, lowercase hex.
pub fn sha256_file(path: &Path) -> std::io::Result<String> {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    let mut f = std::fs::File::open(path)?;
    std::io::copy(&mut f, &mut h)?;
    Ok(tooltrain_util::hex(&h.finalize()))
}

/// The cached copy of a distribution file, downloaded (and sha256-checked) when absent:
/// `<cache>/pypi/files/<sha256>/<filename>`.
pub(super) fn fetch_file(ctx: &Ctx, f: &DistFile) -> Result<PathBuf, String> {
    let sha = f.sha256.to_ascii_lowercase();
    if sha.len() != 64 || !sha.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!(
            "{}: no valid sha256 digest in the index",
            f.filename
        ));
    }
    let name = archive::clean_path(&f.filename)
        .filter(|n| !n.contains('/'))
        .ok_or_else(|| format!("{:?}: not a plain file name", f.filename))?;
    ctx.downloads.get_or_init(&format!("{sha} {}", f.url), || {
        let dir = ctx.opts.cache_dir.join("pypi/files").join(&sha);
        let path = dir.join(&name);
        if path.is_file() && sha256_file(&path).is_ok_and(|h| h == sha) {
            return Ok(path);
        }
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tmp = dir.join(format!(".{name}.{}.{n}.part", std::process::id()));
        let res = (|| {
            ctx.download(&f.url, &tmp)?;
            let got = sha256_file(&tmp).map_err(|e| format!("{}: {e}", tmp.display()))?;
            if got != sha {
                return Err(format!(
                    "{}: sha256 mismatch (index says {sha}, downloaded {got})",
                    f.url
                ));
            }
            std::fs::rename(&tmp, &path).map_err(|e| format!("{}: {e}", path.display()))
        })();
        if res.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        res.map(|()| path)
    })
}

/// The project's releases, from the index (cached in memory for the run and on disk
/// under `<cache>/pypi/index/`; the disk copy is used when the index cannot be reached).
pub(super) fn releases(ctx: &Ctx, project: &str) -> Result<Arc<Vec<Release>>, String> {
    ctx.indexes.get_or_init(project, || {
        let url = format!(
            "{}/{project}/json",
            ctx.opts.pypi_index.trim_end_matches('/')
        );
        let cached = ctx
            .opts
            .cache_dir
            .join("pypi/index")
            .join(format!("{project}.json"));
        let text = match ctx.get_text(&url) {
            Ok(t) => {
                if let Some(d) = cached.parent() {
                    let _ = std::fs::create_dir_all(d);
                }
                let _ = tooltrain_util::write_atomic(&cached, t.as_bytes());
                t
            }
            Err(e) => match std::fs::read_to_string(&cached) {
                Ok(t) => t,
                Err(_) => return Err(format!("PyPI project {project}: {e}")),
            },
        };
        let rel = parse_index(&text, &url).map_err(|e| format!("{url}: {e}"))?;
        if rel.is_empty() {
            return Err(format!(
                "PyPI project {project} has no release with a readable sdist or wheel"
            ));
        }
        Ok(Arc::new(rel))
    })
}

/// What [`evaluate`] gives for a release file: its fit, the path mapping, the archive.
type Scored = (Fit, PathMapping, PathBuf);

/// Fit of one release file to the patch: download, read, map, score.
fn evaluate(
    ctx: &Ctx,
    f: &DistFile,
    hunks: &[FileHunks],
    gold: &[String],
) -> Result<Scored, String> {
    let path = fetch_file(ctx, f)?;
    let cand = read_candidate(&path, &f.filename, &f.packagetype, gold)?;
    let fit = patch_fit(hunks, |p| cand.files.get(p).map(Vec::as_slice));
    Ok((fit, cand.mapping, path))
}

/// The release chosen for an instance.
struct Chosen {
    version: String,
    file: DistFile,
    fit: Fit,
    mapping: PathMapping,
    /// The downloaded archive.
    path: PathBuf,
    /// Releases scored while choosing (empty when pinned).
    evaluated: Vec<Evaluated>,
}

/// Build `dest` (an empty directory) from the release chosen for `inst`: the pinned one,
/// else the one [`choose_searched`] finds.
pub(super) fn prepare(
    ctx: &Ctx,
    inst: &Instance,
    pinned: Option<&PinnedRelease>,
    dest: &Path,
) -> Result<Provenance, String> {
    let hunks = patch_hunks(&inst.patch).map_err(|e| format!("gold patch: {e}"))?;
    let gold = scored_paths(&hunks);
    let project = pinned
        .map(|p| p.project.clone())
        .unwrap_or_else(|| pypi_project(&inst.repo));
    let chosen = match pinned {
        Some(pin) => choose_pinned(ctx, &project, pin, &hunks, &gold)?,
        None => choose_searched(ctx, &project, &hunks, &gold)?,
    };
    let (files_written, entries_skipped) =
        extract(&chosen.file, &chosen.path, &chosen.mapping, dest)?;
    let Chosen {
        version,
        file,
        fit,
        mapping,
        evaluated,
        ..
    } = chosen;
    Ok(Provenance::Pypi {
        project,
        version,
        filename: file.filename,
        url: file.url,
        sha256: file.sha256,
        packagetype: file.packagetype,
        mapping,
        fit,
        pinned: pinned.is_some(),
        evaluated,
        files_written,
        entries_skipped,
    })
}

/// Write the files of the archive at `path` into `dest` under their repository paths
/// (`mapping`); returns the files written and the entries skipped.
fn extract(
    file: &DistFile,
    path: &Path,
    mapping: &PathMapping,
    dest: &Path,
) -> Result<(usize, usize), String> {
    let kind = ArchiveKind::from_filename(&file.filename)
        .ok_or_else(|| format!("{}: archive format not supported", file.filename))?;
    let mut n_files = 0usize;
    let skipped = archive::visit(path, kind, &mut |p, mode, r| {
        if let Some(rel) = mapping.apply(p) {
            archive::write_file(dest, &rel, mode, r)?;
            n_files += 1;
        }
        Ok(())
    })
    .map_err(|e| format!("{}: cannot extract: {e}", file.filename))?;
    Ok((n_files, skipped.special + skipped.bad_names))
}

/// The pinned release: the manifest's file when it names one (the same file from the
/// index when its URL fails), else the release's file on the index.
fn choose_pinned(
    ctx: &Ctx,
    project: &str,
    pin: &PinnedRelease,
    hunks: &[FileHunks],
    gold: &[String],
) -> Result<Chosen, String> {
    let (file, (fit, mapping, path)) = match pinned_file(pin) {
        Some(f) => match evaluate(ctx, &f, hunks, gold) {
            Ok(r) => (f, r),
            Err(e) => same_file_from_index(ctx, project, pin, &f, e, hunks, gold)?,
        },
        None => {
            let f = file_on_index(ctx, project, pin)?;
            let r = evaluate(ctx, &f, hunks, gold)?;
            (f, r)
        }
    };
    Ok(Chosen {
        version: pin.version.clone(),
        file,
        fit,
        mapping,
        path,
        evaluated: Vec::new(),
    })
}

/// The file a manifest entry names, when it has filename, URL and sha256.
fn pinned_file(pin: &PinnedRelease) -> Option<DistFile> {
    let (Some(filename), Some(url), Some(sha256)) = (&pin.filename, &pin.url, &pin.sha256) else {
        return None;
    };
    Some(DistFile {
        filename: filename.clone(),
        url: url.clone(),
        packagetype: if filename.ends_with(".whl") {
            "bdist_wheel".into()
        } else {
            "sdist".into()
        },
        sha256: sha256.clone(),
        size: 0,
        upload_time: String::new(),
        yanked: false,
    })
}

/// The index's file of the pinned release.
fn file_on_index(ctx: &Ctx, project: &str, pin: &PinnedRelease) -> Result<DistFile, String> {
    let rel = releases(ctx, project)?;
    let want = Version::parse(&pin.version);
    rel.iter()
        .find(|r| r.version == pin.version || Some(&r.parsed) == want.as_ref())
        .map(|r| r.file.clone())
        .ok_or_else(|| {
            format!(
                "pinned release {project}=={} is not on the index (or has no readable file)",
                pin.version
            )
        })
}

/// The pinned file `f` could not be read (error `e`): its URL is a hint (mirrors differ),
/// so take the same file (same sha256) from the index.
fn same_file_from_index(
    ctx: &Ctx,
    project: &str,
    pin: &PinnedRelease,
    f: &DistFile,
    e: String,
    hunks: &[FileHunks],
    gold: &[String],
) -> Result<(DistFile, Scored), String> {
    let g = file_on_index(ctx, project, pin).map_err(|e2| format!("{e}; {e2}"))?;
    if !g.sha256.eq_ignore_ascii_case(&f.sha256) {
        return Err(format!(
            "{e}; the index offers {} (sha256 {}) for {project}=={}, not the pinned {} (sha256 {})",
            g.filename, g.sha256, pin.version, f.filename, f.sha256
        ));
    }
    let r = evaluate(ctx, &g, hunks, gold).map_err(|e2| format!("{e}; {e2}"))?;
    Ok((g, r))
}

/// The release that fits the gold patch best, searched among the project's releases
/// ([`search_finals_then_all`]).
fn choose_searched(
    ctx: &Ctx,
    project: &str,
    hunks: &[FileHunks],
    gold: &[String],
) -> Result<Chosen, String> {
    let rel = releases(ctx, project)?;
    let mut scoring = Scoring {
        ctx,
        rel: &rel,
        hunks,
        gold,
        results: HashMap::new(),
        errors: HashMap::new(),
    };
    let prerelease: Vec<bool> = rel.iter().map(|r| r.parsed.is_prerelease()).collect();
    let best = search_finals_then_all(&prerelease, ctx.opts.max_candidates, &mut |i| {
        scoring.fit(i)
    });
    let evaluated = scoring.evaluated();
    let Some((fit, mapping, path)) = scoring.results.remove(&best) else {
        return Err(format!(
            "no release of {project} could be read: {}",
            scoring.errors.get(&best).cloned().unwrap_or_default()
        ));
    };
    Ok(Chosen {
        version: rel[best].version.clone(),
        file: rel[best].file.clone(),
        fit,
        mapping,
        path,
        evaluated,
    })
}

/// The releases scored while searching, by index into the release list: each is read
/// once; one that cannot be read scores [`Fit::default`] and keeps its error.
struct Scoring<'a, 'c> {
    ctx: &'a Ctx<'c>,
    rel: &'a [Release],
    hunks: &'a [FileHunks],
    gold: &'a [String],
    results: HashMap<usize, Scored>,
    errors: HashMap<usize, String>,
}

impl Scoring<'_, '_> {
    fn fit(&mut self, i: usize) -> Fit {
        if let Some(r) = self.results.get(&i) {
            return r.0;
        }
        if self.errors.contains_key(&i) {
            return Fit::default();
        }
        match evaluate(self.ctx, &self.rel[i].file, self.hunks, self.gold) {
            Ok((fit, m, p)) => {
                self.results.insert(i, (fit, m, p));
                fit
            }
            Err(e) => {
                self.errors.insert(i, e);
                Fit::default()
            }
        }
    }

    /// The releases read, oldest first.
    fn evaluated(&self) -> Vec<Evaluated> {
        let mut read: Vec<usize> = self
            .results
            .keys()
            .chain(self.errors.keys())
            .copied()
            .collect();
        read.sort_unstable();
        read.iter()
            .map(|i| Evaluated {
                version: self.rel[*i].version.clone(),
                fit: self.results.get(i).map(|r| r.0).unwrap_or_default(),
                error: self.errors.get(i).cloned(),
            })
            .collect()
    }
}

/// [`search_release`] over the final releases (`prerelease[i]` false) first, then, when
/// none fits exactly, over all releases (a base commit between an rc and the final
/// release); the better of the two candidates ([`fit_key`]). Returns the index into
/// `prerelease` (releases oldest first, at least one).
pub fn search_finals_then_all(
    prerelease: &[bool],
    max_evals: usize,
    eval: &mut dyn FnMut(usize) -> Fit,
) -> usize {
    let finals: Vec<usize> = (0..prerelease.len()).filter(|&i| !prerelease[i]).collect();
    let all: Vec<usize> = (0..prerelease.len()).collect();
    let mut best: Option<(usize, Fit)> = None;
    for set in [&finals, &all] {
        if set.is_empty() || best.is_some_and(|(_, f)| f.exact()) {
            continue;
        }
        // No pre-release: the second search would repeat the first.
        if best.is_some() && set.len() == finals.len() {
            continue;
        }
        let (b, fits) = search_release(set.len(), max_evals, &mut |k| eval(set[k]));
        let fb = fits
            .iter()
            .find(|(k, _)| *k == b)
            .map(|x| x.1)
            .unwrap_or_default();
        if best.is_none_or(|(i, f)| fit_key(set[b], &fb) > fit_key(i, &f)) {
            best = Some((set[b], fb));
        }
    }
    best.expect("a project has releases").0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn maps_repos_to_projects() {
        assert_eq!(pypi_project("psf/requests"), "requests");
        assert_eq!(pypi_project("django/django"), "Django");
        assert_eq!(pypi_project("Pallets/Flask"), "Flask");
        assert_eq!(pypi_project("owner/some-lib"), "some-lib");
    }

    #[test]
    fn chooses_src_mapping() {
        // A wheel (no tests, no src/) for a repo with a src/ layout.
        let wheel = s(&[
            "flask/app.py",
            "flask/__init__.py",
            "Flask-2.0.dist-info/METADATA",
        ]);
        let gold = s(&["src/flask/app.py", "src/flask/helpers.py"]);
        assert_eq!(
            choose_mapping(&wheel, &gold),
            ((String::new(), "src/".to_string()), 1)
        );
        // An sdist with src/ for gold paths without it.
        let sdist = s(&["src/pkg/a.py", "tests/test_a.py", "setup.py"]);
        let gold2 = s(&["pkg/a.py"]);
        assert_eq!(
            choose_mapping(&sdist, &gold2),
            (("src/".to_string(), String::new()), 1)
        );
        // Already matching: identity, even though other pairs exist.
        let same = s(&["requests/models.py", "requests/packages/x/models.py"]);
        assert_eq!(
            choose_mapping(&same, &s(&["requests/models.py"])),
            ((String::new(), String::new()), 1)
        );
        // Nothing matches: identity, count 0.
        assert_eq!(
            choose_mapping(&same, &s(&["other.py"])),
            ((String::new(), String::new()), 0)
        );
        let m = PathMapping {
            strip_top: "Flask-2.0/".into(),
            from: String::new(),
            to: "src/".into(),
        };
        assert_eq!(
            m.apply("Flask-2.0/flask/app.py").as_deref(),
            Some("src/flask/app.py")
        );
        assert_eq!(m.apply("other/x.py"), None);
        assert_eq!(
            common_top(&s(&["a-1/x", "a-1/y/z"])).as_deref(),
            Some("a-1/")
        );
        assert_eq!(common_top(&s(&["a-1/x", "b"])), None);
    }

    #[test]
    fn chooses_files_and_parses_index() {
        let json = r#"{"releases": {
            "1.0": [{"filename": "p-1.0.tar.bz2", "url": "u", "packagetype": "sdist", "digests": {"sha256": "aa"}}],
            "1.1": [{"filename": "p-1.1-py3-none-any.whl", "url": "w", "packagetype": "bdist_wheel", "digests": {"sha256": "bb"}},
                    {"filename": "p-1.1.tar.gz", "url": "t", "packagetype": "sdist", "digests": {"sha256": "cc"}}],
            "1.10": [{"filename": "p-1.10-cp38-cp38-manylinux.whl", "url": "m", "packagetype": "bdist_wheel", "digests": {"sha256": "dd"}},
                     {"filename": "p-1.10-py3-none-any.whl", "url": "n", "packagetype": "bdist_wheel", "digests": {"sha256": "ee"}}],
            "1.2": [{"filename": "p-1.2.zip", "url": "z", "packagetype": "sdist", "digests": {"sha256": "ff"}}],
            "2.0rc1": [{"filename": "p-2.0rc1.tar.gz", "url": "r", "packagetype": "sdist", "digests": {"sha256": "gg"}}],
            "1.3": []
        }}"#;
        let rel = parse_index(json, "").unwrap();
        let got: Vec<(&str, &str)> = rel
            .iter()
            .map(|r| (r.version.as_str(), r.file.url.as_str()))
            .collect();
        assert_eq!(
            got,
            [("1.1", "t"), ("1.2", "z"), ("1.10", "n"), ("2.0rc1", "r")]
        );
        assert!(rel[3].parsed.is_prerelease());
        assert!(parse_index("{}", "").is_err());
        let base = "https://pypi.org/pypi/pytest/json";
        assert_eq!(
            resolve_url(base, "../../packages/packages/b0/x.zip"),
            "https://pypi.org/packages/packages/b0/x.zip"
        );
        assert_eq!(resolve_url(base, "/a/b.tgz"), "https://pypi.org/a/b.tgz");
        assert_eq!(resolve_url(base, "https://h/x"), "https://h/x");
        assert_eq!(
            resolve_url("file:///tmp/i/p/json", "../d/p.tgz"),
            "file:///tmp/i/d/p.tgz"
        );
    }

    /// A fake history: releases 0..n, the fix lands in release `fix`; releases before
    /// `drift` have drifted context (pre fit 1 of 2).
    fn history(n: usize, fix: usize, drift: usize) -> impl Fn(usize) -> Fit {
        move |i| {
            let mut f = Fit {
                hunks: 2,
                files: 1,
                files_present: 1,
                ..Fit::default()
            };
            if i >= fix {
                f.post = 2;
            } else if i >= drift {
                f.pre = 2;
                f.pre_at_line = if i + 1 == fix { 2 } else { 0 };
            } else {
                f.pre = 1;
            }
            assert!(i < n);
            f
        }
    }

    #[test]
    fn binary_search_finds_the_release_before_the_fix() {
        for (n, fix) in [(64usize, 40usize), (64, 1), (7, 6), (100, 99), (1, 0)] {
            let h = history(n, fix, 0);
            let mut calls = 0;
            let (best, seen) = search_release(n, 16, &mut |i| {
                calls += 1;
                h(i)
            });
            let want = fix.saturating_sub(1);
            assert_eq!(best, want, "n={n} fix={fix}");
            assert!(
                calls <= (n as f64).log2().ceil() as usize + 5,
                "n={n}: {calls} evaluations"
            );
            assert_eq!(seen.len(), calls);
        }
        // Never fixed (the fix is not released yet): the newest release.
        let (best, _) = search_release(10, 16, &mut |_| Fit {
            hunks: 1,
            pre: 1,
            pre_at_line: 1,
            files: 1,
            files_present: 1,
            ..Fit::default()
        });
        assert_eq!(best, 9);
    }

    #[test]
    fn uninformative_releases_at_both_ends() {
        // 0..10 too old (nothing fits), 10..20 before the fix (19 exact), 20..25 fixed,
        // 25..60 refactored (nothing fits): the first binary search is misled to the
        // newest release; the coarse scan and bracket search recover release 19.
        let fit = |i: usize| {
            let mut f = Fit {
                hunks: 2,
                files: 1,
                files_present: 1,
                ..Fit::default()
            };
            match i {
                10..=19 => {
                    f.pre = 2;
                    f.pre_at_line = if i == 19 { 2 } else { 0 };
                }
                20..=24 => f.post = 2,
                _ => {}
            }
            f
        };
        let mut reads = 0;
        let (best, seen) = search_release(60, 24, &mut |i| {
            reads += 1;
            fit(i)
        });
        assert_eq!(best, 19, "{seen:?}");
        assert!(reads <= 20, "{reads} reads");
        // A before-window (33, 34) narrower than the scan's step (10) and missed by it:
        // the first scanned release that holds the fix (40) brackets it.
        let fit = |i: usize| {
            let mut f = Fit {
                hunks: 1,
                files: 1,
                files_present: 1,
                ..Fit::default()
            };
            match i {
                33..=34 => {
                    f.pre = 1;
                    f.pre_at_line = 1;
                }
                35..=42 => f.post = 1,
                _ => {}
            }
            f
        };
        let (best, seen) = search_release(80, 24, &mut |i| fit(i));
        assert_eq!(best, 34, "{seen:?}");
    }

    #[test]
    fn pre_releases_join_only_when_no_final_release_is_exact() {
        // 1.0, 1.1, 2.0rc1, 2.0: the fix lands in 2.0.
        let pre = [false, false, true, false];
        let fit = |exact_at: usize| {
            move |i: usize| {
                let mut f = Fit {
                    hunks: 1,
                    files: 1,
                    files_present: 1,
                    ..Fit::default()
                };
                match i {
                    3 => f.post = 1,
                    _ => {
                        f.pre = 1;
                        f.pre_at_line = usize::from(i == exact_at);
                    }
                }
                f
            }
        };
        // 1.1 is exact: the rc is never read.
        let mut read = vec![];
        let h = fit(1);
        let best = search_finals_then_all(&pre, 16, &mut |i| {
            read.push(i);
            h(i)
        });
        assert_eq!(best, 1);
        assert!(!read.contains(&2), "{read:?}");
        // The base commit is between the rc and 2.0: the rc wins.
        let h = fit(2);
        assert_eq!(search_finals_then_all(&pre, 16, &mut |i| h(i)), 2);
        // Only pre-releases.
        assert_eq!(
            search_finals_then_all(&[true, true], 16, &mut |_| Fit::default()),
            1
        );
    }

    #[test]
    fn neighbours_rescue_an_inexact_candidate() {
        // The release right before the fix has an offset; the one before it is exact.
        let fit = |i: usize| {
            let mut f = Fit {
                hunks: 1,
                files: 1,
                files_present: 1,
                ..Fit::default()
            };
            match i {
                0..=5 => {
                    f.pre = 1;
                    f.pre_at_line = u8::from(i == 5) as usize;
                }
                6 => f.pre = 1,
                _ => f.post = 1,
            }
            f
        };
        let (best, _) = search_release(12, 16, &mut |i| fit(i));
        assert_eq!(best, 5);
    }
}

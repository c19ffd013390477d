//! `repos::prepare` end to end: the git source against local repositories (file://),
//! the PyPI source against a local index (file://) and, with network, real PyPI.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use tooltrain_data::repos::fit::{patch_fit, patch_hunks, scored_paths};
use tooltrain_data::repos::pypi::sha256_file;
use tooltrain_data::repos::{
    self, read_marker, Outcome, PinnedRelease, PrepareOptions, PrepareReport, Provenance,
    SourceKind, Status,
};
use tooltrain_rollout::dataset::{load_dataset, Instance};

fn git(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(args)
        .env("GIT_AUTHOR_NAME", "t")
        .env("GIT_AUTHOR_EMAIL", "t@example.com")
        .env("GIT_COMMITTER_NAME", "t")
        .env("GIT_COMMITTER_EMAIL", "t@example.com")
        .output()
        .expect("run git");
    assert!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn write(root: &Path, rel: &str, text: &str) {
    let p = root.join(rel);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, text).unwrap();
}

fn commit_all(repo: &Path, msg: &str) -> String {
    git(repo, &["add", "-A"]);
    git(repo, &["commit", "-q", "-m", msg]);
    git(repo, &["rev-parse", "HEAD"])
}

fn inst(id: &str, repo: &str, commit: &str, patch: &str) -> Instance {
    Instance {
        instance_id: id.into(),
        repo: repo.into(),
        base_commit: commit.into(),
        problem_statement: "issue".into(),
        patch: patch.into(),
    }
}

fn run(instances: &[Instance], unknown: &[String], opts: &PrepareOptions) -> PrepareReport {
    let seen = std::sync::Mutex::new(Vec::<Outcome>::new());
    let r = repos::prepare(instances, unknown, opts, &|o| {
        seen.lock().unwrap().push(o.clone())
    })
    .unwrap();
    assert_eq!(seen.into_inner().unwrap().len(), r.instances.len());
    r
}

fn status_of(r: &PrepareReport, id: &str) -> (Status, String) {
    let o = r
        .instances
        .iter()
        .find(|o| o.instance_id == id)
        .unwrap_or_else(|| panic!("{id} not in the report"));
    (o.status, o.detail.clone())
}

/// Taken by every test here, so that they run one at a time: `prepare` holds an flock on
/// its repos directory, and a process that another test spawns (git) holds a copy of the
/// lock's descriptor between its fork and its exec, so a test's next run on the same
/// directory could find the lock still held ("another `repos prepare` is running").
fn serial() -> std::sync::MutexGuard<'static, ()> {
    static M: std::sync::Mutex<()> = std::sync::Mutex::new(());
    M.lock().unwrap_or_else(|e| e.into_inner())
}

fn read(p: PathBuf) -> String {
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

#[test]
fn git_source_checks_out_each_commit_once_per_repo_and_resumes() {
    let _serial = serial();
    let t = tempfile::tempdir().unwrap();
    let origin = t.path().join("mirror/proj");
    std::fs::create_dir_all(&origin).unwrap();
    git(&origin, &["init", "-q", "-b", "main"]);
    write(&origin, "pkg/a.py", "def f():\n    return 1\n");
    write(&origin, "README", "v1\n");
    let c1 = commit_all(&origin, "one");
    write(&origin, "pkg/a.py", "def f():\n    return 2\n");
    write(&origin, "pkg/b.py", "X = 1\n");
    let c2 = commit_all(&origin, "two");

    let dir = t.path().join("repos");
    let mut opts = PrepareOptions::new(&dir);
    opts.source = SourceKind::Git;
    opts.jobs = 3;
    opts.min_free_gb = 0.0;
    opts.git_url_template = format!("file://{}/mirror/{{name}}", t.path().display());
    let instances = vec![
        inst("p__proj-1", "local/proj", &c1, ""),
        inst("p__proj-2", "local/proj", &c2, ""),
        inst("p__gone-1", "local/gone", &c1, ""),
    ];
    let r = run(&instances, &["nope__nope-1".to_string()], &opts);
    assert_eq!((r.prepared, r.failed, r.skipped), (2, 2, 0), "{r:#?}");
    assert_eq!(
        read(dir.join("p__proj-1/pkg/a.py")),
        "def f():\n    return 1\n"
    );
    assert!(!dir.join("p__proj-1/pkg/b.py").exists());
    assert_eq!(read(dir.join("p__proj-1/README")), "v1\n");
    assert_eq!(
        read(dir.join("p__proj-2/pkg/a.py")),
        "def f():\n    return 2\n"
    );
    assert_eq!(read(dir.join("p__proj-2/pkg/b.py")), "X = 1\n");
    let m = read_marker(&dir, "p__proj-2").expect("marker");
    assert!(matches!(&m.provenance, Provenance::Git { commit, .. } if *commit == c2));
    // Per-instance failures, not a crash: the missing repository and the unknown id.
    let (s, d) = status_of(&r, "p__gone-1");
    assert_eq!(s, Status::Failed);
    assert!(d.contains("git clone"), "{d}");
    assert!(!dir.join("p__gone-1").exists());
    let (s, d) = status_of(&r, "nope__nope-1");
    assert_eq!(s, Status::Failed);
    assert!(d.contains("unknown instance id"), "{d}");
    // The report on disk says the same.
    let on_disk: PrepareReport =
        serde_json::from_str(&read(dir.join("prepare-report.json"))).unwrap();
    assert_eq!(on_disk.failed, 2);
    // One clone for the repository, none left half-made.
    let clones: Vec<String> = std::fs::read_dir(dir.join(".cache/git"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(clones, ["local__proj.git"]);
    // No temp trees left.
    assert!(std::fs::read_dir(&dir).unwrap().all(|e| !e
        .unwrap()
        .file_name()
        .to_string_lossy()
        .starts_with(".tmp-")));

    // Resume: markers skip; a tree without marker is rebuilt (a stray file vanishes);
    // a new commit pushed after the clone is fetched into the cached clone.
    std::fs::remove_file(dir.join("p__proj-1.source.json")).unwrap();
    write(&dir, "p__proj-1/stray.txt", "half-made");
    write(&origin, "pkg/c.py", "Y = 2\n");
    let c3 = commit_all(&origin, "three");
    let instances = vec![
        inst("p__proj-1", "local/proj", &c1, ""),
        inst("p__proj-2", "local/proj", &c2, ""),
        inst("p__proj-3", "local/proj", &c3, ""),
    ];
    let r = run(&instances, &[], &opts);
    assert_eq!(status_of(&r, "p__proj-2").0, Status::Skipped);
    assert_eq!(status_of(&r, "p__proj-1").0, Status::Prepared);
    assert_eq!(status_of(&r, "p__proj-3").0, Status::Prepared, "{r:#?}");
    assert!(!dir.join("p__proj-1/stray.txt").exists());
    assert_eq!(read(dir.join("p__proj-3/pkg/c.py")), "Y = 2\n");

    // Too little disk space: nothing more starts, and the report says why.
    let mut low = opts.clone();
    low.min_free_gb = 1e12;
    low.force = true;
    let r = run(&instances[..1], &[], &low);
    assert_eq!(r.not_started, 1);
    assert!(r.stopped.as_deref().unwrap().contains("--min-free-gb"));
    // ... and the existing tree was left alone.
    assert!(read_marker(&dir, "p__proj-1").is_some());
}

/// A fake PyPI project under `root`: releases as sdists (`name-version/` top dir) or
/// wheels, with an index JSON at `root/index/<project>/json` and file:// URLs.
struct FakeProject {
    root: PathBuf,
    project: String,
    releases: BTreeMap<String, Vec<serde_json::Value>>,
}

impl FakeProject {
    fn new(root: &Path, project: &str) -> Self {
        FakeProject {
            root: root.to_path_buf(),
            project: project.into(),
            releases: BTreeMap::new(),
        }
    }

    fn add(&mut self, version: &str, wheel: bool, files: &[(&str, &str)]) {
        let dist = self.root.join("dist");
        std::fs::create_dir_all(&dist).unwrap();
        let (filename, packagetype) = if wheel {
            (
                format!("{}-{version}-py3-none-any.whl", self.project),
                "bdist_wheel",
            )
        } else {
            (format!("{}-{version}.tar.gz", self.project), "sdist")
        };
        let path = dist.join(&filename);
        if wheel {
            let mut z = zip::ZipWriter::new(std::fs::File::create(&path).unwrap());
            for (p, text) in files {
                z.start_file(*p, zip::write::SimpleFileOptions::default())
                    .unwrap();
                std::io::Write::write_all(&mut z, text.as_bytes()).unwrap();
            }
            z.finish().unwrap();
        } else {
            let gz = flate2::write::GzEncoder::new(
                std::fs::File::create(&path).unwrap(),
                flate2::Compression::fast(),
            );
            let mut b = tar::Builder::new(gz);
            for (p, text) in files {
                let mut h = tar::Header::new_gnu();
                h.set_size(text.len() as u64);
                h.set_mode(0o644);
                h.set_entry_type(tar::EntryType::Regular);
                b.append_data(
                    &mut h,
                    format!("{}-{version}/{p}", self.project),
                    text.as_bytes(),
                )
                .unwrap();
            }
            b.into_inner().unwrap().finish().unwrap();
        }
        let sha = sha256_file(&path).unwrap();
        self.releases.insert(
            version.into(),
            vec![serde_json::json!({
                "filename": filename,
                "url": format!("file://{}", path.display()),
                "packagetype": packagetype,
                "digests": {"sha256": sha},
                "size": 1,
                "upload_time": "2020-01-01T00:00:00",
            })],
        );
    }

    /// Write the index; returns the `pypi_index` base URL.
    fn publish(&self) -> String {
        let dir = self.root.join("index").join(&self.project);
        std::fs::create_dir_all(&dir).unwrap();
        let json = serde_json::json!({"info": {}, "releases": self.releases});
        std::fs::write(dir.join("json"), json.to_string()).unwrap();
        format!("file://{}/index", self.root.display())
    }
}

fn pin_13() -> PinnedRelease {
    PinnedRelease {
        project: "proj".into(),
        version: "1.3".into(),
        filename: None,
        url: None,
        sha256: None,
        fit: None,
    }
}

/// Module text of release `n` of the fake project: the fix (`return x + 1`) lands in
/// release 5; release 4 is what the gold patch was made against; older releases have
/// more lines at the top (the patch applies to them, at an offset).
fn module(n: usize) -> String {
    let header = "# old\n".repeat(4usize.saturating_sub(n));
    let body = if n >= 5 { "x + 1" } else { "x" };
    format!("{header}import os\n\n\ndef f(x):\n    # v\n    return {body}\n")
}

const GOLD: &str = "diff --git a/proj/core.py b/proj/core.py\n--- a/proj/core.py\n+++ b/proj/core.py\n@@ -4,3 +4,3 @@\n def f(x):\n     # v\n-    return x\n+    return x + 1\n";

#[test]
fn pypi_source_picks_the_release_before_the_fix() {
    let _serial = serial();
    let t = tempfile::tempdir().unwrap();
    let mut fake = FakeProject::new(t.path(), "proj");
    for n in 0..9 {
        let text = module(n);
        fake.add(
            &format!("1.{n}"),
            false,
            &[
                ("proj/core.py", text.as_str()),
                ("proj/__init__.py", ""),
                ("tests/test_core.py", "def test(): pass\n"),
                ("setup.py", "from setuptools import setup\n"),
            ],
        );
    }
    // A pre-release after the fix must not be considered.
    fake.add("2.0rc1", false, &[("proj/core.py", "x = 1\n")]);
    let index = fake.publish();
    let dir = t.path().join("repos");
    let mut opts = PrepareOptions::new(&dir);
    opts.source = SourceKind::Pypi;
    opts.pypi_index = index.clone();
    opts.min_free_gb = 0.0;
    opts.jobs = 2;
    let i1 = inst("o__proj-1", "someone/proj", &"a".repeat(40), GOLD);
    let r = run(std::slice::from_ref(&i1), &[], &opts);
    assert_eq!(r.prepared, 1, "{r:#?}");
    let m = read_marker(&dir, "o__proj-1").unwrap();
    let Provenance::Pypi {
        version,
        fit,
        mapping,
        evaluated,
        pinned,
        ..
    } = &m.provenance
    else {
        panic!("not pypi: {m:?}")
    };
    assert_eq!(version, "1.4");
    assert!(fit.exact() && fit.post == 0, "{fit:?}");
    assert_eq!(mapping.strip_top, "proj-1.4/");
    assert!(!pinned);
    // A binary search: far fewer reads than the 9 releases.
    assert!(evaluated.len() <= 5, "{evaluated:?}");
    // The tree: top directory stripped, every file there.
    assert_eq!(read(dir.join("o__proj-1/proj/core.py")), module(4));
    assert!(dir.join("o__proj-1/tests/test_core.py").is_file());
    assert!(dir.join("o__proj-1/setup.py").is_file());
    // The chosen release went to the manifest, with its file and digest.
    let man = repos::load_manifest(&dir.join("pypi-manifest.json")).unwrap();
    let pin = &man["o__proj-1"];
    assert_eq!(
        (pin.project.as_str(), pin.version.as_str()),
        ("proj", "1.4")
    );
    assert!(pin.sha256.as_deref().is_some_and(|s| s.len() == 64));

    // Pinned by a manifest: no search, the pinned release (a worse fit) is used.
    let dir2 = t.path().join("repos2");
    let mut opts2 = opts.clone();
    opts2.repos_dir = dir2.clone();
    opts2.cache_dir = dir.join(".cache");
    opts2.manifest = BTreeMap::from([(
        "o__proj-1".to_string(),
        PinnedRelease {
            project: "proj".into(),
            version: "1.2".into(),
            filename: None,
            url: None,
            sha256: None,
            fit: None,
        },
    )]);
    let r = run(std::slice::from_ref(&i1), &[], &opts2);
    assert_eq!(r.prepared, 1, "{r:#?}");
    let m = read_marker(&dir2, "o__proj-1").unwrap();
    let Provenance::Pypi {
        version,
        fit,
        pinned,
        ..
    } = &m.provenance
    else {
        panic!()
    };
    assert_eq!((version.as_str(), *pinned), ("1.2", true));
    assert!(fit.pre_perfect() && !fit.exact(), "{fit:?}");

    // A pinned file whose URL is gone (another mirror): the same file from the index.
    let dir4 = t.path().join("repos4");
    let mut opts4 = opts.clone();
    opts4.repos_dir = dir4.clone();
    opts4.cache_dir = t.path().join("cache4");
    opts4.manifest = BTreeMap::from([(
        "o__proj-1".to_string(),
        PinnedRelease {
            url: Some(format!(
                "file://{}/gone/proj-1.3.tar.gz",
                t.path().display()
            )),
            filename: Some("proj-1.3.tar.gz".into()),
            sha256: Some(sha256_file(&t.path().join("dist/proj-1.3.tar.gz")).unwrap()),
            ..pin_13()
        },
    )]);
    let r = run(std::slice::from_ref(&i1), &[], &opts4);
    assert_eq!(r.prepared, 1, "{r:#?}");
    let m = read_marker(&dir4, "o__proj-1").unwrap();
    assert!(
        matches!(&m.provenance, Provenance::Pypi { version, url, .. } if version == "1.3" && url.contains("/dist/"))
    );
    // ... but not another file than the pinned one.
    opts4.force = true;
    opts4.manifest.get_mut("o__proj-1").unwrap().sha256 = Some("e".repeat(64));
    let r = run(std::slice::from_ref(&i1), &[], &opts4);
    let (s, d) = status_of(&r, "o__proj-1");
    assert_eq!(s, Status::Failed);
    assert!(d.contains("not the pinned"), "{d}");
    // The failed rebuild left the complete tree and its marker alone.
    assert!(read_marker(&dir4, "o__proj-1").is_some());

    // A release whose digest does not match is a per-instance failure.
    let json_path = t.path().join("index/proj/json");
    let mut v: serde_json::Value = serde_json::from_str(&read(json_path.clone())).unwrap();
    for files in v["releases"].as_object_mut().unwrap().values_mut() {
        files[0]["digests"]["sha256"] = serde_json::json!("f".repeat(64));
    }
    std::fs::write(&json_path, v.to_string()).unwrap();
    let mut opts3 = opts.clone();
    opts3.repos_dir = t.path().join("repos3");
    opts3.cache_dir = t.path().join("cache3");
    let r = run(&[i1], &[], &opts3);
    let (s, d) = status_of(&r, "o__proj-1");
    assert_eq!(s, Status::Failed);
    assert!(d.contains("sha256 mismatch"), "{d}");
}

#[test]
fn pypi_wheel_is_mapped_into_a_src_layout() {
    let _serial = serial();
    let t = tempfile::tempdir().unwrap();
    let mut fake = FakeProject::new(t.path(), "wproj");
    let text = "def g():\n    return 1\n";
    fake.add(
        "0.1",
        true,
        &[
            ("wproj/core.py", text),
            ("wproj-0.1.dist-info/METADATA", "Name: wproj\n"),
        ],
    );
    let index = fake.publish();
    let gold = "diff --git a/src/wproj/core.py b/src/wproj/core.py\n--- a/src/wproj/core.py\n+++ b/src/wproj/core.py\n@@ -1,2 +1,2 @@\n def g():\n-    return 1\n+    return 2\n";
    let dir = t.path().join("repos");
    let mut opts = PrepareOptions::new(&dir);
    opts.source = SourceKind::Pypi;
    opts.pypi_index = index;
    opts.min_free_gb = 0.0;
    // Auto: git fails (nothing at the URL), PyPI takes over, the marker says why.
    opts.source = SourceKind::Auto;
    opts.git_url_template = format!("file://{}/no-such-mirror/{{name}}", t.path().display());
    let r = run(
        &[inst("w__wproj-1", "x/wproj", &"b".repeat(40), gold)],
        &[],
        &opts,
    );
    assert_eq!(r.prepared, 1, "{r:#?}");
    assert_eq!(read(dir.join("w__wproj-1/src/wproj/core.py")), text);
    let m = read_marker(&dir, "w__wproj-1").unwrap();
    assert!(m.git_error.is_some());
    let Provenance::Pypi { mapping, fit, .. } = &m.provenance else {
        panic!()
    };
    assert_eq!((mapping.from.as_str(), mapping.to.as_str()), ("", "src/"));
    assert!(fit.exact());
}

fn swebench_verified() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data/swebench/swebench_verified.jsonl")
}

/// Real PyPI: two CI instances searched from scratch (no manifest): every gold-patch
/// file is in the tree, the pre-image fit is perfect, and the release is the one pinned
/// in data/ci/pypi-manifest.json. Network; runs when `TOOLTRAIN_NET_TESTS=1` or
/// `CI=true`, else skips with a message.
#[test]
fn pypi_real_instances() {
    let _serial = serial();
    let ci = std::env::var("CI").is_ok_and(|v| v == "true");
    if !(ci || std::env::var("TOOLTRAIN_NET_TESTS").is_ok_and(|v| v == "1")) {
        eprintln!("skipping pypi_real_instances: set TOOLTRAIN_NET_TESTS=1 (or CI=true) to download from PyPI");
        return;
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let data = swebench_verified();
    let dataset = load_dataset(&data).unwrap();
    let ids = [
        "psf__requests-2317".to_string(),
        "pallets__flask-5014".to_string(),
    ];
    let (instances, unknown) = repos::select_instances(&dataset, Some(&ids), None);
    assert!(unknown.is_empty(), "{unknown:?} not in {}", data.display());
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("repos");
    let mut opts = PrepareOptions::new(&dir);
    opts.source = SourceKind::Pypi;
    opts.min_free_gb = 0.5;
    let r = run(&instances, &[], &opts);
    assert_eq!(r.prepared, 2, "{r:#?}");
    for inst in &instances {
        let tree = dir.join(&inst.instance_id);
        let hunks = patch_hunks(&inst.patch).unwrap();
        for p in scored_paths(&hunks) {
            assert!(tree.join(&p).is_file(), "{}: {p} missing", inst.instance_id);
        }
        let files: BTreeMap<String, Vec<u8>> = scored_paths(&hunks)
            .into_iter()
            .map(|p| {
                let b = std::fs::read(tree.join(&p)).unwrap();
                (p, b)
            })
            .collect();
        let fit = patch_fit(&hunks, |p| files.get(p).map(Vec::as_slice));
        assert!(fit.pre_perfect(), "{}: {fit:?}", inst.instance_id);
        let m = read_marker(&dir, &inst.instance_id).unwrap();
        assert!(matches!(&m.provenance, Provenance::Pypi { fit: f, .. } if *f == fit));
        // The search finds the release pinned for CI.
        let pinned = repos::load_manifest(&root.join("data/ci/pypi-manifest.json")).unwrap();
        if let (Some(pin), Provenance::Pypi { version, .. }) =
            (pinned.get(&inst.instance_id), &m.provenance)
        {
            assert_eq!(&pin.version, version, "{}", inst.instance_id);
        }
        eprintln!("{}: {}", inst.instance_id, m.provenance.summary());
    }
}

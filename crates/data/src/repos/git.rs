//! The git source: one bare clone per repository under `<cache>/git/<owner>__<name>.git`
//! (made once, reused by every instance and every later run), the base commit fetched
//! when the clone lacks it, and `git archive <commit>` unpacked into the instance's
//! directory. Runs the `git` binary.

use super::archive;
use super::{Ctx, Provenance};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use tooltrain_rollout::dataset::Instance;

/// A `git` command with no prompts (a missing repository must fail, not ask for a
/// password).
fn git() -> Command {
    let mut c = Command::new("git");
    c.env("GIT_TERMINAL_PROMPT", "0")
        .env("GIT_ASKPASS", "")
        .env("SSH_ASKPASS", "")
        .env("LC_ALL", "C")
        // A stalled transfer (under 1 KB/s for a minute) fails instead of hanging.
        .env("GIT_HTTP_LOW_SPEED_LIMIT", "1000")
        .env("GIT_HTTP_LOW_SPEED_TIME", "60")
        .stdin(Stdio::null());
    c
}

/// Run a git command; on failure, the line of its stderr that says what failed
/// ([`failure_line`]) in the error.
fn run(cmd: &mut Command, what: &str) -> Result<(), String> {
    let out = cmd
        .output()
        .map_err(|e| format!("{what}: cannot run git: {e}"))?;
    if out.status.success() {
        return Ok(());
    }
    let err = String::from_utf8_lossy(&out.stderr);
    Err(format!(
        "{what} failed ({}): {}",
        out.status,
        failure_line(&err)
    ))
}

/// The line of git's stderr that says what failed: the first line starting with
/// `fatal:` or `error:` (any case: GitHub's ssh answers `ERROR: Repository not found.`),
/// else the last non-empty line. Git often ends with advice ("Please make sure you have
/// the correct access rights / and the repository exists.") that names no cause.
pub fn failure_line(stderr: &str) -> &str {
    let lines = || stderr.lines().map(str::trim).filter(|l| !l.is_empty());
    let says_what = |l: &&str| {
        let head = l.get(..6).unwrap_or("").to_ascii_lowercase();
        head == "fatal:" || head == "error:"
    };
    lines()
        .find(says_what)
        .or_else(|| lines().next_back())
        .unwrap_or("")
}

/// The clone URL of `owner/name` from a template with `{repo}`, `{owner}`, `{name}`.
pub fn clone_url(template: &str, repo: &str) -> String {
    let (owner, name) = repo.split_once('/').unwrap_or(("", repo));
    template
        .replace("{repo}", repo)
        .replace("{owner}", owner)
        .replace("{name}", name)
}

/// `owner/name` with safe characters only.
pub fn valid_repo(repo: &str) -> bool {
    let ok = |s: &str| {
        !s.is_empty()
            && !s.starts_with('.')
            && !s.starts_with('-')
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
    };
    matches!(repo.split_once('/'), Some((o, n)) if ok(o) && ok(n))
}

/// A full or abbreviated hexadecimal commit id.
pub fn valid_commit(c: &str) -> bool {
    (7..=40).contains(&c.len()) && c.bytes().all(|b| b.is_ascii_hexdigit())
}

fn has_commit(dir: &Path, commit: &str) -> bool {
    git()
        .arg("-C")
        .arg(dir)
        .args(["cat-file", "-e", &format!("{commit}^{{commit}}")])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// The bare clone of a repository, made on first use.
fn ensure_clone(ctx: &Ctx, repo: &str, url: &str) -> Result<PathBuf, String> {
    ctx.clones.get_or_init(repo, || {
        let root = ctx.opts.cache_dir.join("git");
        let dir = root.join(format!("{}.git", repo.replace('/', "__")));
        if dir.join("HEAD").is_file()
            && git()
                .arg("-C")
                .arg(&dir)
                .args(["rev-parse", "--git-dir"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        {
            return Ok(dir);
        }
        std::fs::create_dir_all(&root).map_err(|e| format!("{}: {e}", root.display()))?;
        let tmp = root.join(format!(
            ".tmp-{}-{}.git",
            repo.replace('/', "__"),
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&tmp);
        let res = run(
            git().args(["clone", "--bare", "--quiet", url]).arg(&tmp),
            &format!("git clone {url}"),
        )
        .and_then(|()| {
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::rename(&tmp, &dir).map_err(|e| format!("{}: {e}", dir.display()))
        });
        if res.is_err() {
            let _ = std::fs::remove_dir_all(&tmp);
        }
        res.map(|()| dir)
    })
}

/// Build `dest` (an empty directory) from `inst.base_commit` of its repository.
pub(super) fn prepare(ctx: &Ctx, inst: &Instance, dest: &Path) -> Result<Provenance, String> {
    if !valid_repo(&inst.repo) {
        return Err(format!("repo {:?} is not `owner/name`", inst.repo));
    }
    if !valid_commit(&inst.base_commit) {
        return Err(format!(
            "base_commit {:?} is not a hexadecimal commit id",
            inst.base_commit
        ));
    }
    let url = clone_url(&ctx.opts.git_url_template, &inst.repo);
    let dir = ensure_clone(ctx, &inst.repo, &url)?;
    let commit = inst.base_commit.as_str();
    {
        // One fetch at a time per repository.
        let lock = ctx.git_locks.get_or_init(&inst.repo, Default::default);
        let _guard = lock.lock().unwrap_or_else(|e| e.into_inner());
        if !has_commit(&dir, commit) {
            // Update all branches and tags first (cheap), then ask for the commit itself.
            let _ = run(
                git().arg("-C").arg(&dir).args([
                    "fetch",
                    "--quiet",
                    "origin",
                    "+refs/heads/*:refs/heads/*",
                    "+refs/tags/*:refs/tags/*",
                ]),
                "git fetch",
            );
            if !has_commit(&dir, commit) {
                run(
                    git()
                        .arg("-C")
                        .arg(&dir)
                        .args(["fetch", "--quiet", "origin", commit]),
                    &format!("git fetch {commit}"),
                )?;
            }
            if !has_commit(&dir, commit) {
                return Err(format!("commit {commit} not found in {url}"));
            }
        }
    }
    let mut child = git()
        .arg("-C")
        .arg(&dir)
        .args(["archive", "--format=tar", commit])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("git archive: cannot run git: {e}"))?;
    let stdout = child.stdout.take().expect("piped");
    let mut n = 0usize;
    let res = archive::visit_tar(stdout, &mut |p, mode, r| {
        archive::write_file(dest, p, mode, r)?;
        n += 1;
        Ok(())
    });
    let out = child
        .wait_with_output()
        .map_err(|e| format!("git archive: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "git archive {commit} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let skipped = res.map_err(|e| format!("git archive {commit}: cannot unpack: {e}"))?;
    let full = git()
        .arg("-C")
        .arg(&dir)
        .args(["rev-parse", &format!("{commit}^{{commit}}")])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| commit.to_string());
    Ok(Provenance::Git {
        url,
        commit: full,
        files_written: n,
        entries_skipped: skipped.special + skipped.bad_names,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_and_validation() {
        assert_eq!(
            clone_url("https://github.com/{repo}.git", "psf/requests"),
            "https://github.com/psf/requests.git"
        );
        assert_eq!(
            clone_url("file:///m/{owner}/{name}", "psf/requests"),
            "file:///m/psf/requests"
        );
        assert!(valid_repo("scikit-learn/scikit-learn"));
        assert!(!valid_repo("a/../b") && !valid_repo("-x/y") && !valid_repo("nope"));
        assert!(valid_commit("0123abc") && !valid_commit("--upload-pack=x"));
    }

    #[test]
    fn failure_line_names_the_cause() {
        // `git clone git@github.com:o/missing.git`, as captured.
        let ssh = "Cloning into bare repository '/c/o__missing.git'...\nERROR: Repository not found.\nfatal: Could not read from remote repository.\n\nPlease make sure you have the correct access rights\nand the repository exists.\n";
        assert_eq!(failure_line(ssh), "ERROR: Repository not found.");
        // `git clone https://github.com/o/missing.git`.
        let https = "remote: Repository not found.\nfatal: repository 'https://github.com/o/missing.git/' not found\n";
        assert_eq!(
            failure_line(https),
            "fatal: repository 'https://github.com/o/missing.git/' not found"
        );
        // `git fetch origin <commit>` on a server that refuses unadvertised objects:
        // the first error is the cause, the later fatal its consequence.
        let fetch = "error: Server does not allow request for unadvertised object 0123abc\nfatal: could not fetch 0123abc from promisor remote\n";
        assert_eq!(
            failure_line(fetch),
            "error: Server does not allow request for unadvertised object 0123abc"
        );
        // No fatal/error line: the last non-empty one.
        assert_eq!(
            failure_line("warning: x\n  something broke  \n\n"),
            "something broke"
        );
        assert_eq!(failure_line(""), "");
        assert_eq!(failure_line("é\n"), "é");
    }

    #[test]
    fn failed_command_reports_the_fatal_line() {
        let d = tempfile::tempdir().unwrap();
        let e = run(
            git()
                .arg("-C")
                .arg(d.path())
                .args(["rev-parse", "--verify", "HEAD"]),
            "git rev-parse",
        )
        .unwrap_err();
        assert!(e.starts_with("git rev-parse failed ("), "{e}");
        assert!(e.contains("fatal: "), "{e}");
    }
}

//! Reading archives (`.tar.gz` / `.tgz` sdists, `.zip` sdists, `.whl` wheels, the tar
//! stream of `git archive`) file by file, and writing them out as a tree.
//!
//! Only regular files are visited. Paths are normalised to `/`-separated relative paths;
//! an entry with an absolute path, a `..` component or a non-UTF-8 name is skipped and
//! counted, so an archive can never write outside the tree. Symbolic links and other
//! special entries are skipped and counted too (the index reads `.py` files only).

use std::io::{self, Read};
use std::path::Path;

/// Archive formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ArchiveKind {
    /// gzip-compressed tar (`.tar.gz`, `.tgz`).
    TarGz,
    /// zip (`.zip`, `.whl`).
    Zip,
}

impl ArchiveKind {
    /// The kind of a file name, `None` for formats we do not read (`.tar.bz2`, `.egg`,
    /// `.exe`, ...).
    pub fn from_filename(name: &str) -> Option<ArchiveKind> {
        let n = name.to_ascii_lowercase();
        if n.ends_with(".tar.gz") || n.ends_with(".tgz") {
            Some(ArchiveKind::TarGz)
        } else if n.ends_with(".zip") || n.ends_with(".whl") {
            Some(ArchiveKind::Zip)
        } else {
            None
        }
    }
}

/// Entries that were not visited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Skipped {
    /// Symbolic links, hard links, devices, ...
    pub special: usize,
    /// Unsafe or non-UTF-8 names.
    pub bad_names: usize,
}

/// Normalise an archive entry name: `/`-separated, no `.`/empty components; `None` for
/// absolute names and names with `..`.
pub fn clean_path(name: &str) -> Option<String> {
    let name = name.replace('\\', "/");
    if name.starts_with('/') {
        return None;
    }
    let mut parts = Vec::new();
    for c in name.split('/') {
        match c {
            "" | "." => {}
            ".." => return None,
            c if c.contains(':') && parts.is_empty() && c.len() == 2 => return None,
            c => parts.push(c),
        }
    }
    (!parts.is_empty()).then(|| parts.join("/"))
}

/// A file visitor: `(clean path, unix mode, contents)`.
pub type Visitor<'a> = dyn FnMut(&str, u32, &mut dyn Read) -> io::Result<()> + 'a;

/// Visit the regular files of a tar stream.
pub fn visit_tar(reader: impl Read, f: &mut Visitor) -> io::Result<Skipped> {
    let mut skipped = Skipped::default();
    let mut ar = tar::Archive::new(reader);
    for entry in ar.entries()? {
        let mut entry = entry?;
        let kind = entry.header().entry_type();
        if !(kind.is_file() || kind == tar::EntryType::Continuous) {
            if !(kind.is_dir() || kind.is_pax_global_extensions() || kind.is_pax_local_extensions())
            {
                skipped.special += 1;
            }
            continue;
        }
        let path = entry.path()?;
        let Some(name) = path.to_str().and_then(clean_path) else {
            skipped.bad_names += 1;
            continue;
        };
        let mode = entry.header().mode().unwrap_or(0o644);
        f(&name, mode, &mut entry)?;
    }
    Ok(skipped)
}

/// Visit the regular files of an archive file.
pub fn visit(path: &Path, kind: ArchiveKind, f: &mut Visitor) -> io::Result<Skipped> {
    let file = std::fs::File::open(path)?;
    match kind {
        ArchiveKind::TarGz => visit_tar(flate2::read::GzDecoder::new(io::BufReader::new(file)), f),
        ArchiveKind::Zip => {
            let mut zip =
                zip::ZipArchive::new(io::BufReader::new(file)).map_err(io::Error::other)?;
            let mut skipped = Skipped::default();
            for i in 0..zip.len() {
                let mut entry = zip.by_index(i).map_err(io::Error::other)?;
                if entry.is_dir() {
                    continue;
                }
                if entry.is_symlink() || !entry.is_file() {
                    skipped.special += 1;
                    continue;
                }
                let name = entry.name().ok().and_then(|n| clean_path(&n));
                let Some(name) = name else {
                    skipped.bad_names += 1;
                    continue;
                };
                let mode = entry.unix_mode().unwrap_or(0o644);
                f(&name, mode, &mut entry)?;
            }
            Ok(skipped)
        }
    }
}

/// Write one file of a tree under `root` (`rel` is a clean relative path), creating
/// directories; executable bits are kept on unix.
pub fn write_file(root: &Path, rel: &str, mode: u32, data: &mut dyn Read) -> io::Result<()> {
    let path = root.join(rel);
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let mut out = std::fs::File::create(&path)?;
    io::copy(data, &mut out)?;
    #[cfg(unix)]
    if mode & 0o111 != 0 {
        use std::os::unix::fs::PermissionsExt;
        out.set_permissions(std::fs::Permissions::from_mode(0o755))?;
    }
    #[cfg(not(unix))]
    let _ = mode;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cleans_paths() {
        assert_eq!(clean_path("./a//b/c.py").as_deref(), Some("a/b/c.py"));
        assert_eq!(clean_path("a\\b.py").as_deref(), Some("a/b.py"));
        assert_eq!(clean_path("/etc/passwd"), None);
        assert_eq!(clean_path("a/../../b"), None);
        assert_eq!(clean_path("C:/x"), None);
        assert_eq!(clean_path("./"), None);
    }

    #[test]
    fn reads_tar_gz_and_zip() {
        let dir = tempfile::tempdir().unwrap();
        // tar.gz with a file, a symlink and a directory.
        let tgz = dir.path().join("p-1.0.tar.gz");
        {
            let gz = flate2::write::GzEncoder::new(
                std::fs::File::create(&tgz).unwrap(),
                flate2::Compression::fast(),
            );
            let mut b = tar::Builder::new(gz);
            let mut h = tar::Header::new_gnu();
            h.set_size(3);
            h.set_mode(0o755);
            h.set_entry_type(tar::EntryType::Regular);
            b.append_data(&mut h, "p-1.0/bin/run.py", &b"x=1"[..])
                .unwrap();
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(tar::EntryType::Symlink);
            h.set_size(0);
            b.append_link(&mut h, "p-1.0/link", "/etc/passwd").unwrap();
            b.into_inner().unwrap().finish().unwrap();
        }
        let mut seen = vec![];
        let s = visit(&tgz, ArchiveKind::TarGz, &mut |p, mode, r| {
            let mut t = String::new();
            r.read_to_string(&mut t)?;
            seen.push((p.to_string(), mode & 0o111 != 0, t));
            Ok(())
        })
        .unwrap();
        assert_eq!(
            seen,
            [("p-1.0/bin/run.py".to_string(), true, "x=1".to_string())]
        );
        assert_eq!(s.special, 1);
        // zip
        let zp = dir.path().join("p-1.0-py3-none-any.whl");
        {
            let mut z = zip::ZipWriter::new(std::fs::File::create(&zp).unwrap());
            let o = zip::write::SimpleFileOptions::default();
            z.start_file("p/__init__.py", o).unwrap();
            std::io::Write::write_all(&mut z, b"y=2").unwrap();
            z.start_file("../evil.py", o).unwrap();
            z.finish().unwrap();
        }
        let mut seen = vec![];
        let s = visit(&zp, ArchiveKind::Zip, &mut |p, _, r| {
            let mut t = String::new();
            r.read_to_string(&mut t)?;
            seen.push((p.to_string(), t));
            Ok(())
        })
        .unwrap();
        assert_eq!(seen, [("p/__init__.py".to_string(), "y=2".to_string())]);
        assert_eq!(s.bad_names, 1);
        assert_eq!(
            ArchiveKind::from_filename("x-1.tar.bz2"),
            None::<ArchiveKind>
        );
    }
}

//! Atomic file writes: every file xmoe-top writes (models, reports, routing traces) goes through
//! a temporary file in the target's directory, is synced, and is then moved into place, so a
//! reader never sees a half-written file and an existing file is never replaced without `force`.

use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

/// A file written to a temporary name in its target directory and moved into place by
/// [`AtomicFile::commit`]; dropped without commit, the temporary file is removed.
#[derive(Debug)]
pub struct AtomicFile {
    out: Option<BufWriter<File>>,
    tmp: PathBuf,
    path: PathBuf,
    force: bool,
}

impl AtomicFile {
    /// Creates the temporary file beside `path`. Fails at once (before any work) when `path`
    /// exists and `force` is false, or when the directory is missing or not writable.
    pub fn create(path: &Path, force: bool) -> Result<Self> {
        check_target(path, force)?;
        let dir = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let name = path
            .file_name()
            .with_context(|| format!("{}: not a file path", path.display()))?
            .to_string_lossy()
            .into_owned();
        let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
        let f = File::create(&tmp).with_context(|| {
            format!(
                "cannot write {}: cannot create a file in {}",
                path.display(),
                dir.display()
            )
        })?;
        Ok(Self {
            out: Some(BufWriter::with_capacity(1 << 16, f)),
            tmp,
            path: path.to_path_buf(),
            force,
        })
    }

    /// Flushes, syncs and moves the file into place (an existing file is replaced only with `force`).
    pub fn commit(mut self) -> Result<PathBuf> {
        let out = self.out.take().expect("committed once");
        let res = (|| -> io::Result<()> {
            let f = out.into_inner().map_err(|e| e.into_error())?;
            f.sync_all()?;
            drop(f);
            if self.force {
                return std::fs::rename(&self.tmp, &self.path);
            }
            // A hard link fails if `path` appeared meanwhile, so an existing file is never replaced.
            match std::fs::hard_link(&self.tmp, &self.path) {
                Ok(()) => std::fs::remove_file(&self.tmp),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Err(e),
                Err(_) => std::fs::rename(&self.tmp, &self.path),
            }
        })();
        if let Err(e) = res {
            let _ = std::fs::remove_file(&self.tmp);
            bail!("cannot write {}: {e}", self.path.display());
        }
        Ok(self.path.clone())
    }
}

impl Write for AtomicFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.out.as_mut().expect("not committed").write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.out.as_mut().expect("not committed").flush()
    }
}

impl Drop for AtomicFile {
    fn drop(&mut self) {
        if self.out.take().is_some() {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

/// Checks, before any work, that `path` may be written: its directory exists and takes a new file,
/// `path` does not exist (unless `force`), and whatever is there is a regular file. Renaming over
/// a symlink, a device (`/dev/null`) or a directory would replace it rather than write through
/// it, so only regular files are ever replaced, with or without `force`.
pub fn check_target(path: &Path, force: bool) -> Result<()> {
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_file() {
            bail!(
                "{} is {}, not a regular file: xmoe-top writes only regular files and does not replace anything else, even with --force",
                path.display(),
                crate::input_file::kind_of(&meta)
            );
        }
        if !force {
            bail!(
                "{} already exists (use --force to overwrite)",
                path.display()
            );
        }
    }
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    check_dir(&dir).with_context(|| format!("cannot write {}", path.display()))
}

/// Checks that `dir` is an existing directory that takes new files (by creating and removing a
/// probe file: permission bits do not tell, e.g. for root or on a read-only mount).
pub fn check_dir(dir: &Path) -> Result<()> {
    if !dir.is_dir() {
        bail!("the directory {} does not exist", dir.display());
    }
    let probe = dir.join(format!(".xmoe-top-probe.{}", std::process::id()));
    File::create(&probe).with_context(|| format!("cannot create a file in {}", dir.display()))?;
    let _ = std::fs::remove_file(&probe);
    Ok(())
}

/// Whether two output paths would write the same file (`out.json` and `./out.json`, or two
/// links to one file), so that one output would overwrite the other.
pub fn same_target(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    if let (Ok(x), Ok(y)) = (std::fs::metadata(a), std::fs::metadata(b)) {
        return x.dev() == y.dev() && x.ino() == y.ino();
    }
    let resolved = |p: &Path| -> Option<PathBuf> {
        let dir = match p.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        Some(dir.canonicalize().ok()?.join(p.file_name()?))
    };
    match (resolved(a), resolved(b)) {
        (Some(x), Some(y)) => x == y,
        _ => a == b,
    }
}

/// Writes `bytes` to `path` atomically (see [`AtomicFile`]). An existing `path` is kept unless
/// `force`.
pub fn write_atomically(path: &Path, bytes: &[u8], force: bool) -> Result<()> {
    let mut f = AtomicFile::create(path, force)?;
    f.write_all(bytes)
        .with_context(|| format!("cannot write {}", path.display()))?;
    f.commit()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_once_and_keeps_existing_files_without_force() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.txt");
        write_atomically(&path, b"first", false).unwrap();
        let e = write_atomically(&path, b"second", false).unwrap_err();
        assert!(e.to_string().contains("already exists"), "{e}");
        assert_eq!(std::fs::read(&path).unwrap(), b"first");
        write_atomically(&path, b"second", true).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"second");
        // No temporary file is left behind.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn an_uncommitted_file_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("never.txt");
        {
            let mut f = AtomicFile::create(&path, false).unwrap();
            f.write_all(b"partial").unwrap();
        }
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn only_regular_files_are_ever_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("target.txt");
        std::fs::write(&target, b"keep").unwrap();
        let link = dir.path().join("link.txt");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        for (path, kind) in [
            (link.as_path(), "a symbolic link"),
            (dir.path(), "a directory"),
            (Path::new("/dev/null"), "a character device"),
        ] {
            let e = AtomicFile::create(path, true).unwrap_err().to_string();
            assert!(e.contains(kind) && e.contains("not a regular file"), "{e}");
        }
        assert_eq!(std::fs::read(&target).unwrap(), b"keep");
        assert!(
            std::fs::symlink_metadata(&link)
                .unwrap()
                .file_type()
                .is_symlink()
        );
    }

    #[test]
    fn a_missing_directory_fails_before_any_work() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("missing").join("x.txt");
        assert!(AtomicFile::create(&path, false).is_err());
    }
}

//! Writing a file so that a crash leaves either the old file or the new one,
//! never half of one: the registry, the manage key, the relay's identity,
//! the appliance's name map, status, resolv.conf backup and routing
//! journal, the agent's policy and the files `install` writes all go
//! through [`AtomicFile`].
//!
//! It lives here because `transport` is the lowest crate that does I/O and
//! that the relay, agent, appliance and CLI all depend on; `proto`, below
//! it, does no I/O by design.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write as _};
use std::os::unix::fs::{MetadataExt as _, OpenOptionsExt as _, PermissionsExt as _, fchown};
use std::path::Path;

/// A file to write atomically: a temporary file in the same directory is
/// written, synced and renamed over `path`, and the directory is synced, so
/// that a crash at any point leaves the old content or the new.
///
/// A file that replaces another keeps its owner, group and (unless
/// [`AtomicFile::mode`] says otherwise) permissions, so that an
/// administrator's `chgrp` or `chmod` outlives the rewrite: the agent's
/// policy, edited by root, stays readable by the agent's group.
///
/// ```no_run
/// # fn main() -> std::io::Result<()> {
/// use std::path::Path;
/// use transport::atomic_file::AtomicFile;
/// AtomicFile::new(Path::new("/var/lib/hybridlink/registry.json"))
///     .mode(0o600)
///     .write(b"{}\n")?;
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone, Copy)]
pub struct AtomicFile<'a> {
    path: &'a Path,
    mode: Option<u32>,
    create_dir: bool,
}

impl<'a> AtomicFile<'a> {
    /// The file at `path`, written with the permissions of the file it
    /// replaces, or those a new file gets from [`File::create`] (`0o666`
    /// less the umask), into a directory that must exist.
    pub fn new(path: &'a Path) -> Self {
        Self {
            path,
            mode: None,
            create_dir: false,
        }
    }

    /// Gives the file exactly `mode` (not reduced by the umask), from the
    /// moment it exists under its temporary name: for files holding keys.
    pub fn mode(self, mode: u32) -> Self {
        Self {
            mode: Some(mode),
            ..self
        }
    }

    /// Creates the file's directory and its parents first when missing,
    /// with default permissions.
    pub fn create_dir(self) -> Self {
        Self {
            create_dir: true,
            ..self
        }
    }

    /// Replaces the file's content with `bytes`. On error the file is
    /// untouched and the temporary file removed.
    pub fn write(&self, bytes: &[u8]) -> io::Result<()> {
        let file_name = self
            .path
            .file_name()
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "path has no file name"))?;
        let dir = self
            .path
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        if self.create_dir {
            fs::create_dir_all(dir).map_err(|e| {
                io::Error::new(e.kind(), format!("creating {}: {e}", dir.display()))
            })?;
        }
        // The process id keeps two processes writing the same file from
        // writing into one temporary file.
        let mut tmp_name = file_name.to_owned();
        tmp_name.push(format!(".tmp.{}", std::process::id()));
        let tmp = dir.join(tmp_name);
        let result = self.write_and_rename(&tmp, dir, bytes);
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result
    }

    fn write_and_rename(&self, tmp: &Path, dir: &Path, bytes: &[u8]) -> io::Result<()> {
        let replaced = fs::symlink_metadata(self.path)
            .ok()
            .filter(fs::Metadata::is_file);
        let mut options = OpenOptions::new();
        options.write(true).create(true).truncate(true);
        if let Some(mode) = self.mode {
            options.mode(mode);
        }
        let mut file = options.open(tmp)?;
        if let Some(old) = &replaced {
            let new = file.metadata()?;
            if (new.uid(), new.gid()) != (old.uid(), old.gid()) {
                fchown(&file, Some(old.uid()), Some(old.gid()))?;
            }
        }
        let mode = self
            .mode
            .or_else(|| replaced.as_ref().map(|old| old.mode() & 0o777));
        if let Some(mode) = mode {
            // `OpenOptions::mode` is reduced by the umask and applies only to
            // a new file; a leftover temporary file keeps its own.
            file.set_permissions(fs::Permissions::from_mode(mode))?;
        }
        file.write_all(bytes)?;
        file.sync_all()?;
        fs::rename(tmp, self.path)?;
        File::open(dir)?.sync_all()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode_of(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    fn entries(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn replaces_the_content_and_leaves_no_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("names.json");
        AtomicFile::new(&path).write(b"old").unwrap();
        AtomicFile::new(&path).write(b"new").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"new");
        assert_eq!(entries(dir.path()), ["names.json"]);
    }

    #[test]
    fn an_explicit_mode_is_exact_even_over_a_leftover_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("registry.json");
        let leftover = dir
            .path()
            .join(format!("registry.json.tmp.{}", std::process::id()));
        fs::write(&leftover, b"half").unwrap();
        fs::set_permissions(&leftover, fs::Permissions::from_mode(0o666)).unwrap();
        AtomicFile::new(&path).mode(0o600).write(b"keys").unwrap();
        assert_eq!(mode_of(&path), 0o600);
        AtomicFile::new(&path).mode(0o640).write(b"keys").unwrap();
        assert_eq!(mode_of(&path), 0o640, "an existing file takes the new mode");
        assert_eq!(entries(dir.path()), ["registry.json"]);
    }

    #[test]
    fn a_rewrite_keeps_the_permissions_of_the_file_it_replaces() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("policy.toml");
        AtomicFile::new(&path).mode(0o640).write(b"old").unwrap();
        AtomicFile::new(&path).write(b"new").unwrap();
        assert_eq!(mode_of(&path), 0o640);
        assert_eq!(fs::read(&path).unwrap(), b"new");
    }

    #[test]
    fn a_rewrite_by_root_keeps_the_owner_and_group_of_the_file_it_replaces() {
        use std::os::unix::fs::{MetadataExt as _, chown};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("policy.toml");
        AtomicFile::new(&path).write(b"old").unwrap();
        // Another group than ours, as `chgrp` would give it; only root may.
        if chown(&path, None, Some(65534)).is_err() {
            assert!(
                std::env::var_os("HYBRIDLINK_REQUIRE_ROOT").is_none(),
                "changing a file's group needs root"
            );
            eprintln!("SKIP: changing a file's group needs root");
            return;
        }
        AtomicFile::new(&path).mode(0o640).write(b"new").unwrap();
        let meta = fs::metadata(&path).unwrap();
        assert_eq!(meta.gid(), 65534);
        assert_eq!(mode_of(&path), 0o640);
    }

    #[test]
    fn the_directory_is_created_only_when_asked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state").join("journal");
        let err = AtomicFile::new(&path).write(b"x").unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
        AtomicFile::new(&path).create_dir().write(b"x").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"x");
    }

    #[test]
    fn a_failed_write_keeps_the_old_file_and_removes_the_temporary_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("policy.toml");
        AtomicFile::new(&path).write(b"old").unwrap();
        // A directory in the way of the rename.
        let blocked = dir.path().join("blocked");
        fs::create_dir(&blocked).unwrap();
        fs::write(blocked.join("inside"), b"").unwrap();
        assert!(AtomicFile::new(&blocked).write(b"new").is_err());
        assert_eq!(fs::read(&path).unwrap(), b"old");
        assert_eq!(entries(dir.path()), ["blocked", "policy.toml"]);
    }
}

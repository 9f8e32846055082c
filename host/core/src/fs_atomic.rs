//! Atomic file writes: write a temporary file next to the target, fsync it, rename it over
//! the target, fsync the directory. A crash leaves either the old or the new file, never half.

use std::fs::{self, File};
use std::io::Write;
use std::path::Path;

use crate::{CoreError, Result};

/// Writes `bytes` to `path` atomically.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = parent_dir(path);
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let mut f = File::create(&tmp).map_err(CoreError::io(&tmp))?;
    f.write_all(bytes).map_err(CoreError::io(&tmp))?;
    f.sync_all().map_err(CoreError::io(&tmp))?;
    drop(f);
    fs::rename(&tmp, path).map_err(CoreError::io(path))?;
    sync_dir(dir)
}

/// The directory holding `path` (`.` for a bare file name).
fn parent_dir(path: &Path) -> &Path {
    path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."))
}

/// Writes `bytes` to a new file and fsyncs it (for files inside a directory that is renamed
/// into place afterwards).
pub(crate) fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = File::create(path).map_err(CoreError::io(path))?;
    f.write_all(bytes).map_err(CoreError::io(path))?;
    f.sync_all().map_err(CoreError::io(path))
}

/// Fsyncs a directory so that renames inside it survive a crash.
pub(crate) fn sync_dir(dir: &Path) -> Result<()> {
    let d = File::open(dir).map_err(CoreError::io(dir))?;
    d.sync_all().map_err(CoreError::io(dir))
}

/// Replaces directory `target` with the complete directory `staged`: `target` is moved aside,
/// `staged` renamed in, the old one removed. [`recover_dir`] repairs a crash in between.
pub(crate) fn replace_dir(staged: &Path, target: &Path) -> Result<()> {
    let old = aside_path(target);
    if old.exists() {
        fs::remove_dir_all(&old).map_err(CoreError::io(&old))?;
    }
    if target.exists() {
        fs::rename(target, &old).map_err(CoreError::io(target))?;
    }
    fs::rename(staged, target).map_err(CoreError::io(target))?;
    sync_dir(parent_dir(target))?;
    if old.exists() {
        fs::remove_dir_all(&old).map_err(CoreError::io(&old))?;
    }
    Ok(())
}

/// After a crash inside [`replace_dir`]: if `target` is gone but its moved-aside copy is
/// there, put it back.
pub(crate) fn recover_dir(target: &Path) -> Result<()> {
    let old = aside_path(target);
    if !target.exists() && old.exists() {
        fs::rename(&old, target).map_err(CoreError::io(target))?;
    }
    Ok(())
}

fn aside_path(target: &Path) -> std::path::PathBuf {
    let name = target.file_name().and_then(|n| n.to_str()).unwrap_or("dir");
    target.with_file_name(format!(".{name}.old"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_write_replaces_content_and_leaves_no_temp_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("state.json");
        write_atomic(&p, b"one").expect("write");
        write_atomic(&p, b"two").expect("write");
        assert_eq!(fs::read(&p).expect("read"), b"two");
        assert_eq!(fs::read_dir(dir.path()).expect("ls").count(), 1);
    }

    #[test]
    fn replace_dir_and_recover() {
        let dir = tempfile::tempdir().expect("tempdir");
        let target = dir.path().join("best");
        let staged = dir.path().join("best.staged");
        fs::create_dir(&staged).expect("mkdir");
        fs::write(staged.join("f"), "1").expect("write");
        replace_dir(&staged, &target).expect("replace");
        fs::create_dir(&staged).expect("mkdir");
        fs::write(staged.join("f"), "2").expect("write");
        replace_dir(&staged, &target).expect("replace");
        assert_eq!(fs::read_to_string(target.join("f")).expect("read"), "2");
        // A crash after moving the old copy aside: recovery puts it back.
        fs::rename(&target, aside_path(&target)).expect("rename");
        recover_dir(&target).expect("recover");
        assert_eq!(fs::read_to_string(target.join("f")).expect("read"), "2");
    }
}

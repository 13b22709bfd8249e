//! kubelet's atomic-writer layout for Secret, ConfigMap, projected and
//! downward-API volumes.
//!
//! ```text
//! <volume>/..1795312345_123456789/<key files>   one directory per payload version
//! <volume>/..data -> ..1795312345_123456789     swapped by rename(2): atomic
//! <volume>/<key>  -> ..data/<key>               stable names for readers
//! ```
//!
//! A reader that opens `<volume>/<key>` always sees one complete version;
//! a watcher sees the `..data` symlink replaced (weft's proxy reloads on it).

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::{Component, Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

/// One file of a payload: content and permission bits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileContent {
    /// The bytes.
    pub data: Vec<u8>,
    /// Mode bits, e.g. 0o644.
    pub mode: u32,
}

/// Relative path → file.
pub type Payload = BTreeMap<String, FileContent>;

const DATA: &str = "..data";
const DATA_TMP: &str = "..data_tmp";

/// Writes `payload` into `dir`; returns whether anything changed.
/// Paths must be relative and must not contain `..`.
pub fn write(dir: &Path, payload: &Payload) -> io::Result<bool> {
    for path in payload.keys() {
        let p = Path::new(path);
        if path.is_empty()
            || path.starts_with("..")
            || p.components().any(|c| !matches!(c, Component::Normal(_)))
        {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("invalid volume path {path:?}"),
            ));
        }
    }
    fs::create_dir_all(dir)?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o755))?;
    let current = fs::read_link(dir.join(DATA)).ok();
    if let Some(current) = &current
        && read_payload(&dir.join(current))?.as_ref() == Some(payload)
    {
        return Ok(false);
    }
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let version = format!("..{}_{:09}", now.as_secs(), now.subsec_nanos());
    let version_dir = dir.join(&version);
    fs::create_dir(&version_dir)?;
    fs::set_permissions(&version_dir, fs::Permissions::from_mode(0o755))?;
    for (path, file) in payload {
        let target = version_dir.join(path);
        if let Some(parent) = target.parent() {
            fs::create_dir_all(parent)?;
        }
        fs::write(&target, &file.data)?;
        fs::set_permissions(&target, fs::Permissions::from_mode(file.mode))?;
    }
    let tmp = dir.join(DATA_TMP);
    let _ = fs::remove_file(&tmp);
    symlink(&version, &tmp)?;
    fs::rename(&tmp, dir.join(DATA))?;

    let tops: std::collections::BTreeSet<String> = payload
        .keys()
        .filter_map(|p| p.split('/').next().map(str::to_owned))
        .collect();
    for top in &tops {
        let link = dir.join(top);
        if fs::symlink_metadata(&link).is_err() {
            symlink(Path::new(DATA).join(top), &link)?;
        }
    }
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with("..") {
            if name != DATA && name != version {
                remove_any(&entry.path())?;
            }
        } else if !tops.contains(&name) {
            remove_any(&entry.path())?;
        }
    }
    Ok(true)
}

fn remove_any(path: &Path) -> io::Result<()> {
    let meta = fs::symlink_metadata(path)?;
    if meta.is_dir() {
        fs::remove_dir_all(path)
    } else {
        fs::remove_file(path)
    }
}

/// Reads a version directory back; `None` if it does not exist.
fn read_payload(version_dir: &Path) -> io::Result<Option<Payload>> {
    if !version_dir.is_dir() {
        return Ok(None);
    }
    let mut out = Payload::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        for entry in fs::read_dir(version_dir.join(&rel))? {
            let entry = entry?;
            let rel_path = rel.join(entry.file_name());
            let meta = entry.metadata()?;
            if meta.is_dir() {
                stack.push(rel_path);
            } else {
                out.insert(
                    rel_path.to_string_lossy().into_owned(),
                    FileContent {
                        data: fs::read(entry.path())?,
                        mode: meta.permissions().mode() & 0o7777,
                    },
                );
            }
        }
    }
    Ok(Some(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(s: &str) -> FileContent {
        FileContent {
            data: s.as_bytes().to_vec(),
            mode: 0o644,
        }
    }

    #[test]
    fn swaps_data_symlink_and_keeps_key_links() -> anyhow::Result<()> {
        let tmp = tempfile::tempdir()?;
        let dir = tmp.path().join("vol");
        let mut p = Payload::new();
        p.insert("a".into(), file("one"));
        p.insert("sub/b".into(), file("two"));
        assert!(write(&dir, &p)?);
        let first = fs::read_link(dir.join(DATA))?;
        assert!(first.to_string_lossy().starts_with(".."));
        assert_eq!(fs::read_link(dir.join("a"))?, Path::new("..data/a"));
        assert_eq!(fs::read_to_string(dir.join("sub/b"))?, "two");

        // Same payload: nothing rewritten.
        assert!(!write(&dir, &p)?);
        assert_eq!(fs::read_link(dir.join(DATA))?, first);

        // New payload: new version, stale key and old version removed.
        let mut q = Payload::new();
        q.insert("a".into(), file("three"));
        assert!(write(&dir, &q)?);
        let second = fs::read_link(dir.join(DATA))?;
        assert_ne!(first, second);
        assert_eq!(fs::read_to_string(dir.join("a"))?, "three");
        assert!(fs::symlink_metadata(dir.join("sub")).is_err());
        assert!(!dir.join(&first).exists());
        Ok(())
    }

    #[test]
    fn rejects_escaping_paths() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let mut p = Payload::new();
        p.insert("../x".into(), file("no"));
        assert!(write(tmp.path(), &p).is_err());
    }
}

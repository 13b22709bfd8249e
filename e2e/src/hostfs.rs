//! Mount points the simulator has to create on the host file system.
//!
//! Containers see volumes through bind mounts in a private mount namespace,
//! but the mount point (e.g. `/var/run/secrets/kubernetes.io/serviceaccount`)
//! must exist on the shared host file system. Several clusters (in several
//! test processes) may use the same paths at once, so a cluster never
//! removes them on its own: every cluster holds a shared `flock` on
//! `/run/weft-e2e/lock` while it lives and records what it created in
//! `/run/weft-e2e/created`; the last one to leave (it alone gets the lock
//! exclusively) removes every recorded path that is still empty, deepest
//! first. Nothing with content is ever removed.

use std::fs::{File, OpenOptions};
use std::io::{self, Write as _};
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};

const DIR: &str = "/run/weft-e2e";

/// A cluster's share of the host's mount points; see the module doc.
#[derive(Debug)]
pub struct HostLease {
    lock: Flock<File>,
}

impl HostLease {
    /// Takes the shared lock (waits while a last cluster cleans up).
    pub fn acquire() -> io::Result<Self> {
        std::fs::create_dir_all(DIR)?;
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(Path::new(DIR).join("lock"))?;
        let lock = Flock::lock(file, FlockArg::LockShared).map_err(|(_, e)| io::Error::from(e))?;
        Ok(Self { lock })
    }

    /// Creates `path` (a directory, or an empty file if `dir` is false) and
    /// its missing parents, recording each created path.
    pub fn create(&self, path: &Path, dir: bool) -> io::Result<()> {
        if path.exists() {
            return Ok(());
        }
        let mut missing = vec![path.to_path_buf()];
        let mut cur = path;
        while let Some(parent) = cur.parent() {
            if parent.exists() {
                break;
            }
            missing.push(parent.to_path_buf());
            cur = parent;
        }
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(Path::new(DIR).join("created"))?;
        for p in missing.iter().rev() {
            writeln!(log, "{}", p.display())?;
        }
        if dir {
            std::fs::create_dir_all(path)
        } else {
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent)?;
            }
            std::fs::write(path, b"")
        }
    }

    /// Leaves; if no other cluster holds the lock, removes every recorded
    /// path that is still empty.
    pub fn release(self) {
        if self.lock.relock(FlockArg::LockExclusiveNonblock).is_err() {
            return;
        }
        let created = Path::new(DIR).join("created");
        let text = std::fs::read_to_string(&created).unwrap_or_default();
        let mut paths: Vec<PathBuf> = text.lines().map(PathBuf::from).collect();
        paths.sort();
        paths.dedup();
        // Deepest first; remove_dir and the size check never delete content.
        for p in paths.iter().rev() {
            match std::fs::symlink_metadata(p) {
                Ok(m) if m.is_dir() => {
                    let _ = std::fs::remove_dir(p);
                }
                Ok(m) if m.is_file() && m.len() == 0 => {
                    let _ = std::fs::remove_file(p);
                }
                _ => {}
            }
        }
        let _ = std::fs::remove_file(created);
    }
}

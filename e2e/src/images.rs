//! Container images → local binaries.
//!
//! There is no container runtime: an image name is mapped to a program on
//! this machine. A rule matches when the image's repository part (registry
//! and tag stripped) ends with the rule's name, e.g. `ghcr.io/weft/weft-proxy:v1`
//! matches `weft-proxy`. The image's program is the container's entrypoint;
//! `command` in the pod spec replaces it (resolving `command[0]` through the
//! same table by file name, then through `PATH`), `args` follow.
//!
//! Images with no rule but a `command` (e.g. `busybox` with
//! `command: [sh, -c, ...]`) run the command with the host's programs.

use std::path::{Path, PathBuf};

/// The image table of a cluster.
#[derive(Debug, Clone, Default)]
pub struct ImageMap {
    rules: Vec<(String, PathBuf)>,
}

impl ImageMap {
    /// The default table: weft's binaries and the harness's test app, taken
    /// from the cargo target directory the test runs from (`target/debug`).
    /// Build them first (`cargo build -p weft-proxy ...`); a missing binary
    /// fails the pod with a message naming it.
    pub fn workspace() -> Self {
        let dir = target_dir();
        let mut map = Self::default();
        for bin in [
            "weft-e2e-app",
            "weft-proxy",
            "weft-operator",
            "weft-injector",
            "weftctl",
        ] {
            map = map.with(bin, dir.join(bin));
        }
        map
    }

    /// Adds (or overrides) a rule: images named `name` run `program`.
    pub fn with(mut self, name: &str, program: impl Into<PathBuf>) -> Self {
        self.rules.retain(|(n, _)| n != name);
        self.rules.push((name.to_owned(), program.into()));
        self
    }

    /// The program an image runs, if the table has one.
    pub fn program_for_image(&self, image: &str) -> Option<&Path> {
        let repo = repository(image);
        self.rules
            .iter()
            .filter(|(name, _)| repo == name || repo.ends_with(&format!("/{name}")))
            .map(|(_, p)| p.as_path())
            .next()
    }

    /// Resolves `command[0]`: a table program with that file name, else as given.
    pub fn resolve_command(&self, command: &str) -> PathBuf {
        self.rules
            .iter()
            .find(|(_, p)| p.file_name().is_some_and(|f| f == command))
            .map(|(_, p)| p.clone())
            .unwrap_or_else(|| PathBuf::from(command))
    }
}

/// `registry/org/name:tag@digest` → `registry/org/name`.
fn repository(image: &str) -> &str {
    let no_digest = image.split('@').next().unwrap_or(image);
    match no_digest.rfind(':') {
        Some(i) if !no_digest[i..].contains('/') => &no_digest[..i],
        _ => no_digest,
    }
}

/// `target/<profile>` of the running test or binary: tests run from
/// `target/<profile>/deps/`, binaries from `target/<profile>/`.
pub fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_default();
    let dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir.parent().map(Path::to_path_buf).unwrap_or(dir)
    } else {
        dir
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_by_repository_suffix() {
        let map = ImageMap::default()
            .with("weft-proxy", "/bin/proxy")
            .with("echo", "/bin/echo");
        assert_eq!(
            map.program_for_image("ghcr.io/weft/weft-proxy:v1.2"),
            Some(Path::new("/bin/proxy"))
        );
        assert_eq!(
            map.program_for_image("localhost:5000/weft-proxy"),
            Some(Path::new("/bin/proxy"))
        );
        assert_eq!(
            map.program_for_image("echo@sha256:abc"),
            Some(Path::new("/bin/echo"))
        );
        assert_eq!(map.program_for_image("not-weft-proxy:1"), None);
        assert_eq!(map.program_for_image("busybox"), None);
        assert_eq!(map.resolve_command("echo"), PathBuf::from("/bin/echo"));
        assert_eq!(map.resolve_command("sh"), PathBuf::from("sh"));
    }
}

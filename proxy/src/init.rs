//! `weft-proxy init`: the capture rules, installed once per pod by the
//! `weft-init` container in the pod's network namespace.
//!
//! ```text
//! nat PREROUTING ─► WEFT_INBOUND: excluded ports (admin 15020, …) RETURN; tcp ─► REDIRECT :15006
//! nat OUTPUT     ─► WEFT_OUTPUT:  uid 1337 RETURN; -o lo RETURN; 127.0.0.0/8 RETURN;
//!                                 excluded CIDRs/ports RETURN; tcp ─► REDIRECT :15001
//! ```
//!
//! Idempotent: weft's rules live in its own chains, which are declared
//! (flushed) and refilled by one `iptables-restore --noflush` transaction;
//! the jumps from the built-in chains are added only when `-C` says they are
//! missing. Rule generation is pure ([`rules`]); running it is [`install`].

use std::fmt::Write as _;
use std::io::Write as _;
use std::process::{Command, Stdio};

/// Which iptables backend to drive.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Backend {
    /// nf_tables via `iptables-nft`.
    Nft,
    /// The legacy x_tables via `iptables-legacy`.
    Legacy,
}

impl Backend {
    fn iptables(self) -> &'static str {
        match self {
            Backend::Nft => "iptables-nft",
            Backend::Legacy => "iptables-legacy",
        }
    }

    fn restore(self) -> &'static str {
        match self {
            Backend::Nft => "iptables-nft-restore",
            Backend::Legacy => "iptables-legacy-restore",
        }
    }

    fn save(self) -> &'static str {
        match self {
            Backend::Nft => "iptables-nft-save",
            Backend::Legacy => "iptables-legacy-save",
        }
    }
}

/// What to capture.
#[derive(Clone, Debug, clap::Args)]
pub struct InitArgs {
    /// The proxy's uid: its own traffic is never captured.
    #[arg(long, default_value_t = 1337)]
    pub proxy_uid: u32,
    /// The proxy's gid (also excluded).
    #[arg(long)]
    pub proxy_gid: Option<u32>,
    /// Port inbound traffic is redirected to.
    #[arg(long, default_value_t = 15006)]
    pub inbound_capture_port: u16,
    /// Port outbound traffic is redirected to.
    #[arg(long, default_value_t = 15001)]
    pub outbound_capture_port: u16,
    /// Inbound ports never captured (the admin port is always excluded).
    #[arg(long, value_delimiter = ',', default_value = "15020")]
    pub exclude_inbound_ports: Vec<u16>,
    /// Outbound destination ports never captured.
    #[arg(long, value_delimiter = ',')]
    pub exclude_outbound_ports: Vec<u16>,
    /// Outbound destination CIDRs never captured.
    #[arg(long, value_delimiter = ',')]
    pub exclude_outbound_cidrs: Vec<String>,
    /// Only print the rules.
    #[arg(long)]
    pub dry_run: bool,
    /// Force a backend instead of detecting the one the host uses.
    #[arg(long, value_enum)]
    pub iptables: Option<Backend>,
}

/// Why the rules could not be installed.
#[derive(Debug, thiserror::Error)]
pub enum InitError {
    /// The binary is missing.
    #[error(
        "{bin} not found: install iptables in the proxy image (Debian: apt-get install -y iptables)"
    )]
    Missing {
        /// Binary.
        bin: String,
    },
    /// iptables ran and failed.
    #[error("{cmd} failed: {stderr}{hint}")]
    Failed {
        /// Command line.
        cmd: String,
        /// Its stderr.
        stderr: String,
        /// What to check.
        hint: &'static str,
    },
    /// Spawning failed otherwise.
    #[error("cannot run {bin}: {source}")]
    Spawn {
        /// Binary.
        bin: String,
        /// Why.
        source: std::io::Error,
    },
    /// A CIDR is malformed.
    #[error("--exclude-outbound-cidrs: {0:?} is not an IPv4 CIDR like 10.0.0.0/8")]
    Cidr(String),
}

const IN_CHAIN: &str = "WEFT_INBOUND";
const OUT_CHAIN: &str = "WEFT_OUTPUT";

/// The `iptables-restore` input for weft's chains.
pub fn rules(a: &InitArgs) -> Result<String, InitError> {
    for c in &a.exclude_outbound_cidrs {
        let ok = match c.split_once('/') {
            Some((ip, len)) => {
                ip.parse::<std::net::Ipv4Addr>().is_ok() && len.parse::<u8>().is_ok_and(|l| l <= 32)
            }
            None => c.parse::<std::net::Ipv4Addr>().is_ok(),
        };
        if !ok {
            return Err(InitError::Cidr(c.clone()));
        }
    }
    let mut s = String::new();
    let _ = writeln!(s, "*nat");
    let _ = writeln!(s, ":{IN_CHAIN} - [0:0]");
    let _ = writeln!(s, ":{OUT_CHAIN} - [0:0]");
    let mut inbound_excluded = a.exclude_inbound_ports.clone();
    if !inbound_excluded.contains(&15020) {
        inbound_excluded.push(15020);
    }
    for p in inbound_excluded {
        let _ = writeln!(s, "-A {IN_CHAIN} -p tcp --dport {p} -j RETURN");
    }
    let _ = writeln!(
        s,
        "-A {IN_CHAIN} -p tcp -j REDIRECT --to-ports {}",
        a.inbound_capture_port
    );
    let _ = writeln!(
        s,
        "-A {OUT_CHAIN} -m owner --uid-owner {} -j RETURN",
        a.proxy_uid
    );
    if let Some(g) = a.proxy_gid {
        let _ = writeln!(s, "-A {OUT_CHAIN} -m owner --gid-owner {g} -j RETURN");
    }
    let _ = writeln!(s, "-A {OUT_CHAIN} -o lo -j RETURN");
    let _ = writeln!(s, "-A {OUT_CHAIN} -d 127.0.0.0/8 -j RETURN");
    for c in &a.exclude_outbound_cidrs {
        let _ = writeln!(s, "-A {OUT_CHAIN} -d {c} -j RETURN");
    }
    for p in &a.exclude_outbound_ports {
        let _ = writeln!(s, "-A {OUT_CHAIN} -p tcp --dport {p} -j RETURN");
    }
    let _ = writeln!(
        s,
        "-A {OUT_CHAIN} -p tcp -j REDIRECT --to-ports {}",
        a.outbound_capture_port
    );
    let _ = writeln!(s, "COMMIT");
    Ok(s)
}

/// The jumps from built-in chains: (chain, rule args).
pub fn jumps() -> [(&'static str, [&'static str; 4]); 2] {
    [
        ("PREROUTING", ["-p", "tcp", "-j", IN_CHAIN]),
        ("OUTPUT", ["-p", "tcp", "-j", OUT_CHAIN]),
    ]
}

fn run(bin: &str, args: &[&str], stdin: Option<&str>) -> Result<std::process::Output, InitError> {
    let mut cmd = Command::new(bin);
    cmd.args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().map_err(|source| {
        if source.kind() == std::io::ErrorKind::NotFound {
            InitError::Missing {
                bin: bin.to_owned(),
            }
        } else {
            InitError::Spawn {
                bin: bin.to_owned(),
                source,
            }
        }
    })?;
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(input.as_bytes())
            .map_err(|source| InitError::Spawn {
                bin: bin.to_owned(),
                source,
            })?;
    }
    child.wait_with_output().map_err(|source| InitError::Spawn {
        bin: bin.to_owned(),
        source,
    })
}

fn check(bin: &str, args: &[&str], out: &std::process::Output) -> Result<(), InitError> {
    if out.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&out.stderr).trim().to_owned();
    let hint = if stderr.contains("Permission denied") || stderr.contains("Operation not permitted")
    {
        "; weft-init needs root with the NET_ADMIN and NET_RAW capabilities"
    } else {
        ""
    };
    Err(InitError::Failed {
        cmd: format!("{bin} {}", args.join(" ")),
        stderr,
        hint,
    })
}

/// Picks the backend the host already uses: the one whose ruleset has more
/// rules (kube-proxy and CNIs install rules before pods start); nft when
/// neither has any, like current distributions.
pub fn detect_backend() -> Backend {
    let count = |b: Backend| {
        run(b.save(), &[], None)
            .ok()
            .filter(|o| o.status.success())
            .map_or(0, |o| {
                String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .filter(|l| l.starts_with("-A"))
                    .count()
            })
    };
    let (legacy, nft) = (count(Backend::Legacy), count(Backend::Nft));
    if legacy > nft {
        Backend::Legacy
    } else {
        Backend::Nft
    }
}

/// Installs (or with `dry_run` only prints) the rules; returns what it printed.
pub fn install(a: &InitArgs) -> Result<String, InitError> {
    let rules = rules(a)?;
    let backend = a.iptables.unwrap_or_else(|| {
        if a.dry_run {
            Backend::Nft
        } else {
            detect_backend()
        }
    });
    let mut report = format!(
        "# weft-proxy init ({}){}\n{rules}",
        backend.iptables(),
        if a.dry_run { ", dry run" } else { "" }
    );
    for (chain, args) in jumps() {
        let _ = writeln!(report, "-A {chain} {}", args.join(" "));
    }
    if a.dry_run {
        return Ok(report);
    }
    let restore_args = ["--noflush"];
    let out = run(backend.restore(), &restore_args, Some(&rules))?;
    check(backend.restore(), &restore_args, &out)?;
    for (chain, args) in jumps() {
        let mut check_args = vec!["-t", "nat", "-C", chain];
        check_args.extend(args);
        let present = run(backend.iptables(), &check_args, None)?.status.success();
        if !present {
            let mut add = vec!["-t", "nat", "-A", chain];
            add.extend(args);
            let out = run(backend.iptables(), &add, None)?;
            check(backend.iptables(), &add, &out)?;
        }
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct T {
        #[command(flatten)]
        a: InitArgs,
    }

    #[test]
    fn rules_exclude_proxy_uid_loopback_and_listed_ports() {
        let t = T::parse_from([
            "t",
            "--exclude-inbound-ports",
            "15020,22",
            "--exclude-outbound-ports",
            "5432",
            "--exclude-outbound-cidrs",
            "10.0.0.0/8",
        ]);
        let r = rules(&t.a).expect("rules");
        assert!(r.contains("-A WEFT_OUTPUT -m owner --uid-owner 1337 -j RETURN"));
        assert!(r.contains("-A WEFT_OUTPUT -o lo -j RETURN"));
        assert!(r.contains("-A WEFT_OUTPUT -d 10.0.0.0/8 -j RETURN"));
        assert!(r.contains("-A WEFT_OUTPUT -p tcp --dport 5432 -j RETURN"));
        assert!(r.contains("-A WEFT_INBOUND -p tcp --dport 22 -j RETURN"));
        assert!(r.contains("-A WEFT_INBOUND -p tcp --dport 15020 -j RETURN"));
        assert!(r.ends_with("-A WEFT_OUTPUT -p tcp -j REDIRECT --to-ports 15001\nCOMMIT\n"));
        // Exclusions come before the redirect.
        let red = r
            .find("REDIRECT --to-ports 15006")
            .expect("inbound redirect");
        assert!(r.find("--dport 22").expect("22") < red);
    }

    #[test]
    fn bad_cidr_is_refused() {
        let t = T::parse_from(["t", "--exclude-outbound-cidrs", "10.0.0.0/99"]);
        assert!(matches!(rules(&t.a), Err(InitError::Cidr(_))));
    }
}

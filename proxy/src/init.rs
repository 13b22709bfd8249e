//! `weft-proxy init`: the capture rules, installed once per pod by the
//! `weft-init` container in the pod's network namespace, for IPv4
//! (iptables) and IPv6 (ip6tables) alike.
//!
//! ```text
//! nat PREROUTING ─► WEFT_INBOUND: excluded ports (admin 15020, …) RETURN; tcp ─► REDIRECT :15006
//! nat OUTPUT     ─► WEFT_OUTPUT:  uid 1337 RETURN; -o lo RETURN; 127.0.0.0/8 (::1) RETURN;
//!                                 excluded CIDRs/ports RETURN; tcp ─► REDIRECT :15001
//! ```
//!
//! IPv4 CIDRs of `--exclude-outbound-cidrs` go to iptables, IPv6 ones to
//! ip6tables. IPv6 rules are installed when the namespace has IPv6
//! (`--ipv6 auto`, the default: `/proc/net/if_inet6` lists an address);
//! `--ipv6 on` requires it, `--ipv6 off` leaves IPv6 uncaptured and says so.
//! When the namespace has IPv6, a missing ip6tables is an error, not a
//! silent skip: IPv6 traffic would otherwise bypass the proxy (and mTLS).
//!
//! Idempotent: weft's rules live in its own chains, which are declared
//! (flushed) and refilled by one `iptables-restore --noflush` transaction
//! per family; the jumps from the built-in chains are added only when `-C`
//! says they are missing. Rule generation is pure ([`rules`]); running it is
//! [`install`].

use std::fmt::Write as _;
use std::io::Write as _;
use std::net::IpAddr;
use std::process::{Command, Stdio};

/// Which iptables backend to drive.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Backend {
    /// nf_tables via `iptables-nft`.
    Nft,
    /// The legacy x_tables via `iptables-legacy`.
    Legacy,
}

/// An address family, and so a tool: iptables or ip6tables.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    /// IPv4: `iptables-*`.
    V4,
    /// IPv6: `ip6tables-*`.
    V6,
}

impl Family {
    fn prefix(self) -> &'static str {
        match self {
            Family::V4 => "iptables",
            Family::V6 => "ip6tables",
        }
    }

    fn loopback(self) -> &'static str {
        match self {
            Family::V4 => "127.0.0.0/8",
            Family::V6 => "::1/128",
        }
    }
}

impl Backend {
    fn suffix(self) -> &'static str {
        match self {
            Backend::Nft => "nft",
            Backend::Legacy => "legacy",
        }
    }

    /// The rule tool, e.g. `iptables-nft` or `ip6tables-legacy`.
    pub fn iptables(self, f: Family) -> String {
        format!("{}-{}", f.prefix(), self.suffix())
    }

    fn restore(self, f: Family) -> String {
        format!("{}-{}-restore", f.prefix(), self.suffix())
    }

    fn save(self, f: Family) -> String {
        format!("{}-{}-save", f.prefix(), self.suffix())
    }
}

/// Whether to capture IPv6.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Ipv6Mode {
    /// Capture IPv6 when the network namespace has it.
    #[default]
    Auto,
    /// Capture IPv6; fail when the namespace has no IPv6.
    On,
    /// Never capture IPv6 (IPv6 traffic then bypasses the proxy).
    Off,
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
    /// Outbound destination CIDRs never captured (IPv4 and IPv6).
    #[arg(long, value_delimiter = ',')]
    pub exclude_outbound_cidrs: Vec<String>,
    /// Only print the rules.
    #[arg(long)]
    pub dry_run: bool,
    /// Force a backend instead of detecting the one the host uses.
    #[arg(long, value_enum)]
    pub iptables: Option<Backend>,
    /// IPv6 capture: auto (when the namespace has IPv6), on (required), off.
    #[arg(long, value_enum, env = "WEFT_INIT_IPV6", default_value = "auto")]
    pub ipv6: Ipv6Mode,
}

/// Why the rules could not be installed.
#[derive(Debug, thiserror::Error)]
pub enum InitError {
    /// The binary is missing.
    #[error(
        "{bin} not found: install iptables in the proxy image (Debian: apt-get install -y iptables){hint}"
    )]
    Missing {
        /// Binary.
        bin: String,
        /// What else can be done.
        hint: &'static str,
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
    #[error(
        "--exclude-outbound-cidrs: {0:?} is not a CIDR like 10.0.0.0/8 or fd00::/8 (or a single address)"
    )]
    Cidr(String),
    /// `--ipv6 on` in a namespace without IPv6.
    #[error(
        "--ipv6 on, but this network namespace has no IPv6 (no address in /proc/net/if_inet6); use --ipv6 auto or off (WEFT_INIT_IPV6)"
    )]
    NoIpv6,
}

const IN_CHAIN: &str = "WEFT_INBOUND";
const OUT_CHAIN: &str = "WEFT_OUTPUT";
const V6_HINT: &str = "; this pod has IPv6: without ip6tables rules its IPv6 traffic would bypass the proxy. Install ip6tables, or pass --ipv6 off (WEFT_INIT_IPV6=off) to accept that";

/// The family of a CIDR (or single address), if it is well formed.
fn cidr_family(c: &str) -> Option<Family> {
    let (ip, len) = match c.split_once('/') {
        Some((ip, len)) => (ip, Some(len.parse::<u8>().ok()?)),
        None => (c, None),
    };
    match ip.parse::<IpAddr>().ok()? {
        IpAddr::V4(_) if len.is_none_or(|l| l <= 32) => Some(Family::V4),
        IpAddr::V6(_) if len.is_none_or(|l| l <= 128) => Some(Family::V6),
        _ => None,
    }
}

/// The `iptables-restore` (or `ip6tables-restore`) input for weft's chains.
pub fn rules(a: &InitArgs, family: Family) -> Result<String, InitError> {
    let mut cidrs = Vec::new();
    for c in &a.exclude_outbound_cidrs {
        match cidr_family(c) {
            Some(f) if f == family => cidrs.push(c),
            Some(_) => {}
            None => return Err(InitError::Cidr(c.clone())),
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
    let _ = writeln!(s, "-A {OUT_CHAIN} -d {} -j RETURN", family.loopback());
    for c in cidrs {
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

/// Whether this network namespace has IPv6: the kernel has it and at least
/// one interface holds an IPv6 address (`/proc/net/if_inet6` is per
/// namespace; it is absent with `ipv6.disable=1` and empty when every
/// interface has `disable_ipv6`).
pub fn namespace_has_ipv6() -> bool {
    std::fs::read_to_string("/proc/net/if_inet6").is_ok_and(|t| !t.trim().is_empty())
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
                hint: "",
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

/// Picks the backend the host already uses: the one whose rulesets (IPv4
/// and IPv6) have more rules (kube-proxy and CNIs install rules before pods
/// start); nft when neither has any, like current distributions.
pub fn detect_backend() -> Backend {
    let count = |b: Backend| {
        [Family::V4, Family::V6]
            .into_iter()
            .map(|f| {
                run(&b.save(f), &[], None)
                    .ok()
                    .filter(|o| o.status.success())
                    .map_or(0, |o| {
                        String::from_utf8_lossy(&o.stdout)
                            .lines()
                            .filter(|l| l.starts_with("-A"))
                            .count()
                    })
            })
            .sum::<usize>()
    };
    let (legacy, nft) = (count(Backend::Legacy), count(Backend::Nft));
    if legacy > nft {
        Backend::Legacy
    } else {
        Backend::Nft
    }
}

/// Whether IPv6 rules are installed, or why not.
fn ipv6_decision(a: &InitArgs, has_ipv6: bool) -> Result<Result<(), &'static str>, InitError> {
    match (a.ipv6, has_ipv6) {
        (Ipv6Mode::Off, _) => Ok(Err(
            "--ipv6 off: IPv6 traffic is NOT captured and bypasses the proxy",
        )),
        (Ipv6Mode::On | Ipv6Mode::Auto, true) => Ok(Ok(())),
        (Ipv6Mode::On, false) => Err(InitError::NoIpv6),
        (Ipv6Mode::Auto, false) => Ok(Err(
            "skipped: this network namespace has no IPv6 (no address in /proc/net/if_inet6)",
        )),
    }
}

/// Adds the V6 hint to a failure of an ip6tables tool.
fn v6_context(e: InitError) -> InitError {
    match e {
        InitError::Missing { bin, .. } => InitError::Missing { bin, hint: V6_HINT },
        InitError::Failed {
            cmd,
            stderr,
            hint: "",
        } => InitError::Failed {
            cmd,
            stderr,
            hint: V6_HINT,
        },
        e => e,
    }
}

fn apply(backend: Backend, family: Family, rules: &str) -> Result<(), InitError> {
    let restore = backend.restore(family);
    let iptables = backend.iptables(family);
    let restore_args = ["--noflush"];
    let out = run(&restore, &restore_args, Some(rules))?;
    check(&restore, &restore_args, &out)?;
    for (chain, args) in jumps() {
        let mut check_args = vec!["-t", "nat", "-C", chain];
        check_args.extend(args);
        let present = run(&iptables, &check_args, None)?.status.success();
        if !present {
            let mut add = vec!["-t", "nat", "-A", chain];
            add.extend(args);
            let out = run(&iptables, &add, None)?;
            check(&iptables, &add, &out)?;
        }
    }
    Ok(())
}

/// Installs (or with `dry_run` only prints) the rules for IPv4 and, per
/// `--ipv6`, IPv6; returns what it printed.
pub fn install(a: &InitArgs) -> Result<String, InitError> {
    let rules4 = rules(a, Family::V4)?;
    let rules6 = rules(a, Family::V6)?;
    let v6 = ipv6_decision(a, namespace_has_ipv6())?;
    let backend = a.iptables.unwrap_or_else(|| {
        if a.dry_run {
            Backend::Nft
        } else {
            detect_backend()
        }
    });
    let mut report = format!(
        "# weft-proxy init ({}){}\n{rules4}",
        backend.iptables(Family::V4),
        if a.dry_run { ", dry run" } else { "" }
    );
    for (chain, args) in jumps() {
        let _ = writeln!(report, "-A {chain} {}", args.join(" "));
    }
    match v6 {
        Ok(()) => {
            let _ = write!(report, "# ({})\n{rules6}", backend.iptables(Family::V6));
            for (chain, args) in jumps() {
                let _ = writeln!(report, "-A {chain} {}", args.join(" "));
            }
        }
        Err(why) => {
            let _ = writeln!(report, "# IPv6: {why}");
        }
    }
    if a.dry_run {
        return Ok(report);
    }
    apply(backend, Family::V4, &rules4)?;
    if v6.is_ok() {
        apply(backend, Family::V6, &rules6).map_err(v6_context)?;
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
        let r = rules(&t.a, Family::V4).expect("rules");
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
        assert!(matches!(rules(&t.a, Family::V4), Err(InitError::Cidr(_))));
        let t = T::parse_from(["t", "--exclude-outbound-cidrs", "fd00::/129"]);
        assert!(matches!(rules(&t.a, Family::V6), Err(InitError::Cidr(_))));
        let t = T::parse_from(["t", "--exclude-outbound-cidrs", "fd00::/8/1"]);
        assert!(matches!(rules(&t.a, Family::V4), Err(InitError::Cidr(_))));
    }

    #[test]
    fn cidrs_go_to_their_family() {
        let t = T::parse_from([
            "t",
            "--exclude-outbound-cidrs",
            "10.0.0.0/8,fd00:10::/64,192.168.1.7,2001:db8::1",
        ]);
        let v4 = rules(&t.a, Family::V4).expect("v4");
        let v6 = rules(&t.a, Family::V6).expect("v6");
        assert!(v4.contains("-d 10.0.0.0/8 -j RETURN") && v4.contains("-d 192.168.1.7 -j RETURN"));
        assert!(!v4.contains("fd00") && !v4.contains("2001:db8"), "{v4}");
        assert!(
            v6.contains("-d fd00:10::/64 -j RETURN") && v6.contains("-d 2001:db8::1 -j RETURN")
        );
        assert!(!v6.contains("10.0.0.0") && !v6.contains("192.168"), "{v6}");
        // Loopback per family; the rest is the same in both.
        assert!(v4.contains("-d 127.0.0.0/8 -j RETURN") && !v4.contains("::1"));
        assert!(v6.contains("-d ::1/128 -j RETURN") && !v6.contains("127.0.0.0"));
        for needle in [
            "--uid-owner 1337 -j RETURN",
            "-o lo -j RETURN",
            "--dport 15020 -j RETURN",
            "REDIRECT --to-ports 15006",
            "REDIRECT --to-ports 15001",
        ] {
            assert!(v6.contains(needle) && v4.contains(needle), "{needle}");
        }
    }

    #[test]
    fn ipv6_modes() {
        let args = |m: &str| T::parse_from(["t", "--ipv6", m]).a;
        assert!(matches!(ipv6_decision(&args("auto"), true), Ok(Ok(()))));
        assert!(matches!(ipv6_decision(&args("auto"), false), Ok(Err(_))));
        assert!(matches!(ipv6_decision(&args("on"), true), Ok(Ok(()))));
        assert!(matches!(
            ipv6_decision(&args("on"), false),
            Err(InitError::NoIpv6)
        ));
        assert!(matches!(ipv6_decision(&args("off"), true), Ok(Err(_))));
        let e = v6_context(InitError::Missing {
            bin: "ip6tables-nft-restore".into(),
            hint: "",
        });
        assert!(e.to_string().contains("--ipv6 off"), "{e}");
    }
}

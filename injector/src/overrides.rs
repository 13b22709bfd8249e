//! Per-pod annotations that refine the mesh-wide [`InjectConfig`].
//!
//! Every value is validated; a bad one becomes an [`OverrideError`] naming
//! the annotation, the value and what is wrong, which the webhook returns as
//! the denial message. An override replaces the mesh-wide value (it does not
//! add to it), so a pod can also clear a mesh-wide exclusion with `""`.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;

use weft_api::mesh::{LogLevel, ProxyResources};

use crate::config::InjectConfig;

/// Pod annotation: `"false"` keeps the pod out of the mesh.
pub const INJECT: &str = "weft.dev/inject";
/// Comma-separated inbound ports not captured, e.g. `"9100,8443"`.
pub const EXCLUDE_INBOUND_PORTS: &str = "weft.dev/exclude-inbound-ports";
/// Comma-separated outbound ports not captured.
pub const EXCLUDE_OUTBOUND_PORTS: &str = "weft.dev/exclude-outbound-ports";
/// Comma-separated outbound CIDRs not captured, e.g. `"10.0.0.0/8,fd00::/8"`.
pub const EXCLUDE_OUTBOUND_CIDRS: &str = "weft.dev/exclude-outbound-cidrs";
/// Comma-separated ports whose traffic the proxy treats as opaque TCP.
pub const OPAQUE_PORTS: &str = "weft.dev/opaque-ports";
/// Proxy CPU request, a Kubernetes quantity (`100m`, `0.5`).
pub const PROXY_CPU_REQUEST: &str = "weft.dev/proxy-cpu-request";
/// Proxy CPU limit.
pub const PROXY_CPU_LIMIT: &str = "weft.dev/proxy-cpu-limit";
/// Proxy memory request (`64Mi`).
pub const PROXY_MEMORY_REQUEST: &str = "weft.dev/proxy-memory-request";
/// Proxy memory limit.
pub const PROXY_MEMORY_LIMIT: &str = "weft.dev/proxy-memory-limit";
/// Proxy log level: `error`, `warn`, `info`, `debug`, `trace` (the
/// dependencies' internals; the default release sidecar compiles them out,
/// so there it shows what `debug` shows: architecture decision 13).
pub const PROXY_LOG_LEVEL: &str = "weft.dev/proxy-log-level";
/// This pod's access logs, over its namespace's: `all`, `errors`, `off`.
pub const ACCESS_LOG: &str = weft_api::mesh::ACCESS_LOG_ANNOTATION;

/// A rejected setting: which one, its value, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{setting}: {value:?} {reason}")]
pub struct OverrideError {
    /// Annotation or field name.
    pub setting: String,
    /// The offending value (truncated to keep messages short).
    pub value: String,
    /// What is wrong with it.
    pub reason: String,
}

impl OverrideError {
    pub(crate) fn new(setting: &str, value: &str, reason: impl Into<String>) -> Self {
        let value = if value.len() > 80 {
            let mut end = 80;
            while !value.is_char_boundary(end) {
                end -= 1;
            }
            format!("{}…", &value[..end])
        } else {
            value.to_owned()
        };
        Self {
            setting: setting.to_owned(),
            value,
            reason: reason.into(),
        }
    }
}

/// An IPv4 or IPv6 network in CIDR notation; a bare address means /32 or /128.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    /// Network address as written.
    pub addr: IpAddr,
    /// Prefix length.
    pub prefix: u8,
}

impl Cidr {
    /// Parses `a.b.c.d/n`, `x::y/n` or a bare address.
    pub fn parse(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = addr
            .parse()
            .map_err(|_| "is not an IP address or CIDR (like 10.0.0.0/8)".to_owned())?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => match p.parse::<u8>() {
                Ok(n) if n <= max && !p.starts_with('+') => n,
                _ => return Err(format!("has a prefix length that is not 0..={max}")),
            },
        };
        Ok(Self { addr, prefix })
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// The settings that apply to one pod: mesh defaults with its annotations
/// applied.
#[derive(Debug, Clone, PartialEq)]
pub struct PodSettings {
    /// Inbound ports not captured (the admin port is always added on top).
    pub exclude_inbound_ports: Vec<u16>,
    /// Outbound ports not captured.
    pub exclude_outbound_ports: Vec<u16>,
    /// Outbound CIDRs not captured.
    pub exclude_outbound_cidrs: Vec<Cidr>,
    /// Ports treated as opaque TCP.
    pub opaque_ports: Vec<u16>,
    /// Proxy resources.
    pub resources: ProxyResources,
    /// Proxy log level.
    pub log_level: LogLevel,
    /// Access logs of this pod (`all`, `errors`, `off`), when the pod says.
    pub access_log: Option<&'static str>,
}

/// Applies the pod's override annotations to the mesh defaults.
pub fn pod_settings(
    cfg: &InjectConfig,
    annotations: Option<&BTreeMap<String, String>>,
) -> Result<PodSettings, OverrideError> {
    let get = |key: &str| annotations.and_then(|a| a.get(key)).map(String::as_str);
    let mut s = PodSettings {
        exclude_inbound_ports: cfg.exclude_inbound_ports.clone(),
        exclude_outbound_ports: cfg.exclude_outbound_ports.clone(),
        exclude_outbound_cidrs: cfg.exclude_outbound_cidrs.clone(),
        opaque_ports: Vec::new(),
        resources: cfg.resources.clone(),
        log_level: cfg.log_level,
        access_log: None,
    };
    if let Some(v) = get(EXCLUDE_INBOUND_PORTS) {
        s.exclude_inbound_ports = parse_ports(EXCLUDE_INBOUND_PORTS, v)?;
    }
    if let Some(v) = get(EXCLUDE_OUTBOUND_PORTS) {
        s.exclude_outbound_ports = parse_ports(EXCLUDE_OUTBOUND_PORTS, v)?;
    }
    if let Some(v) = get(EXCLUDE_OUTBOUND_CIDRS) {
        s.exclude_outbound_cidrs = split_list(v)
            .map(|c| {
                Cidr::parse(c).map_err(|why| OverrideError::new(EXCLUDE_OUTBOUND_CIDRS, c, why))
            })
            .collect::<Result<_, _>>()?;
    }
    if let Some(v) = get(OPAQUE_PORTS) {
        s.opaque_ports = parse_ports(OPAQUE_PORTS, v)?;
    }
    if let Some(v) = get(PROXY_CPU_REQUEST) {
        cpu_millis(PROXY_CPU_REQUEST, v)?;
        s.resources.cpu_request = v.trim().to_owned();
    }
    if let Some(v) = get(PROXY_CPU_LIMIT) {
        cpu_millis(PROXY_CPU_LIMIT, v)?;
        s.resources.cpu_limit = Some(v.trim().to_owned());
    }
    if let Some(v) = get(PROXY_MEMORY_REQUEST) {
        memory_bytes(PROXY_MEMORY_REQUEST, v)?;
        s.resources.memory_request = v.trim().to_owned();
    }
    if let Some(v) = get(PROXY_MEMORY_LIMIT) {
        memory_bytes(PROXY_MEMORY_LIMIT, v)?;
        s.resources.memory_limit = v.trim().to_owned();
    }
    check_resources(&s.resources)?;
    if let Some(v) = get(PROXY_LOG_LEVEL) {
        s.log_level = parse_log_level(v)?;
    }
    if let Some(v) = get(ACCESS_LOG) {
        s.access_log = Some(match v.trim() {
            "all" => "all",
            "errors" => "errors",
            "off" => "off",
            _ => {
                return Err(OverrideError::new(
                    ACCESS_LOG,
                    v,
                    "must be all, errors or off",
                ));
            }
        });
    }
    Ok(s)
}

fn split_list(v: &str) -> impl Iterator<Item = &str> {
    v.split(',').map(str::trim).filter(|p| !p.is_empty())
}

fn parse_ports(setting: &str, v: &str) -> Result<Vec<u16>, OverrideError> {
    let mut ports = Vec::new();
    for p in split_list(v) {
        match p.parse::<u16>() {
            Ok(n) if n > 0 && !p.starts_with('+') => {
                if !ports.contains(&n) {
                    ports.push(n);
                }
            }
            _ => {
                return Err(OverrideError::new(
                    setting,
                    p,
                    "is not a port number 1..=65535 (expected a comma-separated list like \"8080,9090\")",
                ));
            }
        }
    }
    Ok(ports)
}

fn parse_log_level(v: &str) -> Result<LogLevel, OverrideError> {
    Ok(match v.trim().to_ascii_lowercase().as_str() {
        "error" => LogLevel::Error,
        "warn" | "warning" => LogLevel::Warn,
        "info" => LogLevel::Info,
        "debug" => LogLevel::Debug,
        "trace" => LogLevel::Trace,
        _ => {
            return Err(OverrideError::new(
                PROXY_LOG_LEVEL,
                v,
                "is not one of error, warn, info, debug, trace",
            ));
        }
    })
}

/// `LogLevel` as the proxy reads it from `WEFT_LOG_LEVEL`.
pub fn log_level_str(l: LogLevel) -> &'static str {
    match l {
        LogLevel::Error => "error",
        LogLevel::Warn => "warn",
        LogLevel::Info => "info",
        LogLevel::Debug => "debug",
        LogLevel::Trace => "trace",
    }
}

/// Splits `digits[.digits]` + suffix; `None` when the number part is malformed.
fn split_number(v: &str) -> Option<(f64, &str)> {
    let end = v
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(v.len());
    let (num, suffix) = v.split_at(end);
    let mut parts = num.split('.');
    let int = parts.next()?;
    let frac = parts.next();
    if int.is_empty() || parts.next().is_some() || frac.is_some_and(str::is_empty) {
        return None;
    }
    Some((num.parse().ok()?, suffix))
}

fn cpu_millis(setting: &str, v: &str) -> Result<f64, OverrideError> {
    let bad = || {
        OverrideError::new(
            setting,
            v,
            "is not a CPU quantity (like \"100m\" or \"0.5\")",
        )
    };
    let (n, suffix) = split_number(v.trim()).ok_or_else(bad)?;
    let m = match suffix {
        "" => n * 1000.0,
        "m" => n,
        _ => return Err(bad()),
    };
    if m <= 0.0 {
        return Err(OverrideError::new(setting, v, "must be greater than zero"));
    }
    Ok(m)
}

fn memory_bytes(setting: &str, v: &str) -> Result<f64, OverrideError> {
    let bad = || {
        OverrideError::new(
            setting,
            v,
            "is not a memory quantity (like \"64Mi\", \"1Gi\" or \"500M\")",
        )
    };
    let (n, suffix) = split_number(v.trim()).ok_or_else(bad)?;
    let mult: f64 = match suffix {
        "" => 1.0,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "Ki" => 1024.0,
        "Mi" => 1024.0 * 1024.0,
        "Gi" => 1024.0 * 1024.0 * 1024.0,
        "Ti" => 1024.0 * 1024.0 * 1024.0 * 1024.0,
        _ => return Err(bad()),
    };
    let b = n * mult;
    if b <= 0.0 {
        return Err(OverrideError::new(setting, v, "must be greater than zero"));
    }
    Ok(b)
}

/// Checks every quantity parses and no request exceeds its limit (which the
/// API server would reject with a far less helpful message).
pub(crate) fn check_resources(r: &ProxyResources) -> Result<(), OverrideError> {
    let cpu_req = cpu_millis("cpu request", &r.cpu_request)?;
    if let Some(limit) = &r.cpu_limit {
        let cpu_lim = cpu_millis("cpu limit", limit)?;
        if cpu_req > cpu_lim {
            return Err(OverrideError::new(
                "proxy cpu",
                &format!("request {} > limit {}", r.cpu_request, limit),
                "has a request above its limit",
            ));
        }
    }
    let mem_req = memory_bytes("memory request", &r.memory_request)?;
    let mem_lim = memory_bytes("memory limit", &r.memory_limit)?;
    if mem_req > mem_lim {
        return Err(OverrideError::new(
            "proxy memory",
            &format!("request {} > limit {}", r.memory_request, r.memory_limit),
            "has a request above its limit",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ann(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn no_annotations_means_mesh_defaults() {
        let cfg = InjectConfig::default();
        let s = pod_settings(&cfg, None).expect("defaults");
        assert_eq!(s.resources, cfg.resources);
        assert!(s.opaque_ports.is_empty());
    }

    #[test]
    fn every_override_applies() {
        let a = ann(&[
            (EXCLUDE_INBOUND_PORTS, " 9100, 8443 ,"),
            (EXCLUDE_OUTBOUND_PORTS, "5432"),
            (EXCLUDE_OUTBOUND_CIDRS, "10.0.0.0/8, fd00::/8,192.168.1.1"),
            (OPAQUE_PORTS, "3306,3306,6379"),
            (PROXY_CPU_REQUEST, "100m"),
            (PROXY_CPU_LIMIT, "1"),
            (PROXY_MEMORY_REQUEST, "64Mi"),
            (PROXY_MEMORY_LIMIT, "0.5Gi"),
            (PROXY_LOG_LEVEL, "DEBUG"),
            (ACCESS_LOG, " errors "),
        ]);
        let s = pod_settings(&InjectConfig::default(), Some(&a)).expect("valid");
        assert_eq!(s.exclude_inbound_ports, vec![9100, 8443]);
        assert_eq!(s.exclude_outbound_ports, vec![5432]);
        let cidrs: Vec<String> = s
            .exclude_outbound_cidrs
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(cidrs, ["10.0.0.0/8", "fd00::/8", "192.168.1.1/32"]);
        assert_eq!(s.opaque_ports, vec![3306, 6379]);
        assert_eq!(s.resources.cpu_request, "100m");
        assert_eq!(s.resources.cpu_limit.as_deref(), Some("1"));
        assert_eq!(s.resources.memory_limit, "0.5Gi");
        assert_eq!(s.log_level, LogLevel::Debug);
        assert_eq!(s.access_log, Some("errors"));
        let bad = pod_settings(
            &InjectConfig::default(),
            Some(&ann(&[(ACCESS_LOG, "loud")])),
        )
        .expect_err("refused");
        assert_eq!(bad.setting, ACCESS_LOG);
        assert!(
            bad.to_string().contains("must be all, errors or off"),
            "{bad}"
        );
    }

    #[test]
    fn empty_override_clears_mesh_default() {
        let cfg = InjectConfig {
            exclude_outbound_ports: vec![25],
            ..InjectConfig::default()
        };
        let s = pod_settings(&cfg, Some(&ann(&[(EXCLUDE_OUTBOUND_PORTS, "")]))).expect("valid");
        assert!(s.exclude_outbound_ports.is_empty());
    }

    #[test]
    fn bad_values_are_named_in_the_error() {
        let cases = [
            (EXCLUDE_INBOUND_PORTS, "80,http", "http"),
            (EXCLUDE_INBOUND_PORTS, "0", "1..=65535"),
            (EXCLUDE_OUTBOUND_PORTS, "65536", "65536"),
            (EXCLUDE_OUTBOUND_PORTS, "+80", "+80"),
            (OPAQUE_PORTS, "-1", "-1"),
            (EXCLUDE_OUTBOUND_CIDRS, "10.0.0.0/33", "prefix"),
            (EXCLUDE_OUTBOUND_CIDRS, "fd00::/129", "prefix"),
            (EXCLUDE_OUTBOUND_CIDRS, "example.com", "not an IP"),
            (PROXY_CPU_REQUEST, "lots", "CPU quantity"),
            (PROXY_CPU_REQUEST, "0", "greater than zero"),
            (PROXY_CPU_LIMIT, "1.m", "CPU quantity"),
            (PROXY_MEMORY_REQUEST, "64MB", "memory quantity"),
            (PROXY_MEMORY_LIMIT, "1Gi", "request"), // fine alone; request check below
            (PROXY_MEMORY_LIMIT, "1Mi", "above its limit"),
            (PROXY_CPU_LIMIT, "5m", "above its limit"),
            (PROXY_LOG_LEVEL, "loud", "error, warn"),
        ];
        for (key, value, needle) in cases {
            let r = pod_settings(&InjectConfig::default(), Some(&ann(&[(key, value)])));
            if value == "1Gi" {
                assert!(r.is_ok(), "{key}={value} should be accepted");
                continue;
            }
            let err = r.expect_err(&format!("{key}={value} must be refused"));
            let msg = err.to_string();
            assert!(
                msg.contains(needle),
                "{key}={value}: message {msg:?} lacks {needle:?}"
            );
        }
    }

    #[test]
    fn long_values_are_truncated_in_messages() {
        let junk = "é".repeat(500);
        let err = pod_settings(
            &InjectConfig::default(),
            Some(&ann(&[(OPAQUE_PORTS, &junk)])),
        )
        .expect_err("junk");
        assert!(err.to_string().len() < 300);
    }
}

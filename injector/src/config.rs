//! What the injector adds to a pod, as one typed value: [`InjectConfig`].
//!
//! The mesh-wide part comes from the `Mesh` named `default`
//! (`spec.injection` and `spec.trustDomain`) through
//! [`InjectConfig::from_mesh`]; [`InjectConfig::default`] holds the built-in
//! defaults used while no `Mesh` exists. Per-pod annotations refine it later
//! (see [`crate::overrides`]); this module only holds the validated defaults.

use weft_api::mesh::{InjectionSettings, LogLevel, MeshSpec, ProxyResources, PullPolicy};

use crate::overrides::{self, Cidr, OverrideError};

/// uid and gid the proxy runs as; `weft-init` exempts this uid from capture.
pub const PROXY_UID: i64 = 1337;
/// Admin port of the proxy: `/ready`, `/live`, `/metrics`, `/app-health/...`.
pub const ADMIN_PORT: u16 = 15020;
/// Port outbound TCP is redirected to.
pub const OUTBOUND_CAPTURE_PORT: u16 = 15001;
/// Port inbound TCP is redirected to.
pub const INBOUND_CAPTURE_PORT: u16 = 15006;
/// Where the projected volume with identity, config and labels is mounted.
pub const MOUNT_PATH: &str = "/var/run/weft";
/// The version written to the `weft.dev/proxy-version` annotation: weft is
/// released as one version for injector and proxy.
pub const WEFT_VERSION: &str = env!("CARGO_PKG_VERSION");

/// Everything the patch builder needs besides the pod. Built once per `Mesh`
/// change, shared read-only by every admission.
#[derive(Clone, Debug, PartialEq)]
pub struct InjectConfig {
    /// Image of the proxy, also used for `weft-init`.
    pub proxy_image: String,
    /// Pull policy for that image; `None` leaves the Kubernetes default.
    pub image_pull_policy: Option<PullPolicy>,
    /// Proxy as a native sidecar (restartable init container) rather than
    /// the first regular container.
    pub native_sidecar: bool,
    /// Proxy container resources.
    pub resources: ProxyResources,
    /// Proxy log level.
    pub log_level: LogLevel,
    /// Inbound ports never captured.
    pub exclude_inbound_ports: Vec<u16>,
    /// Outbound ports never captured.
    pub exclude_outbound_ports: Vec<u16>,
    /// Outbound destinations never captured.
    pub exclude_outbound_cidrs: Vec<Cidr>,
    /// SPIFFE trust domain, handed to the proxy.
    pub trust_domain: String,
    /// Value of the `weft.dev/proxy-version` annotation.
    pub version: String,
}

impl Default for InjectConfig {
    fn default() -> Self {
        Self::from_mesh(&MeshSpec::default())
            .expect("the built-in Mesh defaults are valid injection settings")
    }
}

/// A `Mesh` whose injection settings cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("Mesh spec.injection: {0}")]
pub struct MeshConfigError(#[from] OverrideError);

impl InjectConfig {
    /// Builds the configuration from a `Mesh` spec, validating the values a
    /// CRD schema cannot fully check (CIDRs, quantities, request ≤ limit).
    pub fn from_mesh(mesh: &MeshSpec) -> Result<Self, MeshConfigError> {
        let InjectionSettings {
            proxy_image,
            image_pull_policy,
            native_sidecar,
            resources,
            log_level,
            exclude_inbound_ports,
            exclude_outbound_ports,
            exclude_outbound_cidrs,
        } = &mesh.injection;
        if proxy_image.trim().is_empty() {
            return Err(OverrideError::new("proxyImage", proxy_image, "must not be empty").into());
        }
        let cidrs = exclude_outbound_cidrs
            .iter()
            .map(|c| {
                Cidr::parse(c).map_err(|why| OverrideError::new("excludeOutboundCidrs", c, why))
            })
            .collect::<Result<Vec<_>, _>>()?;
        for (field, ports) in [
            ("excludeInboundPorts", exclude_inbound_ports),
            ("excludeOutboundPorts", exclude_outbound_ports),
        ] {
            if ports.contains(&0) {
                return Err(OverrideError::new(field, "0", "port 0 is not a port").into());
            }
        }
        overrides::check_resources(resources)?;
        Ok(Self {
            proxy_image: proxy_image.clone(),
            image_pull_policy: *image_pull_policy,
            native_sidecar: *native_sidecar,
            resources: resources.clone(),
            log_level: *log_level,
            exclude_inbound_ports: exclude_inbound_ports.clone(),
            exclude_outbound_ports: exclude_outbound_ports.clone(),
            exclude_outbound_cidrs: cidrs,
            trust_domain: mesh.trust_domain.clone(),
            version: WEFT_VERSION.to_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_safe() {
        let cfg = InjectConfig::default();
        assert!(cfg.native_sidecar);
        assert_eq!(cfg.trust_domain, "cluster.local");
        assert_eq!(cfg.resources.memory_limit, "128Mi");
        assert!(cfg.exclude_outbound_cidrs.is_empty());
    }

    #[test]
    fn mesh_values_are_taken() {
        let mut mesh = MeshSpec {
            trust_domain: "prod.example".into(),
            ..MeshSpec::default()
        };
        mesh.injection.native_sidecar = false;
        mesh.injection.exclude_outbound_cidrs = vec!["169.254.169.254/32".into()];
        mesh.injection.exclude_inbound_ports = vec![9100];
        let cfg = InjectConfig::from_mesh(&mesh).expect("valid mesh");
        assert!(!cfg.native_sidecar);
        assert_eq!(cfg.trust_domain, "prod.example");
        assert_eq!(
            cfg.exclude_outbound_cidrs[0].to_string(),
            "169.254.169.254/32"
        );
        assert_eq!(cfg.exclude_inbound_ports, vec![9100]);
    }

    #[test]
    fn bad_mesh_values_are_refused() {
        let mut mesh = MeshSpec::default();
        mesh.injection.exclude_outbound_cidrs = vec!["10.0.0.0/33".into()];
        let err = InjectConfig::from_mesh(&mesh).expect_err("bad cidr");
        assert!(err.to_string().contains("excludeOutboundCidrs"), "{err}");

        let mut mesh = MeshSpec::default();
        mesh.injection.resources.memory_request = "1Gi".into();
        let err = InjectConfig::from_mesh(&mesh).expect_err("request above limit");
        assert!(err.to_string().contains("memory"), "{err}");
    }
}

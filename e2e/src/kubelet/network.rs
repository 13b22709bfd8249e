//! Node and pod networking, and kube-proxy's job.
//!
//! ```text
//!  node netns (the harness's)                      pod netns
//!  weft0 bridge 10.244.0.1/24 ── wv<id><n> ══ veth ══ eth0 10.244.0.n/32
//!  iptables nat WEFT-SERVICES: ClusterIP:port → DNAT podIP:targetPort
//! ```
//!
//! A pod calling its own Service and picked as the endpoint (hairpin) is
//! masqueraded to the node IP, as with kube-proxy; every other caller keeps
//! its own address.
//!
//! Pod addresses are /32 with the bridge address as their on-link gateway,
//! so pod-to-pod traffic is *routed* by the node namespace even between
//! ports of one bridge: conntrack sees both directions and un-DNATs replies
//! without masquerading (the server sees the real client pod IP) and without
//! `br_netfilter`.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::Api;
use kube::api::ListParams;

use super::{KubeletError, Node};
use crate::netns::{NetNs, NetnsError};

/// The node bridge's name.
pub const BRIDGE: &str = "weft0";

/// Prepares the node namespace: bridge with the node IP, a route for
/// ClusterIPs, forwarding, and
/// the service chain hooked into PREROUTING (pods) and OUTPUT (node).
pub fn setup_node(ns: &NetNs, node_ip: Ipv4Addr, service_cidr: &str) -> Result<(), NetnsError> {
    ns.ip(&["link", "add", BRIDGE, "type", "bridge"])?;
    ns.ip(&["addr", "add", &format!("{node_ip}/24"), "dev", BRIDGE])?;
    ns.ip(&["link", "set", BRIDGE, "up"])?;
    // The namespace has no default route: give ClusterIPs one, so the
    // node's own clients (kube-apiserver calling webhooks) get as far as
    // the OUTPUT chain's DNAT.
    ns.ip(&["route", "add", service_cidr, "dev", BRIDGE])?;
    for key in [
        "net.ipv4.ip_forward=1",
        "net.ipv4.conf.all.send_redirects=0",
        &format!("net.ipv4.conf.{BRIDGE}.send_redirects=0"),
    ] {
        ns.exec("sysctl", &["-q", "-w", key])?;
    }
    ns.exec_with_stdin(
        "iptables-restore",
        &["--noflush"],
        "*nat\n:WEFT-SERVICES - [0:0]\n:WEFT-POSTROUTING - [0:0]\n\
         -A PREROUTING -j WEFT-SERVICES\n-A OUTPUT -j WEFT-SERVICES\n\
         -A POSTROUTING -j WEFT-POSTROUTING\nCOMMIT\n",
    )
    .map_err(|e| match e {
        NetnsError::Command { cmd, detail } => NetnsError::Command {
            cmd,
            detail: format!("{detail} (install iptables: apt-get install -y iptables)"),
        },
        other => other,
    })?;
    Ok(())
}

/// A pod's network: its namespace (none for hostNetwork pods) and IP.
/// Dropping it deletes the namespace (and with it the veth) and frees the IP.
#[derive(Debug)]
pub struct Sandbox {
    node: Arc<Node>,
    netns: Option<NetNs>,
    netns_name: String,
    ip: Ipv4Addr,
}

impl Sandbox {
    /// Creates the pod's namespace, veth and address.
    pub fn create(node: &Arc<Node>, pod: &Pod) -> Result<Self, KubeletError> {
        if pod
            .spec
            .as_ref()
            .and_then(|s| s.host_network)
            .unwrap_or(false)
        {
            return Ok(Self {
                node: node.clone(),
                netns: None,
                netns_name: node.node_ns.clone(),
                ip: node.node_ip,
            });
        }
        let forced = pod
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(super::ipam::POD_IP_ANNOTATION))
            .map(|v| {
                v.parse::<Ipv4Addr>().map_err(|e| {
                    KubeletError::ForcedIp(format!(
                        "annotation {}: {v:?}: {e}",
                        super::ipam::POD_IP_ANNOTATION
                    ))
                })
            })
            .transpose()?;
        let (seq, ip) = node.allocate_ip(forced)?;
        let name = format!("weft-{}-p{seq}", node.id);
        let netns = NetNs::create(&name).inspect_err(|_| node.release_ip(ip))?;
        let sandbox = Self {
            node: node.clone(),
            netns: Some(netns),
            netns_name: name.clone(),
            ip,
        };
        let veth = format!("wv{}{seq}", node.id);
        let node_ns = &node.node_ns;
        let node_ip = node.node_ip.to_string();
        let ip_cmd = |args: &[&str]| crate::netns::run("ip", args);
        ip_cmd(&[
            "-n", node_ns, "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns",
            &name,
        ])?;
        ip_cmd(&["-n", node_ns, "link", "set", &veth, "master", BRIDGE, "up"])?;
        // A reused address has a new MAC behind it: forget the old one at
        // once, as the bridge plugin's gratuitous ARP would make neighbours do.
        ip_cmd(&["-n", node_ns, "neigh", "flush", &ip.to_string()])?;
        // Where br_netfilter is loaded, a Service call DNATed back to the
        // calling pod is bridged out of the port it came in: allow that.
        ip_cmd(&[
            "-n",
            node_ns,
            "link",
            "set",
            &veth,
            "type",
            "bridge_slave",
            "hairpin",
            "on",
        ])?;
        ip_cmd(&[
            "-n",
            &name,
            "addr",
            "add",
            &format!("{ip}/32"),
            "dev",
            "eth0",
        ])?;
        ip_cmd(&["-n", &name, "link", "set", "eth0", "up"])?;
        ip_cmd(&[
            "-n", &name, "route", "add", &node_ip, "dev", "eth0", "scope", "link",
        ])?;
        ip_cmd(&[
            "-n", &name, "route", "add", "default", "via", &node_ip, "dev", "eth0",
        ])?;
        // The pod's network sysctls (`securityContext.sysctls`, e.g. a
        // gateway's `net.ipv4.ip_unprivileged_port_start`), which are per
        // network namespace, as kubelet sets them in the pod sandbox.
        let sysctls = pod
            .spec
            .as_ref()
            .and_then(|s| s.security_context.as_ref())
            .and_then(|s| s.sysctls.as_ref());
        if let Some(ns) = sandbox.netns.as_ref() {
            for s in sysctls.into_iter().flatten() {
                if s.name.starts_with("net.") {
                    ns.exec("sysctl", &["-q", "-w", &format!("{}={}", s.name, s.value)])?;
                }
            }
        }
        Ok(sandbox)
    }

    /// The network namespace the pod's processes run in.
    pub fn netns_name(&self) -> &str {
        &self.netns_name
    }

    /// The pod IP.
    pub fn ip(&self) -> IpAddr {
        IpAddr::V4(self.ip)
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        if self.netns.take().is_some() {
            self.node.release_ip(self.ip);
        }
    }
}

/// kube-proxy: keeps WEFT-SERVICES in sync with Services and ready
/// EndpointSlice endpoints, polling every `period`.
pub async fn proxy_services(node: Arc<Node>, period: Duration) {
    let mut last = String::new();
    loop {
        match render_rules(&node.client).await {
            Ok(rules) if rules != last => {
                match crate::netns::run_with_stdin(
                    "ip",
                    &[
                        "netns",
                        "exec",
                        &node.node_ns,
                        "iptables-restore",
                        "--noflush",
                    ],
                    Some(&rules),
                ) {
                    Ok(_) => last = rules,
                    Err(e) => node.log(&format!("kube-proxy: {e}")),
                }
            }
            Ok(_) => {}
            Err(e) => tracing::debug!(error = %e, "kube-proxy list"),
        }
        tokio::time::sleep(period).await;
    }
}

/// The whole WEFT-SERVICES chain as `iptables-restore` input.
async fn render_rules(client: &kube::Client) -> Result<String, kube::Error> {
    let services = Api::<Service>::all(client.clone())
        .list(&ListParams::default())
        .await?;
    let slices = Api::<EndpointSlice>::all(client.clone())
        .list(&ListParams::default())
        .await?;
    // (namespace, service) → slices
    let mut by_service: BTreeMap<(String, String), Vec<&EndpointSlice>> = BTreeMap::new();
    for s in &slices.items {
        if let Some(svc) = s
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get("kubernetes.io/service-name"))
        {
            by_service
                .entry((
                    s.metadata.namespace.clone().unwrap_or_default(),
                    svc.clone(),
                ))
                .or_default()
                .push(s);
        }
    }
    let mut out = String::from("*nat\n:WEFT-SERVICES - [0:0]\n:WEFT-POSTROUTING - [0:0]\n");
    let mut hairpin = std::collections::BTreeSet::new();
    for svc in &services.items {
        let Some(spec) = &svc.spec else { continue };
        let Some(cluster_ip) = spec
            .cluster_ip
            .as_deref()
            .filter(|ip| *ip != "None" && !ip.is_empty())
        else {
            continue;
        };
        let key = (
            svc.metadata.namespace.clone().unwrap_or_default(),
            svc.metadata.name.clone().unwrap_or_default(),
        );
        for port in spec.ports.iter().flatten() {
            let proto = port.protocol.as_deref().unwrap_or("TCP").to_lowercase();
            let mut targets: Vec<String> = Vec::new();
            for slice in by_service.get(&key).into_iter().flatten() {
                let Some(ep_port) = slice.ports.iter().flatten().find(|p| {
                    p.name.as_deref().unwrap_or("") == port.name.as_deref().unwrap_or("")
                }) else {
                    continue;
                };
                let Some(num) = ep_port.port else { continue };
                for ep in &slice.endpoints {
                    let ready = ep.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true);
                    if ready {
                        targets.extend(ep.addresses.iter().map(|a| format!("{a}:{num}")));
                    }
                }
            }
            targets.sort();
            hairpin.extend(
                targets
                    .iter()
                    .filter_map(|t| t.split_once(':').map(|(ip, _)| ip.to_owned())),
            );
            let n = targets.len();
            for (i, t) in targets.iter().enumerate() {
                let stat = if i + 1 < n {
                    format!(
                        " -m statistic --mode random --probability {:.5}",
                        1.0 / (n - i) as f64
                    )
                } else {
                    String::new()
                };
                out.push_str(&format!(
                    "-A WEFT-SERVICES -d {cluster_ip}/32 -p {proto} --dport {}{stat} -j DNAT --to-destination {t}\n",
                    port.port
                ));
            }
        }
    }
    // Hairpin: a pod whose call to its own Service was DNATed back to
    // itself would get a packet from its own address (dropped as martian);
    // after DNAT such a packet has source == destination: masquerade it to
    // the node IP, as kube-proxy does.
    for ip in hairpin {
        out.push_str(&format!(
            "-A WEFT-POSTROUTING -s {ip}/32 -d {ip}/32 -j MASQUERADE\n"
        ));
    }
    out.push_str("COMMIT\n");
    Ok(out)
}

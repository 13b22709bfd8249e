//! The install RBAC is exactly what weft's code uses. The API server's
//! audit log records every request the operator and the injector make
//! while they install, issue identities, render configs, judge invalid
//! resources, rotate the CA and clean up after a namespace leaves the mesh.
//! From that record (what the code really calls, derived from its watchers
//! and writers at run time, not a hand-written list) the test checks both
//! directions: no call was refused, and every verb the ClusterRoles and
//! Roles grant was used.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use common::serial;
use k8s_openapi::api::rbac::v1::{ClusterRole, PolicyRule, Role};
use kube::Api;
use weft_e2e::Cluster;
use weft_e2e::mesh;

const OPERATOR: &str = "system:serviceaccount:weft-system:weft-operator";
const INJECTOR: &str = "system:serviceaccount:weft-system:weft-injector";

/// `(apiGroup, resource[/subresource], verb)`.
type Call = (String, String, String);

fn grants(rules: &[PolicyRule]) -> BTreeSet<Call> {
    let mut out = BTreeSet::new();
    for r in rules {
        for g in r.api_groups.iter().flatten() {
            for res in r.resources.iter().flatten() {
                for v in &r.verbs {
                    out.insert((g.clone(), res.clone(), v.clone()));
                }
            }
        }
    }
    out
}

async fn granted(cluster: &Cluster, name: &str) -> anyhow::Result<BTreeSet<Call>> {
    let mut out = BTreeSet::new();
    let crs: Api<ClusterRole> = Api::all(cluster.client());
    if let Some(cr) = crs.get_opt(name).await? {
        out.extend(grants(cr.rules.as_deref().unwrap_or_default()));
    }
    let roles: Api<Role> = Api::namespaced(cluster.client(), "weft-system");
    for role in roles.list(&Default::default()).await?.items {
        if role
            .metadata
            .name
            .as_deref()
            .is_some_and(|n| n.starts_with(name))
        {
            out.extend(grants(role.rules.as_deref().unwrap_or_default()));
        }
    }
    Ok(out)
}

/// Calls per user.
type CallsByUser = BTreeMap<String, BTreeSet<Call>>;

/// Calls per user from the audit log, and the refused ones.
fn used(cluster: &Cluster) -> anyhow::Result<(CallsByUser, Vec<String>)> {
    let mut by_user = CallsByUser::new();
    let mut refused = Vec::new();
    for e in cluster.audit_events()? {
        let user = e["user"]["username"].as_str().unwrap_or("").to_owned();
        let obj = &e["objectRef"];
        let Some(resource) = obj["resource"].as_str() else {
            continue; // non-resource URLs (/version, /api discovery)
        };
        let resource = match obj["subresource"].as_str() {
            Some(sub) => format!("{resource}/{sub}"),
            None => resource.to_owned(),
        };
        let call = (
            obj["apiGroup"].as_str().unwrap_or("").to_owned(),
            resource,
            e["verb"].as_str().unwrap_or("").to_owned(),
        );
        if e["responseStatus"]["code"] == 403 {
            refused.push(format!("{user} {call:?} {}", e["requestURI"]));
        }
        let calls = by_user.entry(user).or_default();
        // A server-side apply that creates its object (201) is authorized
        // as "create" as well as "patch".
        if call.2 == "patch" && e["responseStatus"]["code"] == 201 {
            calls.insert((call.0.clone(), call.1.clone(), "create".to_owned()));
        }
        calls.insert(call);
    }
    Ok((by_user, refused))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rbac_grants_exactly_the_calls_weft_makes() -> anyhow::Result<()> {
    let _serial = serial().await;
    let cluster = Cluster::start().await?;
    // The Gateway API CRDs first, so the operator watches them from the
    // start, and its gateway calls are part of the record.
    mesh::install_gateway_api(&cluster, mesh::Channel::Experimental).await?;
    mesh::install(&cluster).await?;
    mesh::deploy_demo(&cluster).await?;

    // A Gateway of weft's class in a namespace outside the mesh (its
    // service account still gets an identity), an HTTPRoute and a TLSRoute
    // (experimental channel) on it, and a route on a Service: the operator
    // runs the gateway (Deployment, Service, ServiceAccount, ConfigMap) and
    // writes Gateway, GatewayClass, HTTPRoute and TLSRoute status.
    mesh::install_gateway_class(&cluster).await?;
    mesh::apply_yaml(
        &cluster,
        r#"apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: rbac, namespace: outside, annotations: {weft.dev/gateway-service-type: ClusterIP}}
spec:
  gatewayClassName: weft
  listeners:
  - {name: http, port: 8081, protocol: HTTP}
  - {name: tls, port: 8443, protocol: TLS, tls: {mode: Passthrough}}
---
apiVersion: gateway.networking.k8s.io/v1alpha2
kind: TLSRoute
metadata: {name: rbac, namespace: outside}
spec:
  parentRefs: [{name: rbac, sectionName: tls}]
  hostnames: [client.example.com]
  rules:
  - backendRefs: [{name: client, port: 8080}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: rbac, namespace: outside}
spec:
  parentRefs: [{name: rbac}]
  rules:
  - backendRefs: [{name: client, port: 8080}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: rbac-mesh, namespace: demo}
spec:
  parentRefs: [{group: "", kind: Service, name: store, port: 8080}]
  rules:
  - backendRefs: [{name: store, port: 8080}]
"#,
    )
    .await?;
    let status = async |ns: &str, kind: &str, name: &str, path: &str| {
        cluster
            .kubectl(&[
                "get",
                kind,
                "-n",
                ns,
                name,
                "-o",
                &format!("jsonpath={path}"),
            ])
            .await
    };
    cluster
        .wait_until(
            Duration::from_secs(90),
            "gateway programmed, routes judged",
            || async {
                let gateway = status(
                    "outside",
                    "gateway",
                    "rbac",
                    r#"{.status.conditions[?(@.type=="Programmed")].status}"#,
                )
                .await?;
                let on_gateway = status(
                    "outside",
                    "httproute",
                    "rbac",
                    "{.status.parents[*].controllerName}",
                )
                .await?;
                let tls_route = status(
                    "outside",
                    "tlsroute",
                    "rbac",
                    "{.status.parents[*].controllerName}",
                )
                .await?;
                let on_service = status(
                    "demo",
                    "httproute",
                    "rbac-mesh",
                    "{.status.parents[*].controllerName}",
                )
                .await?;
                Ok(gateway == "True"
                    && on_gateway == "weft.dev/gateway-controller"
                    && tls_route == "weft.dev/gateway-controller"
                    && on_service == "weft.dev/mesh")
            },
        )
        .await?;

    // An invalid resource: the operator reports Accepted=False on its
    // status and records an Event.
    cluster
        .kubectl_stdin(
            &["apply", "-f", "-"],
            Some(
                r#"apiVersion: weft.dev/v1alpha1
kind: ServiceRoute
metadata:
  name: to-nowhere
  namespace: demo
spec:
  service: no-such-service
  http:
  - backends:
    - service: no-such-service
"#,
            ),
        )
        .await?;
    cluster
        .wait_until(Duration::from_secs(60), "to-nowhere judged", || async {
            let out = cluster
                .kubectl_output(
                    &[
                        "get",
                        "serviceroute",
                        "-n",
                        "demo",
                        "to-nowhere",
                        "-o",
                        "jsonpath={.status.conditions[?(@.type==\"Accepted\")].status}",
                    ],
                    None,
                )
                .await?;
            Ok(String::from_utf8_lossy(&out.stdout).trim() == "False")
        })
        .await?;

    // A CA rotation: the operator rewrites weft-ca, the identity Secrets,
    // the injector's serving Secret and the webhook's caBundle.
    mesh::patch_mesh_spec(&cluster, r#"{"certificates":{"rotateCa":"rbac-test"}}"#).await?;
    cluster
        .wait_until(Duration::from_secs(60), "CA rotation started", || async {
            let out = cluster
                .kubectl_output(
                    &[
                        "get",
                        "secret",
                        "-n",
                        "weft-system",
                        "weft-ca",
                        "-o",
                        "jsonpath={.data.next\\.crt}",
                    ],
                    None,
                )
                .await?;
            Ok(!out.stdout.is_empty())
        })
        .await?;

    // The namespace leaves the mesh: its ConfigMap and identity Secrets go.
    cluster
        .kubectl(&["label", "namespace", "demo", "weft.dev/inject-"])
        .await?;
    cluster
        .wait_until(Duration::from_secs(60), "demo cleaned up", || async {
            Ok(mesh::identity_secrets(&cluster, "demo").await?.is_empty())
        })
        .await?;
    // Let the last writes (status, Events, lease renewals) land.
    tokio::time::sleep(Duration::from_secs(5)).await;

    let (by_user, refused) = used(&cluster)?;
    assert!(refused.is_empty(), "refused API calls: {refused:#?}");

    // Granted but legitimately not exercised by this run, with the reason.
    let not_exercised: BTreeSet<Call> = [
        // kube's event Recorder patches an Event it already created when
        // the same event repeats (an event series).
        ("events.k8s.io", "events", "patch"),
        // The identity reconciler reads a namespace its watch has not
        // delivered yet; whether that happens in a run depends on timing.
        ("", "namespaces", "get"),
    ]
    .into_iter()
    .map(|(g, r, v)| (g.to_owned(), r.to_owned(), v.to_owned()))
    .collect();

    let mut report = Vec::new();
    for (user, role) in [(OPERATOR, "weft-operator"), (INJECTOR, "weft-injector")] {
        let granted = granted(&cluster, role).await?;
        let used = by_user.get(user).cloned().unwrap_or_default();
        assert!(!used.is_empty(), "{user} made no API call");
        eprintln!(
            "{user}: {} calls used, {} granted",
            used.len(),
            granted.len()
        );
        for call in granted.difference(&used) {
            if !not_exercised.contains(call) {
                report.push(format!("{role} grants {call:?}, which the code never used"));
            }
        }
        for call in used.difference(&granted) {
            report.push(format!(
                "{role} used {call:?}, which its roles do not grant"
            ));
        }
    }
    assert!(
        report.is_empty(),
        "RBAC differs from the code's calls:\n{}",
        report.join("\n")
    );

    cluster.shutdown();
    Ok(())
}

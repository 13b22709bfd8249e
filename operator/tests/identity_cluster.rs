//! The `weft-operator` binary against the e2e harness's real API server
//! (etcd, kube-apiserver, controller-manager in a private network
//! namespace): CA and identities for labelled namespaces only, repair of
//! deleted and hand-edited Secrets, the webhook `caBundle`, a CA rotation
//! that survives a crash of the leader mid-way, leadership handed from one
//! replica to another without the standby ever writing, and a deleted
//! `weft-ca`: a new CA reported by a Warning Event and a metric with a
//! generated CA, never a generated CA in place of a broken user CA.
//!
//! Needs root and the control plane binary (`e2e/controlplane/build.sh`);
//! the harness fails with instructions when either is missing.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, ListParams, PostParams};
use kube::{CustomResourceExt, ResourceExt};
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::WebPkiClientVerifier;
use weft_api::mesh::{Mesh, RotationPhase};
use weft_e2e::{Cluster, HarnessError};
use weft_operator::ca::{LeafInfo, parse_cert_pems};

/// A `weft-operator` process; killed when dropped.
struct Operator {
    child: Child,
    log: PathBuf,
    admin_port: u16,
}

impl Operator {
    fn start(cluster: &Cluster, name: &str, dir: &std::path::Path) -> anyhow::Result<Self> {
        let admin_port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let log = dir.join(format!("{name}.log"));
        let out = std::fs::File::create(&log)?;
        let child = Command::new(env!("CARGO_BIN_EXE_weft-operator"))
            .env("KUBECONFIG", cluster.kubeconfig())
            .env("RUST_LOG", "info,kube=warn,kube_lease_manager=info")
            .args([
                "--namespace",
                "weft-system",
                "--admin-address",
                "127.0.0.1",
                "--admin-port",
                &admin_port.to_string(),
                "--identity",
                name,
                "--lease-duration-seconds",
                "4",
                "--lease-grace-seconds",
                "1",
                "--ca-propagation-seconds",
                "2",
                "--log-format",
                "text",
            ])
            .stdout(out.try_clone()?)
            .stderr(out)
            .stdin(Stdio::null())
            .spawn()
            .context("starting weft-operator")?;
        Ok(Self {
            child,
            log,
            admin_port,
        })
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// A metric's value from the admin server's `/metrics`.
    async fn metric(&self, name: &str) -> anyhow::Result<f64> {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", self.admin_port)).await?;
        s.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
            .await?;
        let mut body = String::new();
        s.read_to_string(&mut body).await?;
        body.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
            .with_context(|| format!("metric {name} not found in:\n{body}"))
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn terminate(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("---- {} ----\n{}", self.log.display(), self.log());
        }
        self.kill();
    }
}

fn data(s: &Secret, key: &str) -> Vec<u8> {
    s.data
        .as_ref()
        .and_then(|d| d.get(key))
        .map(|b| b.0.clone())
        .unwrap_or_default()
}

fn verify_chain(bundle: &[u8], chain: &[u8]) -> anyhow::Result<()> {
    let mut roots = rustls::RootCertStore::empty();
    for d in parse_cert_pems(bundle, "bundle")? {
        roots.add(CertificateDer::from(d))?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier =
        WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider).build()?;
    let chain: Vec<CertificateDer<'static>> = parse_cert_pems(chain, "chain")?
        .into_iter()
        .map(CertificateDer::from)
        .collect();
    let (leaf, rest) = chain.split_first().context("empty chain")?;
    verifier.verify_client_cert(leaf, rest, UnixTime::now())?;
    Ok(())
}

/// Clusters are heavy and share host mount points: the tests of this file
/// run one at a time.
async fn serial() -> tokio::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::OnceLock<tokio::sync::Mutex<()>> = std::sync::OnceLock::new();
    LOCK.get_or_init(|| tokio::sync::Mutex::new(()))
        .lock()
        .await
}

/// The types of the Events with `reason` on Mesh `default`.
async fn mesh_events(cluster: &Cluster, reason: &str) -> Result<Vec<String>, HarnessError> {
    let out = cluster
        .kubectl(&[
            "get",
            "events",
            "-A",
            "--field-selector",
            &format!("reason={reason},involvedObject.kind=Mesh,involvedObject.name=default"),
            "-o",
            "jsonpath={.items[*].type}",
        ])
        .await?;
    Ok(out.split_whitespace().map(str::to_owned).collect())
}

async fn secret(api: &Api<Secret>, name: &str) -> anyhow::Result<Option<Secret>> {
    Ok(api.get_opt(name).await?)
}

async fn mesh_phase(meshes: &Api<Mesh>) -> Option<RotationPhase> {
    meshes
        .get_opt("default")
        .await
        .ok()
        .flatten()
        .and_then(|m| m.status)
        .map(|s| s.rotation_phase)
}

const WEBHOOK: &str = r#"
apiVersion: admissionregistration.k8s.io/v1
kind: MutatingWebhookConfiguration
metadata:
  name: weft-injector
webhooks:
- name: pods.weft.dev
  admissionReviewVersions: ["v1"]
  sideEffects: None
  failurePolicy: Ignore
  namespaceSelector:
    matchLabels: {weft.dev/never: "true"}
  clientConfig:
    service: {name: weft-injector, namespace: weft-system, path: /inject}
  rules:
  - operations: ["CREATE"]
    apiGroups: [""]
    apiVersions: ["v1"]
    resources: ["pods"]
"#;

const MESH: &str = r#"
apiVersion: weft.dev/v1alpha1
kind: Mesh
metadata: {name: default}
spec:
  certificates: {ttl: 60s}
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_issues_repairs_rotates_and_hands_over() -> anyhow::Result<()> {
    let _serial = serial().await;
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cluster = Cluster::start().await?;
    let client = cluster.client();
    let dir = tempfile::tempdir()?;
    let wait = Duration::from_secs(60);

    // The Mesh CRD, three namespaces, a webhook configuration to keep in step.
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    crds.create(&PostParams::default(), &Mesh::crd()).await?;
    cluster
        .kubectl(&[
            "wait",
            "--for=condition=Established",
            "crd/meshes.weft.dev",
            "--timeout=60s",
        ])
        .await?;
    for ns in ["weft-system", "meshed", "plain"] {
        cluster.create_namespace(ns).await?;
    }
    cluster
        .kubectl(&["label", "namespace", "meshed", "weft.dev/inject=enabled"])
        .await?;
    for ns in ["meshed", "plain"] {
        cluster
            .kubectl(&["-n", ns, "create", "serviceaccount", "cart"])
            .await?;
    }
    cluster
        .kubectl_stdin(&["apply", "-f", "-"], Some(WEBHOOK))
        .await?;
    cluster
        .kubectl_stdin(&["apply", "-f", "-"], Some(MESH))
        .await?;

    let mut op_a = Operator::start(&cluster, "op-a", dir.path())?;
    let system: Api<Secret> = Api::namespaced(client.clone(), "weft-system");
    let meshed: Api<Secret> = Api::namespaced(client.clone(), "meshed");
    let plain: Api<Secret> = Api::namespaced(client.clone(), "plain");
    let meshes: Api<Mesh> = Api::all(client.clone());

    // CA and identities, for the labelled namespace only.
    cluster
        .wait_until(wait, "weft-ca and identities in namespace meshed", || {
            let (system, meshed) = (system.clone(), meshed.clone());
            async move {
                Ok(system.get_opt("weft-ca").await?.is_some()
                    && meshed.get_opt("weft-identity-cart").await?.is_some()
                    && meshed.get_opt("weft-identity-default").await?.is_some()
                    && system.get_opt("weft-injector-tls").await?.is_some())
            }
        })
        .await?;
    let ca = secret(&system, "weft-ca").await?.context("weft-ca")?;
    let bundle = data(&ca, "ca.crt");
    let cart = secret(&meshed, "weft-identity-cart")
        .await?
        .context("identity")?;
    let leaf = LeafInfo::parse(&data(&cart, "tls.crt"), &data(&cart, "tls.key"))?;
    assert_eq!(
        leaf.uris,
        vec!["spiffe://cluster.local/ns/meshed/sa/cart".to_owned()]
    );
    assert!(leaf.key_matches);
    assert_eq!(data(&cart, "ca.crt"), bundle);
    verify_chain(&bundle, &data(&cart, "tls.crt"))?;
    assert_eq!(
        cart.labels().get("weft.dev/identity").map(String::as_str),
        Some("cart")
    );
    let owner = &cart.owner_references()[0];
    assert_eq!(
        (owner.kind.as_str(), owner.name.as_str()),
        ("ServiceAccount", "cart")
    );
    // 60 s TTL (backdated by a tenth).
    assert_eq!(
        leaf.not_after.duration_since(leaf.not_before)?,
        Duration::from_secs(66)
    );
    let in_plain = plain
        .list(&ListParams::default().labels("weft.dev/identity"))
        .await?;
    assert!(in_plain.items.is_empty(), "no identity outside the mesh");

    // The webhook's caBundle follows the trust bundle; status reports.
    cluster
        .wait_until(wait, "webhook caBundle and Mesh status", || {
            let (client, meshes, bundle) = (client.clone(), meshes.clone(), bundle.clone());
            async move {
                let hooks: Api<
                    k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration,
                > = Api::all(client);
                let w = hooks.get("weft-injector").await?;
                let ca_ok = w.webhooks.unwrap_or_default().iter().all(|h| {
                    h.client_config.ca_bundle.as_ref().map(|b| b.0.as_slice())
                        == Some(bundle.as_slice())
                });
                let m = meshes.get("default").await?;
                let ready = m.status.as_ref().is_some_and(|s| {
                    s.identities_issued >= 2
                        && s.active_ca.is_some()
                        && s.conditions
                            .iter()
                            .any(|c| c.type_ == "Ready" && c.status == "True")
                });
                Ok(ca_ok && ready)
            }
        })
        .await?;

    // A deleted identity comes back; a hand-edited one is repaired.
    let old_uid = cart.uid();
    cluster
        .kubectl(&["-n", "meshed", "delete", "secret", "weft-identity-cart"])
        .await?;
    cluster
        .wait_until(wait, "deleted identity recreated", || {
            let (meshed, old_uid) = (meshed.clone(), old_uid.clone());
            async move {
                Ok(meshed
                    .get_opt("weft-identity-cart")
                    .await?
                    .is_some_and(|s| s.uid() != old_uid))
            }
        })
        .await?;
    cluster
        .kubectl(&[
            "-n",
            "meshed",
            "patch",
            "secret",
            "weft-identity-cart",
            "--type=merge",
            "-p",
            r#"{"data":{"ca.crt":"anVuaw==","tls.key":"anVuaw=="}}"#,
        ])
        .await?;
    cluster
        .wait_until(wait, "hand-edited identity repaired", || {
            let (meshed, bundle) = (meshed.clone(), bundle.clone());
            async move {
                let s = meshed.get("weft-identity-cart").await?;
                let ok = LeafInfo::parse(&data(&s, "tls.crt"), &data(&s, "tls.key"))
                    .is_ok_and(|l| l.key_matches);
                Ok(ok && data(&s, "ca.crt") == bundle)
            }
        })
        .await?;

    // A second replica stands by and writes nothing while op-a leads.
    let op_b = Operator::start(&cluster, "op-b", dir.path())?;
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(op_b.metric("weft_certificates_issued_total").await?, 0.0);
    assert!(
        !op_b.log().contains("leadership acquired"),
        "{}",
        op_b.log()
    );
    assert!(op_a.log().contains("leadership acquired"));

    // Rotation starts; the leader crashes mid-way; op-b resumes it.
    weft_e2e::mesh::patch_mesh_spec(&cluster, r#"{"certificates":{"rotateCa":"r1"}}"#).await?;
    cluster
        .wait_until(wait, "rotation under way", || {
            let meshes = meshes.clone();
            async move { Ok(matches!(mesh_phase(&meshes).await, Some(p) if p != RotationPhase::Stable)) }
        })
        .await?;
    assert_eq!(
        op_b.metric("weft_certificates_issued_total").await?,
        0.0,
        "the standby never writes"
    );
    op_a.kill();
    let ca_mid = secret(&system, "weft-ca").await?.context("weft-ca")?;
    eprintln!(
        "op-a killed in phase {:?}",
        ca_mid.annotations().get("weft.dev/rotation-phase")
    );
    cluster
        .wait_until(wait, "op-b takes the lease over", || {
            let log = op_b.log();
            async move { Ok(log.contains("leadership acquired")) }
        })
        .await?;
    cluster
        .wait_until(
            Duration::from_secs(90),
            "leaves moved to the new CA (Retiring)",
            || {
                let meshes = meshes.clone();
                async move { Ok(mesh_phase(&meshes).await == Some(RotationPhase::Retiring)) }
            },
        )
        .await?;
    let ca2 = secret(&system, "weft-ca").await?.context("weft-ca")?;
    assert_ne!(
        data(&ca2, "tls.crt"),
        data(&ca, "tls.crt"),
        "a new CA signs"
    );
    assert_eq!(
        parse_cert_pems(&data(&ca2, "ca.crt"), "bundle")?.len(),
        2,
        "old and new trusted"
    );
    let cart = secret(&meshed, "weft-identity-cart")
        .await?
        .context("identity")?;
    verify_chain(&data(&ca2, "ca.crt"), &data(&cart, "tls.crt"))?;
    assert_eq!(data(&cart, "ca.crt"), data(&ca2, "ca.crt"));
    assert!(op_b.metric("weft_certificates_issued_total").await? >= 2.0);

    // The old CA leaves the bundle once its last leaf has expired.
    cluster
        .wait_until(
            Duration::from_secs(240),
            "rotation finished (Stable)",
            || {
                let meshes = meshes.clone();
                async move { Ok(mesh_phase(&meshes).await == Some(RotationPhase::Stable)) }
            },
        )
        .await?;
    let ca3 = secret(&system, "weft-ca").await?.context("weft-ca")?;
    assert_eq!(parse_cert_pems(&data(&ca3, "ca.crt"), "bundle")?.len(), 1);
    cluster
        .wait_until(wait, "identities carry the one-CA bundle", || {
            let (meshed, b) = (meshed.clone(), data(&ca3, "ca.crt"));
            async move {
                Ok(meshed
                    .get("weft-identity-cart")
                    .await
                    .map(|s| data(&s, "ca.crt") == b)?)
            }
        })
        .await?;

    // weft-ca deleted: a new CA, every identity re-issued from it, and the
    // platform team told (a Warning Event on the Mesh and a metric).
    assert_eq!(op_b.metric("weft_ca_regenerated_total").await?, 0.0);
    assert!(mesh_events(&cluster, "CARegenerated").await?.is_empty());
    cluster
        .kubectl(&["-n", "weft-system", "delete", "secret", "weft-ca"])
        .await?;
    cluster
        .wait_until(wait, "a Warning Event CARegenerated on the Mesh", || {
            let c = &cluster;
            async move {
                Ok(mesh_events(c, "CARegenerated")
                    .await?
                    .iter()
                    .any(|t| t == "Warning"))
            }
        })
        .await?;
    assert_eq!(op_b.metric("weft_ca_regenerated_total").await?, 1.0);
    let ca4 = secret(&system, "weft-ca").await?.context("weft-ca")?;
    assert_ne!(data(&ca4, "tls.crt"), data(&ca3, "tls.crt"), "a new CA");
    cluster
        .wait_until(wait, "identities re-issued from the new CA", || {
            let (meshed, b) = (meshed.clone(), data(&ca4, "ca.crt"));
            async move {
                let s = meshed.get("weft-identity-cart").await?;
                Ok(data(&s, "ca.crt") == b && verify_chain(&b, &data(&s, "tls.crt")).is_ok())
            }
        })
        .await?;

    // Leaving the mesh removes the identities.
    cluster
        .kubectl(&["label", "namespace", "meshed", "weft.dev/inject-"])
        .await?;
    cluster
        .wait_until(
            wait,
            "identities removed from a namespace that left the mesh",
            || {
                let meshed = meshed.clone();
                async move {
                    Ok(meshed
                        .list(&ListParams::default().labels("weft.dev/identity"))
                        .await?
                        .items
                        .is_empty())
                }
            },
        )
        .await?;

    // Graceful stop releases the lease.
    let mut op_b = op_b;
    op_b.terminate();
    let status = tokio::task::spawn_blocking(move || {
        let s = op_b.child.wait();
        (s, op_b)
    })
    .await?;
    assert!(
        status.0?.success(),
        "weft-operator exits cleanly on SIGTERM"
    );
    cluster.shutdown();
    Ok(())
}

/// A self-signed CA certificate and key (PEM) valid over `[nb, na]`.
fn user_ca(
    nb: std::time::SystemTime,
    na: std::time::SystemTime,
) -> anyhow::Result<(String, String)> {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut params = rcgen::CertificateParams::default();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "user root CA");
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
    ];
    params.not_before = time::OffsetDateTime::from(nb);
    params.not_after = time::OffsetDateTime::from(na);
    let cert = params.self_signed(&key)?;
    Ok((cert.pem(), key.serialize_pem()))
}

async fn put_user_ca(cluster: &Cluster, crt: &str, key: &str) -> anyhow::Result<()> {
    use base64::Engine as _;
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    let yaml = format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: user-ca, namespace: weft-system}}\ntype: kubernetes.io/tls\ndata:\n  tls.crt: {}\n  tls.key: {}\n",
        b64(crt),
        b64(key)
    );
    cluster
        .kubectl_stdin(&["apply", "-f", "-"], Some(&yaml))
        .await?;
    Ok(())
}

async fn ca_valid(meshes: &Api<Mesh>) -> Option<(String, String, String)> {
    let m = meshes.get_opt("default").await.ok().flatten()?;
    let c = m
        .status?
        .conditions
        .into_iter()
        .find(|c| c.type_ == "CAValid")?;
    Some((c.status, c.reason, c.message))
}

/// A user CA that is expired (then valid, then paired with the wrong key):
/// a clear condition and Event, nothing issued from the bad CA, nothing
/// deleted when a good CA later goes bad.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_user_ca_is_reported_and_nothing_is_issued_or_deleted() -> anyhow::Result<()> {
    let _serial = serial().await;
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cluster = Cluster::start().await?;
    let client = cluster.client();
    let dir = tempfile::tempdir()?;
    let wait = Duration::from_secs(60);
    let now = std::time::SystemTime::now();
    let day = Duration::from_secs(24 * 3600);

    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    crds.create(&PostParams::default(), &Mesh::crd()).await?;
    cluster
        .kubectl(&[
            "wait",
            "--for=condition=Established",
            "crd/meshes.weft.dev",
            "--timeout=60s",
        ])
        .await?;
    for ns in ["weft-system", "meshed"] {
        cluster.create_namespace(ns).await?;
    }
    cluster
        .kubectl(&["label", "namespace", "meshed", "weft.dev/inject=enabled"])
        .await?;
    let (expired_crt, expired_key) = user_ca(now - 10 * day, now - day)?;
    put_user_ca(&cluster, &expired_crt, &expired_key).await?;
    cluster
        .kubectl_stdin(
            &["apply", "-f", "-"],
            Some("apiVersion: weft.dev/v1alpha1\nkind: Mesh\nmetadata: {name: default}\nspec:\n  certificates: {caSecretRef: {name: user-ca}}\n"),
        )
        .await?;
    let _op = Operator::start(&cluster, "op-a", dir.path())?;
    let system: Api<Secret> = Api::namespaced(client.clone(), "weft-system");
    let meshed: Api<Secret> = Api::namespaced(client.clone(), "meshed");
    let meshes: Api<Mesh> = Api::all(client.clone());

    // Expired: reported, nothing issued.
    cluster
        .wait_until(wait, "CAValid=False InvalidUserCA", || {
            let meshes = meshes.clone();
            async move {
                Ok(ca_valid(&meshes).await.is_some_and(|(s, r, m)| {
                    s == "False" && r == "InvalidUserCA" && m.contains("expired")
                }))
            }
        })
        .await?;
    cluster
        .wait_until(wait, "a Warning Event InvalidUserCA", || {
            let c = &cluster;
            async move {
                let out = c
                    .kubectl(&[
                        "get",
                        "events",
                        "-A",
                        "--field-selector",
                        "reason=InvalidUserCA",
                        "-o",
                        "name",
                    ])
                    .await?;
                Ok(!out.trim().is_empty())
            }
        })
        .await?;
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(
        system.get_opt("weft-ca").await?.is_none(),
        "no CA state from an expired CA"
    );
    assert!(
        meshed
            .list(&ListParams::default().labels("weft.dev/identity"))
            .await?
            .items
            .is_empty(),
        "nothing issued from an expired CA"
    );
    let m = meshes.get("default").await?;
    let ready = m
        .status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == "Ready"))
        .context("Ready")?;
    assert_eq!(ready.status, "False");

    // A valid user CA: identities chain to it.
    let (good_crt, good_key) = user_ca(now - day, now + 365 * day)?;
    put_user_ca(&cluster, &good_crt, &good_key).await?;
    cluster
        .wait_until(wait, "identity issued from the user CA", || {
            let meshed = meshed.clone();
            async move { Ok(meshed.get_opt("weft-identity-default").await?.is_some()) }
        })
        .await?;
    let id = meshed.get("weft-identity-default").await?;
    verify_chain(good_crt.as_bytes(), &data(&id, "tls.crt"))?;
    cluster
        .wait_until(wait, "CAValid=True with a User CA", || {
            let meshes = meshes.clone();
            async move {
                let m = meshes.get("default").await?;
                Ok(m.status
                    .and_then(|s| s.active_ca)
                    .is_some_and(|a| a.source == "User")
                    && ca_valid(&meshes).await.is_some_and(|(s, _, _)| s == "True"))
            }
        })
        .await?;
    let ca_before = system.get("weft-ca").await?;

    // Steady state: no write when nothing changed.
    let versions = || async {
        Ok::<_, anyhow::Error>((
            system.get("weft-ca").await?.resource_version(),
            system.get("weft-injector-tls").await?.resource_version(),
            meshed
                .get("weft-identity-default")
                .await?
                .resource_version(),
            meshes.get("default").await?.resource_version(),
        ))
    };
    let before = versions().await?;
    tokio::time::sleep(Duration::from_secs(8)).await;
    assert_eq!(
        versions().await?,
        before,
        "nothing rewritten in steady state"
    );

    // The user swaps in a key that does not match: reported; the CA in use
    // and every identity stay as they are.
    let (_, stranger_key) = user_ca(now - day, now + 365 * day)?;
    put_user_ca(&cluster, &good_crt, &stranger_key).await?;
    cluster
        .wait_until(wait, "CAValid=False for a mismatched key", || {
            let meshes = meshes.clone();
            async move {
                Ok(ca_valid(&meshes).await.is_some_and(|(s, r, m)| {
                    s == "False" && r == "InvalidUserCA" && m.contains("does not belong")
                }))
            }
        })
        .await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let ca_after = system.get("weft-ca").await?;
    assert_eq!(
        data(&ca_after, "tls.crt"),
        data(&ca_before, "tls.crt"),
        "CA state untouched"
    );
    assert_eq!(data(&ca_after, "tls.key"), data(&ca_before, "tls.key"));
    let id_after = meshed.get("weft-identity-default").await?;
    assert_eq!(id_after.uid(), id.uid(), "identity not deleted");
    assert_eq!(
        data(&id_after, "tls.crt"),
        data(&id, "tls.crt"),
        "identity not re-issued"
    );

    // weft-ca deleted while the user CA is broken: no generated CA in its
    // place, nothing issued or deleted, and the condition says so.
    cluster
        .kubectl(&["-n", "weft-system", "delete", "secret", "weft-ca"])
        .await?;
    cluster
        .wait_until(wait, "CAValid=False saying no CA signs", || {
            let meshes = meshes.clone();
            async move {
                Ok(ca_valid(&meshes).await.is_some_and(|(s, r, m)| {
                    s == "False" && r == "InvalidUserCA" && m.contains("does not exist either")
                }))
            }
        })
        .await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        system.get_opt("weft-ca").await?.is_none(),
        "no generated CA in place of the user's"
    );
    assert!(mesh_events(&cluster, "CARegenerated").await?.is_empty());
    let id_kept = meshed.get("weft-identity-default").await?;
    assert_eq!(id_kept.uid(), id.uid(), "identity not deleted");
    assert_eq!(data(&id_kept, "tls.crt"), data(&id, "tls.crt"));

    // The user CA fixed: weft-ca written again from it, reported; the
    // identity it signed stays.
    put_user_ca(&cluster, &good_crt, &good_key).await?;
    cluster
        .wait_until(wait, "weft-ca restored from the user CA", || {
            let c = &cluster;
            let system = system.clone();
            async move {
                Ok(system.get_opt("weft-ca").await?.is_some()
                    && mesh_events(c, "CARestored")
                        .await?
                        .iter()
                        .any(|t| t == "Warning"))
            }
        })
        .await?;
    let ca_restored = system.get("weft-ca").await?;
    assert_eq!(data(&ca_restored, "tls.crt"), data(&ca_before, "tls.crt"));
    tokio::time::sleep(Duration::from_secs(2)).await;
    let id_restored = meshed.get("weft-identity-default").await?;
    assert_eq!(
        data(&id_restored, "tls.crt"),
        data(&id, "tls.crt"),
        "identity signed by the user CA not re-issued"
    );
    cluster.shutdown();
    Ok(())
}

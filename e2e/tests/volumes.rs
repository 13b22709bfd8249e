//! Mounted API data: a ConfigMap edit reaches a mounted volume through
//! kubelet's `..data` symlink swap, and a pod authenticates to the API as
//! its ServiceAccount (projected token from the TokenRequest API, CA from
//! `kube-root-ca.crt`, the `kubernetes` Service DNATed to the API server)
//! and is denied what its RBAC does not grant.

mod common;

use std::time::Duration;

use common::{apply, serial};
use weft_e2e::Cluster;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configmap_edit_reaches_the_mounted_volume_through_the_data_swap() -> anyhow::Result<()> {
    let _serial = serial().await;
    let cluster = Cluster::start().await?;
    cluster.create_namespace("cfg").await?;
    apply(
        &cluster,
        r#"
apiVersion: v1
kind: ConfigMap
metadata: {name: app-config, namespace: cfg}
data: {greeting: hello}
---
apiVersion: v1
kind: Pod
metadata: {name: reader, namespace: cfg}
spec:
  terminationGracePeriodSeconds: 1
  volumes: [{name: config, configMap: {name: app-config}}]
  containers:
  - name: reader
    image: busybox
    command: [sh, -c, 'while true; do echo "seen $(cat /var/run/weft-e2e-config/greeting)"; sleep 0.3; done']
    volumeMounts: [{name: config, mountPath: /var/run/weft-e2e-config, readOnly: true}]
"#,
    )
    .await?;
    cluster
        .wait_pod_ready("cfg", "reader", Duration::from_secs(60))
        .await?;
    let vol = cluster.pod_volume_dir("cfg", "reader", "config")?;
    let first = std::fs::read_link(vol.join("..data"))?;
    assert!(first.to_string_lossy().starts_with(".."), "{first:?}");
    assert_eq!(
        std::fs::read_link(vol.join("greeting"))?,
        std::path::Path::new("..data/greeting")
    );
    assert_eq!(std::fs::read_to_string(vol.join("greeting"))?, "hello");

    cluster
        .kubectl(&[
            "-n",
            "cfg",
            "patch",
            "configmap",
            "app-config",
            "-p",
            r#"{"data":{"greeting":"bonjour"}}"#,
        ])
        .await?;
    cluster
        .wait_until(
            Duration::from_secs(30),
            "the container sees the new value",
            || async {
                Ok(cluster
                    .pod_log("cfg", "reader", "reader")?
                    .contains("seen bonjour"))
            },
        )
        .await?;
    let second = std::fs::read_link(vol.join("..data"))?;
    assert_ne!(
        first, second,
        "the update must swap ..data to a new version directory"
    );
    assert!(
        !vol.join(&first).exists(),
        "the old version directory is removed"
    );
    assert_eq!(std::fs::read_to_string(vol.join("greeting"))?, "bonjour");
    cluster.shutdown();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pod_authenticates_as_its_service_account_and_rbac_is_enforced() -> anyhow::Result<()> {
    let _serial = serial().await;
    let cluster = Cluster::start().await?;
    cluster.create_namespace("rbac").await?;
    apply(
        &cluster,
        r#"
apiVersion: v1
kind: ServiceAccount
metadata: {name: reader, namespace: rbac}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata: {name: configmap-reader, namespace: rbac}
rules: [{apiGroups: [""], resources: [configmaps], verbs: [list]}]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {name: reader, namespace: rbac}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: Role, name: configmap-reader}
subjects: [{kind: ServiceAccount, name: reader, namespace: rbac}]
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: rbac}
spec:
  serviceAccountName: reader
  terminationGracePeriodSeconds: 1
  containers:
  - name: client
    image: weft-e2e-app
    args: [kube-access, --namespace, rbac]
"#,
    )
    .await?;
    cluster
        .wait_until(
            Duration::from_secs(60),
            "the client reported both checks",
            || async {
                Ok(cluster
                    .pod_log("rbac", "client", "client")
                    .is_ok_and(|l| l.contains("secrets:")))
            },
        )
        .await?;
    let log = cluster.pod_log("rbac", "client", "client")?;
    assert!(log.contains("configmaps: allowed"), "{log}");
    assert!(log.contains("secrets: denied 403"), "{log}");

    // The token the pod used came from the TokenRequest API, bound to the pod.
    let token_dir = cluster
        .pod_volume_dir("rbac", "client", "")?
        .read_dir()?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("kube-api-access-"))
        })
        .ok_or_else(|| anyhow::anyhow!("no kube-api-access volume"))?;
    let token = std::fs::read_to_string(token_dir.join("token"))?;
    let payload = token.split('.').nth(1).unwrap_or_default();
    use base64::Engine as _;
    let claims: serde_json::Value =
        serde_json::from_slice(&base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload)?)?;
    assert_eq!(claims["sub"], "system:serviceaccount:rbac:reader");
    assert_eq!(claims["kubernetes.io"]["pod"]["name"], "client");
    assert!(std::fs::read_to_string(token_dir.join("ca.crt"))?.contains("BEGIN CERTIFICATE"));
    assert_eq!(
        std::fs::read_to_string(token_dir.join("namespace"))?,
        "rbac"
    );
    cluster.shutdown();
    Ok(())
}

//! Admission webhooks are really called by kube-apiserver over HTTPS through
//! a Service: a MutatingWebhookConfiguration's webhook (a pod on the
//! simulated node) changes a pod on its way in; with a wrong `caBundle` the
//! call fails and `failurePolicy` decides: Fail rejects, Ignore admits
//! unchanged.

mod common;

use std::time::Duration;

use base64::Engine as _;
use common::{apply, serial};
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use weft_e2e::Cluster;

fn new_ca() -> anyhow::Result<CertifiedIssuer<'static, KeyPair>> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    Ok(CertifiedIssuer::self_signed(params, KeyPair::generate()?)?)
}

fn webhook_config(ca_pem: &str, policy: &str) -> String {
    let bundle = base64::engine::general_purpose::STANDARD.encode(ca_pem);
    format!(
        r#"
apiVersion: admissionregistration.k8s.io/v1
kind: MutatingWebhookConfiguration
metadata: {{name: label-pods}}
webhooks:
- name: label.e2e.weft.dev
  clientConfig:
    service: {{namespace: hooks, name: weft-webhook, path: /mutate, port: 443}}
    caBundle: {bundle}
  rules: [{{apiGroups: [""], apiVersions: [v1], operations: [CREATE], resources: [pods]}}]
  namespaceSelector: {{matchLabels: {{webhook: "on"}}}}
  failurePolicy: {policy}
  sideEffects: None
  admissionReviewVersions: [v1]
  timeoutSeconds: 5
"#
    )
}

fn pod(name: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: target}}\nspec:\n  terminationGracePeriodSeconds: 1\n  containers: [{{name: c, image: busybox, command: [sleep, '1000']}}]\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutating_webhook_changes_pods_and_a_wrong_ca_bundle_obeys_failure_policy()
-> anyhow::Result<()> {
    let _serial = serial().await;
    let cluster = Cluster::start().await?;
    let ca = new_ca()?;
    let key = KeyPair::generate()?;
    let cert =
        CertificateParams::new(vec!["weft-webhook.hooks.svc".to_string()])?.signed_by(&key, &ca)?;

    cluster.create_namespace("hooks").await?;
    cluster.create_namespace("target").await?;
    cluster
        .kubectl(&["label", "namespace", "target", "webhook=on"])
        .await?;
    let files = tempfile::tempdir()?;
    let (crt, key_file) = (files.path().join("tls.crt"), files.path().join("tls.key"));
    std::fs::write(&crt, cert.pem())?;
    std::fs::write(&key_file, key.serialize_pem())?;
    cluster
        .kubectl(&[
            "-n",
            "hooks",
            "create",
            "secret",
            "tls",
            "webhook-tls",
            &format!("--cert={}", crt.display()),
            &format!("--key={}", key_file.display()),
        ])
        .await?;
    apply(
        &cluster,
        r#"
apiVersion: v1
kind: Pod
metadata: {name: webhook, namespace: hooks, labels: {app: webhook}}
spec:
  terminationGracePeriodSeconds: 1
  volumes: [{name: tls, secret: {secretName: webhook-tls}}]
  containers:
  - name: webhook
    image: weft-e2e-app
    args: [webhook, --port, "8443", --cert, /var/run/weft-e2e-webhook/tls.crt, --key, /var/run/weft-e2e-webhook/tls.key]
    volumeMounts: [{name: tls, mountPath: /var/run/weft-e2e-webhook, readOnly: true}]
    readinessProbe:
      tcpSocket: {port: 8443}
      periodSeconds: 1
---
apiVersion: v1
kind: Service
metadata: {name: weft-webhook, namespace: hooks}
spec:
  selector: {app: webhook}
  ports: [{port: 443, targetPort: 8443}]
"#,
    )
    .await?;
    cluster
        .wait_pod_ready("hooks", "webhook", Duration::from_secs(60))
        .await?;

    // Right CA: the webhook labels the pod on its way in.
    apply(&cluster, &webhook_config(&ca.pem(), "Fail")).await?;
    let pods: Api<Pod> = Api::namespaced(cluster.client(), "target");
    cluster
        .wait_until(
            Duration::from_secs(30),
            "a pod admitted through the webhook",
            || async {
                Ok(cluster
                    .kubectl_stdin(&["apply", "-f", "-"], Some(&pod("mutated")))
                    .await
                    .is_ok())
            },
        )
        .await?;
    let labels = pods
        .get("mutated")
        .await?
        .metadata
        .labels
        .unwrap_or_default();
    assert_eq!(
        labels.get("weft-e2e/mutated").map(String::as_str),
        Some("true")
    );
    assert!(
        cluster
            .pod_log("hooks", "webhook", "webhook")?
            .contains("mutating"),
        "the webhook pod served the call"
    );

    // Wrong CA, failurePolicy Fail: the API server cannot verify the
    // webhook and rejects the pod.
    let other = new_ca()?;
    apply(&cluster, &webhook_config(&other.pem(), "Fail")).await?;
    let rejected = cluster
        .kubectl_stdin(&["apply", "-f", "-"], Some(&pod("rejected")))
        .await
        .expect_err("the webhook cannot be verified and the policy is Fail");
    let msg = rejected.to_string();
    assert!(msg.contains("failed calling webhook"), "{msg}");
    assert!(msg.contains("x509") || msg.contains("certificate"), "{msg}");
    assert!(pods.get_opt("rejected").await?.is_none());

    // Wrong CA, failurePolicy Ignore: admitted, unchanged.
    apply(&cluster, &webhook_config(&other.pem(), "Ignore")).await?;
    apply(&cluster, &pod("ignored")).await?;
    let labels = pods
        .get("ignored")
        .await?
        .metadata
        .labels
        .unwrap_or_default();
    assert!(!labels.contains_key("weft-e2e/mutated"), "{labels:?}");
    cluster.shutdown();
    Ok(())
}

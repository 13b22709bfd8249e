//! Real kubectl against the harness's real API server: client-side and
//! server-side apply, patch, get and delete of objects and CRDs, with the
//! API server's own CRD validation and field ownership.

mod common;

use std::time::Duration;

use common::{apply, serial};
use weft_e2e::Cluster;

const CRD: &str = r#"
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: widgets.e2e.weft.dev
spec:
  group: e2e.weft.dev
  scope: Namespaced
  names: {plural: widgets, singular: widget, kind: Widget}
  versions:
  - name: v1
    served: true
    storage: true
    schema:
      openAPIV3Schema:
        type: object
        properties:
          spec:
            type: object
            required: [size]
            properties:
              size: {type: integer, minimum: 1}
              color: {type: string}
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_applies_patches_gets_and_deletes_objects_and_crds() -> anyhow::Result<()> {
    let _serial = serial().await;
    let cluster = Cluster::start().await?;
    eprintln!("cluster started in {:?}", cluster.started_in());

    // CRD, client-side apply; wait until the API serves it.
    apply(&cluster, CRD).await?;
    cluster
        .kubectl(&[
            "wait",
            "--for=condition=Established",
            "crd/widgets.e2e.weft.dev",
            "--timeout=60s",
        ])
        .await?;
    let widget = "apiVersion: e2e.weft.dev/v1\nkind: Widget\nmetadata: {name: w1, namespace: default}\nspec: {size: 3, color: red}\n";
    apply(&cluster, widget).await?;
    let size = cluster
        .kubectl(&["get", "widget", "w1", "-o", "jsonpath={.spec.size}"])
        .await?;
    assert_eq!(size, "3");

    // The real API server validates against the CRD schema.
    let bad = "apiVersion: e2e.weft.dev/v1\nkind: Widget\nmetadata: {name: w2, namespace: default}\nspec: {size: 0}\n";
    let err = apply(&cluster, bad)
        .await
        .expect_err("size 0 violates minimum 1");
    assert!(
        err.to_string().contains("spec.size"),
        "unexpected error: {err}"
    );

    // Merge patch on the custom resource.
    cluster
        .kubectl(&[
            "patch",
            "widget",
            "w1",
            "--type=merge",
            "-p",
            r#"{"spec":{"color":"blue"}}"#,
        ])
        .await?;
    let color = cluster
        .kubectl(&["get", "widget", "w1", "-o", "jsonpath={.spec.color}"])
        .await?;
    assert_eq!(color, "blue");

    // Server-side apply: field ownership and conflicts are the server's.
    let cm = "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: owned, namespace: default}\ndata: {k: one}\n";
    cluster
        .kubectl_stdin(
            &["apply", "--server-side", "--field-manager=alice", "-f", "-"],
            Some(cm),
        )
        .await?;
    let cm2 = cm.replace("one", "two");
    let conflict = cluster
        .kubectl_stdin(
            &["apply", "--server-side", "--field-manager=bob", "-f", "-"],
            Some(&cm2),
        )
        .await
        .expect_err("bob does not own data.k");
    assert!(
        conflict.to_string().contains("conflict"),
        "unexpected error: {conflict}"
    );
    cluster
        .kubectl_stdin(
            &[
                "apply",
                "--server-side",
                "--field-manager=bob",
                "--force-conflicts",
                "-f",
                "-",
            ],
            Some(&cm2),
        )
        .await?;
    let managers = cluster
        .kubectl(&[
            "get",
            "cm",
            "owned",
            "--show-managed-fields",
            "-o",
            "jsonpath={.metadata.managedFields[*].manager}",
        ])
        .await?;
    assert!(managers.contains("bob"), "managers: {managers}");

    // Strategic merge patch (kubectl's default for built-in types).
    cluster
        .kubectl(&["patch", "cm", "owned", "-p", r#"{"data":{"extra":"x"}}"#])
        .await?;
    let data = cluster
        .kubectl(&[
            "get",
            "cm",
            "owned",
            "-o",
            "jsonpath={.data.k},{.data.extra}",
        ])
        .await?;
    assert_eq!(data, "two,x");

    // Delete the object, the custom resource and the CRD.
    cluster.kubectl(&["delete", "cm", "owned"]).await?;
    cluster.kubectl(&["delete", "widget", "w1"]).await?;
    cluster
        .kubectl(&["delete", "crd", "widgets.e2e.weft.dev"])
        .await?;
    let gone = cluster
        .kubectl_output(&["get", "cm", "owned"], None)
        .await?;
    assert!(!gone.status.success());
    assert!(String::from_utf8_lossy(&gone.stderr).contains("NotFound"));
    cluster
        .wait_until(Duration::from_secs(30), "CRD deleted", || async {
            let out = cluster
                .kubectl_output(&["get", "crd", "widgets.e2e.weft.dev"], None)
                .await?;
            Ok(!out.status.success())
        })
        .await?;
    cluster.shutdown();
    Ok(())
}

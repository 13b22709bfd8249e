//! Workloads on the simulated node: a Deployment's pods get addresses,
//! become Ready through their probes and serve each other through a
//! Service ClusterIP; init containers and native sidecars run in order with
//! the spec's user and downward-API env; owners' deletion garbage-collects
//! their children.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::{APP, apply, serial};
use k8s_openapi::api::apps::v1::ReplicaSet;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Service};
use kube::Api;
use kube::api::ListParams;
use weft_e2e::Cluster;

const ECHO: &str = r#"
apiVersion: apps/v1
kind: Deployment
metadata: {name: echo, namespace: web}
spec:
  replicas: 2
  selector: {matchLabels: {app: echo}}
  template:
    metadata: {labels: {app: echo}}
    spec:
      terminationGracePeriodSeconds: 5
      containers:
      - name: echo
        image: ghcr.io/weft-mesh/weft-e2e-app:dev
        args: [echo, --port, "8080"]
        env:
        - name: POD_NAME
          valueFrom: {fieldRef: {fieldPath: metadata.name}}
        ports: [{name: http, containerPort: 8080}]
        readinessProbe:
          httpGet: {path: /healthz, port: http}
          periodSeconds: 1
---
apiVersion: v1
kind: Service
metadata: {name: echo, namespace: web}
spec:
  selector: {app: echo}
  ports: [{name: http, port: 80, targetPort: http}]
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deployment_pods_serve_each_other_through_a_service() -> anyhow::Result<()> {
    let _serial = serial().await;
    let cluster = Cluster::start().await?;
    cluster.create_namespace("web").await?;
    apply(&cluster, ECHO).await?;
    cluster
        .wait_deployment_ready("web", "echo", Duration::from_secs(90))
        .await?;

    let pods: Api<Pod> = Api::namespaced(cluster.client(), "web");
    let list = pods.list(&ListParams::default().labels("app=echo")).await?;
    assert_eq!(list.items.len(), 2);
    let mut names = BTreeSet::new();
    let mut ips = BTreeSet::new();
    for p in &list.items {
        let name = p.metadata.name.clone().unwrap_or_default();
        let ip = p
            .status
            .as_ref()
            .and_then(|s| s.pod_ip.clone())
            .unwrap_or_default();
        assert!(
            ip.starts_with("10.244.0."),
            "pod IP {ip} outside the pod CIDR"
        );
        assert_eq!(ip, cluster.pod_ip("web", &name)?.to_string());
        names.insert(name);
        ips.insert(ip);
    }
    assert_eq!(ips.len(), 2, "pods share an IP: {ips:?}");

    cluster
        .wait_service_endpoints("web", "echo", 2, Duration::from_secs(30))
        .await?;
    let svc: Api<Service> = Api::namespaced(cluster.client(), "web");
    let cluster_ip = svc
        .get("echo")
        .await?
        .spec
        .and_then(|s| s.cluster_ip)
        .unwrap_or_default();
    let client_pod = names.iter().next().cloned().unwrap_or_default();
    let client_ip = cluster.pod_ip("web", &client_pod)?.to_string();

    // Through the ClusterIP (DNAT in the node namespace): both backends
    // answer, and the other pod sees the caller's own address.
    let mut seen = BTreeSet::new();
    for _ in 0..40 {
        let out = cluster
            .exec_in_pod(
                "web",
                &client_pod,
                &[APP, "get", &format!("http://{cluster_ip}:80/hello")],
            )
            .await?;
        assert!(
            out.status.success(),
            "get failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let body: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        let peer = body["peer"].as_str().unwrap_or_default();
        let server = body["pod"].as_str().unwrap_or_default().to_owned();
        // A pod reaching itself is masqueraded (hairpin), as with kube-proxy;
        // the other pod sees the caller's own address.
        if server != client_pod {
            assert_eq!(
                peer.split(':').next(),
                Some(client_ip.as_str()),
                "reply: {body}"
            );
        }
        assert_eq!(body["path"], "/hello");
        seen.insert(server);
        if seen.len() == 2 {
            break;
        }
    }
    assert_eq!(seen, names, "the Service did not reach both endpoints");

    // Directly pod to pod.
    let other = names.iter().nth(1).cloned().unwrap_or_default();
    let other_ip = cluster.pod_ip("web", &other)?;
    let out = cluster
        .exec_in_pod(
            "web",
            &client_pod,
            &[APP, "get", &format!("http://{other_ip}:8080/direct")],
        )
        .await?;
    let body: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(body["pod"], other.as_str());

    // Pod addresses exist only in the cluster's namespaces, not on the host.
    let host = weft_e2e::netns::run("ip", &["-4", "addr"])?;
    assert!(!String::from_utf8_lossy(&host.stdout).contains("10.244.0."));

    // Scaling down removes a pod: the simulator stops it and deletes it.
    cluster
        .kubectl(&["-n", "web", "scale", "deployment/echo", "--replicas=1"])
        .await?;
    cluster
        .wait_until(Duration::from_secs(60), "one echo pod left", || async {
            Ok(pods
                .list(&ListParams::default().labels("app=echo"))
                .await?
                .items
                .len()
                == 1)
        })
        .await?;
    cluster.shutdown();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn init_containers_then_sidecars_then_containers_with_user_and_downward_env()
-> anyhow::Result<()> {
    let _serial = serial().await;
    let cluster = Cluster::start().await?;
    cluster.create_namespace("life").await?;
    // A descriptor this process holds without close-on-exec (as one
    // inherited from `flock` would be) must not leak into containers.
    let marker = tempfile::NamedTempFile::new()?;
    let _leaky = nix::fcntl::open(
        marker.path(),
        nix::fcntl::OFlag::O_RDONLY,
        nix::sys::stat::Mode::empty(),
    )?;
    let orphan: u32 = rand::random::<u32>() % 1_000_000;
    let pod = format!(
        r#"
apiVersion: v1
kind: Pod
metadata: {{name: ordered, namespace: life, labels: {{tier: demo}}}}
spec:
  terminationGracePeriodSeconds: 3
  volumes: [{{name: work, emptyDir: {{}}}}]
  initContainers:
  - name: first
    image: busybox
    command: [sh, -c, 'echo init >> /var/run/weft-e2e-work/order']
    volumeMounts: [{{name: work, mountPath: /var/run/weft-e2e-work}}]
  - name: proxy
    image: weft-e2e-app
    restartPolicy: Always
    command: [sh, -c, 'echo sidecar >> /var/run/weft-e2e-work/order; exec "$APP" echo --port 9000']
    env: [{{name: APP, value: "{APP}"}}]
    volumeMounts: [{{name: work, mountPath: /var/run/weft-e2e-work}}]
    startupProbe:
      httpGet: {{path: /healthz, port: 9000}}
      periodSeconds: 1
  containers:
  - name: main
    image: busybox
    command: [sh, -c]
    args:
    - 'sleep 86399.{orphan} & ls -l /proc/$$/fd > /var/run/weft-e2e-work/fds; echo "main $(id -u) $POD_IP $TIER $(hostname) $(pwd)" > /var/run/weft-e2e-work/main; "$APP" get http://127.0.0.1:9000/from-main >> /var/run/weft-e2e-work/main; trap "echo bye >> /var/run/weft-e2e-work/main; exit 0" TERM; while true; do sleep 0.2; done'
    workingDir: /tmp
    securityContext: {{runAsUser: 1234, runAsGroup: 1234}}
    env:
    - {{name: APP, value: "{APP}"}}
    - name: POD_IP
      valueFrom: {{fieldRef: {{fieldPath: status.podIP}}}}
    - name: TIER
      valueFrom: {{fieldRef: {{fieldPath: "metadata.labels['tier']"}}}}
    volumeMounts: [{{name: work, mountPath: /var/run/weft-e2e-work}}]
"#
    );
    apply(&cluster, &pod).await?;
    let ready = cluster
        .wait_pod_ready("life", "ordered", Duration::from_secs(60))
        .await?;
    let pod_ip = ready
        .status
        .as_ref()
        .and_then(|s| s.pod_ip.clone())
        .unwrap_or_default();
    let work = cluster.pod_volume_dir("life", "ordered", "work")?;
    let main_file = work.join("main");
    cluster
        .wait_until(Duration::from_secs(30), "main wrote its lines", || async {
            Ok(std::fs::read_to_string(&main_file)
                .unwrap_or_default()
                .contains("from-main"))
        })
        .await?;
    // The init container finished before the sidecar started, and the
    // sidecar was serving (startup probe) before the main container ran.
    let order = std::fs::read_to_string(work.join("order"))?;
    assert_eq!(order, "init\nsidecar\n");
    let fds = std::fs::read_to_string(work.join("fds"))?;
    let marker_name = marker.path().to_string_lossy().into_owned();
    assert!(
        !fds.contains(&marker_name),
        "a test descriptor leaked into the container: {fds}"
    );
    let main = std::fs::read_to_string(&main_file)?;
    let lines: Vec<&str> = main.lines().collect();
    assert_eq!(
        lines[0],
        format!("main 1234 {pod_ip} demo ordered /tmp"),
        "{main}"
    );
    let echoed: serde_json::Value = serde_json::from_str(lines[1])?;
    assert_eq!(echoed["path"], "/from-main");

    // Deletion: SIGTERM reaches the container, then the pod is removed.
    let pods: Api<Pod> = Api::namespaced(cluster.client(), "life");
    let main_file2 = main_file.clone();
    cluster
        .kubectl(&["-n", "life", "delete", "pod", "ordered", "--wait=false"])
        .await?;
    cluster
        .wait_until(Duration::from_secs(30), "SIGTERM handled", || async {
            Ok(std::fs::read_to_string(&main_file2)
                .unwrap_or_default()
                .contains("bye"))
        })
        .await?;
    cluster
        .wait_gone(&pods, "ordered", Duration::from_secs(30))
        .await?;
    // A process the container left behind (a daemon's child) dies with the pod.
    let needle = format!("86399.{orphan}");
    cluster
        .wait_until(
            Duration::from_secs(10),
            "orphaned process killed",
            || async { Ok(!processes().iter().any(|c| c.contains(&needle))) },
        )
        .await?;
    cluster.shutdown();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_an_owner_garbage_collects_its_children() -> anyhow::Result<()> {
    let _serial = serial().await;
    let cluster = Cluster::start().await?;
    cluster.create_namespace("gc").await?;
    apply(
        &cluster,
        r#"
apiVersion: apps/v1
kind: Deployment
metadata: {name: app, namespace: gc}
spec:
  replicas: 1
  selector: {matchLabels: {app: gc}}
  template:
    metadata: {labels: {app: gc}}
    spec:
      terminationGracePeriodSeconds: 2
      containers: [{name: sleep, image: busybox, command: [sleep, "1000"]}]
"#,
    )
    .await?;
    cluster
        .wait_deployment_ready("gc", "app", Duration::from_secs(60))
        .await?;
    let rss: Api<ReplicaSet> = Api::namespaced(cluster.client(), "gc");
    let pods: Api<Pod> = Api::namespaced(cluster.client(), "gc");
    assert_eq!(rss.list(&ListParams::default()).await?.items.len(), 1);
    assert_eq!(pods.list(&ListParams::default()).await?.items.len(), 1);

    // An owner reference written by us, not by a controller.
    let cms: Api<ConfigMap> = Api::namespaced(cluster.client(), "gc");
    apply(
        &cluster,
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: parent, namespace: gc}\n",
    )
    .await?;
    let parent_uid = cms.get("parent").await?.metadata.uid.unwrap_or_default();
    apply(
        &cluster,
        &format!(
            "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: child\n  namespace: gc\n  ownerReferences: [{{apiVersion: v1, kind: ConfigMap, name: parent, uid: {parent_uid}}}]\n"
        ),
    )
    .await?;

    cluster
        .kubectl(&["-n", "gc", "delete", "deployment", "app"])
        .await?;
    cluster
        .kubectl(&["-n", "gc", "delete", "configmap", "parent"])
        .await?;
    cluster
        .wait_until(
            Duration::from_secs(60),
            "replicasets and pods collected",
            || async {
                Ok(rss.list(&ListParams::default()).await?.items.is_empty()
                    && pods.list(&ListParams::default()).await?.items.is_empty())
            },
        )
        .await?;
    cluster
        .wait_gone(&cms, "child", Duration::from_secs(60))
        .await?;
    cluster.shutdown();
    Ok(())
}

/// Command lines of every process on the machine.
fn processes() -> Vec<String> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .collect()
}

//! weft's end-to-end cluster harness.
//!
//! A [`Cluster`] is a real Kubernetes control plane (etcd, kube-apiserver,
//! kube-controller-manager, kube-scheduler built from their Go modules by
//! `e2e/controlplane/`) plus a simulated kubelet that runs pods as local
//! processes in their own network namespaces, all inside one network
//! namespace created for the test and removed when the `Cluster` is dropped.
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! let cluster = weft_e2e::Cluster::start().await?;
//! cluster.kubectl(&["create", "namespace", "demo"]).await?;
//! let pods: kube::Api<k8s_openapi::api::core::v1::Pod> =
//!     kube::Api::namespaced(cluster.client(), "demo");
//! # let _ = pods; Ok(()) }
//! ```
//!
//! Modules: [`netns`] (namespaces, running Rust code inside one),
//! [`cluster`] (the test-facing API), [`kubelet`] (the node simulator),
//! [`images`] (image → program table), [`prometheus`] (a real Prometheus
//! scraping the cluster with weft's shipped scrape jobs), [`jaeger`] (a
//! real Jaeger receiving the proxies' spans). See
//! `e2e/README.md` for what is simulated and how it differs from a real
//! kubelet.

pub mod cluster;
pub mod hostfs;
pub mod images;
pub mod jaeger;
pub mod kubelet;
pub mod mesh;
pub mod netns;
pub mod node_service;
pub mod prometheus;

pub use cluster::{Cluster, ClusterConfig, HarnessError, pod_is_ready};
pub use images::ImageMap;

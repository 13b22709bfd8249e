//! Which workload a pod belongs to, for telemetry labels: the injector
//! derives it for the pod it admits (the proxy's `source_*` labels), the
//! operator for every endpoint it renders (the `destination_*` labels), and
//! both must agree, so both call [`workload_of`].
//!
//! The workload is the pod's top-level controller as far as its own
//! metadata tells, without reading other objects: a Deployment is the
//! controlling ReplicaSet's name without the `pod-template-hash` suffix, a
//! CronJob is the controlling Job's name without the scheduled-time suffix,
//! StatefulSet, DaemonSet, ReplicaSet, Job and ReplicationController are
//! their own names, and a pod without a controller is its own workload.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

/// The label the ReplicaSet controller puts on a Deployment's pods and as
/// the suffix of the ReplicaSet's name.
pub const POD_TEMPLATE_HASH_LABEL: &str = "pod-template-hash";

/// A pod's workload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Workload {
    /// `Deployment`, `StatefulSet`, `DaemonSet`, `ReplicaSet`, `Job`,
    /// `CronJob`, `ReplicationController`, another controller's kind, or
    /// `Pod`.
    pub kind: String,
    /// Its name.
    pub name: String,
}

/// The pod's workload from its metadata; `None` when the pod has neither a
/// controller, a name nor a `generateName` (not a pod an API server admits).
pub fn workload_of(meta: &ObjectMeta) -> Option<Workload> {
    let empty = BTreeMap::new();
    let labels = meta.labels.as_ref().unwrap_or(&empty);
    let controller = meta
        .owner_references
        .iter()
        .flatten()
        .find(|o| o.controller == Some(true));
    if let Some(owner) = controller {
        let (kind, name) = match owner.kind.as_str() {
            "ReplicaSet" => match labels
                .get(POD_TEMPLATE_HASH_LABEL)
                .and_then(|h| strip_suffix(&owner.name, h))
            {
                Some(deployment) => ("Deployment", deployment),
                None => ("ReplicaSet", owner.name.as_str()),
            },
            "Job" => match cron_job_of(&owner.name) {
                Some(cron) => ("CronJob", cron),
                None => ("Job", owner.name.as_str()),
            },
            other => (other, owner.name.as_str()),
        };
        return Some(Workload {
            kind: kind.to_owned(),
            name: name.to_owned(),
        });
    }
    let name = meta.name.as_deref().filter(|n| !n.is_empty()).or_else(|| {
        meta.generate_name
            .as_deref()
            .map(|g| g.trim_end_matches('-'))
            .filter(|g| !g.is_empty())
    })?;
    Some(Workload {
        kind: "Pod".to_owned(),
        name: name.to_owned(),
    })
}

/// `name` without `-<suffix>`, if it ends so and something is left.
fn strip_suffix<'a>(name: &'a str, suffix: &str) -> Option<&'a str> {
    name.strip_suffix(suffix)?
        .strip_suffix('-')
        .filter(|s| !s.is_empty())
}

/// The CronJob behind a Job name: the CronJob controller names its Jobs
/// `<cronjob>-<scheduled time in minutes since the epoch>`, a number of at
/// least eight digits for any time after 1970-03.
fn cron_job_of(job: &str) -> Option<&str> {
    let (cron, stamp) = job.rsplit_once('-')?;
    (stamp.len() >= 8 && stamp.bytes().all(|b| b.is_ascii_digit()) && !cron.is_empty())
        .then_some(cron)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;

    fn pod(owner: Option<(&str, &str)>, labels: &[(&str, &str)], name: Option<&str>) -> ObjectMeta {
        ObjectMeta {
            name: name.map(str::to_owned),
            generate_name: Some("gen-".to_owned()),
            labels: Some(
                labels
                    .iter()
                    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                    .collect(),
            ),
            owner_references: owner.map(|(kind, name)| {
                vec![
                    OwnerReference {
                        kind: "Something".into(),
                        name: "not-the-controller".into(),
                        controller: Some(false),
                        ..Default::default()
                    },
                    OwnerReference {
                        kind: kind.into(),
                        name: name.into(),
                        controller: Some(true),
                        ..Default::default()
                    },
                ]
            }),
            ..Default::default()
        }
    }

    fn w(kind: &str, name: &str) -> Option<Workload> {
        Some(Workload {
            kind: kind.into(),
            name: name.into(),
        })
    }

    #[test]
    fn the_controller_names_the_workload() {
        let hash = [(POD_TEMPLATE_HASH_LABEL, "7d9c8b6f5")];
        assert_eq!(
            workload_of(&pod(
                Some(("ReplicaSet", "backend-v1-7d9c8b6f5")),
                &hash,
                None
            )),
            w("Deployment", "backend-v1")
        );
        // A ReplicaSet of its own: the hash is not its suffix.
        assert_eq!(
            workload_of(&pod(Some(("ReplicaSet", "cache")), &hash, None)),
            w("ReplicaSet", "cache")
        );
        assert_eq!(
            workload_of(&pod(Some(("ReplicaSet", "cache-1")), &[], None)),
            w("ReplicaSet", "cache-1")
        );
        assert_eq!(
            workload_of(&pod(Some(("StatefulSet", "db")), &[], Some("db-0"))),
            w("StatefulSet", "db")
        );
        assert_eq!(
            workload_of(&pod(Some(("DaemonSet", "agent")), &[], None)),
            w("DaemonSet", "agent")
        );
        assert_eq!(
            workload_of(&pod(Some(("Job", "report-29400123")), &[], None)),
            w("CronJob", "report")
        );
        assert_eq!(
            workload_of(&pod(Some(("Job", "migrate-2")), &[], None)),
            w("Job", "migrate-2")
        );
    }

    #[test]
    fn a_pod_without_a_controller_is_its_own_workload() {
        let mut p = pod(None, &[], Some("debug"));
        assert_eq!(workload_of(&p), w("Pod", "debug"));
        // Admission of a generated name: the name is not set yet.
        p.name = None;
        assert_eq!(workload_of(&p), w("Pod", "gen"));
        p.generate_name = None;
        assert_eq!(workload_of(&p), None);
        // An owner that is not the controller does not count.
        let mut q = pod(Some(("ReplicaSet", "x-1")), &[], Some("solo"));
        q.owner_references.as_mut().expect("present").pop();
        assert_eq!(workload_of(&q), w("Pod", "solo"));
    }
}

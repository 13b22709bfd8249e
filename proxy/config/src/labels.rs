//! The pod labels telemetry reports: `app` and `version`, with the
//! Kubernetes recommended labels as fallbacks. The operator reads them for
//! each endpoint it renders, the proxy for its own pod; both call these.

use std::collections::BTreeMap;

/// The `app` of a pod's labels: `app`, else `app.kubernetes.io/name`.
pub fn app_label(labels: &BTreeMap<String, String>) -> Option<&str> {
    labels
        .get("app")
        .or_else(|| labels.get("app.kubernetes.io/name"))
        .map(String::as_str)
}

/// The `version` of a pod's labels: `version`, else
/// `app.kubernetes.io/version`.
pub fn version_label(labels: &BTreeMap<String, String>) -> Option<&str> {
    labels
        .get("version")
        .or_else(|| labels.get("app.kubernetes.io/version"))
        .map(String::as_str)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn app_and_version_fall_back_to_the_recommended_labels() {
        let l: BTreeMap<String, String> = [
            ("app.kubernetes.io/name", "cart"),
            ("app.kubernetes.io/version", "2"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        assert_eq!(app_label(&l), Some("cart"));
        assert_eq!(version_label(&l), Some("2"));
        let mut m = l.clone();
        m.insert("app".into(), "shop".into());
        m.insert("version".into(), "v1".into());
        assert_eq!(app_label(&m), Some("shop"));
        assert_eq!(version_label(&m), Some("v1"));
        assert_eq!(app_label(&BTreeMap::new()), None);
    }
}

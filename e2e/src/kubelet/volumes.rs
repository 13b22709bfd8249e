//! Pod volumes: what each volume's files are, fetched from the API.
//!
//! Secret, ConfigMap, downward-API and projected volumes (incl. service
//! account tokens from the TokenRequest API, bound to the pod) become an
//! atomic-writer payload ([`super::atomic`]); emptyDir is a plain directory;
//! hostPath is the host path itself. [`PodVolumes::sync`] is called at pod
//! start and then every sync period, so edits reach the files the way
//! kubelet's periodic resync does.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use k8s_openapi::api::authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{
    ConfigMap, DownwardAPIVolumeFile, KeyToPath, Pod, Secret, ServiceAccount, Volume,
};
use kube::Api;
use kube::api::PostParams;

use super::KubeletError;
use super::atomic::{self, FileContent, Payload};

/// Where each volume of a pod lives on the host.
#[derive(Debug)]
pub struct PodVolumes {
    root: PathBuf,
    tokens: HashMap<String, (String, Instant, Duration)>,
}

impl PodVolumes {
    /// Volumes of one pod under `root`.
    pub fn new(root: PathBuf) -> Self {
        Self {
            root,
            tokens: HashMap::new(),
        }
    }

    /// The host directory (or file) of volume `name`.
    pub fn path(&self, pod: &Pod, name: &str) -> PathBuf {
        let host_path = pod
            .spec
            .as_ref()
            .and_then(|s| s.volumes.as_ref())
            .and_then(|vs| vs.iter().find(|v| v.name == name))
            .and_then(|v| v.host_path.as_ref());
        match host_path {
            Some(hp) => PathBuf::from(&hp.path),
            None => self.root.join(name),
        }
    }

    /// Writes every volume's current content; returns the first error
    /// (missing ConfigMap, ...) after trying them all.
    pub async fn sync(&mut self, client: &kube::Client, pod: &Pod) -> Result<(), KubeletError> {
        let volumes = pod
            .spec
            .as_ref()
            .and_then(|s| s.volumes.clone())
            .unwrap_or_default();
        let mut first_err = None;
        for v in &volumes {
            if let Err(e) = self.sync_one(client, pod, v).await {
                first_err.get_or_insert(e);
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    async fn sync_one(
        &mut self,
        client: &kube::Client,
        pod: &Pod,
        v: &Volume,
    ) -> Result<(), KubeletError> {
        let dir = self.root.join(&v.name);
        let ns = pod.metadata.namespace.clone().unwrap_or_default();
        let vol_err = |e: String| KubeletError::Volume {
            volume: v.name.clone(),
            detail: e,
        };
        let payload = if v.empty_dir.is_some() {
            std::fs::create_dir_all(&dir).map_err(|e| vol_err(e.to_string()))?;
            set_mode(&dir, 0o777).map_err(|e| vol_err(e.to_string()))?;
            return Ok(());
        } else if v.host_path.is_some() {
            return Ok(());
        } else if let Some(cm) = &v.config_map {
            let mode = cm.default_mode.unwrap_or(0o644) as u32;
            configmap_payload(
                client,
                &ns,
                &cm.name,
                cm.items.as_deref(),
                mode,
                cm.optional.unwrap_or(false),
            )
            .await
            .map_err(vol_err)?
        } else if let Some(s) = &v.secret {
            let mode = s.default_mode.unwrap_or(0o644) as u32;
            secret_payload(
                client,
                &ns,
                s.secret_name.as_deref().unwrap_or_default(),
                s.items.as_deref(),
                mode,
                s.optional.unwrap_or(false),
            )
            .await
            .map_err(vol_err)?
        } else if let Some(d) = &v.downward_api {
            let mode = d.default_mode.unwrap_or(0o644) as u32;
            downward_payload(pod, d.items.as_deref().unwrap_or_default(), mode).map_err(vol_err)?
        } else if let Some(p) = &v.projected {
            let mode = p.default_mode.unwrap_or(0o644) as u32;
            let mut out = Payload::new();
            for src in p.sources.as_deref().unwrap_or_default() {
                if let Some(cm) = &src.config_map {
                    out.extend(
                        configmap_payload(
                            client,
                            &ns,
                            &cm.name,
                            cm.items.as_deref(),
                            mode,
                            cm.optional.unwrap_or(false),
                        )
                        .await
                        .map_err(vol_err)?,
                    );
                }
                if let Some(s) = &src.secret {
                    out.extend(
                        secret_payload(
                            client,
                            &ns,
                            &s.name,
                            s.items.as_deref(),
                            mode,
                            s.optional.unwrap_or(false),
                        )
                        .await
                        .map_err(vol_err)?,
                    );
                }
                if let Some(d) = &src.downward_api {
                    out.extend(
                        downward_payload(pod, d.items.as_deref().unwrap_or_default(), mode)
                            .map_err(vol_err)?,
                    );
                }
                if let Some(t) = &src.service_account_token {
                    let key = format!("{}/{}", v.name, t.path);
                    let token = self
                        .token(client, pod, &key, t.audience.clone(), t.expiration_seconds)
                        .await
                        .map_err(vol_err)?;
                    out.insert(
                        t.path.clone(),
                        FileContent {
                            data: token.into_bytes(),
                            mode,
                        },
                    );
                }
            }
            out
        } else {
            return Err(vol_err(
                "unsupported volume type (the simulator supports emptyDir, hostPath, configMap, secret, downwardAPI, projected)".into(),
            ));
        };
        atomic::write(&dir, &payload).map_err(|e| vol_err(e.to_string()))?;
        Ok(())
    }

    /// A cached token, renewed after 80% of its lifetime like kubelet's.
    async fn token(
        &mut self,
        client: &kube::Client,
        pod: &Pod,
        key: &str,
        audience: Option<String>,
        expiration: Option<i64>,
    ) -> Result<String, String> {
        if let Some((token, issued, ttl)) = self.tokens.get(key)
            && issued.elapsed() < ttl.mul_f64(0.8)
        {
            return Ok(token.clone());
        }
        let ns = pod.metadata.namespace.clone().unwrap_or_default();
        let sa = pod
            .spec
            .as_ref()
            .and_then(|s| s.service_account_name.clone())
            .unwrap_or_else(|| "default".into());
        let req = TokenRequest {
            spec: TokenRequestSpec {
                audiences: audience.into_iter().collect(),
                expiration_seconds: Some(expiration.unwrap_or(3600)),
                bound_object_ref: Some(BoundObjectReference {
                    api_version: Some("v1".into()),
                    kind: Some("Pod".into()),
                    name: pod.metadata.name.clone(),
                    uid: pod.metadata.uid.clone(),
                }),
            },
            ..Default::default()
        };
        let resp = Api::<ServiceAccount>::namespaced(client.clone(), &ns)
            .create_token_request(&sa, &PostParams::default(), &req)
            .await
            .map_err(|e| format!("TokenRequest for serviceaccount {ns}/{sa}: {e}"))?;
        let status = resp
            .status
            .ok_or_else(|| "TokenRequest returned no status".to_string())?;
        let ttl = status
            .expiration_timestamp
            .0
            .duration_since(k8s_openapi::jiff::Timestamp::now());
        let ttl = Duration::try_from(ttl).unwrap_or(Duration::from_secs(600));
        self.tokens
            .insert(key.to_owned(), (status.token.clone(), Instant::now(), ttl));
        Ok(status.token)
    }
}

fn set_mode(path: &Path, mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
}

/// Picks the listed keys (all keys without a list or with an empty one).
/// As with kubelet's `MakePayload`, a listed key the object lacks fails the
/// whole volume unless the source is `optional` (then it is skipped); a
/// failed volume keeps a new pod from starting and a running pod's files
/// as they were. `what` is `configmap` or `secret` and the object's name.
fn select_items(
    all: BTreeMap<String, Vec<u8>>,
    items: Option<&[KeyToPath]>,
    mode: u32,
    optional: bool,
    what: &str,
) -> Result<Payload, String> {
    let mut out = Payload::new();
    match items.filter(|items| !items.is_empty()) {
        None => {
            for (k, data) in all {
                out.insert(k, FileContent { data, mode });
            }
        }
        Some(items) => {
            for it in items {
                let Some(data) = all.get(&it.key) else {
                    if optional {
                        continue;
                    }
                    // kubelet's words, so logs read the same.
                    let kind = if what.starts_with("secret") {
                        "secret"
                    } else {
                        "config"
                    };
                    return Err(format!(
                        "{what}: references non-existent {kind} key: {}",
                        it.key
                    ));
                };
                out.insert(
                    it.path.clone(),
                    FileContent {
                        data: data.clone(),
                        mode: it.mode.map_or(mode, |m| m as u32),
                    },
                );
            }
        }
    }
    Ok(out)
}

async fn configmap_payload(
    client: &kube::Client,
    ns: &str,
    name: &str,
    items: Option<&[KeyToPath]>,
    mode: u32,
    optional: bool,
) -> Result<Payload, String> {
    let cm = Api::<ConfigMap>::namespaced(client.clone(), ns)
        .get_opt(name)
        .await
        .map_err(|e| format!("configmap {ns}/{name}: {e}"))?;
    let Some(cm) = cm else {
        return if optional {
            Ok(Payload::new())
        } else {
            Err(format!("configmap {ns}/{name} not found"))
        };
    };
    let mut all: BTreeMap<String, Vec<u8>> = cm
        .data
        .unwrap_or_default()
        .into_iter()
        .map(|(k, v)| (k, v.into_bytes()))
        .collect();
    all.extend(
        cm.binary_data
            .unwrap_or_default()
            .into_iter()
            .map(|(k, v)| (k, v.0)),
    );
    select_items(
        all,
        items,
        mode,
        optional,
        &format!("configmap {ns}/{name}"),
    )
}

async fn secret_payload(
    client: &kube::Client,
    ns: &str,
    name: &str,
    items: Option<&[KeyToPath]>,
    mode: u32,
    optional: bool,
) -> Result<Payload, String> {
    let s = Api::<Secret>::namespaced(client.clone(), ns)
        .get_opt(name)
        .await
        .map_err(|e| format!("secret {ns}/{name}: {e}"))?;
    let Some(s) = s else {
        return if optional {
            Ok(Payload::new())
        } else {
            Err(format!("secret {ns}/{name} not found"))
        };
    };
    let mut all: BTreeMap<String, Vec<u8>> = s
        .data
        .unwrap_or_default()
        .into_iter()
        .map(|(k, v)| (k, v.0))
        .collect();
    all.extend(
        s.string_data
            .unwrap_or_default()
            .into_iter()
            .map(|(k, v)| (k, v.into_bytes())),
    );
    select_items(all, items, mode, optional, &format!("secret {ns}/{name}"))
}

fn downward_payload(
    pod: &Pod,
    items: &[DownwardAPIVolumeFile],
    mode: u32,
) -> Result<Payload, String> {
    let mut out = Payload::new();
    for it in items {
        let value = if let Some(f) = &it.field_ref {
            match f.field_path.as_str() {
                "metadata.labels" => map_lines(pod.metadata.labels.as_ref()),
                "metadata.annotations" => map_lines(pod.metadata.annotations.as_ref()),
                path => super::container::field_value(pod, path)?,
            }
        } else if let Some(r) = &it.resource_field_ref {
            super::container::resource_value(pod, r)?
        } else {
            return Err(format!("downward API item {} has no source", it.path));
        };
        out.insert(
            it.path.clone(),
            FileContent {
                data: value.into_bytes(),
                mode: it.mode.map_or(mode, |m| m as u32),
            },
        );
    }
    Ok(out)
}

/// `key="value"` lines, sorted, as kubelet writes labels and annotations.
fn map_lines(map: Option<&BTreeMap<String, String>>) -> String {
    map.into_iter()
        .flatten()
        .map(|(k, v)| format!("{k}={}\n", serde_json::Value::String(v.clone())))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(key: &str) -> KeyToPath {
        KeyToPath {
            key: key.into(),
            path: key.into(),
            mode: None,
        }
    }

    #[test]
    fn missing_listed_key_fails_unless_optional() {
        let all = BTreeMap::from([("proxy.json".to_owned(), b"{}".to_vec())]);
        let items = [item("proxy.json"), item("proxy.json.gz")];
        let err = select_items(
            all.clone(),
            Some(&items),
            0o444,
            false,
            "configmap d/weft-proxy",
        )
        .expect_err("a required key is missing");
        assert_eq!(
            err,
            "configmap d/weft-proxy: references non-existent config key: proxy.json.gz"
        );
        let got = select_items(all, Some(&items), 0o444, true, "configmap d/weft-proxy")
            .expect("optional sources skip missing keys");
        assert_eq!(got.keys().collect::<Vec<_>>(), ["proxy.json"]);
    }

    #[test]
    fn a_large_config_fails_a_source_that_lists_only_the_plain_key() {
        // The operator writes only `binaryData` `proxy.json.gz` above its
        // gzip threshold.
        let gz = BTreeMap::from([("proxy.json.gz".to_owned(), vec![0x1f, 0x8b])]);
        let err = select_items(
            gz.clone(),
            Some(&[item("proxy.json")]),
            0o444,
            false,
            "configmap d/weft-proxy",
        )
        .expect_err("a required key is missing");
        assert!(err.contains("non-existent config key: proxy.json"), "{err}");
        let err = select_items(
            BTreeMap::new(),
            Some(&[item("tls.crt")]),
            0o444,
            false,
            "secret d/weft-identity-default",
        )
        .expect_err("a required key is missing");
        assert!(err.contains("non-existent secret key: tls.crt"), "{err}");
    }

    #[test]
    fn without_items_every_key_appears_with_the_default_mode() {
        let gz = BTreeMap::from([("proxy.json.gz".to_owned(), vec![0x1f, 0x8b])]);
        for items in [None, Some(&[][..])] {
            let got = select_items(gz.clone(), items, 0o444, false, "configmap d/weft-proxy")
                .expect("no key is required");
            assert_eq!(got.keys().collect::<Vec<_>>(), ["proxy.json.gz"]);
            assert_eq!(got["proxy.json.gz"].mode, 0o444);
            assert_eq!(got["proxy.json.gz"].data, [0x1f, 0x8b]);
        }
        let got = select_items(
            BTreeMap::new(),
            None,
            0o444,
            false,
            "configmap d/weft-proxy",
        )
        .expect("an empty object has nothing to miss");
        assert!(got.is_empty());
    }

    #[test]
    fn listed_keys_take_their_path_and_mode() {
        let all = BTreeMap::from([
            ("a".to_owned(), b"1".to_vec()),
            ("b".to_owned(), b"2".to_vec()),
        ]);
        let items = [KeyToPath {
            key: "a".into(),
            path: "dir/x".into(),
            mode: Some(0o400),
        }];
        let got = select_items(all, Some(&items), 0o444, false, "configmap d/c").expect("present");
        assert_eq!(got.keys().collect::<Vec<_>>(), ["dir/x"]);
        assert_eq!(got["dir/x"].mode, 0o400);
    }
}

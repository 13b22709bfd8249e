//! Containers as processes: the command line, environment (incl. downward
//! API), mounts, working directory and user of a container spec.
//!
//! A container is started as
//! `ip netns exec <pod-netns> unshare --mount --uts --propagation private -- bash -c <setup> ...`:
//! the pod's network namespace; a private mount namespace in which each
//! volume is bind-mounted at its `mountPath`; a UTS namespace whose hostname
//! is the pod name; then `setpriv` to the spec's `runAsUser`/`runAsGroup`
//! and `exec` of the program, so the container's PID is the program's.
//! Inherited file descriptors other than stdio are closed first.
//! The file system is otherwise the host's (no image root fs).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use k8s_openapi::api::core::v1::{ConfigMap, Container, Pod, ResourceFieldSelector, Secret};
use kube::Api;

use super::KubeletError;
use crate::images::ImageMap;

/// Everything needed to start one container process.
#[derive(Debug, Clone)]
pub struct ProcessSpec {
    /// Network namespace name to run in.
    pub netns: String,
    /// UTS hostname (the pod name).
    pub hostname: String,
    /// Program and arguments.
    pub argv: Vec<String>,
    /// The full environment.
    pub env: Vec<(String, String)>,
    /// Working directory.
    pub workdir: String,
    /// `runAsUser` / `runAsGroup`.
    pub user: Option<(i64, i64)>,
    /// Bind mounts: host source, container path, read-only.
    pub mounts: Vec<(PathBuf, PathBuf, bool)>,
    /// Where stdout and stderr go.
    pub log: PathBuf,
}

/// Single-quotes `s` for `sh`.
pub fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// Starts the process; it is killed if the returned child is dropped.
pub fn spawn(spec: &ProcessSpec) -> Result<tokio::process::Child, KubeletError> {
    // Close every inherited descriptor but stdio first: a container (or a
    // daemon it forks) must not keep e.g. a build lock held by the test.
    let mut script = String::from(
        "for fd in $(ls /proc/$$/fd); do case $fd in 0|1|2) ;; *) eval \"exec $fd>&-\" ;; esac; done\nset -e\n",
    );
    script.push_str(&format!("hostname {}\n", sh_quote(&spec.hostname)));
    for (src, dst, ro) in &spec.mounts {
        let (s, d) = (
            sh_quote(&src.to_string_lossy()),
            sh_quote(&dst.to_string_lossy()),
        );
        script.push_str(&format!("mount --bind {s} {d}\n"));
        if *ro {
            script.push_str(&format!("mount -o remount,bind,ro {d}\n"));
        }
    }
    script.push_str(&format!("cd {}\n", sh_quote(&spec.workdir)));
    match spec.user {
        Some((uid, gid)) => script.push_str(&format!(
            "exec /usr/bin/setpriv --reuid={uid} --regid={gid} --clear-groups -- \"$@\"\n"
        )),
        None => script.push_str("exec \"$@\"\n"),
    }
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&spec.log)
        .map_err(|e| KubeletError::Process(format!("log {}: {e}", spec.log.display())))?;
    let log2 = log
        .try_clone()
        .map_err(|e| KubeletError::Process(e.to_string()))?;
    let mut cmd = tokio::process::Command::new("ip");
    cmd.args(["netns", "exec", &spec.netns])
        .args([
            "/usr/bin/unshare",
            "--mount",
            "--uts",
            "--propagation",
            "private",
            "--",
            "/bin/bash",
            "-c",
            &script,
            "weft-container",
        ])
        .args(&spec.argv)
        .env_clear()
        .envs(spec.env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::from(log))
        .stderr(Stdio::from(log2))
        .kill_on_drop(true);
    cmd.spawn()
        .map_err(|e| KubeletError::Process(format!("spawn {:?}: {e}", spec.argv)))
}

/// The program and arguments of a container (see [`crate::images`]).
pub fn argv(
    images: &ImageMap,
    c: &Container,
    env: &[(String, String)],
) -> Result<Vec<String>, KubeletError> {
    let image = c.image.clone().unwrap_or_default();
    let vars: BTreeMap<&str, &str> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let args: Vec<String> = c.args.iter().flatten().map(|a| expand(a, &vars)).collect();
    let mut argv = match c.command.as_ref().filter(|c| !c.is_empty()) {
        Some(command) => {
            let mut v: Vec<String> = command.iter().map(|a| expand(a, &vars)).collect();
            v[0] = images.resolve_command(&v[0]).to_string_lossy().into_owned();
            v
        }
        None => match images.program_for_image(&image) {
            Some(p) => vec![p.to_string_lossy().into_owned()],
            None => {
                return Err(KubeletError::Image(format!(
                    "image {image:?} of container {} maps to no program and the container has no command; add a rule with ImageMap::with",
                    c.name
                )));
            }
        },
    };
    let program = Path::new(&argv[0]);
    if program.is_absolute() && !program.exists() {
        return Err(KubeletError::Image(format!(
            "program {} for image {image:?} does not exist; build it first (e.g. cargo build -p <crate>)",
            program.display()
        )));
    }
    argv.extend(args);
    Ok(argv)
}

/// Kubernetes `$(VAR)` expansion: defined variables replaced, `$$` → `$`,
/// anything else kept.
pub fn expand(input: &str, vars: &BTreeMap<&str, &str>) -> String {
    let mut out = String::new();
    let mut rest = input;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(stripped) = after.strip_prefix('$') {
            out.push('$');
            rest = stripped;
        } else if let Some(inner) = after.strip_prefix('(')
            && let Some(end) = inner.find(')')
            && let Some(v) = vars.get(&inner[..end])
        {
            out.push_str(v);
            rest = &inner[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

/// A downward-API field of the pod (env `fieldRef` and volume items).
pub fn field_value(pod: &Pod, path: &str) -> Result<String, String> {
    let meta = &pod.metadata;
    let status = pod.status.as_ref();
    let keyed = |prefix: &str, map: Option<&BTreeMap<String, String>>| {
        path.strip_prefix(prefix)
            .and_then(|r| r.strip_suffix("']"))
            .map(|k| map.and_then(|m| m.get(k)).cloned().unwrap_or_default())
    };
    if let Some(v) = keyed("metadata.labels['", meta.labels.as_ref()) {
        return Ok(v);
    }
    if let Some(v) = keyed("metadata.annotations['", meta.annotations.as_ref()) {
        return Ok(v);
    }
    let ips = |list: Option<Vec<String>>| list.unwrap_or_default().join(",");
    Ok(match path {
        "metadata.name" => meta.name.clone().unwrap_or_default(),
        "metadata.namespace" => meta.namespace.clone().unwrap_or_default(),
        "metadata.uid" => meta.uid.clone().unwrap_or_default(),
        "spec.nodeName" => pod
            .spec
            .as_ref()
            .and_then(|s| s.node_name.clone())
            .unwrap_or_default(),
        "spec.serviceAccountName" => pod
            .spec
            .as_ref()
            .and_then(|s| s.service_account_name.clone())
            .unwrap_or_default(),
        "status.podIP" => status.and_then(|s| s.pod_ip.clone()).unwrap_or_default(),
        "status.hostIP" => status.and_then(|s| s.host_ip.clone()).unwrap_or_default(),
        "status.podIPs" => ips(status
            .and_then(|s| s.pod_ips.clone())
            .map(|v| v.into_iter().map(|i| i.ip).collect())),
        "status.hostIPs" => ips(status
            .and_then(|s| s.host_ips.clone())
            .map(|v| v.into_iter().map(|i| i.ip).collect())),
        other => return Err(format!("unsupported downward API field {other:?}")),
    })
}

/// A `resourceFieldRef`: the container's value as written, else the
/// simulated node's capacity (8 CPUs, 32Gi) for limits and 0 for requests.
pub fn resource_value(pod: &Pod, r: &ResourceFieldSelector) -> Result<String, String> {
    let containers = pod.spec.iter().flat_map(|s| {
        s.containers
            .iter()
            .chain(s.init_containers.iter().flatten())
    });
    let c = match &r.container_name {
        Some(name) => containers.into_iter().find(|c| &c.name == name),
        None => containers.into_iter().next(),
    };
    let res = c.and_then(|c| c.resources.as_ref());
    let (kind, key) = r
        .resource
        .split_once('.')
        .ok_or_else(|| format!("bad resource {:?}", r.resource))?;
    let set = match kind {
        "limits" => res.and_then(|r| r.limits.as_ref()),
        "requests" => res.and_then(|r| r.requests.as_ref()),
        _ => return Err(format!("bad resource {:?}", r.resource)),
    }
    .and_then(|m| m.get(key))
    .map(|q| q.0.clone());
    Ok(set.unwrap_or_else(|| match (kind, key) {
        ("limits", "cpu") => "8".into(),
        ("limits", "memory") => (32u64 << 30).to_string(),
        _ => "0".into(),
    }))
}

/// The container's environment: defaults, `envFrom`, then `env` in order
/// with `$(VAR)` expansion. `pod` carries the status the simulator
/// assigned (pod IP), so `status.podIP` resolves.
pub async fn environment(
    client: &kube::Client,
    pod: &Pod,
    c: &Container,
    kubernetes_service: (&str, u16),
) -> Result<Vec<(String, String)>, KubeletError> {
    let ns = pod.metadata.namespace.clone().unwrap_or_default();
    let env_err = |d: String| KubeletError::Env {
        container: c.name.clone(),
        detail: d,
    };
    let mut env: Vec<(String, String)> = vec![
        (
            "PATH".into(),
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into(),
        ),
        (
            "HOSTNAME".into(),
            pod.metadata.name.clone().unwrap_or_default(),
        ),
        ("HOME".into(), "/root".into()),
        (
            "KUBERNETES_SERVICE_HOST".into(),
            kubernetes_service.0.into(),
        ),
        (
            "KUBERNETES_SERVICE_PORT".into(),
            kubernetes_service.1.to_string(),
        ),
        (
            "KUBERNETES_SERVICE_PORT_HTTPS".into(),
            kubernetes_service.1.to_string(),
        ),
    ];
    let set = |env: &mut Vec<(String, String)>, k: String, v: String| {
        env.retain(|(n, _)| *n != k);
        env.push((k, v));
    };
    let cms = Api::<ConfigMap>::namespaced(client.clone(), &ns);
    let secrets = Api::<Secret>::namespaced(client.clone(), &ns);
    for from in c.env_from.iter().flatten() {
        let prefix = from.prefix.clone().unwrap_or_default();
        if let Some(r) = &from.config_map_ref {
            match cms
                .get_opt(&r.name)
                .await
                .map_err(|e| env_err(e.to_string()))?
            {
                Some(cm) => {
                    for (k, v) in cm.data.unwrap_or_default() {
                        set(&mut env, format!("{prefix}{k}"), v);
                    }
                }
                None if r.optional == Some(true) => {}
                None => return Err(env_err(format!("configmap {} not found", r.name))),
            }
        }
        if let Some(r) = &from.secret_ref {
            match secrets
                .get_opt(&r.name)
                .await
                .map_err(|e| env_err(e.to_string()))?
            {
                Some(s) => {
                    for (k, v) in s.data.unwrap_or_default() {
                        set(
                            &mut env,
                            format!("{prefix}{k}"),
                            String::from_utf8_lossy(&v.0).into_owned(),
                        );
                    }
                }
                None if r.optional == Some(true) => {}
                None => return Err(env_err(format!("secret {} not found", r.name))),
            }
        }
    }
    for e in c.env.iter().flatten() {
        let value = if let Some(vf) = &e.value_from {
            if let Some(f) = &vf.field_ref {
                field_value(pod, &f.field_path).map_err(env_err)?
            } else if let Some(r) = &vf.resource_field_ref {
                resource_value(pod, r).map_err(env_err)?
            } else if let Some(r) = &vf.config_map_key_ref {
                let v = cms
                    .get_opt(&r.name)
                    .await
                    .map_err(|e| env_err(e.to_string()))?
                    .and_then(|cm| cm.data.and_then(|d| d.get(&r.key).cloned()));
                match v {
                    Some(v) => v,
                    None if r.optional == Some(true) => continue,
                    None => {
                        return Err(env_err(format!(
                            "configmap {} key {} not found",
                            r.name, r.key
                        )));
                    }
                }
            } else if let Some(r) = &vf.secret_key_ref {
                let v = secrets
                    .get_opt(&r.name)
                    .await
                    .map_err(|e| env_err(e.to_string()))?
                    .and_then(|s| s.data.and_then(|d| d.get(&r.key).cloned()));
                match v {
                    Some(v) => String::from_utf8_lossy(&v.0).into_owned(),
                    None if r.optional == Some(true) => continue,
                    None => {
                        return Err(env_err(format!(
                            "secret {} key {} not found",
                            r.name, r.key
                        )));
                    }
                }
            } else {
                return Err(env_err(format!("env {} has an empty valueFrom", e.name)));
            }
        } else {
            let vars: BTreeMap<&str, &str> =
                env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
            expand(e.value.as_deref().unwrap_or_default(), &vars)
        };
        set(&mut env, e.name.clone(), value);
    }
    Ok(env)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expands_like_kubernetes() {
        let vars: BTreeMap<&str, &str> = [("A", "x"), ("B", "y")].into_iter().collect();
        assert_eq!(expand("$(A)-$(B)", &vars), "x-y");
        assert_eq!(expand("$$(A)", &vars), "$(A)");
        assert_eq!(expand("$(C) $ $(A", &vars), "$(C) $ $(A");
    }

    #[test]
    fn quotes_for_sh() {
        assert_eq!(sh_quote("a'b"), r"'a'\''b'");
    }
}

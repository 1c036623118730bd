//! flannel's Kubernetes subnet manager (`--kube-subnet-mgr`): our subnet is
//! our Node's `spec.podCIDR`, the network config is a file
//! (`--net-config-path`), and the peers are the Nodes whose annotations say
//! they run flannel's subnet manager. What we publish about ourselves goes
//! into our Node's annotations, written through `nodes/<name>/status` with a
//! strategic-merge patch (all that flannel's RBAC allows), and only when it
//! changed; `NetworkUnavailable=False` is merged into the conditions by
//! `type`, so kubelet's stay.

pub mod annotations;
pub mod client;
pub mod feed;
pub mod node_lease;

use std::{
    path::PathBuf,
    time::{SystemTime, UNIX_EPOCH},
};

use k8s_openapi::api::core::v1::{Node, Pod};
use kube::{
    Api, Client,
    api::{Patch, PatchParams},
};

use annotations::{Names, PrefixError};
pub use client::ClientError;

/// What `--kube-*` and the environment say.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KubeOptions {
    pub api_url: Option<String>,
    pub kubeconfig: Option<PathBuf>,
    pub annotation_prefix: String,
    pub net_config_path: PathBuf,
    pub set_node_network_unavailable: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error(transparent)]
    Prefix(#[from] PrefixError),
    #[error("env variables POD_NAME and POD_NAMESPACE must be set (or NODE_NAME)")]
    NoNodeName,
    #[error("node name not present in pod spec '{namespace}/{pod}'")]
    NoNodeInPod { namespace: String, pod: String },
    /// The API server's answer, or no answer.
    #[error("{what}: {source}")]
    Api {
        what: String,
        #[source]
        source: kube::Error,
    },
}

impl KubeError {
    fn api(what: impl Into<String>) -> impl FnOnce(kube::Error) -> KubeError {
        let what = what.into();
        move |source| KubeError::Api { what, source }
    }

    /// Whether asking again may help: the API server was unreachable or
    /// answered with a server-side error, a timeout, a conflict, or the
    /// object is not there yet. Refusals (401, 403) are retried too: a
    /// DaemonSet's RBAC or token is often fixed while it waits.
    pub fn is_retryable(&self) -> bool {
        match self {
            KubeError::Api { source, .. } => match source {
                kube::Error::Api(status) => status.code != 400 && status.code != 422,
                _ => true,
            },
            _ => false,
        }
    }

    /// The object asked for does not exist.
    pub fn is_not_found(&self) -> bool {
        matches!(self, KubeError::Api { source: kube::Error::Api(s), .. } if s.code == 404)
    }
}

/// Our node's handle on the API.
#[derive(Clone)]
pub struct KubeManager {
    client: Client,
    nodes: Api<Node>,
    pub node_name: String,
    pub names: Names,
}

impl KubeManager {
    /// The client and our node's name: `NODE_NAME`, else the `spec.nodeName`
    /// of the pod `POD_NAMESPACE/POD_NAME` (kube-flannel.yml's way).
    pub async fn connect(opts: &KubeOptions) -> Result<KubeManager, KubeError> {
        let names = Names::new(&opts.annotation_prefix)?;
        let client = client::connect(opts.api_url.as_deref(), opts.kubeconfig.as_deref()).await?;
        let node_name = node_name(&client).await?;
        Ok(KubeManager {
            nodes: Api::all(client.clone()),
            client,
            node_name,
            names,
        })
    }

    pub fn client(&self) -> Client {
        self.client.clone()
    }

    /// Our Node as the API holds it now.
    pub async fn node(&self) -> Result<Node, KubeError> {
        self.nodes
            .get(&self.node_name)
            .await
            .map_err(KubeError::api(format!("reading node {:?}", self.node_name)))
    }

    /// Writes `changes` into our Node's annotations (strategic merge through
    /// the status subresource, as flanneld), returning the updated Node.
    pub async fn annotate(&self, changes: &[(String, String)]) -> Result<Node, KubeError> {
        self.patch_status(
            annotations::patch_body(changes),
            format!(
                "annotating node {:?} (PATCH nodes/{}/status)",
                self.node_name, self.node_name
            ),
        )
        .await
    }

    /// A strategic-merge PATCH of `nodes/<ours>/status`: the one write
    /// flanneld's ClusterRole allows on Nodes.
    async fn patch_status(&self, body: serde_json::Value, what: String) -> Result<Node, KubeError> {
        self.nodes
            .patch_status(
                &self.node_name,
                &PatchParams::default(),
                &Patch::Strategic(body),
            )
            .await
            .map_err(KubeError::api(what))
    }

    /// `NetworkUnavailable=False`, reason `FlannelIsUp`, merged by `type`
    /// into our Node's conditions (flanneld's `CompleteLease`).
    pub async fn set_network_available(&self) -> Result<(), KubeError> {
        let now = rfc3339(SystemTime::now());
        self.patch_status(
            network_available_patch(&now),
            format!(
                "setting NetworkUnavailable=False on node {:?}",
                self.node_name
            ),
        )
        .await?;
        Ok(())
    }
}

async fn node_name(client: &Client) -> Result<String, KubeError> {
    let var = |n: &str| std::env::var(n).ok().filter(|v| !v.is_empty());
    if let Some(name) = var("NODE_NAME") {
        return Ok(name);
    }
    let (Some(pod), Some(namespace)) = (var("POD_NAME"), var("POD_NAMESPACE")) else {
        return Err(KubeError::NoNodeName);
    };
    let pods: Api<Pod> = Api::namespaced(client.clone(), &namespace);
    let p = pods.get(&pod).await.map_err(KubeError::api(format!(
        "error retrieving pod spec for '{namespace}/{pod}'"
    )))?;
    p.spec
        .and_then(|s| s.node_name)
        .filter(|n| !n.is_empty())
        .ok_or(KubeError::NoNodeInPod { namespace, pod })
}

/// The condition patch, with flanneld's field order and wording.
pub fn network_available_patch(now: &str) -> serde_json::Value {
    serde_json::json!({
        "status": {
            "conditions": [{
                "type": "NetworkUnavailable",
                "status": "False",
                "lastHeartbeatTime": now,
                "lastTransitionTime": now,
                "reason": "FlannelIsUp",
                "message": "Flannel is running on this node",
            }]
        }
    })
}

/// RFC 3339 in UTC with whole seconds, as the API's `metav1.Time`.
pub fn rfc3339(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()) as i64;
    let ts = jiff::Timestamp::from_second(secs).unwrap_or(jiff::Timestamp::UNIX_EPOCH);
    ts.strftime("%Y-%m-%dT%H:%M:%SZ").to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_whole_seconds_in_utc() {
        let t = UNIX_EPOCH + std::time::Duration::from_millis(1_767_323_045_999);
        assert_eq!(rfc3339(t), "2026-01-02T03:04:05Z");
    }

    #[test]
    fn the_condition_is_flannels() {
        let p = network_available_patch("2026-01-02T03:04:05Z");
        let c = &p["status"]["conditions"][0];
        assert_eq!(c["type"], "NetworkUnavailable");
        assert_eq!(c["status"], "False");
        assert_eq!(c["reason"], "FlannelIsUp");
        assert_eq!(c["message"], "Flannel is running on this node");
        assert_eq!(c["lastTransitionTime"], "2026-01-02T03:04:05Z");
    }
}

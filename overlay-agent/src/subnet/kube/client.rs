//! The API client, configured as flanneld's `clientcmd.BuildConfigFromFlags`:
//! neither `--kube-api-url` nor `--kubeconfig-file` means in-cluster (the
//! service account's token, re-read as it rotates, and CA); otherwise the
//! kubeconfig file, with its server replaced by `--kube-api-url` when both
//! are given; the URL alone means that server without credentials.
//! `$KUBECONFIG` and `~/.kube/config` are not consulted, as in flanneld.

use std::path::{Path, PathBuf};

use kube::{
    Client, Config,
    config::{KubeConfigOptions, Kubeconfig},
};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(
        "neither --kube-api-url nor --kubeconfig-file was given, and the in-cluster configuration cannot be used: {0}"
    )]
    InCluster(#[source] kube::config::InClusterError),
    #[error("--kubeconfig-file {path}: {source}")]
    Kubeconfig {
        path: PathBuf,
        #[source]
        source: kube::config::KubeconfigError,
    },
    #[error("--kube-api-url {url:?}: not a URL: {source}")]
    Url {
        url: String,
        #[source]
        source: http::uri::InvalidUri,
    },
    #[error("creating the Kubernetes client: {0}")]
    Client(#[source] kube::Error),
}

/// The client for these flags.
pub async fn connect(
    api_url: Option<&str>,
    kubeconfig: Option<&Path>,
) -> Result<Client, ClientError> {
    let api_url = api_url.filter(|u| !u.is_empty());
    let kubeconfig = kubeconfig.filter(|p| !p.as_os_str().is_empty());
    let url = api_url
        .map(|u| {
            u.parse::<http::Uri>().map_err(|source| ClientError::Url {
                url: u.to_owned(),
                source,
            })
        })
        .transpose()?;
    let config = match (url, kubeconfig) {
        (None, None) => {
            log::warn!(
                "neither --kube-api-url nor --kubeconfig-file was given: using the in-cluster configuration"
            );
            Config::incluster().map_err(ClientError::InCluster)?
        }
        (url, Some(path)) => {
            let err = |source| ClientError::Kubeconfig {
                path: path.to_owned(),
                source,
            };
            let file = Kubeconfig::read_from(path).map_err(err)?;
            let mut config = Config::from_custom_kubeconfig(file, &KubeConfigOptions::default())
                .await
                .map_err(err)?;
            if let Some(url) = url {
                config.cluster_url = url;
            }
            config
        }
        (Some(url), None) => Config::new(url),
    };
    Client::try_from(config).map_err(ClientError::Client)
}

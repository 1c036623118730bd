//! The one-shot subcommands: `status` and `cleanup` (`mk-docker-opts` is
//! [`crate::flannel::docker_opts`]). They must answer even when etcd or the
//! API server does not, so each step gets a few seconds.

mod cleanup;
mod status;

use std::{future::Future, time::Duration};

pub use cleanup::cleanup;
pub use status::status;

use crate::{cli::Cli, subnet::etcd::Registry};

/// One etcd or API step of a one-shot subcommand, bounded to 5 s.
async fn briefly<T, E: std::fmt::Display>(
    step: impl Future<Output = Result<T, E>>,
) -> Result<T, String> {
    tokio::time::timeout(Duration::from_secs(5), step)
        .await
        .map_err(|_| "no answer within 5 s".to_owned())?
        .map_err(|e| e.to_string())
}

async fn connect_briefly(cli: &Cli) -> Result<Registry, String> {
    let mut opts = cli.etcd_options();
    opts.request_timeout = Duration::from_secs(3);
    briefly(Registry::connect(&opts)).await
}

//! `overlay-agent cleanup`.

use anyhow::{Context, Result};

use super::{briefly, connect_briefly};
use crate::{
    cli::{CleanupArgs, Cli},
    datapath::pins::PinLayout,
    flannel::config::NetworkConfig,
};

pub async fn cleanup(cli: &Cli, args: &CleanupArgs) -> Result<()> {
    let layout = PinLayout::chosen(cli.bpf_pin_dir.as_deref());
    // The network config's VNI names the device when neither the pins nor
    // --vni do: the net-conf file in Kubernetes mode, else ask etcd, briefly.
    let config_vni = match args.vni {
        Some(_) => None,
        None if cli.kube_subnet_mgr => std::fs::read(cli.kube_options().net_config_path)
            .ok()
            .and_then(|t| NetworkConfig::parse_kube(&t).ok())
            .map(|c| c.backend.vni),
        None => {
            async {
                let reg = connect_briefly(cli).await.ok()?;
                let config = briefly(reg.get_config()).await.ok()??;
                Some(config.backend.vni)
            }
            .await
        }
    };
    let opts = crate::cleanup::Options {
        vni: args.vni,
        config_vni,
        force: args.force,
    };
    let removed = crate::cleanup::run(&layout, &opts)
        .await
        .context("cleaning up")?;
    if removed.is_empty() {
        println!("nothing to remove");
    }
    for r in &removed {
        println!("removed {r}");
    }
    Ok(())
}

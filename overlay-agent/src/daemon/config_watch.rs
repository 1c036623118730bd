//! Notices a network config changed or deleted in etcd while the agent runs:
//! the agent keeps the one it started with (as flanneld does) and says so
//! once per new value, and that a restart applies it.

use std::time::Duration;

use crate::{flannel::config::NetworkConfig, subnet::etcd::Registry};

pub struct ConfigWatch {
    seen: Option<Vec<u8>>,
}

impl ConfigWatch {
    /// Reads the config every 10 s (one small get) until aborted; meant for
    /// a task of its own, so a slow etcd never holds up the lease events.
    pub async fn run(reg: Registry) {
        let mut watch = ConfigWatch {
            seen: reg.get_config_raw().await.ok().flatten(),
        };
        let mut tick = tokio::time::interval(Duration::from_secs(10));
        tick.tick().await;
        loop {
            tick.tick().await;
            watch.check(&reg).await;
        }
    }

    async fn check(&mut self, reg: &Registry) {
        let Ok(now) = reg.get_config_raw().await else {
            return;
        };
        if now == self.seen {
            return;
        }
        match &now {
            None => log::warn!(
                "the network config was deleted from etcd ({}); this agent keeps running with the one it started with",
                reg.config_key()
            ),
            Some(raw) => match NetworkConfig::parse(raw) {
                Ok(c) => log::warn!(
                    "the network config in etcd changed (Network {}, SubnetLen {}, VNI {}); this agent keeps running with the one it started with: restart it to apply the new one",
                    c.network,
                    c.subnet_len,
                    c.backend.vni
                ),
                Err(e) => log::warn!(
                    "the network config in etcd changed and is invalid ({e}); this agent keeps running with the one it started with"
                ),
            },
        }
        self.seen = now;
    }
}

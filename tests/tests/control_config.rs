//! The network config read from a real etcd (no root needed): the agent
//! waits while `<prefix>/config` does not exist, and a malformed config is a
//! permanent error naming the key and the field. (Every default and
//! validation rule is unit-tested in overlay-agent's `config` module.)

use std::time::{Duration, Instant};

use overlay_agent::{
    flannel::config::ConfigError,
    subnet::etcd::{EtcdError, Registry},
};
use overlay_tests::etcd::Etcd;

#[tokio::test]
async fn waits_for_the_config_key_then_applies_defaults() {
    let etcd = Etcd::start().unwrap();
    let reg = Registry::connect(&etcd.options("/my/net")).await.unwrap();
    assert!(reg.get_config().await.unwrap().is_none());
    let waiting = tokio::spawn(async move {
        let t0 = Instant::now();
        let c = reg.wait_config(Duration::from_millis(100)).await;
        (c, t0.elapsed())
    });
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(!waiting.is_finished(), "must wait while the key is missing");
    etcd.put(
        "/my/net/config",
        r#"{"Network": "10.0.0.0/16", "SubnetLen": 24, "SubnetMin": "10.0.1.0","SubnetMax": "10.0.20.0", "Backend": {"Type": "vxlan"}}"#,
    )
    .unwrap();
    let (c, waited) = tokio::time::timeout(Duration::from_secs(2), waiting)
        .await
        .expect("config seen")
        .unwrap();
    let c = c.unwrap();
    assert!(waited >= Duration::from_millis(800));
    assert_eq!(c.subnet_count(), 20);
    assert_eq!(c.backend.vni, 1);
    assert_eq!(c.backend.dst_port(), 8472);
}

#[tokio::test]
async fn malformed_config_is_a_permanent_error_naming_key_and_field() {
    let etcd = Etcd::start().unwrap();
    let reg = Registry::connect(&etcd.options("/coreos.com/network"))
        .await
        .unwrap();
    for (value, field) in [
        (
            r#"{"Network":"10.0.0.0/16","SubnetLen":31,"Backend":{"Type":"vxlan"}}"#,
            Some("SubnetLen"),
        ),
        (
            r#"{"Network":"10.0.0.0/16","Backend":{"Type":"host-gw"}}"#,
            Some("Backend.Type"),
        ),
        (
            r#"{"Network":"10.0.0.0/16","SubnetMin":"10.0.1.7","Backend":{"Type":"vxlan"}}"#,
            Some("SubnetMin"),
        ),
        (
            r#"{"Network":"10.0.0.0/16","Backend":{"Type":"vxlan","VNI":"one"}}"#,
            Some("Backend.VNI"),
        ),
        (r#"{"Network":"10.0.0.0/16","#, None),
    ] {
        etcd.put("/coreos.com/network/config", value).unwrap();
        let e = tokio::time::timeout(
            Duration::from_secs(2),
            reg.wait_config(Duration::from_millis(100)),
        )
        .await
        .expect("a malformed config is not waited on")
        .unwrap_err();
        assert!(!e.is_transient());
        let msg = e.to_string();
        assert!(msg.contains("/coreos.com/network/config"), "{msg}");
        match (&e, field) {
            (
                EtcdError::Config {
                    source: ConfigError::Field { field: f, .. },
                    ..
                },
                Some(want),
            ) => {
                assert_eq!(*f, want, "{msg}");
                assert!(msg.contains(want), "{msg}");
            }
            (
                EtcdError::Config {
                    source: ConfigError::Document(_),
                    ..
                },
                None,
            ) => {
                assert!(msg.contains("JSON"), "{msg}");
            }
            _ => panic!("unexpected error for {value}: {msg}"),
        }
    }
}

//! Subnet leases against a real etcd on loopback (no root needed): racing
//! acquirers, reuse after restart, reservations, renewal at the margin, and
//! re-acquisition when our key disappears.

use std::{
    collections::BTreeSet,
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use ipnet::Ipv4Net;
use overlay_agent::{
    flannel::config::NetworkConfig,
    flannel::lease,
    flannel::mac::MacAddr,
    subnet::alloc::{AllocError, Choice},
    subnet::etcd::{
        Registry,
        own::{self, AcquireError, Keeper, LeaseTiming, NodeIdentity, OwnLease, Renewal},
    },
};
use overlay_tests::etcd::Etcd;

const PREFIX: &str = "/coreos.com/network";

fn net(s: &str) -> Ipv4Net {
    s.parse().unwrap()
}

fn node(i: u8) -> NodeIdentity {
    let public_ip = Ipv4Addr::new(192, 168, 205, 10 + i);
    NodeIdentity {
        public_ip,
        vni: 1,
        vtep_mac: MacAddr::stable_for(public_ip, 1),
        ipv6: None,
    }
}

async fn setup(config: &str) -> (Etcd, Registry, NetworkConfig) {
    let etcd = Etcd::start().unwrap();
    etcd.put(&format!("{PREFIX}/config"), config).unwrap();
    let reg = Registry::connect(&etcd.options(PREFIX)).await.unwrap();
    let cfg = reg.get_config().await.unwrap().unwrap();
    (etcd, reg, cfg)
}

/// Every key under the subnets prefix, as etcd holds them now.
async fn keys(reg: &Registry) -> Vec<String> {
    reg.list()
        .await
        .unwrap()
        .entries
        .into_iter()
        .map(|e| e.key)
        .collect()
}

/// The lease id attached to a key (0: none), read from etcd.
async fn lease_of(reg: &Registry, subnet: Ipv4Net) -> Option<i64> {
    reg.get_lease(subnet).await.unwrap().map(|e| e.lease_id)
}

#[tokio::test]
async fn racing_acquirers_all_get_distinct_subnets() {
    // Eight subnets, eight nodes that all remember the same subnet: they race
    // for 10.0.1.0/24 and the losers must retry (flannel gives up there).
    let (_etcd, reg, cfg) = setup(
        r#"{"Network":"10.0.0.0/16","SubnetMin":"10.0.1.0","SubnetMax":"10.0.8.0","Backend":{"Type":"vxlan"}}"#,
    )
    .await;
    let timing = LeaseTiming::default();
    let tasks: Vec<_> = (0..8u8)
        .map(|i| {
            let reg = reg.clone();
            let cfg = cfg.clone();
            tokio::spawn(async move {
                own::acquire(&reg, &cfg, &node(i), Some(net("10.0.1.0/24")), &timing).await
            })
        })
        .collect();
    let mut subnets = BTreeSet::new();
    let mut previous_won = 0;
    for t in tasks {
        let l = t.await.unwrap().expect("every node gets a subnet");
        if l.choice == Choice::Previous(net("10.0.1.0/24")) {
            previous_won += 1;
        }
        assert!(cfg.fits(l.subnet));
        // The key holds exactly what this node published.
        let e = reg.get_lease(l.subnet).await.unwrap().unwrap();
        assert_eq!(e.value, l.value.as_bytes());
        assert_ne!(e.lease_id, 0);
        subnets.insert(l.subnet);
    }
    assert_eq!(subnets.len(), 8, "distinct subnets: {subnets:?}");
    assert_eq!(
        previous_won, 1,
        "exactly one node got the remembered subnet"
    );

    // A ninth node finds the space exhausted and says so.
    match own::acquire(&reg, &cfg, &node(9), None, &timing).await {
        Err(AcquireError::Alloc(AllocError::Exhausted { total: 8, .. })) => {}
        other => panic!("expected exhaustion, got {other:?}"),
    }
}

#[tokio::test]
async fn racing_dual_stack_acquirers_get_distinct_subnets_of_both_families() {
    // A dual-stack key names both halves, so a create that compares only
    // its own key lets two nodes hold one IPv4 subnet (with different IPv6
    // halves), or one IPv6 subnet (with different IPv4 halves). Eight
    // nodes, eight subnets of each family, all remembering 10.0.1.0/24:
    // collisions on both halves are all but certain.
    let (_etcd, reg, cfg) = setup(
        r#"{"Network":"10.0.0.0/16","SubnetMin":"10.0.1.0","SubnetMax":"10.0.8.0","EnableIPv6":true,"IPv6Network":"fd10::/48","IPv6SubnetLen":64,"IPv6SubnetMin":"fd10:0:0:1::","IPv6SubnetMax":"fd10:0:0:8::","Backend":{"Type":"vxlan"}}"#,
    )
    .await;
    let timing = LeaseTiming::default();
    for round in 0..3 {
        let tasks: Vec<_> = (0..8u8)
            .map(|i| {
                let reg = reg.clone();
                let cfg = cfg.clone();
                let mut n = node(i);
                n.ipv6 = Some(own::NodeIpv6 {
                    public_ip: format!("fd98::{}", i + 1).parse().unwrap(),
                    vtep_mac: MacAddr::stable_for(n.public_ip, 2),
                });
                tokio::spawn(async move {
                    own::acquire(&reg, &cfg, &n, Some(net("10.0.1.0/24")), &timing).await
                })
            })
            .collect();
        let mut won = Vec::new();
        for t in tasks {
            match t.await.unwrap() {
                Ok(l) => won.push(l),
                Err(e) => {
                    let keys = keys(&reg).await;
                    panic!("round {round}: a node got no subnet: {e}; keys now {keys:?}");
                }
            }
        }
        let keys = keys(&reg).await;
        let v4: BTreeSet<Ipv4Net> = won.iter().map(|l| l.subnet).collect();
        let v6: BTreeSet<_> = won.iter().map(|l| l.ipv6_subnet.unwrap()).collect();
        assert_eq!(
            v4.len(),
            8,
            "round {round}: IPv4 halves {v4:?}, keys {keys:?}"
        );
        assert_eq!(
            v6.len(),
            8,
            "round {round}: IPv6 halves {v6:?}, keys {keys:?}"
        );
        // Nothing left behind by the losers: one key per node.
        assert_eq!(keys.len(), 8, "round {round}: keys {keys:?}");
        for l in &won {
            let e = reg.get_lease(l.subnets()).await.unwrap().unwrap();
            assert_eq!(e.value, l.value.as_bytes());
        }
        for l in &won {
            assert!(
                reg.delete_if_unchanged(l.subnets(), l.mod_revision)
                    .await
                    .unwrap(),
                "round {round}: {} changed after it was won",
                l.subnets()
            );
        }
    }
}

#[tokio::test]
async fn restart_reuses_subnet_and_vtep_mac() {
    let (_etcd, reg, cfg) =
        setup(r#"{"Network":"10.0.0.0/16","Backend":{"Type":"vxlan","VNI":1}}"#).await;
    let timing = LeaseTiming::default();
    let first = own::acquire(&reg, &cfg, &node(0), None, &timing)
        .await
        .unwrap();
    assert!(matches!(first.choice, Choice::Random(_)));
    assert_eq!(
        first.value,
        format!(
            r#"{{"PublicIP":"192.168.205.10","PublicIPv6":null,"BackendType":"vxlan","BackendData":{{"VNI":1,"VtepMAC":"{}"}}}}"#,
            node(0).vtep_mac
        )
    );
    // "Restart" with a different MAC on hand: the lease's MAC is kept so
    // peers' neighbour and FDB entries stay valid; a different remembered
    // subnet does not win over the lease carrying our PublicIP.
    let other_mac: MacAddr = "02:00:00:00:00:99".parse().unwrap();
    let again = own::acquire(
        &reg,
        &cfg,
        &NodeIdentity {
            vtep_mac: other_mac,
            ..node(0)
        },
        Some(net("10.0.77.0/24")),
        &timing,
    )
    .await
    .unwrap();
    assert_eq!(again.subnet, first.subnet);
    assert_eq!(again.vtep_mac, first.vtep_mac);
    assert_eq!(again.value, first.value);
    assert_eq!(
        again.choice,
        Choice::Reuse {
            subnet: first.subnet,
            reservation: false
        }
    );
    assert_ne!(lease_of(&reg, again.subnet).await, Some(0));
}

#[tokio::test]
async fn restart_without_lease_uses_subnet_env_subnet() {
    let (_etcd, reg, cfg) = setup(r#"{"Network":"10.0.0.0/16","Backend":{"Type":"vxlan"}}"#).await;
    let l = own::acquire(
        &reg,
        &cfg,
        &node(0),
        Some(net("10.0.42.0/24")),
        &LeaseTiming::default(),
    )
    .await
    .unwrap();
    assert_eq!(l.choice, Choice::Previous(net("10.0.42.0/24")));
}

#[tokio::test]
async fn reservation_stays_a_reservation_across_acquire_and_renewal() {
    let (etcd, reg, cfg) = setup(r#"{"Network":"10.0.0.0/16","Backend":{"Type":"vxlan"}}"#).await;
    // An operator reserves 10.0.7.0/24 for 192.168.205.10: a key without a lease.
    let key = format!("{PREFIX}/subnets/10.0.7.0-24");
    etcd.put(
        &key,
        r#"{"PublicIP":"192.168.205.10","BackendType":"vxlan","BackendData":{"VtepMAC":"02:aa:bb:cc:dd:ee"}}"#,
    )
    .unwrap();
    let timing = LeaseTiming {
        ttl: Duration::from_secs(4),
        renew_margin: Duration::from_secs(3),
        retry: Duration::from_secs(1),
    };
    let mut l = own::acquire(&reg, &cfg, &node(0), None, &timing)
        .await
        .unwrap();
    assert_eq!(l.subnet, net("10.0.7.0/24"));
    assert!(l.is_reservation());
    assert_eq!(l.vtep_mac.to_string(), "02:aa:bb:cc:dd:ee");
    assert_eq!(lease_of(&reg, l.subnet).await, Some(0));
    // Our value replaced the operator's (now with VNI and PublicIPv6).
    assert_eq!(etcd.get(&key).unwrap().unwrap(), l.value);

    assert_eq!(
        own::renew(&reg, &mut l, &timing).await.unwrap(),
        Renewal::Renewed
    );
    assert_eq!(lease_of(&reg, l.subnet).await, Some(0));
    // Well past what a TTL would have been: still there.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(lease_of(&reg, l.subnet).await, Some(0));
    assert!(l.is_reservation());
}

#[tokio::test]
async fn keeper_renews_at_the_margin_with_a_short_ttl() {
    let (_etcd, reg, cfg) = setup(r#"{"Network":"10.0.0.0/16","Backend":{"Type":"vxlan"}}"#).await;
    // TTL 4 s, renewed 2.5 s before expiry: every 1.5 s.
    let timing = LeaseTiming {
        ttl: Duration::from_secs(4),
        renew_margin: Duration::from_millis(2500),
        retry: Duration::from_millis(500),
    };
    let l = own::acquire(&reg, &cfg, &node(0), None, &timing)
        .await
        .unwrap();
    let first_lease = l.lease_id;
    let subnet = l.subnet;
    let (tx, mut rx) = tokio::sync::watch::channel(l.clone());
    let keeper = Keeper {
        reg: reg.clone(),
        config: cfg.clone(),
        node: node(0),
        timing,
    };
    let task = tokio::spawn(async move { keeper.run(l, tx).await });

    // The first renewal comes at about TTL - margin = 1.5 s.
    let t0 = Instant::now();
    tokio::time::timeout(Duration::from_secs(3), rx.changed())
        .await
        .expect("a renewal within 3 s")
        .unwrap();
    let at = t0.elapsed();
    assert!(
        at >= Duration::from_millis(1000) && at <= Duration::from_millis(2500),
        "renewed after {at:?}, expected about 1.5 s"
    );
    let renewed = rx.borrow_and_update().clone();
    assert_eq!(renewed.subnet, subnet);
    assert_ne!(
        renewed.lease_id, first_lease,
        "renewal grants a fresh lease"
    );
    assert_eq!(lease_of(&reg, subnet).await, Some(renewed.lease_id));

    // Three TTLs later the key is still there: renewals keep it alive.
    tokio::time::sleep(Duration::from_secs(12)).await;
    let e = reg
        .get_lease(subnet)
        .await
        .unwrap()
        .expect("key kept alive");
    assert_eq!(e.value, renewed.value.as_bytes());
    assert!(!task.is_finished());
    task.abort();

    // Without the keeper it expires.
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert!(reg.get_lease(subnet).await.unwrap().is_none(), "expired");
}

#[tokio::test]
async fn own_key_deleted_or_taken_over_is_taken_back() {
    let (etcd, reg, cfg) = setup(r#"{"Network":"10.0.0.0/16","Backend":{"Type":"vxlan"}}"#).await;
    let timing = LeaseTiming::default();
    let l = own::acquire(&reg, &cfg, &node(0), None, &timing)
        .await
        .unwrap();
    let subnet = l.subnet;
    let (tx, mut rx) = tokio::sync::watch::channel(l.clone());
    let keeper = Keeper {
        reg: reg.clone(),
        config: cfg.clone(),
        node: node(0),
        timing,
    };
    let task = tokio::spawn(async move { keeper.run(l, tx).await });
    // Let the keeper's watch start.
    tokio::time::sleep(Duration::from_millis(500)).await;

    etcd.delete(&lease::lease_key(PREFIX, subnet)).unwrap();
    let t0 = Instant::now();
    tokio::time::timeout(Duration::from_secs(1), rx.changed())
        .await
        .expect("re-acquired within a second")
        .unwrap();
    let again: OwnLease = rx.borrow_and_update().clone();
    assert!(t0.elapsed() < Duration::from_secs(1));
    assert_eq!(again.subnet, subnet, "the same subnet, still free");
    assert_eq!(again.conflict, None);
    let e = reg.get_lease(subnet).await.unwrap().expect("key back");
    assert_eq!(e.value, again.value.as_bytes());

    // Taken over by another node (its value written over ours): we keep
    // the subnet, report the conflict, and leave its key alone...
    let key = lease::lease_key(PREFIX, subnet);
    etcd.put(
        &key,
        r#"{"PublicIP":"192.168.205.99","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"02:00:00:00:00:01"}}"#,
    )
    .unwrap();
    let conflict = tokio::time::timeout(Duration::from_secs(3), async {
        loop {
            rx.changed().await.unwrap();
            let l = rx.borrow_and_update().clone();
            if l.conflict.is_some() {
                return l;
            }
        }
    })
    .await
    .expect("a conflict reported");
    assert_eq!(conflict.subnet, subnet, "never another subnet");
    assert!(conflict.conflict.unwrap().contains("192.168.205.99"));
    assert!(etcd.get(&key).unwrap().unwrap().contains("192.168.205.99"));
    // ...until it is freed: then the key is ours again.
    etcd.delete(&key).unwrap();
    let back = tokio::time::timeout(Duration::from_secs(3), async {
        loop {
            rx.changed().await.unwrap();
            let l = rx.borrow_and_update().clone();
            if l.conflict.is_none() {
                return l;
            }
        }
    })
    .await
    .expect("taken back");
    assert_eq!(back.subnet, subnet);
    let e = reg.get_lease(subnet).await.unwrap().expect("key back");
    assert_eq!(e.value, back.value.as_bytes());
    task.abort();
}

#[tokio::test]
async fn keeper_notices_a_deletion_from_before_it_started() {
    let (etcd, reg, cfg) = setup(r#"{"Network":"10.0.0.0/16","Backend":{"Type":"vxlan"}}"#).await;
    let timing = LeaseTiming::default();
    let l = own::acquire(&reg, &cfg, &node(0), None, &timing)
        .await
        .unwrap();
    let subnet = l.subnet;
    // Deleted while the agent was still setting up its datapath.
    etcd.delete(&lease::lease_key(PREFIX, subnet)).unwrap();
    let (tx, mut rx) = tokio::sync::watch::channel(l.clone());
    let keeper = Keeper {
        reg: reg.clone(),
        config: cfg.clone(),
        node: node(0),
        timing,
    };
    let task = tokio::spawn(async move { keeper.run(l, tx).await });
    tokio::time::timeout(Duration::from_secs(2), rx.changed())
        .await
        .expect("re-acquired")
        .unwrap();
    assert_eq!(rx.borrow().subnet, subnet);
    assert!(reg.get_lease(subnet).await.unwrap().is_some());
    task.abort();
}

//! Watching `<prefix>/subnets/` against a real etcd on loopback (no root
//! needed): changes within a second, lease expiry as deletion, compaction
//! handled by a re-list, one lease key's watch (the lease keeper's) seeing
//! that key alone, and the watch surviving etcd restarts and the loss
//! of a cluster member.

use std::time::{Duration, Instant};

use overlay_agent::subnet::etcd::{
    Registry,
    watch::{LeaseWatcher, WatchEvent},
};
use overlay_tests::etcd::{Etcd, EtcdSpec};

const PREFIX: &str = "/coreos.com/network";
const LEASE_A: &str = r#"{"PublicIP":"192.168.205.11","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"02:00:00:00:00:0b"}}"#;
const LEASE_B: &str = r#"{"PublicIP":"192.168.205.12","BackendType":"vxlan","BackendData":{"VtepMAC":"02:00:00:00:00:0c"}}"#;

fn key(s: &str) -> String {
    format!("{PREFIX}/subnets/{s}")
}

async fn watcher(etcd: &Etcd) -> (Registry, LeaseWatcher) {
    let reg = Registry::connect(&etcd.options(PREFIX)).await.unwrap();
    let snap = reg.list().await.unwrap();
    let w = LeaseWatcher::new(reg.clone(), snap.revision);
    (reg, w)
}

/// The next batch, or a panic naming what we waited for.
async fn next_within(w: &mut LeaseWatcher, limit: Duration, what: &str) -> Vec<WatchEvent> {
    tokio::time::timeout(limit, w.next())
        .await
        .unwrap_or_else(|_| panic!("no watch event within {limit:?}: {what}"))
        .unwrap_or_else(|e| panic!("the watch gave up: {e}"))
}

fn put_key(events: &[WatchEvent]) -> Vec<(String, String)> {
    events
        .iter()
        .filter_map(|e| match e {
            WatchEvent::Put(e) => Some((e.key.clone(), String::from_utf8_lossy(&e.value).into())),
            _ => None,
        })
        .collect()
}

#[tokio::test]
async fn peer_added_and_removed_seen_within_a_second() {
    let etcd = Etcd::start().unwrap();
    let (_reg, mut w) = watcher(&etcd).await;
    // Let the watch open before the change, as a running agent's is.
    let first = tokio::spawn(async move {
        let ev = w.next().await.unwrap();
        (w, ev, Instant::now())
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let t0 = Instant::now();
    etcd.put(&key("10.0.14.0-24"), LEASE_A).unwrap();
    let (mut w, ev, at) = tokio::time::timeout(Duration::from_secs(1), first)
        .await
        .expect("put seen within a second")
        .unwrap();
    assert!(at - t0 < Duration::from_secs(1));
    assert_eq!(
        put_key(&ev),
        vec![(key("10.0.14.0-24"), LEASE_A.to_owned())]
    );

    etcd.delete(&key("10.0.14.0-24")).unwrap();
    let ev = next_within(&mut w, Duration::from_secs(1), "delete").await;
    assert_eq!(
        ev,
        vec![WatchEvent::Delete {
            key: key("10.0.14.0-24")
        }]
    );
}

#[tokio::test]
async fn lease_expiry_is_a_delete() {
    let etcd = Etcd::start().unwrap();
    let (_reg, mut w) = watcher(&etcd).await;
    let out = etcd.etcdctl(&["lease", "grant", "2"]).unwrap();
    // "lease 694d7a5c8e6a1a0b granted with TTL(2s)"
    let id = out.split_whitespace().nth(1).unwrap().to_owned();
    etcd.etcdctl(&[
        "put",
        &format!("--lease={id}"),
        &key("10.0.15.0-24"),
        LEASE_B,
    ])
    .unwrap();
    let ev = next_within(&mut w, Duration::from_secs(1), "put with lease").await;
    assert_eq!(put_key(&ev).len(), 1);
    let ev = next_within(&mut w, Duration::from_secs(5), "expiry").await;
    assert_eq!(
        ev,
        vec![WatchEvent::Delete {
            key: key("10.0.15.0-24")
        }]
    );
}

#[tokio::test]
async fn compaction_past_our_revision_gives_a_full_relist() {
    let etcd = Etcd::start().unwrap();
    etcd.put(&key("10.0.14.0-24"), LEASE_A).unwrap();
    let (reg, mut w) = watcher(&etcd).await;
    // While we are not watching: one peer leaves, another joins, and etcd
    // compacts its history past the revision we would resume from.
    etcd.delete(&key("10.0.14.0-24")).unwrap();
    etcd.put(&key("10.0.16.0-24"), LEASE_B).unwrap();
    etcd.put("/unrelated", "x").unwrap();
    let rev = reg.list().await.unwrap().revision;
    etcd.etcdctl(&["compact", &rev.to_string()]).unwrap();

    let ev = next_within(&mut w, Duration::from_secs(3), "re-list").await;
    let [WatchEvent::Reset(snap)] = ev.as_slice() else {
        panic!("expected one Reset, got {ev:?}");
    };
    let keys: Vec<&str> = snap.entries.iter().map(|e| e.key.as_str()).collect();
    assert_eq!(keys, vec![key("10.0.16.0-24").as_str()]);
    assert!(snap.revision >= rev);
    assert_eq!(w.next_revision(), snap.revision + 1);

    // And it keeps watching from there.
    let watching = tokio::spawn(async move { w.next().await.unwrap() });
    tokio::time::sleep(Duration::from_millis(300)).await;
    etcd.put(&key("10.0.17.0-24"), LEASE_A).unwrap();
    let ev = tokio::time::timeout(Duration::from_secs(1), watching)
        .await
        .expect("event after re-list")
        .unwrap();
    assert_eq!(
        put_key(&ev),
        vec![(key("10.0.17.0-24"), LEASE_A.to_owned())]
    );
}

#[tokio::test]
async fn a_lease_key_watch_sees_its_key_alone_and_relists_it_alone() {
    let etcd = Etcd::start().unwrap();
    let reg = Registry::connect(&etcd.options(PREFIX)).await.unwrap();
    let own: ipnet::Ipv4Net = "10.0.14.0/24".parse().unwrap();
    etcd.put(&key("10.0.14.0-24"), LEASE_A).unwrap();
    let snap = reg.lease_snapshot(own).await.unwrap();
    assert_eq!(snap.entries.len(), 1, "{snap:?}");
    let mut w = LeaseWatcher::lease_key(reg.clone(), own, snap.revision);

    // Other keys under the prefix (a peer joining, one with our subnet as a
    // prefix of its key) wake nothing; then our key's deletion arrives alone.
    etcd.put(&key("10.0.16.0-24"), LEASE_B).unwrap();
    etcd.put(&key("10.0.14.0-240"), LEASE_B).unwrap();
    etcd.delete(&key("10.0.14.0-24")).unwrap();
    let ev = next_within(&mut w, Duration::from_secs(2), "our key's delete").await;
    assert_eq!(
        ev,
        vec![WatchEvent::Delete {
            key: key("10.0.14.0-24")
        }]
    );

    // Compacted past its revision: the re-list holds our key alone.
    etcd.put(&key("10.0.14.0-24"), LEASE_B).unwrap();
    etcd.put(&key("10.0.17.0-24"), LEASE_A).unwrap();
    let rev = reg.list().await.unwrap().revision;
    etcd.etcdctl(&["compact", &rev.to_string()]).unwrap();
    let mut w = LeaseWatcher::lease_key(reg.clone(), own, snap.revision);
    let ev = next_within(&mut w, Duration::from_secs(3), "re-list").await;
    let [WatchEvent::Reset(listed)] = ev.as_slice() else {
        panic!("expected one Reset, got {ev:?}");
    };
    let keys: Vec<&str> = listed.entries.iter().map(|e| e.key.as_str()).collect();
    assert_eq!(keys, vec![key("10.0.14.0-24").as_str()]);
    assert_eq!(listed.entries[0].value, LEASE_B.as_bytes());
    assert_eq!(w.next_revision(), listed.revision + 1);

    // A peer's change after the re-list wakes nothing either; ours does.
    let watching = tokio::spawn(async move { w.next().await.unwrap() });
    tokio::time::sleep(Duration::from_millis(300)).await;
    etcd.put(&key("10.0.18.0-24"), LEASE_A).unwrap();
    etcd.put(&key("10.0.14.0-24"), LEASE_A).unwrap();
    let ev = tokio::time::timeout(Duration::from_secs(1), watching)
        .await
        .expect("our put after the re-list")
        .unwrap();
    assert_eq!(
        put_key(&ev),
        vec![(key("10.0.14.0-24"), LEASE_A.to_owned())]
    );
}

#[tokio::test]
async fn watch_resumes_after_etcd_restarts() {
    let mut etcd = Etcd::start().unwrap();
    let (_reg, mut w) = watcher(&etcd).await;
    etcd.put(&key("10.0.14.0-24"), LEASE_A).unwrap();
    next_within(&mut w, Duration::from_secs(1), "first put").await;

    let watching = tokio::spawn(async move {
        let ev = w.next().await.unwrap();
        (w, ev)
    });
    etcd.stop().unwrap();
    // etcd is away for three seconds; the watcher retries with backoff.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(!watching.is_finished(), "no events while etcd is down");
    etcd.start_again().unwrap();
    etcd.put(&key("10.0.15.0-24"), LEASE_B).unwrap();
    let t0 = Instant::now();
    let (_w, ev) = tokio::time::timeout(Duration::from_secs(10), watching)
        .await
        .expect("watch resumed after etcd came back")
        .unwrap();
    assert_eq!(
        put_key(&ev),
        vec![(key("10.0.15.0-24"), LEASE_B.to_owned())]
    );
    eprintln!("resumed {:?} after the put", t0.elapsed());
}

#[tokio::test]
async fn watch_carries_on_when_a_cluster_member_dies() {
    let mut etcd = Etcd::start_with(EtcdSpec {
        members: 3,
        ..EtcdSpec::default()
    })
    .unwrap();
    let (reg, mut w) = watcher(&etcd).await;
    etcd.put(&key("10.0.14.0-24"), LEASE_A).unwrap();
    next_within(&mut w, Duration::from_secs(2), "first put").await;

    // Kill each member in turn (restarting the previous one), so whichever
    // member the client was using dies at some point.
    for i in 0..3 {
        etcd.kill_member(i).unwrap();
        let k = key(&format!("10.0.{}.0-24", 20 + i));
        // The remaining two still form a quorum (after an election, if the
        // leader died: retry the test's own write until it lands).
        let deadline = Instant::now() + Duration::from_secs(10);
        while let Err(e) = etcd.put(&k, LEASE_B) {
            assert!(Instant::now() < deadline, "cluster unusable: {e}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        // A write retried by etcdctl may show up twice: wait for ours.
        tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                let ev = w.next().await.unwrap();
                if put_key(&ev)
                    .iter()
                    .any(|(key, v)| *key == k && v == LEASE_B)
                {
                    return;
                }
            }
        })
        .await
        .unwrap_or_else(|_| panic!("no event for {k} within 10 s with member {i} down"));
        // Requests work too.
        if let Err(e) = reg.list().await {
            panic!("list with member {i} down: {e:?}");
        }
        etcd.restart_member(i).unwrap();
    }
}

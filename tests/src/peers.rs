//! Many flannel-format leases of other nodes, written to etcd in
//! transactions: the scale test and `cargo xtask cpbench` program thousands
//! of peers and must not spend their time starting etcdctl.
//!
//! Peer `i` gets subnet `10.(1 + i / 256).(i % 256).0/24`, a PublicIP in
//! 100.64.0.0/10 and a locally administered unicast VtepMAC, all distinct,
//! for `i` below [`MAX`]. They stay below 10.200.0.0, where [`config`] lets
//! the agent under test take its own subnet.

use std::net::Ipv4Addr;

use anyhow::{Context, Result, ensure};
use etcd_client::{Client, PutOptions, Txn, TxnOp};
use ipnet::Ipv4Net;

/// Where the leases live (flannel's default `--etcd-prefix`).
pub const PREFIX: &str = "/coreos.com/network";

/// How many distinct peers [`subnet`] can name below 10.200.0.0.
pub const MAX: usize = 199 * 256;

/// Operations per transaction: etcd's default `--max-txn-ops`.
pub const TXN_OPS: usize = 128;

/// A network config with room for [`MAX`] peers, the agent's own subnet
/// taken from 10.200.0.0 and up.
pub fn config() -> String {
    r#"{"Network": "10.0.0.0/8", "SubnetLen": 24, "SubnetMin": "10.200.0.0", "SubnetMax": "10.255.255.0", "Backend": {"Type": "vxlan"}}"#
        .to_owned()
}

pub fn subnet(i: usize) -> Ipv4Net {
    assert!(i < MAX, "peer {i} is beyond the {MAX} this lab can name");
    let ip = Ipv4Addr::new(10, (1 + i / 256) as u8, (i % 256) as u8, 0);
    Ipv4Net::new(ip, 24).expect("a /24")
}

pub fn public_ip(i: usize) -> Ipv4Addr {
    // 250 hosts per /24, skipping .0 and .255.
    let (block, host) = (i / 250, i % 250 + 1);
    Ipv4Addr::new(
        100,
        64 + (block / 256) as u8,
        (block % 256) as u8,
        host as u8,
    )
}

pub fn vtep_mac(i: usize) -> String {
    format!(
        "0a:00:00:{:02x}:{:02x}:{:02x}",
        (i >> 16) & 0xff,
        (i >> 8) & 0xff,
        i & 0xff
    )
}

/// `<PREFIX>/subnets/10.x.y.0-24`.
pub fn key(i: usize) -> String {
    let s = subnet(i);
    format!("{PREFIX}/subnets/{}-{}", s.addr(), s.prefix_len())
}

/// The lease value flanneld writes for a vxlan node.
pub fn value(i: usize) -> String {
    format!(
        r#"{{"PublicIP":"{}","PublicIPv6":null,"BackendType":"vxlan","BackendData":{{"VNI":1,"VtepMAC":"{}"}}}}"#,
        public_ip(i),
        vtep_mac(i)
    )
}

/// An etcd lease (the kind a node's key is attached to) long enough to
/// outlive any run; its id for [`put`].
pub async fn grant(client: &mut Client) -> Result<i64> {
    let resp = client
        .lease_grant(3600, None)
        .await
        .context("granting an etcd lease")?;
    Ok(resp.id())
}

/// Writes peers `indices` attached to `lease_id`, [`TXN_OPS`] per
/// transaction; the revision of the last one.
pub async fn put(
    client: &mut Client,
    indices: impl IntoIterator<Item = usize>,
    lease_id: i64,
) -> Result<i64> {
    let ops = indices.into_iter().map(|i| {
        TxnOp::put(
            key(i),
            value(i),
            Some(PutOptions::new().with_lease(lease_id)),
        )
    });
    commit(client, ops).await
}

/// Deletes peers `indices`, [`TXN_OPS`] per transaction; the last revision.
pub async fn delete(client: &mut Client, indices: impl IntoIterator<Item = usize>) -> Result<i64> {
    let ops = indices.into_iter().map(|i| TxnOp::delete(key(i), None));
    commit(client, ops).await
}

/// Compacts etcd's history up to its current revision (past every watch
/// that started earlier).
pub async fn compact(client: &mut Client) -> Result<()> {
    let rev = client
        .get("/", None)
        .await
        .context("reading the revision")?
        .header()
        .map_or(0, |h| h.revision());
    client.compact(rev, None).await.context("compacting")?;
    Ok(())
}

async fn commit(client: &mut Client, ops: impl Iterator<Item = TxnOp>) -> Result<i64> {
    let ops: Vec<TxnOp> = ops.collect();
    let mut revision = 0;
    for chunk in ops.chunks(TXN_OPS) {
        let resp = client
            .txn(Txn::new().and_then(chunk.to_vec()))
            .await
            .context("writing leases")?;
        ensure!(resp.succeeded(), "an unconditional transaction failed");
        revision = resp.header().map_or(0, |h| h.revision());
    }
    Ok(revision)
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    #[test]
    fn every_peer_is_distinct_and_outside_the_agents_range() {
        let n = 12_000;
        let subnets: HashSet<_> = (0..n).map(subnet).collect();
        let ips: HashSet<_> = (0..n).map(public_ip).collect();
        let macs: HashSet<_> = (0..n).map(vtep_mac).collect();
        assert_eq!((subnets.len(), ips.len(), macs.len()), (n, n, n));
        let own: Ipv4Net = "10.200.0.0/13".parse().unwrap();
        assert!(subnets.iter().all(|s| !own.contains(s)));
        assert!(
            ips.iter()
                .all(|ip| ip.octets()[3] != 0 && ip.octets()[3] != 255)
        );
        assert_eq!(key(257), "/coreos.com/network/subnets/10.2.1.0-24");
    }
}

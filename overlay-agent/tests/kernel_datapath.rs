//! The kernel datapath in two network namespaces joined by a veth pair, each
//! with a container namespace behind it: what it programs, read back with
//! iproute2, and traffic across it. Also adoption and re-creation of an
//! existing device, and peer updates (MAC / public IP changes) and removal.

mod common;

use anyhow::{Context, Result, ensure};
use common::{Lab, Node, cmd, cmd_fails, expect_peer_entries, ping};
use overlay_agent::{
    datapath::{Datapath, NodeSpec, Peer, kernel::KernelDatapath},
    flannel::mac::MacAddr,
    netlink::vxlan_device::DeviceOrigin,
};

#[test]
#[ignore = "needs root, network namespaces and eBPF: run `cargo xtask test`"]
fn kernel_datapath_programs_flannel_entries_and_carries_traffic() -> Result<()> {
    let lab = Lab::new("k")?;
    let a = &lab.nodes[0];
    let b = &lab.nodes[1];

    // B starts with a leftover of another type under the device's name: replaced.
    cmd(&format!("ip -n {} link add flannel.1 type bridge", b.ns))?;
    let wa = a.worker(KernelDatapath::new)?;
    let wb = b.worker(KernelDatapath::new)?;
    let (state_a, origin_a) = setup(&wa, a.spec())?;
    let (state_b, origin_b) = setup(&wb, b.spec())?;
    ensure!(origin_a == DeviceOrigin::Created, "{origin_a:?}");
    ensure!(
        origin_b
            == DeviceOrigin::Recreated {
                reason: "link type: bridge vs vxlan".into()
            },
        "{origin_b:?}"
    );
    ensure!(
        state_a.device == "flannel.1" && state_a.mtu == 1450,
        "{state_a:?}"
    );
    ensure!(state_a.vtep_mac == MacAddr::stable_for(a.public_ip.parse()?, 1));

    let peer_a = a.peer(state_a.vtep_mac)?;
    let peer_b = b.peer(state_b.vtep_mac)?;
    add(&wa, peer_b)?;
    add(&wb, peer_a)?;

    let link = cmd(&format!("ip -n {} -d link show flannel.1", a.ns))?;
    eprintln!("[{}] ip -d link show flannel.1\n{link}", a.ns);
    for want in [
        "mtu 1450",
        "UP",
        &format!("link/ether {}", state_a.vtep_mac),
        "vxlan id 1 local 192.168.77.1 dev ua",
        "dstport 8472",
        "nolearning",
    ] {
        ensure!(link.contains(want), "`{want}` missing from:\n{link}");
    }
    expect_peer_entries(a, &peer_b)?;
    expect_peer_entries(b, &peer_a)?;
    let addr = cmd(&format!("ip -n {} -4 addr show dev flannel.1", a.ns))?;
    ensure!(addr.contains("inet 10.77.1.0/32"), "{addr}");
    ensure!(peers(&wa)? == vec![peer_b], "read back: {:?}", peers(&wa)?);

    ping(&a.ns, "10.77.2.0")?;
    ping(&a.container, "10.77.2.2")?;
    ping(&b.container, "10.77.1.2")?;
    let stats = cmd(&format!("ip -n {} -s link show flannel.1", a.ns))?;
    eprintln!(
        "[{}] ip -s link show flannel.1 (the kernel vxlan device carried it)\n{stats}",
        a.ns
    );

    // Re-adding is idempotent.
    add(&wa, peer_b)?;
    expect_peer_entries(a, &peer_b)?;

    // The peer's MAC changes: neighbour and FDB follow, the old FDB entry goes.
    let moved_mac = Peer {
        vtep_mac: "02:42:00:00:00:99".parse()?,
        ..peer_b
    };
    add(&wa, moved_mac)?;
    expect_peer_entries(a, &moved_mac)?;
    let fdb = cmd(&format!("bridge -n {} fdb show dev flannel.1", a.ns))?;
    ensure!(
        !fdb.contains(&peer_b.vtep_mac.to_string()),
        "stale FDB entry left:\n{fdb}"
    );
    ensure!(peers(&wa)? == vec![moved_mac]);

    // The peer's public IP changes: the FDB entry's destination follows.
    let moved_ip = Peer {
        public_ip: "192.168.77.3".parse()?,
        ..peer_b
    };
    add(&wa, moved_ip)?;
    expect_peer_entries(a, &moved_ip)?;
    ensure!(peers(&wa)? == vec![moved_ip]);
    add(&wa, peer_b)?;
    ping(&a.container, "10.77.2.2")?;

    // Setting up again adopts the device: same ifindex, entries kept.
    let (again, origin) = setup(&wa, a.spec())?;
    ensure!(origin == DeviceOrigin::Adopted, "{origin:?}");
    ensure!(again == state_a, "{again:?} vs {state_a:?}");
    ensure!(peers(&wa)? == vec![peer_b]);
    ping(&a.container, "10.77.2.2")?;

    // A MAC demanded by the spec is applied to the adopted device; the peer
    // learns it through add_peer (replace), and traffic flows again.
    let demanded: MacAddr = "02:42:00:00:00:aa".parse()?;
    let (with_mac, origin) = setup(
        &wa,
        NodeSpec {
            vtep_mac: Some(demanded),
            ..a.spec()
        },
    )?;
    ensure!(origin == DeviceOrigin::Adopted && with_mac.ifindex == state_a.ifindex);
    ensure!(with_mac.vtep_mac == demanded, "{with_mac:?}");
    let peer_a_new = a.peer(demanded)?;
    add(&wb, peer_a_new)?;
    expect_peer_entries(b, &peer_a_new)?;
    ping(&a.container, "10.77.2.2")?;

    // Another port is incompatible: the device is deleted and created anew
    // (with the stable MAC again, since the spec no longer demands one).
    let (other_port, origin) = setup(
        &wa,
        NodeSpec {
            port: 4789,
            ..a.spec()
        },
    )?;
    ensure!(
        origin
            == DeviceOrigin::Recreated {
                reason: "port: 8472 vs 4789".into()
            },
        "{origin:?}"
    );
    ensure!(other_port.ifindex != state_a.ifindex);
    let link = cmd(&format!("ip -n {} -d link show flannel.1", a.ns))?;
    ensure!(link.contains("dstport 4789"), "{link}");
    ensure!(peers(&wa)?.is_empty(), "a new device has no entries");
    let (back, origin) = setup(&wa, a.spec())?;
    ensure!(matches!(origin, DeviceOrigin::Recreated { .. }));
    ensure!(back.vtep_mac == state_a.vtep_mac);
    add(&wa, peer_b)?;
    add(&wb, peer_a)?;
    ping(&a.container, "10.77.2.2")?;

    // Removal deletes all three entries; traffic stops.
    remove(&wa, peer_b)?;
    let neigh = cmd(&format!("ip -n {} neigh show dev flannel.1", a.ns))?;
    let fdb = cmd(&format!("bridge -n {} fdb show dev flannel.1", a.ns))?;
    let routes = cmd(&format!("ip -n {} route", a.ns))?;
    ensure!(!neigh.contains("10.77.2.0"), "{neigh}");
    ensure!(!fdb.contains(&peer_b.vtep_mac.to_string()), "{fdb}");
    ensure!(!routes.contains("10.77.2.0/24"), "{routes}");
    ensure!(peers(&wa)?.is_empty());
    cmd_fails(&format!(
        "ip netns exec {} ping -c 1 -W 1 10.77.2.2",
        a.container
    ))?;
    remove(&wa, peer_b)?; // idempotent

    wa.run(|dp, rt| rt.block_on(dp.teardown()))?;
    wb.run(|dp, rt| rt.block_on(dp.teardown()))?;
    cmd_fails(&format!("ip -n {} link show flannel.1", a.ns))?;
    cmd_fails(&format!("ip -n {} link show flannel.1", b.ns))?;
    Ok(())
}

#[test]
#[ignore = "needs root, network namespaces and eBPF: run `cargo xtask test`"]
fn kernel_datapath_adopts_a_device_flanneld_created() -> Result<()> {
    let lab = Lab::new("f")?;
    let a = &lab.nodes[0];
    // What flanneld leaves behind: its device with a random MAC and a peer.
    let flanneld_mac = "0e:1f:2a:3b:4c:5d";
    cmd(&format!(
        "ip -n {} link add flannel.1 address {flanneld_mac} mtu 1450 type vxlan id 1 local 192.168.77.1 dev ua dstport 8472 nolearning",
        a.ns
    ))?;
    cmd(&format!(
        "ip -n {} addr add 10.77.1.0/32 dev flannel.1",
        a.ns
    ))?;
    cmd(&format!("ip -n {} link set flannel.1 up", a.ns))?;
    cmd(&format!(
        "ip -n {} neigh add 10.77.2.0 lladdr 02:42:00:00:00:02 dev flannel.1 nud permanent",
        a.ns
    ))?;
    cmd(&format!(
        "bridge -n {} fdb add 02:42:00:00:00:02 dev flannel.1 dst 192.168.77.2 self permanent",
        a.ns
    ))?;
    cmd(&format!(
        "ip -n {} route add 10.77.2.0/24 via 10.77.2.0 dev flannel.1 onlink",
        a.ns
    ))?;
    let ifindex = ifindex(&a.ns, "flannel.1")?;

    let wa = a.worker(KernelDatapath::new)?;
    let (state, origin) = setup(&wa, a.spec())?;
    ensure!(origin == DeviceOrigin::Adopted, "{origin:?}");
    ensure!(state.ifindex == ifindex);
    ensure!(
        state.vtep_mac.to_string() == flanneld_mac,
        "the lease's MAC must survive: {state:?}"
    );
    let expected = Peer {
        subnet: "10.77.2.0/24".parse()?,
        public_ip: "192.168.77.2".parse()?,
        vtep_mac: "02:42:00:00:00:02".parse()?,
        v6: None,
    };
    ensure!(peers(&wa)? == vec![expected], "{:?}", peers(&wa)?);
    wa.run(|dp, rt| rt.block_on(dp.teardown()))?;
    Ok(())
}

/// Stale FDB entries go and shared ones stay, with no dump per peer event:
/// two subnets behind one VTEP (one node's two leases) share its MAC, so a
/// MAC change of one keeps the entry the other uses; an entry left behind
/// the agent's back is learned when the device is read back.
#[test]
#[ignore = "needs root, network namespaces and eBPF: run `cargo xtask test`"]
fn kernel_datapath_removes_stale_fdb_entries_and_keeps_shared_ones() -> Result<()> {
    let lab = Lab::new("sf")?;
    let a = &lab.nodes[0];
    let wa = a.worker(KernelDatapath::new)?;
    setup(&wa, a.spec())?;
    let mac = |n: u8| -> Result<MacAddr> { Ok(format!("02:42:00:00:01:{n:02x}").parse()?) };
    let fdb = || cmd(&format!("bridge -n {} fdb show dev flannel.1", a.ns));
    let neigh = || cmd(&format!("ip -n {} neigh show dev flannel.1", a.ns));
    let has_fdb = |out: &str, m: MacAddr| {
        out.lines()
            .any(|l| l.trim() == format!("{m} dst 192.168.77.2 self permanent"))
    };
    let has_neigh = |out: &str, gw: &str, m: MacAddr| {
        out.lines()
            .any(|l| l.trim() == format!("{gw} lladdr {m} PERMANENT"))
    };
    let p1 = Peer {
        subnet: "10.77.2.0/24".parse()?,
        public_ip: "192.168.77.2".parse()?,
        vtep_mac: mac(1)?,
        v6: None,
    };
    let p2 = Peer {
        subnet: "10.77.3.0/24".parse()?,
        ..p1
    };
    add(&wa, p1)?;
    add(&wa, p2)?;
    ensure!(peers(&wa)? == vec![p1, p2], "{:?}", peers(&wa)?);

    // p1's MAC changes; p2's neighbour still uses the old one: it stays.
    let p1_moved = Peer {
        vtep_mac: mac(2)?,
        ..p1
    };
    add(&wa, p1_moved)?;
    let (f, n) = (fdb()?, neigh()?);
    ensure!(
        has_fdb(&f, mac(1)?) && has_fdb(&f, mac(2)?),
        "after p1's MAC change:\n{f}"
    );
    ensure!(
        has_neigh(&n, "10.77.2.0", mac(2)?) && has_neigh(&n, "10.77.3.0", mac(1)?),
        "{n}"
    );
    ensure!(peers(&wa)? == vec![p1_moved, p2], "{:?}", peers(&wa)?);

    // p2 follows: no neighbour uses the old MAC, its entry is stale.
    let p2_moved = Peer {
        vtep_mac: mac(2)?,
        ..p2
    };
    add(&wa, p2_moved)?;
    let f = fdb()?;
    ensure!(
        !f.contains(&mac(1)?.to_string()) && has_fdb(&f, mac(2)?),
        "after p2's MAC change:\n{f}"
    );

    // An entry toward the same VTEP left behind the agent's back (a crash
    // between steps): learned when the device is read back, it goes with
    // the next update of a peer on that VTEP.
    cmd(&format!(
        "bridge -n {} fdb add {} dev flannel.1 dst 192.168.77.2 self permanent",
        a.ns,
        mac(7)?
    ))?;
    ensure!(peers(&wa)? == vec![p1_moved, p2_moved], "{:?}", peers(&wa)?);
    add(&wa, p1_moved)?;
    let f = fdb()?;
    ensure!(
        !f.contains(&mac(7)?.to_string()) && has_fdb(&f, mac(2)?),
        "after the re-read and an update:\n{f}"
    );

    // Removal: the shared entry stays until its last neighbour goes.
    remove(&wa, p1_moved)?;
    let (f, n) = (fdb()?, neigh()?);
    ensure!(has_fdb(&f, mac(2)?), "after removing p1:\n{f}");
    ensure!(!n.contains("10.77.2.0 "), "{n}");
    ensure!(peers(&wa)? == vec![p2_moved], "{:?}", peers(&wa)?);
    remove(&wa, p2_moved)?;
    let f = fdb()?;
    ensure!(
        !f.contains(&mac(2)?.to_string()),
        "after removing both:\n{f}"
    );
    ensure!(peers(&wa)?.is_empty(), "{:?}", peers(&wa)?);
    wa.run(|dp, rt| rt.block_on(dp.teardown()))?;
    Ok(())
}

/// Peers programmed as one pipelined batch, with the real kernel refusing
/// one of them: the gateway of 10.88.9.0/24 is made a local address of the
/// host, so the kernel refuses its onlink route ("Nexthop has invalid
/// gateway", EINVAL) after accepting its neighbour and FDB entry. The
/// error comes back to that peer alone (its neighbour and FDB entry are
/// undone), the peers before and after it in the batch are programmed, and
/// the reconciler retries that peer alone: a route of another peer deleted
/// behind its back meanwhile stays deleted until a recheck, which a retry
/// of the whole batch would have put back.
#[test]
#[ignore = "needs root, network namespaces and eBPF: run `cargo xtask test`"]
fn kernel_datapath_batch_maps_a_refused_peer_to_itself_and_retries_it_alone() -> Result<()> {
    use overlay_agent::{
        daemon::reconcile::{Own, Reconciler},
        datapath::DatapathError,
        flannel::lease::{Backend, Lease},
        subnet::{Claim, Record},
    };

    let lab = Lab::new("pb")?;
    let a = &lab.nodes[0];
    let ns = &a.ns;
    let wa = a.worker(KernelDatapath::new)?;
    setup(&wa, a.spec())?;
    let mac = |n: u8| -> Result<MacAddr> { Ok(format!("02:42:00:00:09:{n:02x}").parse()?) };
    let peer = |third: u8| -> Result<Peer> {
        Ok(Peer {
            subnet: format!("10.88.{third}.0/24").parse()?,
            public_ip: format!("192.168.88.{third}").parse()?,
            vtep_mac: mac(third)?,
            v6: None,
        })
    };
    let batch: Vec<Peer> = (7..=11).map(peer).collect::<Result<_>>()?;
    let refused = batch[2];
    // The refused peer's gateway is ours: no route may go through it.
    cmd(&format!("ip -n {ns} addr add 10.88.9.0/32 dev lo"))?;

    let sent = batch.clone();
    let results: Vec<std::result::Result<(), String>> = wa.run(move |dp, rt| {
        rt.block_on(dp.add_peers(&sent))
            .into_iter()
            .map(|r| {
                r.map_err(|e| match e {
                    DatapathError::Netlink(n) => format!("errno {:?}: {n}", n.errno()),
                    other => format!("not a netlink error: {other}"),
                })
            })
            .collect()
    });
    eprintln!("add_peers: {results:?}");
    ensure!(results.len() == batch.len(), "{results:?}");
    for (p, r) in batch.iter().zip(&results) {
        if *p == refused {
            let e = r.as_ref().err().context("the refused peer succeeded")?;
            ensure!(
                e.starts_with(&format!("errno Some({})", libc::EINVAL))
                    && e.contains("replace route 10.88.9.0/24 via 10.88.9.0 dev flannel.1 onlink"),
                "{e}"
            );
        } else {
            ensure!(r.is_ok(), "peer {}: {r:?}", p.subnet);
            expect_some_entries(a, p)?;
        }
    }
    // Its neighbour and FDB entry went in before the route was refused:
    // undone.
    let neigh = cmd(&format!("ip -n {ns} neigh show dev flannel.1"))?;
    let fdb = cmd(&format!("bridge -n {ns} fdb show dev flannel.1"))?;
    let routes = cmd(&format!("ip -n {ns} route"))?;
    ensure!(!neigh.contains("10.88.9.0 "), "{neigh}");
    ensure!(!fdb.contains(&mac(9)?.to_string()), "{fdb}");
    ensure!(!routes.contains("10.88.9.0/24"), "{routes}");
    let others: Vec<Peer> = batch.iter().copied().filter(|p| *p != refused).collect();
    ensure!(peers(&wa)? == others, "{:?}", peers(&wa)?);

    // The same through the reconciler: it starts from what is programmed,
    // the leases name all five, so only the refused one is added; it fails
    // again, and stays pending.
    let own = Own {
        subnet: a.subnet.parse()?,
        public_ip: a.public_ip.parse()?,
        vni: 1,
        network: "10.0.0.0/8".parse()?,
        ipv6: None,
    };
    let records: Vec<Record> = batch
        .iter()
        .map(|p| Record {
            key: format!("/coreos.com/network/subnets/{}", p.subnet).replace('/', "-"),
            raw: p.subnet.to_string().into_bytes(),
            claim: Claim::Lease(Lease {
                subnet: p.subnet,
                ipv6_subnet: None,
                public_ip: p.public_ip,
                public_ipv6: None,
                backend: Backend::Vxlan {
                    vni: Some(1),
                    vtep_mac: p.vtep_mac,
                },
                vtep_mac_v6: None,
            }),
            rank: 0,
        })
        .collect();
    let ns_in = ns.clone();
    let (first, after, routes, drifted, rechecked) = wa.run(move |dp, rt| -> Result<_> {
        let mut r = rt.block_on(Reconciler::start(std::mem::take(dp), own, records))?;
        let first = (r.is_converged(), r.programmed().len());
        // Behind the reconciler's back: another peer's route goes. Only a
        // recheck (not a retry of the failed peer) may bring it back.
        cmd(&format!("ip -n {ns_in} route del 10.88.7.0/24"))?;
        // The conflict is lifted: the next converge retries the one.
        cmd(&format!("ip -n {ns_in} addr del 10.88.9.0/32 dev lo"))?;
        let ok = rt.block_on(r.converge());
        let after = (ok, r.is_converged(), r.programmed().len());
        let routes = cmd(&format!("ip -n {ns_in} route"))?;
        let drifted = rt.block_on(r.recheck());
        let rechecked = cmd(&format!("ip -n {ns_in} route"))?;
        *dp = r.into_datapath();
        Ok((first, after, routes, drifted?, rechecked))
    })?;
    eprintln!("reconciler: first converge {first:?}, after the fix {after:?}, recheck {drifted}");
    ensure!(first == (false, 4), "first converge: {first:?}");
    ensure!(after == (true, true, 5), "after the fix: {after:?}");
    expect_some_entries(a, &refused)?;
    ensure!(
        !routes.contains("10.88.7.0/24"),
        "the converge after the fix touched a peer that had not failed:\n{routes}"
    );
    ensure!(drifted == 1, "recheck found {drifted} drifted peer(s)");
    ensure!(
        rechecked.contains("10.88.7.0/24 via 10.88.7.0 dev flannel.1 onlink"),
        "{rechecked}"
    );
    wa.run(|dp, rt| rt.block_on(dp.teardown()))?;
    Ok(())
}

/// `peer`'s neighbour, FDB entry and route are on `flannel.1` (other
/// peers' entries may be there too).
fn expect_some_entries(node: &common::LabNode, peer: &Peer) -> Result<()> {
    let gw = peer.subnet.network();
    let neigh = cmd(&format!("ip -n {} neigh show dev flannel.1", node.ns))?;
    let fdb = cmd(&format!("bridge -n {} fdb show dev flannel.1", node.ns))?;
    let routes = cmd(&format!("ip -n {} route", node.ns))?;
    let want_neigh = format!("{gw} lladdr {} PERMANENT", peer.vtep_mac);
    let want_fdb = format!("{} dst {} self permanent", peer.vtep_mac, peer.public_ip);
    let want_route = format!("{} via {gw} dev flannel.1 onlink", peer.subnet);
    ensure!(
        neigh.lines().any(|l| l.trim() == want_neigh),
        "`{want_neigh}` missing:\n{neigh}"
    );
    ensure!(
        fdb.lines().any(|l| l.trim() == want_fdb),
        "`{want_fdb}` missing:\n{fdb}"
    );
    ensure!(
        routes.lines().any(|l| l.trim().starts_with(&want_route)),
        "`{want_route}` missing:\n{routes}"
    );
    Ok(())
}

fn setup(
    w: &Node<KernelDatapath>,
    spec: NodeSpec,
) -> Result<(overlay_agent::datapath::NodeState, DeviceOrigin)> {
    w.run(move |dp, rt| {
        let state = rt.block_on(dp.setup(&spec))?;
        let origin = dp.device().context("device after setup")?.origin.clone();
        Ok((state, origin))
    })
}

fn add(w: &Node<KernelDatapath>, peer: Peer) -> Result<()> {
    Ok(w.run(move |dp, rt| rt.block_on(dp.add_peer(&peer)))?)
}

fn remove(w: &Node<KernelDatapath>, peer: Peer) -> Result<()> {
    Ok(w.run(move |dp, rt| rt.block_on(dp.remove_peer(&peer)))?)
}

fn peers(w: &Node<KernelDatapath>) -> Result<Vec<Peer>> {
    Ok(w.run(|dp, rt| rt.block_on(dp.peers()))?)
}

fn ifindex(ns: &str, dev: &str) -> Result<u32> {
    let out = cmd(&format!("ip -n {ns} -o link show {dev}"))?;
    Ok(out.split(':').next().context("ifindex")?.trim().parse()?)
}

//! The eBPF datapath in the two-namespace lab: the same kernel entries as the
//! kernel datapath, the maps filled, the programs attached where they belong
//! (checked with bpftool), traffic carried by the programs (counters rise, the
//! vxlan device's own statistics stay flat), in both ingress modes; removal,
//! detach on drop, and teardown.

mod common;

use anyhow::{Context, Result, ensure};
use aya::programs::{SchedClassifier, TcAttachType};
use common::{Lab, LabNode, Node, cmd, cmd_fails, expect_peer_entries, ping};
use overlay_agent::{
    datapath::{
        Datapath, DatapathError, NodeSpec, NodeState, Peer,
        ebpf::{Counters, EBPF_OBJECT, EbpfDatapath, EbpfOptions, IngressMode, ProgramIds},
        pins::{MAPS, MapShape, PinLayout, declared_shapes},
    },
    flannel::mac::MacAddr,
    netns::NetnsWorker,
};
use overlay_common::{
    consts::{PROG_EGRESS, PROG_INGRESS_TC, PROG_INGRESS_XDP},
    counters::Reason,
    maps::MAP_LAYOUT_VERSION,
};

#[test]
#[ignore = "needs root, network namespaces and eBPF: run `cargo xtask test`"]
fn ebpf_datapath_attaches_fills_maps_and_carries_traffic() -> Result<()> {
    let lab = Lab::new("e")?;
    let a = &lab.nodes[0];
    let b = &lab.nodes[1];
    let tc = EbpfOptions {
        ingress: IngressMode::Tc,
        ..EbpfOptions::default()
    };
    let tc_b = tc.clone();
    let wa = a.worker(move || EbpfDatapath::new(tc))?;
    let wb = b.worker(move || EbpfDatapath::new(tc_b))?;
    let state_a = setup(&wa, a)?;
    let state_b = setup(&wb, b)?;
    ensure!(
        state_a.device == "flannel.1" && state_a.mtu == 1450,
        "{state_a:?}"
    );
    ensure!(state_a.vtep_mac == MacAddr::stable_for(a.public_ip.parse()?, 1));

    let peer_a = a.peer(state_a.vtep_mac)?;
    let peer_b = b.peer(state_b.vtep_mac)?;
    add(&wa, peer_b)?;
    add(&wb, peer_a)?;

    // The kernel keeps flannel's entries, so routing still selects the device.
    expect_peer_entries(a, &peer_b)?;
    expect_peer_entries(b, &peer_a)?;
    ensure!(peers(&wa)? == vec![peer_b], "{:?}", peers(&wa)?);
    let (in_maps, known) = wa.run(move |dp, _| -> Result<_> {
        Ok((dp.map_peers()?, dp.knows_vtep(peer_b.public_ip)?))
    })?;
    ensure!(
        in_maps == vec![peer_b] && known,
        "maps: {in_maps:?}, known {known}"
    );

    let ids = program_ids(&wa)?;
    expect_attached(a, ids)?;
    expect_maps_dump(ids, &peer_b)?;

    expect_programs_carry(
        a,
        &wa,
        &[
            (&a.ns, "10.77.2.0"),
            (&a.container, "10.77.2.2"),
            (&b.container, "10.77.1.2"),
        ],
    )?;

    // Dropping the datapath detaches the programs (the device and entries stay),
    // and a new instance in XDP+TC mode adopts the device and refills the maps
    // from the kernel's entries.
    drop(wa);
    let att = attached(&a.ns)?;
    ensure!(
        att == Attached::default(),
        "programs left attached after drop: {att:?}"
    );
    let xdp = EbpfOptions {
        ingress: IngressMode::XdpAndTc,
        ..EbpfOptions::default()
    };
    let wa = a.worker(move || EbpfDatapath::new(xdp))?;
    let again = setup(&wa, a)?;
    ensure!(again == state_a, "{again:?} vs {state_a:?}");
    let in_maps = wa.run(|dp, _| dp.map_peers())?;
    ensure!(in_maps == vec![peer_b], "maps after adoption: {in_maps:?}");
    let ids = program_ids(&wa)?;
    ensure!(ids.ingress_xdp.is_some(), "{ids:?}");
    expect_attached(a, ids)?;
    expect_programs_carry(
        a,
        &wa,
        &[(&a.container, "10.77.2.2"), (&b.container, "10.77.1.2")],
    )?;

    // A peer whose public IP and MAC change: both maps follow, the old
    // address is no longer a known VTEP, the kernel entries follow too.
    let moved = Peer {
        public_ip: "192.168.77.3".parse()?,
        vtep_mac: "02:42:00:00:00:99".parse()?,
        ..peer_b
    };
    add(&wa, moved)?;
    let (in_maps, old_known, new_known) = wa.run(move |dp, _| -> Result<_> {
        Ok((
            dp.map_peers()?,
            dp.knows_vtep(peer_b.public_ip)?,
            dp.knows_vtep(moved.public_ip)?,
        ))
    })?;
    ensure!(
        in_maps == vec![moved] && !old_known && new_known,
        "maps after the move: {in_maps:?}, old known {old_known}, new known {new_known}"
    );
    expect_peer_entries(a, &moved)?;
    ensure!(peers(&wa)? == vec![moved]);
    add(&wa, peer_b)?;
    ping(&a.container, "10.77.2.2")?;

    // Removal empties the maps and the kernel entries; traffic stops.
    remove(&wa, peer_b)?;
    let (in_maps, known) = wa.run(move |dp, _| -> Result<_> {
        Ok((dp.map_peers()?, dp.knows_vtep(peer_b.public_ip)?))
    })?;
    ensure!(
        in_maps.is_empty() && !known,
        "maps after removal: {in_maps:?}, known {known}"
    );
    ensure!(peers(&wa)?.is_empty());
    let routes = cmd(&format!("ip -n {} route", a.ns))?;
    ensure!(!routes.contains("10.77.2.0/24"), "{routes}");
    cmd_fails(&format!(
        "ip netns exec {} ping -c 1 -W 1 10.77.2.2",
        a.container
    ))?;

    // Teardown detaches and deletes the device.
    wa.run(|dp, rt| rt.block_on(dp.teardown()))?;
    wb.run(|dp, rt| rt.block_on(dp.teardown()))?;
    let att = attached(&a.ns)?;
    ensure!(
        att == Attached::default(),
        "programs left attached after teardown: {att:?}"
    );
    cmd_fails(&format!("ip -n {} link show flannel.1", a.ns))?;
    Ok(())
}

/// KNOWN_VTEPS and PEER_STATS keep a public IP while any peer uses it,
/// direct peers (DirectRouting: no REMOTE_SUBNETS entry) included, and drop
/// it with its last user, also when a subnet moves between the kinds under
/// another public IP.
#[test]
#[ignore = "needs root, network namespaces and eBPF: run `cargo xtask test`"]
fn a_vtep_stays_known_while_a_vxlan_or_a_direct_peer_uses_it() -> Result<()> {
    let lab = Lab::new("vu")?;
    let a = &lab.nodes[0];
    let wa = a.worker(|| EbpfDatapath::new(EbpfOptions::default()))?;
    let spec = NodeSpec {
        direct_routing: true,
        ipv6: None,
        ..a.spec()
    };
    wa.run(move |dp, rt| rt.block_on(dp.setup(&spec)))
        .context("eBPF setup with DirectRouting")?;
    let maps = |ips: &'static [&'static str]| -> Result<(Vec<Peer>, Vec<String>, Vec<String>)> {
        wa.run(move |dp, _| -> Result<_> {
            let mut known = Vec::new();
            for ip in ips {
                if dp.knows_vtep(ip.parse()?)? {
                    known.push((*ip).to_string());
                }
            }
            let mut stats: Vec<String> = dp
                .peer_counters()?
                .keys()
                .map(|ip| ip.to_string())
                .collect();
            stats.sort();
            Ok((dp.map_peers()?, known, stats))
        })
    };
    let peer = |n: u8, ip: &str| -> Result<Peer> {
        Ok(Peer {
            subnet: format!("10.77.{n}.0/24").parse()?,
            public_ip: ip.parse()?,
            vtep_mac: format!("02:42:00:00:02:{n:02x}").parse()?,
            v6: None,
        })
    };
    let route = |how: &str| cmd(&format!("ip -n {} route replace 10.200.0.0/24 {how}", a.ns));

    // Behind a gateway the VTEP gets VXLAN; reached directly, the next
    // subnet behind it a direct route: one VTEP, one peer of each kind.
    route("via 192.168.77.2")?;
    let vxlan = peer(4, "10.200.0.5")?;
    add(&wa, vxlan)?;
    route("dev ua")?;
    let direct = peer(5, "10.200.0.5")?;
    add(&wa, direct)?;
    let routes = cmd(&format!("ip -n {} route", a.ns))?;
    ensure!(
        routes.contains("10.77.5.0/24 via 10.200.0.5 dev ua")
            && routes.contains("10.77.4.0/24 via 10.77.4.0 dev flannel.1 onlink"),
        "{routes}"
    );
    let only = &["10.200.0.5"];
    ensure!(
        maps(only)?
            == (
                vec![vxlan],
                vec!["10.200.0.5".into()],
                vec!["10.200.0.5".into()]
            ),
        "both peers in: {:?}",
        maps(only)?
    );
    // The vxlan peer leaves: the direct one still needs ingress to know
    // its VTEP.
    remove(&wa, vxlan)?;
    ensure!(
        maps(only)? == (vec![], vec!["10.200.0.5".into()], vec!["10.200.0.5".into()]),
        "after the vxlan peer left: {:?}",
        maps(only)?
    );
    remove(&wa, direct)?;
    ensure!(
        maps(only)? == (vec![], vec![], vec![]),
        "after both left: {:?}",
        maps(only)?
    );

    // A direct subnet comes back behind a gateway under another public
    // IP: the IP it had is nobody's now.
    let before = peer(6, "10.200.0.6")?;
    add(&wa, before)?;
    route("via 192.168.77.2")?;
    let after = peer(6, "10.200.0.7")?;
    add(&wa, after)?;
    let both = &["10.200.0.6", "10.200.0.7"];
    ensure!(
        maps(both)?
            == (
                vec![after],
                vec!["10.200.0.7".into()],
                vec!["10.200.0.7".into()]
            ),
        "after the move: {:?}",
        maps(both)?
    );
    remove(&wa, after)?;
    ensure!(
        maps(both)? == (vec![], vec![], vec![]),
        "after the removal: {:?}",
        maps(both)?
    );
    wa.run(|dp, rt| rt.block_on(dp.teardown()))?;
    Ok(())
}

fn setup(w: &Node<EbpfDatapath>, node: &LabNode) -> Result<NodeState> {
    let spec = node.spec();
    let ns = node.ns.clone();
    w.run(move |dp, rt| rt.block_on(dp.setup(&spec)))
        .with_context(|| format!("eBPF setup in {ns}"))
}

fn add(w: &Node<EbpfDatapath>, peer: Peer) -> Result<()> {
    Ok(w.run(move |dp, rt| rt.block_on(dp.add_peer(&peer)))?)
}

fn remove(w: &Node<EbpfDatapath>, peer: Peer) -> Result<()> {
    Ok(w.run(move |dp, rt| rt.block_on(dp.remove_peer(&peer)))?)
}

fn peers(w: &Node<EbpfDatapath>) -> Result<Vec<Peer>> {
    Ok(w.run(|dp, rt| rt.block_on(dp.peers()))?)
}

fn program_ids(w: &Node<EbpfDatapath>) -> Result<ProgramIds> {
    w.run(|dp, _| dp.program_ids())
        .context("program ids after setup")
}

fn counters(w: &Node<EbpfDatapath>) -> Result<Counters> {
    Ok(w.run(|dp, _| dp.counters())?)
}

/// What is attached in a namespace: TCX programs per (device, direction) as
/// the kernel's TCX query reports them (this bpftool, 7.1, predates TCX), and
/// XDP program ids per device from `ip -j -d link`.
#[derive(Debug, Default, PartialEq, Eq)]
struct Attached {
    tcx: Vec<(String, &'static str, String, u32)>,
    xdp: Vec<(String, u64)>,
}

fn attached(ns: &str) -> Result<Attached> {
    let links: serde_json::Value =
        serde_json::from_str(&cmd(&format!("ip -n {ns} -j -d link show"))?)?;
    let mut out = Attached::default();
    let mut names = Vec::new();
    for link in links.as_array().into_iter().flatten() {
        let name = link["ifname"].as_str().context("ifname")?.to_owned();
        let xdp = &link["xdp"];
        if !xdp.is_null() {
            let id = xdp["prog"]["id"]
                .as_u64()
                .or_else(|| xdp["attached"][0]["prog"]["id"].as_u64())
                .unwrap_or(0);
            out.xdp.push((name.clone(), id));
        }
        names.push(name);
    }
    let query = NetnsWorker::spawn(ns, || ())?;
    out.tcx = query.run(move |(), _| -> Result<_> {
        let mut found = Vec::new();
        for name in names {
            for (dir, attach) in [
                ("ingress", TcAttachType::Ingress),
                ("egress", TcAttachType::Egress),
            ] {
                let (_, progs) = SchedClassifier::query_tcx(&name, attach)?;
                for p in progs {
                    found.push((
                        name.clone(),
                        dir,
                        p.name_as_str().unwrap_or("?").to_owned(),
                        p.id(),
                    ));
                }
            }
        }
        Ok(found)
    })?;
    Ok(out)
}

/// Exactly our programs, on the hooks the design names, with the ids the
/// datapath reports.
fn expect_attached(node: &LabNode, ids: ProgramIds) -> Result<()> {
    let att = attached(&node.ns)?;
    eprintln!("[{}] attached: {att:?}", node.ns);
    let mut want_tcx = vec![
        (
            "flannel.1".to_owned(),
            "egress",
            kernel_name(PROG_EGRESS),
            ids.egress,
        ),
        (
            node.underlay.to_owned(),
            "ingress",
            kernel_name(PROG_INGRESS_TC),
            ids.ingress_tc,
        ),
    ];
    let mut got_tcx = att.tcx.clone();
    want_tcx.sort();
    got_tcx.sort();
    ensure!(
        got_tcx == want_tcx,
        "TCX: {got_tcx:?}, expected {want_tcx:?}"
    );
    let want_xdp: Vec<(String, u64)> = ids
        .ingress_xdp
        .map(|id| (node.underlay.to_owned(), u64::from(id)))
        .into_iter()
        .collect();
    ensure!(
        att.xdp == want_xdp,
        "XDP: {:?}, expected {want_xdp:?} ({PROG_INGRESS_XDP})",
        att.xdp
    );
    Ok(())
}

/// Pings that must succeed, with the encap/decap counters rising and the
/// kernel vxlan device's own packet statistics not moving.
fn expect_programs_carry(
    a: &LabNode,
    wa: &Node<EbpfDatapath>,
    pings: &[(&str, &str)],
) -> Result<()> {
    let before = counters(wa)?;
    let dev_before = link_packets(&a.ns, "flannel.1")?;
    for (ns, dst) in pings {
        ping(ns, dst)?;
    }
    let after = counters(wa)?;
    let dev_after = link_packets(&a.ns, "flannel.1")?;
    eprintln!("[{}] counters: {after}", a.ns);
    eprintln!(
        "[{}] flannel.1 rx/tx packets {dev_before:?} -> {dev_after:?}",
        a.ns
    );
    let delta = |r: Reason| after.get(r).packets - before.get(r).packets;
    let each_way = 3 * pings.len() as u64;
    ensure!(
        delta(Reason::Encapsulated) >= each_way,
        "encapsulated +{}; {after}",
        delta(Reason::Encapsulated)
    );
    ensure!(
        delta(Reason::Decapsulated) >= each_way,
        "decapsulated +{}; {after}",
        delta(Reason::Decapsulated)
    );
    for r in Reason::ALL.iter().filter(|r| r.name().starts_with("drop_")) {
        ensure!(delta(*r) == 0, "{} rose by {}", r.name(), delta(*r));
    }
    ensure!(
        dev_before == dev_after,
        "the kernel vxlan driver moved packets: {dev_before:?} -> {dev_after:?}"
    );
    Ok(())
}

/// (rx packets, tx packets) of a device, from `ip -s -j link`.
fn link_packets(ns: &str, dev: &str) -> Result<(u64, u64)> {
    let out = cmd(&format!("ip -n {ns} -s -j link show {dev}"))?;
    let v: serde_json::Value = serde_json::from_str(&out)?;
    let stats = &v[0]["stats64"];
    Ok((
        stats["rx"]["packets"].as_u64().context("rx")?,
        stats["tx"]["packets"].as_u64().context("tx")?,
    ))
}

/// The kernel keeps the first 15 bytes of a program's name (BPF_OBJ_NAME_LEN).
fn kernel_name(name: &str) -> String {
    name.chars().take(15).collect()
}

/// An attach failure (hardware-offloaded XDP on a veth) is typed as such,
/// leaves nothing attached, and leaves the device and its entries for the
/// kernel datapath, which adopts them and carries the traffic: the agent's
/// fallback.
#[test]
#[ignore = "needs root, network namespaces and eBPF: run `cargo xtask test`"]
fn ebpf_attach_failure_leaves_nothing_attached_and_the_kernel_datapath_takes_over() -> Result<()> {
    use overlay_agent::datapath::{ebpf::EbpfFailure, kernel::KernelDatapath};

    let lab = Lab::new("x")?;
    let a = &lab.nodes[0];
    let b = &lab.nodes[1];
    let offload = EbpfOptions {
        ingress: IngressMode::XdpAndTc,
        xdp_mode: aya::programs::XdpMode::Hardware,
        ..EbpfOptions::default()
    };
    let wa = a.worker(move || EbpfDatapath::new(offload))?;
    let spec = a.spec();
    let (failure, reason) = wa.run(move |dp, rt| match rt.block_on(dp.setup(&spec)) {
        Ok(state) => Err(anyhow::anyhow!(
            "setup with hardware XDP on a veth succeeded: {state:?}"
        )),
        Err(e @ DatapathError::Ebpf(_)) => Ok((e.ebpf_failure(), e.reason())),
        Err(other) => Err(anyhow::anyhow!("not an eBPF error: {other}")),
    })?;
    eprintln!("[{}] fallback reason: {reason}", a.ns);
    ensure!(
        failure == Some(EbpfFailure::Attach),
        "{failure:?}: {reason}"
    );
    ensure!(
        reason.contains("vxlan_ingress_xdp") && !reason.contains('\n'),
        "{reason}"
    );
    ensure!(wa.run(|dp, _| dp.program_ids()).is_none());
    let att = attached(&a.ns)?;
    ensure!(
        att == Attached::default(),
        "left attached after a failed setup: {att:?}"
    );

    drop(wa);
    let ka = a.worker(KernelDatapath::new)?;
    let kb = b.worker(KernelDatapath::new)?;
    let spec = a.spec();
    let state_a = ka.run(move |dp, rt| rt.block_on(dp.setup(&spec)))?;
    let spec = b.spec();
    let state_b = kb.run(move |dp, rt| rt.block_on(dp.setup(&spec)))?;
    let origin = ka.run(|dp, _| dp.device().map(|d| d.origin.clone()));
    ensure!(
        origin == Some(overlay_agent::netlink::vxlan_device::DeviceOrigin::Adopted),
        "{origin:?}"
    );
    let peer_a = a.peer(state_a.vtep_mac)?;
    let peer_b = b.peer(state_b.vtep_mac)?;
    ka.run(move |dp, rt| rt.block_on(dp.add_peer(&peer_b)))?;
    kb.run(move |dp, rt| rt.block_on(dp.add_peer(&peer_a)))?;
    ping(&a.container, "10.77.2.2")?;
    ka.run(|dp, rt| rt.block_on(dp.teardown()))?;
    kb.run(|dp, rt| rt.block_on(dp.teardown()))?;
    Ok(())
}

/// `bpftool map dump` of the maps the egress program uses prints structured
/// keys and values (BTF), and shows the node config and the peer we added.
fn expect_maps_dump(ids: ProgramIds, peer: &Peer) -> Result<()> {
    let prog: serde_json::Value =
        serde_json::from_str(&cmd(&format!("bpftool -j prog show id {}", ids.egress))?)?;
    let map_ids: Vec<u64> = prog["map_ids"]
        .as_array()
        .context("map_ids")?
        .iter()
        .filter_map(serde_json::Value::as_u64)
        .collect();
    let mut seen = Vec::new();
    for id in map_ids {
        let info: serde_json::Value =
            serde_json::from_str(&cmd(&format!("bpftool -j map show id {id}"))?)?;
        let name = info["name"].as_str().unwrap_or_default().to_owned();
        if !["REMOTE_SUBNETS", "NODE_CONFIG"].contains(&name.as_str()) {
            continue;
        }
        let dump = cmd(&format!("bpftool map dump id {id}"))?;
        eprintln!("bpftool map dump id {id} ({name}):\n{dump}");
        let want: &[&str] = if name == "NODE_CONFIG" {
            &[
                "\"vni\": 1",
                "\"port\": 8472",
                "\"configured\": 1",
                "\"vtep_mac\"",
            ]
        } else {
            &["\"vtep_mac\"", "\"public_ip\""]
        };
        for w in want {
            ensure!(dump.contains(w), "{name} dump lacks {w}:\n{dump}");
        }
        if name == "REMOTE_SUBNETS" {
            let [a, b, c, d] = peer.public_ip.octets();
            let ip = format!("[{a},{b},{c},{d}");
            ensure!(
                dump.contains(&ip),
                "REMOTE_SUBNETS dump lacks {}:\n{dump}",
                peer.public_ip
            );
        }
        seen.push(name);
    }
    seen.sort();
    ensure!(
        seen == ["NODE_CONFIG", "REMOTE_SUBNETS"],
        "maps found: {seen:?}"
    );
    Ok(())
}

/// Pinned state outlives the datapath value, a new value swaps its programs
/// into the same links (TCX and XDP), a pinned map with another layout is
/// replaced, and teardown removes the pins and detaches.
#[test]
#[ignore = "needs root, network namespaces, bpffs and eBPF: run `cargo xtask test`"]
fn pinned_links_outlive_the_datapath_and_take_new_programs() -> Result<()> {
    use overlay_agent::datapath::pins::{link_info, obj_get};

    let lab = Lab::new("pn")?;
    let a = &lab.nodes[0];
    let b = &lab.nodes[1];
    let bpffs = std::env::temp_dir().join(format!("overlay-pin-test-{}", std::process::id()));
    std::fs::create_dir_all(&bpffs)?;
    cmd(&format!("mount -t bpf bpf {}", bpffs.display()))?;
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = cmd(&format!("umount -l {}", self.0.display()));
            let _ = std::fs::remove_dir(&self.0);
        }
    }
    let _unmount = Unmount(bpffs.clone());
    let layout = PinLayout::new(bpffs.join("overlay"));
    let options = EbpfOptions {
        ingress: IngressMode::XdpAndTc,
        pins: Some(layout.clone()),
        ..EbpfOptions::default()
    };

    // Maps recorded with this build's layout version but each unfit in one
    // way (the shape check, not the version, replaces them on setup):
    // PEER_STATS has the right sizes but is preallocated (as before
    // BPF_F_NO_PREALLOC), KNOWN_VTEPS the right sizes but another type,
    // NODE_CONFIG another value size.
    std::fs::create_dir_all(layout.root())?;
    for (name, def) in [
        (
            "PEER_STATS",
            "type percpu_hash key 4 value 32 entries 16384",
        ),
        ("KNOWN_VTEPS", "type lru_hash key 4 value 8 entries 16384"),
        ("NODE_CONFIG", "type array key 4 value 8 entries 1"),
        ("LAYOUT", "type array key 4 value 4 entries 1"),
    ] {
        cmd(&format!(
            "bpftool map create {} {def} name {name}",
            layout.map(name).display()
        ))?;
    }
    let [v0, v1, v2, v3] = MAP_LAYOUT_VERSION.to_ne_bytes();
    cmd(&format!(
        "bpftool map update pinned {} key 0 0 0 0 value {v0} {v1} {v2} {v3}",
        layout.map("LAYOUT").display()
    ))?;
    let layout_id = aya::maps::MapInfo::from_pin(layout.map("LAYOUT"))?.id();
    let old_ids: Vec<(String, u32)> = pinned_map_ids(&layout)?
        .into_iter()
        .filter(|(name, _)| name != "LAYOUT")
        .collect();

    let first_options = options.clone();
    let wa = a.worker(move || EbpfDatapath::new(first_options))?;
    let wb = b.worker(|| EbpfDatapath::new(EbpfOptions::default()))?;
    let state_a = setup(&wa, a)?;
    let state_b = setup(&wb, b)?;
    add(&wa, b.peer(state_b.vtep_mac)?)?;
    add(&wb, a.peer(state_a.vtep_mac)?)?;
    let first = program_ids(&wa)?;
    let new_ids = pinned_map_ids(&layout)?;
    for (name, old) in &old_ids {
        ensure!(
            new_ids.iter().any(|(n, id)| n == name && id != old),
            "{name} not replaced: {old_ids:?} -> {new_ids:?}"
        );
    }
    expect_pinned_maps_as_declared(&layout)?;
    ensure!(
        aya::maps::MapInfo::from_pin(layout.map("LAYOUT"))?.id() == layout_id,
        "the layout record of the same version was replaced"
    );
    let peer_stats = MapShape::of_pin(&layout.map("PEER_STATS"))?;
    ensure!(
        peer_stats.flags & BPF_F_NO_PREALLOC != 0,
        "PEER_STATS is preallocated: {peer_stats:?}"
    );
    let link_of = |program: &str| -> Result<(u32, u32)> {
        let info = link_info(&obj_get(&layout.link(program))?)?;
        Ok((info.id, info.prog_id))
    };
    let links = [PROG_EGRESS, PROG_INGRESS_TC, PROG_INGRESS_XDP];
    let before: Vec<(u32, u32)> = links.iter().map(|p| link_of(p)).collect::<Result<_>>()?;

    // The value goes (as when the agent exits): everything stays attached
    // and traffic still flows through the programs.
    drop(wa);
    expect_attached(a, first)?;
    let sent_before = counters_from_pins(&layout)?;
    ping(&a.container, "10.77.2.2")?;
    ensure!(
        counters_from_pins(&layout)? > sent_before,
        "nothing encapsulated while no datapath value existed"
    );

    // A new value reopens the maps and swaps new programs into the same links.
    let wa = a.worker(move || EbpfDatapath::new(options))?;
    let again = setup(&wa, a)?;
    ensure!(again == state_a, "{again:?}");
    let second = program_ids(&wa)?;
    ensure!(
        second.egress != first.egress
            && second.ingress_tc != first.ingress_tc
            && second.ingress_xdp != first.ingress_xdp,
        "{first:?} -> {second:?}"
    );
    expect_attached(a, second)?;
    let after: Vec<(u32, u32)> = links.iter().map(|p| link_of(p)).collect::<Result<_>>()?;
    for ((link0, prog0), (link1, prog1)) in before.iter().zip(&after) {
        ensure!(
            link0 == link1 && prog0 != prog1,
            "expected the same link with a new program: {before:?} -> {after:?}"
        );
    }
    ensure!(peers(&wa)?.len() == 1, "the reopened maps lost the peer");
    ensure!(
        pinned_map_ids(&layout)? == new_ids,
        "maps that fit were replaced: {new_ids:?} -> {:?}",
        pinned_map_ids(&layout)?
    );
    ping(&a.container, "10.77.2.2")?;

    wa.run(|dp, rt| rt.block_on(dp.teardown()))?;
    let att = attached(&a.ns)?;
    ensure!(att == Attached::default(), "left attached: {att:?}");
    ensure!(
        !layout.root().exists(),
        "pins left in {}",
        layout.root().display()
    );
    wb.run(|dp, rt| rt.block_on(dp.teardown()))?;
    Ok(())
}

const BPF_F_NO_PREALLOC: u32 = 1;

/// The id of every pinned map, by name.
fn pinned_map_ids(layout: &PinLayout) -> Result<Vec<(String, u32)>> {
    let mut ids = Vec::new();
    for name in MAPS {
        let path = layout.map(name);
        if path.exists() {
            ids.push((name.to_owned(), aya::maps::MapInfo::from_pin(&path)?.id()));
        }
    }
    Ok(ids)
}

/// Every pinned map has exactly the type, sizes, capacity and flags the
/// embedded object declares.
fn expect_pinned_maps_as_declared(layout: &PinLayout) -> Result<()> {
    let declared = declared_shapes(EBPF_OBJECT, &[])?;
    ensure!(declared.len() == MAPS.len(), "{declared:?}");
    for (name, want) in declared {
        let have = MapShape::of_pin(&layout.map(name))?;
        ensure!(have == want, "pinned {name}: {have:?}, declared {want:?}");
    }
    Ok(())
}

/// Packets encapsulated so far, read from the pinned COUNTERS map.
fn counters_from_pins(layout: &PinLayout) -> Result<u64> {
    let state = overlay_agent::inspect::read(layout)?.context("no pins")?;
    Ok(state.counters.get(Reason::Encapsulated).packets)
}

/// Public IPs in KNOWN_VTEPS and in PEER_STATS, and REMOTE_SUBNETS.
type MapContents = (Vec<std::net::Ipv4Addr>, Vec<std::net::Ipv4Addr>, Vec<Peer>);

/// With room for two peers: a third is refused as [`DatapathError::MapFull`]
/// naming the full map, and leaves nothing in any map (no KNOWN_VTEPS or
/// PEER_STATS entry behind a REMOTE_SUBNETS insert that failed), while the
/// peers already in keep their traffic; a refused peer fits once one leaves.
#[test]
#[ignore = "needs root, network namespaces and eBPF: run `cargo xtask test`"]
fn a_full_peer_map_refuses_a_peer_whole_and_keeps_the_others() -> Result<()> {
    let lab = Lab::new("mf")?;
    let a = &lab.nodes[0];
    let b = &lab.nodes[1];
    let small = EbpfOptions {
        peer_capacity: 2,
        ..EbpfOptions::default()
    };
    let wa = a.worker(move || EbpfDatapath::new(small))?;
    let wb = b.worker(|| EbpfDatapath::new(EbpfOptions::default()))?;
    let state_a = setup(&wa, a)?;
    let state_b = setup(&wb, b)?;
    let peer_b = b.peer(state_b.vtep_mac)?;
    add(&wb, a.peer(state_a.vtep_mac)?)?;
    let fake = |n: u8, ip: &str| -> Result<Peer> {
        Ok(Peer {
            subnet: format!("10.77.{n}.0/24").parse()?,
            public_ip: ip.parse()?,
            vtep_mac: format!("02:42:00:00:00:{n:02x}").parse()?,
            v6: None,
        })
    };
    let try_add = |peer: Peer| wa.run(move |dp, rt| rt.block_on(dp.add_peer(&peer)));
    let full = |result: Result<(), DatapathError>| match result {
        Err(DatapathError::MapFull { map, capacity }) => Ok((map, capacity)),
        other => Err(anyhow::anyhow!("expected MapFull, got {other:?}")),
    };
    let maps = || -> Result<MapContents> {
        wa.run(|dp, _| -> Result<_> {
            let in_trie = dp.map_peers()?;
            let mut stats: Vec<_> = dp.peer_counters()?.into_keys().collect();
            stats.sort();
            let mut known = Vec::new();
            for ip in [
                "192.168.77.2",
                "192.168.77.3",
                "192.168.77.4",
                "192.168.77.6",
            ] {
                if dp.knows_vtep(ip.parse()?)? {
                    known.push(ip.parse()?);
                }
            }
            Ok((known, stats, in_trie))
        })
    };

    let f1 = fake(3, "192.168.77.3")?;
    add(&wa, peer_b)?;
    add(&wa, f1)?;
    // KNOWN_VTEPS is the first map to run out.
    let f2 = fake(4, "192.168.77.4")?;
    ensure!(full(try_add(f2))? == ("KNOWN_VTEPS", 2));
    let (known, stats, trie) = maps()?;
    ensure!(
        known == [peer_b.public_ip, f1.public_ip]
            && stats == [peer_b.public_ip, f1.public_ip]
            && trie == [peer_b, f1],
        "after the refusal: known {known:?}, stats {stats:?}, trie {trie:?}"
    );

    // A second subnet behind peer b's VTEP fills REMOTE_SUBNETS and leaves
    // room in KNOWN_VTEPS, so a new VTEP gets into KNOWN_VTEPS and
    // PEER_STATS before REMOTE_SUBNETS refuses it: both are undone, and
    // peer b's entry, which the shared subnet still uses, stays.
    remove(&wa, f1)?;
    let behind_b = Peer {
        subnet: "10.77.5.0/24".parse()?,
        ..peer_b
    };
    add(&wa, behind_b)?;
    let f4 = fake(6, "192.168.77.6")?;
    ensure!(full(try_add(f4))? == ("REMOTE_SUBNETS", 2));
    let (known, stats, trie) = maps()?;
    ensure!(
        known == [peer_b.public_ip] && stats == [peer_b.public_ip] && trie == [peer_b, behind_b],
        "after the undone insert: known {known:?}, stats {stats:?}, trie {trie:?}"
    );
    // Only what is whole in the maps counts as programmed; peer b's
    // traffic still flows both ways through the programs.
    let mut programmed = peers(&wa)?;
    programmed.sort_by_key(|p| p.subnet);
    ensure!(programmed == [peer_b, behind_b], "{programmed:?}");
    expect_programs_carry(a, &wa, &[(&a.container, "10.77.2.2")])?;

    // Room again: the refused peer goes in whole.
    remove(&wa, behind_b)?;
    add(&wa, f4)?;
    let (known, stats, trie) = maps()?;
    ensure!(
        known == [peer_b.public_ip, f4.public_ip]
            && stats == [peer_b.public_ip, f4.public_ip]
            && trie == [peer_b, f4],
        "after a peer left: known {known:?}, stats {stats:?}, trie {trie:?}"
    );

    wa.run(|dp, rt| rt.block_on(dp.teardown()))?;
    wb.run(|dp, rt| rt.block_on(dp.teardown()))?;
    Ok(())
}

/// Peers added and removed as batches (`add_peers`, `remove_peers`: the
/// reconciler's calls), with the maps written by `BPF_MAP_UPDATE_BATCH`
/// and room for three peers: the element a map refuses is matched to its
/// peer, which alone is refused (and leaves nothing in any map), while the
/// peers before and after it in the batch go in whole; a PEER_STATS entry
/// that exists is kept, not refused; and the batched entries carry traffic.
#[test]
#[ignore = "needs root, network namespaces and eBPF: run `cargo xtask test`"]
fn batched_peers_fill_the_maps_and_a_refused_one_fails_alone() -> Result<()> {
    let lab = Lab::new("mb")?;
    let a = &lab.nodes[0];
    let b = &lab.nodes[1];
    let small = EbpfOptions {
        peer_capacity: 3,
        ..EbpfOptions::default()
    };
    let wa = a.worker(move || EbpfDatapath::new(small))?;
    let wb = b.worker(|| EbpfDatapath::new(EbpfOptions::default()))?;
    let state_a = setup(&wa, a)?;
    let state_b = setup(&wb, b)?;
    let peer_b = b.peer(state_b.vtep_mac)?;
    add(&wb, a.peer(state_a.vtep_mac)?)?;
    let fake = |n: u8, ip: &str| -> Result<Peer> {
        Ok(Peer {
            subnet: format!("10.77.{n}.0/24").parse()?,
            public_ip: ip.parse()?,
            vtep_mac: format!("02:42:00:00:00:{n:02x}").parse()?,
            v6: None,
        })
    };
    let batch_add = |peers: Vec<Peer>| -> Vec<String> {
        wa.run(move |dp, rt| {
            rt.block_on(dp.add_peers(&peers))
                .into_iter()
                .map(|r| match r {
                    Ok(()) => "ok".to_owned(),
                    Err(DatapathError::MapFull { map, capacity }) => {
                        format!("full {map} {capacity}")
                    }
                    Err(e) => format!("error {}", e.reason()),
                })
                .collect()
        })
    };
    let ips = [
        "192.168.77.2",
        "192.168.77.3",
        "192.168.77.4",
        "192.168.77.6",
    ];
    let maps = || -> Result<MapContents> {
        wa.run(move |dp, _| -> Result<_> {
            let in_trie = dp.map_peers()?;
            let mut stats: Vec<_> = dp.peer_counters()?.into_keys().collect();
            stats.sort();
            let mut known = Vec::new();
            for ip in ips {
                if dp.knows_vtep(ip.parse()?)? {
                    known.push(ip.parse()?);
                }
            }
            Ok((known, stats, in_trie))
        })
    };

    // KNOWN_VTEPS runs out at the fourth public IP of the batch.
    let (f3, f4, f6) = (
        fake(3, "192.168.77.3")?,
        fake(4, "192.168.77.4")?,
        fake(6, "192.168.77.6")?,
    );
    let got = batch_add(vec![peer_b, f3, f4, f6]);
    ensure!(
        got == ["ok", "ok", "ok", "full KNOWN_VTEPS 3"],
        "first batch: {got:?}"
    );
    let (known, stats, trie) = maps()?;
    ensure!(
        known == [peer_b.public_ip, f3.public_ip, f4.public_ip]
            && stats == known
            && trie == [peer_b, f3, f4],
        "after the first batch: known {known:?}, stats {stats:?}, trie {trie:?}"
    );
    expect_programs_carry(a, &wa, &[(&a.container, "10.77.2.2")])?;

    let removed: Vec<bool> = wa.run(move |dp, rt| {
        rt.block_on(dp.remove_peers(&[f3, f4]))
            .iter()
            .map(Result::is_ok)
            .collect()
    });
    ensure!(removed == [true, true], "{removed:?}");

    // Two more subnets behind peer b's VTEP (its PEER_STATS entry exists:
    // kept) and a new VTEP: REMOTE_SUBNETS is full at the last one, whose
    // KNOWN_VTEPS and PEER_STATS entries are taken out again.
    let behind = |n: u8| Peer {
        subnet: format!("10.77.{n}.0/24").parse().unwrap(),
        ..peer_b
    };
    let got = batch_add(vec![behind(5), behind(8), f6]);
    ensure!(
        got == ["ok", "ok", "full REMOTE_SUBNETS 3"],
        "second batch: {got:?}"
    );
    let (known, stats, trie) = maps()?;
    ensure!(
        known == [peer_b.public_ip] && stats == known && trie == [peer_b, behind(5), behind(8)],
        "after the second batch: known {known:?}, stats {stats:?}, trie {trie:?}"
    );
    let mut programmed = peers(&wa)?;
    programmed.sort_by_key(|p| p.subnet);
    ensure!(
        programmed == [peer_b, behind(5), behind(8)],
        "{programmed:?}"
    );
    expect_programs_carry(a, &wa, &[(&a.container, "10.77.2.2")])?;

    wa.run(|dp, rt| rt.block_on(dp.teardown()))?;
    wb.run(|dp, rt| rt.block_on(dp.teardown()))?;
    Ok(())
}

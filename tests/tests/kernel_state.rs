//! Our datapaths leave the same kernel state as flanneld: for the same
//! overlay and the same remote lease, `flannel.<VNI>` (every vxlan attribute,
//! MTU, address) and the peer's neighbour, FDB entry and route on a host run by
//! the kernel fallback or the eBPF datapath equal those on a host programmed
//! by the iproute2 reference peer, field by field.

use anyhow::{Context, ensure};
use overlay_agent::{datapath::Peer, datapath::ebpf::IngressMode};
use overlay_tests::{
    cmd,
    lab::{Host, Lab, LabSpec},
    overlay::{Kind, Member, Overlay},
};
use serde_json::{Value, json};

fn json_of(out: &str) -> anyhow::Result<Value> {
    serde_json::from_str(out).with_context(|| format!("parsing {out:?}"))
}

/// The state that must match, with host-specific values (own addresses, MAC,
/// ifindexes, counters) replaced by what they are relative to the host.
fn kernel_state(host: &Host, dev: &str, own_mac: &str) -> anyhow::Result<Value> {
    let ns = host.ns.as_str();
    let link = json_of(&cmd::ip(ns, &["-j", "-d", "link", "show", dev])?)?;
    let link = &link[0];
    let mut info = link["linkinfo"]["info_data"].clone();
    ensure!(
        info["local"] == json!(host.underlay_ip.to_string()),
        "{dev} on {ns} has local {}",
        info["local"]
    );
    info["local"] = json!("<public ip>");
    ensure!(
        link["address"] == json!(own_mac),
        "{dev} MAC {} is not the published VTEP MAC {own_mac}",
        link["address"]
    );
    let mut flags: Vec<Value> = link["flags"].as_array().cloned().unwrap_or_default();
    flags.sort_by_key(|f| f.to_string());
    let addrs = json_of(&cmd::ip(ns, &["-j", "-4", "addr", "show", "dev", dev])?)?;
    let addrs: Vec<Value> = addrs[0]["addr_info"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|a| json!({"local": a["local"], "prefixlen": a["prefixlen"], "scope": a["scope"]}))
        .collect();
    let neigh = json_of(&cmd::ip(ns, &["-j", "neigh", "show", "dev", dev])?)?;
    let fdb = json_of(&cmd::run(
        None,
        &["bridge", "-n", ns, "-j", "fdb", "show", "dev", dev],
    )?)?;
    let routes = json_of(&cmd::ip(ns, &["-j", "route", "show", "dev", dev])?)?;
    let strip = |v: &Value, drop: &[&str]| -> Vec<Value> {
        v.as_array()
            .into_iter()
            .flatten()
            .map(|e| {
                let mut e = e.clone();
                if let Some(o) = e.as_object_mut() {
                    for k in drop {
                        o.remove(*k);
                    }
                }
                e
            })
            .collect()
    };
    Ok(json!({
        "vxlan": info,
        "mtu": link["mtu"],
        "flags": flags,
        "operstate": link["operstate"],
        "addresses": addrs,
        "neighbours": strip(&neigh, &[]),
        "fdb": strip(&fdb, &[]),
        // flanneld's netlink routes carry no protocol; iproute2 writes
        // "boot" and rtnetlink users choose their own: not part of the contract.
        "routes": strip(&routes, &["protocol"]),
    }))
}

#[test]
#[ignore = "needs root, network namespaces and eBPF: run `cargo xtask test`"]
fn our_datapaths_program_what_flanneld_programs() -> anyhow::Result<()> {
    let lab = Lab::build(&LabSpec::new("kstate", 3))?;
    let overlay = Overlay { vni: 9, port: 8472 };
    let dev = overlay.device();
    let reference = Member::join(lab.host(1), Kind::Reference, overlay)?;
    let fallback = Member::join(lab.host(2), Kind::Kernel, overlay)?;
    let ebpf = Member::join(lab.host(3), Kind::Ebpf(IngressMode::Tc), overlay)?;
    // One remote lease, the same for all three (a host that is not in the lab:
    // only the entries matter here).
    let remote = Peer {
        subnet: "10.5.77.0/24".parse()?,
        public_ip: "192.168.64.77".parse()?,
        vtep_mac: "0e:11:22:33:44:55".parse()?,
        v6: None,
    };
    for m in [&reference, &fallback, &ebpf] {
        m.add_peer(&remote)?;
    }
    let want = kernel_state(&reference.host, &dev, &reference.vtep_mac().to_string())?;
    eprintln!("flanneld (iproute2 reference) state: {want:#}");
    for m in [&fallback, &ebpf] {
        let got = kernel_state(&m.host, &dev, &m.vtep_mac().to_string())?;
        // Addresses differ by host (own subnet .0): compare their shape.
        let mut got_cmp = got.clone();
        let mut want_cmp = want.clone();
        for (v, h) in [(&mut got_cmp, &m.host), (&mut want_cmp, &reference.host)] {
            let expected = json!([{"local": h.subnet.network().to_string(), "prefixlen": 32, "scope": "global"}]);
            ensure!(
                v["addresses"] == expected,
                "{}: addresses {} (expected {expected})",
                h.ns,
                v["addresses"]
            );
            v["addresses"] = json!("<subnet .0/32>");
        }
        ensure!(
            got_cmp == want_cmp,
            "{} leaves different kernel state than flanneld:\n ours: {got:#}\n flanneld: {want:#}",
            m.kind
        );
    }
    // Removing the lease removes all three entries, as flanneld does.
    for m in [&reference, &fallback, &ebpf] {
        m.remove_peer(&remote)?;
        let s = kernel_state(&m.host, &dev, &m.vtep_mac().to_string())?;
        ensure!(
            s["neighbours"] == json!([]) && s["fdb"] == json!([]) && s["routes"] == json!([]),
            "{} left entries after remove_peer: {s:#}",
            m.kind
        );
    }
    drop((reference, fallback, ebpf));
    lab.destroy()
}

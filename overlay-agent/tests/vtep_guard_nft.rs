//! The known-VTEP guard's set elements changed over netfilter netlink
//! (`netlink::nft_elements`) against the real nf_tables of a fresh network
//! namespace, read back with `nft`: adds and removals of both families in
//! one transaction, a removal of an element that is not there, a refusal
//! named with its set, and the guard's own peer events going that way.

use std::{collections::BTreeSet, net::IpAddr, process::Command};

use anyhow::{Context, Result, ensure};
use overlay_agent::{
    datapath::{Peer, vtep_guard::VtepGuard},
    flannel::{lease::Peer6, mac::MacAddr},
    netlink::nft_elements::{self, ElementsError, NFPROTO_INET, SetChange},
    netns::NetnsWorker,
};

struct Netns(String);

impl Netns {
    fn new(tag: &str) -> Result<Self> {
        let name = format!("nftel-{tag}-{}", std::process::id());
        nft_cmd(&["ip", "netns", "add", &name])?;
        Ok(Netns(name))
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

fn nft_cmd(args: &[&str]) -> Result<String> {
    let out = Command::new(args[0]).args(&args[1..]).output()?;
    ensure!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8(out.stdout)?)
}

/// The elements of `inet overlay-vtep <set>` as nft lists them.
fn elements(ns: &str, set: &str) -> Result<BTreeSet<IpAddr>> {
    let json = nft_cmd(&[
        "ip",
        "netns",
        "exec",
        ns,
        "nft",
        "-j",
        "list",
        "set",
        "inet",
        "overlay-vtep",
        set,
    ])?;
    let v: serde_json::Value = serde_json::from_str(&json)?;
    let mut out = BTreeSet::new();
    for item in v["nftables"].as_array().context("nftables")? {
        if let Some(elems) = item["set"]["elem"].as_array() {
            for e in elems {
                out.insert(e.as_str().context("an address")?.parse()?);
            }
        }
    }
    Ok(out)
}

fn ips(list: &[&str]) -> BTreeSet<IpAddr> {
    list.iter().map(|s| s.parse().unwrap()).collect()
}

#[test]
#[ignore = "needs root and network namespaces: run `cargo xtask test`"]
fn set_elements_change_over_netlink_in_one_transaction() -> Result<()> {
    let ns = Netns::new("a")?;
    let w = NetnsWorker::spawn(&ns.0, || ()).context("worker")?;
    w.run(|_, _| VtepGuard::install(8472, true).map(drop))?;
    let add = |set: &'static str, list: &[&str]| SetChange {
        set,
        add: list.iter().map(|s| s.parse().unwrap()).collect(),
        remove: Vec::new(),
    };

    // Both families in one call.
    w.run(move |_, _| {
        nft_elements::apply(
            NFPROTO_INET,
            "overlay-vtep",
            &[
                add("vteps", &["192.168.1.1", "192.168.1.2"]),
                add("vteps6", &["fd98::1"]),
            ],
        )
    })?;
    ensure!(elements(&ns.0, "vteps")? == ips(&["192.168.1.1", "192.168.1.2"]));
    ensure!(elements(&ns.0, "vteps6")? == ips(&["fd98::1"]));

    // Adding what is there, removing what is and what is not: no error.
    w.run(move |_, _| {
        nft_elements::apply(
            NFPROTO_INET,
            "overlay-vtep",
            &[SetChange {
                set: "vteps",
                add: vec!["192.168.1.2".parse().unwrap()],
                remove: vec![
                    "192.168.1.1".parse().unwrap(),
                    "192.168.1.77".parse().unwrap(),
                ],
            }],
        )
    })?;
    ensure!(elements(&ns.0, "vteps")? == ips(&["192.168.1.2"]));

    // A set that does not exist: refused, named, and nothing of the
    // transaction applied (the add to `vteps` before it is not there).
    let refused = w.run(move |_, _| {
        nft_elements::apply(
            NFPROTO_INET,
            "overlay-vtep",
            &[
                add("vteps", &["192.168.1.3"]),
                add("nosuchset", &["10.0.0.1"]),
            ],
        )
    });
    match &refused {
        Err(ElementsError::Refused { set, source, .. }) => {
            ensure!(set == "nosuchset", "{refused:?}");
            ensure!(source.raw_os_error() == Some(libc::ENOENT), "{refused:?}");
        }
        other => anyhow::bail!("expected a refusal, got {other:?}"),
    }
    ensure!(elements(&ns.0, "vteps")? == ips(&["192.168.1.2"]));
    Ok(())
}

#[test]
#[ignore = "needs root and network namespaces: run `cargo xtask test`"]
fn the_guards_peer_events_reach_the_sets_without_nft() -> Result<()> {
    let ns = Netns::new("b")?;
    let w = NetnsWorker::spawn(&ns.0, || None::<VtepGuard>).context("worker")?;
    w.run(|g, _| -> Result<()> {
        *g = Some(VtepGuard::install(8472, true)?);
        Ok(())
    })?;
    let peer = Peer {
        subnet: "10.5.1.0/24".parse()?,
        public_ip: "192.168.1.1".parse()?,
        vtep_mac: MacAddr([2, 0, 0, 0, 0, 1]),
        v6: Some(Peer6 {
            subnet: "fd10:0:0:1::/64".parse()?,
            public_ip: "fd98::1".parse()?,
            vtep_mac: MacAddr([2, 0, 0, 0, 0, 2]),
        }),
    };
    // No nft on PATH in the worker from here on: a change that went
    // through `nft -f -` would fail.
    w.run(move |g, _| -> Result<()> {
        let g = g.as_mut().context("guard")?;
        let path = std::env::var_os("PATH");
        // SAFETY: the tests of this binary run one at a time (xtask runs
        // them with --test-threads=1), and nothing else reads PATH now.
        unsafe { std::env::set_var("PATH", "/nonexistent") };
        let r = g.admit(&peer).and_then(|()| g.commit(&peer));
        if let Some(p) = path {
            // SAFETY: as above.
            unsafe { std::env::set_var("PATH", p) };
        }
        r?;
        Ok(())
    })?;
    ensure!(elements(&ns.0, "vteps")? == ips(&["192.168.1.1"]));
    ensure!(elements(&ns.0, "vteps6")? == ips(&["fd98::1"]));
    w.run(move |g, _| -> Result<()> {
        let g = g.as_mut().context("guard")?;
        let path = std::env::var_os("PATH");
        // SAFETY: as above.
        unsafe { std::env::set_var("PATH", "/nonexistent") };
        let r = g.release(&peer);
        if let Some(p) = path {
            // SAFETY: as above.
            unsafe { std::env::set_var("PATH", p) };
        }
        r?;
        Ok(())
    })?;
    ensure!(elements(&ns.0, "vteps")?.is_empty());
    ensure!(elements(&ns.0, "vteps6")?.is_empty());
    Ok(())
}

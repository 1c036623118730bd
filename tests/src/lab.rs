//! The lab: hosts as network namespaces on a shared underlay, each with a
//! docker-style bridge and one container, wired as in the seed documents.
//!
//! ```text
//!  [c1] eth0 10.5.1.2/24            [c2] eth0 10.5.2.2/24
//!        |  veth, MTU 1450                 |
//!  [h1] vethc -- cni0 10.5.1.1/24    [h2] vethc -- cni0 10.5.2.1/24
//!       eth0 192.168.64.1/24              eth0 192.168.64.2/24
//!        |                                 |
//!  [sw]  h1 --------- br0 ---------------- h2 ---- x (optional outsider,
//!                                                     eth0 192.168.64.100/24)
//! ```
//!
//! A dual-stack lab ([`LabSpec::with_ipv6`]) adds IPv6 to the same wiring
//! ([`Host6`]): `eth0` fd64::<index>/64, `cni0` fd05:0:0:<index>::1/64, the
//! container fd05:0:0:<index>::2/64 with its default route via `cni0`. Other
//! labs have IPv6 disabled in every namespace.
//!
//! Every namespace is named `ov<short>-<pid>-<role>` so concurrent labs (other
//! tests, other people) never collide, and everything is removed when the
//! [`Lab`] is dropped, also while a failing test unwinds.

use std::net::{Ipv4Addr, Ipv6Addr};

use anyhow::{Context, Result, bail, ensure};
use ipnet::{Ipv4Net, Ipv6Net};

use crate::{cmd, netns};

/// The underlay interface name inside every host (and the outsider).
pub const UNDERLAY_DEV: &str = "eth0";
/// The docker-style bridge on every host.
pub const BRIDGE_DEV: &str = "cni0";
/// The host end of the container's veth.
pub const CONTAINER_VETH: &str = "vethc";
/// The underlay bridge inside the switch namespace.
pub const SWITCH_BRIDGE: &str = "br0";
/// What flannel's subnet.env gives containers: underlay MTU (1500) - 50.
pub const CONTAINER_MTU: u32 = 1450;

/// What to build.
#[derive(Clone, Debug)]
pub struct LabSpec {
    /// Short name of the test (a few letters); part of every namespace name.
    pub name: String,
    /// Number of hosts (1..=99).
    pub hosts: u8,
    /// Also build an underlay-only namespace (no overlay, no container).
    pub outsider: bool,
    /// Dual stack: IPv6 on the underlay, `cni0` and the containers ([`Host6`]).
    pub ipv6: bool,
}

impl LabSpec {
    pub fn new(name: &str, hosts: u8) -> LabSpec {
        LabSpec {
            name: name.to_owned(),
            hosts,
            outsider: false,
            ipv6: false,
        }
    }

    pub fn with_outsider(mut self) -> LabSpec {
        self.outsider = true;
        self
    }

    /// A dual-stack lab: every host and container also gets its [`Host6`].
    pub fn with_ipv6(mut self) -> LabSpec {
        self.ipv6 = true;
        self
    }
}

/// One host of the lab.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Host {
    /// 1-based; also the third octet of the subnet and the last of the underlay address.
    pub index: u8,
    /// The host's network namespace.
    pub ns: String,
    /// The namespace of the host's one container.
    pub container_ns: String,
    /// `eth0`, holding `underlay_ip`.
    pub underlay_dev: String,
    /// 192.168.64.<index>: the host's public IP.
    pub underlay_ip: Ipv4Addr,
    /// Name of the host's port on the switch bridge (inside the switch namespace).
    pub switch_port: String,
    /// The host's lease: 10.5.<index>.0/24.
    pub subnet: Ipv4Net,
    /// 10.5.<index>.1 on `cni0`.
    pub gateway: Ipv4Addr,
    /// 10.5.<index>.2 on the container's `eth0`.
    pub container_ip: Ipv4Addr,
}

impl Host {
    /// The subnet's network address (`10.5.<index>.0`), which flannel puts on
    /// `flannel.<VNI>` as a /32.
    pub fn subnet_addr(&self) -> Ipv4Addr {
        self.subnet.network()
    }
}

/// The IPv6 side of a host in a dual-stack lab (all addresses `nodad`, so
/// usable at once).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Host6 {
    /// fd64::<index>/64 on `eth0`: the host's `PublicIPv6`.
    pub underlay_ip: Ipv6Addr,
    /// The host's IPv6 lease: fd05:0:0:<index>::/64.
    pub subnet: Ipv6Net,
    /// fd05:0:0:<index>::1 on `cni0` (what flannel's subnet.env calls
    /// `FLANNEL_IPV6_SUBNET`).
    pub gateway: Ipv6Addr,
    /// fd05:0:0:<index>::2 on the container's `eth0`.
    pub container_ip: Ipv6Addr,
}

impl Host6 {
    /// Host `index`'s IPv6 side.
    pub fn of(index: u8) -> Host6 {
        let i = u16::from(index);
        let subnet = Ipv6Net::new(Ipv6Addr::new(0xfd05, 0, 0, i, 0, 0, 0, 0), 64)
            .expect("a /64 is a valid prefix");
        Host6 {
            underlay_ip: Ipv6Addr::new(0xfd64, 0, 0, 0, 0, 0, 0, i),
            subnet,
            gateway: Ipv6Addr::new(0xfd05, 0, 0, i, 0, 0, 0, 1),
            container_ip: Ipv6Addr::new(0xfd05, 0, 0, i, 0, 0, 0, 2),
        }
    }
}

/// The optional underlay-only namespace (a would-be attacker on the same L2).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outsider {
    pub ns: String,
    pub underlay_dev: String,
    pub underlay_ip: Ipv4Addr,
    pub switch_port: String,
}

/// A built lab. Dropping it deletes every namespace it created (and so every
/// veth, bridge and vxlan device in them) after killing processes left inside.
pub struct Lab {
    prefix: String,
    switch_ns: String,
    hosts: Vec<Host>,
    outsider: Option<Outsider>,
    /// Dual stack (see [`LabSpec::ipv6`]).
    ipv6: bool,
    /// Namespaces created so far, in creation order (removed in reverse).
    created: Vec<String>,
}

/// The namespace prefix for a test name in this process: `ov<short>-<pid>-`.
pub fn prefix_for(name: &str) -> String {
    format!("ov{name}-{}-", std::process::id())
}

/// Namespaces whose name starts with `prefix` (normally none once a lab is gone).
pub fn namespaces_with_prefix(prefix: &str) -> Result<Vec<String>> {
    let out = cmd::run(None, &["ip", "netns", "list"])?;
    Ok(out
        .lines()
        // `ip netns list` prints "name (id: N)" for namespaces with an id.
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(prefix))
        .map(str::to_owned)
        .collect())
}

impl Lab {
    /// Builds the lab described by `spec`. On error, whatever was created is removed.
    pub fn build(spec: &LabSpec) -> Result<Lab> {
        ensure!(
            (1..=99).contains(&spec.hosts),
            "a lab has 1..=99 hosts, not {}",
            spec.hosts
        );
        ensure!(
            !spec.name.is_empty()
                && spec.name.len() <= 8
                && spec.name.chars().all(|c| c.is_ascii_alphanumeric()),
            "lab name {:?} must be 1-8 ASCII letters/digits",
            spec.name
        );
        reap_stale(&spec.name);
        let prefix = prefix_for(&spec.name);
        let leftovers = namespaces_with_prefix(&prefix)?;
        ensure!(
            leftovers.is_empty(),
            "namespaces {leftovers:?} already exist: another lab named {:?} is alive in this process",
            spec.name
        );
        let mut lab = Lab {
            switch_ns: format!("{prefix}sw"),
            prefix,
            hosts: Vec::new(),
            outsider: None,
            ipv6: spec.ipv6,
            created: Vec::new(),
        };
        lab.build_switch()?;
        for index in 1..=spec.hosts {
            let host = lab.build_host(index)?;
            lab.hosts.push(host);
        }
        if spec.outsider {
            let outsider = lab.build_outsider()?;
            lab.outsider = Some(outsider);
        }
        Ok(lab)
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    pub fn switch_ns(&self) -> &str {
        &self.switch_ns
    }

    pub fn hosts(&self) -> &[Host] {
        &self.hosts
    }

    /// Host by 1-based index.
    pub fn host(&self, index: u8) -> &Host {
        self.hosts
            .iter()
            .find(|h| h.index == index)
            .unwrap_or_else(|| panic!("lab has no host {index}"))
    }

    pub fn outsider(&self) -> Option<&Outsider> {
        self.outsider.as_ref()
    }

    /// Host `index`'s IPv6 side, in a dual-stack lab.
    pub fn host6(&self, index: u8) -> Option<Host6> {
        self.ipv6.then(|| Host6::of(self.host(index).index))
    }

    /// Every namespace this lab created.
    pub fn namespaces(&self) -> &[String] {
        &self.created
    }

    /// A namespace; with `ipv6` (hosts and containers of a dual-stack lab)
    /// IPv6 stays on, without duplicate address detection.
    fn add_netns(&mut self, name: String, ipv6: bool) -> Result<String> {
        cmd::run(None, &["ip", "netns", "add", &name])?;
        self.created.push(name.clone());
        if ipv6 {
            // Set before any device exists, so every one inherits it: its
            // link-local address is usable at once.
            netns::sysctl(
                &name,
                &[
                    ("net.ipv6.conf.all.disable_ipv6", "0"),
                    ("net.ipv6.conf.default.disable_ipv6", "0"),
                    ("net.ipv6.conf.all.accept_dad", "0"),
                    ("net.ipv6.conf.default.accept_dad", "0"),
                ],
            )?;
        } else {
            // No IPv6 anywhere, so no router/neighbour solicitations or MLD
            // reports show up on the vxlan device and its statistics count
            // only our traffic. (The switch's bridge forwards IPv6 frames
            // with IPv6 off in its own namespace.)
            netns::sysctl(
                &name,
                &[
                    ("net.ipv6.conf.all.disable_ipv6", "1"),
                    ("net.ipv6.conf.default.disable_ipv6", "1"),
                ],
            )?;
        }
        cmd::ip(&name, &["link", "set", "lo", "up"])?;
        Ok(name)
    }

    fn build_switch(&mut self) -> Result<()> {
        let sw = self.add_netns(self.switch_ns.clone(), false)?;
        cmd::ip(&sw, &["link", "add", SWITCH_BRIDGE, "type", "bridge"])?;
        cmd::ip(&sw, &["link", "set", SWITCH_BRIDGE, "up"])?;
        Ok(())
    }

    /// Creates `eth0` in `ns` with its peer `port` on the switch bridge.
    fn plug_into_switch(&self, ns: &str, port: &str, addr: Ipv4Addr) -> Result<()> {
        let sw = self.switch_ns.as_str();
        cmd::ip(
            ns,
            &[
                "link",
                "add",
                UNDERLAY_DEV,
                "type",
                "veth",
                "peer",
                "name",
                port,
                "netns",
                sw,
            ],
        )?;
        cmd::ip(sw, &["link", "set", port, "master", SWITCH_BRIDGE])?;
        cmd::ip(sw, &["link", "set", port, "up"])?;
        cmd::ip(
            ns,
            &["addr", "add", &format!("{addr}/24"), "dev", UNDERLAY_DEV],
        )?;
        cmd::ip(ns, &["link", "set", UNDERLAY_DEV, "up"])?;
        Ok(())
    }

    fn build_host(&mut self, index: u8) -> Result<Host> {
        let host = Host {
            index,
            ns: format!("{}h{index}", self.prefix),
            container_ns: format!("{}c{index}", self.prefix),
            underlay_dev: UNDERLAY_DEV.to_owned(),
            underlay_ip: Ipv4Addr::new(192, 168, 64, index),
            switch_port: format!("h{index}"),
            subnet: Ipv4Net::new(Ipv4Addr::new(10, 5, index, 0), 24)?,
            gateway: Ipv4Addr::new(10, 5, index, 1),
            container_ip: Ipv4Addr::new(10, 5, index, 2),
        };
        let h = self.add_netns(host.ns.clone(), self.ipv6)?;
        netns::sysctl(
            &h,
            &[
                ("net.ipv4.ip_forward", "1"),
                ("net.ipv4.conf.all.rp_filter", "1"),
                ("net.ipv4.conf.default.rp_filter", "1"),
            ],
        )?;
        self.plug_into_switch(&h, &host.switch_port, host.underlay_ip)?;

        cmd::ip(&h, &["link", "add", BRIDGE_DEV, "type", "bridge"])?;
        cmd::ip(
            &h,
            &[
                "addr",
                "add",
                &format!("{}/24", host.gateway),
                "dev",
                BRIDGE_DEV,
            ],
        )?;
        cmd::ip(&h, &["link", "set", BRIDGE_DEV, "up"])?;

        let c = self.add_netns(host.container_ns.clone(), self.ipv6)?;
        let mtu = CONTAINER_MTU.to_string();
        cmd::ip(
            &c,
            &[
                "link",
                "add",
                "eth0",
                "mtu",
                &mtu,
                "type",
                "veth",
                "peer",
                "name",
                CONTAINER_VETH,
                "mtu",
                &mtu,
                "netns",
                &h,
            ],
        )?;
        cmd::ip(&h, &["link", "set", CONTAINER_VETH, "master", BRIDGE_DEV])?;
        cmd::ip(&h, &["link", "set", CONTAINER_VETH, "up"])?;
        cmd::ip(
            &c,
            &[
                "addr",
                "add",
                &format!("{}/24", host.container_ip),
                "dev",
                "eth0",
            ],
        )?;
        cmd::ip(&c, &["link", "set", "eth0", "up"])?;
        cmd::ip(
            &c,
            &["route", "add", "default", "via", &host.gateway.to_string()],
        )?;

        // Strict reverse-path filtering on every device, as on a hardened host:
        // decapsulated packets must be seen arriving on flannel.<VNI> to pass.
        let per_dev: Vec<String> = [UNDERLAY_DEV, BRIDGE_DEV, CONTAINER_VETH, "lo"]
            .iter()
            .map(|d| format!("net/ipv4/conf/{d}/rp_filter"))
            .collect();
        let settings: Vec<(&str, &str)> = per_dev.iter().map(|k| (k.as_str(), "1")).collect();
        netns::sysctl(&h, &settings)?;
        if self.ipv6 {
            self.add_ipv6(&host)?;
        }
        Ok(host)
    }

    /// The IPv6 side of a dual-stack host ([`Host6`]): forwarding on, the
    /// addresses of `eth0`, `cni0` and the container, its default route.
    fn add_ipv6(&self, host: &Host) -> Result<()> {
        let v6 = Host6::of(host.index);
        let (h, c) = (host.ns.as_str(), host.container_ns.as_str());
        netns::sysctl(h, &[("net.ipv6.conf.all.forwarding", "1")])?;
        let addr = |ns: &str, ip: Ipv6Addr, dev: &str| {
            cmd::ip(
                ns,
                &["addr", "add", &format!("{ip}/64"), "dev", dev, "nodad"],
            )
        };
        addr(h, v6.underlay_ip, UNDERLAY_DEV)?;
        addr(h, v6.gateway, BRIDGE_DEV)?;
        addr(c, v6.container_ip, "eth0")?;
        cmd::ip(
            c,
            &[
                "-6",
                "route",
                "add",
                "default",
                "via",
                &v6.gateway.to_string(),
            ],
        )?;
        Ok(())
    }

    fn build_outsider(&mut self) -> Result<Outsider> {
        let outsider = Outsider {
            ns: format!("{}x", self.prefix),
            underlay_dev: UNDERLAY_DEV.to_owned(),
            underlay_ip: Ipv4Addr::new(192, 168, 64, 100),
            switch_port: "x".to_owned(),
        };
        let x = self.add_netns(outsider.ns.clone(), false)?;
        self.plug_into_switch(&x, &outsider.switch_port, outsider.underlay_ip)?;
        Ok(outsider)
    }

    /// Plain routing between the hosts' subnets over the underlay (no overlay):
    /// the ceiling the benchmark compares against.
    pub fn route_plain(&self) -> Result<()> {
        for h in &self.hosts {
            for other in self.hosts.iter().filter(|o| o.index != h.index) {
                cmd::ip(
                    &h.ns,
                    &[
                        "route",
                        "replace",
                        &other.subnet.to_string(),
                        "via",
                        &other.underlay_ip.to_string(),
                        "dev",
                        UNDERLAY_DEV,
                    ],
                )?;
                if self.ipv6 {
                    let theirs = Host6::of(other.index);
                    cmd::ip(
                        &h.ns,
                        &[
                            "-6",
                            "route",
                            "replace",
                            &theirs.subnet.to_string(),
                            "via",
                            &theirs.underlay_ip.to_string(),
                            "dev",
                            UNDERLAY_DEV,
                        ],
                    )?;
                }
            }
        }
        Ok(())
    }

    /// Deletes everything now (also done on drop) and checks that no namespace
    /// with this lab's prefix is left.
    pub fn destroy(mut self) -> Result<()> {
        let failures = self.cleanup();
        if !failures.is_empty() {
            bail!("lab cleanup failed: {}", failures.join("; "));
        }
        let left = namespaces_with_prefix(&self.prefix)?;
        ensure!(left.is_empty(), "namespaces left after cleanup: {left:?}");
        Ok(())
    }

    fn cleanup(&mut self) -> Vec<String> {
        let mut failures = Vec::new();
        while let Some(ns) = self.created.pop() {
            if let Err(e) = kill_processes_in(&ns) {
                failures.push(format!("{ns}: {e:#}"));
            }
            if let Err(e) = cmd::run(None, &["ip", "netns", "del", &ns]) {
                failures.push(format!("{ns}: {e:#}"));
            }
        }
        failures
    }
}

/// Removes namespaces of a lab with the same name whose process is gone (a
/// test run that was killed before it could clean up), so they do not pile up.
/// Namespaces of live processes are never touched.
fn reap_stale(name: &str) {
    let head = format!("ov{name}-");
    let Ok(all) = namespaces_with_prefix(&head) else {
        return;
    };
    for ns in all {
        let Some(pid) = ns[head.len()..]
            .split('-')
            .next()
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == std::process::id() || std::path::Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        eprintln!("lab: removing {ns}, left by process {pid} which no longer runs");
        let _ = kill_processes_in(&ns);
        let _ = cmd::run(None, &["ip", "netns", "del", &ns]);
    }
}

/// Kills processes whose network namespace is `ns` (e.g. a capture or a
/// traffic tool a panicking test did not stop), never this process itself.
fn kill_processes_in(ns: &str) -> Result<()> {
    let out = cmd::run(None, &["ip", "netns", "pids", ns]).context("listing pids")?;
    let me = std::process::id();
    for pid in out.split_whitespace().filter_map(|p| p.parse::<u32>().ok()) {
        if pid == me {
            continue;
        }
        // SAFETY: kill(2) on a pid that lives in a namespace this lab created.
        unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
    }
    Ok(())
}

impl Drop for Lab {
    fn drop(&mut self) {
        for failure in self.cleanup() {
            eprintln!("lab cleanup: {failure}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv6_side_mirrors_the_ipv4_numbering() {
        let v6 = Host6::of(2);
        assert_eq!(v6.underlay_ip.to_string(), "fd64::2");
        assert_eq!(v6.subnet.to_string(), "fd05:0:0:2::/64");
        assert_eq!(v6.gateway.to_string(), "fd05:0:0:2::1");
        assert_eq!(v6.container_ip.to_string(), "fd05:0:0:2::2");
        assert!(v6.subnet.contains(&v6.gateway) && v6.subnet.contains(&v6.container_ip));
        assert_ne!(Host6::of(1).subnet, v6.subnet);
        let spec = LabSpec::new("x", 2);
        assert!(!spec.ipv6 && spec.with_ipv6().ipv6);
    }
}

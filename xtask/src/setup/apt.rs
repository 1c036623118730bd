//! Debian packages: which are missing (one `dpkg-query` for all), and
//! installing them non-interactively.

use std::process::Command;

use anyhow::Result;

use crate::run;

/// What the build, the tests, the lab and the benchmark run, and why.
pub const PACKAGES: &[(&str, &str)] = &[
    (
        "llvm-22-dev",
        "libLLVM 22 for bpf-linker (must match the pinned nightly's LLVM)",
    ),
    ("etcd-server", "etcd, the control plane's store"),
    ("etcd-client", "etcdctl"),
    (
        "protobuf-compiler",
        "protoc, which etcd-client's build script needs (overlay-agent)",
    ),
    (
        "libprotobuf-dev",
        "the well-known .proto files that protoc includes",
    ),
    ("bpftool", "inspecting programs and maps"),
    (
        "iproute2",
        "ip, bridge, tc: the lab and the flannel-like kernel peer",
    ),
    ("iputils-ping", "ping across the overlay"),
    ("iperf3", "TCP/UDP transfers and the benchmark"),
    ("sockperf", "request/response latency in the benchmark"),
    ("tcpdump", "underlay captures"),
    ("tshark", "decoding captures as VXLAN"),
    ("ethtool", "offload settings and NIC statistics"),
    (
        "iptables",
        "the agent's rules (iptables-restore), both backends in the tests",
    ),
    (
        "nftables",
        "nft: the agent's table in EnableNFTables mode (nft -f), masquerade.rs",
    ),
    ("systemd", "systemd-analyze verify of deploy/systemd's unit"),
    (
        "conntrack",
        "the fast path's conntrack checks (entries listed per namespace)",
    ),
    ("procps", "sysctl"),
    (
        "curl",
        "scraping /healthz, /readyz and /metrics in the tests",
    ),
    ("openssl", "certificates for the etcd TLS tests"),
    (
        "docker.io",
        "dockerd 20.10 and its CLI, run in lab hosts with mk-docker-opts' options (tests/tests/docker.rs)",
    ),
    (
        "debootstrap",
        "the image's Debian base, from this machine's apt sources (`cargo xtask image`; no registry is reachable)",
    ),
    (
        "busybox-static",
        "a static busybox, the one binary of the image docker.rs imports (no registry is reachable)",
    ),
    (
        "containernetworking-plugins",
        "the CNI reference plugins (bridge, host-local, portmap, loopback) that make the kube tests' pods",
    ),
    (
        "python3-pip",
        "pip for Debian's Python, which installs the PyPI packages of setup/pip.rs",
    ),
    (
        "python3-kubernetes",
        "the official Python client, one of the real clients the kube API stand-in is proven against",
    ),
];

/// Packages from `wanted` that are not fully installed.
pub fn missing(wanted: &[&str]) -> Result<Vec<String>> {
    // dpkg-query exits 1 when any name is unknown and still prints the known ones,
    // so the exit status is not the answer; the printed states are.
    let mut cmd = Command::new("dpkg-query");
    cmd.arg("-W")
        .arg("-f=${Package}\t${db:Status-Abbrev}\n")
        .args(wanted);
    let out = cmd
        .output()
        .map_err(|e| anyhow::anyhow!("cannot run dpkg-query (is this Debian?): {e}"))?;
    Ok(missing_from_query(
        wanted,
        &String::from_utf8_lossy(&out.stdout),
    ))
}

/// Parses `dpkg-query -W -f='${Package}\t${db:Status-Abbrev}\n'` output: a
/// package counts as present only in state `ii` (desired install, installed).
pub fn missing_from_query(wanted: &[&str], query_output: &str) -> Vec<String> {
    let installed: Vec<&str> = query_output
        .lines()
        .filter_map(|l| {
            let (name, status) = l.split_once('\t')?;
            // Multi-arch packages print `name:arch`.
            let name = name.split(':').next().unwrap_or(name);
            status.trim_end().starts_with("ii").then_some(name)
        })
        .collect();
    wanted
        .iter()
        .filter(|w| !installed.contains(w))
        .map(|w| (*w).to_owned())
        .collect()
}

pub fn install(packages: &[String]) -> Result<()> {
    let apt = |args: &[&str]| {
        let mut cmd = Command::new("apt-get");
        cmd.env("DEBIAN_FRONTEND", "noninteractive")
            // Another apt run (unattended upgrades, a colleague) holds the lock for a while.
            .args(["-o", "DPkg::Lock::Timeout=600"])
            .args(args);
        cmd
    };
    run::status(&mut apt(&["update", "-q"]))?;
    let mut install = apt(&["install", "-y", "-q"]);
    install.args(packages);
    run::status(&mut install)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_ii_counts_as_installed() {
        let out = "iperf3\tii \nbpftool\trc \ntshark\tiU \nlibc6:amd64\tii \n";
        let wanted = ["iperf3", "bpftool", "tshark", "libc6", "sockperf"];
        assert_eq!(
            missing_from_query(&wanted, out),
            ["bpftool", "tshark", "sockperf"]
        );
    }

    #[test]
    fn real_dpkg_query_reports_a_fake_package_missing() {
        // dpkg itself is always installed on Debian; the other name cannot exist.
        let got = missing(&["dpkg", "no-such-package-xtask-probe"]).unwrap();
        assert_eq!(got, ["no-such-package-xtask-probe"]);
    }

    #[test]
    fn package_list_has_no_duplicates() {
        let mut names: Vec<_> = PACKAGES.iter().map(|(n, _)| *n).collect();
        names.sort_unstable();
        let before = names.len();
        names.dedup();
        assert_eq!(before, names.len());
    }
}

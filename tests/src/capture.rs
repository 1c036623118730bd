//! Captures on the underlay (tcpdump) and what tshark decodes from them.
//!
//! The capture runs on a host's port of the switch bridge, so it sees exactly
//! the frames that host put on (and received from) the wire.

use std::{
    net::{Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context, Result, bail, ensure};

use crate::cmd::{self, Background};

/// A running tcpdump writing a pcap file.
pub struct Capture {
    process: Background,
    path: PathBuf,
}

impl Capture {
    /// Starts `tcpdump -i <iface> <filter>` in namespace `ns`, writing `path`.
    /// Returns once tcpdump is listening, so nothing sent afterwards is missed.
    pub fn start(ns: &str, iface: &str, filter: &str, path: &Path) -> Result<Capture> {
        let _ = std::fs::remove_file(path);
        let file = path.to_str().context("pcap path is not UTF-8")?;
        let mut args = vec![
            "tcpdump",
            "-i",
            iface,
            "-n",
            // Deliver every packet to tcpdump at once: with a ring buffer timeout
            // the last packets could still be in the kernel when we stop it.
            "--immediate-mode",
            "-U",
            // A 64 MiB socket buffer (the default is 2 MiB, some thirty GSO
            // aggregates): on a busy machine tcpdump is not scheduled for a
            // while, and a full buffer silently drops what arrives meanwhile.
            "-B",
            "65536",
            "-s",
            "0",
            // Keep root: the file may live in a directory only root can write.
            "-Z",
            "root",
            "-w",
            file,
        ];
        args.extend(filter.split_whitespace());
        let mut process = Background::spawn(Some(ns), &args)?;
        process.wait_for_stderr("listening on", Duration::from_secs(10))?;
        Ok(Capture {
            process,
            path: path.to_owned(),
        })
    }

    /// Stops the capture (tcpdump flushes on SIGTERM) and returns the file.
    pub fn stop(self) -> Result<PathBuf> {
        // Frames already on the wire still have to travel through the capture socket.
        std::thread::sleep(Duration::from_millis(300));
        self.process.stop(Duration::from_secs(10))?;
        ensure!(
            self.path.exists(),
            "tcpdump wrote no file at {}",
            self.path.display()
        );
        Ok(self.path)
    }
}

/// One VXLAN frame as tshark decodes it (outer headers first, then the inner).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VxlanFrame {
    pub number: u64,
    pub outer_src: Ipv4Addr,
    pub outer_dst: Ipv4Addr,
    pub outer_ttl: u8,
    pub outer_df: bool,
    pub udp_src: u16,
    pub udp_dst: u16,
    pub udp_checksum: u16,
    /// The 16-bit flags field as tshark shows it (0x0800: only the I flag).
    pub vxlan_flags: u16,
    pub vni: u32,
    pub outer_eth_src: String,
    pub outer_eth_dst: String,
    pub inner_eth_src: String,
    pub inner_eth_dst: String,
    /// Inner IPv4 addresses (None for a non-IPv4 inner frame).
    pub inner_src: Option<Ipv4Addr>,
    pub inner_dst: Option<Ipv4Addr>,
    /// tshark's protocol stack, e.g. `eth:ethertype:ip:udp:vxlan:eth:ethertype:ip:tcp`.
    pub protocols: String,
}

const FIELDS: &[&str] = &[
    "frame.number",
    "ip.src",
    "ip.dst",
    "ip.ttl",
    "ip.flags.df",
    "udp.srcport",
    "udp.dstport",
    "udp.checksum",
    "vxlan.flags",
    "vxlan.vni",
    "eth.src",
    "eth.dst",
    "frame.protocols",
];

fn tshark(pcap: &Path, port: u16, extra: &[&str]) -> Result<String> {
    let file = pcap.to_str().context("pcap path is not UTF-8")?;
    let decode = format!("udp.port=={port},vxlan");
    let mut args = vec![
        "tshark",
        "-n",
        "-r",
        file,
        "-d",
        &decode,
        // Validate the outer (and inner) IPv4 header checksums: the eBPF
        // programs write them by hand.
        "-o",
        "ip.check_checksum:TRUE",
    ];
    args.extend_from_slice(extra);
    cmd::run(None, &args)
}

fn parse_u<T: std::str::FromStr>(s: &str, what: &str) -> Result<T> {
    let s = s.trim();
    let parsed = if let Some(hex) = s.strip_prefix("0x") {
        u64::from_str_radix(hex, 16)
            .ok()
            .and_then(|v| v.to_string().parse().ok())
    } else {
        s.parse().ok()
    };
    parsed.with_context(|| format!("parsing {what} from {s:?}"))
}

/// `fields` of every frame of `pcap` that `filter` selects, one row of
/// columns per frame (a field's occurrences joined by `,`), with `extra`
/// options for tshark.
fn field_rows(
    pcap: &Path,
    port: u16,
    extra: &[&str],
    filter: &str,
    fields: &[&str],
) -> Result<Vec<Vec<String>>> {
    let mut args = extra.to_vec();
    args.extend([
        "-Y",
        filter,
        "-T",
        "fields",
        "-E",
        "separator=/t",
        "-E",
        "occurrence=a",
        "-E",
        "aggregator=,",
    ]);
    for f in fields {
        args.push("-e");
        args.push(f);
    }
    let out = tshark(pcap, port, &args)?;
    let mut rows = Vec::new();
    for line in out.lines().filter(|l| !l.trim().is_empty()) {
        let cols: Vec<String> = line.split('\t').map(str::to_owned).collect();
        ensure!(
            cols.len() == fields.len(),
            "unexpected tshark line {line:?}"
        );
        rows.push(cols);
    }
    Ok(rows)
}

/// Every frame tshark decodes as VXLAN on UDP `port` in `pcap`.
pub fn vxlan_frames(pcap: &Path, port: u16) -> Result<Vec<VxlanFrame>> {
    let mut frames = Vec::new();
    for cols in field_rows(pcap, port, &[], "vxlan", FIELDS)? {
        // First occurrence = outer header, second = inner.
        let nth = |col: usize, i: usize| cols[col].split(',').nth(i).unwrap_or("");
        let inner_ip = |col: usize| nth(col, 1).parse::<Ipv4Addr>().ok();
        frames.push(VxlanFrame {
            number: parse_u(&cols[0], "frame number")?,
            outer_src: nth(1, 0).parse().context("outer ip.src")?,
            outer_dst: nth(2, 0).parse().context("outer ip.dst")?,
            outer_ttl: parse_u(nth(3, 0), "outer ttl")?,
            outer_df: matches!(nth(4, 0), "1" | "True" | "true"),
            udp_src: parse_u(nth(5, 0), "udp.srcport")?,
            udp_dst: parse_u(nth(6, 0), "udp.dstport")?,
            udp_checksum: parse_u(nth(7, 0), "udp.checksum")?,
            vxlan_flags: parse_u(&cols[8], "vxlan.flags")?,
            vni: parse_u(&cols[9], "vxlan.vni")?,
            outer_eth_src: nth(10, 0).to_owned(),
            outer_eth_dst: nth(11, 0).to_owned(),
            inner_eth_src: nth(10, 1).to_owned(),
            inner_eth_dst: nth(11, 1).to_owned(),
            inner_src: inner_ip(1),
            inner_dst: inner_ip(2),
            protocols: cols[12].to_owned(),
        });
    }
    Ok(frames)
}

/// One VXLAN-over-IPv6 frame as tshark decodes it, with its verdict on the
/// outer UDP checksum (which IPv6 requires; flannel's kernel peers drop a
/// datagram whose checksum is 0 or wrong).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Vxlan6Frame {
    pub outer_src: Ipv6Addr,
    pub outer_dst: Ipv6Addr,
    pub hop_limit: u8,
    pub udp_dst: u16,
    pub udp_checksum: u16,
    /// tshark's `udp.checksum.status` on the outer header: 1 good.
    pub checksum_good: bool,
    pub vni: u32,
    pub inner_eth_src: String,
    pub inner_eth_dst: String,
    pub protocols: String,
}

const FIELDS6: &[&str] = &[
    "ipv6.src",
    "ipv6.dst",
    "ipv6.hlim",
    "udp.dstport",
    "udp.checksum",
    "udp.checksum.status",
    "vxlan.vni",
    "eth.src",
    "eth.dst",
    "frame.protocols",
];

/// Every frame tshark decodes as VXLAN over IPv6 on UDP `port` in `pcap`,
/// the outer UDP checksum verified.
pub fn vxlan6_frames(pcap: &Path, port: u16) -> Result<Vec<Vxlan6Frame>> {
    let checksums = ["-o", "udp.check_checksum:TRUE"];
    let mut frames = Vec::new();
    for cols in field_rows(pcap, port, &checksums, "vxlan && ipv6", FIELDS6)? {
        // First occurrence = outer header, second = inner.
        let nth = |col: usize, i: usize| cols[col].split(',').nth(i).unwrap_or("");
        frames.push(Vxlan6Frame {
            outer_src: nth(0, 0).parse().context("outer ipv6.src")?,
            outer_dst: nth(1, 0).parse().context("outer ipv6.dst")?,
            hop_limit: parse_u(nth(2, 0), "hop limit")?,
            udp_dst: parse_u(nth(3, 0), "udp.dstport")?,
            udp_checksum: parse_u(nth(4, 0), "udp.checksum")?,
            checksum_good: nth(5, 0) == "1",
            vni: parse_u(&cols[6], "vxlan.vni")?,
            inner_eth_src: nth(7, 1).to_owned(),
            inner_eth_dst: nth(8, 1).to_owned(),
            protocols: cols[9].to_owned(),
        });
    }
    Ok(frames)
}

/// Frames tshark finds malformed, or with an expert item of severity warning or
/// worse (bad IPv4 header checksum, bogus lengths, ...), as
/// "frame N: message" lines. TCP sequence analysis ("previous segment not
/// captured") describes the capture, not the packet, and is left out.
pub fn problems(pcap: &Path, port: u16) -> Result<Vec<String>> {
    let out = tshark(
        pcap,
        port,
        &[
            "-Y",
            "_ws.malformed || _ws.expert.severity >= 0x00600000",
            "-T",
            "fields",
            "-E",
            "separator=/t",
            "-E",
            "occurrence=a",
            "-E",
            "aggregator=|",
            "-e",
            "frame.number",
            "-e",
            "_ws.expert.severity",
            "-e",
            "_ws.expert.group",
            "-e",
            "_ws.expert.message",
            "-e",
            "_ws.malformed",
        ],
    )?;
    let mut found = Vec::new();
    for line in out.lines().filter(|l| !l.trim().is_empty()) {
        let cols: Vec<&str> = line.split('\t').collect();
        let get = |i: usize| cols.get(i).copied().unwrap_or("");
        let severities: Vec<&str> = get(1).split('|').collect();
        let groups: Vec<&str> = get(2).split('|').collect();
        let messages: Vec<&str> = get(3).split('|').collect();
        let malformed = !get(4).is_empty();
        let serious: Vec<String> = messages
            .iter()
            .enumerate()
            .filter(|(i, _)| {
                let sev = severities
                    .get(*i)
                    .and_then(|s| parse_u::<u64>(s, "severity").ok())
                    .unwrap_or(u64::MAX);
                let group = groups
                    .get(*i)
                    .and_then(|s| parse_u::<u64>(s, "group").ok())
                    .unwrap_or(0);
                // PI_WARN and up; PI_SEQUENCE (0x02000000) is TCP's capture analysis.
                sev >= 0x0060_0000 && group != 0x0200_0000
            })
            .map(|(_, m)| (*m).to_owned())
            .collect();
        if malformed || !serious.is_empty() {
            found.push(format!(
                "frame {}: {}{}",
                get(0),
                if malformed { "MALFORMED " } else { "" },
                serious.join("; ")
            ));
        }
    }
    Ok(found)
}

/// Asserts `pcap` has no problem frames (see [`problems`]).
pub fn assert_clean(pcap: &Path, port: u16) -> Result<()> {
    let found = problems(pcap, port)?;
    if !found.is_empty() {
        bail!(
            "{} has {} problem frame(s), e.g.: {}",
            pcap.display(),
            found.len(),
            found[..found.len().min(10)].join(" / ")
        );
    }
    Ok(())
}

//! The `flannel.<VNI>` vxlan device, created (or adopted) as flanneld does:
//! `ip link add flannel.<VNI> type vxlan id <VNI> local <PublicIP> dev <underlay>
//! dstport <port> nolearning`, MTU = underlay MTU - 50, address
//! `<subnet network address>/32`, up.
//!
//! And its IPv6 twin of a dual-stack node, `flannel-v6.<VNI>`
//! ([`VxlanDeviceSpec<Ipv6Addr>`]): `ip link add flannel-v6.<VNI> type vxlan
//! id <VNI> local <PublicIPv6> dev <underlay> dstport <port> nolearning
//! udp6zerocsumtx off udp6zerocsumrx off` (valid outer UDP checksums, which
//! the kernel requires of VXLAN over IPv6), its own MAC (the lease's
//! `BackendV6Data.VtepMAC` when given, else random as flannel's), address
//! `<v6 subnet network address>/128` beside its link-local one, up.
//!
//! MTU: flannel asks for the same underlay MTU - 50 for both devices
//! (`FLANNEL_MTU` too; flannel issue #1781, closed wontfix), although VXLAN
//! over IPv6 costs 70 bytes. The kernel does not give it: a vxlan device with
//! a `dev` gets at most the underlay's MTU minus 70 over IPv6 (50 over IPv4);
//! a larger MTU is lowered when the device is created and refused (EINVAL)
//! when changed. So flannel's own `flannel-v6.<VNI>` ends up at underlay - 70
//! (1430 on a 1500 underlay; seen with kernel 6.18), and so does ours: the
//! device's MTU is flannel's number clamped as the kernel clamps it
//! ([`kernel_device_mtu`]), so that an adopted device is not "corrected" to
//! an MTU the kernel refuses. Pods given `FLANNEL_MTU` (underlay - 50) can
//! send IPv6 packets up to 20 bytes too big for the device, exactly as on a
//! flannel node (what their senders then get, presumably an ICMPv6 "packet
//! too big" from the forwarding node, is not tested here).

use std::net::{IpAddr, Ipv4Addr};

use log::{info, warn};
use overlay_common::consts::{DEFAULT_VXLAN_PORT, VXLAN_MTU_OVERHEAD};
use rtnetlink::{
    LinkUnspec, LinkVxlan,
    packet_route::{
        address::{AddressAttribute, AddressMessage},
        link::{InfoData, InfoVxlan, LinkAttribute, LinkInfo, LinkMessage},
    },
};

use super::{
    DeviceError, LinkSummary, Netlink, NetlinkError, family::IpFamily, peer_entries::Device,
};
use crate::flannel::mac::MacAddr;

/// Linux interface names hold at most IFNAMSIZ - 1 bytes.
const MAX_IFNAME_LEN: usize = 15;
/// VNIs are 24 bits on the wire.
const MAX_VNI: u32 = (1 << 24) - 1;

/// flannel's IPv4 device name for a VNI (`flannel.<VNI>`).
pub fn device_name(vni: u32) -> String {
    family_device_name::<Ipv4Addr>(vni)
}

/// flannel's device name for a VNI in family `A`: `flannel.<VNI>` or
/// `flannel-v6.<VNI>`.
pub fn family_device_name<A: IpFamily>(vni: u32) -> String {
    format!("{}{vni}", A::DEVICE_PREFIX)
}

/// [`device_name`], if the kernel can create a vxlan device of that VNI
/// under that name.
pub fn checked_device_name(vni: u32) -> Result<String, DeviceError> {
    checked_family_device_name::<Ipv4Addr>(vni)
}

/// [`family_device_name`], if the kernel can create a vxlan device of that
/// VNI under that name (`flannel-v6.<VNI>` fits VNIs up to 9999 only).
pub fn checked_family_device_name<A: IpFamily>(vni: u32) -> Result<String, DeviceError> {
    if vni > MAX_VNI {
        return Err(DeviceError::InvalidSpec(format!(
            "VNI {vni} does not fit in 24 bits"
        )));
    }
    let name = family_device_name::<A>(vni);
    if name.len() > MAX_IFNAME_LEN {
        return Err(DeviceError::InvalidSpec(format!(
            "device name {name} is longer than {MAX_IFNAME_LEN} bytes (VNI too large)"
        )));
    }
    Ok(name)
}

/// The IPv4 device MTU: `Backend.MTU` when configured, else the underlay's,
/// minus the VXLAN overhead (50), as flannel computes it.
pub fn device_mtu(configured: Option<u32>, underlay_mtu: u32) -> Result<u32, DeviceError> {
    family_device_mtu::<Ipv4Addr>(configured, underlay_mtu)
}

/// The device MTU in family `A`: minus 50 for both, as flannel computes it
/// (see the module's note on IPv6), refused when the family cannot work with
/// it (68 bytes for IPv4, 1280 for IPv6).
pub fn family_device_mtu<A: IpFamily>(
    configured: Option<u32>,
    underlay_mtu: u32,
) -> Result<u32, DeviceError> {
    let base = configured.unwrap_or(underlay_mtu);
    let min = A::MIN_MTU;
    base.checked_sub(VXLAN_MTU_OVERHEAD)
        .filter(|mtu| *mtu >= min)
        .ok_or_else(|| {
            DeviceError::InvalidSpec(format!(
                "MTU {base} leaves less than {min} bytes after the {VXLAN_MTU_OVERHEAD}-byte VXLAN overhead"
            ))
        })
}

/// The MTU the device gets: [`family_device_mtu`] (flannel's number),
/// lowered to what the kernel allows a vxlan device over this underlay
/// (its MTU minus [`IpFamily::VXLAN_HEADROOM`]), and refused when that is
/// below what the family works with.
pub fn kernel_device_mtu<A: IpFamily>(
    configured: Option<u32>,
    underlay_mtu: u32,
) -> Result<u32, DeviceError> {
    let requested = family_device_mtu::<A>(configured, underlay_mtu)?;
    let mtu = requested.min(underlay_mtu.saturating_sub(A::VXLAN_HEADROOM));
    if mtu < A::MIN_MTU {
        return Err(DeviceError::InvalidSpec(format!(
            "underlay MTU {underlay_mtu} leaves less than {} bytes after the {}-byte headroom of VXLAN over {}",
            A::MIN_MTU,
            A::VXLAN_HEADROOM,
            A::NAME
        )));
    }
    Ok(mtu)
}

/// The address flannel puts on the device: the lease's network address as a
/// host prefix (`10.5.52.0/32` for `10.5.52.0/24`, `fc00:0:0:5::/128` for
/// `fc00:0:0:5::/64`), so no broadcast or subnet route appears.
pub fn device_address<A: IpFamily>(subnet: A::Net) -> A {
    A::network(subnet)
}

/// The UDP port the device uses: flannel's `Port` 0 means the kernel default, 8472.
pub fn effective_port(port: u16) -> u16 {
    if port == 0 { DEFAULT_VXLAN_PORT } else { port }
}

/// What the device is asked to be: the datapath's node spec, less what only
/// the datapath uses (the datapath builds it from its `NodeSpec`).
/// `VxlanDeviceSpec` is `flannel.<VNI>`'s, `VxlanDeviceSpec<Ipv6Addr>`
/// `flannel-v6.<VNI>`'s.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VxlanDeviceSpec<A: IpFamily = Ipv4Addr> {
    /// VXLAN network identifier (`Backend.VNI`).
    pub vni: u32,
    /// UDP destination port (`Backend.Port`, 8472 when 0).
    pub port: u16,
    /// The node's PublicIP: the stable IPv4 VTEP MAC derives from it (the
    /// IPv6 one is random, as flannel's, unless `vtep_mac` is given).
    pub public_ip: A,
    /// The device's `local`. IPv4: the underlay interface's address (as
    /// flannel before v0.27.4). IPv6: flannel (since v0.27.4) uses the
    /// public IPv6 (`ExtV6Addr`).
    pub local_ip: A,
    /// The underlay interface (`dev`).
    pub underlay: String,
    /// This node's lease; the device's address is its network address as a
    /// host prefix (/32, /128).
    pub subnet: A::Net,
    /// `Backend.MTU` when set; otherwise the underlay's MTU. The device gets
    /// this minus 50, at most what the kernel allows ([`kernel_device_mtu`]).
    pub mtu: Option<u32>,
    /// Use this VTEP MAC instead of the default one (stable for IPv4,
    /// random for IPv6): the MAC in the node's lease.
    pub vtep_mac: Option<MacAddr>,
    /// `Backend.Learning`: the device's `learning` flag.
    pub learning: bool,
    /// `Backend.GBP`: the device's `gbp` flag.
    pub gbp: bool,
}

/// Everything the device must look like, computed from the spec and the
/// underlay interface (pure, so it is unit-tested).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VxlanDeviceConfig<A: IpFamily = Ipv4Addr> {
    pub name: String,
    pub vni: u32,
    /// `local` (`local6` for IPv6): the spec's `local_ip`.
    pub local: A,
    /// `dev`: the underlay interface.
    pub underlay_ifindex: u32,
    pub underlay_mtu: u32,
    /// `dstport`.
    pub port: u16,
    pub mtu: u32,
    /// The MAC a newly created device gets.
    pub mac: MacAddr,
    /// The spec named the MAC, so an adopted device must be changed to it;
    /// otherwise an adopted device keeps the MAC it has (its lease publishes it).
    pub mac_required: bool,
    /// `<subnet network address>/32` (`/128`).
    pub address: A,
    /// `learning` (flannel's `Backend.Learning`, off by default).
    pub learning: bool,
    /// `gbp` (flannel's `Backend.GBP`).
    pub gbp: bool,
}

impl<A: IpFamily> VxlanDeviceConfig<A> {
    pub fn new(spec: &VxlanDeviceSpec<A>, underlay: &LinkSummary) -> Result<Self, DeviceError> {
        let VxlanDeviceSpec {
            vni,
            port,
            public_ip,
            local_ip,
            underlay: _,
            subnet,
            mtu,
            vtep_mac,
            learning,
            gbp,
        } = spec;
        let name = checked_family_device_name::<A>(*vni)?;
        Ok(Self {
            name,
            vni: *vni,
            local: *local_ip,
            underlay_ifindex: underlay.ifindex,
            underlay_mtu: underlay.mtu,
            port: effective_port(*port),
            mtu: kernel_device_mtu::<A>(*mtu, underlay.mtu)?,
            mac: vtep_mac.unwrap_or_else(|| A::default_mac(*public_ip, *vni)),
            mac_required: vtep_mac.is_some(),
            address: device_address::<A>(*subnet),
            learning: *learning,
            gbp: *gbp,
        })
    }

    /// Why an existing link called [`Self::name`] cannot be kept, or `None`
    /// when it can. Follows flannel's `vxlanLinksIncompat` (type, VNI, dev,
    /// local, l2miss, port, GBP) but is stricter in three ways: a missing
    /// `local`/`dev` counts as different (flannel only compares when both are
    /// set), `learning` must be as configured, and zero outer UDP checksums
    /// over IPv6 (`udp6zerocsumtx`/`rx`, which flannel never sets) are refused:
    /// kernel peers drop such packets.
    pub fn incompatibility(&self, existing: &VxlanLinkAttrs) -> Option<String> {
        if existing.kind.as_deref() != Some("vxlan") {
            return Some(format!(
                "link type: {} vs vxlan",
                existing.kind.as_deref().unwrap_or("(none)")
            ));
        }
        if existing.vni != Some(self.vni) {
            return Some(format!("vni: {} vs {}", opt(existing.vni), self.vni));
        }
        if existing.underlay_ifindex != Some(self.underlay_ifindex) {
            return Some(format!(
                "vtep (external) interface: {} vs {}",
                opt(existing.underlay_ifindex),
                self.underlay_ifindex
            ));
        }
        if existing.local != Some(self.local.into()) {
            return Some(format!(
                "vtep (external) IP: {} vs {}",
                opt(existing.local),
                self.local
            ));
        }
        if existing.port != Some(self.port) {
            return Some(format!("port: {} vs {}", opt(existing.port), self.port));
        }
        if existing.l2miss {
            return Some("l2miss: true vs false".into());
        }
        if existing.gbp != self.gbp {
            return Some(format!("gbp: {} vs {}", existing.gbp, self.gbp));
        }
        if existing.learning != self.learning {
            return Some(format!(
                "learning: {} vs {}",
                existing.learning, self.learning
            ));
        }
        if existing.udp_zero_csum6_tx {
            return Some("udp6zerocsumtx: true vs false".into());
        }
        if existing.udp_zero_csum6_rx {
            return Some("udp6zerocsumrx: true vs false".into());
        }
        None
    }
}

fn opt<T: std::fmt::Display>(v: Option<T>) -> String {
    v.map_or_else(|| "(none)".into(), |v| v.to_string())
}

/// The vxlan-relevant parts of an existing link, as the kernel reports them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VxlanLinkAttrs {
    /// `IFLA_INFO_KIND` (`vxlan`, `dummy`, ...), `None` for links without one.
    pub kind: Option<String>,
    pub vni: Option<u32>,
    /// `local` or `local6`.
    pub local: Option<IpAddr>,
    pub underlay_ifindex: Option<u32>,
    pub port: Option<u16>,
    pub learning: bool,
    pub l2miss: bool,
    pub gbp: bool,
    pub udp_zero_csum6_tx: bool,
    pub udp_zero_csum6_rx: bool,
}

impl VxlanLinkAttrs {
    pub fn from_message(msg: &LinkMessage) -> Self {
        let mut attrs = Self::default();
        let infos = msg.attributes.iter().find_map(|a| match a {
            LinkAttribute::LinkInfo(infos) => Some(infos),
            _ => None,
        });
        for info in infos.into_iter().flatten() {
            match info {
                LinkInfo::Kind(kind) => attrs.kind = Some(kind.to_string()),
                LinkInfo::Data(InfoData::Vxlan(data)) => {
                    for item in data {
                        match item {
                            InfoVxlan::Id(id) => attrs.vni = Some(*id),
                            InfoVxlan::Local(ip) => attrs.local = Some(IpAddr::V4(*ip)),
                            InfoVxlan::Local6(ip) => attrs.local = Some(IpAddr::V6(*ip)),
                            InfoVxlan::Link(ifindex) => attrs.underlay_ifindex = Some(*ifindex),
                            InfoVxlan::Port(port) => attrs.port = Some(*port),
                            InfoVxlan::Learning(on) => attrs.learning = *on,
                            InfoVxlan::L2Miss(on) => attrs.l2miss = *on,
                            InfoVxlan::Gbp => attrs.gbp = true,
                            InfoVxlan::UDPZeroCsumTX(on) => attrs.udp_zero_csum6_tx = *on,
                            InfoVxlan::UDPZeroCsumRX(on) => attrs.udp_zero_csum6_rx = *on,
                            _ => {}
                        }
                    }
                }
                _ => {}
            }
        }
        attrs
    }
}

/// How [`Netlink::ensure_vxlan_device`] got the device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DeviceOrigin {
    Created,
    /// An existing compatible device was kept (its ifindex, MAC and entries survive).
    Adopted,
    /// An existing device was incompatible, so it was deleted and created anew.
    Recreated {
        reason: String,
    },
}

/// The device as it is in the kernel after setup (`VxlanDevice<Ipv6Addr>`
/// for `flannel-v6.<VNI>`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VxlanDevice<A: IpFamily = Ipv4Addr> {
    pub name: String,
    pub ifindex: u32,
    pub mac: MacAddr,
    pub mtu: u32,
    pub vni: u32,
    pub port: u16,
    pub local: A,
    pub address: A,
    pub underlay: String,
    pub underlay_ifindex: u32,
    pub underlay_mtu: u32,
    pub origin: DeviceOrigin,
}

impl Netlink {
    /// Looks up the underlay named in the spec.
    pub async fn underlay(&self, name: &str) -> Result<LinkSummary, DeviceError> {
        let msg = self
            .link_by_name(name)
            .await?
            .ok_or_else(|| DeviceError::NoSuchInterface(name.to_owned()))?;
        Ok(LinkSummary::from_message(&msg))
    }

    /// Creates `flannel.<VNI>` (`flannel-v6.<VNI>` for an IPv6 spec) as
    /// flanneld does, or adopts a compatible existing one (keeping its
    /// ifindex, MAC and entries), or deletes and re-creates an incompatible
    /// one; then ensures its MTU, its /32 (/128) address and that it is up.
    pub async fn ensure_vxlan_device<A: IpFamily>(
        &self,
        spec: &VxlanDeviceSpec<A>,
    ) -> Result<VxlanDevice<A>, DeviceError> {
        let underlay = self.underlay(&spec.underlay).await?;
        let cfg = VxlanDeviceConfig::new(spec, &underlay)?;

        let origin = match self.link_by_name(&cfg.name).await? {
            None => {
                self.create_vxlan(&cfg).await?;
                DeviceOrigin::Created
            }
            Some(existing) => {
                let attrs = VxlanLinkAttrs::from_message(&existing);
                match cfg.incompatibility(&attrs) {
                    None => {
                        self.adjust_adopted(&cfg, &LinkSummary::from_message(&existing))
                            .await?;
                        DeviceOrigin::Adopted
                    }
                    Some(reason) => {
                        warn!(
                            "{} already exists with incompatible configuration: {reason}; recreating device",
                            cfg.name
                        );
                        self.handle
                            .link()
                            .del(existing.header.index)
                            .execute()
                            .await
                            .map_err(|e| {
                                NetlinkError::new(format!("delete link {}", cfg.name), e)
                            })?;
                        self.create_vxlan(&cfg).await?;
                        DeviceOrigin::Recreated { reason }
                    }
                }
            }
        };

        let link = self
            .link_by_name(&cfg.name)
            .await?
            .ok_or_else(|| DeviceError::NoSuchInterface(cfg.name.clone()))?;
        let ifindex = link.header.index;
        self.ensure_only_address(ifindex, &cfg.name, cfg.address)
            .await?;
        self.set_link_up(ifindex).await?;
        disable_accept_ra(&cfg.name);

        let summary = LinkSummary::from_message(&link);
        info!(
            "{} ({origin:?}): ifindex {ifindex}, vni {}, local {}, dev {}, dstport {}, mtu {}",
            cfg.name, cfg.vni, cfg.local, spec.underlay, cfg.port, summary.mtu
        );
        Ok(VxlanDevice {
            name: cfg.name,
            ifindex,
            mac: MacAddr(summary.mac.unwrap_or(cfg.mac.0)),
            mtu: summary.mtu,
            vni: cfg.vni,
            port: cfg.port,
            local: cfg.local,
            address: cfg.address,
            underlay: spec.underlay.clone(),
            underlay_ifindex: underlay.ifindex,
            underlay_mtu: underlay.mtu,
            origin,
        })
    }

    /// `ip link add` as flannel's netlink library sends it: `udp6zerocsumtx`
    /// and `udp6zerocsumrx` off on both families.
    async fn create_vxlan<A: IpFamily>(
        &self,
        cfg: &VxlanDeviceConfig<A>,
    ) -> Result<(), DeviceError> {
        let mut builder = LinkVxlan::new(&cfg.name, cfg.vni).dev(cfg.underlay_ifindex);
        builder = match cfg.local.into() {
            IpAddr::V4(ip) => builder.local(ip),
            IpAddr::V6(ip) => builder.local6(ip),
        };
        builder = builder
            .port(cfg.port)
            .learning(cfg.learning)
            .udp_zero_csum6_tx(false)
            .udp_zero_csum6_rx(false);
        if cfg.gbp {
            builder = builder.gbp();
        }
        let msg = builder.mtu(cfg.mtu).address(cfg.mac.0.to_vec()).build();
        self.handle.link().add(msg).execute().await.map_err(|e| {
            NetlinkError::new(
                format!(
                    "create {} (vxlan id {} local {} dev #{} dstport {}{}{} mtu {} address {})",
                    cfg.name,
                    cfg.vni,
                    cfg.local,
                    cfg.underlay_ifindex,
                    cfg.port,
                    if cfg.learning { " learning" } else { "" },
                    if cfg.gbp { " gbp" } else { "" },
                    cfg.mtu,
                    cfg.mac
                ),
                e,
            )
            .into()
        })
    }

    /// An adopted device keeps its MAC unless the spec names one, but always
    /// gets the MTU the spec implies (the underlay MTU may have changed).
    async fn adjust_adopted<A: IpFamily>(
        &self,
        cfg: &VxlanDeviceConfig<A>,
        link: &LinkSummary,
    ) -> Result<(), DeviceError> {
        let mut change = LinkUnspec::new_with_index(link.ifindex);
        let mut what = Vec::new();
        if link.mtu != cfg.mtu {
            change = change.mtu(cfg.mtu);
            what.push(format!("mtu {} -> {}", link.mtu, cfg.mtu));
        }
        if cfg.mac_required && link.mac != Some(cfg.mac.0) {
            change = change.address(cfg.mac.0.to_vec());
            what.push(format!("address -> {}", cfg.mac));
        }
        if what.is_empty() {
            return Ok(());
        }
        let what = what.join(", ");
        info!("{}: adopting existing device, changing {what}", cfg.name);
        // A new MAC makes the kernel flush the device's neighbours, permanent
        // ones included (neigh_changeaddr): keep them to put them back.
        let dev = Device {
            ifindex: link.ifindex,
            name: &cfg.name,
        };
        let neighbours = self.neighbours::<A>(dev).await?;
        self.handle
            .link()
            .change(change.build())
            .execute()
            .await
            .map_err(|e| NetlinkError::new(format!("set {} {what}", cfg.name), e))?;
        for (ip, mac) in neighbours {
            self.replace_neighbour(dev, ip, mac).await?;
        }
        Ok(())
    }

    /// Leaves exactly one address of the family on the device beside the
    /// ones the family keeps (IPv6 link-local): `address/32` (`/128`).
    /// flannel removes the other IPv4 addresses inside the cluster network
    /// and every non-link-local IPv6 one; the device is ours alone, so every
    /// other IPv4 address goes too.
    async fn ensure_only_address<A: IpFamily>(
        &self,
        ifindex: u32,
        name: &str,
        address: A,
    ) -> Result<(), DeviceError> {
        let prefix_len = A::HOST_PREFIX_LEN;
        let mut req = self.handle.address().get().set_link_index_filter(ifindex);
        req.message_mut().header.family = A::FAMILY;
        let existing: Vec<AddressMessage> =
            Netlink::collect(req.execute(), || format!("list addresses of {name}")).await?;
        let mut present = false;
        for msg in existing {
            if msg.header.family != A::FAMILY {
                continue;
            }
            // IPv4 names the interface's own address IFA_LOCAL; IPv6 has
            // only IFA_ADDRESS.
            let local = address_of::<A>(&msg, true).or_else(|| address_of::<A>(&msg, false));
            if local == Some(address) && msg.header.prefix_len == prefix_len {
                present = true;
                continue;
            }
            if local.is_some_and(A::kept_on_device) {
                continue;
            }
            let shown = format!("{}/{}", opt(local), msg.header.prefix_len);
            info!("{name}: removing address {shown}");
            if let Err(e) = self.handle.address().del(msg).execute().await {
                let err = NetlinkError::new(format!("delete address {shown} from {name}"), e);
                if !err.is_not_found() {
                    return Err(err.into());
                }
            }
        }
        if !present {
            self.handle
                .address()
                .add(ifindex, address.into(), prefix_len)
                .execute()
                .await
                .map_err(|e| {
                    NetlinkError::new(format!("add address {address}/{prefix_len} to {name}"), e)
                })?;
        }
        Ok(())
    }
}

/// The address of family `A` in an address message: its `IFA_LOCAL`
/// (`local`) or its `IFA_ADDRESS`.
fn address_of<A: IpFamily>(msg: &AddressMessage, local: bool) -> Option<A> {
    msg.attributes.iter().find_map(|a| match a {
        AddressAttribute::Local(ip) if local => A::from_ip(*ip),
        AddressAttribute::Address(ip) if !local => A::from_ip(*ip),
        _ => None,
    })
}

/// flannel turns router advertisements off on its device; failure (no IPv6)
/// does not matter, as for flannel.
fn disable_accept_ra(name: &str) {
    let path = format!("/proc/sys/net/ipv6/conf/{name}/accept_ra");
    if let Err(e) = std::fs::write(&path, "0") {
        log::debug!("{path}: {e} (ignored)");
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv6Addr;

    use rtnetlink::packet_route::link::InfoKind;

    use super::*;

    fn spec() -> VxlanDeviceSpec {
        VxlanDeviceSpec {
            vni: 1,
            port: 0,
            public_ip: "192.168.64.3".parse().unwrap(),
            local_ip: "192.168.64.3".parse().unwrap(),
            underlay: "eth0".into(),
            subnet: "10.5.52.0/24".parse().unwrap(),
            mtu: None,
            vtep_mac: None,
            learning: false,
            gbp: false,
        }
    }

    fn underlay() -> LinkSummary {
        LinkSummary {
            name: "eth0".into(),
            ifindex: 2,
            mtu: 1500,
            mac: None,
            up: true,
        }
    }

    fn matching_attrs() -> VxlanLinkAttrs {
        VxlanLinkAttrs {
            kind: Some("vxlan".into()),
            vni: Some(1),
            local: Some("192.168.64.3".parse().unwrap()),
            underlay_ifindex: Some(2),
            port: Some(8472),
            learning: false,
            l2miss: false,
            gbp: false,
            udp_zero_csum6_tx: false,
            udp_zero_csum6_rx: false,
        }
    }

    #[test]
    fn config_follows_flannel_defaults() {
        let cfg = VxlanDeviceConfig::new(&spec(), &underlay()).unwrap();
        assert_eq!(cfg.name, "flannel.1");
        assert_eq!(cfg.port, 8472);
        assert_eq!(cfg.mtu, 1450);
        assert_eq!(cfg.address, "10.5.52.0".parse::<Ipv4Addr>().unwrap());
        assert_eq!(
            cfg.mac,
            MacAddr::stable_for("192.168.64.3".parse::<std::net::Ipv4Addr>().unwrap(), 1)
        );
        assert!(!cfg.mac_required);
        assert_eq!(cfg.underlay_ifindex, 2);
    }

    #[test]
    fn config_honours_spec_overrides() {
        let mac: MacAddr = "c6:d2:32:6f:8f:44".parse().unwrap();
        let s = VxlanDeviceSpec {
            vni: 4096,
            port: 4789,
            mtu: Some(9000),
            vtep_mac: Some(mac),
            // Host bits in the lease do not leak into the device address.
            subnet: "10.5.52.7/24".parse().unwrap(),
            ..spec()
        };
        let jumbo = LinkSummary {
            mtu: 9000,
            ..underlay()
        };
        let cfg = VxlanDeviceConfig::new(&s, &jumbo).unwrap();
        assert_eq!(cfg.name, "flannel.4096");
        assert_eq!(cfg.port, 4789);
        assert_eq!(cfg.mtu, 8950);
        // More than the underlay carries: the kernel's clamp.
        let cfg = VxlanDeviceConfig::new(&s, &underlay()).unwrap();
        assert_eq!(cfg.mtu, 1450);
        assert_eq!(cfg.mac, mac);
        assert!(cfg.mac_required);
        assert_eq!(cfg.address, "10.5.52.0".parse::<Ipv4Addr>().unwrap());
    }

    #[test]
    fn behind_nat_the_device_is_local_to_the_interface_address() {
        let s = VxlanDeviceSpec {
            public_ip: "203.0.113.7".parse().unwrap(),
            local_ip: "192.168.64.3".parse().unwrap(),
            ..spec()
        };
        let cfg = VxlanDeviceConfig::new(&s, &underlay()).unwrap();
        assert_eq!(cfg.local, "192.168.64.3".parse::<Ipv4Addr>().unwrap());
        // The MAC follows the node's identity in etcd, its PublicIP.
        assert_eq!(
            cfg.mac,
            MacAddr::stable_for("203.0.113.7".parse::<std::net::Ipv4Addr>().unwrap(), 1)
        );
    }

    #[test]
    fn mtu_is_configured_or_underlay_minus_overhead() {
        assert_eq!(device_mtu(None, 1500).unwrap(), 1450);
        assert_eq!(device_mtu(Some(1400), 1500).unwrap(), 1350);
        assert_eq!(device_mtu(None, 118).unwrap(), 68);
        assert!(device_mtu(None, 117).is_err());
        assert!(device_mtu(Some(10), 1500).is_err());
    }

    #[test]
    fn rejects_vnis_that_do_not_fit() {
        let too_big = VxlanDeviceSpec {
            vni: 1 << 24,
            ..spec()
        };
        assert!(VxlanDeviceConfig::new(&too_big, &underlay()).is_err());
        // 8 digits make a 16-byte interface name.
        let too_long = VxlanDeviceSpec {
            vni: 16_000_000,
            ..spec()
        };
        assert!(VxlanDeviceConfig::new(&too_long, &underlay()).is_err());
        let fits = VxlanDeviceSpec {
            vni: 9_999_999,
            ..spec()
        };
        assert_eq!(
            VxlanDeviceConfig::new(&fits, &underlay()).unwrap().name,
            "flannel.9999999"
        );
    }

    #[test]
    fn identical_device_is_compatible_whatever_its_mac_and_mtu() {
        let cfg = VxlanDeviceConfig::new(&spec(), &underlay()).unwrap();
        assert_eq!(cfg.incompatibility(&matching_attrs()), None);
    }

    #[test]
    fn each_incompatibility_is_named() {
        let cfg = VxlanDeviceConfig::new(&spec(), &underlay()).unwrap();
        let cases: Vec<(VxlanLinkAttrs, &str)> = vec![
            (
                VxlanLinkAttrs {
                    kind: Some("dummy".into()),
                    ..matching_attrs()
                },
                "link type: dummy vs vxlan",
            ),
            (
                VxlanLinkAttrs {
                    kind: None,
                    ..matching_attrs()
                },
                "link type: (none) vs vxlan",
            ),
            (
                VxlanLinkAttrs {
                    vni: Some(2),
                    ..matching_attrs()
                },
                "vni: 2 vs 1",
            ),
            (
                VxlanLinkAttrs {
                    underlay_ifindex: Some(3),
                    ..matching_attrs()
                },
                "vtep (external) interface: 3 vs 2",
            ),
            (
                VxlanLinkAttrs {
                    underlay_ifindex: None,
                    ..matching_attrs()
                },
                "vtep (external) interface: (none) vs 2",
            ),
            (
                VxlanLinkAttrs {
                    local: Some("192.168.64.4".parse().unwrap()),
                    ..matching_attrs()
                },
                "vtep (external) IP: 192.168.64.4 vs 192.168.64.3",
            ),
            (
                VxlanLinkAttrs {
                    port: Some(4789),
                    ..matching_attrs()
                },
                "port: 4789 vs 8472",
            ),
            (
                VxlanLinkAttrs {
                    l2miss: true,
                    ..matching_attrs()
                },
                "l2miss: true vs false",
            ),
            (
                VxlanLinkAttrs {
                    gbp: true,
                    ..matching_attrs()
                },
                "gbp: true vs false",
            ),
            (
                VxlanLinkAttrs {
                    learning: true,
                    ..matching_attrs()
                },
                "learning: true vs false",
            ),
        ];
        for (attrs, want) in cases {
            assert_eq!(
                cfg.incompatibility(&attrs).as_deref(),
                Some(want),
                "{attrs:?}"
            );
        }
    }

    fn spec6() -> VxlanDeviceSpec<Ipv6Addr> {
        VxlanDeviceSpec {
            vni: 1,
            port: 0,
            public_ip: "2001:db8::3".parse().unwrap(),
            local_ip: "2001:db8::3".parse().unwrap(),
            underlay: "eth0".into(),
            subnet: "fc00:0:0:5::/64".parse().unwrap(),
            mtu: None,
            vtep_mac: None,
            learning: false,
            gbp: false,
        }
    }

    #[test]
    fn v6_config_follows_flannel() {
        let cfg = VxlanDeviceConfig::new(&spec6(), &underlay()).unwrap();
        assert_eq!(cfg.name, "flannel-v6.1");
        assert_eq!(cfg.port, 8472);
        assert_eq!(cfg.local, "2001:db8::3".parse::<Ipv6Addr>().unwrap());
        assert_eq!(cfg.address, "fc00:0:0:5::".parse::<Ipv6Addr>().unwrap());
        // flannel asks for 1450; the kernel gives an IPv6 vxlan device 1430.
        assert_eq!(family_device_mtu::<Ipv6Addr>(None, 1500).unwrap(), 1450);
        assert_eq!(cfg.mtu, 1430);
        // A random locally administered unicast MAC, unless one is given.
        assert_eq!(cfg.mac.0[0] & 0x03, 0x02);
        assert!(!cfg.mac_required);
        let mac: MacAddr = "7a:01:9e:55:20:0b".parse().unwrap();
        let given = VxlanDeviceSpec {
            vtep_mac: Some(mac),
            ..spec6()
        };
        let cfg = VxlanDeviceConfig::new(&given, &underlay()).unwrap();
        assert_eq!((cfg.mac, cfg.mac_required), (mac, true));
    }

    #[test]
    fn v6_names_and_mtus_the_kernel_cannot_take_are_refused() {
        assert_eq!(
            checked_family_device_name::<Ipv6Addr>(9999).unwrap(),
            "flannel-v6.9999"
        );
        assert!(checked_family_device_name::<Ipv6Addr>(10_000).is_err());
        // 1350 - 70 = 1280, IPv6's minimum.
        assert_eq!(kernel_device_mtu::<Ipv6Addr>(None, 1350).unwrap(), 1280);
        assert!(kernel_device_mtu::<Ipv6Addr>(None, 1349).is_err());
        assert!(kernel_device_mtu::<Ipv6Addr>(Some(1329), 1500).is_err());
        assert_eq!(kernel_device_mtu::<Ipv4Addr>(None, 1349).unwrap(), 1299);
    }

    #[test]
    fn v6_incompatibilities_are_named() {
        let cfg = VxlanDeviceConfig::new(&spec6(), &underlay()).unwrap();
        let same = VxlanLinkAttrs {
            local: Some("2001:db8::3".parse().unwrap()),
            ..matching_attrs()
        };
        assert_eq!(cfg.incompatibility(&same), None);
        let cases: Vec<(VxlanLinkAttrs, &str)> = vec![
            (
                VxlanLinkAttrs {
                    local: Some("2001:db8::4".parse().unwrap()),
                    ..same.clone()
                },
                "vtep (external) IP: 2001:db8::4 vs 2001:db8::3",
            ),
            (
                matching_attrs(),
                "vtep (external) IP: 192.168.64.3 vs 2001:db8::3",
            ),
            (
                VxlanLinkAttrs {
                    udp_zero_csum6_tx: true,
                    ..same.clone()
                },
                "udp6zerocsumtx: true vs false",
            ),
            (
                VxlanLinkAttrs {
                    udp_zero_csum6_rx: true,
                    ..same.clone()
                },
                "udp6zerocsumrx: true vs false",
            ),
        ];
        for (attrs, want) in cases {
            assert_eq!(cfg.incompatibility(&attrs).as_deref(), Some(want));
        }
        // Learning and GBP as configured.
        let configured = VxlanDeviceConfig::new(
            &VxlanDeviceSpec {
                learning: true,
                gbp: true,
                ..spec6()
            },
            &underlay(),
        )
        .unwrap();
        assert_eq!(
            configured.incompatibility(&same).as_deref(),
            Some("gbp: false vs true")
        );
        let both = VxlanLinkAttrs {
            learning: true,
            gbp: true,
            ..same
        };
        assert_eq!(configured.incompatibility(&both), None);
    }

    #[test]
    fn parses_vxlan_attributes_from_a_link_message() {
        let msg = LinkVxlan::new("flannel.1", 1)
            .dev(2)
            .local("192.168.64.3".parse().unwrap())
            .port(8472)
            .learning(false)
            .l2miss(false)
            .build();
        let attrs = VxlanLinkAttrs::from_message(&msg);
        assert_eq!(attrs, matching_attrs());

        let msg6 = LinkVxlan::new("flannel-v6.1", 1)
            .dev(2)
            .local6("2001:db8::3".parse().unwrap())
            .port(8472)
            .learning(false)
            .udp_zero_csum6_tx(true)
            .gbp()
            .build();
        let attrs = VxlanLinkAttrs::from_message(&msg6);
        assert_eq!(attrs.local, Some("2001:db8::3".parse().unwrap()));
        assert!(attrs.udp_zero_csum6_tx && !attrs.udp_zero_csum6_rx && attrs.gbp);

        let mut plain = LinkMessage::default();
        plain
            .attributes
            .push(LinkAttribute::LinkInfo(vec![LinkInfo::Kind(
                InfoKind::Dummy,
            )]));
        let attrs = VxlanLinkAttrs::from_message(&plain);
        assert_eq!(attrs.kind.as_deref(), Some("dummy"));
        assert_eq!(attrs.vni, None);
    }
}

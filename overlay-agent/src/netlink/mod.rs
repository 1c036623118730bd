//! flannel's kernel state, programmed over rtnetlink: the `flannel.<VNI>` vxlan
//! device ([`vxlan_device`]) and, per peer, the neighbour, FDB and route entries
//! ([`peer_entries`]), with the device's neighbours and FDB entries mirrored in
//! memory ([`entry_table`]) so that no peer event dumps them.
//!
//! A dual-stack node has a second device, `flannel-v6.<VNI>`, with the same
//! three entries per peer in IPv6: the device, the entries, their table and
//! DirectRouting are generic over the address family ([`family::IpFamily`],
//! implemented by `Ipv4Addr` and `Ipv6Addr`); the IPv4 types are the
//! defaults (`VxlanDeviceSpec` is `VxlanDeviceSpec<Ipv4Addr>`).
//!
//! Both datapaths use this module: the kernel datapath relies on these entries
//! to move packets, the eBPF datapath keeps them so that routing selects
//! `flannel.<VNI>` and whatever its programs pass to the kernel still works.
//!
//! A [`Netlink`] talks to the network namespace of the thread that called
//! [`Netlink::connect`] (the socket is bound to it at creation), so tests create
//! it on a thread that has `setns()`-ed into the host's namespace.

pub mod direct_route;
pub mod entry_table;
pub mod events;
pub mod family;
pub mod nft_elements;
pub mod peer_batch;
pub mod peer_entries;
pub mod pipeline;
pub mod pods;
pub mod tc;
pub mod vxlan_device;

use std::{io, sync::Arc};

use futures::{Stream, TryStreamExt};
use rtnetlink::{
    Handle, LinkUnspec,
    packet_route::link::{LinkAttribute, LinkMessage},
};

pub use entry_table::EntryTable;
pub use family::IpFamily;
pub use peer_entries::ProgrammedPeer;
pub use vxlan_device::{VxlanDevice, VxlanDeviceConfig, VxlanDeviceSpec, VxlanLinkAttrs};

/// A failed rtnetlink request, naming the operation (e.g. `replace FDB entry
/// 02:..:01 dst 192.168.1.2 dev flannel.1`) and the kernel's answer. The
/// rtnetlink error is kept as a field, not as a `source`: its text would only
/// repeat the errno already in the message.
#[derive(Debug, thiserror::Error)]
#[error("netlink: {op}: {}", describe(.error))]
pub struct NetlinkError {
    pub op: String,
    pub error: rtnetlink::Error,
}

fn describe(err: &rtnetlink::Error) -> String {
    match err {
        // The crate's own Display adds a long prefix and the raw header; the
        // errno text is what an operator needs.
        rtnetlink::Error::NetlinkError(msg) => msg.to_io().to_string(),
        other => other.to_string(),
    }
}

impl NetlinkError {
    pub(crate) fn new(op: impl Into<String>, error: rtnetlink::Error) -> Self {
        Self {
            op: op.into(),
            error,
        }
    }

    /// The positive errno the kernel answered with, if it answered with one.
    pub fn errno(&self) -> Option<i32> {
        match &self.error {
            rtnetlink::Error::NetlinkError(msg) => msg.code.map(|c| -c.get()),
            _ => None,
        }
    }

    /// The entry to delete or read was not there: deletions are idempotent.
    pub fn is_not_found(&self) -> bool {
        matches!(
            self.errno(),
            Some(libc::ENOENT | libc::ESRCH | libc::ENODEV | libc::EADDRNOTAVAIL)
        )
    }

    /// A route lookup found no route (`ip route get` says unreachable).
    pub fn is_unreachable(&self) -> bool {
        matches!(self.errno(), Some(libc::ENETUNREACH | libc::EHOSTUNREACH))
    }
}

/// Why the `flannel.<VNI>` device could not be set up (or a spec for it was
/// refused before anything was touched): this layer's own error, which the
/// datapath maps into its `DatapathError` variants of the same names and
/// texts (`From<DeviceError> for DatapathError`).
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// An rtnetlink request failed (the message names the operation).
    #[error(transparent)]
    Netlink(#[from] NetlinkError),
    #[error("interface {0} not found")]
    NoSuchInterface(String),
    /// The spec asks for what the kernel cannot make (VNI, name, MTU).
    #[error("invalid node spec: {0}")]
    InvalidSpec(String),
}

impl DeviceError {
    /// This error and its causes on one line (`a: b: c`), as
    /// `DatapathError::reason` renders the same error.
    pub fn reason(&self) -> String {
        let mut parts = vec![self.to_string()];
        let mut cause = std::error::Error::source(self);
        while let Some(e) = cause {
            let text = e.to_string();
            // Transparent wrappers repeat their inner error's text.
            if parts.last().is_none_or(|last| !last.ends_with(&text)) {
                parts.push(text);
            }
            cause = e.source();
        }
        parts.join(": ").replace('\n', " ")
    }
}

/// What the agent needs to know about an existing interface.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LinkSummary {
    pub name: String,
    pub ifindex: u32,
    pub mtu: u32,
    pub mac: Option<[u8; 6]>,
    pub up: bool,
}

impl LinkSummary {
    pub(crate) fn from_message(msg: &LinkMessage) -> Self {
        let mut summary = LinkSummary {
            name: String::new(),
            ifindex: msg.header.index,
            mtu: 0,
            mac: None,
            up: msg
                .header
                .flags
                .contains(rtnetlink::packet_route::link::LinkFlags::Up),
        };
        for attr in &msg.attributes {
            match attr {
                LinkAttribute::IfName(name) => summary.name.clone_from(name),
                LinkAttribute::Mtu(mtu) => summary.mtu = *mtu,
                LinkAttribute::Address(bytes) => summary.mac = <[u8; 6]>::try_from(&bytes[..]).ok(),
                _ => {}
            }
        }
        summary
    }
}

/// An rtnetlink connection bound to the calling thread's network namespace,
/// and a second socket there for pipelined requests ([`pipeline`]), which
/// the peers' entries go through in batches.
#[derive(Clone, Debug)]
pub struct Netlink {
    handle: Handle,
    pipeline: Arc<tokio::sync::Mutex<pipeline::Pipeline>>,
}

impl Netlink {
    /// Opens a NETLINK_ROUTE socket in the calling thread's network namespace
    /// and spawns its connection task on the current tokio runtime (a
    /// current-thread runtime is enough). Must be called from within a runtime.
    pub fn connect() -> io::Result<Self> {
        let (connection, handle, _) = rtnetlink::new_connection()?;
        let pipeline = pipeline::Pipeline::open()?;
        tokio::spawn(connection);
        Ok(Self {
            handle,
            pipeline: Arc::new(tokio::sync::Mutex::new(pipeline)),
        })
    }

    pub fn handle(&self) -> &Handle {
        &self.handle
    }

    /// Sends `requests` pipelined and returns each one's answer, in order
    /// (see [`pipeline::Pipeline::run`]). Callers of one `Netlink` take
    /// turns: a batch is not interleaved with another.
    pub async fn pipelined(&self, requests: Vec<pipeline::Request>) -> Vec<pipeline::Answer> {
        self.pipeline.lock().await.run(requests).await
    }

    /// The interface called `name`, or `None` when there is none.
    pub async fn link_by_name(&self, name: &str) -> Result<Option<LinkMessage>, NetlinkError> {
        let op = || format!("get link {name}");
        let mut links = self.handle.link().get().match_name(name).execute();
        match links.try_next().await {
            Ok(link) => Ok(link),
            Err(e) => {
                let err = NetlinkError::new(op(), e);
                if err.is_not_found() {
                    Ok(None)
                } else {
                    Err(err)
                }
            }
        }
    }

    /// The interface with index `ifindex`, or `None` when there is none.
    pub async fn link_by_index(&self, ifindex: u32) -> Result<Option<LinkMessage>, NetlinkError> {
        let mut links = self.handle.link().get().match_index(ifindex).execute();
        match links.try_next().await {
            Ok(link) => Ok(link),
            Err(e) => {
                let err = NetlinkError::new(format!("get link #{ifindex}"), e);
                if err.is_not_found() {
                    Ok(None)
                } else {
                    Err(err)
                }
            }
        }
    }

    /// Every interface in this namespace.
    pub async fn links(&self) -> Result<Vec<LinkSummary>, NetlinkError> {
        let msgs =
            Self::collect(self.handle.link().get().execute(), || "list links".into()).await?;
        Ok(msgs.iter().map(LinkSummary::from_message).collect())
    }

    /// Deletes interface `name`; returns whether it existed.
    pub async fn delete_link_by_name(&self, name: &str) -> Result<bool, NetlinkError> {
        let Some(link) = self.link_by_name(name).await? else {
            return Ok(false);
        };
        match self.handle.link().del(link.header.index).execute().await {
            Ok(()) => Ok(true),
            Err(e) => {
                let err = NetlinkError::new(format!("delete link {name}"), e);
                if err.is_not_found() {
                    Ok(false)
                } else {
                    Err(err)
                }
            }
        }
    }

    /// `ip link set <ifindex> up`.
    pub async fn set_link_up(&self, ifindex: u32) -> Result<(), NetlinkError> {
        self.handle
            .link()
            .change(LinkUnspec::new_with_index(ifindex).up().build())
            .execute()
            .await
            .map_err(|e| NetlinkError::new(format!("set link #{ifindex} up"), e))
    }

    pub(crate) async fn collect<T>(
        stream: impl Stream<Item = Result<T, rtnetlink::Error>>,
        op: impl FnOnce() -> String,
    ) -> Result<Vec<T>, NetlinkError> {
        stream
            .try_collect()
            .await
            .map_err(|e| NetlinkError::new(op(), e))
    }
}

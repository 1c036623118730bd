//! The kernel-vxlan datapath: `flannel.<VNI>` programmed exactly as flanneld
//! does, and the kernel's vxlan driver moves the packets. Nothing is attached.

use super::{Datapath, DatapathError, Mode, NodeSpec, NodeState, Peer};
use crate::netlink::{Netlink, ProgrammedPeer, VxlanDevice, peer_entries::Device};

/// flannel's VXLAN backend, through rtnetlink.
///
/// Create it anywhere; the netlink socket is opened by [`Datapath::setup`] in
/// the network namespace of the thread that runs it (inside a tokio runtime),
/// and every later call talks to that namespace.
#[derive(Debug, Default)]
pub struct KernelDatapath {
    state: Option<State>,
}

#[derive(Debug)]
struct State {
    netlink: Netlink,
    device: VxlanDevice,
}

impl KernelDatapath {
    pub fn new() -> Self {
        Self::default()
    }

    /// The device as set up (ifindex, MAC, MTU, underlay, how it was obtained).
    pub fn device(&self) -> Option<&VxlanDevice> {
        self.state.as_ref().map(|s| &s.device)
    }

    /// The netlink connection, once set up.
    pub fn netlink(&self) -> Option<&Netlink> {
        self.state.as_ref().map(|s| &s.netlink)
    }

    /// Every peer route on the device with the neighbour and FDB entry behind
    /// it, including incomplete ones (which [`Datapath::peers`] leaves out).
    pub async fn programmed_peers(&self) -> Result<Vec<ProgrammedPeer>, DatapathError> {
        let state = self.state()?;
        state.netlink.programmed_peers(state.dev()).await
    }

    fn state(&self) -> Result<&State, DatapathError> {
        self.state.as_ref().ok_or(DatapathError::NotSetUp)
    }
}

impl State {
    fn dev(&self) -> Device<'_> {
        Device {
            ifindex: self.device.ifindex,
            name: &self.device.name,
        }
    }
}

impl Datapath for KernelDatapath {
    fn mode(&self) -> Mode {
        Mode::Kernel
    }

    async fn setup(&mut self, node: &NodeSpec) -> Result<NodeState, DatapathError> {
        let netlink = match self.state.take() {
            Some(state) => state.netlink,
            None => Netlink::connect().map_err(|source| DatapathError::Io {
                what: "opening an rtnetlink socket".into(),
                source,
            })?,
        };
        let device = netlink.ensure_vxlan_device(node).await?;
        let node_state = NodeState {
            device: device.name.clone(),
            ifindex: device.ifindex,
            vtep_mac: device.mac,
            mtu: device.mtu,
        };
        self.state = Some(State { netlink, device });
        Ok(node_state)
    }

    async fn add_peer(&mut self, peer: &Peer) -> Result<(), DatapathError> {
        let state = self.state()?;
        state.netlink.replace_peer(state.dev(), peer).await
    }

    async fn remove_peer(&mut self, peer: &Peer) -> Result<(), DatapathError> {
        let state = self.state()?;
        state.netlink.remove_peer(state.dev(), peer).await
    }

    async fn peers(&mut self) -> Result<Vec<Peer>, DatapathError> {
        Ok(self
            .programmed_peers()
            .await?
            .iter()
            .filter_map(ProgrammedPeer::peer)
            .collect())
    }

    /// Deletes `flannel.<VNI>`; the kernel removes its neighbours, FDB entries
    /// and routes with it. A no-op when not set up.
    async fn teardown(&mut self) -> Result<(), DatapathError> {
        let Some(state) = self.state.take() else {
            return Ok(());
        };
        let result = state.netlink.delete_link_by_name(&state.device.name).await;
        if let Err(e) = result {
            self.state = Some(state);
            return Err(e.into());
        }
        Ok(())
    }
}

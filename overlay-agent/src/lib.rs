//! The overlay agent as a library: the datapaths behind one interface, and
//! (later) the control plane that drives them from etcd.

pub mod datapath;
pub mod mac;

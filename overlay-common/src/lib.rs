//! Types and packet logic shared by the eBPF programs (`overlay-ebpf`) and the
//! agent (`overlay-agent`).
//!
//! Everything here is `no_std` and free of eBPF helpers so that the header
//! building, parsing, checksum and flow-hash logic can be unit-tested on the
//! host. The eBPF programs copy a fixed-size header window out of the packet,
//! call into this crate, and apply the resulting decision.
#![no_std]

pub mod checksum;
pub mod consts;
pub mod counters;
pub mod egress;
pub mod egress6;
pub mod encap;
pub mod encap6;
pub mod fastpath;
pub mod fastpath6;
pub mod flow;
pub mod ingress;
pub mod ingress6;
pub mod maps;

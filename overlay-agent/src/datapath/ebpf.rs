//! The eBPF datapath: TC egress encapsulation, XDP/TC ingress decapsulation.

//! The kernel-vxlan datapath: `flannel.<VNI>` programmed exactly as flanneld does.

//! Loading the object: pinned maps reopened or created, programs loaded,
//! the fast path prepared ([`Loaded`]).

use super::*;

#[derive(Debug)]
pub(super) struct Loaded {
    pub(super) ebpf: Ebpf,
    /// The peers the maps hold, counted by public IP: whether a removal
    /// leaves a VTEP unused is a lookup, not a scan of REMOTE_SUBNETS.
    pub(super) users: VtepUsers,
    /// The peers' IPv6 sides the maps hold (dual stack).
    pub(super) sides6: Sides6,
    pub(super) ids: ProgramIds,
    /// What the TC programs attach through.
    pub(super) api: TcApi,
    /// The TC links of the underlay and `flannel.<VNI>`, held so they stay.
    pub(super) _links: Vec<TcLink>,
    /// Set while the fast path is on: our subnet and the pod veths.
    pub(super) fast: Option<FastState>,
}

#[derive(Debug)]
pub(super) struct FastState {
    /// What FAST_CONFIG holds (the gateway follows the pod bridge).
    pub(super) settings: FastSettings,
    pub(super) pods: PodAttachments,
}

/// The devices the programs serve: `flannel.<VNI>`, and `flannel-v6.<VNI>`
/// on a dual-stack node.
#[derive(Clone, Copy, Debug)]
pub(super) struct Devices<'a> {
    pub(super) v4: &'a VxlanDevice,
    pub(super) v6: Option<&'a VxlanDevice<Ipv6Addr>>,
    /// The IPv6 sides `flannel-v6.<VNI>` holds (see [`keep_held6`]).
    pub(super) held6: &'a [crate::flannel::lease::Peer6],
    /// Our IPv6 pod subnet, behind `flannel-v6.<VNI>` (the fast path's).
    pub(super) subnet6: Option<Ipv6Net>,
}

impl Loaded {
    /// Parses the object (reopening pinned maps, as `plan` says), fills the
    /// maps with the vxlan `peers` and the `direct` ones (DirectRouting),
    /// removes what else reopened maps hold, loads every program, and only
    /// then attaches them (ingress first), so a verifier rejection attaches
    /// nothing and leaves pinned links on the old programs.
    ///
    /// Everything written before the links are swapped goes into maps the
    /// old programs read too only under [`LayoutPlan::Reuse`], where both
    /// builds read them alike; under [`LayoutPlan::Migrate`] every map is
    /// new, and a map whose shape changed is new under either.
    pub(super) fn start(
        options: &EbpfOptions,
        plan: LayoutPlan,
        devices: Devices<'_>,
        subnet: Ipv4Net,
        peers: &[Peer],
        direct: &[Peer],
    ) -> Result<Self, EbpfError> {
        let device = devices.v4;
        let kernel = tc_attach::kernel_version();
        if kernel < MIN_KERNEL {
            return Err(EbpfError::KernelTooOld { found: kernel });
        }
        let owned_object;
        let object: &[u8] = match &options.object {
            Some(path) => {
                owned_object = std::fs::read(path).map_err(|source| EbpfError::ReadObject {
                    path: path.clone(),
                    source,
                })?;
                &owned_object
            }
            None => EBPF_OBJECT,
        };
        let mut loader = EbpfLoader::new();
        let capacities = options.capacities();
        for (name, max) in capacities {
            loader.map_max_entries(name, max);
        }
        let pins = options.pins.as_ref();
        let mut pin_paths = Vec::new();
        if let Some(pins) = pins {
            match plan {
                LayoutPlan::Migrate { from } => {
                    pins.unpin_maps()
                        .map_err(pin_err(pins.root().to_owned(), "unpin the maps"))?;
                    info!(
                        "pinned maps under {} have {from}; this build uses {MAP_LAYOUT_VERSION}: \
                         migrating to new maps (the old programs keep the old ones until their \
                         links are swapped)",
                        pins.root().display()
                    );
                }
                LayoutPlan::Fresh | LayoutPlan::Reuse => {
                    let declared = declared_shapes(object, &capacities)
                        .map_err(|e| EbpfError::Object(e.into()))?;
                    let replaced = pins
                        .prepare(&declared)
                        .map_err(pin_err(pins.root().to_owned(), "prepare"))?;
                    if !replaced.is_empty() {
                        info!("pinned maps {replaced:?} had another shape: created anew");
                    }
                }
            }
            for name in MAPS {
                pin_paths.push((name, pins.map(name)));
            }
        }
        for (name, path) in &pin_paths {
            loader.map_pin_path(name, path.as_path());
        }
        let mut ebpf = loader.load(object).map_err(EbpfError::Object)?;
        // First: the maps just created are ours from here on. A start that
        // dies before this leaves them with LAYOUT 0 (or none pinned yet),
        // which the next start treats as unversioned and migrates.
        record_layout(&mut ebpf)?;
        {
            let map = ebpf
                .map_mut(MAP_NODE_CONFIG)
                .ok_or(EbpfError::MissingMap(MAP_NODE_CONFIG))?;
            let mut config: Array<&mut MapData, NodeConfig> =
                Array::try_from(map).map_err(|e| EbpfError::map(MAP_NODE_CONFIG, "open", e))?;
            config
                .set(0, node_config(device), 0)
                .map_err(|e| EbpfError::map(MAP_NODE_CONFIG, "set entry 0", e))?;
        }
        write_node_config6(&mut ebpf, devices.v6)?;
        let mut users = VtepUsers::default();
        let mut sides6 = Sides6::default();
        let vxlan = peers.iter().map(|p| (p, PeerKind::Vxlan));
        for (peer, kind) in vxlan.chain(direct.iter().map(|p| (p, PeerKind::Direct))) {
            let inserted = match kind {
                PeerKind::Vxlan => insert_peer(&mut ebpf, &mut users, peer, options.peer_capacity),
                PeerKind::Direct => {
                    insert_direct_peer(&mut ebpf, &mut users, peer, options.peer_capacity)
                }
            }
            .and_then(|()| set_peer6(&mut ebpf, &mut sides6, peer, options.peer_capacity));
            match inserted {
                // The reconciler finds it missing from the maps, retries and
                // reports it.
                Err(EbpfError::MapFull { map, .. }) => {
                    debug!("peer {} left out of the maps: {map} is full", peer.subnet);
                }
                other => other?,
            }
        }
        if devices.v6.is_some() {
            keep_held6(&mut ebpf, &mut sides6, devices.held6, options.peer_capacity)?;
        }
        // Reopened maps may hold peers that left while no agent ran.
        prune_maps(&mut ebpf, &users)?;
        prune_maps6(&mut ebpf, &sides6)?;

        classifier(&mut ebpf, PROG_EGRESS)?
            .load()
            .map_err(|e| EbpfError::load(PROG_EGRESS, e))?;
        if devices.v6.is_some() {
            classifier(&mut ebpf, PROG_EGRESS6)?
                .load()
                .map_err(|e| EbpfError::load(PROG_EGRESS6, e))?;
        }
        classifier(&mut ebpf, PROG_INGRESS_TC)?
            .load()
            .map_err(|e| EbpfError::load(PROG_INGRESS_TC, e))?;
        load_jumps(&mut ebpf, &[JUMP_INGRESS_TC6])?;
        let xdp_program = if options.ingress == IngressMode::XdpAndTc {
            Some(load_xdp(&mut ebpf)?)
        } else {
            None
        };
        let api = options.tc_attach.resolve(kernel);
        let fast = start_fast_path(
            &mut ebpf,
            options.fast_path,
            (subnet, devices.v6.and(devices.subnet6)),
            options.fast_path_mark,
            pins,
        )?;
        if devices.v6.is_none()
            && let Some(pins) = pins
        {
            // Dual stack turned off: the pinned link went with the device,
            // or holds a program on a device nothing programs any more.
            let link = pins.link(PROG_EGRESS6);
            match std::fs::remove_file(&link) {
                Ok(()) => info!("no IPv6: detached the pinned {PROG_EGRESS6}"),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(pin_err(link, "remove")(e)),
            }
        }
        if options.ingress == IngressMode::Tc
            && let Some(pins) = pins
        {
            // A previous run with xdp+tc: its XDP program would keep
            // decapsulating into a TC program that no longer expects it.
            let xdp = pins.link(PROG_INGRESS_XDP);
            match std::fs::remove_file(&xdp) {
                Ok(()) => info!("ingress is tc now: detached the pinned {PROG_INGRESS_XDP}"),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(pin_err(xdp, "remove")(e)),
            }
        }

        let mut links = Vec::new();
        let ingress_tc = attach_tc(
            &mut ebpf,
            api,
            &tc_attach::Target {
                program: PROG_INGRESS_TC,
                interface: &device.underlay,
                ifindex: device.underlay_ifindex,
                hook: TcAttachType::Ingress,
                pin: pins.map(|p| p.link(PROG_INGRESS_TC)).as_deref(),
            },
            &mut links,
        )?;
        let ingress_xdp = if options.ingress == IngressMode::XdpAndTc {
            Some(attach_xdp(
                &mut ebpf,
                xdp_program.unwrap_or(PROG_INGRESS_XDP),
                device,
                options.xdp_mode,
                pins,
            )?)
        } else {
            None
        };
        let egress = attach_tc(
            &mut ebpf,
            api,
            &tc_attach::Target {
                program: PROG_EGRESS,
                interface: &device.name,
                ifindex: device.ifindex,
                hook: TcAttachType::Egress,
                pin: pins.map(|p| p.link(PROG_EGRESS)).as_deref(),
            },
            &mut links,
        )?;

        let egress6 = match devices.v6 {
            Some(device6) => Some(attach_tc(
                &mut ebpf,
                api,
                &tc_attach::Target {
                    program: PROG_EGRESS6,
                    interface: &device6.name,
                    ifindex: device6.ifindex,
                    hook: TcAttachType::Egress,
                    pin: pins.map(|p| p.link(PROG_EGRESS6)).as_deref(),
                },
                &mut links,
            )?),
            None => None,
        };

        Ok(Self {
            ebpf,
            users,
            sides6,
            ids: ProgramIds {
                egress,
                egress6,
                ingress_tc,
                ingress_xdp,
            },
            api,
            _links: links,
            fast,
        })
    }
}

/// Loads the veth programs and installs the host's part of the fast path,
/// then turns it on in FAST_CONFIG; with `auto`, anything that fails turns
/// it off instead, with one log line naming why.
pub(super) fn start_fast_path(
    ebpf: &mut Ebpf,
    mode: FastPathMode,
    (subnet, subnet6): (Ipv4Net, Option<Ipv6Net>),
    mark: u32,
    pins: Option<&PinLayout>,
) -> Result<Option<FastState>, EbpfError> {
    if mode == FastPathMode::Off {
        fastpath::configure(ebpf, None)?;
        fastpath::remove_leftovers(ebpf, subnet, pins)?;
        info!("fast path: off (--fast-path=off)");
        return Ok(None);
    }
    let attempt = (|| -> Result<(), EbpfError> {
        for program in [PROG_VETH_FROM_POD, PROG_VETH_TO_POD] {
            classifier(ebpf, program)?
                .load()
                .map_err(|e| EbpfError::load(program, e))?;
        }
        load_jumps(
            ebpf,
            &[JUMP_VETH_FROM_POD6, JUMP_VETH_TO_POD6, JUMP_VETH_ENCAP6],
        )?;
        fastpath::prepare_host(subnet, subnet6, mark, pins).map_err(EbpfError::FastPathHost)
    })();
    match attempt {
        Ok(()) => {
            // The gateway comes with the first look at the pod bridge.
            let settings = FastSettings {
                subnet,
                mark,
                gateway: None,
                subnet6,
                gateway6: None,
            };
            fastpath::configure(ebpf, Some(settings))?;
            Ok(Some(FastState {
                settings,
                pods: PodAttachments::default(),
            }))
        }
        Err(e) if mode == FastPathMode::Auto => {
            warn!(
                "fast path: off, every packet takes the host's path: {}",
                DatapathError::from(e).reason()
            );
            fastpath::configure(ebpf, None)?;
            fastpath::remove_leftovers(ebpf, subnet, pins)?;
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

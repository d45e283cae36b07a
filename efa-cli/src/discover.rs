//! Live discovery: what libfabric lists on this host, reduced to [`ProviderDesc`]s.

use std::collections::BTreeSet;

use efa_core::placement::Subnet;
use efa_fabric::{Caps, EpType, Hints, Info, Mode, MrMode, Threading};

use crate::net::{ipv4_of, Iface};
use crate::roles::ProviderDesc;
use crate::system::Rdma;

/// Every entry libfabric lists (any endpoint type, caps, MR mode and threading), grouped by
/// provider / fabric / domain, with `accepted` set for those that the communicator's own
/// hints ([`Hints::new`]) return.
///
/// # Errors
/// `fi_getinfo` failing for a reason other than "no data" (which gives an empty list).
pub fn providers(ifaces: &[Iface], rdma: &Rdma) -> efa_fabric::Result<Vec<ProviderDesc>> {
    let all = Hints::new()
        .caps(Caps::empty())
        .ep_type(EpType::Other(0)) // FI_EP_UNSPEC
        .mr_mode(MrMode::all())
        .mode(Mode::all())
        .threading(Threading::Unspec);
    let listed = get_or_empty(&all)?;
    let accepted: BTreeSet<(String, String, String)> = get_or_empty(&Hints::new())?
        .iter()
        .map(|i| (i.provider(), i.fabric(), i.domain()))
        .collect();
    tracing::debug!(
        listed = listed.len(),
        accepted = accepted.len(),
        "fi_getinfo"
    );
    Ok(group(&listed, &accepted, ifaces, rdma))
}

fn get_or_empty(h: &Hints) -> efa_fabric::Result<Vec<Info>> {
    match h.get() {
        Ok(v) => Ok(v),
        Err(e) if e.code() == Some(FI_ENODATA) => Ok(Vec::new()),
        Err(e) => Err(e),
    }
}

/// `FI_ENODATA`: libfabric's "No data available", the POSIX `ENODATA` (61 on Linux).
const FI_ENODATA: i32 = nix::libc::ENODATA;

fn group(
    listed: &[Info],
    accepted: &BTreeSet<(String, String, String)>,
    ifaces: &[Iface],
    rdma: &Rdma,
) -> Vec<ProviderDesc> {
    let mut out: Vec<ProviderDesc> = Vec::new();
    for i in listed {
        let key = (i.provider(), i.fabric(), i.domain());
        let t = i.ep_type();
        if let Some(d) = out
            .iter_mut()
            .find(|d| (&d.provider, &d.fabric, &d.domain) == (&key.0, &key.1, &key.2))
        {
            if !d.ep_types.contains(&t) {
                d.ep_types.push(t);
            }
            // Limits and caps describe the RDM endpoint when there is one.
            if t == EpType::Rdm && d.ep_types.first() != Some(&EpType::Rdm) {
                fill(d, i);
                d.ep_types.retain(|x| *x != EpType::Rdm);
                d.ep_types.insert(0, EpType::Rdm);
            } else if t == EpType::Rdm {
                d.caps |= i.caps();
            }
            continue;
        }
        let iface = iface_of(&key.0, &key.2, ifaces, rdma);
        // IP providers name the fabric after the subnet: report the interface's address in
        // it; otherwise the interface's first IPv4 address (what the communicator's card says).
        let in_fabric = match key.1.parse::<Subnet>() {
            Ok(f) if f.addr.is_ipv4() => Some(
                ifaces
                    .iter()
                    .filter(|i| Some(&i.name) == iface.as_ref())
                    .flat_map(|i| i.ipv4.iter().copied())
                    .find(|s| f.contains(s.addr))
                    .unwrap_or(f),
            ),
            _ => None,
        };
        let ipv4 = in_fabric.or_else(|| iface.as_deref().and_then(|n| ipv4_of(ifaces, n)));
        let mut d = ProviderDesc {
            accepted: accepted.contains(&key),
            provider: key.0,
            fabric: key.1,
            domain: key.2,
            ep_types: vec![t],
            caps: Caps::empty(),
            mr_mode: MrMode::empty(),
            mode: Mode::empty(),
            max_msg_size: 0,
            inject_size: 0,
            progress: efa_fabric::Progress::Unspec,
            iface,
            ipv4,
        };
        fill(&mut d, i);
        out.push(d);
    }
    out
}

fn fill(d: &mut ProviderDesc, i: &Info) {
    d.caps = i.caps();
    d.mr_mode = i.mr_mode();
    d.mode = i.mode();
    d.max_msg_size = i.max_msg_size();
    d.inject_size = i.inject_size();
    d.progress = i.progress();
}

/// The network interface behind a domain: IP providers name the domain after it; verbs and
/// efa domains are RDMA devices whose netdev sysfs knows; shm has none.
pub fn iface_of(provider: &str, domain: &str, ifaces: &[Iface], rdma: &Rdma) -> Option<String> {
    if provider == "shm" {
        return None;
    }
    if ifaces.iter().any(|i| i.name == domain) {
        return Some(domain.to_string());
    }
    // verbs domains are named after the device (`rxe0`; `mlx5_0-xrc`, `-dgram` variants);
    // efa domains after the device with a suffix (`rdmap0s6-rdm`).
    rdma.devices()
        .iter()
        .filter(|d| domain == d.name || domain.starts_with(&format!("{}-", d.name)))
        .find_map(|d| d.netdev.clone())
}

//! Which endpoint the communicator opens for each role, and why every other provider was not
//! chosen: a pure function over plain descriptions of `fi_getinfo` results.
//!
//! # The rule
//!
//! | role | providers, best first |
//! |---|---|
//! | intra-host ([`Transport::Shm`]) | `shm` |
//! | fabric ([`Transport::Fabric`]) | `efa`, `verbs;ofi_rxm` |
//! | IP ([`Transport::Ip`]) | `tcp;ofi_rxm`, `net`, `sockets` |
//!
//! This mirrors `efa_core::Communicator` (its `start`): the same provider lists and order and
//! the same interface rule. An entry qualifies if it offers an `FI_EP_RDM` endpoint with
//! `MSG` and `TAGGED` and `fi_getinfo` returns it for the communicator's own hints (RDM,
//! `MSG | TAGGED`, `FI_THREAD_SAFE`, the MR modes and mode bits efa-rs implements). `RMA` is
//! wanted; its absence is noted. The IP role uses the first IPv4 fabric, in libfabric's
//! order, on the IP route's interface ([`crate::net::choose_ip_iface`]). The fabric role
//! takes the first qualifying domain (the one holding `EFA_FABRIC_ADDR` if that is set).
//! Roles excluded by `EFA_TRANSPORTS` choose nothing.

use efa_core::placement::{Subnet, Transport, TransportSet};
use efa_fabric::{Caps, EpType, Mode, MrMode, Progress};
use serde::Serialize;

use crate::net::IpIfaceChoice;
use crate::system::Rdma;

/// Intra-host providers, best first.
pub const SHM_PROVIDERS: &[&str] = &["shm"];
/// Fabric providers, best first.
pub const FABRIC_PROVIDERS: &[&str] = &["efa", "verbs;ofi_rxm"];
/// IP providers, best first.
pub const IP_PROVIDERS: &[&str] = &["tcp;ofi_rxm", "net", "sockets"];

/// One provider / fabric / domain as `fi_getinfo` lists it, reduced to plain data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProviderDesc {
    /// Provider name (`tcp;ofi_rxm`).
    pub provider: String,
    /// Fabric name (IP providers: the subnet).
    pub fabric: String,
    /// Domain name (IP providers: the interface; verbs: the device).
    pub domain: String,
    /// Endpoint types offered.
    pub ep_types: Vec<EpType>,
    /// Capabilities of the RDM endpoint (of the first entry if there is no RDM one).
    pub caps: Caps,
    /// MR modes required.
    pub mr_mode: MrMode,
    /// Mode bits required.
    pub mode: Mode,
    /// Largest message.
    pub max_msg_size: usize,
    /// Largest injected message.
    pub inject_size: usize,
    /// Data progress model.
    pub progress: Progress,
    /// The network interface behind the domain.
    pub iface: Option<String>,
    /// That interface's IPv4 subnet.
    pub ipv4: Option<Subnet>,
    /// Whether `fi_getinfo` returns it for the communicator's hints.
    pub accepted: bool,
}

impl ProviderDesc {
    /// Whether the fabric is an IPv4 one (IP providers name fabrics by subnet).
    pub fn ipv4_fabric(&self) -> bool {
        match self.fabric.parse::<Subnet>() {
            Ok(s) => s.addr.is_ipv4(),
            Err(_) => self.ipv4.is_some(),
        }
    }
}

/// Settings that steer the choice.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Knobs {
    /// `FI_PROVIDER`: libfabric hides every provider it does not allow.
    pub fi_provider: Option<String>,
    /// `FI_TCP_IFACE`.
    pub fi_tcp_iface: Option<String>,
    /// `EFA_IFACE`.
    pub efa_iface: Option<String>,
    /// `EFA_FABRIC_ADDR`: the fabric endpoint's source address.
    pub fabric_addr: Option<String>,
    /// `EFA_TRANSPORTS`, parsed.
    pub transports: TransportSet,
    /// `EFA_TRANSPORTS` as given.
    pub transports_raw: Option<String>,
}

/// Whether libfabric's `FI_PROVIDER` filter lets `name` through. The filter is a comma list
/// (or `^list` to exclude); an item matches a layered provider by its full name or its core
/// provider (`tcp` matches `tcp;ofi_rxm`, `ofi_rxm` alone does not).
pub fn fi_provider_allows(filter: Option<&str>, name: &str) -> bool {
    let Some(f) = filter.map(str::trim).filter(|f| !f.is_empty()) else {
        return true;
    };
    let (neg, list) = match f.strip_prefix('^') {
        Some(r) => (true, r),
        None => (false, f),
    };
    let core = name.split(';').next().unwrap_or(name);
    let hit = list
        .split(',')
        .map(str::trim)
        .any(|it| it.eq_ignore_ascii_case(name) || it.eq_ignore_ascii_case(core));
    hit != neg
}

/// What became of one listed entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// The communicator would open it for this role.
    Chosen(Role),
    /// Not used, and why (one line).
    Rejected(String),
}

/// A role, named for output.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Same-host peers.
    IntraHost,
    /// Peers in the same subnet with a fabric.
    Fabric,
    /// Everyone else.
    Ip,
}

impl Role {
    /// All roles in order.
    pub const ALL: [Role; 3] = [Role::IntraHost, Role::Fabric, Role::Ip];

    /// The transport the role serves.
    pub fn transport(self) -> Transport {
        match self {
            Role::IntraHost => Transport::Shm,
            Role::Fabric => Transport::Fabric,
            Role::Ip => Transport::Ip,
        }
    }

    /// Providers for the role, best first.
    pub fn providers(self) -> &'static [&'static str] {
        match self {
            Role::IntraHost => SHM_PROVIDERS,
            Role::Fabric => FABRIC_PROVIDERS,
            Role::Ip => IP_PROVIDERS,
        }
    }

    /// The role a provider can serve, with its preference rank.
    pub fn of_provider(name: &str) -> Option<(Role, usize)> {
        Role::ALL.into_iter().find_map(|r| {
            r.providers()
                .iter()
                .position(|p| *p == name)
                .map(|i| (r, i))
        })
    }

    /// Name as printed.
    pub fn name(self) -> &'static str {
        match self {
            Role::IntraHost => "intra-host",
            Role::Fabric => "fabric",
            Role::Ip => "IP",
        }
    }
}

/// The outcome for one role.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoleChoice {
    /// The role.
    pub role: Role,
    /// Index of the chosen entry.
    pub chosen: Option<usize>,
    /// Why this entry, or why none.
    pub why: String,
    /// Caveats of the chosen entry (missing RMA, ...).
    pub notes: Vec<String>,
}

/// The outcome for every role and every entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Selection {
    /// One per role, in [`Role::ALL`] order.
    pub roles: Vec<RoleChoice>,
    /// One per entry, indexed like the input.
    pub verdicts: Vec<Verdict>,
}

impl Selection {
    /// The choice for `role`.
    pub fn role(&self, role: Role) -> &RoleChoice {
        &self.roles[Role::ALL.iter().position(|r| *r == role).unwrap_or(0)]
    }
}

fn names<T: bitflags::Flags>(f: T) -> String {
    f.iter_names().map(|(n, _)| n).collect::<Vec<_>>().join("|")
}

/// Why an entry cannot serve any role regardless of preference, if it cannot.
fn unfit(d: &ProviderDesc) -> Option<String> {
    if !d.ep_types.contains(&EpType::Rdm) {
        let offered: Vec<String> = d.ep_types.iter().map(|t| ep_name(*t)).collect();
        return Some(format!(
            "no FI_EP_RDM endpoint (offers {})",
            if offered.is_empty() {
                "none".into()
            } else {
                offered.join(", ")
            }
        ));
    }
    let missing = (Caps::MSG | Caps::TAGGED).difference(d.caps);
    if !missing.is_empty() {
        return Some(format!("missing capability {}", names(missing)));
    }
    if !d.accepted {
        let mr = d.mr_mode.difference(MrMode::SUPPORTED);
        if !mr.is_empty() {
            return Some(format!(
                "needs MR mode {}, which efa-rs does not implement",
                names(mr)
            ));
        }
        let mode = d.mode.difference(Mode::SUPPORTED);
        if !mode.is_empty() {
            return Some(format!(
                "needs mode bit {}, which efa-rs does not implement",
                names(mode)
            ));
        }
        return Some(
            "fi_getinfo does not return it for the communicator's hints \
             (FI_EP_RDM, MSG|TAGGED, FI_THREAD_SAFE)"
                .into(),
        );
    }
    None
}

/// Short endpoint type name.
pub fn ep_name(t: EpType) -> String {
    match t {
        EpType::Rdm => "rdm".into(),
        EpType::Msg => "msg".into(),
        EpType::Dgram => "dgram".into(),
        EpType::Other(v) => format!("type{v}"),
    }
}

fn transports_text(k: &Knobs) -> String {
    format!(
        "EFA_TRANSPORTS={}",
        k.transports_raw.as_deref().unwrap_or("")
    )
}

/// Why the fabric role has no candidate at all.
pub fn no_fabric_reason(rdma: &Rdma, ip_iface: &str) -> String {
    let fix = format!(
        "the kernel has no RDMA support or no device (for soft-RoCE: modprobe rdma_rxe; \
         rdma link add rxe0 type rxe netdev {ip_iface})"
    );
    match rdma {
        Rdma::Missing => format!("no RDMA device: /sys/class/infiniband is missing; {fix}"),
        Rdma::Empty => format!("no RDMA device: /sys/class/infiniband is empty; {fix}"),
        Rdma::Devices(devs) => {
            let names: Vec<&str> = devs.iter().map(|d| d.name.as_str()).collect();
            if let Some(d) = devs.iter().find(|d| !d.active()) {
                if !devs.iter().any(|d| d.active()) {
                    let st = d
                        .ports
                        .first()
                        .map_or("no ports".to_string(), |(p, s)| format!("port {p}: {s}"));
                    return format!(
                        "RDMA device {} is not ACTIVE ({st}); bring its interface up \
                         (ip link set dev {} up)",
                        d.name,
                        d.netdev.as_deref().unwrap_or("IFACE")
                    );
                }
            }
            format!(
                "RDMA device {} present, but libfabric lists neither efa nor verbs;ofi_rxm: \
                 check `fi_info -l` and that the user-space driver is installed \
                 (ibverbs-providers, or the EFA installer on EC2)",
                names.join(", ")
            )
        }
    }
}

/// Chooses an entry per role and explains every other entry. Pure.
pub fn select(descs: &[ProviderDesc], knobs: &Knobs, rdma: &Rdma, ip: &IpIfaceChoice) -> Selection {
    let unfit: Vec<Option<String>> = descs.iter().map(unfit).collect();
    let mut roles = Vec::new();
    for role in Role::ALL {
        roles.push(select_role(role, descs, &unfit, knobs, rdma, ip));
    }
    let verdicts = descs
        .iter()
        .enumerate()
        .map(|(i, d)| verdict(i, d, descs, &unfit, &roles, knobs, ip))
        .collect();
    Selection { roles, verdicts }
}

fn candidates(role: Role, descs: &[ProviderDesc]) -> Vec<usize> {
    let mut c: Vec<(usize, usize)> = descs
        .iter()
        .enumerate()
        .filter_map(|(i, d)| match Role::of_provider(&d.provider) {
            Some((r, rank)) if r == role => Some((rank, i)),
            _ => None,
        })
        .collect();
    c.sort();
    c.into_iter().map(|(_, i)| i).collect()
}

fn select_role(
    role: Role,
    descs: &[ProviderDesc],
    unfit: &[Option<String>],
    knobs: &Knobs,
    rdma: &Rdma,
    ip: &IpIfaceChoice,
) -> RoleChoice {
    let none = |why: String| RoleChoice {
        role,
        chosen: None,
        why,
        notes: Vec::new(),
    };
    if !knobs.transports.contains(role.transport()) {
        return none(format!("excluded by {}", transports_text(knobs)));
    }
    let cands = candidates(role, descs);
    if cands.is_empty() {
        let hidden: Vec<&str> = role
            .providers()
            .iter()
            .copied()
            .filter(|p| !fi_provider_allows(knobs.fi_provider.as_deref(), p))
            .collect();
        if hidden.len() == role.providers().len() {
            return none(format!(
                "FI_PROVIDER={} hides {}",
                knobs.fi_provider.as_deref().unwrap_or(""),
                hidden.join(", ")
            ));
        }
        return none(match role {
            Role::Fabric => no_fabric_reason(rdma, ip.name_or_placeholder()),
            Role::IntraHost => "libfabric lists no shm provider".into(),
            Role::Ip => format!(
                "libfabric lists no IP provider ({})",
                IP_PROVIDERS.join(", ")
            ),
        });
    }
    let eligible: Vec<usize> = cands
        .iter()
        .copied()
        .filter(|&i| unfit[i].is_none())
        .collect();
    if eligible.is_empty() {
        let i = cands[0];
        return none(format!(
            "every candidate was rejected; the best, {} on {}: {}",
            descs[i].provider,
            descs[i].domain,
            unfit[i].as_deref().unwrap_or("")
        ));
    }
    let pick = match role {
        Role::Ip => {
            let Some(target) = ip.name.as_deref() else {
                return none(format!(
                    "no interface for the IP route: {}; set EFA_IFACE",
                    ip.why
                ));
            };
            // Like the communicator: the first IPv4 entry on the interface, provider by
            // provider in preference order, entries in libfabric's order.
            let on_target = eligible
                .iter()
                .copied()
                .find(|&i| descs[i].domain == target && descs[i].ipv4_fabric());
            match on_target {
                Some(i) => Some((i, format!("on {target}: {}", ip.why))),
                None => {
                    return none(format!(
                        "no IP provider ({}) with an IPv4 fabric on interface {target} ({}){}",
                        IP_PROVIDERS.join(", "),
                        ip.why,
                        tcp_iface_hides(knobs, target)
                    ))
                }
            }
        }
        Role::Fabric => {
            let pinned = knobs.fabric_addr.as_deref().and_then(|want| {
                eligible
                    .iter()
                    .copied()
                    .find(|&i| descs[i].ipv4.map(|s| s.addr.to_string()).as_deref() == Some(want))
                    .map(|i| (i, format!("holds EFA_FABRIC_ADDR={want}")))
            });
            pinned.or_else(|| eligible.first().map(|&i| (i, String::new())))
        }
        Role::IntraHost => eligible.first().map(|&i| (i, String::new())),
    };
    let Some((i, mut why)) = pick else {
        return none("no candidate".into());
    };
    let d = &descs[i];
    let best = role.providers()[0];
    if d.provider != best {
        let reason = if descs.iter().any(|e| e.provider == best) {
            "not usable"
        } else {
            "not listed"
        };
        let hides = match (role, ip.name.as_deref()) {
            (Role::Ip, Some(t)) => tcp_iface_hides(knobs, t),
            _ => String::new(),
        };
        let pre = format!("{best} {reason}{hides}, {} is next", d.provider);
        why = if why.is_empty() {
            pre
        } else {
            format!("{pre}; {why}")
        };
    } else if why.is_empty() {
        why = "preferred provider".into();
    }
    let mut notes = Vec::new();
    if !d.caps.contains(Caps::RMA) {
        notes.push("no RMA capability: one-sided RMA is unavailable on this route".into());
    }
    if let (Role::Ip, Ok(f), Some(p)) = (role, d.fabric.parse::<Subnet>(), ip.primary) {
        if !f.contains(p.addr) {
            notes.push(format!(
                "the endpoint binds in {f}, but the card advertises {} (the interface's first \
                 address)",
                p.network()
            ));
        }
    }
    RoleChoice {
        role,
        chosen: Some(i),
        why,
        notes,
    }
}

/// `" (FI_TCP_IFACE=lo hides tcp on eth0)"` when that applies, else empty.
fn tcp_iface_hides(knobs: &Knobs, target: &str) -> String {
    match knobs.fi_tcp_iface.as_deref() {
        Some(t) if t != target => format!(" (FI_TCP_IFACE={t} hides tcp on {target})"),
        _ => String::new(),
    }
}

fn verdict(
    i: usize,
    d: &ProviderDesc,
    descs: &[ProviderDesc],
    unfit: &[Option<String>],
    roles: &[RoleChoice],
    knobs: &Knobs,
    ip: &IpIfaceChoice,
) -> Verdict {
    if let Some(rc) = roles.iter().find(|r| r.chosen == Some(i)) {
        return Verdict::Chosen(rc.role);
    }
    let Some((role, _)) = Role::of_provider(&d.provider) else {
        return Verdict::Rejected(unfit[i].clone().unwrap_or_else(|| {
            format!(
                "no role uses {} (intra-host: {}; fabric: {}; IP: {})",
                d.provider,
                SHM_PROVIDERS.join(", "),
                FABRIC_PROVIDERS.join(", "),
                IP_PROVIDERS.join(", ")
            )
        }));
    };
    let rc = &roles[Role::ALL.iter().position(|r| *r == role).unwrap_or(0)];
    if !knobs.transports.contains(role.transport()) {
        return Verdict::Rejected(format!(
            "{} role excluded by {}",
            role.name(),
            transports_text(knobs)
        ));
    }
    if let Some(u) = &unfit[i] {
        return Verdict::Rejected(u.clone());
    }
    if role == Role::Ip && Some(d.domain.as_str()) != ip.name.as_deref() {
        return Verdict::Rejected(format!(
            "interface {} is not the IP route's interface {} ({})",
            d.domain,
            ip.name_or_placeholder(),
            ip.why
        ));
    }
    let Some(c) = rc.chosen.map(|c| &descs[c]) else {
        return Verdict::Rejected(format!("{} role chooses nothing: {}", role.name(), rc.why));
    };
    if c.provider != d.provider {
        return Verdict::Rejected(format!("the {} role prefers {}", role.name(), c.provider));
    }
    Verdict::Rejected(match role {
        Role::Ip if !d.ipv4_fabric() => {
            format!("IPv6 fabric; the IP role uses the IPv4 fabric {}", c.fabric)
        }
        Role::Ip => format!(
            "another IPv4 fabric on {}; the IP role uses the first listed, {}",
            d.domain, c.fabric
        ),
        _ => format!("the {} role uses {} / {}", role.name(), c.fabric, c.domain),
    })
}

#[cfg(test)]
pub mod tests {
    use super::*;
    use crate::net::{choose_ip_iface, ifa};
    use crate::system::RdmaDevice;

    pub fn desc(provider: &str, fabric: &str, domain: &str) -> ProviderDesc {
        ProviderDesc {
            provider: provider.into(),
            fabric: fabric.into(),
            domain: domain.into(),
            ep_types: vec![EpType::Rdm],
            caps: Caps::MSG | Caps::TAGGED | Caps::RMA,
            mr_mode: MrMode::empty(),
            mode: Mode::empty(),
            max_msg_size: 1 << 30,
            inject_size: 64,
            progress: Progress::Manual,
            iface: Some(domain.into()),
            ipv4: None,
            accepted: true,
        }
    }

    /// What libfabric 1.17 lists on this CI host (no RDMA device).
    pub fn ci_host() -> Vec<ProviderDesc> {
        let mut tcp_core = desc("tcp", "192.0.2.0/24", "eth0");
        tcp_core.ep_types = vec![EpType::Msg];
        let mut udp = desc("udp", "192.0.2.0/24", "eth0");
        udp.ep_types = vec![EpType::Dgram];
        let mut shm = desc("shm", "shm", "shm");
        shm.iface = None;
        vec![
            desc("tcp;ofi_rxm", "192.0.2.0/24", "eth0"),
            desc("tcp;ofi_rxm", "fd00::/64", "eth0"),
            desc("tcp;ofi_rxm", "127.0.0.1/32", "lo"),
            shm,
            desc("net", "192.0.2.0/24", "eth0"),
            desc("net;ofi_rxm", "192.0.2.0/24", "eth0"),
            tcp_core,
            udp,
            desc("sockets", "192.0.2.0/24", "eth0"),
            desc("udp;ofi_rxd", "192.0.2.0/24", "eth0"),
        ]
    }

    fn ifaces() -> Vec<efa_core::net::IfAddr> {
        vec![ifa("lo", "127.0.0.1/8"), ifa("eth0", "192.0.2.2/24")]
    }

    fn run(descs: &[ProviderDesc], knobs: &Knobs, rdma: &Rdma) -> Selection {
        let ip = choose_ip_iface(&ifaces(), knobs.efa_iface.as_deref(), false);
        select(descs, knobs, rdma, &ip)
    }

    fn chosen<'a>(s: &Selection, d: &'a [ProviderDesc], r: Role) -> Option<&'a ProviderDesc> {
        s.role(r).chosen.map(|i| &d[i])
    }

    fn reason(s: &Selection, i: usize) -> &str {
        match &s.verdicts[i] {
            Verdict::Rejected(r) => r,
            Verdict::Chosen(r) => panic!("entry {i} chosen for {r:?}"),
        }
    }

    #[test]
    fn ci_host_uses_shm_and_tcp_and_explains_no_fabric() {
        let d = ci_host();
        let s = run(&d, &Knobs::default(), &Rdma::Missing);
        assert_eq!(chosen(&s, &d, Role::IntraHost).unwrap().provider, "shm");
        let ip = chosen(&s, &d, Role::Ip).unwrap();
        assert_eq!(
            (ip.provider.as_str(), ip.domain.as_str(), ip.fabric.as_str()),
            ("tcp;ofi_rxm", "eth0", "192.0.2.0/24")
        );
        assert_eq!(
            s.role(Role::Ip).why,
            "on eth0: first non-loopback interface with IPv4"
        );
        let f = s.role(Role::Fabric);
        assert_eq!(f.chosen, None);
        assert_eq!(
            f.why,
            "no RDMA device: /sys/class/infiniband is missing; the kernel has no RDMA support \
             or no device (for soft-RoCE: modprobe rdma_rxe; rdma link add rxe0 type rxe \
             netdev eth0)"
        );
        assert_eq!(
            reason(&s, 1),
            "IPv6 fabric; the IP role uses the IPv4 fabric 192.0.2.0/24"
        );
        assert_eq!(
            reason(&s, 2),
            "interface lo is not the IP route's interface eth0 (first non-loopback interface \
             with IPv4)"
        );
        assert_eq!(reason(&s, 4), "the IP role prefers tcp;ofi_rxm");
        assert!(reason(&s, 5).starts_with("no role uses net;ofi_rxm (intra-host: shm;"));
        assert_eq!(reason(&s, 6), "no FI_EP_RDM endpoint (offers msg)");
        assert_eq!(reason(&s, 7), "no FI_EP_RDM endpoint (offers dgram)");
        assert!(reason(&s, 9).starts_with("no role uses udp;ofi_rxd"));
        assert_eq!(s.verdicts.len(), d.len());
    }

    #[test]
    fn rejection_reasons_for_caps_mr_mode_and_hints() {
        let mut d = ci_host();
        d[0].caps = Caps::MSG;
        d[4].accepted = false;
        d[4].mr_mode = MrMode::RAW | MrMode::LOCAL;
        d[9].accepted = false;
        d[9].mode = Mode::MSG_PREFIX;
        d[1].accepted = false;
        let s = run(&d, &Knobs::default(), &Rdma::Missing);
        assert_eq!(reason(&s, 0), "missing capability TAGGED");
        assert_eq!(
            reason(&s, 4),
            "needs MR mode RAW, which efa-rs does not implement"
        );
        assert_eq!(
            reason(&s, 9),
            "needs mode bit MSG_PREFIX, which efa-rs does not implement"
        );
        assert!(reason(&s, 1).starts_with("fi_getinfo does not return it"));
        // tcp;ofi_rxm on eth0 lacks TAGGED and net's entry is unfit, so sockets is next.
        let ip = chosen(&s, &d, Role::Ip).unwrap();
        assert_eq!(
            (ip.provider.as_str(), ip.domain.as_str()),
            ("sockets", "eth0")
        );
        assert!(s
            .role(Role::Ip)
            .why
            .starts_with("tcp;ofi_rxm not usable, sockets is next"));
    }

    #[test]
    fn rma_missing_is_noted() {
        let mut d = ci_host();
        d[3].caps = Caps::MSG | Caps::TAGGED;
        let s = run(&d, &Knobs::default(), &Rdma::Missing);
        assert_eq!(s.role(Role::IntraHost).chosen, Some(3));
        assert_eq!(s.role(Role::IntraHost).notes.len(), 1);
        assert!(s.role(Role::Ip).notes.is_empty());
    }

    #[test]
    fn efa_iface_pins_and_fi_tcp_iface_hides() {
        let d = ci_host();
        let k = Knobs {
            efa_iface: Some("lo".into()),
            ..Knobs::default()
        };
        let s = run(&d, &k, &Rdma::Missing);
        assert_eq!(chosen(&s, &d, Role::Ip).unwrap().domain, "lo");
        assert_eq!(
            reason(&s, 0),
            "interface eth0 is not the IP route's interface lo (pinned by EFA_IFACE=lo)"
        );
        let k = Knobs {
            efa_iface: Some("eth7".into()),
            ..Knobs::default()
        };
        let s = run(&d, &k, &Rdma::Missing);
        assert_eq!(s.role(Role::Ip).chosen, None);
        assert_eq!(
            s.role(Role::Ip).why,
            "no IP provider (tcp;ofi_rxm, net, sockets) with an IPv4 fabric on interface eth7 \
             (pinned by EFA_IFACE=eth7)"
        );
        // FI_TCP_IFACE=lo: libfabric lists tcp only on lo, so the communicator, which still
        // uses eth0, falls back to net there.
        let d: Vec<ProviderDesc> = ci_host()
            .into_iter()
            .filter(|e| !(e.provider == "tcp;ofi_rxm" && e.domain == "eth0"))
            .collect();
        let k = Knobs {
            fi_tcp_iface: Some("lo".into()),
            ..Knobs::default()
        };
        let s = run(&d, &k, &Rdma::Missing);
        let ip = chosen(&s, &d, Role::Ip).unwrap();
        assert_eq!((ip.provider.as_str(), ip.domain.as_str()), ("net", "eth0"));
        assert_eq!(
            s.role(Role::Ip).why,
            "tcp;ofi_rxm not usable (FI_TCP_IFACE=lo hides tcp on eth0), net is next; on eth0: \
             first non-loopback interface with IPv4"
        );
    }

    #[test]
    fn ip_role_takes_the_first_listed_ipv4_fabric_and_notes_a_mismatch() {
        let d = vec![
            desc("tcp;ofi_rxm", "10.10.2.0/24", "dummy0"),
            desc("tcp;ofi_rxm", "10.10.1.0/24", "dummy0"),
        ];
        let ifs = vec![
            ifa("lo", "127.0.0.1/8"),
            ifa("dummy0", "10.10.1.1/24"),
            ifa("dummy0", "10.10.2.1/24"),
        ];
        let ip = choose_ip_iface(&ifs, None, false);
        let s = select(&d, &Knobs::default(), &Rdma::Missing, &ip);
        assert_eq!(s.role(Role::Ip).chosen, Some(0));
        assert_eq!(
            s.role(Role::Ip).notes,
            [
                "the endpoint binds in 10.10.2.0/24, but the card advertises 10.10.1.0/24 (the \
              interface's first address)"
            ]
        );
        assert_eq!(
            reason(&s, 1),
            "another IPv4 fabric on dummy0; the IP role uses the first listed, 10.10.2.0/24"
        );
        // A job with every rank on this host uses lo.
        let ip = choose_ip_iface(&ifs, None, true);
        let s = select(&d, &Knobs::default(), &Rdma::Missing, &ip);
        assert_eq!(s.role(Role::Ip).chosen, None);
        assert!(s.role(Role::Ip).why.contains("on interface lo"));
    }

    #[test]
    fn efa_transports_excludes_roles() {
        let d = ci_host();
        let k = Knobs {
            transports: TransportSet::parse("^shm").unwrap(),
            transports_raw: Some("^shm".into()),
            ..Knobs::default()
        };
        let s = run(&d, &k, &Rdma::Missing);
        assert_eq!(s.role(Role::IntraHost).chosen, None);
        assert_eq!(
            s.role(Role::IntraHost).why,
            "excluded by EFA_TRANSPORTS=^shm"
        );
        assert_eq!(
            reason(&s, 3),
            "intra-host role excluded by EFA_TRANSPORTS=^shm"
        );
        assert!(s.role(Role::Ip).chosen.is_some());
    }

    #[test]
    fn fi_provider_filter() {
        assert!(fi_provider_allows(None, "shm"));
        assert!(fi_provider_allows(Some("tcp"), "tcp;ofi_rxm"));
        assert!(fi_provider_allows(Some("tcp;ofi_rxm"), "tcp;ofi_rxm"));
        assert!(!fi_provider_allows(Some("ofi_rxm"), "tcp;ofi_rxm"));
        assert!(!fi_provider_allows(Some("^tcp"), "tcp;ofi_rxm"));
        assert!(fi_provider_allows(Some("^tcp"), "shm"));
        assert!(fi_provider_allows(Some("shm, tcp"), "shm"));
        assert!(!fi_provider_allows(Some("shm,tcp"), "efa"));
        // The fabric role's absence blames FI_PROVIDER when it hides every fabric provider.
        let d: Vec<ProviderDesc> = ci_host()
            .into_iter()
            .filter(|d| d.provider.starts_with("tcp"))
            .collect();
        let k = Knobs {
            fi_provider: Some("tcp".into()),
            ..Knobs::default()
        };
        let s = run(&d, &k, &Rdma::Missing);
        assert_eq!(
            s.role(Role::Fabric).why,
            "FI_PROVIDER=tcp hides efa, verbs;ofi_rxm"
        );
        assert_eq!(s.role(Role::IntraHost).why, "FI_PROVIDER=tcp hides shm");
    }

    fn rxe(state: &str) -> RdmaDevice {
        RdmaDevice {
            name: "rxe0".into(),
            driver: Some("rdma_rxe".into()),
            ports: vec![("1".into(), state.into())],
            netdev: Some("dummy0".into()),
            gids: vec![],
        }
    }

    #[test]
    fn soft_roce_vm_uses_verbs() {
        let mut d = ci_host();
        let mut v = desc("verbs;ofi_rxm", "IB-0xfe80000000000000", "rxe0");
        v.iface = Some("dummy0".into());
        v.ipv4 = Some("10.10.1.1/24".parse().unwrap());
        d.push(v);
        let mut vm = desc("verbs", "IB-0xfe80000000000000", "rxe0");
        vm.ep_types = vec![EpType::Msg];
        d.push(vm);
        let s = run(
            &d,
            &Knobs::default(),
            &Rdma::Devices(vec![rxe("4: ACTIVE")]),
        );
        let f = s.role(Role::Fabric);
        assert_eq!(f.chosen, Some(d.len() - 2));
        assert_eq!(f.why, "efa not listed, verbs;ofi_rxm is next");
        assert_eq!(
            reason(&s, d.len() - 1),
            "no FI_EP_RDM endpoint (offers msg)"
        );
        let k = Knobs {
            transports: TransportSet::parse("shm,ip").unwrap(),
            transports_raw: Some("shm,ip".into()),
            ..Knobs::default()
        };
        let s = run(&d, &k, &Rdma::Devices(vec![rxe("4: ACTIVE")]));
        assert_eq!(
            reason(&s, d.len() - 2),
            "fabric role excluded by EFA_TRANSPORTS=shm,ip"
        );
    }

    #[test]
    fn fabric_absence_reasons() {
        assert!(no_fabric_reason(&Rdma::Empty, "eth0")
            .starts_with("no RDMA device: /sys/class/infiniband is empty;"));
        assert_eq!(
            no_fabric_reason(&Rdma::Devices(vec![rxe("1: DOWN")]), "eth0"),
            "RDMA device rxe0 is not ACTIVE (port 1: 1: DOWN); bring its interface up \
             (ip link set dev dummy0 up)"
        );
        assert!(
            no_fabric_reason(&Rdma::Devices(vec![rxe("4: ACTIVE")]), "eth0")
                .starts_with("RDMA device rxe0 present, but libfabric lists neither efa")
        );
    }
}

//! Which provider, domain and source address serve each role (shm, fabric, IP), with which
//! `fi_getinfo(3)` hints, and why every other entry was not chosen. Decided in one place,
//! for both [`crate::Communicator`] and `efa info`:
//!
//! * [`discover`] asks libfabric and the host (the one call with side effects): the entries
//!   `fi_getinfo` returns for the communicator's hints ([`hints`]) of each role's providers
//!   (for `efa info` also every other entry it lists), and the host's interfaces;
//! * [`select`] chooses, as a pure function of those answers and the [`Settings`].
//!
//! # The rule
//!
//! | role | providers, best first |
//! |---|---|
//! | intra-host ([`Transport::Shm`]) | `shm` |
//! | fabric ([`Transport::Fabric`]) | `efa`, `verbs;ofi_rxm` |
//! | IP ([`Transport::Ip`]) | `tcp;ofi_rxm`, `net`, `sockets` |
//!
//! An entry qualifies if `fi_getinfo` returns it for the role's hints ([`hints`]: an
//! `FI_EP_RDM` endpoint with `MSG | TAGGED`, `FI_THREAD_SAFE`, the MR modes and mode bits
//! efa-rs implements; `FI_SOCKADDR_IN` for the IP role; `EFA_FABRIC_ADDR` as the source
//! node of the fabric role). `RMA` is asked for first and its absence noted. The intra-host
//! and fabric roles take the first qualifying entry of the best provider listed (the fabric
//! role: the one holding `EFA_FABRIC_ADDR` if set). The IP role takes the first IPv4 fabric,
//! in libfabric's order, on the IP route's interface ([`choose_ip_iface`]). Roles excluded by
//! `EFA_TRANSPORTS` choose nothing.

use std::net::IpAddr;
use std::path::Path;

use efa_fabric::{AddrFormat, Caps, EpType, Hints, Info, Mode, MrMode, Progress, Threading};

use crate::net::{self, IfAddr};
use crate::placement::{Subnet, Transport, TransportSet};

/// Intra-host providers, best first.
pub const SHM_PROVIDERS: &[&str] = &["shm"];
/// Fabric providers, best first.
pub const FABRIC_PROVIDERS: &[&str] = &["efa", "verbs;ofi_rxm"];
/// IP providers, best first.
pub const IP_PROVIDERS: &[&str] = &["tcp;ofi_rxm", "net", "sockets"];

/// The capabilities every role needs.
pub const MSG_CAPS: Caps = Caps::MSG.union(Caps::TAGGED);
/// The capabilities asked for first: messaging and RMA (windows need RMA).
pub const RMA_CAPS: Caps = MSG_CAPS
    .union(Caps::RMA)
    .union(Caps::READ)
    .union(Caps::WRITE)
    .union(Caps::REMOTE_READ)
    .union(Caps::REMOTE_WRITE);

/// Providers for a role, best first.
pub fn providers_for(role: Transport) -> &'static [&'static str] {
    match role {
        Transport::Shm => SHM_PROVIDERS,
        Transport::Fabric => FABRIC_PROVIDERS,
        Transport::Ip => IP_PROVIDERS,
    }
}

/// The role a provider can serve, with its preference rank (0 is best).
pub fn role_of_provider(name: &str) -> Option<(Transport, usize)> {
    Transport::ALL.into_iter().find_map(|r| {
        providers_for(r)
            .iter()
            .position(|p| *p == name)
            .map(|i| (r, i))
    })
}

/// A role's name as printed (`intra-host`, `fabric`, `IP`).
pub fn role_name(role: Transport) -> &'static str {
    match role {
        Transport::Shm => "intra-host",
        Transport::Fabric => "fabric",
        Transport::Ip => "IP",
    }
}

/// The communicator's `fi_getinfo` hints for `role`: `FI_EP_RDM`, `caps`, `FI_THREAD_SAFE`
/// and the MR modes and mode bits efa-rs implements ([`Hints::new`]); the IP role asks for
/// `FI_SOCKADDR_IN` (cards carry IPv4 subnets); the fabric role binds to `EFA_FABRIC_ADDR`
/// when it is set (`FI_SOURCE`).
pub fn hints(role: Transport, caps: Caps, settings: &Settings) -> Hints {
    let h = Hints::new().caps(caps);
    match role {
        Transport::Shm => h,
        Transport::Fabric => match &settings.fabric_addr {
            Some(a) => h.source_node(a.as_str()),
            None => h,
        },
        Transport::Ip => h.addr_format(AddrFormat::SockaddrIn),
    }
}

/// [`hints`] in words, for explanations.
pub fn hints_text(role: Transport, settings: &Settings) -> String {
    let extra = match (role, &settings.fabric_addr) {
        (Transport::Ip, _) => ", FI_SOCKADDR_IN".to_string(),
        (Transport::Fabric, Some(a)) => format!(", source {a}"),
        _ => String::new(),
    };
    format!("FI_EP_RDM, MSG|TAGGED, FI_THREAD_SAFE{extra}")
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
    let core = efa_fabric::core_provider(name);
    let hit = list
        .split(',')
        .map(str::trim)
        .any(|it| it.eq_ignore_ascii_case(name) || it.eq_ignore_ascii_case(core));
    hit != neg
}

/// One provider / fabric / domain as `fi_getinfo` lists it, reduced to plain data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Offer {
    /// Provider name (`tcp;ofi_rxm`).
    pub provider: String,
    /// Fabric name (IP providers: the subnet).
    pub fabric: String,
    /// Domain name (IP providers: the interface; verbs: the device).
    pub domain: String,
    /// Endpoint types offered (RDM first when offered).
    pub ep_types: Vec<EpType>,
    /// Capabilities of the RDM endpoint (of the first entry if there is no RDM one).
    pub caps: Caps,
    /// MR modes required.
    pub mr_mode: MrMode,
    /// Mode bits required.
    pub mode: Mode,
    /// Largest message, in bytes.
    pub max_msg_size: usize,
    /// Largest injected message, in bytes.
    pub inject_size: usize,
    /// Data progress model.
    pub progress: Progress,
    /// The network interface behind the domain (IP providers: the domain; fabric providers:
    /// the RDMA device's netdev, [`net::netdev_of_rdma_device`]; shm: none).
    pub iface: Option<String>,
    /// The interface's IPv4 address in the fabric (IP providers), else its first IPv4
    /// address.
    pub ipv4: Option<Subnet>,
    /// Whether `fi_getinfo` returns it for the communicator's hints of its role ([`hints`]).
    pub accepted: bool,
    /// Whether it is returned for those hints with [`RMA_CAPS`] (RMA windows work on it).
    pub rma: bool,
}

impl Offer {
    /// Whether the fabric is an IPv4 one (IP providers name fabrics by subnet).
    pub fn ipv4_fabric(&self) -> bool {
        match self.fabric.parse::<Subnet>() {
            Ok(s) => s.addr.is_ipv4(),
            Err(_) => self.ipv4.is_some(),
        }
    }
}

/// The settings that steer the choice.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// Roles allowed (`EFA_TRANSPORTS` or `CommunicatorBuilder::transports`).
    pub transports: TransportSet,
    /// Where [`Settings::transports`] came from, as printed in reasons
    /// (`EFA_TRANSPORTS=^shm`).
    pub transports_from: String,
    /// The IP route's interface (`EFA_IFACE` or `CommunicatorBuilder::ip_iface`).
    pub ip_iface: Option<String>,
    /// The fabric endpoint's source address (`EFA_FABRIC_ADDR` or
    /// `CommunicatorBuilder::fabric_addr`).
    pub fabric_addr: Option<String>,
    /// Every rank of the job runs on this host (the IP route then uses `lo`).
    pub all_local: bool,
    /// `FI_PROVIDER`: libfabric hides every provider it does not allow (for explanations).
    pub fi_provider: Option<String>,
    /// `FI_TCP_IFACE`: libfabric's tcp provider lists only that interface (for explanations).
    pub fi_tcp_iface: Option<String>,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            transports: TransportSet::all(),
            transports_from: "EFA_TRANSPORTS (unset)".into(),
            ip_iface: None,
            fabric_addr: None,
            all_local: false,
            fi_provider: None,
            fi_tcp_iface: None,
        }
    }
}

fn env_nonblank(key: &str) -> Option<String> {
    std::env::var(key)
        .ok()
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty())
}

impl Settings {
    /// The settings as the environment gives them: `EFA_TRANSPORTS` (parsed as
    /// [`TransportSet::from_env`] does), `EFA_IFACE`, `EFA_FABRIC_ADDR` (taken as they are;
    /// the communicator checks them against the host in `build`), `FI_PROVIDER`,
    /// `FI_TCP_IFACE`.
    ///
    /// # Errors
    /// [`crate::Error::Setting`] for an `EFA_TRANSPORTS` that does not parse or allows
    /// nothing.
    pub fn from_env(all_local: bool) -> crate::Result<Settings> {
        let transports = TransportSet::from_env()?;
        Ok(Settings {
            transports,
            transports_from: match env_nonblank("EFA_TRANSPORTS") {
                Some(v) => format!("EFA_TRANSPORTS={v}"),
                None => "EFA_TRANSPORTS (unset)".into(),
            },
            ip_iface: env_nonblank("EFA_IFACE"),
            fabric_addr: env_nonblank("EFA_FABRIC_ADDR"),
            all_local,
            fi_provider: env_nonblank("FI_PROVIDER"),
            fi_tcp_iface: env_nonblank("FI_TCP_IFACE"),
        })
    }
}

/// Which interface the IP role uses, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IpIfaceChoice {
    /// The interface, if there is one.
    pub name: Option<String>,
    /// Why, in a few words.
    pub why: String,
    /// What the card advertises for it: its first IPv4 address (else IPv6) and prefix.
    pub subnet: Option<Subnet>,
}

impl IpIfaceChoice {
    /// The name, or `IFACE` as a placeholder in fix texts.
    pub fn name_or_placeholder(&self) -> &str {
        self.name.as_deref().unwrap_or("IFACE")
    }
}

/// The IP role's interface ([`net::choose_ip_iface`]: the one set, else `lo` when every
/// rank runs on this host, else the first up, non-loopback interface with an IPv4 address),
/// with the reason. Pure.
pub fn choose_ip_iface(ifs: &[IfAddr], settings: &Settings) -> IpIfaceChoice {
    let wanted = settings.ip_iface.as_deref();
    let name = net::choose_ip_iface(ifs, wanted, settings.all_local);
    let why = match (wanted, settings.all_local, &name) {
        (Some(n), _, _) => format!("pinned by EFA_IFACE={n}"),
        (None, true, _) => "every rank on this host".into(),
        (None, false, Some(_)) => "first non-loopback interface with IPv4".into(),
        (None, false, None) => "no up, non-loopback interface has an IPv4 address".into(),
    };
    let subnet = name.as_deref().and_then(|n| net::subnet_of(ifs, n));
    IpIfaceChoice { name, why, subnet }
}

/// The outcome for one role.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoleChoice {
    /// The role.
    pub role: Transport,
    /// Index of the chosen offer; `None` when the role has no endpoint ([`RoleChoice::why`]
    /// says why).
    pub chosen: Option<usize>,
    /// Why this offer, or why none.
    pub why: String,
    /// Caveats of the chosen offer (missing RMA, ...).
    pub notes: Vec<String>,
    /// The source address the endpoint binds to, when one is set (the fabric role's
    /// `EFA_FABRIC_ADDR`).
    pub source: Option<String>,
    /// The subnet this rank's card advertises for the role (fabric: the interface holding
    /// the source address, else the device's interface; IP: the route's interface). `None`
    /// for shm, and when it is unknown (peers then do not use the role to reach this rank,
    /// except shm).
    pub subnet: Option<Subnet>,
}

/// What became of one offer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// The communicator opens it for this role.
    Chosen(Transport),
    /// Not used, and why (one line).
    Rejected(String),
}

/// The outcome for every role and every offer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Selection {
    /// One per role, in [`Transport::ALL`] order.
    pub roles: Vec<RoleChoice>,
    /// One per offer, indexed like the input.
    pub verdicts: Vec<Verdict>,
    /// The IP route's interface.
    pub ip_iface: IpIfaceChoice,
}

impl Selection {
    /// The choice for `role`.
    pub fn role(&self, role: Transport) -> &RoleChoice {
        &self.roles[Transport::ALL.iter().position(|r| *r == role).unwrap_or(0)]
    }
}

/// `A|B` from a bitflags value's flag names.
macro_rules! names {
    ($f:expr) => {
        $f.iter_names()
            .map(|(n, _)| n)
            .collect::<Vec<_>>()
            .join("|")
    };
}

/// Short endpoint type name (`rdm`, `msg`, `dgram`).
pub fn ep_name(t: EpType) -> String {
    match t {
        EpType::Rdm => "rdm".into(),
        EpType::Msg => "msg".into(),
        EpType::Dgram => "dgram".into(),
        EpType::Other(v) => format!("type{v}"),
    }
}

/// Why an offer cannot serve any role regardless of preference, if it cannot.
fn unfit(d: &Offer, settings: &Settings) -> Option<String> {
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
    let missing = MSG_CAPS.difference(d.caps);
    if !missing.is_empty() {
        return Some(format!("missing capability {}", names!(missing)));
    }
    if !d.accepted {
        let mr = d.mr_mode.difference(MrMode::SUPPORTED);
        if !mr.is_empty() {
            return Some(format!(
                "needs MR mode {}, which efa-rs does not implement",
                names!(mr)
            ));
        }
        let mode = d.mode.difference(Mode::SUPPORTED);
        if !mode.is_empty() {
            return Some(format!(
                "needs mode bit {}, which efa-rs does not implement",
                names!(mode)
            ));
        }
        let hints = role_of_provider(&d.provider)
            .map(|(r, _)| hints_text(r, settings))
            .unwrap_or_else(|| "FI_EP_RDM, MSG|TAGGED, FI_THREAD_SAFE".into());
        return Some(format!(
            "fi_getinfo does not return it for the communicator's hints ({hints})"
        ));
    }
    None
}

/// `" (FI_TCP_IFACE=lo hides tcp on eth0)"` when that applies, else empty.
fn tcp_iface_hides(settings: &Settings, target: &str) -> String {
    match settings.fi_tcp_iface.as_deref() {
        Some(t) if t != target => format!(" (FI_TCP_IFACE={t} hides tcp on {target})"),
        _ => String::new(),
    }
}

/// Chooses an offer per role and explains every other offer. Pure: `offers` and `ifs` are
/// what [`discover`] found (or synthetic), `settings` the job's settings.
pub fn select(offers: &[Offer], ifs: &[IfAddr], settings: &Settings) -> Selection {
    let ip = choose_ip_iface(ifs, settings);
    let unfit: Vec<Option<String>> = offers.iter().map(|d| unfit(d, settings)).collect();
    let roles: Vec<RoleChoice> = Transport::ALL
        .into_iter()
        .map(|role| select_role(role, offers, &unfit, ifs, settings, &ip))
        .collect();
    let verdicts = offers
        .iter()
        .enumerate()
        .map(|(i, d)| verdict(i, d, offers, &unfit, &roles, settings, &ip))
        .collect();
    Selection {
        roles,
        verdicts,
        ip_iface: ip,
    }
}

/// Offers of `role`'s providers, best provider first, then in libfabric's order.
fn candidates(role: Transport, offers: &[Offer]) -> Vec<usize> {
    let mut c: Vec<(usize, usize)> = offers
        .iter()
        .enumerate()
        .filter_map(|(i, d)| match role_of_provider(&d.provider) {
            Some((r, rank)) if r == role => Some((rank, i)),
            _ => None,
        })
        .collect();
    c.sort();
    c.into_iter().map(|(_, i)| i).collect()
}

/// The fabric role's card subnet: the interface holding the source address, else the
/// interface behind the device.
fn fabric_subnet(d: &Offer, ifs: &[IfAddr], settings: &Settings) -> Option<Subnet> {
    match &settings.fabric_addr {
        Some(a) => a
            .trim()
            .parse::<IpAddr>()
            .ok()
            .and_then(|ip| net::iface_of_addr(ifs, ip))
            .map(|i| i.subnet),
        None => d.iface.as_deref().and_then(|n| net::subnet_of(ifs, n)),
    }
}

fn select_role(
    role: Transport,
    offers: &[Offer],
    unfit: &[Option<String>],
    ifs: &[IfAddr],
    settings: &Settings,
    ip: &IpIfaceChoice,
) -> RoleChoice {
    let none = |why: String| RoleChoice {
        role,
        chosen: None,
        why,
        notes: Vec::new(),
        source: None,
        subnet: None,
    };
    let providers = providers_for(role);
    if !settings.transports.contains(role) {
        return none(format!("excluded by {}", settings.transports_from));
    }
    let cands = candidates(role, offers);
    if cands.is_empty() {
        let hidden: Vec<&str> = providers
            .iter()
            .copied()
            .filter(|p| !fi_provider_allows(settings.fi_provider.as_deref(), p))
            .collect();
        if hidden.len() == providers.len() {
            return none(format!(
                "FI_PROVIDER={} hides {}",
                settings.fi_provider.as_deref().unwrap_or(""),
                hidden.join(", ")
            ));
        }
        return none(match role {
            Transport::Fabric => "libfabric lists neither efa nor verbs;ofi_rxm".into(),
            Transport::Shm => "libfabric lists no shm provider".into(),
            Transport::Ip => format!(
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
            offers[i].provider,
            offers[i].domain,
            unfit[i].as_deref().unwrap_or("")
        ));
    }
    let (i, mut why) = match role {
        Transport::Ip => {
            let Some(target) = ip.name.as_deref() else {
                return none(format!(
                    "no interface for the IP route: {}; set EFA_IFACE",
                    ip.why
                ));
            };
            // The first IPv4 entry on the interface, provider by provider in preference
            // order, entries in libfabric's order.
            let on_target = eligible
                .iter()
                .copied()
                .find(|&i| offers[i].domain == target && offers[i].ipv4_fabric());
            match on_target {
                Some(i) => (i, format!("on {target}: {}", ip.why)),
                None => {
                    return none(format!(
                        "no IP provider ({}) with an IPv4 fabric on interface {target} ({}){}",
                        IP_PROVIDERS.join(", "),
                        ip.why,
                        tcp_iface_hides(settings, target)
                    ))
                }
            }
        }
        Transport::Fabric => {
            let pinned = settings.fabric_addr.as_deref().and_then(|want| {
                eligible
                    .iter()
                    .copied()
                    .find(|&i| offers[i].ipv4.map(|s| s.addr.to_string()).as_deref() == Some(want))
                    .map(|i| (i, format!("holds EFA_FABRIC_ADDR={want}")))
            });
            pinned.unwrap_or((eligible[0], String::new()))
        }
        Transport::Shm => (eligible[0], String::new()),
    };
    let d = &offers[i];
    let best = providers[0];
    if d.provider != best {
        let reason = if offers.iter().any(|e| e.provider == best) {
            "not usable"
        } else {
            "not listed"
        };
        let hides = match (role, ip.name.as_deref()) {
            (Transport::Ip, Some(t)) => tcp_iface_hides(settings, t),
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
    if !d.rma {
        notes.push("no RMA capability: one-sided RMA is unavailable on this route".into());
    }
    let (source, subnet) = match role {
        Transport::Shm => (None, None),
        Transport::Fabric => (
            settings.fabric_addr.clone(),
            fabric_subnet(d, ifs, settings),
        ),
        Transport::Ip => (None, ip.subnet),
    };
    if let (Transport::Ip, Ok(f), Some(p)) = (role, d.fabric.parse::<Subnet>(), ip.subnet) {
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
        source,
        subnet,
    }
}

fn verdict(
    i: usize,
    d: &Offer,
    offers: &[Offer],
    unfit: &[Option<String>],
    roles: &[RoleChoice],
    settings: &Settings,
    ip: &IpIfaceChoice,
) -> Verdict {
    if let Some(rc) = roles.iter().find(|r| r.chosen == Some(i)) {
        return Verdict::Chosen(rc.role);
    }
    let Some((role, _)) = role_of_provider(&d.provider) else {
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
    let name = role_name(role);
    if !settings.transports.contains(role) {
        return Verdict::Rejected(format!(
            "{name} role excluded by {}",
            settings.transports_from
        ));
    }
    if let Some(u) = &unfit[i] {
        return Verdict::Rejected(u.clone());
    }
    if role == Transport::Ip && Some(d.domain.as_str()) != ip.name.as_deref() {
        return Verdict::Rejected(format!(
            "interface {} is not the IP route's interface {} ({})",
            d.domain,
            ip.name_or_placeholder(),
            ip.why
        ));
    }
    let rc = &roles[Transport::ALL.iter().position(|r| *r == role).unwrap_or(0)];
    let Some(c) = rc.chosen.map(|c| &offers[c]) else {
        return Verdict::Rejected(format!("{name} role chooses nothing: {}", rc.why));
    };
    if c.provider != d.provider {
        return Verdict::Rejected(format!("the {name} role prefers {}", c.provider));
    }
    Verdict::Rejected(match role {
        Transport::Ip if !d.ipv4_fabric() => {
            format!("IPv6 fabric; the IP role uses the IPv4 fabric {}", c.fabric)
        }
        Transport::Ip => format!(
            "another IPv4 fabric on {}; the IP role uses the first listed, {}",
            d.domain, c.fabric
        ),
        _ => format!("the {name} role uses {} / {}", c.fabric, c.domain),
    })
}

/// What [`discover`] found: the inputs of [`select`], and the `fi_getinfo` answers that the
/// communicator opens.
#[derive(Debug, Clone)]
pub struct Discovery {
    /// The entries `fi_getinfo` returns for the communicator's hints of each role, in its
    /// order, role by role and provider by provider; with [`Listing::Everything`], then
    /// every other entry it lists.
    pub offers: Vec<Offer>,
    /// Every address of every interface of this host.
    pub interfaces: Vec<IfAddr>,
    /// `fi_getinfo` failed for a reason other than "no data" (then `offers` may be short).
    pub error: Option<String>,
    /// Per offer: the entry `fi_getinfo` returned for the role's hints (with RMA if it
    /// offers it), which the communicator opens.
    infos: Vec<Option<Info>>,
}

impl Discovery {
    /// The `fi_getinfo` entry of offer `i` for its role's hints, if it was returned.
    pub fn info(&self, i: usize) -> Option<&Info> {
        self.infos.get(i).and_then(Option::as_ref)
    }
}

/// How much [`discover`] asks libfabric.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listing {
    /// Only what the choice needs: each role's providers with the communicator's hints
    /// (what `Communicator::build` asks).
    Roles,
    /// Also every entry libfabric lists, whatever its endpoint type, caps, MR mode or
    /// threading, so that `efa info` can say why each was not chosen. The choice is the
    /// same: entries only listed here are never returned for the hints.
    Everything,
}

/// `FI_ENODATA`: libfabric's "No data available", the POSIX `ENODATA` (61 on Linux).
const FI_ENODATA: i32 = 61;

fn get_or_empty(h: &Hints) -> efa_fabric::Result<Vec<Info>> {
    match h.get() {
        Ok(v) => Ok(v),
        Err(e) if e.code() == Some(FI_ENODATA) => Ok(Vec::new()),
        Err(e) => Err(e),
    }
}

/// Asks libfabric and the host for the inputs of [`select`]: for each role and each of its
/// providers, the entries `fi_getinfo(3)` returns for the communicator's [`hints`] (with
/// [`RMA_CAPS`], else with [`MSG_CAPS`]); with [`Listing::Everything`] also every entry it
/// lists; the interfaces (`getifaddrs(3)`) and the netdev behind each RDMA device (`/sys`).
pub fn discover(settings: &Settings, listing: Listing) -> Discovery {
    discover_at(Path::new("/sys"), settings, listing)
}

/// [`discover`] with sysfs at `sys`.
pub fn discover_at(sys: &Path, settings: &Settings, listing: Listing) -> Discovery {
    let interfaces = net::interfaces();
    let mut error = None;
    let mut note = |e: efa_fabric::Error| {
        tracing::debug!("fi_getinfo: {e}");
        error.get_or_insert_with(|| e.to_string());
    };
    // Per role and provider, as the communicator asks: RMA first, messaging only if that
    // returns nothing. Each entry once, with the answer it would open.
    let mut answers: Vec<(Info, bool)> = Vec::new();
    for role in Transport::ALL {
        for &p in providers_for(role) {
            for caps in [RMA_CAPS, MSG_CAPS] {
                let got =
                    get_or_empty(&hints(role, caps, settings).provider(p)).unwrap_or_else(|e| {
                        note(e);
                        Vec::new()
                    });
                let got: Vec<Info> = got.into_iter().filter(|i| i.provider() == p).collect();
                if got.is_empty() {
                    continue;
                }
                for i in got {
                    let key = (i.provider(), i.fabric(), i.domain());
                    if !answers
                        .iter()
                        .any(|(a, _)| (a.provider(), a.fabric(), a.domain()) == key)
                    {
                        answers.push((i, caps == RMA_CAPS));
                    }
                }
                break;
            }
        }
    }
    let listed = match listing {
        Listing::Roles => Vec::new(),
        Listing::Everything => {
            let everything = Hints::new()
                .caps(Caps::empty())
                .ep_type(EpType::Other(0)) // FI_EP_UNSPEC
                .mr_mode(MrMode::all())
                .mode(Mode::all())
                .threading(Threading::Unspec);
            get_or_empty(&everything).unwrap_or_else(|e| {
                note(e);
                Vec::new()
            })
        }
    };
    tracing::debug!(
        accepted = answers.len(),
        listed = listed.len(),
        "fi_getinfo"
    );
    let mut offers: Vec<Offer> = Vec::new();
    let mut infos: Vec<Option<Info>> = Vec::new();
    for (i, rma) in &answers {
        let (provider, fabric, domain) = (i.provider(), i.fabric(), i.domain());
        let iface = iface_of(&provider, &domain, &interfaces, sys);
        let mut d = Offer {
            ipv4: offer_ipv4(&fabric, iface.as_deref(), &interfaces),
            iface,
            provider,
            fabric,
            domain,
            ep_types: vec![i.ep_type()],
            caps: Caps::empty(),
            mr_mode: MrMode::empty(),
            mode: Mode::empty(),
            max_msg_size: 0,
            inject_size: 0,
            progress: Progress::Unspec,
            accepted: true,
            rma: *rma,
        };
        fill(&mut d, i);
        offers.push(d);
        infos.push(Some(i.clone()));
    }
    // The listing adds the endpoint types and capabilities each entry offers beyond the
    // hints, and the entries never returned for them.
    let answered = offers.len();
    for i in &listed {
        let key = (i.provider(), i.fabric(), i.domain());
        let t = i.ep_type();
        if let Some(pos) = offers
            .iter()
            .position(|d| (&d.provider, &d.fabric, &d.domain) == (&key.0, &key.1, &key.2))
        {
            let d = &mut offers[pos];
            if !d.ep_types.contains(&t) {
                d.ep_types.push(t);
            }
            if t == EpType::Rdm {
                if pos < answered {
                    d.caps |= i.caps();
                } else if d.ep_types.first() != Some(&EpType::Rdm) {
                    // Limits and caps describe the RDM endpoint when there is one.
                    fill(d, i);
                    d.ep_types.retain(|x| *x != EpType::Rdm);
                    d.ep_types.insert(0, EpType::Rdm);
                } else {
                    d.caps |= i.caps();
                }
            }
            continue;
        }
        let iface = iface_of(&key.0, &key.2, &interfaces, sys);
        let mut d = Offer {
            ipv4: offer_ipv4(&key.1, iface.as_deref(), &interfaces),
            iface,
            provider: key.0,
            fabric: key.1,
            domain: key.2,
            ep_types: vec![t],
            caps: Caps::empty(),
            mr_mode: MrMode::empty(),
            mode: Mode::empty(),
            max_msg_size: 0,
            inject_size: 0,
            progress: Progress::Unspec,
            accepted: false,
            rma: false,
        };
        fill(&mut d, i);
        offers.push(d);
        infos.push(None);
    }
    Discovery {
        offers,
        interfaces,
        error,
        infos,
    }
}

fn fill(d: &mut Offer, i: &Info) {
    d.caps = i.caps();
    d.mr_mode = i.mr_mode();
    d.mode = i.mode();
    d.max_msg_size = i.max_msg_size();
    d.inject_size = i.inject_size();
    d.progress = i.progress();
}

/// The network interface behind a domain: IP providers name the domain after it; verbs and
/// efa domains are RDMA devices whose netdev sysfs knows; shm has none.
fn iface_of(provider: &str, domain: &str, ifs: &[IfAddr], sys: &Path) -> Option<String> {
    if SHM_PROVIDERS.contains(&provider) {
        return None;
    }
    if ifs.iter().any(|a| a.iface == domain) {
        return Some(domain.to_string());
    }
    net::netdev_of_rdma_device(sys, domain)
}

/// IP providers name the fabric after the subnet: the interface's address in it; otherwise
/// the interface's first IPv4 address.
fn offer_ipv4(fabric: &str, iface: Option<&str>, ifs: &[IfAddr]) -> Option<Subnet> {
    let v4 = |n: &str| {
        ifs.iter()
            .filter(move |a| a.iface == n && a.subnet.addr.is_ipv4())
            .map(|a| a.subnet)
            .collect::<Vec<_>>()
    };
    match fabric.parse::<Subnet>() {
        Ok(f) if f.addr.is_ipv4() => Some(
            iface
                .map(v4)
                .unwrap_or_default()
                .into_iter()
                .find(|s| f.contains(s.addr))
                .unwrap_or(f),
        ),
        _ => iface.and_then(|n| v4(n).first().copied()),
    }
}

#[cfg(test)]
mod tests;

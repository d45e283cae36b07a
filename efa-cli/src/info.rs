//! `efa info`: gather what libfabric and the host offer, choose the roles, explain.

use std::net::IpAddr;

use efa_core::placement::Transport;
use efa_core::roles::{self, ep_name, IpIfaceChoice, Offer, Selection, Settings, Verdict};
use efa_fabric::Caps;
use serde::Serialize;

use crate::net::{group, Iface};
use crate::roles::{no_fabric_reason, role_key};
use crate::routes::{LocalFacts, RouteLine};
use crate::system::{scan_rdma, Rdma, RdmaDevice, System};

/// Everything `efa info` and `efa doctor` learn about the host.
#[derive(Debug)]
pub struct Gathered {
    /// libfabric version at run time.
    pub libfabric: (u32, u32),
    /// Host identity for placement.
    pub host_id: String,
    /// Settings, read as the communicator reads them.
    pub settings: Settings,
    /// Interfaces.
    pub ifaces: Vec<Iface>,
    /// RDMA devices.
    pub rdma: Rdma,
    /// The IP role's interface.
    pub ip_iface: IpIfaceChoice,
    /// libfabric's entries.
    pub offers: Vec<Offer>,
    /// `fi_getinfo` failure, if any.
    pub discovery_error: Option<String>,
    /// Role choice (`efa_core::roles::select`, as the communicator makes it).
    pub selection: Selection,
    /// The settings that matter, as read (for `--json`).
    pub env: std::collections::BTreeMap<&'static str, Option<String>>,
}

/// Environment variables `efa info --json` reports.
pub const REPORTED_ENV: [&str; 6] = [
    "FI_PROVIDER",
    "FI_TCP_IFACE",
    "EFA_IFACE",
    "EFA_FABRIC_ADDR",
    "EFA_TRANSPORTS",
    "FI_LOG_LEVEL",
];

/// Gathers the live host: `efa_core::roles::discover` and `select`, exactly as
/// `Communicator::build` does, plus the RDMA devices for explanations.
///
/// # Errors
/// Bad settings (`EFA_TRANSPORTS`), worded as the communicator words them.
pub fn gather(sys: &System, all_local: bool) -> Result<Gathered, String> {
    let settings = Settings::from_env(all_local).map_err(|e| e.to_string())?;
    let discovery = roles::discover(&settings, roles::Listing::Everything);
    let ifaces = group(&discovery.interfaces);
    let rdma = scan_rdma(sys);
    let mut selection = roles::select(&discovery.offers, &discovery.interfaces, &settings);
    // No fabric provider listed: say what the host's RDMA devices explain.
    let ip_name = selection.ip_iface.name_or_placeholder().to_string();
    let fabric = selection
        .roles
        .iter_mut()
        .find(|r| r.role == Transport::Fabric);
    if let Some(f) = fabric {
        let unlisted = !discovery.offers.iter().any(|o| {
            roles::role_of_provider(&o.provider).map(|(r, _)| r) == Some(Transport::Fabric)
        });
        if f.chosen.is_none() && unlisted && settings.transports.contains(Transport::Fabric) {
            f.why = format!("{}; {}", f.why, no_fabric_reason(&rdma, &ip_name));
        }
    }
    let host_id = efa_core::placement::host_id().unwrap_or_else(|e| {
        tracing::warn!(error = %e, "no host id");
        "unknown-host".into()
    });
    Ok(Gathered {
        libfabric: efa_fabric::libfabric_version(),
        host_id,
        ip_iface: selection.ip_iface.clone(),
        settings,
        ifaces,
        rdma,
        offers: discovery.offers,
        discovery_error: discovery.error,
        selection,
        env: REPORTED_ENV.iter().map(|k| (*k, sys.env(k))).collect(),
    })
}

impl Gathered {
    /// The chosen entry for a role.
    pub fn chosen(&self, r: Transport) -> Option<&Offer> {
        self.selection.role(r).chosen.map(|i| &self.offers[i])
    }

    /// This host's card facts, as the communicator's card would have them.
    pub fn local_facts(&self) -> LocalFacts {
        let providers = Transport::ALL
            .iter()
            .filter_map(|r| self.chosen(*r).map(|d| (*r, d.provider.clone())))
            .collect();
        let subnet = |r: Transport| self.chosen(r).and_then(|_| self.selection.role(r).subnet);
        LocalFacts {
            host_id: self.host_id.clone(),
            providers,
            fabric_subnet: subnet(Transport::Fabric),
            ip_subnet: subnet(Transport::Ip),
            local_addrs: self
                .ifaces
                .iter()
                .flat_map(|i| i.ipv4.iter().map(|s| s.addr))
                .collect::<Vec<IpAddr>>(),
        }
    }
}

/// Names of the caps that matter here, `|`-joined.
pub fn caps_text(c: Caps) -> String {
    let v: Vec<&str> = [
        (Caps::MSG, "MSG"),
        (Caps::TAGGED, "TAGGED"),
        (Caps::RMA, "RMA"),
        (Caps::ATOMIC, "ATOMIC"),
    ]
    .iter()
    .filter(|(f, _)| c.contains(*f))
    .map(|(_, n)| *n)
    .collect();
    if v.is_empty() {
        "-".into()
    } else {
        v.join("|")
    }
}

fn flags_text<T: bitflags::Flags>(f: T) -> String {
    let v: Vec<&str> = f.iter_names().map(|(n, _)| n).collect();
    if v.is_empty() {
        "-".into()
    } else {
        v.join("|")
    }
}

/// `65536` → `64K`; huge values (`SIZE_MAX`) → `max`.
pub fn size_text(n: usize) -> String {
    let n = n as u64;
    if n >= 1 << 62 {
        "max".into()
    } else if n >= 1 << 30 && n % (1 << 30) == 0 {
        format!("{}G", n >> 30)
    } else if n >= 1 << 20 && n % (1 << 20) == 0 {
        format!("{}M", n >> 20)
    } else if n >= 1 << 10 && n % (1 << 10) == 0 {
        format!("{}K", n >> 10)
    } else {
        n.to_string()
    }
}

fn progress_text(p: efa_fabric::Progress) -> String {
    match p {
        efa_fabric::Progress::Auto => "auto".into(),
        efa_fabric::Progress::Manual => "manual".into(),
        efa_fabric::Progress::Unspec => "unspec".into(),
        efa_fabric::Progress::Other(v) => format!("other({v})"),
    }
}

/// One provider row of the JSON document.
#[derive(Debug, Serialize)]
pub struct ProviderJson {
    provider: String,
    fabric: String,
    domain: String,
    ep_types: Vec<String>,
    caps: Vec<String>,
    max_msg_size: usize,
    inject_size: usize,
    mr_mode: Vec<String>,
    mode: Vec<String>,
    progress: String,
    iface: Option<String>,
    ipv4_subnet: Option<String>,
    accepted_by_communicator_hints: bool,
    chosen_for: Option<&'static str>,
    rejected_because: Option<String>,
}

/// One role of the JSON document.
#[derive(Debug, Serialize)]
pub struct RoleJson {
    role: &'static str,
    transport: String,
    provider: Option<String>,
    fabric: Option<String>,
    domain: Option<String>,
    iface: Option<String>,
    ipv4_subnet: Option<String>,
    /// The source address the endpoint binds to (`EFA_FABRIC_ADDR`).
    source: Option<String>,
    /// The subnet the communicator's card advertises for this role.
    card_subnet: Option<String>,
    why: String,
    notes: Vec<String>,
}

/// The IP route's interface in the JSON document.
#[derive(Debug, Serialize)]
pub struct IpIfaceJson {
    name: Option<String>,
    why: String,
    subnet: Option<String>,
}

/// The JSON document of `efa info --json`.
#[derive(Debug, Serialize)]
pub struct InfoJson {
    libfabric: String,
    host_id: String,
    environment: std::collections::BTreeMap<&'static str, Option<String>>,
    interfaces: Vec<Iface>,
    rdma_devices: Vec<RdmaDevice>,
    rdma_state: &'static str,
    ip_interface: IpIfaceJson,
    roles: Vec<RoleJson>,
    providers: Vec<ProviderJson>,
    discovery_error: Option<String>,
    notes: Vec<String>,
    routes: Vec<RouteLine>,
    route_problems: Vec<String>,
}

fn flag_names<T: bitflags::Flags>(f: T) -> Vec<String> {
    f.iter_names().map(|(n, _)| n.to_string()).collect()
}

/// Notes that explain what libfabric hides before we ever see it.
pub fn hidden_notes(g: &Gathered) -> Vec<String> {
    let mut v = Vec::new();
    if let Some(p) = &g.settings.fi_provider {
        v.push(format!(
            "FI_PROVIDER={p}: libfabric lists only the providers it allows; the others are \
             not shown"
        ));
    }
    if let Some(i) = &g.settings.fi_tcp_iface {
        v.push(format!(
            "FI_TCP_IFACE={i}: libfabric's tcp provider lists only interface {i}"
        ));
    }
    if let Some(e) = &g.discovery_error {
        v.push(format!("fi_getinfo failed: {e}"));
    }
    v
}

/// The JSON document.
pub fn to_json(g: &Gathered, routes: Vec<RouteLine>, route_problems: Vec<String>) -> InfoJson {
    InfoJson {
        libfabric: format!("{}.{}", g.libfabric.0, g.libfabric.1),
        host_id: g.host_id.clone(),
        environment: g.env.clone(),
        interfaces: g.ifaces.clone(),
        rdma_devices: g.rdma.devices().to_vec(),
        rdma_state: match g.rdma {
            Rdma::Missing => "missing",
            Rdma::Empty => "empty",
            Rdma::Devices(_) => "devices",
        },
        ip_interface: IpIfaceJson {
            name: g.ip_iface.name.clone(),
            why: g.ip_iface.why.clone(),
            subnet: g.ip_iface.subnet.map(|s| s.to_string()),
        },
        roles: g
            .selection
            .roles
            .iter()
            .map(|rc| {
                let d = rc.chosen.map(|i| &g.offers[i]);
                RoleJson {
                    role: role_key(rc.role),
                    transport: rc.role.to_string(),
                    provider: d.map(|d| d.provider.clone()),
                    fabric: d.map(|d| d.fabric.clone()),
                    domain: d.map(|d| d.domain.clone()),
                    iface: d.and_then(|d| d.iface.clone()),
                    ipv4_subnet: d.and_then(|d| d.ipv4.map(|s| s.to_string())),
                    source: rc.source.clone(),
                    card_subnet: rc.subnet.map(|s| s.to_string()),
                    why: rc.why.clone(),
                    notes: rc.notes.clone(),
                }
            })
            .collect(),
        providers: g
            .offers
            .iter()
            .zip(&g.selection.verdicts)
            .map(|(d, v)| ProviderJson {
                provider: d.provider.clone(),
                fabric: d.fabric.clone(),
                domain: d.domain.clone(),
                ep_types: d.ep_types.iter().map(|t| ep_name(*t)).collect(),
                caps: flag_names(d.caps),
                max_msg_size: d.max_msg_size,
                inject_size: d.inject_size,
                mr_mode: flag_names(d.mr_mode),
                mode: flag_names(d.mode),
                progress: progress_text(d.progress),
                iface: d.iface.clone(),
                ipv4_subnet: d.ipv4.map(|s| s.to_string()),
                accepted_by_communicator_hints: d.accepted,
                chosen_for: match v {
                    Verdict::Chosen(r) => Some(role_key(*r)),
                    Verdict::Rejected(_) => None,
                },
                rejected_because: match v {
                    Verdict::Chosen(_) => None,
                    Verdict::Rejected(r) => Some(r.clone()),
                },
            })
            .collect(),
        discovery_error: g.discovery_error.clone(),
        notes: hidden_notes(g),
        routes,
        route_problems,
    }
}

/// Lays out rows in aligned columns; the last column is not padded.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let n = headers.len();
    let mut w: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate().take(n) {
            w[i] = w[i].max(c.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut s = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                s.push_str(c);
            } else {
                s.push_str(&format!("{:<width$}  ", c, width = w[i]));
            }
        }
        s.trim_end().to_string()
    };
    let mut out = line(headers.to_vec());
    out.push('\n');
    for r in rows {
        out.push_str(&line(r.iter().map(String::as_str).collect()));
        out.push('\n');
    }
    out
}

/// How many flows per peer the IP route would open, and why (issue 15 §3): the
/// communicator's own rule (`FlowSettings::flows_for`) on the IP role's interface.
fn ip_flows_line(g: &Gathered) -> String {
    use efa_core::comm::stripe::FlowSettings;
    let Some(offer) = g
        .selection
        .roles
        .iter()
        .find(|rc| rc.role == efa_core::Transport::Ip)
        .and_then(|rc| rc.chosen)
        .map(|i| &g.offers[i])
    else {
        return String::new();
    };
    match FlowSettings::from_env() {
        Err(e) => format!("  IP flows per peer: unusable setting: {e}\n"),
        Ok(s) => {
            let iface = offer.iface.as_deref();
            let k = s.flows_for(iface);
            let why = match (s.flows, k) {
                (Some(_), _) => "set by EFA_IP_FLOWS".to_string(),
                (None, 1) => format!(
                    "{} is not an ENA interface; EFA_IP_FLOWS sets it",
                    iface.unwrap_or("-")
                ),
                (None, _) => format!(
                    "{} is an ENA interface; EFA_IP_FLOWS sets it",
                    iface.unwrap_or("-")
                ),
            };
            format!(
                "  IP flows per peer: {k} ({why}); reads from {} B \
                 striped, {}\n",
                s.stripe_min, s.mode
            )
        }
    }
}

fn opt(s: &Option<String>) -> String {
    s.clone().unwrap_or_else(|| "(unset)".into())
}

/// The human-readable report.
pub fn render(g: &Gathered, routes: &[RouteLine], route_problems: &[String]) -> String {
    let mut o = String::new();
    o.push_str(&format!(
        "libfabric {}.{}    host id {}\n",
        g.libfabric.0, g.libfabric.1, g.host_id
    ));
    o.push_str(&format!(
        "settings: FI_PROVIDER={} FI_TCP_IFACE={} EFA_IFACE={} EFA_FABRIC_ADDR={} \
         EFA_TRANSPORTS={} (allows {})\n",
        opt(&g.settings.fi_provider),
        opt(&g.settings.fi_tcp_iface),
        opt(&g.settings.ip_iface),
        opt(&g.settings.fabric_addr),
        opt(&g.env.get("EFA_TRANSPORTS").cloned().flatten()),
        g.settings.transports
    ));
    for n in hidden_notes(g) {
        o.push_str(&format!("note: {n}\n"));
    }

    o.push_str("\nEndpoints the communicator would open:\n");
    let rows: Vec<Vec<String>> = g
        .selection
        .roles
        .iter()
        .map(|rc| match rc.chosen.map(|i| &g.offers[i]) {
            Some(d) => vec![
                format!("  {}", roles::role_name(rc.role)),
                d.provider.clone(),
                d.fabric.clone(),
                d.domain.clone(),
                d.iface.clone().unwrap_or_else(|| "-".into()),
                d.ipv4.map_or("-".into(), |s| s.network().to_string()),
                std::iter::once(rc.why.clone())
                    .chain(rc.notes.iter().map(|n| format!("NOTE {n}")))
                    .collect::<Vec<_>>()
                    .join("; "),
            ],
            None => vec![
                format!("  {}", roles::role_name(rc.role)),
                "none".into(),
                "-".into(),
                "-".into(),
                "-".into(),
                "-".into(),
                rc.why.clone(),
            ],
        })
        .collect();
    o.push_str(&table(
        &[
            "  ROLE", "PROVIDER", "FABRIC", "DOMAIN", "IFACE", "SUBNET", "WHY",
        ],
        &rows,
    ));
    o.push_str(&ip_flows_line(g));
    o.push_str(&summary(g));

    o.push_str(&format!(
        "\nEverything libfabric lists ({} provider/fabric/domain entries):\n",
        g.offers.len()
    ));
    let rows: Vec<Vec<String>> = g
        .offers
        .iter()
        .zip(&g.selection.verdicts)
        .map(|(d, v)| {
            vec![
                format!("  {}", d.provider),
                d.fabric.clone(),
                d.domain.clone(),
                d.ep_types
                    .iter()
                    .map(|t| ep_name(*t))
                    .collect::<Vec<_>>()
                    .join(","),
                caps_text(d.caps),
                size_text(d.max_msg_size),
                size_text(d.inject_size),
                flags_text(d.mr_mode),
                progress_text(d.progress),
                d.iface.clone().unwrap_or_else(|| "-".into()),
                d.ipv4.map_or("-".into(), |s| s.network().to_string()),
                match v {
                    Verdict::Chosen(r) => format!("CHOSEN for {}", roles::role_name(*r)),
                    Verdict::Rejected(r) => r.clone(),
                },
            ]
        })
        .collect();
    o.push_str(&table(
        &[
            "  PROVIDER",
            "FABRIC",
            "DOMAIN",
            "EP",
            "CAPS",
            "MAX_MSG",
            "INJECT",
            "MR_MODE",
            "PROGRESS",
            "IFACE",
            "SUBNET",
            "VERDICT",
        ],
        &rows,
    ));

    if !routes.is_empty() || !route_problems.is_empty() {
        o.push_str("\nRoutes:\n");
        let rows: Vec<Vec<String>> = routes
            .iter()
            .map(|r| {
                vec![
                    format!("  {}", r.pair),
                    r.transport.clone(),
                    r.provider.clone().unwrap_or_else(|| "-".into()),
                    r.reason.clone(),
                ]
            })
            .collect();
        o.push_str(&table(&["  PAIR", "VIA", "PROVIDER", "WHY"], &rows));
        for p in route_problems {
            o.push_str(&format!("  {p}\n"));
        }
    }
    o
}

/// One paragraph: which providers carry traffic.
pub fn summary(g: &Gathered) -> String {
    let shm = g.chosen(Transport::Shm);
    let fab = g.chosen(Transport::Fabric);
    let ip = g.chosen(Transport::Ip);
    let mut s = String::from("\nRoutes: ");
    let mut parts = Vec::new();
    match shm {
        Some(d) => parts.push(format!("peers on this host use {}", d.provider)),
        None => parts.push("no shm (see its role above)".into()),
    }
    match fab {
        Some(d) => parts.push(format!(
            "peers in {} use the fabric via {}",
            d.ipv4
                .map_or("the same fabric subnet".into(), |s| s.network().to_string()),
            d.provider
        )),
        None => parts.push("no fabric (see its role above)".into()),
    }
    if let Some(d) = ip {
        parts.push(format!(
            "all other peers use {} on {}",
            d.provider, d.domain
        ));
    } else {
        parts.push("no IP route (see its role above)".into());
    }
    s.push_str(&parts.join("; "));
    s.push_str(".\n");
    if shm.is_none() && fab.is_none() && ip.is_none() {
        s.push_str("No role has an endpoint: the communicator cannot start.\n");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_table() {
        assert_eq!(size_text(65536), "64K");
        assert_eq!(size_text(usize::MAX), "max");
        assert_eq!(size_text(1 << 30), "1G");
        assert_eq!(size_text(100), "100");
        assert_eq!(
            table(
                &["A", "B", "C"],
                &[vec!["xx".into(), "y".into(), "z z".into()]]
            ),
            "A   B  C\nxx  y  z z\n"
        );
        assert_eq!(
            caps_text(Caps::MSG | Caps::TAGGED | Caps::READ),
            "MSG|TAGGED"
        );
        assert_eq!(caps_text(Caps::empty()), "-");
    }
}

//! `efa info`: gather what libfabric and the host offer, choose the roles, explain.

use std::net::IpAddr;

use efa_core::placement::{Subnet, TransportSet};
use efa_fabric::Caps;
use serde::Serialize;

use crate::net::{choose_ip_iface, group, ipv4_of, Iface, IpIfaceChoice};
use crate::roles::{ep_name, select, Knobs, ProviderDesc, Role, Selection, Verdict};
use crate::routes::{LocalFacts, RouteLine};
use crate::system::{scan_rdma, Rdma, RdmaDevice, System};

/// Everything `efa info` and `efa doctor` learn about the host.
#[derive(Debug)]
pub struct Gathered {
    /// libfabric version at run time.
    pub libfabric: (u32, u32),
    /// Host identity for placement.
    pub host_id: String,
    /// Settings.
    pub knobs: Knobs,
    /// Interfaces.
    pub ifaces: Vec<Iface>,
    /// RDMA devices.
    pub rdma: Rdma,
    /// The IP role's interface.
    pub ip_iface: IpIfaceChoice,
    /// libfabric's entries.
    pub descs: Vec<ProviderDesc>,
    /// `fi_getinfo` failure, if any (then `descs` is empty).
    pub discovery_error: Option<String>,
    /// Role choice.
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

/// Reads the settings from the environment.
///
/// # Errors
/// `EFA_TRANSPORTS` does not parse.
pub fn knobs(sys: &System) -> Result<Knobs, String> {
    let raw = sys.env("EFA_TRANSPORTS");
    let transports = match &raw {
        Some(r) => TransportSet::parse(r).map_err(|e| e.to_string())?,
        None => TransportSet::all(),
    };
    Ok(Knobs {
        fi_provider: sys.env("FI_PROVIDER"),
        fi_tcp_iface: sys.env("FI_TCP_IFACE"),
        efa_iface: sys.env("EFA_IFACE"),
        fabric_addr: sys.env("EFA_FABRIC_ADDR"),
        transports,
        transports_raw: raw,
    })
}

/// Gathers the live host.
///
/// # Errors
/// Bad settings (`EFA_TRANSPORTS`).
pub fn gather(sys: &System, all_local: bool) -> Result<Gathered, String> {
    let knobs = knobs(sys)?;
    let addrs = efa_core::net::interfaces();
    let ifaces = group(&addrs);
    let rdma = scan_rdma(sys);
    let ip_iface = choose_ip_iface(&addrs, knobs.efa_iface.as_deref(), all_local);
    let (descs, discovery_error) = match crate::discover::providers(&ifaces, &rdma) {
        Ok(d) => (d, None),
        Err(e) => (Vec::new(), Some(e.to_string())),
    };
    let selection = select(&descs, &knobs, &rdma, &ip_iface);
    let host_id = efa_core::placement::host_id().unwrap_or_else(|e| {
        tracing::warn!(error = %e, "no host id");
        "unknown-host".into()
    });
    Ok(Gathered {
        libfabric: efa_fabric::libfabric_version(),
        host_id,
        knobs,
        ifaces,
        rdma,
        ip_iface,
        descs,
        discovery_error,
        selection,
        env: REPORTED_ENV.iter().map(|k| (*k, sys.env(k))).collect(),
    })
}

impl Gathered {
    /// The chosen entry for a role.
    pub fn chosen(&self, r: Role) -> Option<&ProviderDesc> {
        self.selection.role(r).chosen.map(|i| &self.descs[i])
    }

    /// This host's card facts.
    pub fn local_facts(&self) -> LocalFacts {
        let providers = Role::ALL
            .iter()
            .filter_map(|r| self.chosen(*r).map(|d| (r.transport(), d.provider.clone())))
            .collect();
        // As the communicator's card: the interface's first address.
        let ip_subnet = self.chosen(Role::Ip).and_then(|d| {
            self.ip_iface
                .primary
                .or_else(|| ipv4_of(&self.ifaces, &d.domain))
                .or_else(|| d.fabric.parse::<Subnet>().ok())
        });
        LocalFacts {
            host_id: self.host_id.clone(),
            providers,
            fabric_subnet: self.chosen(Role::Fabric).and_then(|d| d.ipv4),
            ip_subnet,
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
    chosen_for: Option<Role>,
    rejected_because: Option<String>,
}

/// One role of the JSON document.
#[derive(Debug, Serialize)]
pub struct RoleJson {
    role: Role,
    transport: String,
    provider: Option<String>,
    fabric: Option<String>,
    domain: Option<String>,
    iface: Option<String>,
    ipv4_subnet: Option<String>,
    why: String,
    notes: Vec<String>,
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
    ip_interface: IpIfaceChoice,
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
    if let Some(p) = &g.knobs.fi_provider {
        v.push(format!(
            "FI_PROVIDER={p}: libfabric lists only the providers it allows; the others are \
             not shown"
        ));
    }
    if let Some(i) = &g.knobs.fi_tcp_iface {
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
        ip_interface: g.ip_iface.clone(),
        roles: g
            .selection
            .roles
            .iter()
            .map(|rc| {
                let d = rc.chosen.map(|i| &g.descs[i]);
                RoleJson {
                    role: rc.role,
                    transport: rc.role.transport().to_string(),
                    provider: d.map(|d| d.provider.clone()),
                    fabric: d.map(|d| d.fabric.clone()),
                    domain: d.map(|d| d.domain.clone()),
                    iface: d.and_then(|d| d.iface.clone()),
                    ipv4_subnet: d.and_then(|d| d.ipv4.map(|s| s.to_string())),
                    why: rc.why.clone(),
                    notes: rc.notes.clone(),
                }
            })
            .collect(),
        providers: g
            .descs
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
                    Verdict::Chosen(r) => Some(*r),
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
        opt(&g.knobs.fi_provider),
        opt(&g.knobs.fi_tcp_iface),
        opt(&g.knobs.efa_iface),
        opt(&g.knobs.fabric_addr),
        opt(&g.knobs.transports_raw),
        g.knobs.transports
    ));
    for n in hidden_notes(g) {
        o.push_str(&format!("note: {n}\n"));
    }

    o.push_str("\nEndpoints the communicator would open:\n");
    let rows: Vec<Vec<String>> = g
        .selection
        .roles
        .iter()
        .map(|rc| match rc.chosen.map(|i| &g.descs[i]) {
            Some(d) => vec![
                format!("  {}", rc.role.name()),
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
                format!("  {}", rc.role.name()),
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
    o.push_str(&summary(g));

    o.push_str(&format!(
        "\nEverything libfabric lists ({} provider/fabric/domain entries):\n",
        g.descs.len()
    ));
    let rows: Vec<Vec<String>> = g
        .descs
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
                    Verdict::Chosen(r) => format!("CHOSEN for {}", r.name()),
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
    let shm = g.chosen(Role::IntraHost);
    let fab = g.chosen(Role::Fabric);
    let ip = g.chosen(Role::Ip);
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

//! Network interfaces and the IP route's interface, as the communicator decides them
//! (`efa_core::net`), plus the plain records `efa info` prints.

use efa_core::net::IfAddr;
use efa_core::placement::Subnet;
use serde::Serialize;

/// One network interface with its IPv4 subnets, for printing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Iface {
    /// Name (`lo`, `eth0`).
    pub name: String,
    /// IPv4 addresses with their prefix (`192.0.2.2/24`), in the order the kernel lists them.
    #[serde(serialize_with = "crate::ser_display_vec")]
    pub ipv4: Vec<Subnet>,
    /// `IFF_LOOPBACK`.
    pub loopback: bool,
    /// `IFF_UP`.
    pub up: bool,
}

/// Groups `efa_core::net::interfaces()` by interface, IPv4 only.
pub fn group(addrs: &[IfAddr]) -> Vec<Iface> {
    let mut out: Vec<Iface> = Vec::new();
    for a in addrs {
        let pos = match out.iter().position(|i| i.name == a.iface) {
            Some(p) => p,
            None => {
                out.push(Iface {
                    name: a.iface.clone(),
                    ipv4: Vec::new(),
                    loopback: a.loopback,
                    up: a.up,
                });
                out.len() - 1
            }
        };
        if a.subnet.addr.is_ipv4() {
            out[pos].ipv4.push(a.subnet);
        }
    }
    out
}

/// Which interface the IP role uses, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct IpIfaceChoice {
    /// The interface, if there is one.
    pub name: Option<String>,
    /// Why, in a few words.
    pub why: String,
    /// Its first IPv4 address and prefix (what the communicator puts in its card).
    #[serde(serialize_with = "crate::ser_display_opt")]
    pub primary: Option<Subnet>,
}

impl IpIfaceChoice {
    /// The name, or `IFACE` as a placeholder in fix texts.
    pub fn name_or_placeholder(&self) -> &str {
        self.name.as_deref().unwrap_or("IFACE")
    }
}

/// The IP role's interface, by the communicator's rule (`efa_core::net::choose_ip_iface`):
/// `EFA_IFACE`, else `lo` when every rank runs on this host, else the first up,
/// non-loopback interface with an IPv4 address.
pub fn choose_ip_iface(ifs: &[IfAddr], efa_iface: Option<&str>, all_local: bool) -> IpIfaceChoice {
    let name = efa_core::net::choose_ip_iface(ifs, efa_iface, all_local);
    let why = match (efa_iface, all_local, &name) {
        (Some(n), _, _) => format!("pinned by EFA_IFACE={n}"),
        (None, true, _) => "every rank on this host (--local)".into(),
        (None, false, Some(_)) => "first non-loopback interface with IPv4".into(),
        (None, false, None) => "no up, non-loopback interface has an IPv4 address".into(),
    };
    let primary = name
        .as_deref()
        .and_then(|n| efa_core::net::subnet_of(ifs, n))
        .filter(|s| s.addr.is_ipv4());
    IpIfaceChoice { name, why, primary }
}

/// The first IPv4 subnet of the named interface.
pub fn ipv4_of(ifaces: &[Iface], name: &str) -> Option<Subnet> {
    ifaces
        .iter()
        .find(|i| i.name == name)
        .and_then(|i| i.ipv4.first().copied())
}

/// A test address record.
#[cfg(test)]
pub fn ifa(iface: &str, subnet: &str) -> IfAddr {
    IfAddr {
        iface: iface.into(),
        subnet: subnet.parse().unwrap(),
        up: true,
        loopback: iface == "lo",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ip_iface_rule() {
        let ifs = vec![
            ifa("lo", "127.0.0.1/8"),
            ifa("eth0", "fd00::2/64"),
            ifa("eth0", "192.0.2.2/24"),
        ];
        let c = choose_ip_iface(&ifs, None, false);
        assert_eq!(c.name.as_deref(), Some("eth0"));
        assert_eq!(c.why, "first non-loopback interface with IPv4");
        assert_eq!(c.primary.unwrap().to_string(), "192.0.2.2/24");
        let c = choose_ip_iface(&ifs, Some("lo"), false);
        assert_eq!(
            (c.name.as_deref(), c.why.as_str()),
            (Some("lo"), "pinned by EFA_IFACE=lo")
        );
        assert_eq!(
            choose_ip_iface(&ifs, None, true).name.as_deref(),
            Some("lo")
        );
        let c = choose_ip_iface(&ifs[..1], None, false);
        assert_eq!(c.name, None);
        assert_eq!(c.name_or_placeholder(), "IFACE");
        let g = group(&ifs);
        assert_eq!(g.len(), 2);
        assert_eq!(ipv4_of(&g, "eth0").unwrap().to_string(), "192.0.2.2/24");
    }

    #[test]
    fn live_interfaces_include_loopback() {
        let ifs = group(&efa_core::net::interfaces());
        if ifs.is_empty() {
            {
                // Straight to stderr, past the test harness's capture: ci/test lists every skip.
                use std::io::Write;
                let test = std::thread::current().name().unwrap_or("?").to_string();
                let _ = writeln!(
                    std::io::stderr(),
                    "SKIPPED: {test}: getifaddrs lists no interface in this sandbox"
                );
            }
            return;
        }
        assert!(ifs.iter().any(|i| i.loopback), "{ifs:?}");
    }
}

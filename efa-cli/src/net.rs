//! Network interfaces as `efa info` prints them (the IP route's interface is chosen by
//! `efa_core::roles::choose_ip_iface`).

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
    fn grouped_by_interface_ipv4_only() {
        let ifs = vec![
            ifa("lo", "127.0.0.1/8"),
            ifa("eth0", "fd00::2/64"),
            ifa("eth0", "192.0.2.2/24"),
        ];
        let g = group(&ifs);
        assert_eq!(g.len(), 2);
        assert_eq!(g[1].ipv4.len(), 1);
        assert_eq!(g[1].ipv4[0].to_string(), "192.0.2.2/24");
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

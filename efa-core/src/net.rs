//! Which interfaces and subnets this host has: the IP route's interface, and the interface
//! behind a fabric device. Read from `getifaddrs(3)` and `/sys/class/infiniband`.

use std::net::IpAddr;
use std::path::Path;

use crate::placement::Subnet;

/// One IPv4/IPv6 address of an interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IfAddr {
    /// Interface name.
    pub iface: String,
    /// The address with its prefix.
    pub subnet: Subnet,
    /// Interface is up.
    pub up: bool,
    /// Loopback interface.
    pub loopback: bool,
}

/// Every address of every interface.
pub fn interfaces() -> Vec<IfAddr> {
    let Ok(addrs) = nix::ifaddrs::getifaddrs() else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for a in addrs {
        let (Some(addr), Some(mask)) = (a.address, a.netmask) else {
            continue;
        };
        let (ip, prefix): (IpAddr, u8) =
            if let (Some(a4), Some(m4)) = (addr.as_sockaddr_in(), mask.as_sockaddr_in()) {
                (IpAddr::V4(a4.ip()), u32::from(m4.ip()).count_ones() as u8)
            } else if let (Some(a6), Some(m6)) = (addr.as_sockaddr_in6(), mask.as_sockaddr_in6()) {
                (IpAddr::V6(a6.ip()), u128::from(m6.ip()).count_ones() as u8)
            } else {
                continue;
            };
        let Some(subnet) = Subnet::new(ip, prefix) else {
            continue;
        };
        out.push(IfAddr {
            iface: a.interface_name.clone(),
            subnet,
            up: a.flags.contains(nix::net::if_::InterfaceFlags::IFF_UP),
            loopback: a
                .flags
                .contains(nix::net::if_::InterfaceFlags::IFF_LOOPBACK),
        });
    }
    out
}

/// The first IPv4 address (else IPv6) of `iface`.
pub fn subnet_of(ifs: &[IfAddr], iface: &str) -> Option<Subnet> {
    let of_iface = || ifs.iter().filter(|a| a.iface == iface);
    of_iface()
        .find(|a| a.subnet.addr.is_ipv4())
        .or_else(|| of_iface().next())
        .map(|a| a.subnet)
}

/// The interface that owns address `ip`.
pub fn iface_of_addr(ifs: &[IfAddr], ip: IpAddr) -> Option<&IfAddr> {
    ifs.iter().find(|a| a.subnet.addr == ip)
}

/// The interface for the IP route: `wanted` if given; else `lo` when every rank is on this
/// host; else the first up, non-loopback interface with an IPv4 address.
pub fn choose_ip_iface(ifs: &[IfAddr], wanted: Option<&str>, all_local: bool) -> Option<String> {
    if let Some(w) = wanted {
        return Some(w.to_string());
    }
    if all_local {
        return Some("lo".into());
    }
    ifs.iter()
        .find(|a| a.up && !a.loopback && a.subnet.addr.is_ipv4())
        .map(|a| a.iface.clone())
}

/// The network interface behind an RDMA device (`rxe0`, `efa_0`, `mlx5_0`), from sysfs.
pub fn netdev_of_rdma_device(sys: &Path, device: &str) -> Option<String> {
    let dev = sys.join("class/infiniband").join(device);
    // Soft-RoCE and RoCE: the GID table names the netdev of each GID.
    if let Ok(s) = std::fs::read_to_string(dev.join("ports/1/gid_attrs/ndevs/0")) {
        let s = s.trim();
        if !s.is_empty() {
            return Some(s.to_string());
        }
    }
    // PCI devices (EFA, mlx5): the net directory next to the device.
    let net = std::fs::read_dir(dev.join("device/net")).ok()?;
    net.flatten()
        .next()
        .map(|e| e.file_name().to_string_lossy().into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ifa(iface: &str, s: &str, loopback: bool) -> IfAddr {
        IfAddr {
            iface: iface.into(),
            subnet: s.parse().unwrap(),
            up: true,
            loopback,
        }
    }

    #[test]
    fn ip_iface_choice() {
        let ifs = vec![
            ifa("lo", "127.0.0.1/8", true),
            ifa("eth0", "10.0.0.5/24", false),
        ];
        assert_eq!(
            choose_ip_iface(&ifs, Some("veth1"), false).as_deref(),
            Some("veth1")
        );
        assert_eq!(choose_ip_iface(&ifs, None, true).as_deref(), Some("lo"));
        assert_eq!(choose_ip_iface(&ifs, None, false).as_deref(), Some("eth0"));
        assert_eq!(choose_ip_iface(&ifs[..1], None, false), None);
        assert_eq!(subnet_of(&ifs, "eth0").unwrap().to_string(), "10.0.0.5/24");
    }

    #[test]
    fn netdev_from_fake_sysfs() {
        let root = std::env::temp_dir().join(format!("efa-sys-{}", std::process::id()));
        let gid = root.join("class/infiniband/rxe0/ports/1/gid_attrs/ndevs");
        std::fs::create_dir_all(&gid).unwrap();
        std::fs::write(gid.join("0"), "dummy0\n").unwrap();
        let net = root.join("class/infiniband/efa_0/device/net/eth1");
        std::fs::create_dir_all(&net).unwrap();
        assert_eq!(
            netdev_of_rdma_device(&root, "rxe0").as_deref(),
            Some("dummy0")
        );
        assert_eq!(
            netdev_of_rdma_device(&root, "efa_0").as_deref(),
            Some("eth1")
        );
        assert_eq!(netdev_of_rdma_device(&root, "none"), None);
        std::fs::remove_dir_all(&root).unwrap();
    }
}

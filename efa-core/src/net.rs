//! Which interfaces and subnets this host has: the IP route's interface, and the interface
//! behind a fabric device. Read from `getifaddrs(3)` and `/sys/class/infiniband`.

use std::net::IpAddr;
use std::path::Path;

use crate::placement::Subnet;
use crate::setting::{env_var, SettingError, SettingSource};

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

/// `iface (addr/prefix, ...)` for every interface in `ifs`, for error messages.
fn list_interfaces(ifs: &[IfAddr], only_up: bool) -> String {
    let mut names: Vec<&str> = Vec::new();
    for a in ifs.iter().filter(|a| a.up || !only_up) {
        if !names.contains(&a.iface.as_str()) {
            names.push(&a.iface);
        }
    }
    if names.is_empty() {
        return "none found on this host (getifaddrs listed no interface with an address)".into();
    }
    let described: Vec<String> = names
        .iter()
        .map(|n| {
            let addrs: Vec<String> = ifs
                .iter()
                .filter(|a| a.iface == *n)
                .map(|a| a.subnet.to_string())
                .collect();
            format!("{n} ({})", addrs.join(", "))
        })
        .collect();
    described.join(", ")
}

/// Checks an IP-route interface name (from `EFA_IFACE` or `CommunicatorBuilder::ip_iface`):
/// it must be an interface of this host that is up and has an IP address.
///
/// # Errors
/// [`SettingError`] naming the source and the value, and listing the usable interfaces.
pub fn check_ip_iface(ifs: &[IfAddr], name: &str, from: SettingSource) -> Result<(), SettingError> {
    let bad = |problem: String| SettingError {
        source_of_value: from,
        value: name.into(),
        problem,
        accepted: format!(
            "the name of an interface of this host that is up and has an IP address: {}",
            list_interfaces(ifs, true)
        ),
    };
    let mine: Vec<&IfAddr> = ifs.iter().filter(|a| a.iface == name).collect();
    if mine.is_empty() {
        return Err(bad(format!(
            "this host has no interface {name} with an IP address"
        )));
    }
    if !mine.iter().any(|a| a.up) {
        return Err(bad(format!("interface {name} is down")));
    }
    Ok(())
}

/// Checks a fabric source address (from `EFA_FABRIC_ADDR` or
/// `CommunicatorBuilder::fabric_addr`): it must be an IP address of one of this host's
/// interfaces.
///
/// # Errors
/// [`SettingError`] naming the source and the value, and listing this host's addresses.
pub fn check_fabric_addr(
    ifs: &[IfAddr],
    value: &str,
    from: SettingSource,
) -> Result<IpAddr, SettingError> {
    let bad = |problem: String| SettingError {
        source_of_value: from,
        value: value.into(),
        problem,
        accepted: format!(
            "an IP address (no prefix, no port) of an interface of this host: {}",
            list_interfaces(ifs, false)
        ),
    };
    let ip: IpAddr = value
        .trim()
        .parse()
        .map_err(|_| bad("not an IP address".into()))?;
    if iface_of_addr(ifs, ip).is_none() {
        return Err(bad(format!("{ip} is not an address of this host")));
    }
    Ok(ip)
}

/// Completes and checks the IP route's interface and the fabric source address of a
/// communicator: values given to the builder are checked as they are; unset ones are read
/// from `EFA_IFACE` and `EFA_FABRIC_ADDR` (blank counts as unset) and checked.
///
/// # Errors
/// [`crate::Error::Setting`] for an interface or address that this host does not have.
pub(crate) fn settle_addresses(
    ip_iface: &mut Option<String>,
    fabric_addr: &mut Option<String>,
) -> crate::Result<()> {
    let mut ifs: Option<Vec<IfAddr>> = None;
    let mut ifs = || ifs.get_or_insert_with(interfaces).clone();
    match ip_iface.as_deref() {
        Some(name) => check_ip_iface(
            &ifs(),
            name,
            SettingSource::Argument("CommunicatorBuilder::ip_iface"),
        )?,
        None => {
            if let Some(v) = env_var("EFA_IFACE", "an interface name, e.g. eth0")? {
                let v = v.trim().to_string();
                check_ip_iface(&ifs(), &v, SettingSource::Env("EFA_IFACE"))?;
                *ip_iface = Some(v);
            }
        }
    }
    match fabric_addr.as_deref() {
        Some(a) => {
            check_fabric_addr(
                &ifs(),
                a,
                SettingSource::Argument("CommunicatorBuilder::fabric_addr"),
            )?;
        }
        None => {
            if let Some(v) = env_var("EFA_FABRIC_ADDR", "an IP address of this host")? {
                let v = v.trim().to_string();
                check_fabric_addr(&ifs(), &v, SettingSource::Env("EFA_FABRIC_ADDR"))?;
                *fabric_addr = Some(v);
            }
        }
    }
    Ok(())
}

/// The network interface behind an RDMA device or one of its libfabric domains (`rxe0`,
/// `mlx5_0`, `rdmap0s6` and efa's `rdmap0s6-rdm`, verbs' `mlx5_0-xrc`), from sysfs
/// (`sys` is normally `/sys`), asked in this order:
///
/// 1. `ports/1/gid_attrs/ndevs/0`, the netdev of GID 0 (RoCE and soft-RoCE);
/// 2. `device/net/*`, the net device next to a PCI device (EFA, mlx5);
/// 3. `parent`, the netdev a soft-RoCE device was created on (`rdma link add rxe0 type rxe
///    netdev eth0`); it is there even before the GID table is filled, e.g. while the
///    netdev is down.
pub fn netdev_of_rdma_device(sys: &Path, domain: &str) -> Option<String> {
    let ib = sys.join("class/infiniband");
    // The domain itself, else the device it is a suffixed view of (`rdmap0s6-rdm`).
    let device = std::iter::once(domain)
        .chain(domain.rsplit_once('-').map(|(d, _)| d))
        .find(|d| !d.is_empty() && ib.join(d).is_dir())?;
    let dev = ib.join(device);
    let read = |p: &str| {
        std::fs::read_to_string(dev.join(p))
            .ok()
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
    };
    read("ports/1/gid_attrs/ndevs/0")
        .or_else(|| {
            let mut names: Vec<String> = std::fs::read_dir(dev.join("device/net"))
                .ok()?
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect();
            names.sort();
            names.into_iter().next()
        })
        .or_else(|| read("parent"))
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
    fn ip_iface_must_exist_and_be_up() {
        let mut ifs = vec![
            ifa("lo", "127.0.0.1/8", true),
            ifa("eth0", "10.0.0.5/24", false),
            ifa("eth0", "fd00::5/64", false),
            ifa("eth1", "10.1.0.5/24", false),
        ];
        ifs[3].up = false;
        let env = SettingSource::Env("EFA_IFACE");
        assert!(check_ip_iface(&ifs, "eth0", env).is_ok());
        assert!(check_ip_iface(&ifs, "lo", env).is_ok());
        let e = check_ip_iface(&ifs, "eth9", env).unwrap_err();
        assert_eq!(
            e.to_string(),
            "EFA_IFACE=\"eth9\": this host has no interface eth9 with an IP address; accepted: \
             the name of an interface of this host that is up and has an IP address: \
             lo (127.0.0.1/8), eth0 (10.0.0.5/24, fd00::5/64)"
        );
        let e = check_ip_iface(&ifs, "eth1", env).unwrap_err();
        assert!(e.to_string().contains("interface eth1 is down"), "{e}");
        let e = check_ip_iface(
            &ifs,
            "eth9",
            SettingSource::Argument("CommunicatorBuilder::ip_iface"),
        )
        .unwrap_err();
        assert!(
            e.to_string()
                .starts_with("CommunicatorBuilder::ip_iface(\"eth9\")"),
            "{e}"
        );
        let e = check_ip_iface(&[], "lo", env).unwrap_err();
        assert!(e.to_string().contains("none found on this host"), "{e}");
    }

    #[test]
    fn fabric_addr_must_be_a_local_ip() {
        let ifs = vec![
            ifa("lo", "127.0.0.1/8", true),
            ifa("rxe", "10.10.1.1/24", false),
        ];
        let env = SettingSource::Env("EFA_FABRIC_ADDR");
        assert_eq!(
            check_fabric_addr(&ifs, " 10.10.1.1 ", env)
                .unwrap()
                .to_string(),
            "10.10.1.1"
        );
        for (bad, problem) in [
            ("10.10.1.1/24", "not an IP address"),
            ("10.10.1.1:99", "not an IP address"),
            ("fabric0", "not an IP address"),
            ("10.10.1.2", "10.10.1.2 is not an address of this host"),
        ] {
            let e = check_fabric_addr(&ifs, bad, env).unwrap_err();
            assert_eq!(
                e.to_string(),
                format!(
                    "EFA_FABRIC_ADDR={bad:?}: {problem}; accepted: an IP address (no prefix, \
                     no port) of an interface of this host: lo (127.0.0.1/8), rxe (10.10.1.1/24)"
                )
            );
        }
    }

    #[test]
    fn netdev_from_fake_sysfs() {
        let root = std::env::temp_dir().join(format!("efa-sys-{}", std::process::id()));
        let ib = root.join("class/infiniband");
        let gid = ib.join("rxe0/ports/1/gid_attrs/ndevs");
        std::fs::create_dir_all(&gid).unwrap();
        std::fs::write(gid.join("0"), "dummy0\n").unwrap();
        // rxe's parent names the same netdev; GID 0 wins when both are there.
        std::fs::write(ib.join("rxe0/parent"), "other0\n").unwrap();
        std::fs::create_dir_all(ib.join("efa_0/device/net/eth1")).unwrap();
        // A soft-RoCE device whose GID table is still empty (its netdev is down): only
        // `parent` names the netdev.
        std::fs::create_dir_all(ib.join("rxe1/ports/1/gid_attrs/ndevs")).unwrap();
        std::fs::write(ib.join("rxe1/parent"), "veth1\n").unwrap();
        let at = |d: &str| netdev_of_rdma_device(&root, d);
        assert_eq!(at("rxe0").as_deref(), Some("dummy0"));
        assert_eq!(at("efa_0").as_deref(), Some("eth1"));
        assert_eq!(at("rxe1").as_deref(), Some("veth1"));
        // efa's libfabric domain is the device with a suffix.
        assert_eq!(at("efa_0-rdm").as_deref(), Some("eth1"));
        assert_eq!(at("rxe0-xrc").as_deref(), Some("dummy0"));
        assert_eq!(at("none"), None);
        assert_eq!(at("none-rdm"), None);
        assert_eq!(at("-rdm"), None);
        std::fs::remove_dir_all(&root).unwrap();
    }
}

//! What `efa info` adds to the communicator's choice of an endpoint per role
//! (`efa_core::roles`, the one place that decides it): names for output, and the host's RDMA
//! state when the fabric role has no candidate.

use efa_core::placement::Transport;

use crate::system::Rdma;

/// A role's key in `efa info --json` (`intra_host`, `fabric`, `ip`).
pub fn role_key(role: Transport) -> &'static str {
    match role {
        Transport::Shm => "intra_host",
        Transport::Fabric => "fabric",
        Transport::Ip => "ip",
    }
}

/// Why this host lists no fabric provider, from its RDMA devices, with the fix.
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
                "RDMA device {} present: check `fi_info -l` and that the user-space driver \
                 is installed (ibverbs-providers, or the EFA installer on EC2)",
                names.join(", ")
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::system::RdmaDevice;

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
    fn fabric_absence_reasons() {
        assert!(no_fabric_reason(&Rdma::Empty, "eth0")
            .starts_with("no RDMA device: /sys/class/infiniband is empty;"));
        assert!(no_fabric_reason(&Rdma::Missing, "eth0").ends_with("rxe0 type rxe netdev eth0)"));
        assert_eq!(
            no_fabric_reason(&Rdma::Devices(vec![rxe("1: DOWN")]), "eth0"),
            "RDMA device rxe0 is not ACTIVE (port 1: 1: DOWN); bring its interface up \
             (ip link set dev dummy0 up)"
        );
        assert!(
            no_fabric_reason(&Rdma::Devices(vec![rxe("4: ACTIVE")]), "eth0")
                .starts_with("RDMA device rxe0 present: check `fi_info -l`")
        );
    }
}

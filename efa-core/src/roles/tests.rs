//! [`select`] on synthetic `fi_getinfo` answers: every provider set a host can have.

use super::*;

fn desc(provider: &str, fabric: &str, domain: &str) -> Offer {
    Offer {
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
        ipv4: fabric.parse::<Subnet>().ok().filter(|s| s.addr.is_ipv4()),
        accepted: true,
        rma: true,
    }
}

fn shm() -> Offer {
    let mut d = desc("shm", "shm", "shm");
    d.iface = None;
    d
}

fn ifa(iface: &str, s: &str) -> IfAddr {
    IfAddr {
        iface: iface.into(),
        subnet: s.parse().unwrap(),
        up: true,
        loopback: iface == "lo",
    }
}

/// What libfabric 1.17 lists on the CI host (no RDMA device).
fn ci_host() -> Vec<Offer> {
    let mut tcp_core = desc("tcp", "192.0.2.0/24", "eth0");
    tcp_core.ep_types = vec![EpType::Msg];
    let mut udp = desc("udp", "192.0.2.0/24", "eth0");
    udp.ep_types = vec![EpType::Dgram];
    vec![
        desc("tcp;ofi_rxm", "192.0.2.0/24", "eth0"),
        desc("tcp;ofi_rxm", "fd00::/64", "eth0"),
        desc("tcp;ofi_rxm", "127.0.0.1/32", "lo"),
        shm(),
        desc("net", "192.0.2.0/24", "eth0"),
        desc("net;ofi_rxm", "192.0.2.0/24", "eth0"),
        tcp_core,
        udp,
        desc("sockets", "192.0.2.0/24", "eth0"),
        desc("udp;ofi_rxd", "192.0.2.0/24", "eth0"),
    ]
}

fn ifaces() -> Vec<IfAddr> {
    vec![
        ifa("lo", "127.0.0.1/8"),
        ifa("eth0", "192.0.2.2/24"),
        ifa("dummy0", "10.10.1.1/24"),
        ifa("dummy0", "10.10.2.1/24"),
    ]
}

fn transports(s: &str) -> Settings {
    Settings {
        transports: TransportSet::parse(s).unwrap(),
        transports_from: format!("EFA_TRANSPORTS={s}"),
        ..Settings::default()
    }
}

fn run(d: &[Offer], s: &Settings) -> Selection {
    select(d, &ifaces(), s)
}

fn chosen<'a>(s: &Selection, d: &'a [Offer], r: Transport) -> Option<&'a Offer> {
    s.role(r).chosen.map(|i| &d[i])
}

/// `provider on domain` per role, `-` for none: the whole answer in one comparable line.
fn summary(s: &Selection, d: &[Offer]) -> String {
    Transport::ALL
        .iter()
        .map(|&r| match chosen(s, d, r) {
            Some(o) => format!("{r}={} on {}", o.provider, o.domain),
            None => format!("{r}=-"),
        })
        .collect::<Vec<_>>()
        .join(" ")
}

fn reason(s: &Selection, i: usize) -> &str {
    match &s.verdicts[i] {
        Verdict::Rejected(r) => r,
        Verdict::Chosen(r) => panic!("entry {i} chosen for {r:?}"),
    }
}

/// An rxe device on dummy0, as libfabric lists it (verbs;ofi_rxm RDM, plain verbs MSG).
fn rxe() -> Vec<Offer> {
    let mut v = desc("verbs;ofi_rxm", "IB-0xfe80000000000000", "rxe0");
    v.iface = Some("dummy0".into());
    v.ipv4 = Some("10.10.1.1/24".parse().unwrap());
    let mut vm = desc("verbs", "IB-0xfe80000000000000", "rxe0");
    vm.ep_types = vec![EpType::Msg];
    vm.iface = Some("dummy0".into());
    vec![v, vm]
}

fn efa() -> Offer {
    let mut e = desc("efa", "efa", "rdmap0s6-rdm");
    e.iface = Some("eth0".into());
    e.ipv4 = Some("192.0.2.2/24".parse().unwrap());
    e
}

#[test]
fn provider_sets() {
    let none: Vec<Offer> = Vec::new();
    let shm_only = vec![shm()];
    let tcp_only: Vec<Offer> = ci_host()
        .into_iter()
        .filter(|d| d.provider == "tcp;ofi_rxm")
        .collect();
    let mut efa_shm_tcp = ci_host();
    efa_shm_tcp.push(efa());
    let mut verbs = ci_host();
    verbs.extend(rxe());
    let all = Settings::default();
    for (name, d, want) in [
        ("none", &none, "shm=- fabric=- ip=-"),
        ("shm only", &shm_only, "shm=shm on shm fabric=- ip=-"),
        (
            "tcp only",
            &tcp_only,
            "shm=- fabric=- ip=tcp;ofi_rxm on eth0",
        ),
        (
            "ci host",
            &ci_host(),
            "shm=shm on shm fabric=- ip=tcp;ofi_rxm on eth0",
        ),
        (
            "efa+shm+tcp",
            &efa_shm_tcp,
            "shm=shm on shm fabric=efa on rdmap0s6-rdm ip=tcp;ofi_rxm on eth0",
        ),
        (
            "rxe",
            &verbs,
            "shm=shm on shm fabric=verbs;ofi_rxm on rxe0 ip=tcp;ofi_rxm on eth0",
        ),
    ] {
        let s = run(d, &all);
        assert_eq!(summary(&s, d), want, "{name}");
        assert_eq!(s.verdicts.len(), d.len(), "{name}");
    }
    // Reasons for an empty host.
    let s = run(&none, &all);
    assert_eq!(
        s.role(Transport::Shm).why,
        "libfabric lists no shm provider"
    );
    assert_eq!(
        s.role(Transport::Fabric).why,
        "libfabric lists neither efa nor verbs;ofi_rxm"
    );
    assert_eq!(
        s.role(Transport::Ip).why,
        "libfabric lists no IP provider (tcp;ofi_rxm, net, sockets)"
    );
    // efa wins over verbs when both are there; its card subnet is its interface's.
    let mut both = verbs.clone();
    both.push(efa());
    let s = run(&both, &all);
    let f = s.role(Transport::Fabric);
    assert_eq!(
        chosen(&s, &both, Transport::Fabric).unwrap().provider,
        "efa"
    );
    assert_eq!(f.subnet.unwrap().to_string(), "192.0.2.2/24");
    assert_eq!(f.source, None);
    assert_eq!(
        reason(&s, both.len() - 3),
        "the fabric role prefers efa",
        "verbs;ofi_rxm"
    );
    // The IP role's card subnet is the route interface's first address.
    assert_eq!(
        s.role(Transport::Ip).subnet.unwrap().to_string(),
        "192.0.2.2/24"
    );
    assert_eq!(s.role(Transport::Shm).subnet, None);
}

#[test]
fn every_transport_set() {
    let mut d = ci_host();
    d.extend(rxe());
    for (set, want) in [
        ("shm", "shm=shm on shm fabric=- ip=-"),
        ("ip", "shm=- fabric=- ip=tcp;ofi_rxm on eth0"),
        ("fabric", "shm=- fabric=verbs;ofi_rxm on rxe0 ip=-"),
        (
            "^shm",
            "shm=- fabric=verbs;ofi_rxm on rxe0 ip=tcp;ofi_rxm on eth0",
        ),
        ("shm,ip", "shm=shm on shm fabric=- ip=tcp;ofi_rxm on eth0"),
        (
            "all",
            "shm=shm on shm fabric=verbs;ofi_rxm on rxe0 ip=tcp;ofi_rxm on eth0",
        ),
    ] {
        let s = run(&d, &transports(set));
        assert_eq!(summary(&s, &d), want, "EFA_TRANSPORTS={set}");
        for r in Transport::ALL {
            if s.role(r).chosen.is_none() {
                assert_eq!(
                    s.role(r).why,
                    format!("excluded by EFA_TRANSPORTS={set}"),
                    "{set} {r}"
                );
            }
        }
    }
    // Bad EFA_TRANSPORTS values never reach select: they do not parse.
    for bad in ["tcpp", "shm,foo", "^nothing"] {
        assert!(TransportSet::parse(bad).is_err(), "{bad}");
    }
}

#[test]
fn ci_host_uses_shm_and_tcp_and_explains_the_rest() {
    let d = ci_host();
    let s = run(&d, &Settings::default());
    let ip = chosen(&s, &d, Transport::Ip).unwrap();
    assert_eq!(
        (ip.provider.as_str(), ip.domain.as_str(), ip.fabric.as_str()),
        ("tcp;ofi_rxm", "eth0", "192.0.2.0/24")
    );
    assert_eq!(
        s.role(Transport::Ip).why,
        "on eth0: first non-loopback interface with IPv4"
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
    assert_eq!(s.verdicts[3], Verdict::Chosen(Transport::Shm));
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
    let s = run(&d, &Settings::default());
    assert_eq!(reason(&s, 0), "missing capability TAGGED");
    assert_eq!(
        reason(&s, 4),
        "needs MR mode RAW, which efa-rs does not implement"
    );
    assert_eq!(
        reason(&s, 9),
        "needs mode bit MSG_PREFIX, which efa-rs does not implement"
    );
    assert_eq!(
        reason(&s, 1),
        "fi_getinfo does not return it for the communicator's hints (FI_EP_RDM, MSG|TAGGED, \
         FI_THREAD_SAFE, FI_SOCKADDR_IN)"
    );
    // tcp;ofi_rxm on eth0 lacks TAGGED and net's entry is unfit, so sockets is next.
    let ip = chosen(&s, &d, Transport::Ip).unwrap();
    assert_eq!(
        (ip.provider.as_str(), ip.domain.as_str()),
        ("sockets", "eth0")
    );
    assert!(s
        .role(Transport::Ip)
        .why
        .starts_with("tcp;ofi_rxm not usable, sockets is next"));
    // Every candidate unfit: the role names the best one's reason.
    let mut d = vec![shm()];
    d[0].accepted = false;
    let s = run(&d, &Settings::default());
    assert_eq!(
        s.role(Transport::Shm).why,
        "every candidate was rejected; the best, shm on shm: fi_getinfo does not return it \
         for the communicator's hints (FI_EP_RDM, MSG|TAGGED, FI_THREAD_SAFE)"
    );
}

#[test]
fn rma_missing_is_noted() {
    let mut d = ci_host();
    d[3].caps = Caps::MSG | Caps::TAGGED;
    d[3].rma = false;
    let s = run(&d, &Settings::default());
    assert_eq!(s.role(Transport::Shm).chosen, Some(3));
    assert_eq!(s.role(Transport::Shm).notes.len(), 1);
    assert!(s.role(Transport::Ip).notes.is_empty());
}

#[test]
fn efa_iface_pins_all_local_uses_lo_and_fi_tcp_iface_hides() {
    let d = ci_host();
    let pinned = |i: &str| Settings {
        ip_iface: Some(i.into()),
        ..Settings::default()
    };
    let s = run(&d, &pinned("lo"));
    assert_eq!(chosen(&s, &d, Transport::Ip).unwrap().domain, "lo");
    assert_eq!(
        s.role(Transport::Ip).subnet.unwrap().to_string(),
        "127.0.0.1/8"
    );
    assert_eq!(
        reason(&s, 0),
        "interface eth0 is not the IP route's interface lo (pinned by EFA_IFACE=lo)"
    );
    let local = Settings {
        all_local: true,
        ..Settings::default()
    };
    let s = run(&d, &local);
    assert_eq!(chosen(&s, &d, Transport::Ip).unwrap().domain, "lo");
    assert_eq!(s.ip_iface.why, "every rank on this host");
    let s = run(&d, &pinned("eth7"));
    assert_eq!(s.role(Transport::Ip).chosen, None);
    assert_eq!(
        s.role(Transport::Ip).why,
        "no IP provider (tcp;ofi_rxm, net, sockets) with an IPv4 fabric on interface eth7 \
         (pinned by EFA_IFACE=eth7)"
    );
    // No usable interface at all.
    let s = select(&d, &[ifa("lo", "127.0.0.1/8")], &Settings::default());
    assert_eq!(
        s.role(Transport::Ip).why,
        "no interface for the IP route: no up, non-loopback interface has an IPv4 address; \
         set EFA_IFACE"
    );
    // FI_TCP_IFACE=lo: libfabric lists tcp only on lo, so the IP role, which still uses
    // eth0, falls back to net there.
    let d: Vec<Offer> = ci_host()
        .into_iter()
        .filter(|e| !(e.provider == "tcp;ofi_rxm" && e.domain == "eth0"))
        .collect();
    let k = Settings {
        fi_tcp_iface: Some("lo".into()),
        ..Settings::default()
    };
    let s = run(&d, &k);
    let ip = chosen(&s, &d, Transport::Ip).unwrap();
    assert_eq!((ip.provider.as_str(), ip.domain.as_str()), ("net", "eth0"));
    assert_eq!(
        s.role(Transport::Ip).why,
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
    let s = select(&d, &ifs, &Settings::default());
    assert_eq!(s.role(Transport::Ip).chosen, Some(0));
    assert_eq!(
        s.role(Transport::Ip).notes,
        [
            "the endpoint binds in 10.10.2.0/24, but the card advertises 10.10.1.0/24 (the \
          interface's first address)"
        ]
    );
    assert_eq!(
        reason(&s, 1),
        "another IPv4 fabric on dummy0; the IP role uses the first listed, 10.10.2.0/24"
    );
    // A job with every rank on this host uses lo, where nothing is listed here.
    let local = Settings {
        all_local: true,
        ..Settings::default()
    };
    let s = select(&d, &ifs, &local);
    assert_eq!(s.role(Transport::Ip).chosen, None);
    assert!(s.role(Transport::Ip).why.contains("on interface lo"));
}

#[test]
fn efa_transports_excludes_roles_and_names_its_source() {
    let d = ci_host();
    let s = run(&d, &transports("^shm"));
    assert_eq!(s.role(Transport::Shm).chosen, None);
    assert_eq!(
        s.role(Transport::Shm).why,
        "excluded by EFA_TRANSPORTS=^shm"
    );
    assert_eq!(
        reason(&s, 3),
        "intra-host role excluded by EFA_TRANSPORTS=^shm"
    );
    assert!(s.role(Transport::Ip).chosen.is_some());
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
    // A role's absence blames FI_PROVIDER when it hides every provider of the role.
    let d: Vec<Offer> = ci_host()
        .into_iter()
        .filter(|d| d.provider.starts_with("tcp"))
        .collect();
    let k = Settings {
        fi_provider: Some("tcp".into()),
        ..Settings::default()
    };
    let s = run(&d, &k);
    assert_eq!(
        s.role(Transport::Fabric).why,
        "FI_PROVIDER=tcp hides efa, verbs;ofi_rxm"
    );
    assert_eq!(s.role(Transport::Shm).why, "FI_PROVIDER=tcp hides shm");
}

#[test]
fn soft_roce_uses_verbs_and_efa_fabric_addr_pins_the_subnet() {
    let mut d = ci_host();
    d.extend(rxe());
    let n = d.len();
    let s = run(&d, &Settings::default());
    let f = s.role(Transport::Fabric);
    assert_eq!(f.chosen, Some(n - 2));
    assert_eq!(f.why, "efa not listed, verbs;ofi_rxm is next");
    // No source address: the card has the device's interface's first address.
    assert_eq!(f.subnet.unwrap().to_string(), "10.10.1.1/24");
    assert_eq!(reason(&s, n - 1), "no FI_EP_RDM endpoint (offers msg)");
    // EFA_FABRIC_ADDR on the interface's second address: the endpoint binds there and the
    // card says so.
    let k = Settings {
        fabric_addr: Some("10.10.2.1".into()),
        ..Settings::default()
    };
    let s = run(&d, &k);
    let f = s.role(Transport::Fabric);
    assert_eq!(f.chosen, Some(n - 2));
    assert_eq!(f.source.as_deref(), Some("10.10.2.1"));
    assert_eq!(f.subnet.unwrap().to_string(), "10.10.2.1/24");
    // Two devices: the one holding the address is chosen.
    let mut two = d.clone();
    let mut v2 = desc("verbs;ofi_rxm", "IB-0xfe80000000000000", "rxe1");
    v2.iface = Some("dummy1".into());
    v2.ipv4 = Some("10.10.9.1/24".parse().unwrap());
    two.insert(0, v2);
    let k = Settings {
        fabric_addr: Some("10.10.1.1".into()),
        ..Settings::default()
    };
    let s = run(&two, &k);
    assert_eq!(chosen(&s, &two, Transport::Fabric).unwrap().domain, "rxe0");
    assert_eq!(
        s.role(Transport::Fabric).why,
        "efa not listed, verbs;ofi_rxm is next; holds EFA_FABRIC_ADDR=10.10.1.1"
    );
    assert_eq!(
        reason(&s, 0),
        "the fabric role uses IB-0xfe80000000000000 / rxe0"
    );
    let s = run(&d, &transports("shm,ip"));
    assert_eq!(
        reason(&s, n - 2),
        "fabric role excluded by EFA_TRANSPORTS=shm,ip"
    );
}

//! Routes to peers: a card for this host built from the chosen roles, cards for peers given
//! on the command line or read from a running job's rendezvous store, and
//! `efa_core::placement::choose_route` between them.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use efa_core::placement::{choose_route, Card, EndpointCard, Subnet, Transport, TransportSet};
use efa_core::store::{FileStore, Store, StoreError, TcpStore};
use serde::Serialize;

/// The facts of this host that make its card.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalFacts {
    /// `efa_core::placement::host_id()`.
    pub host_id: String,
    /// Chosen provider per transport, in [`Transport::ALL`] order.
    pub providers: Vec<(Transport, String)>,
    /// Subnet of the fabric interface.
    pub fabric_subnet: Option<Subnet>,
    /// Subnet of the IP interface.
    pub ip_subnet: Option<Subnet>,
    /// This host's IPv4 addresses (a peer on one of them is on this host).
    pub local_addrs: Vec<IpAddr>,
}

/// This host as rank 0.
pub fn local_card(f: &LocalFacts) -> Card {
    Card {
        rank: 0,
        host_id: f.host_id.clone(),
        endpoints: f
            .providers
            .iter()
            .map(|(t, p)| EndpointCard {
                transport: *t,
                provider: p.clone(),
                addr: Vec::new(),
            })
            .collect(),
        fabric_subnet: f.fabric_subnet,
        ip_subnet: f.ip_subnet,
        process: Default::default(),
    }
}

/// A `--peer` value: `10.0.1.7/24`, or a bare address, which takes the prefix of this host's
/// fabric (else IP) subnet.
///
/// # Errors
/// The subnet parse error, as text.
pub fn parse_peer(s: &str, f: &LocalFacts) -> Result<Subnet, String> {
    if s.contains('/') {
        return s.parse::<Subnet>().map_err(|e| e.to_string());
    }
    let addr: IpAddr = s
        .trim()
        .parse()
        .map_err(|_| format!("invalid peer `{s}`: expected ADDR/PREFIX such as 10.0.1.7/24"))?;
    let prefix = f
        .fabric_subnet
        .or(f.ip_subnet)
        .filter(|l| l.addr.is_ipv4() == addr.is_ipv4())
        .map_or(if addr.is_ipv4() { 32 } else { 128 }, |l| l.prefix);
    Subnet::new(addr, prefix).ok_or_else(|| format!("invalid peer `{s}`"))
}

/// A hypothetical peer at `subnet`, assumed to open the same providers as this host. It is on
/// this host if its address is one of ours.
pub fn peer_card(f: &LocalFacts, subnet: Subnet, rank: u32) -> Card {
    let same_host = f.local_addrs.contains(&subnet.addr);
    Card {
        rank,
        host_id: if same_host {
            f.host_id.clone()
        } else {
            format!("peer {}", subnet.addr)
        },
        fabric_subnet: Some(subnet),
        ip_subnet: Some(subnet),
        ..local_card(f)
    }
}

/// One explained route.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RouteLine {
    /// Who talks to whom (`this host -> 10.0.1.7/24`, `rank 0 -> rank 3`).
    pub pair: String,
    /// `shm`, `fabric`, `ip`, or `none`.
    pub transport: String,
    /// The provider used, if any.
    pub provider: Option<String>,
    /// Why, one line.
    pub reason: String,
}

/// Explains the route between two cards. Pure.
pub fn explain(pair: String, a: &Card, b: &Card, allowed: &TransportSet) -> RouteLine {
    match choose_route(a, b, allowed) {
        Ok(r) => RouteLine {
            pair,
            transport: r.transport.to_string(),
            provider: Some(a.endpoints[r.local_endpoint].provider.clone()),
            reason: r.reason.to_string(),
        },
        Err(e) => RouteLine {
            pair,
            transport: "none".into(),
            provider: None,
            reason: e.to_string(),
        },
    }
}

/// Routes from this host to each `--peer`.
pub fn peer_routes(f: &LocalFacts, peers: &[Subnet], allowed: &TransportSet) -> Vec<RouteLine> {
    let me = local_card(f);
    peers
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let peer = peer_card(f, *p, i as u32 + 1);
            explain(format!("this host -> {p}"), &me, &peer, allowed)
        })
        .collect()
}

/// Routes between every pair of ranks whose cards were read, `i < j`.
pub fn pair_routes(cards: &[Card], allowed: &TransportSet) -> Vec<RouteLine> {
    let mut out = Vec::new();
    for (i, a) in cards.iter().enumerate() {
        for b in &cards[i + 1..] {
            out.push(explain(
                format!("rank {} -> rank {}", a.rank, b.rank),
                a,
                b,
                allowed,
            ));
        }
    }
    out
}

/// The result of reading a job's cards.
#[derive(Debug, Default)]
pub struct StoreCards {
    /// Cards that were found and decoded.
    pub cards: Vec<Card>,
    /// One line per rank whose card is missing or unreadable.
    pub problems: Vec<String>,
}

/// The rank `efa` says hello as when it connects to a TCP store: outside any world, so the
/// server's bookkeeping of which ranks have come and gone is not disturbed.
pub const OBSERVER_RANK: u32 = u32::MAX;

/// Reads `<tag>/<rank>` for every rank of a running job from its store (`host:port`,
/// `tcp://host:port` or `file:///dir`), without waiting long for absent keys. A TCP store is
/// joined with `EFA_STORE_TOKEN` when that is set.
///
/// # Errors
/// The store could not be opened.
pub fn read_cards(
    addr: &str,
    world: u32,
    tag: &str,
    wait: Duration,
) -> Result<StoreCards, StoreError> {
    let store: Box<dyn Store> = if let Some(dir) = addr.strip_prefix("file://") {
        Box::new(FileStore::open(dir)?)
    } else {
        let a = addr.strip_prefix("tcp://").unwrap_or(addr);
        // A store with a token (efarun's, or EFA_STORE_TOKEN's) admits only its holders.
        let token = match std::env::var("EFA_STORE_TOKEN") {
            Ok(v) if !v.is_empty() => Some(efa_core::store::StoreToken::new(&v)?),
            _ => None,
        };
        Box::new(TcpStore::connect_with_token(
            a,
            OBSERVER_RANK,
            token.as_ref(),
            Instant::now() + wait,
        )?)
    };
    let deadline = Instant::now() + wait;
    let mut out = StoreCards::default();
    for r in 0..world {
        let key = format!("{tag}/{r}");
        match store.get(&key, deadline) {
            Ok(b) => match Card::decode(&b) {
                Ok(c) => out.cards.push(c),
                Err(e) => out
                    .problems
                    .push(format!("rank {r}: `{key}` is not a card: {e}")),
            },
            Err(StoreError::Timeout { .. }) => out.problems.push(format!(
                "rank {r}: no `{key}` in the store (the rank has not started, or the \
                 communicator does not publish cards under this tag)"
            )),
            Err(e) => return Err(e),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(fabric: Option<&str>) -> LocalFacts {
        let mut providers = vec![(Transport::Shm, "shm".to_string())];
        if fabric.is_some() {
            providers.push((Transport::Fabric, "efa".into()));
        }
        providers.push((Transport::Ip, "tcp;ofi_rxm".into()));
        LocalFacts {
            host_id: "me".into(),
            providers,
            fabric_subnet: fabric.map(|s| s.parse().unwrap()),
            ip_subnet: Some("10.0.1.5/24".parse().unwrap()),
            local_addrs: vec!["10.0.1.5".parse().unwrap()],
        }
    }

    fn one(f: &LocalFacts, peer: &str, allowed: &str) -> RouteLine {
        let p = parse_peer(peer, f).unwrap();
        peer_routes(f, &[p], &TransportSet::parse(allowed).unwrap()).remove(0)
    }

    #[test]
    fn same_subnet_uses_the_fabric() {
        let f = facts(Some("10.0.1.5/24"));
        let r = one(&f, "10.0.1.7/24", "all");
        assert_eq!(r.transport, "fabric");
        assert_eq!(r.provider.as_deref(), Some("efa"));
        assert_eq!(r.reason, "fabric: same subnet 10.0.1.0/24");
        assert_eq!(r.pair, "this host -> 10.0.1.7/24");
    }

    #[test]
    fn other_subnet_uses_ip() {
        let f = facts(Some("10.0.1.5/24"));
        let r = one(&f, "10.0.2.7/24", "all");
        assert_eq!(r.transport, "ip");
        assert_eq!(r.provider.as_deref(), Some("tcp;ofi_rxm"));
        assert_eq!(
            r.reason,
            "IP: peer is in 10.0.2.0/24, this rank in 10.0.1.0/24; EFA does not cross subnets"
        );
    }

    #[test]
    fn no_local_fabric_uses_ip() {
        let f = facts(None);
        let r = one(&f, "10.0.1.7/24", "all");
        assert_eq!(
            (r.transport.as_str(), r.reason.as_str()),
            ("ip", "IP: this rank has no fabric endpoint")
        );
        let r = one(&f, "10.0.1.7/24", "shm,fabric");
        assert_eq!(r.transport, "none");
        assert!(
            r.reason.starts_with("no route from rank 0 to rank 1"),
            "{r:?}"
        );
    }

    #[test]
    fn own_address_is_the_same_host() {
        let f = facts(Some("10.0.1.5/24"));
        let r = one(&f, "10.0.1.5", "all");
        assert_eq!(
            (r.transport.as_str(), r.reason.as_str()),
            ("shm", "shm: same host me")
        );
        assert_eq!(one(&f, "10.0.1.5", "^shm").transport, "fabric");
    }

    #[test]
    fn bare_address_takes_the_local_prefix() {
        let f = facts(Some("10.0.1.5/24"));
        assert_eq!(
            parse_peer("10.0.1.9", &f).unwrap().to_string(),
            "10.0.1.9/24"
        );
        assert_eq!(parse_peer("fd00::1", &f).unwrap().prefix, 128);
        assert!(parse_peer("nonsense", &f).is_err());
        assert!(parse_peer("10.0.0.1/40", &f).is_err());
    }

    #[test]
    fn cards_from_a_file_store_and_pair_routes() {
        let dir = std::env::temp_dir().join(format!("efa-cli-cards-{}", std::process::id()));
        let store = FileStore::open(&dir).unwrap();
        let f = facts(Some("10.0.1.5/24"));
        let mut c0 = local_card(&f);
        let mut c1 = peer_card(&f, "10.0.1.6/24".parse().unwrap(), 1);
        c0.endpoints.iter_mut().for_each(|e| e.addr = vec![1]);
        c1.endpoints.iter_mut().for_each(|e| e.addr = vec![2]);
        store.set("card/0", &c0.encode().unwrap()).unwrap();
        store.set("card/1", &c1.encode().unwrap()).unwrap();
        store.set("card/2", b"garbage").unwrap();
        let got = read_cards(
            &format!("file://{}", dir.display()),
            4,
            "card",
            Duration::from_millis(50),
        )
        .unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(got.cards, vec![c0, c1]);
        assert_eq!(got.problems.len(), 2, "{:?}", got.problems);
        assert!(got.problems[0].contains("is not a card"));
        assert!(got.problems[1].starts_with("rank 3: no `card/3`"));
        let routes = pair_routes(&got.cards, &TransportSet::all());
        assert_eq!(routes.len(), 1);
        assert_eq!(routes[0].pair, "rank 0 -> rank 1");
        assert_eq!(routes[0].reason, "fabric: same subnet 10.0.1.0/24");
    }

    #[test]
    fn cards_from_a_tcp_store_on_loopback() {
        let server = match efa_core::store::TcpStoreServer::bind("127.0.0.1:0") {
            Ok(s) => s,
            Err(e) => {
                {
                    // Straight to stderr, past the test harness's capture: ci/test lists every skip.
                    use std::io::Write;
                    let test = std::thread::current().name().unwrap_or("?").to_string();
                    let _ = writeln!(
                        std::io::stderr(),
                        "SKIPPED: {test}: cannot listen on loopback: {e}"
                    );
                }
                return;
            }
        };
        let addr = server.local_addr().to_string();
        let w = TcpStore::connect(&addr, 0, Instant::now() + Duration::from_secs(5)).unwrap();
        let f = facts(None);
        let mut c0 = local_card(&f);
        c0.endpoints.iter_mut().for_each(|e| e.addr = vec![9]);
        w.set("card/0", &c0.encode().unwrap()).unwrap();
        let got = read_cards(&addr, 2, "card", Duration::from_millis(200)).unwrap();
        assert_eq!(got.cards, vec![c0]);
        assert_eq!(got.problems.len(), 1);
        drop(w);
        server.shutdown();
    }
}

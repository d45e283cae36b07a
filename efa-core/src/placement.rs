//! Per-peer route choice: shared memory on the same host, the fabric on the same subnet, IP
//! otherwise — decided by a pure function over two [`Card`]s, with a reason one can print.
//!
//! Each rank describes itself in a [`Card`]: its host identity, its endpoints (one per
//! transport it has opened, with the provider name and the opaque endpoint address), and the
//! subnets of its fabric and IP interfaces. Cards travel through the rendezvous store in a
//! compact versioned binary form ([`Card::encode`], [`Card::decode`]).
//!
//! [`choose_route`] then applies the rules, in order:
//!
//! 1. A rank talking to itself (same rank, same host id) uses the first transport its card
//!    offers and `EFA_TRANSPORTS` allows, in the order shm, fabric, IP.
//! 2. Same host (equal [`Card::host_id`]), both have a shm endpoint of the same provider, shm
//!    allowed: [`Transport::Shm`].
//! 3. Both have a fabric endpoint of the same provider, both fabric subnets are known and
//!    equal, fabric allowed: [`Transport::Fabric`]. EFA does not cross subnets.
//! 4. Both have an IP endpoint of the same provider, IP allowed: [`Transport::Ip`], with the
//!    reason the better transports were not used.
//! 5. Otherwise [`NoRoute`], saying what each side offers and what is allowed.
//!
//! Every rule is symmetric, so both ends of a pair pick the same transport.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

use thiserror::Error;

use crate::setting::{env_var, SettingError};

/// A way to move bytes to a peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Transport {
    /// Shared memory between processes on one host (libfabric `shm`).
    Shm,
    /// The OS-bypass fabric: EFA, or verbs (soft-RoCE in CI).
    Fabric,
    /// Plain IP through the kernel (libfabric `tcp`, over ENA on EC2).
    Ip,
}

impl Transport {
    /// All transports, in order of preference.
    pub const ALL: [Transport; 3] = [Transport::Shm, Transport::Fabric, Transport::Ip];

    fn code(self) -> u8 {
        match self {
            Transport::Shm => 1,
            Transport::Fabric => 2,
            Transport::Ip => 3,
        }
    }

    fn from_code(c: u8) -> Option<Self> {
        Some(match c {
            1 => Transport::Shm,
            2 => Transport::Fabric,
            3 => Transport::Ip,
            _ => return None,
        })
    }
}

impl fmt::Display for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Transport::Shm => "shm",
            Transport::Fabric => "fabric",
            Transport::Ip => "ip",
        })
    }
}

/// A transport name in `EFA_TRANSPORTS` that is not known.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("unknown transport `{name}` in EFA_TRANSPORTS={input:?}; known: shm, fabric (also efa, verbs), ip (also tcp), all; prefix the list with ^ to exclude")]
pub struct UnknownTransport {
    /// The unknown name.
    pub name: String,
    /// The whole list.
    pub input: String,
}

impl FromStr for Transport {
    type Err = UnknownTransport;

    /// Parses one name, case-insensitively: `shm`; `fabric`, `efa`, `verbs`; `ip`, `tcp`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "shm" => Ok(Transport::Shm),
            "fabric" | "efa" | "verbs" => Ok(Transport::Fabric),
            "ip" | "tcp" => Ok(Transport::Ip),
            _ => Err(UnknownTransport {
                name: s.trim().into(),
                input: s.into(),
            }),
        }
    }
}

/// Why `EFA_TRANSPORTS` cannot be used ([`TransportSet::from_env`]). The communicator
/// reports it as [`crate::Error::Transports`] or [`crate::Error::Setting`].
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum TransportsEnvError {
    /// A name in the list is not a transport.
    #[error(transparent)]
    Unknown(#[from] UnknownTransport),
    /// The list allows no transport, or is not UTF-8.
    #[error(transparent)]
    Setting(#[from] SettingError),
}

/// The transports a job may use, in the spirit of `UCX_TLS`.
///
/// Parsed from `EFA_TRANSPORTS`: a comma-separated list (`"shm,tcp"`, `"shm,fabric,ip"`),
/// `"all"`, or a list prefixed with `^` meaning "all except" (`"^shm"`). The default (unset
/// or empty) is all transports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TransportSet {
    bits: u8,
}

impl Default for TransportSet {
    fn default() -> Self {
        Self::all()
    }
}

impl TransportSet {
    /// Every transport.
    pub fn all() -> Self {
        Self::of(&Transport::ALL)
    }

    /// No transport.
    pub fn empty() -> Self {
        Self { bits: 0 }
    }

    /// The set holding exactly `ts`.
    pub fn of(ts: &[Transport]) -> Self {
        ts.iter().fold(Self::empty(), |s, &t| s.with(t))
    }

    /// This set plus `t`.
    pub fn with(self, t: Transport) -> Self {
        Self {
            bits: self.bits | 1 << t.code(),
        }
    }

    /// This set minus `t`.
    pub fn without(self, t: Transport) -> Self {
        Self {
            bits: self.bits & !(1 << t.code()),
        }
    }

    /// Whether `t` is allowed.
    pub fn contains(self, t: Transport) -> bool {
        self.bits & 1 << t.code() != 0
    }

    /// Whether no transport is allowed.
    pub fn is_empty(self) -> bool {
        Transport::ALL.iter().all(|&t| !self.contains(t))
    }

    /// The allowed transports in order of preference.
    pub fn iter(self) -> impl Iterator<Item = Transport> {
        Transport::ALL
            .into_iter()
            .filter(move |&t| self.contains(t))
    }

    /// Parses an `EFA_TRANSPORTS` value (see the type docs). Empty means all.
    ///
    /// # Errors
    ///
    /// [`UnknownTransport`] naming the first unknown entry and the whole input.
    pub fn parse(s: &str) -> Result<Self, UnknownTransport> {
        let t = s.trim();
        let (negate, list) = match t.strip_prefix('^') {
            Some(rest) => (true, rest),
            None => (false, t),
        };
        if list.trim().is_empty() || list.trim().eq_ignore_ascii_case("all") {
            return Ok(if negate { Self::empty() } else { Self::all() });
        }
        let mut set = Self::empty();
        for name in list.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            let tr: Transport = name.parse().map_err(|_| UnknownTransport {
                name: name.into(),
                input: s.into(),
            })?;
            set = set.with(tr);
        }
        if negate {
            set = Transport::ALL
                .into_iter()
                .filter(|&t| !set.contains(t))
                .fold(Self::empty(), Self::with);
        }
        Ok(set)
    }

    /// Reads `EFA_TRANSPORTS` from the process environment; unset or blank means all.
    ///
    /// # Errors
    ///
    /// [`TransportsEnvError::Unknown`] for an unknown name; [`TransportsEnvError::Setting`]
    /// for a list that allows no transport (`^all`, `,`, `^shm,fabric,ip`) or a value that is
    /// not UTF-8.
    pub fn from_env() -> Result<Self, TransportsEnvError> {
        const FORMS: &str = "a comma-separated list of shm, fabric (also efa, verbs), ip (also \
                             tcp), or all; a leading ^ excludes the listed ones (e.g. ^shm)";
        let Some(v) = env_var("EFA_TRANSPORTS", FORMS)? else {
            return Ok(Self::all());
        };
        let set = Self::parse(&v)?;
        if set.is_empty() {
            return Err(
                SettingError::env("EFA_TRANSPORTS", v, "allows no transport", FORMS).into(),
            );
        }
        Ok(set)
    }
}

impl fmt::Display for TransportSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_empty() {
            return f.write_str("none");
        }
        let names: Vec<String> = self.iter().map(|t| t.to_string()).collect();
        f.write_str(&names.join(","))
    }
}

/// An IP subnet, written `10.0.1.0/24` or `fd00:1::/64`. `addr` may be an interface address
/// inside the subnet (`10.0.1.17/24`); [`Subnet::network`] masks it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Subnet {
    /// An address in the subnet.
    pub addr: IpAddr,
    /// The prefix length: at most 32 for IPv4, 128 for IPv6.
    pub prefix: u8,
}

/// A subnet string that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("invalid subnet `{input}`: {reason}")]
pub struct SubnetParseError {
    /// The input.
    pub input: String,
    /// What is wrong.
    pub reason: &'static str,
}

impl Subnet {
    /// A subnet from an address and prefix length; `None` if the prefix is too long for the
    /// address family.
    pub fn new(addr: IpAddr, prefix: u8) -> Option<Self> {
        (prefix <= max_prefix(addr)).then_some(Self { addr, prefix })
    }

    /// The subnet with host bits cleared: `10.0.1.17/24` gives `10.0.1.0/24`.
    pub fn network(&self) -> Subnet {
        Subnet {
            addr: mask(self.addr, self.prefix),
            prefix: self.prefix,
        }
    }

    /// Whether `ip` is inside this subnet (never across address families).
    pub fn contains(&self, ip: IpAddr) -> bool {
        ip.is_ipv4() == self.addr.is_ipv4() && mask(ip, self.prefix) == mask(self.addr, self.prefix)
    }

    /// Whether both describe the same subnet: same family, same prefix length, same network.
    /// Two interfaces with different prefix lengths are treated as different subnets, as
    /// their owners disagree about the network.
    pub fn same_subnet(&self, other: &Subnet) -> bool {
        self.prefix == other.prefix && self.network() == other.network()
    }
}

fn max_prefix(addr: IpAddr) -> u8 {
    if addr.is_ipv4() {
        32
    } else {
        128
    }
}

fn mask(addr: IpAddr, prefix: u8) -> IpAddr {
    match addr {
        IpAddr::V4(a) => {
            let m = if prefix == 0 {
                0
            } else {
                u32::MAX << (32 - u32::from(prefix.min(32)))
            };
            IpAddr::V4(Ipv4Addr::from(u32::from(a) & m))
        }
        IpAddr::V6(a) => {
            let m = if prefix == 0 {
                0
            } else {
                u128::MAX << (128 - u32::from(prefix.min(128)))
            };
            IpAddr::V6(Ipv6Addr::from(u128::from(a) & m))
        }
    }
}

impl FromStr for Subnet {
    type Err = SubnetParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = |reason| SubnetParseError {
            input: s.into(),
            reason,
        };
        let (a, p) = s
            .trim()
            .split_once('/')
            .ok_or(bad("expected address/prefix"))?;
        let addr: IpAddr = a.parse().map_err(|_| bad("not an IPv4 or IPv6 address"))?;
        let prefix: u8 = p.parse().map_err(|_| bad("prefix is not a number"))?;
        Subnet::new(addr, prefix).ok_or(bad("prefix longer than the address"))
    }
}

impl fmt::Display for Subnet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// One endpoint a rank has opened.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct EndpointCard {
    /// Which transport it serves.
    pub transport: Transport,
    /// The libfabric provider name (`efa`, `verbs;ofi_rxm`, `shm`, `tcp`); endpoints talk
    /// only to endpoints of the same provider. At most 255 bytes.
    pub provider: String,
    /// The endpoint's address as `fi_getname(3)` returns it; opaque here. At most 65535 bytes.
    pub addr: Vec<u8>,
}

/// What a rank tells the others about itself.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Card {
    /// The rank.
    pub rank: u32,
    /// Host identity, see [`host_id`]. At most 65535 bytes.
    pub host_id: String,
    /// Opened endpoints; at most 65535. An endpoint followed by more of the same transport
    /// and provider has flows: those are its further flows (the IP route's striping,
    /// `EFA_IP_FLOWS`), counted by [`Card::flows`]; routes use the first.
    pub endpoints: Vec<EndpointCard>,
    /// Subnet of the fabric interface, if known.
    pub fabric_subnet: Option<Subnet>,
    /// Subnet of the IP interface, if known.
    pub ip_subnet: Option<Subnet>,
    /// The rank's process: its pid, the start time the kernel gives it
    /// (`/proc/PID/stat` field 22, so a reused pid is not mistaken for it) and its host name
    /// (for error messages). Ranks on the same host watch each other's pid to learn at once
    /// that a peer died.
    pub process: ProcessId,
}

/// Which process a rank is, for liveness checks on the same host and for error messages.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct ProcessId {
    /// Process id (0: unknown).
    pub pid: u32,
    /// Start time in clock ticks after boot (0: unknown).
    pub start: u64,
    /// Host name; at most 255 bytes.
    pub host: String,
}

/// [`ProcessId::is_gone`] of the process `pid` started at `start` (0: unknown).
fn process_gone(pid: u32, start: u64) -> bool {
    pid != 0
        && proc_stat(pid)
            .is_none_or(|(state, now)| matches!(state, 'Z' | 'X') || (start != 0 && now != start))
}

/// [`ProcessId::is_stopped`] of the process `pid`.
fn process_stopped(pid: u32) -> bool {
    pid != 0 && proc_stat(pid).is_some_and(|(st, _)| matches!(st, 'T' | 't'))
}

impl ProcessId {
    /// Whether this process (on this host) has ended: no such pid, a zombie, or a pid that
    /// now belongs to a process started at another time. False when the pid is unknown (0).
    /// The one liveness rule of the communicator's same-host checks.
    pub fn is_gone(&self) -> bool {
        process_gone(self.pid, self.start)
    }

    /// Whether this process (on this host) is stopped (SIGSTOP, a debugger).
    pub fn is_stopped(&self) -> bool {
        process_stopped(self.pid)
    }

    /// This process.
    pub fn this() -> ProcessId {
        let pid = std::process::id();
        ProcessId {
            pid,
            start: proc_start_time(pid).unwrap_or(0),
            host: std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().chars().take(255).collect())
                .unwrap_or_default(),
        }
    }
}

/// Field 22 (start time) of `/proc/PID/stat`, and the state letter (field 3); `None` when
/// the process does not exist (or `/proc` does not answer). Read by
/// [`efa_shm::owner::proc_stat`], without heap allocation.
pub fn proc_stat(pid: u32) -> Option<(char, u64)> {
    efa_shm::owner::proc_stat(pid).ok()
}

fn proc_start_time(pid: u32) -> Option<u64> {
    proc_stat(pid).map(|(_, t)| t)
}

/// A card that cannot be encoded or decoded.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum CardError {
    /// The input ends inside `field`.
    #[error("card truncated in {field}: needed {needed} more bytes, {remaining} left")]
    Truncated {
        /// The field being read.
        field: &'static str,
        /// Bytes needed.
        needed: usize,
        /// Bytes left.
        remaining: usize,
    },
    /// The input is not a card.
    #[error("not a card: bad magic")]
    BadMagic,
    /// A card from a newer (or older, incompatible) library version.
    #[error("card format version {0} is not supported (this library reads version {CARD_VERSION}); run the same efa-rs version on all ranks")]
    UnsupportedVersion(u8),
    /// A field holds an impossible value.
    #[error("corrupt card: {0}")]
    Corrupt(&'static str),
    /// Bytes follow the card.
    #[error("{0} unexpected bytes after the card")]
    TrailingBytes(usize),
    /// A field is too long for the wire format.
    #[error("card field {field} is {len} bytes; the format allows {max}")]
    FieldTooLong {
        /// The field.
        field: &'static str,
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
}

/// Card wire format version written by [`Card::encode`].
pub const CARD_VERSION: u8 = 2;
const CARD_MAGIC: &[u8; 3] = b"EFC";

impl Card {
    /// Whether the card has an endpoint for `t`.
    pub fn has(&self, t: Transport) -> bool {
        self.endpoints.iter().any(|e| e.transport == t)
    }

    /// How many flows endpoint `first` has: itself and the endpoints right after it with the
    /// same transport and provider (0 when `first` is out of range). The one rule of where a
    /// card keeps its flows.
    pub fn flows(&self, first: usize) -> usize {
        let Some(e) = self.endpoints.get(first) else {
            return 0;
        };
        1 + self.endpoints[first + 1..]
            .iter()
            .take_while(|f| f.transport == e.transport && f.provider == e.provider)
            .count()
    }

    /// The transports this card offers, in order of preference.
    pub fn transports(&self) -> TransportSet {
        TransportSet::of(
            &self
                .endpoints
                .iter()
                .map(|e| e.transport)
                .collect::<Vec<_>>(),
        )
    }

    /// Encodes the card:
    ///
    /// ```text
    /// "EFC" version:u8 rank:u32le host_len:u16le host
    /// fabric_subnet ip_subnet            each: 0 | 4 addr[4] prefix:u8 | 6 addr[16] prefix:u8
    /// n_endpoints:u16le { transport:u8 provider_len:u8 provider addr_len:u16le addr }*
    /// pid:u32le start:u64le hostname_len:u8 hostname
    /// ```
    ///
    /// # Errors
    ///
    /// [`CardError::FieldTooLong`] if the host id, a provider, an address or the endpoint
    /// list exceeds its length field.
    pub fn encode(&self) -> Result<Vec<u8>, CardError> {
        let mut b = Vec::with_capacity(64 + self.host_id.len());
        b.extend_from_slice(CARD_MAGIC);
        b.push(CARD_VERSION);
        b.extend_from_slice(&self.rank.to_le_bytes());
        put_len16(&mut b, "host_id", self.host_id.len())?;
        b.extend_from_slice(self.host_id.as_bytes());
        put_subnet(&mut b, self.fabric_subnet);
        put_subnet(&mut b, self.ip_subnet);
        put_len16(&mut b, "endpoints", self.endpoints.len())?;
        for e in &self.endpoints {
            b.push(e.transport.code());
            let plen = u8::try_from(e.provider.len()).map_err(|_| CardError::FieldTooLong {
                field: "provider",
                len: e.provider.len(),
                max: 255,
            })?;
            b.push(plen);
            b.extend_from_slice(e.provider.as_bytes());
            put_len16(&mut b, "endpoint addr", e.addr.len())?;
            b.extend_from_slice(&e.addr);
        }
        b.extend_from_slice(&self.process.pid.to_le_bytes());
        b.extend_from_slice(&self.process.start.to_le_bytes());
        let hl = u8::try_from(self.process.host.len()).map_err(|_| CardError::FieldTooLong {
            field: "hostname",
            len: self.process.host.len(),
            max: 255,
        })?;
        b.push(hl);
        b.extend_from_slice(self.process.host.as_bytes());
        Ok(b)
    }

    /// Decodes a card written by [`Card::encode`].
    ///
    /// # Errors
    ///
    /// [`CardError::Truncated`], [`CardError::BadMagic`], [`CardError::UnsupportedVersion`],
    /// [`CardError::Corrupt`] or [`CardError::TrailingBytes`].
    pub fn decode(bytes: &[u8]) -> Result<Card, CardError> {
        let mut r = Reader { b: bytes };
        if r.take("magic", 3)? != CARD_MAGIC {
            return Err(CardError::BadMagic);
        }
        let v = r.u8("version")?;
        if v != CARD_VERSION {
            return Err(CardError::UnsupportedVersion(v));
        }
        let rank = u32::from_le_bytes(r.array("rank")?);
        let hl = r.u16("host_id length")? as usize;
        let host_id = std::str::from_utf8(r.take("host_id", hl)?)
            .map_err(|_| CardError::Corrupt("host id is not UTF-8"))?
            .to_owned();
        let fabric_subnet = r.subnet("fabric subnet")?;
        let ip_subnet = r.subnet("ip subnet")?;
        let n = r.u16("endpoint count")?;
        let mut endpoints = Vec::with_capacity(usize::from(n).min(r.b.len() / 4));
        for _ in 0..n {
            let transport = Transport::from_code(r.u8("endpoint transport")?)
                .ok_or(CardError::Corrupt("unknown transport code"))?;
            let pl = r.u8("provider length")? as usize;
            let provider = std::str::from_utf8(r.take("provider", pl)?)
                .map_err(|_| CardError::Corrupt("provider name is not UTF-8"))?
                .to_owned();
            let al = r.u16("endpoint addr length")? as usize;
            let addr = r.take("endpoint addr", al)?.to_vec();
            endpoints.push(EndpointCard {
                transport,
                provider,
                addr,
            });
        }
        let pid = u32::from_le_bytes(r.array("pid")?);
        let start = u64::from_le_bytes(r.array("start time")?);
        let hl = r.u8("hostname length")? as usize;
        let host = std::str::from_utf8(r.take("hostname", hl)?)
            .map_err(|_| CardError::Corrupt("hostname is not UTF-8"))?
            .to_owned();
        if !r.b.is_empty() {
            return Err(CardError::TrailingBytes(r.b.len()));
        }
        Ok(Card {
            rank,
            host_id,
            endpoints,
            fabric_subnet,
            ip_subnet,
            process: ProcessId { pid, start, host },
        })
    }
}

fn put_len16(b: &mut Vec<u8>, field: &'static str, len: usize) -> Result<(), CardError> {
    let l = u16::try_from(len).map_err(|_| CardError::FieldTooLong {
        field,
        len,
        max: u16::MAX as usize,
    })?;
    b.extend_from_slice(&l.to_le_bytes());
    Ok(())
}

fn put_subnet(b: &mut Vec<u8>, s: Option<Subnet>) {
    match s {
        None => b.push(0),
        Some(Subnet {
            addr: IpAddr::V4(a),
            prefix,
        }) => {
            b.push(4);
            b.extend_from_slice(&a.octets());
            b.push(prefix);
        }
        Some(Subnet {
            addr: IpAddr::V6(a),
            prefix,
        }) => {
            b.push(6);
            b.extend_from_slice(&a.octets());
            b.push(prefix);
        }
    }
}

struct Reader<'a> {
    b: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, field: &'static str, n: usize) -> Result<&'a [u8], CardError> {
        if self.b.len() < n {
            return Err(CardError::Truncated {
                field,
                needed: n,
                remaining: self.b.len(),
            });
        }
        let (h, t) = self.b.split_at(n);
        self.b = t;
        Ok(h)
    }

    fn array<const N: usize>(&mut self, field: &'static str) -> Result<[u8; N], CardError> {
        let s = self.take(field, N)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    fn u8(&mut self, field: &'static str) -> Result<u8, CardError> {
        Ok(self.array::<1>(field)?[0])
    }

    fn u16(&mut self, field: &'static str) -> Result<u16, CardError> {
        Ok(u16::from_le_bytes(self.array(field)?))
    }

    fn subnet(&mut self, field: &'static str) -> Result<Option<Subnet>, CardError> {
        let addr = match self.u8(field)? {
            0 => return Ok(None),
            4 => IpAddr::V4(Ipv4Addr::from(self.array::<4>(field)?)),
            6 => IpAddr::V6(Ipv6Addr::from(self.array::<16>(field)?)),
            _ => return Err(CardError::Corrupt("unknown subnet address family")),
        };
        let prefix = self.u8(field)?;
        Subnet::new(addr, prefix)
            .map(Some)
            .ok_or(CardError::Corrupt("subnet prefix longer than its address"))
    }
}

// ---------------------------------------------------------------------------------------
// Host identity
// ---------------------------------------------------------------------------------------

/// This machine's identity could not be determined.
#[derive(Debug, Error)]
#[error("cannot determine the host identity: {what}: {source}; set EFA_HOST_ID to a string unique to this host and network namespace")]
pub struct HostIdError {
    /// What could not be read.
    pub what: &'static str,
    /// The I/O error.
    #[source]
    pub source: std::io::Error,
}

/// This host's identity for placement: `EFA_HOST_ID` if set, else
/// `<boot_id>/netns:<inode>` from `/proc/sys/kernel/random/boot_id` and the inode of
/// `/proc/self/ns/net`. Two processes share shared memory routes only if their ids are
/// equal, so containers in separate network namespaces count as separate hosts (they
/// usually cannot see each other's shm either).
///
/// # Errors
///
/// [`HostIdError`] if `/proc` cannot be read and `EFA_HOST_ID` is unset, or if
/// `EFA_HOST_ID` is not UTF-8 or longer than the 65535 bytes a card carries.
pub fn host_id() -> Result<String, HostIdError> {
    let bad_override = |what| HostIdError {
        what,
        source: std::io::Error::from(std::io::ErrorKind::InvalidInput),
    };
    let ovr = match std::env::var("EFA_HOST_ID") {
        Ok(v) => Some(v),
        Err(std::env::VarError::NotPresent) => None,
        Err(std::env::VarError::NotUnicode(_)) => {
            return Err(bad_override("EFA_HOST_ID is not valid UTF-8"))
        }
    };
    if let Some(id) = ovr.as_deref().map(str::trim).filter(|s| !s.is_empty()) {
        if id.len() > usize::from(u16::MAX) {
            return Err(bad_override(
                "EFA_HOST_ID is longer than the 65535 bytes a card carries",
            ));
        }
        return Ok(id.to_owned());
    }
    let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").map_err(|source| {
        HostIdError {
            what: "reading /proc/sys/kernel/random/boot_id",
            source,
        }
    })?;
    let ns = std::fs::read_link("/proc/self/ns/net").map_err(|source| HostIdError {
        what: "reading the link /proc/self/ns/net",
        source,
    })?;
    Ok(compose_host_id(None, &boot, &ns.to_string_lossy()))
}

/// The pure part of [`host_id`]: an override wins; otherwise the trimmed boot id and the
/// inode from a namespace link target such as `net:[4026531840]`.
pub fn compose_host_id(override_id: Option<&str>, boot_id: &str, netns_link: &str) -> String {
    if let Some(id) = override_id.map(str::trim).filter(|s| !s.is_empty()) {
        return id.to_owned();
    }
    let inode = netns_link
        .split_once('[')
        .and_then(|(_, r)| r.strip_suffix(']'))
        .unwrap_or(netns_link);
    format!("{}/netns:{}", boot_id.trim(), inode)
}

// ---------------------------------------------------------------------------------------
// Route choice
// ---------------------------------------------------------------------------------------

/// Why a route was chosen. `Display` gives one line for logs and `efa doctor`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum RouteReason {
    /// A rank talking to itself.
    SelfLoop,
    /// Same host, both have shm.
    SameHost {
        /// The shared host id.
        host_id: String,
    },
    /// Both fabric interfaces are in this subnet.
    SameSubnet {
        /// The subnet (network form).
        subnet: Subnet,
    },
    /// IP, because the fabric subnets differ.
    DifferentSubnets {
        /// The peer's fabric subnet (network form).
        peer: Subnet,
        /// This rank's fabric subnet (network form).
        local: Subnet,
    },
    /// IP, because the peer has no fabric endpoint.
    PeerNoFabric,
    /// IP, because this rank has no fabric endpoint.
    LocalNoFabric,
    /// IP, because `EFA_TRANSPORTS` excludes the fabric.
    FabricExcluded,
    /// IP, because the two fabric endpoints use different providers.
    FabricProviderMismatch {
        /// This rank's fabric provider.
        local: String,
        /// The peer's fabric provider.
        peer: String,
    },
    /// IP, because a fabric subnet is unknown, so sharing a subnet cannot be checked.
    FabricSubnetUnknown,
}

impl fmt::Display for RouteReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RouteReason::SelfLoop => f.write_str("self: a rank talking to itself"),
            RouteReason::SameHost { host_id } => write!(f, "shm: same host {host_id}"),
            RouteReason::SameSubnet { subnet } => write!(f, "fabric: same subnet {subnet}"),
            RouteReason::DifferentSubnets { peer, local } => write!(
                f,
                "IP: peer is in {peer}, this rank in {local}; EFA does not cross subnets"
            ),
            RouteReason::PeerNoFabric => f.write_str("IP: peer has no fabric endpoint"),
            RouteReason::LocalNoFabric => f.write_str("IP: this rank has no fabric endpoint"),
            RouteReason::FabricExcluded => f.write_str("IP: fabric excluded by EFA_TRANSPORTS"),
            RouteReason::FabricProviderMismatch { local, peer } => write!(
                f,
                "IP: fabric providers differ (this rank {local}, peer {peer})"
            ),
            RouteReason::FabricSubnetUnknown => f.write_str(
                "IP: a fabric subnet is unknown, so a shared subnet cannot be confirmed",
            ),
        }
    }
}

/// A route as start-up keeps it: the transport and the index of the peer's endpoint on its
/// card ([`Route::transport`], [`Route::peer_endpoint`]). Here, beside [`Route`], so that the
/// communicator and its carriers (`fastbox`) share it without importing each other.
pub(crate) type Chosen = (Transport, usize);

/// The chosen way to reach one peer.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Route {
    /// The transport.
    pub transport: Transport,
    /// Index into the local card's `endpoints` to send from.
    pub local_endpoint: usize,
    /// Index into the peer card's `endpoints` to send to.
    pub peer_endpoint: usize,
    /// Why.
    pub reason: RouteReason,
}

impl fmt::Display for Route {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.reason, f)
    }
}

/// No transport connects two ranks. Fix by opening a common transport on both (usually
/// `tcp`) or by widening `EFA_TRANSPORTS`.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("no route from rank {local_rank} to rank {peer_rank}: this rank offers [{local_offers}], the peer [{peer_offers}], EFA_TRANSPORTS allows [{allowed}]{}", if .note.is_empty() { String::new() } else { format!("; {}", .note) })]
pub struct NoRoute {
    /// This rank.
    pub local_rank: u32,
    /// The peer.
    pub peer_rank: u32,
    /// Transports this rank has endpoints for.
    pub local_offers: TransportSet,
    /// Transports the peer has endpoints for.
    pub peer_offers: TransportSet,
    /// Transports allowed.
    pub allowed: TransportSet,
    /// Why the transports both offer did not qualify (for example "shm needs the same
    /// host"); empty if they share none.
    pub note: String,
}

/// Finds endpoints of transport `t` on both cards sharing a provider; the first such pair.
/// If both have `t` but no provider in common, returns the first providers as `Err`.
fn pair(
    local: &Card,
    peer: &Card,
    t: Transport,
) -> Option<Result<(usize, usize), (String, String)>> {
    let mine: Vec<(usize, &EndpointCard)> = local
        .endpoints
        .iter()
        .enumerate()
        .filter(|(_, e)| e.transport == t)
        .collect();
    let theirs: Vec<(usize, &EndpointCard)> = peer
        .endpoints
        .iter()
        .enumerate()
        .filter(|(_, e)| e.transport == t)
        .collect();
    let (m0, t0) = (mine.first()?, theirs.first()?);
    for (i, a) in &mine {
        if let Some((j, _)) = theirs.iter().find(|(_, b)| b.provider == a.provider) {
            return Some(Ok((*i, *j)));
        }
    }
    Some(Err((m0.1.provider.clone(), t0.1.provider.clone())))
}

/// Chooses how `local` reaches `peer`; see the [module docs](self) for the rules.
///
/// # Errors
///
/// [`NoRoute`] if no allowed transport is offered by both with a common provider (and, for
/// shm, on the same host).
pub fn choose_route(local: &Card, peer: &Card, allowed: &TransportSet) -> Result<Route, NoRoute> {
    let usable = |t: Transport| match pair(local, peer, t) {
        Some(Ok(p)) if allowed.contains(t) => Some(p),
        _ => None,
    };
    let route = |t, (l, p): (usize, usize), reason| Route {
        transport: t,
        local_endpoint: l,
        peer_endpoint: p,
        reason,
    };

    // Same rank on the same host is this rank itself. (Same rank on different hosts is a
    // misconfiguration; the ordinary rules below then keep shm off.)
    if local.rank == peer.rank && local.host_id == peer.host_id {
        if let Some((t, p)) = Transport::ALL
            .iter()
            .find_map(|&t| usable(t).map(|p| (t, p)))
        {
            return Ok(route(t, p, RouteReason::SelfLoop));
        }
    }

    let same_host = local.host_id == peer.host_id;
    if same_host {
        if let Some(p) = usable(Transport::Shm) {
            return Ok(route(
                Transport::Shm,
                p,
                RouteReason::SameHost {
                    host_id: local.host_id.clone(),
                },
            ));
        }
    }

    // Fabric, or the reason it is not used.
    let fabric_reason = if !allowed.contains(Transport::Fabric) {
        RouteReason::FabricExcluded
    } else if !local.has(Transport::Fabric) {
        RouteReason::LocalNoFabric
    } else if !peer.has(Transport::Fabric) {
        RouteReason::PeerNoFabric
    } else {
        match (local.fabric_subnet, peer.fabric_subnet) {
            (Some(a), Some(b)) if a.same_subnet(&b) => match pair(local, peer, Transport::Fabric) {
                Some(Ok(p)) => {
                    return Ok(route(
                        Transport::Fabric,
                        p,
                        RouteReason::SameSubnet {
                            subnet: a.network(),
                        },
                    ))
                }
                Some(Err((l, p))) => RouteReason::FabricProviderMismatch { local: l, peer: p },
                None => unreachable!("both cards have a fabric endpoint"),
            },
            (Some(a), Some(b)) => RouteReason::DifferentSubnets {
                peer: b.network(),
                local: a.network(),
            },
            _ => RouteReason::FabricSubnetUnknown,
        }
    };

    if let Some(p) = usable(Transport::Ip) {
        return Ok(route(Transport::Ip, p, fabric_reason));
    }

    let mut notes = Vec::new();
    let both = TransportSet::of(
        &Transport::ALL
            .into_iter()
            .filter(|&t| local.has(t) && peer.has(t))
            .collect::<Vec<_>>(),
    );
    for t in both.iter() {
        if !allowed.contains(t) {
            notes.push(format!("{t} is excluded"));
            continue;
        }
        if let Some(Err((l, p))) = pair(local, peer, t) {
            notes.push(format!("{t} providers differ ({l} vs {p})"));
            continue;
        }
        match t {
            Transport::Shm if !same_host => notes.push(format!(
                "shm needs the same host, but the hosts are {} and {}",
                local.host_id, peer.host_id
            )),
            Transport::Fabric => notes.push(fabric_reason.to_string().replacen(
                "IP: ",
                "fabric unusable: ",
                1,
            )),
            _ => {}
        }
    }
    Err(NoRoute {
        local_rank: local.rank,
        peer_rank: peer.rank,
        local_offers: local.transports(),
        peer_offers: peer.transports(),
        allowed: *allowed,
        note: notes.join("; "),
    })
}

/// Routes from `local` to every card in `cards` (indexed like `cards`), for logging a whole
/// placement at start-up.
pub fn choose_routes(
    local: &Card,
    cards: &[Card],
    allowed: &TransportSet,
) -> Vec<Result<Route, NoRoute>> {
    cards
        .iter()
        .map(|c| choose_route(local, c, allowed))
        .collect()
}

/// Every rank's [`Card`], kept compactly for the life of a communicator: the strings that
/// many cards share (host ids, host names, provider names) and the subnets are stored once,
/// and each card's endpoint addresses go into one byte arena. A card costs 40 bytes, 12
/// per endpoint and its address bytes (153 bytes with this host's shm and tcp endpoints),
/// plus its host's strings shared by the host's ranks ([`CardTable::heap_bytes`]), against
/// about 550 for a [`Card`] (measured: the unit test `idle_peer_state_fits_256_bytes`).
///
/// The communicator keeps the table so that it can choose a peer's route and insert its
/// address on first use ([`CardTable::card`] gives back the card as it was published).
#[derive(Debug, Clone, Default)]
pub struct CardTable {
    /// Interned strings (host ids, host names, provider names), one after another.
    strings: Vec<u8>,
    /// Where each interned string starts in `strings`, and a last entry where they end.
    string_at: Vec<u32>,
    /// Interned subnets.
    subnets: Vec<Subnet>,
    /// Per rank.
    entries: Vec<CardEntry>,
    /// Every card's endpoints, in rank order.
    endpoints: Vec<EndpointEntry>,
    /// Every endpoint's address, in the order of `endpoints`.
    addrs: Vec<u8>,
}

/// [`CardTable`]'s record of one card (indices into its interned lists; [`NONE`] for no
/// subnet).
#[derive(Debug, Clone, Copy)]
struct CardEntry {
    start: u64,
    pid: u32,
    host_id: u32,
    host: u32,
    fabric_subnet: u32,
    ip_subnet: u32,
    /// Index of its first endpoint in [`CardTable::endpoints`].
    first_endpoint: u32,
    endpoints: u16,
}

/// [`CardTable`]'s record of one endpoint.
#[derive(Debug, Clone, Copy)]
struct EndpointEntry {
    /// Where its address starts in [`CardTable::addrs`].
    addr: u32,
    addr_len: u16,
    provider: u16,
    transport: Transport,
}

/// Builds a [`CardTable`] one card at a time (in rank order), so that the cards need not
/// all be decoded at once: the communicator decodes each card from the store's reply, keeps
/// what it needs and drops it.
#[derive(Debug)]
pub struct CardTableBuilder {
    t: CardTable,
    interned: std::collections::HashMap<String, u32>,
    subnets: std::collections::HashMap<Subnet, u32>,
}

impl Default for CardTableBuilder {
    fn default() -> Self {
        CardTableBuilder {
            t: CardTable {
                string_at: vec![0],
                ..CardTable::default()
            },
            interned: Default::default(),
            subnets: Default::default(),
        }
    }
}

impl CardTableBuilder {
    /// Interned string `s`'s index.
    fn intern(&mut self, s: &str) -> Result<u32, CardTableFull> {
        if let Some(&i) = self.interned.get(s) {
            return Ok(i);
        }
        let t = &mut self.t;
        let i = t.string_at.len() as u32 - 1;
        let end = u32::try_from(t.strings.len() + s.len()).map_err(|_| CardTableFull {
            what: "bytes of distinct strings",
            have: t.strings.len() + s.len(),
            max: u32::MAX as usize,
        })?;
        t.strings.extend_from_slice(s.as_bytes());
        t.string_at.push(end);
        self.interned.insert(s.to_owned(), i);
        Ok(i)
    }

    /// Interned subnet `s`'s index ([`NONE`] for none).
    fn subnet(&mut self, s: Option<Subnet>) -> u32 {
        match s {
            None => NONE,
            Some(s) => *self.subnets.entry(s).or_insert_with(|| {
                self.t.subnets.push(s);
                self.t.subnets.len() as u32 - 1
            }),
        }
    }

    /// Adds the card of the next rank (the first pushed is rank 0's).
    ///
    /// # Errors
    /// As [`CardTable::new`].
    pub fn push(&mut self, c: &Card) -> Result<(), CardTableFull> {
        let full = |what, have, max| CardTableFull { what, have, max };
        let first_endpoint = u32::try_from(self.t.endpoints.len())
            .map_err(|_| full("endpoints", self.t.endpoints.len(), u32::MAX as usize))?;
        for e in &c.endpoints {
            let provider = self.intern(&e.provider)?;
            let provider = u16::try_from(provider)
                .map_err(|_| full("distinct strings", provider as usize, 65_535))?;
            let t = &mut self.t;
            let addr = u32::try_from(t.addrs.len())
                .ok()
                .filter(|a| a.checked_add(e.addr.len() as u32).is_some())
                .ok_or_else(|| {
                    full("addresses", t.addrs.len() + e.addr.len(), u32::MAX as usize)
                })?;
            let addr_len = u16::try_from(e.addr.len())
                .map_err(|_| full("address bytes of an endpoint", e.addr.len(), 65_535))?;
            t.addrs.extend_from_slice(&e.addr);
            t.endpoints.push(EndpointEntry {
                addr,
                addr_len,
                provider,
                transport: e.transport,
            });
        }
        let entry = CardEntry {
            start: c.process.start,
            pid: c.process.pid,
            host_id: self.intern(&c.host_id)?,
            host: self.intern(&c.process.host)?,
            fabric_subnet: self.subnet(c.fabric_subnet),
            ip_subnet: self.subnet(c.ip_subnet),
            first_endpoint,
            endpoints: u16::try_from(c.endpoints.len())
                .map_err(|_| full("endpoints of a card", c.endpoints.len(), 65_535))?,
        };
        self.t.entries.push(entry);
        Ok(())
    }

    /// The table, its memory trimmed to what it holds.
    pub fn finish(self) -> CardTable {
        let mut t = self.t;
        t.strings.shrink_to_fit();
        t.string_at.shrink_to_fit();
        t.subnets.shrink_to_fit();
        t.entries.shrink_to_fit();
        t.endpoints.shrink_to_fit();
        t.addrs.shrink_to_fit();
        t
    }
}

/// [`CardEntry`]'s index for no subnet.
const NONE: u32 = u32::MAX;

/// A table of cards that does not fit [`CardTable`]'s 32-bit offsets.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("the cards' {what} exceed {max} ({have}): the communicator cannot index them")]
pub struct CardTableFull {
    /// What overflowed: "addresses" (bytes of all endpoint addresses), "endpoints",
    /// "bytes of distinct strings", "distinct strings" (provider names), or the endpoints
    /// or address bytes of one card.
    pub what: &'static str,
    /// How many there would be.
    pub have: usize,
    /// The most there may be.
    pub max: usize,
}

impl CardTable {
    /// The table of `cards` (indexed like `cards`, which is by rank).
    ///
    /// # Errors
    /// [`CardTableFull`] when all addresses or all distinct strings together exceed 4 GiB,
    /// the endpoints 4 Gi, or a provider name is first seen after 65,535 distinct strings
    /// (no job comes near).
    pub fn new(cards: &[Card]) -> Result<CardTable, CardTableFull> {
        let mut b = CardTableBuilder::default();
        for c in cards {
            b.push(c)?;
        }
        Ok(b.finish())
    }

    /// Number of cards.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the table holds no card.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Rank `rank`'s card as it was published, or `None` past the table's end.
    pub fn card(&self, rank: u32) -> Option<Card> {
        let e = self.entries.get(rank as usize)?;
        let first = e.first_endpoint as usize;
        let endpoints = self.endpoints[first..first + usize::from(e.endpoints)]
            .iter()
            .map(|ep| EndpointCard {
                transport: ep.transport,
                provider: self.string(u32::from(ep.provider)).to_owned(),
                addr: self.addr(ep).to_vec(),
            })
            .collect();
        let subnet = |i: u32| (i != NONE).then(|| self.subnets[i as usize]);
        Some(Card {
            rank,
            host_id: self.string(e.host_id).to_owned(),
            endpoints,
            fabric_subnet: subnet(e.fabric_subnet),
            ip_subnet: subnet(e.ip_subnet),
            process: self.process(rank)?,
        })
    }

    /// Rank `rank`'s process, or `None` past the table's end.
    pub fn process(&self, rank: u32) -> Option<ProcessId> {
        let e = self.entries.get(rank as usize)?;
        Some(ProcessId {
            pid: e.pid,
            start: e.start,
            host: self.string(e.host).to_owned(),
        })
    }

    /// Whether ranks `a` and `b` published the same host id (false past the table's end).
    pub fn same_host(&self, a: u32, b: u32) -> bool {
        match (self.entries.get(a as usize), self.entries.get(b as usize)) {
            (Some(x), Some(y)) => x.host_id == y.host_id,
            _ => false,
        }
    }

    /// Whether rank `rank`'s process, on this host, has ended ([`ProcessId::is_gone`]
    /// without building the id; false past the table's end).
    pub fn process_gone(&self, rank: u32) -> bool {
        self.entries
            .get(rank as usize)
            .is_some_and(|e| process_gone(e.pid, e.start))
    }

    /// Rank `rank`'s pid when its process, on this host, is stopped
    /// ([`ProcessId::is_stopped`]; `None` past the table's end).
    pub fn process_stopped(&self, rank: u32) -> Option<u32> {
        let e = self.entries.get(rank as usize)?;
        process_stopped(e.pid).then_some(e.pid)
    }

    /// Rank `rank`'s pid (0: unknown or past the table's end).
    pub fn pid(&self, rank: u32) -> u32 {
        self.entries.get(rank as usize).map_or(0, |e| e.pid)
    }

    /// Rank `rank`'s address on its endpoint number `endpoint` (an index into its card's
    /// endpoints, as [`Route::peer_endpoint`]).
    pub fn addr_of(&self, rank: u32, endpoint: usize) -> Option<&[u8]> {
        let e = self.entries.get(rank as usize)?;
        if endpoint >= usize::from(e.endpoints) {
            return None;
        }
        Some(self.addr(&self.endpoints[e.first_endpoint as usize + endpoint]))
    }

    /// Interned string `i` (valid UTF-8: it was copied from a `&str`).
    fn string(&self, i: u32) -> &str {
        let (a, b) = (self.string_at[i as usize], self.string_at[i as usize + 1]);
        std::str::from_utf8(&self.strings[a as usize..b as usize]).unwrap_or_default()
    }

    fn addr(&self, ep: &EndpointEntry) -> &[u8] {
        let a = ep.addr as usize;
        &self.addrs[a..a + usize::from(ep.addr_len)]
    }

    /// Bytes the table holds: its own size and every allocation's capacity.
    pub fn heap_bytes(&self) -> usize {
        std::mem::size_of::<Self>()
            + self.strings.capacity()
            + self.string_at.capacity() * std::mem::size_of::<u32>()
            + self.subnets.capacity() * std::mem::size_of::<Subnet>()
            + self.entries.capacity() * std::mem::size_of::<CardEntry>()
            + self.endpoints.capacity() * std::mem::size_of::<EndpointEntry>()
            + self.addrs.capacity()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep(t: Transport, provider: &str) -> EndpointCard {
        EndpointCard {
            transport: t,
            provider: provider.into(),
            addr: vec![t.code(); 4],
        }
    }

    fn net(s: &str) -> Option<Subnet> {
        Some(s.parse().unwrap())
    }

    #[test]
    fn flows_follow_their_first_endpoint_and_routes_use_the_first() {
        let mut a = full(0, "h1", "10.0.0.0/24");
        let mut b = full(1, "h2", "10.0.0.0/24");
        let ip = a
            .endpoints
            .iter()
            .position(|e| e.transport == Transport::Ip)
            .unwrap();
        assert_eq!(a.flows(ip), 1);
        for _ in 0..3 {
            let extra = a.endpoints[ip].clone();
            a.endpoints.insert(ip + 1, extra);
        }
        let extra = b.endpoints[ip].clone();
        b.endpoints.insert(ip + 1, extra);
        assert_eq!((a.flows(ip), b.flows(ip)), (4, 2));
        assert_eq!(a.flows(a.endpoints.len()), 0);
        let r = choose_route(&a, &b, &TransportSet::of(&[Transport::Ip])).unwrap();
        assert_eq!((r.local_endpoint, r.peer_endpoint), (ip, ip));
        // The cards still encode and decode exactly.
        assert_eq!(Card::decode(&a.encode().unwrap()).unwrap(), a);
    }

    /// A card with shm, efa and tcp endpoints on `host`, fabric and IP in `subnet`.
    fn full(rank: u32, host: &str, subnet: &str) -> Card {
        Card {
            rank,
            host_id: host.into(),
            endpoints: vec![
                ep(Transport::Shm, "shm"),
                ep(Transport::Fabric, "efa"),
                ep(Transport::Ip, "tcp"),
            ],
            fabric_subnet: net(subnet),
            ip_subnet: net(subnet),
            process: Default::default(),
        }
    }

    fn without(mut c: Card, t: Transport) -> Card {
        c.endpoints.retain(|e| e.transport != t);
        c
    }

    fn route(a: &Card, b: &Card, allowed: &str) -> Result<Route, NoRoute> {
        choose_route(a, b, &TransportSet::parse(allowed).unwrap())
    }

    /// proc_stat reads this process's state and start time as `/proc/self/stat` says,
    /// and nothing for a pid that does not exist.
    #[test]
    fn proc_stat_reads_state_and_start_time() {
        let me = std::process::id();
        let (state, start) = proc_stat(me).expect("this process exists");
        assert!(matches!(state, 'R' | 'S'), "state {state}");
        let text = std::fs::read_to_string("/proc/self/stat").unwrap();
        let fields: Vec<&str> = text[text.rfind(')').unwrap() + 1..]
            .split_whitespace()
            .collect();
        assert_eq!(start.to_string(), fields[19], "field 22 of {text}");
        // Above the largest pid_max Linux allows (2^22).
        assert_eq!(proc_stat((1 << 22) + 1), None);
    }

    #[test]
    fn transport_set_parsing() {
        use Transport::*;
        assert_eq!(TransportSet::parse("tcp").unwrap(), TransportSet::of(&[Ip]));
        assert_eq!(
            TransportSet::parse("shm,tcp").unwrap(),
            TransportSet::of(&[Shm, Ip])
        );
        assert_eq!(
            TransportSet::parse(" SHM , Fabric ,ip ").unwrap(),
            TransportSet::all()
        );
        assert_eq!(
            TransportSet::parse("efa").unwrap(),
            TransportSet::of(&[Fabric])
        );
        assert_eq!(
            TransportSet::parse("verbs,ip").unwrap(),
            TransportSet::of(&[Fabric, Ip])
        );
        assert_eq!(TransportSet::parse("").unwrap(), TransportSet::all());
        assert_eq!(TransportSet::parse("all").unwrap(), TransportSet::all());
        assert_eq!(
            TransportSet::parse("^shm").unwrap(),
            TransportSet::of(&[Fabric, Ip])
        );
        assert_eq!(
            TransportSet::parse("^shm,efa").unwrap(),
            TransportSet::of(&[Ip])
        );
        assert!(TransportSet::parse("^all").unwrap().is_empty());
        let e = TransportSet::parse("shm,ucx").unwrap_err();
        assert_eq!(e.name, "ucx");
        assert!(e.to_string().contains("EFA_TRANSPORTS=\"shm,ucx\""), "{e}");
        assert_eq!(TransportSet::all().to_string(), "shm,fabric,ip");
        assert_eq!(TransportSet::empty().to_string(), "none");
        assert_eq!(
            TransportSet::all().without(Shm),
            TransportSet::of(&[Fabric, Ip])
        );
        assert_eq!(TransportSet::default(), TransportSet::all());
    }

    #[test]
    fn subnet_logic_v4_and_v6() {
        let s: Subnet = "10.0.1.17/24".parse().unwrap();
        assert_eq!(s.network().to_string(), "10.0.1.0/24");
        assert!(s.contains("10.0.1.200".parse().unwrap()));
        assert!(!s.contains("10.0.2.1".parse().unwrap()));
        assert!(!s.contains("::ffff:10.0.1.1".parse().unwrap()));
        assert!(s.same_subnet(&"10.0.1.99/24".parse().unwrap()));
        assert!(!s.same_subnet(&"10.0.1.99/25".parse().unwrap()));
        assert!(!s.same_subnet(&"10.0.2.17/24".parse().unwrap()));
        let z: Subnet = "1.2.3.4/0".parse().unwrap();
        assert!(z.contains("9.9.9.9".parse().unwrap()));
        let h: Subnet = "1.2.3.4/32".parse().unwrap();
        assert!(h.contains("1.2.3.4".parse().unwrap()) && !h.contains("1.2.3.5".parse().unwrap()));

        let v6: Subnet = "fd00:1:2:3::17/64".parse().unwrap();
        assert_eq!(v6.network().to_string(), "fd00:1:2:3::/64");
        assert!(v6.contains("fd00:1:2:3:ffff::1".parse().unwrap()));
        assert!(!v6.contains("fd00:1:2:4::1".parse().unwrap()));
        assert!(!v6.same_subnet(&"10.0.1.0/24".parse().unwrap()));
        assert!(v6.same_subnet(&"fd00:1:2:3:abcd::/64".parse().unwrap()));
        assert!("::/128".parse::<Subnet>().is_ok());

        for bad in [
            "10.0.0.0",
            "10.0.0.0/33",
            "fd00::/129",
            "x/8",
            "10.0.0.0/x",
            "10.0.0/8",
        ] {
            assert!(bad.parse::<Subnet>().is_err(), "{bad}");
        }
        assert!(Subnet::new("1.1.1.1".parse().unwrap(), 33).is_none());
    }

    #[test]
    fn same_host_uses_shm() {
        let a = full(0, "h1", "10.0.1.5/24");
        let b = full(1, "h1", "10.0.1.6/24");
        let r = route(&a, &b, "all").unwrap();
        assert_eq!(r.transport, Transport::Shm);
        assert_eq!(r.to_string(), "shm: same host h1");
        assert_eq!((r.local_endpoint, r.peer_endpoint), (0, 0));
    }

    #[test]
    fn same_subnet_uses_fabric() {
        let a = full(0, "h1", "10.0.1.5/24");
        let b = full(1, "h2", "10.0.1.6/24");
        let r = route(&a, &b, "all").unwrap();
        assert_eq!(r.transport, Transport::Fabric);
        assert_eq!(r.to_string(), "fabric: same subnet 10.0.1.0/24");
        assert_eq!((r.local_endpoint, r.peer_endpoint), (1, 1));
    }

    #[test]
    fn different_subnets_use_ip() {
        let a = full(0, "h1", "10.0.1.5/24");
        let b = full(1, "h2", "10.0.2.6/24");
        let r = route(&a, &b, "all").unwrap();
        assert_eq!(r.transport, Transport::Ip);
        assert_eq!(
            r.to_string(),
            "IP: peer is in 10.0.2.0/24, this rank in 10.0.1.0/24; EFA does not cross subnets"
        );
        // Same addresses, different prefix lengths: treated as different subnets.
        let c = full(2, "h3", "10.0.1.7/23");
        assert_eq!(route(&a, &c, "all").unwrap().transport, Transport::Ip);
    }

    #[test]
    fn missing_fabric_on_either_side_uses_ip() {
        let a = full(0, "h1", "10.0.1.5/24");
        let b = without(full(1, "h2", "10.0.1.6/24"), Transport::Fabric);
        let r = route(&a, &b, "all").unwrap();
        assert_eq!(
            (r.transport, r.to_string().as_str()),
            (Transport::Ip, "IP: peer has no fabric endpoint")
        );
        let r = route(&b, &a, "all").unwrap();
        assert_eq!(
            (r.transport, r.reason),
            (Transport::Ip, RouteReason::LocalNoFabric)
        );
    }

    #[test]
    fn unknown_fabric_subnet_uses_ip() {
        let a = full(0, "h1", "10.0.1.5/24");
        let mut b = full(1, "h2", "10.0.1.6/24");
        b.fabric_subnet = None;
        let r = route(&a, &b, "all").unwrap();
        assert_eq!(
            (r.transport, r.reason),
            (Transport::Ip, RouteReason::FabricSubnetUnknown)
        );
    }

    #[test]
    fn fabric_provider_mismatch_uses_ip() {
        let a = full(0, "h1", "10.0.1.5/24");
        let mut b = full(1, "h2", "10.0.1.6/24");
        b.endpoints[1].provider = "verbs;ofi_rxm".into();
        let r = route(&a, &b, "all").unwrap();
        assert_eq!(r.transport, Transport::Ip);
        assert_eq!(
            r.to_string(),
            "IP: fabric providers differ (this rank efa, peer verbs;ofi_rxm)"
        );
        // A second fabric endpoint with a common provider is found.
        let mut a2 = a.clone();
        a2.endpoints.push(ep(Transport::Fabric, "verbs;ofi_rxm"));
        let r = route(&a2, &b, "all").unwrap();
        assert_eq!(
            (r.transport, r.local_endpoint, r.peer_endpoint),
            (Transport::Fabric, 3, 1)
        );
    }

    #[test]
    fn same_host_without_shm_falls_to_fabric_then_ip() {
        let a = without(full(0, "h1", "10.0.1.5/24"), Transport::Shm);
        let b = full(1, "h1", "10.0.1.6/24");
        assert_eq!(route(&a, &b, "all").unwrap().transport, Transport::Fabric);
        assert_eq!(route(&b, &a, "all").unwrap().transport, Transport::Fabric);
        let a = without(a, Transport::Fabric);
        assert_eq!(route(&a, &b, "all").unwrap().transport, Transport::Ip);
        // shm excluded although both have it.
        let a = full(0, "h1", "10.0.1.5/24");
        assert_eq!(
            route(&a, &b, "fabric,ip").unwrap().transport,
            Transport::Fabric
        );
        assert_eq!(route(&a, &b, "tcp").unwrap().transport, Transport::Ip);
    }

    #[test]
    fn different_hosts_never_use_shm() {
        let a = full(0, "h1", "10.0.1.5/24");
        let b = full(1, "h2", "10.0.2.6/24");
        let e = route(&a, &b, "shm").unwrap_err();
        assert!(e.note.contains("shm needs the same host"), "{e}");
        assert!(
            e.to_string().starts_with("no route from rank 0 to rank 1"),
            "{e}"
        );
    }

    #[test]
    fn transport_overrides() {
        let a = full(0, "h1", "10.0.1.5/24");
        let b = full(1, "h2", "10.0.1.6/24");
        let r = route(&a, &b, "shm,tcp").unwrap();
        assert_eq!(
            (r.transport, r.to_string().as_str()),
            (Transport::Ip, "IP: fabric excluded by EFA_TRANSPORTS")
        );
        assert_eq!(route(&a, &b, "^tcp").unwrap().transport, Transport::Fabric);
        let e = route(&a, &b, "shm").unwrap_err();
        assert_eq!(e.allowed, TransportSet::of(&[Transport::Shm]));
        // Fabric only, different subnets: no route, with the subnet reason.
        let c = full(2, "h3", "10.0.9.1/24");
        let e = route(&a, &c, "efa").unwrap_err();
        assert!(e.note.contains("EFA does not cross subnets"), "{e}");
        assert!(route(&a, &b, "^all").is_err());
    }

    #[test]
    fn ipv6_subnets() {
        let a = full(0, "h1", "fd00:0:0:1::5/64");
        let b = full(1, "h2", "fd00:0:0:1::6/64");
        let r = route(&a, &b, "all").unwrap();
        assert_eq!(r.to_string(), "fabric: same subnet fd00:0:0:1::/64");
        let c = full(2, "h3", "fd00:0:0:2::6/64");
        assert_eq!(route(&a, &c, "all").unwrap().transport, Transport::Ip);
    }

    #[test]
    fn mixed_v4_v6_are_different_subnets() {
        let a = full(0, "h1", "10.0.1.5/24");
        let b = full(1, "h2", "fd00::6/24");
        let r = route(&a, &b, "all").unwrap();
        assert_eq!(r.transport, Transport::Ip);
        assert!(matches!(r.reason, RouteReason::DifferentSubnets { .. }));
    }

    #[test]
    fn no_common_transport() {
        let a = Card {
            rank: 0,
            host_id: "h1".into(),
            endpoints: vec![ep(Transport::Fabric, "efa")],
            fabric_subnet: net("10.0.1.1/24"),
            ip_subnet: None,
            process: Default::default(),
        };
        let b = Card {
            rank: 1,
            host_id: "h2".into(),
            endpoints: vec![ep(Transport::Ip, "tcp")],
            fabric_subnet: None,
            ip_subnet: net("10.0.1.2/24"),
            process: Default::default(),
        };
        let e = route(&a, &b, "all").unwrap_err();
        assert_eq!(e.note, "");
        assert_eq!(
            e.to_string(),
            "no route from rank 0 to rank 1: this rank offers [fabric], the peer [ip], EFA_TRANSPORTS allows [shm,fabric,ip]"
        );
        // Both IP but different providers.
        let mut c = b.clone();
        c.rank = 2;
        c.endpoints[0].provider = "udp".into();
        let e = route(&b, &c, "all").unwrap_err();
        assert!(e.note.contains("ip providers differ (tcp vs udp)"), "{e}");
    }

    #[test]
    fn self_route() {
        let a = full(3, "h1", "10.0.1.5/24");
        let r = route(&a, &a, "all").unwrap();
        assert_eq!(
            (r.transport, r.reason.clone()),
            (Transport::Shm, RouteReason::SelfLoop)
        );
        let only_fabric = Card {
            endpoints: vec![ep(Transport::Fabric, "efa")],
            fabric_subnet: None,
            ..a.clone()
        };
        // Even with the subnet unknown, a rank reaches itself over its own fabric endpoint.
        assert_eq!(
            route(&only_fabric, &only_fabric, "all").unwrap().transport,
            Transport::Fabric
        );
        assert_eq!(route(&a, &a, "tcp").unwrap().transport, Transport::Ip);
        assert!(route(&only_fabric, &only_fabric, "shm").is_err());
    }

    #[test]
    fn route_table() {
        let me = full(0, "h1", "10.0.1.5/24");
        let cards = vec![
            me.clone(),
            full(1, "h1", "10.0.1.6/24"),
            full(2, "h2", "10.0.1.7/24"),
            full(3, "h3", "10.0.2.7/24"),
        ];
        let ts: Vec<Transport> = choose_routes(&me, &cards, &TransportSet::all())
            .into_iter()
            .map(|r| r.unwrap().transport)
            .collect();
        assert_eq!(
            ts,
            [
                Transport::Shm,
                Transport::Shm,
                Transport::Fabric,
                Transport::Ip
            ]
        );
    }

    /// Small deterministic generator (xorshift64*), so property tests need no extra crate.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    fn random_card(rng: &mut Rng, rank: u32) -> Card {
        let subnets = [
            None,
            net("10.0.1.9/24"),
            net("10.0.1.200/24"),
            net("10.0.2.1/24"),
            net("10.0.1.9/16"),
            net("fd00::1/64"),
            net("fd00::2/64"),
            net("fd00:0:0:1::1/64"),
        ];
        let providers = ["shm", "efa", "verbs;ofi_rxm", "tcp", "udp"];
        let mut endpoints = Vec::new();
        for _ in 0..rng.below(5) {
            let t = Transport::ALL[rng.below(3) as usize];
            let p = providers[rng.below(providers.len() as u64) as usize];
            endpoints.push(EndpointCard {
                transport: t,
                provider: p.into(),
                addr: (0..rng.below(40)).map(|_| rng.next() as u8).collect(),
            });
        }
        Card {
            rank,
            host_id: format!("host{}", rng.below(3)),
            endpoints,
            fabric_subnet: subnets[rng.below(subnets.len() as u64) as usize],
            ip_subnet: subnets[rng.below(subnets.len() as u64) as usize],
            process: Default::default(),
        }
    }

    #[test]
    fn route_choice_is_symmetric() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let mut counts = [0usize; 4];
        for i in 0..20_000 {
            let ra = rng.below(3) as u32;
            let a = random_card(&mut rng, ra);
            let b = if i % 10 == 0 {
                a.clone()
            } else {
                let rb = rng.below(3) as u32;
                random_card(&mut rng, rb)
            };
            let allowed = TransportSet {
                bits: (rng.below(8) as u8) << 1,
            };
            let ab = choose_route(&a, &b, &allowed);
            let ba = choose_route(&b, &a, &allowed);
            match (&ab, &ba) {
                (Ok(x), Ok(y)) => {
                    assert_eq!(x.transport, y.transport, "{a:?}\n{b:?}\n{allowed}");
                    assert!(allowed.contains(x.transport));
                    assert_eq!(a.endpoints[x.local_endpoint].transport, x.transport);
                    assert_eq!(b.endpoints[x.peer_endpoint].transport, x.transport);
                    assert_eq!(
                        a.endpoints[x.local_endpoint].provider,
                        b.endpoints[x.peer_endpoint].provider
                    );
                    if x.transport == Transport::Shm {
                        assert_eq!(a.host_id, b.host_id);
                    }
                    counts[x.transport.code() as usize] += 1;
                }
                (Err(_), Err(_)) => counts[0] += 1,
                _ => panic!("asymmetric: {ab:?} vs {ba:?}\n{a:?}\n{b:?}\n{allowed}"),
            }
        }
        // The generator reaches every outcome, so the property is not vacuous.
        assert!(counts.iter().all(|&c| c > 100), "{counts:?}");
    }

    #[test]
    fn card_roundtrip() {
        let mut rng = Rng(42);
        for i in 0..500 {
            let c = random_card(&mut rng, i);
            let b = c.encode().unwrap();
            assert_eq!(Card::decode(&b).unwrap(), c);
        }
        let c = full(7, "boot/netns:4026531840", "fd00::1/64");
        let b = c.encode().unwrap();
        assert_eq!(&b[..4], b"EFC\x02");
        assert_eq!(Card::decode(&b).unwrap(), c);
    }

    #[test]
    fn card_decode_rejects_every_truncation() {
        let mut rng = Rng(7);
        for i in 0..200 {
            let c = random_card(&mut rng, i);
            let b = c.encode().unwrap();
            for cut in 0..b.len() {
                match Card::decode(&b[..cut]) {
                    Err(CardError::Truncated { .. }) => {}
                    other => panic!("cut {cut}/{}: {other:?}", b.len()),
                }
            }
        }
    }

    #[test]
    fn card_decode_survives_random_corruption() {
        let mut rng = Rng(99);
        let mut errors = 0;
        for i in 0..2000 {
            let c = random_card(&mut rng, i);
            let mut b = c.encode().unwrap();
            for _ in 0..1 + rng.below(4) {
                let at = rng.below(b.len() as u64) as usize;
                b[at] = rng.next() as u8;
            }
            // Must not panic; a result that decodes must re-encode to the same bytes.
            match Card::decode(&b) {
                Ok(d) => assert_eq!(d.encode().unwrap(), b),
                Err(_) => errors += 1,
            }
        }
        assert!(errors > 0);
    }

    #[test]
    fn card_decode_errors() {
        let b = full(1, "h", "10.0.0.1/8").encode().unwrap();
        let mut bad = b.clone();
        bad[0] = b'X';
        assert_eq!(Card::decode(&bad), Err(CardError::BadMagic));
        let mut bad = b.clone();
        bad[3] = 9;
        assert_eq!(Card::decode(&bad), Err(CardError::UnsupportedVersion(9)));
        let mut bad = b.clone();
        bad.push(0);
        assert_eq!(Card::decode(&bad), Err(CardError::TrailingBytes(1)));
        // Fabric subnet family byte sits right after the host id.
        let fam = 4 + 4 + 2 + 1;
        let mut bad = b.clone();
        bad[fam] = 5;
        assert!(matches!(Card::decode(&bad), Err(CardError::Corrupt(_))));
        let mut bad = b.clone();
        bad[fam + 5] = 33; // prefix of the IPv4 fabric subnet
        assert!(matches!(Card::decode(&bad), Err(CardError::Corrupt(_))));
        let long = Card {
            host_id: "x".repeat(70_000),
            ..full(1, "h", "10.0.0.1/8")
        };
        assert!(matches!(
            long.encode(),
            Err(CardError::FieldTooLong {
                field: "host_id",
                ..
            })
        ));
    }

    #[test]
    fn host_id_composition() {
        assert_eq!(
            compose_host_id(None, "8d2c-11\n", "net:[4026531840]"),
            "8d2c-11/netns:4026531840"
        );
        assert_eq!(compose_host_id(Some(" mine "), "b", "net:[1]"), "mine");
        assert_eq!(compose_host_id(Some(""), "b", "net:[1]"), "b/netns:1");
        assert_ne!(
            compose_host_id(None, "b", "net:[1]"),
            compose_host_id(None, "b", "net:[2]")
        );
    }

    #[test]
    fn host_id_reads_proc() {
        if std::env::var_os("EFA_HOST_ID").is_some() {
            eprintln!("EFA_HOST_ID is set; checking the override only");
        }
        let id = host_id().expect("/proc is readable on Linux");
        assert!(!id.is_empty());
        if std::env::var_os("EFA_HOST_ID").is_none() {
            assert!(id.contains("/netns:"), "{id}");
            assert_eq!(id, host_id().unwrap());
        }
    }

    /// The card table gives back every card as published (interned strings, shared
    /// subnets, empty fields, no endpoint), in less memory than the cards.
    #[test]
    fn card_table_round_trips_compactly() {
        let subnet: Subnet = "10.0.1.0/24".parse().unwrap();
        let cards: Vec<Card> = (0..300u32)
            .map(|r| Card {
                rank: r,
                host_id: format!("host-{}", r / 100),
                endpoints: match r % 3 {
                    0 => vec![],
                    1 => vec![ep(Transport::Shm, "shm")],
                    _ => vec![
                        EndpointCard {
                            transport: Transport::Fabric,
                            provider: "efa".into(),
                            addr: vec![r as u8; (r % 40) as usize],
                        },
                        ep(Transport::Ip, "tcp;ofi_rxm"),
                    ],
                },
                fabric_subnet: (r % 2 == 0).then_some(subnet),
                ip_subnet: (r % 5 == 0).then(|| format!("192.168.{}.0/24", r % 7).parse().unwrap()),
                process: ProcessId {
                    pid: r * 3,
                    start: u64::from(r) << 20,
                    host: if r % 4 == 0 {
                        String::new()
                    } else {
                        format!("node{}", r / 100)
                    },
                },
            })
            .collect();
        let t = CardTable::new(&cards).unwrap();
        assert_eq!(t.len(), cards.len());
        for (r, c) in cards.iter().enumerate() {
            let r = r as u32;
            assert_eq!(t.card(r).as_ref(), Some(c));
            assert_eq!(t.process(r).as_ref(), Some(&c.process));
            assert_eq!(t.pid(r), c.process.pid);
            for (i, e) in c.endpoints.iter().enumerate() {
                assert_eq!(t.addr_of(r, i), Some(e.addr.as_slice()));
            }
            assert_eq!(t.addr_of(r, c.endpoints.len()), None);
            assert!(t.same_host(r, (r / 100) * 100));
            assert_eq!(t.same_host(r, 299), r >= 200);
        }
        assert_eq!(t.card(300), None);
        assert!(!t.same_host(0, 300));
        let as_cards: usize = cards
            .iter()
            .map(|c| {
                std::mem::size_of::<Card>()
                    + c.host_id.capacity()
                    + c.process.host.capacity()
                    + c.endpoints
                        .iter()
                        .map(|e| {
                            std::mem::size_of::<EndpointCard>()
                                + e.provider.capacity()
                                + e.addr.capacity()
                        })
                        .sum::<usize>()
            })
            .sum();
        assert!(
            t.heap_bytes() * 3 < as_cards,
            "table {} bytes against {as_cards} for the cards",
            t.heap_bytes()
        );
    }
}

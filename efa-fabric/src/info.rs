//! Discovery: `fi_getinfo(3)` with a hints builder, and the capabilities and limits of each
//! result.

use std::ffi::{CStr, CString};
use std::fmt;
use std::ptr::{self, NonNull};

use bitflags::bitflags;
use efa_ffi as ffi;

use crate::error::{check_int, Result};

bitflags! {
    /// Primary and secondary capabilities (`fi_getinfo(3)`, `caps`).
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub struct Caps: u64 {
        /// Send/receive messages.
        const MSG = ffi::FI_MSG as u64;
        /// Remote memory access.
        const RMA = ffi::FI_RMA as u64;
        /// Tagged messages.
        const TAGGED = ffi::FI_TAGGED as u64;
        /// Atomics.
        const ATOMIC = ffi::FI_ATOMIC as u64;
        /// Multicast.
        const MULTICAST = ffi::FI_MULTICAST as u64;
        /// Collective offload.
        const COLLECTIVE = ffi::FI_COLLECTIVE as u64;
        /// Initiate reads.
        const READ = ffi::FI_READ as u64;
        /// Initiate writes.
        const WRITE = ffi::FI_WRITE as u64;
        /// Send messages.
        const SEND = ffi::FI_SEND as u64;
        /// Receive messages.
        const RECV = ffi::FI_RECV as u64;
        /// Target of remote reads.
        const REMOTE_READ = ffi::FI_REMOTE_READ as u64;
        /// Target of remote writes.
        const REMOTE_WRITE = ffi::FI_REMOTE_WRITE as u64;
        /// Multi-receive buffers.
        const MULTI_RECV = ffi::FI_MULTI_RECV as u64;
        /// Completion data with sends and writes.
        const REMOTE_CQ_DATA = ffi::FI_REMOTE_CQ_DATA as u64;
        /// Counter/CQ events on the target of RMA.
        const RMA_EVENT = ffi::FI_RMA_EVENT as u64;
        /// Source address reported with completions.
        const SOURCE = ffi::FI_SOURCE;
        /// Intra-node and inter-node communication both supported.
        const LOCAL_COMM = ffi::FI_LOCAL_COMM;
        /// Inter-node communication.
        const REMOTE_COMM = ffi::FI_REMOTE_COMM;
        /// Device (GPU) memory.
        const HMEM = ffi::FI_HMEM;
        /// Directed receive (receive from a given source only).
        const DIRECTED_RECV = ffi::FI_DIRECTED_RECV as u64;
    }
}

bitflags! {
    /// Memory registration modes (`fi_mr(3)`, `mr_mode`).
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub struct MrMode: u32 {
        /// Local buffers used in data transfers must be registered, and their descriptor passed.
        const LOCAL = ffi::FI_MR_LOCAL;
        /// Raw keys (exchanged with `fi_mr_raw_attr`).
        const RAW = ffi::FI_MR_RAW;
        /// Remote addresses are virtual addresses, not offsets.
        const VIRT_ADDR = ffi::FI_MR_VIRT_ADDR;
        /// Registered memory must be backed by allocated pages.
        const ALLOCATED = ffi::FI_MR_ALLOCATED;
        /// The provider chooses the key.
        const PROV_KEY = ffi::FI_MR_PROV_KEY;
        /// Registration must be refreshed if the mapping changes.
        const MMU_NOTIFY = ffi::FI_MR_MMU_NOTIFY;
        /// Regions are bound to an endpoint and enabled before use.
        const ENDPOINT = ffi::FI_MR_ENDPOINT;
        /// Device memory must be registered.
        const HMEM = ffi::FI_MR_HMEM;
    }
}

impl MrMode {
    /// Every mode this crate implements; requested in hints so that providers needing any of
    /// them are not filtered out.
    pub const SUPPORTED: MrMode = MrMode::LOCAL
        .union(MrMode::VIRT_ADDR)
        .union(MrMode::ALLOCATED)
        .union(MrMode::PROV_KEY)
        .union(MrMode::ENDPOINT);
}

bitflags! {
    /// Operational mode bits the provider requires of the application (`fi_getinfo(3)`, `mode`).
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub struct Mode: u64 {
        /// Each operation's context must point to a `struct fi_context`.
        const CONTEXT = ffi::FI_CONTEXT;
        /// Each operation's context must point to a `struct fi_context2`.
        const CONTEXT2 = ffi::FI_CONTEXT2;
        /// Remote CQ data consumes a posted receive.
        const RX_CQ_DATA = ffi::FI_RX_CQ_DATA;
        /// Local memory must be registered (old-style `FI_LOCAL_MR`).
        const LOCAL_MR = 1 << 55;
        /// Message prefix space is required.
        const MSG_PREFIX = ffi::FI_MSG_PREFIX;
    }
}

impl Mode {
    /// Mode bits this crate can honour: every operation context begins with a
    /// `struct fi_context2`, which also satisfies `FI_CONTEXT`.
    pub const SUPPORTED: Mode = Mode::CONTEXT.union(Mode::CONTEXT2);
}

bitflags! {
    /// Message ordering guarantees (`fi_endpoint(3)`, `msg_order`).
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub struct MsgOrder: u64 {
        /// Send after send.
        const SAS = ffi::FI_ORDER_SAS as u64;
        /// Read after read.
        const RAR = ffi::FI_ORDER_RAR as u64;
        /// Read after write.
        const RAW = ffi::FI_ORDER_RAW as u64;
        /// Write after read.
        const WAR = ffi::FI_ORDER_WAR as u64;
        /// Write after write.
        const WAW = ffi::FI_ORDER_WAW as u64;
    }
}

/// Endpoint type (`fi_endpoint(3)`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EpType {
    /// Reliable datagram, connectionless (the type this crate's endpoints use).
    Rdm,
    /// Reliable connected.
    Msg,
    /// Unreliable datagram.
    Dgram,
    /// Any other value.
    Other(u32),
}

impl EpType {
    fn raw(self) -> ffi::fi_ep_type {
        match self {
            EpType::Rdm => ffi::FI_EP_RDM,
            EpType::Msg => ffi::FI_EP_MSG,
            EpType::Dgram => ffi::FI_EP_DGRAM,
            EpType::Other(v) => v as ffi::fi_ep_type,
        }
    }
    fn from_raw(v: ffi::fi_ep_type) -> Self {
        match v {
            ffi::FI_EP_RDM => EpType::Rdm,
            ffi::FI_EP_MSG => EpType::Msg,
            ffi::FI_EP_DGRAM => EpType::Dgram,
            v => EpType::Other(v as u32),
        }
    }
}

/// Threading level (`fi_domain(3)`).
///
/// The safe objects of this crate always request [`Threading::Safe`], which is why they are
/// `Send + Sync`; see the crate docs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Threading {
    /// Not specified.
    Unspec,
    /// The provider serializes all access (`FI_THREAD_SAFE`).
    Safe,
    /// Access to each fid is serialized by the application (`FI_THREAD_FID`).
    Fid,
    /// Access to each domain is serialized by the application (`FI_THREAD_DOMAIN`).
    Domain,
    /// Completion objects are serialized by the application (`FI_THREAD_COMPLETION`).
    Completion,
    /// Endpoint access is serialized by the application (`FI_THREAD_ENDPOINT`).
    Endpoint,
    /// Any other value.
    Other(u32),
}

impl Threading {
    fn raw(self) -> ffi::fi_threading {
        match self {
            Threading::Unspec => ffi::FI_THREAD_UNSPEC,
            Threading::Safe => ffi::FI_THREAD_SAFE,
            Threading::Fid => ffi::FI_THREAD_FID,
            Threading::Domain => ffi::FI_THREAD_DOMAIN,
            Threading::Completion => ffi::FI_THREAD_COMPLETION,
            Threading::Endpoint => ffi::FI_THREAD_ENDPOINT,
            Threading::Other(v) => v as ffi::fi_threading,
        }
    }
    fn from_raw(v: ffi::fi_threading) -> Self {
        match v {
            ffi::FI_THREAD_UNSPEC => Threading::Unspec,
            ffi::FI_THREAD_SAFE => Threading::Safe,
            ffi::FI_THREAD_FID => Threading::Fid,
            ffi::FI_THREAD_DOMAIN => Threading::Domain,
            ffi::FI_THREAD_COMPLETION => Threading::Completion,
            ffi::FI_THREAD_ENDPOINT => Threading::Endpoint,
            v => Threading::Other(v as u32),
        }
    }
}

/// Progress model (`fi_domain(3)`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Progress {
    /// Not specified.
    Unspec,
    /// The provider progresses operations on its own.
    Auto,
    /// Operations progress only while the application reads CQs or calls into the provider.
    Manual,
    /// Any other value.
    Other(u32),
}

impl Progress {
    fn raw(self) -> ffi::fi_progress {
        match self {
            Progress::Unspec => ffi::FI_PROGRESS_UNSPEC,
            Progress::Auto => ffi::FI_PROGRESS_AUTO,
            Progress::Manual => ffi::FI_PROGRESS_MANUAL,
            Progress::Other(v) => v as ffi::fi_progress,
        }
    }
    fn from_raw(v: ffi::fi_progress) -> Self {
        match v {
            ffi::FI_PROGRESS_UNSPEC => Progress::Unspec,
            ffi::FI_PROGRESS_AUTO => Progress::Auto,
            ffi::FI_PROGRESS_MANUAL => Progress::Manual,
            v => Progress::Other(v as u32),
        }
    }
}

/// Address format (`fi_getinfo(3)`, `addr_format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AddrFormat {
    /// Not specified.
    Unspec,
    /// `struct sockaddr_in`.
    SockaddrIn,
    /// `struct sockaddr_in6`.
    SockaddrIn6,
    /// Any `struct sockaddr`.
    Sockaddr,
    /// InfiniBand address (verbs).
    SockaddrIb,
    /// Provider-specific string (`fi_addr_str` format, e.g. shm names).
    Str,
    /// EFA's raw address.
    Efa,
    /// Any other value.
    Other(u32),
}

impl AddrFormat {
    fn raw(self) -> u32 {
        match self {
            AddrFormat::Unspec => ffi::FI_FORMAT_UNSPEC as u32,
            AddrFormat::SockaddrIn => ffi::FI_SOCKADDR_IN as u32,
            AddrFormat::SockaddrIn6 => ffi::FI_SOCKADDR_IN6 as u32,
            AddrFormat::Sockaddr => ffi::FI_SOCKADDR as u32,
            AddrFormat::SockaddrIb => ffi::FI_SOCKADDR_IB as u32,
            AddrFormat::Str => ffi::FI_ADDR_STR as u32,
            AddrFormat::Efa => ffi::FI_ADDR_EFA as u32,
            AddrFormat::Other(v) => v,
        }
    }
    fn from_raw(v: u32) -> Self {
        [
            AddrFormat::Unspec,
            AddrFormat::SockaddrIn,
            AddrFormat::SockaddrIn6,
            AddrFormat::Sockaddr,
            AddrFormat::SockaddrIb,
            AddrFormat::Str,
            AddrFormat::Efa,
        ]
        .into_iter()
        .find(|f| f.raw() == v)
        .unwrap_or(AddrFormat::Other(v))
    }
}

/// What to ask `fi_getinfo` for. Every field is optional; unset fields leave the choice to the
/// provider.
///
/// Defaults (from [`Hints::new`]): endpoint type RDM, caps `MSG | TAGGED`, threading
/// `FI_THREAD_SAFE`, every MR mode this crate implements ([`MrMode::SUPPORTED`]) and the
/// context modes it honours ([`Mode::SUPPORTED`]).
#[derive(Debug, Clone)]
pub struct Hints {
    caps: Caps,
    ep_type: EpType,
    provider: Option<String>,
    fabric: Option<String>,
    domain: Option<String>,
    mr_mode: MrMode,
    mode: Mode,
    threading: Threading,
    progress: Option<Progress>,
    msg_order: Option<MsgOrder>,
    addr_format: Option<AddrFormat>,
    node: Option<String>,
    service: Option<String>,
    source: bool,
}

impl Default for Hints {
    fn default() -> Self {
        Self::new()
    }
}

impl Hints {
    /// Hints with the defaults described on [`Hints`].
    pub fn new() -> Self {
        Hints {
            caps: Caps::MSG | Caps::TAGGED,
            ep_type: EpType::Rdm,
            provider: None,
            fabric: None,
            domain: None,
            mr_mode: MrMode::SUPPORTED,
            mode: Mode::SUPPORTED,
            threading: Threading::Safe,
            progress: None,
            msg_order: None,
            addr_format: None,
            node: None,
            service: None,
            source: false,
        }
    }
    /// Required capabilities. Default `MSG | TAGGED`.
    pub fn caps(mut self, caps: Caps) -> Self {
        self.caps = caps;
        self
    }
    /// Endpoint type. Default RDM, the only type this crate's endpoints open.
    pub fn ep_type(mut self, t: EpType) -> Self {
        self.ep_type = t;
        self
    }
    /// Provider name, as `fi_info -p` takes it (`shm`, `tcp;ofi_rxm`, `verbs;ofi_rxm`, `efa`).
    /// Default: any provider.
    pub fn provider(mut self, name: impl Into<String>) -> Self {
        self.provider = Some(name.into());
        self
    }
    /// Fabric name (for IP providers, the subnet such as `127.0.0.1/32`). Default: any.
    pub fn fabric(mut self, name: impl Into<String>) -> Self {
        self.fabric = Some(name.into());
        self
    }
    /// Domain name (for IP providers, the interface such as `lo`; for verbs, the device such
    /// as `rxe0`). Default: any. This is how to pin a provider to one interface: results on
    /// other domains are dropped (libfabric's utility providers would otherwise return them).
    pub fn domain(mut self, name: impl Into<String>) -> Self {
        self.domain = Some(name.into());
        self
    }
    /// MR modes the application supports. Default [`MrMode::SUPPORTED`]; narrowing it filters
    /// out providers that need the removed modes.
    pub fn mr_mode(mut self, m: MrMode) -> Self {
        self.mr_mode = m;
        self
    }
    /// Mode bits the application supports. Default [`Mode::SUPPORTED`].
    pub fn mode(mut self, m: Mode) -> Self {
        self.mode = m;
        self
    }
    /// Threading level. Default [`Threading::Safe`]; the safe objects of this crate rely on it.
    pub fn threading(mut self, t: Threading) -> Self {
        self.threading = t;
        self
    }
    /// Data progress model. Default: the provider's choice.
    pub fn progress(mut self, p: Progress) -> Self {
        self.progress = Some(p);
        self
    }
    /// Required message ordering. Default: none required.
    pub fn msg_order(mut self, o: MsgOrder) -> Self {
        self.msg_order = Some(o);
        self
    }
    /// Address format. Default: the provider's choice.
    pub fn addr_format(mut self, f: AddrFormat) -> Self {
        self.addr_format = Some(f);
        self
    }
    /// Local node (address or host name) to bind to, passed to `fi_getinfo` with `FI_SOURCE`.
    /// This pins IP and verbs providers to the interface that owns the address.
    pub fn source_node(mut self, node: impl Into<String>) -> Self {
        self.node = Some(node.into());
        self.source = true;
        self
    }
    /// Service (port) that goes with [`Hints::source_node`]. Default: any.
    pub fn service(mut self, service: impl Into<String>) -> Self {
        self.service = Some(service.into());
        self
    }

    /// The provider name asked for, if any.
    pub fn provider_name(&self) -> Option<&str> {
        self.provider.as_deref()
    }

    /// Runs `fi_getinfo(3)` and returns every matching entry, best first (libfabric's order).
    ///
    /// # Errors
    /// `fi_getinfo` with `FI_ENODATA` (-61) when nothing matches: no provider of that name,
    /// or no provider meets the caps / modes / interface asked for. `fi_info -p NAME -v`
    /// shows what a provider offers.
    pub fn get(&self) -> Result<Vec<Info>> {
        let cstr = |field: &'static str, s: &Option<String>| {
            s.as_deref()
                .map(|s| {
                    CString::new(s).map_err(|_| crate::Error::InvalidHint {
                        field,
                        value: s.to_owned(),
                    })
                })
                .transpose()
        };
        let prov = cstr("provider", &self.provider)?;
        let fabric = cstr("fabric", &self.fabric)?;
        let domain = cstr("domain", &self.domain)?;
        let node = cstr("node", &self.node)?;
        let service = cstr("service", &self.service)?;
        // SAFETY: fi_allocinfo returns a zeroed fi_info with attribute structs allocated (or
        // null, checked). The strings we store are strdup'd so that fi_freeinfo can free them.
        // fi_getinfo only reads the hints; the returned list is owned by us and freed below
        // after each entry has been duplicated.
        unsafe {
            let hints = ffi::fi_allocinfo();
            // fi_allocinfo returns NULL only when calloc fails.
            let hints = NonNull::new(hints).ok_or_else(|| crate::error::CallError {
                call: "fi_allocinfo",
                code: ffi::FI_ENOMEM as i32,
                text: crate::error::strerror(ffi::FI_ENOMEM as i32),
            })?;
            let h = hints.as_ptr();
            (*h).caps = self.caps.bits();
            (*h).mode = self.mode.bits();
            (*(*h).ep_attr).type_ = self.ep_type.raw();
            (*(*h).domain_attr).mr_mode = self.mr_mode.bits() as i32;
            (*(*h).domain_attr).threading = self.threading.raw();
            if let Some(p) = self.progress {
                set_data_progress(&mut *(*h).domain_attr, p.raw());
                (*(*h).domain_attr).control_progress = p.raw();
            }
            if let Some(o) = self.msg_order {
                (*(*h).tx_attr).msg_order = o.bits();
                (*(*h).rx_attr).msg_order = o.bits();
            }
            if let Some(f) = self.addr_format {
                (*h).addr_format = f.raw();
            }
            if let Some(p) = &prov {
                (*(*h).fabric_attr).prov_name = libc::strdup(p.as_ptr());
            }
            if let Some(f) = &fabric {
                (*(*h).fabric_attr).name = libc::strdup(f.as_ptr());
            }
            if let Some(d) = &domain {
                (*(*h).domain_attr).name = libc::strdup(d.as_ptr());
            }
            let mut list: *mut ffi::fi_info = ptr::null_mut();
            let ret = ffi::fi_getinfo(
                ffi::FI_HEADER_VERSION,
                node.as_ref().map_or(ptr::null(), |c| c.as_ptr()),
                service.as_ref().map_or(ptr::null(), |c| c.as_ptr()),
                if self.source { ffi::FI_SOURCE } else { 0 },
                h,
                &mut list,
            );
            ffi::fi_freeinfo(h);
            check_int("fi_getinfo", ret)?;
            let mut out = Vec::new();
            let mut cur = list;
            while !cur.is_null() {
                let next = (*cur).next;
                (*cur).next = ptr::null_mut();
                let dup = ffi::fi_dupinfo(cur);
                (*cur).next = next;
                if let Some(dup) = NonNull::new(dup) {
                    out.push(Info { raw: dup });
                }
                cur = next;
            }
            ffi::fi_freeinfo(list);
            // Utility providers (ofi_rxm, ofi_rxd) treat fabric and domain names in hints as
            // a preference, not a filter; apply them strictly so that pinning to an
            // interface (domain "lo") really pins.
            if let Some(d) = &self.domain {
                out.retain(|i| &i.domain() == d);
            }
            if let Some(f) = &self.fabric {
                out.retain(|i| &i.fabric() == f);
            }
            if out.is_empty() {
                return Err(crate::error::CallError {
                    call: "fi_getinfo",
                    code: ffi::FI_ENODATA as i32,
                    text: format!(
                        "{} (no result on fabric {:?} / domain {:?})",
                        crate::error::strerror(ffi::FI_ENODATA as i32),
                        self.fabric,
                        self.domain
                    ),
                }
                .into());
            }
            Ok(out)
        }
    }
}

/// One `fi_getinfo` result: a provider, fabric and domain with its capabilities and limits.
///
/// Owns a private copy (`fi_dupinfo`) of the entry, which is only read after creation.
pub struct Info {
    raw: NonNull<ffi::fi_info>,
}

// SAFETY: `Info` exclusively owns its fi_info copy and never mutates it after construction;
// fi_info is plain data (strings and attribute structs), so sharing references across threads
// and moving it between threads is sound.
unsafe impl Send for Info {}
// SAFETY: see above: all access after construction is read-only.
unsafe impl Sync for Info {}

impl Clone for Info {
    fn clone(&self) -> Self {
        // SAFETY: self.raw is a valid fi_info with next == null; fi_dupinfo deep-copies it.
        let dup = unsafe { ffi::fi_dupinfo(self.raw.as_ptr()) };
        Info {
            raw: NonNull::new(dup).expect("fi_dupinfo: out of memory"),
        }
    }
}

impl Drop for Info {
    fn drop(&mut self) {
        // SAFETY: we own this fi_dupinfo result (its `next` is null) and free it once.
        unsafe { ffi::fi_freeinfo(self.raw.as_ptr()) }
    }
}

fn opt_str(p: *const std::os::raw::c_char) -> String {
    if p.is_null() {
        String::new()
    } else {
        // SAFETY: libfabric strings in fi_info are NUL-terminated and live as long as the info.
        unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
    }
}

/// True for providers that run over IP (`tcp`, `udp`, `sockets`, `net`, alone or under a
/// utility provider such as `ofi_rxm`): they need an interface or address to be pinned to,
/// and their addresses are `sockaddr`s. The one place this question is answered.
pub fn is_ip_provider(provider: &str) -> bool {
    matches!(core_provider(provider), "tcp" | "udp" | "sockets" | "net")
}

/// The core provider of a provider name as [`Info::provider`] gives it: `tcp` for
/// `tcp;ofi_rxm`, the name itself when no utility provider is layered over it.
pub fn core_provider(provider: &str) -> &str {
    provider.split(';').next().unwrap_or(provider)
}

impl Info {
    /// Raw pointer for the libfabric calls that take an info (valid while `self` lives).
    pub(crate) fn as_ptr(&self) -> *mut ffi::fi_info {
        self.raw.as_ptr()
    }

    fn raw(&self) -> &ffi::fi_info {
        // SAFETY: raw points to a valid fi_info owned by self.
        unsafe { self.raw.as_ref() }
    }
    fn fabric_attr(&self) -> &ffi::fi_fabric_attr {
        // SAFETY: fi_getinfo results always carry a fabric_attr, valid while the info lives.
        unsafe { &*self.raw().fabric_attr }
    }
    fn domain_attr(&self) -> &ffi::fi_domain_attr {
        // SAFETY: as above, domain_attr is always present in results.
        unsafe { &*self.raw().domain_attr }
    }
    fn ep_attr(&self) -> &ffi::fi_ep_attr {
        // SAFETY: as above, ep_attr is always present in results.
        unsafe { &*self.raw().ep_attr }
    }
    fn tx_attr(&self) -> &ffi::fi_tx_attr {
        // SAFETY: as above, tx_attr is always present in results.
        unsafe { &*self.raw().tx_attr }
    }
    fn rx_attr(&self) -> &ffi::fi_rx_attr {
        // SAFETY: as above, rx_attr is always present in results.
        unsafe { &*self.raw().rx_attr }
    }

    /// Provider name as `fi_info` prints it, e.g. `tcp;ofi_rxm`.
    pub fn provider(&self) -> String {
        opt_str(self.fabric_attr().prov_name)
    }
    /// Fabric name (IP providers: the subnet, e.g. `127.0.0.1/32`).
    pub fn fabric(&self) -> String {
        opt_str(self.fabric_attr().name)
    }
    /// Domain name (IP providers: the interface, e.g. `lo`; verbs: the device).
    pub fn domain(&self) -> String {
        opt_str(self.domain_attr().name)
    }
    /// Provider version as (major, minor).
    pub fn provider_version(&self) -> (u32, u32) {
        let v = self.fabric_attr().prov_version;
        (v >> 16, v & 0xffff)
    }
    /// Endpoint type.
    pub fn ep_type(&self) -> EpType {
        EpType::from_raw(self.ep_attr().type_)
    }
    /// Capabilities offered.
    pub fn caps(&self) -> Caps {
        Caps::from_bits_retain(self.raw().caps)
    }
    /// Mode bits the provider requires.
    pub fn mode(&self) -> Mode {
        Mode::from_bits_retain(self.raw().mode)
    }
    /// MR modes the provider requires.
    pub fn mr_mode(&self) -> MrMode {
        MrMode::from_bits_retain(self.domain_attr().mr_mode as u32)
    }
    /// Size in bytes of MR keys (0: keys are not limited).
    pub fn mr_key_size(&self) -> usize {
        self.domain_attr().mr_key_size
    }
    /// Threading level.
    pub fn threading(&self) -> Threading {
        Threading::from_raw(self.domain_attr().threading)
    }
    /// Data progress model.
    pub fn progress(&self) -> Progress {
        Progress::from_raw(data_progress(self.domain_attr()))
    }
    /// Address format.
    pub fn addr_format(&self) -> AddrFormat {
        AddrFormat::from_raw(self.raw().addr_format)
    }
    /// Largest single message the endpoint carries.
    pub fn max_msg_size(&self) -> usize {
        self.ep_attr().max_msg_size
    }
    /// Largest message that `fi_inject` accepts.
    pub fn inject_size(&self) -> usize {
        self.tx_attr().inject_size
    }
    /// Maximum iov entries per send.
    pub fn iov_limit(&self) -> usize {
        self.tx_attr().iov_limit
    }
    /// Maximum RMA iov entries.
    pub fn rma_iov_limit(&self) -> usize {
        self.tx_attr().rma_iov_limit
    }
    /// Bytes of remote CQ data per message (0: none).
    pub fn cq_data_size(&self) -> usize {
        self.domain_attr().cq_data_size
    }
    /// Bits usable in tags (0 when the provider does not say).
    pub fn mem_tag_format(&self) -> u64 {
        self.ep_attr().mem_tag_format
    }
    /// Transmit queue depth.
    pub fn tx_size(&self) -> usize {
        self.tx_attr().size
    }
    /// Receive queue depth.
    pub fn rx_size(&self) -> usize {
        self.rx_attr().size
    }
    /// Send-after-send and other orderings on the transmit side.
    pub fn msg_order(&self) -> MsgOrder {
        MsgOrder::from_bits_retain(self.tx_attr().msg_order)
    }
    /// Source address the endpoint would bind to, if the provider reports one.
    pub fn src_addr(&self) -> Option<Vec<u8>> {
        let r = self.raw();
        if r.src_addr.is_null() || r.src_addrlen == 0 {
            return None;
        }
        // SAFETY: src_addr points to src_addrlen bytes owned by the info.
        Some(unsafe { std::slice::from_raw_parts(r.src_addr as *const u8, r.src_addrlen) }.to_vec())
    }
    /// The source address as an IP socket address, for IP-based providers.
    pub fn src_sockaddr(&self) -> Option<std::net::SocketAddr> {
        crate::addr::sockaddr_from_bytes(&self.src_addr()?)
    }
}

impl fmt::Debug for Info {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Info")
            .field("provider", &self.provider())
            .field("fabric", &self.fabric())
            .field("domain", &self.domain())
            .field("ep_type", &self.ep_type())
            .field("caps", &self.caps())
            .field("mode", &self.mode())
            .field("mr_mode", &self.mr_mode())
            .field("max_msg_size", &self.max_msg_size())
            .field("inject_size", &self.inject_size())
            .field("progress", &self.progress())
            .field("threading", &self.threading())
            .finish()
    }
}

impl fmt::Display for Info {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} fabric={} domain={} {:?}",
            self.provider(),
            self.fabric(),
            self.domain(),
            self.ep_type()
        )
    }
}

/// libfabric 2.x moved `data_progress` into a union with its new alias `progress`.
#[cfg(fi_v2)]
fn data_progress(a: &ffi::fi_domain_attr) -> ffi::fi_progress {
    // SAFETY: both union members are the same enum type; reading either is valid.
    unsafe { a.__bindgen_anon_1.data_progress }
}
#[cfg(not(fi_v2))]
fn data_progress(a: &ffi::fi_domain_attr) -> ffi::fi_progress {
    a.data_progress
}
#[cfg(fi_v2)]
fn set_data_progress(a: &mut ffi::fi_domain_attr, p: ffi::fi_progress) {
    a.__bindgen_anon_1.data_progress = p;
}
#[cfg(not(fi_v2))]
fn set_data_progress(a: &mut ffi::fi_domain_attr, p: ffi::fi_progress) {
    a.data_progress = p;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ip_providers_alone_and_under_utility_providers() {
        for p in ["tcp", "tcp;ofi_rxm", "udp;ofi_rxd", "sockets", "net", "udp"] {
            assert!(is_ip_provider(p), "{p}");
        }
        for p in [
            "shm",
            "efa",
            "verbs;ofi_rxm",
            "psm3",
            "",
            "tcpx",
            "ofi_rxm;tcp",
        ] {
            assert!(!is_ip_provider(p), "{p}");
        }
    }

    #[test]
    fn core_provider_is_the_first_layer() {
        for (name, core) in [
            ("tcp;ofi_rxm", "tcp"),
            ("udp;ofi_rxd", "udp"),
            ("shm", "shm"),
            ("", ""),
        ] {
            assert_eq!(core_provider(name), core, "{name}");
        }
    }
}

//! Safe libfabric objects for efa-rs: fabric, domain, endpoint, address vector, completion
//! queue, counter and memory region, with plain and tagged messaging and RMA, on any provider
//! (`efa`, `verbs;ofi_rxm`, `tcp;ofi_rxm`, `udp;ofi_rxd`, `shm`, ...).
//!
//! # Quick start
//! ```no_run
//! use std::time::Duration;
//! use efa_fabric::{Caps, Endpoint, Hints};
//!
//! # fn main() -> efa_fabric::Result<()> {
//! let info = Hints::new().provider("tcp;ofi_rxm").domain("lo").get()?.remove(0);
//! let a = Endpoint::open(&info)?;
//! let b = Endpoint::open(&info)?;
//! let b_addr = a.av().insert(&b.name()?)?;
//! let a_addr = b.av().insert(&a.name()?)?;
//! let recv = b.trecv(vec![0u8; 5], a_addr, 7, 0)?;
//! let send = a.tsend(b"hello".to_vec(), b_addr, 7)?;
//! send.wait(Duration::from_secs(5))?;
//! let done = recv.wait(Duration::from_secs(5))?;
//! assert_eq!(&done.buf[..done.len], b"hello");
//! # Ok(()) }
//! ```
//!
//! # Layers
//! `efa-ffi` has the raw bindings; this crate is the only one that owns libfabric objects and
//! the only one with `unsafe` code above the bindings. Every `unsafe` block says why it is
//! sound in a `// SAFETY:` comment.
//!
//! # Resource cleanup
//! Every object is a cheap handle over an `Arc`; each keeps alive the objects it was created
//! from (a domain its fabric; AVs, CQs, counters and MRs their domain; an endpoint its domain,
//! AV, CQs and counters). So objects are closed in the order fabtests uses (endpoint, CQs,
//! counters, MRs, AV, domain, fabric) without anyone managing it. `fi_close` is called once
//! per object, in `Drop`, and a failure is logged with `tracing::error!`, never a panic.
//!
//! `shm` endpoints also own a region in `/dev/shm`. It is created mode 0600 and checked. It
//! is unlinked when the endpoint closes, or by an `atexit` handler if the endpoint is never
//! closed. Regions left by killed processes are reclaimed when the next `shm` endpoint on
//! the host opens. See [`shm`].
//!
//! # Thread safety
//! Domains are always opened with `FI_THREAD_SAFE` (set by [`Hints::new`]; the provider
//! serializes access to every object internally). That is why every handle is `Send + Sync`
//! and several threads may post and poll the same endpoint and CQ. A completion is delivered
//! to its operation's [`OpContext`] by whichever thread reads the CQ.
//!
//! # Buffers in flight
//! The `unsafe fn post_*` calls on [`Endpoint`] state exactly how long the buffer must stay
//! valid. The safe calls ([`Endpoint::send`], [`Endpoint::trecv`], [`Endpoint::write`], ...)
//! take ownership of the buffer and return it when the completion has been reaped; dropping
//! an unfinished operation cancels it and drains its completion first. See [`op`]. RMA on
//! borrowed memory runs in an [`rma_scope`], drained before the borrows end.
//!
//! # Memory registration
//! Every MR mode the providers ask for is honoured: `FI_MR_LOCAL` (buffers without their own
//! registration are registered for the duration of the operation; use [`RegisteredBuf`] to
//! avoid that cost), `FI_MR_VIRT_ADDR`, `FI_MR_ALLOCATED`, `FI_MR_PROV_KEY` and
//! `FI_MR_ENDPOINT`, plus the `FI_CONTEXT`/`FI_CONTEXT2` modes. A registration that fails
//! under a finite `ulimit -l` reports [`Error::MemlockLimit`] with the limit's value.
//!
//! A [`MemoryRegion<O>`](MemoryRegion) holds the memory it describes (an owned buffer, or a
//! `&[T]` / `&mut [T]` borrow), is not `Clone`, and deregisters before it gives the memory
//! back ([`MemoryRegion::into_inner`]), so safe code can neither free registered memory nor
//! keep a region past it (the compile-fail tests in `tests/compile_fail` prove the misuses do
//! not compile). Memory peers may write is never lent out as `&[T]`: [`RegisteredBuf`]
//! (which derefs to `[u8]`) refuses remote write access, and [`TargetBuf`] copies in and out.
//!
//! # Borrowed memory: zero-copy rendezvous (RGET)
//! [`Endpoint::expose`] registers a borrowed buffer for remote read for the borrow's length
//! and gives the (address, key, length) to send to the peer; the peer reads it straight into
//! its own borrowed buffer with [`Endpoint::read_into`] or, for several operations at once,
//! inside an [`rma_scope`], which drains every operation before the borrows end (also on
//! panic; the scope cannot be leaked, so `mem::forget` cannot end a borrow early).
//! [`rget_threshold`] gives the measured size from which this beats a copy, per provider.
//!
//! # Registration cache
//! Registration per call is what the borrowed-memory API does. Measured here
//! (`examples/rget_sweep.rs`), `fi_mr_regattr` + `fi_close` costs 0.2-0.5 µs on shm, tcp and
//! udp at every size from 8 KiB to 4 MiB: those providers pin nothing, so no cache is
//! needed. On verbs and efa registration pins pages: on the soft-RoCE device of the CI VM,
//! `verbs;ofi_rxm` takes 100-800 µs per registration from 8 KiB to 4 MiB with
//! `FI_MR_CACHE_MONITOR=disabled`, and 4-8 µs (30 µs for a first registration) with
//! libfabric's MR cache, which already serves `fi_mr_regattr` there (verbs: whenever the
//! domain has a memory monitor; efa: `FI_EFA_MR_CACHE_ENABLE`, on by default). Its monitor
//! (`FI_MR_CACHE_MONITOR`: userfaultfd by default, or memhooks) invalidates entries when the
//! memory is unmapped or freed, which a cache in this crate could not see (a `Vec` freed and
//! reallocated at the same address would hit a stale registration). So this crate keeps no
//! cache of its own and relies on libfabric's: size it with `FI_MR_CACHE_MAX_COUNT` (default
//! 1024 regions; 0 disables it) and `FI_MR_CACHE_MAX_SIZE` (default: memory / cores / 2).
//! Note that a cached registration outlives our `fi_close` and is made with every access
//! right, so a key stays usable by peers until the cache evicts it; peers of a job only use
//! keys as the protocol says, and no local Rust reference is affected either way.
//!
//! # Library dependency
//! Needs libfabric >= 1.17 headers and library; see `efa-ffi` for how it is found.
//! Man pages: `fi_getinfo(3)`, `fi_domain(3)`, `fi_endpoint(3)`, `fi_av(3)`, `fi_cq(3)`,
//! `fi_cntr(3)`, `fi_mr(3)`, `fi_msg(3)`, `fi_tagged(3)`, `fi_rma(3)`.
#![deny(missing_docs)]
// bindgen gives libfabric's constants different integer types in 1.17 and 2.x headers; the
// casts that are no-ops on one version are needed on the other.
#![allow(clippy::unnecessary_cast)]

mod addr;
pub mod av;
pub mod cntr;
pub mod cq;
pub mod ep;
pub mod error;
pub mod fabric;
pub mod info;
pub mod mr;
pub mod op;
pub mod progress;
mod remote;
pub mod shm;

pub use av::{AddressVector, FiAddr};
pub use cntr::{Counter, CounterEvents};
pub use cq::{Completion, CompletionQueue, CqWait, OpContext};
pub use ep::{Endpoint, EndpointBuilder, PeerCheck};
pub use error::{CallError, CompletionError, Error, Result, ShmProblem, SizeLimit};
pub use fabric::{Domain, Fabric};
pub use info::{
    core_provider, is_ip_provider, AddrFormat, Caps, EpType, Hints, Info, Mode, MrMode, MsgOrder,
    Progress, Threading,
};
pub use mr::{
    Access, AlignedBuf, BufPrefix, IoBuf, IoBufMut, MemoryRegion, RawMemory, RegMemory,
    RegMemoryMut, RegisteredBuf, RemoteRegion, SharedSlice, TargetBuf,
};
pub use op::{rget_threshold, rma_scope, Done, Exposed, OpError, Pending, RmaScope, ScopedId};
pub use progress::{
    block_on, idle_mode, set_idle_mode, Backoff, Deadline, IdleMode, PollClock, Woken,
};

/// The libfabric version linked at run time, as (major, minor).
pub fn libfabric_version() -> (u32, u32) {
    // SAFETY: fi_version takes no arguments and returns a number.
    let v = unsafe { efa_ffi::fi_version() };
    (v >> 16, v & 0xffff)
}

//! `efa-core`: the communicator that users see.
//!
//! # Quick start
//! ```no_run
//! use efa_core::{Communicator, Source, Tag};
//!
//! # fn main() -> efa_core::Result<()> {
//! let comm = Communicator::init()?; // under efarun, mpirun, srun or torchrun
//! let (me, n) = (comm.rank(), comm.size());
//! let next = (me + 1) % n;
//! let prev = (me + n - 1) % n;
//! let mine = [me as u64; 4];
//! let req = comm.isend(&mine, next, 7)?; // borrows `mine` until it completes
//! let mut got = [0u64; 4];
//! let status = comm.recv(&mut got, Source::Any, Tag::Is(7))?;
//! req.wait()?;
//! assert_eq!(status.source, prev);
//! println!("route to {next}: {}", comm.route(next)?.reason);
//! # Ok(()) }
//! ```
//! Run it with `efarun -n 4 ./prog` on one machine, or `mpirun -n 64 ./prog` /
//! `srun -n 64 ./prog` across machines (set `EFA_STORE=host:port` or `file:///shared/dir`
//! where the launcher gives no rendezvous, see [`bootstrap`]).
//!
//! # Configuration
//! `EFA_TRANSPORTS` (`shm,fabric,ip`, or e.g. `^shm`) restricts the transports; `EFA_IFACE`
//! pins the IP route's interface; `EFA_FABRIC_ADDR` pins the fabric endpoint to one local
//! address (hosts whose fabric interface has several); `EFA_TIMEOUT` (seconds, default 60)
//! is the deadline of every blocking call; the collectives read `EFA_ALLREDUCE_ALGO`,
//! `EFA_COLL_RING_MIN`, `EFA_COLL_CHUNK`, `EFA_COLL_WINDOW` and `EFA_COLL_CHECK` (see
//! [`CollConfig::from_env`]). A bad value is an [`Error::Setting`] naming the variable, the
//! value and the accepted forms.
//!
//! # Logging
//! `EFA_DEBUG=info|debug|trace` prints bootstrap, the provider and route chosen for every
//! peer and why, and failures, to stderr (or `EFA_DEBUG_FILE`), each line prefixed with
//! `[efa rank R host:pid]`, with no code in the application. It installs a `tracing`
//! subscriber only if the application has none when the communicator is built; see
//! [`debug`] for the rule and `EFA_DEBUG_SUBSYS`. An application with its own subscriber
//! enables the `efa_core` and `efa_fabric` targets in it instead.
//!
//! # Errors
//! Every [`Error`] says what happened and what to do; its `Debug` form, which `main`
//! prints when it returns the error, adds the causes and a hint (see [`error`]).
//!
//! # Thread safety
//! [`Communicator`] is `Send + Sync` and cheap to clone; calls from several threads are
//! serialized by one lock around the progress engine (which also progresses every endpoint
//! together).
//!
//! # Resource cleanup
//! [`Communicator::finalize`] (or dropping the last clone, which does the same, best
//! effort) first makes sure that every message the API reported as sent has reached its
//! peer, then closes the endpoints (through `efa-fabric`'s ownership rules). Finalizing
//! or dropping a sub-communicator ([`Communicator::dup`], [`Communicator::split`]) releases
//! only it; the endpoints close with the world (see [`Communicator`]).
//!
//! # Failures
//! A rank that learns that a peer is gone (its pid vanished on this host, the transport
//! refuses every message to it, it called [`Communicator::abort`] or panicked, or a deadline
//! passed) tells every rank it can still reach; their pending and later operations fail
//! with [`Error::PeerFailed`] naming it and the cause.
//!
//! Requests that are dropped are cancelled (receives) or detached (sends); the drop rule of
//! every request kind is in one table, [`comm`'s Requests](comm#requests). The NIC never
//! writes into user memory, so nothing can be written after a buffer is freed.
//! Each shm endpoint's region in `/dev/shm` is unlinked when its endpoint closes, or at
//! process exit if it never closes. Regions that killed processes left are reclaimed when
//! the next shm endpoint on the host opens (see `efa_fabric::shm`).
//!
//! Bootstrap under common launchers, per-peer placement (shm on the same host, the fabric on
//! the same subnet, IP across subnets), tagged point-to-point messaging, RMA windows and
//! collectives, all built from `efa-fabric` objects.
//!
//! The fabric-independent pieces live here as plain modules:
//!
//! * [`bootstrap`]: rank, world size and rendezvous from the launcher's environment
//!   (`efarun`, Open MPI, MPICH Hydra, Slurm, torchrun) or given explicitly.
//! * [`store`]: the rendezvous key-value store (TCP, shared directory, in-process).
//! * [`bootstrap::exchange_all`] and [`bootstrap::barrier`]: one blob from every rank, and a
//!   barrier, over any store.
//! * [`placement`]: [`placement::Card`]s and the pure per-peer route choice.
//! * [`roles`]: which provider, domain and source address serve each role (shm, fabric,
//!   IP), as one pure function over what one discovery call found; the communicator and
//!   `efa info` both use it.
//!
//! The `efarun` launcher (crate `efarun`: `cargo install --path efarun`) starts N local
//! ranks with the bootstrap variables set and serves their TCP store for the lifetime of the
//! job.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod bootstrap;
pub mod coll;
pub mod comm;
pub mod debug;
pub mod error;
mod fastbox;
#[doc(hidden)]
pub mod fuzz;
pub mod net;
pub mod placement;
pub(crate) mod proto;
mod provider_env;
mod rma;
pub mod roles;
mod setting;
pub mod store;
mod tag;
pub mod wait;
pub mod window;
pub mod wire;

pub use coll::{
    Algorithm, CollConfig, CollError, CollRequest, Element, LocOp, ReduceOp, Reduction, UserOp,
    ValueIndex,
};
pub use comm::{
    AnyRequest, Communicator, CommunicatorBuilder, Config, Message, P2pRequest, RecvRequest,
    Request, SendRequest, Source, Status, Tag,
};
pub use error::{Error, ErrorClass, Malformed, PeerFailure, Result, SettingError, SettingSource};
pub use placement::Transport;
pub use wait::WaitPolicy;
pub use window::{RmaOp, RmaRequest, Window, WindowAccess};

/// The element bound of every buffer argument (`&[T]` with `T: Pod`), re-exported so that
/// users need not depend on a matching `bytemuck`.
pub use bytemuck::Pod;
/// The half-precision element types of the collectives ([`Element`]), re-exported so that
/// users need not depend on a matching `half`.
pub use half::{bf16, f16};

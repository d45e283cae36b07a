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
//! let req = comm.isend(&[me as u64; 4], next, 7)?;
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
//! is the deadline of every blocking call. `RUST_LOG=efa_core=debug` logs the route and
//! provider chosen for every peer, and why.
//!
//! # Thread safety
//! [`Communicator`] is `Send + Sync` and cheap to clone; calls from several threads are
//! serialized by one lock around the progress engine (which also progresses every endpoint
//! together).
//!
//! # Resource cleanup
//! Dropping the last clone closes the endpoints (through `efa-fabric`'s ownership rules).
//! Requests that are dropped are cancelled (receives) or detached (sends); the NIC never
//! writes into user memory, so nothing can be written after a buffer is freed.
//!
//! Bootstrap under common launchers, per-peer placement (shm on the same host, the fabric on
//! the same subnet, IP across subnets), tagged point-to-point messaging, RMA windows and
//! collectives, all built from `efa-fabric` objects.
//!
//! The fabric-independent pieces live here as plain modules:
//!
//! * [`bootstrap`]: rank, world size and rendezvous from the launcher's environment
//!   (`efarun`, Open MPI, MPICH Hydra, Slurm, torchrun) or given explicitly.
//! * [`store`]: the rendezvous key-value store (TCP, shared directory, in-process) and
//!   [`store::exchange_all`], which collects one blob from every rank.
//! * [`placement`]: [`placement::Card`]s and the pure per-peer route choice.
//!
//! The `efarun` binary starts N local ranks with the bootstrap variables set and serves their
//! TCP store for the lifetime of the job.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod bootstrap;
pub mod coll;
pub mod comm;
pub mod error;
#[doc(hidden)]
pub mod fuzz;
pub mod net;
pub mod placement;
pub mod store;
pub mod window;
pub mod wire;

pub use coll::{Algorithm, CollConfig, CollRequest, Element, ReduceOp};
pub use comm::{
    Communicator, CommunicatorBuilder, Config, RecvRequest, Request, SendRequest, Source, Status,
    Tag,
};
pub use error::{Error, Result};
pub use placement::Transport;
pub use window::{RmaOp, RmaRequest, Window, WindowAccess};

//! RMA windows: one-sided put and get into registered memory of other ranks.
//!
//! [`Communicator::window`] is collective: every rank allocates `len` elements, registers
//! them with the endpoint of every route it uses, and sends each peer the descriptor
//! (address, key, length, access) of the registration that peer reaches it through.
//!
//! # Completion and visibility
//! - [`Window::put`] / [`Window::get`] return when the operation has completed locally: the
//!   source buffer of a put may be reused, the destination of a get holds the data.
//! - [`Window::flush`]`(peer)` returns when every put this rank issued to `peer` has been
//!   written into `peer`'s memory (it waits for local completions, then reads from the
//!   target through the same connection, which is ordered after the writes).
//! - The target sees the data after a synchronisation: [`Window::fence`] (collective:
//!   flush everything, then a barrier), or a notification from [`Window::put_notify`],
//!   whose remote CQ data is delivered after the data itself.
//!
//! # Safety of memory
//! The NIC never touches user buffers: puts read from a copy, gets land in memory the
//! window owns and are copied out on completion. A rank's own window memory is never lent
//! out as a slice: peers may write it at any moment (after a fence, a peer may start the
//! next epoch's puts at once, and nothing local can stop it), so a `&[T]` over it would be
//! a data race in safe Rust. It is copied out with [`Window::read_local`] /
//! [`Window::local_to_vec`] and in with [`Window::write_local`] / [`Window::fill_local`]
//! (volatile copies through `efa_fabric::TargetBuf`). A window's own memory is released only by
//! [`Window::free`], which is collective (a fence first), so no peer can write into memory
//! that has gone back to the allocator. A window dropped without `free` keeps its memory
//! (and logs a warning) for the same reason.

use std::collections::HashMap;
use std::marker::PhantomData;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytemuck::Pod;
use efa_fabric::{Access, Endpoint, FiAddr, Pending, RemoteRegion, TargetBuf};

use crate::comm::{Communicator, Source};
use crate::error::{Error, Malformed, Result};
use crate::tag::window_tag;

pub use crate::rma::{RmaOp, WindowAccess};

const DESC_LEN: usize = RemoteRegion::WIRE_LEN + 1;

/// Reads `peer`'s window descriptor (remote region, then access code), checking that its
/// window has this rank's size in `bytes`.
///
/// # Errors
/// [`Error::MalformedMessage`] for a descriptor that does not parse (its source is the
/// fabric's parse error, if it found one); [`Error::WindowMismatch`] for another size.
fn parse_desc(peer: u32, d: &[u8], bytes: usize) -> Result<(RemoteRegion, WindowAccess)> {
    let region = d.get(..RemoteRegion::WIRE_LEN).unwrap_or(d);
    let remote = RemoteRegion::from_bytes(region).map_err(|e| Error::MalformedMessage {
        peer,
        what: Malformed::WindowRegion,
        source: Some(e),
    })?;
    let code = d.get(RemoteRegion::WIRE_LEN).copied().unwrap_or(0);
    let access = WindowAccess::from_code(code).ok_or(Error::MalformedMessage {
        peer,
        what: Malformed::WindowAccess { code },
        source: None,
    })?;
    if remote.len != bytes as u64 {
        return Err(Error::WindowMismatch {
            peer,
            peer_bytes: remote.len,
            bytes: bytes as u64,
        });
    }
    Ok((remote, access))
}

struct PeerWin {
    ep: Endpoint,
    addr: FiAddr,
    remote: RemoteRegion,
    access: WindowAccess,
}

enum Op {
    Put(Pending<Vec<u8>>),
    Get(Pending<Vec<u8>>),
}

struct Outstanding {
    next: u64,
    ops: HashMap<u64, (u32, Op)>,
}

/// A window of `T` elements on every rank. See the [module docs](self).
pub struct Window<T: Pod> {
    comm: Communicator,
    id: u32,
    len: usize,
    access: WindowAccess,
    peers: Vec<PeerWin>,
    outstanding: Mutex<Outstanding>,
    // Last: the memory outlives the operations above when dropped field by field.
    mem: Option<TargetBuf>,
    _t: PhantomData<T>,
}

impl<T: Pod> std::fmt::Debug for Window<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Window")
            .field("id", &self.id)
            .field("len", &self.len)
            .field("access", &self.access)
            .finish()
    }
}

/// A non-blocking put or get ([`Request`](crate::Request)). What dropping it does, and
/// why it cannot be cancelled: [Requests](crate::comm#requests).
#[derive(Debug)]
#[must_use = "an RMA request must be waited for"]
pub struct RmaRequest<'w, 'a, T: Pod> {
    win: &'w Window<T>,
    id: u64,
    peer: u32,
    out: Option<&'a mut [T]>,
}

impl Communicator {
    /// Creates a window of `len` zeroed elements on every rank (collective: every rank calls
    /// it, in the same order relative to other windows).
    ///
    /// # Errors
    /// [`Error::Setting`] when `len` elements of `T` do not fit in the address space (checked
    /// before anything is allocated or sent);
    /// [`Error::Fabric`] when registration fails ([`efa_fabric::Error::MemlockLimit`] names a
    /// too-low `ulimit -l`); [`Error::NoRma`] when a route's provider lacks RMA;
    /// [`Error::WindowMismatch`] when another rank created a window of another size;
    /// [`Error::MalformedMessage`] for a descriptor that does not parse;
    /// [`Error::Timeout`] when a peer does not create its window in time.
    pub fn window<T: Pod>(&self, len: usize, access: WindowAccess) -> Result<Window<T>> {
        Window::create(self, len, access)
    }
}

impl<T: Pod> Window<T> {
    fn create(comm: &Communicator, len: usize, access: WindowAccess) -> Result<Window<T>> {
        let esz = std::mem::size_of::<T>();
        let bytes = len
            .checked_mul(esz)
            .filter(|&b| b <= isize::MAX as usize)
            .ok_or_else(|| {
                crate::error::SettingError::argument(
                    "Communicator::window",
                    len.to_string(),
                    format!("elements of {esz} bytes do not fit in this address space"),
                    format!(
                        "at most {} elements of this type",
                        isize::MAX as usize / esz.max(1)
                    ),
                )
            })?;
        let id = comm.next_object_id();
        let ports = comm.port_endpoints();
        // Register the memory in every domain some peer is routed through.
        let mut mem: Option<TargetBuf> = None;
        let mut regions: HashMap<usize, RemoteRegion> = HashMap::new();
        for (i, (ep, used)) in ports.iter().enumerate() {
            if !used {
                continue;
            }
            if !ep.caps().contains(efa_fabric::Caps::RMA) {
                return Err(Error::NoRma {
                    provider: ep.info().provider(),
                });
            }
            let remote = match &mut mem {
                None => {
                    let b = TargetBuf::new(ep.domain(), bytes, access.fabric(), Some(ep))
                        .map_err(|e| Error::fabric("registering the window", None, e))?;
                    let r = b.remote();
                    mem = Some(b);
                    r
                }
                Some(b) => b
                    .register_in(ep.domain(), access.fabric() | Access::LOCAL, Some(ep))
                    .map_err(|e| Error::fabric("registering the window", None, e))?
                    .remote(),
            };
            regions.insert(i, remote);
        }
        // Tell each peer the registration it reaches us through; learn theirs.
        let tag = window_tag(id, 0);
        let n = comm.size();
        let mut descs = vec![[0u8; DESC_LEN]; n as usize];
        let mut recvs = Vec::new();
        for (p, d) in descs.iter_mut().enumerate() {
            recvs.push(comm.irecv_bytes(d, Source::Rank(p as u32), tag)?);
        }
        let mut sends = Vec::new();
        for p in 0..n {
            let (port, _, _) = comm.peer_endpoint(p)?;
            let mut d = [0u8; DESC_LEN];
            d[..RemoteRegion::WIRE_LEN].copy_from_slice(&regions[&port].to_bytes());
            d[RemoteRegion::WIRE_LEN] = access.code();
            sends.push(comm.isend_bytes(&d, p, tag)?);
        }
        for r in recvs {
            r.wait()?;
        }
        for s in sends {
            s.wait()?;
        }
        let mut peers = Vec::with_capacity(n as usize);
        for (p, d) in descs.iter().enumerate() {
            let (remote, access) = parse_desc(p as u32, d, bytes)?;
            let (_, ep, addr) = comm.peer_endpoint(p as u32)?;
            peers.push(PeerWin {
                ep,
                addr,
                remote,
                access,
            });
        }
        tracing::debug!(id, len, ?access, "window created");
        Ok(Window {
            comm: comm.clone(),
            id,
            len,
            access,
            peers,
            outstanding: Mutex::new(Outstanding {
                next: 1,
                ops: HashMap::new(),
            }),
            mem,
            _t: PhantomData,
        })
    }

    /// Elements per rank.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True for a zero-length window.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Copies `out.len()` elements of this rank's window memory, from element `offset`, into
    /// `out`. Peers may write the memory at any time during an access epoch; read it after
    /// a [`Window::fence`] or a notification for a consistent view (a concurrent put gives
    /// some mix of old and new bytes, as MPI leaves it undefined; never undefined
    /// behaviour). See [the module docs](self#safety-of-memory) for why this copies instead
    /// of lending a slice.
    ///
    /// # Errors
    /// [`Error::RmaOutOfBounds`] (op [`RmaOp::Get`], peer this rank) when the range is
    /// outside the window; nothing is copied.
    pub fn read_local(&self, offset: usize, out: &mut [T]) -> Result<()> {
        self.check_local(RmaOp::Get, offset, out.len())?;
        if out.is_empty() {
            return Ok(());
        }
        let esz = std::mem::size_of::<T>();
        let mem = self.mem.as_ref().expect("a non-empty window has memory");
        mem.read_local(offset * esz, bytemuck::cast_slice_mut(out))
            .map_err(|e| Error::fabric("read_local", None, e))
    }

    /// This rank's whole window memory, copied ([`Window::read_local`]).
    pub fn local_to_vec(&self) -> Vec<T> {
        let mut v = vec![T::zeroed(); self.len];
        self.read_local(0, &mut v)
            .expect("the whole window is in bounds");
        v
    }

    /// Copies `data` into this rank's window memory at element `offset`, for local
    /// initialisation (between fences). `&mut self`: no request of this window can be in
    /// flight meanwhile.
    ///
    /// # Errors
    /// [`Error::RmaOutOfBounds`] (op [`RmaOp::Put`], peer this rank) when the range is
    /// outside the window; nothing is copied.
    pub fn write_local(&mut self, offset: usize, data: &[T]) -> Result<()> {
        self.check_local(RmaOp::Put, offset, data.len())?;
        if data.is_empty() {
            return Ok(());
        }
        let esz = std::mem::size_of::<T>();
        let mem = self.mem.as_mut().expect("a non-empty window has memory");
        mem.write_local(offset * esz, bytemuck::cast_slice(data))
            .map_err(|e| Error::fabric("write_local", None, e))
    }

    /// Sets every element of this rank's window memory to `value` ([`Window::write_local`]).
    pub fn fill_local(&mut self, value: T) {
        let v = vec![value; self.len];
        self.write_local(0, &v)
            .expect("the whole window is in bounds");
    }

    fn check_local(&self, op: RmaOp, offset: usize, count: usize) -> Result<()> {
        if offset.checked_add(count).is_some_and(|end| end <= self.len) {
            return Ok(());
        }
        Err(Error::RmaOutOfBounds {
            op,
            peer: self.comm.rank(),
            offset,
            count,
            window_len: self.len,
        })
    }

    fn check(&self, op: RmaOp, peer: u32, offset: usize, count: usize) -> Result<(&PeerWin, u64)> {
        if peer >= self.comm.size() {
            return Err(Error::InvalidRank {
                rank: peer,
                size: self.comm.size(),
            });
        }
        let pw = &self.peers[peer as usize];
        if !pw.access.allows(op) {
            return Err(Error::RmaAccess {
                op,
                peer,
                access: pw.access,
            });
        }
        let esz = std::mem::size_of::<T>();
        let in_bounds = offset.checked_add(count).is_some_and(|end| end <= self.len);
        if !in_bounds {
            return Err(Error::RmaOutOfBounds {
                op,
                peer,
                offset,
                count,
                window_len: self.len,
            });
        }
        Ok((pw, (offset * esz) as u64))
    }

    fn track(&self, peer: u32, op: Op) -> u64 {
        let mut o = self.outstanding.lock().unwrap_or_else(|p| p.into_inner());
        let id = o.next;
        o.next += 1;
        o.ops.insert(id, (peer, op));
        id
    }

    /// Starts writing `data` into `peer`'s window at element `offset`.
    ///
    /// # Errors
    /// [`Error::RmaOutOfBounds`] (naming the window size) or [`Error::RmaAccess`] before
    /// anything is sent; fabric errors.
    pub fn iput(&self, peer: u32, offset: usize, data: &[T]) -> Result<RmaRequest<'_, '_, T>> {
        let (pw, off) = self.check(RmaOp::Put, peer, offset, data.len())?;
        let bytes = bytemuck::cast_slice::<T, u8>(data).to_vec();
        let p = pw
            .ep
            .write(bytes, pw.addr, &pw.remote, off)
            .map_err(|e| Error::fabric("put", Some(peer), e.error))?;
        let id = self.track(peer, Op::Put(p));
        Ok(RmaRequest {
            win: self,
            id,
            peer,
            out: None,
        })
    }

    /// Starts reading `out.len()` elements from `peer`'s window at `offset` into `out`.
    ///
    /// # Errors
    /// As [`Window::iput`].
    pub fn iget<'a>(
        &self,
        peer: u32,
        offset: usize,
        out: &'a mut [T],
    ) -> Result<RmaRequest<'_, 'a, T>> {
        let (pw, off) = self.check(RmaOp::Get, peer, offset, out.len())?;
        let p = pw
            .ep
            .read(
                vec![0u8; std::mem::size_of_val(out)],
                pw.addr,
                &pw.remote,
                off,
            )
            .map_err(|e| Error::fabric("get", Some(peer), e.error))?;
        let id = self.track(peer, Op::Get(p));
        Ok(RmaRequest {
            win: self,
            id,
            peer,
            out: Some(out),
        })
    }

    /// Writes `data` into `peer`'s window at element `offset` and waits for local completion.
    ///
    /// # Errors
    /// As [`Window::iput`], plus [`Error::Timeout`].
    pub fn put(&self, peer: u32, offset: usize, data: &[T]) -> Result<()> {
        self.iput(peer, offset, data)?.wait()
    }

    /// Reads from `peer`'s window at element `offset` into `out`.
    ///
    /// # Errors
    /// As [`Window::iput`], plus [`Error::Timeout`].
    pub fn get(&self, peer: u32, offset: usize, out: &mut [T]) -> Result<()> {
        self.iget(peer, offset, out)?.wait()
    }

    /// [`Window::put`] that also delivers `value` to `peer`, which receives `(source rank,
    /// value)` from [`Window::wait_notify`] once the data is in its memory.
    ///
    /// The notification travels as 32 bits of remote CQ data (what EFA and verbs carry):
    /// 16 for the source rank and 16 for `value`, so it needs ranks below 65536.
    ///
    /// # Errors
    /// As [`Window::put`]; [`Error::CqDataTooSmall`] when the route's provider carries less
    /// than 4 bytes of remote CQ data; [`Error::NotifyRank`] when this rank is 65536 or above.
    pub fn put_notify(&self, peer: u32, offset: usize, data: &[T], value: u16) -> Result<()> {
        let (pw, off) = self.check(RmaOp::Put, peer, offset, data.len())?;
        if pw.ep.info().cq_data_size() < 4 {
            return Err(Error::CqDataTooSmall {
                provider: pw.ep.info().provider(),
                bytes: pw.ep.info().cq_data_size(),
                needed: 4,
            });
        }
        let me = self.comm.rank();
        if me > u32::from(u16::MAX) {
            return Err(Error::NotifyRank {
                rank: me,
                limit: 1 << 16,
            });
        }
        let bytes = bytemuck::cast_slice::<T, u8>(data).to_vec();
        let cq_data = (u64::from(me) << 16) | u64::from(value);
        let p = pw
            .ep
            .writedata(bytes, cq_data, pw.addr, &pw.remote, off)
            .map_err(|e| Error::fabric("put_notify", Some(peer), e.error))?;
        let id = self.track(peer, Op::Put(p));
        RmaRequest {
            win: self,
            id,
            peer,
            out: None,
        }
        .wait()
    }

    /// Waits for a notification from [`Window::put_notify`]: `(source rank, value)`.
    ///
    /// # Errors
    /// [`Error::Timeout`] after the communicator's timeout.
    pub fn wait_notify(&self) -> Result<(u32, u16)> {
        let start = Instant::now();
        let mut waiter = self.comm.waiter();
        loop {
            let mut pending = self.notes().lock().unwrap_or_else(|p| p.into_inner());
            pending.extend(self.comm.take_notifications());
            if !pending.is_empty() {
                let d = pending.remove(0);
                return Ok((((d >> 16) & 0xFFFF) as u32, (d & 0xFFFF) as u16));
            }
            drop(pending);
            if start.elapsed() >= self.comm.timeout() {
                return Err(Error::Timeout {
                    op: "wait_notify",
                    peer: None,
                    waited: start.elapsed(),
                });
            }
            waiter.idle();
        }
    }

    fn notes(&self) -> &'static Mutex<Vec<u64>> {
        // Notifications are per process (CQ data does not say which window it belongs to).
        static NOTES: Mutex<Vec<u64>> = Mutex::new(Vec::new());
        &NOTES
    }

    /// Waits for every operation to `peer` (all peers if `None`) issued through this window.
    fn wait_outstanding(&self, peer: Option<u32>) -> Result<()> {
        let ids: Vec<(u64, u32)> = {
            let o = self.outstanding.lock().unwrap_or_else(|p| p.into_inner());
            o.ops
                .iter()
                .filter(|(_, (p, _))| peer.is_none_or(|x| x == *p))
                .map(|(id, (p, _))| (*id, *p))
                .collect()
        };
        let mut first = None;
        for (id, p) in ids {
            if let Err(e) = self.finish(id, p, None) {
                first.get_or_insert(e);
            }
        }
        first.map_or(Ok(()), Err)
    }

    /// Completes operation `id`, copying a get's data into `out`.
    fn finish(&self, id: u64, peer: u32, out: Option<&mut [T]>) -> Result<()> {
        let op = {
            let mut o = self.outstanding.lock().unwrap_or_else(|p| p.into_inner());
            o.ops.remove(&id)
        };
        let Some((_, op)) = op else {
            return Ok(()); // already completed by a flush
        };
        let timeout = self.comm.timeout();
        match op {
            Op::Put(p) => p
                .wait(timeout)
                .map(|_| ())
                .map_err(|e| rma_error("put", peer, e.error, timeout)),
            Op::Get(p) => {
                let d = p
                    .wait(timeout)
                    .map_err(|e| rma_error("get", peer, e.error, timeout))?;
                if let Some(out) = out {
                    bytemuck::cast_slice_mut::<T, u8>(out).copy_from_slice(&d.buf);
                }
                Ok(())
            }
        }
    }

    /// Returns when every put this rank issued to `peer` is in `peer`'s memory.
    ///
    /// # Errors
    /// The first failed operation's error; [`Error::Timeout`].
    pub fn flush(&self, peer: u32) -> Result<()> {
        if peer >= self.comm.size() {
            return Err(Error::InvalidRank {
                rank: peer,
                size: self.comm.size(),
            });
        }
        self.wait_outstanding(Some(peer))?;
        let pw = &self.peers[peer as usize];
        // A read through the same connection completes only after the earlier writes have
        // been placed at the target.
        if self.len > 0 && pw.access.allows(RmaOp::Get) {
            let p = pw
                .ep
                .read(vec![0u8; 1], pw.addr, &pw.remote, 0)
                .map_err(|e| Error::fabric("flush", Some(peer), e.error))?;
            p.wait(self.comm.timeout())
                .map_err(|e| rma_error("flush", peer, e.error, self.comm.timeout()))?;
        }
        Ok(())
    }

    /// [`Window::flush`] for every peer.
    ///
    /// # Errors
    /// As [`Window::flush`].
    pub fn flush_all(&self) -> Result<()> {
        for p in 0..self.comm.size() {
            self.flush(p)?;
        }
        Ok(())
    }

    /// Collective: completes every operation of every rank on this window, then synchronises,
    /// so that afterwards each rank sees all data written into its window before the fence.
    ///
    /// # Errors
    /// As [`Window::flush`]; [`Error::Timeout`] naming a rank that does not reach the fence.
    pub fn fence(&self) -> Result<()> {
        self.flush_all()?;
        let n = self.comm.size();
        let me = self.comm.rank();
        let tag = window_tag(self.id, 1);
        // Dissemination barrier: log2(n) rounds.
        let mut dist = 1;
        while dist < n {
            let to = (me + dist) % n;
            let from = (me + n - dist) % n;
            let mut token = [0u8; 1];
            let r = self.comm.irecv_bytes(&mut token, Source::Rank(from), tag)?;
            let s = self.comm.isend_bytes(&[1], to, tag)?;
            r.wait()?;
            s.wait()?;
            dist *= 2;
        }
        Ok(())
    }

    /// Collective: fences, then releases the window's memory. No peer can access it after.
    ///
    /// # Errors
    /// As [`Window::fence`]; on error the memory is kept (not freed).
    pub fn free(mut self) -> Result<()> {
        self.fence()?;
        drop(self.mem.take());
        Ok(())
    }
}

fn rma_error(op: &'static str, peer: u32, e: efa_fabric::Error, waited: Duration) -> Error {
    match e {
        efa_fabric::Error::Timeout { .. } => Error::Timeout {
            op,
            peer: Some(peer),
            waited,
        },
        other => Error::fabric(op, Some(peer), other),
    }
}

impl<T: Pod> Drop for Window<T> {
    fn drop(&mut self) {
        // Complete (or cancel and drain) our own operations first.
        let ops: Vec<_> = {
            let mut o = self.outstanding.lock().unwrap_or_else(|p| p.into_inner());
            o.ops.drain().collect()
        };
        drop(ops);
        if let Some(mem) = self.mem.take() {
            // Peers may still write into it: without the collective `free`, keep it.
            tracing::warn!(
                id = self.id,
                "window dropped without Window::free; its memory is kept until the process exits"
            );
            std::mem::forget(mem);
        }
    }
}

impl<T: Pod> RmaRequest<'_, '_, T> {
    /// Waits for local completion (a get's data is then in its buffer).
    ///
    /// # Errors
    /// The operation's error; [`Error::Timeout`] naming the peer.
    pub fn wait(mut self) -> Result<()> {
        let out = self.out.take();
        let r = self.win.finish(self.id, self.peer, out);
        self.id = 0;
        r
    }

    /// True once the operation has completed locally (progresses once).
    ///
    /// # Errors
    /// Fabric errors of the endpoint's progress (the operation's own error is reported by
    /// [`RmaRequest::wait`]).
    pub fn test(&mut self) -> Result<bool> {
        let o = self
            .win
            .outstanding
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        match o.ops.get(&self.id) {
            None => Ok(true),
            Some((_, Op::Put(p))) | Some((_, Op::Get(p))) => {
                self.win.peers[self.peer as usize]
                    .ep
                    .progress()
                    .map_err(|e| Error::fabric("progress", Some(self.peer), e))?;
                Ok(p.is_done())
            }
        }
    }
}

impl<T: Pod> crate::AnyRequest for RmaRequest<'_, '_, T> {
    fn test(&mut self) -> Result<bool> {
        RmaRequest::test(self)
    }
    /// An RMA operation cannot be recalled: once posted, the NIC may already have written
    /// the target's memory, and nothing would tell whether it did.
    fn cancel(&mut self) -> Result<bool> {
        Ok(false)
    }
}

impl<T: Pod> crate::Request for RmaRequest<'_, '_, T> {
    type Output = ();
    fn wait(self) -> Result<()> {
        RmaRequest::wait(self)
    }
}

impl<T: Pod> Drop for RmaRequest<'_, '_, T> {
    fn drop(&mut self) {
        if self.id != 0 {
            // Dropping the pending operation cancels and drains it.
            let op = self
                .win
                .outstanding
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .ops
                .remove(&self.id);
            drop(op);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::error::Error as _;

    use super::*;

    fn desc(len: u64, access: u8) -> Vec<u8> {
        let r = RemoteRegion {
            addr: 0x1000,
            key: 7,
            len,
        };
        let mut d = r.to_bytes().to_vec();
        d.push(access);
        d
    }

    #[test]
    fn descriptors_parse_or_name_what_is_wrong() {
        let (r, a) = parse_desc(1, &desc(64, WindowAccess::ReadWrite.code()), 64).unwrap();
        assert_eq!((r.len, a), (64, WindowAccess::ReadWrite));

        let e = parse_desc(2, &desc(64, 9), 64).unwrap_err();
        assert!(
            matches!(
                e,
                Error::MalformedMessage {
                    peer: 2,
                    what: Malformed::WindowAccess { code: 9 },
                    source: None
                }
            ),
            "{e:?}"
        );

        // A cut descriptor: the fabric's parse error is the source, not a string.
        let e = parse_desc(3, &desc(64, 1)[..10], 64).unwrap_err();
        assert!(
            matches!(
                &e,
                Error::MalformedMessage {
                    peer: 3,
                    what: Malformed::WindowRegion,
                    source: Some(efa_fabric::Error::RemoteRegionLength {
                        got: 10,
                        expected: RemoteRegion::WIRE_LEN
                    }),
                }
            ),
            "{e:?}"
        );
        let src = e.source().expect("the fabric error is the source");
        assert!(matches!(
            src.downcast_ref::<efa_fabric::Error>(),
            Some(efa_fabric::Error::RemoteRegionLength { got: 10, .. })
        ));
        let report = format!("{e:?}");
        assert!(
            report.contains("malformed window descriptor (its region does not parse) from rank 3")
                && report.contains("Caused by:\n    remote region descriptor is 10 bytes"),
            "{report}"
        );
        assert!(parse_desc(3, &[], 64).is_err(), "empty: an error, no panic");

        let e = parse_desc(4, &desc(80, 1), 64).unwrap_err();
        assert!(
            matches!(
                e,
                Error::WindowMismatch {
                    peer: 4,
                    peer_bytes: 80,
                    bytes: 64
                }
            ),
            "{e:?}"
        );
    }
}

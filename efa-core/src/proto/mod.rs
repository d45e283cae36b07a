//! The point-to-point protocol as a pure state machine: no I/O, no clock, no libfabric types
//! (in the manner of quinn-proto).
//!
//! [`Core`] takes events — the user posted a send, a receive, a probe or a cancel; a message
//! arrived from a peer ([`Core::on_message`]); an RMA read finished
//! ([`Core::read_done`], [`Core::read_failed`]); a peer failed ([`Core::peer_failed`]);
//! finalize asked ([`Core::send_fins`], [`Core::finalize_step`]) — and queues
//! [`Action`]s for an executor to carry out ([`Core::poll_action`]): send this control
//! message to that peer, hand this eager payload to that receive, read (addr, key, len)
//! from that peer into that receive, release that send's exposed buffer. The executor owns
//! every buffer and endpoint; the core owns the decisions. `efa-core`'s communicator is
//! such an executor ([`crate::comm`]); the simulator in this module's tests is another.
//!
//! # What it guarantees
//! - **Matching** (MPI 4.0 §3.5): a message is matched on (context id, source, tag); a
//!   receive takes the oldest queued message it accepts, and an arriving message the
//!   oldest posted receive that accepts it. `Source::Any` and `Tag::Any` are wildcards;
//!   `Tag::Any` never matches the reserved tags above [`MAX_USER_TAG`].
//! - **Non-overtaking**: every [`Kind::Eager`], [`Kind::Rts`] and [`Kind::Fin`] carries a
//!   per-(sender, receiver) sequence number; messages that arrive early (another transport,
//!   another carrier, completions reaped out of order) wait until their turn. So a
//!   receiver processes each sender's messages in the order they were sent, whatever the
//!   transport does.
//! - **Eager or rendezvous**: a payload up to the route's eager limit (given by the
//!   executor per send) travels with its header, if the sender holds an eager credit for
//!   the peer (see Flow control); anything else is announced by an RTS carrying the
//!   sender's exposed buffer (address and key). Once matched, the receiver reads the data
//!   (RGET) and answers [`Kind::Ack`], which completes the send.
//! - **Truncation** (MPI semantics): a message larger than the receive's capacity fails
//!   the receive with [`Outcome::Truncated`] and nothing is written; the send completes
//!   normally (a rendezvous is answered with an ACK flagged [`ACK_TRUNCATED`], no read).
//! - **Flow control**: each sender starts with [`Config::eager_credits`] eager credits per
//!   peer; an eager send spends one. The receiver returns credits ([`Kind::Credit`]) in
//!   batches of half that number as it consumes eager messages (a receive matched them, or
//!   they were discarded). Without a credit a small message goes by rendezvous, which
//!   queues only a header at the receiver. So a receiver never holds more than
//!   `eager_credits` unreceived eager payloads per sender, i.e. at most
//!   `eager_credits × eager limit` bytes per peer, however far a sender runs ahead.
//! - **Cancel and dropped receives**: a receive no message matched can be cancelled
//!   ([`Core::cancel_recv`]); a dropped receive ([`Core::drop_recv`]) is withdrawn, or, if
//!   its rendezvous read is under way, finished by the executor and then forgotten (an
//!   orphan), so its sender still completes.
//! - **Finalize**: [`Kind::Fin`] takes the next sequence number, so a peer processes it
//!   after every message sent before it; the peer answers [`Kind::FinAck`] once it reads
//!   nothing more from the sender.
//!
//! Request ids index slabs ([`slab::Slab`]); queues are `VecDeque`s that keep their
//! capacity: once warmed up, the small-message path allocates nothing.

#[cfg(test)]
mod sim;
pub(crate) mod slab;

use std::collections::VecDeque;

use crate::tag::{Source, Status, Tag, MAX_USER_TAG};
use crate::wire::{Header, Kind, ACK_READ_FAILED, ACK_TRUNCATED};
use slab::{Key, Slab};

/// A receive's id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RecvId(Key);
/// A send's id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SendId(Key);

impl RecvId {
    /// Index for tables kept alongside the core (below [`Core::recv_slots`]).
    pub fn index(self) -> usize {
        self.0.index()
    }
}
impl SendId {
    /// Index for tables kept alongside the core (below [`Core::send_slots`]).
    pub fn index(self) -> usize {
        self.0.index()
    }
}

/// A sender's exposed buffer, as an RTS announces it: the address RMA reads take for the
/// first byte, and the remote key (`fi_read(3)`'s `addr` and `key`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Remote {
    /// Address of byte 0.
    pub addr: u64,
    /// Remote key.
    pub key: u64,
}

/// What came with a message's header.
#[derive(Debug)]
pub enum Body<P> {
    /// An eager message's payload (the executor's handle to it; `header.len` bytes).
    Eager(P),
    /// An RTS's exposed buffer.
    Rts(Remote),
    /// Nothing (ACK, credit, FIN, FIN-ACK).
    Empty,
}

/// How an operation ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// A receive got this message (its data was handed over by [`Action::Deliver`] or read
    /// by [`Action::Read`]).
    Received(Status),
    /// A send completed (the receiver may have reported a truncation: only it is told).
    Sent,
    /// The message (`len` bytes from `src` with `tag`) is larger than the receive's
    /// `capacity`; nothing was written.
    Truncated {
        /// The receive's capacity in bytes.
        capacity: usize,
        /// The message's length in bytes.
        len: usize,
        /// Its sender.
        src: u32,
        /// Its tag.
        tag: u32,
    },
    /// Cancelled before a message matched it.
    Cancelled,
    /// A peer failed ([`Core::peer_failed`]); the executor knows which and how.
    PeerFailed,
    /// The source finalized without sending a matching message.
    PeerFinalized(u32),
    /// The rendezvous read between this rank and `peer` failed.
    TransferFailed(u32),
}

/// Why an operation could not start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PostError {
    /// A peer failed earlier.
    Failed,
    /// The destination finalized: it receives nothing more.
    PeerFinalized(u32),
    /// Too many requests in flight ([`slab::MAX_ENTRIES`]).
    TooMany,
}

/// A message the core cannot use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProtoError {
    /// From a rank outside the job.
    UnknownRank(u32),
    /// A kind the core does not handle (the executor handles failure notices and pings).
    NotForCore(Kind),
    /// An eager message without payload, or an RTS without a buffer.
    BodyMismatch(Kind),
}

/// What the executor should do.
#[derive(Debug)]
pub enum Action<P> {
    /// Send this header-only control message to `peer` ([`Kind::Ack`], [`Kind::Credit`],
    /// [`Kind::Fin`], [`Kind::FinAck`]). `Fin` and `FinAck` should be sent so that their
    /// local completion is known (not injected): finalize waits for them.
    Send {
        /// Destination rank.
        peer: u32,
        /// The header.
        header: Header,
    },
    /// Receive `recv` got an eager message: copy `len` bytes of `payload` into its
    /// buffer, then release the payload. The receive is complete.
    Deliver {
        /// The receive.
        recv: RecvId,
        /// The executor's payload handle.
        payload: P,
        /// Bytes.
        len: usize,
    },
    /// An eager payload nobody will receive (truncated): release it.
    Release(P),
    /// Read `len` bytes of `peer`'s exposed buffer `remote` into receive `recv`, then
    /// call [`Core::read_done`] or [`Core::read_failed`]. May be started later, but must
    /// be finished or failed eventually (the sender waits for the ACK).
    Read {
        /// The receive.
        recv: RecvId,
        /// The sender.
        peer: u32,
        /// Its exposed buffer.
        remote: Remote,
        /// Bytes.
        len: usize,
    },
    /// The send's exposed buffer is no longer read by anyone: release it.
    Unexpose(SendId),
    /// A peer failed: give up the read of `recv` without waiting for it.
    AbandonRead(RecvId),
}

/// How a send travels ([`Core::post_send`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Header and payload in one message: send `header` followed by the data. The send is
    /// already complete.
    Eager,
    /// Expose the data (keep it readable by the peer until [`Action::Unexpose`]) and send
    /// `header` followed by the exposed buffer's [`Remote`].
    Rendezvous,
}

/// A started send: what the executor sends now.
#[derive(Debug, Clone, Copy)]
pub struct SendStart {
    /// The send's id.
    pub id: SendId,
    /// Its header (sequence number set).
    pub header: Header,
    /// Eager or rendezvous.
    pub mode: Mode,
}

/// Protocol settings.
#[derive(Debug, Clone, Copy)]
pub struct Config {
    /// Eager messages a sender may have unreceived at one peer (see Flow control in the
    /// module docs). Default 64. Larger lets a sender run further ahead without
    /// rendezvous; each credit may hold an eager-limit-sized payload at the receiver.
    pub eager_credits: u32,
}

impl Default for Config {
    fn default() -> Self {
        Config { eager_credits: 64 }
    }
}

/// A message that no receive has taken yet.
#[derive(Debug)]
pub struct Message<P> {
    ctx: u32,
    src: u32,
    tag: u32,
    /// Place in the order of arrival (for [`Core::requeue`]).
    arrival: u64,
    data: Data<P>,
}

#[derive(Debug)]
enum Data<P> {
    Eager {
        payload: P,
        len: usize,
    },
    Rts {
        len: usize,
        rndv: u32,
        remote: Remote,
    },
}

impl<P> Message<P> {
    /// Its sender, tag and length in bytes.
    pub fn status(&self) -> Status {
        Status {
            source: self.src,
            tag: self.tag,
            len: self.len(),
        }
    }
    fn len(&self) -> usize {
        match &self.data {
            Data::Eager { len, .. } | Data::Rts { len, .. } => *len,
        }
    }
    fn accepted_by(&self, ctx: u32, src: Source, tag: Tag) -> bool {
        matches(ctx, src, tag, self.ctx, self.src, self.tag)
    }
}

/// Whether a receive on (`want_ctx`, `want_src`, `want_tag`) accepts a message on
/// (`ctx`, `src`, `tag`). Other contexts never match, wildcards included; `Tag::Any` never
/// matches a reserved tag.
pub fn matches(
    want_ctx: u32,
    want_src: Source,
    want_tag: Tag,
    ctx: u32,
    src: u32,
    tag: u32,
) -> bool {
    want_ctx == ctx
        && match want_src {
            Source::Any => true,
            Source::Rank(r) => r == src,
        }
        && match want_tag {
            Tag::Any => tag <= MAX_USER_TAG,
            Tag::Is(t) => t == tag,
        }
}

#[derive(Debug)]
enum Ordered<P> {
    Msg(Message<P>),
    Fin,
}

#[derive(Debug, Default, Clone, Copy)]
struct FinState {
    got_fin: bool,
    sent_fin: bool,
    sent_ack: bool,
    got_ack: bool,
}

/// A peer's sequenced messages that arrived before their turn, with their sequence numbers.
type Early<P> = Vec<(u32, Ordered<P>)>;

#[derive(Debug)]
struct Peer<P> {
    next_seq: u32,
    expected_seq: u32,
    /// Sequenced messages that arrived before their turn. Allocated when the first one
    /// does (most peers never send out of turn, and an idle peer costs 8 bytes here, not
    /// 24), then kept (a peer that did once may again: no allocation per message).
    early: Option<Box<Early<P>>>,
    /// Eager messages this rank may still send to the peer.
    credits: u32,
    /// Eager messages of the peer consumed here and not yet returned as credits.
    owed: u32,
    /// Its eager messages in the unexpected queue (or held by a matched probe).
    unexpected_eager: u32,
    fin: FinState,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum RecvState {
    Posted,
    /// Reading rendezvous `rndv`'s data (the ACK names it).
    Reading {
        status: Status,
        rndv: u32,
    },
    Finished(Outcome),
}

#[derive(Debug)]
struct Recv {
    capacity: usize,
    state: RecvState,
    /// Its request is gone: forgotten once finished (an orphan).
    dropped: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum SendState {
    /// Announced by an RTS; waiting for the receiver's ACK.
    WaitAck,
    Finished(Outcome),
}

/// Who learns a send's outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Owner {
    Request,
    /// Its request was dropped: forgotten once finished.
    Detached,
}

#[derive(Debug)]
struct Send {
    ctx: u32,
    dest: u32,
    state: SendState,
    owner: Owner,
}

/// The protocol state of one rank. `P` is the executor's handle to an eager payload.
#[derive(Debug)]
pub struct Core<P> {
    rank: u32,
    config: Config,
    peers: Vec<Peer<P>>,
    recvs: Slab<Recv>,
    sends: Slab<Send>,
    /// Posted receives no message matched yet, oldest first, with what they accept.
    posted: VecDeque<(RecvId, u32, Source, Tag)>,
    unexpected: VecDeque<Message<P>>,
    arrivals: u64,
    actions: VecDeque<Action<P>>,
    failed: bool,
}

impl<P> Core<P> {
    /// The state of rank `rank` of `size` ranks.
    pub fn new(rank: u32, size: u32, config: Config) -> Core<P> {
        let credits = config.eager_credits.max(1);
        Core {
            rank,
            config,
            peers: (0..size)
                .map(|_| Peer {
                    next_seq: 0,
                    expected_seq: 0,
                    early: None,
                    credits,
                    owed: 0,
                    unexpected_eager: 0,
                    fin: FinState::default(),
                })
                .collect(),
            recvs: Slab::default(),
            sends: Slab::default(),
            posted: VecDeque::new(),
            unexpected: VecDeque::new(),
            arrivals: 0,
            actions: VecDeque::new(),
            failed: false,
        }
    }

    /// The next action to carry out, oldest first.
    pub fn poll_action(&mut self) -> Option<Action<P>> {
        self.actions.pop_front()
    }

    /// Receive slots allocated so far (tables indexed by [`RecvId::index`] need this many).
    pub fn recv_slots(&self) -> usize {
        self.recvs.capacity()
    }
    /// Send slots allocated so far (tables indexed by [`SendId::index`] need this many).
    pub fn send_slots(&self) -> usize {
        self.sends.capacity()
    }

    fn header(&self, kind: Kind, peer: u32) -> Header {
        let _ = peer;
        Header {
            kind,
            flags: 0,
            src: self.rank,
            tag: 0,
            seq: 0,
            len: 0,
            rndv: 0,
            ctx: 0,
        }
    }

    fn check_open(&self) -> Result<(), PostError> {
        if self.failed {
            Err(PostError::Failed)
        } else {
            Ok(())
        }
    }

    /// Starts a send of `len` bytes to `dest` on context `ctx` with `tag`: eager when
    /// `len <= eager_limit` (the route's) and a credit is left, else rendezvous.
    ///
    /// # Errors
    /// [`PostError`].
    pub fn post_send(
        &mut self,
        dest: u32,
        ctx: u32,
        tag: u32,
        len: usize,
        eager_limit: usize,
    ) -> Result<SendStart, PostError> {
        self.check_open()?;
        let peer = &mut self.peers[dest as usize];
        if peer.fin.got_fin {
            return Err(PostError::PeerFinalized(dest));
        }
        let eager = len <= eager_limit && peer.credits > 0;
        let state = if eager {
            SendState::Finished(Outcome::Sent)
        } else {
            SendState::WaitAck
        };
        let key = self
            .sends
            .insert(Send {
                ctx,
                dest,
                state,
                owner: Owner::Request,
            })
            .ok_or(PostError::TooMany)?;
        let peer = &mut self.peers[dest as usize];
        let seq = peer.next_seq;
        peer.next_seq = seq.wrapping_add(1);
        if eager {
            peer.credits -= 1;
        }
        let header = Header {
            kind: if eager { Kind::Eager } else { Kind::Rts },
            flags: 0,
            src: self.rank,
            tag,
            seq,
            len: len as u64,
            rndv: if eager { 0 } else { key.raw() },
            ctx,
        };
        Ok(SendStart {
            id: SendId(key),
            header,
            mode: if eager { Mode::Eager } else { Mode::Rendezvous },
        })
    }

    /// Starts a receive of at most `capacity` bytes on context `ctx` from `src` with
    /// `tag`. A message already queued matches at once (its [`Action`] is queued).
    ///
    /// # Errors
    /// [`PostError::Failed`], [`PostError::TooMany`]. (A receive from a rank that
    /// finalized fails through its outcome, [`Outcome::PeerFinalized`].)
    pub fn post_recv(
        &mut self,
        ctx: u32,
        src: Source,
        tag: Tag,
        capacity: usize,
    ) -> Result<RecvId, PostError> {
        self.check_open()?;
        let key = self
            .recvs
            .insert(Recv {
                capacity,
                state: RecvState::Posted,
                dropped: false,
            })
            .ok_or(PostError::TooMany)?;
        let id = RecvId(key);
        match self
            .unexpected
            .iter()
            .position(|m| m.accepted_by(ctx, src, tag))
        {
            Some(i) => {
                let msg = self.unexpected.remove(i).expect("index from position");
                self.deliver(id, msg);
            }
            None => match src {
                Source::Rank(r) if self.peers[r as usize].fin.got_fin => {
                    self.finish_recv(id, Outcome::PeerFinalized(r));
                }
                _ => self.posted.push_back((id, ctx, src, tag)),
            },
        }
        Ok(id)
    }

    /// Starts the receive of a message taken by [`Core::mprobe`] (`MPI_Mrecv`).
    ///
    /// # Errors
    /// As [`Core::post_recv`]; the message is then dropped (its payload released).
    pub fn recv_message(&mut self, msg: Message<P>, capacity: usize) -> Result<RecvId, PostError> {
        let posted = self.check_open().and_then(|()| {
            self.recvs
                .insert(Recv {
                    capacity,
                    state: RecvState::Posted,
                    dropped: false,
                })
                .ok_or(PostError::TooMany)
        });
        match posted {
            Ok(key) => {
                self.deliver(RecvId(key), msg);
                Ok(RecvId(key))
            }
            Err(e) => {
                self.discard(msg);
                Err(e)
            }
        }
    }

    /// The status of the oldest queued message a receive on (`ctx`, `src`, `tag`) would
    /// get (`MPI_Iprobe`).
    pub fn probe(&self, ctx: u32, src: Source, tag: Tag) -> Option<Status> {
        self.unexpected
            .iter()
            .find(|m| m.accepted_by(ctx, src, tag))
            .map(Message::status)
    }

    /// Takes that message out of the queue (`MPI_Improbe`): no other receive or probe can
    /// get it until it is received ([`Core::recv_message`]) or put back
    /// ([`Core::requeue`]).
    pub fn mprobe(&mut self, ctx: u32, src: Source, tag: Tag) -> Option<Message<P>> {
        let i = self
            .unexpected
            .iter()
            .position(|m| m.accepted_by(ctx, src, tag))?;
        self.unexpected.remove(i)
    }

    /// Puts a message taken by [`Core::mprobe`] back: to the oldest receive posted
    /// meanwhile that accepts it (no queued message can match a posted receive, so it is
    /// the one that would have got it), else at its place in the queue, so that later
    /// receives get it in its original order.
    pub fn requeue(&mut self, msg: Message<P>) {
        if let Some(i) = self
            .posted
            .iter()
            .position(|&(_, ctx, src, tag)| msg.accepted_by(ctx, src, tag))
        {
            let (id, ..) = self.posted.remove(i).expect("index from position");
            self.deliver(id, msg);
            return;
        }
        let at = self
            .unexpected
            .iter()
            .position(|u| u.arrival > msg.arrival)
            .unwrap_or(self.unexpected.len());
        self.unexpected.insert(at, msg);
    }

    /// Cancels receive `id` if no message has matched it (`MPI_Cancel`): it then finishes
    /// with [`Outcome::Cancelled`]. False when a message already matched it.
    pub fn cancel_recv(&mut self, id: RecvId) -> bool {
        let Some(i) = self.posted.iter().position(|p| p.0 == id) else {
            return false;
        };
        self.posted.remove(i);
        self.finish_recv(id, Outcome::Cancelled);
        true
    }

    /// The receive's request is gone. One no message matched is withdrawn; a finished one
    /// is forgotten; one whose read is under way is finished by the executor and then
    /// forgotten, and its sender completes.
    pub fn drop_recv(&mut self, id: RecvId) {
        if let Some(i) = self.posted.iter().position(|p| p.0 == id) {
            self.posted.remove(i);
            self.recvs.remove(id.0);
            return;
        }
        match self.recvs.get_mut(id.0) {
            Some(r) if matches!(r.state, RecvState::Reading { .. }) => r.dropped = true,
            Some(_) => {
                self.recvs.remove(id.0);
            }
            None => {}
        }
    }

    /// Whether receive `id` has finished (an unknown id counts as finished).
    pub fn recv_finished(&self, id: RecvId) -> bool {
        self.recvs
            .get(id.0)
            .is_none_or(|r| matches!(r.state, RecvState::Finished(_)))
    }

    /// The outcome of a finished receive, forgetting it; `None` while it runs.
    pub fn take_recv(&mut self, id: RecvId) -> Option<Outcome> {
        match &self.recvs.get(id.0)?.state {
            RecvState::Finished(_) => match self.recvs.remove(id.0)?.state {
                RecvState::Finished(o) => Some(o),
                _ => None,
            },
            _ => None,
        }
    }

    /// Whether send `id` has finished (an unknown id counts as finished).
    pub fn send_finished(&self, id: SendId) -> bool {
        self.sends
            .get(id.0)
            .is_none_or(|s| matches!(s.state, SendState::Finished(_)))
    }

    /// The outcome of a finished send, forgetting it; `None` while it runs.
    pub fn take_send(&mut self, id: SendId) -> Option<Outcome> {
        match &self.sends.get(id.0)?.state {
            SendState::Finished(_) => match self.sends.remove(id.0)?.state {
                SendState::Finished(o) => Some(o),
                _ => None,
            },
            _ => None,
        }
    }

    /// Forgets send `id` whatever its state: the executor could not send its first
    /// message, so no peer knows of it. (Its sequence number is spent: the peer is about to
    /// be declared failed, as the transport refused.)
    pub fn forget_send(&mut self, id: SendId) {
        self.sends.remove(id.0);
    }

    /// Whether receive `id` is still known (a dropped one is forgotten once finished).
    pub fn recv_live(&self, id: RecvId) -> bool {
        self.recvs.get(id.0).is_some()
    }

    /// The send's request is gone: its outcome is not reported; it is forgotten when it
    /// finishes (finalize still waits for it).
    pub fn drop_send(&mut self, id: SendId) {
        match self.sends.get_mut(id.0) {
            Some(s) if s.state == SendState::WaitAck => s.owner = Owner::Detached,
            Some(_) => {
                self.sends.remove(id.0);
            }
            None => {}
        }
    }

    /// A message arrived from `h.src`.
    ///
    /// # Errors
    /// [`ProtoError`]: the message is ignored (the executor logs it); an eager payload
    /// comes back in [`Action::Release`].
    pub fn on_message(&mut self, h: Header, body: Body<P>) -> Result<(), ProtoError> {
        if h.src as usize >= self.peers.len() {
            if let Body::Eager(p) = body {
                self.actions.push_back(Action::Release(p));
            }
            return Err(ProtoError::UnknownRank(h.src));
        }
        let src = h.src;
        let ordered = match (h.kind, body) {
            (Kind::Eager, Body::Eager(payload)) => Ordered::Msg(Message {
                ctx: h.ctx,
                src,
                tag: h.tag,
                arrival: 0,
                data: Data::Eager {
                    payload,
                    len: h.len as usize,
                },
            }),
            (Kind::Rts, Body::Rts(remote)) => Ordered::Msg(Message {
                ctx: h.ctx,
                src,
                tag: h.tag,
                arrival: 0,
                data: Data::Rts {
                    len: h.len as usize,
                    rndv: h.rndv,
                    remote,
                },
            }),
            (Kind::Fin, _) => Ordered::Fin,
            (Kind::Ack, _) => {
                self.on_ack(src, h);
                return Ok(());
            }
            (Kind::Credit, _) => {
                let p = &mut self.peers[src as usize];
                p.credits = p.credits.saturating_add(h.len as u32);
                return Ok(());
            }
            (Kind::FinAck, _) => {
                self.peers[src as usize].fin.got_ack = true;
                return Ok(());
            }
            (k @ (Kind::Eager | Kind::Rts), body) => {
                if let Body::Eager(p) = body {
                    self.actions.push_back(Action::Release(p));
                }
                return Err(ProtoError::BodyMismatch(k));
            }
            (k, body) => {
                if let Body::Eager(p) = body {
                    self.actions.push_back(Action::Release(p));
                }
                return Err(ProtoError::NotForCore(k));
            }
        };
        if let Ordered::Msg(Message {
            data: Data::Eager { .. },
            ..
        }) = &ordered
        {
            self.peers[src as usize].unexpected_eager += 1;
        }
        let peer = &mut self.peers[src as usize];
        if h.seq != peer.expected_seq {
            peer.early
                .get_or_insert_with(Box::default)
                .push((h.seq, ordered));
            return Ok(());
        }
        self.in_order(src, ordered);
        loop {
            let peer = &mut self.peers[src as usize];
            let next = peer.expected_seq;
            let Some(early) = peer.early.as_mut() else {
                break;
            };
            let Some(i) = early.iter().position(|(s, _)| *s == next) else {
                break;
            };
            let (_, m) = early.swap_remove(i);
            self.in_order(src, m);
        }
        Ok(())
    }

    /// A sequenced message whose turn it is.
    fn in_order(&mut self, src: u32, m: Ordered<P>) {
        let peer = &mut self.peers[src as usize];
        peer.expected_seq = peer.expected_seq.wrapping_add(1);
        let mut msg = match m {
            Ordered::Msg(msg) => msg,
            Ordered::Fin => {
                peer.fin.got_fin = true;
                // Receives waiting for this rank alone can never match now.
                let mut i = 0;
                while i < self.posted.len() {
                    if self.posted[i].2 == Source::Rank(src) {
                        let (id, ..) = self.posted.remove(i).expect("index in range");
                        self.finish_recv(id, Outcome::PeerFinalized(src));
                    } else {
                        i += 1;
                    }
                }
                return;
            }
        };
        match self
            .posted
            .iter()
            .position(|&(_, ctx, s, t)| msg.accepted_by(ctx, s, t))
        {
            Some(i) => {
                let (id, ..) = self.posted.remove(i).expect("index from position");
                self.deliver(id, msg);
            }
            None => {
                msg.arrival = self.arrivals;
                self.arrivals += 1;
                self.unexpected.push_back(msg);
            }
        }
    }

    /// Hands message `msg` to receive `id` (just matched).
    fn deliver(&mut self, id: RecvId, msg: Message<P>) {
        let capacity = self.recvs.get(id.0).map_or(0, |r| r.capacity);
        let status = msg.status();
        let Message { src, tag, data, .. } = msg;
        match data {
            Data::Eager { payload, len } => {
                self.consumed_eager(src);
                if len > capacity {
                    self.actions.push_back(Action::Release(payload));
                    self.finish_recv(
                        id,
                        Outcome::Truncated {
                            capacity,
                            len,
                            src,
                            tag,
                        },
                    );
                } else {
                    self.actions.push_back(Action::Deliver {
                        recv: id,
                        payload,
                        len,
                    });
                    self.finish_recv(id, Outcome::Received(status));
                }
            }
            Data::Rts { len, rndv, remote } => {
                if len > capacity {
                    let mut h = self.header(Kind::Ack, src);
                    h.rndv = rndv;
                    h.flags = ACK_TRUNCATED;
                    self.actions.push_back(Action::Send {
                        peer: src,
                        header: h,
                    });
                    self.finish_recv(
                        id,
                        Outcome::Truncated {
                            capacity,
                            len,
                            src,
                            tag,
                        },
                    );
                } else {
                    if let Some(r) = self.recvs.get_mut(id.0) {
                        r.state = RecvState::Reading { status, rndv };
                    }
                    self.actions.push_back(Action::Read {
                        recv: id,
                        peer: src,
                        remote,
                        len,
                    });
                }
            }
        }
    }

    /// An eager message of `src` left the queue (received or discarded): one credit more
    /// to return.
    fn consumed_eager(&mut self, src: u32) {
        let batch = (self.config.eager_credits.max(1) / 2).max(1);
        let p = &mut self.peers[src as usize];
        p.unexpected_eager = p.unexpected_eager.saturating_sub(1);
        p.owed += 1;
        if p.owed >= batch && !p.fin.got_fin && !self.failed {
            let n = std::mem::take(&mut p.owed);
            let mut h = self.header(Kind::Credit, src);
            h.len = u64::from(n);
            self.actions.push_back(Action::Send {
                peer: src,
                header: h,
            });
        }
    }

    fn discard(&mut self, msg: Message<P>) {
        match msg.data {
            Data::Eager { payload, .. } => {
                self.consumed_eager(msg.src);
                self.actions.push_back(Action::Release(payload));
            }
            Data::Rts { rndv, .. } => {
                // The sender must not wait for a read that never comes.
                let mut h = self.header(Kind::Ack, msg.src);
                h.rndv = rndv;
                h.flags = ACK_TRUNCATED;
                self.actions.push_back(Action::Send {
                    peer: msg.src,
                    header: h,
                });
            }
        }
    }

    fn finish_recv(&mut self, id: RecvId, outcome: Outcome) {
        let dropped = match self.recvs.get_mut(id.0) {
            Some(r) => {
                r.state = RecvState::Finished(outcome);
                r.dropped
            }
            None => return,
        };
        if dropped {
            self.recvs.remove(id.0);
        }
    }

    fn on_ack(&mut self, src: u32, h: Header) {
        let key = Key::from_raw(h.rndv);
        let Some(s) = self.sends.get_mut(key) else {
            return;
        };
        if s.dest != src || s.state != SendState::WaitAck {
            return;
        }
        s.state = SendState::Finished(if h.flags & ACK_READ_FAILED != 0 {
            Outcome::TransferFailed(src)
        } else {
            Outcome::Sent
        });
        let detached = s.owner == Owner::Detached;
        self.actions.push_back(Action::Unexpose(SendId(key)));
        if detached {
            self.sends.remove(key);
        }
    }

    /// The read of receive `id` finished: the receive is complete; the sender is told.
    pub fn read_done(&mut self, id: RecvId) {
        self.read_finished(id, None);
    }

    /// The read of receive `id` failed: the receive fails; the sender is told.
    pub fn read_failed(&mut self, id: RecvId) {
        self.read_finished(id, Some(()));
    }

    fn read_finished(&mut self, id: RecvId, failed: Option<()>) {
        let Some(r) = self.recvs.get(id.0) else {
            return;
        };
        let RecvState::Reading { status, rndv } = r.state else {
            return;
        };
        let peer = status.source;
        let mut h = self.header(Kind::Ack, peer);
        h.rndv = rndv;
        if failed.is_some() {
            h.flags = ACK_READ_FAILED;
        }
        if !self.failed {
            self.actions.push_back(Action::Send { peer, header: h });
        }
        let outcome = match failed {
            None => Outcome::Received(status),
            Some(()) => Outcome::TransferFailed(peer),
        };
        self.finish_recv(id, outcome);
    }

    /// A peer failed: every pending operation fails with [`Outcome::PeerFailed`], reads
    /// under way are abandoned and exposed buffers released; later posts fail.
    pub fn peer_failed(&mut self) {
        if self.failed {
            return;
        }
        self.failed = true;
        while let Some((id, ..)) = self.posted.pop_front() {
            self.finish_recv(id, Outcome::PeerFailed);
        }
        let mut reading = Vec::new();
        for (k, r) in self.recvs.iter() {
            if matches!(r.state, RecvState::Reading { .. }) {
                reading.push(RecvId(k));
            }
        }
        for id in reading {
            self.actions.push_back(Action::AbandonRead(id));
            self.finish_recv(id, Outcome::PeerFailed);
        }
        let mut waiting = Vec::new();
        for (k, s) in self.sends.iter_mut() {
            if s.state == SendState::WaitAck {
                s.state = SendState::Finished(Outcome::PeerFailed);
                waiting.push((k, s.owner));
            }
        }
        for (k, owner) in waiting {
            self.actions.push_back(Action::Unexpose(SendId(k)));
            if owner == Owner::Detached {
                self.sends.remove(k);
            }
        }
    }

    /// A send (of any context) still waiting for its receiver: its destination.
    pub fn unfinished_send(&self) -> Option<u32> {
        self.sends
            .iter()
            .find(|(_, s)| s.state == SendState::WaitAck)
            .map(|(_, s)| s.dest)
    }

    /// A send on context `ctx` still waiting for its receiver: its destination.
    pub fn unfinished_send_on(&self, ctx: u32) -> Option<u32> {
        self.sends
            .iter()
            .find(|(_, s)| s.ctx == ctx && s.state == SendState::WaitAck)
            .map(|(_, s)| s.dest)
    }

    /// Whether rendezvous data from `peer` is still being read.
    pub fn receiving_from(&self, peer: u32) -> bool {
        self.recvs.iter().any(
            |(_, r)| matches!(r.state, RecvState::Reading { status, .. } if status.source == peer),
        )
    }

    /// The peers pending operations wait for: `f(peer, bulk)` for each posted receive's
    /// source (`None`: any source), each send waiting for an ACK, and each read under way
    /// (`bulk`: data is moving, so a busy transport is expected).
    pub fn for_each_awaited(&self, mut f: impl FnMut(Option<u32>, bool)) {
        for &(_, _, src, _) in &self.posted {
            match src {
                Source::Rank(r) => f(Some(r), false),
                Source::Any => f(None, false),
            }
        }
        for (_, s) in self.sends.iter() {
            if s.state == SendState::WaitAck {
                f(Some(s.dest), false);
            }
        }
        for (_, r) in self.recvs.iter() {
            if let RecvState::Reading { status, .. } = r.state {
                f(Some(status.source), true);
            }
        }
    }

    /// Whether `peer`'s `Fin` was processed (it sends nothing more).
    pub fn peer_finalized(&self, peer: u32) -> bool {
        self.peers[peer as usize].fin.got_fin
    }

    /// Whether `peer` acknowledged this rank's `Fin` (it receives nothing more).
    pub fn peer_acked_fin(&self, peer: u32) -> bool {
        self.peers[peer as usize].fin.got_ack
    }

    /// Messages queued and never received.
    pub fn unexpected_len(&self) -> usize {
        self.unexpected.len()
    }

    #[cfg(test)]
    /// Eager messages of `peer` held here unreceived (bounded by
    /// [`Config::eager_credits`]).
    pub fn unexpected_eager_from(&self, peer: u32) -> u32 {
        self.peers[peer as usize].unexpected_eager
    }

    /// Finalize, first step: once no send waits for its receiver
    /// ([`Core::unfinished_send`]), queue a `Fin` to every peer. Does it once.
    pub fn send_fins(&mut self) {
        for p in 0..self.peers.len() as u32 {
            if p == self.rank || self.peers[p as usize].fin.sent_fin {
                continue;
            }
            let peer = &mut self.peers[p as usize];
            peer.fin.sent_fin = true;
            let seq = peer.next_seq;
            peer.next_seq = seq.wrapping_add(1);
            let mut h = self.header(Kind::Fin, p);
            h.seq = seq;
            self.actions.push_back(Action::Send { peer: p, header: h });
        }
    }

    /// Finalize, each later step: acknowledges every peer whose `Fin` was processed and
    /// from which nothing is being read. Returns the first peer the handshake still waits
    /// for, or `None` when it is complete (the executor then waits for its last sends).
    pub fn finalize_step(&mut self) -> Option<u32> {
        let mut waiting = None;
        for p in 0..self.peers.len() as u32 {
            if p == self.rank {
                continue;
            }
            let f = self.peers[p as usize].fin;
            if f.got_fin && !f.sent_ack && !self.receiving_from(p) {
                let h = self.header(Kind::FinAck, p);
                self.actions.push_back(Action::Send { peer: p, header: h });
                self.peers[p as usize].fin.sent_ack = true;
            }
            let f = self.peers[p as usize].fin;
            if waiting.is_none() && !(f.sent_ack && f.got_ack) {
                waiting = Some(p);
            }
        }
        waiting
    }

    /// Bytes of the per-peer state (its size and every allocation's capacity), which grows
    /// with the number of ranks: sequence numbers, credits and finalize flags, and the
    /// messages held for their turn.
    pub fn peer_bytes(&self) -> usize {
        self.peers.capacity() * std::mem::size_of::<Peer<P>>()
            + self
                .peers
                .iter()
                .filter_map(|p| p.early.as_ref())
                .map(|e| {
                    std::mem::size_of::<Early<P>>()
                        + e.capacity() * std::mem::size_of::<(u32, Ordered<P>)>()
                })
                .sum::<usize>()
    }

    #[cfg(test)]
    /// Live receive and send entries (for leak checks).
    pub fn live_requests(&self) -> (usize, usize) {
        (self.recvs.len(), self.sends.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn eager(src: u32, seq: u32, tag: u32, len: u64) -> Header {
        Header {
            kind: Kind::Eager,
            flags: 0,
            src,
            tag,
            seq,
            len,
            rndv: 0,
            ctx: 0,
        }
    }

    #[test]
    fn early_messages_wait_for_their_turn() {
        let mut c: Core<u32> = Core::new(0, 2, Config::default());
        c.on_message(eager(1, 1, 7, 1), Body::Eager(11)).unwrap();
        assert_eq!(
            c.probe(0, Source::Any, Tag::Any),
            None,
            "seq 1 waits for seq 0"
        );
        c.on_message(eager(1, 0, 7, 2), Body::Eager(10)).unwrap();
        let r = c.post_recv(0, Source::Any, Tag::Is(7), 8).unwrap();
        match c.poll_action() {
            Some(Action::Deliver { recv, payload, len }) => {
                assert_eq!((recv, payload, len), (r, 10, 2));
            }
            a => panic!("{a:?}"),
        }
        assert_eq!(c.probe(0, Source::Any, Tag::Any).unwrap().len, 1);
    }

    #[test]
    fn truncated_rendezvous_is_refused_and_the_send_completes() {
        let mut s: Core<u32> = Core::new(0, 2, Config::default());
        let mut r: Core<u32> = Core::new(1, 2, Config::default());
        let st = s.post_send(1, 0, 5, 100, 10).unwrap();
        assert_eq!(st.mode, Mode::Rendezvous);
        r.on_message(st.header, Body::Rts(Remote { addr: 1, key: 2 }))
            .unwrap();
        let id = r.post_recv(0, Source::Rank(0), Tag::Is(5), 50).unwrap();
        assert!(matches!(
            r.take_recv(id),
            Some(Outcome::Truncated {
                capacity: 50,
                len: 100,
                ..
            })
        ));
        let Some(Action::Send { peer: 0, header }) = r.poll_action() else {
            panic!("an ACK")
        };
        assert!(!s.send_finished(st.id));
        s.on_message(header, Body::Empty).unwrap();
        assert!(matches!(s.poll_action(), Some(Action::Unexpose(i)) if i == st.id));
        assert_eq!(s.take_send(st.id), Some(Outcome::Sent));
    }

    #[test]
    fn a_peer_failure_ends_every_pending_operation() {
        let mut s: Core<u32> = Core::new(0, 3, Config::default());
        let mut r: Core<u32> = Core::new(1, 3, Config::default());
        // Rank 0: a rendezvous send waiting for its ACK, a posted receive.
        let st = s.post_send(1, 0, 1, 100, 10).unwrap();
        let posted = s.post_recv(0, Source::Any, Tag::Any, 8).unwrap();
        // Rank 1: a receive reading that send's data, a detached-to-be send.
        let reading = r.post_recv(0, Source::Rank(0), Tag::Is(1), 100).unwrap();
        r.on_message(st.header, Body::Rts(Remote { addr: 7, key: 8 }))
            .unwrap();
        assert!(
            matches!(r.poll_action(), Some(Action::Read { recv, len: 100, .. }) if recv == reading)
        );
        s.peer_failed();
        assert_eq!(s.take_recv(posted), Some(Outcome::PeerFailed));
        assert!(matches!(s.poll_action(), Some(Action::Unexpose(i)) if i == st.id));
        assert_eq!(s.take_send(st.id), Some(Outcome::PeerFailed));
        assert_eq!(s.post_send(2, 0, 1, 1, 10).unwrap_err(), PostError::Failed);
        assert_eq!(
            s.post_recv(0, Source::Any, Tag::Any, 1).unwrap_err(),
            PostError::Failed
        );
        r.peer_failed();
        assert!(matches!(r.poll_action(), Some(Action::AbandonRead(i)) if i == reading));
        assert_eq!(r.take_recv(reading), Some(Outcome::PeerFailed));
        // A read that ends after the failure sends no ACK.
        r.read_done(reading);
        assert!(r.poll_action().is_none());
        assert_eq!(s.live_requests(), (0, 0));
        assert_eq!(r.live_requests(), (0, 0));
    }

    #[test]
    fn without_credits_small_messages_go_by_rendezvous() {
        let cfg = Config { eager_credits: 2 };
        let mut s: Core<u32> = Core::new(0, 2, cfg);
        let mut r: Core<u32> = Core::new(1, 2, cfg);
        let modes: Vec<Mode> = (0..3)
            .map(|_| s.post_send(1, 0, 0, 4, 64).unwrap())
            .map(|st| {
                let body = match st.mode {
                    Mode::Eager => Body::Eager(1),
                    Mode::Rendezvous => Body::Rts(Remote { addr: 0, key: 0 }),
                };
                r.on_message(st.header, body).unwrap();
                st.mode
            })
            .collect();
        assert_eq!(modes, [Mode::Eager, Mode::Eager, Mode::Rendezvous]);
        assert_eq!(r.unexpected_eager_from(0), 2);
        // Receiving one returns a credit (batches of half the credits: 1).
        r.post_recv(0, Source::Any, Tag::Any, 64).unwrap();
        let mut credit = None;
        while let Some(a) = r.poll_action() {
            if let Action::Send { header, .. } = a {
                credit = Some(header);
            }
        }
        let credit = credit.expect("a credit message");
        assert_eq!((credit.kind, credit.len), (Kind::Credit, 1));
        s.on_message(credit, Body::Empty).unwrap();
        assert_eq!(s.post_send(1, 0, 0, 4, 64).unwrap().mode, Mode::Eager);
    }
}

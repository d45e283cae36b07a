//! The communicator's wire format: a 32-byte header in front of every control message.
//!
//! Messages up to the eager limit travel as one tagged message (header + payload) into
//! receive buffers that each endpoint keeps posted. Larger ones use an RGET rendezvous: the
//! sender exposes a buffer holding the data and announces the message (`Rts`, carrying the
//! buffer's address and key); the receiver matches it against a posted receive, reads the
//! data (`fi_read`, in chunks of at most the provider's `max_msg_size`, see [`chunks`]) and
//! answers `Ack`, which completes the send. The protocol decisions live in
//! the private module `proto`.
//!
//! Every eager and RTS message carries a per-(sender, receiver) sequence number, so that
//! the receiver processes each sender's messages in the order they were sent (MPI's
//! non-overtaking rule) whatever order completions arrive in, and across transports.
//!
//! Finalize: a rank that finalizes sends `Fin` to every peer once all its sends have
//! completed locally. `Fin` takes the next sequence number, so a peer processes it only after
//! every message sent before it; the peer answers `FinAck` once it also holds all rendezvous
//! data from that sender. A rank closes its endpoints only when every peer has acknowledged
//! its `Fin` and it has acknowledged every peer's `Fin` (with sends that complete, never
//! injects, so the last acknowledgement is not left in a provider's queue at close).

/// Header size in bytes.
pub const HDR_LEN: usize = 32;
/// Marks a header of this protocol (and its version: 0xEFA2 since rendezvous is RGET).
pub const MAGIC: u16 = 0xEFA2;
/// The libfabric tag of every control message (eager, RTS, ACK, ...).
pub const CTRL_TAG: u64 = 0;

/// What a control message is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Header followed by the whole payload.
    Eager,
    /// Request to send: the payload stays in the sender's exposed buffer, whose address
    /// and key follow the header ([`RTS_PAYLOAD`] bytes); the receiver reads it (RGET).
    Rts,
    /// The sender is finalizing: it has sent its last message to this receiver. Carries a
    /// sequence number, so it is processed after every eager and RTS message sent before it.
    Fin,
    /// The receiver has processed the sender's `Fin` and holds every byte the sender sent
    /// it (rendezvous data included).
    FinAck,
    /// A rank failed: `tag` names it, `flags` says how ([`FailCode`]), `len` carries a
    /// number (pid, abort code, milliseconds waited) and the payload a text (host, reason,
    /// transport error). Sent by the rank that noticed to every rank it can still reach.
    Failed,
    /// A liveness probe, ignored by the receiver: a rank blocked on a peer on another host
    /// sends one every 250 ms, because only a send tells a transport (TCP, RDMA) that
    /// the peer's process is gone.
    Ping,
    /// RGET rendezvous: the receiver has read the data of rendezvous `rndv` (or refused it,
    /// see [`ACK_TRUNCATED`], [`ACK_READ_FAILED`]); the sender's send completes and its
    /// exposed buffer is released.
    Ack,
    /// Flow control: the receiver consumed `len` eager messages of the sender, which may
    /// send that many more eagerly (see the private module `proto`).
    Credit,
}

/// How a failed rank failed, in a [`Kind::Failed`] message's `flags`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum FailCode {
    /// The process is gone; `len` is its pid (0: unknown), the payload its host.
    Exited = 1,
    /// Unreachable; the payload is the transport's error text.
    Unreachable = 2,
    /// It called `abort`; `len` is the code (as i64), the payload the reason.
    Aborted = 3,
    /// Stopped; `len` is the pid.
    Stopped = 4,
    /// No answer within the deadline; `len` is the milliseconds waited.
    TimedOut = 5,
}

impl FailCode {
    /// The code for `flags`, if known.
    pub fn from_flags(f: u8) -> Option<FailCode> {
        Some(match f {
            1 => FailCode::Exited,
            2 => FailCode::Unreachable,
            3 => FailCode::Aborted,
            4 => FailCode::Stopped,
            5 => FailCode::TimedOut,
            _ => return None,
        })
    }
}

impl Kind {
    fn code(self) -> u8 {
        match self {
            Kind::Eager => 1,
            Kind::Rts => 2,
            Kind::Fin => 4,
            Kind::FinAck => 5,
            Kind::Failed => 6,
            Kind::Ping => 7,
            Kind::Ack => 8,
            Kind::Credit => 9,
        }
    }
    fn from_code(c: u8) -> Option<Kind> {
        match c {
            1 => Some(Kind::Eager),
            2 => Some(Kind::Rts),
            4 => Some(Kind::Fin),
            5 => Some(Kind::FinAck),
            6 => Some(Kind::Failed),
            7 => Some(Kind::Ping),
            8 => Some(Kind::Ack),
            9 => Some(Kind::Credit),
            _ => None,
        }
    }
}

/// ACK flag: the receive buffer was too small; nothing was read (the send completes, as in
/// MPI: only the receiver reports the truncation).
pub const ACK_TRUNCATED: u8 = 1;
/// ACK flag: the receiver's read failed (the send fails).
pub const ACK_READ_FAILED: u8 = 2;
/// Bytes of an RTS payload: the exposed buffer's address and key (little-endian u64s).
pub const RTS_PAYLOAD: usize = 16;

/// The payload of an RTS: the exposed buffer's `addr` and `key` (`fi_read(3)`'s remote
/// address and key).
pub fn rts_payload(addr: u64, key: u64) -> [u8; RTS_PAYLOAD] {
    let mut p = [0u8; RTS_PAYLOAD];
    p[..8].copy_from_slice(&addr.to_le_bytes());
    p[8..].copy_from_slice(&key.to_le_bytes());
    p
}

/// The `(addr, key)` of an RTS payload ([`rts_payload`]); `None` when it is not
/// [`RTS_PAYLOAD`] bytes long.
pub fn parse_rts(payload: &[u8]) -> Option<(u64, u64)> {
    let p: &[u8; RTS_PAYLOAD] = payload.try_into().ok()?;
    let word = |i: usize| {
        let mut w = [0u8; 8];
        w.copy_from_slice(&p[i..i + 8]);
        u64::from_le_bytes(w)
    };
    Some((word(0), word(8)))
}

/// A control-message header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Message kind.
    pub kind: Kind,
    /// Kind-specific flags ([`ACK_TRUNCATED`], [`ACK_READ_FAILED`], a [`FailCode`]).
    pub flags: u8,
    /// Rank of the sender of this control message.
    pub src: u32,
    /// User tag (eager, RTS).
    pub tag: u32,
    /// Per-(sender, receiver) sequence number (eager, RTS, FIN).
    pub seq: u32,
    /// Payload length in bytes (eager, RTS); credits returned (credit).
    pub len: u64,
    /// Rendezvous id chosen by the data sender (RTS, ACK).
    pub rndv: u32,
    /// Communicator context, so that messages of different communicators never match.
    pub ctx: u32,
}

/// A header that cannot be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// Fewer than [`HDR_LEN`] bytes.
    #[error("control message of {0} bytes is shorter than the {HDR_LEN}-byte header")]
    Short(usize),
    /// Not our magic number: another program, or another version of efa-rs.
    #[error(
        "bad magic {0:#06x} (expected {MAGIC:#06x}): every rank must run the same efa-rs version"
    )]
    Magic(u16),
    /// Unknown kind code.
    #[error("unknown control message kind {0}")]
    Kind(u8),
    /// An eager message whose payload length disagrees with its header.
    #[error("eager message declares {declared} payload bytes but carries {actual}")]
    Length {
        /// From the header.
        declared: u64,
        /// Received.
        actual: usize,
    },
}

impl Header {
    /// Writes the header into the first [`HDR_LEN`] bytes of `out`.
    ///
    /// # Panics
    /// If `out` is shorter than [`HDR_LEN`].
    pub fn encode(&self, out: &mut [u8]) {
        out[0..2].copy_from_slice(&MAGIC.to_le_bytes());
        out[2] = self.kind.code();
        out[3] = self.flags;
        out[4..8].copy_from_slice(&self.src.to_le_bytes());
        out[8..12].copy_from_slice(&self.tag.to_le_bytes());
        out[12..16].copy_from_slice(&self.seq.to_le_bytes());
        out[16..24].copy_from_slice(&self.len.to_le_bytes());
        out[24..28].copy_from_slice(&self.rndv.to_le_bytes());
        out[28..32].copy_from_slice(&self.ctx.to_le_bytes());
    }

    /// Reads a header from a received control message of `msg_len` bytes (header included),
    /// checking an eager payload's length.
    ///
    /// # Errors
    /// [`WireError`] for short, foreign or inconsistent messages.
    pub fn decode(b: &[u8], msg_len: usize) -> Result<Header, WireError> {
        if msg_len < HDR_LEN || b.len() < HDR_LEN {
            return Err(WireError::Short(msg_len.min(b.len())));
        }
        let u32_at = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().unwrap());
        let magic = u16::from_le_bytes([b[0], b[1]]);
        if magic != MAGIC {
            return Err(WireError::Magic(magic));
        }
        let kind = Kind::from_code(b[2]).ok_or(WireError::Kind(b[2]))?;
        let h = Header {
            kind,
            flags: b[3],
            src: u32_at(4),
            tag: u32_at(8),
            seq: u32_at(12),
            len: u64::from_le_bytes(b[16..24].try_into().unwrap()),
            rndv: u32_at(24),
            ctx: u32_at(28),
        };
        if kind == Kind::Eager && h.len != (msg_len - HDR_LEN) as u64 {
            return Err(WireError::Length {
                declared: h.len,
                actual: msg_len - HDR_LEN,
            });
        }
        Ok(h)
    }
}

/// Splits `len` bytes into chunks of at most `max` bytes: (offset, length) pairs. A zero-length
/// message is one empty chunk.
pub fn chunks(len: usize, max: usize) -> Vec<(usize, usize)> {
    let max = max.max(1);
    if len == 0 {
        return vec![(0, 0)];
    }
    (0..len.div_ceil(max))
        .map(|i| (i * max, max.min(len - i * max)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(kind: Kind, len: u64) -> Header {
        Header {
            kind,
            flags: 0,
            src: 7,
            tag: 0xDEAD,
            seq: 41,
            len,
            rndv: 99,
            ctx: 3,
        }
    }

    #[test]
    fn rts_payload_round_trips() {
        for (addr, key) in [(0, 0), (1, 2), (u64::MAX, 0x0123_4567_89ab_cdef)] {
            assert_eq!(parse_rts(&rts_payload(addr, key)), Some((addr, key)));
        }
        let p = rts_payload(7, 9);
        assert_eq!(parse_rts(&p[..RTS_PAYLOAD - 1]), None);
        assert_eq!(parse_rts(&[p.as_slice(), &[0]].concat()), None);
        // Little-endian on the wire, whatever the host.
        assert_eq!(&p[..8], &7u64.to_le_bytes());
    }

    #[test]
    fn header_round_trips() {
        for (kind, len, msg) in [
            (Kind::Eager, 5, HDR_LEN + 5),
            (Kind::Rts, 1 << 40, HDR_LEN),
            (Kind::Ack, 0, HDR_LEN),
            (Kind::Credit, 32, HDR_LEN),
            (Kind::Rts, 5, HDR_LEN + RTS_PAYLOAD),
            (Kind::Fin, 0, HDR_LEN),
            (Kind::FinAck, 0, HDR_LEN),
            (Kind::Failed, 4242, HDR_LEN + 3),
        ] {
            let h = sample(kind, len);
            let mut b = vec![0u8; msg];
            h.encode(&mut b);
            assert_eq!(Header::decode(&b, msg).unwrap(), h);
        }
    }

    #[test]
    fn bad_headers_are_rejected() {
        let mut b = vec![0u8; HDR_LEN + 4];
        sample(Kind::Eager, 4).encode(&mut b);
        assert_eq!(Header::decode(&b, 10), Err(WireError::Short(10)));
        assert!(matches!(
            Header::decode(&b, HDR_LEN + 3),
            Err(WireError::Length {
                declared: 4,
                actual: 3
            })
        ));
        b[2] = 3; // the retired CTS
        assert_eq!(Header::decode(&b, HDR_LEN + 4), Err(WireError::Kind(3)));
        b[2] = 10;
        assert_eq!(Header::decode(&b, HDR_LEN + 4), Err(WireError::Kind(10)));
        b[0] = 0;
        assert!(matches!(
            Header::decode(&b, HDR_LEN + 4),
            Err(WireError::Magic(_))
        ));
    }

    #[test]
    fn chunking_covers_exactly() {
        for (len, max) in [
            (0, 10),
            (1, 10),
            (10, 10),
            (11, 10),
            (1 << 30, 8 << 20),
            (7, 1),
        ] {
            let c = chunks(len, max);
            assert!(!c.is_empty());
            assert!(c.iter().all(|&(_, l)| l <= max));
            let mut next = 0;
            for &(off, l) in &c {
                assert_eq!(off, next);
                next += l;
            }
            assert_eq!(next, len);
        }
        assert_eq!(chunks(1 << 30, 8 << 20).len(), 128);
    }
}

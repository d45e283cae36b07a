//! Fuzz targets: every decoder of bytes that come from outside the process.
//!
//! Not part of the API (hidden from the docs; may change in any release). It exists so that
//! fuzzers outside this crate (the `efa-core/tests/fuzz.rs` generator that `cargo test`
//! runs, and the coverage-guided AFL++ targets in `fuzz/` that `ci/fuzz` runs) reach the
//! decoders, several of which are private, through one narrow door. A cargo feature would
//! have hidden them from ordinary builds, but then `cargo test --workspace` would not build
//! (or run) them, and the targets would rot unnoticed.
//!
//! Each target takes arbitrary bytes. A decoder may reject them (with its typed error) but
//! must never panic, loop or allocate more than the bytes justify. On top of that each
//! target checks an oracle and panics, which the fuzzer reports, when the decoder accepts
//! something it should not:
//!
//! * [`wire_header`]: a decoded header re-encodes to exactly the bytes it came from, and an
//!   eager header's length matches the message.
//! * [`card`]: a decoded card re-encodes to exactly its input (the format is canonical).
//! * [`store_request`]: a decoded store request re-encodes to exactly its frame.
//! * [`store_frames`]: the server's frame splitter, fed the input in pieces of varying size,
//!   yields the same frames as a plain reference parser, refuses the same oversized length,
//!   and never holds more than twice the bytes it was given.
//! * [`store_server`]: a whole server connection, fed the input as its client's bytes,
//!   answers only with well-formed replies, at most one per complete frame, and a refusal
//!   only as its last reply. Run twice: on a server without a token (a `HELLO_AUTH` is
//!   refused) and on one with [`FUZZ_TOKEN`] (nothing is served before a first request that
//!   is a `HELLO_AUTH` with that token).
//! * [`store_reply`]: the client's reply reader and parser accept only well-formed replies,
//!   and a GATHER's entries (also a file store's combined file) only in their canonical
//!   form.

use std::cell::RefCell;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;
use std::time::Duration;

use crate::placement::{Card, EndpointCard, ProcessId, Subnet, Transport};
use crate::store::{
    self, FrameDecoder, Request, Shared, StoreToken, MAX_FRAME, ST_ERROR, ST_INVALID, ST_NOT_FOUND,
    ST_REFUSED, ST_VALUE,
};
use crate::wire::{FailCode, Header, Kind, ACK_TRUNCATED, HDR_LEN, RTS_PAYLOAD};

/// The token of the token-holding server that [`store_server`] also runs (its seeds present
/// it, so that fuzzing starts past the handshake).
pub const FUZZ_TOKEN: &str = "fuzz-token-0123456789abcdef";

/// A fuzz target: takes arbitrary bytes, panics only when an oracle fails.
pub type Target = fn(&[u8]);

/// The targets by name, for drivers that run them all.
pub const TARGETS: &[(&str, Target)] = &[
    ("wire_header", wire_header),
    ("card", card),
    ("store_request", store_request),
    ("store_frames", store_frames),
    ("store_server", store_server),
    ("store_reply", store_reply),
];

/// The target called `name`.
pub fn target(name: &str) -> Option<Target> {
    TARGETS.iter().find(|(n, _)| *n == name).map(|&(_, f)| f)
}

fn check_header(b: &[u8], msg_len: usize) {
    let Ok(h) = Header::decode(b, msg_len) else {
        return;
    };
    assert!(
        b.len() >= HDR_LEN && msg_len >= HDR_LEN,
        "header accepted from {} bytes (message of {msg_len})",
        b.len()
    );
    let mut out = [0u8; HDR_LEN];
    h.encode(&mut out);
    assert_eq!(
        out[..],
        b[..HDR_LEN],
        "decoded header {h:?} re-encodes differently"
    );
    if h.kind == Kind::Eager {
        assert_eq!(
            h.len,
            (msg_len - HDR_LEN) as u64,
            "eager header accepted with a length that disagrees with its message"
        );
    }
}

/// The communicator's control-message header ([`Header::decode`]): the input as a message of
/// its own length, and, after an 8-byte little-endian message length, with that length
/// (which may disagree with the bytes, as a provider's completion could).
pub fn wire_header(data: &[u8]) {
    check_header(data, data.len());
    if data.len() >= 8 {
        let mut len = [0u8; 8];
        len.copy_from_slice(&data[..8]);
        if let Ok(len) = usize::try_from(u64::from_le_bytes(len)) {
            check_header(&data[8..], len);
        }
    }
}

/// A peer's card as read from the store ([`Card::decode`]).
pub fn card(data: &[u8]) {
    if let Ok(c) = Card::decode(data) {
        let again = c
            .encode()
            .unwrap_or_else(|e| panic!("decoded card {c:?} cannot be encoded: {e}"));
        assert_eq!(again, data, "decoded card {c:?} re-encodes differently");
    }
}

/// One store request frame body as the server decodes it.
pub fn store_request(data: &[u8]) {
    if let Ok(r) = Request::decode(data) {
        assert_eq!(
            r.encode(),
            data,
            "decoded request {r:?} re-encodes differently"
        );
    }
}

/// xorshift64*, for splitting inputs into pieces reproducibly.
fn next(x: &mut u64) -> u64 {
    *x ^= *x >> 12;
    *x ^= *x << 25;
    *x ^= *x >> 27;
    x.wrapping_mul(0x2545_F491_4F6C_DD1D)
}

/// What the frames of a byte stream are: complete frames, then either the length of the
/// first oversized frame or nothing (the rest is an incomplete frame).
fn reference_frames(mut b: &[u8]) -> (Vec<&[u8]>, Option<usize>) {
    let mut frames = Vec::new();
    while b.len() >= 4 {
        let len = u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize;
        if len > MAX_FRAME {
            return (frames, Some(len));
        }
        if b.len() < 4 + len {
            break;
        }
        frames.push(&b[4..4 + len]);
        b = &b[4 + len..];
    }
    (frames, None)
}

/// The server's frame splitter. The first input byte seeds how the rest is cut into the
/// pieces that successive socket reads would return.
pub fn store_frames(data: &[u8]) {
    let Some((&seed, stream)) = data.split_first() else {
        return;
    };
    let (want, want_err) = reference_frames(stream);
    let mut d = FrameDecoder::default();
    let mut got = Vec::new();
    let mut err = None;
    let mut x = u64::from(seed).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let (mut at, mut pushed) = (0, 0usize);
    'feed: while at < stream.len() {
        let piece = 1 + (next(&mut x) % 64) as usize;
        let end = (at + piece).min(stream.len());
        d.push(&stream[at..end]);
        pushed += end - at;
        at = end;
        assert!(
            d.capacity() <= 2 * pushed + 16,
            "frame buffer holds {} bytes after receiving {pushed}",
            d.capacity()
        );
        loop {
            match d.next_frame() {
                Ok(Some(f)) => got.push(f),
                Ok(None) => break,
                Err(len) => {
                    err = Some(len);
                    break 'feed;
                }
            }
        }
    }
    assert_eq!(err, want_err, "oversized frame refused differently");
    assert_eq!(got.len(), want.len(), "different number of frames");
    for (g, w) in got.iter().zip(&want) {
        assert_eq!(g.as_slice(), *w, "frame differs from the reference");
    }
}

thread_local! {
    static RUNTIME: RefCell<Option<tokio::runtime::Runtime>> = const { RefCell::new(None) };
}

/// One server connection whose client sends the input and then closes its side. The
/// server's replies must each be a well-formed reply frame, at most one per complete
/// request frame.
pub fn store_server(data: &[u8]) {
    let (frames, _) = reference_frames(data);
    let plain = serve_bytes(data, None);
    check_replies(&plain, frames.len());
    let token = StoreToken::new(FUZZ_TOKEN).expect("the fuzz token is valid");
    let guarded = serve_bytes(data, Some(token.clone()));
    let statuses = check_replies(&guarded, frames.len());
    if let Some(&first) = statuses.first() {
        let opened = matches!(
            frames.first().map(|f| Request::decode(f)),
            Some(Ok(Request::HelloAuth { token: ref t, .. })) if token.matches(t)
        );
        if opened {
            assert_eq!(first, ST_VALUE, "the right HELLO_AUTH was not accepted");
        } else {
            assert_eq!(
                statuses,
                [ST_REFUSED],
                "a server with a token answered a connection that did not present it first"
            );
        }
    }
}

/// The server's replies to `data` (a client's bytes, then its side closed).
fn serve_bytes(data: &[u8], token: Option<StoreToken>) -> Vec<u8> {
    let mut out = Vec::new();
    RUNTIME.with(|rt| {
        let mut rt = rt.borrow_mut();
        let rt = rt.get_or_insert_with(|| {
            tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .build()
                .expect("a current-thread tokio runtime")
        });
        let stream = tokio::io::join(data, &mut out);
        rt.block_on(store::connection(
            stream,
            "fuzz".into(),
            Arc::new(Shared::new(token)),
            store::LIMITS,
            None,
        ));
    });
    out
}

/// Checks that `out` is a sequence of well-formed reply frames, at most `frames` of them,
/// with a refusal only as the last; returns their statuses.
fn check_replies(out: &[u8], frames: usize) -> Vec<u8> {
    let mut statuses = Vec::new();
    let mut r = out;
    while !r.is_empty() {
        let body = store::read_reply(&mut r)
            .unwrap_or_else(|e| panic!("server wrote a malformed reply frame: {e}"));
        assert!(
            matches!(
                body[0],
                ST_VALUE | ST_NOT_FOUND | ST_ERROR | ST_REFUSED | ST_INVALID
            ),
            "server wrote reply status {}",
            body[0]
        );
        assert!(
            statuses.last() != Some(&ST_REFUSED),
            "server replied after refusing the connection"
        );
        statuses.push(body[0]);
    }
    assert!(
        statuses.len() <= frames,
        "{} replies to {frames} request frames",
        statuses.len()
    );
    statuses
}

/// The client's reading of the server's replies: frames until the input ends or one is
/// refused.
pub fn store_reply(data: &[u8]) {
    let mut r = data;
    while let Ok(body) = store::read_reply(&mut r) {
        assert!(
            (1..=MAX_FRAME).contains(&body.len()),
            "reply of {} bytes accepted",
            body.len()
        );
        if let Ok((status, value)) = store::parse_reply("fuzz", body) {
            assert!(
                matches!(status, ST_VALUE | ST_NOT_FOUND),
                "reply status {status} accepted"
            );
            // A GATHER's value: accepted entries re-encode to exactly the value.
            if let Ok(entries) = store::decode_gathered(&value) {
                let again = store::encode_gathered(entries.iter().map(|(r, v)| (*r, v.as_slice())));
                assert_eq!(again, value, "gathered entries re-encode differently");
            }
        }
    }
}

fn frame(payload: &[u8]) -> Vec<u8> {
    let mut f = (payload.len() as u32).to_be_bytes().to_vec();
    f.extend_from_slice(payload);
    f
}

fn sample_cards() -> Vec<Card> {
    let v4 = Subnet::new(IpAddr::V4(Ipv4Addr::new(10, 0, 1, 17)), 24);
    let v6 = Subnet::new(IpAddr::V6(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 7)), 64);
    let ep = |transport, provider: &str, len: usize| EndpointCard {
        transport,
        provider: provider.into(),
        addr: (0..len).map(|i| i as u8).collect(),
    };
    vec![
        Card {
            rank: 0,
            host_id: "3f1c-boot/netns:4026531840".into(),
            endpoints: vec![
                ep(Transport::Shm, "shm", 16),
                ep(Transport::Fabric, "efa", 32),
                ep(Transport::Ip, "tcp", 16),
            ],
            fabric_subnet: v4,
            ip_subnet: v6,
            process: ProcessId::this(),
        },
        Card {
            rank: 7,
            host_id: "h".into(),
            endpoints: vec![ep(Transport::Ip, "tcp;ofi_rxm", 28)],
            fabric_subnet: None,
            ip_subnet: v4,
            process: ProcessId {
                pid: 4_194_303,
                start: u64::MAX,
                host: "h".repeat(255),
            },
        },
        Card {
            rank: u32::MAX,
            host_id: String::new(),
            endpoints: Vec::new(),
            fabric_subnet: None,
            ip_subnet: None,
            process: ProcessId::default(),
        },
    ]
}

fn hello_auth(rank: u32) -> Request {
    Request::HelloAuth {
        rank,
        token: FUZZ_TOKEN.as_bytes().to_vec(),
    }
}

fn sample_requests() -> Vec<Request> {
    vec![
        hello_auth(3),
        Request::Hello { rank: 3 },
        Request::Set {
            key: "efa/card/1".into(),
            value: sample_cards()[0].encode().expect("sample card encodes"),
        },
        Request::Get {
            key: "efa/card/0".into(),
            wait: Duration::ZERO,
        },
        Request::Get {
            key: "efa/card/1".into(),
            wait: Duration::from_millis(60_000),
        },
        Request::Publish {
            exchange: "efa/card".into(),
            rank: 1,
            world: 4,
            group: "host-a".into(),
            value: sample_cards()[0].encode().expect("sample card encodes"),
        },
        Request::Gather {
            exchange: "efa/card".into(),
            world: 4,
            members: crate::store::Members::Group("host-a".into()),
            wait: Duration::ZERO,
        },
        Request::Gather {
            exchange: "efa/card".into(),
            world: 4,
            members: crate::store::Members::All,
            wait: Duration::from_millis(10),
        },
        Request::Gather {
            exchange: "efa/ready".into(),
            world: 4,
            members: crate::store::Members::Nobody,
            wait: Duration::ZERO,
        },
        Request::Leave,
    ]
}

/// Valid encodings for `target`, to start a fuzzer from: real headers, cards, requests, a
/// rank's whole store session, and replies. Empty for an unknown target.
pub fn seeds(target: &str) -> Vec<Vec<u8>> {
    match target {
        "wire_header" => {
            let h = |kind, flags, len| Header {
                kind,
                flags,
                src: 3,
                tag: 0xBEEF,
                seq: 41,
                len,
                rndv: 99,
                ctx: 1,
            };
            let mut seeds = Vec::new();
            for (hdr, payload) in [
                (h(Kind::Eager, 0, 5), 5usize),
                (h(Kind::Eager, 0, 0), 0),
                (h(Kind::Rts, 0, 1 << 30), RTS_PAYLOAD),
                (h(Kind::Ack, ACK_TRUNCATED, 0), 0),
                (h(Kind::Credit, 0, 32), 0),
                (h(Kind::Fin, 0, 0), 0),
                (h(Kind::FinAck, 0, 0), 0),
                (h(Kind::Failed, FailCode::Exited as u8, 4242), 6),
                (h(Kind::Failed, FailCode::TimedOut as u8, 60_000), 0),
                (h(Kind::Ping, 0, 0), 0),
            ] {
                let mut b = vec![0xA5u8; HDR_LEN + payload];
                hdr.encode(&mut b);
                let mut with_len = ((HDR_LEN + payload) as u64).to_le_bytes().to_vec();
                with_len.extend_from_slice(&b);
                seeds.push(b);
                seeds.push(with_len);
            }
            seeds
        }
        "card" => sample_cards()
            .iter()
            .map(|c| c.encode().expect("sample card encodes"))
            .collect(),
        "store_request" => sample_requests().iter().map(Request::encode).collect(),
        "store_frames" | "store_server" => {
            let session: Vec<u8> = sample_requests()
                .iter()
                .flat_map(|r| frame(&r.encode()))
                .collect();
            let set_get: Vec<u8> = [
                Request::Hello { rank: 0 },
                Request::Set {
                    key: "k".into(),
                    value: b"v".to_vec(),
                },
                Request::Get {
                    key: "k".into(),
                    wait: Duration::from_millis(5),
                },
            ]
            .iter()
            .flat_map(|r| frame(&r.encode()))
            .collect();
            let mut seeds = vec![session, set_get];
            if target == "store_frames" {
                for s in &mut seeds {
                    s.insert(0, 7);
                }
            }
            seeds
        }
        "store_reply" => vec![
            frame(&[ST_VALUE]),
            frame(&[ST_NOT_FOUND]),
            [frame(b"\x00card bytes"), frame(b"\x02unknown opcode 9")].concat(),
            frame(b"\x03wrong EFA_STORE_TOKEN"),
            {
                let cards: Vec<Vec<u8>> = sample_cards()
                    .iter()
                    .map(|c| c.encode().expect("sample card encodes"))
                    .collect();
                let entries = cards.iter().enumerate().map(|(r, c)| (r as u32, &c[..]));
                let mut gathered = vec![ST_VALUE];
                gathered.extend(store::encode_gathered(entries));
                frame(&gathered)
            },
            frame(&[ST_NOT_FOUND, 0, 0, 0, 2, 0, 0, 0, 3]),
            frame(b"\x04\x00\x00\x00\x08job/cardan exchange among 5 ranks, but it was started among 4"),
        ],
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every seed passes its target (the oracles hold on valid input), and is accepted by
    /// its decoder, so that fuzzing starts from deep paths.
    #[test]
    fn seeds_are_valid_and_pass() {
        for &(name, f) in TARGETS {
            let seeds = seeds(name);
            assert!(!seeds.is_empty(), "no seeds for {name}");
            for s in &seeds {
                f(s);
            }
        }
        for s in seeds("card") {
            Card::decode(&s).unwrap();
        }
        for s in seeds("store_request") {
            Request::decode(&s).unwrap();
        }
        for s in seeds("wire_header").iter().step_by(2) {
            Header::decode(s, s.len()).unwrap();
        }
    }
}

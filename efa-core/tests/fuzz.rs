//! Fuzzing every decoder of bytes from outside the process (the targets of
//! `efa_core::fuzz`: wire header, card, the TCP store's requests, frames, server connection
//! and replies) with inputs that proptest generates on stable Rust.
//!
//! Inputs are structure-aware: mostly real encodings (the targets' seeds, and store sessions
//! built from random requests) with a few mutations each (bit flips, bytes, length-sized
//! integers set to boundary values such as 0, `MAX_FRAME + 1` or 2^63, truncation,
//! insertion, deletion, splicing), so that they pass the magic and version checks and reach
//! the deep paths; some are plain random bytes.
//!
//! `cargo test` runs a short pass: `EFA_FUZZ_INPUTS` inputs per target (default 3000).
//! `ci/fuzz` runs the long pass (10^6 inputs per target, release build) and the
//! coverage-guided AFL++ targets in `fuzz/`. A panic fails the test with the smallest input
//! proptest could shrink it to.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use efa_core::fuzz;
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestError, TestRunner};

/// Values that length and count fields are most likely to mishandle.
const INTERESTING: &[u64] = &[
    0,
    1,
    2,
    3,
    4,
    31,
    32,
    33,
    0x7f,
    0x80,
    0xff,
    0x100,
    1024,
    1025,
    0x7fff,
    0xffff,
    0x1_0000,
    (64 << 20) - 1,
    64 << 20,
    (64 << 20) + 1,
    0x7fff_ffff,
    0x8000_0000,
    0xffff_ffff,
    1 << 32,
    1 << 62,
    1 << 63,
    u64::MAX - 1,
    u64::MAX,
];

/// One mutation: (operation, position, value, bytes); positions wrap around the input.
type Mutation = (u8, usize, u64, Vec<u8>);

fn mutate(mut b: Vec<u8>, muts: &[Mutation], seeds: &[Vec<u8>]) -> Vec<u8> {
    for (op, pos, value, bytes) in muts {
        let at = if b.is_empty() { 0 } else { pos % b.len() };
        match op % 9 {
            0 if !b.is_empty() => b[at] ^= 1 << (value % 8),
            1 if !b.is_empty() => b[at] = *value as u8,
            2 | 3 => {
                // An integer of 1, 2, 4 or 8 bytes, either byte order, often a boundary value.
                let width = 1usize << (value % 4);
                let v = if value & 0x10 == 0 {
                    INTERESTING[(*value as usize >> 5) % INTERESTING.len()]
                } else {
                    *value >> 5
                };
                let le = v.to_le_bytes();
                let be = v.to_be_bytes();
                let src: Vec<u8> = if op % 9 == 2 {
                    le[..width].to_vec()
                } else {
                    be[8 - width..].to_vec()
                };
                for (i, &x) in src.iter().enumerate() {
                    if let Some(slot) = b.get_mut(at + i) {
                        *slot = x;
                    }
                }
            }
            4 => b.truncate(at),
            5 => {
                let tail = b.split_off(at.min(b.len()));
                b.extend_from_slice(bytes);
                b.extend_from_slice(&tail);
            }
            6 if !b.is_empty() => {
                let end = (at + 1 + (*value as usize % 16)).min(b.len());
                b.drain(at..end);
            }
            7 => {
                // Splice: the head of this input, the tail of another seed.
                let other = &seeds[*value as usize % seeds.len()];
                let from = if other.is_empty() {
                    0
                } else {
                    (*value as usize >> 8) % other.len()
                };
                b.truncate(at);
                b.extend_from_slice(&other[from..]);
            }
            _ if !b.is_empty() => {
                // Duplicate a slice in place.
                let end = (at + 1 + (*value as usize % 32)).min(b.len());
                let dup = b[at..end].to_vec();
                let tail = b.split_off(end);
                b.extend_from_slice(&dup);
                b.extend_from_slice(&tail);
            }
            _ => b.extend_from_slice(bytes),
        }
    }
    b
}

fn be_frame(payload: &[u8]) -> Vec<u8> {
    let mut f = (payload.len() as u32).to_be_bytes().to_vec();
    f.extend_from_slice(payload);
    f
}

/// A store request body written here, independently of the crate's encoder.
fn request() -> impl Strategy<Value = Vec<u8>> {
    let key = prop_oneof![
        (0u32..64).prop_map(|r| format!("efa/card/{r}")),
        "[a-z/0-9]{0,12}".prop_map(String::from),
        (1020usize..1030).prop_map(|n| "k".repeat(n)),
    ];
    prop_oneof![
        any::<u32>().prop_map(|r| [&[1u8][..], &r.to_be_bytes()].concat()),
        (key.clone(), vec(any::<u8>(), 0..64)).prop_map(|(k, v)| {
            [
                &[2u8][..],
                &(k.len() as u32).to_be_bytes(),
                k.as_bytes(),
                &v,
            ]
            .concat()
        }),
        (key, prop_oneof![Just(0u64), 0u64..20, any::<u64>()]).prop_map(|(k, w)| {
            [
                &[3u8][..],
                &(k.len() as u32).to_be_bytes(),
                k.as_bytes(),
                &w.to_be_bytes(),
            ]
            .concat()
        }),
        Just(vec![4u8]),
        // HELLO_AUTH: the token the fuzz server holds, or another one (up to a little over
        // the longest the server takes).
        (
            any::<u32>(),
            prop_oneof![
                Just(fuzz::FUZZ_TOKEN.as_bytes().to_vec()),
                vec(any::<u8>(), 0..270),
            ]
        )
            .prop_map(|(r, t)| [&[5u8][..], &r.to_be_bytes(), &t].concat()),
    ]
}

/// The inputs for target `name`.
fn inputs(name: &'static str) -> BoxedStrategy<Vec<u8>> {
    let seeds = fuzz::seeds(name);
    assert!(!seeds.is_empty(), "no seeds for {name}");
    let mutation = (
        any::<u8>(),
        any::<usize>(),
        any::<u64>(),
        vec(any::<u8>(), 0..12),
    );
    let s2 = seeds.clone();
    let mutated = (0..seeds.len(), vec(mutation.clone(), 0..6))
        .prop_map(move |(i, m)| mutate(s2[i].clone(), &m, &s2))
        .boxed();
    let random = vec(any::<u8>(), 0..160).boxed();
    match name {
        "store_request" => {
            let s3 = seeds.clone();
            let generated = (request(), vec(mutation, 0..3))
                .prop_map(move |(r, m)| mutate(r, &m, &s3))
                .boxed();
            prop_oneof![6 => mutated, 3 => generated, 1 => random].boxed()
        }
        "store_frames" | "store_server" | "store_reply" => {
            let s3 = seeds.clone();
            let frames: BoxedStrategy<Vec<u8>> = if name == "store_reply" {
                vec((0u8..5, vec(any::<u8>(), 0..40)), 0..6)
                    .prop_map(|rs| {
                        rs.iter()
                            .flat_map(|(st, body)| be_frame(&[&[*st][..], body].concat()))
                            .collect()
                    })
                    .boxed()
            } else {
                (any::<u8>(), vec(request(), 0..8))
                    .prop_map(move |(seed, rs)| {
                        let mut b = if name == "store_frames" {
                            vec![seed]
                        } else {
                            Vec::new()
                        };
                        for r in rs {
                            b.extend_from_slice(&be_frame(&r));
                        }
                        b
                    })
                    .boxed()
            };
            let generated = (frames, vec(mutation, 0..4))
                .prop_map(move |(f, m)| mutate(f, &m, &s3))
                .boxed();
            prop_oneof![5 => mutated, 4 => generated, 1 => random].boxed()
        }
        _ => prop_oneof![9 => mutated, 1 => random].boxed(),
    }
}

/// How many inputs to run per target: `EFA_FUZZ_INPUTS`, default a short pass.
fn budget() -> u64 {
    match std::env::var("EFA_FUZZ_INPUTS") {
        Ok(v) => v
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("EFA_FUZZ_INPUTS={v:?} is not a number of inputs")),
        Err(_) => 3000,
    }
}

/// An optional time limit per target (`EFA_FUZZ_SECONDS`): the run stops at whichever of
/// the input budget and the time limit comes first.
fn time_limit() -> Option<Duration> {
    std::env::var("EFA_FUZZ_SECONDS").ok().map(|v| {
        Duration::from_secs(
            v.trim()
                .parse()
                .unwrap_or_else(|_| panic!("EFA_FUZZ_SECONDS={v:?} is not a number of seconds")),
        )
    })
}

fn run(name: &'static str) {
    let target = fuzz::target(name).expect("known target");
    let total = budget();
    let limit = time_limit();
    let ran = AtomicU64::new(0);
    let started = Instant::now();
    let strategy = inputs(name);
    // Batches, so that a time limit can end the run between them.
    const BATCH: u64 = 50_000;
    let mut batch_no = 0u64;
    while ran.load(Ordering::Relaxed) < total {
        if limit.is_some_and(|l| started.elapsed() >= l) {
            break;
        }
        let cases = (total - ran.load(Ordering::Relaxed)).min(BATCH) as u32;
        let config = Config {
            cases,
            failure_persistence: None,
            max_shrink_iters: 2000,
            // Every batch draws new inputs, reproducibly.
            rng_algorithm: proptest::test_runner::RngAlgorithm::ChaCha,
            ..Config::default()
        };
        let mut seed = [0u8; 32];
        seed[..8].copy_from_slice(&batch_no.to_le_bytes());
        seed[8..16].copy_from_slice(&(name.len() as u64).to_le_bytes());
        seed[16..16 + name.len().min(16)].copy_from_slice(&name.as_bytes()[..name.len().min(16)]);
        let rng = proptest::test_runner::TestRng::from_seed(
            proptest::test_runner::RngAlgorithm::ChaCha,
            &seed,
        );
        let mut runner = TestRunner::new_with_rng(config, rng);
        let result = runner.run(&strategy, |input| {
            ran.fetch_add(1, Ordering::Relaxed);
            target(&input);
            Ok::<(), TestCaseError>(())
        });
        match result {
            Ok(()) => {}
            Err(TestError::Fail(why, input)) => {
                println!(
                    "fuzz {name}: {} inputs, 1 panic: {why}; smallest input ({} bytes): {input:02x?}",
                    ran.load(Ordering::Relaxed),
                    input.len()
                );
                panic!("fuzz target {name} panicked: {why}; input {input:02x?}");
            }
            Err(e) => panic!("fuzz target {name}: {e}"),
        }
        batch_no += 1;
    }
    let n = ran.load(Ordering::Relaxed);
    println!(
        "fuzz {name}: {n} inputs, 0 panics, {:.1} s",
        started.elapsed().as_secs_f64()
    );
    assert!(n > 0, "fuzz target {name} ran no input");
}

#[test]
fn fuzz_wire_header() {
    run("wire_header");
}

#[test]
fn fuzz_card() {
    run("card");
}

#[test]
fn fuzz_store_request() {
    run("store_request");
}

#[test]
fn fuzz_store_frames() {
    run("store_frames");
}

#[test]
fn fuzz_store_server() {
    run("store_server");
}

#[test]
fn fuzz_store_reply() {
    run("store_reply");
}

/// The mutator itself reaches boundary lengths: a length field set to `MAX_FRAME + 1` and
/// to 2^63 both occur among a few thousand mutated store frames.
#[test]
fn mutations_reach_boundary_lengths() {
    let strategy = inputs("store_frames");
    let mut runner = TestRunner::deterministic();
    let (mut over_frame, mut huge) = (false, false);
    for _ in 0..20_000 {
        let b = strategy.new_tree(&mut runner).unwrap().current();
        for w in b.windows(4) {
            over_frame |= u32::from_be_bytes([w[0], w[1], w[2], w[3]]) == (64 << 20) + 1;
        }
        for w in b.windows(8) {
            let mut a = [0u8; 8];
            a.copy_from_slice(w);
            huge |= u64::from_le_bytes(a) == 1 << 63 || u64::from_be_bytes(a) == 1 << 63;
        }
    }
    assert!(
        over_frame && huge,
        "MAX_FRAME + 1: {over_frame}, 2^63: {huge}"
    );
}

//! Collective tests: real multi-process jobs started by `efarun` (world sizes 1 to 8,
//! oversubscribed on small machines), each rank running one of the `#[ignore]`d child tests
//! of this file. Results are checked against a serial reference computed locally from every
//! rank's deterministic input.

use std::time::{Duration, Instant};

use efa_core::coll::kernel::reference;
use efa_core::{Algorithm, CollConfig, Communicator, Element, Error, ReduceOp};
use half::{bf16, f16};

mod common;
use common::{assert_routes, fabric_present, in_job, skip_test};

/// Runs child `name` as `n` ranks (deadline 60 s each call).
fn efarun(n: u32, name: &str, env: &[(&str, &str)]) -> std::process::Output {
    // The default first, so that a test's own EFA_TIMEOUT wins.
    let mut all = vec![("EFA_TIMEOUT", "60")];
    all.extend_from_slice(env);
    let env = all;
    common::efarun(n, name, &env)
}

trait TestElem: Element + PartialEq + std::fmt::Debug {
    fn from_i(v: i64) -> Self;
    const SIGNED: bool;
}
macro_rules! te {
    ($($t:ty, $s:expr, $f:expr);*) => {$(
        impl TestElem for $t {
            fn from_i(v: i64) -> Self { ($f)(v) }
            const SIGNED: bool = $s;
        }
    )*};
}
te!(i8, true, |v| v as i8; u8, false, |v| v as u8; i32, true, |v| v as i32;
    u32, false, |v| v as u32; i64, true, |v| v; u64, false, |v| v as u64;
    f32, true, |v| v as f32; f64, true, |v| v as f64;
    f16, true, |v| f16::from_f32(v as f32); bf16, true, |v| bf16::from_f32(v as f32));

/// Rank `r`'s input: values for which every reduction order gives the exact same result.
fn input<T: TestElem>(r: u32, count: usize, op: ReduceOp, salt: usize) -> Vec<T> {
    (0..count)
        .map(|i| {
            let k = r as usize * 31 + i * 7 + salt;
            let v = match (op, T::SIGNED) {
                (ReduceOp::Prod, true) => [1, 2, -1][k % 3],
                (ReduceOp::Prod, false) => [1, 2][k % 2],
                (_, true) => (k % 16) as i64 - 8,
                (_, false) => (k % 16) as i64,
            };
            T::from_i(v)
        })
        .collect()
}

fn fnv(b: &[u8]) -> u64 {
    b.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &x| {
        (h ^ x as u64).wrapping_mul(0x100_0000_01b3)
    })
}

/// Every rank got the same bytes.
fn same_everywhere(comm: &Communicator, bytes: &[u8]) {
    let h = [fnv(bytes)];
    let mut all = vec![0u64; comm.size() as usize];
    comm.allgather_into(&h, &mut all).unwrap();
    assert!(
        all.iter().all(|&x| x == h[0]),
        "results differ between ranks: {all:x?}"
    );
}

const OPS: [ReduceOp; 5] = [
    ReduceOp::Sum,
    ReduceOp::Prod,
    ReduceOp::Min,
    ReduceOp::Max,
    ReduceOp::Avg,
];
const COUNTS: [usize; 5] = [0, 1, 7, 1000, 1021];

fn check_type<T: TestElem>(comm: &Communicator, name: &str) -> usize {
    let (me, n) = (comm.rank(), comm.size());
    let mut checks = 0;
    for algo in [Algorithm::RecursiveDoubling, Algorithm::Ring] {
        let cfg = CollConfig {
            algorithm: algo,
            chunk_bytes: 1024, // several chunks per block: exercises pipelining
            ..CollConfig::default()
        };
        for op in OPS {
            for count in COUNTS {
                let inputs: Vec<Vec<T>> = (0..n).map(|r| input(r, count, op, 0)).collect();
                let want = reference(&inputs, op);
                let mut buf = inputs[me as usize].clone();
                comm.allreduce_with(&mut buf, op, &cfg).unwrap();
                assert!(
                    bytemuck::cast_slice::<T, u8>(&buf) == bytemuck::cast_slice::<T, u8>(&want),
                    "{name} {op:?} {algo:?} count {count} n {n}: {:?} vs {:?}",
                    &buf[..count.min(8)],
                    &want[..count.min(8)]
                );
                checks += 1;
            }
        }
    }
    // Out of place (auto algorithm), and reduce to a root, both in place and out of place.
    for op in OPS {
        for count in [0usize, 7, 1021] {
            let inputs: Vec<Vec<T>> = (0..n).map(|r| input(r, count, op, 3)).collect();
            let want = reference(&inputs, op);
            let mut out = vec![T::from_i(0); count];
            comm.allreduce_into(&inputs[me as usize], &mut out, op)
                .unwrap();
            assert!(bytemuck::cast_slice::<T, u8>(&out) == bytemuck::cast_slice::<T, u8>(&want));
            let root = (count as u32) % n;
            let mut out = vec![T::from_i(0); count];
            comm.reduce_into(&inputs[me as usize], &mut out, op, root)
                .unwrap();
            if me == root {
                assert!(
                    bytemuck::cast_slice::<T, u8>(&out) == bytemuck::cast_slice::<T, u8>(&want),
                    "{name} reduce {op:?}"
                );
            }
            let mut b = inputs[me as usize].clone();
            comm.reduce(&mut b, op, root).unwrap();
            if me == root {
                assert!(
                    bytemuck::cast_slice::<T, u8>(&b) == bytemuck::cast_slice::<T, u8>(&want),
                    "{name} reduce in place {op:?}"
                );
            }
            // Reduce-scatter of n blocks of `count / 7 + 1`.
            let c = count / 7 + 1;
            let inputs: Vec<Vec<T>> = (0..n).map(|r| input(r, c * n as usize, op, 5)).collect();
            let want = reference(&inputs, op);
            let mut out = vec![T::from_i(0); c];
            comm.reduce_scatter_into(&inputs[me as usize], &mut out, op)
                .unwrap();
            let mine = &want[me as usize * c..(me as usize + 1) * c];
            assert!(
                bytemuck::cast_slice::<T, u8>(&out) == bytemuck::cast_slice::<T, u8>(mine),
                "{name} reduce_scatter {op:?}"
            );
            checks += 4;
        }
    }
    println!("rank {me}: {name}: {checks} reductions verified");
    checks
}

fn check_movement(comm: &Communicator) {
    let (me, n) = (comm.rank(), comm.size());
    let nu = n as usize;
    let val = |r: u32, i: usize| (r as u64) << 32 | i as u64;
    for count in COUNTS {
        for root in [0, n - 1] {
            // Broadcast, both algorithms (the threshold switches at 64 KiB).
            for len in [count, count + 9000] {
                let mut b: Vec<u64> = if me == root {
                    (0..len).map(|i| val(root, i)).collect()
                } else {
                    vec![0; len]
                };
                comm.broadcast(&mut b, root).unwrap();
                assert!(
                    b.iter().enumerate().all(|(i, &x)| x == val(root, i)),
                    "broadcast {len}"
                );
            }
            // Gather / scatter, out of place and in place.
            let mine: Vec<u64> = (0..count).map(|i| val(me, i)).collect();
            let all: Vec<u64> = (0..n)
                .flat_map(|r| (0..count).map(move |i| val(r, i)))
                .collect();
            let mut g = vec![0u64; if me == root { count * nu } else { 0 }];
            comm.gather_into(&mine, &mut g, root).unwrap();
            if me == root {
                assert_eq!(g, all, "gather");
            }
            let mut g = if me == root {
                let mut v = vec![0u64; count * nu];
                v[me as usize * count..(me as usize + 1) * count].copy_from_slice(&mine);
                v
            } else {
                mine.clone()
            };
            comm.gather(&mut g, root).unwrap();
            if me == root {
                assert_eq!(g, all, "gather in place");
            }
            let mut s = vec![0u64; count];
            comm.scatter_into(if me == root { &all } else { &[] }, &mut s, root)
                .unwrap();
            assert_eq!(s, mine, "scatter");
            let mut s = if me == root {
                all.clone()
            } else {
                vec![0u64; count]
            };
            comm.scatter(&mut s, root).unwrap();
            if me != root {
                assert_eq!(s, mine, "scatter in place");
            }
        }
        // Allgather (equal), in place, and variable sizes.
        let mine: Vec<u64> = (0..count).map(|i| val(me, i)).collect();
        let all: Vec<u64> = (0..n)
            .flat_map(|r| (0..count).map(move |i| val(r, i)))
            .collect();
        let mut g = vec![0u64; count * nu];
        comm.allgather_into(&mine, &mut g).unwrap();
        assert_eq!(g, all, "allgather");
        let mut g = vec![0u64; count * nu];
        g[me as usize * count..(me as usize + 1) * count].copy_from_slice(&mine);
        comm.allgather(&mut g).unwrap();
        assert_eq!(g, all, "allgather in place");
        let counts: Vec<usize> = (0..nu).map(|r| (count + r * 5) % 11).collect();
        let mine: Vec<u64> = (0..counts[me as usize]).map(|i| val(me, i)).collect();
        let all: Vec<u64> = (0..n)
            .flat_map(|r| (0..counts[r as usize]).map(move |i| val(r, i)))
            .collect();
        let mut g = vec![0u64; all.len()];
        comm.allgatherv_into(&mine, &mut g, &counts).unwrap();
        assert_eq!(g, all, "allgatherv");
        // Alltoall: block d of rank s is (s, d, i).
        let c = count % 13;
        let a2a = |s: u32, d: usize, i: usize| (s as u64) << 40 | (d as u64) << 20 | i as u64;
        let send: Vec<u64> = (0..nu * c)
            .map(|k| a2a(me, k / c.max(1), k % c.max(1)))
            .collect();
        let want: Vec<u64> = (0..nu * c)
            .map(|k| a2a((k / c.max(1)) as u32, me as usize, k % c.max(1)))
            .collect();
        let mut got = vec![0u64; nu * c];
        comm.alltoall_into(&send, &mut got).unwrap();
        assert_eq!(got, want, "alltoall");
        let mut b = send.clone();
        comm.alltoall(&mut b).unwrap();
        assert_eq!(b, want, "alltoall in place");
    }
    // Non-blocking forms, several in flight at once.
    let r1 = comm.iallreduce(vec![me as u64 + 1; 5000], ReduceOp::Sum);
    let r2 = comm.ibroadcast(vec![me; 3], 0);
    let r3 = comm.ibarrier();
    let r4 = comm.iallgather({
        let mut v = vec![0u32; nu];
        v[me as usize] = me * 10;
        v
    });
    let r5 = comm.ireduce(vec![1i32; 10], ReduceOp::Sum, n - 1);
    let r6 = comm.ireduce_scatter(vec![2i64; 2 * nu], ReduceOp::Prod);
    let r7 = comm.ialltoall((0..nu as u32).map(|d| me * 100 + d).collect());
    let total = (n as u64) * (n as u64 + 1) / 2;
    assert!(r1.wait().unwrap().iter().all(|&x| x == total));
    assert_eq!(r2.wait().unwrap(), vec![0; 3]);
    r3.wait().unwrap();
    assert_eq!(
        r4.wait().unwrap(),
        (0..n).map(|r| r * 10).collect::<Vec<_>>()
    );
    let red = r5.wait().unwrap();
    if me == n - 1 {
        assert!(red.iter().all(|&x| x == n as i32));
    }
    let rs = r6.wait().unwrap();
    assert!(rs[2 * me as usize..2 * me as usize + 2]
        .iter()
        .all(|&x| x == 2i64.pow(n)));
    assert_eq!(
        r7.wait().unwrap(),
        (0..n).map(|s| s * 100 + me).collect::<Vec<_>>()
    );
    comm.barrier().unwrap();
    println!("rank {me}: data movement verified");
}

/// Every op and type against the serial reference, every collective, bitwise identity.
#[test]
#[ignore = "rank program for collectives_match_reference"]
fn child_reference() {
    if !in_job() {
        return;
    }
    let comm = Communicator::init().unwrap();
    let n = comm.size();
    for peer in (0..n).filter(|&p| p != comm.rank()) {
        let r = comm.route(peer).unwrap();
        let provider = comm.provider(r.transport).unwrap_or("?");
        println!(
            "route {}->{peer}: {} via {provider} ({r})",
            comm.rank(),
            r.transport
        );
    }
    let all = std::env::var("COLL_ALL_TYPES").is_ok();
    let mut checks = 0;
    checks += check_type::<f32>(&comm, "f32");
    checks += check_type::<f16>(&comm, "f16");
    checks += check_type::<i32>(&comm, "i32");
    checks += check_type::<u8>(&comm, "u8");
    if all {
        checks += check_type::<i8>(&comm, "i8");
        checks += check_type::<u32>(&comm, "u32");
        checks += check_type::<i64>(&comm, "i64");
        checks += check_type::<u64>(&comm, "u64");
        checks += check_type::<f64>(&comm, "f64");
        checks += check_type::<bf16>(&comm, "bf16");
    }
    // Inexact floats: every rank still gets bitwise the same result, with every algorithm.
    for algo in [Algorithm::RecursiveDoubling, Algorithm::Ring] {
        let cfg = CollConfig {
            algorithm: algo,
            chunk_bytes: 4096,
            ..CollConfig::default()
        };
        for count in [1usize, 1021, 100_003] {
            let mut b: Vec<f32> = (0..count)
                .map(|i| ((i as f32 + 0.1) * (comm.rank() as f32 + 1.3)).sin() * 1e3)
                .collect();
            comm.allreduce_with(&mut b, ReduceOp::Sum, &cfg).unwrap();
            same_everywhere(&comm, bytemuck::cast_slice(&b));
            let mut h: Vec<bf16> = (0..count)
                .map(|i| bf16::from_f32((i as f32 * 0.37).cos()))
                .collect();
            comm.allreduce_with(&mut h, ReduceOp::Avg, &cfg).unwrap();
            same_everywhere(&comm, bytemuck::cast_slice(&h));
        }
    }
    check_movement(&comm);
    println!(
        "rank {}: all collectives verified ({checks} reductions, n={n})",
        comm.rank()
    );
}

/// Runs the reference job on `n` ranks; returns its output.
fn run_reference(n: u32, env: &[(&str, &str)]) -> String {
    let t = Instant::now();
    let out = efarun(n, "child_reference", env);
    assert!(out.status.success(), "efarun -n {n} failed");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(
        text.matches("all collectives verified").count(),
        n as usize,
        "n={n}"
    );
    println!("n={n}: {:?}", t.elapsed());
    text
}

#[test]
fn collectives_match_reference_all_types_1_to_4() {
    for n in 1..=4 {
        run_reference(n, &[("COLL_ALL_TYPES", "1")]);
    }
}

#[test]
fn collectives_match_reference_5_to_8() {
    for n in 5..=8 {
        run_reference(n, &[]);
    }
}

#[test]
fn collectives_over_tcp_only() {
    let text = run_reference(3, &[("EFA_TRANSPORTS", "ip")]);
    assert_routes(&text, 3, "ip");
}

/// The fabric route (verbs in the soft-RoCE VM, efa on EC2); skipped with a reason elsewhere.
#[test]
fn collectives_on_the_fabric() {
    let provider = match fabric_present() {
        Ok(p) => p,
        Err(why) => {
            skip_test(&why);
            return;
        }
    };
    let text = run_reference(2, &[("EFA_TRANSPORTS", "fabric")]);
    assert_routes(&text, 2, "fabric");
    assert!(
        text.contains(&format!("fabric via {provider} (")),
        "the fabric route must use {provider}:\n{text}"
    );
}

/// Mismatched lengths, operators and types: every rank gets an error, none hangs, and the
/// communicator still works afterwards.
#[test]
#[ignore = "rank program for mismatches_fail_on_every_rank"]
fn child_mismatch() {
    if !in_job() {
        return;
    }
    let comm = Communicator::init().unwrap();
    let me = comm.rank();
    let odd = me == 1;
    let t = Instant::now();
    let mut b = vec![1f32; if odd { 11 } else { 10 }];
    let e = comm.allreduce(&mut b, ReduceOp::Sum).unwrap_err();
    println!("rank {me}: length: {e}");
    assert!(matches!(e, Error::Protocol { .. }), "{e:?}");
    let mut b = vec![1f32; 5000];
    let op = if odd { ReduceOp::Max } else { ReduceOp::Sum };
    let e = comm.allreduce(&mut b, op).unwrap_err();
    println!("rank {me}: op: {e}");
    assert!(
        e.to_string().contains("op max") && e.to_string().contains("op sum"),
        "{e}"
    );
    let e = if odd {
        comm.allreduce(&mut [1i32; 4], ReduceOp::Sum).unwrap_err()
    } else {
        comm.allreduce(&mut [1f32; 4], ReduceOp::Sum).unwrap_err()
    };
    println!("rank {me}: type: {e}");
    assert!(
        e.to_string().contains("i32") && e.to_string().contains("f32"),
        "{e}"
    );
    // Different collectives.
    let e = if odd {
        comm.broadcast(&mut [0u8; 4], 0).unwrap_err()
    } else {
        comm.allreduce(&mut [0u8; 4], ReduceOp::Sum).unwrap_err()
    };
    println!("rank {me}: kind: {e}");
    // A bad buffer on one rank only.
    let mut out = vec![0f32; if odd { 3 } else { 4 }];
    let e = comm
        .allreduce_into(&[1f32; 4], &mut out, ReduceOp::Sum)
        .unwrap_err();
    println!("rank {me}: into: {e}");
    let mut g = vec![0u32; 4 * comm.size() as usize + usize::from(odd)];
    comm.allgather_into(&[1u32; 4], &mut g).unwrap_err();
    let e = comm
        .broadcast(&mut [0u8; 4], if odd { 0 } else { 1 })
        .unwrap_err();
    println!("rank {me}: root: {e}");
    assert!(
        t.elapsed() < Duration::from_secs(20),
        "took {:?}",
        t.elapsed()
    );
    // Still usable.
    let mut b = vec![1u64; 100];
    comm.allreduce(&mut b, ReduceOp::Sum).unwrap();
    assert!(b.iter().all(|&x| x == comm.size() as u64));
    println!("rank {me}: mismatches reported");
}

#[test]
fn mismatches_fail_on_every_rank() {
    for n in [2, 3, 5] {
        let out = efarun(n, "child_mismatch", &[]);
        assert!(out.status.success());
        assert_eq!(
            String::from_utf8_lossy(&out.stdout)
                .matches("mismatches reported")
                .count(),
            n as usize
        );
    }
}

/// Rank 2 exits before joining the second allreduce: the others fail within their
/// deadline, naming rank 2.
#[test]
#[ignore = "rank program for dead_rank_is_named"]
fn child_dead_rank() {
    if !in_job() {
        return;
    }
    let comm = Communicator::init().unwrap();
    let me = comm.rank();
    let big = std::env::var("COLL_BIG").is_ok();
    let len = if big { 1 << 20 } else { 10 };
    let mut b = vec![1f32; len];
    comm.allreduce(&mut b, ReduceOp::Sum).unwrap();
    if me == 2 {
        std::process::exit(0);
    }
    let t = Instant::now();
    let e = comm.allreduce(&mut b, ReduceOp::Sum).unwrap_err();
    println!("rank {me}: {e} after {:?}", t.elapsed());
    // Rank 2 exited without finalizing: the survivors see its pid gone (same host) and
    // name it long before the 3 s deadline.
    assert!(
        matches!(
            e,
            Error::PeerFailed {
                rank: 2,
                cause: efa_core::PeerFailure::Exited { .. }
            }
        ),
        "{e:?}"
    );
    // The liveness check runs every 100 ms; the bound leaves room for a loaded machine and
    // stays below the 3 s deadline.
    assert!(
        t.elapsed() < Duration::from_millis(2500),
        "took {:?}",
        t.elapsed()
    );
    println!("rank {me}: dead rank named");
}

#[test]
fn dead_rank_is_named() {
    for (n, big) in [(3, false), (4, true), (5, false)] {
        let mut env = vec![("EFA_TIMEOUT", "3")];
        if big {
            env.push(("COLL_BIG", "1"));
        }
        let out = efarun(n, "child_dead_rank", &env);
        assert!(out.status.success());
        assert_eq!(
            String::from_utf8_lossy(&out.stdout)
                .matches("dead rank named")
                .count(),
            n as usize - 1
        );
    }
}

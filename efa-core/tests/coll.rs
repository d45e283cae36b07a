//! Collective tests: real multi-process jobs started by `efarun` (world sizes 1 to 8,
//! oversubscribed on small machines), each rank running one of the `#[ignore]`d child tests
//! of this file. Results are checked against a serial reference computed locally from every
//! rank's deterministic input.

use std::time::{Duration, Instant};

use efa_core::coll::kernel::reference;
use efa_core::coll::ops::loc_reference;
use efa_core::coll::{CollError, LocOp, LocValue, UserOp, ValueIndex};
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
            // At most 2 chunks in flight: most sends wait in the queue, and receives into
            // ranges that queued sends still have to read force them out first.
            window_bytes: 0,
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
            window_bytes: 3 * 4096,
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
    // Small chunks and the smallest window: every collective's sends are queued.
    let text = run_reference(
        3,
        &[
            ("EFA_TRANSPORTS", "ip"),
            ("EFA_COLL_CHUNK", "4096"),
            ("EFA_COLL_WINDOW", "0"),
        ],
    );
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
    assert!(
        matches!(&e, Error::CollectiveMismatch { ranks, calls, .. }
            if ranks[0] != ranks[1] && calls[0] != calls[1]),
        "{e:?}"
    );
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

/// Rank 2 exits before joining the second collective (an allreduce, or as `COLL_KIND`
/// says a gatherv, a scan with a user op, or an alltoallv), once all have finished the first:
/// the others fail within their deadline, naming rank 2.
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
    // Rank 2 leaves only once every rank has finished the first allreduce (each tells it so):
    // else a survivor still inside it could see rank 2 gone and fail that one instead.
    const DONE: u32 = 77;
    if me == 2 {
        for r in (0..comm.size()).filter(|&r| r != 2) {
            comm.recv(&mut [0u8; 1], r, DONE).unwrap();
        }
        std::process::exit(0);
    }
    comm.send(&[1u8], 2, DONE).unwrap();
    let t = Instant::now();
    let nu = comm.size() as usize;
    // COLL_KIND picks the collective the survivors are in when rank 2 is gone.
    let e = match std::env::var("COLL_KIND").as_deref() {
        Ok("scan") => comm.scan(&mut b, mat_op_f32()).unwrap_err(),
        Ok("gatherv") => {
            let counts = vec![len; nu];
            let displs: Vec<usize> = (0..nu).map(|r| r * len).collect();
            let mut all = vec![0f32; if me == 0 { len * nu } else { len }];
            comm.gatherv(&mut all, &counts, &displs, 0).unwrap_err()
        }
        Ok("alltoallv") => {
            let c = vec![1usize; nu];
            let d: Vec<usize> = (0..nu).collect();
            comm.alltoallv(&mut vec![1f32; nu], &c, &d).unwrap_err()
        }
        _ => comm.allreduce(&mut b, ReduceOp::Sum).unwrap_err(),
    };
    println!("rank {me}: {e} after {:?}", t.elapsed());
    // Rank 2 exited without finalizing: the survivors see its pid gone (same host) and
    // name it long before the deadline (20 s: the same deadline covers start-up, which
    // took more than 3 s with several jobs at once on 2 cores).
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
    // stays far below the deadline, so a collective that only failed at its deadline
    // fails this test.
    assert!(
        t.elapsed() < Duration::from_millis(2500),
        "took {:?}",
        t.elapsed()
    );
    println!("rank {me}: dead rank named");
}

#[test]
fn dead_rank_is_named() {
    for (n, big, kind) in [
        (3, false, "allreduce"),
        (4, true, "allreduce"),
        (5, false, "allreduce"),
        (3, false, "gatherv"),
        (4, true, "scan"),
        (4, false, "alltoallv"),
    ] {
        let mut env = vec![("EFA_TIMEOUT", "20"), ("COLL_KIND", kind)];
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

// ---- gatherv / scatterv / alltoallv, scan / exscan, user-defined and location ops ----

/// A deterministic generator shared by every rank (same seed, same numbers).
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> usize {
        (self.next() % n.max(1)) as usize
    }
}

/// Counts (some 0) and displacements in a shuffled order with gaps; returns the buffer
/// length they need.
fn random_layout(rng: &mut Rng, n: usize, max: u64) -> (Vec<usize>, Vec<usize>, usize) {
    let counts: Vec<usize> = (0..n)
        .map(|_| {
            if rng.below(4) == 0 {
                0
            } else {
                rng.below(max + 1)
            }
        })
        .collect();
    let mut order: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        order.swap(i, rng.below(i as u64 + 1));
    }
    let mut displs = vec![0; n];
    let mut off = rng.below(3);
    for &r in &order {
        displs[r] = off;
        off += counts[r] + rng.below(3);
    }
    (counts, displs, off)
}

fn v_value(src: u32, dst: usize, i: usize) -> u64 {
    (src as u64) << 40 | (dst as u64) << 20 | i as u64
}

/// gatherv, scatterv, alltoallv and allgatherv (in place, out of place, non-blocking)
/// against a serial reference, for random layouts including empty blocks.
fn check_v(comm: &Communicator, rounds: u64) -> usize {
    let (me, n) = (comm.rank(), comm.size());
    let (m, nu) = (me as usize, n as usize);
    let mut checks = 0;
    for round in 0..rounds {
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ ((round + 1) * 0x1234_5678) ^ n as u64);
        let max = if round % 4 == 3 { 3000 } else { 9 };
        let root = rng.below(n as u64) as u32;
        let (counts, displs, len) = random_layout(&mut rng, nu, max);
        let block =
            |r: usize| -> Vec<u64> { (0..counts[r]).map(|i| v_value(r as u32, 0, i)).collect() };
        // The root's full buffer: each rank's block at its displacement, 7 elsewhere.
        let mut full = vec![7u64; len];
        for r in 0..nu {
            full[displs[r]..displs[r] + counts[r]].copy_from_slice(&block(r));
        }
        let mine = block(m);
        // gatherv_into.
        let mut recv = vec![7u64; if me == root { len } else { 0 }];
        comm.gatherv_into(&mine, &mut recv, &counts, &displs, root)
            .unwrap();
        if me == root {
            assert_eq!(recv, full, "gatherv_into round {round}");
        }
        // gatherv in place: the root's own block already there; non-roots pass no counts.
        let mut buf = if me == root {
            let mut b = vec![7u64; len];
            b[displs[m]..displs[m] + counts[m]].copy_from_slice(&mine);
            b
        } else {
            mine.clone()
        };
        let (c, d): (&[usize], &[usize]) = if me == root {
            (&counts, &displs)
        } else {
            (&[], &[])
        };
        comm.gatherv(&mut buf, c, d, root).unwrap();
        assert_eq!(
            buf,
            if me == root {
                full.clone()
            } else {
                mine.clone()
            },
            "gatherv"
        );
        // scatterv_into and scatterv.
        let mut got = vec![0u64; counts[m]];
        comm.scatterv_into(if me == root { &full } else { &[] }, &mut got, c, d, root)
            .unwrap();
        assert_eq!(got, mine, "scatterv_into round {round}");
        let mut buf = if me == root {
            full.clone()
        } else {
            vec![0u64; counts[m]]
        };
        comm.scatterv(&mut buf, c, d, root).unwrap();
        assert_eq!(
            buf,
            if me == root {
                full.clone()
            } else {
                mine.clone()
            },
            "scatterv"
        );
        // Non-blocking forms, both in flight at once.
        let g = comm.igatherv(
            if me == root {
                {
                    let mut b = vec![7u64; len];
                    b[displs[m]..displs[m] + counts[m]].copy_from_slice(&mine);
                    b
                }
            } else {
                mine.clone()
            },
            counts.clone(),
            displs.clone(),
            root,
        );
        let s = comm.iscatterv(
            if me == root {
                full.clone()
            } else {
                vec![0u64; counts[m]]
            },
            counts.clone(),
            displs.clone(),
            root,
        );
        assert_eq!(
            g.wait().unwrap(),
            if me == root {
                full.clone()
            } else {
                mine.clone()
            }
        );
        assert_eq!(
            s.wait().unwrap(),
            if me == root {
                full.clone()
            } else {
                mine.clone()
            }
        );
        // alltoallv: every rank's layout from the shared generator; rank s sends
        // cnt[s][d] elements to d.
        let layouts: Vec<(Vec<usize>, Vec<usize>, usize)> =
            (0..nu).map(|_| random_layout(&mut rng, nu, max)).collect();
        // 0 to 3 elements per pair, 0 to 1500 in the large rounds.
        let scale = if max > 9 { 500 } else { 1 };
        let cnt = |s: usize, d: usize| (s * 7 + d * 3 + round as usize) % 4 * scale;
        let sc: Vec<usize> = (0..nu).map(|d| cnt(m, d)).collect();
        let rc: Vec<usize> = (0..nu).map(|s| cnt(s, m)).collect();
        let sd: Vec<usize> = schedule_offsets(&sc, layouts[m].2 % 3);
        let rd: Vec<usize> = {
            // Receive blocks in reverse rank order, with a gap of one.
            let mut off = 1;
            let mut v = vec![0; nu];
            for s in (0..nu).rev() {
                v[s] = off;
                off += rc[s] + 1;
            }
            v
        };
        let slen = sd.iter().zip(&sc).map(|(a, b)| a + b).max().unwrap_or(0);
        let rlen = rd.iter().zip(&rc).map(|(a, b)| a + b).max().unwrap_or(0) + 1;
        let mut send = vec![9u64; slen];
        for d in 0..nu {
            for i in 0..sc[d] {
                send[sd[d] + i] = v_value(me, d, i);
            }
        }
        let mut want = vec![5u64; rlen];
        for s in 0..nu {
            for i in 0..rc[s] {
                want[rd[s] + i] = v_value(s as u32, m, i);
            }
        }
        let mut recv = vec![5u64; rlen];
        comm.alltoallv_into(&send, &sc, &sd, &mut recv, &rc, &rd)
            .unwrap();
        assert_eq!(recv, want, "alltoallv_into round {round}");
        // In place (counts symmetric: cnt(s, d) as counts for both directions needs
        // cnt(me, d) == cnt(d, me); use the symmetric part).
        let sym: Vec<usize> = (0..nu).map(|d| cnt(m.min(d), m.max(d))).collect();
        let sdis = schedule_offsets(&sym, 0);
        let total: usize = sym.iter().sum();
        let mut buf = vec![0u64; total];
        for d in 0..nu {
            for i in 0..sym[d] {
                buf[sdis[d] + i] = v_value(me, d, i);
            }
        }
        let mut want = vec![0u64; total];
        for s in 0..nu {
            for i in 0..sym[s] {
                want[sdis[s] + i] = v_value(s as u32, m, i);
            }
        }
        let b2 = buf.clone();
        comm.alltoallv(&mut buf, &sym, &sdis).unwrap();
        assert_eq!(buf, want, "alltoallv in place round {round}");
        let r = comm.ialltoallv(b2, sym.clone(), sdis.clone());
        assert_eq!(r.wait().unwrap(), want, "ialltoallv");
        // allgatherv in place and non-blocking.
        let total: usize = counts.iter().sum();
        let off: usize = counts[..m].iter().sum();
        let mut buf = vec![0u64; total];
        buf[off..off + counts[m]].copy_from_slice(&mine);
        let all: Vec<u64> = (0..nu).flat_map(block).collect();
        let r = comm.iallgatherv(buf.clone(), counts.clone());
        comm.allgatherv(&mut buf, &counts).unwrap();
        assert_eq!(buf, all, "allgatherv");
        assert_eq!(r.wait().unwrap(), all, "iallgatherv");
        checks += 12;
    }
    checks
}

/// Contiguous offsets after a lead of `start` elements.
fn schedule_offsets(counts: &[usize], start: usize) -> Vec<usize> {
    let mut off = start;
    counts
        .iter()
        .map(|&c| {
            off += c;
            off - c
        })
        .collect()
}

/// Scan and exscan, every op, against the serial reference of the ranks before.
fn check_scan<T: TestElem>(comm: &Communicator, name: &str) -> usize {
    let (me, n) = (comm.rank(), comm.size());
    let m = me as usize;
    let mut checks = 0;
    for op in OPS {
        for count in [0usize, 1, 7, 1021, 40_000] {
            let inputs: Vec<Vec<T>> = (0..n).map(|r| input(r, count, op, 11)).collect();
            let incl = reference(&inputs[..=m], op);
            let bytes = |v: &[T]| bytemuck::cast_slice::<T, u8>(v).to_vec();
            let mut b = inputs[m].clone();
            comm.scan(&mut b, op).unwrap();
            assert!(
                bytes(&b) == bytes(&incl),
                "{name} scan {op:?} count {count}"
            );
            let mut out = vec![T::from_i(0); count];
            comm.scan_into(&inputs[m], &mut out, op).unwrap();
            assert!(bytes(&out) == bytes(&incl), "{name} scan_into {op:?}");
            // Exscan: rank 0 untouched, in place and out of place.
            let excl = if me == 0 {
                inputs[0].clone()
            } else {
                reference(&inputs[..m], op)
            };
            let mut b = inputs[m].clone();
            comm.exscan(&mut b, op).unwrap();
            assert!(
                bytes(&b) == bytes(&excl),
                "{name} exscan {op:?} count {count}"
            );
            let marker = vec![T::from_i(3); count];
            let mut out = marker.clone();
            comm.exscan_into(&inputs[m], &mut out, op).unwrap();
            let want = if me == 0 { &marker } else { &excl };
            assert!(bytes(&out) == bytes(want), "{name} exscan_into {op:?}");
            let r1 = comm.iscan(inputs[m].clone(), op);
            let r2 = comm.iexscan(inputs[m].clone(), op);
            assert!(bytes(&r1.wait().unwrap()) == bytes(&incl));
            assert!(bytes(&r2.wait().unwrap()) == bytes(&excl));
            checks += 6;
        }
    }
    checks
}

type Mat = [u64; 4];

/// 2x2 matrix product (wrapping): associative, not commutative.
fn matmul(a: &Mat, b: &Mat) -> Mat {
    let m = |x: u64, y: u64| x.wrapping_mul(y);
    [
        m(a[0], b[0]).wrapping_add(m(a[1], b[2])),
        m(a[0], b[1]).wrapping_add(m(a[1], b[3])),
        m(a[2], b[0]).wrapping_add(m(a[3], b[2])),
        m(a[2], b[1]).wrapping_add(m(a[3], b[3])),
    ]
}

fn mat_op() -> UserOp<Mat> {
    UserOp::non_commutative(|acc: &mut [Mat], x: &[Mat]| {
        for (a, b) in acc.iter_mut().zip(x) {
            *a = matmul(a, b);
        }
    })
}

fn mat_input(r: u32, count: usize) -> Vec<Mat> {
    (0..count)
        .map(|i| {
            let k = (r as u64 + 3) * 0x9E37_79B9 + i as u64 * 77;
            [k % 5 + 1, k % 3, (k >> 3) % 4, k % 7 + 2]
        })
        .collect()
}

/// The left-to-right product of the inputs of ranks `ranks`.
fn mat_ref(inputs: &[Vec<Mat>]) -> Vec<Mat> {
    let mut out = inputs[0].clone();
    for x in &inputs[1..] {
        for (a, b) in out.iter_mut().zip(x) {
            *a = matmul(a, b);
        }
    }
    out
}

/// A non-commutative user op on `f32` (x ∘ y = x - y, not associative, but enough to
/// exercise the rank-ordered schedules' failure handling).
fn mat_op_f32() -> UserOp<f32> {
    UserOp::non_commutative(|acc: &mut [f32], x: &[f32]| {
        for (a, b) in acc.iter_mut().zip(x) {
            *a -= *b;
        }
    })
}

/// User-defined operators: a non-commutative one must be applied in rank order in every
/// reduction (even when the ring is asked for), a commutative one may use any schedule.
fn check_user_ops(comm: &Communicator) -> usize {
    let (me, n) = (comm.rank(), comm.size());
    let m = me as usize;
    let mut checks = 0;
    for algo in [
        Algorithm::Auto,
        Algorithm::Ring,
        Algorithm::RecursiveDoubling,
    ] {
        let cfg = CollConfig {
            algorithm: algo,
            ring_threshold: 1024,
            chunk_bytes: 1024,
            ..CollConfig::default()
        };
        for count in [0usize, 1, 5, 3001] {
            let inputs: Vec<Vec<Mat>> = (0..n).map(|r| mat_input(r, count)).collect();
            let all = mat_ref(&inputs);
            let mut b = inputs[m].clone();
            comm.allreduce_with(&mut b, mat_op(), &cfg).unwrap();
            assert_eq!(b, all, "matmul allreduce {algo:?} count {count}");
            for root in 0..n {
                let mut b = inputs[m].clone();
                comm.reduce(&mut b, mat_op(), root).unwrap();
                if me == root {
                    assert_eq!(b, all, "matmul reduce root {root} count {count}");
                }
            }
            let mut b = inputs[m].clone();
            comm.scan(&mut b, mat_op()).unwrap();
            assert_eq!(b, mat_ref(&inputs[..=m]), "matmul scan");
            let mut b = inputs[m].clone();
            comm.exscan(&mut b, mat_op()).unwrap();
            let want = if me == 0 {
                inputs[0].clone()
            } else {
                mat_ref(&inputs[..m])
            };
            assert_eq!(b, want, "matmul exscan");
            // Reduce-scatter of n blocks of count / 3 + 1.
            let c = count / 3 + 1;
            let ins: Vec<Vec<Mat>> = (0..n).map(|r| mat_input(r + 10, c * n as usize)).collect();
            let full = mat_ref(&ins);
            let mut out = vec![[0u64; 4]; c];
            comm.reduce_scatter_into(&ins[m], &mut out, mat_op())
                .unwrap();
            assert_eq!(out, full[m * c..(m + 1) * c], "matmul reduce_scatter");
            let r = comm.iallreduce(inputs[m].clone(), mat_op());
            assert_eq!(r.wait().unwrap(), all, "matmul iallreduce");
            checks += 5 + n as usize;
        }
        // A commutative user op on a struct-like type: wrapping sums of three fields.
        let add3 = UserOp::<[u32; 3]>::commutative(|acc, x| {
            for (a, b) in acc.iter_mut().zip(x) {
                for k in 0..3 {
                    a[k] = a[k].wrapping_add(b[k]);
                }
            }
        });
        let count = 5000;
        let v = |r: u32, i: usize| [r * 3 + i as u32, i as u32 ^ r, u32::MAX - r];
        let mut b: Vec<[u32; 3]> = (0..count).map(|i| v(me, i)).collect();
        comm.allreduce_with(&mut b, add3.clone(), &cfg).unwrap();
        for (i, x) in b.iter().enumerate() {
            let mut w = [0u32; 3];
            for r in 0..n {
                for (a, b) in w.iter_mut().zip(v(r, i)) {
                    *a = a.wrapping_add(b);
                }
            }
            assert_eq!(*x, w, "commutative user op element {i}");
        }
        checks += 1;
    }
    checks
}

/// MINLOC and MAXLOC over several value types, with many ties.
fn check_loc<V: TestElem + LocValue>(comm: &Communicator, name: &str) -> usize {
    let (me, n) = (comm.rank(), comm.size());
    let m = me as usize;
    let mut checks = 0;
    for count in [0usize, 1, 9, 2000] {
        // Values from a range of 3, so elements tie across ranks; the index is not the
        // rank, and the lowest index belongs to the highest rank.
        let inputs: Vec<Vec<ValueIndex<V>>> = (0..n)
            .map(|r| {
                (0..count)
                    .map(|i| {
                        // Even elements: the same value on every rank (a full tie);
                        // odd ones: 3 values over the ranks.
                        let k = (i * 7 + r as usize * (i % 2)) % 3;
                        ValueIndex::new(V::from_i(k as i64), ((n - r) * 100 + (i % 4) as u32) % 301)
                    })
                    .collect()
            })
            .collect();
        for op in [LocOp::MinLoc, LocOp::MaxLoc] {
            let want = loc_reference(&inputs, op);
            let mut b = inputs[m].clone();
            comm.allreduce(&mut b, op).unwrap();
            assert_eq!(b, want, "{name} {op:?} allreduce count {count}");
            let mut b = inputs[m].clone();
            comm.reduce(&mut b, op, n - 1).unwrap();
            if me == n - 1 {
                assert_eq!(b, want, "{name} {op:?} reduce");
            }
            let mut b = inputs[m].clone();
            comm.scan(&mut b, op).unwrap();
            assert_eq!(b, loc_reference(&inputs[..=m], op), "{name} {op:?} scan");
            checks += 3;
        }
    }
    checks
}

/// A 12-byte user type: data-movement collectives take any `Pod` element.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
struct P12 {
    a: u32,
    b: f32,
    c: i32,
}

/// A distinct value for element `i` from rank `r` (`salt` tells collectives apart).
trait PodElem: bytemuck::Pod + Send + PartialEq + std::fmt::Debug {
    fn make(r: u32, i: usize, salt: u32) -> Self;
}

impl PodElem for u16 {
    fn make(r: u32, i: usize, salt: u32) -> Self {
        (r * 4099 + i as u32 * 7 + salt * 131) as u16
    }
}

impl PodElem for [f32; 3] {
    fn make(r: u32, i: usize, salt: u32) -> Self {
        [r as f32, i as f32, salt as f32 + 0.25]
    }
}

impl PodElem for P12 {
    fn make(r: u32, i: usize, salt: u32) -> Self {
        P12 {
            a: r << 20 | i as u32,
            b: i as f32 * 0.5 + r as f32,
            c: -(salt as i32) - i as i32,
        }
    }
}

/// broadcast/gather/scatter/allgather/alltoall/gatherv (each form) of a non-`Element` `Pod`
/// type, against a serial reference built from every rank's deterministic input.
fn check_pod<T: PodElem>(comm: &Communicator, name: &str) -> usize {
    let (me, n) = (comm.rank(), comm.size());
    let nu = n as usize;
    let mut checks = 0;
    for count in [0usize, 1, 7, 3001] {
        let block = |r: u32, salt: u32| (0..count).map(move |i| T::make(r, i, salt));
        for root in [0, n - 1] {
            // Broadcast, blocking and non-blocking.
            let want: Vec<T> = block(root, 1).collect();
            let mut b: Vec<T> = if me == root {
                want.clone()
            } else {
                vec![T::zeroed(); count]
            };
            comm.broadcast(&mut b, root).unwrap();
            assert_eq!(b, want, "{name} broadcast {count}");
            let init = if me == root {
                want.clone()
            } else {
                vec![T::zeroed(); count]
            };
            assert_eq!(comm.ibroadcast(init, root).wait().unwrap(), want);
            // Gather.
            let mine: Vec<T> = block(me, 2).collect();
            let all: Vec<T> = (0..n).flat_map(|r| block(r, 2)).collect();
            let mut g = vec![T::zeroed(); if me == root { count * nu } else { 0 }];
            comm.gather_into(&mine, &mut g, root).unwrap();
            let mut gi = if me == root {
                let mut v = vec![T::zeroed(); count * nu];
                v[me as usize * count..(me as usize + 1) * count].copy_from_slice(&mine);
                v
            } else {
                mine.clone()
            };
            comm.gather(&mut gi, root).unwrap();
            let gn = comm.igather(gi.clone(), root).wait().unwrap();
            if me == root {
                assert_eq!(g, all, "{name} gather {count}");
                assert_eq!(gi, all, "{name} gather in place {count}");
                assert_eq!(gn, all, "{name} igather {count}");
            }
            // Scatter.
            let all: Vec<T> = (0..n).flat_map(|r| block(r, 3)).collect();
            let mine: Vec<T> = block(me, 3).collect();
            let mut s = vec![T::zeroed(); count];
            comm.scatter_into(if me == root { &all } else { &[] }, &mut s, root)
                .unwrap();
            assert_eq!(s, mine, "{name} scatter {count}");
            let si = if me == root {
                all.clone()
            } else {
                vec![T::zeroed(); count]
            };
            let si = comm.iscatter(si, root).wait().unwrap();
            if me != root {
                assert_eq!(si, mine, "{name} iscatter {count}");
            }
            // Gatherv: rank r sends (count + 3r) % 11 elements, at reversed displacements.
            let counts: Vec<usize> = (0..nu).map(|r| (count + 3 * r) % 11).collect();
            let mut displs = vec![0; nu];
            let mut at = 0;
            for r in (0..nu).rev() {
                displs[r] = at;
                at += counts[r] + 1;
            }
            let mine: Vec<T> = (0..counts[me as usize])
                .map(|i| T::make(me, i, 4))
                .collect();
            let mut want = vec![T::zeroed(); at];
            for r in 0..nu {
                for i in 0..counts[r] {
                    want[displs[r] + i] = T::make(r as u32, i, 4);
                }
            }
            let mut g = vec![T::zeroed(); if me == root { at } else { 0 }];
            let (c, d) = if me == root {
                (&counts[..], &displs[..])
            } else {
                (&[][..], &[][..])
            };
            comm.gatherv_into(&mine, &mut g, c, d, root).unwrap();
            if me == root {
                assert_eq!(g, want, "{name} gatherv {count}");
            }
            checks += 5;
        }
        // Allgather, out of place, in place, non-blocking.
        let mine: Vec<T> = block(me, 5).collect();
        let all: Vec<T> = (0..n).flat_map(|r| block(r, 5)).collect();
        let mut g = vec![T::zeroed(); count * nu];
        comm.allgather_into(&mine, &mut g).unwrap();
        assert_eq!(g, all, "{name} allgather {count}");
        let mut g = vec![T::zeroed(); count * nu];
        g[me as usize * count..(me as usize + 1) * count].copy_from_slice(&mine);
        assert_eq!(comm.iallgather(g).wait().unwrap(), all);
        // Alltoall: block d of rank s holds make(s, d * c + i).
        let c = count % 13;
        let send: Vec<T> = (0..nu * c).map(|k| T::make(me, k, 6)).collect();
        let want: Vec<T> = (0..nu * c)
            .map(|k| T::make((k / c.max(1)) as u32, me as usize * c + k % c.max(1), 6))
            .collect();
        let mut got = vec![T::zeroed(); nu * c];
        comm.alltoall_into(&send, &mut got).unwrap();
        assert_eq!(got, want, "{name} alltoall {count}");
        let mut b = send.clone();
        comm.alltoall(&mut b).unwrap();
        assert_eq!(b, want, "{name} alltoall in place {count}");
        assert_eq!(comm.ialltoall(send).wait().unwrap(), want);
        checks += 2;
    }
    println!("rank {me}: {name}: {checks} data movements verified");
    checks
}

#[test]
#[ignore = "rank program for new_collectives_match_reference"]
fn child_new_collectives() {
    if !in_job() {
        return;
    }
    let comm = Communicator::init().unwrap();
    let n = comm.size();
    for peer in (0..n).filter(|&p| p != comm.rank()) {
        let r = comm.route(peer).unwrap();
        println!("route {}->{peer}: {} ({r})", comm.rank(), r.transport);
    }
    let mut checks = check_v(&comm, 12);
    checks += check_scan::<i64>(&comm, "i64");
    checks += check_scan::<f32>(&comm, "f32");
    checks += check_scan::<f16>(&comm, "f16");
    checks += check_scan::<u8>(&comm, "u8");
    checks += check_user_ops(&comm);
    checks += check_loc::<f32>(&comm, "f32");
    checks += check_loc::<i32>(&comm, "i32");
    checks += check_loc::<u8>(&comm, "u8");
    checks += check_loc::<f64>(&comm, "f64");
    checks += check_loc::<bf16>(&comm, "bf16");
    checks += check_loc::<u64>(&comm, "u64");
    checks += check_pod::<u16>(&comm, "u16");
    checks += check_pod::<P12>(&comm, "P12");
    checks += check_pod::<[f32; 3]>(&comm, "[f32; 3]");
    comm.barrier().unwrap();
    println!(
        "rank {}: new collectives verified ({checks} checks, n={n})",
        comm.rank()
    );
}

fn run_new(n: u32, env: &[(&str, &str)]) -> String {
    let t = Instant::now();
    let out = efarun(n, "child_new_collectives", env);
    assert!(out.status.success(), "efarun -n {n} failed");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(
        text.matches("new collectives verified").count(),
        n as usize,
        "n={n}"
    );
    println!("n={n}: {:?}", t.elapsed());
    text
}

#[test]
fn new_collectives_match_reference_shm() {
    for n in 2..=4 {
        let text = run_new(n, &[]);
        assert_routes(&text, n, "shm");
    }
}

#[test]
fn new_collectives_match_reference_ip() {
    for n in [2, 4] {
        let text = run_new(n, &[("EFA_TRANSPORTS", "ip")]);
        assert_routes(&text, n, "ip");
    }
}

/// Bad counts and displacements: the rank that passed them gets the error saying which,
/// the others an error naming it, at once; no rank hangs, and the communicator still works.
#[test]
#[ignore = "rank program for bad_counts_fail_on_every_rank"]
fn child_bad_counts() {
    if !in_job() {
        return;
    }
    let comm = Communicator::init().unwrap();
    let (me, n) = (comm.rank(), comm.size());
    let nu = n as usize;
    let t = Instant::now();
    let coll = |e: Error| match e {
        Error::Collective(c) => c,
        e => panic!("rank {me}: expected a collective argument error, got {e:?}"),
    };
    let peer_named = |e: CollError, rank: u32| {
        assert!(
            matches!(e, CollError::PeerArguments { rank: r, .. } if r == rank),
            "rank {me}: {e:?}"
        );
    };
    let root = n - 1;
    let is_root = me == root;
    // gatherv: the root passes one count too few.
    let counts = vec![2usize; if is_root { nu - 1 } else { nu }];
    let displs: Vec<usize> = (0..nu).map(|r| 2 * r).collect();
    let mut recv = vec![0u32; 2 * nu];
    let e = coll(
        comm.gatherv_into(&[1u32; 2], &mut recv, &counts, &displs, root)
            .unwrap_err(),
    );
    println!("rank {me}: gatherv counts: {e}");
    if is_root {
        assert!(
            matches!(e, CollError::CountsLength { what: "counts", .. }),
            "{e:?}"
        );
    } else {
        peer_named(e, root);
    }
    // scatterv: a block past the end of the root's buffer.
    let counts = vec![2usize; nu];
    let mut displs: Vec<usize> = (0..nu).map(|r| 2 * r).collect();
    if is_root {
        displs[0] = 2 * nu - 1;
    }
    let mut got = [0u32; 2];
    let e = coll(
        comm.scatterv_into(&vec![1u32; 2 * nu], &mut got, &counts, &displs, root)
            .unwrap_err(),
    );
    println!("rank {me}: scatterv displs: {e}");
    if is_root {
        assert!(
            matches!(e, CollError::BlockOutside { rank: 0, .. }),
            "{e:?}"
        );
    } else {
        peer_named(e, root);
    }
    // gatherv: overlapping receive blocks at the root.
    let displs: Vec<usize> = (0..nu).map(|r| if r == 1 { 1 } else { 2 * r }).collect();
    let e = coll(
        comm.gatherv_into(&[1u32; 2], &mut recv, &counts, &displs, root)
            .unwrap_err(),
    );
    println!("rank {me}: gatherv overlap: {e}");
    if is_root {
        assert!(
            matches!(e, CollError::BlocksOverlap { a: 0, b: 1, .. }),
            "{e:?}"
        );
    } else {
        peer_named(e, root);
    }
    // gatherv: rank 0 sends 3 elements where the root expects 2: every rank is told.
    let displs: Vec<usize> = (0..nu).map(|r| 3 * r).collect();
    let mut recv = vec![0u32; 3 * nu];
    let mine = vec![1u32; if me == 0 { 3 } else { 2 }];
    let e = coll(
        comm.gatherv_into(&mine, &mut recv, &counts, &displs, root)
            .unwrap_err(),
    );
    println!("rank {me}: gatherv count mismatch: {e}");
    assert!(
        matches!(
            e,
            CollError::CountMismatch {
                rank: 0,
                a: 2,
                b: 3,
                ..
            }
        ),
        "{e:?}"
    );
    // alltoallv: rank 1 passes a short displacement list.
    let c = vec![1usize; nu];
    let d: Vec<usize> = (0..nu).collect();
    let short: Vec<usize> = (0..nu - 1).collect();
    let mut r = vec![0u32; nu];
    let e = coll(
        comm.alltoallv_into(
            &vec![1u32; nu],
            &c,
            if me == 1 { &short } else { &d },
            &mut r,
            &c,
            &d,
        )
        .unwrap_err(),
    );
    println!("rank {me}: alltoallv displs: {e}");
    if me == 1 {
        assert!(
            matches!(
                e,
                CollError::CountsLength {
                    what: "send_displs",
                    ..
                }
            ),
            "{e:?}"
        );
    } else {
        peer_named(e, 1);
    }
    // alltoallv: rank 0 sends 1 element to rank 1, which expects 2. Only rank 1 can tell;
    // it finishes its own sends first, so nobody waits.
    let rc: Vec<usize> = (0..nu)
        .map(|s| if me == 1 && s == 0 { 2 } else { 1 })
        .collect();
    let rd = schedule_offsets(&rc, 0);
    let mut r = vec![0u32; rc.iter().sum()];
    let res = comm.alltoallv_into(&vec![1u32; nu], &c, &d, &mut r, &rc, &rd);
    println!("rank {me}: alltoallv pair mismatch: {res:?}");
    if me == 1 {
        let e = coll(res.unwrap_err());
        assert!(
            matches!(
                e,
                CollError::SizeMismatch {
                    peer: 0,
                    expected: 8,
                    got: 4,
                    ..
                }
            ),
            "{e:?}"
        );
    } else {
        res.unwrap();
    }
    // The other way: rank 0 sends 2 elements to rank 1, which expects 1 (more than its
    // block holds): the same typed error, not a point-to-point truncation.
    let sc: Vec<usize> = (0..nu)
        .map(|t| if me == 0 && t == 1 { 2 } else { 1 })
        .collect();
    let sd = schedule_offsets(&sc, 0);
    let mut r = vec![0u32; nu];
    let res = comm.alltoallv_into(&vec![1u32; sc.iter().sum()], &sc, &sd, &mut r, &c, &d);
    println!("rank {me}: alltoallv pair mismatch (long): {res:?}");
    if me == 1 {
        let e = coll(res.unwrap_err());
        assert!(
            matches!(
                e,
                CollError::SizeMismatch {
                    peer: 0,
                    expected: 4,
                    got: 8,
                    ..
                }
            ),
            "{e:?}"
        );
    } else {
        res.unwrap();
    }
    // Mismatched calls among the new collectives: scan against exscan, a non-commutative
    // user op against a commutative one, MINLOC against MAXLOC.
    let mut b = [1i64; 4];
    let e = if me == 1 {
        comm.scan(&mut b, ReduceOp::Sum).unwrap_err()
    } else {
        comm.exscan(&mut b, ReduceOp::Sum).unwrap_err()
    };
    println!("rank {me}: scan vs exscan: {e}");
    assert!(
        matches!(e, Error::CollectiveMismatch { .. }) && e.to_string().contains("exscan"),
        "{e:?}"
    );
    let e = if me == 0 {
        comm.allreduce(&mut [[1u64; 4]; 3], mat_op()).unwrap_err()
    } else {
        let op = UserOp::<Mat>::commutative(|_, _| {});
        comm.allreduce(&mut [[1u64; 4]; 3], op).unwrap_err()
    };
    println!("rank {me}: user ops: {e}");
    assert!(e.to_string().contains("non-commutative"), "{e}");
    let op = if me == 0 {
        LocOp::MaxLoc
    } else {
        LocOp::MinLoc
    };
    let e = comm
        .allreduce(&mut [ValueIndex::new(1.0f32, me)], op)
        .unwrap_err();
    println!("rank {me}: loc ops: {e}");
    assert!(
        e.to_string().contains("maxloc") && e.to_string().contains("minloc"),
        "{e}"
    );
    assert!(
        t.elapsed() < Duration::from_secs(20),
        "took {:?}",
        t.elapsed()
    );
    // Element sizes differ (data movement takes any Pod type; the size must agree).
    let e = if me == 1 {
        comm.gather(&mut [7u16; 4], 0).unwrap_err()
    } else {
        let mut g = vec![7u32; if me == 0 { 4 * n as usize } else { 4 }];
        comm.gather(&mut g, 0).unwrap_err()
    };
    println!("rank {me}: element size: {e}");
    assert!(
        matches!(&e, Error::CollectiveMismatch { op: "gather", .. })
            && e.to_string().contains("2-byte")
            && e.to_string().contains("4-byte"),
        "{e}"
    );
    // Size-0 element types: a typed error on every rank, no panic.
    let e = comm.broadcast(&mut [(); 3], 0).unwrap_err();
    assert!(
        matches!(coll(e), CollError::ZeroSized { op: "broadcast" }),
        "rank {me}"
    );
    let e = comm.iallgather(vec![[0u8; 0]; 2 * nu]).wait().unwrap_err();
    assert!(
        matches!(coll(e), CollError::ZeroSized { op: "allgather" }),
        "rank {me}"
    );
    // Still usable.
    let mut v = [ValueIndex::new(me as f64, me)];
    comm.allreduce(&mut v, LocOp::MaxLoc).unwrap();
    assert_eq!(v[0].index(), n - 1);
    println!("rank {me}: bad counts reported");
}

#[test]
fn bad_counts_fail_on_every_rank() {
    for (n, env) in [
        (2, &[][..]),
        (3, &[][..]),
        (4, &[("EFA_TRANSPORTS", "ip")][..]),
    ] {
        let out = efarun(n, "child_bad_counts", env);
        assert!(out.status.success(), "n={n}");
        assert_eq!(
            String::from_utf8_lossy(&out.stdout)
                .matches("bad counts reported")
                .count(),
            n as usize
        );
    }
}

//! What the C ABI adds per call: the same small allreduce and ping-pong through the Rust API
//! and through the `extern "C"` functions of libefa (the very functions a C program calls),
//! on one communicator in one process, alternating rounds, medians reported.
//!
//! ```sh
//! cargo build --release -p efa-capi --example overhead -p efarun
//! target/release/efarun -n 2 target/release/examples/overhead [ITERS] [ROUNDS]
//! ```
//! Rank 0 prints one line per operation: µs per call through Rust, through the C ABI, and
//! the difference (the target is <= 0.05 µs). With `-n 1` the calls run to the rank itself
//! (no peer, so far less noise on a loaded machine: the difference is the wrapper alone).

use std::ffi::c_void;
use std::time::Instant;

use efa::{efa_allreduce, efa_comm, efa_comm_from_rust, efa_datatype, efa_op, efa_recv, efa_send};
use efa_core::{Communicator, ReduceOp, Source, Tag};

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn rust_allreduce(comm: &Communicator, iters: usize) -> f64 {
    let mut x = [1.0f64];
    let t = Instant::now();
    for _ in 0..iters {
        comm.allreduce(&mut x, ReduceOp::Sum).expect("allreduce");
    }
    t.elapsed().as_secs_f64() * 1e6 / iters as f64
}

fn c_allreduce(h: *const efa_comm, iters: usize) -> f64 {
    let mut x = [1.0f64];
    let p = x.as_mut_ptr() as *mut c_void;
    // EFA_IN_PLACE of efa.h.
    let in_place = &efa::efa_in_place_marker as *const u8 as *const c_void;
    let t = Instant::now();
    for _ in 0..iters {
        // SAFETY: `h` is a live handle; `x` holds 1 double for the call.
        let rc = unsafe {
            efa_allreduce(
                h,
                in_place,
                p,
                1,
                efa_datatype::EFA_DOUBLE as i32,
                efa_op::EFA_SUM as i32,
            )
        };
        assert_eq!(rc, 0);
    }
    t.elapsed().as_secs_f64() * 1e6 / iters as f64
}

/// One-way latency of an 8-byte ping-pong (round trip / 2).
fn rust_pingpong(comm: &Communicator, iters: usize) -> f64 {
    let peer = comm.size() - 1 - comm.rank();
    let mut b = [0u64];
    let t = Instant::now();
    for _ in 0..iters {
        if comm.rank() == 0 {
            comm.send(&b, peer, 1).expect("send");
            comm.recv(&mut b, Source::Rank(peer), Tag::Is(1))
                .expect("recv");
        } else {
            comm.recv(&mut b, Source::Rank(peer), Tag::Is(1))
                .expect("recv");
            comm.send(&b, peer, 1).expect("send");
        }
    }
    t.elapsed().as_secs_f64() * 1e6 / iters as f64 / 2.0
}

fn c_pingpong(h: *const efa_comm, rank: u32, size: u32, iters: usize) -> f64 {
    let peer = (size - 1 - rank) as i32;
    let mut b = [0u64];
    let p = b.as_mut_ptr() as *mut c_void;
    let dt = efa_datatype::EFA_UINT64 as i32;
    let t = Instant::now();
    for _ in 0..iters {
        // SAFETY: `h` is live; `b` holds one u64 for each call.
        unsafe {
            if rank == 0 {
                assert_eq!(efa_send(h, p, 1, dt, peer, 1), 0);
                assert_eq!(efa_recv(h, p, 1, dt, peer, 1, std::ptr::null_mut()), 0);
            } else {
                assert_eq!(efa_recv(h, p, 1, dt, peer, 1, std::ptr::null_mut()), 0);
                assert_eq!(efa_send(h, p, 1, dt, peer, 1), 0);
            }
        }
    }
    t.elapsed().as_secs_f64() * 1e6 / iters as f64 / 2.0
}

fn main() -> efa_core::Result<()> {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse().expect("a number"))
        .collect();
    let iters = args.first().copied().unwrap_or(20_000);
    let rounds = args.get(1).copied().unwrap_or(9);
    let comm = Communicator::init()?;
    assert!(comm.size() <= 2, "run with 1 or 2 ranks");
    let h = efa_comm_from_rust(&comm);
    // Warm-up of both paths.
    rust_allreduce(&comm, iters / 10);
    c_allreduce(h, iters / 10);
    rust_pingpong(&comm, iters / 10);
    c_pingpong(h, comm.rank(), comm.size(), iters / 10);
    let (mut ra, mut ca, mut rp, mut cp) = (vec![], vec![], vec![], vec![]);
    for round in 0..rounds {
        // Alternate which path goes first, so drift in the machine's load hits both.
        if round % 2 == 0 {
            ra.push(rust_allreduce(&comm, iters));
            ca.push(c_allreduce(h, iters));
            rp.push(rust_pingpong(&comm, iters));
            cp.push(c_pingpong(h, comm.rank(), comm.size(), iters));
        } else {
            ca.push(c_allreduce(h, iters));
            ra.push(rust_allreduce(&comm, iters));
            cp.push(c_pingpong(h, comm.rank(), comm.size(), iters));
            rp.push(rust_pingpong(&comm, iters));
        }
    }
    if comm.rank() == 0 {
        println!(
            "# {rounds} alternating rounds of {iters} calls, {} ranks, route: {}",
            comm.size(),
            comm.route(comm.size() - 1)?.reason
        );
        println!(
            "# {:<22} {:>12} {:>12} {:>12}",
            "operation", "Rust us", "C ABI us", "C - Rust us"
        );
        for (name, r, c) in [
            ("allreduce 8 B (f64 sum)", &mut ra, &mut ca),
            ("ping-pong 8 B one-way", &mut rp, &mut cp),
        ] {
            let mut d: Vec<f64> = r.iter().zip(c.iter()).map(|(r, c)| c - r).collect();
            let d = median(&mut d);
            let (r, c) = (median(r), median(c));
            println!("  {name:<22} {r:>12.3} {c:>12.3} {d:>12.3}");
        }
    }
    // SAFETY: the handle came from efa_comm_from_rust and is freed once; dropping it drops a
    // clone of the communicator, which `comm` outlives.
    drop(unsafe { Box::from_raw(h) });
    comm.finalize()
}

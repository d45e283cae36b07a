//! MPI-like allreduce demo: every rank fills a deterministic "gradient", averages it across
//! all ranks, verifies the result element by element, and prints nccl-tests-style columns.
//!
//! ```text
//! efarun -n 2 target/release/examples/allreduce
//! mpirun -n 2 target/release/examples/allreduce      # Open MPI as the launcher
//! srun -n 2 target/release/examples/allreduce         # Slurm
//! EFA_TRANSPORTS=ip EFA_IFACE=lo efarun -n 2 target/release/examples/allreduce
//! EFA_ALLREDUCE_ALGO=ring|rd|auto ...                 # algorithm override
//! ```
//! busbw = algbw * 2(n-1)/n, as in nccl-tests. Exits non-zero on any mismatch.

use std::time::Instant;

use efa_core::{Communicator, ReduceOp};

/// Rank `r`'s gradient element `i`: small integers, so the average is exact in f32.
fn grad(r: u32, i: usize) -> f32 {
    ((i * 7 + r as usize * 13) % 64) as f32
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    efa_examples::init_logging();
    let comm = Communicator::init()?;
    let (me, n) = (comm.rank(), comm.size());
    let iters: usize = std::env::var("ITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    if me == 0 {
        println!("# allreduce f32 avg, {n} ranks, {iters} iterations per size");
        println!(
            "{:>12} {:>12} {:>12} {:>12}",
            "size(B)", "time(us)", "algbw(GB/s)", "busbw(GB/s)"
        );
    }
    for bytes in [4usize << 10, 64 << 10, 1 << 20, 16 << 20] {
        let count = bytes / 4;
        let fresh: Vec<f32> = (0..count).map(|i| grad(me, i)).collect();
        let mut buf = fresh.clone();
        // Warm-up and verification.
        comm.allreduce(&mut buf, ReduceOp::Avg)?;
        for (i, &x) in buf.iter().enumerate() {
            let want = (0..n).map(|r| grad(r, i)).sum::<f32>() / n as f32;
            if x != want {
                return Err(format!("rank {me}: element {i} is {x}, expected {want}").into());
            }
        }
        comm.barrier()?;
        let t = Instant::now();
        for _ in 0..iters {
            buf.copy_from_slice(&fresh);
            comm.allreduce(&mut buf, ReduceOp::Avg)?;
        }
        let us = t.elapsed().as_secs_f64() * 1e6 / iters as f64;
        // Rank 0 prints the slowest rank's time.
        let mut worst = [us];
        comm.allreduce(&mut worst, ReduceOp::Max)?;
        if me == 0 {
            let algbw = bytes as f64 / worst[0] / 1e3;
            let busbw = algbw * 2.0 * (n as f64 - 1.0) / n as f64;
            println!("{bytes:>12} {:>12.1} {algbw:>12.3} {busbw:>12.3}", worst[0]);
        }
    }
    println!("rank {me}: allreduce results verified");
    Ok(())
}

//! A small 1-D stencil with halo exchange, the shape of many HPC codes: each rank owns
//! `CELLS` f64 cells of a ring, and every iteration exchanges `HALO` cells with both
//! neighbours (non-blocking sends and receives, then `wait_all`) and applies a 3-point
//! average. Prints the slowest rank's time per iteration; bench/mpi_halo.c is the same
//! program over MPI, for side-by-side runs (bench/oversubscribed.sh).
//!
//! ```text
//! efarun -n 4 target/release/examples/halo
//! ITERS=2000 CELLS=4096 HALO=128 efarun -n 4 target/release/examples/halo
//! ```
//! Output: `halo ranks <n> cells <c> halo_bytes <b> iters <i> usec_per_iter <t>`. The result
//! is checked against the same stencil computed serially by every rank (exits non-zero on a
//! mismatch).

use std::time::Instant;

use efa_core::{Communicator, P2pRequest, ReduceOp};

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Initial value of global cell `g`: small integers, exact in f64.
fn init(g: usize) -> f64 {
    (g % 17) as f64
}

/// One stencil step over `cur` (with `halo` ghost cells at each end) into `next`.
fn step(cur: &[f64], next: &mut [f64], halo: usize) {
    for (i, x) in next.iter_mut().enumerate() {
        let c = i + halo;
        *x = (cur[c - 1] + cur[c] + cur[c + 1]) / 3.0;
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    efa_examples::init_logging();
    let comm = Communicator::init()?;
    let (me, n) = (comm.rank(), comm.size());
    let iters = env("ITERS", 1000);
    let cells = env("CELLS", 4096);
    let halo = env("HALO", 128).clamp(1, cells);
    let check_iters = 20;
    let left = (me + n - 1) % n;
    let right = (me + 1) % n;
    // cur = [left ghosts | owned cells | right ghosts]
    let mut cur = vec![0f64; cells + 2 * halo];
    let mut next = vec![0f64; cells];
    let reset = |cur: &mut Vec<f64>| {
        for i in 0..cells {
            cur[halo + i] = init(me as usize * cells + i);
        }
    };
    let mut run = |iters: usize, cur: &mut Vec<f64>| -> efa_core::Result<()> {
        for _ in 0..iters {
            // The edges are sent from where they are: the ghosts being received into are
            // disjoint from the owned cells being sent.
            let (ghost_l, rest) = cur.split_at_mut(halo);
            let (owned, ghost_r) = rest.split_at_mut(cells);
            let reqs: Vec<P2pRequest<'_>> = vec![
                comm.irecv(ghost_l, left, 1)?.into(),
                comm.irecv(ghost_r, right, 0)?.into(),
                comm.isend(&owned[..halo], left, 0)?.into(),
                comm.isend(&owned[cells - halo..], right, 1)?.into(),
            ];
            comm.wait_all(reqs)?;
            step(cur, &mut next, halo);
            cur[halo..halo + cells].copy_from_slice(&next);
        }
        Ok(())
    };
    // Check: a few iterations against the serial stencil on the whole ring.
    reset(&mut cur);
    run(check_iters, &mut cur)?;
    let total = cells * n as usize;
    let mut ring: Vec<f64> = (0..total).map(init).collect();
    for _ in 0..check_iters {
        let prev = ring.clone();
        for g in 0..total {
            ring[g] = (prev[(g + total - 1) % total] + prev[g] + prev[(g + 1) % total]) / 3.0;
        }
    }
    for i in 0..cells {
        let want = ring[me as usize * cells + i];
        let got = cur[halo + i];
        if (got - want).abs() > 1e-9 * want.abs().max(1.0) {
            return Err(format!("rank {me}: cell {i} is {got}, expected {want}").into());
        }
    }
    reset(&mut cur);
    comm.barrier()?;
    let t = Instant::now();
    run(iters, &mut cur)?;
    let mut worst = [t.elapsed().as_secs_f64() * 1e6 / iters as f64];
    comm.allreduce(&mut worst, ReduceOp::Max)?;
    if me == 0 {
        println!(
            "halo ranks {n} cells {cells} halo_bytes {} iters {iters} usec_per_iter {:.2}",
            halo * 8,
            worst[0]
        );
    }
    Ok(())
}

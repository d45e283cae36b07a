//! Two-rank ping-pong through the communicator, on the route the placement rule picks (shm
//! for two ranks on one host; `EFA_TRANSPORTS=ip` forces TCP). Every echo is verified.
//!
//! ```text
//! efarun -n 2 target/release/examples/pingpong [ITERS]
//! ```
//! Prints the route and its reason, then the half round-trip latency per size.

use std::time::Instant;

use efa_core::Communicator;

const SIZES: &[usize] = &[8, 1024, 64 * 1024, 1 << 20];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    efa_examples::init_logging();
    let iters: usize = std::env::args()
        .nth(1)
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(1000);
    let comm = Communicator::init()?;
    if comm.size() != 2 {
        return Err(format!("pingpong needs exactly 2 ranks, got {}", comm.size()).into());
    }
    let me = comm.rank();
    let peer = 1 - me;
    let route = comm.route(peer)?;
    let provider = comm.provider(route.transport).unwrap_or("?");
    if me == 0 {
        println!(
            "ping-pong rank 0 <-> rank 1: route {} via {provider} ({})",
            route.transport, route.reason
        );
        println!(
            "{:>10} {:>8} {:>14} {:>12}",
            "bytes", "iters", "usec/xfer", "MB/sec"
        );
    }
    let max = *SIZES.iter().max().unwrap();
    let mut out = vec![0u8; max];
    let mut back = vec![0u8; max];
    for &size in SIZES {
        let n = if size >= 1 << 20 {
            iters.div_ceil(10)
        } else {
            iters
        };
        comm.send(&[0u8], peer, 1)?; // align the two ranks before timing
        comm.recv(&mut [0u8], peer, 1)?;
        let start = Instant::now();
        for i in 0..n {
            if me == 0 {
                let fill = (i as u8).wrapping_add(size as u8);
                out[..size].fill(fill);
                out[size / 2..size]
                    .iter_mut()
                    .for_each(|b| *b = b.wrapping_mul(3));
                comm.send(&out[..size], peer, 0)?;
                let st = comm.recv(&mut back[..size], peer, 0)?;
                if st.len != size || back[..size] != out[..size] {
                    return Err(format!("echo {i} of {size} bytes differs").into());
                }
            } else {
                let st = comm.recv(&mut back[..size], peer, 0)?;
                comm.send(&back[..st.len], peer, 0)?;
            }
        }
        if me == 0 {
            let secs = start.elapsed().as_secs_f64();
            let half_rtt_us = secs * 1e6 / (2 * n) as f64;
            let mbps = (2 * n * size) as f64 / secs / 1e6;
            println!("{size:>10} {n:>8} {half_rtt_us:>14.2} {mbps:>12.1}");
        }
    }
    if me == 0 {
        println!("ping-pong verified: every byte of every echo matched");
    }
    Ok(())
}

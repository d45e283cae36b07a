//! Every rank exchanges verified messages with every other rank through the communicator,
//! by blocking, non-blocking and async calls, and prints the route it uses to each peer.
//!
//! ```text
//! efarun -n 4 target/release/examples/p2p
//! mpirun -n 4 target/release/examples/p2p        # Open MPI as the launcher
//! srun -n 4 target/release/examples/p2p           # Slurm
//! ```
//! Exits non-zero (naming the peer) if any message is wrong or any call fails.

use efa_core::{Communicator, P2pRequest, Source, Tag};

fn pattern(from: u32, to: u32, kind: u64, len: usize) -> Vec<u32> {
    (0..len as u32)
        .map(|i| i ^ (from << 24) ^ (to << 16) ^ (kind as u32) << 12)
        .collect()
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    efa_examples::init_logging();
    let comm = Communicator::init()?;
    let (me, n) = (comm.rank(), comm.size());
    for peer in 0..n {
        let r = comm.route(peer)?;
        let provider = comm.provider(r.transport).unwrap_or("?");
        println!(
            "rank {me} -> {peer}: {} via {provider} ({})",
            r.transport, r.reason
        );
    }
    let sizes = [0usize, 1, 1000, 100_000];

    // Blocking, pairwise in rank order (the lower rank sends first).
    for peer in (0..n).filter(|&p| p != me) {
        for (k, &len) in sizes.iter().enumerate() {
            let mut got = vec![0u32; len];
            if me < peer {
                comm.send(&pattern(me, peer, k as u64, len), peer, k as u32)?;
                comm.recv(&mut got, peer, k as u32)?;
            } else {
                comm.recv(&mut got, peer, k as u32)?;
                comm.send(&pattern(me, peer, k as u64, len), peer, k as u32)?;
            }
            if got != pattern(peer, me, k as u64, len) {
                return Err(format!("blocking: bad {len}-word message from rank {peer}").into());
            }
        }
    }

    // Non-blocking: receives from anyone, sends to everyone, then wait for all.
    let len = 10_000;
    let mut bufs: Vec<Vec<u32>> = (0..n).map(|_| vec![0u32; len]).collect();
    // A send borrows its buffer until it completes (large ones are read from it in place).
    let outs: Vec<Vec<u32>> = (0..n).map(|peer| pattern(me, peer, 100, len)).collect();
    let mut reqs: Vec<P2pRequest<'_>> = Vec::new();
    for b in bufs.iter_mut().take(n as usize - 1) {
        reqs.push(comm.irecv(b, Source::Any, Tag::Is(100))?.into());
    }
    for peer in (0..n).filter(|&p| p != me) {
        reqs.push(comm.isend(&outs[peer as usize], peer, 100)?.into());
    }
    let statuses = comm.wait_all(reqs)?;
    for (b, st) in bufs.iter().zip(&statuses[..n as usize - 1]) {
        let src = st.expect("receive status").source;
        if *b != pattern(src, me, 100, len) {
            return Err(format!("non-blocking: bad message from rank {src}").into());
        }
    }

    // Async, on a tokio runtime: a ring shift.
    let (next, prev) = ((me + 1) % n, (me + n - 1) % n);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()?;
    let got = rt.block_on(async {
        let out = pattern(me, next, 200, 50_000);
        let mut got = vec![0u32; 50_000];
        let (s, r) = tokio::join!(
            comm.send_async(&out, next, 200),
            comm.recv_async(&mut got, prev, 200)
        );
        s.and(r).map(|_| got)
    })?;
    if got != pattern(prev, me, 200, 50_000) {
        return Err(format!("async: bad message from rank {prev}").into());
    }

    println!(
        "rank {me}: verified blocking, non-blocking and async exchanges with all {} peers",
        n - 1
    );
    Ok(())
}

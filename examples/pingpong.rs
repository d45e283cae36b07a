//! Two-process ping-pong over efa-fabric: the process starts its peer itself, exchanges
//! endpoint addresses through the child's stdin/stdout, then bounces messages of several
//! sizes, verifying every byte, and prints the half round-trip latency per size.
//!
//! ```text
//! cargo run --release -p efa-examples --example pingpong -- [PROVIDER] [ITERS]
//! ```
//! PROVIDER defaults to the best one present for two processes on one host: a fabric
//! (`efa`, `verbs;ofi_rxm`) if there is one, else `shm`, else `tcp;ofi_rxm` on `lo`.

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use efa_examples::{best_provider, from_hex, open_endpoint, to_hex};
use efa_fabric::{FiAddr, RegisteredBuf};

const TIMEOUT: Duration = Duration::from_secs(30);
const SIZES: &[usize] = &[8, 1024, 64 * 1024, 1 << 20];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    efa_examples::init_logging();
    let args: Vec<String> = std::env::args().collect();
    let child = std::env::var("EFA_PINGPONG_ROLE").as_deref() == Ok("pong");
    let provider = match args.get(1) {
        Some(p) => p.clone(),
        None => best_provider()?,
    };
    let iters: usize = args.get(2).map(|s| s.parse()).transpose()?.unwrap_or(1000);
    let ep = open_endpoint(&provider)?;
    let max = *SIZES.iter().max().unwrap();
    let mut tx = RegisteredBuf::new(ep.domain(), max, efa_fabric::Access::LOCAL, Some(&ep))?;
    let mut rx = RegisteredBuf::new(ep.domain(), max, efa_fabric::Access::LOCAL, Some(&ep))?;

    if child {
        // Pong: read the parent's address from stdin, print ours, then echo every message.
        let mut line = String::new();
        std::io::stdin().read_line(&mut line)?;
        let peer = ep.av().insert(&from_hex(line.trim())?)?;
        println!("{}", to_hex(&ep.name()?));
        std::io::stdout().flush()?;
        for &size in SIZES {
            for _ in 0..iters {
                let d = ep.trecv(rx, peer, size as u64, 0)?.wait(TIMEOUT)?;
                rx = d.buf;
                tx[..size].copy_from_slice(&rx[..size]);
                tx = send(&ep, tx, size, peer)?;
            }
        }
        return Ok(());
    }

    println!(
        "ping-pong over {provider} ({} / {}), {iters} iterations per size",
        ep.info().fabric(),
        ep.info().domain()
    );
    let mut pong = Command::new(std::env::current_exe()?)
        .args([provider.as_str(), &iters.to_string()])
        .env("EFA_PINGPONG_ROLE", "pong")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()?;
    writeln!(pong.stdin.as_mut().unwrap(), "{}", to_hex(&ep.name()?))?;
    let mut line = String::new();
    BufReader::new(pong.stdout.as_mut().unwrap()).read_line(&mut line)?;
    let peer = ep.av().insert(&from_hex(line.trim())?)?;

    println!("{:>10} {:>8} {:>14}", "bytes", "iters", "usec/xfer");
    for &size in SIZES {
        let mut seed = size as u8;
        let start = Instant::now();
        for i in 0..iters {
            for b in &mut tx[..size] {
                seed = seed.wrapping_mul(31).wrapping_add(7);
                *b = seed;
            }
            let posted = ep.trecv(rx, peer, size as u64, 0)?;
            tx = send(&ep, tx, size, peer)?;
            let d = posted.wait(TIMEOUT)?;
            rx = d.buf;
            if d.len != size || rx[..size] != tx[..size] {
                return Err(format!("iteration {i}: {size}-byte echo differs").into());
            }
        }
        let half_rtt = start.elapsed().as_secs_f64() * 1e6 / (2 * iters) as f64;
        println!("{size:>10} {iters:>8} {half_rtt:>14.2}");
    }
    let status = pong.wait()?;
    if !status.success() {
        return Err(format!("pong process failed: {status}").into());
    }
    println!("ping-pong verified: every byte of every echo matched");
    Ok(())
}

/// Sends the first `size` bytes of `buf` (inject when small enough) and returns the buffer.
fn send(
    ep: &efa_fabric::Endpoint,
    buf: RegisteredBuf,
    size: usize,
    peer: FiAddr,
) -> Result<RegisteredBuf, efa_fabric::Error> {
    if size <= ep.inject_size() {
        ep.tinject(&buf[..size], peer, size as u64)?;
        return Ok(buf);
    }
    // The buffer is registered once for its whole length; send only `size` bytes of it by
    // posting a send of an owned view.
    let view = efa_fabric::BufPrefix::new(buf, size);
    Ok(ep
        .tsend(view, peer, size as u64)?
        .wait(TIMEOUT)?
        .buf
        .into_inner())
}

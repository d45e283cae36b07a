//! Ping-pong through the fast boxes between two processes, OSU `osu_latency` style:
//! half the round trip per message size, after warm-up iterations.
//!
//! ```text
//! cargo run --release -p efa-shm --example fbox_pingpong -- [--iters N] [--bind] [--max BYTES] [--ring BYTES] [--half]
//! ```
//! `--half` lets messages take up to half a ring (the default is a quarter).
//! The program starts its own partner process (the same binary with `--child`). With
//! `--bind` the two processes are pinned to CPUs 0 and 1 (Open MPI binds to cores by default
//! for 2 ranks). Output columns: size in bytes, latency in microseconds (mean over the timed
//! iterations, as OSU reports it), and the median of the timed iterations' half round trips
//! (which a busy shared machine's preemptions do not move).

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use efa_shm::{Config, Fastboxes};

fn bind(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; CPU_SET writes within it;
    // sched_setaffinity reads it and changes only this thread's affinity.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            eprintln!(
                "cannot bind to CPU {cpu}: {}",
                std::io::Error::last_os_error()
            );
        }
    }
}

/// Receives one message (spinning on the rings) and returns its length.
fn recv(fb: &mut Fastboxes, buf: &mut [u8]) -> usize {
    loop {
        let mut got = None;
        fb.poll(|_, b| {
            buf[..b.len()].copy_from_slice(b);
            got = Some(b.len());
        })
        .expect("poll");
        if let Some(n) = got {
            return n;
        }
        std::hint::spin_loop();
    }
}

fn send(fb: &mut Fastboxes, peer: usize, data: &[u8]) {
    while !fb.try_send(peer, &[], data).expect("send") {
        std::hint::spin_loop();
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let flag = |f: &str| args.iter().any(|a| a == f);
    let value = |f: &str| {
        args.iter()
            .position(|a| a == f)
            .and_then(|i| args.get(i + 1))
            .map(|v| v.parse::<usize>().expect("a number"))
    };
    let iters = value("--iters").unwrap_or(100_000);
    let child = flag("--child");
    let me = usize::from(child);
    let peer = 1 - me;
    if flag("--bind") {
        bind(me);
    }
    let job = match args.iter().position(|a| a == "--job") {
        Some(i) => args[i + 1].clone(),
        None => format!("pingpong-{}", std::process::id()),
    };
    let mut partner = None;
    if !child {
        let mut cmd = Command::new(std::env::current_exe().expect("own path"));
        cmd.args(&args[1..])
            .args(["--child", "--job", &job])
            .stdout(Stdio::null());
        partner = Some(cmd.spawn().expect("start the partner process"));
    }
    let ring = value("--ring").unwrap_or(Config::default().get_ring_bytes());
    let mut cfg = Config::default().ring_bytes(ring);
    if flag("--half") {
        cfg = cfg.max_message(efa_shm::ring::max_message_limit(ring));
    }
    let mut fb = Fastboxes::create(&job, me, 2, &cfg).expect("create");
    fb.attach_all(Duration::from_secs(30)).expect("attach");
    let max = value("--max").unwrap_or(4096).min(fb.max_message());
    let data = vec![7u8; max];
    let mut buf = vec![0u8; fb.max_message()];
    if !child {
        println!("# efa-shm fast-box ping-pong, 2 processes, half round trip");
        println!(
            "# {:>10} {:>12} {:>12}",
            "Size", "Latency (us)", "Median (us)"
        );
    }
    let mut size = 8;
    while size <= max {
        let (warm, n) = (iters / 10, iters);
        let mut t0 = Instant::now();
        let mut rtts = Vec::with_capacity(n);
        let mut last = t0;
        for i in 0..warm + n {
            if i == warm {
                t0 = Instant::now();
                last = t0;
            }
            if me == 0 {
                send(&mut fb, peer, &data[..size]);
                let got = recv(&mut fb, &mut buf);
                assert_eq!(got, size);
            } else {
                let got = recv(&mut fb, &mut buf);
                assert_eq!(got, size);
                send(&mut fb, peer, &data[..size]);
            }
            if i >= warm {
                let now = Instant::now();
                rtts.push(now - last);
                last = now;
            }
        }
        let us = t0.elapsed().as_secs_f64() * 1e6 / (2.0 * n as f64);
        rtts.sort_unstable();
        let med = rtts[rtts.len() / 2].as_secs_f64() * 1e6 / 2.0;
        if me == 0 {
            println!("{size:>12} {us:>12.3} {med:>12.3}");
        }
        size *= 2;
    }
    if let Some(mut p) = partner {
        let st = p.wait().expect("partner");
        assert!(st.success(), "partner failed: {st}");
    }
}

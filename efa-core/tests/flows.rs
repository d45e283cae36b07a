//! The IP route striped over several flows (`EFA_IP_FLOWS`, issue 15): 2 ranks over IP on
//! `lo` with 4 flows exchange messages of many sizes (verified), mixed with small ones whose
//! order is checked, through blocking calls, `wait_all` and a collective (engine buffers);
//! then each rank checks that several flows carried data, by its own counters
//! ([`Communicator::ip_flows`]) and by `ss` (distinct TCP connections of this process).

use efa_core::comm::stripe::{StripeMode, DEFAULT_STRIPE_MIN};
use efa_core::{Communicator, Error, P2pRequest, ReduceOp, SettingSource};

mod common;
use common::{efarun, in_job, pattern};

const FLOWS: usize = 4;

/// Sizes around every threshold: eager limit, zero-copy threshold, stripe threshold, and a
/// 64 MiB read (16 chunks of 4 MiB).
fn sizes() -> Vec<usize> {
    let t = DEFAULT_STRIPE_MIN;
    vec![
        0,
        1,
        8192,
        8193,
        65536,
        t - 1,
        t,
        t + 1,
        (1 << 20) + 3,
        4 << 20,
        64 << 20,
    ]
}

fn bytes(from: u32, to: u32, kind: u32, len: usize) -> Vec<u8> {
    let words = pattern(from, to, kind, len.div_ceil(4));
    bytemuck::cast_slice::<u32, u8>(&words)[..len].to_vec()
}

#[test]
#[ignore = "rank program for striped_ip_moves_every_size"]
fn child_striped() {
    if !in_job() {
        return;
    }
    let comm = Communicator::init().unwrap();
    let (me, n) = (comm.rank(), comm.size());
    assert_eq!(n, 2);
    let peer = 1 - me;
    let flows_env: usize = std::env::var("EFA_IP_FLOWS").unwrap().parse().unwrap();
    assert_eq!(comm.config().ip_flows().flows, Some(flows_env));
    // 1. Blocking: big message then a small one on the same tag, both ways (rank 0 first).
    for (k, &len) in sizes().iter().enumerate() {
        let k = k as u32;
        for turn in 0..2u32 {
            if me == turn {
                comm.send(&bytes(me, peer, k, len), peer, 5).unwrap();
                comm.send(&[k, 0xabc], peer, 5).unwrap();
            } else {
                let mut got = vec![0u8; len + 3];
                let st = comm.recv(&mut got, peer, 5).unwrap();
                assert_eq!(st.len, len, "size {len}");
                let want = bytes(peer, me, k, len);
                let bad = (0..len).find(|&i| got[i] != want[i]);
                assert!(
                    bad.is_none(),
                    "data of {len} B from {peer}: first difference at byte {bad:?}"
                );
                let mut small = [0u32; 2];
                comm.recv(&mut small, peer, 5).unwrap();
                assert_eq!(small, [k, 0xabc], "order after {len} B");
            }
        }
    }
    // 2. Non-blocking, all sizes at once, interleaved with small messages: wait_all reads
    //    them in place; matching order on one tag must hold.
    let out: Vec<Vec<u8>> = sizes()
        .iter()
        .enumerate()
        .map(|(k, &len)| bytes(me, peer, 100 + k as u32, len))
        .collect();
    let marks: Vec<[u32; 1]> = (0..out.len() as u32).map(|k| [k]).collect();
    let mut inb: Vec<Vec<u8>> = sizes().iter().map(|&l| vec![0u8; l]).collect();
    let mut inmarks = vec![[u32::MAX; 1]; out.len()];
    let mut reqs: Vec<P2pRequest<'_>> = Vec::new();
    for (b, m) in inb.iter_mut().zip(inmarks.iter_mut()) {
        reqs.push(comm.irecv(b, peer, 7).unwrap().into());
        reqs.push(comm.irecv(m, peer, 7).unwrap().into());
    }
    for (b, m) in out.iter().zip(&marks) {
        reqs.push(comm.isend(b, peer, 7).unwrap().into());
        reqs.push(comm.isend(m, peer, 7).unwrap().into());
    }
    comm.wait_all(reqs).unwrap();
    for (k, (&len, b)) in sizes().iter().zip(&inb).enumerate() {
        assert!(
            b[..] == bytes(peer, me, 100 + k as u32, len)[..],
            "wait_all data of {len} B"
        );
        assert_eq!(inmarks[k], [k as u32], "wait_all order after {len} B");
    }
    // To itself (the route to this rank has the flows too): 1 MiB, verified.
    let mine = bytes(me, me, 77, (1 << 20) + 5);
    let req = comm.isend(&mine, me, 9).unwrap();
    let mut back = vec![0u8; mine.len()];
    comm.recv(&mut back, me, 9).unwrap();
    req.wait().unwrap();
    assert!(back == mine, "message to itself");
    let to_self = comm
        .ip_flows(me)
        .unwrap()
        .expect("the route to itself has flows");
    let used = to_self.iter().filter(|f| f.bytes > 0).count();
    assert!(
        used >= 2,
        "the message to itself used {used} flows: {to_self:?}"
    );
    // 3. A collective: its receives go into engine buffers (the striped engine read path).
    let mut v: Vec<u64> = (0..(2 << 20) as u64).map(|i| i * (me as u64 + 1)).collect();
    comm.allreduce(&mut v, ReduceOp::Sum).unwrap();
    assert!(
        v.iter().enumerate().all(|(i, &x)| x == 3 * i as u64),
        "allreduce"
    );
    let mut b: Vec<u8> = if me == 0 {
        bytes(0, 9, 9, 6 << 20)
    } else {
        vec![0; 6 << 20]
    };
    comm.broadcast(&mut b, 0).unwrap();
    assert!(b == bytes(0, 9, 9, 6 << 20), "broadcast");

    // Every flow carried striped reads into this rank.
    let stats = comm
        .ip_flows(peer)
        .unwrap()
        .expect("the IP route to the peer has flows");
    assert_eq!(stats.len(), FLOWS);
    for (f, s) in stats.iter().enumerate() {
        println!(
            "rank {me}: flow {f}: {} B in {} chunks, rate {:?} B/s",
            s.bytes, s.chunks, s.rate
        );
        assert!(
            s.bytes >= 64 << 10,
            "flow {f} carried {} B: {stats:?}",
            s.bytes
        );
    }
    // And distinct TCP connections (5-tuples) exist for them.
    match std::process::Command::new("ss").args(["-tnpH"]).output() {
        Ok(o) if o.status.success() => {
            let text = String::from_utf8_lossy(&o.stdout);
            let me_pid = format!("pid={},", std::process::id());
            let mut local: Vec<&str> = text
                .lines()
                .filter(|l| l.starts_with("ESTAB") && l.contains(&me_pid))
                .filter_map(|l| l.split_whitespace().nth(3))
                .collect();
            local.sort();
            local.dedup();
            println!(
                "rank {me}: {} established TCP connections: {local:?}",
                local.len()
            );
            assert!(
                local.len() >= FLOWS,
                "expected >= {FLOWS} connections, ss shows {local:?}"
            );
        }
        _ => println!("rank {me}: ss not available: connection count not checked"),
    }
    comm.barrier().unwrap();
    println!("child_striped: done");
}

#[test]
fn striped_ip_moves_every_size() {
    for mode in [StripeMode::Adaptive, StripeMode::Equal] {
        let out = efarun(
            2,
            "child_striped",
            &[
                ("EFA_TRANSPORTS", "ip"),
                ("EFA_IP_FLOWS", "4"),
                ("EFA_IP_STRIPE", &mode.to_string()),
            ],
        );
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{mode}: job failed:\n{text}");
        assert_eq!(text.matches("child_striped: done").count(), 2, "{text}");
    }
}

#[test]
#[ignore = "rank program for bad_flow_settings_are_named"]
fn child_bad_flows() {
    if !in_job() {
        return;
    }
    let var = std::env::var("BAD_VAR").unwrap();
    match Communicator::init() {
        Err(Error::Setting(e)) => {
            assert_eq!(e.source_of_value, SettingSource::Env(leak(&var)), "{e}");
            println!("child_bad_flows: refused: {e}");
        }
        other => panic!("{var}: expected a setting error, got {other:?}"),
    }
}

fn leak(s: &str) -> &'static str {
    Box::leak(s.to_string().into_boxed_str())
}

#[test]
fn bad_flow_settings_are_named() {
    for (var, value) in [
        ("EFA_IP_FLOWS", "0"),
        ("EFA_IP_FLOWS", "65"),
        ("EFA_IP_FLOWS", "many"),
        ("EFA_IP_STRIPE_MIN", "1k"),
        ("EFA_IP_STRIPE", "fair"),
    ] {
        let out = efarun(1, "child_bad_flows", &[(var, value), ("BAD_VAR", var)]);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{var}={value}:\n{text}");
        assert!(
            text.contains("child_bad_flows: refused"),
            "{var}={value}:\n{text}"
        );
        assert!(text.contains(var), "{text}");
    }
}

//! RMA window tests: real multi-rank jobs under efarun (the binary re-runs its own
//! `#[ignore]`d child tests as ranks), on shm, on IP, and (in the soft-RoCE VM) on verbs.

use efa_core::{Communicator, Error, RmaOp, WindowAccess};

mod common;
use common::{assert_routes, fabric_present, in_job, skip_test};

/// Runs child `name` as `n` ranks; returns success and stdout.
fn efarun(n: u32, name: &str, env: &[(&str, &str)]) -> (bool, String) {
    // The default first, so that a test's own EFA_TIMEOUT wins.
    let mut all = vec![("EFA_TIMEOUT", "60")];
    all.extend_from_slice(env);
    let env = all;
    let out = common::efarun(n, name, &env);
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

fn val(rank: u32, i: usize, round: u64) -> u64 {
    (u64::from(rank) << 48) ^ (i as u64).wrapping_mul(0x9E37_79B9) ^ round
}

/// Put and get of many sizes and offsets with content checked; concurrent puts from every
/// rank into disjoint slices of rank 0's window; put with notification.
#[test]
#[ignore = "rank program"]
fn child_put_get() {
    if !in_job() {
        return;
    }
    let comm = Communicator::init().unwrap();
    let (me, n) = (comm.rank(), comm.size());
    for peer in (0..n).filter(|&p| p != me) {
        let r = comm.route(peer).unwrap();
        let provider = comm.provider(r.transport).unwrap_or("?");
        println!("route {me}->{peer}: {} via {provider} ({r})", r.transport);
    }
    let len = 1 << 16;
    let mut win = comm.window::<u64>(len, WindowAccess::ReadWrite).unwrap();
    let init: Vec<u64> = (0..len).map(|i| val(me, i, 0)).collect();
    win.write_local(0, &init).unwrap();
    win.fence().unwrap();
    // Gets of many sizes and offsets from every peer.
    for peer in 0..n {
        for (off, cnt) in [
            (0usize, 1usize),
            (1, 7),
            (100, 1000),
            (len - 5, 5),
            (0, len),
        ] {
            let mut out = vec![0u64; cnt];
            win.get(peer, off, &mut out).unwrap();
            let want: Vec<u64> = (off..off + cnt).map(|i| val(peer, i, 0)).collect();
            assert_eq!(out, want, "get {cnt}@{off} from {peer}");
        }
    }
    win.fence().unwrap();
    // Every rank puts into a disjoint slice of every peer's window, concurrently.
    let slice = len / n as usize;
    for peer in 0..n {
        let off = me as usize * slice;
        let data: Vec<u64> = (0..slice)
            .map(|i| val(me, off + i, 7 + u64::from(peer)))
            .collect();
        let reqs: Vec<_> = data
            .chunks(997)
            .enumerate()
            .map(|(k, c)| win.iput(peer, off + k * 997, c).unwrap())
            .collect();
        for r in reqs {
            r.wait().unwrap();
        }
    }
    win.fence().unwrap();
    let local = win.local_to_vec();
    for src in 0..n {
        let off = src as usize * slice;
        for i in 0..slice {
            assert_eq!(
                local[off + i],
                val(src, off + i, 7 + u64::from(me)),
                "element {} written by {src}",
                off + i
            );
        }
    }
    // Everyone has checked its window before anyone writes again.
    win.fence().unwrap();
    // Put with notification: rank r writes into rank (r+1)'s window and notifies it.
    let next = (me + 1) % n;
    win.put_notify(next, 3, &[0xABCD + u64::from(me)], 40 + me as u16)
        .unwrap();
    let (src, value) = win.wait_notify().unwrap();
    let prev = (me + n - 1) % n;
    assert_eq!((src, value), (prev, 40 + prev as u16));
    let mut third = [0u64];
    win.read_local(3, &mut third).unwrap();
    assert_eq!(
        third[0],
        0xABCD + u64::from(prev),
        "notified data must be visible"
    );
    win.free().unwrap();
    println!("rank {me}: rma verified");
}

#[test]
fn put_get_on_shm_four_ranks() {
    let (ok, text) = efarun(4, "child_put_get", &[]);
    assert!(ok);
    assert_eq!(text.matches("rma verified").count(), 4);
    assert_routes(&text, 4, "shm");
}

#[test]
fn put_get_on_ip() {
    let (ok, text) = efarun(3, "child_put_get", &[("EFA_TRANSPORTS", "ip")]);
    assert!(ok);
    assert_eq!(text.matches("rma verified").count(), 3);
    assert_routes(&text, 3, "ip");
}

/// The fabric route (verbs in the soft-RoCE VM, efa on EC2); skipped with a reason elsewhere.
#[test]
fn put_get_on_the_fabric() {
    let provider = match fabric_present() {
        Ok(p) => p,
        Err(why) => {
            skip_test(&why);
            return;
        }
    };
    let (ok, text) = efarun(2, "child_put_get", &[("EFA_TRANSPORTS", "fabric")]);
    assert!(ok);
    assert_eq!(text.matches("rma verified").count(), 2);
    assert_routes(&text, 2, "fabric");
    assert!(
        text.contains(&format!("fabric via {provider} (")),
        "the fabric route must use {provider}:\n{text}"
    );
}

/// Bounds and access errors: errors, not corruption.
#[test]
#[ignore = "rank program"]
fn child_errors() {
    if !in_job() {
        return;
    }
    let comm = Communicator::init().unwrap();
    let me = comm.rank();
    let peer = 1 - me;
    let mut win = comm.window::<u32>(100, WindowAccess::ReadWrite).unwrap();
    win.fill_local(me + 1);
    let ro = comm.window::<u32>(10, WindowAccess::ReadOnly).unwrap();
    win.fence().unwrap();
    match win.put(peer, 95, &[9u32; 10]) {
        Err(Error::RmaOutOfBounds {
            op: RmaOp::Put,
            peer: p,
            offset: 95,
            count: 10,
            window_len: 100,
        }) => assert_eq!(p, peer),
        other => panic!("expected out of bounds, got {other:?}"),
    }
    let mut out = [0u32; 2];
    assert!(matches!(
        win.get(peer, 99, &mut out),
        Err(Error::RmaOutOfBounds {
            window_len: 100,
            ..
        })
    ));
    assert!(matches!(
        win.get(peer, usize::MAX, &mut out),
        Err(Error::RmaOutOfBounds { .. })
    ));
    assert!(matches!(
        ro.put(peer, 0, &[1u32]),
        Err(Error::RmaAccess { op: RmaOp::Put, .. })
    ));
    assert!(matches!(
        win.put(7, 0, &[1u32]),
        Err(Error::InvalidRank { rank: 7, .. })
    ));
    win.fence().unwrap();
    assert!(
        win.local_to_vec().iter().all(|&x| x == me + 1),
        "rejected puts must not touch memory"
    );
    let msg = win.put(peer, 100, &[1u32]).unwrap_err().to_string();
    assert!(msg.contains("window of 100 elements"), "{msg}");
    ro.free().unwrap();
    win.free().unwrap();
    println!("rank {me}: rma errors ok");
}

#[test]
fn bounds_and_access_errors() {
    let (ok, text) = efarun(2, "child_errors", &[]);
    assert!(ok);
    assert_eq!(text.matches("rma errors ok").count(), 2);
}

//! Lazy peers (issue 17 §2): a rank connects to a peer (inserts its address) only when it
//! first sends to it, and receives from peers it never connected to. Real jobs under
//! `efarun`, over IP and over shm, with the same-host fast boxes off (`EFA_FASTBOX=0`: they
//! carry small messages between ranks of one host without the provider, connecting
//! nobody), so that every message goes through a provider.

use efa_core::{Communicator, ReduceOp};

mod common;
use common::{efarun, in_job};

/// Rank 0 sends to rank 1 only; ranks 2.. talk to nobody until the allreduce at the end.
#[test]
#[ignore = "rank program for only_used_peers_are_connected"]
fn child_one_pair() {
    if !in_job() {
        return;
    }
    let comm = Communicator::init().expect("init");
    let (me, n) = (comm.rank(), comm.size());
    assert_eq!(
        comm.connected_peers(),
        0,
        "rank {me} connected before any traffic"
    );
    let msg: Vec<u32> = (0..1000).collect();
    match me {
        0 => {
            comm.send(&msg, 1, 5).unwrap();
            // Eager or rendezvous, the send is complete: rank 1 has the data.
            assert_eq!(comm.connected_peers(), 1, "rank 0 talked to rank 1 only");
        }
        1 => {
            let mut got = vec![0u32; 1000];
            let st = comm.recv(&mut got, 0, 5).unwrap();
            assert_eq!((st.source, got), (0, msg));
            assert_eq!(
                comm.connected_peers(),
                0,
                "a receive from rank 0 needs no address of rank 0"
            );
        }
        _ => assert_eq!(comm.connected_peers(), 0),
    }
    println!(
        "rank {me}: {} of {n} connected, {} bytes of per-peer state",
        comm.connected_peers(),
        comm.peer_state_bytes()
    );
    // Collectives, and finalize after them, still work with the others connected on first
    // use.
    let mut v = [u64::from(me) + 1];
    comm.allreduce(&mut v, ReduceOp::Sum).unwrap();
    assert_eq!(v[0], u64::from(n) * u64::from(n + 1) / 2);
    assert!(comm.connected_peers() >= 1);
    comm.finalize().unwrap();
    println!("rank {me}: lazy peers ok");
}

#[test]
fn only_used_peers_are_connected() {
    for transports in ["ip", "shm"] {
        let out = efarun(
            4,
            "child_one_pair",
            &[("EFA_TRANSPORTS", transports), ("EFA_FASTBOX", "0")],
        );
        assert!(out.status.success(), "efarun failed over {transports}");
        let text = String::from_utf8_lossy(&out.stdout);
        assert_eq!(
            text.matches("lazy peers ok").count(),
            4,
            "{transports}: {text}"
        );
    }
}

//! efa-core's situation-specific errors, provoked through the public API across real ranks
//! (2 ranks under `efarun`, on shm and on IP): each check matches the variant and its fields,
//! and the source chain where the error has one.

mod common;

use std::error::Error as _;

use common::{efarun, in_job};
use efa_core::placement::{Transport, TransportSet};
use efa_core::{Communicator, Error, ReduceOp, WindowAccess};

/// Rank program: a collective called with different counts and windows of different sizes,
/// then proof that the communicator still works (the collectives' own argument errors,
/// `Error::Collective`, are tested in tests/coll.rs).
#[test]
#[ignore = "rank program for collective_and_window_errors_are_typed"]
fn child_errors() {
    if !in_job() {
        return;
    }
    let comm = Communicator::init().unwrap();
    let (me, n) = (comm.rank(), comm.size());
    assert_eq!(n, 2, "this program is written for 2 ranks");
    let other = 1 - me;

    // The ranks pass different counts.
    let mut b = vec![1f32; 10 + me as usize];
    let e = comm.allreduce(&mut b, ReduceOp::Sum).unwrap_err();
    match &e {
        Error::CollectiveMismatch { ranks, calls, .. } => {
            let mut r = *ranks;
            r.sort();
            assert_eq!(r, [0, 1], "{e}");
            let of = |rank: u32| &calls[ranks.iter().position(|&x| x == rank).unwrap()];
            assert!(of(0).contains(" 10 x f32"), "{e}");
            assert!(of(1).contains(" 11 x f32"), "{e}");
        }
        other => panic!("expected CollectiveMismatch, got {other:?}"),
    }

    // Windows of different sizes.
    let e = comm
        .window::<u32>(4 + me as usize, WindowAccess::ReadWrite)
        .map(|_| ())
        .unwrap_err();
    assert!(
        matches!(e, Error::WindowMismatch { peer, peer_bytes, bytes }
            if peer == other && peer_bytes == u64::from(4 + other) * 4 && bytes == u64::from(4 + me) * 4),
        "{e:?}"
    );

    // The communicator still works.
    let mut b = [1u64; 4];
    comm.allreduce(&mut b, ReduceOp::Sum).unwrap();
    assert_eq!(b, [2; 4]);

    println!("rank {me}: errors typed");
}

#[test]
fn collective_and_window_errors_are_typed() {
    for transports in ["shm", "ip"] {
        let out = efarun(2, "child_errors", &[("EFA_TRANSPORTS", transports)]);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{transports}: {text}");
        assert_eq!(
            text.matches("errors typed").count(),
            2,
            "{transports}: {text}"
        );
    }
}

/// Rank program: rank 0 allows only shm, rank 1 only IP, so no route joins them.
#[test]
#[ignore = "rank program for no_route_keeps_the_placement_error_as_source"]
fn child_no_route() {
    if !in_job() {
        return;
    }
    let me: u32 = std::env::var("EFA_RANK").unwrap().parse().unwrap();
    let only = if me == 0 {
        Transport::Shm
    } else {
        Transport::Ip
    };
    let e = Communicator::builder()
        .transports(TransportSet::empty().with(only))
        .build()
        .map(|_| ())
        .unwrap_err();
    let other = 1 - me;
    assert!(
        matches!(&e, Error::NoRoute { peer, source } if *peer == other
            && source.local_rank == me && source.peer_rank == other),
        "{e:?}"
    );
    let cause = e.source().expect("NoRoute keeps the placement error");
    let route = cause
        .downcast_ref::<efa_core::placement::NoRoute>()
        .expect("the source is placement::NoRoute");
    assert!(route.local_offers.contains(only), "{route:?}");
    assert!(e.to_string().contains("EFA_TRANSPORTS"), "{e}");
    println!("rank {me}: no route typed");
}

#[test]
fn no_route_keeps_the_placement_error_as_source() {
    let out = efarun(2, "child_no_route", &[]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(text.matches("no route typed").count(), 2, "{text}");
}

/// Rank program: libfabric sees only its shm provider (`FI_PROVIDER=shm`) and the rank
/// allows only IP, so no endpoint opens.
#[test]
#[ignore = "rank program for no_transport_names_each_allowed_transport"]
fn child_no_transport() {
    if !in_job() {
        return;
    }
    let e = Communicator::builder()
        .transports(TransportSet::empty().with(Transport::Ip))
        .build()
        .map(|_| ())
        .unwrap_err();
    match &e {
        Error::NoTransport { allowed, missing } => {
            assert_eq!(*allowed, TransportSet::empty().with(Transport::Ip), "{e:?}");
            assert_eq!(missing.len(), 1, "{e:?}");
            assert_eq!(missing[0].0, Transport::Ip, "{e:?}");
            assert!(!missing[0].1.is_empty(), "{e:?}");
        }
        other => panic!("expected NoTransport, got {other:?}"),
    }
    let text = e.to_string();
    assert!(
        text.contains("allowed: ip") && text.contains("EFA_TRANSPORTS"),
        "{text}"
    );
    println!("no transport typed");
}

#[test]
fn no_transport_names_each_allowed_transport() {
    let out = efarun(1, "child_no_transport", &[("FI_PROVIDER", "shm")]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(text.matches("no transport typed").count(), 1, "{text}");
}

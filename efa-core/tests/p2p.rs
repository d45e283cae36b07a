//! Point-to-point building blocks: `sendrecv`, probes, matched probes, the request trait
//! (`wait_any`, `wait_some`, `test_all`, `cancel`) and the builder's settings. Real
//! multi-process jobs started by `efarun` on shm and on IP.

use std::time::{Duration, Instant};

use efa_core::{
    AnyRequest, Communicator, Error, P2pRequest, ReduceOp, Request, SettingSource, Source, Tag,
    WindowAccess,
};

mod common;
use common::{in_job, run_both};

fn data(from: u32, tag: u32, len: usize) -> Vec<u32> {
    (0..len as u32)
        .map(|i| i ^ (from << 24) ^ (tag << 16))
        .collect()
}

/// Ring shifts by `sendrecv` and `sendrecv_replace`, eager and rendezvous sizes.
#[test]
#[ignore = "rank program for sendrecv_ring"]
fn child_sendrecv() {
    if !in_job() {
        return;
    }
    let comm = Communicator::init().unwrap();
    let (me, n) = (comm.rank(), comm.size());
    let (next, prev) = ((me + 1) % n, (me + n - 1) % n);
    for (k, len) in [0usize, 1, 1000, 100_000].into_iter().enumerate() {
        let tag = k as u32;
        let mut got = vec![0u32; len + 5];
        let st = comm
            .sendrecv(&data(me, tag, len), next, tag, &mut got, prev, tag)
            .unwrap();
        assert_eq!((st.source, st.tag, st.count::<u32>()), (prev, tag, len));
        assert_eq!(&got[..len], &data(prev, tag, len)[..], "sendrecv {len}");
        // In place: the buffer goes round the whole ring and comes back.
        let mut buf = data(me, tag + 10, len);
        for _ in 0..n {
            let st = comm
                .sendrecv_replace(&mut buf, next, 7, Source::Any, Tag::Is(7))
                .unwrap();
            assert_eq!((st.source, st.count::<u32>()), (prev, len));
        }
        assert_eq!(buf, data(me, tag + 10, len), "sendrecv_replace {len}");
    }
    comm.finalize().unwrap();
    println!("child_sendrecv: done");
}

#[test]
fn sendrecv_ring() {
    run_both(3, "child_sendrecv");
}

/// Probes: nothing there gives `None`; wildcard probes report source, tag and size, and a
/// receive of exactly that size follows; matched probes own their message, and a dropped
/// one goes back in order.
#[test]
#[ignore = "rank program for probes"]
fn child_probe() {
    if !in_job() {
        return;
    }
    let comm = Communicator::init().unwrap();
    let (me, n) = (comm.rank(), comm.size());
    // Nothing has been sent to anyone yet.
    assert_eq!(comm.iprobe(Source::Any, Tag::Any).unwrap(), None);
    assert!(comm.improbe(Source::Any, Tag::Any).unwrap().is_none());
    comm.barrier().unwrap();
    // Every other rank sends rank 0 a message whose size and tag depend on the sender:
    // eager and rendezvous sizes.
    let len_of = |r: u32| 10 + (r as usize) * 20_000;
    if me != 0 {
        comm.send(&data(me, 100 + me, len_of(me)), 0, 100 + me)
            .unwrap();
    } else {
        let mut seen = Vec::new();
        for _ in 1..n {
            let st = comm.probe(Source::Any, Tag::Any).unwrap();
            assert_eq!(st.tag, 100 + st.source);
            assert_eq!(st.len, len_of(st.source) * 4);
            // iprobe agrees, with the exact source and tag too.
            assert_eq!(comm.iprobe(st.source, st.tag).unwrap(), Some(st));
            let mut buf = vec![0u32; st.count::<u32>()];
            let got = comm.recv(&mut buf, st.source, st.tag).unwrap();
            assert_eq!(got, st);
            assert_eq!(buf, data(st.source, st.tag, buf.len()));
            seen.push(st.source);
        }
        seen.sort_unstable();
        assert_eq!(seen, (1..n).collect::<Vec<_>>());
        assert_eq!(comm.iprobe(Source::Any, Tag::Any).unwrap(), None);
    }
    comm.barrier().unwrap();
    // Matched probe: rank 1 sends rank 0 three messages with one tag (the middle one a
    // rendezvous).
    if me == 1 {
        // Non-blocking: the rendezvous completes only when rank 0 receives it, after the
        // third message.
        let outs: Vec<Vec<u32>> = [3usize, 50_000, 4]
            .into_iter()
            .enumerate()
            .map(|(i, len)| data(1, i as u32, len))
            .collect();
        let sends: Vec<_> = outs.iter().map(|d| comm.isend(d, 0, 9).unwrap()).collect();
        for s in sends {
            s.wait().unwrap();
        }
    } else if me == 0 {
        let m = comm.mprobe(1, 9).unwrap();
        assert_eq!(m.status().count::<u32>(), 3);
        // A dropped matched message goes back to its place: a receive still gets it first.
        drop(m);
        let mut b = vec![0u32; 3];
        comm.recv(&mut b, 1, 9).unwrap();
        assert_eq!(b, data(1, 0, 3), "a requeued message lost its order");
        // A matched message is this handle's alone: a receive gets the next one.
        let m = comm.mprobe(Source::Any, Tag::Any).unwrap();
        let st = m.status();
        assert_eq!((st.source, st.tag, st.count::<u32>()), (1, 9, 50_000));
        let mut next = vec![0u32; 4];
        comm.recv(&mut next, 1, 9).unwrap();
        assert_eq!(next, data(1, 2, 4));
        let mut big = vec![0u32; st.count::<u32>()];
        assert_eq!(m.recv(&mut big).unwrap(), st);
        assert_eq!(big, data(1, 1, 50_000));
        assert!(comm.improbe(1, 9).unwrap().is_none());
        // Too small a buffer: Truncated, nothing written.
        comm.barrier().unwrap();
        let m = comm.mprobe(1, 10).unwrap();
        let mut small = [0u32; 2];
        assert!(matches!(
            m.recv(&mut small),
            Err(Error::Truncated { peer: 1, .. })
        ));
        assert_eq!(small, [0, 0]);
    }
    if me == 1 {
        comm.barrier().unwrap();
        comm.send(&[1u32, 2, 3], 0, 10).unwrap();
    } else if me != 0 {
        comm.barrier().unwrap();
    }
    comm.finalize().unwrap();
    println!("child_probe: done");
}

#[test]
fn probes() {
    run_both(3, "child_probe");
}

/// `wait_any`, `wait_some` and `test_all` over a mix of send, receive, collective and RMA
/// requests; `cancel` of a receive; a `wait_any` that passes the deadline.
#[test]
#[ignore = "rank program for request_model"]
fn child_requests() {
    if !in_job() {
        return;
    }
    let comm = Communicator::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let (me, n) = (comm.rank(), comm.size());
    let (next, prev) = ((me + 1) % n, (me + n - 1) % n);

    // A receive that nothing matches is cancelled; the message sent later for the same
    // source and tag goes to the next receive, not the cancelled one.
    let mut b = [0u32; 4];
    let mut r = comm.irecv(&mut b, prev, 50).unwrap();
    assert!(!r.test().unwrap());
    assert!(
        r.cancel().unwrap(),
        "an unmatched receive must be cancellable"
    );
    assert!(r.test().unwrap(), "a cancelled receive is complete");
    assert!(matches!(r.wait(), Err(Error::Cancelled)));
    comm.barrier().unwrap();
    comm.send(&[5u32, 6], next, 50).unwrap();
    let mut b2 = [0u32; 4];
    let st = comm.recv(&mut b2, prev, 50).unwrap();
    assert_eq!((st.count::<u32>(), b2[..2].to_vec()), (2, vec![5, 6]));
    assert_eq!(b, [0; 4], "a cancelled receive wrote its buffer");
    // A matched receive cannot be cancelled: it completes normally.
    let mut b3 = [0u32; 1];
    let mut r = comm.irecv(&mut b3, prev, 51).unwrap();
    comm.send(&[77u32], next, 51).unwrap();
    let start = Instant::now();
    while !r.test().unwrap() {
        assert!(start.elapsed() < Duration::from_secs(5));
    }
    assert!(!r.cancel().unwrap());
    assert_eq!(r.wait().unwrap().source, prev);
    assert_eq!(b3, [77]);

    // A mix: receive, send, collective, RMA put; waited for by wait_any until all done.
    let win = comm.window::<u32>(4, WindowAccess::ReadWrite).unwrap();
    let mut got = vec![0u32; 20_000];
    let mut recv = comm.irecv(&mut got, prev, 60).unwrap();
    let mut coll = comm.iallreduce(vec![me; 100], ReduceOp::Sum);
    let mut put = win.iput(next, 1, &[me + 1]).unwrap();
    let out = data(me, 60, 20_000);
    let mut send = comm.isend(&out, next, 60).unwrap();
    let mut cancelled = [false; 4];
    {
        let mut reqs: Vec<&mut dyn AnyRequest> = vec![&mut recv, &mut coll, &mut put, &mut send];
        let mut left: Vec<usize> = (0..4).collect();
        while !left.is_empty() {
            let mut subset: Vec<&mut dyn AnyRequest> = Vec::new();
            let mut index = Vec::new();
            for (i, r) in reqs.iter_mut().enumerate() {
                if left.contains(&i) {
                    subset.push(&mut **r);
                    index.push(i);
                }
            }
            let k = comm.wait_any(&mut subset).unwrap().expect("requests given");
            let done = index[k];
            assert!(
                subset[k].test().unwrap(),
                "wait_any returned an unfinished request"
            );
            // Only the receive was cancellable, and it is complete now.
            cancelled[done] = subset[k].cancel().unwrap();
            left.retain(|&i| i != done);
        }
        assert!(comm.test_all(&mut reqs).unwrap());
        let some = comm.wait_some(&mut reqs).unwrap();
        assert_eq!(
            some,
            vec![0, 1, 2, 3],
            "wait_some lists every completed request"
        );
    }
    assert_eq!(
        cancelled, [false; 4],
        "completed requests cannot be cancelled"
    );
    assert_eq!(recv.wait().unwrap().source, prev);
    assert_eq!(got, data(prev, 60, 20_000));
    let sum: u32 = (0..n).sum();
    assert!(Request::wait(coll).unwrap().iter().all(|&x| x == sum));
    Request::wait(put).unwrap();
    Request::wait(send).unwrap();
    win.fence().unwrap();
    assert_eq!(win.local_to_vec()[1], prev + 1);
    win.free().unwrap();
    assert_eq!(comm.wait_any(&mut []).unwrap(), None);
    assert!(comm.wait_some(&mut []).unwrap().is_empty());
    assert!(comm.test_all(&mut []).unwrap());

    // test_all is false while one request is unfinished; wait_some returns only the
    // finished ones.
    let mut never = [0u8; 1];
    let mut pending = comm.irecv(&mut never, prev, 70).unwrap();
    let mut sent = comm.isend(&[1u8], next, 71).unwrap();
    let mut b4 = [0u8; 1];
    comm.recv(&mut b4, prev, 71).unwrap();
    {
        let mut reqs: [&mut dyn AnyRequest; 2] = [&mut pending, &mut sent];
        assert!(!comm.test_all(&mut reqs).unwrap());
        assert_eq!(comm.wait_some(&mut reqs).unwrap(), vec![1]);
    }
    sent.wait().unwrap();
    // Nothing will match: wait_any passes the 5 s deadline with a Timeout.
    let start = Instant::now();
    let e = comm.wait_any(&mut [&mut pending]).unwrap_err();
    assert!(matches!(e, Error::Timeout { op: "wait_any", .. }), "{e:?}");
    assert!(
        start.elapsed() >= Duration::from_secs(5),
        "{:?}",
        start.elapsed()
    );
    assert!(pending.cancel().unwrap());
    drop(pending);
    comm.barrier().unwrap();
    comm.finalize().unwrap();
    println!("child_requests: done");
}

#[test]
fn request_model() {
    run_both(2, "child_requests");
    run_both(3, "child_requests");
}

/// The deadline of [`child_wait_all_deadline`] (it also bounds joining).
const WAIT_ALL_TIMEOUT: Duration = Duration::from_secs(3);
/// Receives in that child that nothing matches.
const NEVER: usize = 4;

/// `wait_all` over requests that never complete (receives from any source, on a tag
/// nobody sends) has one deadline for the whole call: it returns `Timeout` after about one
/// timeout, not one per request (which would be `NEVER` + 1 timeouts). A send in the same
/// call, whose receive is posted, still completes.
#[test]
#[ignore = "rank program for wait_all_has_one_deadline"]
fn child_wait_all_deadline() {
    if !in_job() {
        return;
    }
    let comm = Communicator::builder()
        .timeout(WAIT_ALL_TIMEOUT)
        .build()
        .unwrap();
    let (me, n) = (comm.rank(), comm.size());
    let (next, prev) = ((me + 1) % n, (me + n - 1) % n);
    let mut bufs = [[0u32; 4]; NEVER];
    let sent = [me, 7];
    let mut reqs: Vec<P2pRequest<'_>> = vec![comm.isend(&sent, next, 81).unwrap().into()];
    for b in bufs.iter_mut() {
        reqs.push(comm.irecv(b, Source::Any, 82).unwrap().into());
    }
    comm.barrier().unwrap();
    let start = Instant::now();
    let e = comm.wait_all(reqs).unwrap_err();
    let took = start.elapsed();
    match e {
        Error::Timeout {
            peer: None, waited, ..
        } => {
            assert!(waited >= WAIT_ALL_TIMEOUT, "reported after {waited:?}");
        }
        other => panic!("rank {me}: expected a timeout naming no peer, got {other:?}"),
    }
    assert!(
        took >= WAIT_ALL_TIMEOUT,
        "rank {me}: gave up after {took:?}, before the deadline"
    );
    assert!(
        took < 2 * WAIT_ALL_TIMEOUT,
        "rank {me}: wait_all of {NEVER} unmatched receives took {took:?}: one deadline of \
         {WAIT_ALL_TIMEOUT:?} per request, not one for the call"
    );
    let mut b = [0u32; 2];
    comm.recv(&mut b, prev, 81).unwrap();
    assert_eq!(b, [prev, 7]);
    comm.barrier().unwrap();
    comm.finalize().unwrap();
    println!("child_wait_all_deadline: done");
}

#[test]
fn wait_all_has_one_deadline() {
    run_both(2, "child_wait_all_deadline");
}

/// Settings without an environment variable are set through the builder and read back.
#[test]
#[ignore = "rank program for builder_settings"]
fn child_settings() {
    if !in_job() {
        return;
    }
    let comm = Communicator::builder()
        .rx_depth(8)
        .shm_eager_limit(1024)
        .eager_limit(512)
        .build()
        .unwrap();
    let c = comm.config();
    assert_eq!(
        (c.rx_depth(), c.shm_eager_limit(), c.eager_limit()),
        (8, 1024, 512)
    );
    // Many more messages than posted buffers, of every size class, still arrive.
    let (me, n) = (comm.rank(), comm.size());
    let (next, prev) = ((me + 1) % n, (me + n - 1) % n);
    let outs: Vec<Vec<u32>> = (0..100u32)
        .map(|k| data(me, k, [1usize, 200, 2000][k as usize % 3]))
        .collect();
    let sends: Vec<_> = (0..100u32)
        .map(|k| comm.isend(&outs[k as usize], next, k).unwrap())
        .collect();
    for k in 0..100u32 {
        let len = [1usize, 200, 2000][k as usize % 3];
        let mut b = vec![0u32; len];
        comm.recv(&mut b, prev, k).unwrap();
        assert_eq!(b, data(prev, k, len));
    }
    for s in sends {
        s.wait().unwrap();
    }
    comm.finalize().unwrap();
    println!("child_settings: done");
}

#[test]
fn builder_settings() {
    run_both(2, "child_settings");
    // Bad values fail `build` before anything is joined, naming the setter.
    for (b, setter) in [
        (
            Communicator::builder().rx_depth(0),
            "CommunicatorBuilder::rx_depth",
        ),
        (
            Communicator::builder().rx_depth(1 << 20),
            "CommunicatorBuilder::rx_depth",
        ),
        (
            Communicator::builder().shm_eager_limit(2 << 20),
            "CommunicatorBuilder::shm_eager_limit",
        ),
    ] {
        match b.build() {
            Err(Error::Setting(s)) => {
                assert_eq!(s.source_of_value, SettingSource::Argument(setter), "{s}")
            }
            other => panic!("{setter}: expected a setting error, got {other:?}"),
        }
    }
}

/// Large messages (RGET rendezvous, read straight into the receive buffer by `wait`):
/// blocking ping-pong, and the exchange where each rank posts its receive, then sends with a
/// blocking `send` and only then waits: the sender's send completes only once the receiver
/// has read, so a receiver that read only inside its own `wait` would deadlock here.
#[test]
#[ignore = "rank program for large_messages_by_rget"]
fn child_rget() {
    if !in_job() {
        return;
    }
    let comm = Communicator::init().unwrap();
    let (me, n) = (comm.rank(), comm.size());
    let peer = 1 - me;
    assert_eq!(n, 2);
    for len in [64 << 10, 1 << 20, 4 << 20] {
        let mine = data(me, 1, len / 4);
        let mut got = vec![0u32; len / 4];
        for _ in 0..3 {
            if me == 0 {
                comm.send(&mine, peer, 1).unwrap();
                comm.recv(&mut got, peer, 1).unwrap();
            } else {
                comm.recv(&mut got, peer, 1).unwrap();
                comm.send(&mine, peer, 1).unwrap();
            }
            assert_eq!(got, data(peer, 1, len / 4), "ping-pong {len}");
            got.fill(0);
        }
        let r = comm.irecv(&mut got, peer, 2).unwrap();
        comm.send(&mine, peer, 2).unwrap();
        let st = r.wait().unwrap();
        assert_eq!(st.len, len);
        assert_eq!(got, data(peer, 1, len / 4), "exchange {len}");
        // A window of isends from one buffer, received by wait_all (every message read in
        // place), both ways at once.
        let mut slots = vec![0u32; 4 * len / 4];
        let mut reqs: Vec<P2pRequest<'_>> = Vec::new();
        for slot in slots.chunks_exact_mut(len / 4) {
            reqs.push(comm.irecv(slot, peer, 3).unwrap().into());
        }
        for _ in 0..4 {
            reqs.push(comm.isend(&mine, peer, 3).unwrap().into());
        }
        let sts = comm.wait_all(reqs).unwrap();
        for (st, slot) in sts.iter().zip(slots.chunks_exact(len / 4)) {
            assert_eq!(st.expect("a receive's status").len, len);
            assert!(slot == data(peer, 1, len / 4), "window of {len}");
        }
        // A dropped isend of a registered buffer waits until the receiver, late on purpose,
        // has read it: the buffer is rewritten right after the drop, and the receiver must
        // still get what was sent.
        let mut out = data(me, 4, len / 4);
        if me == 0 {
            drop(comm.isend(&out, peer, 4).unwrap());
            out.fill(0xdead_beef);
        } else {
            std::thread::sleep(Duration::from_millis(200));
            comm.recv(&mut got, peer, 4).unwrap();
            assert!(
                got == data(peer, 4, len / 4),
                "dropped isend of {len} changed"
            );
        }
        drop(out);
    }
    comm.finalize().unwrap();
    println!("child_rget: done");
}

#[test]
fn large_messages_by_rget() {
    run_both(2, "child_rget");
}

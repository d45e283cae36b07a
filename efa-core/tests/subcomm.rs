//! Sub-communicators (`dup`, `split`): real multi-process jobs started by `efarun` on shm and
//! on IP, each rank running one of the `#[ignore]`d child tests of this file.

use efa_core::{Communicator, Error, ReduceOp, Source, Tag, WindowAccess};

mod common;
use common::{efarun, in_job, run_both};

/// Equal tags on the world and on a dup never cross: wildcard receives and probes on one
/// see nothing of the other, a receive posted with wildcards on the dup does not take a
/// world message, and collectives' internal tags (both at their first call) do not mix.
#[test]
#[ignore = "rank program for dup_isolates_traffic"]
fn child_dup() {
    if !in_job() {
        return;
    }
    let world = Communicator::init().unwrap();
    let dup = world.dup().unwrap();
    let (me, n) = (world.rank(), world.size());
    let (next, prev) = ((me + 1) % n, (me + n - 1) % n);
    assert_eq!((dup.rank(), dup.size()), (me, n));
    assert_ne!(dup.context_id(), world.context_id());
    // A second dup gets yet another context.
    let dup2 = world.dup().unwrap();
    assert_ne!(dup2.context_id(), dup.context_id());

    // A world message with tag 5 has arrived here; the dup sees nothing.
    world.send(&[1000 + me], next, 5).unwrap();
    let st = world.probe(prev, 5).unwrap();
    assert_eq!((st.source, st.tag, st.count::<u32>()), (prev, 5, 1));
    assert_eq!(dup.iprobe(Source::Any, Tag::Any).unwrap(), None);
    assert!(dup.improbe(Source::Any, Tag::Any).unwrap().is_none());
    world.barrier().unwrap();
    // The dup's message with the same tag is the one a dup wildcard receive gets.
    dup.send(&[2000 + me], next, 5).unwrap();
    let mut got = [0u32];
    let st = dup.recv(&mut got, Source::Any, Tag::Any).unwrap();
    assert_eq!((got[0], st.source, st.tag), (2000 + prev, prev, 5));
    let st = world.recv(&mut got, Source::Any, Tag::Any).unwrap();
    assert_eq!((got[0], st.source, st.tag), (1000 + prev, prev, 5));

    // A wildcard receive posted on the dup first does not take the world's message.
    let mut on_dup = [0u32];
    let mut r = dup.irecv(&mut on_dup, Source::Any, Tag::Any).unwrap();
    world.barrier().unwrap();
    world.send(&[3000 + me], next, 6).unwrap();
    let mut w = [0u32];
    world.recv(&mut w, Source::Any, Tag::Any).unwrap();
    assert_eq!(w[0], 3000 + prev);
    assert!(
        !r.test().unwrap(),
        "the dup's wildcard receive took a world message"
    );
    world.barrier().unwrap();
    dup.send(&[4000 + me], next, 6).unwrap();
    let st = r.wait().unwrap();
    assert_eq!((on_dup[0], st.source), (4000 + prev, prev));

    // Collectives on both at once: both are at the same collective sequence number, so
    // their internal tags are equal; only the context keeps them apart.
    for round in 0..20u32 {
        let mut a = vec![me + round; 1000];
        let mut b = vec![(me + 1) * 7 + round; 1000];
        let ra = world.iallreduce(a.clone(), ReduceOp::Sum);
        dup.allreduce(&mut b, ReduceOp::Sum).unwrap();
        a = ra.wait().unwrap();
        let sum_a: u32 = (0..n).map(|r| r + round).sum();
        let sum_b: u32 = (0..n).map(|r| (r + 1) * 7 + round).sum();
        assert!(
            a.iter().all(|&x| x == sum_a),
            "world allreduce round {round}"
        );
        assert!(b.iter().all(|&x| x == sum_b), "dup allreduce round {round}");
    }
    // A collective that fails on the dup (ranks pass different lengths: its abort
    // messages go to every rank of the dup) leaves the world's collectives alone.
    let mut bad = vec![1u32; 10 + me as usize];
    let e = dup.allreduce(&mut bad, ReduceOp::Sum).unwrap_err();
    assert!(matches!(e, Error::CollectiveMismatch { .. }), "{e:?}");
    let mut x = [1u32];
    world.allreduce(&mut x, ReduceOp::Sum).unwrap();
    assert_eq!(x[0], n);
    // Finalizing the dup releases it only: the world still works.
    dup.finalize().unwrap();
    drop(dup2);
    let mut x = [me];
    world.allreduce(&mut x, ReduceOp::Max).unwrap();
    assert_eq!(x[0], n - 1);
    world.finalize().unwrap();
    println!("child_dup: done");
}

#[test]
fn dup_isolates_traffic() {
    run_both(3, "child_dup");
}

/// Even and odd ranks with reversed keys; the last rank gives no color. Checks the ranks,
/// point-to-point in the new numbering, and collectives on the halves running concurrently
/// with world collectives and world point-to-point on another thread.
#[test]
#[ignore = "rank program for split_even_odd"]
fn child_split() {
    if !in_job() {
        return;
    }
    let world = Communicator::init().unwrap();
    let (me, n) = (world.rank(), world.size());
    let color = (me != n - 1 || n < 4).then_some(me % 2);
    let half = world.split(color, -(me as i32)).unwrap();
    let Some(half) = half else {
        assert_eq!(me, n - 1);
        // Still part of the world: take part in its traffic below.
        world_traffic(&world, 30);
        world.barrier().unwrap();
        world.finalize().unwrap();
        println!("child_split: done");
        return;
    };
    // Members: same parity, not the excluded last rank; reversed keys: descending rank.
    let mut members: Vec<u32> = (0..n)
        .filter(|&r| r % 2 == me % 2 && (r != n - 1 || n < 4))
        .collect();
    members.reverse();
    let want_rank = members.iter().position(|&r| r == me).unwrap() as u32;
    assert_eq!(
        half.size(),
        members.len() as u32,
        "size of color {}",
        me % 2
    );
    assert_eq!(half.rank(), want_rank, "rank of world rank {me}");
    for (l, &w) in members.iter().enumerate() {
        assert_eq!(half.world_rank(l as u32).unwrap(), w);
    }
    assert!(matches!(
        half.world_rank(half.size()),
        Err(Error::InvalidRank { .. })
    ));
    // Point-to-point in the half's ranks: a ring by sendrecv; the status names half ranks.
    let (hn, hme) = (half.size(), half.rank());
    let (hnext, hprev) = ((hme + 1) % hn, (hme + hn - 1) % hn);
    let mut got = vec![0u32; 3000];
    let st = half
        .sendrecv(&vec![me; 3000], hnext, 1, &mut got, Source::Any, 1)
        .unwrap();
    assert_eq!(st.source, hprev, "status source in the half's ranks");
    assert!(got.iter().all(|&x| x == members[hprev as usize]));

    // A split of the split (reversed again): ranks compose through both translations.
    let rev = half.split(Some(0), -(hme as i32)).unwrap().unwrap();
    assert_eq!((rev.rank(), rev.size()), (hn - 1 - hme, hn));
    assert_eq!(rev.world_rank(rev.rank()).unwrap(), me);
    let rnext = (rev.rank() + 1) % hn;
    let mut one = [0u32];
    let st = rev
        .sendrecv(&[me], rnext, 3, &mut one, Source::Any, Tag::Any)
        .unwrap();
    assert_eq!(rev.world_rank(st.source).unwrap(), one[0]);
    assert_eq!(st.source, (rev.rank() + hn - 1) % hn);
    drop(rev);

    // Collectives on the half while another thread runs world traffic.
    std::thread::scope(|s| {
        let w = s.spawn(|| world_traffic(&world, 30));
        for round in 0..30u32 {
            let mut v = vec![me + round; 500];
            half.allreduce(&mut v, ReduceOp::Sum).unwrap();
            let want: u32 = members.iter().map(|&r| r + round).sum();
            assert!(v.iter().all(|&x| x == want), "half allreduce round {round}");
            let mut b = vec![if hme == round % hn { round + 1 } else { 0 }; 10_000];
            half.broadcast(&mut b, round % hn).unwrap();
            assert!(
                b.iter().all(|&x| x == round + 1),
                "half broadcast round {round}"
            );
            half.barrier().unwrap();
        }
        w.join().unwrap();
    });
    // A window on the half: each rank puts its world rank into the next half rank.
    let win = half.window::<u32>(1, WindowAccess::ReadWrite).unwrap();
    win.put(hnext, 0, &[me]).unwrap();
    win.fence().unwrap();
    assert_eq!(win.local_to_vec()[0], members[hprev as usize]);
    win.free().unwrap();
    drop(half);
    world.barrier().unwrap();
    world.finalize().unwrap();
    println!("child_split: done");
}

/// World allreduces and a world ring, `rounds` times.
fn world_traffic(world: &Communicator, rounds: u32) {
    let (me, n) = (world.rank(), world.size());
    let (next, prev) = ((me + 1) % n, (me + n - 1) % n);
    for round in 0..rounds {
        let mut v = vec![me * 3 + round; 700];
        world.allreduce(&mut v, ReduceOp::Sum).unwrap();
        let want: u32 = (0..n).map(|r| r * 3 + round).sum();
        assert!(
            v.iter().all(|&x| x == want),
            "world allreduce round {round}"
        );
        let mut got = vec![0u32; 5000];
        let st = world
            .sendrecv(&vec![me ^ round; 5000], next, 2, &mut got, prev, Tag::Any)
            .unwrap();
        assert_eq!(st.source, prev);
        assert!(
            got.iter().all(|&x| x == prev ^ round),
            "world ring round {round}"
        );
    }
}

#[test]
fn split_even_odd() {
    run_both(4, "child_split");
    run_both(2, "child_split");
}

/// Two threads of every rank create communicators from two different parents at once, for
/// many rounds, with a rank-parity delay so that the processes see the two creations in
/// different orders. Every communicator of a process has a context id of its own (none is
/// ever reused), every rank agrees on each id, and no message crosses between the two.
#[test]
#[ignore = "rank program for concurrent_creation_gives_distinct_contexts"]
fn child_concurrent_create() {
    if !in_job() {
        return;
    }
    let world = Communicator::init().unwrap();
    let (me, n) = (world.rank(), world.size());
    let p1 = world.dup().unwrap();
    let p2 = world.dup().unwrap();
    let mut seen = std::collections::BTreeSet::from([0, p1.context_id(), p2.context_id()]);
    assert_eq!(seen.len(), 3);
    let mut kept = Vec::new();
    let rounds = 25;
    for round in 0..rounds {
        let go = std::sync::Arc::new(std::sync::Barrier::new(2));
        let (a, b) = (p1.clone(), p2.clone());
        let (g1, g2) = (go.clone(), go.clone());
        let d = std::time::Duration::from_micros(if me % 2 == 0 { 0 } else { 300 });
        let t1 = std::thread::spawn(move || {
            g1.wait();
            if round % 2 == 0 {
                a.dup()
            } else {
                // Every rank in one color: a split that is a dup, through split's path.
                a.split(Some(7), -(me as i32)).map(|c| c.unwrap())
            }
        });
        let t2 = std::thread::spawn(move || {
            g2.wait();
            std::thread::sleep(d);
            b.dup()
        });
        let (c1, c2) = (t1.join().unwrap().unwrap(), t2.join().unwrap().unwrap());
        assert_ne!(
            c1.context_id(),
            c2.context_id(),
            "round {round}: two communicators got the same context id"
        );
        for c in [&c1, &c2] {
            assert!(
                seen.insert(c.context_id()),
                "round {round}: context id {} used twice in this process",
                c.context_id()
            );
        }
        // Every rank agrees on both ids.
        let mut ids = vec![0u32; 2 * n as usize];
        ids[2 * me as usize] = c1.context_id();
        ids[2 * me as usize + 1] = c2.context_id();
        world.allgather(&mut ids).unwrap();
        for r in 0..n as usize {
            assert_eq!(
                (ids[2 * r], ids[2 * r + 1]),
                (c1.context_id(), c2.context_id()),
                "round {round}: rank {r} disagrees"
            );
        }
        // No message crosses: c1's rank order is reversed (key -me) on odd rounds.
        let next1 = (c1.rank() + 1) % n;
        let next2 = (c2.rank() + 1) % n;
        c1.send(&[1000 + round], next1, 5).unwrap();
        c2.send(&[2000 + round], next2, 5).unwrap();
        let mut got = [0u32];
        c2.recv(&mut got, Source::Any, Tag::Any).unwrap();
        assert_eq!(
            got[0],
            2000 + round,
            "round {round}: c2 received c1's message"
        );
        c1.recv(&mut got, Source::Any, Tag::Any).unwrap();
        assert_eq!(
            got[0],
            1000 + round,
            "round {round}: c1 received c2's message"
        );
        kept.push((c1, c2));
    }
    world.barrier().unwrap();
    drop(kept);
    println!("child_concurrent_create: done ({} ids)", seen.len());
    world.finalize().unwrap();
}

#[test]
fn concurrent_creation_gives_distinct_contexts() {
    run_both(4, "child_concurrent_create");
}

/// A second world communicator of the same job while the first is alive is a typed error
/// that says what to do; once the first is finalized (a clone still held), or its last
/// handle dropped, a new one may be built, and it works (its store keys are its own: the
/// first world's ready marks made it start before its peers could receive).
#[test]
#[ignore = "rank program for second_init_is_refused_until_finalize"]
fn child_init_twice() {
    if !in_job() {
        return;
    }
    let world = Communicator::init().unwrap();
    let clone = world.clone();
    let e = Communicator::init().map(|_| ()).unwrap_err();
    assert!(matches!(e, Error::AlreadyInitialized { .. }), "{e:?}");
    assert!(e.to_string().contains("dup()"), "{e}");
    let e = Communicator::builder().build().map(|_| ()).unwrap_err();
    assert!(matches!(e, Error::AlreadyInitialized { .. }), "{e:?}");
    // The refused attempts did not disturb the first.
    let mut x = [1u32];
    world.allreduce(&mut x, ReduceOp::Sum).unwrap();
    assert_eq!(x[0], world.size());
    let dup = world.dup().unwrap();
    dup.barrier().unwrap();
    drop(dup);
    world.finalize().unwrap();
    // Finalized, a clone still held: a new world may be built.
    let again = Communicator::init().expect("init after finalize");
    let e = Communicator::init().map(|_| ()).unwrap_err();
    assert!(matches!(e, Error::AlreadyInitialized { .. }), "{e:?}");
    let mut x = [2u32];
    again.allreduce(&mut x, ReduceOp::Sum).unwrap();
    assert_eq!(x[0], 2 * again.size());
    drop(clone);
    // Its last handle dropped without finalize: the next one may be built too.
    drop(again);
    let third = Communicator::init().expect("init after the last handle was dropped");
    let mut x = [3u32];
    third.allreduce(&mut x, ReduceOp::Sum).unwrap();
    assert_eq!(x[0], 3 * third.size());
    println!("child_init_twice: done");
    third.finalize().unwrap();
}

#[test]
fn second_init_is_refused_until_finalize() {
    for env in [
        &[("EFA_TIMEOUT", "4")][..],
        &[("EFA_TIMEOUT", "4"), ("EFA_TRANSPORTS", "ip")][..],
    ] {
        let out = efarun(4, "child_init_twice", env);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "child_init_twice on {env:?} failed:\n{text}"
        );
        assert_eq!(
            text.matches("child_init_twice: done").count(),
            4,
            "every rank of child_init_twice on {env:?} must finish:\n{text}"
        );
    }
}

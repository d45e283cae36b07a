//! Memory that the NIC touches: owned and borrowed registrations ([`MemoryRegion`]), memory
//! peers write ([`TargetBuf`], copy-in/copy-out), and RMA on borrowed user memory for
//! zero-copy rendezvous ([`Endpoint::expose`], [`rma_scope`], [`Endpoint::read_into`]), on
//! every provider present with RMA (see `common` for the provider parameter).

mod common;

use common::*;
use efa_fabric::{
    rget_threshold, rma_scope, Access, Caps, Error, IoBuf, MemoryRegion, RegisteredBuf,
    RemoteRegion, TargetBuf,
};

fn rma_caps() -> Caps {
    Caps::MSG
        | Caps::TAGGED
        | Caps::RMA
        | Caps::READ
        | Caps::WRITE
        | Caps::REMOTE_READ
        | Caps::REMOTE_WRITE
}

#[test]
fn memory_region_holds_its_memory_and_gives_it_back() {
    for_each_provider("mr-owned", rma_caps(), |info| {
        let pair = Pair::new(info);
        let data = pattern(10_000, 3);
        // An owned region is an operation's buffer with its own descriptor.
        let mr = MemoryRegion::register(
            pair.a.domain(),
            data.clone(),
            Access::LOCAL | Access::REMOTE_READ,
            Some(&pair.a),
        )
        .unwrap();
        assert_eq!(mr.len(), 10_000);
        assert_eq!(mr.io_desc(), Some(mr.desc()));
        let remote = mr.remote();
        // The peer reads it by RMA, through the region's key.
        let got = pair
            .b
            .read(vec![0u8; 10_000], pair.b_to_a, &remote, 0)
            .unwrap()
            .wait(OP_TIMEOUT)
            .unwrap();
        assert_eq!(first_diff(&got.buf, &data), None);
        // into_inner deregisters and hands the very same memory back.
        let back = mr.into_inner();
        assert_eq!(back, data);
        // Borrowed: a shared borrow may be read remotely, never written remotely.
        let err = MemoryRegion::register(
            pair.a.domain(),
            &data[..],
            Access::REMOTE_WRITE,
            Some(&pair.a),
        )
        .unwrap_err();
        assert!(
            matches!(err, Error::SharedRemoteWrite { what } if what.contains("&[T]")),
            "{err:?}"
        );
        let mut scratch = [0u8; 64];
        let mr = MemoryRegion::register(
            pair.a.domain(),
            &mut scratch[..],
            Access::REMOTE_WRITE | Access::REMOTE_READ,
            Some(&pair.a),
        )
        .unwrap();
        pair.b
            .write(vec![9u8; 8], pair.b_to_a, &mr.remote(), 8)
            .unwrap()
            .wait(OP_TIMEOUT)
            .unwrap();
        // Flush: a read through the same connection is ordered after the write.
        pair.b
            .read(vec![0u8; 1], pair.b_to_a, &mr.remote(), 0)
            .unwrap()
            .wait(OP_TIMEOUT)
            .unwrap();
        // Deregistered, the borrow is back: the peer's bytes are there.
        let back: &mut [u8] = mr.into_inner();
        assert_eq!(&back[8..16], &[9u8; 8]);
        assert_eq!(&scratch[8..16], &[9u8; 8]);
        Outcome::Ran
    });
}

#[test]
fn registered_buf_refuses_remote_write_and_target_buf_copies() {
    for_each_provider("target-buf", rma_caps(), |info| {
        let pair = Pair::new(info);
        let err = RegisteredBuf::new(pair.b.domain(), 64, Access::REMOTE_WRITE, Some(&pair.b))
            .unwrap_err();
        assert!(
            matches!(
                err,
                Error::SharedRemoteWrite {
                    what: "RegisteredBuf"
                }
            ),
            "{err:?}"
        );
        let mut t = TargetBuf::new(
            pair.b.domain(),
            4096,
            Access::REMOTE_WRITE | Access::REMOTE_READ,
            Some(&pair.b),
        )
        .unwrap();
        // Local copy-in/copy-out at unaligned offsets and lengths.
        let data = pattern(1000, 5);
        t.write_local(13, &data).unwrap();
        let mut out = vec![0u8; 1000];
        t.read_local(13, &mut out).unwrap();
        assert_eq!(first_diff(&out, &data), None);
        let e = t.read_local(4000, &mut out).unwrap_err();
        assert!(
            matches!(
                e,
                Error::OutOfBounds {
                    op: "read_local",
                    region_len: 4096,
                    ..
                }
            ),
            "{e:?}"
        );
        assert!(
            t.write_local(usize::MAX, &[1]).is_err(),
            "overflow: an error"
        );
        t.fill_local(0, 4096, 0).unwrap();
        // A peer's write is seen through read_local.
        let w = pattern(777, 6);
        pair.a
            .write(w.clone(), pair.a_to_b, &t.remote(), 101)
            .unwrap()
            .wait(OP_TIMEOUT)
            .unwrap();
        let r = pair
            .a
            .read(vec![0u8; 777], pair.a_to_b, &t.remote(), 101)
            .unwrap()
            .wait(OP_TIMEOUT)
            .unwrap();
        assert_eq!(first_diff(&r.buf, &w), None);
        let mut seen = vec![0u8; 777];
        t.read_local(101, &mut seen).unwrap();
        assert_eq!(
            first_diff(&seen, &w),
            None,
            "the peer's write, read locally"
        );
        Outcome::Ran
    });
}

#[test]
fn rget_reads_exposed_user_memory_into_user_memory() {
    for_each_provider("rget", rma_caps(), |info| {
        let pair = Pair::new(info);
        for (i, len) in [1usize, 4096, 100_003, 4 << 20].into_iter().enumerate() {
            let data = pattern(len, 20 + i as u64);
            let exposed = pair.a.expose(&data).unwrap();
            assert_eq!(exposed.len(), len);
            assert!(!exposed.is_empty());
            // The descriptor travels as bytes, as in an RTS.
            let remote = RemoteRegion::from_bytes(&exposed.remote().to_bytes()).unwrap();
            assert_eq!(remote.len, len as u64);
            let mut dest = vec![0u8; len];
            let n = pair
                .b
                .read_into(&mut dest, pair.b_to_a, &remote, 0, OP_TIMEOUT)
                .unwrap_or_else(|e| panic!("read_into {len}: {e}"));
            assert_eq!(n, len);
            assert_eq!(first_diff(&dest, &data), None, "{len} bytes");
            // Part of it, at an offset.
            if len > 10 {
                let mut part = vec![0u8; len / 2];
                pair.b
                    .read_into(&mut part, pair.b_to_a, &remote, 5, OP_TIMEOUT)
                    .unwrap();
                assert_eq!(first_diff(&part, &data[5..5 + len / 2]), None);
            }
            // Out of bounds: a typed error, nothing read.
            let mut over = vec![0u8; len + 1];
            let e = pair
                .b
                .read_into(&mut over, pair.b_to_a, &remote, 0, OP_TIMEOUT)
                .unwrap_err();
            assert!(matches!(e, Error::OutOfBounds { op: "read", .. }), "{e:?}");
            drop(exposed);
        }
        // Zero bytes: nothing registered, nothing posted.
        let empty = pair.a.expose(&[]).unwrap();
        assert_eq!(empty.remote().len, 0);
        assert!(empty.is_empty());
        assert_eq!(empty.len(), 0);
        assert_eq!(
            pair.b
                .read_into(&mut [], pair.b_to_a, &empty.remote(), 0, OP_TIMEOUT)
                .unwrap(),
            0
        );
        Outcome::Ran
    });
}

#[test]
fn rma_scope_runs_several_reads_and_writes_on_borrowed_memory() {
    for_each_provider("rma-scope", rma_caps(), |info| {
        let pair = Pair::new(info);
        let src1 = pattern(300_000, 31);
        let src2 = pattern(5_000, 32);
        let e1 = pair.a.expose(&src1).unwrap();
        let e2 = pair.a.expose(&src2).unwrap();
        let (r1, r2) = (e1.remote(), e2.remote());
        let mut d1 = vec![0u8; 300_000];
        let mut d2 = vec![0u8; 5_000];
        let mut target = [0u8; 64];
        let tr = MemoryRegion::register(
            pair.a.domain(),
            &mut target[..],
            Access::REMOTE_WRITE | Access::REMOTE_READ,
            Some(&pair.a),
        )
        .unwrap();
        let remote_t = tr.remote();
        let put = [7u8; 16];
        let moved = rma_scope(OP_TIMEOUT, |s| -> efa_fabric::Result<usize> {
            let a = s.read(&pair.b, &mut d1, pair.b_to_a, &r1, 0)?;
            let b = s.read(&pair.b, &mut d2, pair.b_to_a, &r2, 0)?;
            let w = s.write(&pair.b, &put, pair.b_to_a, &remote_t, 16)?;
            // test() progresses and reports; wait() gives the bytes.
            let _ = s.test(b)?;
            s.wait_all()?;
            Ok(s.wait(a)? + s.wait(b)? + s.wait(w)?)
        })
        .unwrap();
        assert_eq!(moved, 300_000 + 5_000 + 16);
        assert_eq!(first_diff(&d1, &src1), None);
        assert_eq!(first_diff(&d2, &src2), None);
        // Read back through the peer's connection so the write has landed, then look.
        let mut check = vec![0u8; 16];
        pair.b
            .read_into(&mut check, pair.b_to_a, &remote_t, 16, OP_TIMEOUT)
            .unwrap();
        assert_eq!(check, put);
        drop(tr);
        assert_eq!(&target[16..32], &put);
        // Left unwaited: the scope drains the read before returning (the buffer is then
        // free to use, whatever it holds).
        let mut d3 = vec![0u8; 1 << 20];
        let big = pattern(1 << 20, 33);
        let e3 = pair.a.expose(&big).unwrap();
        rma_scope(OP_TIMEOUT, |s| {
            s.read(&pair.b, &mut d3, pair.b_to_a, &e3.remote(), 0)
                .unwrap();
        });
        // Nothing writes the buffer after the scope: overwrite it, keep both sides
        // progressing for a while (the Pair's progress threads do), and look again.
        d3.fill(0xEE);
        std::thread::sleep(std::time::Duration::from_millis(200));
        pair.b.progress().unwrap();
        assert!(
            d3.iter().all(|&x| x == 0xEE),
            "a drained read wrote the buffer after its scope ended"
        );
        drop((e1, e2, e3));
        Outcome::Ran
    });
}

#[test]
fn a_panic_in_a_scope_still_drains_its_reads() {
    for_each_provider("rma-scope-panic", rma_caps(), |info| {
        let pair = Pair::new(info);
        let src = pattern(2 << 20, 41);
        let e = pair.a.expose(&src).unwrap();
        let mut dest = vec![0u8; 2 << 20];
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            rma_scope(OP_TIMEOUT, |s| {
                s.read(&pair.b, &mut dest, pair.b_to_a, &e.remote(), 0)
                    .unwrap();
                panic!("user code panics with a read in flight");
            })
        }));
        assert!(r.is_err(), "the panic propagates");
        // The endpoint is still usable and no completion of the drained read is left over
        // for someone else: a fresh read works.
        let mut again = vec![0u8; 4096];
        pair.b
            .read_into(&mut again, pair.b_to_a, &e.remote(), 0, OP_TIMEOUT)
            .unwrap();
        assert_eq!(first_diff(&again, &src[..4096]), None);
        Outcome::Ran
    });
}

#[test]
fn rget_thresholds_are_stated_per_provider() {
    assert!(rget_threshold("udp;ofi_rxd").is_none(), "udp: no RMA");
    assert!(rget_threshold("udp").is_none(), "udp: no RMA");
    for p in [
        "shm",
        "tcp;ofi_rxm",
        "tcp",
        "sockets",
        "net",
        "verbs;ofi_rxm",
        "efa",
    ] {
        let t = rget_threshold(p).unwrap_or_else(|| panic!("{p}: a threshold"));
        assert!((4096..=64 << 20).contains(&t), "{p}: {t}");
    }
}

#[test]
fn a_scoped_read_times_out_at_the_scope_deadline_and_is_still_drained() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::{Duration, Instant};
    for_each_provider("rma-scope-timeout", rma_caps(), |info| {
        // `c` does not progress until told: its provider cannot serve the read (or even
        // accept the connection) meanwhile.
        let b = efa_fabric::Endpoint::open(info).unwrap();
        let c = efa_fabric::Endpoint::open(info).unwrap();
        let b_to_c = b.av().insert(&c.name().unwrap()).unwrap();
        c.av().insert(&b.name().unwrap()).unwrap();
        let src = pattern(1 << 20, 51);
        let exposed = c.expose(&src).unwrap();
        let remote = exposed.remote();
        let (go, stop) = (AtomicBool::new(false), AtomicBool::new(false));
        let mut dest = vec![0u8; 1 << 20];
        let limit = Duration::from_millis(300);
        let outcome = std::thread::scope(|threads| {
            threads.spawn(|| {
                while !stop.load(Ordering::Relaxed) {
                    if go.load(Ordering::Relaxed) {
                        let _ = c.progress();
                    }
                    std::thread::yield_now();
                }
            });
            let start = Instant::now();
            let r = rma_scope(limit, |s| {
                let id = s.read(&b, &mut dest, b_to_c, &remote, 0)?;
                let r = s.wait(id);
                // The peer shows up: the drain at the end of the scope can finish.
                go.store(true, Ordering::Relaxed);
                r
            });
            let took = start.elapsed();
            stop.store(true, Ordering::Relaxed);
            match r {
                Err(Error::Timeout { op: "read", waited }) => {
                    assert!(
                        waited >= limit,
                        "gave up after {waited:?}, before {limit:?}"
                    );
                    assert!(took < limit + OP_TIMEOUT, "the drain took {took:?}");
                    Outcome::Ran
                }
                Ok(_) => Outcome::Skipped(
                    "the read completed without the target's progress: no timeout to test".into(),
                ),
                Err(e) => panic!("expected a timeout, got {e:?}"),
            }
        });
        drop(exposed);
        outcome
    });
}

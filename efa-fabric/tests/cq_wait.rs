//! Completion queues with wait objects (`FI_WAIT_FD`, fi_cq(3)) and blocking on them
//! (`fi_trywait(3)` + `poll(2)`: `efa_fabric::block_on`).
//!
//! Per provider: a CQ opened with `CqWait::Fd` either has a wait fd or says it has none (the
//! provider refused one; the checks are then skipped, saying so). With a fd: blocking on an
//! empty CQ times out after its timeout, not before and not much later; and a message sent
//! by a peer while we block wakes us long before the (long) block timeout, which is what
//! makes `WaitPolicy::Block` usable.

mod common;

use std::time::{Duration, Instant};

use common::{for_each_provider, for_each_provider_where, Outcome, Progressor, OP_TIMEOUT};
use efa_fabric::{block_on, Caps, CompletionQueue, CqWait, Endpoint, Woken};

const MSG_CAPS: Caps = Caps::MSG.union(Caps::TAGGED);

/// Why `provider` cannot block a reader on a CQ wait fd; `None` for those that can. The
/// test runs on the others, and at least one of them must run the checks
/// (`EFA_TEST_MIN_PROVIDERS`, 4 in ci/test, counts providers of every kind and would fail
/// here, where only tcp;ofi_rxm and sockets, and verbs in the VM, can block).
/// `a_cq_without_wait_object_is_not_blocked_on` covers the ones left out.
fn cannot_block(provider: &str) -> Option<&'static str> {
    match provider {
        "shm" | "udp;ofi_rxd" => Some("opens no FI_WAIT_FD completion queue (libfabric 1.17)"),
        "net" => Some(
            "its CQ wait fd wakes at once every time (1000 wake-ups in under 1 ms measured): no \
             blocking possible",
        ),
        _ => None,
    }
}

#[test]
fn blocking_on_the_cq_wait_fd_wakes_when_a_message_arrives() {
    for_each_provider_where(
        "cq_wait",
        MSG_CAPS,
        cannot_block,
        "no provider here can block on a CQ wait fd",
        |info| {
            let domain = efa_fabric::Domain::open(info).unwrap();
            let av = efa_fabric::AddressVector::open(&domain).unwrap();
            let cq = CompletionQueue::open_with(&domain, 0, CqWait::Fd).unwrap();
            let Some(fd) = cq.wait_fd() else {
                return Outcome::Skipped(format!(
                    "{} opens no FI_WAIT_FD completion queue (polling only)",
                    info.provider()
                ));
            };
            assert!(fd >= 0);
            let a = Endpoint::builder(&domain, &av, &cq).build().unwrap();
            let b = Endpoint::open(info).unwrap();
            let a_to_b = a.av().insert(&b.name().unwrap()).unwrap();
            let b_to_a = b.av().insert(&a.name().unwrap()).unwrap();
            // Only b is progressed in the background: a is progressed by this thread alone, so
            // that it sleeps for real while it blocks.
            let _progress = Progressor::spawn(&b);
            let cqs = [cq.clone()];

            // Connection set-up (a progressed in the background meanwhile, as its connection
            // handshake needs).
            {
                let _set_up = Progressor::spawn(&a);
                let r = a.trecv(vec![0u8; 8], a_to_b, 1, 0).unwrap();
                let s = b.tsend(vec![1u8; 8], b_to_a, 1).unwrap();
                r.wait(OP_TIMEOUT).unwrap();
                s.wait(OP_TIMEOUT).unwrap();
            }

            // An empty CQ: block_on sleeps out its timeout (possibly in several calls when the
            // provider signals internal work), then says TimedOut.
            let slice = Duration::from_millis(100);
            let t = Instant::now();
            let mut woke = 0;
            loop {
                match block_on(&cqs, slice).unwrap() {
                    Woken::TimedOut => break,
                    Woken::Ready => {
                        woke += 1;
                        a.progress().unwrap();
                        if woke >= 1000 {
                            // A provider finding: blocking never sleeps on it (callers idle as
                            // with a yield instead).
                            return Outcome::Skipped(format!(
                                "{}: fi_trywait/poll on an idle CQ wakes at once every time \
                             ({woke} wake-ups in {:?}): no blocking possible",
                                info.provider(),
                                t.elapsed()
                            ));
                        }
                    }
                    Woken::NoWaitObject => panic!("the CQ has a wait fd"),
                }
            }
            assert!(
                t.elapsed() >= slice,
                "block_on returned TimedOut after {:?} < {slice:?}",
                t.elapsed()
            );

            // A peer's message while we block: the wait fd must wake us long before the block
            // timeout.
            let long = Duration::from_secs(10);
            let r = a.trecv(vec![0u8; 64], a_to_b, 2, 0).unwrap();
            let sender = {
                let b = b.clone();
                std::thread::spawn(move || {
                    std::thread::sleep(Duration::from_millis(200));
                    let sent = Instant::now();
                    b.tsend(vec![7u8; 64], b_to_a, 2)
                        .unwrap()
                        .wait(OP_TIMEOUT)
                        .unwrap();
                    sent
                })
            };
            let mut blocks = 0;
            let mut done = None;
            // (a is also progressed until the send completed: rxm's send completions need the
            // receiver's acknowledgements.)
            while done.is_none() || !sender.is_finished() {
                a.progress().unwrap();
                if r.is_done() {
                    done.get_or_insert_with(Instant::now);
                } else {
                    blocks += 1;
                    let _ = block_on(&cqs, long).unwrap();
                }
            }
            let done = done.expect("loop ends once done");
            let sent = sender.join().unwrap();
            let late = done.saturating_duration_since(sent);
            let got = r.wait(OP_TIMEOUT).unwrap();
            assert_eq!(got.buf, vec![7u8; 64]);
            println!(
                "{}: woke {late:?} after the send ({blocks} blocks)",
                info.provider()
            );
            assert!(
                late < Duration::from_secs(2),
                "{}: a message sent while blocking was seen {late:?} after it was sent: the \
             wait fd did not wake the blocked reader (block timeout {long:?})",
                info.provider()
            );
            Outcome::Ran
        },
    );
}

#[test]
fn a_cq_without_wait_object_is_not_blocked_on() {
    for_each_provider("cq_nowait", MSG_CAPS, |info| {
        let domain = efa_fabric::Domain::open(info).unwrap();
        let cq = CompletionQueue::open(&domain, 0).unwrap();
        assert_eq!(cq.wait_fd(), None);
        assert!(!cq.try_wait().unwrap(), "no wait fd: never safe to block");
        let t = Instant::now();
        assert_eq!(
            block_on(&[cq], Duration::from_secs(5)).unwrap(),
            Woken::NoWaitObject
        );
        assert!(t.elapsed() < Duration::from_secs(1), "it must not wait");
        Outcome::Ran
    });
}

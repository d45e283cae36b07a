//! The fast-box carrier under the communicator: 3 ranks on one host over shm send bursts of
//! mixed sizes to each other, so that messages take the rings (up to 32 KiB less headers),
//! the provider when a ring is full or the message larger (eager up to the shm eager limit
//! of 32 KiB), and the rendezvous (announced through a ring, data through the provider).
//! Every receive, from one sender with any tag, must get exactly the next message that
//! sender sent (MPI's non-overtaking rule across the two paths), byte for byte. The debug log shows that the
//! rings carried messages and that full rings sent some through the provider; with
//! `EFA_FASTBOX=0` no ring is set up.

use efa_core::{Communicator, Source, Tag};

mod common;
use common::{efarun, in_job};

const MSGS: u32 = 400;
/// Cycled through: ring-sized up to near the ring maximum (32,720 payload bytes with the
/// 64 KiB rings of 3 ranks), over it but eager (provider), rendezvous.
const SIZES: [usize; 6] = [0, 8, 1000, 32_000, 32_750, 70_000];

fn payload(from: u32, to: u32, k: u32) -> Vec<u8> {
    let len = SIZES[k as usize % SIZES.len()];
    (0..len)
        .map(|i| (i as u32 ^ (from << 6) ^ (to << 4) ^ k.wrapping_mul(7)) as u8)
        .collect()
}

#[test]
#[ignore = "rank program for fastbox_carrier"]
fn child_fastbox() {
    if !in_job() {
        return;
    }
    let comm = Communicator::init().unwrap();
    let (me, n) = (comm.rank(), comm.size());
    let outs: Vec<Vec<Vec<u8>>> = (0..MSGS)
        .map(|k| (0..n).map(|p| payload(me, p, k)).collect())
        .collect();
    let mut sends = Vec::new();
    for k in 0..MSGS {
        for p in (0..n).filter(|&p| p != me) {
            sends.push(comm.isend(&outs[k as usize][p as usize], p, k % 3).unwrap());
        }
    }
    let mut buf = vec![0u8; 70_000];
    for k in 0..MSGS {
        for p in (0..n).filter(|&p| p != me) {
            let st = comm.recv(&mut buf, Source::Rank(p), Tag::Any).unwrap();
            let want = payload(p, me, k);
            assert_eq!(
                (st.source, st.tag, st.len),
                (p, k % 3, want.len()),
                "rank {me}: message {k} from {p}"
            );
            assert!(
                buf[..st.len] == want[..],
                "rank {me}: bytes of message {k} from {p}"
            );
        }
    }
    for s in sends {
        s.wait().unwrap();
    }
    comm.barrier().unwrap();
    println!("child_fastbox: done");
}

#[test]
fn fastbox_carrier() {
    for off in [false, true] {
        let mut env = vec![("EFA_DEBUG", "debug"), ("EFA_TRANSPORTS", "shm")];
        if off {
            env.push(("EFA_FASTBOX", "0"));
        }
        let out = efarun(3, "child_fastbox", &env);
        let text = String::from_utf8_lossy(&out.stdout);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success(),
            "child_fastbox ({env:?}) failed:\n{text}\n{err}"
        );
        assert_eq!(text.matches("child_fastbox: done").count(), 3, "{text}");
        let all = format!("{text}\n{err}");
        let attached: Vec<&str> = all
            .lines()
            .filter(|l| l.contains("fast boxes attached"))
            .collect();
        let closed: Vec<&str> = all
            .lines()
            .filter(|l| l.contains("fast boxes closed"))
            .collect();
        if off {
            assert!(
                attached.is_empty() && closed.is_empty(),
                "EFA_FASTBOX=0 still set up rings:\n{all}"
            );
            continue;
        }
        assert_eq!(attached.len(), 3, "every rank attaches its rings:\n{all}");
        assert!(
            attached.iter().all(|l| l.contains("peers=2")),
            "{attached:?}"
        );
        assert_eq!(
            closed.len(),
            3,
            "every rank reports its rings at finalize:\n{all}"
        );
        let field = |l: &str, f: &str| -> u64 {
            l.split(&format!("{f}="))
                .nth(1)
                .and_then(|v| v.split(|c: char| !c.is_ascii_digit()).next())
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("no {f}= in {l}"))
        };
        for l in &closed {
            assert!(
                field(l, "sent") > 0 && field(l, "received") > 0,
                "rings unused: {l}"
            );
            assert!(
                field(l, "large") > 0,
                "no message was too large for a ring: {l}"
            );
        }
        assert!(
            closed.iter().any(|l| field(l, "full") > 0),
            "no ring was ever full, the mixed path is untested:\n{closed:?}"
        );
    }
}

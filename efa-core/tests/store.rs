//! Rendezvous stores with several ranks as threads of one process: TCP over loopback with
//! ephemeral ports, and a file store in a temporary directory.

use std::net::TcpListener;
use std::path::PathBuf;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use efa_core::bootstrap::{
    barrier, detect, exchange_all, exchange_grouped, lookup, BootstrapBuilder, BootstrapError,
    Rendezvous, StoreServer,
};
use efa_core::store::{
    FileStore, Members, MemoryStore, Store, StoreError, StoreToken, TcpStore, TcpStoreServer,
};

fn soon(ms: u64) -> Instant {
    Instant::now() + Duration::from_millis(ms)
}

/// A fresh directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);
impl TempDir {
    fn new(name: &str) -> Self {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let p =
            std::env::temp_dir().join(format!("efa-core-{name}-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}
impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn blob(rank: u32) -> Vec<u8> {
    format!("card of rank {rank}").into_bytes()
}

/// Runs `size` ranks as threads, each `rank_main(rank, store)` with the store `open(rank)`
/// gives it; returns what each returned, in rank order.
fn run_ranks<T: Send + 'static>(
    size: u32,
    open: impl Fn(u32) -> Arc<dyn Store> + Send + Sync + 'static,
    rank_main: impl Fn(u32, &dyn Store) -> T + Send + Sync + 'static,
) -> Vec<T> {
    let both = Arc::new((open, rank_main));
    let handles: Vec<_> = (0..size)
        .map(|rank| {
            let both = both.clone();
            thread::spawn(move || {
                let store = (both.0)(rank);
                (both.1)(rank, &*store)
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

/// Runs `size` ranks as threads; `open(rank)` gives each its store. Checks that every rank
/// sees every blob.
fn run_exchange(size: u32, open: impl Fn(u32) -> Arc<dyn Store> + Send + Sync + 'static) {
    let got = run_ranks(size, open, move |rank, store| {
        let all = exchange_all(store, "card", rank, size, &blob(rank), soon(10_000)).unwrap();
        barrier(store, "done", rank, size, soon(10_000)).unwrap();
        all
    });
    for all in got {
        assert_eq!(all, (0..size).map(blob).collect::<Vec<_>>());
    }
}

#[test]
fn tcp_exchange_rank0_serves() {
    let size = 5;
    let server = TcpStore::serve("127.0.0.1:0", 0, size, soon(5_000)).unwrap();
    let addr = server.server_addr().unwrap().to_string();
    let server: Arc<dyn Store> = Arc::new(server);
    run_exchange(size, move |rank| {
        if rank == 0 {
            server.clone()
        } else {
            Arc::new(TcpStore::connect(&addr, rank, soon(5_000)).unwrap())
        }
    });
}

#[test]
fn tcp_exchange_launcher_serves() {
    let size = 4;
    let server = TcpStoreServer::bind("127.0.0.1:0").unwrap();
    let addr = server.local_addr().to_string();
    run_exchange(size, move |rank| {
        Arc::new(TcpStore::connect(&addr, rank, soon(5_000)).unwrap())
    });
    // Every rank dropped its client, so all have come and gone.
    server.wait_departed(size, soon(2_000)).unwrap();
}

#[test]
fn file_exchange() {
    let dir = TempDir::new("file-exchange");
    let path = dir.0.clone();
    run_exchange(4, move |_| Arc::new(FileStore::open(&path).unwrap()));
}

#[test]
fn memory_exchange() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    run_exchange(3, move |_| store.clone());
}

#[test]
fn bootstrap_connect_store_over_tcp() {
    // Find a free port, then let rank 0 serve on it through the bootstrap path.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let rdv = Rendezvous::Tcp {
        addr: format!("127.0.0.1:{port}"),
        server: StoreServer::Rank0,
    };
    let size = 3;
    let handles: Vec<_> = (0..size)
        .map(|rank| {
            let rdv = rdv.clone();
            thread::spawn(move || {
                let b = BootstrapBuilder::new(rank, size, rdv).build().unwrap();
                let store = b.connect_store(soon(5_000)).unwrap();
                exchange_all(&*store, "card", rank, size, &blob(rank), soon(5_000)).unwrap()
            })
        })
        .collect();
    for h in handles {
        assert_eq!(h.join().unwrap().len(), size as usize);
    }
}

fn assert_never_joined(
    r: Result<Vec<Vec<u8>>, BootstrapError>,
    want: &[u32],
    want_store: &str,
    started: Instant,
) {
    let took = started.elapsed();
    match r {
        Err(BootstrapError::RankNeverJoined {
            ranks,
            waited,
            store,
        }) => {
            assert_eq!(ranks, want);
            assert_eq!(store, want_store);
            assert!(waited >= Duration::from_millis(300), "{waited:?}");
        }
        other => panic!("expected RankNeverJoined {want:?}, got {other:?}"),
    }
    assert!(took < Duration::from_millis(1_500), "took {took:?}");
}

#[test]
fn missing_rank_is_named_tcp() {
    let size = 4;
    let server = TcpStore::serve("127.0.0.1:0", 0, size, soon(5_000)).unwrap();
    let addr = server.server_addr().unwrap().to_string();
    let server = Arc::new(server);
    // Rank 2 never arrives.
    let handles: Vec<_> = [0u32, 1, 3]
        .into_iter()
        .map(|rank| {
            let addr = addr.clone();
            let server = server.clone();
            thread::spawn(move || {
                let store: Arc<dyn Store> = if rank == 0 {
                    server
                } else {
                    Arc::new(TcpStore::connect(&addr, rank, soon(5_000)).unwrap())
                };
                let t = Instant::now();
                let r = exchange_all(
                    &*store,
                    "card",
                    rank,
                    size,
                    &blob(rank),
                    t + Duration::from_millis(300),
                );
                (rank, r, t)
            })
        })
        .collect();
    for h in handles {
        let (rank, r, t) = h.join().unwrap();
        let e = r.as_ref().map(|_| ()).unwrap_err().to_string();
        let store = if rank == 0 {
            format!("the TCP store at {addr} (served by rank 0)")
        } else {
            format!("the TCP store at {addr}")
        };
        assert!(
            e.starts_with(&format!("rank 2 never joined {store} within 0.")),
            "{e}"
        );
        assert_never_joined(r, &[2], &store, t);
    }
    // The serving rank reports who never came; it must not wait out its linger.
    let server = Arc::try_unwrap(server).unwrap();
    let t = Instant::now();
    match server.close(soon(200)) {
        Err(StoreError::StillInUse { ranks, .. }) => assert_eq!(ranks, [2]),
        other => panic!("{other:?}"),
    }
    assert!(t.elapsed() < Duration::from_secs(2));
}

#[test]
fn missing_ranks_are_all_named_file() {
    let dir = TempDir::new("file-missing");
    let store = FileStore::open(&dir.0).unwrap();
    let t = Instant::now();
    let r = exchange_all(
        &store,
        "card",
        1,
        5,
        &blob(1),
        t + Duration::from_millis(300),
    );
    let want = format!("the file store in {}", dir.0.display());
    assert!(
        r.as_ref()
            .map(|_| ())
            .unwrap_err()
            .to_string()
            .starts_with(&format!("ranks 0, 2, 3, 4 never joined {want} within 0.")),
        "{r:?}"
    );
    assert_never_joined(r, &[0, 2, 3, 4], &want, t);
}

#[test]
fn timeout_names_the_key_and_rank() {
    let server = TcpStoreServer::bind("127.0.0.1:0").unwrap();
    let c = TcpStore::connect(&server.local_addr().to_string(), 0, soon(5_000)).unwrap();
    let t = Instant::now();
    let e = c.get("card/6", soon(300)).unwrap_err();
    assert!(t.elapsed() >= Duration::from_millis(300) && t.elapsed() < Duration::from_secs(2));
    assert_eq!(e.missing_key(), Some("card/6"));
    assert_eq!(e.missing_rank(), Some(6));
    assert!(e.to_string().contains("`card/6`"), "{e}");
    // A deadline in the past still looks once.
    c.set("there", b"x").unwrap();
    assert_eq!(
        c.get("there", Instant::now() - Duration::from_secs(1))
            .unwrap(),
        b"x"
    );
}

#[test]
fn server_wakes_waiting_get_promptly() {
    let server = TcpStoreServer::bind("127.0.0.1:0").unwrap();
    let addr = server.local_addr().to_string();
    let reader = TcpStore::connect(&addr, 0, soon(5_000)).unwrap();
    let writer = TcpStore::connect(&addr, 1, soon(5_000)).unwrap();
    // Timed from before the spawn: on a loaded machine the thread may start late.
    let t = Instant::now();
    let h = thread::spawn(move || {
        let v = reader.get("late", soon(10_000)).unwrap();
        (v, t.elapsed())
    });
    thread::sleep(Duration::from_millis(200));
    let set_at = Instant::now();
    writer.set("late", b"value").unwrap();
    let (v, waited) = h.join().unwrap();
    assert_eq!(v, b"value");
    // Woken by the set, not by the 10 s deadline or a coarse poll.
    assert!(waited >= Duration::from_millis(200));
    assert!(set_at.elapsed() < Duration::from_millis(500), "{waited:?}");
    assert!(waited < Duration::from_secs(2), "{waited:?}");
}

#[test]
fn serving_rank_stays_up_until_late_ranks_have_read() {
    let size = 3;
    let server = TcpStore::serve("127.0.0.1:0", 0, size, soon(5_000)).unwrap();
    let addr = server.server_addr().unwrap().to_string();
    server.set("card/0", b"zero").unwrap();
    let late: Vec<_> = (1..size)
        .map(|rank| {
            let addr = addr.clone();
            thread::spawn(move || {
                thread::sleep(Duration::from_millis(300));
                let c = TcpStore::connect(&addr, rank, soon(5_000)).unwrap();
                c.get("card/0", soon(5_000)).unwrap()
            })
        })
        .collect();
    // Rank 0 is done at once; its drop must wait for ranks 1 and 2 to come and go.
    let t = Instant::now();
    drop(server);
    let dropped_after = t.elapsed();
    for h in late {
        assert_eq!(h.join().unwrap(), b"zero");
    }
    assert!(
        dropped_after >= Duration::from_millis(300),
        "{dropped_after:?}"
    );
    assert!(dropped_after < Duration::from_secs(5), "{dropped_after:?}");
}

#[test]
fn client_retries_until_server_starts() {
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    let a2 = addr.clone();
    let h = thread::spawn(move || {
        TcpStore::connect(&a2, 1, soon(5_000)).map(|c| c.get("k", soon(5_000)))
    });
    thread::sleep(Duration::from_millis(300));
    let server = TcpStore::serve(&addr, 0, 2, soon(5_000)).unwrap();
    server.set("k", b"v").unwrap();
    assert_eq!(h.join().unwrap().unwrap().unwrap(), b"v");
    server.close(soon(2_000)).unwrap();
}

#[test]
fn unreachable_store_fails_at_the_deadline() {
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let t = Instant::now();
    let e = TcpStore::connect(&format!("127.0.0.1:{port}"), 1, soon(300)).unwrap_err();
    assert!(matches!(e, StoreError::Unreachable { .. }), "{e}");
    assert!(t.elapsed() >= Duration::from_millis(300) && t.elapsed() < Duration::from_secs(2));
}

#[test]
fn bind_conflict_is_reported() {
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let e = TcpStoreServer::bind(&addr).unwrap_err();
    assert!(matches!(e, StoreError::Bind { .. }), "{e}");
    assert!(e.to_string().contains("EFA_STORE"), "{e}");
}

#[test]
fn large_values_and_overwrite() {
    let server = TcpStoreServer::bind("127.0.0.1:0").unwrap();
    let c = TcpStore::connect(&server.local_addr().to_string(), 0, soon(5_000)).unwrap();
    let big: Vec<u8> = (0..1_000_000u32).map(|i| i as u8).collect();
    c.set("big", &big).unwrap();
    assert_eq!(c.get("big", soon(1_000)).unwrap(), big);
    c.set("big", b"small").unwrap();
    assert_eq!(c.get("big", soon(1_000)).unwrap(), b"small");
    assert!(matches!(
        c.set("", b"x"),
        Err(StoreError::InvalidKey { .. })
    ));
}

#[test]
fn file_store_writes_are_atomic() {
    // A reader polling while a writer replaces a large value never sees a partial file.
    let dir = TempDir::new("file-atomic");
    let store = Arc::new(FileStore::open(&dir.0).unwrap());
    let a = vec![b'a'; 256 * 1024];
    let b = vec![b'b'; 256 * 1024];
    store.set("v", &a).unwrap();
    let w = {
        let (store, a, b) = (store.clone(), a.clone(), b.clone());
        thread::spawn(move || {
            for i in 0..50 {
                store.set("v", if i % 2 == 0 { &b } else { &a }).unwrap();
            }
        })
    };
    let mut reads = 0;
    while !w.is_finished() || reads < 10 {
        let v = store.get("v", soon(1_000)).unwrap();
        assert!(v == a || v == b, "partial read of {} bytes", v.len());
        reads += 1;
    }
    w.join().unwrap();
    // No temporary files left behind.
    let leftovers: Vec<_> = std::fs::read_dir(&dir.0)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty());
}

fn token(s: &str) -> StoreToken {
    StoreToken::new(s).unwrap()
}

/// Sends one raw frame and reads the reply's status byte and text; `None` if the server
/// closed the connection without answering.
fn raw_request(addr: &str, frame: &[u8]) -> Option<(u8, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut msg = (frame.len() as u32).to_be_bytes().to_vec();
    msg.extend_from_slice(frame);
    // The server may close before reading a huge frame's body: ignore write errors.
    let _ = s.write_all(&msg);
    let mut len = [0u8; 4];
    s.read_exact(&mut len).ok()?;
    let mut body = vec![0u8; u32::from_be_bytes(len) as usize];
    s.read_exact(&mut body).ok()?;
    // After a refusal the server closes the connection.
    if body[0] == 3 {
        let mut rest = Vec::new();
        assert_eq!(
            s.read_to_end(&mut rest).unwrap_or(0),
            0,
            "data after a refusal"
        );
    }
    Some((body[0], String::from_utf8_lossy(&body[1..]).into_owned()))
}

#[test]
fn token_store_refuses_strangers_at_once_and_keeps_serving_the_ranks() {
    let size = 3;
    let job = token("job-secret-0123456789abcdef");
    let server = TcpStoreServer::bind_with_token("127.0.0.1:0", Some(job.clone())).unwrap();
    let addr = server.local_addr().to_string();
    // The real ranks connect first and wait for each other while strangers knock.
    let ranks: Vec<_> = (0..size)
        .map(|rank| {
            let (addr, job) = (addr.clone(), job.clone());
            thread::spawn(move || {
                let store =
                    TcpStore::connect_with_token(&addr, rank, Some(&job), soon(5_000)).unwrap();
                thread::sleep(Duration::from_millis(300 * u64::from(rank)));
                let all =
                    exchange_all(&store, "card", rank, size, &blob(rank), soon(10_000)).unwrap();
                barrier(&store, "done", rank, size, soon(10_000)).unwrap();
                all
            })
        })
        .collect();

    // No token, and a wrong one: refused at once with the fix, not after the deadline.
    for (given, reason) in [
        (None, "requires EFA_STORE_TOKEN"),
        (
            Some(token("not-the-job-secret-0123456789")),
            "wrong EFA_STORE_TOKEN",
        ),
        // Same length, last byte differs.
        (
            Some(token("job-secret-0123456789abcdeF")),
            "wrong EFA_STORE_TOKEN",
        ),
    ] {
        let t = Instant::now();
        let e = TcpStore::connect_with_token(&addr, 1, given.as_ref(), soon(20_000)).unwrap_err();
        assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
        match &e {
            StoreError::Refused { addr: a, reason: r } => {
                assert_eq!(a, &addr);
                assert!(r.contains(reason), "{r}");
            }
            other => panic!("expected Refused, got {other:?}"),
        }
        let s = e.to_string();
        assert!(
            s.contains("-x EFA_STORE_TOKEN") && s.contains("--export=ALL,EFA_STORE_TOKEN"),
            "{s}"
        );
    }
    // Strangers speaking the protocol without authenticating first.
    let set = [&[2u8, 0, 0, 0, 6][..], b"card/1", b"evil"].concat();
    let (st, text) = raw_request(&addr, &set).expect("a refusal");
    assert_eq!(st, 3, "{text}");
    assert!(text.contains("requires EFA_STORE_TOKEN"), "{text}");
    let (st, _) = raw_request(&addr, &[1, 0, 0, 0, 1]).expect("a refusal");
    assert_eq!(st, 3);
    // Garbage, and a huge first frame: the connection is closed.
    for frame in [vec![0xffu8; 3], vec![0u8; 100_000]] {
        if let Some((st, _)) = raw_request(&addr, &frame) {
            assert_eq!(st, 3);
        }
    }

    for h in ranks {
        assert_eq!(h.join().unwrap(), (0..size).map(blob).collect::<Vec<_>>());
    }
    // The stranger's SET never reached the store, and no stranger counts as a rank.
    let reader = TcpStore::connect_with_token(&addr, u32::MAX, Some(&job), soon(5_000)).unwrap();
    assert_eq!(reader.get("card/1", soon(1_000)).unwrap(), blob(1));
    drop(reader);
    server.wait_departed(size, soon(2_000)).unwrap();
}

#[test]
fn tokens_must_agree_on_both_sides() {
    // A rank-0-served store without a token admits only clients without one.
    let server = TcpStore::serve("127.0.0.1:0", 0, 2, soon(5_000)).unwrap();
    let addr = server.server_addr().unwrap().to_string();
    let e =
        TcpStore::connect_with_token(&addr, 1, Some(&token("0123456789abcdef0123")), soon(5_000))
            .unwrap_err();
    assert!(
        matches!(&e, StoreError::Refused { reason, .. } if reason.contains("has no EFA_STORE_TOKEN")),
        "{e:?}"
    );
    let plain = TcpStore::connect(&addr, 1, soon(5_000)).unwrap();
    plain.set("k", b"v").unwrap();
    assert_eq!(server.get("k", soon(1_000)).unwrap(), b"v");
    drop(plain);
    server.close(soon(2_000)).unwrap();

    // Through the bootstrap path: rank 0 serves with the token, rank 1 joins with it, and
    // rank 2 with another one is refused.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let rdv = Rendezvous::Tcp {
        addr: format!("127.0.0.1:{port}"),
        server: StoreServer::Rank0,
    };
    let boot = |rank: u32, t: &str| {
        BootstrapBuilder::new(rank, 3, rdv.clone())
            .store_token(token(t))
            .build()
            .unwrap()
    };
    let b0 = boot(0, "right-token-0123456789");
    let s0 = b0.connect_store(soon(5_000)).unwrap();
    let s1 = boot(1, "right-token-0123456789")
        .connect_store(soon(5_000))
        .unwrap();
    s1.set("x", b"1").unwrap();
    assert_eq!(s0.get("x", soon(1_000)).unwrap(), b"1");
    let e = boot(2, "wrong-token-0123456789")
        .connect_store(soon(5_000))
        .unwrap_err();
    assert!(
        matches!(&e, BootstrapError::Store(StoreError::Refused { .. })),
        "{e:?}"
    );
    assert!(e.to_string().contains("wrong EFA_STORE_TOKEN"), "{e}");
}

#[test]
fn file_store_directory_is_private_and_its_parent_must_exist() {
    use std::os::unix::fs::PermissionsExt;
    let parent = TempDir::new("file-dir");
    // Created with mode 0700.
    let dir = parent.0.join("job");
    FileStore::open(&dir).unwrap();
    let mode = std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o700, "{mode:o}");
    // Opening it again is fine (every rank opens it).
    FileStore::open(&dir).unwrap();

    // A missing parent is an error at once, naming the path and the fix; nothing is created.
    let missing = parent.0.join("no/such/dir");
    let t = Instant::now();
    let e = FileStore::open(&missing).unwrap_err();
    assert!(t.elapsed() < Duration::from_secs(1));
    let s = e.to_string();
    assert!(matches!(e, StoreError::Directory { .. }), "{e:?}");
    assert!(
        s.contains(&missing.display().to_string())
            && s.contains(&format!("mkdir -p {}", parent.0.join("no/such").display())),
        "{s}"
    );
    assert!(!parent.0.join("no").exists());

    // Not a directory; writable by others.
    let file = parent.0.join("plain-file");
    std::fs::write(&file, b"x").unwrap();
    let e = FileStore::open(&file).unwrap_err();
    assert!(e.to_string().contains("not a directory"), "{e}");
    let open = parent.0.join("open");
    std::fs::create_dir(&open).unwrap();
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
    let e = FileStore::open(&open).unwrap_err();
    assert!(e.to_string().contains("chmod o-w"), "{e}");
    // Group-writable is fine (user private groups make every directory so).
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o775)).unwrap();
    FileStore::open(&open).unwrap();

    // Through EFA_STORE: the error names the variable and its value, before any waiting.
    let value = format!("file://{}", missing.display());
    let env = |k: &str| match k {
        "EFA_RANK" => Some("0".to_owned()),
        "EFA_WORLD_SIZE" => Some("2".to_owned()),
        "EFA_STORE" => Some(value.clone()),
        _ => None,
    };
    let b = detect(&env).unwrap();
    let t = Instant::now();
    let e = b.connect_store(soon(30_000)).unwrap_err();
    assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
    match &e {
        BootstrapError::StoreDirectory {
            value: v,
            source: StoreError::Directory { source: None, .. },
        } => assert_eq!(v, &value),
        other => panic!("expected StoreDirectory for EFA_STORE, got {other:?}"),
    }
    assert!(e.to_string().contains("EFA_STORE="), "{e}");
    assert!(e.to_string().contains("does not exist"), "{e}");
    let cause = std::error::Error::source(&e).expect("the store's error is the source");
    assert!(matches!(
        cause.downcast_ref::<StoreError>(),
        Some(StoreError::Directory { .. })
    ));

    // A directory that cannot be created keeps the file system's error as its source.
    let under_file = file.join("job");
    let e = FileStore::open(&under_file).unwrap_err();
    assert!(
        matches!(&e, StoreError::Directory { source: Some(io), .. }
            if io.kind() == std::io::ErrorKind::NotADirectory),
        "{e:?}"
    );
    let io = std::error::Error::source(&e).expect("the io::Error is the source");
    assert!(io.downcast_ref::<std::io::Error>().is_some());
    assert!(
        e.to_string()
            .contains("cannot be created (not a directory)"),
        "{e}"
    );
}

#[test]
fn an_unusable_store_address_keeps_the_resolver_error() {
    for addr in ["no-port-here", "127.0.0.1:notaport"] {
        let e = TcpStoreServer::bind(addr).map(|_| ()).unwrap_err();
        assert!(
            matches!(&e, StoreError::BadAddress { addr: a, source: Some(io), .. }
                if a == addr && io.kind() == std::io::ErrorKind::InvalidInput),
            "{e:?}"
        );
        assert!(std::error::Error::source(&e).is_some());
    }
}

#[test]
fn store_tokens_are_random_hidden_and_compared_whole() {
    let a = StoreToken::generate().unwrap();
    let b = StoreToken::generate().unwrap();
    assert_ne!(a, b);
    for t in [&a, &b] {
        assert_eq!(t.as_str().len(), 64);
        assert!(t.as_str().bytes().all(|c| c.is_ascii_hexdigit()));
        assert!(!format!("{t:?}").contains(t.as_str()));
    }
    assert!(a.matches(a.as_str().as_bytes()));
    assert!(!a.matches(&a.as_str().as_bytes()[..63]));
    let mut flipped = a.as_str().as_bytes().to_vec();
    flipped[0] ^= 1;
    assert!(!a.matches(&flipped));
    assert!(!a.matches(b""));
}

/// Runs `size` ranks as threads, `per_group` consecutive ranks per group, each doing a
/// grouped exchange, a look-up of a rank of another group, and a barrier; checks what each
/// got.
fn run_grouped(
    size: u32,
    per_group: u32,
    open: impl Fn(u32) -> Arc<dyn Store> + Send + Sync + 'static,
) {
    let results = run_ranks(size, open, move |rank, store| {
        let group = format!("host {}", rank / per_group);
        let got =
            exchange_grouped(store, "card", rank, size, &group, &blob(rank), soon(10_000)).unwrap();
        let far = (rank + per_group) % size;
        let far_blob = lookup(store, "card", far, soon(10_000)).unwrap();
        barrier(store, "done", rank, size, soon(10_000)).unwrap();
        (rank, got, far, far_blob)
    });
    for (rank, got, far, far_blob) in results {
        let first = rank / per_group * per_group;
        let want: Vec<(u32, Vec<u8>)> = (first..(first + per_group).min(size))
            .map(|r| (r, blob(r)))
            .collect();
        assert_eq!(got, want, "rank {rank}");
        assert_eq!(far_blob, blob(far));
    }
}

#[test]
fn grouped_exchange_returns_the_group_only_on_every_store() {
    let server = Arc::new(TcpStoreServer::bind("127.0.0.1:0").unwrap());
    let addr = server.local_addr().to_string();
    run_grouped(10, 4, move |rank| {
        Arc::new(TcpStore::connect(&addr, rank, soon(5_000)).unwrap())
    });
    // 10 ranks: HELLO, PUBLISH, GATHER, GET, PUBLISH, GATHER, LEAVE each; no request per peer.
    let stats = server.stats();
    assert_eq!(stats.requests, 70, "{stats:?}");

    let mem: Arc<dyn Store> = Arc::new(MemoryStore::new());
    run_grouped(10, 3, move |_| mem.clone());

    let dir = TempDir::new("grouped");
    let path = dir.0.join("store");
    run_grouped(9, 4, move |_| Arc::new(FileStore::open(&path).unwrap()));
}

/// A grouped gather on the file store opens the files of its group only, and a gather of
/// everything opens one combined file on ranks other than 0: the entries of the other ranks
/// are replaced by named pipes, which would block an `open` for reading.
#[test]
fn file_store_gathers_open_no_file_of_other_groups() {
    let dir = TempDir::new("file-opens");
    let path = dir.0.join("store");
    let store = FileStore::open(&path).unwrap();
    let size = 6;
    for r in 0..size {
        store
            .publish("x", r, size, &format!("g{}", r / 3), &blob(r), soon(1_000))
            .unwrap();
    }
    let full = store
        .gather("x", 0, size, &Members::All, soon(1_000))
        .unwrap();
    assert_eq!(full.len(), size as usize);
    // Rank 0 has written the combined file: now every entry of group g1 becomes a pipe.
    for r in 3..size {
        let key_file = path.join(format!("kx%2F{r}"));
        std::fs::remove_file(&key_file).unwrap();
        let st = std::process::Command::new("mkfifo").arg(&key_file).status();
        if !st.is_ok_and(|s| s.success()) {
            eprintln!("SKIPPED: file_store_gathers_open_no_file_of_other_groups: mkfifo failed");
            return;
        }
    }
    let (tx, rx) = std::sync::mpsc::channel();
    let p2 = path.clone();
    thread::spawn(move || {
        let store = FileStore::open(&p2).unwrap();
        let g0 = store.gather("x", 1, size, &Members::Group("g0".into()), soon(1_000));
        let all = store.gather("x", 2, size, &Members::All, soon(1_000));
        let _ = tx.send((g0, all));
    });
    let (g0, all) = rx.recv_timeout(Duration::from_secs(10)).expect(
        "a gather opened a file of another group (or the entries instead of the combined file)",
    );
    let g0 = g0.unwrap();
    assert_eq!(g0, (0..3).map(|r| (r, blob(r))).collect::<Vec<_>>());
    assert_eq!(all.unwrap(), full);
}

#[test]
fn exchanges_refuse_inconsistent_worlds_and_ranks() {
    let server = TcpStoreServer::bind("127.0.0.1:0").unwrap();
    let tcp = TcpStore::connect(&server.local_addr().to_string(), 0, soon(5_000)).unwrap();
    let mem = MemoryStore::new();
    let dir = TempDir::new("inconsistent");
    let file = FileStore::open(dir.0.join("s")).unwrap();
    for store in [&tcp as &dyn Store, &mem, &file] {
        let e = store.publish("y", 5, 4, "", b"v", soon(1_000)).unwrap_err();
        assert!(
            e.to_string().contains("rank 5"),
            "{}: {e}",
            store.describe()
        );
        // The same error on every store (the TCP server's travels as its own status).
        assert!(
            matches!(&e, StoreError::InvalidExchange { exchange, .. } if exchange == "y"),
            "{}: {e:?}",
            store.describe()
        );
    }
    for store in [&tcp as &dyn Store, &mem] {
        store.publish("z", 0, 4, "", b"v", soon(1_000)).unwrap();
        let e = store
            .gather("z", 0, 5, &Members::All, soon(1_000))
            .unwrap_err();
        assert!(
            e.to_string().contains("started among 4"),
            "{}: {e}",
            store.describe()
        );
        assert!(
            matches!(&e, StoreError::InvalidExchange { exchange, .. } if exchange == "z"),
            "{}: {e:?}",
            store.describe()
        );
    }
    // A missing rank is named by a grouped exchange as by exchange_all.
    let e = exchange_grouped(&mem, "w", 0, 3, "h", b"v", soon(200)).unwrap_err();
    match e {
        BootstrapError::RankNeverJoined { ranks, .. } => assert_eq!(ranks, [1, 2]),
        other => panic!("{other:?}"),
    }
    let e = lookup(&mem, "w", 2, soon(100)).unwrap_err();
    assert!(
        matches!(&e, BootstrapError::RankNeverJoined { ranks, .. } if ranks == &[2]),
        "{e:?}"
    );
}

//! What a rank sees when the process that serves the TCP store fails: efarun gone, rank 0
//! gone (bare `RANK`/`MASTER_ADDR` launch), or either one stopped (SIGSTOP). Every error must
//! name the server ("efarun", "rank 0") and come at once where the rank can tell (a refused
//! connection to a server that listens before any rank starts; a connection the server
//! closed), else by the caller's deadline, never later.
//!
//! The ranks here are real clients built by `bootstrap::detect` from a launcher's variables,
//! as a user's program gets them; the servers are real: a store server thread that is
//! dropped, a listener that accepts and never answers, or a store served by a child process
//! that is stopped with SIGSTOP.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use efa_core::bootstrap::{self, exchange_all, Bootstrap};
use efa_core::store::{Store, TcpStoreServer};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// A port nothing listens on (bound, then closed).
fn closed_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Rank 1 of 3 under efarun, whose store is at `port`.
fn efarun_rank(port: u16) -> Bootstrap {
    let env: HashMap<&str, String> = [
        ("EFA_RANK", "1".to_owned()),
        ("EFA_WORLD_SIZE", "3".to_owned()),
        ("EFA_STORE", format!("127.0.0.1:{port}")),
        ("EFA_STORE_SERVED", "1".to_owned()),
    ]
    .into();
    bootstrap::detect(&|k| env.get(k).cloned()).unwrap()
}

/// Rank 1 of 3 in a bare launcher environment; rank 0 serves the store at `port`.
fn bare_rank(port: u16) -> Bootstrap {
    let env: HashMap<&str, String> = [
        ("RANK", "1".to_owned()),
        ("WORLD_SIZE", "3".to_owned()),
        ("MASTER_ADDR", "127.0.0.1".to_owned()),
        ("MASTER_PORT", port.to_string()),
    ]
    .into();
    bootstrap::detect(&|k| env.get(k).cloned()).unwrap()
}

fn assert_names(text: &str, who: &str, port: u16) {
    eprintln!("{text}");
    let serves = format!("{who}, which serves the store at 127.0.0.1:{port}");
    assert!(text.contains(&serves), "does not say `{serves}`: {text}");
}

/// Connects as `boot`'s rank, then has the server fail after 300 ms (`fail`) while the rank
/// waits in a GET with a 20 s deadline; returns the error text and how long the GET took.
fn connected_then(boot: &Bootstrap, fail: impl FnOnce() + Send + 'static) -> (String, Duration) {
    let store = boot
        .connect_store(Instant::now() + Duration::from_secs(5))
        .unwrap();
    let failer = thread::spawn(move || {
        thread::sleep(Duration::from_millis(300));
        fail();
    });
    let t0 = Instant::now();
    let e = store
        .get("never/set", Instant::now() + Duration::from_secs(20))
        .unwrap_err();
    let took = t0.elapsed();
    failer.join().unwrap();
    (e.to_string(), took)
}

#[test]
fn efarun_gone_before_the_rank_connects_fails_at_once() {
    let port = closed_port();
    let t0 = Instant::now();
    let e = efarun_rank(port)
        .connect_store(Instant::now() + Duration::from_secs(8))
        .unwrap_err()
        .to_string();
    assert!(
        t0.elapsed() < Duration::from_secs(3),
        "a refused connection to efarun's store took {:?} to fail: {e}",
        t0.elapsed()
    );
    assert_names(&e, "efarun", port);
    assert!(e.contains("exited"), "{e}");
}

#[test]
fn efarun_store_closing_a_connected_rank_fails_at_once_naming_efarun() {
    let server = TcpStoreServer::bind("127.0.0.1:0").unwrap();
    let port = server.local_addr().port();
    let (e, took) = connected_then(&efarun_rank(port), move || drop(server));
    assert!(took < Duration::from_secs(3), "took {took:?}: {e}");
    assert_names(&e, "efarun", port);
}

#[test]
fn bare_rank0_unreachable_is_named() {
    let port = closed_port();
    let t0 = Instant::now();
    let e = bare_rank(port)
        .connect_store(Instant::now() + Duration::from_millis(1500))
        .unwrap_err()
        .to_string();
    // Refused cannot tell a dead rank 0 from one that has not started: the deadline tells.
    assert!(t0.elapsed() < Duration::from_secs(4), "{:?}", t0.elapsed());
    assert_names(&e, "rank 0", port);
}

#[test]
fn bare_rank0_closing_a_connected_rank_is_named_at_once() {
    let server = TcpStoreServer::bind("127.0.0.1:0").unwrap();
    let port = server.local_addr().port();
    let (e, took) = connected_then(&bare_rank(port), move || drop(server));
    assert!(took < Duration::from_secs(3), "took {took:?}: {e}");
    assert_names(&e, "rank 0", port);
}

#[test]
fn bare_rank0_refusing_after_it_accepted_is_named_at_once() {
    // Rank 0 accepts the connection and dies before answering: the next attempt is refused,
    // and having been accepted once, that means rank 0 is gone.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let dies = thread::spawn(move || {
        let (s, _) = listener.accept().unwrap();
        drop(listener);
        drop(s);
    });
    let t0 = Instant::now();
    let e = bare_rank(port)
        .connect_store(Instant::now() + Duration::from_secs(8))
        .unwrap_err()
        .to_string();
    dies.join().unwrap();
    assert!(
        t0.elapsed() < Duration::from_secs(3),
        "{:?}: {e}",
        t0.elapsed()
    );
    assert_names(&e, "rank 0", port);
}

#[test]
fn bare_rank0_not_answering_is_named_by_the_deadline() {
    // Accepts (the kernel does, for a stopped process too) and never answers.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let t0 = Instant::now();
    let e = bare_rank(port)
        .connect_store(Instant::now() + Duration::from_millis(1500))
        .unwrap_err()
        .to_string();
    assert!(
        t0.elapsed() < Duration::from_secs(4),
        "{:?}: {e}",
        t0.elapsed()
    );
    assert_names(&e, "rank 0", port);
    assert!(e.contains("did not answer"), "{e}");
    drop(listener);
}

/// The store served by a child process: `(child, port)` once it listens.
fn store_process() -> (Child, u16) {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--ignored",
            "--exact",
            "child_serves_a_store",
            "--nocapture",
        ])
        .env("EFA_TEST_STORE_CHILD", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let port = loop {
        let line = lines
            .next()
            .expect("the child ended before serving")
            .unwrap();
        if let Some(p) = line.strip_prefix("serving on ") {
            break p.trim().parse().unwrap();
        }
    };
    (child, port)
}

#[test]
#[ignore = "the store-serving process of the SIGSTOP tests"]
fn child_serves_a_store() {
    if std::env::var_os("EFA_TEST_STORE_CHILD").is_none() {
        return;
    }
    let server = TcpStoreServer::bind("127.0.0.1:0").unwrap();
    println!("serving on {}", server.local_addr().port());
    thread::sleep(Duration::from_secs(120));
}

/// Connects as `boot`'s rank to a store process, stops it, then runs an exchange (a SET,
/// then GETs) with a 2 s deadline: returns the error text and how long it took.
fn stopped_server(boot: impl Fn(u16) -> Bootstrap, who: &str) {
    let (mut child, port) = store_process();
    let pid = Pid::from_raw(child.id() as i32);
    let boot = boot(port);
    let store: Arc<dyn Store> = boot
        .connect_store(Instant::now() + Duration::from_secs(5))
        .unwrap();
    kill(pid, Signal::SIGSTOP).unwrap();
    let t0 = Instant::now();
    let deadline = Instant::now() + Duration::from_secs(2);
    // A value larger than the socket buffers, so that even the SET blocks.
    let blob = vec![7u8; 8 << 20];
    let r = exchange_all(&*store, "card", 1, 3, &blob, deadline);
    let took = t0.elapsed();
    let _ = kill(pid, Signal::SIGKILL);
    let _ = kill(pid, Signal::SIGCONT);
    let _ = child.wait();
    let e = r.unwrap_err().to_string();
    assert!(
        took < Duration::from_secs(5),
        "an exchange with a 2 s deadline took {took:?} against a stopped {who}: {e}"
    );
    assert_names(&e, who, port);
    assert!(e.contains("did not answer"), "{e}");
}

#[test]
fn stopped_rank0_bounds_the_exchange_by_the_deadline_and_is_named() {
    stopped_server(bare_rank, "rank 0");
}

#[test]
fn stopped_efarun_bounds_the_exchange_by_the_deadline_and_is_named() {
    stopped_server(efarun_rank, "efarun");
}

/// Rank 0 serves the store; rank 1 joined the store and then stopped answering (its
/// connection stays open); rank 2 published its card and waits for rank 1 a little longer
/// than rank 0 does. Rank 0's exchange fails at its deadline; its store must then stop
/// without waiting for rank 1 (which made rank 0 report its error 10 s after the others in
/// the chaos runs), but only after rank 2 has left, so that rank 2 too reports that rank 1
/// never joined (not that rank 0 closed the store).
#[test]
fn serving_rank_whose_exchange_failed_waits_only_for_the_live_ranks() {
    use efa_core::store::TcpStore;
    let soon = |ms| Instant::now() + Duration::from_millis(ms);
    let store = TcpStore::serve("127.0.0.1:0", 0, 3, soon(5_000)).unwrap();
    let addr = store.server_addr().unwrap().to_string();
    let stopped = TcpStore::connect(&addr, 1, soon(5_000)).unwrap();
    let rank2 = {
        let addr = addr.clone();
        thread::spawn(move || {
            let c = TcpStore::connect(&addr, 2, soon(5_000)).unwrap();
            let r = exchange_all(&c, "card", 2, 3, b"rank 2", soon(1_500));
            // Rank 2 leaves the store after this moment (in the drop).
            let done = Instant::now();
            drop(c);
            (r.unwrap_err().to_string(), done)
        })
    };
    let t0 = Instant::now();
    let e = exchange_all(&store, "card", 0, 3, b"rank 0", soon(500)).unwrap_err();
    assert!(e.to_string().contains("rank 1 never joined"), "{e}");
    drop(store);
    let stopped_at = Instant::now();
    let took = t0.elapsed();
    let (e2, rank2_done) = rank2.join().unwrap();
    drop(stopped);
    assert!(e2.contains("rank 1 never joined"), "rank 2 saw: {e2}");
    assert!(
        took < Duration::from_secs(3),
        "rank 0 needed {took:?} to fail and stop its store"
    );
    assert!(
        rank2_done <= stopped_at,
        "rank 0 stopped its store before rank 2 left"
    );
}

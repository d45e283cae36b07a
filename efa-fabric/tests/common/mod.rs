//! Shared test harness: which providers to test, and a pair of connected endpoints.
//!
//! The provider is a parameter: `EFA_TEST_PROVIDER` (e.g. `verbs;ofi_rxm` in the soft-RoCE
//! VM) selects one; otherwise every provider in [`CANDIDATES`] that `fi_getinfo` reports is
//! tested. IP providers are pinned to `EFA_TEST_DOMAIN` (default `lo`) so that test traffic
//! never leaves the machine. `EFA_TEST_MIN_PROVIDERS` makes a test fail when fewer providers
//! than that were exercised, so a CI run can never pass by testing nothing: a provider on
//! which a test's body skipped its checks ([`Outcome::Skipped`]) is not counted. Every skip
//! prints `SKIPPED: ...` and its reason to stderr, where the CI log shows it.
#![allow(dead_code)]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use efa_fabric::{AddrFormat, Caps, Endpoint, FiAddr, Hints, Info, IoBuf, OpError, Pending};

/// Providers tried when `EFA_TEST_PROVIDER` is not set.
pub const CANDIDATES: &[&str] = &[
    "shm",
    "tcp;ofi_rxm",
    "udp;ofi_rxd",
    "sockets",
    "net",
    "tcp",
    "verbs;ofi_rxm",
    "efa",
];

/// Deadline for every operation in tests: long enough for a loaded 2-core machine, short
/// enough that a hang fails the test.
pub const OP_TIMEOUT: Duration = Duration::from_secs(30);

/// The info to test `provider` with, or why it is skipped.
pub fn info_for(provider: &str, caps: Caps) -> Result<Info, String> {
    let mut hints = Hints::new().provider(provider).caps(caps);
    if efa_fabric::is_ip_provider(provider) {
        let dom = std::env::var("EFA_TEST_DOMAIN").unwrap_or_else(|_| "lo".into());
        hints = hints.domain(dom).addr_format(AddrFormat::SockaddrIn);
    } else if let Ok(dom) = std::env::var("EFA_TEST_FABRIC_DOMAIN") {
        hints = hints.domain(dom);
    }
    let infos = hints
        .get()
        .map_err(|e| format!("{provider}: not available with caps {caps:?}: {e}"))?;
    // Utility providers layered over the asked-for core can be returned too; keep exact
    // matches.
    infos
        .into_iter()
        .find(|i| i.provider() == provider)
        .ok_or_else(|| format!("{provider}: fi_getinfo returned only other providers"))
}

/// What a provider loop's body did on one provider: ran its checks, or skipped them (why).
/// Every body says which, so that a loop can never count a skip as a test.
#[must_use]
#[derive(Debug)]
pub enum Outcome {
    /// The checks ran (and passed: a failure panics).
    Ran,
    /// Nothing was checked on this provider, for this reason.
    Skipped(String),
}

/// Prints `SKIPPED: <what>: <why>` straight to this process's stderr, past the test
/// harness's output capture, so that every skip's reason reaches the CI log (ci/test lists
/// them and counts the whole-test ones). `what` is the test's name (as the harness names
/// it) for a whole test, or `<test> [<part>]` for a part of one.
pub fn print_skip(what: &str, why: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr().lock(), "SKIPPED: {what}: {why}");
}

/// The running test's name as the harness reports it (its thread's name).
pub fn test_name() -> String {
    std::thread::current().name().unwrap_or("?").to_string()
}

/// Prints that the whole running test is skipped, and why (see [`print_skip`]).
pub fn skip_test(why: &str) {
    print_skip(&test_name(), why);
}

/// Providers named in the run: `EFA_TEST_PROVIDER`, else every candidate.
fn wanted_providers() -> (Vec<String>, bool) {
    match std::env::var("EFA_TEST_PROVIDER") {
        Ok(p) => (vec![p], true),
        Err(_) => (CANDIDATES.iter().map(|s| s.to_string()).collect(), false),
    }
}

/// A provider that is not present is reported once per test process (the reason is the
/// same for every test), naming the binary.
fn note_absent(provider: &str, why: &str) {
    static SEEN: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());
    let mut seen = SEEN.lock().unwrap_or_else(|e| e.into_inner());
    if seen.iter().any(|p| p == provider) {
        return;
    }
    seen.push(provider.to_string());
    let exe = std::env::current_exe().ok();
    let bin = exe
        .as_deref()
        .and_then(|e| e.file_name())
        .and_then(|n| n.to_str())
        .map(|n| n.rsplit_once('-').map_or(n, |(b, _)| b).to_string())
        .unwrap_or_else(|| "tests".into());
    print_skip(&format!("{bin} [provider {provider}]"), why);
}

/// Runs `f` once per provider present with `caps`, printing what ran and what was skipped
/// (and why). Returns how many providers ran the checks. Fails if fewer than
/// `EFA_TEST_MIN_PROVIDERS` did, and always if none did: a provider whose body returned
/// [`Outcome::Skipped`] does not count.
pub fn for_each_provider(test: &str, caps: Caps, f: impl FnMut(&Info) -> Outcome) -> usize {
    let (wanted, _) = wanted_providers();
    let min: usize = std::env::var("EFA_TEST_MIN_PROVIDERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    run_providers(test, caps, &wanted, min.max(1), f)
}

/// Like [`for_each_provider`], on the providers that `excludes` gives no reason to leave
/// out. Each provider present that it leaves out is reported skipped with that reason. When
/// it leaves out every provider present here (or the one named by `EFA_TEST_PROVIDER`), the
/// whole test is skipped, printing `why_not`; otherwise at least one of the others must run
/// the checks.
pub fn for_each_provider_where(
    test: &str,
    caps: Caps,
    excludes: fn(&str) -> Option<&'static str>,
    why_not: &str,
    f: impl FnMut(&Info) -> Outcome,
) -> usize {
    let (wanted, named) = wanted_providers();
    let present = |p: &String| named || info_for(p, caps).is_ok();
    let all: Vec<String> = wanted.into_iter().filter(present).collect();
    let (matching, left_out): (Vec<&String>, Vec<&String>) =
        all.iter().partition(|p| excludes(p).is_none());
    if matching.is_empty() {
        skip_test(&format!("{why_not} (providers here: {})", all.join(", ")));
        return 0;
    }
    for p in left_out {
        let why = excludes(p).expect("partitioned by it");
        print_skip(&format!("{} [{p}]", test_name()), why);
    }
    let matching: Vec<String> = matching.into_iter().cloned().collect();
    run_providers(test, caps, &matching, 1, f)
}

fn run_providers(
    test: &str,
    caps: Caps,
    providers: &[String],
    min: usize,
    mut f: impl FnMut(&Info) -> Outcome,
) -> usize {
    let mut ran = Vec::new();
    let mut skipped = Vec::new();
    for p in providers {
        match info_for(p, caps) {
            Ok(info) => {
                let t = Instant::now();
                println!(
                    "{test}: running on {p} ({} / {})",
                    info.fabric(),
                    info.domain()
                );
                match f(&info) {
                    Outcome::Ran => {
                        println!("{test}: {p} ok in {:?}", t.elapsed());
                        ran.push(p.clone());
                    }
                    Outcome::Skipped(why) => {
                        print_skip(&format!("{} [{p}]", test_name()), &why);
                        skipped.push(p.clone());
                    }
                }
            }
            Err(why) => note_absent(p, &why),
        }
    }
    assert!(
        ran.len() >= min,
        "{test}: the checks ran on {} provider(s) {ran:?} (skipped on {skipped:?}), fewer than \
         the required {min}",
        ran.len(),
    );
    ran.len()
}

/// Progresses an endpoint from a background thread until dropped, as the peer process
/// would: shm and manual-progress providers need both sides to progress (shm, for one,
/// answers a new peer's connection request only while the peer's endpoint is progressed).
pub struct Progressor {
    stop: Arc<AtomicBool>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl Progressor {
    pub fn spawn(ep: &Endpoint) -> Progressor {
        let stop = Arc::new(AtomicBool::new(false));
        let (ep, flag) = (ep.clone(), stop.clone());
        let handle = std::thread::spawn(move || {
            let mut backoff = efa_fabric::Backoff::new();
            while !flag.load(Ordering::Relaxed) {
                match ep.progress() {
                    Ok(0) | Err(_) => backoff.snooze(),
                    Ok(_) => backoff.reset(),
                }
            }
        });
        Progressor {
            stop,
            handle: Some(handle),
        }
    }
}

impl Drop for Progressor {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// Two endpoints (each with its own fabric, domain, AV and CQ) that know each other, each
/// progressed in the background as separate processes would be.
pub struct Pair {
    // Progressors first: they stop before the endpoints are dropped.
    _progress: (Progressor, Progressor),
    pub a: Endpoint,
    pub b: Endpoint,
    /// `b` as seen from `a`.
    pub a_to_b: FiAddr,
    /// `a` as seen from `b`.
    pub b_to_a: FiAddr,
}

impl Pair {
    pub fn new(info: &Info) -> Pair {
        let a = Endpoint::open(info).expect("open endpoint a");
        let b = Endpoint::open(info).expect("open endpoint b");
        let a_to_b = a
            .av()
            .insert(&b.name().unwrap())
            .expect("insert b into a's AV");
        let b_to_a = b
            .av()
            .insert(&a.name().unwrap())
            .expect("insert a into b's AV");
        Pair {
            _progress: (Progressor::spawn(&a), Progressor::spawn(&b)),
            a,
            b,
            a_to_b,
            b_to_a,
        }
    }
}

/// What waiting for one operation gives.
pub type OpResult<B> = Result<efa_fabric::Done<B>, OpError<B>>;

/// Progresses two operations (on possibly different endpoints) until both are done, then
/// returns their results. Single-threaded, so it also drives manual-progress providers on
/// both sides.
pub fn both<X: IoBuf, Y: IoBuf>(
    mut x: Pending<X>,
    mut y: Pending<Y>,
) -> (OpResult<X>, OpResult<Y>) {
    // Give up OP_TIMEOUT after the start, or 2 s after one side finished alone (a failed
    // send leaves its receive pending forever).
    let start = Instant::now();
    let mut one_done: Option<Instant> = None;
    while !(x.is_done() && y.is_done()) && start.elapsed() < OP_TIMEOUT {
        let _ = x.test();
        let _ = y.test();
        if (x.is_done() || y.is_done())
            && one_done.get_or_insert_with(Instant::now).elapsed() > Duration::from_secs(2)
        {
            break;
        }
    }
    (x.wait(Duration::ZERO), y.wait(Duration::ZERO))
}

/// Deterministic test pattern: differs per byte and per message.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 24) as u8
        })
        .collect()
}

/// Index of the first differing byte, for readable failures on large buffers.
pub fn first_diff(a: &[u8], b: &[u8]) -> Option<usize> {
    a.iter()
        .zip(b)
        .position(|(x, y)| x != y)
        .or(if a.len() != b.len() {
            Some(a.len().min(b.len()))
        } else {
            None
        })
}

//! Several hosts on one machine: network namespaces on two subnets joined by a router
//! (`ci/netns/hosts.sh`), with real ranks of this test binary in them.
//!
//! Layout: ranks 0 and 1 in `h1` (10.77.1.11), rank 2 in `h2` (10.77.1.12, same subnet),
//! rank 3 in `h3` (10.77.2.13, behind the router). Each namespace is a separate host to the
//! placement rule (the host id includes the network namespace), so the test checks that
//! every pair exchanges verified data, that the two ranks of `h1` use shm, that every pair
//! across namespaces uses IP over the namespace's `efa0` interface, and that the IP traffic
//! went through the namespaces' own interfaces. The rendezvous is a TCP store that rank 0
//! serves at 10.77.1.11, so it also crosses the router.
//!
//! Needs root (or CAP_SYS_ADMIN and CAP_NET_ADMIN) and iproute2. Where namespaces cannot be
//! created the test prints `SKIPPED` and the reason, unless `EFA_REQUIRE_NETNS=1`, which turns
//! the skip into a failure.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use efa_core::Communicator;

mod common;

const HOSTS_SH: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../ci/netns/hosts.sh");
/// Set in the environment of the ranks this file starts, so the child test does nothing
/// when run by `cargo test -- --ignored` or by another test's launcher.
const MARK: &str = "EFA_NETNS_TEST_RANK";
/// How long the whole job may take before its ranks are killed.
const JOB_TIMEOUT: Duration = Duration::from_secs(120);

/// `(rank, host, local rank, local size)`.
const LAYOUT: [(u32, &str, u32, u32); 4] = [
    (0, "h1", 0, 2),
    (1, "h1", 1, 2),
    (2, "h2", 0, 1),
    (3, "h3", 0, 1),
];
/// Rank 0's address; it serves the rendezvous store there.
const STORE: &str = "10.77.1.11:29500";
/// The interface `hosts.sh` gives every host.
const IFACE: &str = "efa0";

/// The ranks' output, indented so that their own `test result:` lines are not taken for
/// this binary's by scripts that count them (ci/test).
fn indent(text: &str) -> String {
    text.lines().map(|l| format!("  | {l}\n")).collect()
}

/// The rank program, as `examples/p2p.rs`: routes, then blocking, non-blocking and async
/// exchanges with every peer, each message checked.
#[test]
#[ignore = "rank program of netns_three_hosts_two_subnets"]
fn child_netns_rank() {
    if std::env::var_os(MARK).is_none() {
        return;
    }
    let comm = Communicator::init().expect("Communicator::init");
    common::verify_all_pairs(&comm);
}

/// The namespaces of one run; deleted (with anything left inside) on drop.
struct Hosts {
    prefix: String,
}

impl Hosts {
    fn up(prefix: &str) -> Hosts {
        // Leftovers of runs that were killed before they could clean up.
        let _ = Command::new(HOSTS_SH).arg("gc").status();
        let out = Command::new(HOSTS_SH)
            .args(["up", prefix])
            .output()
            .expect("run ci/netns/hosts.sh");
        print!("{}", String::from_utf8_lossy(&out.stdout));
        eprint!("{}", String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success(), "ci/netns/hosts.sh up {prefix} failed");
        Hosts {
            prefix: prefix.into(),
        }
    }

    fn ns(&self, host: &str) -> String {
        format!("{}-{host}", self.prefix)
    }

    /// PIDs of processes inside `host`'s namespace.
    fn pids(&self, host: &str) -> String {
        let out = Command::new("ip")
            .args(["netns", "pids", &self.ns(host)])
            .output()
            .expect("ip netns pids");
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// A counter of `efa0` in `host`, from the namespace's own sysfs.
    fn counter(&self, host: &str, name: &str) -> u64 {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.ns(host), "cat"])
            .arg(format!("/sys/class/net/{IFACE}/statistics/{name}"))
            .output()
            .expect("read interface statistics");
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("no {name} for {IFACE} in {}", self.ns(host)))
    }

    fn down(&self) {
        let _ = Command::new(HOSTS_SH).args(["down", &self.prefix]).status();
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        self.down();
    }
}

fn namespaces_with(prefix: &str) -> Vec<String> {
    let out = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("ip netns list");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(&format!("{prefix}-")))
        .map(str::to_owned)
        .collect()
}

/// One rank started by [`launch`], with the files its output goes to.
struct Rank {
    rank: u32,
    host: &'static str,
    child: Child,
    out: PathBuf,
    err: PathBuf,
}

fn launch(hosts: &Hosts, dir: &Path) -> Vec<Rank> {
    let exe = std::env::current_exe().unwrap();
    LAYOUT
        .iter()
        .map(|&(rank, host, local_rank, local_size)| {
            let (out, err) = (
                dir.join(format!("rank{rank}.out")),
                dir.join(format!("rank{rank}.err")),
            );
            let mut cmd = Command::new("ip");
            cmd.args(["netns", "exec", &hosts.ns(host)])
                .arg(&exe)
                .args([
                    "--ignored",
                    "--exact",
                    "child_netns_rank",
                    "--nocapture",
                    "--test-threads=1",
                ])
                .stdin(Stdio::null())
                .stdout(File::create(&out).unwrap())
                .stderr(File::create(&err).unwrap());
            // ci/test pins the IP providers to `lo` for the single-host tests; here each rank
            // must use its namespace's interface, named by EFA_IFACE. Anything that would
            // override the placement or the bootstrap is removed too.
            for var in [
                "FI_TCP_IFACE",
                "FI_SOCKETS_IFACE",
                "FI_UDP_IFACE",
                "FI_PROVIDER",
                "EFA_HOST_ID",
                "EFA_TRANSPORTS",
                "EFA_FABRIC_ADDR",
                "EFA_STORE_SERVED",
                "MASTER_ADDR",
                "MASTER_PORT",
            ] {
                cmd.env_remove(var);
            }
            cmd.env(MARK, "1")
                .env("EFA_RANK", rank.to_string())
                .env("EFA_WORLD_SIZE", LAYOUT.len().to_string())
                .env("EFA_LOCAL_RANK", local_rank.to_string())
                .env("EFA_LOCAL_SIZE", local_size.to_string())
                .env("EFA_STORE", STORE)
                .env("EFA_IFACE", IFACE)
                .env("EFA_TIMEOUT", "60");
            Rank {
                rank,
                host,
                child: cmd.spawn().expect("start ip netns exec"),
                out,
                err,
            }
        })
        .collect()
}

/// Waits for every rank until `deadline`; kills them all if it passes. The exit status of
/// each rank, `None` where it was killed.
fn wait_all(ranks: &mut [Rank], deadline: Instant) -> Vec<Option<std::process::ExitStatus>> {
    let mut done: Vec<Option<std::process::ExitStatus>> = vec![None; ranks.len()];
    while Instant::now() < deadline && done.iter().any(Option::is_none) {
        for (r, d) in ranks.iter_mut().zip(done.iter_mut()) {
            if d.is_none() {
                *d = r.child.try_wait().expect("try_wait");
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    for (r, d) in ranks.iter_mut().zip(&done) {
        if d.is_none() {
            eprintln!(
                "rank {} did not finish within {JOB_TIMEOUT:?}: killing it",
                r.rank
            );
            let _ = r.child.kill();
            let _ = r.child.wait();
        }
    }
    done
}

#[test]
fn netns_three_hosts_two_subnets() {
    let t0 = Instant::now();
    let check = Command::new(HOSTS_SH).arg("check").output();
    let why = match &check {
        Err(e) => Some(format!("cannot run {HOSTS_SH}: {e}")),
        Ok(o) if !o.status.success() => Some(String::from_utf8_lossy(&o.stdout).trim().to_owned()),
        Ok(_) => None,
    };
    if let Some(why) = why {
        assert!(
            std::env::var("EFA_REQUIRE_NETNS").as_deref() != Ok("1"),
            "EFA_REQUIRE_NETNS=1 but network namespaces cannot be created: {why}"
        );
        common::skip_test(&format!("network namespaces cannot be created here: {why}"));
        return;
    }

    let prefix = format!("efans-{}", std::process::id());
    let hosts = Hosts::up(&prefix);
    let dir = std::env::temp_dir().join(format!("{prefix}-out"));
    std::fs::create_dir_all(&dir).unwrap();
    let before: Vec<(u64, u64)> = ["h1", "h2", "h3"]
        .iter()
        .map(|h| (hosts.counter(h, "tx_bytes"), hosts.counter(h, "rx_bytes")))
        .collect();

    let mut ranks = launch(&hosts, &dir);
    let statuses = wait_all(&mut ranks, Instant::now() + JOB_TIMEOUT);
    let outputs: Vec<(String, String)> = ranks
        .iter()
        .map(|r| {
            (
                std::fs::read_to_string(&r.out).unwrap_or_default(),
                std::fs::read_to_string(&r.err).unwrap_or_default(),
            )
        })
        .collect();
    let dump = || {
        let mut s = String::new();
        for (r, (o, e)) in ranks.iter().zip(&outputs) {
            s += &format!(
                "---- rank {} in {prefix}-{} stdout:\n{}---- stderr:\n{}",
                r.rank,
                r.host,
                indent(o),
                indent(e)
            );
        }
        s
    };
    let after: Vec<(u64, u64)> = ["h1", "h2", "h3"]
        .iter()
        .map(|h| (hosts.counter(h, "tx_bytes"), hosts.counter(h, "rx_bytes")))
        .collect();
    // No rank (nor anything it started) may outlive the job.
    let left: Vec<String> = ["h1", "h2", "h3", "rt"]
        .iter()
        .map(|h| (h, hosts.pids(h)))
        .filter(|(_, p)| !p.is_empty())
        .map(|(h, p)| format!("{h}: {p}"))
        .collect();
    drop(hosts);
    let _ = std::fs::remove_dir_all(&dir);
    let namespaces_left = namespaces_with(&prefix);

    for (r, st) in ranks.iter().zip(&statuses) {
        assert!(
            st.is_some_and(|s| s.success()),
            "rank {} in {} failed ({:?}):\n{}",
            r.rank,
            r.host,
            st,
            dump()
        );
    }
    let all: String = outputs.iter().map(|(o, _)| o.as_str()).collect();
    for &(rank, host, _, _) in &LAYOUT {
        assert!(
            all.contains(&format!(
                "rank {rank}: verified blocking, non-blocking and async exchanges with all 3 peers"
            )),
            "rank {rank} did not verify its exchanges:\n{}",
            dump()
        );
        for &(peer, peer_host, _, _) in &LAYOUT {
            let prefix = format!("rank {rank} -> {peer}: ");
            // libtest prints `test child_netns_rank ... ` in front of the first line.
            let line = all
                .lines()
                .find_map(|l| l.find(&prefix).map(|at| &l[at..]))
                .unwrap_or_else(|| panic!("no route line `{prefix}...`:\n{}", dump()));
            let (want, reason) = if host == peer_host {
                (
                    "shm via shm (",
                    if rank == peer {
                        "(self"
                    } else {
                        "(shm: same host"
                    },
                )
            } else {
                ("ip via ", "(IP: ")
            };
            assert!(
                line[prefix.len()..].starts_with(want) && line.contains(reason),
                "rank {rank} ({host}) -> rank {peer} ({peer_host}): expected `{want}...{reason}...`, got {line:?}"
            );
        }
    }
    // The IP traffic went through the namespaces' own interfaces: every host outside h1
    // exchanged at least its blocking messages (2 x 400 kB per peer) over efa0.
    for (i, h) in ["h1", "h2", "h3"].iter().enumerate() {
        let (tx, rx) = (after[i].0 - before[i].0, after[i].1 - before[i].1);
        println!("{h}: {IFACE} sent {tx} bytes, received {rx} bytes");
        assert!(
            tx > 1_000_000 && rx > 1_000_000,
            "{h}: only {tx}/{rx} bytes sent/received on {IFACE}: the IP route did not use it"
        );
    }
    assert!(
        left.is_empty(),
        "processes left in the namespaces: {left:?}"
    );
    assert!(
        namespaces_left.is_empty(),
        "namespaces left behind: {namespaces_left:?}"
    );
    for l in all
        .lines()
        .filter(|l| l.contains(" -> ") || l.contains(": verified"))
    {
        println!("{}", l.trim_start_matches("test child_netns_rank ... "));
    }
    println!("netns_three_hosts_two_subnets: {:.1?}", t0.elapsed());
}

//! `efa info` says what a started communicator does: for several provider sets (varied with
//! `FI_PROVIDER`, `EFA_TRANSPORTS` and, in the soft-RoCE VM, `EFA_FABRIC_ADDR`), the provider
//! `efa --local info --json` names for each role equals `comm.provider(transport)` of a
//! 2-rank job on this host, and the route it gives to a peer on this host equals
//! `comm.route(peer)` (transport, provider and reason). A set that leaves no endpoint, or a
//! bad setting, must fail both.
//!
//! The ranks are this test binary's `agree_rank`, started twice with the efarun bootstrap
//! variables and a file store.

use std::collections::BTreeMap;
use std::process::{Command, Output};

use efa_core::placement::Transport;
use serde_json::{json, Value};

const EFA: &str = env!("CARGO_BIN_EXE_efa");

/// The variables a provider set may set; every other run has them removed.
const STEERING: [&str; 4] = [
    "FI_PROVIDER",
    "EFA_TRANSPORTS",
    "EFA_FABRIC_ADDR",
    "FI_TCP_IFACE",
];

fn with_set(cmd: &mut Command, set: &[(String, String)]) {
    for k in STEERING {
        cmd.env_remove(k);
    }
    cmd.env_remove("EFA_IFACE");
    for (k, v) in set {
        cmd.env(k, v);
    }
}

/// `efa --local info --json` under `set`, asked for the route to every IPv4 address of this
/// host (one of them is where the second rank is placed; see [`peer_addr`]).
fn efa_info(set: &[(String, String)]) -> Output {
    let mut cmd = Command::new(EFA);
    cmd.args(["--local", "info", "--json"]);
    for a in efa_core::net::interfaces() {
        if a.subnet.addr.is_ipv4() {
            cmd.arg("--peer").arg(a.subnet.to_string());
        }
    }
    with_set(&mut cmd, set);
    cmd.output().expect("run efa")
}

/// Runs a 2-rank job of `agree_rank` under `set`; each rank's `AGREE ` line, parsed.
fn job(set: &[(String, String)]) -> (Vec<Value>, String) {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!(
        "efa-agree-{}-{}",
        std::process::id(),
        N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    let children: Vec<_> = (0..2)
        .map(|r| {
            let mut cmd = Command::new(std::env::current_exe().unwrap());
            cmd.args([
                "--ignored",
                "--exact",
                "agree_rank",
                "--nocapture",
                "--test-threads=1",
            ]);
            with_set(&mut cmd, set);
            cmd.env("EFA_RANK", r.to_string())
                .env("EFA_WORLD_SIZE", "2")
                .env("EFA_LOCAL_RANK", r.to_string())
                .env("EFA_LOCAL_SIZE", "2")
                .env("EFA_STORE", format!("file://{}", dir.display()))
                .env("EFA_TIMEOUT", "30")
                .env_remove("EFA_STORE_TOKEN")
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped());
            cmd.spawn().expect("spawn rank")
        })
        .collect();
    let mut lines = Vec::new();
    let mut all = String::new();
    for c in children {
        let o = c.wait_with_output().expect("wait rank");
        let out = String::from_utf8_lossy(&o.stdout).into_owned();
        all.push_str(&out);
        all.push_str(&String::from_utf8_lossy(&o.stderr));
        for l in out.lines() {
            // The harness prints `test agree_rank ... ` before the rank's own output.
            if let Some((_, j)) = l.split_once("AGREE ") {
                lines.push(serde_json::from_str::<Value>(j).expect("rank's AGREE line"));
            }
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    lines.sort_by_key(|v| v["rank"].as_u64());
    (lines, all)
}

/// One rank: builds the communicator as any program does and prints what it reports.
#[test]
#[ignore = "rank program for efa_info_agrees_with_the_communicator"]
fn agree_rank() {
    if std::env::var_os("EFA_RANK").is_none() {
        return;
    }
    let rank: u32 = std::env::var("EFA_RANK").unwrap().parse().unwrap();
    let comm = match efa_core::Communicator::init() {
        Ok(c) => c,
        Err(e) => {
            println!("AGREE {}", json!({"rank": rank, "error": e.to_string()}));
            return;
        }
    };
    let peer = 1 - comm.rank();
    let route = comm.route(peer).expect("route");
    let providers: BTreeMap<String, Option<String>> = Transport::ALL
        .iter()
        .map(|t| (t.to_string(), comm.provider(*t).map(str::to_string)))
        .collect();
    println!(
        "AGREE {}",
        json!({
            "rank": comm.rank(),
            "providers": providers,
            "route": {
                "transport": route.transport.to_string(),
                "provider": comm.provider(route.transport),
                "reason": route.reason.to_string(),
            },
        })
    );
    // Nobody leaves before both have read their routes.
    comm.barrier().expect("barrier");
}

fn set(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// The address of a peer on this host that `efa info --peer` should place as the second
/// rank is placed: in the fabric role's card subnet when the fabric is chosen, else in the
/// IP role's (lo, for a job on one host).
fn peer_addr(info: &Value) -> String {
    let role = |k: &str| {
        info["roles"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["role"] == k)
            .cloned()
            .unwrap()
    };
    for k in ["fabric", "ip"] {
        if let Some(s) = role(k)["card_subnet"].as_str() {
            return s.to_string();
        }
    }
    "127.0.0.1/8".into()
}

/// Compares one provider set; returns the route transports the job used ("none" if it
/// could not start).
fn agree(pairs: &[(String, String)]) -> String {
    let name = format!("{pairs:?}");
    let first = efa_info(pairs);
    let (ranks, log) = job(pairs);
    assert_eq!(ranks.len(), 2, "{name}: both ranks must report:\n{log}");
    if !first.status.success() {
        // A bad setting: efa info refuses it with the communicator's own words.
        let err = String::from_utf8_lossy(&first.stderr);
        for r in &ranks {
            let e = r["error"]
                .as_str()
                .unwrap_or_else(|| panic!("{name}: efa info failed ({err}) but rank started: {r}"));
            assert!(
                err.contains(e),
                "{name}: efa info says {err:?}, the rank {e:?}"
            );
        }
        println!("{name}: both refuse: {err}");
        return "refused".into();
    }
    let info: Value = serde_json::from_slice(&first.stdout).expect("efa info --json");
    let chosen: BTreeMap<String, Option<String>> = info["roles"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["transport"].as_str().unwrap().to_string(),
                r["provider"].as_str().map(str::to_string),
            )
        })
        .collect();
    if chosen.values().all(Option::is_none) {
        for r in &ranks {
            let e = r["error"].as_str().unwrap_or_else(|| {
                panic!("{name}: efa info opens nothing but the rank started: {r}")
            });
            assert!(e.contains("no transport"), "{name}: {e}");
        }
        println!("{name}: neither opens an endpoint");
        return "none".into();
    }
    let peer = peer_addr(&info);
    let pair = format!("this host -> {peer}");
    let line = info["routes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["pair"] == pair.as_str())
        .unwrap_or_else(|| panic!("{name}: efa info has no route {pair}: {}", info["routes"]));
    for r in &ranks {
        assert!(
            r["error"].is_null(),
            "{name}: efa info {chosen:?}, rank failed: {r}; both ranks' output:\n{log}"
        );
        let got: BTreeMap<String, Option<String>> =
            serde_json::from_value(r["providers"].clone()).unwrap();
        assert_eq!(chosen, got, "{name}: efa info (left) vs rank {}", r["rank"]);
        assert_eq!(
            (&line["transport"], &line["provider"], &line["reason"]),
            (
                &r["route"]["transport"],
                &r["route"]["provider"],
                &r["route"]["reason"]
            ),
            "{name}: efa info's route to {peer} (left) vs rank {}'s route",
            r["rank"]
        );
    }
    println!(
        "{name}: agree: {chosen:?}, route {} ({})",
        line["transport"], line["reason"]
    );
    line["transport"].as_str().unwrap().to_string()
}

#[test]
fn efa_info_agrees_with_the_communicator() {
    let fabric = std::env::var("EFA_TEST_PROVIDER").ok();
    let mut sets = vec![
        set(&[]),
        set(&[("EFA_TRANSPORTS", "ip")]),
        set(&[("EFA_TRANSPORTS", "^shm")]),
        set(&[("EFA_TRANSPORTS", "fabric")]),
        set(&[("EFA_TRANSPORTS", "tcpp")]),
    ];
    match std::env::var("EFA_TEST_ADDR2") {
        // The soft-RoCE VM (where every run is slow): the fabric bound to the device's
        // second subnet too.
        Ok(a) => sets.push(set(&[("EFA_TRANSPORTS", "^shm"), ("EFA_FABRIC_ADDR", &a)])),
        // This host: more provider sets, hidden by FI_PROVIDER.
        Err(_) => sets.extend([
            set(&[("EFA_TRANSPORTS", "shm")]),
            set(&[("FI_PROVIDER", "tcp")]),
            set(&[("FI_PROVIDER", "sockets"), ("EFA_TRANSPORTS", "ip")]),
            set(&[("FI_PROVIDER", "shm")]),
        ]),
    }
    let mut used = Vec::new();
    for s in &sets {
        used.push(agree(s));
    }
    println!("routes per set: {used:?}");
    // Not vacuous: jobs started and routed over shm and IP (and the fabric where there is
    // one to test), and a bad setting was refused by both.
    for want in ["shm", "ip", "refused"] {
        assert!(
            used.iter().any(|u| u == want),
            "no set used {want}: {used:?}"
        );
    }
    if fabric.is_some() {
        assert!(
            used.iter().any(|u| u == "fabric"),
            "EFA_TEST_PROVIDER={fabric:?} but no set routed over the fabric: {used:?}"
        );
    }
}

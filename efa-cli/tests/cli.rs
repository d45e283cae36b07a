//! Runs the `efa` binary on this machine. Checks that need something this machine lacks say
//! why they are skipped.

use std::process::{Command, Output};

const EFA: &str = env!("CARGO_BIN_EXE_efa");

fn run(args: &[&str]) -> Output {
    Command::new(EFA)
        .args(args)
        .env_remove("FI_PROVIDER")
        .env_remove("FI_TCP_IFACE")
        .env_remove("EFA_IFACE")
        .env_remove("EFA_TRANSPORTS")
        .output()
        .expect("run efa")
}

fn text(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// `efa doctor` under a shell that first sets `ulimit -l` (KiB, or `unlimited`).
fn doctor_with_memlock(limit: &str, extra: &str) -> Option<Output> {
    let o = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "ulimit -l {limit} || exit 99; exec \"$0\" doctor {extra}"
        ))
        .arg(EFA)
        .output()
        .expect("run sh");
    if o.status.code() == Some(99) {
        // Straight to stderr, past the test harness's capture: ci/test lists every skip.
        use std::io::Write;
        let test = std::thread::current().name().unwrap_or("?").to_string();
        let _ = writeln!(
            std::io::stderr(),
            "SKIPPED: {test}: cannot set ulimit -l {limit} here ({})",
            String::from_utf8_lossy(&o.stderr).trim()
        );
        return None;
    }
    Some(o)
}

fn no_rdma() -> bool {
    !std::path::Path::new("/sys/class/infiniband").exists()
}

#[test]
fn info_names_the_routes() {
    let o = run(&["info"]);
    assert!(o.status.success(), "{o:?}");
    let out = text(&o);
    assert!(out.contains("intra-host  shm"), "{out}");
    if std::env::var("EFA_TEST_PROVIDER").as_deref() == Ok("verbs;ofi_rxm") {
        assert!(out.contains("fabric      verbs;ofi_rxm"), "{out}");
    } else if no_rdma() {
        assert!(
            out.contains("no RDMA device: /sys/class/infiniband is missing"),
            "{out}"
        );
    } else {
        eprintln!("this host has /sys/class/infiniband; not checking the no-fabric reason");
    }
    assert!(out.contains("tcp;ofi_rxm"), "{out}");
    assert!(out.contains("CHOSEN for IP"), "{out}");
    // Every other entry carries a one-line reason.
    let listing = out.split("Everything libfabric lists").nth(1).unwrap();
    for line in listing.lines().skip(2).take_while(|l| !l.is_empty()) {
        assert!(
            line.split("  ").filter(|c| !c.trim().is_empty()).count() >= 12,
            "row without a verdict: {line}"
        );
    }
}

#[test]
fn info_json_is_one_document() {
    let o = run(&["info", "--json", "--peer", "10.0.1.7/24"]);
    assert!(o.status.success(), "{o:?}");
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("valid JSON");
    let roles = v["roles"].as_array().unwrap();
    assert_eq!(roles.len(), 3);
    assert_eq!(roles[0]["role"], "intra_host");
    assert_eq!(roles[0]["provider"], "shm");
    assert_eq!(roles[2]["role"], "ip");
    assert_eq!(roles[2]["provider"], "tcp;ofi_rxm");
    if no_rdma() {
        assert_eq!(roles[1]["provider"], serde_json::Value::Null);
        let why = roles[1]["why"].as_str().unwrap();
        assert!(
            why.starts_with("libfabric lists neither efa nor verbs;ofi_rxm; no RDMA device"),
            "{why}"
        );
    }
    let provs = v["providers"].as_array().unwrap();
    assert!(!provs.is_empty());
    for p in provs {
        assert!(
            p["chosen_for"].is_string() != p["rejected_because"].is_string(),
            "{p}"
        );
    }
    let routes = v["routes"].as_array().unwrap();
    assert_eq!(routes.len(), 1);
    assert_eq!(routes[0]["pair"], "this host -> 10.0.1.7/24");
    if no_rdma() {
        assert_eq!(routes[0]["transport"], "ip");
        assert_eq!(routes[0]["reason"], "IP: this rank has no fabric endpoint");
    }
}

fn info_json_with(env: &[(&str, &str)], args: &[&str]) -> serde_json::Value {
    let mut c = Command::new(EFA);
    c.args(["info", "--json"]).args(args);
    for k in ["FI_PROVIDER", "FI_TCP_IFACE", "EFA_IFACE", "EFA_TRANSPORTS"] {
        c.env_remove(k);
    }
    for (k, v) in env {
        c.env(k, v);
    }
    let o = c.output().unwrap();
    assert!(o.status.success(), "{o:?}");
    serde_json::from_slice(&o.stdout).unwrap()
}

#[test]
fn info_respects_efa_transports_efa_iface_and_local() {
    let v = info_json_with(&[("EFA_TRANSPORTS", "^shm"), ("EFA_IFACE", "lo")], &[]);
    assert_eq!(v["roles"][0]["why"], "excluded by EFA_TRANSPORTS=^shm");
    assert_eq!(v["roles"][2]["domain"], "lo");
    let shm = v["providers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["provider"] == "shm")
        .expect("shm listed");
    assert_eq!(
        shm["rejected_because"],
        "intra-host role excluded by EFA_TRANSPORTS=^shm"
    );
    // A job whose ranks are all on this host: the communicator uses lo.
    let v = info_json_with(&[], &["--local"]);
    assert_eq!(v["roles"][2]["domain"], "lo");
    assert_eq!(v["roles"][2]["provider"], "tcp;ofi_rxm");
}

#[test]
fn fi_tcp_iface_hides_tcp_on_the_route_interface() {
    let v = info_json_with(&[], &[]);
    let iface = v["ip_interface"]["name"]
        .as_str()
        .unwrap_or("lo")
        .to_string();
    if iface == "lo" {
        {
            // Straight to stderr, past the test harness's capture: ci/test lists every skip.
            use std::io::Write;
            let test = std::thread::current().name().unwrap_or("?").to_string();
            let _ = writeln!(
                std::io::stderr(),
                "SKIPPED: {test}: this host has no non-loopback IPv4 interface"
            );
        }
        return;
    }
    let v = info_json_with(&[("FI_TCP_IFACE", "lo")], &[]);
    assert_eq!(v["roles"][2]["domain"], iface.as_str());
    assert_eq!(v["roles"][2]["provider"], "net");
    let why = v["roles"][2]["why"].as_str().unwrap();
    assert!(
        why.contains(&format!("FI_TCP_IFACE=lo hides tcp on {iface}")),
        "{why}"
    );
}

#[test]
fn bad_settings_and_peers_are_usage_errors() {
    let o = Command::new(EFA)
        .args(["info"])
        .env("EFA_TRANSPORTS", "shm,ucx")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("unknown transport `ucx`"));
    let o = run(&["info", "--peer", "10.0.0.1/99"]);
    assert_eq!(o.status.code(), Some(2));
}

#[test]
fn doctor_fails_on_low_memlock_with_the_fix() {
    let Some(o) = doctor_with_memlock("64", "") else {
        return;
    };
    let out = text(&o);
    assert_eq!(o.status.code(), Some(1), "{out}");
    let line = out
        .lines()
        .find(|l| l.contains("memlock"))
        .expect("memlock line");
    assert!(line.starts_with("FAIL"), "{out}");
    assert!(line.contains("soft 64 KiB"), "{out}");
    assert!(out.contains("* soft memlock unlimited"), "{out}");
    assert!(out.contains("LimitMEMLOCK=infinity"), "{out}");

    let o = doctor_with_memlock("64", "--json").unwrap();
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let m = v
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["check"] == "memlock")
        .unwrap();
    assert_eq!(m["status"], "FAIL");
    assert!(m["fix"]
        .as_str()
        .unwrap()
        .contains("* hard memlock unlimited"));
}

#[test]
fn doctor_memlock_passes_when_unlimited() {
    let Some(o) = doctor_with_memlock("unlimited", "--json") else {
        return;
    };
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let checks = v.as_array().unwrap();
    let m = checks.iter().find(|c| c["check"] == "memlock").unwrap();
    assert_eq!(m["status"], "PASS", "{m}");
    let fails: Vec<_> = checks.iter().filter(|c| c["status"] == "FAIL").collect();
    assert_eq!(o.status.code(), Some(if fails.is_empty() { 0 } else { 1 }));
}

#[test]
fn doctor_reports_every_check() {
    let o = run(&["doctor", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("valid JSON");
    let names: Vec<&str> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["check"].as_str().unwrap())
        .collect();
    for want in [
        "memlock",
        "ptrace",
        "hugepages",
        "rdma devices",
        "fork safety",
        "efa device",
        "routes",
        "security group",
    ] {
        assert!(names.contains(&want), "{want} missing from {names:?}");
    }
    assert!(
        names.iter().any(|n| n.starts_with("interface ")),
        "{names:?}"
    );
    let any_fail = v.as_array().unwrap().iter().any(|c| c["status"] == "FAIL");
    assert_eq!(o.status.code(), Some(if any_fail { 1 } else { 0 }));
    if std::env::var("EFA_TEST_PROVIDER").as_deref() == Ok("verbs;ofi_rxm") {
        let rxe = v
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["check"].as_str().unwrap().starts_with("rdma rxe"))
            .expect("an rxe device check in the soft-RoCE VM");
        assert!(rxe["value"].as_str().unwrap().contains("ACTIVE"), "{rxe}");
    }
}

#[test]
fn info_shows_the_ip_flow_count_and_why() {
    let info = |env: &[(&str, &str)]| {
        let mut c = Command::new(EFA);
        c.args(["info"]).env("EFA_IFACE", "lo");
        for k in [
            "FI_PROVIDER",
            "FI_TCP_IFACE",
            "EFA_TRANSPORTS",
            "EFA_IP_FLOWS",
        ] {
            c.env_remove(k);
        }
        for (k, v) in env {
            c.env(k, v);
        }
        let o = c.output().unwrap();
        assert!(o.status.success(), "{o:?}");
        let t = text(&o);
        if !t.contains("  IP          tcp") {
            eprintln!("SKIPPED: info_shows_the_ip_flow_count_and_why: no tcp IP role here:\n{t}");
            return None;
        }
        Some(t)
    };
    let Some(t) = info(&[("EFA_IP_FLOWS", "4")]) else {
        return;
    };
    assert!(
        t.contains("IP flows per peer: 4 (set by EFA_IP_FLOWS)"),
        "{t}"
    );
    let t = info(&[]).unwrap();
    assert!(
        t.contains("IP flows per peer: 1 (lo is not an ENA interface"),
        "{t}"
    );
    let t = info(&[("EFA_IP_FLOWS", "0")]).unwrap();
    assert!(
        t.contains("IP flows per peer: unusable setting: EFA_IP_FLOWS=\"0\""),
        "{t}"
    );
}

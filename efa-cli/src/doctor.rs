//! `efa doctor`: checks of the host, each a pure function over a [`System`] (files under a
//! root, environment, memlock limit) and facts gathered once, so that tests inject states.

use std::fmt;

use serde::Serialize;

use crate::system::{Memlock, Rdma, RdmaDevice, System};
use efa_core::roles::IpIfaceChoice;

/// Memory the communicator registers for its own bounce buffers, so the least `ulimit -l`
/// that can work: 64 MiB.
pub const MEMLOCK_NEED: u64 = 64 << 20;
/// Below this (and not unlimited) registration of user buffers may still hit the limit: 1 GiB.
pub const MEMLOCK_COMFORT: u64 = 1 << 30;
/// First kernel whose fork() copies pinned (registered) pages, so fork safety is not needed.
pub const FORK_SAFE_KERNEL: (u32, u32) = (5, 13);

/// The verdict of one check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Status {
    /// Fine.
    Pass,
    /// Not probed (nothing to probe with).
    Skip,
    /// Works, but worse than it could, or may fail later.
    Warn,
    /// Will fail.
    Fail,
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Status::Pass => "PASS",
            Status::Skip => "SKIP",
            Status::Warn => "WARN",
            Status::Fail => "FAIL",
        })
    }
}

/// One check's result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Check {
    /// Short name (`memlock`, `ptrace`, ...).
    pub check: String,
    /// Verdict.
    pub status: Status,
    /// The value found.
    pub value: String,
    /// What it means.
    pub detail: String,
    /// The exact fix, when not PASS.
    pub fix: Option<String>,
}

fn check(
    name: &str,
    status: Status,
    value: impl Into<String>,
    detail: impl Into<String>,
    fix: Option<String>,
) -> Check {
    Check {
        check: name.into(),
        status,
        value: value.into(),
        detail: detail.into(),
        fix,
    }
}

fn human_bytes(b: u64) -> String {
    if b >= 1 << 30 && b % (1 << 30) == 0 {
        format!("{} GiB", b >> 30)
    } else if b >= 1 << 20 {
        format!("{} MiB", b >> 20)
    } else {
        format!("{} KiB", b >> 10)
    }
}

fn limit_text(l: Option<u64>) -> String {
    match l {
        None => "unlimited".into(),
        Some(b) => format!("{} KiB ({})", b / 1024, human_bytes(b)),
    }
}

/// The fix for a low memlock limit.
pub const MEMLOCK_FIX: &str = "ulimit -l unlimited (in the job's shell, if the hard limit \
allows it); permanently: add `* soft memlock unlimited` and `* hard memlock unlimited` to \
/etc/security/limits.conf and log in again; systemd units: LimitMEMLOCK=infinity; docker: \
--ulimit memlock=-1";

/// `ulimit -l` against what registration needs.
pub fn check_memlock(m: &Result<Memlock, String>) -> Check {
    let m = match m {
        Ok(m) => *m,
        Err(e) => {
            return check(
                "memlock",
                Status::Warn,
                "unknown",
                format!("could not read the limit: {e}"),
                Some("check `ulimit -l`".into()),
            )
        }
    };
    let value = format!("soft {}, hard {}", limit_text(m.soft), limit_text(m.hard));
    let hard_ok = m.hard.map_or(true, |h| h >= MEMLOCK_NEED);
    let fix = if hard_ok {
        MEMLOCK_FIX.to_string()
    } else {
        format!(
            "the hard limit is low too, so `ulimit -l` cannot raise it: {}",
            MEMLOCK_FIX
                .split_once("permanently: ")
                .map_or(MEMLOCK_FIX, |(_, r)| r)
        )
    };
    match m.soft {
        None => check(
            "memlock",
            Status::Pass,
            value,
            "unlimited: memory registration is not limited",
            None,
        ),
        Some(s) if s < MEMLOCK_NEED => check(
            "memlock",
            Status::Fail,
            value,
            format!(
                "verbs and efa pin registered memory, and the communicator registers at \
                 least {} of bounce buffers; registration beyond {} fails with ENOMEM",
                human_bytes(MEMLOCK_NEED),
                human_bytes(s)
            ),
            Some(fix),
        ),
        Some(s) if s < MEMLOCK_COMFORT => check(
            "memlock",
            Status::Warn,
            value,
            format!(
                "enough for the communicator's {} of bounce buffers, but registering user \
                 buffers for zero-copy transfers may hit the limit",
                human_bytes(MEMLOCK_NEED)
            ),
            Some(fix),
        ),
        Some(_) => check(
            "memlock",
            Status::Pass,
            value,
            "large enough; `unlimited` is the usual setting for RDMA jobs",
            None,
        ),
    }
}

/// Yama's ptrace scope, which decides whether shm may use cross-memory attach
/// (`process_vm_readv`) between the ranks of a job.
pub fn check_ptrace(sys: &System) -> Check {
    const P: &str = "/proc/sys/kernel/yama/ptrace_scope";
    let persist = "sysctl -w kernel.yama.ptrace_scope=0; to persist: echo \
                   kernel.yama.ptrace_scope=0 > /etc/sysctl.d/10-ptrace.conf";
    match sys.read(P).as_deref() {
        None => check(
            "ptrace",
            Status::Pass,
            format!("{P} absent"),
            "Yama is not active: shm may use cross-memory attach between ranks of one user",
            None,
        ),
        Some("0") => check(
            "ptrace",
            Status::Pass,
            "ptrace_scope=0",
            "classic ptrace permissions: shm may use cross-memory attach",
            None,
        ),
        Some(v @ ("1" | "2")) => check(
            "ptrace",
            Status::Warn,
            format!("ptrace_scope={v}"),
            format!(
                "{}: shm cannot use cross-memory attach between sibling ranks and falls back \
                 to copying through shared buffers (slower for large messages)",
                if v == "1" {
                    "only descendants may be attached"
                } else {
                    "only CAP_SYS_PTRACE may attach"
                }
            ),
            Some(if v == "1" {
                persist.to_string()
            } else {
                format!("{persist}; or grant CAP_SYS_PTRACE (docker: --cap-add SYS_PTRACE)")
            }),
        ),
        Some("3") => check(
            "ptrace",
            Status::Warn,
            "ptrace_scope=3",
            "attaching is disabled until reboot: shm falls back to copying through shared \
             buffers",
            Some(
                "scope 3 cannot be lowered at run time: set kernel.yama.ptrace_scope=0 in \
                 /etc/sysctl.d/10-ptrace.conf and reboot"
                    .into(),
            ),
        ),
        Some(v) => check(
            "ptrace",
            Status::Warn,
            format!("ptrace_scope={v}"),
            "unknown value",
            Some(persist.into()),
        ),
    }
}

fn meminfo(sys: &System, key: &str) -> Option<u64> {
    sys.read("/proc/meminfo")?.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        (k.trim() == key).then(|| v.split_whitespace().next()?.parse().ok())?
    })
}

/// Huge pages, which the efa provider uses for its internal buffers when there are some.
pub fn check_hugepages(sys: &System, efa_present: bool) -> Check {
    let total = meminfo(sys, "HugePages_Total");
    let free = meminfo(sys, "HugePages_Free").unwrap_or(0);
    let size_kb = meminfo(sys, "Hugepagesize").unwrap_or(2048);
    let thp = sys
        .read("/sys/kernel/mm/transparent_hugepage/enabled")
        .and_then(|s| {
            s.split_whitespace()
                .find(|w| w.starts_with('['))
                .map(|w| w.trim_matches(['[', ']']).to_string())
        })
        .unwrap_or_else(|| "unknown".into());
    let Some(total) = total else {
        return check(
            "hugepages",
            Status::Warn,
            "unknown",
            "/proc/meminfo has no HugePages_Total",
            Some("check that /proc is mounted".into()),
        );
    };
    let value = format!("{total} x {size_kb} kB, {free} free; transparent huge pages: {thp}");
    let need = 5128 * 1024 / size_kb.max(1); // what the EFA installer reserves: ~5 GiB
    if total == 0 && efa_present {
        check(
            "hugepages",
            Status::Warn,
            value,
            "the efa provider allocates its bounce buffers from huge pages when it can; \
             with none it falls back to regular pages (more registrations, more TLB misses)",
            Some(format!(
                "sysctl -w vm.nr_hugepages={need} (persist in /etc/sysctl.d/); or \
                 FI_EFA_USE_HUGE_PAGE=0 to silence the fallback"
            )),
        )
    } else if total == 0 {
        check(
            "hugepages",
            Status::Pass,
            value,
            "none reserved; only the efa provider uses them, and there is no EFA device",
            None,
        )
    } else {
        check(
            "hugepages",
            Status::Pass,
            value,
            "reserved huge pages are available to the efa provider",
            None,
        )
    }
}

/// RDMA devices: present, ACTIVE, with usable GIDs and device files.
pub fn check_rdma(sys: &System, rdma: &Rdma, ip_iface: &str) -> Vec<Check> {
    let soft_roce = format!(
        "for soft-RoCE: modprobe rdma_rxe && rdma link add rxe0 type rxe netdev {ip_iface}"
    );
    let devs = match rdma {
        Rdma::Missing => {
            return vec![check(
                "rdma devices",
                Status::Warn,
                "/sys/class/infiniband missing",
                "no RDMA device: the kernel has no RDMA support or no device; the fabric role \
                 is unavailable and fabric peers fall back to IP",
                Some(soft_roce),
            )]
        }
        Rdma::Empty => {
            return vec![check(
                "rdma devices",
                Status::Warn,
                "/sys/class/infiniband is empty",
                "RDMA core is loaded but there is no device; fabric peers fall back to IP",
                Some(soft_roce),
            )]
        }
        Rdma::Devices(d) => d,
    };
    let mut out = vec![check(
        "rdma devices",
        Status::Pass,
        devs.iter()
            .map(|d| d.name.as_str())
            .collect::<Vec<_>>()
            .join(", "),
        format!("{} device(s)", devs.len()),
        None,
    )];
    let uverbs = sys.list("/dev/infiniband").unwrap_or_default();
    for d in devs {
        out.push(check_device(d, &uverbs));
    }
    out
}

fn check_device(d: &RdmaDevice, uverbs: &[String]) -> Check {
    let name = format!("rdma {}", d.name);
    let ports: Vec<String> = d
        .ports
        .iter()
        .map(|(p, s)| format!("port {p} {s}"))
        .collect();
    let mut value = format!(
        "driver {}, netdev {}, {}",
        d.driver.as_deref().unwrap_or("?"),
        d.netdev.as_deref().unwrap_or("?"),
        if ports.is_empty() {
            "no ports".into()
        } else {
            ports.join(", ")
        }
    );
    let rxe = d.driver.as_deref() == Some("rdma_rxe");
    if rxe {
        value.push_str(&format!(", {} GID(s)", d.gids.len()));
    }
    if !d.active() {
        let fix = match (&d.netdev, rxe) {
            (Some(n), _) => format!("ip link set dev {n} up (and check its cable / link)"),
            (None, true) => format!(
                "rdma link delete {0}; rdma link add {0} type rxe netdev IFACE",
                d.name
            ),
            (None, false) => "check the device and its link".into(),
        };
        return check(&name, Status::Fail, value, "no port is ACTIVE", Some(fix));
    }
    if uverbs.iter().all(|u| !u.starts_with("uverbs")) {
        return check(
            &name,
            Status::Fail,
            value,
            "no /dev/infiniband/uverbs* device file: user space cannot open the device",
            Some(
                "modprobe ib_uverbs; in a container pass the device: \
                 --device=/dev/infiniband/uverbs0"
                    .into(),
            ),
        );
    }
    if rxe && !d.has_ipv4_gid() {
        return check(
            &name,
            Status::Warn,
            value,
            "ACTIVE, but no IPv4-mapped GID: RoCEv2 over IPv4 needs an IPv4 address on the \
             netdev",
            Some(format!(
                "ip addr add ADDR/PREFIX dev {}",
                d.netdev.as_deref().unwrap_or("IFACE")
            )),
        );
    }
    check(&name, Status::Pass, value, "ACTIVE", None)
}

fn kernel_version(s: &str) -> Option<(u32, u32)> {
    let mut it = s.split(|c: char| !c.is_ascii_digit());
    Some((it.next()?.parse().ok()?, it.next()?.parse().ok()?))
}

/// Whether fork safety must be turned on (`RDMAV_FORK_SAFE`, `FI_EFA_FORK_SAFE`).
pub fn check_fork(sys: &System, rdma: &Rdma) -> Check {
    let vars: Vec<String> = ["RDMAV_FORK_SAFE", "IBV_FORK_SAFE", "FI_EFA_FORK_SAFE"]
        .iter()
        .filter_map(|k| sys.env(k).map(|v| format!("{k}={v}")))
        .collect();
    let rel = sys
        .read("/proc/sys/kernel/osrelease")
        .unwrap_or_else(|| "unknown".into());
    let value = format!(
        "kernel {rel}; {}",
        if vars.is_empty() {
            "no fork-safety variable set".into()
        } else {
            vars.join(" ")
        }
    );
    if rdma.devices().is_empty() {
        return check(
            "fork safety",
            Status::Pass,
            value,
            "not relevant: no RDMA device, so no pinned registrations",
            None,
        );
    }
    match kernel_version(&rel) {
        Some(v) if v >= FORK_SAFE_KERNEL => check(
            "fork safety",
            Status::Pass,
            value,
            format!(
                "not needed: kernels from {}.{} copy pinned pages on fork",
                FORK_SAFE_KERNEL.0, FORK_SAFE_KERNEL.1
            ),
            None,
        ),
        _ if !vars.is_empty() => check(
            "fork safety",
            Status::Pass,
            value,
            "fork safety is on (costs a madvise per registration)",
            None,
        ),
        _ => check(
            "fork safety",
            Status::Warn,
            value,
            "on this kernel a child created by fork() (DataLoader workers, subprocess) can \
             corrupt registered memory of the parent",
            Some("export RDMAV_FORK_SAFE=1 FI_EFA_FORK_SAFE=1 (if the application forks)".into()),
        ),
    }
}

/// An EFA device, its driver version, and the libfabric that would drive it.
pub fn check_efa(sys: &System, rdma: &Rdma, libfabric: (u32, u32), efa_listed: bool) -> Check {
    let lf = format!("libfabric {}.{}", libfabric.0, libfabric.1);
    let efa: Vec<&RdmaDevice> = rdma.devices().iter().filter(|d| d.is_efa()).collect();
    if efa.is_empty() {
        let other: Vec<String> = rdma
            .devices()
            .iter()
            .map(|d| format!("{} ({})", d.name, d.driver.as_deref().unwrap_or("?")))
            .collect();
        return if other.is_empty() {
            check(
                "efa device",
                Status::Warn,
                format!("none; {lf}"),
                "no EFA device: fabric peers use IP (expected off EC2 or on instance types \
                 without EFA)",
                Some(
                    "on EC2: launch an EFA-capable instance type with an EFA interface \
                     (InterfaceType=efa) and install the EFA driver (aws-efa-installer)"
                        .into(),
                ),
            )
        } else {
            check(
                "efa device",
                Status::Pass,
                format!("none; {lf}; other RDMA: {}", other.join(", ")),
                "no EFA device; the fabric role uses verbs on the other RDMA device(s)",
                None,
            )
        };
    }
    let ver = sys
        .read("/sys/module/efa/version")
        .unwrap_or_else(|| "unknown".into());
    let names: Vec<&str> = efa.iter().map(|d| d.name.as_str()).collect();
    let value = format!("{}; efa driver {ver}; {lf}", names.join(", "));
    if !efa_listed {
        return check(
            "efa device",
            Status::Fail,
            value,
            "an EFA device is present but libfabric lists no efa provider",
            Some(
                "install the libfabric from the EFA installer (aws-efa-installer, \
                 /opt/amazon/efa) and put it first in LD_LIBRARY_PATH"
                    .into(),
            ),
        );
    }
    if libfabric < (1, 17) {
        return check(
            "efa device",
            Status::Warn,
            value,
            "libfabric older than 1.17",
            Some("update libfabric (aws-efa-installer)".into()),
        );
    }
    check(
        "efa device",
        Status::Pass,
        value,
        "present, efa provider listed",
        None,
    )
}

/// The text of the security-group rule EFA needs.
pub const SG_RULE: &str = "in the instances' security group add an inbound rule and an \
outbound rule allowing All traffic whose source (inbound) / destination (outbound) is the \
security group itself";

/// What the security-group probe found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SgProbe {
    /// No peers were given.
    NoPeers,
    /// This host has no fabric; the rule does not matter for it.
    NoFabric,
    /// Peers were read; `fabric_peers` would use the fabric with this host; `failed` lists
    /// those whose probe message was not acknowledged (with the error).
    Probed {
        /// Peers that would use the fabric.
        fabric_peers: Vec<String>,
        /// Peers that did not answer.
        failed: Vec<(String, String)>,
    },
    /// Peers were read but not probed (the probe was not asked for).
    NotProbed {
        /// Peers that would use the fabric.
        fabric_peers: Vec<String>,
    },
}

/// The EFA security-group requirement.
pub fn check_security_group(p: &SgProbe) -> Check {
    let name = "security group";
    match p {
        SgProbe::NoPeers => check(
            name,
            Status::Skip,
            "not probed (no peers given)",
            "EFA traffic needs a self-referencing allow-all rule; cloud settings cannot be \
             read from here. Give a running job's store (--store ADDR --world N --probe) to \
             probe",
            Some(SG_RULE.into()),
        ),
        SgProbe::NoFabric => check(
            name,
            Status::Skip,
            "not probed (this host has no fabric)",
            "the rule only matters for EFA traffic",
            Some(SG_RULE.into()),
        ),
        SgProbe::NotProbed { fabric_peers } => check(
            name,
            Status::Skip,
            format!(
                "{} peer(s) would use the fabric; not probed (add --probe)",
                fabric_peers.len()
            ),
            "if fabric transfers hang while IP works, the rule is missing",
            Some(SG_RULE.into()),
        ),
        SgProbe::Probed {
            fabric_peers,
            failed,
        } if failed.is_empty() => check(
            name,
            Status::Pass,
            format!("{} fabric peer(s) answered", fabric_peers.len()),
            "fabric messages to every peer were acknowledged",
            None,
        ),
        SgProbe::Probed {
            fabric_peers,
            failed,
        } => check(
            name,
            Status::Fail,
            format!(
                "{} of {} fabric peer(s) did not answer: {}",
                failed.len(),
                fabric_peers.len(),
                failed
                    .iter()
                    .map(|(p, e)| format!("{p} ({e})"))
                    .collect::<Vec<_>>()
                    .join("; ")
            ),
            "suspected security-group block: EFA needs a self-referencing allow-all rule",
            Some(SG_RULE.into()),
        ),
    }
}

/// MTU and state of the IP route's interface.
pub fn check_iface(sys: &System, ip: &IpIfaceChoice) -> Check {
    let Some(n) = &ip.name else {
        return check(
            "interface",
            Status::Warn,
            "none",
            format!("no interface for the IP route: {}", ip.why),
            Some("set EFA_IFACE to the interface that reaches the other hosts".into()),
        );
    };
    let name = format!("interface {n}");
    let base = format!("/sys/class/net/{n}");
    if !sys.exists(&base) {
        return check(
            &name,
            Status::Fail,
            format!("{base} missing"),
            format!("the IP route's interface ({}) does not exist", ip.why),
            Some("set EFA_IFACE (or FI_TCP_IFACE) to an existing interface: ip -br link".into()),
        );
    }
    let mtu: Option<u32> = sys
        .read(&format!("{base}/mtu"))
        .and_then(|s| s.parse().ok());
    let state = sys
        .read(&format!("{base}/operstate"))
        .unwrap_or_else(|| "unknown".into());
    let lo = n == "lo";
    let value = format!(
        "mtu {}, operstate {state} ({})",
        mtu.map_or("?".into(), |m| m.to_string()),
        ip.why
    );
    if state == "down" || state == "lowerlayerdown" || (state == "unknown" && !lo && mtu.is_none())
    {
        return check(
            &name,
            Status::Fail,
            value,
            "the IP route's interface is not up",
            Some(format!("ip link set dev {n} up")),
        );
    }
    match mtu {
        Some(m) if m < 1280 => check(
            &name,
            Status::Fail,
            value,
            "MTU below 1280: IPv6 and many TCP paths break",
            Some(format!("ip link set dev {n} mtu 1500")),
        ),
        Some(m) if m < 1500 => check(
            &name,
            Status::Pass,
            value,
            "up; MTU below 1500 means more packets per message (fine on tunnels and some \
             clouds; EC2 VPCs allow 9001)",
            None,
        ),
        _ => check(&name, Status::Pass, value, "up", None),
    }
}

/// Whether the process should exit non-zero.
pub fn any_fail(checks: &[Check]) -> bool {
    checks.iter().any(|c| c.status == Status::Fail)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::system::fake::Tree;
    use crate::system::scan_rdma;

    const UNLIMITED: Memlock = Memlock {
        soft: None,
        hard: None,
    };

    fn sys(t: &Tree) -> System {
        System::fake(t.path(), &[], UNLIMITED)
    }

    fn ip(name: &str) -> IpIfaceChoice {
        IpIfaceChoice {
            name: Some(name.into()),
            why: "test".into(),
            subnet: None,
        }
    }

    #[test]
    fn memlock_policy() {
        let m = |soft: Option<u64>, hard: Option<u64>| check_memlock(&Ok(Memlock { soft, hard }));
        let c = m(Some(64 << 10), Some(64 << 10));
        assert_eq!(c.status, Status::Fail);
        assert_eq!(c.value, "soft 64 KiB (64 KiB), hard 64 KiB (64 KiB)");
        let fix = c.fix.unwrap();
        assert!(fix.starts_with("the hard limit is low too"), "{fix}");
        assert!(fix.contains("* hard memlock unlimited") && fix.contains("LimitMEMLOCK=infinity"));
        let c = m(Some(8 << 20), None);
        assert_eq!(c.status, Status::Fail);
        assert!(c.fix.unwrap().starts_with("ulimit -l unlimited"));
        assert!(c.detail.contains("at least 64 MiB"), "{}", c.detail);
        assert_eq!(m(Some(64 << 20), None).status, Status::Warn);
        assert_eq!(m(Some(1 << 30), Some(1 << 30)).status, Status::Pass);
        let c = m(None, None);
        assert_eq!((c.status, c.fix), (Status::Pass, None));
        assert_eq!(check_memlock(&Err("x".into())).status, Status::Warn);
    }

    #[test]
    fn ptrace_scopes() {
        let t = Tree::new();
        let s = sys(&t);
        assert_eq!(check_ptrace(&s).status, Status::Pass);
        let p = "/proc/sys/kernel/yama/ptrace_scope";
        t.file(p, "0\n");
        assert_eq!(check_ptrace(&s).status, Status::Pass);
        t.file(p, "1\n");
        let c = check_ptrace(&s);
        assert_eq!(
            (c.status, c.value.as_str()),
            (Status::Warn, "ptrace_scope=1")
        );
        assert!(c
            .fix
            .unwrap()
            .starts_with("sysctl -w kernel.yama.ptrace_scope=0"));
        t.file(p, "2");
        assert!(check_ptrace(&s).fix.unwrap().contains("SYS_PTRACE"));
        t.file(p, "3");
        assert!(check_ptrace(&s).fix.unwrap().contains("reboot"));
    }

    #[test]
    fn hugepages() {
        let t = Tree::new();
        let s = sys(&t);
        assert_eq!(check_hugepages(&s, false).status, Status::Warn);
        t.file(
            "/proc/meminfo",
            "MemTotal: 1 kB\nHugePages_Total:       0\nHugePages_Free:        0\nHugepagesize:       2048 kB\n",
        );
        t.file(
            "/sys/kernel/mm/transparent_hugepage/enabled",
            "always [madvise] never",
        );
        let c = check_hugepages(&s, false);
        assert_eq!(c.status, Status::Pass);
        assert_eq!(
            c.value,
            "0 x 2048 kB, 0 free; transparent huge pages: madvise"
        );
        let c = check_hugepages(&s, true);
        assert_eq!(c.status, Status::Warn);
        assert!(c.fix.unwrap().starts_with("sysctl -w vm.nr_hugepages=2564"));
        t.file(
            "/proc/meminfo",
            "HugePages_Total:     100\nHugePages_Free:       90\nHugepagesize:       2048 kB\n",
        );
        assert_eq!(check_hugepages(&s, true).status, Status::Pass);
    }

    #[test]
    fn rdma_absent_rxe_active_and_down() {
        let t = Tree::new();
        let s = sys(&t);
        let c = check_rdma(&s, &scan_rdma(&s), "eth0");
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].status, Status::Warn);
        assert!(c[0]
            .fix
            .as_deref()
            .unwrap()
            .ends_with("rdma link add rxe0 type rxe netdev eth0"));
        t.rxe(
            "rxe0",
            "dummy0",
            "4: ACTIVE",
            &["0000:0000:0000:0000:0000:ffff:0a0a:0101"],
        );
        t.dir("/dev/infiniband/uverbs0");
        let c = check_rdma(&s, &scan_rdma(&s), "eth0");
        assert_eq!(c.len(), 2);
        assert_eq!(c[0].value, "rxe0");
        assert_eq!(c[1].check, "rdma rxe0");
        assert_eq!(c[1].status, Status::Pass, "{:?}", c[1]);
        assert_eq!(
            c[1].value,
            "driver rdma_rxe, netdev dummy0, port 1 4: ACTIVE, 1 GID(s)"
        );
        // No IPv4 GID.
        t.rxe(
            "rxe1",
            "dummy1",
            "4: ACTIVE",
            &["fe80:0000:0000:0000:0000:00ff:fe00:0001"],
        );
        let c = check_rdma(&s, &scan_rdma(&s), "eth0");
        assert_eq!(c[2].status, Status::Warn);
        assert_eq!(
            c[2].fix.as_deref(),
            Some("ip addr add ADDR/PREFIX dev dummy1")
        );
        // Port down.
        t.file("/sys/class/infiniband/rxe0/ports/1/state", "1: DOWN");
        let c = check_rdma(&s, &scan_rdma(&s), "eth0");
        assert_eq!(c[1].status, Status::Fail);
        assert!(c[1]
            .fix
            .as_deref()
            .unwrap()
            .starts_with("ip link set dev dummy0 up"));
    }

    #[test]
    fn rdma_without_device_files_fails() {
        let t = Tree::new();
        t.rxe(
            "rxe0",
            "eth0",
            "4: ACTIVE",
            &["0000:0000:0000:0000:0000:ffff:0a0a:0101"],
        );
        let s = sys(&t);
        let c = check_rdma(&s, &scan_rdma(&s), "eth0");
        assert_eq!(c[1].status, Status::Fail);
        assert!(c[1]
            .fix
            .as_deref()
            .unwrap()
            .contains("--device=/dev/infiniband/uverbs0"));
    }

    #[test]
    fn fork_safety() {
        let t = Tree::new();
        t.file("/proc/sys/kernel/osrelease", "4.14.300-1.amzn2");
        let s = sys(&t);
        assert_eq!(check_fork(&s, &scan_rdma(&s)).status, Status::Pass); // no device
        t.efa("efa_0", "ens5");
        let c = check_fork(&s, &scan_rdma(&s));
        assert_eq!(c.status, Status::Warn);
        assert!(c.fix.unwrap().contains("RDMAV_FORK_SAFE=1"));
        let s2 = System::fake(t.path(), &[("RDMAV_FORK_SAFE", "1")], UNLIMITED);
        let c = check_fork(&s2, &scan_rdma(&s2));
        assert_eq!(c.status, Status::Pass);
        assert!(c.value.contains("RDMAV_FORK_SAFE=1"));
        t.file("/proc/sys/kernel/osrelease", "6.1.0-56-amd64");
        assert_eq!(check_fork(&s, &scan_rdma(&s)).status, Status::Pass);
        assert_eq!(kernel_version("5.13.0"), Some((5, 13)));
        assert_eq!(kernel_version("x"), None);
    }

    #[test]
    fn efa_device() {
        let t = Tree::new();
        let s = sys(&t);
        let c = check_efa(&s, &scan_rdma(&s), (1, 17), false);
        assert_eq!(c.status, Status::Warn);
        assert_eq!(c.value, "none; libfabric 1.17");
        t.rxe("rxe0", "dummy0", "4: ACTIVE", &[]);
        let c = check_efa(&s, &scan_rdma(&s), (1, 17), false);
        assert_eq!(c.status, Status::Pass);
        assert!(c.value.contains("rxe0 (rdma_rxe)"), "{}", c.value);
        t.efa("rdmap0s6", "ens5");
        let c = check_efa(&s, &scan_rdma(&s), (1, 17), false);
        assert_eq!(c.status, Status::Fail);
        assert_eq!(c.value, "rdmap0s6; efa driver 2.10.0g; libfabric 1.17");
        assert_eq!(
            check_efa(&s, &scan_rdma(&s), (1, 17), true).status,
            Status::Pass
        );
        assert_eq!(
            check_efa(&s, &scan_rdma(&s), (1, 9), true).status,
            Status::Warn
        );
    }

    #[test]
    fn security_group() {
        let c = check_security_group(&SgProbe::NoPeers);
        assert_eq!(
            (c.status, c.value.as_str()),
            (Status::Skip, "not probed (no peers given)")
        );
        assert!(c.fix.unwrap().contains("security group itself"));
        let c = check_security_group(&SgProbe::Probed {
            fabric_peers: vec!["rank 1".into(), "rank 2".into()],
            failed: vec![("rank 2".into(), "timed out after 5s".into())],
        });
        assert_eq!(c.status, Status::Fail);
        assert_eq!(
            c.value,
            "1 of 2 fabric peer(s) did not answer: rank 2 (timed out after 5s)"
        );
        assert!(c.detail.starts_with("suspected security-group block"));
        let ok = SgProbe::Probed {
            fabric_peers: vec!["rank 1".into()],
            failed: vec![],
        };
        assert_eq!(check_security_group(&ok).status, Status::Pass);
    }

    #[test]
    fn interface_state_and_mtu() {
        let t = Tree::new();
        let s = sys(&t);
        assert_eq!(check_iface(&s, &ip("eth0")).status, Status::Fail);
        t.file("/sys/class/net/eth0/mtu", "1500");
        t.file("/sys/class/net/eth0/operstate", "up");
        let c = check_iface(&s, &ip("eth0"));
        assert_eq!(
            (c.status, c.value.as_str()),
            (Status::Pass, "mtu 1500, operstate up (test)")
        );
        t.file("/sys/class/net/eth0/operstate", "down");
        let c = check_iface(&s, &ip("eth0"));
        assert_eq!(c.status, Status::Fail);
        assert_eq!(c.fix.as_deref(), Some("ip link set dev eth0 up"));
        t.file("/sys/class/net/eth0/operstate", "up");
        t.file("/sys/class/net/eth0/mtu", "1400");
        assert_eq!(check_iface(&s, &ip("eth0")).status, Status::Pass);
        t.file("/sys/class/net/eth0/mtu", "576");
        assert_eq!(check_iface(&s, &ip("eth0")).status, Status::Fail);
        t.file("/sys/class/net/lo/mtu", "65536");
        t.file("/sys/class/net/lo/operstate", "unknown");
        assert_eq!(check_iface(&s, &ip("lo")).status, Status::Pass);
    }

    #[test]
    fn exit_status_follows_fails() {
        let pass = check_memlock(&Ok(UNLIMITED));
        let fail = check_memlock(&Ok(Memlock {
            soft: Some(0),
            hard: Some(0),
        }));
        assert!(!any_fail(&[
            pass.clone(),
            check_security_group(&SgProbe::NoPeers)
        ]));
        assert!(any_fail(&[pass, fail]));
    }
}

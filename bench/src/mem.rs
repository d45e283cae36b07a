//! `efa-bench rss`: resident memory per rank of an idle job, once right after the
//! communicator is built and once more after some traffic, with a breakdown of where it is
//! (from `/proc/self/smaps`), so that the memory target (issue 13: idle RSS per rank
//! ≤ 32 MiB) is measured rather than guessed.
//!
//! Categories, by mapping (each mapping's `Rss`, in KiB):
//! - `heap`: `[heap]`, glibc's main arena (small allocations, and the posted receive slots
//!   of the communicator, which are malloc'd);
//! - `stacks`: `[stack]` and every anonymous mapping that directly follows a no-access
//!   guard mapping of at most 1 MiB (glibc's thread stacks, the progress threads' and
//!   tokio's among them);
//! - `shm`: files in `/dev/shm` (the libfabric shm provider's region of each endpoint,
//!   counted fully in every process that touched it);
//! - `anon`: every other anonymous mapping (glibc's per-thread arenas, large buffers that
//!   malloc served with mmap, the rendezvous buffer pool);
//! - `files`: the executable and shared libraries (only their touched pages).
//!
//! `VmRSS` is from `/proc/self/status`; `threads` from its `Threads` line.

use std::io::Write;
use std::time::Duration;

use efa_core::{Communicator, ReduceOp};
use serde::{Deserialize, Serialize};

use crate::opts::RssArgs;
use crate::{err, Result};

/// Resident memory of this process, in KiB.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Rss {
    pub vm_rss: u64,
    pub heap: u64,
    pub stacks: u64,
    pub shm: u64,
    pub anon: u64,
    pub files: u64,
    pub threads: u64,
}

impl Rss {
    const FIELDS: usize = 7;

    fn to_array(self) -> [u64; Self::FIELDS] {
        [
            self.vm_rss,
            self.heap,
            self.stacks,
            self.shm,
            self.anon,
            self.files,
            self.threads,
        ]
    }

    fn from_array(a: &[u64]) -> Rss {
        Rss {
            vm_rss: a[0],
            heap: a[1],
            stacks: a[2],
            shm: a[3],
            anon: a[4],
            files: a[5],
            threads: a[6],
        }
    }
}

/// One mapping of `/proc/self/smaps`.
#[derive(Debug, Default)]
struct Mapping {
    start: u64,
    end: u64,
    perms: String,
    path: String,
    rss_kib: u64,
}

fn parse_smaps(text: &str) -> Vec<Mapping> {
    let mut v: Vec<Mapping> = Vec::new();
    for line in text.lines() {
        let mut f = line.split_whitespace();
        let Some(first) = f.next() else { continue };
        if let Some((a, b)) = first.split_once('-') {
            if let (Ok(start), Ok(end)) = (u64::from_str_radix(a, 16), u64::from_str_radix(b, 16)) {
                let perms = f.next().unwrap_or("").to_string();
                let path = f.nth(3).unwrap_or("").to_string();
                v.push(Mapping {
                    start,
                    end,
                    perms,
                    path,
                    rss_kib: 0,
                });
                continue;
            }
        }
        if first == "Rss:" {
            if let (Some(m), Some(n)) = (v.last_mut(), f.next().and_then(|x| x.parse().ok())) {
                m.rss_kib = n;
            }
        }
    }
    v
}

/// Sorts the mappings of an smaps text into the categories of the module docs.
fn classify(smaps: &str, status: &str) -> Rss {
    let maps = parse_smaps(smaps);
    let mut r = Rss::default();
    for (i, m) in maps.iter().enumerate() {
        let guard_before = i > 0 && {
            let p = &maps[i - 1];
            p.end == m.start && p.perms.starts_with("---") && p.end - p.start <= 1 << 20
        };
        let slot = if m.path == "[heap]" {
            &mut r.heap
        } else if m.path == "[stack]" || (m.path.is_empty() && guard_before) {
            &mut r.stacks
        } else if m.path.starts_with("/dev/shm/") {
            &mut r.shm
        } else if m.path.is_empty() || m.path.starts_with('[') {
            &mut r.anon
        } else {
            &mut r.files
        };
        *slot += m.rss_kib;
    }
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    };
    r.vm_rss = field("VmRSS:");
    r.threads = field("Threads:");
    r
}

/// This process's resident memory now.
pub fn measure() -> Result<Rss> {
    let smaps = std::fs::read_to_string("/proc/self/smaps")
        .map_err(|e| err(format!("cannot read /proc/self/smaps: {e}")))?;
    let status = std::fs::read_to_string("/proc/self/status")
        .map_err(|e| err(format!("cannot read /proc/self/status: {e}")))?;
    Ok(classify(&smaps, &status))
}

/// One `--json` line: one rank in one phase.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RssRecord {
    pub bench: String,
    pub phase: String,
    pub rank: u32,
    pub nranks: u32,
    /// Transport to the next rank.
    pub route: String,
    #[serde(flatten)]
    pub rss: Rss,
    pub git_rev: String,
}

/// Every rank sends to the next and receives from the previous, at sizes from eager to
/// rendezvous, then all reduce 1 MiB: what a small program does in its first steps.
fn traffic(comm: &Communicator) -> Result<()> {
    let n = comm.size();
    let me = comm.rank();
    if n > 1 {
        let (next, prev) = ((me + 1) % n, (me + n - 1) % n);
        for size in [8usize, 4096, 65536, 1 << 20, 4 << 20] {
            let s = vec![me as u8; size];
            let mut r = vec![0u8; size];
            for _ in 0..4 {
                let req = comm.isend(&s, next, 7)?;
                comm.recv(&mut r, prev, 7)?;
                req.wait()?;
            }
        }
    }
    let mut v = vec![1.0f32; 1 << 18];
    comm.allreduce(&mut v, ReduceOp::Sum)?;
    comm.barrier()?;
    Ok(())
}

/// Runs as one rank: measure after init, after traffic (then idle for `--idle` seconds);
/// rank 0 prints every rank's numbers.
pub fn run_rank(a: &RssArgs) -> Result<()> {
    let comm = crate::job::join(a.timeout, None)?;
    let n = comm.size();
    let me = comm.rank();
    let route = if n > 1 {
        let t = comm.route((me + 1) % n)?.transport;
        format!("{t}/{}", comm.provider(t).unwrap_or("?"))
    } else {
        "self".into()
    };
    comm.barrier()?;
    let mut rows: Vec<(&str, Vec<u64>)> = Vec::new();
    for phase in ["init", "traffic"] {
        if phase == "traffic" {
            traffic(&comm)?;
        }
        std::thread::sleep(Duration::from_secs_f64(a.idle));
        let mine = measure()?.to_array();
        let mut all = vec![0u64; Rss::FIELDS * n as usize];
        comm.allgather_into(&mine, &mut all)?;
        rows.push((phase, all));
    }
    if me == 0 {
        let mut out = std::io::stdout().lock();
        if !a.json {
            writeln!(
                out,
                "# efa-bench rss: resident KiB per rank ({n} ranks, route to next rank: {route})"
            )?;
            writeln!(
                out,
                "# {:<8} {:>4} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>7}",
                "phase", "rank", "VmRSS", "heap", "stacks", "shm", "anon", "files", "threads"
            )?;
        }
        for (phase, all) in &rows {
            for (r, chunk) in all.chunks(Rss::FIELDS).enumerate() {
                let x = Rss::from_array(chunk);
                if a.json {
                    let rec = RssRecord {
                        bench: "rss".into(),
                        phase: phase.to_string(),
                        rank: r as u32,
                        nranks: n,
                        route: route.clone(),
                        rss: x,
                        git_rev: env!("EFA_BENCH_GIT_REV").into(),
                    };
                    writeln!(out, "{}", serde_json::to_string(&rec)?)?;
                } else {
                    writeln!(
                        out,
                        "  {:<8} {:>4} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>7}",
                        phase, r, x.vm_rss, x.heap, x.stacks, x.shm, x.anon, x.files, x.threads
                    )?;
                }
            }
        }
        out.flush()?;
    }
    comm.barrier()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMAPS: &str = "\
55d0c0000000-55d0c0100000 r-xp 00000000 08:01 123 /usr/bin/prog
Rss:                 400 kB
55d0c1000000-55d0c1200000 rw-p 00000000 00:00 0 [heap]
Rss:                1000 kB
7f0000000000-7f0000001000 ---p 00000000 00:00 0
Rss:                   0 kB
7f0000001000-7f0000801000 rw-p 00000000 00:00 0
Rss:                  20 kB
7f0001000000-7f0002000000 rw-p 00000000 00:00 0
Rss:                 300 kB
7f0003000000-7f0004000000 rw-s 00000000 00:05 77 /dev/shm/efa-1-2-3-4-5
Rss:                5000 kB
7ffd00000000-7ffd00021000 rw-p 00000000 00:00 0 [stack]
Rss:                  12 kB
";

    #[test]
    fn smaps_categories() {
        let r = classify(SMAPS, "Name:\tx\nVmRSS:\t   6800 kB\nThreads:\t3\n");
        assert_eq!(
            r,
            Rss {
                vm_rss: 6800,
                heap: 1000,
                stacks: 32,
                shm: 5000,
                anon: 300,
                files: 400,
                threads: 3,
            }
        );
        assert_eq!(Rss::from_array(&r.to_array()), r);
        let me = measure().unwrap();
        assert!(me.vm_rss > 0 && me.threads >= 1 && me.files > 0, "{me:?}");
    }
}

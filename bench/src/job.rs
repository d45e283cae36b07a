//! The job a communicator benchmark (collectives, OSU, rss) runs in: under a launcher every
//! process is one rank and joins with [`join`]; without one, [`spawn_local`] starts the ranks
//! on this host. [`run`] is that choice, made in one place for every such benchmark.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use efa_core::Communicator;

use crate::{err, Result};

/// True when this process is one rank of a launched job: asks the communicator's own
/// launcher detection ([`efa_core::bootstrap::detected_launcher`]), so that the benchmark
/// and the communicator never disagree (a bare `RANK`/`WORLD_SIZE`/`MASTER_ADDR`
/// environment, as Kubernetes training operators set it, is a job too).
fn under_launcher() -> bool {
    efa_core::bootstrap::detected_launcher() != efa_core::bootstrap::Launcher::Singleton
}

/// Runs `rank` when this process is one rank of a launched job, else starts `n` ranks of
/// this program on this host ([`spawn_local`]), each of which then runs `rank`.
pub fn run(n: usize, rank: impl FnOnce() -> Result<()>) -> Result<()> {
    if under_launcher() {
        rank()
    } else {
        spawn_local(n)
    }
}

/// Builds this rank's communicator, with `timeout` seconds for every blocking call when
/// given (else the communicator's default: `EFA_TIMEOUT`, else 60), and `flows` flows per
/// peer on the IP route when given (else `EFA_IP_FLOWS`, else 1).
pub fn join(timeout: Option<f64>, flows: Option<usize>) -> Result<Communicator> {
    let mut b = Communicator::builder();
    if let Some(t) = timeout {
        b = b.timeout(Duration::from_secs_f64(t));
    }
    if let Some(k) = flows {
        let mut s = efa_core::comm::stripe::FlowSettings::from_env()
            .map_err(|e| err(format!("cannot join the job: {e}")))?;
        s.flows = Some(k);
        b = b.ip_flows(s);
    }
    b.build()
        .map_err(|e| err(format!("cannot join the job: {e}")))
}

/// Kills the ranks still running when dropped (after a failure), then reaps them all.
struct Ranks(Vec<Child>);

impl Drop for Ranks {
    fn drop(&mut self) {
        for c in &mut self.0 {
            if matches!(c.try_wait(), Ok(None)) {
                let _ = c.kill();
            }
            let _ = c.wait();
        }
    }
}

/// Starts `n` ranks of this program on this host, as `efarun -n N` would (`EFA_RANK`,
/// `EFA_WORLD_SIZE`, `EFA_LOCAL_RANK`, `EFA_LOCAL_SIZE`, `EFA_STORE=file:///tmp/...`), with
/// their output forwarded, and waits. When one rank fails the others get a few seconds to
/// report their own view of the failure, then are killed.
fn spawn_local(n: usize) -> Result<()> {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let dir =
        std::env::temp_dir().join(format!("efa-bench-store-{}-{nanos:x}", std::process::id()));
    std::fs::create_dir_all(&dir)
        .map_err(|e| err(format!("cannot create the store {}: {e}", dir.display())))?;
    let store = format!("file://{}", dir.display());
    let exe = std::env::current_exe()?;
    let args: Vec<_> = std::env::args_os().skip(1).collect();
    let result = (|| {
        let mut ranks = Ranks(Vec::with_capacity(n));
        for r in 0..n {
            let child = Command::new(&exe)
                .args(&args)
                .env("EFA_RANK", r.to_string())
                .env("EFA_WORLD_SIZE", n.to_string())
                .env("EFA_LOCAL_RANK", r.to_string())
                .env("EFA_LOCAL_SIZE", n.to_string())
                .env("EFA_STORE", &store)
                .stdin(Stdio::null())
                .stdout(Stdio::inherit())
                .stderr(Stdio::inherit())
                .spawn()
                .map_err(|e| err(format!("cannot start rank {r}: {e}")))?;
            ranks.0.push(child);
        }
        let mut done = vec![false; n];
        let mut failed: Option<(usize, std::process::ExitStatus, Instant)> = None;
        loop {
            for (r, c) in ranks.0.iter_mut().enumerate() {
                if done[r] {
                    continue;
                }
                if let Some(st) = c.try_wait()? {
                    done[r] = true;
                    if !st.success() && failed.is_none() {
                        failed = Some((r, st, Instant::now()));
                    }
                }
            }
            if done.iter().all(|&d| d) {
                break;
            }
            if let Some((_, _, at)) = failed {
                if at.elapsed() > Duration::from_secs(5) {
                    break; // Ranks::drop kills the rest.
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        match failed {
            Some((r, st, _)) => Err(err(format!("rank {r} of {n} failed ({st})"))),
            None => Ok(()),
        }
    })();
    let _ = std::fs::remove_dir_all(&dir);
    result
}

//! The host as `efa info` and `efa doctor` see it: files under a root (normally `/`),
//! environment variables and the memlock limit. Everything is injectable so that the checks
//! can be tested against fake `/proc` and `/sys` trees and fake limits.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// `RLIMIT_MEMLOCK`, in bytes; `None` means unlimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Memlock {
    /// Soft limit (what `ulimit -l` shows, times 1024).
    pub soft: Option<u64>,
    /// Hard limit.
    pub hard: Option<u64>,
}

/// Where readings come from.
#[derive(Debug, Clone)]
pub struct System {
    /// Prefix for every absolute path read (`/` on the live system).
    pub root: PathBuf,
    /// `None`: the process environment; `Some`: exactly these variables.
    pub env: Option<BTreeMap<String, String>>,
    /// `None`: ask the kernel; `Some`: this value (`Err` text if it could not be read).
    pub memlock: Option<Result<Memlock, String>>,
}

impl System {
    /// The running host.
    pub fn live() -> Self {
        System {
            root: PathBuf::from("/"),
            env: None,
            memlock: None,
        }
    }

    /// A fake host rooted at `root` with the given environment and limit.
    #[cfg(test)]
    pub fn fake(root: &Path, env: &[(&str, &str)], memlock: Memlock) -> Self {
        System {
            root: root.to_path_buf(),
            env: Some(
                env.iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            ),
            memlock: Some(Ok(memlock)),
        }
    }

    fn path(&self, p: &str) -> PathBuf {
        self.root.join(p.trim_start_matches('/'))
    }

    /// A file's contents, trimmed; `None` if it cannot be read.
    pub fn read(&self, p: &str) -> Option<String> {
        std::fs::read_to_string(self.path(p))
            .ok()
            .map(|s| s.trim().to_string())
    }

    /// Whether the path exists.
    pub fn exists(&self, p: &str) -> bool {
        self.path(p).exists()
    }

    /// Names in a directory, sorted; `None` if it is not a readable directory.
    pub fn list(&self, p: &str) -> Option<Vec<String>> {
        let mut v: Vec<String> = std::fs::read_dir(self.path(p))
            .ok()?
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        Some(v)
    }

    /// The last component of a symlink's target (a driver name, say).
    pub fn link_name(&self, p: &str) -> Option<String> {
        let t = std::fs::read_link(self.path(p)).ok()?;
        Path::new(&t)
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
    }

    /// An environment variable; empty values count as unset.
    pub fn env(&self, key: &str) -> Option<String> {
        let v = match &self.env {
            Some(m) => m.get(key).cloned(),
            None => std::env::var(key).ok(),
        };
        v.filter(|s| !s.trim().is_empty())
    }

    /// The memlock limit.
    pub fn memlock(&self) -> Result<Memlock, String> {
        if let Some(m) = &self.memlock {
            return m.clone();
        }
        use nix::sys::resource::{getrlimit, Resource};
        let (soft, hard) = getrlimit(Resource::RLIMIT_MEMLOCK)
            .map_err(|e| format!("getrlimit(RLIMIT_MEMLOCK): {e}"))?;
        let conv = |v: u64| (v != nix::libc::RLIM_INFINITY).then_some(v);
        Ok(Memlock {
            soft: conv(soft),
            hard: conv(hard),
        })
    }
}

/// One RDMA device under `/sys/class/infiniband`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct RdmaDevice {
    /// Device name (`rxe0`, `efa_0`, `mlx5_0`).
    pub name: String,
    /// Kernel driver (`rdma_rxe`, `efa`, `mlx5_core`), if known.
    pub driver: Option<String>,
    /// Port states as the kernel words them (`4: ACTIVE`), by port number.
    pub ports: Vec<(String, String)>,
    /// The network interface behind the device, if any.
    pub netdev: Option<String>,
    /// Non-zero GIDs of port 1.
    pub gids: Vec<String>,
}

impl RdmaDevice {
    /// Whether any port is ACTIVE.
    pub fn active(&self) -> bool {
        self.ports.iter().any(|(_, s)| s.contains("ACTIVE"))
    }

    /// Whether this is an EFA device.
    pub fn is_efa(&self) -> bool {
        self.driver.as_deref() == Some("efa")
    }

    /// Whether port 1 has an IPv4-mapped GID (RoCEv2 over IPv4 needs one).
    pub fn has_ipv4_gid(&self) -> bool {
        self.gids.iter().any(|g| is_ipv4_gid(g))
    }
}

/// `0000:0000:0000:0000:0000:ffff:0a0a:0101` is the IPv4-mapped GID of 10.10.1.1.
pub fn is_ipv4_gid(g: &str) -> bool {
    let g = g.to_ascii_lowercase();
    g.starts_with("0000:0000:0000:0000:0000:ffff:")
}

/// What `/sys/class/infiniband` holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rdma {
    /// The directory does not exist: no RDMA core in the kernel, or no device ever.
    Missing,
    /// The directory exists and is empty.
    Empty,
    /// These devices.
    Devices(Vec<RdmaDevice>),
}

impl Rdma {
    /// The devices (empty unless [`Rdma::Devices`]).
    pub fn devices(&self) -> &[RdmaDevice] {
        match self {
            Rdma::Devices(d) => d,
            _ => &[],
        }
    }
}

/// Scans `/sys/class/infiniband`.
pub fn scan_rdma(sys: &System) -> Rdma {
    const DIR: &str = "/sys/class/infiniband";
    let Some(names) = sys.list(DIR) else {
        return Rdma::Missing;
    };
    if names.is_empty() {
        return Rdma::Empty;
    }
    let devs = names
        .into_iter()
        .map(|name| {
            let d = format!("{DIR}/{name}");
            let driver = sys.link_name(&format!("{d}/device/driver")).or_else(|| {
                if name.starts_with("rxe") || sys.exists(&format!("{d}/parent")) {
                    Some("rdma_rxe".into())
                } else if name.starts_with("efa") {
                    Some("efa".into())
                } else {
                    None
                }
            });
            let ports = sys
                .list(&format!("{d}/ports"))
                .unwrap_or_default()
                .into_iter()
                .map(|p| {
                    let st = sys
                        .read(&format!("{d}/ports/{p}/state"))
                        .unwrap_or_else(|| "unknown".into());
                    (p, st)
                })
                .collect();
            // The communicator's rule (GID 0's netdev, the PCI device's net, rxe's parent).
            let netdev = efa_core::net::netdev_of_rdma_device(&sys.path("/sys"), &name);
            let mut gids: Vec<(u32, String)> = sys
                .list(&format!("{d}/ports/1/gids"))
                .unwrap_or_default()
                .into_iter()
                .filter_map(|i| {
                    let g = sys.read(&format!("{d}/ports/1/gids/{i}"))?;
                    let zero = g.chars().all(|c| c == '0' || c == ':');
                    (!zero).then(|| (i.parse().unwrap_or(u32::MAX), g))
                })
                .collect();
            gids.sort();
            RdmaDevice {
                name,
                driver,
                ports,
                netdev,
                gids: gids.into_iter().map(|(_, g)| g).collect(),
            }
        })
        .collect();
    Rdma::Devices(devs)
}

#[cfg(test)]
pub mod fake {
    //! Fake `/proc` and `/sys` trees in a temporary directory.

    use std::path::{Path, PathBuf};
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A temporary directory removed on drop.
    #[derive(Debug)]
    pub struct Tree(pub PathBuf);

    impl Tree {
        pub fn new() -> Self {
            static N: AtomicUsize = AtomicUsize::new(0);
            let p = std::env::temp_dir().join(format!(
                "efa-cli-test-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            let _ = std::fs::remove_dir_all(&p);
            std::fs::create_dir_all(&p).unwrap();
            Tree(p)
        }

        pub fn file(&self, p: &str, contents: &str) -> &Self {
            let f = self.0.join(p.trim_start_matches('/'));
            std::fs::create_dir_all(f.parent().unwrap()).unwrap();
            std::fs::write(f, contents).unwrap();
            self
        }

        pub fn dir(&self, p: &str) -> &Self {
            std::fs::create_dir_all(self.0.join(p.trim_start_matches('/'))).unwrap();
            self
        }

        pub fn link(&self, p: &str, target: &str) -> &Self {
            let f = self.0.join(p.trim_start_matches('/'));
            std::fs::create_dir_all(f.parent().unwrap()).unwrap();
            std::os::unix::fs::symlink(target, f).unwrap();
            self
        }

        /// An rxe device on `netdev` whose port 1 is in `state`, with the given GIDs.
        pub fn rxe(&self, name: &str, netdev: &str, state: &str, gids: &[&str]) -> &Self {
            let d = format!("/sys/class/infiniband/{name}");
            self.file(&format!("{d}/parent"), netdev);
            self.file(&format!("{d}/ports/1/state"), state);
            self.file(&format!("{d}/ports/1/gid_attrs/ndevs/0"), netdev);
            for (i, g) in gids.iter().enumerate() {
                self.file(&format!("{d}/ports/1/gids/{i}"), g);
            }
            self.file(
                &format!("{d}/ports/1/gids/{}", gids.len()),
                "0000:0000:0000:0000:0000:0000:0000:0000",
            );
            self
        }

        /// An EFA device with an `efa` driver link and an ACTIVE port.
        pub fn efa(&self, name: &str, netdev: &str) -> &Self {
            let d = format!("/sys/class/infiniband/{name}");
            self.file(&format!("{d}/ports/1/state"), "4: ACTIVE");
            self.link(
                &format!("{d}/device/driver"),
                "../../../../bus/pci/drivers/efa",
            );
            self.dir(&format!("{d}/device/net/{netdev}"));
            self.file("/sys/module/efa/version", "2.10.0g");
            self.dir("/dev/infiniband/uverbs0");
            self
        }

        pub fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for Tree {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::fake::Tree;
    use super::*;

    const UNLIMITED: Memlock = Memlock {
        soft: None,
        hard: None,
    };

    #[test]
    fn rdma_missing_empty_and_rxe() {
        let t = Tree::new();
        let sys = System::fake(t.path(), &[], UNLIMITED);
        assert_eq!(scan_rdma(&sys), Rdma::Missing);
        t.dir("/sys/class/infiniband");
        assert_eq!(scan_rdma(&sys), Rdma::Empty);
        t.rxe(
            "rxe0",
            "dummy0",
            "4: ACTIVE",
            &[
                "fe80:0000:0000:0000:0000:00ff:fe00:0001",
                "0000:0000:0000:0000:0000:ffff:0a0a:0101",
            ],
        );
        let r = scan_rdma(&sys);
        let d = &r.devices()[0];
        assert_eq!(d.name, "rxe0");
        assert_eq!(d.driver.as_deref(), Some("rdma_rxe"));
        assert_eq!(d.netdev.as_deref(), Some("dummy0"));
        assert!(d.active() && d.has_ipv4_gid() && !d.is_efa());
        assert_eq!(d.gids.len(), 2);
    }

    #[test]
    fn efa_device_driver_from_link() {
        let t = Tree::new();
        t.efa("rdmap0s6", "ens5");
        let sys = System::fake(t.path(), &[], UNLIMITED);
        let r = scan_rdma(&sys);
        let d = &r.devices()[0];
        assert!(d.is_efa(), "{d:?}");
        assert_eq!(d.netdev.as_deref(), Some("ens5"));
    }

    #[test]
    fn fake_env_and_limits() {
        let t = Tree::new();
        let sys = System::fake(t.path(), &[("A", "1"), ("E", " ")], UNLIMITED);
        assert_eq!(sys.env("A").as_deref(), Some("1"));
        assert_eq!(sys.env("E"), None);
        assert_eq!(sys.env("PATH"), None);
        assert_eq!(sys.memlock().unwrap(), UNLIMITED);
        assert!(System::live().memlock().is_ok());
    }
}

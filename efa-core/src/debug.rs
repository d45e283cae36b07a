//! Logging without code: `EFA_DEBUG`, in the spirit of `NCCL_DEBUG`.
//!
//! The library logs through [`tracing`], which prints nothing unless the application installs
//! a subscriber. Setting `EFA_DEBUG` makes the communicator install one itself when it is
//! built, so any program can be debugged without changing it:
//!
//! | Variable | Values | Meaning |
//! |---|---|---|
//! | `EFA_DEBUG` | `error`, `warn`, `info`, `debug`, `trace` (any case); `off` or empty: nothing | The most detailed level printed. `info`: bootstrap (launcher, rendezvous) and "communicator ready"; `debug`: also each provider and endpoint opened, the route to every peer and why, every failed fabric operation, and the algorithm of each allreduce (`coll`: size in bytes, chosen and configured algorithm); `trace`: also per-message events. |
//! | `EFA_DEBUG_SUBSYS` | comma-separated subsystems, or `^` followed by a list to exclude them; default `all` | Which parts log: `bootstrap`, `store` (the rendezvous store), `comm` (endpoints, routes, messages, failures), `coll` (collectives), `rma` (windows), `fabric` (`efa-fabric`: domains, endpoints, completions), `all`. |
//! | `EFA_DEBUG_FILE` | a path; `%h` becomes the host name, `%p` the process id, `%r` the rank, `%%` a `%` | Where the lines go instead of stderr. The file is created, or appended to. |
//!
//! Every line starts with who wrote it: `[efa rank 1 node7:4242] 12:03:44.512 DEBUG
//! efa_core::comm: route peer=0 transport=shm ...`. The rank is that of the communicator
//! this thread built last (the process's last one on other threads); it is read from the
//! launcher's environment, the same way bootstrap reads it, so it is known from the first
//! line on. `rank ?` means no launcher was recognised (bootstrap then fails and says why).
//!
//! # The rule with the application's own subscriber
//! The switch installs a subscriber only when `EFA_DEBUG` is set (and not `off`) **and** no
//! global subscriber exists yet. An application that installs its own (for example
//! `tracing_subscriber::fmt().init()`) must do so before building the communicator, as
//! usual; its filter then decides (`RUST_LOG=efa_core=debug,efa_fabric=debug` with an
//! `EnvFilter`), and `EFA_DEBUG` only prints a one-line note to stderr saying that it was
//! ignored. A subscriber set only for a scope (`tracing::subscriber::set_default`) is not
//! a global one: it keeps its scope, and the switch serves the other threads. With
//! `EFA_DEBUG` unset, the library never installs anything. The subscriber shows
//! only the targets `efa_core` and `efa_fabric`: the application's own events are left alone,
//! and the `log` crate's logger is not touched.
//!
//! # Bad values
//! A value outside the forms above is an [`Error::Setting`] from
//! [`CommunicatorBuilder::build`](crate::CommunicatorBuilder::build) naming the variable,
//! the value and the accepted forms, like every other `EFA_*` variable: a typo in a debug
//! switch should not silently leave the user without the log they asked for.

use std::cell::Cell;
use std::fmt::Write as _;
use std::io::Write as _;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

use tracing::level_filters::LevelFilter;
use tracing::{Event, Subscriber};
use tracing_subscriber::filter::Targets;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::Layer;

use crate::bootstrap::{self, Bootstrap};
use crate::error::{Error, Result, SettingError};

/// The accepted forms of `EFA_DEBUG`.
const LEVELS: &str = "error, warn, info, debug, trace (any case), or off";
/// The accepted forms of `EFA_DEBUG_SUBSYS`.
const SUBSYS_FORMS: &str = "a comma-separated list of bootstrap, store, comm, coll, rma, fabric, \
                            all; a leading ^ excludes the listed ones (e.g. ^store,fabric)";
/// The accepted forms of `EFA_DEBUG_FILE`.
const FILE_FORMS: &str = "a path to a file this process may create or append to; %h is \
                          replaced by the host name, %p by the process id, %r by the rank, %% by %";

/// Subsystem names and the `tracing` targets they cover.
const SUBSYSTEMS: &[(&str, &[&str])] = &[
    ("bootstrap", &["efa_core::bootstrap"]),
    ("store", &["efa_core::store"]),
    (
        "comm",
        &[
            "efa_core::comm",
            "efa_core::placement",
            "efa_core::net",
            "efa_core::wire",
            "efa_core::error",
        ],
    ),
    ("coll", &["efa_core::coll"]),
    ("rma", &["efa_core::window"]),
    ("fabric", &["efa_fabric"]),
    ("all", &["efa_core", "efa_fabric"]),
];

/// The rank shown by threads that did not build a communicator; -1 while unknown.
static PROCESS_RANK: AtomicI64 = AtomicI64::new(-1);

thread_local! {
    /// The rank of the communicator this thread built last.
    static THREAD_RANK: Cell<Option<u32>> = const { Cell::new(None) };
}

/// What happened the first time `EFA_DEBUG` was read: the switch is installed once per
/// process, and a bad value is reported by every build.
static INSTALLED: OnceLock<std::result::Result<(), SettingError>> = OnceLock::new();

/// The parsed settings.
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    /// The most detailed level shown.
    pub level: LevelFilter,
    /// Target filter built from the level and `EFA_DEBUG_SUBSYS`.
    pub targets: Targets,
    /// `EFA_DEBUG_FILE` with its substitutions done, if set.
    pub file: Option<String>,
}

/// Parses an `EFA_DEBUG` value. `None`: logging off.
pub(crate) fn parse_level(v: &str) -> std::result::Result<Option<LevelFilter>, SettingError> {
    let level = match v.trim().to_ascii_lowercase().as_str() {
        "" | "off" | "none" | "0" => return Ok(None),
        "error" => LevelFilter::ERROR,
        "warn" | "warning" => LevelFilter::WARN,
        "info" => LevelFilter::INFO,
        "debug" => LevelFilter::DEBUG,
        "trace" => LevelFilter::TRACE,
        _ => return Err(SettingError::env("EFA_DEBUG", v, "not a log level", LEVELS)),
    };
    Ok(Some(level))
}

/// Builds the target filter for `level` and an `EFA_DEBUG_SUBSYS` value.
pub(crate) fn parse_subsys(
    level: LevelFilter,
    v: Option<&str>,
) -> std::result::Result<Targets, SettingError> {
    let v = v.map(str::trim).unwrap_or("");
    let (exclude, list) = match v.strip_prefix('^') {
        Some(rest) => (true, rest),
        None => (false, v),
    };
    let mut chosen: Vec<&'static str> = Vec::new();
    for name in list.split(',').map(str::trim).filter(|n| !n.is_empty()) {
        let lower = name.to_ascii_lowercase();
        let Some((_, targets)) = SUBSYSTEMS.iter().find(|(n, _)| *n == lower) else {
            return Err(SettingError::env(
                "EFA_DEBUG_SUBSYS",
                v,
                format!("unknown subsystem `{name}`"),
                SUBSYS_FORMS,
            ));
        };
        chosen.extend_from_slice(targets);
    }
    if chosen.is_empty() && (exclude || !list.trim().is_empty()) {
        return Err(SettingError::env(
            "EFA_DEBUG_SUBSYS",
            v,
            "names no subsystem",
            SUBSYS_FORMS,
        ));
    }
    if exclude && chosen.contains(&"efa_core") {
        return Err(SettingError::env(
            "EFA_DEBUG_SUBSYS",
            v,
            "excludes every subsystem (unset EFA_DEBUG instead)",
            SUBSYS_FORMS,
        ));
    }
    // The switch's own line always shows.
    let mut t = Targets::new().with_target("efa_core::debug", level);
    if exclude || chosen.is_empty() {
        t = t
            .with_target("efa_core", level)
            .with_target("efa_fabric", level);
        if exclude {
            for target in chosen {
                t = t.with_target(target, LevelFilter::OFF);
            }
        }
    } else {
        for target in chosen {
            t = t.with_target(target, level);
        }
    }
    Ok(t)
}

/// Replaces `%h`, `%p`, `%r` and `%%` in an `EFA_DEBUG_FILE` value.
pub(crate) fn expand_file(
    v: &str,
    host: &str,
    pid: u32,
    rank: Option<u32>,
) -> std::result::Result<String, SettingError> {
    let mut out = String::new();
    let mut chars = v.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('h') => out.push_str(host),
            Some('p') => {
                let _ = write!(out, "{pid}");
            }
            Some('r') => match rank {
                Some(r) => {
                    let _ = write!(out, "{r}");
                }
                None => out.push_str("unknown"),
            },
            Some('%') => out.push('%'),
            other => {
                return Err(SettingError::env(
                    "EFA_DEBUG_FILE",
                    v,
                    match other {
                        Some(o) => format!("unknown substitution %{o}"),
                        None => "ends with a lone %".to_string(),
                    },
                    FILE_FORMS,
                ))
            }
        }
    }
    if out.trim().is_empty() {
        return Err(SettingError::env(
            "EFA_DEBUG_FILE",
            v,
            "the path is empty",
            FILE_FORMS,
        ));
    }
    Ok(out)
}

/// Reads `EFA_DEBUG`, `EFA_DEBUG_SUBSYS` and `EFA_DEBUG_FILE` through `get`. `None`: the
/// switch is off.
pub(crate) fn settings(
    get: &dyn Fn(&str) -> Option<String>,
    host: &str,
    pid: u32,
    rank: Option<u32>,
) -> std::result::Result<Option<Settings>, SettingError> {
    let Some(level) = get("EFA_DEBUG").map_or(Ok(None), |v| parse_level(&v))? else {
        return Ok(None);
    };
    let targets = parse_subsys(level, get("EFA_DEBUG_SUBSYS").as_deref())?;
    let file = get("EFA_DEBUG_FILE")
        .filter(|v| !v.is_empty())
        .map(|v| expand_file(&v, host, pid, rank))
        .transpose()?;
    Ok(Some(Settings {
        level,
        targets,
        file,
    }))
}

/// This host's name, for the line prefix and `%h`.
fn host_name() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "?".into())
}

/// The rank shown on this thread's lines.
fn current_rank() -> Option<u32> {
    THREAD_RANK
        .with(Cell::get)
        .or_else(|| u32::try_from(PROCESS_RANK.load(Ordering::Relaxed)).ok())
}

/// Installs the `EFA_DEBUG` subscriber if asked for and none exists, and records this
/// communicator's rank for the line prefix. Called once at the start of every
/// [`CommunicatorBuilder::build`](crate::CommunicatorBuilder::build), with the explicit
/// bootstrap if one was given (else the rank is read from the launcher's environment).
///
/// # Errors
/// [`Error::Setting`] for a bad `EFA_DEBUG`, `EFA_DEBUG_SUBSYS` or `EFA_DEBUG_FILE` (a file
/// that cannot be opened included).
pub(crate) fn init(explicit: Option<&Bootstrap>) -> Result<()> {
    let switched_on = std::env::var("EFA_DEBUG")
        .ok()
        .is_some_and(|v| !matches!(parse_level(&v), Ok(None)));
    let rank = match explicit {
        Some(b) => Some(b.rank()),
        // The launcher's variables, read as bootstrap reads them; only worth it if the rank
        // is shown.
        None if switched_on => bootstrap::detect(&|k| std::env::var(k).ok())
            .ok()
            .map(|b| b.rank()),
        None => None,
    };
    if let Some(r) = rank {
        THREAD_RANK.with(|c| c.set(Some(r)));
        PROCESS_RANK.store(i64::from(r), Ordering::Relaxed);
    }
    INSTALLED
        .get_or_init(|| install(rank))
        .clone()
        .map_err(Error::Setting)
}

/// Reads the settings and installs the subscriber (once per process).
fn install(rank: Option<u32>) -> std::result::Result<(), SettingError> {
    let host = host_name();
    let pid = std::process::id();
    let Some(s) = settings(&|k| std::env::var(k).ok(), &host, pid, rank)? else {
        return Ok(());
    };
    let prefix = Prefix { host, pid };
    if tracing::dispatcher::has_been_set() {
        note_ignored(&prefix);
        return Ok(());
    }
    let dispatch = match &s.file {
        None => dispatch(prefix.clone(), std::io::stderr, s.targets.clone()),
        Some(path) => {
            let f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|e| {
                    SettingError::env(
                        "EFA_DEBUG_FILE",
                        std::env::var("EFA_DEBUG_FILE").unwrap_or_default(),
                        format!("cannot open {path}: {e}"),
                        FILE_FORMS,
                    )
                })?;
            dispatch(prefix.clone(), Mutex::new(f), s.targets.clone())
        }
    };
    if tracing::dispatcher::set_global_default(dispatch).is_err() {
        // The application installed one between the check and here.
        note_ignored(&prefix);
        return Ok(());
    }
    tracing::info!(
        level = %s.level,
        subsystems = %std::env::var("EFA_DEBUG_SUBSYS").ok().filter(|v| !v.trim().is_empty()).unwrap_or_else(|| "all".into()),
        to = s.file.as_deref().unwrap_or("stderr"),
        "efa-rs {} debug log (EFA_DEBUG)",
        env!("CARGO_PKG_VERSION")
    );
    Ok(())
}

/// The subscriber: the prefixed format, written to `writer`, filtered by `targets`.
fn dispatch<W>(prefix: Prefix, writer: W, targets: Targets) -> tracing::Dispatch
where
    W: for<'w> tracing_subscriber::fmt::MakeWriter<'w> + Send + Sync + 'static,
{
    let layer = tracing_subscriber::fmt::layer()
        .with_ansi(false)
        .with_writer(writer)
        .event_format(prefix)
        .with_filter(targets);
    tracing::Dispatch::new(tracing_subscriber::registry().with(layer))
}

/// Tells the user that `EFA_DEBUG` had no effect, and why.
fn note_ignored(prefix: &Prefix) {
    let _ = writeln!(
        std::io::stderr(),
        "{} EFA_DEBUG is set but the application installed its own tracing subscriber, which \
         decides what is shown; enable the targets efa_core and efa_fabric in its filter \
         (e.g. RUST_LOG=efa_core=debug,efa_fabric=debug)",
        prefix.head()
    );
}

/// `[efa rank R host:pid]` and a UTC wall-clock time before every line.
#[derive(Clone)]
struct Prefix {
    host: String,
    pid: u32,
}

impl Prefix {
    fn head(&self) -> String {
        match current_rank() {
            Some(r) => format!("[efa rank {r} {}:{}]", self.host, self.pid),
            None => format!("[efa rank ? {}:{}]", self.host, self.pid),
        }
    }
}

impl<S, N> FormatEvent<S, N> for Prefix
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> std::fmt::Result {
        let meta = event.metadata();
        let since = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let day = since.as_secs() % 86_400;
        write!(
            writer,
            "{} {:02}:{:02}:{:02}.{:03} {:>5} {}: ",
            self.head(),
            day / 3600,
            day / 60 % 60,
            day % 60,
            since.subsec_millis(),
            meta.level(),
            meta.target()
        )?;
        ctx.field_format().format_fields(writer.by_ref(), event)?;
        writeln!(writer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let m: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| m.get(k).cloned()
    }

    #[test]
    fn levels() {
        assert_eq!(parse_level("debug").unwrap(), Some(LevelFilter::DEBUG));
        assert_eq!(parse_level(" INFO ").unwrap(), Some(LevelFilter::INFO));
        assert_eq!(parse_level("Trace").unwrap(), Some(LevelFilter::TRACE));
        assert_eq!(parse_level("warn").unwrap(), Some(LevelFilter::WARN));
        assert_eq!(parse_level("error").unwrap(), Some(LevelFilter::ERROR));
        assert_eq!(parse_level("").unwrap(), None);
        assert_eq!(parse_level("off").unwrap(), None);
        let e = parse_level("verbose").unwrap_err();
        assert_eq!(e.var(), Some("EFA_DEBUG"));
        assert_eq!(
            e.to_string(),
            "EFA_DEBUG=\"verbose\": not a log level; accepted: error, warn, info, debug, \
             trace (any case), or off"
        );
    }

    #[test]
    fn subsystems_filter_targets() {
        use tracing::Level;
        let t = parse_subsys(LevelFilter::DEBUG, None).unwrap();
        assert!(t.would_enable("efa_core::comm", &Level::DEBUG));
        assert!(t.would_enable("efa_fabric::cq", &Level::DEBUG));
        assert!(!t.would_enable("efa_core::comm", &Level::TRACE));
        assert!(!t.would_enable("my_app", &Level::ERROR));

        let t = parse_subsys(LevelFilter::DEBUG, Some("comm, Bootstrap")).unwrap();
        assert!(t.would_enable("efa_core::comm", &Level::DEBUG));
        assert!(t.would_enable("efa_core::placement", &Level::DEBUG));
        assert!(t.would_enable("efa_core::bootstrap", &Level::INFO));
        assert!(!t.would_enable("efa_core::store", &Level::WARN));
        assert!(!t.would_enable("efa_fabric::ep", &Level::WARN));
        assert!(t.would_enable("efa_core::debug", &Level::INFO));

        let t = parse_subsys(LevelFilter::INFO, Some("^store,fabric")).unwrap();
        assert!(t.would_enable("efa_core::comm", &Level::INFO));
        assert!(t.would_enable("efa_core::coll::schedule", &Level::INFO));
        assert!(!t.would_enable("efa_core::store", &Level::ERROR));
        assert!(!t.would_enable("efa_fabric::ep", &Level::ERROR));

        for bad in ["comm,ucx", "^all", ",", "^"] {
            let e = parse_subsys(LevelFilter::INFO, Some(bad)).unwrap_err();
            assert_eq!(e.var(), Some("EFA_DEBUG_SUBSYS"), "{bad}");
            assert!(
                e.to_string().contains("accepted: a comma-separated list"),
                "{e}"
            );
        }
        assert!(parse_subsys(LevelFilter::INFO, Some("comm,ucx"))
            .unwrap_err()
            .to_string()
            .contains("unknown subsystem `ucx`"));
    }

    #[test]
    fn file_substitutions() {
        assert_eq!(
            expand_file("/tmp/efa.%h.%p.%r.log", "node7", 42, Some(3)).unwrap(),
            "/tmp/efa.node7.42.3.log"
        );
        assert_eq!(
            expand_file("/tmp/a%%b-%r", "h", 1, None).unwrap(),
            "/tmp/a%b-unknown"
        );
        for bad in ["/tmp/x%q", "/tmp/x%", ""] {
            let e = expand_file(bad, "h", 1, None).unwrap_err();
            assert_eq!(e.var(), Some("EFA_DEBUG_FILE"), "{bad}");
            assert!(
                e.to_string().contains("%h is replaced by the host name"),
                "{e}"
            );
        }
    }

    #[test]
    fn settings_from_environment() {
        assert!(settings(&env(&[]), "h", 1, None).unwrap().is_none());
        assert!(settings(
            &env(&[("EFA_DEBUG", "off"), ("EFA_DEBUG_SUBSYS", "ucx")]),
            "h",
            1,
            None
        )
        .unwrap()
        .is_none());
        let s = settings(
            &env(&[("EFA_DEBUG", "debug"), ("EFA_DEBUG_FILE", "/tmp/d.%p")]),
            "h",
            7,
            Some(0),
        )
        .unwrap()
        .unwrap();
        assert_eq!(s.level, LevelFilter::DEBUG);
        assert_eq!(s.file.as_deref(), Some("/tmp/d.7"));
        let e = settings(&env(&[("EFA_DEBUG", "loud")]), "h", 1, None).unwrap_err();
        assert_eq!(e.var(), Some("EFA_DEBUG"));
    }
}

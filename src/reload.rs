//! Hot reload: watches the configuration file and swaps in a new table when the file
//! changes, the way Kubernetes, editors and `cat >` replace it.
//!
//! The watch covers the directory of the configured path and, when the path is a
//! symlink, the directory of its target, because a ConfigMap update renames a `..data`
//! symlink rather than writing the file. Events are debounced, a timer re-reads the file
//! as a backstop, and SIGHUP forces a reload. A file that cannot be read, parsed or
//! validated changes nothing: the table in force keeps serving.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use async_trait::async_trait;
use notify::{EventKind, RecursiveMode, Watcher};
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;

use crate::config::{self, Settings};
use crate::metrics::Metrics;
use crate::table::{NameList, Table, TableDiff};

/// How long the file must stay quiet after an event before it is read.
const DEBOUNCE: Duration = Duration::from_millis(150);
/// The maximum delay that a burst of events can cause before a read.
const MAX_DEBOUNCE: Duration = Duration::from_secs(2);

/// The event that started a reload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Trigger {
    Watch,
    Timer,
    Signal,
}

impl Trigger {
    fn as_str(self) -> &'static str {
        match self {
            Trigger::Watch => "watch",
            Trigger::Timer => "timer",
            Trigger::Signal => "signal",
        }
    }
}

/// The background service that keeps the table in step with the file.
pub struct Reloader {
    path: PathBuf,
    table: Arc<ArcSwap<Table>>,
    metrics: Arc<Metrics>,
    startup: Settings,
    /// The generation of the table in force: 1 at start, +1 per applied reload.
    generation: AtomicU64,
    versions: Mutex<Versions>,
}

/// The versions of the file that keygate has seen.
#[derive(Debug, Clone)]
struct Versions {
    /// The SHA-256 of the file behind the table in force.
    applied: [u8; 32],
    /// The last version that was rejected, so that the timer does not report it again.
    rejected: Option<Rejected>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Rejected {
    Content([u8; 32]),
    Unreadable(String),
}

/// The result of reading the file.
enum ReadOutcome {
    /// The file contains the version in force.
    Unchanged,
    /// The file contains the version that was last rejected.
    StillRejected,
    /// The file changed while it was read; the change event that follows reads it again.
    Changing,
    Unreadable(String),
    Invalid([u8; 32], Vec<String>),
    Valid([u8; 32], Box<config::Config>),
}

impl Reloader {
    /// Creates the service for the table loaded at start from a file with SHA-256 `digest`.
    pub fn new(
        path: PathBuf,
        digest: [u8; 32],
        table: Arc<ArcSwap<Table>>,
        metrics: Arc<Metrics>,
        startup: Settings,
    ) -> Self {
        metrics.record_table(&table.load(), 1, false);
        Self {
            path,
            table,
            metrics,
            startup,
            generation: AtomicU64::new(1),
            versions: Mutex::new(Versions {
                applied: digest,
                rejected: None,
            }),
        }
    }

    /// Reads the file and swaps in its table if it changed and is valid. SIGHUP reports a
    /// rejected version again, where the watcher and the timer stay quiet about it.
    async fn reload(&self, trigger: Trigger) {
        let started = std::time::Instant::now();
        let path = self.path.clone();
        let force = trigger == Trigger::Signal;
        let known = self
            .versions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let current = self.table.load_full();
        let read =
            tokio::task::spawn_blocking(move || read_new_version(&path, &known, force, &current))
                .await;
        let read = match read {
            Ok(read) => read,
            Err(join_error) => {
                tracing::error!(error = %join_error, "config reload task failed");
                return;
            }
        };
        let (digest, loaded) = match read {
            ReadOutcome::Valid(digest, loaded) => (digest, loaded),
            ReadOutcome::Unchanged => {
                self.log_unchanged(trigger);
                return;
            }
            ReadOutcome::StillRejected => return,
            ReadOutcome::Changing => {
                tracing::debug!(config.path = %self.path.display(), "config file changed while it was read");
                return;
            }
            ReadOutcome::Unreadable(problem) => {
                self.reject(trigger, Rejected::Unreadable(problem.clone()), &[problem]);
                return;
            }
            ReadOutcome::Invalid(digest, problems) => {
                self.reject(trigger, Rejected::Content(digest), &problems);
                return;
            }
        };
        if loaded.settings != self.startup {
            tracing::warn!(
                config.path = %self.path.display(),
                changed = %changed_settings(&self.startup, &loaded.settings),
                "settings changed that take effect only after a restart; the table is reloaded and the rest is kept as it was",
            );
        }
        let loaded = *loaded;
        let table = Arc::new(loaded.table);
        // The difference is computed after the swap, because on a large table it takes a
        // while and requests would wait for the new table meanwhile.
        let previous = self.table.swap(Arc::clone(&table));
        let duration = started.elapsed();
        let diff = TableDiff::between(&previous, &table);
        drop(previous);
        *self.versions.lock().unwrap_or_else(|e| e.into_inner()) = Versions {
            applied: digest,
            rejected: None,
        };
        let generation = self.generation.fetch_add(1, Ordering::Relaxed) + 1;
        self.metrics.record_table(&table, generation, true);
        tracing::info!(
            config.path = %self.path.display(),
            config.sha256 = %hex(&digest),
            config.generation = generation,
            reload.trigger = trigger.as_str(),
            reload.duration_ms = duration.as_millis() as u64,
            campaigns.added = %NameList(&diff.campaigns_added),
            campaigns.removed = %NameList(&diff.campaigns_removed),
            campaigns.changed = %NameList(&diff.campaigns_changed),
            keys.added = %NameList(&diff.keys_added),
            keys.removed = %NameList(&diff.keys_removed),
            trusted_proxies.changed = diff.trusted_proxies_changed,
            "configuration reloaded",
        );
    }

    /// Counts and logs a rejected version, unless the same rejection was already reported.
    /// SIGHUP logs it again without counting it again.
    fn reject(&self, trigger: Trigger, rejected: Rejected, problems: &[String]) {
        let repeated = {
            let mut versions = self.versions.lock().unwrap_or_else(|e| e.into_inner());
            let repeated = versions.rejected.as_ref() == Some(&rejected);
            if repeated && trigger != Trigger::Signal {
                return;
            }
            versions.rejected = Some(rejected);
            repeated
        };
        // SIGHUP logs a rejected version again, but it is one rejection for the metric.
        if !repeated {
            self.metrics.record_rejected_reload();
        }
        for problem in problems {
            tracing::warn!(config.path = %self.path.display(), error = %problem, "config file problem");
        }
        tracing::warn!(
            config.path = %self.path.display(),
            reload.trigger = trigger.as_str(),
            config.generation = self.generation.load(Ordering::Relaxed),
            errors = problems.len(),
            "configuration rejected; the table in force keeps serving",
        );
    }

    /// Logs that the file contains the version in force, when that is news: after a
    /// rejected version, or on SIGHUP.
    fn log_unchanged(&self, trigger: Trigger) {
        let was_rejected = self
            .versions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .rejected
            .take()
            .is_some();
        if was_rejected || trigger == Trigger::Signal {
            tracing::info!(
                config.path = %self.path.display(),
                config.generation = self.generation.load(Ordering::Relaxed),
                reload.trigger = trigger.as_str(),
                "config file holds the configuration in force; nothing to reload",
            );
        }
    }

    /// Starts watching the directories that a change of the file can show up in.
    fn watch(&self, events: mpsc::UnboundedSender<()>) -> Option<Watch> {
        let names = Arc::new(Mutex::new(relevant_names(&self.path)));
        let handler_names = Arc::clone(&names);
        let handler = move |result: notify::Result<notify::Event>| match result {
            // Reading the file opens and closes it; those events are not changes.
            Ok(event) if matches!(event.kind, EventKind::Access(_)) => {}
            Ok(event) => {
                let names = handler_names.lock().unwrap_or_else(|e| e.into_inner());
                if event.paths.is_empty() || event.paths.iter().any(|p| is_relevant(p, &names)) {
                    // Sending fails only after the reload service stopped and dropped the
                    // receiver, and then no reload is needed.
                    let _ = events.send(());
                }
            }
            Err(error) => tracing::warn!(error = %error, "config file watch reported an error"),
        };
        match notify::recommended_watcher(handler) {
            Ok(watcher) => {
                let mut watch = Watch {
                    watcher,
                    directories: Vec::new(),
                    names,
                };
                watch.refresh(&self.path);
                Some(watch)
            }
            Err(error) => {
                tracing::warn!(
                    error = %error,
                    interval_seconds = self.startup.reload.interval.as_secs(),
                    "failed to watch the config file; it is re-read on the timer only",
                );
                None
            }
        }
    }
}

/// Returns the file names whose changes can change what the config path reads: its own
/// name and its resolved target's name. Names starting with `..` (the kubelet's
/// `..data` and version directories) are always relevant.
fn relevant_names(path: &Path) -> Vec<std::ffi::OsString> {
    let mut names: Vec<std::ffi::OsString> = path
        .file_name()
        .into_iter()
        .map(ToOwned::to_owned)
        .collect();
    if let Some(name) = std::fs::canonicalize(path)
        .ok()
        .and_then(|t| t.file_name().map(ToOwned::to_owned))
    {
        if !names.contains(&name) {
            names.push(name);
        }
    }
    names
}

/// Returns whether an event on `path` can change the configuration. Other files in the
/// same directory, such as logs, are ignored so that they cannot delay a reload.
fn is_relevant(path: &Path, names: &[std::ffi::OsString]) -> bool {
    match path.file_name() {
        Some(name) => name.as_encoded_bytes().starts_with(b"..") || names.iter().any(|n| n == name),
        None => true,
    }
}

#[async_trait]
impl BackgroundService for Reloader {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let (sender, mut events) = mpsc::unbounded_channel();
        let mut watch = self.watch(sender);
        let mut hangup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        {
            Ok(stream) => Some(stream),
            Err(error) => {
                tracing::warn!(error = %error, "failed to handle SIGHUP; reload on signal is off");
                None
            }
        };
        let interval = self.startup.reload.interval;
        let mut timer = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
        timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tracing::info!(
            config.path = %self.path.display(),
            interval_seconds = interval.as_secs(),
            watching = watch.is_some(),
            "config reload started",
        );

        loop {
            tokio::select! {
                _ = shutdown.changed() => break,
                Some(()) = events.recv() => {
                    debounce(&mut events).await;
                    self.reload(Trigger::Watch).await;
                    if let Some(watch) = watch.as_mut() {
                        watch.refresh(&self.path);
                    }
                }
                _ = timer.tick() => {
                    self.reload(Trigger::Timer).await;
                }
                Some(()) = recv_signal(&mut hangup) => {
                    tracing::info!("SIGHUP received; reloading the configuration");
                    self.reload(Trigger::Signal).await;
                }
            }
        }
        tracing::info!("config reload stopped");
    }
}

async fn recv_signal(signal: &mut Option<tokio::signal::unix::Signal>) -> Option<()> {
    match signal {
        Some(signal) => signal.recv().await,
        None => std::future::pending().await,
    }
}

/// Waits until no event has arrived for `DEBOUNCE`, or `MAX_DEBOUNCE` has passed.
async fn debounce(events: &mut mpsc::UnboundedReceiver<()>) {
    let deadline = Instant::now() + MAX_DEBOUNCE;
    while Instant::now() < deadline {
        match tokio::time::timeout(DEBOUNCE, events.recv()).await {
            Ok(Some(())) => continue,
            Ok(None) | Err(_) => break,
        }
    }
}

/// The notify watcher, the directories it watches and the file names it reports.
struct Watch {
    watcher: notify::RecommendedWatcher,
    directories: Vec<PathBuf>,
    names: Arc<Mutex<Vec<std::ffi::OsString>>>,
}

impl Watch {
    /// Watches the directory of `path` and of its resolved target, and stops watching
    /// directories that no longer lead to the file (an old ConfigMap version).
    fn refresh(&mut self, path: &Path) {
        let mut wanted: Vec<PathBuf> = Vec::new();
        // Directories are compared in canonical form: one directory under two names would
        // share one inotify watch, and unwatching either name would end both.
        let mut add = |file: &Path| {
            let directory = match file.parent() {
                Some(parent) if !parent.as_os_str().is_empty() => parent.to_path_buf(),
                _ => PathBuf::from("."),
            };
            let directory = std::fs::canonicalize(&directory).unwrap_or(directory);
            if !wanted.contains(&directory) {
                wanted.push(directory);
            }
        };
        add(path);
        if let Ok(target) = std::fs::canonicalize(path) {
            add(&target);
        }
        *self.names.lock().unwrap_or_else(|e| e.into_inner()) = relevant_names(path);
        for directory in &self.directories {
            if !wanted.contains(directory) {
                if let Err(error) = self.watcher.unwatch(directory) {
                    // This can fail, for example for a deleted directory, and the
                    // directory leaves the list either way.
                    tracing::debug!(
                        directory = %directory.display(),
                        error = %error,
                        "failed to stop watching a config directory",
                    );
                }
            }
        }
        self.directories.retain(|d| wanted.contains(d));
        for directory in wanted {
            if self.directories.contains(&directory) {
                continue;
            }
            match self.watcher.watch(&directory, RecursiveMode::NonRecursive) {
                Ok(()) => self.directories.push(directory),
                Err(error) => tracing::warn!(
                    directory = %directory.display(),
                    error = %error,
                    "failed to watch a config directory; the timer still re-reads the file",
                ),
            }
        }
    }
}

/// Reads the file and, if its content is new, parses and validates it. The new table
/// shares the campaigns that did not change with `current`.
fn read_new_version(path: &Path, known: &Versions, force: bool, current: &Table) -> ReadOutcome {
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(error) => {
            return ReadOutcome::Unreadable(format!("failed to read {}: {error}", path.display()))
        }
    };
    let digest: [u8; 32] = Sha256::digest(&bytes).into();
    if digest == known.applied {
        return ReadOutcome::Unchanged;
    }
    if known.rejected == Some(Rejected::Content(digest)) && !force {
        return ReadOutcome::StillRejected;
    }
    let Ok(text) = String::from_utf8(bytes) else {
        return ReadOutcome::Invalid(
            digest,
            vec![format!("{}: the file is not valid UTF-8", path.display())],
        );
    };
    if text.trim().is_empty() {
        return ReadOutcome::Invalid(
            digest,
            vec![format!("{}: the file is empty", path.display())],
        );
    }
    let parsed = match config::Parsed::new(&path.display().to_string(), text, Some(current)) {
        Ok(parsed) => parsed,
        Err(errors) => return invalid(digest, errors),
    };
    // A writer may still be at work: apply the version only if the file still contains
    // it. The file is read again while the table is built, after the parse.
    let (loaded, current) = std::thread::scope(|scope| {
        let reread = scope.spawn(|| file_sha256(path));
        (parsed.build(digest), reread.join())
    });
    let loaded = match loaded {
        Ok(loaded) => loaded,
        Err(errors) => return invalid(digest, errors),
    };
    if !matches!(current, Ok(Ok(current)) if current == digest) {
        return ReadOutcome::Changing;
    }
    ReadOutcome::Valid(digest, Box::new(loaded))
}

fn invalid(digest: [u8; 32], errors: config::ConfigErrors) -> ReadOutcome {
    ReadOutcome::Invalid(digest, errors.0.iter().map(ToString::to_string).collect())
}

/// Returns the SHA-256 of the file at `path`, read in blocks, so that a large file is not
/// held in memory a second time.
fn file_sha256(path: &Path) -> std::io::Result<[u8; 32]> {
    let mut file = std::fs::File::open(path)?;
    let mut hasher = Sha256::new();
    std::io::copy(&mut file, &mut hasher)?;
    Ok(hasher.finalize().into())
}

/// Names the settings that differ, for the restart warning.
fn changed_settings(old: &Settings, new: &Settings) -> String {
    let mut changed = Vec::new();
    if old.listen != new.listen {
        changed.push("listen");
    }
    if old.upstream != new.upstream {
        changed.push("upstream");
    }
    if old.limits != new.limits {
        changed.push("limits");
    }
    if old.shutdown != new.shutdown {
        changed.push("shutdown");
    }
    if old.log != new.log {
        changed.push("log");
    }
    if old.metrics != new.metrics {
        changed.push("metrics");
    }
    if old.reload != new.reload {
        changed.push("reload");
    }
    changed.join(",")
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = "environment = \"test\"\n[listen]\nproxy = [\"127.0.0.1:8080\"]\n[upstream]\naddress = \"127.0.0.1:9000\"\n[routes]\ncampaign_paths = [\"/a/{campaign}\"]\n";

    fn settings(extra: &str) -> Settings {
        config::parse("test.toml", &format!("{BASE}{extra}"))
            .unwrap()
            .settings
    }

    #[test]
    fn changed_settings_names_each_section() {
        let base = settings("");
        assert_eq!(changed_settings(&base, &base), "");
        assert_eq!(
            changed_settings(
                &base,
                &settings("[limits]\nkeepalive_timeout_seconds = 5\n")
            ),
            "limits"
        );
        assert_eq!(
            changed_settings(&base, &settings("[log]\naccess = false\n")),
            "log"
        );
        assert_eq!(
            changed_settings(
                &base,
                &settings("[shutdown]\ndrain_delay_seconds = 1\n[reload]\ninterval_seconds = 5\n")
            ),
            "shutdown,reload"
        );
    }
}

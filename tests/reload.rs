//! End-to-end tests of hot reload: Kubernetes-style symlink swaps, editors' renames,
//! in-place writes, half-written and invalid files, SIGHUP, and reloads under traffic.

mod common;

use std::net::SocketAddr;
use std::os::unix::fs::symlink;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use common::*;

const BODY: &[u8] = br#"{"recipient":"+15550100"}"#;
const KEY_NEW: &str = "key_test_NNNNNNNNNNNNNNNNNNNNNNNNNNNNNNNNNNNNNNNNNNN";
const KEY_NEWER: &str = "key_test_MMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMM";

/// Returns the shared test configuration with campaign A's "primary" key replaced by `key`.
fn config_with_primary(base: &str, key: &str) -> String {
    base.replacen(&sha256_hex(KEY_A), &sha256_hex(key), 1)
}

fn status_with(keygate: &Keygate, key: &str) -> u16 {
    let auth = format!("Bearer {key}");
    send(
        CLIENT_A,
        keygate.address,
        &request("POST", MESSAGES_A, &[("Authorization", &auth)], BODY),
    )
    .status
}

/// Waits until `key` is accepted and `removed` is rejected.
fn wait_for_key_swap(keygate: &Keygate, key: &str, removed: &str) {
    wait_until(
        || status_with(keygate, key) == 201 && status_with(keygate, removed) == 401,
        &format!("{key} to work and {removed} to be rejected"),
    );
}

/// Counts the reloads that keygate has applied so far.
fn reload_count(keygate: &Keygate) -> usize {
    keygate
        .stdout()
        .matches("\"configuration reloaded\"")
        .count()
}

fn start(
    config_path_setup: impl FnOnce(&Path, &str) -> std::path::PathBuf,
) -> (Upstream, Keygate, String) {
    let upstream = Upstream::start();
    let listen = free_address("127.0.0.1");
    let base = test_config(&[listen], upstream.address);
    let dir = tempfile::tempdir().unwrap();
    let config_path = config_path_setup(dir.path(), &base);
    let keygate = Keygate::start_at(dir, config_path, listen);
    keygate.wait_for_output("config reload started");
    (upstream, keygate, base)
}

fn plain_file(dir: &Path, base: &str) -> std::path::PathBuf {
    let path = dir.join("keygate.toml");
    std::fs::write(&path, base).unwrap();
    path
}

/// C8: the kubelet's ConfigMap update, a `..data` symlink renamed over the old one.
#[test]
fn kubernetes_configmap_swap_is_applied() {
    let (upstream, keygate, base) = start(|dir, base| {
        std::fs::create_dir(dir.join("..v1")).unwrap();
        std::fs::write(dir.join("..v1/keygate.toml"), base).unwrap();
        symlink("..v1", dir.join("..data")).unwrap();
        symlink("..data/keygate.toml", dir.join("keygate.toml")).unwrap();
        dir.join("keygate.toml")
    });
    let dir = keygate.dir.path().to_path_buf();
    assert_eq!(status_with(&keygate, KEY_A), 201);

    let mut previous_version = "..v1".to_owned();
    let mut previous_key = KEY_A;
    for (version, key) in [("..v2", KEY_NEW), ("..v3", KEY_NEWER)] {
        std::fs::create_dir(dir.join(version)).unwrap();
        std::fs::write(
            dir.join(version).join("keygate.toml"),
            config_with_primary(&base, key),
        )
        .unwrap();
        symlink(version, dir.join("..data_tmp")).unwrap();
        std::fs::rename(dir.join("..data_tmp"), dir.join("..data")).unwrap();
        std::fs::remove_dir_all(dir.join(&previous_version)).unwrap();
        wait_for_key_swap(&keygate, key, previous_key);
        previous_version = version.to_owned();
        previous_key = key;
    }
    let output = keygate.stdout();
    assert!(
        output.contains("\"keys.added\":\"campaign_a/primary\""),
        "{output}"
    );
    assert!(output.contains("\"config.generation\":3"), "{output}");
    assert!(output.contains("\"reload.duration_ms\":"), "{output}");
    assert!(upstream
        .received()
        .iter()
        .all(|r| r.header("x-keygate-campaign") == Some("campaign_a")));
}

/// C9: editors' atomic saves (a rename over the file) and an in-place write.
#[test]
fn editor_saves_and_in_place_writes_are_applied() {
    let (_upstream, keygate, base) = start(plain_file);
    let path = keygate.config_path.clone();
    let tmp = path.with_extension("toml.tmp");

    std::fs::write(&tmp, config_with_primary(&base, KEY_NEW)).unwrap();
    std::fs::rename(&tmp, &path).unwrap();
    wait_for_key_swap(&keygate, KEY_NEW, KEY_A);

    std::fs::write(&tmp, config_with_primary(&base, KEY_NEWER)).unwrap();
    std::fs::rename(&tmp, &path).unwrap();
    wait_for_key_swap(&keygate, KEY_NEWER, KEY_NEW);

    std::fs::write(&path, config_with_primary(&base, KEY_A)).unwrap();
    wait_for_key_swap(&keygate, KEY_A, KEY_NEWER);

    // Deleted and created again: the old table serves while the file is missing.
    std::fs::remove_file(&path).unwrap();
    keygate.wait_for_output("failed to read");
    assert_eq!(status_with(&keygate, KEY_A), 201);
    std::fs::write(&path, config_with_primary(&base, KEY_NEW)).unwrap();
    wait_for_key_swap(&keygate, KEY_NEW, KEY_A);
}

/// A config path relative to the working directory, deleted and created again after a
/// pause, is still watched.
#[test]
fn relative_path_survives_delete_and_recreate() {
    let (_upstream, keygate, base) = start(|dir, base| {
        let slow_timer = base.replacen(
            "[routes]",
            "[reload]\ninterval_seconds = 3600\n\n[routes]",
            1,
        );
        std::fs::write(dir.join("keygate.toml"), slow_timer).unwrap();
        std::path::PathBuf::from("keygate.toml")
    });
    let path = keygate.dir.path().join("keygate.toml");
    let slow_timer = base.replacen(
        "[routes]",
        "[reload]\ninterval_seconds = 3600\n\n[routes]",
        1,
    );
    std::fs::remove_file(&path).unwrap();
    keygate.wait_for_output("failed to read");
    std::fs::write(&path, config_with_primary(&slow_timer, KEY_NEW)).unwrap();
    wait_for_key_swap(&keygate, KEY_NEW, KEY_A);
    std::fs::write(&path, config_with_primary(&slow_timer, KEY_NEWER)).unwrap();
    wait_for_key_swap(&keygate, KEY_NEWER, KEY_NEW);
    assert!(!keygate.stdout().contains("\"reload.trigger\":\"timer\""));
}

/// A client that sends a valid request every 10 ms and records every status it gets.
struct SteadyClient {
    stop: Arc<AtomicBool>,
    statuses: Arc<Mutex<Vec<u16>>>,
    thread: Option<thread::JoinHandle<()>>,
}

impl SteadyClient {
    fn start(address: SocketAddr, key: &str) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let statuses = Arc::new(Mutex::new(Vec::new()));
        let auth = format!("Bearer {key}");
        let thread = {
            let (stop, statuses) = (Arc::clone(&stop), Arc::clone(&statuses));
            thread::spawn(move || {
                let raw = request("POST", MESSAGES_A, &[("Authorization", &auth)], BODY);
                while !stop.load(Ordering::Relaxed) {
                    let status = send(CLIENT_A, address, &raw).status;
                    statuses.lock().unwrap().push(status);
                    thread::sleep(Duration::from_millis(10));
                }
            })
        };
        Self {
            stop,
            statuses,
            thread: Some(thread),
        }
    }

    /// Stops the client and returns every status it received.
    fn finish(mut self) -> Vec<u16> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().unwrap().join().unwrap();
        self.statuses.lock().unwrap().clone()
    }
}

/// C10: truncated, half-written and invalid files change nothing, and the next good
/// version is applied.
#[test]
fn broken_versions_keep_the_table_in_force() {
    let (_upstream, keygate, base) = start(plain_file);
    let path = keygate.config_path.clone();
    let client = SteadyClient::start(keygate.address, KEY_A);
    let version = |key: &str| base.replacen(&sha256_hex(KEY_A2), &sha256_hex(key), 1);

    // (a) Truncated, then written 300 ms later.
    std::fs::write(&path, "").unwrap();
    thread::sleep(Duration::from_millis(300));
    std::fs::write(&path, version(KEY_NEW)).unwrap();
    wait_for_key_swap(&keygate, KEY_NEW, KEY_A2);

    // (b) Cut off in the middle of a string, then written whole 1 s later.
    let whole = version(KEY_NEWER);
    let cut = &whole[..whole.find("campaign_live").unwrap() + 5];
    std::fs::write(&path, cut).unwrap();
    thread::sleep(Duration::from_secs(1));
    std::fs::write(&path, &whole).unwrap();
    wait_for_key_swap(&keygate, KEY_NEWER, KEY_NEW);

    // (c) Valid TOML that fails validation, then a valid file. The last campaign has one
    // key, so three more make four.
    let extra_keys: String = (3..6)
        .map(|n| {
            format!(
                "\n[[campaigns.keys]]\nid = \"k{n}\"\nsha256 = \"{}\"\n",
                n.to_string().repeat(64)
            )
        })
        .collect();
    let fourth_key = format!("{whole}{extra_keys}");
    std::fs::write(&path, &fourth_key).unwrap();
    keygate.wait_for_output("at most 3 are allowed");
    std::fs::write(&path, version(KEY_A2)).unwrap();
    wait_for_key_swap(&keygate, KEY_A2, KEY_NEWER);

    let statuses = client.finish();
    assert!(statuses.len() > 50, "{} requests", statuses.len());
    assert!(statuses.iter().all(|&s| s == 201), "{statuses:?}");

    let output = keygate.stdout();
    let rejected = output
        .matches("\"configuration rejected; the table in force keeps serving\"")
        .count();
    assert!(rejected >= 3, "{output}");
    assert!(output.contains("the file is empty"), "{output}");
    assert!(output.contains("invalid TOML"), "{output}");
    let location = format!("{}:", path.display());
    assert!(
        output.contains(&location),
        "errors must name the file and line: {output}"
    );
}

/// A burst of writes of different versions gives one reload, of the last version.
#[test]
fn burst_of_writes_gives_one_reload() {
    let (_upstream, keygate, base) = start(plain_file);
    let path = keygate.config_path.clone();
    let before = reload_count(&keygate);
    for key in [KEY_NEW, KEY_NEWER, KEY_A2, KEY_NEW] {
        std::fs::write(&path, config_with_primary(&base, key)).unwrap();
    }
    std::fs::write(&path, config_with_primary(&base, KEY_NEWER)).unwrap();
    wait_for_key_swap(&keygate, KEY_NEWER, KEY_A);
    assert_eq!(reload_count(&keygate), before + 1, "{}", keygate.stdout());
}

/// SIGHUP applies a change that the watcher cannot see: a write through a hard link in
/// a directory that keygate does not watch.
#[test]
fn sighup_applies_unseen_change() {
    // The link is made before keygate starts, because making it changes the file's link
    // count, which the watcher does see.
    let hidden = tempfile::tempdir().unwrap();
    let alias = hidden.path().join("alias.toml");
    let (_upstream, keygate, base) = start(|dir, base| {
        let path = plain_file(dir, base);
        std::fs::hard_link(&path, &alias).unwrap();
        path
    });
    std::fs::write(&alias, config_with_primary(&base, KEY_NEW)).unwrap();
    assert_eq!(
        std::fs::read_to_string(&keygate.config_path).unwrap(),
        config_with_primary(&base, KEY_NEW)
    );

    // Give the watcher ample time to react if it could see the write; it must not.
    thread::sleep(Duration::from_secs(1));
    assert_eq!(status_with(&keygate, KEY_A), 201);
    assert_eq!(reload_count(&keygate), 0);

    keygate.signal("HUP");
    wait_for_key_swap(&keygate, KEY_NEW, KEY_A);
    assert!(keygate.stdout().contains("\"reload.trigger\":\"signal\""));

    // A second SIGHUP finds nothing new: no new generation.
    keygate.signal("HUP");
    keygate.wait_for_output("config file holds the configuration in force");
    assert_eq!(reload_count(&keygate), 1);
}

/// 100 reloads alternating between two tables under traffic from several connections:
/// every response is one that a table in force could give.
#[test]
fn reloads_under_traffic_fail_no_request() {
    // Access lines are off, so that counting reload lines stays cheap under traffic.
    let quiet = |base: &str| base.replacen("[routes]", "[log]\naccess = false\n\n[routes]", 1);
    let (upstream, keygate, base) = start(|dir, base| plain_file(dir, &quiet(base)));
    let base = quiet(&base);
    let path = keygate.config_path.clone();
    let without_secondary = base.replacen(&sha256_hex(KEY_A2), &sha256_hex(KEY_NEW), 1);
    let stop = Arc::new(AtomicBool::new(false));
    let mut workers = Vec::new();
    for (worker, key) in [KEY_A, KEY_A, KEY_A2, KEY_A2].into_iter().enumerate() {
        let (stop, address) = (Arc::clone(&stop), keygate.address);
        workers.push(thread::spawn(move || {
            let auth = format!("Bearer {key}");
            let raw = request("POST", MESSAGES_A, &[("Authorization", &auth)], BODY);
            let mut stream = client::connect(CLIENT_A, address);
            let mut statuses = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let response = send_raw(&mut stream, &raw)
                    .unwrap_or_else(|e| panic!("worker {worker}: connection error {e}"));
                statuses.push(response.status);
            }
            (key, statuses)
        }));
    }

    for round in 0..100 {
        let before = reload_count(&keygate);
        let contents = if round % 2 == 0 {
            &without_secondary
        } else {
            &base
        };
        replace_file(&path, contents);
        wait_until(
            || reload_count(&keygate) > before,
            &format!("reload {round}"),
        );
    }
    stop.store(true, Ordering::Relaxed);

    let mut total = 0;
    for worker in workers {
        let (key, statuses) = worker.join().unwrap();
        total += statuses.len();
        let allowed: &[u16] = if key == KEY_A { &[201] } else { &[201, 401] };
        let unexpected: Vec<&u16> = statuses.iter().filter(|s| !allowed.contains(s)).collect();
        assert!(unexpected.is_empty(), "{key}: {unexpected:?}");
    }
    assert!(total > 200, "only {total} requests were sent");
    assert!(upstream.count() > 0);
    assert_eq!(reload_count(&keygate), 100);
}

/// A changed listen address is reported as needing a restart, and the old address
/// keeps serving.
#[test]
fn listen_change_needs_restart() {
    let (_upstream, keygate, base) = start(plain_file);
    let other = free_address("127.0.0.1");
    let moved = base.replacen(&keygate.address.to_string(), &other.to_string(), 1);
    assert_ne!(moved, base);
    replace_file(&keygate.config_path, &config_with_primary(&moved, KEY_NEW));
    wait_for_key_swap(&keygate, KEY_NEW, KEY_A);
    let output = keygate.stdout();
    assert!(
        output.contains("take effect only after a restart"),
        "{output}"
    );
    assert!(output.contains("\"changed\":\"listen\""), "{output}");
    assert!(std::net::TcpStream::connect(other).is_err());
}

/// Trace logging written into the watched directory must not feed the watcher: each
/// line would be a change event, and each event a new line.
#[test]
fn trace_logs_in_watched_directory_do_not_loop() {
    let upstream = Upstream::start();
    let listen = free_address("127.0.0.1");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keygate.toml");
    std::fs::write(&path, test_config(&[listen], upstream.address)).unwrap();
    let keygate = Keygate::start_with_env(dir, path, listen, &[("RUST_LOG", "trace".as_ref())]);
    keygate.wait_for_output("config reload started");
    let size = || keygate.stdout().len();
    let before = size();
    thread::sleep(Duration::from_secs(1));
    let grown = size() - before;
    assert!(
        grown < 64 * 1024,
        "the log grew by {grown} bytes in one second while idle"
    );
}

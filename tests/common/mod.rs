//! End-to-end test harness: the real keygate binary, a recording upstream server and a
//! raw HTTP client that can pick its source address. Everything runs on loopback, on
//! ports chosen at run time, and every wait has a deadline.

#![allow(dead_code)]

pub mod client;
pub mod upstream;

use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

#[allow(unused_imports)]
pub use client::{request, send, send_raw, Response};
pub use upstream::Upstream;

/// Demo keys of the shared test table. They exist only in these tests.
pub const KEY_A: &str = "key_test_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA";
pub const KEY_A2: &str = "key_test_aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
pub const KEY_B: &str = "key_test_BBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBB";
pub const KEY_LIVE_A: &str = "key_live_LLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLL";
pub const KEY_EXPIRED: &str = "key_test_EEEEEEEEEEEEEEEEEEEEEEEEEEEEEEEEEEEEEEEEEEE";

/// An allowed client of campaign A, an allowed client of campaign B, and an outsider.
pub const CLIENT_A: &str = "127.0.0.10";
pub const CLIENT_B: &str = "127.0.0.20";
pub const OUTSIDER: &str = "127.0.0.66";

pub const MESSAGES_A: &str = "/api/v2/campaigns/campaign_a/messages";
pub const MESSAGES_B: &str = "/api/v2/campaigns/campaign_b/messages";

/// How long a test waits for a process or a file change before it fails.
pub const DEADLINE: Duration = Duration::from_secs(20);

/// Returns the SHA-256 of a key in lowercase hex, computed independently of keygate.
pub fn sha256_hex(key: &str) -> String {
    use std::fmt::Write;
    let digest = sha256(key.as_bytes());
    digest.iter().fold(String::new(), |mut text, byte| {
        write!(text, "{byte:02x}").unwrap();
        text
    })
}

/// Returns the SHA-256 of `data`, computed independently of keygate.
pub fn sha256(data: &[u8]) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(data).into()
}

/// Returns the shared test configuration: campaign A allows `CLIENT_A` and `::1` and
/// holds `KEY_A`, `KEY_A2` and an expired key; campaign B allows `CLIENT_B` and holds
/// `KEY_B`; a third campaign holds a live key that the test environment rejects.
pub fn test_config(proxy: &[SocketAddr], upstream: SocketAddr) -> String {
    let proxy: Vec<String> = proxy.iter().map(|a| format!("\"{a}\"")).collect();
    format!(
        r#"environment = "test"

[listen]
proxy = [{proxy}]

[upstream]
address = "{upstream}"
connect_timeout_ms = 1000
read_timeout_ms = 2000

[routes]
campaign_paths = ["/api/v2/campaigns/{{campaign}}"]

[[campaigns]]
id = "campaign_a"
allowed_ips = ["{CLIENT_A}", "::1"]

[[campaigns.keys]]
id = "primary"
sha256 = "{a}"

[[campaigns.keys]]
id = "secondary"
sha256 = "{a2}"

[[campaigns.keys]]
id = "expired"
sha256 = "{expired}"
expires_at = "2020-01-01T00:00:00Z"

[[campaigns]]
id = "campaign_b"
allowed_ips = ["{CLIENT_B}"]

[[campaigns.keys]]
id = "primary"
sha256 = "{b}"

[[campaigns]]
id = "campaign_live"
allowed_ips = ["{CLIENT_A}"]

[[campaigns.keys]]
id = "live"
sha256 = "{live}"
"#,
        proxy = proxy.join(", "),
        a = sha256_hex(KEY_A),
        a2 = sha256_hex(KEY_A2),
        expired = sha256_hex(KEY_EXPIRED),
        b = sha256_hex(KEY_B),
        live = sha256_hex(KEY_LIVE_A),
    )
}

/// Adds `admin` as the admin listener to a configuration made by `test_config`.
pub fn with_admin(config: &str, admin: SocketAddr) -> String {
    config.replacen(
        "\n\n[upstream]",
        &format!("\nadmin = \"{admin}\"\n\n[upstream]"),
        1,
    )
}

/// Adds top-level sections, such as `[log]`, to a configuration made by `test_config`.
pub fn with_sections(config: &str, sections: &str) -> String {
    config.replacen("[routes]", &format!("{sections}\n\n[routes]"), 1)
}

/// Waits until `address` accepts connections.
///
/// `Keygate::start` waits for one listener only; the others, and the admin listener,
/// may open a moment later.
pub fn wait_for_listener(address: SocketAddr) {
    wait_until(
        || TcpStream::connect_timeout(&address, Duration::from_millis(200)).is_ok(),
        &format!("a listener on {address}"),
    );
}

/// Sends `GET path` to an admin listener and returns the status and body.
pub fn admin_get(admin: SocketAddr, path: &str) -> (u16, String) {
    let response = send("127.0.0.1", admin, &request("GET", path, &[], b""));
    (
        response.status,
        String::from_utf8_lossy(&response.body).into_owned(),
    )
}

/// Returns `ip` with a port that was free on every address a moment ago.
///
/// Ports come from 20000-31999, below Linux's ephemeral range, so that the source ports
/// of the tests' own client connections cannot take them, and each call in a test
/// process gets a different port.
pub fn free_address(ip: &str) -> SocketAddr {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let ip: IpAddr = ip.parse().unwrap();
    let start = std::process::id().wrapping_mul(7919);
    for _ in 0..12_000 {
        let port =
            20_000 + (start.wrapping_add(NEXT.fetch_add(1, Ordering::Relaxed)) % 12_000) as u16;
        // A dual-stack wildcard bind fails if anything uses the port on any address.
        if TcpListener::bind(("::", port)).is_ok() {
            return SocketAddr::new(ip, port);
        }
    }
    panic!("no free port in 20000-31999");
}

/// Returns the path of the built keygate binary.
pub fn keygate_binary() -> &'static str {
    env!("CARGO_BIN_EXE_keygate")
}

/// A running keygate process, stopped when dropped.
pub struct Keygate {
    child: Child,
    pub dir: tempfile::TempDir,
    pub config_path: PathBuf,
    pub address: SocketAddr,
}

impl Keygate {
    /// Writes `config` to a temporary file, starts keygate on it and waits until
    /// `address` accepts connections.
    pub fn start(config: &str, address: SocketAddr) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let config_path = dir.path().join("keygate.toml");
        std::fs::write(&config_path, config).unwrap();
        Self::start_at(dir, config_path, address)
    }

    /// Starts keygate on a configuration file that the caller has already laid out.
    pub fn start_at(dir: tempfile::TempDir, config_path: PathBuf, address: SocketAddr) -> Self {
        Self::start_with_env(dir, config_path, address, &[])
    }

    /// Starts keygate with extra environment variables.
    pub fn start_with_env(
        dir: tempfile::TempDir,
        config_path: PathBuf,
        address: SocketAddr,
        env: &[(&str, &std::ffi::OsStr)],
    ) -> Self {
        let mut keygate = Self::spawn_with_env(dir, config_path, address, env);
        keygate.wait_until_listening();
        keygate
    }

    /// Starts keygate with extra environment variables and returns without waiting for
    /// `address`, for tests of a start that must fail.
    pub fn spawn_with_env(
        dir: tempfile::TempDir,
        config_path: PathBuf,
        address: SocketAddr,
        env: &[(&str, &std::ffi::OsStr)],
    ) -> Self {
        let stdout = std::fs::File::create(dir.path().join("stdout.log")).unwrap();
        let stderr = std::fs::File::create(dir.path().join("stderr.log")).unwrap();
        // A relative config path is taken relative to the temporary directory.
        let child = Command::new(keygate_binary())
            .current_dir(dir.path())
            .args(["run", "--config"])
            .arg(&config_path)
            .env("RUST_LOG", "info")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .unwrap();
        Self {
            child,
            dir,
            config_path,
            address,
        }
    }

    fn wait_until_listening(&mut self) {
        let started = Instant::now();
        while TcpStream::connect_timeout(&self.address, Duration::from_millis(200)).is_err() {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!(
                    "keygate exited with {status} before listening:\n{}",
                    self.output()
                );
            }
            assert!(
                started.elapsed() < DEADLINE,
                "keygate did not listen in time:\n{}",
                self.output()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Returns everything keygate wrote to stdout and stderr so far.
    pub fn output(&self) -> String {
        let read =
            |name: &str| std::fs::read_to_string(self.dir.path().join(name)).unwrap_or_default();
        format!("{}{}", read("stdout.log"), read("stderr.log"))
    }

    pub fn stdout(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("stdout.log")).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends a signal to the keygate process.
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([&format!("-{signal}"), &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Waits for the process to exit and returns its exit code.
    pub fn wait_for_exit(&mut self) -> Option<i32> {
        let started = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code();
            }
            assert!(started.elapsed() < DEADLINE, "keygate did not exit in time");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until keygate's output contains `text`, and returns the output.
    pub fn wait_for_output(&self, text: &str) -> String {
        wait_until(
            || self.output().contains(text),
            &format!("output containing {text:?}"),
        );
        self.output()
    }
}

impl Drop for Keygate {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls `condition` until it holds, or fails the test at the deadline.
pub fn wait_until(mut condition: impl FnMut() -> bool, what: &str) {
    let started = Instant::now();
    while !condition() {
        assert!(started.elapsed() < DEADLINE, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A keygate in front of a recording upstream with the shared test configuration.
pub struct Setup {
    pub upstream: Upstream,
    pub keygate: Keygate,
}

impl Setup {
    pub fn start() -> Self {
        Self::start_on(&["127.0.0.1"])
    }

    /// Starts keygate listening on a fresh port of each given address; the first one is
    /// `keygate.address`.
    pub fn start_on(listen_ips: &[&str]) -> Self {
        let upstream = Upstream::start();
        let port = free_address("127.0.0.1").port();
        let listen: Vec<SocketAddr> = listen_ips
            .iter()
            .map(|ip| SocketAddr::new(ip.parse().unwrap(), port))
            .collect();
        let keygate = Keygate::start(&test_config(&listen, upstream.address), listen[0]);
        listen[1..].iter().copied().for_each(wait_for_listener);
        Self { upstream, keygate }
    }

    /// Sends a request from `from` with `key` as bearer token, if any.
    pub fn send(
        &self,
        from: &str,
        method: &str,
        path: &str,
        key: Option<&str>,
        body: &[u8],
    ) -> Response {
        let authorization = key.map(|key| format!("Bearer {key}"));
        let mut headers: Vec<(&str, &str)> = Vec::new();
        if let Some(value) = &authorization {
            headers.push(("Authorization", value));
        }
        send(
            from,
            self.keygate.address,
            &request(method, path, &headers, body),
        )
    }
}

/// Writes `contents` to `path` through a temporary file and a rename, as editors do.
pub fn replace_file(path: &Path, contents: &str) {
    let temporary = path.with_extension("tmp");
    std::fs::write(&temporary, contents).unwrap();
    std::fs::rename(&temporary, path).unwrap();
}

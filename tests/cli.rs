//! End-to-end tests of the command line: `check`, `key new`, `key hash`, and the exit
//! codes of `run` when it cannot start.

mod common;

use std::io::Write;
use std::path::Path;
use std::process::{Command, Output, Stdio};

use common::*;

fn keygate(args: &[&str]) -> Output {
    Command::new(keygate_binary()).args(args).output().unwrap()
}

fn keygate_with_stdin(args: &[&str], input: &[u8]) -> Output {
    let mut child = Command::new(keygate_binary())
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(input).unwrap();
    child.wait_with_output().unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Each fixture contains one validation error. Its first line names the line and the text
/// that `check` must report.
#[test]
fn check_reports_each_fixture_error_with_its_line() {
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/invalid");
    let mut paths: Vec<_> = std::fs::read_dir(&fixtures)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .collect();
    paths.sort();
    assert!(
        paths.len() >= 20,
        "fixtures missing from {}",
        fixtures.display()
    );
    for path in paths {
        let content = std::fs::read_to_string(&path).unwrap();
        let expectation = content
            .lines()
            .next()
            .unwrap()
            .strip_prefix("# expect: line ")
            .unwrap();
        let (line, message) = expectation.split_once(": ").unwrap();
        let output = keygate(&["check", "--config", path.to_str().unwrap()]);
        let stderr = text(&output.stderr);
        assert_eq!(
            output.status.code(),
            Some(64),
            "{}: {stderr}",
            path.display()
        );
        let errors: Vec<&str> = stderr.lines().skip(1).collect();
        assert_eq!(errors.len(), 1, "{}: {stderr}", path.display());
        let location = format!("{}:{line}: ", path.display());
        assert!(
            errors[0].starts_with(&location),
            "{location} not in {stderr}"
        );
        assert!(errors[0].contains(message), "{message} not in {stderr}");
        assert!(output.stdout.is_empty());
    }
}

#[test]
fn check_reports_all_errors_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("many.toml");
    let base = test_config(
        &["127.0.0.1:8080".parse().unwrap()],
        "127.0.0.1:9000".parse().unwrap(),
    );
    let broken = base
        .replacen("\"::1\"", "\"::1/129\"", 1)
        .replacen("2020-01-01T00:00:00Z", "yesterday", 1)
        .replacen("id = \"campaign_b\"", "id = \"campaign_a\"", 1)
        .replacen(
            "connect_timeout_ms = 1000",
            "connect_timeout_ms = \"1000\"",
            1,
        )
        .replacen("read_timeout_ms = 2000", "read_timeout_ms = true", 1);
    std::fs::write(&path, broken).unwrap();
    let output = keygate(&["check", "--config", path.to_str().unwrap()]);
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(64));
    assert!(
        stderr.starts_with("error: the configuration is invalid (5 problems):"),
        "{stderr}"
    );
    for field in ["connect_timeout_ms", "read_timeout_ms"] {
        assert!(
            stderr.contains(&format!("upstream.{field}: invalid type")),
            "{stderr}"
        );
    }
    assert!(
        stderr.contains("\"::1/129\": prefix length is too long"),
        "{stderr}"
    );
    assert!(
        stderr.contains("\"yesterday\": invalid timestamp"),
        "{stderr}"
    );
    assert!(stderr.contains("duplicate campaign id"), "{stderr}");
}

#[test]
fn check_summarises_valid_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keygate.toml");
    let soon = unix_now() + 86_400 * 3;
    let base = test_config(
        &["127.0.0.1:8080".parse().unwrap()],
        "127.0.0.1:9000".parse().unwrap(),
    );
    let config = base.replacen(
        "id = \"secondary\"\n",
        &format!("id = \"secondary\"\nexpires_at = \"{}\"\n", rfc3339(soon)),
        1,
    );
    std::fs::write(&path, config).unwrap();
    let output = keygate(&["check", "--config", path.to_str().unwrap()]);
    let stdout = text(&output.stdout);
    assert_eq!(output.status.code(), Some(0), "{}", text(&output.stderr));
    assert!(stdout.contains("campaigns: 3\n"), "{stdout}");
    assert!(stdout.contains("keys: 5\n"), "{stdout}");
    assert!(
        stdout.contains("keys expiring within 30 days: 2\n"),
        "{stdout}"
    );
    assert!(
        stdout.contains("campaign \"campaign_a\" key \"expired\": expired 2020-01-01"),
        "{stdout}"
    );
    assert!(
        stdout.contains("campaign \"campaign_a\" key \"secondary\": expires "),
        "{stdout}"
    );
}

#[test]
fn check_accepts_every_shipped_config() {
    let config_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
    for entry in std::fs::read_dir(config_dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            let output = keygate(&["check", "--config", path.to_str().unwrap()]);
            assert_eq!(
                output.status.code(),
                Some(0),
                "{}: {}",
                path.display(),
                text(&output.stderr)
            );
        }
    }
}

#[test]
fn check_missing_file_exits_64() {
    let output = keygate(&["check", "--config", "/nonexistent/keygate.toml"]);
    assert_eq!(output.status.code(), Some(64));
    assert!(text(&output.stderr).contains("failed to read config file /nonexistent/keygate.toml"));
}

#[test]
fn key_new_piped_into_key_hash_matches() {
    for env in ["live", "test"] {
        let created = keygate(&["key", "new", "--env", env]);
        assert!(created.status.success());
        let key = text(&created.stdout);
        let key = key.trim_end();
        let prefix = format!("key_{env}_");
        let body = key.strip_prefix(&prefix).expect("environment prefix");
        assert_eq!(body.len(), 43);
        assert!(body
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'));

        let toml_lines = text(&created.stderr);
        assert!(
            !toml_lines.contains(key),
            "the key must not be in the TOML lines"
        );
        let printed = toml_lines
            .lines()
            .find_map(|line| line.strip_prefix("sha256 = \""))
            .and_then(|rest| rest.strip_suffix('"'))
            .expect("a sha256 line");

        let hashed = keygate_with_stdin(&["key", "hash"], &created.stdout);
        assert!(hashed.status.success(), "{}", text(&hashed.stderr));
        assert_eq!(text(&hashed.stdout).trim_end(), printed);
        assert_eq!(printed, sha256_hex(key));
    }
}

#[test]
fn key_new_generates_distinct_keys() {
    let first = keygate(&["key", "new", "--env", "live"]).stdout;
    let second = keygate(&["key", "new", "--env", "live"]).stdout;
    assert_ne!(first, second);
}

#[test]
fn key_hash_rejects_bad_input() {
    for input in [
        &b""[..],
        b"\n",
        b"key_test_a key_test_b\n",
        b"key_test_a\nkey_test_b\n",
        b"garbage\n",
        b"key_prod_abc\n",
        b"key_test_a=b\n",
        b"key_test_\xc3\xa9\n",
    ] {
        let output = keygate_with_stdin(&["key", "hash"], input);
        assert_eq!(output.status.code(), Some(65), "{input:?}");
        assert!(output.stdout.is_empty());
        assert!(text(&output.stderr).contains("the input"), "{input:?}");
    }
    // SHA-256 of "key_test_abc"; the line ending is not part of the key.
    let crlf = keygate_with_stdin(&["key", "hash"], b"key_test_abc\r\n");
    assert_eq!(crlf.status.code(), Some(0), "{}", text(&crlf.stderr));
    assert_eq!(
        text(&crlf.stdout).trim_end(),
        "d8651589be9bd8b8aec2e27540de14b51425e7c676d4e3cc90fb996c30056faa"
    );
}

#[test]
fn run_with_invalid_config_exits_64() {
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/invalid/leading_zeros.toml");
    let output = keygate(&["run", "--config", path.to_str().unwrap()]);
    assert_eq!(output.status.code(), Some(64));
    assert!(text(&output.stderr).contains("leading zeros"));
}

#[test]
fn run_on_busy_address_exits_69() {
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = busy.local_addr().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keygate.toml");
    std::fs::write(
        &path,
        test_config(&[address], "127.0.0.1:9".parse().unwrap()),
    )
    .unwrap();
    let output = keygate(&["run", "--config", path.to_str().unwrap()]);
    assert_eq!(output.status.code(), Some(69));
    assert!(text(&output.stderr).contains(&format!("failed to listen on {address}")));
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// Formats Unix seconds as an RFC 3339 UTC timestamp, independently of keygate.
fn rfc3339(seconds: i64) -> String {
    let output = Command::new("date")
        .args(["-u", "-d", &format!("@{seconds}"), "+%Y-%m-%dT%H:%M:%SZ"])
        .output()
        .unwrap();
    text(&output.stdout).trim().to_owned()
}

/// Without any network but loopback, in a network namespace of its own, the first lookup
/// of the upstream host fails without a query leaving the machine.
#[test]
fn run_exits_69_when_the_first_lookup_fails() {
    let namespace = Command::new("unshare").args(["-n", "true"]).status();
    assert!(
        namespace.is_ok_and(|status| status.success()),
        "this test needs `unshare -n` (util-linux) and the right to create a network namespace"
    );
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keygate.toml");
    let config = test_config(
        &["127.0.0.1:8080".parse().unwrap()],
        "127.0.0.1:9000".parse().unwrap(),
    )
    .replacen("127.0.0.1:9000", "upstream.invalid:9000", 1);
    std::fs::write(&path, config).unwrap();
    let output = Command::new("unshare")
        .args(["-n"])
        .arg(keygate_binary())
        .args(["run", "--config", path.to_str().unwrap()])
        .output()
        .unwrap();
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(69), "{stderr}");
    assert!(stderr.contains("upstream.invalid"), "{stderr}");
}

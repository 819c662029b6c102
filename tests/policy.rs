//! End-to-end tests of traffic policy: per-campaign rate limits, request size and
//! keep-alive limits, the upstream credential from the environment, and upstream host
//! names with several addresses.

mod common;

use std::io::{Read, Write};
use std::time::Instant;

use common::*;

const BODY: &[u8] = br#"{"recipient":"+15550100"}"#;

fn start(sections: &str) -> (Upstream, Keygate) {
    let upstream = Upstream::start();
    let listen = free_address("127.0.0.1");
    let config = with_sections(&test_config(&[listen], upstream.address), sections);
    let keygate = Keygate::start(&config, listen);
    (upstream, keygate)
}

fn post(keygate: &Keygate, path: &str, key: &str) -> Response {
    let auth = format!("Bearer {key}");
    let from = if path == MESSAGES_B {
        CLIENT_B
    } else {
        CLIENT_A
    };
    send(
        from,
        keygate.address,
        &request("POST", path, &[("Authorization", &auth)], BODY),
    )
}

/// Adds a rate limit to campaign A of a configuration made by `test_config`.
fn limit_campaign_a(config: &str, requests: u32) -> String {
    config.replacen(
        "id = \"campaign_a\"\n",
        &format!(
            "id = \"campaign_a\"\nrate_limit = {{ requests = {requests}, per_seconds = 60 }}\n"
        ),
        1,
    )
}

#[test]
fn rate_limit_passes_exactly_the_budget() {
    let upstream = Upstream::start();
    let listen = free_address("127.0.0.1");
    let keygate = Keygate::start(
        &limit_campaign_a(&test_config(&[listen], upstream.address), 3),
        listen,
    );

    // Rejected requests do not use the campaign's budget.
    for _ in 0..5 {
        assert_eq!(post(&keygate, MESSAGES_A, "key_test_wrong").status, 401);
    }
    for request in 0..3 {
        assert_eq!(
            post(&keygate, MESSAGES_A, KEY_A).status,
            201,
            "request {request}"
        );
    }
    // The budget is shared by the campaign's keys.
    let limited = post(&keygate, MESSAGES_A, KEY_A2);
    assert_eq!(limited.status, 429);
    assert_eq!(limited.error_code(), "too_many_requests");
    let retry_after: u64 = limited.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=20).contains(&retry_after), "{retry_after}");
    assert_eq!(upstream.count(), 3);
}

#[test]
fn campaigns_have_separate_budgets_and_default() {
    let (upstream, keygate) = start("[rate_limit]\nrequests = 2\nper_seconds = 60");
    assert_eq!(post(&keygate, MESSAGES_A, KEY_A).status, 201);
    assert_eq!(post(&keygate, MESSAGES_A, KEY_A).status, 201);
    assert_eq!(post(&keygate, MESSAGES_A, KEY_A).status, 429);
    assert_eq!(post(&keygate, MESSAGES_B, KEY_B).status, 201);
    assert_eq!(post(&keygate, MESSAGES_B, KEY_B).status, 201);
    assert_eq!(post(&keygate, MESSAGES_B, KEY_B).status, 429);
    assert_eq!(upstream.count(), 4);
}

#[test]
fn rate_limit_reloads_with_the_table() {
    let upstream = Upstream::start();
    let listen = free_address("127.0.0.1");
    let base = test_config(&[listen], upstream.address);
    let keygate = Keygate::start(&limit_campaign_a(&base, 1), listen);
    keygate.wait_for_output("config reload started");
    assert_eq!(post(&keygate, MESSAGES_A, KEY_A).status, 201);
    assert_eq!(post(&keygate, MESSAGES_A, KEY_A).status, 429);

    replace_file(&keygate.config_path, &limit_campaign_a(&base, 4));
    keygate.wait_for_output("\"campaigns.changed\":\"campaign_a\"");
    // A changed limit starts with a full budget.
    for request in 0..4 {
        assert_eq!(
            post(&keygate, MESSAGES_A, KEY_A).status,
            201,
            "request {request}"
        );
    }
    assert_eq!(post(&keygate, MESSAGES_A, KEY_A).status, 429);
    assert_eq!(upstream.count(), 5);
}

#[test]
fn body_over_limit_gets_413() {
    let (upstream, keygate) = start("[limits]\nmax_body_bytes = 1024");
    let auth = format!("Bearer {KEY_A}");
    let big = vec![b'x'; 2000];
    let response = send(
        CLIENT_A,
        keygate.address,
        &request("POST", MESSAGES_A, &[("Authorization", &auth)], &big),
    );
    assert_eq!(response.status, 413);
    assert_eq!(response.error_code(), "payload_too_large");
    assert_eq!(upstream.count(), 0);

    // A chunked body has no declared length, so it is counted as it arrives. Its first
    // chunk arrives alone, while it is still under the limit, and keygate keeps it back
    // until the whole body is in, so none of it reaches the upstream.
    let mut stream = client::connect(CLIENT_A, keygate.address);
    let head = format!(
        "POST {MESSAGES_A} HTTP/1.1\r\nHost: keygate.test\r\nAuthorization: {auth}\r\nTransfer-Encoding: chunked\r\n\r\n"
    );
    let chunk = [b"200\r\n".as_slice(), &[b'y'; 512], b"\r\n"].concat();
    stream
        .write_all(&[head.as_bytes(), &chunk].concat())
        .unwrap();
    let header_arrived = || {
        let wire = upstream.wire_bytes();
        wire.windows(MESSAGES_A.len())
            .any(|w| w == MESSAGES_A.as_bytes())
    };
    wait_until(header_arrived, "the request header at the upstream");
    stream
        .write_all(&[chunk.repeat(3).as_slice(), b"0\r\n\r\n"].concat())
        .unwrap();
    let response = client::read_response(&mut stream).unwrap();
    assert_eq!(response.status, 413);
    // Once keygate closes that connection, the upstream has read every byte sent on it.
    wait_until(
        || upstream.closed_connections() >= 1,
        "the upstream connection to close",
    );
    let wire = upstream.wire_bytes();
    assert!(
        !wire.windows(16).any(|w| w == [b'y'; 16]),
        "body bytes reached the upstream"
    );

    // Exactly the limit passes.
    let fits = vec![b'z'; 1024];
    let response = send(
        CLIENT_A,
        keygate.address,
        &request("POST", MESSAGES_A, &[("Authorization", &auth)], &fits),
    );
    assert_eq!(response.status, 201);
    assert_eq!(upstream.received().last().unwrap().body, fits);

    // A chunked body within the limit reaches the upstream whole, once.
    let mut stream = client::connect(CLIENT_A, keygate.address);
    let chunk = |byte: u8| [b"100\r\n".as_slice(), &[byte; 256], b"\r\n"].concat();
    stream
        .write_all(&[head.as_bytes(), &chunk(b'p')].concat())
        .unwrap();
    stream
        .write_all(&[chunk(b'q').as_slice(), b"0\r\n\r\n"].concat())
        .unwrap();
    assert_eq!(client::read_response(&mut stream).unwrap().status, 201);
    let received = upstream.received();
    assert_eq!(received.len(), 2);
    assert_eq!(received[1].body, [[b'p'; 256], [b'q'; 256]].concat());
}

/// The default `max_body_bytes` of 50 MiB leaves room for the 40 MB uploads that the
/// service takes on its batch endpoint.
#[test]
fn default_body_limit_passes_40_mb() {
    let setup = Setup::start();
    // Each byte is a multiplicative hash of its position, so a lost, repeated or moved
    // block of the body changes the digest.
    let body: Vec<u8> = (0..40_000_000u32)
        .map(|position| (position.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    let response = setup.send(CLIENT_A, "POST", MESSAGES_A, Some(KEY_A), &body);
    assert_eq!(response.status, 201, "{}", setup.keygate.output());
    let received = setup.upstream.received();
    assert_eq!(received.len(), 1);
    assert_eq!(received[0].body.len(), 40_000_000);
    assert_eq!(sha256(&received[0].body), sha256(&body));
}

#[test]
fn header_over_limit_gets_431() {
    let (upstream, keygate) = start("[limits]\nmax_header_bytes = 2048");
    let auth = format!("Bearer {KEY_A}");
    let padding = "p".repeat(3000);
    let raw = request(
        "POST",
        MESSAGES_A,
        &[("Authorization", &auth), ("X-Padding", &padding)],
        BODY,
    );
    let response = send(CLIENT_A, keygate.address, &raw);
    assert_eq!(response.status, 431);
    assert_eq!(response.error_code(), "request_header_fields_too_large");
    assert_eq!(upstream.count(), 0);
    assert_eq!(post(&keygate, MESSAGES_A, KEY_A).status, 201);

    // Over Pingora's own limits, 1 MiB and 256 lines, the response is the same.
    let huge = "h".repeat(1_100_000);
    let lines: Vec<(String, String)> = (0..300)
        .map(|n| (format!("X-Line-{n}"), "v".to_owned()))
        .collect();
    let many: Vec<(&str, &str)> = lines
        .iter()
        .map(|(n, v)| (n.as_str(), v.as_str()))
        .collect();
    let (roomy_upstream, roomy) = start("[limits]\nmax_header_bytes = 65536");
    for raw in [
        request("GET", MESSAGES_A, &[("X-Padding", &huge)], b""),
        request("GET", MESSAGES_A, &many, b""),
    ] {
        let response = send(CLIENT_A, roomy.address, &raw);
        assert_eq!(response.status, 431);
        assert_eq!(response.error_code(), "request_header_fields_too_large");
        assert!(response.header("x-request-id").is_some());
    }
    assert_eq!(roomy_upstream.count(), 0);
}

#[test]
fn drain_cap_closes_connection_after_large_rejected_body() {
    let (_upstream, keygate) = start("[limits]\ndrain_max_bytes = 500");
    let bad = "Bearer key_test_wrong";
    let mut small = client::connect(CLIENT_A, keygate.address);
    let first = send_raw(
        &mut small,
        &request("POST", MESSAGES_A, &[("Authorization", bad)], &[b'a'; 300]),
    )
    .unwrap();
    assert_eq!(first.status, 401);
    assert_ne!(first.header("connection"), Some("close"));
    assert_eq!(
        send_raw(
            &mut small,
            &request("GET", MESSAGES_A, &[("Authorization", bad)], b"")
        )
        .unwrap()
        .status,
        401
    );

    let mut large = client::connect(CLIENT_A, keygate.address);
    let first = send_raw(
        &mut large,
        &request("POST", MESSAGES_A, &[("Authorization", bad)], &[b'a'; 1000]),
    )
    .unwrap();
    assert_eq!(first.status, 401);
    assert_eq!(first.header("connection"), Some("close"));
}

#[test]
fn idle_keepalive_connection_is_closed() {
    let (_upstream, keygate) = start("[limits]\nkeepalive_timeout_seconds = 1");
    let mut stream = client::connect(CLIENT_A, keygate.address);
    let auth = format!("Bearer {KEY_A}");
    let response = send_raw(
        &mut stream,
        &request("POST", MESSAGES_A, &[("Authorization", &auth)], BODY),
    )
    .unwrap();
    assert_eq!(response.status, 201);
    stream.set_read_timeout(Some(DEADLINE)).unwrap();
    let started = Instant::now();
    let mut byte = [0u8; 1];
    let read = stream.read(&mut byte).unwrap_or(0);
    assert_eq!(read, 0, "keygate closes the idle connection");
    assert!(started.elapsed() < DEADLINE);
}

#[test]
fn upstream_credential_replaces_the_client_key() {
    let upstream = Upstream::start();
    let listen = free_address("127.0.0.1");
    let config = test_config(&[listen], upstream.address).replacen(
        "read_timeout_ms = 2000",
        "read_timeout_ms = 2000\nauthorization_env = \"KEYGATE_TEST_UPSTREAM_AUTH\"",
        1,
    );
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keygate.toml");
    std::fs::write(&path, &config).unwrap();
    let secret = "Basic c2VydmljZTpzM2NyZXQ=";
    let keygate = Keygate::start_with_env(
        dir,
        path,
        listen,
        &[("KEYGATE_TEST_UPSTREAM_AUTH", secret.as_ref())],
    );

    assert_eq!(post(&keygate, MESSAGES_A, KEY_A).status, 201);
    let received = upstream.received();
    assert_eq!(received[0].header_values("authorization"), vec![secret]);
    let output = keygate.output();
    assert!(!output.contains("c2VydmljZTpzM2NyZXQ"), "{output}");
    assert!(!output.contains(KEY_A), "{output}");

    // Without the variable, keygate refuses to start.
    let other = tempfile::tempdir().unwrap();
    let other_path = other.path().join("keygate.toml");
    std::fs::write(
        &other_path,
        config.replace(&listen.to_string(), &free_address("127.0.0.1").to_string()),
    )
    .unwrap();
    let output = std::process::Command::new(keygate_binary())
        .args(["run", "--config"])
        .arg(&other_path)
        .env_remove("KEYGATE_TEST_UPSTREAM_AUTH")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&output.stderr).contains("KEYGATE_TEST_UPSTREAM_AUTH"));
}

/// An upstream given by host name is resolved and used.
#[test]
fn upstream_host_name_is_resolved() {
    let upstream = Upstream::start();
    let port = upstream.address.port();
    let listen = free_address("127.0.0.1");
    let config = test_config(&[listen], upstream.address).replacen(
        &format!("address = \"{}\"", upstream.address),
        &format!("address = \"localhost:{port}\""),
        1,
    );
    let keygate = Keygate::start(&config, listen);
    for request in 0..3 {
        assert_eq!(
            post(&keygate, MESSAGES_A, KEY_A).status,
            201,
            "request {request}"
        );
    }
    assert_eq!(upstream.count(), 3);
    assert!(keygate
        .output()
        .contains("\"upstream.addresses\":\"127.0.0.1:"));
}

//! End-to-end tests of what operators rely on: metrics, health and readiness, access
//! logs without secrets, and graceful shutdown.

mod common;

use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::thread;
use std::time::Duration;

use common::*;

const BODY: &[u8] = br#"{"recipient":"+15550100"}"#;

struct Operated {
    upstream: Upstream,
    keygate: Keygate,
    admin: SocketAddr,
    base: String,
}

fn start(sections: &str) -> Operated {
    let upstream = Upstream::start();
    let listen = free_address("127.0.0.1");
    let admin = free_address("127.0.0.1");
    // A read timeout longer than the slow requests of the shutdown test.
    let base = with_admin(&test_config(&[listen], upstream.address), admin).replacen(
        "read_timeout_ms = 2000",
        "read_timeout_ms = 10000",
        1,
    );
    let config = with_sections(&base, sections);
    let keygate = Keygate::start(&config, listen);
    wait_for_listener(admin);
    Operated {
        upstream,
        keygate,
        admin,
        base,
    }
}

fn post(keygate: &Keygate, from: &str, path: &str, key: Option<&str>) -> u16 {
    let auth = key.map(|key| format!("Bearer {key}"));
    let headers: Vec<(&str, &str)> = auth.iter().map(|a| ("Authorization", a.as_str())).collect();
    send(
        from,
        keygate.address,
        &request("POST", path, &headers, BODY),
    )
    .status
}

/// Returns the value of the sample whose line starts with `series` (name and labels).
fn sample(metrics: &str, series: &str) -> Option<f64> {
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .map(|value| value.parse().unwrap())
}

#[test]
fn metrics_count_known_traffic_exactly() {
    let operated = start("");
    let keygate = &operated.keygate;
    assert_eq!(post(keygate, CLIENT_A, MESSAGES_A, Some(KEY_A)), 201);
    assert_eq!(post(keygate, CLIENT_A, MESSAGES_A, Some(KEY_A2)), 201);
    assert_eq!(post(keygate, CLIENT_A, "/other", Some(KEY_A)), 404);
    for _ in 0..3 {
        assert_eq!(
            post(keygate, CLIENT_A, MESSAGES_A, Some("key_test_nope")),
            401
        );
    }
    assert_eq!(post(keygate, OUTSIDER, MESSAGES_A, Some(KEY_A)), 403);
    assert_eq!(post(keygate, CLIENT_A, MESSAGES_B, Some(KEY_A)), 403);

    let expected = [
        (
            "keygate_requests_total{code=\"none\",outcome=\"allowed\"}",
            2.0,
        ),
        (
            "keygate_requests_total{code=\"not_found\",outcome=\"rejected\"}",
            1.0,
        ),
        (
            "keygate_requests_total{code=\"invalid_api_key_provided\",outcome=\"rejected\"}",
            3.0,
        ),
        (
            "keygate_requests_total{code=\"invalid_ip_address_used\",outcome=\"rejected\"}",
            1.0,
        ),
        (
            "keygate_requests_total{code=\"campaign_not_allowed\",outcome=\"rejected\"}",
            1.0,
        ),
        ("keygate_upstream_responses_total{class=\"2xx\"}", 2.0),
        ("keygate_request_duration_seconds_count", 8.0),
        ("keygate_decision_duration_seconds_count", 8.0),
    ];
    // Requests are counted when they end, just after the response is sent.
    wait_until(
        || {
            sample(
                &admin_get(operated.admin, "/metrics").1,
                "keygate_request_duration_seconds_count",
            ) == Some(8.0)
        },
        "8 requests in the metrics",
    );
    let (status, metrics) = admin_get(operated.admin, "/metrics");
    assert_eq!(status, 200);
    for (series, value) in expected {
        assert_eq!(sample(&metrics, series), Some(value), "{series}\n{metrics}");
    }
    assert_eq!(sample(&metrics, "keygate_config_generation"), Some(1.0));
    assert_eq!(sample(&metrics, "keygate_campaigns"), Some(3.0));
    assert_eq!(sample(&metrics, "keygate_keys"), Some(5.0));
    // The test table contains a key that expired in 2020 and no other expiry.
    assert_eq!(sample(&metrics, "keygate_keys_expired"), Some(1.0));
    assert_eq!(
        sample(&metrics, "keygate_keys_expiring_seconds"),
        Some(f64::INFINITY)
    );
    assert!(
        sample(
            &metrics,
            "keygate_config_last_reload_success_timestamp_seconds"
        )
        .unwrap()
            > 1.7e9
    );
    assert!(!metrics.contains(KEY_A));
    assert!(!metrics.contains(CLIENT_A));
    assert!(
        !metrics.contains("campaign_a"),
        "no campaign label unless per_campaign is set"
    );
    assert_eq!(operated.upstream.count(), 2);
}

#[test]
fn per_campaign_metrics_carry_the_campaign() {
    let operated = start("[metrics]\nper_campaign = true");
    assert_eq!(
        post(&operated.keygate, CLIENT_A, MESSAGES_A, Some(KEY_A)),
        201
    );
    let series =
        "keygate_requests_total{campaign=\"campaign_a\",code=\"none\",outcome=\"allowed\"}";
    wait_until(
        || sample(&admin_get(operated.admin, "/metrics").1, series) == Some(1.0),
        series,
    );
}

#[test]
fn failed_reload_counts_and_keeps_generation() {
    let operated = start("[reload]\ninterval_seconds = 1");
    let path = &operated.keygate.config_path;
    replace_file(path, &operated.base.replacen("\"::1\"", "\"::1/129\"", 1));
    let rejected = "keygate_config_reloads_total{result=\"rejected\"}";
    wait_until(
        || sample(&admin_get(operated.admin, "/metrics").1, rejected) == Some(1.0),
        rejected,
    );
    // The timer reads the same invalid file again every second without counting it.
    std::thread::sleep(Duration::from_millis(2500));
    // SIGHUP logs the rejection again, and it is still one rejected version.
    operated.keygate.signal("HUP");
    wait_until(
        || {
            let output = operated.keygate.stdout();
            output.matches("configuration rejected").count() == 2
        },
        "the rejection logged again after SIGHUP",
    );
    let metrics = admin_get(operated.admin, "/metrics").1;
    assert_eq!(sample(&metrics, rejected), Some(1.0));
    assert_eq!(sample(&metrics, "keygate_config_generation"), Some(1.0));
    assert_eq!(
        sample(&metrics, "keygate_config_reloads_total{result=\"applied\"}"),
        Some(0.0)
    );
    assert_eq!(
        post(&operated.keygate, CLIENT_A, MESSAGES_A, Some(KEY_A)),
        201
    );

    let without_b = operated
        .base
        .replacen("id = \"campaign_b\"", "id = \"campaign_c\"", 1);
    replace_file(path, &without_b);
    let applied = "keygate_config_reloads_total{result=\"applied\"}";
    wait_until(
        || sample(&admin_get(operated.admin, "/metrics").1, applied) == Some(1.0),
        applied,
    );
    let metrics = admin_get(operated.admin, "/metrics").1;
    assert_eq!(sample(&metrics, "keygate_config_generation"), Some(2.0));
    assert_eq!(sample(&metrics, rejected), Some(1.0));
}

#[test]
fn health_endpoints_answer_on_admin_port_only() {
    let operated = start("");
    assert_eq!(
        admin_get(operated.admin, "/healthz"),
        (200, "ok\n".to_owned())
    );
    assert_eq!(
        admin_get(operated.admin, "/readyz"),
        (200, "ready\n".to_owned())
    );
    assert_eq!(admin_get(operated.admin, "/other").0, 404);
    // The proxy port does not serve them: /healthz is under no route.
    let on_proxy = send(
        CLIENT_A,
        operated.keygate.address,
        &request("GET", "/healthz", &[], b""),
    );
    assert_eq!(on_proxy.status, 404);
    assert_eq!(on_proxy.error_code(), "not_found");
}

/// Parses the JSON access log lines of keygate's output.
fn access_lines(output: &str) -> Vec<serde_json::Value> {
    output
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|line| line["message"] == "request")
        .collect()
}

#[test]
fn access_log_has_every_field_and_no_secret() {
    let operated = start("");
    let keygate = &operated.keygate;
    let query = "?recipient=%2B15550100&token=query-secret";
    let allowed = format!("{MESSAGES_A}{query}");
    assert_eq!(post(keygate, CLIENT_A, &allowed, Some(KEY_A)), 201);
    let wrong_key = "key_test_presented-but-unknown";
    assert_eq!(post(keygate, CLIENT_A, MESSAGES_A, Some(wrong_key)), 401);
    assert_eq!(post(keygate, CLIENT_B, MESSAGES_A, Some(KEY_B)), 403);

    wait_until(
        || access_lines(&keygate.stdout()).len() == 3,
        "three access log lines",
    );
    let output = keygate.output();
    let lines = access_lines(&output);
    let fields = [
        "timestamp",
        "request.id",
        "client.ip",
        "method",
        "path",
        "status",
        "code",
        "campaign.id",
        "key.id",
        "upstream.status",
        "duration_ms",
        "bytes.received",
        "bytes.sent",
    ];
    for line in &lines {
        for field in fields {
            assert!(line.get(field).is_some(), "{field} missing from {line}");
        }
    }
    let (ok, denied) = (&lines[0], &lines[1]);
    assert_eq!(ok["client.ip"], CLIENT_A);
    assert_eq!(ok["method"], "POST");
    assert_eq!(ok["path"], MESSAGES_A);
    assert_eq!(ok["status"], 201);
    assert_eq!(ok["campaign.id"], "campaign_a");
    assert_eq!(ok["key.id"], "primary");
    assert_eq!(ok["upstream.status"], 201);
    assert_eq!(ok["bytes.received"], BODY.len());
    let received = operated.upstream.received();
    assert_eq!(
        ok["request.id"],
        received[0].header("x-request-id").unwrap()
    );
    assert_eq!(denied["status"], 401);
    assert_eq!(denied["code"], "invalid_api_key_provided");
    assert_eq!(denied["campaign.id"], "");
    assert_eq!(denied["key.id"], "");
    // A key that was found names its own campaign, not the one in the path.
    let other_campaign = &lines[2];
    assert_eq!(other_campaign["code"], "campaign_not_allowed");
    assert_eq!(other_campaign["campaign.id"], "campaign_b");
    assert_eq!(other_campaign["key.id"], "primary");
    assert_eq!(operated.upstream.count(), 1);

    for secret in [
        KEY_A,
        KEY_B,
        wrong_key,
        "query-secret",
        "Bearer",
        "uthorization",
    ] {
        assert!(
            !output.contains(secret),
            "{secret} appears in the output:\n{output}"
        );
    }
}

#[test]
fn access_log_can_be_turned_off_and_text() {
    let operated = start("[log]\nformat = \"text\"\naccess = false");
    assert_eq!(
        post(&operated.keygate, CLIENT_A, MESSAGES_A, Some(KEY_A)),
        201
    );
    operated.keygate.wait_for_output("config reload started");
    let output = operated.keygate.stdout();
    assert!(
        !output.lines().any(|line| line.starts_with('{')),
        "{output}"
    );
    assert!(!output.contains("request.id"), "{output}");
    assert!(output.contains("config reload started"), "{output}");
    assert!(
        !output.contains('\x1b'),
        "colour codes in a file:\n{output}"
    );
}

#[test]
fn sigterm_drains_then_finishes_requests_in_flight() {
    let operated = start("[shutdown]\ndrain_delay_seconds = 2\ngrace_period_seconds = 20");
    let Operated {
        upstream,
        mut keygate,
        admin,
        ..
    } = operated;
    let address = keygate.address;

    let auth = format!("Bearer {KEY_A}");
    let slow = request(
        "POST",
        MESSAGES_A,
        &[("Authorization", &auth), ("X-Test-Delay-Ms", "4000")],
        BODY,
    );
    let in_flight = thread::spawn(move || send(CLIENT_A, address, &slow));
    wait_until(|| upstream.count() == 1, "the slow request at the upstream");

    keygate.signal("TERM");
    wait_until(
        || admin_get(admin, "/readyz").0 == 503,
        "/readyz to report 503",
    );
    assert_eq!(admin_get(admin, "/readyz").1, "not ready: shutting down\n");
    // During the drain delay, new connections are still accepted and served.
    assert_eq!(post(&keygate, CLIENT_A, MESSAGES_A, Some(KEY_A)), 201);

    wait_until(
        || TcpStream::connect(address).is_err(),
        "the proxy listener to close",
    );
    // The admin listener responds for as long as the process runs.
    assert!(!in_flight.is_finished(), "the slow request ended too early");
    assert_eq!(admin_get(admin, "/readyz").0, 503);
    assert_eq!(admin_get(admin, "/healthz").0, 200);
    let response = in_flight.join().unwrap();
    assert_eq!(response.status, 201);
    assert_eq!(keygate.wait_for_exit(), Some(0));
    assert_eq!(upstream.count(), 2);
    let output = keygate.output();
    assert!(
        output.contains("no request in flight; shutdown complete"),
        "{output}"
    );
    // A connection attempt after the exit is refused too.
    thread::sleep(Duration::from_millis(50));
    assert!(TcpStream::connect(address).is_err());
}

#[test]
fn metrics_count_upstream_errors() {
    let upstream = Upstream::start();
    let listen = free_address("127.0.0.1");
    let admin = free_address("127.0.0.1");
    let config = with_admin(&test_config(&[listen], upstream.address), admin).replacen(
        "read_timeout_ms = 2000",
        "read_timeout_ms = 300",
        1,
    );
    let keygate = Keygate::start(&config, listen);
    wait_for_listener(admin);
    let auth = format!("Bearer {KEY_A}");
    let slow = request(
        "POST",
        MESSAGES_A,
        &[("Authorization", &auth), ("X-Test-Delay-Ms", "2000")],
        BODY,
    );
    let timed_out = send(CLIENT_A, keygate.address, &slow);
    assert_eq!(timed_out.status, 504);
    assert_eq!(timed_out.error_code(), "upstream_timeout");
    assert_eq!(upstream.count(), 1);

    let series = "keygate_requests_total{code=\"upstream_timeout\",outcome=\"upstream_error\"}";
    wait_until(
        || sample(&admin_get(admin, "/metrics").1, series) == Some(1.0),
        "the upstream error in the metrics",
    );
    let metrics = admin_get(admin, "/metrics").1;
    assert_eq!(
        sample(&metrics, "keygate_upstream_responses_total{class=\"2xx\"}"),
        None,
        "{metrics}"
    );
}

/// Starts keygate and an upstream with `RUST_LOG` set to `filter`.
fn start_with_rust_log(filter: &str) -> (Upstream, Keygate) {
    let upstream = Upstream::start();
    let listen = free_address("127.0.0.1");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keygate.toml");
    std::fs::write(&path, test_config(&[listen], upstream.address)).unwrap();
    let keygate = Keygate::start_with_env(dir, path, listen, &[("RUST_LOG", filter.as_ref())]);
    (upstream, keygate)
}

#[test]
fn rust_log_error_keeps_out_info_lines() {
    let (upstream, keygate) = start_with_rust_log("error");
    assert_eq!(post(&keygate, CLIENT_A, MESSAGES_A, Some(KEY_A)), 201);
    assert_eq!(upstream.count(), 1);
    let output = keygate.output();
    assert!(!output.contains("\"level\":\"INFO\""), "{output}");
    assert!(!output.contains("\"level\":\"WARN\""), "{output}");
}

#[test]
fn invalid_rust_log_is_reported() {
    let (_upstream, keygate) = start_with_rust_log("warn,keygate=nonsense");
    let output = keygate.wait_for_output("RUST_LOG is invalid");
    assert!(output.contains("logging at info instead"), "{output}");
    keygate.wait_for_output("proxy listeners accept connections");
}

#[test]
fn sigterm_waits_for_a_header_that_started_arriving() {
    let operated = start("[shutdown]\ndrain_delay_seconds = 1\ngrace_period_seconds = 20");
    let Operated {
        upstream,
        mut keygate,
        ..
    } = operated;
    let address = keygate.address;
    let auth = format!("Bearer {KEY_A}");
    let whole = request("POST", MESSAGES_A, &[("Authorization", &auth)], BODY);
    let (start_of_header, rest) = whole.split_at(20);
    let mut stream = client::connect(CLIENT_A, address);
    stream.write_all(start_of_header).unwrap();

    keygate.signal("TERM");
    wait_until(
        || TcpStream::connect(address).is_err(),
        "the proxy listener to close",
    );
    // Once nothing is in flight for 200 ms after the drain delay, keygate exits. The rest
    // of the header comes later than that, so a header that had started arriving must
    // count as in flight.
    thread::sleep(Duration::from_millis(600));
    stream.write_all(rest).unwrap();
    let response = client::read_response(&mut stream).unwrap();
    assert_eq!(response.status, 201);
    assert_eq!(upstream.count(), 1);
    assert_eq!(keygate.wait_for_exit(), Some(0));
}

//! End-to-end tests of the request path: a raw client, the real keygate binary and a
//! recording upstream, all on loopback.

mod common;

use std::net::SocketAddr;

use common::*;

const BODY: &[u8] = br#"{"recipient":"+15550100","body":"hello"}"#;

#[test]
fn allowed_post_reaches_upstream_once_with_identity_headers() {
    let setup = Setup::start();
    let response = setup.send(CLIENT_A, "POST", MESSAGES_A, Some(KEY_A), BODY);
    assert_eq!(response.status, 201);
    assert_eq!(response.header("x-upstream"), Some("yes"));

    let received = setup.upstream.received();
    assert_eq!(received.len(), 1);
    let request = &received[0];
    assert_eq!(request.method, "POST");
    assert_eq!(request.target, MESSAGES_A);
    assert_eq!(request.body, BODY);
    assert_eq!(
        request.header_values("x-keygate-campaign"),
        vec!["campaign_a"]
    );
    assert_eq!(request.header_values("x-keygate-key-id"), vec!["primary"]);
    assert_eq!(request.header_values("x-forwarded-for"), vec![CLIENT_A]);
    let request_id = request.header_values("x-request-id");
    assert_eq!(request_id.len(), 1);
    assert!(request_id[0].starts_with("req_"));
    assert_eq!(
        request.header("authorization"),
        Some(format!("Bearer {KEY_A}").as_str())
    );
    assert_eq!(request.header("host"), Some("keygate.test"));
}

#[test]
fn query_and_method_reach_upstream_unchanged() {
    let setup = Setup::start();
    let path = "/api/v2/campaigns/campaign_a/messages/message_1?fields=id,status&x=%2F";
    let response = setup.send(CLIENT_A, "GET", path, Some(KEY_A2), b"");
    assert_eq!(response.status, 201);
    let received = setup.upstream.received();
    assert_eq!(received.len(), 1);
    assert_eq!(received[0].method, "GET");
    assert_eq!(received[0].target, path);
    assert_eq!(received[0].header("x-keygate-key-id"), Some("secondary"));
}

#[test]
fn upstream_5xx_passes_through_once() {
    let setup = Setup::start();
    let auth = format!("Bearer {KEY_A}");
    let raw = request(
        "POST",
        MESSAGES_A,
        &[("Authorization", &auth), ("X-Test-Status", "503")],
        BODY,
    );
    let response = send(CLIENT_A, setup.keygate.address, &raw);
    assert_eq!(response.status, 503);
    assert_eq!(response.header("x-upstream"), Some("yes"));
    assert_eq!(response.json()["upstream"], true);
    assert_eq!(setup.upstream.count(), 1);
}

/// Every row of the rejection table: status, code, JSON shape, and nothing upstream.
#[test]
fn rejections_follow_the_table() {
    let setup = Setup::start();
    let cases: &[(&str, &str, Option<&str>, u16, &str)] = &[
        (
            CLIENT_A,
            "/api/v2/campaigns/campaign_a/../campaign_b/messages",
            Some(KEY_A),
            400,
            "parameter_invalid",
        ),
        (CLIENT_A, "/api/v1/other", Some(KEY_A), 404, "not_found"),
        (
            OUTSIDER,
            MESSAGES_A,
            Some(KEY_A),
            403,
            "invalid_ip_address_used",
        ),
        (CLIENT_A, MESSAGES_A, None, 401, "authentication_required"),
        (
            CLIENT_A,
            MESSAGES_A,
            Some("key_test_unknown"),
            401,
            "invalid_api_key_provided",
        ),
        (
            CLIENT_A,
            MESSAGES_A,
            Some(KEY_EXPIRED),
            401,
            "invalid_api_key_provided",
        ),
        (
            CLIENT_A,
            "/api/v2/campaigns/campaign_live/messages",
            Some(KEY_LIVE_A),
            401,
            "invalid_api_key_provided",
        ),
        (
            CLIENT_B,
            MESSAGES_A,
            Some(KEY_A),
            403,
            "invalid_ip_address_used",
        ),
        (
            CLIENT_A,
            MESSAGES_B,
            Some(KEY_A),
            403,
            "campaign_not_allowed",
        ),
    ];
    for &(from, path, key, status, code) in cases {
        let response = setup.send(from, "POST", path, key, BODY);
        let context = format!("{from} {path} {key:?}");
        assert_eq!(response.status, status, "{context}");
        assert_eq!(
            response.header("content-type"),
            Some("application/json"),
            "{context}"
        );
        let request_id = response
            .header("x-request-id")
            .expect("X-Request-Id")
            .to_owned();
        let json = response.json();
        assert_eq!(json["error"]["code"], code, "{context}");
        assert_eq!(json["error"]["id"], request_id.as_str(), "{context}");
        assert!(
            json["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "{context}"
        );
        assert!(
            json["error"]["type"]
                .as_str()
                .is_some_and(|t| !t.is_empty()),
            "{context}"
        );
    }
    assert_eq!(setup.upstream.count(), 0);
}

#[test]
fn missing_key_gets_bearer_challenge() {
    let setup = Setup::start();
    let response = setup.send(CLIENT_A, "GET", MESSAGES_A, None, b"");
    assert_eq!(response.status, 401);
    assert_eq!(response.header("www-authenticate"), Some("Bearer"));
}

#[test]
fn rejection_keeps_small_body_connection_alive() {
    let setup = Setup::start();
    let mut stream = client::connect(CLIENT_A, setup.keygate.address);
    let bad = request(
        "POST",
        MESSAGES_A,
        &[("Authorization", "Bearer key_test_nope")],
        BODY,
    );
    let first = send_raw(&mut stream, &bad).unwrap();
    assert_eq!(first.status, 401);
    assert_ne!(first.header("connection"), Some("close"));
    let auth = format!("Bearer {KEY_A}");
    let good = request("POST", MESSAGES_A, &[("Authorization", &auth)], BODY);
    let second = send_raw(&mut stream, &good).expect("the connection stays open");
    assert_eq!(second.status, 201);
    let received = setup.upstream.received();
    assert_eq!(received.len(), 1);
    assert_eq!(received[0].body, BODY);
}

#[test]
fn ipv6_client_is_checked_against_ipv6_entries() {
    let setup = Setup::start_on(&["::1"]);
    let response = setup.send("::1", "POST", MESSAGES_A, Some(KEY_A), BODY);
    assert_eq!(response.status, 201);
    let received = setup.upstream.received();
    assert_eq!(received.len(), 1);
    assert_eq!(received[0].header("x-forwarded-for"), Some("::1"));

    let response = setup.send("::1", "POST", MESSAGES_B, Some(KEY_B), BODY);
    assert_eq!(response.status, 403);
    assert_eq!(response.error_code(), "invalid_ip_address_used");
    assert_eq!(setup.upstream.count(), 1);
}

/// IPv4 clients on a dual-stack listener show up as IPv4-mapped IPv6 peers.
#[test]
fn dual_stack_listener_matches_ipv4_entries() {
    let setup = Setup::start_on(&["::"]);
    let port = setup.keygate.address.port();
    let v4: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let v6: SocketAddr = format!("[::1]:{port}").parse().unwrap();
    let auth = format!("Bearer {KEY_A}");
    let post = request("POST", MESSAGES_A, &[("Authorization", &auth)], BODY);

    assert_eq!(send(CLIENT_A, v4, &post).status, 201);
    assert_eq!(send("::1", v6, &post).status, 201);
    let outsider = send(OUTSIDER, v4, &post);
    assert_eq!(outsider.status, 403);
    assert_eq!(outsider.error_code(), "invalid_ip_address_used");

    let received = setup.upstream.received();
    assert_eq!(received.len(), 2);
    assert_eq!(received[0].header("x-forwarded-for"), Some(CLIENT_A));
    assert_eq!(received[1].header("x-forwarded-for"), Some("::1"));
}

#[test]
fn unreachable_upstream_gives_502_without_retry() {
    let closed = free_address("127.0.0.1");
    let listen = free_address("127.0.0.1");
    let keygate = Keygate::start(&test_config(&[listen], closed), listen);
    let auth = format!("Bearer {KEY_A}");
    let response = send(
        CLIENT_A,
        listen,
        &request("POST", MESSAGES_A, &[("Authorization", &auth)], BODY),
    );
    assert_eq!(response.status, 502);
    assert_eq!(response.error_code(), "upstream_unavailable");
    assert_eq!(response.header("content-type"), Some("application/json"));
    drop(keygate);
}

#[test]
fn slow_upstream_gives_504_and_is_not_retried() {
    let setup = Setup::start();
    let auth = format!("Bearer {KEY_A}");
    let raw = request(
        "POST",
        MESSAGES_A,
        &[("Authorization", &auth), ("X-Test-Delay-Ms", "3000")],
        BODY,
    );
    let response = send(CLIENT_A, setup.keygate.address, &raw);
    assert_eq!(response.status, 504);
    assert_eq!(response.error_code(), "upstream_timeout");
    // The read timeout is 2 s; wait past the upstream's delay to be sure that no second
    // copy arrives.
    std::thread::sleep(std::time::Duration::from_millis(1500));
    assert_eq!(setup.upstream.count(), 1);
}

//! Hostile-input cases: forwarded-address spoofing, dual-stack peers, ambiguous paths,
//! query strings and malformed `Authorization` headers. Each case asserts both what the
//! client got and what the upstream received.

mod common;

use std::io::Write;
use std::net::SocketAddr;

use common::*;

const BODY: &[u8] = br#"{"recipient":"+15550100"}"#;

fn bearer(key: &str) -> String {
    format!("Bearer {key}")
}

/// C1: forwarded-address headers never move the client.
#[test]
fn forwarded_headers_do_not_move_the_client() {
    let setup = Setup::start();
    let auth = bearer(KEY_A);
    let spoofed: Vec<(&str, &str)> = vec![
        ("Authorization", &auth),
        ("X-Forwarded-For", CLIENT_A),
        ("X-Real-IP", CLIENT_A),
        ("x-real-ip", CLIENT_A),
        ("X-REAL-IP", CLIENT_A),
        ("X_Real_IP", CLIENT_A),
        ("Forwarded", "for=127.0.0.10"),
        ("True-Client-IP", CLIENT_A),
        ("X-Keygate-Campaign", "campaign_b"),
        ("X_Keygate_Key_Id", "forged"),
    ];
    let raw = request("POST", MESSAGES_A, &spoofed, BODY);

    let response = send(OUTSIDER, setup.keygate.address, &raw);
    assert_eq!(response.status, 403);
    assert_eq!(response.error_code(), "invalid_ip_address_used");
    assert_eq!(setup.upstream.count(), 0);

    let response = send(CLIENT_A, setup.keygate.address, &raw);
    assert_eq!(response.status, 201);
    let received = setup.upstream.received();
    assert_eq!(received.len(), 1);
    let request = &received[0];
    assert_eq!(request.header_values("x-forwarded-for"), vec![CLIENT_A]);
    assert!(request.header_values("x-real-ip").is_empty());
    assert!(request.header_values("x_real_ip").is_empty());
    assert!(request.header_values("forwarded").is_empty());
    assert!(request.header_values("true-client-ip").is_empty());
    assert_eq!(
        request.header_values("x-keygate-campaign"),
        vec!["campaign_a"]
    );
    assert_eq!(request.header_values("x-keygate-key-id"), vec!["primary"]);
    assert!(request.header_values("x_keygate_key_id").is_empty());
}

/// C2: an IPv4 client on a `[::]` listener matches IPv4 entries exactly.
#[test]
fn ipv4_client_on_dual_stack_listener() {
    let setup = Setup::start_on(&["::"]);
    let v4: SocketAddr = format!("127.0.0.1:{}", setup.keygate.address.port())
        .parse()
        .unwrap();
    let auth = bearer(KEY_A);
    let raw = request("POST", MESSAGES_A, &[("Authorization", &auth)], BODY);
    assert_eq!(send(CLIENT_A, v4, &raw).status, 201);
    let outsider = send(OUTSIDER, v4, &raw);
    assert_eq!(outsider.status, 403);
    let from_b = send(CLIENT_B, v4, &raw);
    assert_eq!(from_b.status, 403);
    let received = setup.upstream.received();
    assert_eq!(received.len(), 1);
    assert_eq!(received[0].header("x-forwarded-for"), Some(CLIENT_A));
}

/// C4 and C5: encoded separators, dot segments, path parameters and empty segments. A
/// fragment is rejected too, because Pingora drops it and the upstream would receive a
/// target that the client never sent.
#[test]
fn ambiguous_paths_are_rejected() {
    let setup = Setup::start();
    let auth = bearer(KEY_A);
    let paths = [
        "/api/v2/campaigns/campaign_a%2F..%2Fcampaign_b/messages",
        "/api/v2/campaigns/campaign_a%2f..%2fcampaign_b/messages",
        "/api/v2/campaigns/campaign_a%5C..%5Ccampaign_b/messages",
        "/api/v2/campaigns/campaign_a%5c..%5ccampaign_b/messages",
        "/api/v2/campaigns/campaign_a/../campaign_b/messages",
        "/api/v2/campaigns/campaign_a/%2e%2e/campaign_b/messages",
        "/api/v2/campaigns/campaign_a/%2E%2E/campaign_b/messages",
        "/api/v2/campaigns/campaign_a/./messages",
        "/api/v2/campaigns/campaign_a/..;/campaign_b/messages",
        "/api/v2/campaigns/campaign_a;x=1/messages",
        "/api/v2/campaigns//campaign_a/messages",
        "/api/v2/campaigns/campaign_a/messages/",
        "/api/v2/campaigns/campaign_a/%zz",
        "/api/v2/campaigns/campaign_a/%00",
        "/api/v2/campaigns/campaign_a\\..\\campaign_b/messages",
        "http://keygate.test/api/v2/campaigns/campaign_a/messages",
        "/api/v2/campaigns/campaign_a/messages#top",
        "/api/v2/campaigns/campaign_a/messages#",
        "/api/v2/campaigns/campaign_a#/../campaign_b/messages",
        "/api/v2/campaigns/campaign_a/messages?page=2#top",
        "/api/v2/campaigns/campaign_a/messages?#",
    ];
    for path in paths {
        let raw = request("POST", path, &[("Authorization", &auth)], BODY);
        let response = send(CLIENT_A, setup.keygate.address, &raw);
        assert_eq!(response.status, 400, "{path}");
        assert_eq!(response.error_code(), "parameter_invalid", "{path}");
    }
    assert_eq!(setup.upstream.count(), 0);
}

/// C6: the campaign comes from the path alone, never from the query.
#[test]
fn query_string_has_no_say() {
    let setup = Setup::start();
    let cases: &[(&str, Option<&str>, u16)] = &[
        (
            "/api/v2/campaigns/campaign_b/messages?next=/api/v2/campaigns/campaign_a/messages",
            Some(KEY_A),
            403,
        ),
        (
            "/api/v2/campaigns/campaign_b/messages?campaignId=campaign_a",
            Some(KEY_A),
            403,
        ),
        ("/api/v2/campaigns/campaign_b/messages?/healthz", None, 401),
    ];
    for &(path, key, status) in cases {
        let response = setup.send(CLIENT_A, "GET", path, key, b"");
        assert_eq!(response.status, status, "{path}");
    }
    assert_eq!(setup.upstream.count(), 0);
}

/// C7: parsing `Authorization`.
#[test]
fn authorization_header_forms() {
    let setup = Setup::start();
    let accepted = [
        format!("bearer {KEY_A}"),
        format!("Bearer   {KEY_A}"),
        format!("BEARER {KEY_A}"),
    ];
    for value in &accepted {
        let raw = request("POST", MESSAGES_A, &[("Authorization", value)], BODY);
        let response = send(CLIENT_A, setup.keygate.address, &raw);
        assert_eq!(response.status, 201, "{value}");
    }
    assert_eq!(setup.upstream.count(), accepted.len());

    let basic = format!("Basic {}", base64_of(&format!("{KEY_A}:")));
    let rejected: Vec<Vec<u8>> = vec![
        format!("Bearer {KEY_A}, Bearer {KEY_B}").into_bytes(),
        basic.into_bytes(),
        b"Bearer".to_vec(),
        b"Bearer ".to_vec(),
        format!("Bearer{KEY_A}").into_bytes(),
        format!("Bearer {KEY_A}\t").into_bytes(),
        format!("Bearer {KEY_A}\tx").into_bytes(),
        [format!("Bearer {KEY_A}").as_bytes(), b"\xc3\xa9"].concat(),
        format!("Bearer key_test_{}", "A".repeat(16 * 1024)).into_bytes(),
    ];
    for value in &rejected {
        let mut raw = format!("POST {MESSAGES_A} HTTP/1.1\r\nHost: keygate.test\r\nContent-Length: {}\r\nAuthorization: ", BODY.len()).into_bytes();
        raw.extend_from_slice(value);
        raw.extend_from_slice(b"\r\n\r\n");
        raw.extend_from_slice(BODY);
        let response = send(CLIENT_A, setup.keygate.address, &raw);
        let shown = String::from_utf8_lossy(&value[..value.len().min(60)]).into_owned();
        assert!(
            matches!(response.status, 400 | 401 | 431),
            "{shown}: {}",
            response.status
        );
        if value.len() < 1024 {
            assert_eq!(response.status, 401, "{shown}");
            assert_eq!(response.error_code(), "invalid_api_key_provided", "{shown}");
        }
    }

    let auth = bearer(KEY_A);
    let two_headers = request(
        "POST",
        MESSAGES_A,
        &[("Authorization", &auth), ("Authorization", &auth)],
        BODY,
    );
    assert_eq!(
        send(CLIENT_A, setup.keygate.address, &two_headers).status,
        401
    );

    assert_eq!(setup.upstream.count(), accepted.len());
    // keygate is still serving after every malformed header.
    assert_eq!(
        setup
            .send(CLIENT_A, "POST", MESSAGES_A, Some(KEY_A), BODY)
            .status,
        201
    );
}

/// Bytes that are not a valid request close the connection without reaching upstream.
#[test]
fn garbage_request_does_not_reach_upstream() {
    let setup = Setup::start();
    let mut stream = client::connect(CLIENT_A, setup.keygate.address);
    stream.write_all(b"\x16\x03\x01garbage\r\n\r\n").unwrap();
    let _ = client::read_response(&mut stream);
    assert_eq!(setup.upstream.count(), 0);
    assert_eq!(
        setup
            .send(CLIENT_A, "POST", MESSAGES_A, Some(KEY_A), BODY)
            .status,
        201
    );
}

/// A request header that is not valid HTTP/1.1 gets keygate's JSON 400, and nothing of it
/// reaches the upstream.
#[test]
fn malformed_headers_get_a_json_400() {
    let setup = Setup::start();
    let auth = bearer(KEY_A);
    let head =
        format!("POST {MESSAGES_A} HTTP/1.1\r\nHost: keygate.test\r\nAuthorization: {auth}\r\n");
    for bad_line in [
        "X Bad Name: value\r\n",
        "X-Folded: first\r\n second\r\n",
        "No colon here\r\n",
    ] {
        let raw = format!("{head}{bad_line}Content-Length: 0\r\n\r\n");
        let response = client::send(CLIENT_A, setup.keygate.address, raw.as_bytes());
        assert_eq!(response.status, 400, "{bad_line:?}");
        assert_eq!(response.error_code(), "parameter_invalid", "{bad_line:?}");
        assert_eq!(
            response.header("content-type"),
            Some("application/json"),
            "{bad_line:?}"
        );
        assert!(response.header("x-request-id").is_some(), "{bad_line:?}");
    }
    assert_eq!(setup.upstream.count(), 0);
    assert!(setup.upstream.wire_bytes().is_empty());
    let output = setup
        .keygate
        .wait_for_output("\"code\":\"parameter_invalid\"");
    assert!(output.contains("\"status\":400"), "{output}");
}

fn base64_of(text: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(text)
}

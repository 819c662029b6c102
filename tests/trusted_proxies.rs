//! End-to-end tests of client addresses behind trusted proxies: `X-Forwarded-For` counts
//! only from a trusted peer, chains are walked from the right, and anything malformed
//! falls back to the peer.

mod common;

use std::net::SocketAddr;

use common::*;

const BODY: &[u8] = br#"{"recipient":"+15550100"}"#;
const PROXY: &str = "127.0.0.30";
const INNER_PROXY: &str = "127.0.0.31";
const TRUSTED: &str = "[client_ip]\ntrusted_proxies = [\"127.0.0.30/31\", \"::1\"]";

struct Proxied {
    upstream: Upstream,
    keygate: Keygate,
    v6: SocketAddr,
}

fn start() -> Proxied {
    let upstream = Upstream::start();
    let port = free_address("127.0.0.1").port();
    let v4: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let v6: SocketAddr = format!("[::1]:{port}").parse().unwrap();
    let config = with_sections(&test_config(&[v4, v6], upstream.address), TRUSTED);
    let keygate = Keygate::start(&config, v4);
    wait_for_listener(v6);
    Proxied {
        upstream,
        keygate,
        v6,
    }
}

fn post_via(
    from: &str,
    to: SocketAddr,
    path: &str,
    key: &str,
    forwarded_for: Option<&str>,
) -> Response {
    let auth = format!("Bearer {key}");
    let mut headers = vec![("Authorization", auth.as_str())];
    if let Some(chain) = forwarded_for {
        headers.push(("X-Forwarded-For", chain));
    }
    send(from, to, &request("POST", path, &headers, BODY))
}

#[test]
fn untrusted_peer_cannot_spoof() {
    let proxied = start();
    let response = post_via(
        OUTSIDER,
        proxied.keygate.address,
        MESSAGES_A,
        KEY_A,
        Some(CLIENT_A),
    );
    assert_eq!(response.status, 403);
    assert_eq!(response.error_code(), "invalid_ip_address_used");
    assert_eq!(proxied.upstream.count(), 0);
}

#[test]
fn trusted_proxy_names_the_client() {
    let proxied = start();
    let response = post_via(
        PROXY,
        proxied.keygate.address,
        MESSAGES_A,
        KEY_A,
        Some(CLIENT_A),
    );
    assert_eq!(response.status, 201);
    let received = proxied.upstream.received();
    assert_eq!(received.len(), 1);
    assert_eq!(received[0].header_values("x-forwarded-for"), vec![CLIENT_A]);

    let access = proxied
        .keygate
        .wait_for_output("\"peer.ip\":\"127.0.0.30\"");
    assert!(access.contains("\"client.ip\":\"127.0.0.10\""), "{access}");
}

#[test]
fn trusted_chain_walked_from_right() {
    let proxied = start();
    let address = proxied.keygate.address;
    // The leftmost entry is whatever the client claimed; the hops to its right count.
    let chain = format!("{OUTSIDER}, {CLIENT_A}, {INNER_PROXY}");
    assert_eq!(
        post_via(PROXY, address, MESSAGES_A, KEY_A, Some(&chain)).status,
        201
    );
    let chain = format!("{CLIENT_A}, {OUTSIDER}, {INNER_PROXY}");
    assert_eq!(
        post_via(PROXY, address, MESSAGES_A, KEY_A, Some(&chain)).status,
        403
    );
    let received = proxied.upstream.received();
    assert_eq!(received.len(), 1);
    assert_eq!(received[0].header_values("x-forwarded-for"), vec![CLIENT_A]);
}

#[test]
fn ipv6_trusted_proxy() {
    let proxied = start();
    let response = post_via("::1", proxied.v6, MESSAGES_B, KEY_B, Some(CLIENT_B));
    assert_eq!(response.status, 201);
    let received = proxied.upstream.received();
    assert_eq!(received[0].header_values("x-forwarded-for"), vec![CLIENT_B]);
    assert_eq!(received[0].header("x-keygate-campaign"), Some("campaign_b"));
}

#[test]
fn malformed_header_makes_the_peer_the_client() {
    let proxied = start();
    let address = proxied.keygate.address;
    for chain in ["garbage", "127.0.0.10:443", "127.0.0.10,,", ""] {
        let response = post_via(PROXY, address, MESSAGES_A, KEY_A, Some(chain));
        assert_eq!(response.status, 403, "{chain:?}");
    }
    assert_eq!(
        post_via(PROXY, address, MESSAGES_A, KEY_A, None).status,
        403
    );
    assert_eq!(proxied.upstream.count(), 0);
}

#[test]
fn trusted_proxies_reload_with_the_table() {
    let proxied = start();
    let address = proxied.keygate.address;
    assert_eq!(
        post_via(PROXY, address, MESSAGES_A, KEY_A, Some(CLIENT_A)).status,
        201
    );
    let config = std::fs::read_to_string(&proxied.keygate.config_path).unwrap();
    replace_file(
        &proxied.keygate.config_path,
        &config.replacen("\"127.0.0.30/31\", ", "", 1),
    );
    wait_until(
        || post_via(PROXY, address, MESSAGES_A, KEY_A, Some(CLIENT_A)).status == 403,
        "the proxy to lose its trust",
    );
    assert!(proxied
        .keygate
        .stdout()
        .contains("\"trusted_proxies.changed\":true"));
}

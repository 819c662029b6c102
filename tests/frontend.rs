//! End-to-end tests of the connection front end: the PROXY protocol on the listeners that
//! expect it, and the deadline for receiving a request header.

mod common;

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::thread;
use std::time::{Duration, Instant};

use common::*;

const BODY: &[u8] = br#"{"recipient":"+15550100"}"#;
const PROXY: &str = "127.0.0.30";

struct Fronted {
    upstream: Upstream,
    keygate: Keygate,
    proxied: SocketAddr,
}

/// Starts keygate with a plain listener, a PROXY protocol listener, 127.0.0.30 as the
/// trusted proxy and a header timeout of 1 s.
fn start() -> Fronted {
    let upstream = Upstream::start();
    let listen = free_address("127.0.0.1");
    let proxied = free_address("127.0.0.1");
    let config = with_sections(
        &test_config(&[listen], upstream.address),
        &format!(
            "[client_ip]\ntrusted_proxies = [\"{PROXY}\"]\n\n[limits]\nheader_timeout_seconds = 1"
        ),
    )
    .replacen(
        "\n\n[upstream]",
        &format!("\nproxy_protocol = [\"{proxied}\"]\n\n[upstream]"),
        1,
    );
    let keygate = Keygate::start(&config, listen);
    wait_for_listener(proxied);
    Fronted {
        upstream,
        keygate,
        proxied,
    }
}

fn authorized_post() -> Vec<u8> {
    let auth = format!("Bearer {KEY_A}");
    request("POST", MESSAGES_A, &[("Authorization", &auth)], BODY)
}

fn v2_header(source: [u8; 4], source_port: u16) -> Vec<u8> {
    v2_header_with_tlvs(source, source_port, &[])
}

/// Builds a v2 PROXY header for a TCP over IPv4 connection, with `tlvs` after the addresses.
fn v2_header_with_tlvs(source: [u8; 4], source_port: u16, tlvs: &[u8]) -> Vec<u8> {
    let mut header = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    header.extend_from_slice(&[0x21, 0x11]);
    header.extend_from_slice(&(12 + tlvs.len() as u16).to_be_bytes());
    header.extend_from_slice(&source);
    header.extend_from_slice(&[127, 0, 0, 1]);
    header.extend_from_slice(&source_port.to_be_bytes());
    header.extend_from_slice(&8080u16.to_be_bytes());
    header.extend_from_slice(tlvs);
    header
}

/// Returns TLVs of `length` bytes as a load balancer sends them: an AWS VPC endpoint id
/// (type 0xEA) and a NOOP (type 0x04) that fills the rest.
fn tlvs_of_length(length: usize) -> Vec<u8> {
    let endpoint = b"\x01vpce-08d2bf15fac5001c9";
    let mut tlvs = vec![0xEA];
    tlvs.extend_from_slice(&(endpoint.len() as u16).to_be_bytes());
    tlvs.extend_from_slice(endpoint);
    let padding = length - tlvs.len() - 3;
    tlvs.push(0x04);
    tlvs.extend_from_slice(&(padding as u16).to_be_bytes());
    tlvs.resize(length, 0);
    tlvs
}

/// Sends the start of a request header, one byte every 200 ms for 0.8 s. No single read
/// waits long, but the header is not complete when the 1 s deadline passes.
fn send_header_slowly(stream: &mut std::net::TcpStream) {
    let request = authorized_post();
    let started = Instant::now();
    for byte in &request[..20] {
        if started.elapsed() > Duration::from_millis(800) {
            break;
        }
        stream.write_all(&[*byte]).unwrap();
        thread::sleep(Duration::from_millis(200));
    }
}

/// Reads until the peer closes the connection; returns what arrived.
fn read_to_close(stream: &mut std::net::TcpStream) -> Vec<u8> {
    stream.set_read_timeout(Some(DEADLINE)).unwrap();
    let mut received = Vec::new();
    let _ = stream.read_to_end(&mut received);
    received
}

#[test]
fn proxy_v1_header_names_the_client() {
    let fronted = start();
    let mut stream = client::connect(PROXY, fronted.proxied);
    stream
        .write_all(format!("PROXY TCP4 {CLIENT_A} 127.0.0.1 50000 8080\r\n").as_bytes())
        .unwrap();
    let first = send_raw(&mut stream, &authorized_post()).unwrap();
    assert_eq!(first.status, 201);
    // The header comes once per connection; the next request on it needs none.
    let second = send_raw(&mut stream, &authorized_post()).unwrap();
    assert_eq!(second.status, 201);
    let received = fronted.upstream.received();
    assert_eq!(received.len(), 2);
    assert_eq!(received[0].header_values("x-forwarded-for"), vec![CLIENT_A]);
}

#[test]
fn proxy_v2_header_names_the_client() {
    let fronted = start();
    let mut stream = client::connect(PROXY, fronted.proxied);
    stream
        .write_all(&v2_header([127, 0, 0, 66], 50001))
        .unwrap();
    let response = send_raw(&mut stream, &authorized_post()).unwrap();
    // 127.0.0.66 is on no allowlist: the decision used the address from the header.
    assert_eq!(response.status, 403);
    let mut stream = client::connect(PROXY, fronted.proxied);
    stream
        .write_all(&v2_header([127, 0, 0, 10], 50002))
        .unwrap();
    assert_eq!(
        send_raw(&mut stream, &authorized_post()).unwrap().status,
        201
    );
    assert_eq!(
        fronted.upstream.received()[0].header("x-forwarded-for"),
        Some(CLIENT_A)
    );
}

#[test]
fn proxy_v2_header_with_tlvs_in_pieces() {
    let fronted = start();
    let header = v2_header_with_tlvs([127, 0, 0, 10], 50003, &tlvs_of_length(800 - 28));
    assert_eq!(header.len(), 800);
    let mut stream = client::connect(PROXY, fronted.proxied);
    // Without Nagle's algorithm each write leaves as its own segment, so keygate can read
    // the header in several parts. The kernel may still merge some of them.
    stream.set_nodelay(true).unwrap();
    for piece in header.chunks(100) {
        stream.write_all(piece).unwrap();
    }
    let response = send_raw(&mut stream, &authorized_post()).unwrap();
    assert_eq!(response.status, 201);
    let received = fronted.upstream.received();
    assert_eq!(received.len(), 1);
    assert_eq!(received[0].header_values("x-forwarded-for"), vec![CLIENT_A]);
    assert_eq!(received[0].body, BODY);
}

#[test]
fn proxy_header_from_untrusted_peer_is_refused() {
    let fronted = start();
    let mut stream = client::connect(OUTSIDER, fronted.proxied);
    stream
        .write_all(format!("PROXY TCP4 {CLIENT_A} 127.0.0.1 50000 8080\r\n").as_bytes())
        .unwrap();
    stream.write_all(&authorized_post()).unwrap();
    assert!(read_to_close(&mut stream).is_empty());
    assert_eq!(fronted.upstream.count(), 0);
}

#[test]
fn missing_proxy_header_closes_the_connection() {
    let fronted = start();
    let mut stream = client::connect(PROXY, fronted.proxied);
    stream.write_all(&authorized_post()).unwrap();
    assert!(read_to_close(&mut stream).is_empty());
    assert_eq!(fronted.upstream.count(), 0);
    // The plain listener does not read a PROXY header: there it is a bad request line.
    let mut plain = client::connect(PROXY, fronted.keygate.address);
    plain
        .write_all(format!("PROXY TCP4 {CLIENT_A} 127.0.0.1 50000 8080\r\n").as_bytes())
        .unwrap();
    plain.write_all(&authorized_post()).unwrap();
    let _ = read_to_close(&mut plain);
    assert_eq!(fronted.upstream.count(), 0);
}

#[test]
fn slow_header_gets_408() {
    let fronted = start();
    let mut stream = client::connect(CLIENT_A, fronted.keygate.address);
    send_header_slowly(&mut stream);
    let received = String::from_utf8_lossy(&read_to_close(&mut stream)).into_owned();
    assert!(received.starts_with("HTTP/1.1 408 "), "{received}");
    assert!(
        received.contains("\"code\":\"request_timeout\""),
        "{received}"
    );
    assert_eq!(fronted.upstream.count(), 0);
    // The 408 writes an access log line like any other response.
    let output = fronted.keygate.wait_for_output("\"status\":408");
    let line = output
        .lines()
        .find(|line| line.contains("\"status\":408"))
        .unwrap();
    assert!(line.contains("\"code\":\"request_timeout\""), "{line}");
    assert!(
        line.contains(&format!("\"client.ip\":\"{CLIENT_A}\"")),
        "{line}"
    );
}

#[test]
fn silent_connection_gets_408() {
    let fronted = start();
    let mut stream = client::connect(CLIENT_A, fronted.keygate.address);
    let received = String::from_utf8_lossy(&read_to_close(&mut stream)).into_owned();
    assert!(received.starts_with("HTTP/1.1 408 "), "{received}");
}

#[test]
fn idle_keepalive_outlasts_header_timeout() {
    let fronted = start();
    let mut stream = client::connect(CLIENT_A, fronted.keygate.address);
    assert_eq!(
        send_raw(&mut stream, &authorized_post()).unwrap().status,
        201
    );
    // Longer than the 1 s header timeout, shorter than the 60 s keep-alive timeout.
    thread::sleep(Duration::from_millis(1500));
    assert_eq!(
        send_raw(&mut stream, &authorized_post()).unwrap().status,
        201
    );
    assert_eq!(fronted.upstream.count(), 2);
}

#[test]
fn slow_header_of_a_later_request_gets_408() {
    let fronted = start();
    let mut stream = client::connect(CLIENT_A, fronted.keygate.address);
    assert_eq!(
        send_raw(&mut stream, &authorized_post()).unwrap().status,
        201
    );
    send_header_slowly(&mut stream);
    let received = String::from_utf8_lossy(&read_to_close(&mut stream)).into_owned();
    assert!(received.starts_with("HTTP/1.1 408 "), "{received}");
    assert_eq!(fronted.upstream.count(), 1);
}

/// Behind the PROXY protocol the client's own `X-Forwarded-For` never counts, not even
/// when the header carries no address (`UNKNOWN`, as in load balancer health checks).
#[test]
fn proxy_listener_ignores_forwarded_for() {
    let fronted = start();
    let auth = format!("Bearer {KEY_A}");
    let spoofed = request(
        "POST",
        MESSAGES_A,
        &[("Authorization", &auth), ("X-Forwarded-For", CLIENT_A)],
        BODY,
    );
    let mut stream = client::connect(PROXY, fronted.proxied);
    stream.write_all(b"PROXY UNKNOWN\r\n").unwrap();
    let response = send_raw(&mut stream, &spoofed).unwrap();
    assert_eq!(response.status, 403);
    assert_eq!(fronted.upstream.count(), 0);
}

#[test]
fn rejection_does_not_wait_for_a_missing_body() {
    let fronted = start();
    let mut stream = client::connect(CLIENT_A, fronted.keygate.address);
    let head = format!(
        "POST {MESSAGES_A} HTTP/1.1\r\nHost: keygate.test\r\nAuthorization: Bearer key_test_wrong\r\nContent-Length: 400\r\n\r\n"
    );
    stream.write_all(head.as_bytes()).unwrap();
    // The drain gives up after 2 s; without that limit the response would come only after
    // Pingora's 60 s read timeout, and the test client's 10 s read timeout would fail this.
    let response =
        client::read_response(&mut stream).expect("a response before the client's read timeout");
    assert_eq!(response.status, 401);
}

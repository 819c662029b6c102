//! The connection front end, in place of Pingora's own handling of each new connection.
//! It reads the PROXY protocol header on the listeners that expect one. It also gives each
//! request header a deadline, with a 408 response when a client is too slow. The bytes it reads
//! are handed back (`rewind`) so the proxy parses the request as it arrived.
//!
//! Pingora 0.9.1 has no public setting for either: its pre-TLS hook runs only on TLS
//! listeners, and it reads a request header with a fixed timeout per read and sends no response.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use async_trait::async_trait;
use pingora::apps::{HttpPersistentSettings, HttpServerApp, ServerApp};
use pingora::protocols::http::ServerSession;
use pingora::protocols::l4::socket::SocketAddr as PeerAddr;
use pingora::protocols::l4::stream::Stream as L4Stream;
use pingora::protocols::SocketDigest;
use pingora::protocols::Stream;
use pingora::proxy::HttpProxy;
use pingora::server::ShutdownWatch;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::{timeout_at, Instant};

use crate::lifecycle::{InFlight, Lifecycle};
use crate::metrics::{Metrics, RequestOutcome};
use crate::proxy::{error_body, reason_phrase, reply_for, AccessLine, ErrorReply, Keygate};
use crate::table::Denial;
use crate::table::Table;

/// The longest PROXY protocol header: v2's 16-byte preamble and the 65,535 bytes of
/// addresses and TLVs that its length field can announce. A v1 header has at most 107.
const MAX_PROXY_HEADER: usize = 16 + u16::MAX as usize;
/// The maximum number of header lines in a request; Pingora rejects more.
const MAX_HEADERS: usize = 256;
const PROXY_V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";

/// Settings of the front end.
#[derive(Debug, Clone, Copy)]
pub struct FrontendLimits {
    /// The time from a connection, or a request's first byte, to the end of its header.
    pub header_timeout: Duration,
    /// How long an idle keep-alive connection waits for the next request.
    pub keepalive_timeout: Duration,
    /// Past this many bytes the header is handed to the proxy, which rejects it with 431.
    pub max_header_bytes: usize,
}

/// The front end of one group of listeners.
pub struct Frontend {
    pub proxy: Arc<HttpProxy<Keygate>>,
    pub table: Arc<ArcSwap<Table>>,
    pub metrics: Arc<Metrics>,
    pub limits: FrontendLimits,
    /// Whether every connection must start with a PROXY protocol header.
    pub proxy_protocol: bool,
    /// Whether a rejection sent by the front end writes an access log line, as every
    /// other response does.
    pub access_log: bool,
    /// Counts requests in flight from their first byte, for the shutdown sequence.
    pub lifecycle: Arc<Lifecycle>,
}

#[async_trait]
impl ServerApp for Frontend {
    /// Serves every request of one connection. Pingora's own loop over keep-alive
    /// requests is replaced by this one, so each request header gets its deadline.
    async fn process_new(
        self: &Arc<Self>,
        stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        let mut stream = stream;
        let mut buffer = Vec::with_capacity(4096);
        let started = Instant::now();
        if self.proxy_protocol {
            self.accept_proxy_header(&mut stream, &mut buffer, started)
                .await?;
        }
        let mut persistent: Option<HttpPersistentSettings> = None;
        let mut first = true;
        loop {
            let in_flight = self
                .read_header(&mut stream, &mut buffer, first, started, shutdown)
                .await?;
            if let Some(reply) = self.malformed(&buffer) {
                self.reject(&mut stream, &reply, started.elapsed()).await;
                return None;
            }
            first = false;
            // The buffer keeps its capacity, so the next request and the body bytes that
            // came with it are read at once. A body split here would cost one more write
            // to the upstream.
            let rewound = rewind(stream, &buffer)?;
            buffer.clear();
            let mut session = ServerSession::new_http1(rewound);
            let keepalive =
                (!*shutdown.borrow()).then_some(self.limits.keepalive_timeout.as_secs());
            session.set_keepalive(keepalive);
            if let Some(settings) = persistent.take() {
                settings.apply_to_session(&mut session);
            }
            let reused = self.proxy.process_new_http(session, shutdown).await?;
            drop(in_flight);
            (stream, persistent) = reused.consume();
        }
    }
}

impl Frontend {
    /// Reads until the end of a request header, or sends 408 and returns `None` when the
    /// deadline passes. An idle keep-alive connection that sends nothing is closed quietly.
    /// From its first byte the request counts as in flight for the shutdown sequence, until
    /// the returned guard is dropped.
    async fn read_header(
        &self,
        stream: &mut Stream,
        buffer: &mut Vec<u8>,
        first: bool,
        connected: Instant,
        shutdown: &ShutdownWatch,
    ) -> Option<InFlight> {
        if buffer.is_empty() {
            let idle_limit = if first {
                connected + self.limits.header_timeout
            } else {
                Instant::now() + self.limits.keepalive_timeout
            };
            let mut shutdown = shutdown.clone();
            let read = tokio::select! {
                read = timeout_at(idle_limit, stream.read_buf(buffer)) => read,
                _ = shutdown.wait_for(|stopping| *stopping), if !first => return None,
            };
            match read {
                Ok(Ok(0)) | Ok(Err(_)) => return None,
                Ok(Ok(_)) => {}
                Err(_) if first => {
                    self.timed_out(stream).await;
                    return None;
                }
                Err(_) => return None,
            }
        }
        let in_flight = self.lifecycle.track_request();
        let deadline = if first {
            connected + self.limits.header_timeout
        } else {
            Instant::now() + self.limits.header_timeout
        };
        while !header_complete(buffer) && buffer.len() <= self.limits.max_header_bytes {
            match timeout_at(deadline, stream.read_buf(buffer)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return None,
                Ok(Ok(_)) => {}
                Err(_) => {
                    self.timed_out(stream).await;
                    return None;
                }
            }
        }
        Some(in_flight)
    }

    /// Sends 408 to a client that did not send its request header in time.
    async fn timed_out(&self, stream: &mut Stream) {
        let reply = crate::proxy::timeout_reply();
        self.reject(stream, &reply, self.limits.header_timeout)
            .await;
    }

    /// Returns the rejection for a request header that the proxy would reject as
    /// malformed with a plain response of its own: one over the size limit, or one that
    /// is not valid HTTP/1.1.
    fn malformed(&self, header: &[u8]) -> Option<ErrorReply> {
        // `read_header` stops at the size limit, so an unfinished header is over it.
        if !header_complete(header) {
            return Some(reply_for(Denial::HeaderTooLarge));
        }
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        match httparse::Request::new(&mut headers).parse(header) {
            Ok(_) => None,
            // Pingora parses such a request line again with its bytes escaped, and may
            // accept it.
            Err(httparse::Error::Token | httparse::Error::Version) => None,
            Err(httparse::Error::TooManyHeaders) => Some(reply_for(Denial::HeaderTooLarge)),
            Err(_) => Some(crate::proxy::malformed_reply()),
        }
    }

    /// Sends `reply` and closes the connection, before the proxy has read the request,
    /// with the metrics and the access log line of any rejected request.
    async fn reject(&self, stream: &mut Stream, reply: &ErrorReply, duration: Duration) {
        let request_id = crate::proxy::new_request_id();
        let body = error_body(reply, &request_id);
        let reason = reason_phrase(reply.status);
        let head = format!(
            "HTTP/1.1 {} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nX-Request-Id: {request_id}\r\nConnection: close\r\n\r\n",
            reply.status,
            body.len()
        );
        let written = async {
            stream.write_all(head.as_bytes()).await?;
            stream.write_all(&body).await?;
            stream.flush().await
        }
        .await;
        if let Err(error) = written {
            tracing::debug!(
                request.id = %request_id,
                error = %error,
                "rejection not sent; the client connection failed",
            );
        }
        self.metrics
            .record_request(RequestOutcome::Rejected, reply.code, None, duration);
        if self.access_log {
            // The request line may be missing or invalid, so method and path stay empty.
            let peer = peer_ip(stream);
            AccessLine {
                request_id: &request_id,
                client_ip: peer,
                peer_ip: peer,
                method: "",
                path: b"",
                status: reply.status,
                code: reply.code,
                campaign: None,
                key: None,
                upstream_status: 0,
                duration,
                bytes_received: 0,
                bytes_sent: body.len(),
            }
            .write();
        }
    }

    /// Reads the PROXY protocol header and makes its source address the connection's
    /// peer. Returns `None`, closing the connection, when the peer is not a trusted proxy
    /// or the header is missing or invalid.
    async fn accept_proxy_header(
        &self,
        stream: &mut Stream,
        buffer: &mut Vec<u8>,
        connected: Instant,
    ) -> Option<()> {
        let peer = peer_ip(stream);
        let trusted = peer.is_some_and(|ip| self.table.load().trusted_proxies().contains(ip));
        if !trusted {
            tracing::warn!(
                peer.ip = %peer.map(|ip| ip.to_string()).unwrap_or_default(),
                "PROXY protocol header from a peer that is not a trusted proxy; connection closed",
            );
            return None;
        }
        // A v2 header with TLVs can be up to 65,551 bytes, and it may take many reads to
        // arrive before the deadline. It does not count toward `max_header_bytes`.
        let deadline = connected + self.limits.header_timeout;
        let parsed = loop {
            match parse_proxy_header(buffer) {
                ProxyHeader::Incomplete if buffer.len() < MAX_PROXY_HEADER => {}
                ProxyHeader::Incomplete | ProxyHeader::Invalid => {
                    tracing::warn!(
                        peer.ip = %peer.map(|ip| ip.to_string()).unwrap_or_default(),
                        "missing or invalid PROXY protocol header; connection closed",
                    );
                    return None;
                }
                complete => break complete,
            }
            match timeout_at(deadline, stream.read_buf(buffer)).await {
                Ok(Ok(read)) if read > 0 => {}
                _ => return None,
            }
        };
        let (source, length) = match parsed {
            ProxyHeader::Source(source, length) => (Some(source), length),
            ProxyHeader::Local(length) => (None, length),
            ProxyHeader::Incomplete | ProxyHeader::Invalid => return None,
        };
        buffer.drain(..length);
        if let Some(source) = source {
            let digest = SocketDigest::from_raw_fd(stream.id());
            // `from_raw_fd` leaves the peer address unset (Pingora 0.9.1), so `set` cannot fail.
            let _ = digest.peer_addr.set(Some(PeerAddr::Inet(source)));
            stream.set_socket_digest(digest);
        }
        Some(())
    }
}

fn peer_ip(stream: &Stream) -> Option<IpAddr> {
    let digest = stream.get_socket_digest()?;
    let address = digest.peer_addr()?.as_inet()?.ip();
    Some(address.to_canonical())
}

/// Returns whether `buffer` contains a whole request header (it ends with an empty line).
fn header_complete(buffer: &[u8]) -> bool {
    buffer.windows(4).any(|w| w == b"\r\n\r\n") || buffer.windows(2).any(|w| w == b"\n\n")
}

/// Puts `bytes` back in front of the stream for the proxy to read.
fn rewind(stream: Stream, bytes: &[u8]) -> Option<Stream> {
    if bytes.is_empty() {
        return Some(stream);
    }
    match stream.into_any().downcast::<L4Stream>() {
        Ok(mut l4) => {
            l4.rewind(bytes);
            Some(l4)
        }
        Err(_) => {
            tracing::error!("connection is not a plain TCP stream; closed");
            None
        }
    }
}

/// A PROXY protocol header, parsed.
#[derive(Debug, PartialEq, Eq)]
enum ProxyHeader {
    /// The client's address and the header's length in bytes.
    Source(SocketAddr, usize),
    /// A header without an address (v1 `UNKNOWN`, v2 `LOCAL`) and its length: the peer
    /// stays the client.
    Local(usize),
    Incomplete,
    Invalid,
}

/// Parses a PROXY protocol v1 or v2 header at the start of `buffer`.
fn parse_proxy_header(buffer: &[u8]) -> ProxyHeader {
    if buffer.len() < PROXY_V2_SIGNATURE.len() {
        let v1_prefix = b"PROXY ";
        let prefix_len = buffer.len().min(v1_prefix.len());
        let could_be = PROXY_V2_SIGNATURE.starts_with(buffer)
            || v1_prefix[..prefix_len] == buffer[..prefix_len];
        return if could_be {
            ProxyHeader::Incomplete
        } else {
            ProxyHeader::Invalid
        };
    }
    if buffer.starts_with(PROXY_V2_SIGNATURE) {
        return parse_v2(buffer);
    }
    if buffer.starts_with(b"PROXY ") {
        return parse_v1(buffer);
    }
    ProxyHeader::Invalid
}

fn parse_v1(buffer: &[u8]) -> ProxyHeader {
    let Some(end) = buffer.windows(2).position(|w| w == b"\r\n") else {
        return if buffer.len() < 107 {
            ProxyHeader::Incomplete
        } else {
            ProxyHeader::Invalid
        };
    };
    let Ok(line) = std::str::from_utf8(&buffer[..end]) else {
        return ProxyHeader::Invalid;
    };
    let parts: Vec<&str> = line.split(' ').collect();
    match parts.as_slice() {
        ["PROXY", "UNKNOWN", ..] => ProxyHeader::Local(end + 2),
        ["PROXY", family @ ("TCP4" | "TCP6"), source, _destination, source_port, _destination_port] =>
        {
            let ip = source
                .parse::<IpAddr>()
                .ok()
                .filter(|ip| ip.is_ipv4() == (*family == "TCP4"));
            let port = source_port.parse::<u16>().ok();
            match (ip, port) {
                (Some(ip), Some(port)) => ProxyHeader::Source(SocketAddr::new(ip, port), end + 2),
                _ => ProxyHeader::Invalid,
            }
        }
        _ => ProxyHeader::Invalid,
    }
}

fn parse_v2(buffer: &[u8]) -> ProxyHeader {
    if buffer.len() < 16 {
        return ProxyHeader::Incomplete;
    }
    let version_command = buffer[12];
    let family = buffer[13];
    let length = usize::from(u16::from_be_bytes([buffer[14], buffer[15]]));
    let total = 16 + length;
    if version_command >> 4 != 2 {
        return ProxyHeader::Invalid;
    }
    if buffer.len() < total {
        return ProxyHeader::Incomplete;
    }
    let addresses = &buffer[16..total];
    match (version_command & 0x0f, family) {
        (0x0, _) => ProxyHeader::Local(total),
        (0x1, 0x11) if addresses.len() >= 12 => {
            let ip: [u8; 4] = addresses[0..4].try_into().expect("4 bytes");
            let port = u16::from_be_bytes([addresses[8], addresses[9]]);
            ProxyHeader::Source(SocketAddr::new(IpAddr::from(ip), port), total)
        }
        (0x1, 0x21) if addresses.len() >= 36 => {
            let ip: [u8; 16] = addresses[0..16].try_into().expect("16 bytes");
            let port = u16::from_be_bytes([addresses[32], addresses[33]]);
            ProxyHeader::Source(SocketAddr::new(IpAddr::from(ip), port), total)
        }
        // Another family (UNSPEC, UNIX) carries no IP address: the peer stays the client.
        (0x1, _) => ProxyHeader::Local(total),
        _ => ProxyHeader::Invalid,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v1_headers() {
        let header = b"PROXY TCP4 203.0.113.10 192.0.2.1 56324 443\r\nGET / HTTP/1.1\r\n";
        assert_eq!(
            parse_proxy_header(header),
            ProxyHeader::Source("203.0.113.10:56324".parse().unwrap(), 45)
        );
        let header = b"PROXY TCP6 2001:db8::a 2001:db8::1 4000 443\r\n";
        assert_eq!(
            parse_proxy_header(header),
            ProxyHeader::Source("[2001:db8::a]:4000".parse().unwrap(), header.len())
        );
        assert_eq!(
            parse_proxy_header(b"PROXY UNKNOWN\r\n"),
            ProxyHeader::Local(15)
        );
        assert_eq!(
            parse_proxy_header(b"PROXY TCP4 203.0.113.10"),
            ProxyHeader::Incomplete
        );
        assert_eq!(parse_proxy_header(b"PRO"), ProxyHeader::Incomplete);
        for invalid in [
            &b"GET / HTTP/1.1\r\n\r\n"[..],
            b"PROXY TCP4 2001:db8::a 192.0.2.1 1 2\r\n",
            b"PROXY TCP4 203.0.113.10 192.0.2.1 99999 443\r\n",
            b"PROXY TCP5 203.0.113.10 192.0.2.1 1 2\r\n",
        ] {
            assert_eq!(
                parse_proxy_header(invalid),
                ProxyHeader::Invalid,
                "{}",
                String::from_utf8_lossy(invalid)
            );
        }
    }

    fn v2(command: u8, family: u8, addresses: &[u8]) -> Vec<u8> {
        let mut header = PROXY_V2_SIGNATURE.to_vec();
        header.push(0x20 | command);
        header.push(family);
        header.extend_from_slice(&(addresses.len() as u16).to_be_bytes());
        header.extend_from_slice(addresses);
        header
    }

    #[test]
    fn v2_headers() {
        let mut ipv4 = vec![203, 0, 113, 10, 192, 0, 2, 1];
        ipv4.extend_from_slice(&56324u16.to_be_bytes());
        ipv4.extend_from_slice(&443u16.to_be_bytes());
        let header = v2(0x1, 0x11, &ipv4);
        assert_eq!(
            parse_proxy_header(&header),
            ProxyHeader::Source("203.0.113.10:56324".parse().unwrap(), 28)
        );
        assert_eq!(parse_proxy_header(&header[..20]), ProxyHeader::Incomplete);
        assert_eq!(
            parse_proxy_header(&v2(0x0, 0x00, &[])),
            ProxyHeader::Local(16)
        );

        let mut ipv6 = vec![0u8; 36];
        ipv6[0..16].copy_from_slice(
            &"2001:db8::a"
                .parse::<std::net::Ipv6Addr>()
                .unwrap()
                .octets(),
        );
        ipv6[32..34].copy_from_slice(&4000u16.to_be_bytes());
        assert_eq!(
            parse_proxy_header(&v2(0x1, 0x21, &ipv6)),
            ProxyHeader::Source("[2001:db8::a]:4000".parse().unwrap(), 52)
        );
        let mut wrong_version = v2(0x1, 0x11, &ipv4);
        wrong_version[12] = 0x11;
        assert_eq!(parse_proxy_header(&wrong_version), ProxyHeader::Invalid);
    }

    #[test]
    fn v2_header_with_tlvs_completes_at_its_length() {
        let mut addresses = vec![203, 0, 113, 10, 192, 0, 2, 1];
        addresses.extend_from_slice(&56324u16.to_be_bytes());
        addresses.extend_from_slice(&443u16.to_be_bytes());
        // A NOOP TLV (type 0x04) fills the header to 800 bytes.
        let padding = 800 - 16 - addresses.len() - 3;
        addresses.push(0x04);
        addresses.extend_from_slice(&(padding as u16).to_be_bytes());
        addresses.resize(addresses.len() + padding, 0);
        let header = v2(0x1, 0x11, &addresses);
        assert_eq!(header.len(), 800);
        for end in 0..header.len() {
            assert_eq!(
                parse_proxy_header(&header[..end]),
                ProxyHeader::Incomplete,
                "{end} bytes"
            );
        }
        assert_eq!(
            parse_proxy_header(&header),
            ProxyHeader::Source("203.0.113.10:56324".parse().unwrap(), 800)
        );
    }

    #[test]
    fn v2_header_of_maximum_length() {
        let mut addresses = vec![0u8; usize::from(u16::MAX)];
        addresses[0..4].copy_from_slice(&[203, 0, 113, 10]);
        addresses[8..10].copy_from_slice(&56324u16.to_be_bytes());
        let header = v2(0x1, 0x11, &addresses);
        assert_eq!(header.len(), MAX_PROXY_HEADER);
        assert_eq!(
            parse_proxy_header(&header[..MAX_PROXY_HEADER - 1]),
            ProxyHeader::Incomplete
        );
        assert_eq!(
            parse_proxy_header(&header),
            ProxyHeader::Source("203.0.113.10:56324".parse().unwrap(), MAX_PROXY_HEADER)
        );
    }

    #[test]
    fn header_completion() {
        assert!(header_complete(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"));
        assert!(header_complete(b"GET / HTTP/1.1\nHost: a\n\n"));
        assert!(!header_complete(b"GET / HTTP/1.1\r\nHost: a\r\n"));
    }
}

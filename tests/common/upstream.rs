//! A recording upstream: an HTTP/1.1 server on loopback, over plain TCP or a stream the
//! caller wraps each connection in (such as TLS), that stores every request it receives
//! and responds with 201 and a small JSON body. A request header `x-test-status` sets
//! another status, and `x-test-delay-ms` delays the response.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// One request as the upstream received it.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: String,
    pub target: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Recorded {
    /// Returns every value of the header `name`, in any letter case.
    pub fn header_values(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .collect()
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.header_values(name).first().copied()
    }
}

/// A running recording upstream. Its threads end with the test process.
pub struct Upstream {
    pub address: SocketAddr,
    received: Arc<Mutex<Vec<Recorded>>>,
    wire: Arc<Wire>,
}

/// Every byte read from any connection, after TLS if there is any, and the connections
/// that ended.
#[derive(Default)]
struct Wire {
    bytes: Mutex<Vec<u8>>,
    closed: AtomicUsize,
}

impl Upstream {
    pub fn start() -> Self {
        Self::start_on("127.0.0.1:0".parse().unwrap())
    }

    /// Starts the upstream on `address`; port 0 picks a free port.
    pub fn start_on(address: SocketAddr) -> Self {
        Self::start_with(vec![TcpListener::bind(address).unwrap()], Ok)
    }

    /// Starts the upstream on `listeners`, the first of which gives `address`. `wrap`
    /// turns each accepted connection into the stream that requests are read from and
    /// responses written to, such as a TLS session. A connection that `wrap` fails on is
    /// closed without a response.
    pub fn start_with<S, W>(listeners: Vec<TcpListener>, wrap: W) -> Self
    where
        S: Read + Write,
        W: Fn(TcpStream) -> std::io::Result<S> + Send + Sync + 'static,
    {
        let address = listeners[0].local_addr().unwrap();
        let received = Arc::new(Mutex::new(Vec::new()));
        let wire = Arc::new(Wire::default());
        let wrap = Arc::new(wrap);
        for listener in listeners {
            let (store, shared_wire) = (Arc::clone(&received), Arc::clone(&wire));
            let wrap = Arc::clone(&wrap);
            std::thread::spawn(move || {
                for stream in listener.incoming().flatten() {
                    let (store, wire) = (Arc::clone(&store), Arc::clone(&shared_wire));
                    let wrap = Arc::clone(&wrap);
                    std::thread::spawn(move || {
                        if let Ok(stream) = wrap(stream) {
                            serve(stream, &store, &wire);
                        }
                        wire.closed.fetch_add(1, Ordering::SeqCst);
                    });
                }
            });
        }
        Self {
            address,
            received,
            wire,
        }
    }

    /// Returns every byte received so far, on all connections, in arrival order. Over TLS
    /// these are the decrypted bytes.
    pub fn wire_bytes(&self) -> Vec<u8> {
        self.wire.bytes.lock().unwrap().clone()
    }

    /// Returns how many connections have ended, after all their bytes were read.
    pub fn closed_connections(&self) -> usize {
        self.wire.closed.load(Ordering::SeqCst)
    }

    /// Returns a copy of every request received so far.
    pub fn received(&self) -> Vec<Recorded> {
        self.received.lock().unwrap().clone()
    }

    pub fn count(&self) -> usize {
        self.received.lock().unwrap().len()
    }
}

fn serve(mut stream: impl Read + Write, store: &Mutex<Vec<Recorded>>, wire: &Wire) {
    let mut buffer = Vec::new();
    loop {
        let Some(request) = read_request(&mut stream, &mut buffer, wire) else {
            return;
        };
        let status: u16 = request
            .header("x-test-status")
            .and_then(|s| s.parse().ok())
            .unwrap_or(201);
        let delay: u64 = request
            .header("x-test-delay-ms")
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        store.lock().unwrap().push(request);
        std::thread::sleep(Duration::from_millis(delay));
        let body = format!("{{\"upstream\":true,\"status\":{status}}}");
        let response = format!(
            "HTTP/1.1 {status} Upstream\r\nContent-Type: application/json\r\nContent-Length: {}\r\nX-Upstream: yes\r\n\r\n{body}",
            body.len()
        );
        if stream.write_all(response.as_bytes()).is_err() {
            return;
        }
    }
}

fn read_request(stream: &mut impl Read, buffer: &mut Vec<u8>, wire: &Wire) -> Option<Recorded> {
    let mut chunk = [0u8; 16384];
    let mut read_more = |buffer: &mut Vec<u8>| {
        let read = stream.read(&mut chunk).ok().filter(|&read| read > 0)?;
        buffer.extend_from_slice(&chunk[..read]);
        wire.bytes.lock().unwrap().extend_from_slice(&chunk[..read]);
        Some(())
    };
    loop {
        let mut headers = [httparse::EMPTY_HEADER; 128];
        let mut parsed = httparse::Request::new(&mut headers);
        if let Ok(httparse::Status::Complete(header_len)) = parsed.parse(buffer) {
            let headers: Vec<(String, String)> = parsed
                .headers
                .iter()
                .map(|h| {
                    (
                        h.name.to_owned(),
                        String::from_utf8_lossy(h.value).into_owned(),
                    )
                })
                .collect();
            let method = parsed.method?.to_owned();
            let target = parsed.path?.to_owned();
            let chunked = headers.iter().any(|(name, value)| {
                name.eq_ignore_ascii_case("transfer-encoding")
                    && value.eq_ignore_ascii_case("chunked")
            });
            let body = if chunked {
                read_chunked(buffer, header_len, &mut read_more)?
            } else {
                let length: usize = headers
                    .iter()
                    .find(|(n, _)| n.eq_ignore_ascii_case("content-length"))
                    .map_or(0, |(_, v)| v.parse().unwrap_or(0));
                while buffer.len() < header_len + length {
                    read_more(buffer)?;
                }
                let body = buffer[header_len..header_len + length].to_vec();
                buffer.drain(..header_len + length);
                body
            };
            return Some(Recorded {
                method,
                target,
                headers,
                body,
            });
        }
        read_more(buffer)?;
    }
}

/// Reads a chunked body that starts at `start` of `buffer`, removes the request from the
/// buffer and returns the body decoded. Trailers are not supported.
fn read_chunked(
    buffer: &mut Vec<u8>,
    start: usize,
    read_more: &mut impl FnMut(&mut Vec<u8>) -> Option<()>,
) -> Option<Vec<u8>> {
    let mut body = Vec::new();
    let mut at = start;
    loop {
        let (size_len, size) = loop {
            match httparse::parse_chunk_size(&buffer[at..]) {
                Ok(httparse::Status::Complete((size_len, size))) => break (size_len, size),
                Ok(httparse::Status::Partial) => read_more(buffer)?,
                Err(_) => return None,
            }
        };
        let size = usize::try_from(size).ok()?;
        // The chunk's data and its CRLF, or the CRLF that ends the body.
        let end = at + size_len + size + 2;
        while buffer.len() < end {
            read_more(buffer)?;
        }
        body.extend_from_slice(&buffer[at + size_len..at + size_len + size]);
        at = end;
        if size == 0 {
            buffer.drain(..at);
            return Some(body);
        }
    }
}

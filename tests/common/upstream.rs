//! A recording upstream: an HTTP/1.1 server on loopback that stores every request it
//! receives and answers 201 with a small JSON body. A request header `x-test-status`
//! sets another status, and `x-test-delay-ms` delays the answer.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
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
}

impl Upstream {
    pub fn start() -> Self {
        Self::start_on("127.0.0.1:0".parse().unwrap())
    }

    /// Starts the upstream on `address`; port 0 picks a free port.
    pub fn start_on(address: SocketAddr) -> Self {
        let listener = TcpListener::bind(address).unwrap();
        let address = listener.local_addr().unwrap();
        let received = Arc::new(Mutex::new(Vec::new()));
        let store = Arc::clone(&received);
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let store = Arc::clone(&store);
                std::thread::spawn(move || serve(stream, &store));
            }
        });
        Self { address, received }
    }

    /// Returns a copy of every request received so far.
    pub fn received(&self) -> Vec<Recorded> {
        self.received.lock().unwrap().clone()
    }

    pub fn count(&self) -> usize {
        self.received.lock().unwrap().len()
    }
}

fn serve(mut stream: TcpStream, store: &Mutex<Vec<Recorded>>) {
    let mut buffer = Vec::new();
    loop {
        let Some(request) = read_request(&mut stream, &mut buffer) else {
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

fn read_request(stream: &mut TcpStream, buffer: &mut Vec<u8>) -> Option<Recorded> {
    let mut chunk = [0u8; 16384];
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
            let length: usize = headers
                .iter()
                .find(|(n, _)| n.eq_ignore_ascii_case("content-length"))
                .map_or(0, |(_, v)| v.parse().unwrap_or(0));
            while buffer.len() < header_len + length {
                let read = stream.read(&mut chunk).ok()?;
                if read == 0 {
                    return None;
                }
                buffer.extend_from_slice(&chunk[..read]);
            }
            let body = buffer[header_len..header_len + length].to_vec();
            buffer.drain(..header_len + length);
            return Some(Recorded {
                method,
                target,
                headers,
                body,
            });
        }
        let read = stream.read(&mut chunk).ok()?;
        if read == 0 {
            return None;
        }
        buffer.extend_from_slice(&chunk[..read]);
    }
}

//! The admin listener: `/healthz`, `/readyz` and `/metrics`, on an address of its own so
//! that probes and scrapes never share the proxy's port.
//!
//! It runs as a background service with its own accept loop, not as a Pingora listener.
//! Pingora closes its listeners when the drain delay ends, but probes and scrapes need a
//! response for as long as the process lives: 503 on `/readyz` while shutting down.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::lifecycle::{Lifecycle, Readiness};
use crate::metrics::Metrics;
use crate::proxy::reason_phrase;

/// The largest request header the admin listener reads.
const MAX_REQUEST_BYTES: usize = 8 * 1024;
/// How long a client may take to send its request header.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// The admin HTTP server.
pub struct Admin {
    endpoints: Arc<Endpoints>,
    /// The bound socket, taken when the service starts.
    listener: Mutex<Option<std::net::TcpListener>>,
}

impl Admin {
    /// Serves on `listener`, which the caller bound at start so that a busy address is
    /// reported before anything runs.
    pub fn new(
        listener: std::net::TcpListener,
        metrics: Arc<Metrics>,
        lifecycle: Arc<Lifecycle>,
    ) -> Self {
        Self {
            endpoints: Arc::new(Endpoints { metrics, lifecycle }),
            listener: Mutex::new(Some(listener)),
        }
    }
}

/// The state that the admin endpoints report.
struct Endpoints {
    metrics: Arc<Metrics>,
    lifecycle: Arc<Lifecycle>,
}

impl Endpoints {
    /// Serves one request on `stream` and closes it.
    async fn serve(&self, mut stream: TcpStream) {
        let mut buffer = Vec::with_capacity(1024);
        let read = tokio::time::timeout(REQUEST_TIMEOUT, read_head(&mut stream, &mut buffer));
        let reply = match read.await {
            Ok(Ok(())) => self.reply(&buffer).await,
            Ok(Err(HeadError::TooLarge)) => plain(431, "request header too large\n"),
            Ok(Err(HeadError::Closed)) | Err(_) => return,
        };
        let head = format!(
            "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n",
            reply.status,
            reason_phrase(reply.status),
            reply.content_type,
            reply.body.len(),
        );
        let mut response = head.into_bytes();
        if !reply.head_only {
            response.extend_from_slice(&reply.body);
        }
        if let Err(error) = stream.write_all(&response).await {
            tracing::debug!(error = %error, "failed to send an admin response");
        }
    }

    async fn reply(&self, head: &[u8]) -> Reply {
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut request = httparse::Request::new(&mut headers);
        let (Ok(httparse::Status::Complete(_)), Some(method), Some(target)) =
            (request.parse(head), request.method, request.path)
        else {
            return plain(400, "invalid request\n");
        };
        let path = target.split('?').next().unwrap_or_default();
        let is_read = matches!(method, "GET" | "HEAD");
        let mut reply = match (is_read, path) {
            (true, "/healthz") => plain(200, "ok\n"),
            (true, "/readyz") => match self.lifecycle.readiness().await {
                Readiness::Ready => plain(200, "ready\n"),
                Readiness::Starting => plain(
                    503,
                    "not ready: the proxy listener does not accept connections yet\n",
                ),
                Readiness::ShuttingDown => plain(503, "not ready: shutting down\n"),
            },
            (true, "/metrics") => Reply {
                status: 200,
                content_type: "text/plain; version=0.0.4; charset=utf-8",
                body: self.metrics.render(),
                head_only: false,
            },
            (false, "/healthz" | "/readyz" | "/metrics") => plain(405, "use GET\n"),
            _ => plain(404, "not found; try /healthz, /readyz or /metrics\n"),
        };
        reply.head_only = method == "HEAD";
        reply
    }
}

#[async_trait]
impl BackgroundService for Admin {
    /// Serves until the process exits; the shutdown signal is not awaited (see the module
    /// documentation).
    async fn start(&self, _shutdown: ShutdownWatch) {
        let listener = self
            .listener
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        let Some(listener) = listener else {
            return;
        };
        let listener = match listener
            .set_nonblocking(true)
            .and_then(|()| TcpListener::from_std(listener))
        {
            Ok(listener) => listener,
            Err(error) => {
                tracing::error!(error = %error, "failed to start the admin listener");
                return;
            }
        };
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    let endpoints = Arc::clone(&self.endpoints);
                    tokio::spawn(async move { endpoints.serve(stream).await });
                }
                Err(error) => {
                    tracing::warn!(error = %error, "failed to accept an admin connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }
}

/// A response of the admin listener.
struct Reply {
    status: u16,
    content_type: &'static str,
    body: Vec<u8>,
    /// Whether the body is left out, for a HEAD request.
    head_only: bool,
}

fn plain(status: u16, text: &str) -> Reply {
    Reply {
        status,
        content_type: "text/plain; charset=utf-8",
        body: text.as_bytes().to_vec(),
        head_only: false,
    }
}

enum HeadError {
    Closed,
    TooLarge,
}

/// Reads until the end of the request header, which is all the admin endpoints need.
async fn read_head(stream: &mut TcpStream, buffer: &mut Vec<u8>) -> Result<(), HeadError> {
    while !buffer.windows(4).any(|window| window == b"\r\n\r\n") {
        if buffer.len() >= MAX_REQUEST_BYTES {
            return Err(HeadError::TooLarge);
        }
        match stream.read_buf(buffer).await {
            Ok(0) | Err(_) => return Err(HeadError::Closed),
            Ok(_) => {}
        }
    }
    Ok(())
}

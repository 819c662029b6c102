//! The admin listener: `/healthz`, `/readyz` and `/metrics`, on an address of its own so
//! that probes and scrapes never share the proxy's port.

use std::sync::Arc;

use async_trait::async_trait;
use http::{Response, StatusCode};
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;

use crate::lifecycle::{Lifecycle, Readiness};
use crate::metrics::Metrics;

/// The admin HTTP application.
pub struct Admin {
    pub metrics: Arc<Metrics>,
    pub lifecycle: Arc<Lifecycle>,
}

#[async_trait]
impl ServeHttp for Admin {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let path = session.req_header().uri.path().to_owned();
        let is_read = matches!(session.req_header().method.as_str(), "GET" | "HEAD");
        match (is_read, path.as_str()) {
            (true, "/healthz") => plain(StatusCode::OK, "ok\n"),
            (true, "/readyz") => match self.lifecycle.readiness().await {
                Readiness::Ready => plain(StatusCode::OK, "ready\n"),
                Readiness::Starting => plain(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "not ready: the proxy listener does not accept connections yet\n",
                ),
                Readiness::ShuttingDown => plain(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "not ready: shutting down\n",
                ),
            },
            (true, "/metrics") => respond(
                StatusCode::OK,
                "text/plain; version=0.0.4; charset=utf-8",
                self.metrics.render(),
            ),
            (false, "/healthz" | "/readyz" | "/metrics") => {
                plain(StatusCode::METHOD_NOT_ALLOWED, "use GET\n")
            }
            _ => plain(
                StatusCode::NOT_FOUND,
                "not found; try /healthz, /readyz or /metrics\n",
            ),
        }
    }
}

fn plain(status: StatusCode, text: &str) -> Response<Vec<u8>> {
    respond(
        status,
        "text/plain; charset=utf-8",
        text.as_bytes().to_vec(),
    )
}

fn respond(status: StatusCode, content_type: &str, body: Vec<u8>) -> Response<Vec<u8>> {
    Response::builder()
        .status(status)
        .header(http::header::CONTENT_TYPE, content_type)
        .header(http::header::CONTENT_LENGTH, body.len())
        .header(http::header::CACHE_CONTROL, "no-store")
        .body(body)
        .expect("a fixed set of valid headers")
}

//! A stand-in for the SMS API that keygate protects, for demos and manual tests.
//!
//! `POST /api/v2/campaigns/{campaignId}/messages` with a JSON body such as
//! `{"recipient":"+15550100"}` answers 201 with a message object, and
//! `GET /api/v2/campaigns/{campaignId}/messages/{messageId}` returns it again. Each request
//! is printed to stderr with the identity headers that keygate added.
//!
//! Run: `cargo run --example sms_api -- 127.0.0.1:9000`

use std::collections::HashMap;
use std::sync::Mutex;

use async_trait::async_trait;
use http::{Response, StatusCode};
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;
use pingora::server::configuration::ServerConf;
use pingora::server::Server;
use pingora::services::listening::Service;

#[derive(Default)]
struct SmsApi {
    messages: Mutex<HashMap<String, serde_json::Value>>,
}

#[async_trait]
impl ServeHttp for SmsApi {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let mut body = Vec::new();
        while let Ok(Some(chunk)) = session.read_request_body().await {
            body.extend_from_slice(&chunk);
        }
        let header = session.req_header();
        let header_text = |name: &str| {
            header
                .headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("-")
                .to_owned()
        };
        eprintln!(
            "sms_api: {} {} campaign={} key={} forwarded-for={} request-id={}",
            header.method,
            header.uri,
            header_text("x-keygate-campaign"),
            header_text("x-keygate-key-id"),
            header_text("x-forwarded-for"),
            header_text("x-request-id"),
        );
        let path = header.uri.path().to_owned();
        let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        match (header.method.as_str(), segments.as_slice()) {
            ("POST", ["api", "v2", "campaigns", campaign, "messages"]) => {
                self.create(campaign, &body)
            }
            ("GET", ["api", "v2", "campaigns", campaign, "messages", id]) => {
                self.find(campaign, id)
            }
            _ => json(
                StatusCode::NOT_FOUND,
                &error("not_found", "No such resource."),
            ),
        }
    }
}

impl SmsApi {
    fn create(&self, campaign: &str, body: &[u8]) -> Response<Vec<u8>> {
        let request: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
        let Some(recipient) = request.get("recipient").and_then(|r| r.as_str()) else {
            return json(
                StatusCode::BAD_REQUEST,
                &error(
                    "parameter_missing",
                    "The body needs a \"recipient\" string.",
                ),
            );
        };
        let id = format!("message_{}", uuid_v4());
        let message = serde_json::json!({
            "id": id,
            "campaignId": campaign,
            "recipient": recipient,
            "latestStatus": "created",
        });
        let mut messages = self.messages.lock().unwrap_or_else(|e| e.into_inner());
        messages.insert(id, message.clone());
        json(StatusCode::CREATED, &message)
    }

    fn find(&self, campaign: &str, id: &str) -> Response<Vec<u8>> {
        let messages = self.messages.lock().unwrap_or_else(|e| e.into_inner());
        match messages.get(id) {
            Some(message) if message["campaignId"] == campaign => json(StatusCode::OK, message),
            _ => json(
                StatusCode::NOT_FOUND,
                &error("not_found", "No such message."),
            ),
        }
    }
}

fn error(code: &str, message: &str) -> serde_json::Value {
    serde_json::json!({"error": {"code": code, "message": message, "type": "invalid_request_error"}})
}

fn json(status: StatusCode, value: &serde_json::Value) -> Response<Vec<u8>> {
    let body = value.to_string().into_bytes();
    Response::builder()
        .status(status)
        .header("Content-Type", "application/json")
        .header("Content-Length", body.len())
        .body(body)
        .expect("a static header set is valid")
}

/// Formats 16 random bytes as a version 4 UUID.
fn uuid_v4() -> String {
    let mut bytes: [u8; 16] = rand::random();
    bytes[6] = (bytes[6] & 0x0f) | 0x40;
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..]
    )
}

fn main() {
    let listen = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:9000".to_owned());
    // Stop within a second of SIGTERM: the stand-in has no requests worth waiting for.
    let conf = ServerConf {
        grace_period_seconds: Some(0),
        graceful_shutdown_timeout_seconds: Some(1),
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();
    let mut service = Service::new("sms-api".to_owned(), SmsApi::default());
    service.add_tcp(&listen);
    server.add_service(service);
    eprintln!("sms_api: listening on {listen}");
    server.run_forever()
}

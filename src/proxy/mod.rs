//! The Pingora glue: reads each request, calls the decision, and either sends the
//! rejection itself or forwards the request with keygate's identity headers.
//!
//! Each request loads the table once, in `request_filter`, and keeps that snapshot in its
//! context for the decision, the upstream headers and the access log line.

mod headers;
mod respond;

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::prelude::*;
use pingora::proxy::{FailToProxy, ProxyHttp, Session};
use pingora::{ErrorSource, ErrorType};

use crate::config::Limits;
use crate::lifecycle::{InFlight, Lifecycle};
use crate::metrics::{Metrics, RequestOutcome};
use crate::rate_limit::{retry_after_seconds, RateLimiter};
use crate::table::{
    client_ip, decide, presented_key, Decision, Denial, Grant, KeySlot, RequestFacts, Table,
};
use crate::upstream::UpstreamAddresses;
pub use headers::is_reserved;
use headers::RawAuthorization;
pub use respond::{error_body, reason_phrase, ErrorReply};

/// The upstream that allowed requests go to.
#[derive(Debug, Clone)]
pub struct UpstreamPeer {
    pub addresses: Arc<UpstreamAddresses>,
    pub tls: bool,
    pub sni: String,
    /// Whether the upstream certificate and its name are verified.
    pub verify: bool,
    pub connect_timeout: Duration,
    pub read_timeout: Duration,
    /// The `Authorization` value that replaces the client's, marked sensitive so that
    /// `Debug` does not print it.
    pub authorization: Option<http::HeaderValue>,
}

/// The proxy application.
pub struct Keygate {
    pub table: Arc<ArcSwap<Table>>,
    pub upstream: UpstreamPeer,
    pub limits: Limits,
    pub rate_limiter: RateLimiter,
    pub metrics: Arc<Metrics>,
    pub lifecycle: Arc<Lifecycle>,
    /// Whether a log line is written for every request.
    pub access_log: bool,
    /// Listeners whose connections carry the PROXY protocol. There the header names the
    /// client, and `X-Forwarded-For`, which the client controls, is never read.
    pub proxy_protocol_listeners: Vec<std::net::SocketAddr>,
}

/// The outcome of a request, for metrics and the access log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The request was read, but no decision was made yet.
    Pending,
    Allowed,
    Rejected(Denial),
    /// The request was allowed, but the upstream failed; the code names how.
    UpstreamError(&'static str),
    /// The request could not be read; the code names how.
    ClientError(&'static str),
}

/// Per-request state.
pub struct RequestContext {
    table: Option<Arc<Table>>,
    request_id: String,
    /// The TCP peer.
    peer_ip: Option<IpAddr>,
    /// The client: the peer, or the address that trusted proxies forwarded.
    client_ip: Option<IpAddr>,
    grant: Option<Grant>,
    /// The key of a request denied for its address or path, for the access log.
    presented_key: Option<KeySlot>,
    outcome: Outcome,
    upstream_status: Option<u16>,
    /// Request body bytes read so far, for the body size limit.
    body_bytes: u64,
    /// The body received so far of a request without Content-Length, held back from the
    /// upstream until it is complete and within the limit.
    held_body: BytesMut,
    /// Failed attempts to connect to the upstream.
    connect_attempts: usize,
    started: Instant,
    _in_flight: InFlight,
}

#[async_trait]
impl ProxyHttp for Keygate {
    type CTX = RequestContext;

    fn new_ctx(&self) -> RequestContext {
        RequestContext {
            table: None,
            request_id: new_request_id(),
            peer_ip: None,
            client_ip: None,
            grant: None,
            presented_key: None,
            outcome: Outcome::Pending,
            upstream_status: None,
            body_bytes: 0,
            held_body: BytesMut::new(),
            connect_attempts: 0,
            started: Instant::now(),
            _in_flight: self.lifecycle.track_request(),
        }
    }

    async fn request_filter(
        &self,
        session: &mut Session,
        ctx: &mut RequestContext,
    ) -> Result<bool> {
        let table = self.table.load_full();
        ctx.peer_ip = session
            .client_addr()
            .and_then(|address| address.as_inet())
            .map(|address| address.ip().to_canonical());
        let local = session
            .server_addr()
            .and_then(|address| address.as_inet())
            .copied();
        let via_proxy_protocol = local.is_some_and(|local| {
            self.proxy_protocol_listeners.iter().any(|listener| {
                listener.port() == local.port()
                    && (listener.ip().is_unspecified() || listener.ip() == local.ip())
            })
        });
        ctx.client_ip = ctx.peer_ip.map(|peer| {
            if via_proxy_protocol {
                return peer;
            }
            let forwarded_for = session.req_header().headers.get_all("x-forwarded-for");
            client_ip(
                peer,
                forwarded_for.iter().map(|v| v.as_bytes()),
                table.trusted_proxies(),
            )
        });

        let authorization = RawAuthorization::read(session);
        let path = path_of(session.req_header());
        let facts = RequestFacts {
            client_ip: ctx.client_ip,
            path,
            authorization: authorization.as_facts(),
            now: crate::unix_now(),
        };
        let decision_started = Instant::now();
        let decision = decide(&table, &facts);
        self.metrics.observe_decision(decision_started.elapsed());
        if let Decision::Deny(Denial::CallerNotAllowedForKey | Denial::CampaignNotAllowed) =
            decision
        {
            ctx.presented_key = presented_key(&table, &facts);
        }

        session.set_keepalive(Some(self.limits.keepalive_timeout.as_secs()));

        // Size limits and the fragment check come first, and only an allowed request
        // takes from the budget.
        let outcome = match (self.check_header(session), decision) {
            (Some(denial), _) | (None, Decision::Deny(denial)) => Err((denial, None)),
            (None, Decision::Allow(grant)) => match self.check_rate_limit(&table, grant) {
                Ok(()) => Ok(grant),
                Err(wait) => Err((Denial::TooManyRequests, Some(retry_after_seconds(wait)))),
            },
        };
        ctx.table = Some(table);
        match outcome {
            Ok(grant) => {
                ctx.grant = Some(grant);
                ctx.outcome = Outcome::Allowed;
                Ok(false)
            }
            Err((denial, retry_after)) => {
                ctx.outcome = Outcome::Rejected(denial);
                let mut reply = reply_for(denial);
                reply.retry_after = retry_after;
                respond::reject(
                    session,
                    &reply,
                    &ctx.request_id,
                    self.limits.drain_max_bytes,
                )
                .await?;
                Ok(true)
            }
        }
    }

    async fn request_body_filter(
        &self,
        session: &mut Session,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut RequestContext,
    ) -> Result<()> {
        ctx.body_bytes += body.as_ref().map_or(0, |chunk| chunk.len() as u64);
        if ctx.body_bytes > self.limits.max_body_bytes {
            // A body without Content-Length passed the check in request_filter; the
            // request is cut off here and the client gets 413 if no response started.
            return Error::e_explain(
                ErrorType::HTTPStatus(413),
                "request body over the size limit",
            );
        }
        // A body without Content-Length is held back until all of it has arrived, so a
        // body over the limit never reaches the upstream in part. A backend that acts on
        // rows as they stream in would otherwise act on an upload that is then cut off.
        if !session
            .req_header()
            .headers
            .contains_key(http::header::CONTENT_LENGTH)
        {
            if let Some(chunk) = body.as_mut() {
                ctx.held_body.extend_from_slice(chunk);
                // Pingora reads `None` as the end of the body; an empty chunk sends nothing.
                *chunk = Bytes::new();
            }
            // A request without a body ends as it would have without this filter.
            if end_of_stream && !ctx.held_body.is_empty() {
                *body = Some(std::mem::take(&mut ctx.held_body).freeze());
            }
        }
        Ok(())
    }

    async fn upstream_peer(
        &self,
        _session: &mut Session,
        _ctx: &mut RequestContext,
    ) -> Result<Box<HttpPeer>> {
        let upstream = &self.upstream;
        let mut peer = HttpPeer::new(
            upstream.addresses.pick(),
            upstream.tls,
            upstream.sni.clone(),
        );
        peer.options.verify_cert = upstream.verify;
        peer.options.verify_hostname = upstream.verify;
        peer.options.connection_timeout = Some(upstream.connect_timeout);
        peer.options.total_connection_timeout = Some(upstream.connect_timeout);
        peer.options.read_timeout = Some(upstream.read_timeout);
        peer.options.write_timeout = Some(upstream.read_timeout);
        Ok(Box::new(peer))
    }

    async fn upstream_request_filter(
        &self,
        _session: &mut Session,
        request: &mut RequestHeader,
        ctx: &mut RequestContext,
    ) -> Result<()> {
        let (Some(grant), Some(table)) = (ctx.grant, ctx.table.as_ref()) else {
            // INVARIANT: request_filter forwards only allowed requests.
            return Error::e_explain(
                ErrorType::InternalError,
                "request forwarded without a grant",
            );
        };
        let campaign = table.campaign(grant.campaign);
        let key = &campaign.keys[usize::from(grant.key)];
        headers::strip_reserved(request);
        request.insert_header("X-Keygate-Campaign", &*campaign.id)?;
        request.insert_header("X-Keygate-Key-Id", &*key.id)?;
        request.insert_header("X-Request-Id", &ctx.request_id)?;
        let client_ip = ctx.client_ip.map(|ip| ip.to_string()).unwrap_or_default();
        request.insert_header("X-Forwarded-For", client_ip)?;
        if let Some(authorization) = &self.upstream.authorization {
            request.insert_header(http::header::AUTHORIZATION, authorization.clone())?;
        }
        Ok(())
    }

    async fn upstream_response_filter(
        &self,
        _session: &mut Session,
        response: &mut ResponseHeader,
        ctx: &mut RequestContext,
    ) -> Result<()> {
        let status = response.status.as_u16();
        ctx.upstream_status = Some(status);
        self.metrics.record_upstream_status(status);
        Ok(())
    }

    fn request_summary(&self, session: &Session, ctx: &RequestContext) -> String {
        // Pingora puts this in its error lines; the query string may hold secrets.
        let path = path_of(session.req_header());
        format!(
            "{} {} request.id={}",
            session.req_header().method,
            String::from_utf8_lossy(path),
            ctx.request_id
        )
    }

    fn fail_to_connect(
        &self,
        _session: &mut Session,
        peer: &HttpPeer,
        ctx: &mut RequestContext,
        mut error: Box<Error>,
    ) -> Box<Error> {
        // Nothing was sent when a connection could not be made, so the next address of
        // the upstream may be tried, once each. A failed TLS handshake is not retried.
        // NOTE: no end-to-end test covers this, because loopback names resolve to one
        // address on the test machines; the unit tests cover the address rotation.
        ctx.connect_attempts += 1;
        let refused = matches!(
            error.etype(),
            ErrorType::ConnectRefused | ErrorType::ConnectNoRoute | ErrorType::ConnectTimedout
        );
        let retry = refused && ctx.connect_attempts < self.upstream.addresses.all().len();
        if retry {
            tracing::debug!(request.id = %ctx.request_id, peer = %peer, error = %error, "upstream address failed; trying the next one");
        }
        error.set_retry(retry);
        error
    }

    fn error_while_proxy(
        &self,
        peer: &HttpPeer,
        _session: &mut Session,
        error: Box<Error>,
        _ctx: &mut RequestContext,
        _client_reused: bool,
    ) -> Box<Error> {
        // The request may already have reached the upstream, and sending it twice could
        // send an SMS twice, so it is never retried.
        let mut error = error.more_context(format!("Peer: {peer}"));
        error.set_retry(false);
        error
    }

    async fn fail_to_proxy(
        &self,
        session: &mut Session,
        error: &Error,
        ctx: &mut RequestContext,
    ) -> FailToProxy {
        let reply = failure_reply(error);
        if let Some(reply) = reply {
            ctx.outcome = match error.esource() {
                ErrorSource::Upstream => Outcome::UpstreamError(reply.code),
                _ if reply.status == 413 => Outcome::Rejected(Denial::PayloadTooLarge),
                _ if ctx.outcome == Outcome::Pending => Outcome::ClientError(reply.code),
                _ => ctx.outcome,
            };
            if session.response_written().is_none() {
                if let Err(write_error) = respond::fail(session, &reply, &ctx.request_id).await {
                    tracing::debug!(error = %write_error, "failed to send the error response");
                }
            }
        }
        FailToProxy {
            error_code: reply.map_or(0, |reply| reply.status),
            can_reuse_downstream: false,
        }
    }

    async fn logging(
        &self,
        session: &mut Session,
        error: Option<&Error>,
        ctx: &mut RequestContext,
    ) {
        if let Some(error) = error {
            if matches!(error.esource(), ErrorSource::Upstream) {
                tracing::warn!(request.id = %ctx.request_id, error = %error, "upstream request failed");
            }
        }
        let (outcome, code) = match ctx.outcome {
            Outcome::Pending => return,
            Outcome::Allowed => (RequestOutcome::Allowed, ""),
            Outcome::Rejected(denial) => (RequestOutcome::Rejected, denial.code()),
            Outcome::ClientError(code) => (RequestOutcome::Rejected, code),
            Outcome::UpstreamError(code) => (RequestOutcome::UpstreamError, code),
        };
        let slot = ctx.grant.map(|grant| (grant.campaign, grant.key));
        let slot = slot.or(ctx.presented_key.map(|slot| (slot.campaign, slot.key)));
        let (campaign, key) = match (slot, ctx.table.as_ref()) {
            (Some((campaign, key)), Some(table)) => {
                let campaign = table.campaign(campaign);
                (
                    Some(&*campaign.id),
                    Some(&*campaign.keys[usize::from(key)].id),
                )
            }
            _ => (None, None),
        };
        let duration = ctx.started.elapsed();
        self.metrics
            .record_request(outcome, code, campaign, duration);
        if !self.access_log {
            return;
        }

        AccessLine {
            request_id: &ctx.request_id,
            client_ip: ctx.client_ip,
            peer_ip: ctx.peer_ip,
            method: session.req_header().method.as_str(),
            path: path_of(session.req_header()),
            status: session.response_written().map_or(0, |r| r.status.as_u16()),
            code,
            campaign,
            key,
            upstream_status: ctx.upstream_status.unwrap_or(0),
            duration,
            bytes_received: session.body_bytes_read(),
            bytes_sent: session.body_bytes_sent(),
        }
        .write();
    }
}

/// The fields of one access log line. The line never contains the key, the `Authorization`
/// header or the query string.
pub struct AccessLine<'a> {
    pub request_id: &'a str,
    pub client_ip: Option<IpAddr>,
    pub peer_ip: Option<IpAddr>,
    pub method: &'a str,
    /// The path without the query.
    pub path: &'a [u8],
    pub status: u16,
    pub code: &'a str,
    pub campaign: Option<&'a str>,
    pub key: Option<&'a str>,
    pub upstream_status: u16,
    pub duration: Duration,
    pub bytes_received: usize,
    pub bytes_sent: usize,
}

impl AccessLine<'_> {
    pub fn write(&self) {
        let ip = |ip: Option<IpAddr>| ip.map(|ip| ip.to_string()).unwrap_or_default();
        tracing::info!(
            request.id = %self.request_id,
            client.ip = %ip(self.client_ip),
            peer.ip = %ip(self.peer_ip),
            method = %self.method,
            path = %String::from_utf8_lossy(self.path),
            status = self.status,
            code = self.code,
            campaign.id = self.campaign.unwrap_or(""),
            key.id = self.key.unwrap_or(""),
            upstream.status = self.upstream_status,
            duration_ms = self.duration.as_secs_f64() * 1000.0,
            bytes.received = self.bytes_received,
            bytes.sent = self.bytes_sent,
            "request",
        );
    }
}

/// Returns the error response for a denial.
pub fn reply_for(denial: Denial) -> ErrorReply {
    let challenge = match denial {
        Denial::MissingKey => Some("Bearer"),
        Denial::InvalidKey => Some("Bearer error=\"invalid_token\""),
        _ => None,
    };
    ErrorReply {
        status: denial.status(),
        code: denial.code(),
        error_type: denial.error_type(),
        message: denial.message(),
        challenge,
        retry_after: None,
    }
}

impl Keygate {
    /// Takes the request from its campaign's rate limit, if the campaign has one, or
    /// returns how long until the budget allows it.
    fn check_rate_limit(&self, table: &Table, grant: Grant) -> std::result::Result<(), Duration> {
        let campaign = table.campaign(grant.campaign);
        match campaign.rate_limit {
            Some(limit) => self.rate_limiter.check(&campaign.id, limit, Instant::now()),
            None => Ok(()),
        }
    }

    /// Returns the denial for a request whose header or declared body is over the limits,
    /// or whose target contains a fragment.
    fn check_header(&self, session: &Session) -> Option<Denial> {
        let raw_header = session.as_downstream().to_h1_raw();
        if raw_header.len() > self.limits.max_header_bytes {
            return Some(Denial::HeaderTooLarge);
        }
        if target_has_fragment(&raw_header) {
            return Some(Denial::InvalidPath);
        }
        let length = session
            .req_header()
            .headers
            .get(http::header::CONTENT_LENGTH)
            .and_then(|value| value.to_str().ok())
            .and_then(|text| text.parse::<u64>().ok());
        length
            .filter(|&length| length > self.limits.max_body_bytes)
            .map(|_| Denial::PayloadTooLarge)
    }
}

/// Maps a proxying error to the response the client gets, or `None` when the client
/// connection is already gone.
fn failure_reply(error: &Error) -> Option<ErrorReply> {
    use ErrorType::*;
    let reply = |status, code, error_type, message| ErrorReply {
        status,
        code,
        error_type,
        message,
        challenge: None,
        retry_after: None,
    };
    if matches!(error.etype(), HTTPStatus(413)) {
        return Some(reply_for(Denial::PayloadTooLarge));
    }
    match (error.esource(), error.etype()) {
        (ErrorSource::Upstream, ConnectTimedout | ReadTimedout | WriteTimedout | TLSHandshakeTimedout) => Some(reply(
            504,
            "upstream_timeout",
            "api_error",
            "The upstream API did not answer in time. The request may have been processed; check before sending it again.",
        )),
        (ErrorSource::Upstream, _) => Some(reply(
            502,
            "upstream_unavailable",
            "api_error",
            "The upstream API is unavailable.",
        )),
        (ErrorSource::Downstream, ReadError | WriteError | ConnectionClosed) => None,
        (ErrorSource::Downstream, ReadTimedout) => Some(reply(
            408,
            "request_timeout",
            "invalid_request_error",
            "The request was not received in time.",
        )),
        (ErrorSource::Downstream, _) => Some(reply(
            400,
            "parameter_invalid",
            "invalid_request_error",
            "The request is not valid HTTP.",
        )),
        _ => Some(reply(500, "internal_error", "api_error", "keygate failed to process the request.")),
    }
}

/// Returns the request target up to, not including, the first `?`: the query string
/// takes no part in a decision and is never logged.
fn path_of(request: &RequestHeader) -> &[u8] {
    let target = request.raw_path();
    target.split(|&b| b == b'?').next().unwrap_or_default()
}

/// Returns whether the request target in the raw request line contains `#`. RFC 9112
/// allows no fragment in a request target, and Pingora 0.9.1 drops one silently when it
/// parses the target, so the forwarded path would differ from the one the client sent.
fn target_has_fragment(raw_header: &[u8]) -> bool {
    let line_end = raw_header
        .iter()
        .position(|&byte| byte == b'\n')
        .unwrap_or(raw_header.len());
    let mut parts = raw_header[..line_end].split(|&byte| byte == b' ');
    parts.nth(1).is_some_and(|target| target.contains(&b'#'))
}

/// Returns the error response for a request header that was not received in time.
pub fn timeout_reply() -> ErrorReply {
    ErrorReply {
        status: 408,
        code: "request_timeout",
        error_type: "invalid_request_error",
        message: "The request header was not received in time.",
        challenge: None,
        retry_after: None,
    }
}

/// Returns the error response for a request header that is not valid HTTP/1.1.
pub fn malformed_reply() -> ErrorReply {
    ErrorReply {
        status: 400,
        code: "parameter_invalid",
        error_type: "invalid_request_error",
        message: "The request is not valid HTTP/1.1.",
        challenge: None,
        retry_after: None,
    }
}

/// Generates a request id: `req_` and 32 random hexadecimal digits.
pub fn new_request_id() -> String {
    format!("req_{:032x}", rand::random::<u128>())
}

//! Error responses that keygate writes itself, in the JSON shape the messaging API's
//! clients already parse: `{"error":{"code","message","type","id"}}`.

use bytes::Bytes;
use http::header;
use pingora::http::ResponseHeader;
use pingora::proxy::Session;
use pingora::Result;

/// The maximum wait for the body of a rejected request before the connection is closed.
const DRAIN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// An error response: status, code, type and message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ErrorReply {
    pub status: u16,
    pub code: &'static str,
    pub error_type: &'static str,
    pub message: &'static str,
    /// The `WWW-Authenticate` challenge, for 401 responses.
    pub challenge: Option<&'static str>,
    /// The `Retry-After` value in seconds, for 429 responses.
    pub retry_after: Option<u64>,
}

/// Renders the JSON body of an error response.
pub fn error_body(reply: &ErrorReply, request_id: &str) -> Bytes {
    #[derive(serde::Serialize)]
    struct Body<'a> {
        error: Fields<'a>,
    }
    #[derive(serde::Serialize)]
    struct Fields<'a> {
        code: &'a str,
        message: &'a str,
        #[serde(rename = "type")]
        error_type: &'a str,
        id: &'a str,
    }
    let body = Body {
        error: Fields {
            code: reply.code,
            message: reply.message,
            error_type: reply.error_type,
            id: request_id,
        },
    };
    Bytes::from(serde_json::to_vec(&body).expect("strings always serialize"))
}

/// Builds the response header of an error response.
fn error_header(reply: &ErrorReply, request_id: &str, body_len: usize) -> Result<ResponseHeader> {
    let mut response = ResponseHeader::build(reply.status, Some(5))?;
    response.insert_header(header::CONTENT_TYPE, "application/json")?;
    response.insert_header(header::CONTENT_LENGTH, body_len.to_string())?;
    response.insert_header("X-Request-Id", request_id)?;
    if let Some(challenge) = reply.challenge {
        response.insert_header("WWW-Authenticate", challenge)?;
    }
    if let Some(seconds) = reply.retry_after {
        response.insert_header(header::RETRY_AFTER, seconds.to_string())?;
    }
    Ok(response)
}

/// Sends the error response for a request that will not go upstream.
///
/// A request body of at most `drain_max_bytes` is read and discarded first, so the
/// client can reuse the connection. A larger body, or one without a length, closes it.
pub async fn reject(
    session: &mut Session,
    reply: &ErrorReply,
    request_id: &str,
    drain_max_bytes: u64,
) -> Result<()> {
    if should_drain(session, drain_max_bytes) {
        // A client that announced a body and does not send it must not delay the response.
        session.set_total_drain_timeout(Some(DRAIN_TIMEOUT));
        if session.drain_request_body().await.is_err() {
            session.set_keepalive(None);
        }
    } else {
        session.set_keepalive(None);
    }
    write(session, reply, request_id).await
}

/// Sends the error response for a request that failed on its way upstream, before any response was sent, and
/// closes the connection.
pub async fn fail(session: &mut Session, reply: &ErrorReply, request_id: &str) -> Result<()> {
    session.set_keepalive(None);
    write(session, reply, request_id).await
}

async fn write(session: &mut Session, reply: &ErrorReply, request_id: &str) -> Result<()> {
    let body = error_body(reply, request_id);
    let response = error_header(reply, request_id, body.len())?;
    session
        .write_response_header(Box::new(response), false)
        .await?;
    session.write_response_body(Some(body), true).await?;
    Ok(())
}

/// Returns whether the unread request body is small enough to drain.
fn should_drain(session: &Session, drain_max_bytes: u64) -> bool {
    let headers = &session.req_header().headers;
    if headers.contains_key(header::TRANSFER_ENCODING) {
        return false;
    }
    match headers.get(header::CONTENT_LENGTH) {
        None => true,
        Some(value) => value
            .to_str()
            .ok()
            .and_then(|text| text.parse::<u64>().ok())
            .is_some_and(|length| length <= drain_max_bytes),
    }
}

/// Returns the standard reason phrase of an HTTP status, or "" for an unknown one.
pub fn reason_phrase(status: u16) -> &'static str {
    http::StatusCode::from_u16(status)
        .ok()
        .and_then(|status| status.canonical_reason())
        .unwrap_or("")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_body_shape() {
        let reply = ErrorReply {
            status: 401,
            code: "invalid_api_key_provided",
            error_type: "authentication_error",
            message: "The key is \"bad\".",
            challenge: None,
            retry_after: None,
        };
        let body: serde_json::Value = serde_json::from_slice(&error_body(&reply, "req_1")).unwrap();
        assert_eq!(
            body,
            serde_json::json!({"error": {
                "code": "invalid_api_key_provided",
                "message": "The key is \"bad\".",
                "type": "authentication_error",
                "id": "req_1",
            }})
        );
    }
}

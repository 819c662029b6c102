//! The access decision: a pure function of the table and the facts of one request.
//!
//! Checks run in a fixed order, and the first failing check names the denial:
//! path, route, caller address, key presence, key validity, the key's allowlist, and
//! the campaign in the path.

use std::net::IpAddr;

use super::key::{Environment, KeyHash};
use super::path::check_path;
use super::{KeyEntry, KeySlot, Table};

/// The `Authorization` header of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Authorization<'a> {
    Missing,
    /// Exactly one header, with its raw value.
    Single(&'a [u8]),
    /// Two or more headers, which is never valid.
    Repeated,
}

/// The facts of one request that the decision reads.
#[derive(Debug, Clone, Copy)]
pub struct RequestFacts<'a> {
    /// The client address, or `None` when it is unknown (which is always denied).
    pub client_ip: Option<IpAddr>,
    /// The request target up to, not including, the first `?`.
    pub path: &'a [u8],
    pub authorization: Authorization<'a>,
    /// The current time in Unix seconds, for key expiry.
    pub now: i64,
}

/// The outcome of a decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Allow(Grant),
    Deny(Denial),
}

/// The campaign and key that allowed a request, as indexes into the table that decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grant {
    pub campaign: u32,
    pub key: u8,
}

/// The reason a request was denied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Denial {
    /// The path is ambiguous: encoded separators, dot or empty segments, `;`, a fragment
    /// (`#`), control characters or broken percent-encoding.
    InvalidPath,
    /// The path is under no campaign route.
    NoRoute,
    /// The client address is in no campaign's allowlist.
    UnknownCaller,
    /// No `Authorization` header.
    MissingKey,
    /// Not exactly one well-formed bearer token, or the key is unknown, expired or of the
    /// other environment.
    InvalidKey,
    /// The client address is not in the allowlist of the key's campaign.
    CallerNotAllowedForKey,
    /// The campaign in the path is not the key's campaign.
    CampaignNotAllowed,
    /// The campaign used up its rate limit. The rate limiter returns it, never `decide`.
    TooManyRequests,
    /// The request header is larger than the limit. The proxy returns it, never `decide`.
    HeaderTooLarge,
    /// The request body is larger than the limit. The proxy returns it, never `decide`.
    PayloadTooLarge,
}

impl Denial {
    /// Returns the HTTP status of the error response.
    pub fn status(self) -> u16 {
        match self {
            Denial::InvalidPath => 400,
            Denial::MissingKey | Denial::InvalidKey => 401,
            Denial::UnknownCaller | Denial::CallerNotAllowedForKey | Denial::CampaignNotAllowed => {
                403
            }
            Denial::NoRoute => 404,
            Denial::PayloadTooLarge => 413,
            Denial::TooManyRequests => 429,
            Denial::HeaderTooLarge => 431,
        }
    }

    /// Returns the machine-readable error code that clients match on.
    pub fn code(self) -> &'static str {
        match self {
            Denial::InvalidPath => "parameter_invalid",
            Denial::NoRoute => "not_found",
            Denial::UnknownCaller | Denial::CallerNotAllowedForKey => "invalid_ip_address_used",
            Denial::MissingKey => "authentication_required",
            Denial::InvalidKey => "invalid_api_key_provided",
            Denial::CampaignNotAllowed => "campaign_not_allowed",
            Denial::TooManyRequests => "too_many_requests",
            Denial::HeaderTooLarge => "request_header_fields_too_large",
            Denial::PayloadTooLarge => "payload_too_large",
        }
    }

    /// Returns the error type, a coarse class of the code.
    pub fn error_type(self) -> &'static str {
        match self {
            Denial::InvalidPath
            | Denial::NoRoute
            | Denial::HeaderTooLarge
            | Denial::PayloadTooLarge => "invalid_request_error",
            Denial::TooManyRequests => "rate_limit_error",
            Denial::MissingKey | Denial::InvalidKey => "authentication_error",
            Denial::UnknownCaller | Denial::CallerNotAllowedForKey | Denial::CampaignNotAllowed => {
                "permission_error"
            }
        }
    }

    /// Returns a sentence for the person reading the response.
    pub fn message(self) -> &'static str {
        match self {
            Denial::InvalidPath => {
                "The request path is invalid: it contains an encoded slash or backslash, a dot or empty segment, a semicolon, a fragment (#), a control character or broken percent-encoding."
            }
            Denial::NoRoute => "No API route matches the request path.",
            Denial::UnknownCaller => "The client IP address is not allowed to use this API.",
            Denial::CallerNotAllowedForKey => {
                "The client IP address is not on the allowlist of this API key's campaign."
            }
            Denial::MissingKey => {
                "No API key was provided. Send it as 'Authorization: Bearer <key>'."
            }
            Denial::InvalidKey => "The API key provided is invalid, expired or for another environment.",
            Denial::CampaignNotAllowed => "This API key does not belong to the campaign in the request path.",
            Denial::TooManyRequests => {
                "The campaign sent more requests than its rate limit allows. Retry after the number of seconds in the Retry-After header."
            }
            Denial::HeaderTooLarge => "The request header is larger than this API accepts.",
            Denial::PayloadTooLarge => "The request body is larger than this API accepts.",
        }
    }
}

/// Decides whether a request may go upstream.
pub fn decide(table: &Table, facts: &RequestFacts<'_>) -> Decision {
    match check(table, facts) {
        Ok(grant) => Decision::Allow(grant),
        Err(denial) => Decision::Deny(denial),
    }
}

fn check(table: &Table, facts: &RequestFacts<'_>) -> Result<Grant, Denial> {
    check_path(facts.path).map_err(|_| Denial::InvalidPath)?;
    let path_campaign = table
        .routes()
        .iter()
        .find_map(|route| route.campaign_segment(facts.path))
        .ok_or(Denial::NoRoute)?;
    let client_ip = facts.client_ip.map(|ip| ip.to_canonical());

    // The union of all allowlists is the costliest lookup on a large table. When the
    // key's own allowlist contains the client, the client is in the union too, so the
    // union is searched only to tell which denial comes first in the order above.
    match (client_ip, find_key(table, facts)) {
        (Some(ip), Ok(key)) if key.networks.contains(ip) => {
            if path_campaign != key.campaign_id.as_bytes() {
                return Err(Denial::CampaignNotAllowed);
            }
            Ok(Grant {
                campaign: key.slot.campaign,
                key: key.slot.key,
            })
        }
        (ip, key) => {
            ip.filter(|&ip| table.callers.contains(ip))
                .ok_or(Denial::UnknownCaller)?;
            key?;
            Err(Denial::CallerNotAllowedForKey)
        }
    }
}

/// Returns the campaign and key of the key that the request presents, when the table
/// contains it and it has not expired. The access log names them for a request that was
/// denied for its address or its path.
pub fn presented_key(table: &Table, facts: &RequestFacts<'_>) -> Option<KeySlot> {
    find_key(table, facts).ok().map(|key| key.slot)
}

/// Finds the key that the request presents, or returns the denial for its absence.
fn find_key<'t>(table: &'t Table, facts: &RequestFacts<'_>) -> Result<&'t KeyEntry, Denial> {
    let value = match facts.authorization {
        Authorization::Missing => return Err(Denial::MissingKey),
        Authorization::Repeated => return Err(Denial::InvalidKey),
        Authorization::Single(value) => value,
    };
    let token = bearer_token(value).ok_or(Denial::InvalidKey)?;
    if !token.starts_with(table.environment().key_prefix().as_bytes()) {
        return Err(Denial::InvalidKey);
    }
    let key = table
        .find_key(&KeyHash::of(token))
        .ok_or(Denial::InvalidKey)?;
    if facts.now >= key.expires_at {
        return Err(Denial::InvalidKey);
    }
    Ok(key)
}

/// Extracts the token of `Bearer <token>`: the scheme in any letter case, one or more
/// spaces, then a token68 (RFC 9110, section 11.2) and nothing after it.
fn bearer_token(value: &[u8]) -> Option<&[u8]> {
    const SCHEME: &[u8] = b"bearer";
    if value.len() <= SCHEME.len() || !value[..SCHEME.len()].eq_ignore_ascii_case(SCHEME) {
        return None;
    }
    let rest = &value[SCHEME.len()..];
    let spaces = rest.iter().take_while(|&&b| b == b' ').count();
    if spaces == 0 {
        return None;
    }
    let token = &rest[spaces..];
    is_token68(token).then_some(token)
}

/// Returns whether `token` is a token68: what `Bearer` carries.
fn is_token68(token: &[u8]) -> bool {
    let body_len = token.iter().take_while(|&&b| is_token68_char(b)).count();
    let padding_ok = token[body_len..].iter().all(|&b| b == b'=');
    body_len > 0 && padding_ok
}

/// Returns why `key` could never be accepted, for `keygate key hash`: a key is sent as a
/// bearer token and starts with the prefix of its environment.
pub fn key_format_problem(key: &[u8]) -> Option<&'static str> {
    let prefixed = [Environment::Live, Environment::Test]
        .iter()
        .any(|environment| key.starts_with(environment.key_prefix().as_bytes()));
    if !prefixed {
        return Some("the input is not a key: keys start with key_live_ or key_test_");
    }
    if !is_token68(key) {
        return Some("the input is not a key: keys contain only letters, digits and - . _ ~ + /, with = only at the end");
    }
    None
}

fn is_token68_char(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~' | b'+' | b'/')
}

#[cfg(test)]
mod tests;

//! Request headers that keygate reads or rewrites: `Authorization`, and the headers that
//! could let a client pose as another address or as keygate itself.

use bytes::Bytes;
use pingora::http::RequestHeader;
use pingora::proxy::Session;

use crate::table::Authorization;

/// Client headers that claim a client address. They are removed before the request goes
/// upstream, and keygate sets `X-Forwarded-For` itself.
const FORWARDING_HEADERS: [&str; 4] = [
    "x-forwarded-for",
    "x-real-ip",
    "forwarded",
    "true-client-ip",
];

/// The prefix of the identity headers that keygate sets; clients may not send them.
const KEYGATE_PREFIX: &str = "x-keygate-";

/// The `Authorization` header of a request as the client sent it.
pub enum RawAuthorization {
    Missing,
    Single(Bytes),
    Repeated,
}

impl RawAuthorization {
    /// Reads the header from the request.
    ///
    /// The value comes from the raw header bytes, because the HTTP parser trims trailing
    /// spaces and tabs, and a token followed by whitespace is not a valid token. When the
    /// raw and parsed headers disagree on how many there are, the request counts as
    /// carrying several, which is always rejected.
    pub fn read(session: &Session) -> Self {
        let parsed_count = session
            .req_header()
            .headers
            .get_all(http::header::AUTHORIZATION)
            .iter()
            .count();
        match parsed_count {
            0 => return Self::Missing,
            1 => {}
            _ => return Self::Repeated,
        }
        let raw = session.as_downstream().to_h1_raw();
        let mut values = raw_values(&raw, b"authorization");
        match (values.next(), values.next()) {
            (Some(value), None) => Self::Single(raw.slice_ref(value)),
            _ => Self::Repeated,
        }
    }

    /// Borrows the header in the form the decision reads.
    pub fn as_facts(&self) -> Authorization<'_> {
        match self {
            Self::Missing => Authorization::Missing,
            Self::Single(value) => Authorization::Single(value),
            Self::Repeated => Authorization::Repeated,
        }
    }
}

/// Returns the values of every header named `name` (lowercase) in a raw HTTP/1 header
/// block, with leading whitespace removed and trailing whitespace kept.
fn raw_values<'a>(raw: &'a [u8], name: &'a [u8]) -> impl Iterator<Item = &'a [u8]> + 'a {
    raw.split(|&b| b == b'\n').skip(1).filter_map(move |line| {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let colon = line.iter().position(|&b| b == b':')?;
        line[..colon].eq_ignore_ascii_case(name).then(|| {
            let value = &line[colon + 1..];
            let start = value.iter().position(|&b| b != b' ' && b != b'\t');
            start.map_or(&value[value.len()..], |start| &value[start..])
        })
    })
}

/// Returns whether a client header must not reach the upstream. Names are compared in
/// lowercase with `_` read as `-`, because some backends treat the two alike.
pub fn is_reserved(name: &str) -> bool {
    let matches = |expected: &str| {
        name.len() >= expected.len()
            && name
                .bytes()
                .zip(expected.bytes())
                .all(|(got, want)| normalise(got) == want)
    };
    matches(KEYGATE_PREFIX)
        || FORWARDING_HEADERS
            .iter()
            .any(|header| name.len() == header.len() && matches(header))
}

fn normalise(byte: u8) -> u8 {
    match byte {
        b'_' => b'-',
        other => other.to_ascii_lowercase(),
    }
}

/// Removes every reserved client header from the upstream request.
pub fn strip_reserved(request: &mut RequestHeader) {
    let reserved: Vec<http::HeaderName> = request
        .headers
        .keys()
        .filter(|name| is_reserved(name.as_str()))
        .cloned()
        .collect();
    for name in reserved {
        request.remove_header(&name);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reserved_names() {
        for name in [
            "x-keygate-campaign",
            "X-Keygate-Key-Id",
            "x_keygate_anything",
            "X_KEYGATE-",
            "x-forwarded-for",
            "X_Forwarded_For",
            "x-real-ip",
            "X_REAL_IP",
            "forwarded",
            "true-client-ip",
            "True_Client_IP",
        ] {
            assert!(is_reserved(name), "{name}");
        }
        for name in [
            "x-keygate",
            "x-forwarded-host",
            "forwarded-for",
            "authorization",
            "x-request-id",
        ] {
            assert!(!is_reserved(name), "{name}");
        }
    }

    #[test]
    fn raw_values_keep_trailing_whitespace() {
        let raw =
            b"GET / HTTP/1.1\r\nHost: a\r\nAuthorization:   Bearer k\t\r\nauthorization:x\r\n\r\n";
        let values: Vec<&[u8]> = raw_values(raw, b"authorization").collect();
        assert_eq!(values, vec![&b"Bearer k\t"[..], &b"x"[..]]);
    }

    #[test]
    fn raw_values_ignore_request_line() {
        let raw = b"GET /authorization:x HTTP/1.1\r\nHost: a\r\n\r\n";
        assert_eq!(raw_values(raw, b"authorization").count(), 0);
    }
}

//! Request paths: the strict check that runs before routing, and campaign routes.
//!
//! keygate never normalises a path. It rejects every path whose meaning could differ
//! between keygate and the upstream, so the campaign segment it checks is exactly the
//! segment the upstream receives.

/// A campaign route: a literal path prefix ending in `/`, followed by the campaign
/// segment. `/api/v2/campaigns/{campaign}` becomes the prefix `/api/v2/campaigns/`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    prefix: Box<str>,
}

/// The placeholder for the campaign segment in a route pattern.
pub const CAMPAIGN_PLACEHOLDER: &str = "{campaign}";

impl Route {
    /// Parses a route pattern, or returns why it is invalid.
    pub fn parse(pattern: &str) -> Result<Self, &'static str> {
        let Some(prefix) = pattern.strip_suffix(CAMPAIGN_PLACEHOLDER) else {
            return Err("the last segment must be {campaign}");
        };
        if !prefix.starts_with('/') || !prefix.ends_with('/') {
            return Err("a route must start with / and have {campaign} as a whole segment");
        }
        if prefix.contains('{') || prefix.contains('}') {
            return Err("a route must contain exactly one {campaign} and no other braces");
        }
        let plain = prefix == "/" || check_path(&prefix.as_bytes()[..prefix.len() - 1]).is_ok();
        if !plain || prefix.contains('%') {
            return Err("the prefix must be a plain path: no empty or dot segments, %, ;, # or \\");
        }
        Ok(Self {
            prefix: prefix.into(),
        })
    }

    /// Returns the campaign segment of `path` if the path is under this route.
    pub fn campaign_segment<'p>(&self, path: &'p [u8]) -> Option<&'p [u8]> {
        let rest = path.strip_prefix(self.prefix.as_bytes())?;
        let segment = match rest.iter().position(|&b| b == b'/') {
            Some(end) => &rest[..end],
            None => rest,
        };
        (!segment.is_empty()).then_some(segment)
    }

    /// Returns the literal prefix before the campaign segment.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }
}

/// The reason a path was rejected before routing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathError {
    NotOriginForm,
    ForbiddenByte,
    BrokenPercentEncoding,
    EncodedSeparator,
    EncodedControl,
    EmptySegment,
    DotSegment,
}

/// Checks the path part of a request target (everything before `?`).
///
/// The check rejects a target that does not start with `/`, bytes outside visible ASCII,
/// `;`, `\` and `#`, and `%` not followed by two hex digits. It also rejects encoded `/`, `\`
/// and control characters, empty segments (a trailing `/` too) and `.` or `..` segments,
/// encoded or not.
pub fn check_path(path: &[u8]) -> Result<(), PathError> {
    let Some(rest) = path.strip_prefix(b"/") else {
        return Err(PathError::NotOriginForm);
    };
    if rest.is_empty() {
        return Ok(());
    }
    for segment in rest.split(|&b| b == b'/') {
        check_segment(segment)?;
    }
    Ok(())
}

fn check_segment(segment: &[u8]) -> Result<(), PathError> {
    if segment.is_empty() {
        return Err(PathError::EmptySegment);
    }
    let mut dots = 0usize;
    let mut decoded_len = 0usize;
    let mut index = 0;
    while index < segment.len() {
        let byte = segment[index];
        let decoded = if byte == b'%' {
            let high = segment.get(index + 1).and_then(|&b| hex_digit(b));
            let low = segment.get(index + 2).and_then(|&b| hex_digit(b));
            let (Some(high), Some(low)) = (high, low) else {
                return Err(PathError::BrokenPercentEncoding);
            };
            index += 3;
            let value = (high << 4) | low;
            match value {
                b'/' | b'\\' => return Err(PathError::EncodedSeparator),
                0x00..=0x1f | 0x7f => return Err(PathError::EncodedControl),
                _ => value,
            }
        } else {
            if !(0x21..=0x7e).contains(&byte) || matches!(byte, b';' | b'\\' | b'#') {
                return Err(PathError::ForbiddenByte);
            }
            index += 1;
            byte
        };
        decoded_len += 1;
        if decoded == b'.' {
            dots += 1;
        }
    }
    if dots == decoded_len && decoded_len <= 2 {
        return Err(PathError::DotSegment);
    }
    Ok(())
}

fn hex_digit(byte: u8) -> Option<u8> {
    match byte {
        b'0'..=b'9' => Some(byte - b'0'),
        b'a'..=b'f' => Some(byte - b'a' + 10),
        b'A'..=b'F' => Some(byte - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_path_accepts_plain_paths() {
        for path in [
            "/",
            "/api/v2/campaigns/campaign_a/messages",
            "/api/v2/campaigns/campaign_a",
            "/a/b%20c/d",
            "/a/.../b",
            "/a/.hidden",
            "/a/%41",
        ] {
            assert_eq!(check_path(path.as_bytes()), Ok(()), "{path}");
        }
    }

    #[test]
    fn check_path_rejects_ambiguous_paths() {
        let cases: &[(&[u8], PathError)] = &[
            (b"api/v2", PathError::NotOriginForm),
            (b"http://example.com/a", PathError::NotOriginForm),
            (b"*", PathError::NotOriginForm),
            (b"/a/b%2F..%2Fc", PathError::EncodedSeparator),
            (b"/a/b%2f..%2fc", PathError::EncodedSeparator),
            (b"/a/b%5C..%5Cc", PathError::EncodedSeparator),
            (b"/a/b%5c", PathError::EncodedSeparator),
            (b"/a/b\\c", PathError::ForbiddenByte),
            (b"/a/../b", PathError::DotSegment),
            (b"/a/./b", PathError::DotSegment),
            (b"/a/%2e%2e/b", PathError::DotSegment),
            (b"/a/%2E/b", PathError::DotSegment),
            (b"/a/.%2e/b", PathError::DotSegment),
            (b"/a/..", PathError::DotSegment),
            (b"/a/..;/b", PathError::ForbiddenByte),
            (b"/a;x=1/b", PathError::ForbiddenByte),
            (b"/a/b#c", PathError::ForbiddenByte),
            (b"/a#/../b", PathError::ForbiddenByte),
            (b"/a//b", PathError::EmptySegment),
            (b"/a/b/", PathError::EmptySegment),
            (b"//a", PathError::EmptySegment),
            (b"/a/%zz", PathError::BrokenPercentEncoding),
            (b"/a/%4", PathError::BrokenPercentEncoding),
            (b"/a/%", PathError::BrokenPercentEncoding),
            (b"/a/%00", PathError::EncodedControl),
            (b"/a/%0a", PathError::EncodedControl),
            (b"/a/%7F", PathError::EncodedControl),
            (b"/a/b\x01", PathError::ForbiddenByte),
            (b"/a/\xc3\xa9", PathError::ForbiddenByte),
        ];
        for (path, expected) in cases {
            assert_eq!(
                check_path(path),
                Err(*expected),
                "{}",
                String::from_utf8_lossy(path)
            );
        }
    }

    #[test]
    fn route_parse_accepts_campaign_last() {
        let route = Route::parse("/api/v2/campaigns/{campaign}").unwrap();
        assert_eq!(route.prefix(), "/api/v2/campaigns/");
        assert!(Route::parse("/{campaign}").is_ok());
    }

    #[test]
    fn route_parse_rejects_bad_patterns() {
        for pattern in [
            "/api/v2/campaigns",
            "/api/{campaign}/messages",
            "/api/v2/campaign_{campaign}",
            "api/{campaign}",
            "/{campaign}/{campaign}",
            "/api//{campaign}",
            "/api/../{campaign}",
            "/api/%2e/{campaign}",
            "/api;x/{campaign}",
            "/api#x/{campaign}",
            "",
        ] {
            assert!(Route::parse(pattern).is_err(), "{pattern}");
        }
    }

    #[test]
    fn campaign_segment_is_next_whole_segment() {
        let route = Route::parse("/api/v2/campaigns/{campaign}").unwrap();
        let segment = |path: &'static str| route.campaign_segment(path.as_bytes());
        assert_eq!(segment("/api/v2/campaigns/c1/messages"), Some(&b"c1"[..]));
        assert_eq!(segment("/api/v2/campaigns/c1"), Some(&b"c1"[..]));
        assert_eq!(segment("/api/v2/campaigns/"), None);
        assert_eq!(segment("/api/v2/campaigns"), None);
        assert_eq!(segment("/API/v2/campaigns/c1"), None);
        assert_eq!(segment("/api/v2/campaignsx/c1"), None);
    }
}

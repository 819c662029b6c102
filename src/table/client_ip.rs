//! The client address of a request: the TCP peer, or, when the peer is a trusted proxy,
//! the address that the proxies recorded in `X-Forwarded-For`.

use std::net::IpAddr;

use super::IpSet;

/// Finds the client address of a request from `peer`, given the values of its
/// `X-Forwarded-For` headers in order.
///
/// From an untrusted peer the headers are ignored. From a trusted peer the list is read
/// from the right, trusted addresses are skipped, and the first untrusted address is the
/// client. When every address is trusted, the leftmost one is the client. A missing or empty list, or
/// one with an entry that is not a plain IP address, makes the peer the client.
pub fn client_ip<'h>(
    peer: IpAddr,
    forwarded_for: impl Iterator<Item = &'h [u8]>,
    trusted: &IpSet,
) -> IpAddr {
    let peer = peer.to_canonical();
    if !trusted.contains(peer) {
        return peer;
    }
    let mut hops: Vec<IpAddr> = Vec::new();
    for value in forwarded_for {
        for entry in value.split(|&b| b == b',') {
            let Some(ip) = parse_entry(entry) else {
                return peer;
            };
            hops.push(ip);
        }
    }
    let Some(&leftmost) = hops.first() else {
        return peer;
    };
    hops.iter()
        .rev()
        .copied()
        .find(|&ip| !trusted.contains(ip))
        .unwrap_or(leftmost)
}

/// Parses one `X-Forwarded-For` entry, surrounded by optional spaces or tabs.
fn parse_entry(entry: &[u8]) -> Option<IpAddr> {
    let text = std::str::from_utf8(entry).ok()?.trim_matches([' ', '\t']);
    text.parse::<IpAddr>().ok().map(|ip| ip.to_canonical())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trusted(entries: &[&str]) -> IpSet {
        let networks: Vec<ipnet::IpNet> = entries.iter().map(|e| e.parse().unwrap()).collect();
        IpSet::from_networks(&networks)
    }

    fn resolve(peer: &str, headers: &[&str], trusted: &IpSet) -> String {
        client_ip(
            peer.parse().unwrap(),
            headers.iter().map(|h| h.as_bytes()),
            trusted,
        )
        .to_string()
    }

    #[test]
    fn untrusted_peer_ignores_headers() {
        let proxies = trusted(&["10.0.0.0/8"]);
        assert_eq!(
            resolve("192.0.2.66", &["203.0.113.10"], &proxies),
            "192.0.2.66"
        );
        assert_eq!(resolve("192.0.2.66", &[], &IpSet::default()), "192.0.2.66");
    }

    #[test]
    fn trusted_chain_is_walked_from_the_right() {
        let proxies = trusted(&["10.0.0.0/8", "2001:db8:f::/48"]);
        let cases: &[(&str, &[&str], &str)] = &[
            ("10.0.0.1", &["203.0.113.10"], "203.0.113.10"),
            (
                "10.0.0.1",
                &["198.51.100.1, 203.0.113.10, 10.0.0.2"],
                "203.0.113.10",
            ),
            (
                "10.0.0.1",
                &["198.51.100.1", "203.0.113.10 , 10.0.0.2"],
                "203.0.113.10",
            ),
            ("10.0.0.1", &["10.0.0.3, 10.0.0.2"], "10.0.0.3"),
            (
                "2001:db8:f::1",
                &["2001:db8:a::5, 2001:db8:f::2"],
                "2001:db8:a::5",
            ),
            ("::ffff:10.0.0.1", &["203.0.113.10"], "203.0.113.10"),
            ("10.0.0.1", &["::ffff:203.0.113.10"], "203.0.113.10"),
        ];
        for &(peer, headers, expected) in cases {
            assert_eq!(
                resolve(peer, headers, &proxies),
                expected,
                "{peer} {headers:?}"
            );
        }
    }

    #[test]
    fn malformed_header_falls_back_to_peer() {
        let proxies = trusted(&["10.0.0.0/8"]);
        for headers in [
            &[][..],
            &[""],
            &["garbage"],
            &["203.0.113.10, "],
            &["203.0.113.10:443"],
            &["[2001:db8::1]"],
            &["203.0.113.10", "unknown"],
            &["010.0.0.1"],
        ] {
            assert_eq!(
                resolve("10.0.0.1", headers, &proxies),
                "10.0.0.1",
                "{headers:?}"
            );
        }
    }
}

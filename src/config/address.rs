//! The strict parser for allowlist entries. Single addresses and networks go through the
//! same rules, and every text that other tools could read differently is rejected.

use std::net::{IpAddr, Ipv4Addr};

use ipnet::IpNet;

/// Parses an allowlist entry: an IPv4 or IPv6 address, or a network in CIDR notation
/// with no host bits set. The error message states what is wrong and how to fix it.
pub fn parse_network(text: &str) -> Result<IpNet, String> {
    if text.chars().any(char::is_whitespace) {
        return Err("whitespace is not allowed in an address; remove it".into());
    }
    if text.contains('%') {
        return Err("zone ids (the %interface suffix) are not allowed; remove it".into());
    }
    let (address_text, prefix_text) = match text.split_once('/') {
        Some((address, prefix)) => (address, Some(prefix)),
        None => (text, None),
    };
    let address = parse_address(address_text)?;
    let max_prefix = match address {
        IpAddr::V4(_) => 32,
        IpAddr::V6(_) => 128,
    };
    let prefix = match prefix_text {
        None => max_prefix,
        Some(prefix) => parse_prefix(prefix, max_prefix)?,
    };
    let network = IpNet::new(address, prefix).map_err(|_| "invalid prefix length".to_owned())?;
    if network.network() != address {
        return Err(format!(
            "host bits are set; did you mean {}?",
            network.trunc()
        ));
    }
    check_canonical_ipv6(address, address_text, prefix_text)?;
    Ok(network)
}

/// Rejects an IPv6 address not written in the RFC 5952 form, which is what `Ipv6Addr`
/// formats to: lowercase, no leading zeros in a group, and `::` for the longest run of
/// zero groups. One address then has one spelling in the file, the logs and `grep`.
fn check_canonical_ipv6(
    address: IpAddr,
    address_text: &str,
    prefix_text: Option<&str>,
) -> Result<(), String> {
    let IpAddr::V6(v6) = address else {
        return Ok(());
    };
    let canonical = v6.to_string();
    if canonical == address_text {
        return Ok(());
    }
    let suggestion = match prefix_text {
        Some(prefix) => format!("{canonical}/{prefix}"),
        None => canonical,
    };
    Err(format!(
        "IPv6 address is not in canonical form (RFC 5952: lowercase, no leading zeros, :: for the longest run of zero groups); did you mean {suggestion}?"
    ))
}

fn parse_address(text: &str) -> Result<IpAddr, String> {
    if text.contains('.') && !text.contains(':') {
        let has_leading_zero = text
            .split('.')
            .any(|octet| octet.len() > 1 && octet.starts_with('0'));
        if has_leading_zero {
            return Err(
                "leading zeros are not allowed, because some tools read them as octal".into(),
            );
        }
        return text.parse::<Ipv4Addr>().map(IpAddr::V4).map_err(|_| {
            "invalid IPv4 address; write four decimal octets such as 203.0.113.7".into()
        });
    }
    let address: IpAddr = text
        .parse()
        .map_err(|_| "invalid IP address; write an IPv4 address such as 203.0.113.7, an IPv6 address such as 2001:db8::7, or a network such as 198.51.100.0/24".to_owned())?;
    if let IpAddr::V6(v6) = address {
        if let Some(v4) = v6.to_ipv4_mapped() {
            return Err(format!(
                "IPv4-mapped IPv6 addresses are not allowed; write the IPv4 form {v4}"
            ));
        }
    }
    Ok(address)
}

fn parse_prefix(text: &str, max_prefix: u8) -> Result<u8, String> {
    let valid_digits = !text.is_empty()
        && text.bytes().all(|b| b.is_ascii_digit())
        && !(text.len() > 1 && text.starts_with('0'));
    if !valid_digits {
        return Err("invalid prefix length; write a decimal number without leading zeros".into());
    }
    match text.parse::<u8>() {
        Ok(prefix) if prefix <= max_prefix => Ok(prefix),
        _ => Err(format!(
            "prefix length is too long; the maximum is {max_prefix}"
        )),
    }
}

/// Returns whether `network` covers a whole address family (`0.0.0.0/0` or `::/0`).
pub fn is_any(network: &IpNet) -> bool {
    network.prefix_len() == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_canonical_entries() {
        for (text, expected) in [
            ("203.0.113.7", "203.0.113.7/32"),
            ("198.51.100.0/24", "198.51.100.0/24"),
            ("2001:db8:7::/48", "2001:db8:7::/48"),
            ("2001:db8::7", "2001:db8::7/128"),
            ("0.0.0.0/0", "0.0.0.0/0"),
            ("::/0", "::/0"),
            ("10.0.0.0/8", "10.0.0.0/8"),
            ("0.0.0.0", "0.0.0.0/32"),
            ("::1", "::1/128"),
            ("2001:db8:0:1:1:1:1:1", "2001:db8:0:1:1:1:1:1/128"),
            ("2001:db8:0:0:1::", "2001:db8:0:0:1::/128"),
            ("2001:db8::1:0:0:1", "2001:db8::1:0:0:1/128"),
            ("fe80::/10", "fe80::/10"),
        ] {
            assert_eq!(parse_network(text).unwrap().to_string(), expected, "{text}");
        }
    }

    #[test]
    fn rejects_ambiguous_entries() {
        for (text, hint) in [
            ("010.0.0.1", "leading zeros"),
            ("010.0.0.1/32", "leading zeros"),
            ("203.0.113.7/24", "did you mean 203.0.113.0/24?"),
            ("203.0.113.7/33", "maximum is 32"),
            ("2001:db8::/129", "maximum is 128"),
            (" 203.0.113.7 ", "whitespace"),
            ("203.0.113.7\t", "whitespace"),
            ("fe80::1%eth0", "zone ids"),
            ("203.0.113.0/024", "without leading zeros"),
            ("203.0.113.0/", "invalid prefix"),
            ("203.0.113", "invalid IPv4"),
            ("1.2.3.256", "invalid IPv4"),
            ("::ffff:192.0.2.1", "write the IPv4 form 192.0.2.1"),
            ("example.com", "invalid IPv4"),
            ("example", "invalid IP address"),
            ("", "invalid IP address"),
            ("2001:db8::1/64", "did you mean 2001:db8::/64?"),
            ("2001:0db8::1", "did you mean 2001:db8::1?"),
            ("2001:DB8::1", "did you mean 2001:db8::1?"),
            ("2001:db8:0:0:0:0:0:1", "did you mean 2001:db8::1?"),
            ("2001:db8::0:1", "did you mean 2001:db8::1?"),
            ("2001:db8:0:0:1:0:0:0", "did you mean 2001:db8:0:0:1::?"),
            ("2001:db8::1:0:0:0", "did you mean 2001:db8:0:0:1::?"),
            ("2001:db8:0:0:1::1", "did you mean 2001:db8::1:0:0:1?"),
            ("2001:db8:0::/48", "did you mean 2001:db8::/48?"),
            ("2001:DB8:7::/48", "did you mean 2001:db8:7::/48?"),
            ("0:0:0:0:0:0:0:0/0", "did you mean ::/0?"),
            ("::0001", "did you mean ::1?"),
            ("2001:DB8::1/64", "did you mean 2001:db8::/64?"),
        ] {
            let error = parse_network(text).unwrap_err();
            assert!(error.contains(hint), "{text:?}: {error}");
        }
    }
}

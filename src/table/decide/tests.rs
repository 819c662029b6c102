use std::net::IpAddr;

use ipnet::IpNet;

use super::*;
use crate::table::{Campaign, Environment, IpSet, KeyInfo, Route, Table};

const KEY_A: &str = "key_test_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA";
const KEY_A2: &str = "key_test_aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
const KEY_B: &str = "key_test_BBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBB";
const KEY_EXPIRED: &str = "key_test_EEEEEEEEEEEEEEEEEEEEEEEEEEEEEEEEEEEEEEEEEEE";
const KEY_LIVE: &str = "key_live_LLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLL";
const NOW: i64 = 1_800_000_000;

fn campaign(id: &str, networks: &[&str], keys: &[(&str, &str, Option<i64>)]) -> Campaign {
    let networks: Vec<IpNet> = networks.iter().map(|n| n.parse().unwrap()).collect();
    Campaign {
        id: id.into(),
        networks: IpSet::from_networks(&networks),
        keys: keys
            .iter()
            .map(|&(id, key, expires_at)| KeyInfo {
                id: id.into(),
                hash: KeyHash::of(key.as_bytes()),
                expires_at,
            })
            .collect(),
        rate_limit: None,
    }
}

fn table() -> Table {
    Table::new(
        Environment::Test,
        vec![Route::parse("/api/v2/campaigns/{campaign}").unwrap()],
        vec![
            campaign(
                "campaign_a",
                &["203.0.113.0/24", "2001:db8:a::/48"],
                &[
                    ("primary", KEY_A, None),
                    ("next", KEY_A2, Some(NOW + 1)),
                    ("old", KEY_EXPIRED, Some(NOW)),
                ],
            ),
            campaign(
                "campaign_b",
                &["198.51.100.0/24"],
                &[("primary", KEY_B, None)],
            ),
            campaign("campaign_l", &["192.0.2.0/24"], &[("live", KEY_LIVE, None)]),
        ],
    )
}

struct Request {
    ip: Option<&'static str>,
    path: &'static str,
    authorization: Option<String>,
}

fn request(ip: &'static str, path: &'static str, key: &str) -> Request {
    Request {
        ip: Some(ip),
        path,
        authorization: Some(format!("Bearer {key}")),
    }
}

fn run(table: &Table, request: &Request) -> Decision {
    let facts = RequestFacts {
        client_ip: request.ip.map(|ip| ip.parse::<IpAddr>().unwrap()),
        path: request.path.as_bytes(),
        authorization: match &request.authorization {
            None => Authorization::Missing,
            Some(value) => Authorization::Single(value.as_bytes()),
        },
        now: NOW,
    };
    decide(table, &facts)
}

const MESSAGES_A: &str = "/api/v2/campaigns/campaign_a/messages";
const MESSAGES_B: &str = "/api/v2/campaigns/campaign_b/messages";

#[test]
fn allows_matching_key_address_and_campaign() {
    let table = table();
    let decision = run(&table, &request("203.0.113.10", MESSAGES_A, KEY_A));
    assert_eq!(
        decision,
        Decision::Allow(Grant {
            campaign: 0,
            key: 0
        })
    );
    let decision = run(
        &table,
        &request("2001:db8:a::5", "/api/v2/campaigns/campaign_a", KEY_A2),
    );
    assert_eq!(
        decision,
        Decision::Allow(Grant {
            campaign: 0,
            key: 1
        })
    );
}

#[test]
fn ipv4_mapped_peer_is_treated_as_ipv4() {
    let decision = run(&table(), &request("::ffff:203.0.113.10", MESSAGES_A, KEY_A));
    assert_eq!(
        decision,
        Decision::Allow(Grant {
            campaign: 0,
            key: 0
        })
    );
}

#[test]
fn denials_follow_check_order() {
    let table = table();
    let missing = |ip, path| Request {
        ip: Some(ip),
        path,
        authorization: None,
    };
    let cases: Vec<(Request, Denial)> = vec![
        (
            request("192.0.2.66", "/api/v2/campaigns/campaign_a/../x", KEY_A),
            Denial::InvalidPath,
        ),
        (
            request("192.0.2.66", "/other/campaign_a", KEY_A),
            Denial::NoRoute,
        ),
        (
            request("192.0.2.66", "/api/v2/campaigns", KEY_A),
            Denial::NoRoute,
        ),
        (
            request("192.0.2.66", "/api/v2/campaigns/", KEY_A),
            Denial::InvalidPath,
        ),
        (
            request("10.9.9.9", MESSAGES_A, KEY_A),
            Denial::UnknownCaller,
        ),
        (
            Request {
                ip: None,
                path: MESSAGES_A,
                authorization: None,
            },
            Denial::UnknownCaller,
        ),
        (missing("203.0.113.10", MESSAGES_A), Denial::MissingKey),
        (
            request("203.0.113.10", MESSAGES_A, "key_test_unknown"),
            Denial::InvalidKey,
        ),
        (
            request("203.0.113.10", MESSAGES_A, KEY_EXPIRED),
            Denial::InvalidKey,
        ),
        (
            request(
                "192.0.2.10",
                "/api/v2/campaigns/campaign_l/messages",
                KEY_LIVE,
            ),
            Denial::InvalidKey,
        ),
        (
            request("198.51.100.10", MESSAGES_A, KEY_A),
            Denial::CallerNotAllowedForKey,
        ),
        (
            request("203.0.113.10", MESSAGES_B, KEY_A),
            Denial::CampaignNotAllowed,
        ),
        (
            request(
                "203.0.113.10",
                "/api/v2/campaigns/campaign_A/messages",
                KEY_A,
            ),
            Denial::CampaignNotAllowed,
        ),
        (
            request(
                "203.0.113.10",
                "/api/v2/campaigns/campaign%5Fa/messages",
                KEY_A,
            ),
            Denial::CampaignNotAllowed,
        ),
    ];
    for (request, expected) in cases {
        assert_eq!(
            run(&table, &request),
            Decision::Deny(expected),
            "{:?} {} {:?}",
            request.ip,
            request.path,
            request.authorization
        );
    }
}

#[test]
fn repeated_authorization_is_invalid() {
    let facts = RequestFacts {
        client_ip: Some("203.0.113.10".parse().unwrap()),
        path: MESSAGES_A.as_bytes(),
        authorization: Authorization::Repeated,
        now: NOW,
    };
    assert_eq!(decide(&table(), &facts), Decision::Deny(Denial::InvalidKey));
}

#[test]
fn bearer_parsing() {
    let valid = [
        format!("Bearer {KEY_A}"),
        format!("bearer {KEY_A}"),
        format!("BEARER {KEY_A}"),
        format!("Bearer    {KEY_A}"),
    ];
    for value in &valid {
        assert_eq!(
            bearer_token(value.as_bytes()),
            Some(KEY_A.as_bytes()),
            "{value}"
        );
    }
    let invalid = [
        format!("Bearer {KEY_A}, Bearer {KEY_B}"),
        "Basic a2V5X3Rlc3Rf".to_owned(),
        "Bearer".to_owned(),
        "Bearer ".to_owned(),
        format!("Bearer{KEY_A}"),
        format!("Bearer {KEY_A}\t"),
        format!("Bearer {KEY_A} "),
        format!("Bearer\t{KEY_A}"),
        format!("Bearer {KEY_A}\u{e9}"),
        format!("Bearer ={KEY_A}"),
        format!("Bearer {KEY_A}=x"),
        format!(" Bearer {KEY_A}"),
    ];
    for value in &invalid {
        assert_eq!(bearer_token(value.as_bytes()), None, "{value:?}");
    }
    assert_eq!(bearer_token(b"Bearer abc=="), Some(&b"abc=="[..]));
}

#[test]
fn expiry_is_exclusive_of_the_instant() {
    let table = table();
    assert_eq!(
        run(&table, &request("203.0.113.10", MESSAGES_A, KEY_A2)),
        Decision::Allow(Grant {
            campaign: 0,
            key: 1
        })
    );
    assert_eq!(
        run(&table, &request("203.0.113.10", MESSAGES_A, KEY_EXPIRED)),
        Decision::Deny(Denial::InvalidKey)
    );
}

#[test]
fn denial_http_mapping() {
    let cases = [
        (Denial::InvalidPath, 400, "parameter_invalid"),
        (Denial::NoRoute, 404, "not_found"),
        (Denial::UnknownCaller, 403, "invalid_ip_address_used"),
        (Denial::MissingKey, 401, "authentication_required"),
        (Denial::InvalidKey, 401, "invalid_api_key_provided"),
        (
            Denial::CallerNotAllowedForKey,
            403,
            "invalid_ip_address_used",
        ),
        (Denial::CampaignNotAllowed, 403, "campaign_not_allowed"),
    ];
    for (denial, status, code) in cases {
        assert_eq!(denial.status(), status, "{denial:?}");
        assert_eq!(denial.code(), code, "{denial:?}");
    }
}

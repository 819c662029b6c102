//! Benchmarks of the pure decision over tables of 10 and 100,000 campaigns, each with 3
//! keys and 20 networks, and the resident memory that the large table takes.
//!
//! Run: `cargo bench --bench decision`

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use ipnet::IpNet;
use keygate::table::{
    decide, Authorization, Campaign, Decision, Environment, IpSet, KeyHash, KeyInfo, RequestFacts,
    Route, Table,
};

const KEYS_PER_CAMPAIGN: usize = 3;
const NETWORKS_PER_CAMPAIGN: u32 = 20;
/// Requests cycled through in each benchmark, so lookups do not all hit one cache line.
const REQUEST_COUNT: usize = 4096;

fn key_of(campaign: usize, key: usize) -> String {
    format!("key_test_{:043}", campaign * KEYS_PER_CAMPAIGN + key)
}

/// The IPv4 /32 networks of a campaign: 16 per campaign from 10.0.0.0 up, with a gap
/// after each, so that no two networks merge into one range.
fn ipv4_of(campaign: usize, index: u32) -> Ipv4Addr {
    Ipv4Addr::from(0x0a00_0000 + (campaign as u32) * 32 + index * 2)
}

/// The IPv6 /64 networks of a campaign: 4 per campaign under 2001:db8::/32, with gaps.
fn ipv6_of(campaign: usize, index: u32) -> Ipv6Addr {
    let high = (0x2001_0db8u128 << 96) | ((campaign as u128) << 72) | ((index as u128 * 2) << 64);
    Ipv6Addr::from(high)
}

fn build_table(campaigns: usize) -> Table {
    let routes = vec![Route::parse("/api/v2/campaigns/{campaign}").unwrap()];
    let campaigns = (0..campaigns)
        .map(|c| {
            let mut networks: Vec<IpNet> = (0..16)
                .map(|i| IpNet::new(ipv4_of(c, i).into(), 32).unwrap())
                .collect();
            networks.extend(
                (0..NETWORKS_PER_CAMPAIGN - 16)
                    .map(|i| IpNet::new(ipv6_of(c, i).into(), 64).unwrap()),
            );
            Campaign {
                id: format!("campaign_{c:08}").into(),
                networks: IpSet::from_networks(&networks),
                keys: (0..KEYS_PER_CAMPAIGN)
                    .map(|k| KeyInfo {
                        id: format!("key-{k}").into(),
                        hash: KeyHash::of(key_of(c, k).as_bytes()),
                        expires_at: None,
                    })
                    .collect(),
                rate_limit: None,
            }
        })
        .collect();
    Table::new(Environment::Test, routes, campaigns)
}

/// One prepared request: its facts are borrowed from these owned parts.
struct Prepared {
    ip: IpAddr,
    path: String,
    authorization: String,
}

#[derive(Clone, Copy)]
enum Kind {
    Allowed,
    UnknownAddress,
    UnknownKey,
    OtherCampaign,
}

fn prepare(campaigns: usize, kind: Kind) -> Vec<Prepared> {
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state as usize
    };
    (0..REQUEST_COUNT)
        .map(|_| {
            let campaign = next() % campaigns;
            let key = next() % KEYS_PER_CAMPAIGN;
            let ip = if next() % 4 == 0 {
                IpAddr::V6(ipv6_of(campaign, 1) | Ipv6Addr::from(7u128))
            } else {
                IpAddr::V4(ipv4_of(campaign, (next() % 16) as u32))
            };
            let path_campaign = match kind {
                Kind::OtherCampaign => (campaign + 1) % campaigns,
                _ => campaign,
            };
            let (ip, token) = match kind {
                Kind::UnknownAddress => (
                    IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)),
                    key_of(campaign, key),
                ),
                Kind::UnknownKey => (ip, format!("key_test_{:043}", usize::MAX - next() % 1000)),
                _ => (ip, key_of(campaign, key)),
            };
            Prepared {
                ip,
                path: format!("/api/v2/campaigns/campaign_{path_campaign:08}/messages"),
                authorization: format!("Bearer {token}"),
            }
        })
        .collect()
}

fn run(table: &Table, request: &Prepared) -> Decision {
    let facts = RequestFacts {
        client_ip: Some(request.ip),
        path: request.path.as_bytes(),
        authorization: Authorization::Single(request.authorization.as_bytes()),
        now: 1_800_000_000,
    };
    decide(table, &facts)
}

fn resident_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

fn decision(c: &mut Criterion) {
    let before = resident_bytes();
    let large = build_table(100_000);
    let after = resident_bytes();
    let ranges: usize = large
        .campaigns()
        .iter()
        .map(|c| c.networks.range_count())
        .sum();
    println!(
        "table of 100000 campaigns, {} keys, {ranges} ranges: resident memory grew by {:.1} MiB",
        large.key_count(),
        (after.saturating_sub(before)) as f64 / (1024.0 * 1024.0)
    );
    let small = build_table(10);

    let mut group = c.benchmark_group("decide");
    group.throughput(Throughput::Elements(1));
    for (name, table, size) in [("10", &small, 10), ("100000", &large, 100_000)] {
        for (kind_name, kind, expect_allow) in [
            ("allowed", Kind::Allowed, true),
            ("unknown_address", Kind::UnknownAddress, false),
            ("unknown_key", Kind::UnknownKey, false),
            ("other_campaign", Kind::OtherCampaign, false),
        ] {
            let requests = prepare(size, kind);
            assert!(requests
                .iter()
                .all(|r| matches!(run(table, r), Decision::Allow(_)) == expect_allow));
            let mut index = 0;
            group.bench_with_input(BenchmarkId::new(kind_name, name), table, |b, table| {
                b.iter(|| {
                    index = (index + 1) % REQUEST_COUNT;
                    black_box(run(table, black_box(&requests[index])))
                })
            });
        }
    }
    group.finish();
}

criterion_group!(benches, decision);
criterion_main!(benches);

//! Validation: turns the file types into the runtime table and settings, and reports
//! every problem at once.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::ops::Range;
use std::time::Duration;

use toml::Spanned;

use super::address::{is_any, parse_network};
use super::error::{ConfigError, Report, Source};
use super::file::{CampaignSection, FileConfig, UpstreamSection};
use super::file::{
    ClientIpSection, LimitsSection, LogSection, RateLimitSection, ReloadSection, ShutdownSection,
};
use super::parallel::map_chunks;
use super::{Limits, Listen, Log, LogFormat, Metrics, Reload, Settings, Shutdown, Upstream};
use crate::table::{
    Campaign, Environment, IpSet, KeyHash, KeyIndex, KeyInfo, RateLimit, Route, SharedCampaigns,
    Table, MAX_KEYS_PER_CAMPAIGN,
};

const DEFAULT_CONNECT_TIMEOUT_MS: i64 = 2_000;
const DEFAULT_READ_TIMEOUT_MS: i64 = 30_000;
const MAX_TIMEOUT_MS: i64 = 3_600_000;
const MAX_ID_LEN: usize = 128;

/// Builds the table and settings, or records every problem in `report`.
pub(super) fn build(
    file: FileConfig,
    campaigns: Vec<CheckedCampaign>,
    report: &mut Report<'_>,
) -> Option<(Table, Settings)> {
    let environment = environment(&file.environment, report);
    let listen = listen(&file.listen, report);
    let upstream = upstream(&file.upstream, report);
    let routes = routes(&file.routes, report);
    let trusted_proxies = trusted_proxies(file.client_ip.as_ref(), report);
    let first_proxy_protocol = file.listen.get_ref().proxy_protocol.first();
    if let (Some(entry), true) = (first_proxy_protocol, trusted_proxies.is_empty()) {
        report.error(
            entry.span(),
            None,
            "listen.proxy_protocol",
            Some(entry.get_ref()),
            "PROXY protocol listeners accept headers only from [client_ip] trusted_proxies, and that list is empty",
        );
    }
    let limits = limits(file.limits.as_ref(), report);
    let default_rate_limit = rate_limit(file.rate_limit.as_ref(), None, "rate_limit", report);
    let shutdown = shutdown(file.shutdown.as_ref(), report);
    let log = log(file.log.as_ref(), report);
    let metrics = Metrics {
        per_campaign: file.metrics.and_then(|m| m.per_campaign).unwrap_or(false),
    };
    let reload = reload(file.reload.as_ref(), report);
    let (campaigns, places) = finish_campaigns(campaigns, default_rate_limit, report);
    // The checks across campaigns build the table's key index as they go.
    let mut check =
        |campaigns: &[Campaign]| Some(check_across_campaigns(campaigns, &places, report));
    let table = match environment {
        Some(environment) => Table::build(environment, routes, campaigns, check),
        None => {
            check(&campaigns);
            None
        }
    };

    if !report.errors.is_empty() {
        return None;
    }
    let table = table?.with_trusted_proxies(trusted_proxies);
    let settings = Settings {
        listen: listen?,
        upstream: upstream?,
        limits: limits?,
        shutdown: shutdown?,
        log: log?,
        metrics,
        reload: reload?,
    };
    Some((table, settings))
}

fn environment(value: &Spanned<String>, report: &mut Report<'_>) -> Option<Environment> {
    match value.get_ref().as_str() {
        "live" => Some(Environment::Live),
        "test" => Some(Environment::Test),
        other => {
            report.error(
                value.span(),
                None,
                "environment",
                Some(other),
                "must be \"live\" or \"test\"",
            );
            None
        }
    }
}

fn listen(
    section: &Spanned<super::file::ListenSection>,
    report: &mut Report<'_>,
) -> Option<Listen> {
    let section = section.get_ref();
    let errors_before = report.errors.len();
    if section.proxy.get_ref().is_empty() {
        report.error(
            section.proxy.span(),
            None,
            "listen.proxy",
            None,
            "at least one listen address is required, such as \"127.0.0.1:8080\"",
        );
    }
    let mut proxy = Vec::new();
    for (index, entry) in section.proxy.get_ref().iter().enumerate() {
        let field = format!("listen.proxy[{index}]");
        if let Some(address) = socket_address(entry, &field, report) {
            proxy.push(address);
        }
    }
    let mut proxy_protocol = Vec::new();
    for (index, entry) in section.proxy_protocol.iter().enumerate() {
        let field = format!("listen.proxy_protocol[{index}]");
        if let Some(address) = socket_address(entry, &field, report) {
            if proxy.iter().any(|other| overlaps(other, &address)) {
                report.error(
                    entry.span(),
                    None,
                    field,
                    Some(entry.get_ref()),
                    "this port is also in listen.proxy on the same or every address; a listener either expects the PROXY protocol or not",
                );
            }
            proxy_protocol.push(address);
        }
    }
    let admin = section
        .admin
        .as_ref()
        .and_then(|entry| socket_address(entry, "listen.admin", report).map(|a| (a, entry)));
    if let Some((address, entry)) = admin {
        if proxy
            .iter()
            .chain(&proxy_protocol)
            .any(|other| overlaps(other, &address))
        {
            report.error(
                entry.span(),
                None,
                "listen.admin",
                Some(entry.get_ref()),
                "the admin listener needs a port of its own; a proxy listener uses this port on the same or every address",
            );
        }
    }
    (report.errors.len() == errors_before).then(|| Listen {
        proxy,
        proxy_protocol,
        admin: admin.map(|(address, _)| address),
    })
}

/// Returns whether two listeners would take the same connections: the same port, on the
/// same address or where either listens on every address.
fn overlaps(first: &SocketAddr, second: &SocketAddr) -> bool {
    first.port() == second.port()
        && (first.ip() == second.ip()
            || first.ip().is_unspecified()
            || second.ip().is_unspecified())
}

fn socket_address(
    entry: &Spanned<String>,
    field: &str,
    report: &mut Report<'_>,
) -> Option<SocketAddr> {
    match entry.get_ref().parse::<SocketAddr>() {
        Ok(address) => Some(address),
        Err(_) => {
            report.error(
                entry.span(),
                None,
                field,
                Some(entry.get_ref()),
                "invalid socket address; write IP:port, such as \"127.0.0.1:8080\" or \"[::]:8080\"",
            );
            None
        }
    }
}

fn upstream(section: &Spanned<UpstreamSection>, report: &mut Report<'_>) -> Option<Upstream> {
    let section = section.get_ref();
    let errors_before = report.errors.len();
    let address = &section.address;
    let host_port = split_host_port(address.get_ref());
    if let Err(message) = &host_port {
        report.error(
            address.span(),
            None,
            "upstream.address",
            Some(address.get_ref()),
            message.clone(),
        );
    }
    let connect_timeout = timeout(
        section.connect_timeout_ms.as_ref(),
        DEFAULT_CONNECT_TIMEOUT_MS,
        "upstream.connect_timeout_ms",
        report,
    );
    let read_timeout = timeout(
        section.read_timeout_ms.as_ref(),
        DEFAULT_READ_TIMEOUT_MS,
        "upstream.read_timeout_ms",
        report,
    );
    check_names(section, report);
    let dns_refresh = seconds(
        section.dns_refresh_seconds.as_ref(),
        DEFAULT_DNS_REFRESH_SECONDS,
        1,
        "upstream.dns_refresh_seconds",
        report,
    );
    if report.errors.len() != errors_before {
        return None;
    }
    let (host, port) = host_port.ok()?;
    let sni = match &section.sni {
        Some(sni) => sni.get_ref().clone(),
        None => host.clone(),
    };
    Some(Upstream {
        host,
        port,
        tls: section.tls,
        sni,
        connect_timeout: connect_timeout?,
        read_timeout: read_timeout?,
        ca_file: section.ca_file.as_ref().map(|p| p.get_ref().into()),
        insecure_skip_verify: section
            .insecure_skip_verify
            .as_ref()
            .is_some_and(|flag| *flag.get_ref()),
        authorization_env: section
            .authorization_env
            .as_ref()
            .map(|n| n.get_ref().clone()),
        dns_refresh: dns_refresh?,
    })
}

/// Checks the upstream fields that name things: the TLS name, the credential variable
/// and the CA file.
fn check_names(section: &UpstreamSection, report: &mut Report<'_>) {
    if let Some(sni) = &section.sni {
        if sni.get_ref().is_empty() || sni.get_ref().contains(char::is_whitespace) {
            report.error(
                sni.span(),
                None,
                "upstream.sni",
                Some(sni.get_ref()),
                "must be a host name without whitespace",
            );
        }
    }
    if let Some(name) = &section.authorization_env {
        let valid = !name.get_ref().is_empty()
            && name
                .get_ref()
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_');
        if !valid {
            report.error(
                name.span(),
                None,
                "upstream.authorization_env",
                Some(name.get_ref()),
                "must be the name of an environment variable: letters, digits and _",
            );
        }
    }
    if let (false, Some(path)) = (section.tls, &section.ca_file) {
        report.error(
            path.span(),
            None,
            "upstream.ca_file",
            Some(path.get_ref()),
            "applies only to HTTPS; set tls = true or remove it",
        );
    }
    let skip_flag = section
        .insecure_skip_verify
        .as_ref()
        .filter(|flag| *flag.get_ref());
    if let (false, Some(flag)) = (section.tls, skip_flag) {
        report.error(
            flag.span(),
            None,
            "upstream.insecure_skip_verify",
            Some("true"),
            "applies only to HTTPS; set tls = true or remove it",
        );
    }
    if let Some(path) = &section.ca_file {
        if path.get_ref().is_empty() {
            report.error(
                path.span(),
                None,
                "upstream.ca_file",
                Some(path.get_ref()),
                "must be the path of a PEM file",
            );
        }
    }
}

const DEFAULT_DNS_REFRESH_SECONDS: i64 = 30;
const DEFAULT_MAX_HEADER_BYTES: i64 = 32 * 1024;
const DEFAULT_HEADER_TIMEOUT_SECONDS: i64 = 10;
/// 50 MiB: the service accepts CSV uploads of up to 40 MB on its batch endpoint.
const DEFAULT_MAX_BODY_BYTES: i64 = 50 * 1024 * 1024;
const DEFAULT_KEEPALIVE_TIMEOUT_SECONDS: i64 = 60;
const DEFAULT_DRAIN_MAX_BYTES: i64 = 64 * 1024;
/// Pingora reads at most 1 MiB of request header.
const MAX_HEADER_BYTES_LIMIT: i64 = 1024 * 1024 - 1;

fn limits(section: Option<&LimitsSection>, report: &mut Report<'_>) -> Option<Limits> {
    let max_header_bytes = bounded(
        section.and_then(|s| s.max_header_bytes.as_ref()),
        DEFAULT_MAX_HEADER_BYTES,
        1024..=MAX_HEADER_BYTES_LIMIT,
        "limits.max_header_bytes",
        report,
    );
    let header_timeout = seconds(
        section.and_then(|s| s.header_timeout_seconds.as_ref()),
        DEFAULT_HEADER_TIMEOUT_SECONDS,
        1,
        "limits.header_timeout_seconds",
        report,
    );
    let max_body_bytes = bounded(
        section.and_then(|s| s.max_body_bytes.as_ref()),
        DEFAULT_MAX_BODY_BYTES,
        0..=i64::MAX,
        "limits.max_body_bytes",
        report,
    );
    let keepalive = seconds(
        section.and_then(|s| s.keepalive_timeout_seconds.as_ref()),
        DEFAULT_KEEPALIVE_TIMEOUT_SECONDS,
        1,
        "limits.keepalive_timeout_seconds",
        report,
    );
    let drain_max_bytes = bounded(
        section.and_then(|s| s.drain_max_bytes.as_ref()),
        DEFAULT_DRAIN_MAX_BYTES,
        0..=i64::MAX,
        "limits.drain_max_bytes",
        report,
    );
    Some(Limits {
        max_header_bytes: max_header_bytes? as usize,
        header_timeout: header_timeout?,
        max_body_bytes: max_body_bytes? as u64,
        keepalive_timeout: keepalive?,
        drain_max_bytes: drain_max_bytes? as u64,
    })
}

/// Reads an integer within `range`, or the default when it is absent.
fn bounded(
    value: Option<&Spanned<i64>>,
    default: i64,
    range: std::ops::RangeInclusive<i64>,
    field: &str,
    report: &mut Report<'_>,
) -> Option<i64> {
    bounded_in(value, default, range, "", field, report)
}

/// Reads an integer within `range`, or the default when it is absent; `unit` follows
/// the bounds in the error message, such as " seconds".
fn bounded_in(
    value: Option<&Spanned<i64>>,
    default: i64,
    range: std::ops::RangeInclusive<i64>,
    unit: &str,
    field: &str,
    report: &mut Report<'_>,
) -> Option<i64> {
    let Some(value) = value else {
        return Some(default);
    };
    let number = *value.get_ref();
    if !range.contains(&number) {
        report.error(
            value.span(),
            None,
            field,
            Some(&number.to_string()),
            format!(
                "must be between {} and {}{unit}",
                range.start(),
                range.end()
            ),
        );
        return None;
    }
    Some(number)
}

/// The maximum requests per window of a rate limit, and the maximum window.
const MAX_RATE_REQUESTS: i64 = 1_000_000;
const MAX_RATE_SECONDS: i64 = 86_400;

fn rate_limit(
    section: Option<&Spanned<RateLimitSection>>,
    campaign: Option<&str>,
    field: &str,
    report: &mut Report<'_>,
) -> Option<RateLimit> {
    let section = section?.get_ref();
    let requests = *section.requests.get_ref();
    let per_seconds = *section.per_seconds.get_ref();
    let mut valid = true;
    if !(1..=MAX_RATE_REQUESTS).contains(&requests) {
        report.error(
            section.requests.span(),
            campaign,
            format!("{field}.requests"),
            Some(&requests.to_string()),
            format!("must be between 1 and {MAX_RATE_REQUESTS}"),
        );
        valid = false;
    }
    if !(1..=MAX_RATE_SECONDS).contains(&per_seconds) {
        report.error(
            section.per_seconds.span(),
            campaign,
            format!("{field}.per_seconds"),
            Some(&per_seconds.to_string()),
            format!("must be between 1 and {MAX_RATE_SECONDS} seconds"),
        );
        valid = false;
    }
    valid.then(|| RateLimit::new(requests as u32, Duration::from_secs(per_seconds as u64)))
}

/// Splits `host:port`, where an IPv6 host is written in brackets.
fn split_host_port(text: &str) -> Result<(String, u16), String> {
    const HINT: &str =
        "write host:port, such as \"127.0.0.1:9000\", \"[::1]:9000\" or \"sms-api.internal:443\"";
    let (host, port) = text
        .rsplit_once(':')
        .ok_or_else(|| format!("missing port; {HINT}"))?;
    let host = match host.strip_prefix('[') {
        Some(bracketed) => bracketed
            .strip_suffix(']')
            .filter(|inner| inner.parse::<std::net::Ipv6Addr>().is_ok())
            .ok_or_else(|| format!("invalid IPv6 host; {HINT}"))?,
        None if host.contains(':') => return Err(format!("IPv6 hosts need brackets; {HINT}")),
        None => host,
    };
    let valid_host = !host.is_empty()
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_' | b':'));
    if !valid_host {
        return Err(format!("invalid host; {HINT}"));
    }
    let port = port
        .parse::<u16>()
        .ok()
        .filter(|&port| port != 0)
        .ok_or_else(|| format!("invalid port; {HINT}"))?;
    Ok((host.to_owned(), port))
}

fn timeout(
    value: Option<&Spanned<i64>>,
    default_ms: i64,
    field: &str,
    report: &mut Report<'_>,
) -> Option<Duration> {
    let ms = bounded_in(
        value,
        default_ms,
        1..=MAX_TIMEOUT_MS,
        " milliseconds",
        field,
        report,
    )?;
    Some(Duration::from_millis(ms as u64))
}

fn trusted_proxies(section: Option<&ClientIpSection>, report: &mut Report<'_>) -> IpSet {
    let entries = section.map_or(&[][..], |s| &s.trusted_proxies[..]);
    let mut networks = Vec::with_capacity(entries.len());
    for (index, entry) in entries.iter().enumerate() {
        let field = || format!("client_ip.trusted_proxies[{index}]");
        match parse_network(entry.get_ref()) {
            Ok(network) if is_any(&network) => report.error(
                entry.span(),
                None,
                field(),
                Some(entry.get_ref()),
                "trusting every address would let any client choose its own address; list the proxies' networks",
            ),
            Ok(network) => networks.push(network),
            Err(message) => report.error(entry.span(), None, field(), Some(entry.get_ref()), message),
        }
    }
    IpSet::from_networks(&networks)
}

const DEFAULT_DRAIN_DELAY_SECONDS: i64 = 5;
const DEFAULT_GRACE_PERIOD_SECONDS: i64 = 30;
const DEFAULT_RELOAD_INTERVAL_SECONDS: i64 = 30;
const MAX_SECONDS: i64 = 86_400;

fn shutdown(section: Option<&ShutdownSection>, report: &mut Report<'_>) -> Option<Shutdown> {
    let drain_delay = seconds(
        section.and_then(|s| s.drain_delay_seconds.as_ref()),
        DEFAULT_DRAIN_DELAY_SECONDS,
        0,
        "shutdown.drain_delay_seconds",
        report,
    );
    let grace_period = seconds(
        section.and_then(|s| s.grace_period_seconds.as_ref()),
        DEFAULT_GRACE_PERIOD_SECONDS,
        1,
        "shutdown.grace_period_seconds",
        report,
    );
    Some(Shutdown {
        drain_delay: drain_delay?,
        grace_period: grace_period?,
    })
}

fn reload(section: Option<&ReloadSection>, report: &mut Report<'_>) -> Option<Reload> {
    let interval = seconds(
        section.and_then(|s| s.interval_seconds.as_ref()),
        DEFAULT_RELOAD_INTERVAL_SECONDS,
        1,
        "reload.interval_seconds",
        report,
    );
    Some(Reload {
        interval: interval?,
    })
}

/// Reads a whole number of seconds between `min` and one day.
fn seconds(
    value: Option<&Spanned<i64>>,
    default: i64,
    min: i64,
    field: &str,
    report: &mut Report<'_>,
) -> Option<Duration> {
    let seconds = bounded_in(value, default, min..=MAX_SECONDS, " seconds", field, report)?;
    Some(Duration::from_secs(seconds as u64))
}

fn log(section: Option<&LogSection>, report: &mut Report<'_>) -> Option<Log> {
    let access = section.and_then(|s| s.access).unwrap_or(true);
    let format = match section.and_then(|s| s.format.as_ref()) {
        None => LogFormat::Json,
        Some(value) => match value.get_ref().as_str() {
            "json" => LogFormat::Json,
            "text" => LogFormat::Text,
            other => {
                report.error(
                    value.span(),
                    None,
                    "log.format",
                    Some(other),
                    "must be \"json\" or \"text\"",
                );
                return None;
            }
        },
    };
    Some(Log { format, access })
}

fn routes(section: &Spanned<super::file::RoutesSection>, report: &mut Report<'_>) -> Vec<Route> {
    let paths = &section.get_ref().campaign_paths;
    if paths.get_ref().is_empty() {
        report.error(
            paths.span(),
            None,
            "routes.campaign_paths",
            None,
            "at least one route is required, such as \"/api/v2/campaigns/{campaign}\"",
        );
    }
    let mut routes = Vec::new();
    for (index, pattern) in paths.get_ref().iter().enumerate() {
        match Route::parse(pattern.get_ref()) {
            Ok(route) => routes.push(route),
            Err(message) => report.error(
                pattern.span(),
                None,
                format!("routes.campaign_paths[{index}]"),
                Some(pattern.get_ref()),
                format!("invalid route: {message}, as in \"/api/v2/campaigns/{{campaign}}\""),
            ),
        }
    }
    routes
}

/// A campaign checked on its own: everything except the checks that compare it with
/// the other campaigns (duplicate ids and key hashes) and the file's default rate limit.
/// A large file's campaigns are checked on several threads.
#[derive(Debug)]
pub(super) struct CheckedCampaign {
    /// The campaign with its own rate limit, if it has one. Keys whose hash is invalid
    /// are left out.
    campaign: Campaign,
    id_span: Range<usize>,
    /// For each key of `campaign`: its index in the campaign's `keys` and the span of its
    /// `sha256` value.
    key_places: Vec<(usize, Range<usize>)>,
    errors: Vec<ConfigError>,
}

/// The minimum number of campaigns for each checking thread.
const MIN_CAMPAIGNS_PER_THREAD: usize = 2_000;

/// Checks every campaign of a file that was parsed as one document.
pub(super) fn check_campaigns(
    sections: &[Spanned<CampaignSection>],
    source: &Source,
    shared: Option<&SharedCampaigns<'_>>,
) -> Vec<CheckedCampaign> {
    let chunks = map_chunks(sections, MIN_CAMPAIGNS_PER_THREAD, |first, chunk| {
        chunk
            .iter()
            .enumerate()
            .map(|(offset, section)| {
                check_campaign(section.get_ref(), first + offset, source, shared)
            })
            .collect::<Vec<_>>()
    });
    chunks.into_iter().flatten().collect()
}

/// Checks the campaign at `index` in the file on its own. A valid campaign takes the
/// parts that did not change from the table in force, when there is one.
pub(super) fn check_campaign(
    section: &CampaignSection,
    index: usize,
    source: &Source,
    shared: Option<&SharedCampaigns<'_>>,
) -> CheckedCampaign {
    let mut report = Report::new(source);
    let id = section.id.get_ref().as_str();
    let field = format!("campaigns[{index}]");
    if let Some(message) = invalid_id(id) {
        report.error(
            section.id.span(),
            Some(id),
            format!("{field}.id"),
            Some(id),
            message,
        );
    }
    let networks = allowlist(section, &field, &mut report);
    let (keys, key_places) = keys(section, &field, &mut report);
    let rate_limit = rate_limit(
        section.rate_limit.as_ref(),
        Some(id),
        &format!("{field}.rate_limit"),
        &mut report,
    );
    let mut campaign = Campaign {
        id: id.into(),
        networks,
        keys: keys.into(),
        rate_limit,
    };
    if let (Some(shared), true) = (shared, report.errors.is_empty()) {
        shared.share(&mut campaign);
    }
    CheckedCampaign {
        campaign,
        id_span: section.id.span(),
        key_places,
        errors: report.errors,
    }
}

/// The positions in the file of a campaign's id and keys (its `key_places`, see
/// `CheckedCampaign`), for errors found across campaigns.
type Places = (Range<usize>, Vec<(usize, Range<usize>)>);

/// Reports the errors found in each campaign, applies the default rate limit, and splits
/// the campaigns from their places in the file.
fn finish_campaigns(
    checked: Vec<CheckedCampaign>,
    default_rate_limit: Option<RateLimit>,
    report: &mut Report<'_>,
) -> (Vec<Campaign>, Vec<Places>) {
    checked
        .into_iter()
        .map(|mut checked_campaign| {
            report.errors.append(&mut checked_campaign.errors);
            let mut campaign = checked_campaign.campaign;
            campaign.rate_limit = campaign.rate_limit.or(default_rate_limit);
            (
                campaign,
                (checked_campaign.id_span, checked_campaign.key_places),
            )
        })
        .unzip()
}

/// Reports duplicate campaign ids and key hashes used twice, and returns the index of the
/// keys. Offsets become line numbers only for an error, because looking up the line of
/// each of hundreds of thousands of keys takes a noticeable part of a large reload.
fn check_across_campaigns(
    campaigns: &[Campaign],
    places: &[Places],
    report: &mut Report<'_>,
) -> KeyIndex {
    let mut first_with_id: HashMap<&str, usize> = HashMap::with_capacity(campaigns.len());
    let mut keys = KeyIndex::with_capacity(campaigns);
    for (index, (campaign, (id_span, key_places))) in campaigns.iter().zip(places).enumerate() {
        let id = &*campaign.id;
        if let Some(&first) = first_with_id.get(id) {
            let first = report.line(places[first].0.start);
            report.error(
                id_span.clone(),
                Some(id),
                format!("campaigns[{index}].id"),
                Some(id),
                format!("duplicate campaign id; it is first defined on line {first}"),
            );
        } else {
            first_with_id.insert(id, index);
        }
        // A campaign with more keys than a key position can count has an error already.
        let indexed = key_places.iter().enumerate().take(usize::from(u8::MAX) + 1);
        for (position, (key_index, span)) in indexed {
            let Err(owner) = keys.insert(campaigns, index, position) else {
                continue;
            };
            let (owner, owner_position) = (owner.campaign as usize, usize::from(owner.key));
            let owner_line = report.line(places[owner].1[owner_position].1.start);
            report.error(
                span.clone(),
                Some(id),
                format!("campaigns[{index}].keys[{key_index}].sha256"),
                Some(&campaign.keys[position].hash.to_hex()),
                format!(
                    "the same key hash is already used by key \"{}\" of campaign \"{}\" on line {owner_line}; every key must be unique",
                    campaigns[owner].keys[owner_position].id, campaigns[owner].id,
                ),
            );
        }
    }
    keys
}

fn allowlist(section: &CampaignSection, field: &str, report: &mut Report<'_>) -> IpSet {
    let id = section.id.get_ref().as_str();
    let mut networks = Vec::with_capacity(section.allowed_ips.len());
    for (index, entry) in section.allowed_ips.iter().enumerate() {
        // Built only for an error, because a large table has millions of entries.
        let entry_field = || format!("{field}.allowed_ips[{index}]");
        match parse_network(entry.get_ref()) {
            Ok(network) if is_any(&network) && !section.allow_any_ip => report.error(
                entry.span(),
                Some(id),
                entry_field(),
                Some(entry.get_ref()),
                "this allows every address; set allow_any_ip = true on the campaign if that is intended",
            ),
            Ok(network) => networks.push(network),
            Err(message) => report.error(
                entry.span(),
                Some(id),
                entry_field(),
                Some(entry.get_ref()),
                message,
            ),
        }
    }
    if !section.keys.is_empty() && section.allowed_ips.is_empty() {
        report.error(
            section.id.span(),
            Some(id),
            format!("{field}.allowed_ips"),
            None,
            "the campaign has keys but no allowed IPs; a key works only once its campaign allows at least one address",
        );
    }
    IpSet::from_networks(&networks)
}

/// Checks the keys of one campaign, and returns those with a valid hash and their places
/// in the file (see `CheckedCampaign::key_places`).
fn keys(
    section: &CampaignSection,
    field: &str,
    report: &mut Report<'_>,
) -> (Vec<KeyInfo>, Vec<(usize, Range<usize>)>) {
    let campaign_id = section.id.get_ref().as_str();
    if section.keys.len() > MAX_KEYS_PER_CAMPAIGN {
        let extra = &section.keys[MAX_KEYS_PER_CAMPAIGN];
        report.error(
            extra.span(),
            Some(campaign_id),
            format!("{field}.keys"),
            None,
            format!(
                "the campaign has {} keys, but at most {MAX_KEYS_PER_CAMPAIGN} are allowed; remove a retired key",
                section.keys.len()
            ),
        );
    }
    let mut keys = Vec::with_capacity(section.keys.len());
    let mut places = Vec::with_capacity(section.keys.len());
    for (index, key) in section.keys.iter().enumerate() {
        let key = key.get_ref();
        let key_field = || format!("{field}.keys[{index}]");
        let id = key.id.get_ref().as_str();
        if let Some(message) = invalid_id(id) {
            report.error(
                key.id.span(),
                Some(campaign_id),
                format!("{}.id", key_field()),
                Some(id),
                message,
            );
        }
        let first_use = section.keys[..index]
            .iter()
            .find(|earlier| earlier.get_ref().id.get_ref() == id);
        if let Some(first_use) = first_use {
            let first = report.line(first_use.get_ref().id.span().start);
            report.error(
                key.id.span(),
                Some(campaign_id),
                format!("{}.id", key_field()),
                Some(id),
                format!("duplicate key id in this campaign; it is first used on line {first}"),
            );
        }
        let hash_text = key.sha256.get_ref();
        let hash = KeyHash::from_hex(hash_text);
        if hash.is_none() {
            report.error(
                key.sha256.span(),
                Some(campaign_id),
                format!("{}.sha256", key_field()),
                Some(hash_text),
                "must be 64 lowercase hexadecimal digits, as printed by `keygate key hash`",
            );
        }
        let expires_at = key.expires_at.as_ref().and_then(|value| {
            let parsed = chrono::DateTime::parse_from_rfc3339(value.get_ref());
            if parsed.is_err() {
                report.error(
                    value.span(),
                    Some(campaign_id),
                    format!("{}.expires_at", key_field()),
                    Some(value.get_ref()),
                    "invalid timestamp; write RFC 3339, such as \"2027-06-30T00:00:00Z\"",
                );
            }
            parsed.ok().map(|time| time.timestamp())
        });
        // A key with another error is kept for the check of hashes across campaigns; the
        // table is built only from a file without errors.
        if let Some(hash) = hash {
            keys.push(KeyInfo {
                id: id.into(),
                hash,
                expires_at,
            });
            places.push((index, key.sha256.span()));
        }
    }
    (keys, places)
}

/// Returns why an id is invalid: ids are 1 to 128 of `A-Z a-z 0-9 _ -`.
fn invalid_id(id: &str) -> Option<String> {
    let valid_chars = id
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if id.is_empty() || id.len() > MAX_ID_LEN || !valid_chars {
        return Some(format!(
            "invalid id; use 1 to {MAX_ID_LEN} of the characters A-Z a-z 0-9 _ -"
        ));
    }
    None
}

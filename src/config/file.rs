//! The configuration file as written: serde types that mirror the TOML, with spans for
//! error messages. No logic lives here; `validate` turns these into a `Table`.

use serde::Deserialize;
use toml::Spanned;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub environment: Spanned<String>,
    pub listen: Spanned<ListenSection>,
    pub upstream: Spanned<UpstreamSection>,
    pub routes: Spanned<RoutesSection>,
    pub client_ip: Option<ClientIpSection>,
    pub rate_limit: Option<Spanned<RateLimitSection>>,
    pub limits: Option<LimitsSection>,
    pub shutdown: Option<ShutdownSection>,
    pub log: Option<LogSection>,
    pub metrics: Option<MetricsSection>,
    pub reload: Option<ReloadSection>,
    #[serde(default)]
    pub campaigns: Vec<Spanned<CampaignSection>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenSection {
    pub proxy: Spanned<Vec<Spanned<String>>>,
    #[serde(default)]
    pub proxy_protocol: Vec<Spanned<String>>,
    pub admin: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamSection {
    pub address: Spanned<String>,
    #[serde(default)]
    pub tls: bool,
    pub sni: Option<Spanned<String>>,
    pub connect_timeout_ms: Option<Spanned<i64>>,
    pub read_timeout_ms: Option<Spanned<i64>>,
    pub ca_file: Option<Spanned<String>>,
    pub insecure_skip_verify: Option<Spanned<bool>>,
    pub authorization_env: Option<Spanned<String>>,
    pub dns_refresh_seconds: Option<Spanned<i64>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoutesSection {
    pub campaign_paths: Spanned<Vec<Spanned<String>>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientIpSection {
    #[serde(default)]
    pub trusted_proxies: Vec<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitSection {
    pub requests: Spanned<i64>,
    pub per_seconds: Spanned<i64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsSection {
    pub max_header_bytes: Option<Spanned<i64>>,
    pub header_timeout_seconds: Option<Spanned<i64>>,
    pub max_body_bytes: Option<Spanned<i64>>,
    pub keepalive_timeout_seconds: Option<Spanned<i64>>,
    pub drain_max_bytes: Option<Spanned<i64>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShutdownSection {
    pub drain_delay_seconds: Option<Spanned<i64>>,
    pub grace_period_seconds: Option<Spanned<i64>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogSection {
    pub format: Option<Spanned<String>>,
    pub access: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsSection {
    pub per_campaign: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReloadSection {
    pub interval_seconds: Option<Spanned<i64>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CampaignSection {
    pub id: Spanned<String>,
    #[serde(default)]
    pub allowed_ips: Vec<Spanned<String>>,
    #[serde(default)]
    pub allow_any_ip: bool,
    pub rate_limit: Option<Spanned<RateLimitSection>>,
    #[serde(default)]
    pub keys: Vec<Spanned<KeySection>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeySection {
    pub id: Spanned<String>,
    pub sha256: Spanned<String>,
    pub expires_at: Option<Spanned<String>>,
}

/// The keys each table of the file may hold, for reporting every unknown key at once.
/// It must list exactly the fields of the structs above; a unit test checks that.
pub(super) mod schema {
    pub enum Child {
        Value,
        Table(&'static [(&'static str, Child)]),
        ArrayOfTables(&'static [(&'static str, Child)]),
    }

    pub const ROOT: &[(&str, Child)] = &[
        ("environment", Child::Value),
        ("listen", Child::Table(LISTEN)),
        ("upstream", Child::Table(UPSTREAM)),
        ("routes", Child::Table(ROUTES)),
        ("client_ip", Child::Table(CLIENT_IP)),
        ("rate_limit", Child::Table(RATE_LIMIT)),
        ("limits", Child::Table(LIMITS)),
        ("shutdown", Child::Table(SHUTDOWN)),
        ("log", Child::Table(LOG)),
        ("metrics", Child::Table(METRICS)),
        ("reload", Child::Table(RELOAD)),
        ("campaigns", Child::ArrayOfTables(CAMPAIGN)),
    ];
    const CLIENT_IP: &[(&str, Child)] = &[("trusted_proxies", Child::Value)];
    const RATE_LIMIT: &[(&str, Child)] =
        &[("requests", Child::Value), ("per_seconds", Child::Value)];
    const LIMITS: &[(&str, Child)] = &[
        ("max_header_bytes", Child::Value),
        ("header_timeout_seconds", Child::Value),
        ("max_body_bytes", Child::Value),
        ("keepalive_timeout_seconds", Child::Value),
        ("drain_max_bytes", Child::Value),
    ];
    const SHUTDOWN: &[(&str, Child)] = &[
        ("drain_delay_seconds", Child::Value),
        ("grace_period_seconds", Child::Value),
    ];
    const LOG: &[(&str, Child)] = &[("format", Child::Value), ("access", Child::Value)];
    const METRICS: &[(&str, Child)] = &[("per_campaign", Child::Value)];
    const RELOAD: &[(&str, Child)] = &[("interval_seconds", Child::Value)];
    const LISTEN: &[(&str, Child)] = &[
        ("proxy", Child::Value),
        ("proxy_protocol", Child::Value),
        ("admin", Child::Value),
    ];
    const UPSTREAM: &[(&str, Child)] = &[
        ("address", Child::Value),
        ("tls", Child::Value),
        ("sni", Child::Value),
        ("connect_timeout_ms", Child::Value),
        ("read_timeout_ms", Child::Value),
        ("ca_file", Child::Value),
        ("insecure_skip_verify", Child::Value),
        ("authorization_env", Child::Value),
        ("dns_refresh_seconds", Child::Value),
    ];
    const ROUTES: &[(&str, Child)] = &[("campaign_paths", Child::Value)];
    const CAMPAIGN: &[(&str, Child)] = &[
        ("id", Child::Value),
        ("allowed_ips", Child::Value),
        ("allow_any_ip", Child::Value),
        ("rate_limit", Child::Table(RATE_LIMIT)),
        ("keys", Child::ArrayOfTables(KEY)),
    ];
    const KEY: &[(&str, Child)] = &[
        ("id", Child::Value),
        ("sha256", Child::Value),
        ("expires_at", Child::Value),
    ];
}

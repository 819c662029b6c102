//! Every Prometheus metric of keygate, registered in one registry in one place.
//!
//! Label values come from fixed sets: outcomes, error codes and status classes. A
//! campaign label exists only when `[metrics] per_campaign = true`, and no label ever
//! contains a key or an IP address.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
    TextEncoder,
};

use crate::table::Table;

/// The end of a request, the `outcome` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestOutcome {
    Allowed,
    Rejected,
    UpstreamError,
}

impl RequestOutcome {
    const ALL: [RequestOutcome; 3] = [
        RequestOutcome::Allowed,
        RequestOutcome::Rejected,
        RequestOutcome::UpstreamError,
    ];

    fn as_str(self) -> &'static str {
        match self {
            RequestOutcome::Allowed => "allowed",
            RequestOutcome::Rejected => "rejected",
            RequestOutcome::UpstreamError => "upstream_error",
        }
    }
}

/// Every error code a request can end with, the `code` label; `none` for success.
pub const CODES: &[&str] = &[
    "none",
    "parameter_invalid",
    "not_found",
    "invalid_ip_address_used",
    "authentication_required",
    "invalid_api_key_provided",
    "campaign_not_allowed",
    "too_many_requests",
    "request_header_fields_too_large",
    "payload_too_large",
    "upstream_unavailable",
    "upstream_timeout",
    "request_timeout",
    "internal_error",
];

/// The metrics and the registry that contains them.
pub struct Metrics {
    registry: Registry,
    per_campaign: bool,
    requests: IntCounterVec,
    /// The series of `requests` by outcome and code, made on first use so that a request
    /// does not hash its label values and `/metrics` lists only the series seen. Not used
    /// with a campaign label.
    request_series: Vec<OnceLock<IntCounter>>,
    request_duration: Histogram,
    decision_duration: Histogram,
    upstream_responses: IntCounterVec,
    /// The series of `upstream_responses` by status class, made on first use.
    upstream_series: [OnceLock<IntCounter>; 5],
    config_reloads: IntCounterVec,
    config_generation: IntGauge,
    config_last_success: Gauge,
    campaigns: IntGauge,
    keys: IntGauge,
    keys_expiring: Gauge,
    keys_expired: IntGauge,
    /// The key expiries of the table in force, in Unix seconds, sorted.
    expiries: std::sync::Mutex<Arc<[i64]>>,
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn new(per_campaign: bool) -> Self {
        let registry = Registry::new();
        let mut request_labels = vec!["outcome", "code"];
        if per_campaign {
            request_labels.push("campaign");
        }
        let requests = IntCounterVec::new(
            Opts::new(
                "keygate_requests_total",
                "Requests that keygate finished, by outcome and error code.",
            ),
            &request_labels,
        )
        .expect("valid metric");
        let request_duration = Histogram::with_opts(
            HistogramOpts::new(
                "keygate_request_duration_seconds",
                "Time from the start of a request to its end, upstream time included.",
            )
            .buckets(vec![
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                10.0, 30.0,
            ]),
        )
        .expect("valid metric");
        let decision_duration = Histogram::with_opts(
            HistogramOpts::new(
                "keygate_decision_duration_seconds",
                "Time that the access decision alone took for a request.",
            )
            .buckets(vec![
                0.000_000_5,
                0.000_001,
                0.000_002_5,
                0.000_005,
                0.000_01,
                0.000_025,
                0.000_1,
                0.001,
            ]),
        )
        .expect("valid metric");
        let upstream_responses = IntCounterVec::new(
            Opts::new(
                "keygate_upstream_responses_total",
                "Responses received from the upstream, by status class.",
            ),
            &["class"],
        )
        .expect("valid metric");
        let config_reloads = IntCounterVec::new(
            Opts::new(
                "keygate_config_reloads_total",
                "Reloads of the config file that read a new version, by result: applied or rejected.",
            ),
            &["result"],
        )
        .expect("valid metric");
        let config_generation = IntGauge::new(
            "keygate_config_generation",
            "The generation of the table in force: 1 at start, plus 1 for each applied reload.",
        )
        .expect("valid metric");
        let config_last_success = Gauge::new(
            "keygate_config_last_reload_success_timestamp_seconds",
            "Unix time at which the table in force was loaded.",
        )
        .expect("valid metric");
        let campaigns = IntGauge::new("keygate_campaigns", "Campaigns in the table in force.")
            .expect("valid metric");
        let keys =
            IntGauge::new("keygate_keys", "Keys in the table in force.").expect("valid metric");
        let keys_expiring = Gauge::new(
            "keygate_keys_expiring_seconds",
            "Seconds until the soonest expiry of a key that has not expired yet, in the table in force; +Inf when no such key expires.",
        )
        .expect("valid metric");
        let keys_expired = IntGauge::new(
            "keygate_keys_expired",
            "Keys in the table in force that have expired and are rejected.",
        )
        .expect("valid metric");

        let collectors: [Box<dyn prometheus::core::Collector>; 11] = [
            Box::new(requests.clone()),
            Box::new(request_duration.clone()),
            Box::new(decision_duration.clone()),
            Box::new(upstream_responses.clone()),
            Box::new(config_reloads.clone()),
            Box::new(config_generation.clone()),
            Box::new(config_last_success.clone()),
            Box::new(campaigns.clone()),
            Box::new(keys.clone()),
            Box::new(keys_expiring.clone()),
            Box::new(keys_expired.clone()),
        ];
        for collector in collectors {
            registry
                .register(collector)
                .expect("metric names are unique");
        }
        for result in ["applied", "rejected"] {
            config_reloads.with_label_values(&[result]);
        }
        Self {
            registry,
            per_campaign,
            requests,
            request_series: (0..RequestOutcome::ALL.len() * CODES.len())
                .map(|_| OnceLock::new())
                .collect(),
            request_duration,
            decision_duration,
            upstream_responses,
            upstream_series: Default::default(),
            config_reloads,
            config_generation,
            config_last_success,
            campaigns,
            keys,
            keys_expiring,
            keys_expired,
            expiries: std::sync::Mutex::new(Arc::from([])),
        }
    }

    /// Counts a finished request and observes its duration.
    pub fn record_request(
        &self,
        outcome: RequestOutcome,
        code: &str,
        campaign: Option<&str>,
        duration: Duration,
    ) {
        let code = if code.is_empty() { "none" } else { code };
        debug_assert!(CODES.contains(&code), "unknown code {code}");
        let outcome_label = outcome.as_str();
        if self.per_campaign {
            self.requests
                .with_label_values(&[outcome_label, code, campaign.unwrap_or("")])
                .inc();
        } else if let Some(index) = CODES.iter().position(|known| *known == code) {
            self.request_series[outcome as usize * CODES.len() + index]
                .get_or_init(|| self.requests.with_label_values(&[outcome_label, code]))
                .inc();
        } else {
            self.requests
                .with_label_values(&[outcome_label, code])
                .inc();
        }
        self.request_duration.observe(duration.as_secs_f64());
    }

    /// Observes how long one decision took.
    pub fn observe_decision(&self, duration: Duration) {
        self.decision_duration.observe(duration.as_secs_f64());
    }

    /// Counts a response from the upstream by its status class.
    pub fn record_upstream_status(&self, status: u16) {
        let (index, class) = match status {
            100..=199 => (0, "1xx"),
            200..=299 => (1, "2xx"),
            300..=399 => (2, "3xx"),
            400..=499 => (3, "4xx"),
            _ => (4, "5xx"),
        };
        self.upstream_series[index]
            .get_or_init(|| self.upstream_responses.with_label_values(&[class]))
            .inc();
    }

    /// Counts a reload that read a new version of the file and was rejected.
    pub fn record_rejected_reload(&self) {
        self.config_reloads.with_label_values(&["rejected"]).inc();
    }

    /// Records the table now in force: at start, and after each applied reload.
    pub fn record_table(&self, table: &Table, generation: u64, applied_reload: bool) {
        if applied_reload {
            self.config_reloads.with_label_values(&["applied"]).inc();
        }
        self.config_generation
            .set(i64::try_from(generation).unwrap_or(i64::MAX));
        self.config_last_success.set(crate::unix_now() as f64);
        self.campaigns.set(table.campaigns().len() as i64);
        self.keys.set(table.key_count() as i64);
        let mut expiries: Vec<i64> = table
            .campaigns()
            .iter()
            .flat_map(|campaign| campaign.keys.iter())
            .filter_map(|key| key.expires_at)
            .collect();
        expiries.sort_unstable();
        *self.expiries.lock().unwrap_or_else(|e| e.into_inner()) = expiries.into();
    }

    /// Renders every metric in the Prometheus text format.
    pub fn render(&self) -> Vec<u8> {
        let expiries = Arc::clone(&self.expiries.lock().unwrap_or_else(|e| e.into_inner()));
        // A key is rejected from the second of its expiry on.
        let now = crate::unix_now();
        let expired = expiries.partition_point(|&at| at <= now);
        let seconds_left = expiries
            .get(expired)
            .map_or(f64::INFINITY, |&at| (at - now) as f64);
        self.keys_expiring.set(seconds_left);
        self.keys_expired.set(expired as i64);
        let mut text = Vec::new();
        if let Err(error) = TextEncoder::new().encode(&self.registry.gather(), &mut text) {
            tracing::error!(error = %error, "failed to encode metrics");
        }
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render(metrics: &Metrics) -> String {
        String::from_utf8(metrics.render()).unwrap()
    }

    #[test]
    fn request_counts_by_outcome_and_code() {
        let metrics = Metrics::new(false);
        metrics.record_request(
            RequestOutcome::Allowed,
            "",
            Some("campaign_a"),
            Duration::from_millis(3),
        );
        metrics.record_request(
            RequestOutcome::Rejected,
            "not_found",
            None,
            Duration::from_millis(1),
        );
        metrics.record_request(
            RequestOutcome::Rejected,
            "not_found",
            None,
            Duration::from_millis(1),
        );
        let text = render(&metrics);
        assert!(
            text.contains("keygate_requests_total{code=\"none\",outcome=\"allowed\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("keygate_requests_total{code=\"not_found\",outcome=\"rejected\"} 2"),
            "{text}"
        );
        assert!(!text.contains("campaign_a"), "{text}");
        assert!(
            text.contains("keygate_request_duration_seconds_count 3"),
            "{text}"
        );
    }

    #[test]
    fn per_campaign_adds_the_label() {
        let metrics = Metrics::new(true);
        metrics.record_request(
            RequestOutcome::Allowed,
            "",
            Some("campaign_a"),
            Duration::ZERO,
        );
        let text = render(&metrics);
        assert!(
            text.contains("keygate_requests_total{campaign=\"campaign_a\",code=\"none\",outcome=\"allowed\"} 1"),
            "{text}"
        );
    }

    #[test]
    fn no_expiring_key_renders_infinity() {
        // The prometheus crate writes +Inf as "inf", which Prometheus parses as +Inf.
        let metrics = Metrics::new(false);
        assert!(render(&metrics).contains("\nkeygate_keys_expiring_seconds inf\n"));
        assert!(render(&metrics).contains("\nkeygate_keys_expired 0\n"));
    }

    #[test]
    fn expired_keys_do_not_hide_the_next_expiry() {
        use crate::table::{Campaign, Environment, IpSet, KeyHash, KeyInfo, Table};
        let now = crate::unix_now();
        let key = |id: &str, expires_at: i64| KeyInfo {
            id: id.into(),
            hash: KeyHash::of(id.as_bytes()),
            expires_at: Some(expires_at),
        };
        let campaign = Campaign {
            id: "campaign_a".into(),
            networks: IpSet::default(),
            keys: vec![
                key("old", now - 60),
                key("next", now + 86_400),
                key("later", now + 864_000),
            ]
            .into(),
            rate_limit: None,
        };
        let table = Table::new(Environment::Test, Vec::new(), vec![campaign]);
        let metrics = Metrics::new(false);
        metrics.record_table(&table, 1, true);
        let text = render(&metrics);
        assert!(text.contains("\nkeygate_keys_expired 1\n"), "{text}");
        let left: f64 = text
            .lines()
            .find_map(|line| line.strip_prefix("keygate_keys_expiring_seconds "))
            .unwrap()
            .parse()
            .unwrap();
        assert!((86_000.0..=86_400.0).contains(&left), "{left}");
    }
}

use super::*;

const HASH_A: &str = "1111111111111111111111111111111111111111111111111111111111111111";
const HASH_B: &str = "2222222222222222222222222222222222222222222222222222222222222222";

const VALID: &str = r#"environment = "test"

[listen]
proxy = ["127.0.0.1:8080", "[::1]:8080"]
admin = "127.0.0.1:9901"

[upstream]
address = "127.0.0.1:9000"
connect_timeout_ms = 500

[routes]
campaign_paths = ["/api/v2/campaigns/{campaign}"]

[[campaigns]]
id = "campaign_a"
allowed_ips = ["203.0.113.0/24", "2001:db8:a::/48"]

[[campaigns.keys]]
id = "primary"
sha256 = "1111111111111111111111111111111111111111111111111111111111111111"
expires_at = "2027-06-30T00:00:00Z"

[[campaigns]]
id = "campaign_b"
allowed_ips = ["198.51.100.7"]
keys = [{ id = "primary", sha256 = "2222222222222222222222222222222222222222222222222222222222222222" }]
"#;

fn errors(text: &str) -> Vec<ConfigError> {
    parse("test.toml", text)
        .expect_err("the file must be rejected")
        .0
}

#[test]
fn valid_file_builds_table_and_settings() {
    let config = parse("test.toml", VALID).unwrap();
    assert_eq!(config.table.campaigns().len(), 2);
    assert_eq!(config.table.key_count(), 2);
    assert_eq!(config.settings.listen.proxy.len(), 2);
    assert_eq!(config.settings.upstream.port, 9000);
    assert_eq!(config.settings.upstream.sni, "127.0.0.1");
    assert_eq!(
        config.settings.upstream.connect_timeout,
        Duration::from_millis(500)
    );
    assert_eq!(
        config.settings.upstream.read_timeout,
        Duration::from_millis(30_000)
    );
    let first = &config.table.campaigns()[0];
    assert_eq!(first.keys[0].expires_at, Some(1_814_313_600));
}

/// Returns the line and field of each error, in order.
fn lines_and_fields(found: &[ConfigError]) -> Vec<(usize, &str)> {
    found.iter().map(|e| (e.line, e.field.as_str())).collect()
}

/// Replaces `from` in the valid file, which must contain it, and returns the errors.
fn errors_after(from: &str, to: &str) -> Vec<ConfigError> {
    assert!(VALID.contains(from), "{from}");
    errors(&VALID.replacen(from, to, 1))
}

#[test]
fn invalid_values_report_line_and_field() {
    let cases: &[(&str, &str, usize, &str, &str)] = &[
        (
            "environment = \"test\"",
            "environment = \"prod\"",
            1,
            "environment",
            "\"live\" or \"test\"",
        ),
        (
            "\"127.0.0.1:8080\",",
            "\"127.0.0.1\",",
            4,
            "listen.proxy[0]",
            "IP:port",
        ),
        (
            "admin = \"127.0.0.1:9901\"",
            "admin = \"127.0.0.1:8080\"",
            5,
            "listen.admin",
            "port of its own",
        ),
        (
            "address = \"127.0.0.1:9000\"",
            "address = \"::1:9000\"",
            8,
            "upstream.address",
            "brackets",
        ),
        (
            "connect_timeout_ms = 500",
            "connect_timeout_ms = 0",
            9,
            "upstream.connect_timeout_ms",
            "between 1",
        ),
        (
            "/api/v2/campaigns/{campaign}\"",
            "/api/{campaign}/messages\"",
            12,
            "routes.campaign_paths[0]",
            "last segment",
        ),
        (
            "id = \"campaign_a\"",
            "id = \"campaign a\"",
            15,
            "campaigns[0].id",
            "invalid id",
        ),
        (
            "\"203.0.113.0/24\"",
            "\"010.0.0.1\"",
            16,
            "campaigns[0].allowed_ips[0]",
            "leading zeros",
        ),
        (
            "\"203.0.113.0/24\"",
            "\"203.0.113.7/24\"",
            16,
            "campaigns[0].allowed_ips[0]",
            "did you mean 203.0.113.0/24",
        ),
        (
            "\"203.0.113.0/24\"",
            "\"0.0.0.0/0\"",
            16,
            "campaigns[0].allowed_ips[0]",
            "allow_any_ip",
        ),
        (
            "sha256 = \"1111",
            "sha256 = \"X111",
            20,
            "campaigns[0].keys[0].sha256",
            "64 lowercase",
        ),
        (
            "2027-06-30T00:00:00Z",
            "2027-06-31",
            21,
            "campaigns[0].keys[0].expires_at",
            "RFC 3339",
        ),
        (
            "id = \"campaign_b\"",
            "id = \"campaign_a\"",
            24,
            "campaigns[1].id",
            "first defined on line 15",
        ),
        (
            HASH_B,
            HASH_A,
            26,
            "campaigns[1].keys[0].sha256",
            "already used by key \"primary\" of campaign \"campaign_a\" on line 20",
        ),
        (
            "allowed_ips = [\"198.51.100.7\"]",
            "",
            24,
            "campaigns[1].allowed_ips",
            "no allowed IPs",
        ),
    ];
    for (from, to, line, field, message) in cases {
        let found = errors_after(from, to);
        assert_eq!(found.len(), 1, "{from} -> {to}: {found:?}");
        let error = &found[0];
        assert_eq!(error.line, *line, "{error}");
        assert_eq!(error.field, *field, "{error}");
        assert!(error.message.contains(message), "{error}");
        assert_eq!(error.file, "test.toml");
    }
}

/// Each case adds lines next to `anchor` in the valid file: before `[routes]`, after any
/// other anchor. The one error must name the line and the field, and the campaign for a
/// campaign's field.
#[test]
fn added_values_report_line_and_field() {
    const UPSTREAM: &str = "connect_timeout_ms = 500";
    const ROUTES: &str = "[routes]";
    const CAMPAIGN_B: &str = "allowed_ips = [\"198.51.100.7\"]";
    /// The anchor, the added lines, then the line, field, campaign and message expected.
    type Case = (
        &'static str,
        &'static str,
        usize,
        &'static str,
        Option<&'static str>,
        &'static str,
    );
    let cases: &[Case] = &[
        (
            ROUTES,
            "[limits]\nmax_header_bytes = 100\n",
            12,
            "limits.max_header_bytes",
            None,
            "between 1024 and 1048575",
        ),
        (
            ROUTES,
            "[limits]\nheader_timeout_seconds = 0\n",
            12,
            "limits.header_timeout_seconds",
            None,
            "between 1 and 86400 seconds",
        ),
        (
            ROUTES,
            "[limits]\nmax_body_bytes = -1\n",
            12,
            "limits.max_body_bytes",
            None,
            "between 0 and",
        ),
        (
            ROUTES,
            "[limits]\nkeepalive_timeout_seconds = 86401\n",
            12,
            "limits.keepalive_timeout_seconds",
            None,
            "between 1 and 86400 seconds",
        ),
        (
            ROUTES,
            "[limits]\ndrain_max_bytes = -1\n",
            12,
            "limits.drain_max_bytes",
            None,
            "between 0 and",
        ),
        (
            ROUTES,
            "[rate_limit]\nrequests = 0\nper_seconds = 60\n",
            12,
            "rate_limit.requests",
            None,
            "between 1 and 1000000",
        ),
        (
            CAMPAIGN_B,
            "rate_limit = { requests = 10, per_seconds = 0 }",
            26,
            "campaigns[1].rate_limit.per_seconds",
            Some("campaign_b"),
            "between 1 and 86400 seconds",
        ),
        (
            CAMPAIGN_B,
            "rate_limit = { requests = 1000001, per_seconds = 60 }",
            26,
            "campaigns[1].rate_limit.requests",
            Some("campaign_b"),
            "between 1 and 1000000",
        ),
        (
            UPSTREAM,
            "sni = \"api .internal\"",
            10,
            "upstream.sni",
            None,
            "without whitespace",
        ),
        (
            UPSTREAM,
            "authorization_env = \"API-TOKEN\"",
            10,
            "upstream.authorization_env",
            None,
            "name of an environment variable",
        ),
        (
            UPSTREAM,
            "dns_refresh_seconds = 0",
            10,
            "upstream.dns_refresh_seconds",
            None,
            "between 1 and 86400 seconds",
        ),
        (
            UPSTREAM,
            "ca_file = \"ca.pem\"",
            10,
            "upstream.ca_file",
            None,
            "set tls = true",
        ),
        (
            UPSTREAM,
            "tls = true\nca_file = \"\"",
            11,
            "upstream.ca_file",
            None,
            "path of a PEM file",
        ),
        (
            UPSTREAM,
            "insecure_skip_verify = true",
            10,
            "upstream.insecure_skip_verify",
            None,
            "set tls = true",
        ),
    ];
    for (anchor, added, line, field, campaign, message) in cases {
        let with_lines = if *anchor == ROUTES {
            format!("{added}\n{anchor}")
        } else {
            format!("{anchor}\n{added}")
        };
        let found = errors_after(anchor, &with_lines);
        assert_eq!(found.len(), 1, "{added}: {found:?}");
        let error = &found[0];
        assert_eq!(error.file, "test.toml", "{error}");
        assert_eq!(error.line, *line, "{error}");
        assert_eq!(error.field, *field, "{error}");
        assert_eq!(error.campaign.as_deref(), *campaign, "{error}");
        assert!(error.message.contains(message), "{error}");
    }
}

#[test]
fn https_options_without_tls_report_their_own_lines() {
    let found = errors_after(
        "connect_timeout_ms = 500",
        "connect_timeout_ms = 500\nca_file = \"ca.pem\"\ninsecure_skip_verify = true",
    );
    let summary = lines_and_fields(&found);
    assert_eq!(
        summary,
        vec![
            (10, "upstream.ca_file"),
            (11, "upstream.insecure_skip_verify")
        ],
        "{found:?}"
    );

    let allowed = VALID.replacen(
        "connect_timeout_ms = 500",
        "connect_timeout_ms = 500\ninsecure_skip_verify = false",
        1,
    );
    let config = parse("test.toml", &allowed).unwrap();
    assert!(!config.settings.upstream.insecure_skip_verify);
}

#[test]
fn errors_name_the_campaign_and_value() {
    let found = errors_after("\"203.0.113.0/24\"", "\"203.0.113.7/33\"");
    let text = found[0].to_string();
    assert_eq!(
        text,
        "test.toml:16: campaign \"campaign_a\": campaigns[0].allowed_ips[0] = \"203.0.113.7/33\": prefix length is too long; the maximum is 32"
    );
}

#[test]
fn every_error_is_reported_at_once() {
    let text = VALID
        .replacen("\"203.0.113.0/24\"", "\"010.0.0.1\"", 1)
        .replacen("2027-06-30T00:00:00Z", "tomorrow", 1)
        .replacen("id = \"campaign_b\"", "id = \"campaign_a\"", 1);
    let lines: Vec<usize> = errors(&text).iter().map(|e| e.line).collect();
    assert_eq!(lines, vec![16, 21, 24]);
}

#[test]
fn unknown_fields_are_all_reported_with_campaign() {
    let text = VALID
        .replacen("connect_timeout_ms = 500", "connect_timeout = 500", 1)
        .replacen(
            "id = \"primary\"\n",
            "id = \"primary\"\nsecret = \"x\"\n",
            1,
        )
        .replacen(
            "keys = [{ id = \"primary\"",
            "keys = [{ name = \"p\", id = \"primary\"",
            1,
        );
    let found = errors(&text);
    let summary: Vec<(usize, Option<&str>, &str)> = found
        .iter()
        .map(|e| (e.line, e.campaign.as_deref(), e.field.as_str()))
        .collect();
    assert_eq!(
        summary,
        vec![
            (9, None, "upstream.connect_timeout"),
            (20, Some("campaign_a"), "campaigns[0].keys[0].secret"),
            (27, Some("campaign_b"), "campaigns[1].keys[0].name"),
        ]
    );
    assert!(found[0].message.contains("expected one of: address, tls"));
}

const LAST_KEY_LINE_A: &str = "expires_at = \"2027-06-30T00:00:00Z\"\n";

#[test]
fn unknown_fields_and_invalid_values_are_reported_together() {
    let text = VALID
        .replacen(
            "allowed_ips = [\"198.51.100.7\"]",
            "alowed_ips = [\"198.51.100.7\"]",
            1,
        )
        .replacen("\"203.0.113.0/24\"", "\"203.0.113.7/24\"", 1);
    let found = errors(&text);
    let summary = lines_and_fields(&found);
    let expected = vec![
        (16, "campaigns[0].allowed_ips[0]"),
        (24, "campaigns[1].allowed_ips"),
        (25, "campaigns[1].alowed_ips"),
    ];
    assert_eq!(summary, expected, "{found:?}");
}

#[test]
fn wrong_type_names_field_and_campaign() {
    let text = VALID.replacen(
        "id = \"campaign_b\"\n",
        "id = \"campaign_b\"\nallow_any_ip = \"yes\"\n",
        1,
    );
    let found = errors(&text);
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(found[0].line, 25);
    assert_eq!(found[0].field, "campaigns[1].allow_any_ip");
    assert_eq!(found[0].campaign.as_deref(), Some("campaign_b"));
    assert!(
        found[0].message.contains("expected a boolean"),
        "{}",
        found[0]
    );
}

#[test]
fn more_than_three_keys_is_rejected() {
    let extra: String = (3..6)
        .map(|n| {
            format!(
                "\n[[campaigns.keys]]\nid = \"k{n}\"\nsha256 = \"{}\"\n",
                format!("{n}").repeat(64)
            )
        })
        .collect();
    let found = errors_after(LAST_KEY_LINE_A, &format!("{LAST_KEY_LINE_A}{extra}"));
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(found[0].field, "campaigns[0].keys");
    assert!(found[0].message.contains("at most 3"));
    assert_eq!(found[0].line, 31);
}

#[test]
fn duplicate_key_id_in_campaign_is_rejected() {
    let extra = format!(
        "\n[[campaigns.keys]]\nid = \"primary\"\nsha256 = \"{}\"\n",
        "3".repeat(64)
    );
    let found = errors_after(LAST_KEY_LINE_A, &format!("{LAST_KEY_LINE_A}{extra}"));
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(found[0].field, "campaigns[0].keys[1].id");
    assert_eq!(found[0].line, 24);
    assert!(
        found[0].message.contains("duplicate key id"),
        "{}",
        found[0]
    );
}

#[test]
fn invalid_toml_reports_its_line() {
    let found = errors_after("id = \"campaign_b\"", "id = \"campaign_b");
    assert_eq!(found[0].line, 24);
    assert!(found[0].message.starts_with("invalid TOML"));
}

#[test]
fn wrong_type_reports_its_line() {
    let found = errors_after("connect_timeout_ms = 500", "connect_timeout_ms = \"500\"");
    assert_eq!(found[0].line, 9, "{}", found[0]);
}

#[test]
fn unquoted_datetime_suggests_quotes() {
    let found = errors_after(
        "expires_at = \"2027-06-30T00:00:00Z\"",
        "expires_at = 2027-06-30T00:00:00Z",
    );
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(found[0].line, 21);
    assert_eq!(found[0].field, "campaigns[0].keys[0].expires_at");
    let message = &found[0].message;
    assert!(message.contains("TOML date-time"), "{message}");
    assert!(
        message.contains("write it as a quoted string such as \"2027-06-30T00:00:00Z\""),
        "{message}"
    );
    assert!(!message.contains("map"), "{message}");
}

/// Returns the errors of the valid file with `[client_ip] trusted_proxies = entries`.
fn trusted_proxies_errors(entries: &str) -> Vec<ConfigError> {
    let section = format!("[client_ip]\ntrusted_proxies = {entries}\n\n[routes]");
    errors(&VALID.replacen("[routes]", &section, 1))
}

#[test]
fn trusted_proxies_reject_every_address() {
    let found = trusted_proxies_errors(r#"["10.0.0.0/8", "::/0"]"#);
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(found[0].field, "client_ip.trusted_proxies[1]");
    assert!(found[0]
        .message
        .contains("any client choose its own address"));
}

#[test]
fn trusted_proxies_reject_non_canonical_ipv6() {
    let found = trusted_proxies_errors(r#"["2001:DB8:a::/48"]"#);
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(found[0].field, "client_ip.trusted_proxies[0]");
    assert!(
        found[0].message.contains("did you mean 2001:db8:a::/48?"),
        "{}",
        found[0]
    );
}

#[test]
fn proxy_protocol_listener_needs_trusted_proxies() {
    let text = VALID.replacen(
        "admin = ",
        "proxy_protocol = [\"127.0.0.1:8443\"]\nadmin = ",
        1,
    );
    let found = errors(&text);
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(found[0].field, "listen.proxy_protocol");
    assert!(found[0].message.contains("trusted_proxies"));

    let trusted = text.replacen(
        "[routes]",
        "[client_ip]\ntrusted_proxies = [\"10.0.0.0/8\"]\n\n[routes]",
        1,
    );
    let config = parse("test.toml", &trusted).unwrap();
    assert_eq!(
        config.settings.listen.proxy_protocol,
        vec!["127.0.0.1:8443".parse().unwrap()]
    );

    let overlapping = trusted.replacen("127.0.0.1:8443", "127.0.0.1:8080", 1);
    let found = errors(&overlapping);
    assert_eq!(found[0].field, "listen.proxy_protocol[0]");
    assert!(found[0].message.contains("also in listen.proxy"));
}

#[test]
fn allow_any_ip_permits_whole_family() {
    let text = VALID.replacen(
        "allowed_ips = [\"198.51.100.7\"]",
        "allowed_ips = [\"0.0.0.0/0\", \"::/0\"]\nallow_any_ip = true",
        1,
    );
    assert!(parse("test.toml", &text).is_ok());
}

#[test]
fn wrong_types_reported_with_other_errors() {
    let text = VALID
        .replacen(
            "connect_timeout_ms = 500",
            "connect_timeout_ms = \"500\"",
            1,
        )
        .replacen(
            "id = \"campaign_b\"\n",
            "id = \"campaign_a\"\nallow_any_ip = \"yes\"\n",
            1,
        );
    let found = errors(&text);
    let summary = lines_and_fields(&found);
    let expected = vec![
        (9, "upstream.connect_timeout_ms"),
        (24, "campaigns[1].id"),
        (25, "campaigns[1].allow_any_ip"),
    ];
    assert_eq!(summary, expected, "{found:?}");
    assert!(
        found[0].message.contains("expected an integer"),
        "{}",
        found[0]
    );
    assert!(
        found[1].message.contains("duplicate campaign id"),
        "{}",
        found[1]
    );
    assert!(
        found[2].message.contains("expected a boolean"),
        "{}",
        found[2]
    );
}

#[test]
fn wrong_required_value_ends_search_quietly() {
    let text = VALID
        .replacen("connect_timeout_ms = 500", "connect_timeout_ms = true", 1)
        .replacen("id = \"campaign_b\"", "id = 7", 1);
    let found = errors(&text);
    let summary = lines_and_fields(&found);
    assert_eq!(
        summary,
        vec![(9, "upstream.connect_timeout_ms"), (24, "campaigns[1].id")],
        "{found:?}"
    );
    assert!(!found.iter().any(|e| e.message.contains("missing field")));
}

#[test]
fn shared_hash_reported_beside_other_key_errors() {
    let text = VALID
        .replacen("id = \"primary\"\n", "id = \"primary key\"\n", 1)
        .replacen(HASH_B, HASH_A, 1);
    let found = errors(&text);
    let summary = lines_and_fields(&found);
    assert_eq!(
        summary,
        vec![
            (19, "campaigns[0].keys[0].id"),
            (26, "campaigns[1].keys[0].sha256")
        ],
        "{found:?}"
    );
    assert!(
        found[1]
            .message
            .contains("key \"primary key\" of campaign \"campaign_a\" on line 20"),
        "{}",
        found[1]
    );
}

#[test]
fn reload_shares_unchanged_campaigns() {
    let current = parse("test.toml", VALID).unwrap().table;
    let text = VALID.replacen(HASH_B, &"3".repeat(64), 1);
    let next = Parsed::new("test.toml", text, Some(&current))
        .unwrap()
        .build([0; 32])
        .unwrap()
        .table;
    let (before, after) = (current.campaigns(), next.campaigns());
    assert!(std::sync::Arc::ptr_eq(&before[0].id, &after[0].id));
    assert!(std::sync::Arc::ptr_eq(&before[0].keys, &after[0].keys));
    assert!(std::sync::Arc::ptr_eq(&before[1].id, &after[1].id));
    assert!(!std::sync::Arc::ptr_eq(&before[1].keys, &after[1].keys));
    assert_eq!(after[1].keys[0].hash.to_hex(), "3".repeat(64));
    assert_eq!(before[1].networks, after[1].networks);
}

#[test]
fn admin_port_must_not_overlap_a_proxy_listener() {
    for admin in ["127.0.0.1:8080", "0.0.0.0:8080", "[::]:8080"] {
        let found = errors_after(
            "admin = \"127.0.0.1:9901\"",
            &format!("admin = \"{admin}\""),
        );
        assert_eq!(found.len(), 1, "{admin}: {found:?}");
        assert_eq!(found[0].line, 5, "{admin}");
        assert_eq!(found[0].field, "listen.admin", "{admin}");
        assert!(found[0].message.contains("port of its own"), "{admin}");
    }
    let elsewhere = VALID.replacen(
        "admin = \"127.0.0.1:9901\"",
        "admin = \"127.0.0.2:8080\"",
        1,
    );
    assert!(parse("test.toml", &elsewhere).is_ok());
}

#[test]
fn wrong_type_in_array_keeps_later_indexes() {
    // An array entry of the wrong type moves the entries after it, so validation, which
    // names entries by index, does not run, and the duplicate id goes unreported.
    let text = VALID
        .replacen("[\"203.0.113.0/24\",", "[5, \"203.0.113.0/24\",", 1)
        .replacen(
            "id = \"campaign_b\"\n",
            "id = \"campaign_a\"\nallow_any_ip = \"yes\"\n",
            1,
        );
    let found = errors(&text);
    let summary = lines_and_fields(&found);
    let expected = vec![
        (16, "campaigns[0].allowed_ips[0]"),
        (25, "campaigns[1].allow_any_ip"),
    ];
    assert_eq!(summary, expected, "{found:?}");
}

#[test]
fn hundreds_of_keys_are_reported() {
    let extra: String = (0..300)
        .map(|n| format!("\n[[campaigns.keys]]\nid = \"k{n}\"\nsha256 = \"{n:064x}\"\n"))
        .collect();
    let found = errors_after(LAST_KEY_LINE_A, &format!("{LAST_KEY_LINE_A}{extra}"));
    assert_eq!(found.len(), 1, "{found:?}");
    assert!(found[0].message.contains("301 keys"), "{}", found[0]);
}

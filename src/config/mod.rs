//! The configuration file: reading, parsing and validation into a `Table` and the
//! settings that only a restart can change.
//!
//! `load` either returns a complete, valid configuration or every problem found, each
//! with file, line, campaign, field and value. It never returns a partial table.

mod address;
mod error;
mod file;
mod parallel;
mod pieces;
mod validate;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use sha2::{Digest, Sha256};
use toml::de::{DeTable, DeValue};

pub use error::{ConfigError, ConfigErrors, LoadError};

use crate::table::{SharedCampaigns, Table};
use error::{Report, Source};
use file::schema::{self, Child};

/// A valid configuration: the table, and the settings read at start only.
#[derive(Debug)]
pub struct Config {
    pub table: Table,
    pub settings: Settings,
    /// The SHA-256 of the file text, which identifies the version in reload logs.
    pub sha256: [u8; 32],
}

/// Settings that take effect at start; a reload reports changes to them as needing a
/// restart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    pub listen: Listen,
    pub upstream: Upstream,
    pub limits: Limits,
    pub shutdown: Shutdown,
    pub log: Log,
    pub metrics: Metrics,
    pub reload: Reload,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listen {
    pub proxy: Vec<SocketAddr>,
    /// Proxy listeners where every connection starts with a PROXY protocol header.
    pub proxy_protocol: Vec<SocketAddr>,
    pub admin: Option<SocketAddr>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upstream {
    pub host: String,
    pub port: u16,
    pub tls: bool,
    /// The TLS server name, the host unless `sni` sets another.
    pub sni: String,
    pub connect_timeout: Duration,
    pub read_timeout: Duration,
    /// A PEM file of CAs that replaces the system's for verifying the upstream.
    pub ca_file: Option<PathBuf>,
    /// Whether the upstream certificate goes unverified.
    pub insecure_skip_verify: bool,
    /// The environment variable whose value replaces the client's `Authorization`.
    pub authorization_env: Option<String>,
    /// How often a host name is resolved again.
    pub dns_refresh: Duration,
}

/// Limits on what a client may send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// The maximum size of the request line and headers; larger gets 431.
    pub max_header_bytes: usize,
    /// The time allowed to receive a request header; slower gets 408.
    pub header_timeout: Duration,
    /// The maximum request body size; larger gets 413.
    pub max_body_bytes: u64,
    /// How long an idle keep-alive connection stays open.
    pub keepalive_timeout: Duration,
    /// The maximum body bytes read and discarded after a rejection before the connection
    /// is closed instead.
    pub drain_max_bytes: u64,
}

/// The shutdown sequence after SIGTERM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shutdown {
    /// How long `/readyz` returns 503 while the listeners still accept connections.
    pub drain_delay: Duration,
    /// How long in-flight requests may take once the listeners are closed.
    pub grace_period: Duration,
}

/// The log output settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Log {
    pub format: LogFormat,
    /// Whether a line is written for every request.
    pub access: bool,
}

/// The format of log lines on stdout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Json,
    Text,
}

/// The metrics settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Metrics {
    /// Whether request counters carry a `campaign` label.
    pub per_campaign: bool,
}

/// The reload settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reload {
    /// How often the file is read again even when no change was seen.
    pub interval: Duration,
}

/// Reads and validates the configuration file at `path`.
pub fn load(path: &Path) -> Result<Config, LoadError> {
    let text = std::fs::read_to_string(path).map_err(|source| LoadError::Read {
        path: path.display().to_string(),
        source,
    })?;
    let sha256 = Sha256::digest(text.as_bytes()).into();
    parse_digested(&path.display().to_string(), text, sha256).map_err(LoadError::Invalid)
}

/// Parses and validates configuration text; `path` only names the file in errors.
pub fn parse(path: &str, text: &str) -> Result<Config, ConfigErrors> {
    parse_digested(
        path,
        text.to_owned(),
        Sha256::digest(text.as_bytes()).into(),
    )
}

/// Parses and validates configuration text whose SHA-256 the caller has computed.
pub fn parse_digested(path: &str, text: String, sha256: [u8; 32]) -> Result<Config, ConfigErrors> {
    Parsed::new(path, text, None)?.build(sha256)
}

/// A file that parsed, with each campaign checked on its own. What is left is the work
/// that needs all campaigns at once: duplicate ids and key hashes, and the table.
pub struct Parsed {
    source: Source,
    file: file::FileConfig,
    campaigns: Vec<validate::CheckedCampaign>,
    /// Problems found so far that do not stop the rest of the file from being checked.
    errors: Vec<ConfigError>,
}

impl Parsed {
    /// Parses configuration text; `path` only names the file in errors. The text is
    /// dropped once parsed, before the table is built, which lowers the peak memory of a
    /// large file. Campaigns that did not change share their memory with `current`, the
    /// table in force.
    pub fn new(path: &str, text: String, current: Option<&Table>) -> Result<Self, ConfigErrors> {
        let source = Source::new(path, &text);
        let mut report = Report::new(&source);
        let shared = current.map(SharedCampaigns::new);
        let (file, campaigns) = match pieces::parse(&text, &source, shared.as_ref()) {
            Some(parsed) => parsed,
            None => {
                let mut file = parse_document(&text, &mut report)?;
                drop(text);
                let campaigns =
                    validate::check_campaigns(&file.campaigns, &source, shared.as_ref());
                file.campaigns = Vec::new();
                (file, campaigns)
            }
        };
        let errors = report.errors;
        Ok(Self {
            source,
            file,
            campaigns,
            errors,
        })
    }

    /// Checks the campaigns together and builds the table; `sha256` identifies the text.
    pub fn build(self, sha256: [u8; 32]) -> Result<Config, ConfigErrors> {
        let mut report = Report::with_errors(&self.source, self.errors);
        match validate::build(self.file, self.campaigns, &mut report) {
            Some((table, settings)) if report.errors.is_empty() => Ok(Config {
                table,
                settings,
                sha256,
            }),
            _ => {
                report.errors.sort_by_key(|error| error.line);
                Err(ConfigErrors(report.errors))
            }
        }
    }
}

/// Parses the whole text as one document, reporting syntax errors, unknown keys and
/// values of the wrong type.
fn parse_document(text: &str, report: &mut Report<'_>) -> Result<file::FileConfig, ConfigErrors> {
    // NOTE: toml 1.2 keeps the whole file as tokens, events and a document tree while it
    // parses, about 20 times the file size at the peak (a 66 MiB file peaks near 1.4 GiB).
    // A file without errors in the usual shape is parsed in pieces instead (`pieces`).
    let mut root = match DeTable::parse(text) {
        Ok(root) => root,
        Err(error) => {
            let span = error.span().unwrap_or(0..0);
            report.error(
                span,
                None,
                "",
                None,
                format!("invalid TOML: {}", error.message().trim_end()),
            );
            return Err(ConfigErrors(std::mem::take(&mut report.errors)));
        }
    };
    // Unknown keys are reported and removed, so that the rest of the file is still
    // checked and every error is reported at once.
    remove_unknown_keys(root.get_mut(), schema::ROOT, "", None, report);
    // A value of the wrong type is reported and removed, and the rest deserialized again,
    // so that such values are reported together. Field paths are looked up in the tree as
    // parsed, where no removal has shifted an index.
    let parsed = root.clone();
    let mut removed: Vec<Removed> = Vec::new();
    for _ in 0..MAX_TYPE_ERRORS {
        let error = match file::FileConfig::deserialize(toml::de::Deserializer::from(root.clone()))
        {
            // Validation names entries by their index, which a removed array entry would
            // shift, so it runs only when every removal was of a table key.
            Ok(file) if !removed.iter().any(|removal| removal.from_array) => return Ok(file),
            Ok(_) => break,
            Err(error) => error,
        };
        let message = error.message().trim_end();
        let span = error.span().unwrap_or(0..0);
        let caused_by_removal = removed
            .iter()
            .any(|removal| message == format!("missing field `{}`", removal.key));
        // A table that lost a value it must have goes as a whole, without an error of
        // keygate's making.
        if !caused_by_removal {
            let (field, campaign) =
                find_value(parsed.get_ref(), span.start, "", None).unwrap_or_default();
            report.error(
                span.clone(),
                campaign.as_deref(),
                field,
                None,
                type_error_message(text, &span, message),
            );
        }
        match remove_value(root.get_mut(), &span) {
            Some(removal) => removed.push(removal),
            None => break,
        }
    }
    report.errors.sort_by_key(|error| error.line);
    Err(ConfigErrors(std::mem::take(&mut report.errors)))
}

/// The maximum number of values of the wrong type reported for one file. Each costs a
/// deserialization of the whole document.
const MAX_TYPE_ERRORS: usize = 10;

/// A value removed from the parsed file.
struct Removed {
    /// The key of the table entry that held the value.
    key: String,
    /// Whether the value was an entry of an array, so later entries moved down by one.
    from_array: bool,
}

/// Removes the value at `span` from the table or array where it sits.
fn remove_value(table: &mut DeTable<'_>, span: &std::ops::Range<usize>) -> Option<Removed> {
    let mut found = None;
    for (key, item) in table.iter_mut() {
        if item.span() == *span {
            found = Some(key.clone());
            break;
        }
        let name = key.get_ref().to_string();
        match item.get_mut() {
            DeValue::Table(inner) => {
                if let Some(name) = remove_value(inner, span) {
                    return Some(name);
                }
            }
            DeValue::Array(entries) => {
                if let Some(index) = entries.iter().position(|entry| entry.span() == *span) {
                    // `DeArray` has no `remove`. The array-of-tables flag that a rebuilt array loses is
                    // read only by the parser.
                    let rest = std::mem::replace(entries, toml::de::DeArray::new());
                    *entries = rest
                        .into_iter()
                        .enumerate()
                        .filter_map(|(at, entry)| (at != index).then_some(entry))
                        .collect();
                    return Some(Removed {
                        key: name,
                        from_array: true,
                    });
                }
                for entry in entries.iter_mut() {
                    if let DeValue::Table(inner) = entry.get_mut() {
                        if let Some(name) = remove_value(inner, span) {
                            return Some(name);
                        }
                    }
                }
            }
            _ => {}
        }
    }
    let key = found?;
    table.remove(&key);
    Some(Removed {
        key: key.get_ref().to_string(),
        from_array: false,
    })
}

/// Reports and removes every key that the schema does not know, with the campaign it
/// sits in.
fn remove_unknown_keys(
    table: &mut DeTable<'_>,
    known: &[(&str, Child)],
    path: &str,
    campaign: Option<&str>,
    report: &mut Report<'_>,
) {
    let mut unknown = Vec::new();
    for (key, item) in table.iter_mut() {
        let name: &str = key.get_ref();
        let field = if path.is_empty() {
            name.to_owned()
        } else {
            format!("{path}.{name}")
        };
        let Some((_, child)) = known.iter().find(|(known_name, _)| *known_name == name) else {
            let names: Vec<&str> = known.iter().map(|(known_name, _)| *known_name).collect();
            report.error(
                key.span(),
                campaign,
                field,
                None,
                format!("unknown field; expected one of: {}", names.join(", ")),
            );
            unknown.push(key.clone());
            continue;
        };
        match (child, item.get_mut()) {
            (Child::Table(fields), DeValue::Table(inner)) => {
                remove_unknown_keys(inner, fields, &field, campaign, report);
            }
            (Child::ArrayOfTables(fields), DeValue::Array(entries)) => {
                for (index, entry) in entries.iter_mut().enumerate() {
                    let DeValue::Table(inner) = entry.get_mut() else {
                        continue;
                    };
                    let inner_campaign = campaign.map(str::to_owned).or_else(|| {
                        inner
                            .get("id")
                            .and_then(|id| id.get_ref().as_str())
                            .map(str::to_owned)
                    });
                    let entry_path = format!("{field}[{index}]");
                    remove_unknown_keys(
                        inner,
                        fields,
                        &entry_path,
                        inner_campaign.as_deref(),
                        report,
                    );
                }
            }
            // A value of the wrong type is reported by deserialization.
            _ => {}
        }
    }
    for key in unknown {
        table.remove(&key);
    }
}

/// Returns the message for a value of the wrong type. toml deserializes an unquoted
/// date-time as a table, so serde's own message would name a map instead.
fn type_error_message(text: &str, span: &std::ops::Range<usize>, message: &str) -> String {
    let value = text.get(span.clone()).unwrap_or_default().trim();
    let expected = message.strip_prefix("invalid type: map, ");
    match expected {
        Some(expected) if value.parse::<toml::value::Datetime>().is_ok() => {
            let hint = match expected {
                "expected a string" => format!("; write it as a quoted string such as \"{value}\""),
                _ => String::new(),
            };
            plain_type_names(&format!("invalid type: TOML date-time, {expected}{hint}"))
        }
        _ => plain_type_names(message),
    }
}

/// Replaces Rust type names in deserialization messages with TOML's words.
fn plain_type_names(message: &str) -> String {
    [
        ("i64", "an integer"),
        ("i128", "an integer"),
        ("u64", "an integer"),
        ("a sequence", "an array"),
        ("a map", "a table"),
        ("struct ", "table "),
    ]
    .into_iter()
    .fold(message.to_owned(), |text, (from, to)| {
        text.replace(from, to)
    })
}

/// Searches a table for the value whose span contains `offset`. Only values have useful
/// spans: a table's span covers its header alone, so every table is searched.
fn find_value(
    table: &DeTable<'_>,
    offset: usize,
    path: &str,
    campaign: Option<&str>,
) -> Option<(String, Option<String>)> {
    let contains = |span: std::ops::Range<usize>| {
        span.start <= offset && offset < span.end.max(span.start + 1)
    };
    for (key, item) in table {
        let field = if path.is_empty() {
            key.get_ref().to_string()
        } else {
            format!("{path}.{}", key.get_ref())
        };
        let found = match item.get_ref() {
            DeValue::Table(inner) => find_value(inner, offset, &field, campaign),
            DeValue::Array(entries) => entries.iter().enumerate().find_map(|(index, entry)| {
                let entry_field = format!("{field}[{index}]");
                match entry.get_ref() {
                    DeValue::Table(inner) => {
                        let id = inner.get("id").and_then(|id| id.get_ref().as_str());
                        let inner_campaign =
                            campaign.or(if field == "campaigns" { id } else { None });
                        find_value(inner, offset, &entry_field, inner_campaign)
                    }
                    _ => contains(entry.span()).then(|| (entry_field, campaign.map(str::to_owned))),
                }
            }),
            _ => None,
        };
        if found.is_some() {
            return found;
        }
        if contains(item.span()) {
            return Some((field, campaign.map(str::to_owned)));
        }
    }
    None
}

#[cfg(test)]
mod tests;

//! Log setup: `tracing` to stdout, as JSON lines or as text, with Pingora's `log` records
//! bridged in. `RUST_LOG` sets the filter, `info` by default.

use std::io::IsTerminal;

use tracing::level_filters::LevelFilter;
use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// Targets whose records stop at info whatever `RUST_LOG` sets. Pingora logs whole
/// request and response headers at debug and trace, keys and credentials included. The
/// file watcher logs every event at debug and trace, and when stdout goes to a file in
/// the watched directory, each of those lines would be an event in turn.
const CAPPED_AT_INFO: [&str; 4] = ["pingora_core", "pingora_proxy", "pingora_pool", "notify"];

/// Installs the global subscriber. Later calls do nothing.
pub fn init(format: LogFormat) {
    let (filter, invalid) = match EnvFilter::try_from_default_env() {
        Ok(filter) => (filter, None),
        Err(error) => {
            let invalid = std::env::var_os("RUST_LOG").map(|_| error.to_string());
            (EnvFilter::new("info"), invalid)
        }
    };
    let filter = if filter
        .max_level_hint()
        .is_some_and(|max| max <= LevelFilter::INFO)
    {
        // Nothing more verbose than info is enabled, so the caps would only raise a
        // capped target above what RUST_LOG sets.
        filter
    } else {
        CAPPED_AT_INFO.iter().fold(filter, |filter, target| {
            let directive = format!("{target}=info");
            filter.add_directive(directive.parse().expect("a valid directive"))
        })
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stdout);
    let installed = match format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .try_init(),
        // Colour codes only help a terminal, and clutter a file or a container log.
        LogFormat::Text => builder
            .with_ansi(std::io::stdout().is_terminal())
            .try_init(),
    };
    if installed.is_err() {
        tracing::debug!("a log subscriber was already installed");
    }
    if let Some(error) = invalid {
        tracing::warn!(error = %error, "RUST_LOG is invalid; logging at info instead");
    }
}

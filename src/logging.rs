//! Log setup: `tracing` to stdout, JSON lines by default, with Pingora's `log` records
//! bridged in. `RUST_LOG` sets the filter, `info` by default.

use tracing_subscriber::EnvFilter;

/// Installs the global subscriber. Later calls do nothing.
pub fn init() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let installed = tracing_subscriber::fmt()
        .json()
        .flatten_event(true)
        .with_current_span(false)
        .with_env_filter(filter)
        .with_writer(std::io::stdout)
        .try_init();
    if installed.is_err() {
        tracing::debug!("a log subscriber was already installed");
    }
}

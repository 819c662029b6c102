//! Log setup: `tracing` to stdout, as JSON lines or as text, with Pingora's `log` records
//! bridged in. `RUST_LOG` sets the filter, `info` by default.

use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// Installs the global subscriber. Later calls do nothing.
pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // The file watcher logs every event it receives at debug and trace. When stdout goes to a
    // file in the watched directory, each of those lines is itself an event, and the log
    // would feed itself without end, so its records stop at info whatever RUST_LOG sets.
    let filter = filter.add_directive("notify=info".parse().expect("a valid directive"));
    // Pingora logs whole request and response headers at debug and trace, keys and
    // credentials included, and keygate never logs those, so its records stop at info.
    let filter = [
        "pingora_core=info",
        "pingora_proxy=info",
        "pingora_pool=info",
    ]
    .into_iter()
    .fold(filter, |filter, directive| {
        filter.add_directive(directive.parse().expect("a valid directive"))
    });
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stdout);
    let installed = match format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .try_init(),
        LogFormat::Text => builder.try_init(),
    };
    if installed.is_err() {
        tracing::debug!("a log subscriber was already installed");
    }
}

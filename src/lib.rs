//! keygate: a reverse proxy that lets a request through only when its bearer key, its
//! client address and the campaign in its path agree with an access table.
//!
//! The decision (`table::decide`) is a pure function over an immutable `Table`. The
//! Pingora glue in `proxy` reads the request, calls it and writes the response.

#![forbid(unsafe_code)]

pub mod admin;
pub mod ca_file;
pub mod config;
pub mod frontend;
pub mod lifecycle;
pub mod logging;
pub mod metrics;
pub mod proxy;
pub mod rate_limit;
pub mod reload;
pub mod table;
pub mod upstream;

/// Returns the current time in Unix seconds, the unit of key expiry times.
pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_secs() as i64)
}

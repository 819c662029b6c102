//! keygate: a reverse proxy that lets a request through only when its bearer key, its
//! client address and the campaign in its path agree with an access table.
//!
//! The decision (`table::decide`) is a pure function over an immutable `Table`; the
//! Pingora glue in `proxy` reads the request, calls it and writes the answer.

#![forbid(unsafe_code)]

pub mod config;
pub mod logging;
pub mod proxy;
pub mod table;

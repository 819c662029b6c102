//! The upstream's addresses: resolved at start, resolved again in the background, and
//! handed out in turn so that requests spread over every address of a host name.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;

/// The current addresses of the upstream. Never empty.
#[derive(Debug)]
pub struct UpstreamAddresses {
    current: ArcSwap<Vec<SocketAddr>>,
    next: AtomicUsize,
}

impl UpstreamAddresses {
    /// Creates the set from a first, non-empty lookup.
    pub fn new(addresses: Vec<SocketAddr>) -> Arc<Self> {
        debug_assert!(!addresses.is_empty());
        Arc::new(Self {
            current: ArcSwap::from_pointee(addresses),
            next: AtomicUsize::new(0),
        })
    }

    /// Returns the next address in turn.
    pub fn pick(&self) -> SocketAddr {
        let addresses = self.current.load();
        let index = self.next.fetch_add(1, Ordering::Relaxed) % addresses.len();
        addresses[index]
    }

    /// Returns the addresses in use.
    pub fn all(&self) -> Arc<Vec<SocketAddr>> {
        self.current.load_full()
    }

    /// Replaces the addresses with a new lookup's; returns whether they changed.
    fn replace(&self, mut addresses: Vec<SocketAddr>) -> bool {
        addresses.sort_unstable();
        addresses.dedup();
        let changed = **self.current.load() != addresses;
        if changed {
            self.current.store(Arc::new(addresses));
        }
        changed
    }
}

/// Resolves `host:port`, with the addresses sorted and without duplicates.
pub fn resolve(host: &str, port: u16) -> std::io::Result<Vec<SocketAddr>> {
    use std::net::ToSocketAddrs;
    let mut addresses: Vec<SocketAddr> = (host, port).to_socket_addrs()?.collect();
    addresses.sort_unstable();
    addresses.dedup();
    Ok(addresses)
}

/// The background service that resolves a host name again at an interval. A failed or
/// empty lookup keeps the last good addresses.
pub struct Resolver {
    pub host: String,
    pub port: u16,
    pub interval: Duration,
    pub addresses: Arc<UpstreamAddresses>,
}

#[async_trait]
impl BackgroundService for Resolver {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut timer =
            tokio::time::interval_at(tokio::time::Instant::now() + self.interval, self.interval);
        timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.changed() => break,
                _ = timer.tick() => self.refresh().await,
            }
        }
    }
}

impl Resolver {
    async fn refresh(&self) {
        let lookup = tokio::net::lookup_host((self.host.as_str(), self.port)).await;
        match lookup.map(|found| found.collect::<Vec<_>>()) {
            Ok(found) if !found.is_empty() => {
                if self.addresses.replace(found) {
                    let addresses: Vec<String> = self
                        .addresses
                        .all()
                        .iter()
                        .map(ToString::to_string)
                        .collect();
                    tracing::info!(
                        upstream.host = %self.host,
                        upstream.addresses = %addresses.join(","),
                        "upstream addresses changed",
                    );
                }
            }
            Ok(_) => tracing::warn!(
                upstream.host = %self.host,
                "upstream lookup found no address; keeping the last good addresses",
            ),
            Err(error) => tracing::warn!(
                upstream.host = %self.host,
                error = %error,
                "upstream lookup failed; keeping the last good addresses",
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pick_takes_addresses_in_turn() {
        let first: SocketAddr = "127.0.0.1:9000".parse().unwrap();
        let second: SocketAddr = "[::1]:9000".parse().unwrap();
        let addresses = UpstreamAddresses::new(vec![first, second]);
        let picked: Vec<SocketAddr> = (0..4).map(|_| addresses.pick()).collect();
        assert_eq!(picked, vec![first, second, first, second]);
    }

    #[test]
    fn replace_reports_changes_only() {
        let first: SocketAddr = "127.0.0.1:9000".parse().unwrap();
        let second: SocketAddr = "127.0.0.2:9000".parse().unwrap();
        let addresses = UpstreamAddresses::new(vec![first]);
        assert!(!addresses.replace(vec![first, first]));
        assert!(addresses.replace(vec![second, first]));
        assert_eq!(*addresses.all(), vec![first, second]);
    }

    #[test]
    fn resolve_localhost_finds_loopback() {
        let found = resolve("localhost", 9000).unwrap();
        assert!(!found.is_empty());
        assert!(found.iter().all(|address| address.ip().is_loopback()));
    }
}

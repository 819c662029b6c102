//! Readiness and graceful shutdown.
//!
//! On SIGTERM keygate reports not ready at once and keeps accepting connections for the
//! drain delay, so that load balancers stop sending it traffic first. It then closes its
//! listeners, lets in-flight requests finish for up to the grace period, and exits 0 as
//! soon as none is left. SIGINT stops at once. SIGQUIT does what SIGTERM does, because
//! keygate does not offer Pingora's hand-over of listening sockets to a new process.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use pingora::server::{ShutdownSignal, ShutdownSignalWatch, ShutdownWatch};
use pingora::services::background::BackgroundService;
use tokio::signal::unix::{signal, SignalKind};

/// How often the shutdown watcher checks whether requests are still in flight.
const IDLE_POLL: Duration = Duration::from_millis(50);
/// How long no request may be in flight before the process exits early.
const IDLE_SETTLE: Duration = Duration::from_millis(200);

/// The process state that `/readyz` and the shutdown sequence share.
#[derive(Debug)]
pub struct Lifecycle {
    shutting_down: AtomicBool,
    in_flight: AtomicUsize,
    listening: AtomicBool,
    proxy_addresses: Vec<SocketAddr>,
}

/// The readiness of the process, as `/readyz` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Readiness {
    Ready,
    /// The proxy listener does not accept connections yet.
    Starting,
    ShuttingDown,
}

impl Lifecycle {
    /// Creates the state for a process that serves `proxy_addresses`. The table is
    /// always loaded by then, because keygate loads it before it opens any listener.
    pub fn new(proxy_addresses: Vec<SocketAddr>) -> Arc<Self> {
        Arc::new(Self {
            shutting_down: AtomicBool::new(false),
            in_flight: AtomicUsize::new(0),
            listening: AtomicBool::new(false),
            proxy_addresses,
        })
    }

    /// Returns the readiness, connecting to the proxy listeners until they first accept.
    pub async fn readiness(&self) -> Readiness {
        if self.shutting_down.load(Ordering::Relaxed) {
            return Readiness::ShuttingDown;
        }
        if !self.listening.load(Ordering::Relaxed) {
            for address in &self.proxy_addresses {
                let target = SocketAddr::new(reachable_ip(address.ip()), address.port());
                let connected = tokio::time::timeout(
                    Duration::from_millis(500),
                    tokio::net::TcpStream::connect(target),
                )
                .await;
                if !matches!(connected, Ok(Ok(_))) {
                    return Readiness::Starting;
                }
            }
            self.listening.store(true, Ordering::Relaxed);
        }
        Readiness::Ready
    }

    /// Marks a request as in flight until the returned guard is dropped.
    pub fn track_request(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(Arc::clone(self))
    }

    fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }
}

/// A request in flight; dropping it ends the request for the shutdown sequence.
#[derive(Debug)]
pub struct InFlight(Arc<Lifecycle>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Logs once the proxy listeners accept connections, which Pingora does not report.
pub struct ListenerCheck {
    pub lifecycle: Arc<Lifecycle>,
}

/// How long the listener check waits for the proxy listeners.
const LISTENER_CHECK_TIMEOUT: Duration = Duration::from_secs(30);

#[async_trait]
impl BackgroundService for ListenerCheck {
    async fn start(&self, _shutdown: ShutdownWatch) {
        let deadline = Instant::now() + LISTENER_CHECK_TIMEOUT;
        let addresses = || {
            let addresses = self
                .lifecycle
                .proxy_addresses
                .iter()
                .map(ToString::to_string);
            addresses.collect::<Vec<_>>().join(",")
        };
        while Instant::now() < deadline {
            match self.lifecycle.readiness().await {
                Readiness::Ready => {
                    tracing::info!(listen.addresses = %addresses(), "proxy listeners accept connections");
                    return;
                }
                Readiness::ShuttingDown => return,
                Readiness::Starting => tokio::time::sleep(IDLE_POLL).await,
            }
        }
        tracing::warn!(
            listen.addresses = %addresses(),
            "proxy listeners do not accept connections {} s after start",
            LISTENER_CHECK_TIMEOUT.as_secs(),
        );
    }
}

/// Returns the address to probe for a listener on `ip`: loopback for an unspecified one.
fn reachable_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(v4) if v4.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(v6) if v6.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        other => other,
    }
}

/// The shutdown sequence, in place of Pingora's own signal handling.
pub struct ShutdownSequence {
    pub lifecycle: Arc<Lifecycle>,
    pub drain_delay: Duration,
    pub grace_period: Duration,
}

#[async_trait]
impl ShutdownSignalWatch for ShutdownSequence {
    async fn recv(&self) -> ShutdownSignal {
        let (Ok(mut terminate), Ok(mut interrupt), Ok(mut quit)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
            signal(SignalKind::quit()),
        ) else {
            tracing::error!("failed to install signal handlers; stopping");
            return ShutdownSignal::FastShutdown;
        };
        tokio::select! {
            _ = terminate.recv() => {}
            _ = interrupt.recv() => {
                tracing::info!("SIGINT received; stopping at once");
                return ShutdownSignal::FastShutdown;
            }
            _ = quit.recv() => {}
        }
        self.lifecycle.shutting_down.store(true, Ordering::Relaxed);
        tracing::info!(
            drain_delay_seconds = self.drain_delay.as_secs_f64(),
            "shutdown signal received; /readyz reports 503 and new connections are accepted until the drain delay ends",
        );
        tokio::time::sleep(self.drain_delay).await;
        tracing::info!(
            grace_period_seconds = self.grace_period.as_secs_f64(),
            in_flight = self.lifecycle.in_flight(),
            "drain delay over; closing listeners and waiting for requests in flight",
        );
        let lifecycle = Arc::clone(&self.lifecycle);
        let grace_period = self.grace_period;
        std::thread::spawn(move || exit_when_idle(&lifecycle, grace_period));
        ShutdownSignal::GracefulTerminate
    }
}

/// Exits the process once no request has been in flight for `IDLE_SETTLE`. When the
/// grace period ends first, Pingora's own grace period ends the process instead.
fn exit_when_idle(lifecycle: &Lifecycle, grace_period: Duration) {
    let deadline = Instant::now() + grace_period;
    let mut idle_since: Option<Instant> = None;
    while Instant::now() < deadline {
        std::thread::sleep(IDLE_POLL);
        if lifecycle.in_flight() > 0 {
            idle_since = None;
            continue;
        }
        let since = *idle_since.get_or_insert_with(Instant::now);
        if since.elapsed() >= IDLE_SETTLE {
            tracing::info!("no request in flight; shutdown complete");
            std::process::exit(0);
        }
    }
    tracing::warn!(
        in_flight = lifecycle.in_flight(),
        "grace period over with requests still in flight; they are cut off",
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn readiness_follows_listener_and_shutdown() {
        // A port that was free a moment ago: nothing listens there yet.
        let address = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let lifecycle = Lifecycle::new(vec![address]);
        assert_eq!(lifecycle.readiness().await, Readiness::Starting);

        let _listener = std::net::TcpListener::bind(address).unwrap();
        assert_eq!(lifecycle.readiness().await, Readiness::Ready);

        lifecycle.shutting_down.store(true, Ordering::Relaxed);
        assert_eq!(lifecycle.readiness().await, Readiness::ShuttingDown);
    }

    #[test]
    fn in_flight_guard_counts_requests() {
        let lifecycle = Lifecycle::new(Vec::new());
        let first = lifecycle.track_request();
        let second = lifecycle.track_request();
        assert_eq!(lifecycle.in_flight(), 2);
        drop(first);
        drop(second);
        assert_eq!(lifecycle.in_flight(), 0);
    }

    #[test]
    fn unspecified_addresses_are_probed_on_loopback() {
        assert_eq!(
            reachable_ip("0.0.0.0".parse().unwrap()),
            IpAddr::V4(Ipv4Addr::LOCALHOST)
        );
        assert_eq!(
            reachable_ip("::".parse().unwrap()),
            IpAddr::V6(Ipv6Addr::LOCALHOST)
        );
        assert_eq!(
            reachable_ip("127.0.0.9".parse().unwrap()),
            "127.0.0.9".parse::<IpAddr>().unwrap()
        );
    }
}

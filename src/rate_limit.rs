//! Per-campaign rate limits, shared by the campaign's keys and kept per keygate instance.
//!
//! Each campaign's budget is a GCRA (generic cell rate algorithm) state: one theoretical
//! arrival time per campaign id. A limit of N requests per period lets a burst of N
//! through at once and then one request every period / N. The state is keyed by campaign
//! id, so it survives reloads. A reload that changes a campaign's limit starts that
//! campaign with a full budget under the new limit. A state whose arrival time has passed
//! is the same as none, so such states are dropped from time to time, those of removed
//! campaigns included.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::table::RateLimit;

/// The budgets of every campaign that has been limited.
#[derive(Debug, Default)]
pub struct RateLimiter {
    arrivals: Mutex<Arrivals>,
}

/// The limit in force and the theoretical arrival time of the next request, for each
/// campaign, and the size at which states in the past are dropped next.
#[derive(Debug, Default)]
struct Arrivals {
    by_campaign: HashMap<Box<str>, (RateLimit, Instant)>,
    prune_at: usize,
}

/// The smallest number of states at which those in the past are dropped.
const MIN_PRUNE_AT: usize = 1024;

impl RateLimiter {
    /// Takes one request from the campaign's budget, or returns how long to wait before
    /// the next request can pass.
    pub fn check(&self, campaign: &str, limit: RateLimit, now: Instant) -> Result<(), Duration> {
        let interval = limit.period / limit.requests.max(1);
        let burst = interval * (limit.requests.max(1) - 1);
        let mut arrivals = self.arrivals.lock().unwrap_or_else(|e| e.into_inner());
        let Arrivals {
            by_campaign,
            prune_at,
        } = &mut *arrivals;
        if by_campaign.len() >= (*prune_at).max(MIN_PRUNE_AT) {
            by_campaign.retain(|_, (_, arrival)| *arrival > now);
            *prune_at = by_campaign.len() * 2;
        }
        let arrival = match by_campaign.get(campaign) {
            Some(&(stored_limit, arrival)) if stored_limit == limit => arrival.max(now),
            _ => now,
        };
        let ahead = arrival - now;
        if ahead > burst {
            return Err(ahead - burst);
        }
        match by_campaign.get_mut(campaign) {
            Some(stored) => *stored = (limit, arrival + interval),
            None => {
                by_campaign.insert(campaign.into(), (limit, arrival + interval));
            }
        }
        Ok(())
    }
}

/// Returns the `Retry-After` value for a wait: whole seconds, rounded up, at least 1.
pub fn retry_after_seconds(wait: Duration) -> u64 {
    let seconds = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    seconds.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    const FIVE_PER_MINUTE: RateLimit = RateLimit {
        requests: 5,
        period: Duration::from_secs(60),
    };

    #[test]
    fn burst_of_the_limit_passes_then_waits() {
        let limiter = RateLimiter::default();
        let now = Instant::now();
        for request in 0..5 {
            assert_eq!(
                limiter.check("a", FIVE_PER_MINUTE, now),
                Ok(()),
                "request {request}"
            );
        }
        assert_eq!(
            limiter.check("a", FIVE_PER_MINUTE, now),
            Err(Duration::from_secs(12))
        );
        assert_eq!(
            limiter.check("a", FIVE_PER_MINUTE, now + Duration::from_secs(12)),
            Ok(())
        );
        assert!(limiter
            .check("a", FIVE_PER_MINUTE, now + Duration::from_secs(12))
            .is_err());
    }

    #[test]
    fn campaigns_do_not_share_a_budget() {
        let limiter = RateLimiter::default();
        let now = Instant::now();
        for _ in 0..5 {
            limiter.check("a", FIVE_PER_MINUTE, now).unwrap();
        }
        assert!(limiter.check("a", FIVE_PER_MINUTE, now).is_err());
        assert_eq!(limiter.check("b", FIVE_PER_MINUTE, now), Ok(()));
    }

    #[test]
    fn budget_refills_over_time() {
        let limiter = RateLimiter::default();
        let ten_per_second = RateLimit::new(10, Duration::from_secs(1));
        let now = Instant::now();
        for _ in 0..10 {
            limiter.check("a", ten_per_second, now).unwrap();
        }
        assert!(limiter.check("a", ten_per_second, now).is_err());
        let later = now + Duration::from_secs(1);
        for _ in 0..10 {
            assert_eq!(limiter.check("a", ten_per_second, later), Ok(()));
        }
    }

    #[test]
    fn changed_limit_starts_a_full_budget() {
        let limiter = RateLimiter::default();
        let now = Instant::now();
        for _ in 0..5 {
            limiter.check("a", FIVE_PER_MINUTE, now).unwrap();
        }
        assert!(limiter.check("a", FIVE_PER_MINUTE, now).is_err());
        let two_per_minute = RateLimit::new(2, Duration::from_secs(60));
        assert_eq!(limiter.check("a", two_per_minute, now), Ok(()));
        assert_eq!(limiter.check("a", two_per_minute, now), Ok(()));
        assert!(limiter.check("a", two_per_minute, now).is_err());
    }

    #[test]
    fn retry_after_rounds_up_to_whole_seconds() {
        assert_eq!(retry_after_seconds(Duration::from_millis(1)), 1);
        assert_eq!(retry_after_seconds(Duration::from_millis(1000)), 1);
        assert_eq!(retry_after_seconds(Duration::from_millis(1001)), 2);
        assert_eq!(retry_after_seconds(Duration::ZERO), 1);
    }

    #[test]
    fn states_in_the_past_are_dropped() {
        let limiter = RateLimiter::default();
        let start = Instant::now();
        for campaign in 0..MIN_PRUNE_AT {
            let id = format!("removed_{campaign}");
            assert_eq!(limiter.check(&id, FIVE_PER_MINUTE, start), Ok(()));
        }
        let later = start + Duration::from_secs(60);
        assert_eq!(limiter.check("kept", FIVE_PER_MINUTE, later), Ok(()));
        let arrivals = limiter.arrivals.lock().unwrap();
        assert_eq!(arrivals.by_campaign.len(), 1);
        assert!(arrivals.by_campaign.contains_key("kept"));
    }
}

//! A set of IP networks stored as sorted, merged address ranges.
//!
//! Lookups are a binary search, so one set can hold every allowlist entry of a large table.
//! IPv4 and IPv6 ranges are kept apart; callers turn IPv4-mapped IPv6 peers into IPv4 first.

use std::net::IpAddr;
use std::sync::Arc;

use ipnet::IpNet;

/// An immutable set of IPv4 and IPv6 networks. A clone shares the ranges.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IpSet {
    v4: Arc<[(u32, u32)]>,
    v6: Arc<[(u128, u128)]>,
}

impl IpSet {
    /// Builds a set from networks in any order; overlapping and adjacent networks are merged.
    pub fn from_networks<'a>(networks: impl IntoIterator<Item = &'a IpNet>) -> Self {
        let mut v4 = Vec::new();
        let mut v6 = Vec::new();
        for network in networks {
            match network {
                IpNet::V4(net) => v4.push((u32::from(net.network()), u32::from(net.broadcast()))),
                IpNet::V6(net) => v6.push((u128::from(net.network()), u128::from(net.broadcast()))),
            }
        }
        Self {
            v4: merge(v4).into(),
            v6: merge(v6).into(),
        }
    }

    /// Returns whether `ip` lies in one of the networks. An IPv4-mapped IPv6 address is
    /// looked up as IPv6, so normalise it with `IpAddr::to_canonical` before calling.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match ip {
            IpAddr::V4(ip) => contains(&self.v4, u32::from(ip)),
            IpAddr::V6(ip) => contains(&self.v6, u128::from(ip)),
        }
    }

    /// Returns whether the set contains no network at all.
    pub fn is_empty(&self) -> bool {
        self.v4.is_empty() && self.v6.is_empty()
    }

    /// Returns the number of merged ranges, a measure of the set's size.
    pub fn range_count(&self) -> usize {
        self.v4.len() + self.v6.len()
    }
}

/// A large set of networks, such as the union of every allowlist of a table. A lookup
/// first searches every `STRIDE`th range start, few enough to stay in cache, and then the
/// starts of one stride, so it touches few cache lines.
#[derive(Debug, Default)]
pub struct IndexedIpSet {
    v4: Index<u32>,
    v6: Index<u128>,
}

impl IndexedIpSet {
    /// Builds the union of several sets.
    pub fn union<'a>(sets: impl Iterator<Item = &'a IpSet> + Clone) -> Self {
        let v4 = sets.clone().flat_map(|set| set.v4.iter().copied());
        let v6 = sets.flat_map(|set| set.v6.iter().copied());
        Self {
            v4: Index::new(merge(v4.collect())),
            v6: Index::new(merge(v6.collect())),
        }
    }

    /// Returns whether `ip` lies in one of the networks; see `IpSet::contains`.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match ip {
            IpAddr::V4(ip) => self.v4.contains(u32::from(ip)),
            IpAddr::V6(ip) => self.v6.contains(u128::from(ip)),
        }
    }

    /// Returns the number of merged ranges.
    pub fn range_count(&self) -> usize {
        self.v4.starts.len() + self.v6.starts.len()
    }
}

/// The number of range starts between two samples of an `Index`: 64 IPv4 starts fill
/// four cache lines.
const STRIDE: usize = 64;

/// Sorted, disjoint ranges with their starts and ends apart, and every `STRIDE`th start.
#[derive(Debug, Default)]
struct Index<T> {
    starts: Box<[T]>,
    ends: Box<[T]>,
    samples: Box<[T]>,
}

impl<T: Ord + Copy> Index<T> {
    fn new(ranges: Vec<(T, T)>) -> Self {
        let starts: Box<[T]> = ranges.iter().map(|&(start, _)| start).collect();
        let samples = starts.iter().step_by(STRIDE).copied().collect();
        Self {
            samples,
            ends: ranges.iter().map(|&(_, end)| end).collect(),
            starts,
        }
    }

    fn contains(&self, ip: T) -> bool {
        // The last sample at or below `ip` starts the only stride that can contain it.
        let stride = self.samples.partition_point(|&sample| sample <= ip);
        if stride == 0 {
            return false;
        }
        let first = (stride - 1) * STRIDE;
        let starts = &self.starts[first..self.starts.len().min(first + STRIDE)];
        // At least one: the stride's first start is its sample, at or below `ip`.
        let at_or_below = starts.partition_point(|&start| start <= ip);
        self.ends[first + at_or_below - 1] >= ip
    }
}

fn merge<T: Ord + Copy + num_step::Step>(mut ranges: Vec<(T, T)>) -> Vec<(T, T)> {
    ranges.sort_unstable();
    let mut merged: Vec<(T, T)> = Vec::with_capacity(ranges.len());
    for (start, end) in ranges {
        match merged.last_mut() {
            Some(last) if last.1 >= start || last.1.next() == Some(start) => {
                if end > last.1 {
                    last.1 = end;
                }
            }
            _ => merged.push((start, end)),
        }
    }
    merged
}

fn contains<T: Ord + Copy>(ranges: &[(T, T)], ip: T) -> bool {
    // The first range that starts after `ip`; the range before it is the only candidate.
    let after = ranges.partition_point(|&(start, _)| start <= ip);
    after > 0 && ranges[after - 1].1 >= ip
}

mod num_step {
    /// The successor of an address, used to merge adjacent ranges.
    pub trait Step: Sized {
        fn next(self) -> Option<Self>;
    }

    impl Step for u32 {
        fn next(self) -> Option<Self> {
            self.checked_add(1)
        }
    }

    impl Step for u128 {
        fn next(self) -> Option<Self> {
            self.checked_add(1)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(entries: &[&str]) -> IpSet {
        let networks: Vec<IpNet> = entries.iter().map(|e| e.parse().unwrap()).collect();
        IpSet::from_networks(&networks)
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn contains_single_address_and_network() {
        let set = set(&["203.0.113.7/32", "198.51.100.0/24", "2001:db8:7::/48"]);
        assert!(set.contains(ip("203.0.113.7")));
        assert!(!set.contains(ip("203.0.113.8")));
        assert!(set.contains(ip("198.51.100.0")));
        assert!(set.contains(ip("198.51.100.255")));
        assert!(!set.contains(ip("198.51.101.0")));
        assert!(set.contains(ip("2001:db8:7:ffff::1")));
        assert!(!set.contains(ip("2001:db8:8::1")));
    }

    #[test]
    fn merges_overlapping_and_adjacent_ranges() {
        let set = set(&["192.0.2.0/25", "192.0.2.128/25", "192.0.2.64/26"]);
        assert_eq!(set.range_count(), 1);
        assert!(set.contains(ip("192.0.2.200")));
    }

    #[test]
    fn families_do_not_mix() {
        let set = set(&["0.0.0.0/0"]);
        assert!(set.contains(ip("255.255.255.255")));
        assert!(!set.contains(ip("::1")));
        assert!(!set.contains(ip("::ffff:192.0.2.1")));
    }

    #[test]
    fn union_merges_sets() {
        let sets = [set(&["192.0.2.0/25"]), set(&["192.0.2.128/25", "::1/128"])];
        let union = IndexedIpSet::union(sets.iter());
        assert_eq!(union.range_count(), 2);
        assert!(union.contains(ip("192.0.2.255")));
        assert!(union.contains(ip("::1")));
        assert!(!union.contains(ip("192.0.3.0")));
        assert!(!IndexedIpSet::default().contains(ip("192.0.2.1")));
    }

    #[test]
    fn indexed_union_agrees_with_a_plain_search() {
        // Single addresses two apart, so that none merge: several strides of ranges.
        let networks: Vec<String> = (0..1000u32)
            .map(|n| format!("{}/32", std::net::Ipv4Addr::from(0x0a00_0000 + n * 2)))
            .collect();
        let networks: Vec<&str> = networks.iter().map(String::as_str).collect();
        let set = set(&networks);
        let union = IndexedIpSet::union(std::iter::once(&set));
        assert_eq!(union.range_count(), 1000);
        for offset in 0..2100u32 {
            let probe = IpAddr::V4(std::net::Ipv4Addr::from(0x0a00_0000 - 50 + offset));
            assert_eq!(union.contains(probe), set.contains(probe), "{probe}");
        }
    }

    #[test]
    fn empty_set_contains_nothing() {
        let set = IpSet::default();
        assert!(set.is_empty());
        assert!(!set.contains(ip("127.0.0.1")));
    }
}

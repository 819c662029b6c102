//! The immutable table that every decision reads: campaigns, their allowlists, key
//! digests and routes. The config module builds a table once, and it is then shared
//! read-only through an `ArcSwap`. A reload builds a new table and swaps it in whole.

mod client_ip;
mod decide;
mod diff;
mod ipset;
pub mod key;
pub mod path;

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::sync::Arc;

pub use client_ip::client_ip;
pub use decide::{
    decide, key_format_problem, presented_key, Authorization, Decision, Denial, Grant, RequestFacts,
};
pub use diff::{NameList, TableDiff};
pub use ipset::{IndexedIpSet, IpSet};
pub use key::{Environment, KeyHash};
pub use path::Route;

use key::BuildDigestHasher;

/// The maximum number of keys per campaign: enough to rotate a key with no downtime.
pub const MAX_KEYS_PER_CAMPAIGN: usize = 3;

/// A validated campaign. A clone shares the id, networks and keys.
#[derive(Debug, Clone)]
pub struct Campaign {
    pub id: Arc<str>,
    pub networks: IpSet,
    pub keys: Arc<[KeyInfo]>,
    /// The campaign's own limit, or the file's default; `None` for no limit.
    pub rate_limit: Option<RateLimit>,
}

/// A request rate limit: `requests` per `period`, shared by a campaign's keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    pub requests: u32,
    pub period: std::time::Duration,
}

impl RateLimit {
    pub fn new(requests: u32, period: std::time::Duration) -> Self {
        Self { requests, period }
    }
}

/// The stored facts of a key: its id, digest and expiry, never the key itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyInfo {
    pub id: Box<str>,
    pub hash: KeyHash,
    /// Unix time in seconds after which the key is rejected.
    pub expires_at: Option<i64>,
}

/// The position of a key: its campaign's index in the table and its index in the campaign.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeySlot {
    pub campaign: u32,
    pub key: u8,
}

/// A key in the table's index: its position, when it expires, and what a decision needs
/// of its campaign. Shared copies of the campaign's id and networks sit in the entry so
/// that an allowed decision reaches them without first loading the campaign.
#[derive(Debug, Clone)]
struct KeyEntry {
    slot: KeySlot,
    /// Unix time in seconds after which the key is rejected; `i64::MAX` for never.
    expires_at: i64,
    campaign_id: Arc<str>,
    networks: IpSet,
}

/// The access table: everything a decision needs, and nothing that changes while it is
/// in use.
#[derive(Debug)]
pub struct Table {
    environment: Environment,
    routes: Vec<Route>,
    campaigns: Vec<Campaign>,
    keys: HashMap<KeyHash, KeyEntry, BuildDigestHasher>,
    /// Every network of every campaign, for the first allowlist check.
    callers: IndexedIpSet,
    /// Peers whose `X-Forwarded-For` names the client.
    trusted_proxies: IpSet,
}

impl Table {
    /// Builds a table from parts that the config module has already validated.
    ///
    /// INVARIANT: campaign ids and key digests are unique, and no campaign has more
    /// than `MAX_KEYS_PER_CAMPAIGN` keys.
    pub fn new(environment: Environment, routes: Vec<Route>, campaigns: Vec<Campaign>) -> Self {
        let table = Self::build(environment, routes, campaigns, |campaigns| {
            let mut keys = KeyIndex::with_capacity(campaigns);
            for (index, campaign) in campaigns.iter().enumerate() {
                debug_assert!(campaign.keys.len() <= MAX_KEYS_PER_CAMPAIGN);
                for key in 0..campaign.keys.len() {
                    let added = keys.insert(campaigns, index, key);
                    debug_assert!(added.is_ok(), "duplicate key digest");
                }
            }
            Some(keys)
        });
        table.expect("the key index is always built")
    }

    /// Builds a table whose keys `index_keys` indexes, or returns `None` when it returns
    /// `None`. For a large table the union of all allowlists is built on a second thread
    /// meanwhile; both only read the campaigns.
    pub fn build(
        environment: Environment,
        routes: Vec<Route>,
        campaigns: Vec<Campaign>,
        index_keys: impl FnOnce(&[Campaign]) -> Option<KeyIndex>,
    ) -> Option<Self> {
        let union = || IndexedIpSet::union(campaigns.iter().map(|c| &c.networks));
        let (keys, callers) = std::thread::scope(|scope| {
            let builder = (campaigns.len() >= PARALLEL_BUILD_CAMPAIGNS).then(|| scope.spawn(union));
            let keys = index_keys(&campaigns);
            let callers = match builder {
                Some(builder) => builder
                    .join()
                    .unwrap_or_else(|panic| std::panic::resume_unwind(panic)),
                None if keys.is_some() => union(),
                None => IndexedIpSet::default(),
            };
            (keys, callers)
        });
        Some(Self {
            environment,
            routes,
            campaigns,
            keys: keys?.entries,
            callers,
            trusted_proxies: IpSet::default(),
        })
    }

    /// Sets the proxies whose `X-Forwarded-For` header names the client.
    pub fn with_trusted_proxies(mut self, trusted_proxies: IpSet) -> Self {
        self.trusted_proxies = trusted_proxies;
        self
    }

    pub fn trusted_proxies(&self) -> &IpSet {
        &self.trusted_proxies
    }

    pub fn environment(&self) -> Environment {
        self.environment
    }

    pub fn routes(&self) -> &[Route] {
        &self.routes
    }

    pub fn campaigns(&self) -> &[Campaign] {
        &self.campaigns
    }

    /// Returns the campaign at `index`, as found in a `KeySlot` or `Grant`.
    pub fn campaign(&self, index: u32) -> &Campaign {
        &self.campaigns[index as usize]
    }

    /// Returns the number of keys across all campaigns.
    pub fn key_count(&self) -> usize {
        self.keys.len()
    }

    /// Finds a key's index entry by its digest.
    fn find_key(&self, hash: &KeyHash) -> Option<&KeyEntry> {
        self.keys.get(hash)
    }
}

/// The campaigns of a table in force, by id. A new table takes from them each part of a
/// campaign that did not change, so that a reload needs new memory only for what changed.
pub struct SharedCampaigns<'t> {
    by_id: HashMap<&'t str, &'t Campaign>,
}

impl<'t> SharedCampaigns<'t> {
    pub fn new(table: &'t Table) -> Self {
        let by_id = table.campaigns.iter().map(|c| (&*c.id, c)).collect();
        Self { by_id }
    }

    /// Replaces each part of `campaign` that equals the same part of the table's campaign
    /// with the same id by that part.
    pub fn share(&self, campaign: &mut Campaign) {
        let Some(&current) = self.by_id.get(&*campaign.id) else {
            return;
        };
        campaign.id = Arc::clone(&current.id);
        if campaign.networks == current.networks {
            campaign.networks = current.networks.clone();
        }
        if campaign.keys == current.keys {
            campaign.keys = Arc::clone(&current.keys);
        }
    }
}

/// Campaigns from which `Table::build` builds the address union on a second thread.
const PARALLEL_BUILD_CAMPAIGNS: usize = 10_000;

/// The keys of a table by digest, for `Table::build`.
pub struct KeyIndex {
    entries: HashMap<KeyHash, KeyEntry, BuildDigestHasher>,
}

impl KeyIndex {
    /// Creates an index with room for every key of `campaigns`.
    pub fn with_capacity(campaigns: &[Campaign]) -> Self {
        let keys = campaigns.iter().map(|c| c.keys.len()).sum();
        Self {
            entries: HashMap::with_capacity_and_hasher(keys, BuildDigestHasher::default()),
        }
    }

    /// Adds key `key` of the campaign at `campaign` in `campaigns`. When another key has
    /// the same digest, that key stays and its position is returned.
    pub fn insert(
        &mut self,
        campaigns: &[Campaign],
        campaign: usize,
        key: usize,
    ) -> Result<(), KeySlot> {
        let owner = &campaigns[campaign];
        let info = &owner.keys[key];
        match self.entries.entry(info.hash) {
            Entry::Occupied(existing) => Err(existing.get().slot),
            Entry::Vacant(vacant) => {
                vacant.insert(KeyEntry {
                    slot: KeySlot {
                        campaign: u32::try_from(campaign).expect("fewer than 2^32 campaigns"),
                        key: u8::try_from(key).expect("at most 3 keys per campaign"),
                    },
                    expires_at: info.expires_at.unwrap_or(i64::MAX),
                    campaign_id: Arc::clone(&owner.id),
                    networks: owner.networks.clone(),
                });
                Ok(())
            }
        }
    }
}

//! The changes between two tables, for the log line of a reload.

use std::collections::HashMap;
use std::fmt;

use super::{Campaign, Table};

/// The campaigns and keys that differ between two tables. Keys are named
/// `campaign/key`; a key whose hash or expiry changed counts as removed and added.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct TableDiff {
    pub campaigns_added: Vec<String>,
    pub campaigns_removed: Vec<String>,
    pub campaigns_changed: Vec<String>,
    pub keys_added: Vec<String>,
    pub keys_removed: Vec<String>,
    pub trusted_proxies_changed: bool,
}

impl TableDiff {
    /// Compares the table in force with its replacement.
    pub fn between(old: &Table, new: &Table) -> Self {
        let old_by_id: HashMap<&str, &Campaign> =
            old.campaigns().iter().map(|c| (&*c.id, c)).collect();
        let new_ids: HashMap<&str, &Campaign> =
            new.campaigns().iter().map(|c| (&*c.id, c)).collect();
        let mut diff = Self {
            trusted_proxies_changed: old.trusted_proxies() != new.trusted_proxies(),
            ..Self::default()
        };
        for campaign in new.campaigns() {
            match old_by_id.get(&*campaign.id) {
                None => {
                    diff.campaigns_added.push(campaign.id.to_string());
                    diff.add_keys(campaign, None);
                }
                Some(previous)
                    if previous.networks != campaign.networks
                        || previous.keys != campaign.keys
                        || previous.rate_limit != campaign.rate_limit =>
                {
                    diff.campaigns_changed.push(campaign.id.to_string());
                    diff.add_keys(campaign, Some(previous));
                }
                Some(_) => {}
            }
        }
        for campaign in old.campaigns() {
            if !new_ids.contains_key(&*campaign.id) {
                diff.campaigns_removed.push(campaign.id.to_string());
                for key in campaign.keys.iter() {
                    diff.keys_removed
                        .push(format!("{}/{}", campaign.id, key.id));
                }
            }
        }
        diff
    }

    fn add_keys(&mut self, campaign: &Campaign, previous: Option<&Campaign>) {
        let before = previous.map_or(&[][..], |p| &p.keys[..]);
        for key in campaign.keys.iter() {
            if !before.contains(key) {
                self.keys_added.push(format!("{}/{}", campaign.id, key.id));
            }
        }
        for key in before {
            if !campaign.keys.contains(key) {
                self.keys_removed
                    .push(format!("{}/{}", campaign.id, key.id));
            }
        }
    }

    /// Returns whether the tables grant the same access.
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

/// Lists at most this many names per kind of change in a log line.
const MAX_NAMES: usize = 20;

/// Formats a list of names, shortened to `MAX_NAMES`.
pub struct NameList<'a>(pub &'a [String]);

impl fmt::Display for NameList<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let shown = &self.0[..self.0.len().min(MAX_NAMES)];
        write!(f, "{}", shown.join(","))?;
        if self.0.len() > MAX_NAMES {
            write!(f, " and {} more", self.0.len() - MAX_NAMES)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::table::{Environment, IpSet, KeyHash, KeyInfo, Route};

    fn campaign(id: &str, network: &str, keys: &[(&str, &str)]) -> Campaign {
        let network: ipnet::IpNet = network.parse().unwrap();
        Campaign {
            id: id.into(),
            networks: IpSet::from_networks([&network]),
            keys: keys
                .iter()
                .map(|&(id, key)| KeyInfo {
                    id: id.into(),
                    hash: KeyHash::of(key.as_bytes()),
                    expires_at: None,
                })
                .collect(),
            rate_limit: None,
        }
    }

    fn table(campaigns: Vec<Campaign>) -> Table {
        Table::new(
            Environment::Test,
            vec![Route::parse("/{campaign}").unwrap()],
            campaigns,
        )
    }

    #[test]
    fn diff_names_campaigns_and_keys() {
        let old = table(vec![
            campaign("same", "192.0.2.1/32", &[("k", "1")]),
            campaign("rotated", "192.0.2.2/32", &[("old", "2")]),
            campaign("moved", "192.0.2.3/32", &[("k", "3")]),
            campaign("gone", "192.0.2.4/32", &[("k", "4")]),
        ]);
        let new = table(vec![
            campaign("same", "192.0.2.1/32", &[("k", "1")]),
            campaign("rotated", "192.0.2.2/32", &[("old", "2"), ("new", "5")]),
            campaign("moved", "198.51.100.3/32", &[("k", "3")]),
            campaign("fresh", "192.0.2.6/32", &[("k", "6")]),
        ]);
        let diff = TableDiff::between(&old, &new);
        assert_eq!(diff.campaigns_added, vec!["fresh"]);
        assert_eq!(diff.campaigns_removed, vec!["gone"]);
        assert_eq!(diff.campaigns_changed, vec!["rotated", "moved"]);
        assert_eq!(diff.keys_added, vec!["rotated/new", "fresh/k"]);
        assert_eq!(diff.keys_removed, vec!["gone/k"]);
        assert!(TableDiff::between(&new, &new).is_empty());
    }

    #[test]
    fn name_list_is_shortened() {
        let names: Vec<String> = (0..25).map(|n| n.to_string()).collect();
        let text = NameList(&names).to_string();
        assert!(text.ends_with("19 and 5 more"), "{text}");
        assert_eq!(NameList(&[]).to_string(), "");
    }
}

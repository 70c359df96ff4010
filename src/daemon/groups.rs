//! The daemon's cache of the proids' groups: each group as last read or
//! written, found by DN and by proid, and which groups must be read again
//! before they are planned.
//!
//! Batches plan from this cache instead of reading every group; a full
//! sync replaces it whole ([`GroupCache::reset`], the one reset), so
//! nothing a full sync did not see survives it.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use crate::directory::Group;
use crate::model::{Dn, GroupPattern};
use crate::plan::GroupChange;

/// The groups as last read or written.
#[derive(Debug)]
pub struct GroupCache {
    pattern: GroupPattern,
    /// Groups by DN.
    groups: BTreeMap<Dn, Group>,
    /// Group DNs by proid key.
    by_proid: HashMap<String, Vec<Dn>>,
    /// Groups to re-read before they are planned again.
    stale: BTreeSet<Dn>,
}

impl GroupCache {
    /// An empty cache; groups belong to the proid `pattern` names.
    pub fn new(pattern: GroupPattern) -> Self {
        GroupCache {
            pattern,
            groups: BTreeMap::new(),
            by_proid: HashMap::new(),
            stale: BTreeSet::new(),
        }
    }

    /// Replaces everything with the groups a full sync read: nothing is
    /// stale any more.
    pub fn reset(&mut self, groups: Vec<Group>) {
        self.groups.clear();
        self.by_proid.clear();
        self.stale.clear();
        for group in groups {
            self.insert(group);
        }
    }

    /// Adds or replaces one group as read.
    pub fn insert(&mut self, group: Group) {
        self.forget(&group.dn);
        self.stale.remove(&group.dn);
        if let Some(proid) = self.pattern.proid_of(&group.sam_account_name) {
            let dns = self.by_proid.entry(proid.key()).or_default();
            if !dns.contains(&group.dn) {
                dns.push(group.dn.clone());
            }
        }
        self.groups.insert(group.dn.clone(), group);
    }

    /// Drops a group that vanished.
    pub fn forget(&mut self, dn: &Dn) {
        self.stale.remove(dn);
        if let Some(group) = self.groups.remove(dn) {
            if let Some(proid) = self.pattern.proid_of(&group.sam_account_name) {
                if let Some(dns) = self.by_proid.get_mut(&proid.key()) {
                    dns.retain(|d| d != dn);
                }
            }
        }
    }

    /// The DNs of a proid's groups (by proid key); empty when it has none.
    pub fn dns_of(&self, key: &str) -> &[Dn] {
        self.by_proid.get(key).map_or(&[], Vec::as_slice)
    }

    /// The groups of these proid keys, for planning.
    pub fn groups_of<'a>(&self, keys: impl IntoIterator<Item = &'a String>) -> Vec<&Group> {
        keys.into_iter()
            .flat_map(|k| self.dns_of(k))
            .filter_map(|dn| self.groups.get(dn))
            .collect()
    }

    /// The cache may be wrong about this group: read it before planning it.
    pub fn mark_stale(&mut self, dn: Dn) {
        self.stale.insert(dn);
    }

    /// Every group of a proid key is to be read again.
    pub fn mark_proid_stale(&mut self, key: &str) {
        let dns: Vec<Dn> = self.dns_of(key).to_vec();
        self.stale.extend(dns);
    }

    /// The groups of a proid key that must be read before planning.
    pub fn stale_of(&self, key: &str) -> Vec<Dn> {
        self.dns_of(key)
            .iter()
            .filter(|dn| self.stale.contains(*dn))
            .cloned()
            .collect()
    }

    /// The groups marked stale, in DN order.
    #[cfg(test)]
    pub fn stale(&self) -> Vec<&Dn> {
        self.stale.iter().collect()
    }

    /// Whether `read` differs from what the cache knew of it (a group it
    /// does not know, or one whose cached members are in doubt, is not).
    pub fn drifted(&self, read: &Group) -> bool {
        !self.stale.contains(&read.dn)
            && self
                .groups
                .get(&read.dn)
                .is_some_and(|known| known.members != read.members)
    }

    /// Records what a write applied, so the next plan starts from it.
    pub fn applied(&mut self, change: &GroupChange) {
        if let Some(group) = self.groups.get_mut(&change.group_dn) {
            group.members.extend(change.add.iter().cloned());
            for gone in &change.delete {
                group.members.remove(gone);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Proid;

    fn dn(s: &str) -> Dn {
        Dn::parse(s).expect("dn")
    }

    fn group(name: &str, members: &[&str]) -> Group {
        Group {
            dn: dn(&format!("CN={name},OU=Groups,DC=x")),
            sam_account_name: name.to_owned(),
            members: members.iter().map(|m| dn(m)).collect(),
        }
    }

    fn cache() -> GroupCache {
        GroupCache::new(GroupPattern::parse("{}-gmsa-hosts").expect("pattern"))
    }

    #[test]
    fn groups_are_found_by_proid_and_a_reset_forgets_what_it_did_not_read() {
        let mut c = cache();
        c.insert(group("web-gmsa-hosts", &["CN=h1,DC=x"]));
        c.insert(group("db-gmsa-hosts", &[]));
        c.mark_proid_stale("web");
        assert_eq!(c.stale_of("web").len(), 1);
        assert_eq!(c.groups_of(&["web".to_owned()]).len(), 1);

        c.reset(vec![group("db-gmsa-hosts", &[])]);
        assert!(c.dns_of("web").is_empty(), "not read by the full sync");
        assert!(c.stale_of("web").is_empty() && c.stale().is_empty());
        assert_eq!(c.dns_of("db").len(), 1);
    }

    #[test]
    fn an_applied_change_updates_the_members_and_a_reread_clears_stale() {
        let mut c = cache();
        let web = group("web-gmsa-hosts", &["CN=old,DC=x"]);
        c.insert(web.clone());
        c.applied(&GroupChange {
            group_dn: web.dn.clone(),
            proid: Proid::new("web").expect("proid"),
            add: [dn("CN=new,DC=x")].into(),
            delete: [dn("CN=old,DC=x")].into(),
        });
        let now = c.groups_of(&["web".to_owned()]);
        assert_eq!(now[0].members, [dn("CN=new,DC=x")].into());
        c.mark_stale(web.dn.clone());
        c.insert(web.clone());
        assert!(c.stale_of("web").is_empty(), "read again: fresh");
        c.forget(&web.dn);
        assert!(c.dns_of("web").is_empty());
    }
}

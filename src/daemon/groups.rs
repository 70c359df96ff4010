//! The daemon's cache of the proids' groups: each group as last read or
//! written, found by DN and by proid, and which groups must be read again
//! before they are planned.
//!
//! Batches plan from this cache instead of reading every group; a full
//! sync replaces it whole ([`GroupCache::reset`], the one reset), so
//! nothing a full sync did not see survives it. While a full sync reads
//! every group, batches go on writing: the groups they write or read again
//! meanwhile are noted, and the reset keeps what the cache knows of those,
//! which is newer than what the read saw.

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
    /// While every group is read: the groups written, read again or
    /// dropped since the read began.
    since_read: Option<BTreeSet<Dn>>,
}

/// What the cache knew before a reset, of the groups the reset took from
/// the read: what drift is judged against.
#[derive(Debug)]
pub struct Replaced {
    groups: BTreeMap<Dn, Group>,
    stale: BTreeSet<Dn>,
}

impl Replaced {
    /// Whether the group as the reset took it differs from what the cache
    /// knew of it (a group it did not know, or one whose cached members
    /// were in doubt, is not).
    pub fn drifted(&self, read: &Group) -> bool {
        !self.stale.contains(&read.dn)
            && self
                .groups
                .get(&read.dn)
                .is_some_and(|known| known.members != read.members)
    }
}

impl GroupCache {
    /// An empty cache; groups belong to the proid `pattern` names.
    pub fn new(pattern: GroupPattern) -> Self {
        GroupCache {
            pattern,
            groups: BTreeMap::new(),
            by_proid: HashMap::new(),
            stale: BTreeSet::new(),
            since_read: None,
        }
    }

    /// A read of every group begins: from now on the groups written, read
    /// again or dropped are noted until the reset.
    pub fn begin_read(&mut self) {
        self.since_read = Some(BTreeSet::new());
    }

    /// The read of every group was given up.
    pub fn abandon_read(&mut self) {
        self.since_read = None;
    }

    /// Whether the cache knows `dn` better than the read of every group
    /// under way: it was written, read again or dropped since it began.
    pub fn newer_than_read(&self, dn: &Dn) -> bool {
        self.since_read.as_ref().is_some_and(|s| s.contains(dn))
    }

    fn note(&mut self, dn: &Dn) {
        if let Some(since) = &mut self.since_read {
            since.insert(dn.clone());
        }
    }

    /// Replaces everything with the groups a full sync read, except the
    /// groups noted since the read began: what the cache knows of those
    /// (members, whether they are in doubt, whether they exist) is newer,
    /// and is kept. Nothing else is stale any more. Returns what the cache
    /// knew of the groups taken from the read.
    pub fn reset(&mut self, groups: Vec<Group>) -> Replaced {
        let newer = self.since_read.take().unwrap_or_default();
        let kept: Vec<Group> = newer
            .iter()
            .filter_map(|dn| self.groups.remove(dn))
            .collect();
        let still_stale: Vec<Dn> = kept
            .iter()
            .filter(|g| self.stale.contains(&g.dn))
            .map(|g| g.dn.clone())
            .collect();
        let replaced = Replaced {
            groups: std::mem::take(&mut self.groups),
            stale: std::mem::take(&mut self.stale),
        };
        self.by_proid.clear();
        for group in groups.into_iter().filter(|g| !newer.contains(&g.dn)) {
            self.insert(group);
        }
        for group in kept {
            self.insert(group);
        }
        self.stale.extend(still_stale);
        replaced
    }

    /// Every group, in DN order.
    pub fn all(&self) -> impl Iterator<Item = &Group> {
        self.groups.values()
    }

    /// The group `dn`, if the cache has it.
    pub fn get(&self, dn: &Dn) -> Option<&Group> {
        self.groups.get(dn)
    }

    /// Whether this group must be read before it is planned.
    pub fn is_stale(&self, dn: &Dn) -> bool {
        self.stale.contains(dn)
    }

    /// The proids whose groups must be read before they are planned.
    pub fn stale_proids(&self) -> BTreeSet<crate::model::Proid> {
        self.stale
            .iter()
            .filter_map(|dn| self.groups.get(dn))
            .filter_map(|g| self.pattern.proid_of(&g.sam_account_name))
            .collect()
    }

    /// Adds or replaces one group as read.
    pub fn insert(&mut self, group: Group) {
        self.note(&group.dn);
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
        self.note(dn);
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
        self.note(&dn);
        self.stale.insert(dn);
    }

    /// Every group of a proid key is to be read again.
    pub fn mark_proid_stale(&mut self, key: &str) {
        for dn in self.dns_of(key).to_vec() {
            self.mark_stale(dn);
        }
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

    /// Records what a write applied, so the next plan starts from it.
    pub fn applied(&mut self, change: &GroupChange) {
        self.note(&change.group_dn);
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

    #[test]
    fn a_group_read_twice_is_taken_as_last_read_and_judged_against_the_cache() {
        let mut c = cache();
        c.insert(group("web-gmsa-hosts", &["CN=h1,DC=x"]));
        c.begin_read();
        let before = c.reset(vec![
            group("web-gmsa-hosts", &["CN=h1,DC=x", "CN=h2,DC=x"]),
            group("web-gmsa-hosts", &["CN=h1,DC=x"]),
            group("db-gmsa-hosts", &["CN=h1,DC=x"]),
            group("db-gmsa-hosts", &["CN=h2,DC=x"]),
        ]);
        let web = c.get(&group("web-gmsa-hosts", &[]).dn).expect("web");
        assert_eq!(web.members, [dn("CN=h1,DC=x")].into());
        assert!(!before.drifted(web), "as the cache knew it");
        let db = c.get(&group("db-gmsa-hosts", &[]).dn).expect("db");
        assert_eq!(db.members, [dn("CN=h2,DC=x")].into());
        assert!(!before.drifted(db), "not known before the reset");
        assert_eq!(c.dns_of("db").len(), 1);
    }

    #[test]
    fn a_group_whose_name_changed_is_found_by_its_new_proid_after_a_reset() {
        let mut c = cache();
        c.insert(group("web-gmsa-hosts", &["CN=h1,DC=x"]));
        let dn_web = group("web-gmsa-hosts", &[]).dn;
        c.begin_read();
        let renamed = Group {
            sam_account_name: "api-gmsa-hosts".to_owned(),
            ..group("web-gmsa-hosts", &["CN=h1,DC=x"])
        };
        c.reset(vec![renamed]);
        assert!(c.dns_of("web").is_empty());
        assert_eq!(c.dns_of("api"), [dn_web]);
    }

    #[test]
    fn a_reset_keeps_what_was_written_or_read_since_the_read_began() {
        let mut c = cache();
        c.insert(group("web-gmsa-hosts", &[]));
        c.insert(group("db-gmsa-hosts", &[]));
        c.insert(group("old-gmsa-hosts", &[]));
        c.begin_read();
        // The read sees all three empty; then web is written, db fails
        // (in doubt), and old is found gone.
        let read = vec![
            group("web-gmsa-hosts", &[]),
            group("db-gmsa-hosts", &[]),
            group("old-gmsa-hosts", &[]),
            group("new-gmsa-hosts", &["CN=h2,DC=x"]),
        ];
        let web = group("web-gmsa-hosts", &[]).dn;
        c.applied(&GroupChange {
            group_dn: web.clone(),
            proid: Proid::new("web").expect("proid"),
            add: [dn("CN=h1,DC=x")].into(),
            delete: BTreeSet::new(),
        });
        c.mark_stale(group("db-gmsa-hosts", &[]).dn);
        c.forget(&group("old-gmsa-hosts", &[]).dn);
        assert!(c.newer_than_read(&web));
        let before = c.reset(read);
        assert!(!c.newer_than_read(&web), "the read is over");
        assert_eq!(
            c.groups_of(&["web".to_owned()])[0].members,
            [dn("CN=h1,DC=x")].into()
        );
        assert_eq!(c.stale_of("db").len(), 1, "still in doubt");
        assert!(c.dns_of("old").is_empty(), "gone since the read");
        assert_eq!(c.dns_of("new").len(), 1, "what only the read saw is taken");
        assert_eq!(c.stale_proids(), [Proid::new("db").expect("proid")].into());
        // Drift is judged only for the groups taken from the read.
        let new = c
            .get(&group("new-gmsa-hosts", &[]).dn)
            .expect("new")
            .clone();
        assert!(!before.drifted(&new), "not known before");
    }
}

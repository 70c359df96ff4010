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

/// Whether two copies of a group are the same as spelled, not only as
/// compared (a DN compares without regard to case).
fn same_spelling(a: &Group, b: &Group) -> bool {
    a.dn.as_str() == b.dn.as_str()
        && a.sam_account_name == b.sam_account_name
        && a.members.len() == b.members.len()
        && a.members
            .iter()
            .zip(&b.members)
            .all(|(x, y)| x.as_str() == y.as_str())
}

/// `group` with each member DN replaced by an equal one spelled alike
/// from `old`'s members or from `shared`, where there is one.
fn sharing(mut group: Group, old: Option<&Group>, shared: &impl Fn(&Dn) -> Option<Dn>) -> Group {
    let alike = |a: &Dn, b: &Dn| a.as_str() == b.as_str();
    group.members = std::mem::take(&mut group.members)
        .into_iter()
        .map(|member| {
            old.and_then(|o| o.members.get(&member))
                .filter(|known| alike(known, &member))
                .cloned()
                .or_else(|| shared(&member).filter(|known| alike(known, &member)))
                .unwrap_or(member)
        })
        .collect();
    group
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
    /// knew of the groups the read changed.
    ///
    /// A group read as the cache holds it, spelling and all, keeps the
    /// cache's copy and the read's is dropped: at cluster scale the read
    /// is a second copy of every group, and what outlives a resync is
    /// then only what it changed, not a whole new set of allocations among
    /// whose pages the read's transient ones were freed. A group the read
    /// changed shares each member's DN with the cache's older copy or,
    /// failing that, with `shared` (the index's copy of a host's DN), where
    /// they are spelled alike: the read's own copies die with it, rather
    /// than each resync leaving a few more alive.
    pub fn reset(&mut self, groups: Vec<Group>, shared: impl Fn(&Dn) -> Option<Dn>) -> Replaced {
        let newer = self.since_read.take().unwrap_or_default();
        let mut replaced = Replaced {
            groups: BTreeMap::new(),
            stale: BTreeSet::new(),
        };
        // The stale marks of the groups taken from the read end here.
        let stale = std::mem::take(&mut self.stale);
        let (still_stale, ended): (BTreeSet<Dn>, BTreeSet<Dn>) = stale
            .into_iter()
            .partition(|dn| newer.contains(dn) && self.groups.contains_key(dn));
        self.stale = still_stale;
        replaced.stale = ended;
        let mut read: BTreeSet<Dn> = BTreeSet::new();
        for group in groups {
            if newer.contains(&group.dn) {
                continue;
            }
            // Read twice, the last copy is taken, and drift is judged
            // against what the cache knew before the reset, not the first.
            let again = !read.insert(group.dn.clone());
            match self.groups.get(&group.dn) {
                Some(known) if same_spelling(known, &group) => {}
                Some(_) => {
                    let old = self.take(&group.dn);
                    let group = sharing(group, old.as_ref(), &shared);
                    if !again {
                        replaced.groups.extend(old.map(|g| (g.dn.clone(), g)));
                    }
                    self.put(group);
                }
                // A group the cache did not hold (every group, the first
                // time) keeps the read's DNs: rebuilding every set beside
                // the read's would raise the peak for little.
                None => self.put(group),
            }
        }
        // What neither the read nor a write since it began saw is gone.
        let gone: Vec<Dn> = self
            .groups
            .keys()
            .filter(|dn| !read.contains(*dn) && !newer.contains(*dn))
            .cloned()
            .collect();
        for dn in gone {
            self.take(&dn);
        }
        replaced
    }

    /// Removes a group, without noting it.
    fn take(&mut self, dn: &Dn) -> Option<Group> {
        self.stale.remove(dn);
        let group = self.groups.remove(dn)?;
        if let Some(proid) = self.pattern.proid_of(&group.sam_account_name) {
            let key = proid.key();
            if let Some(dns) = self.by_proid.get_mut(&key) {
                dns.retain(|d| d != dn);
                if dns.is_empty() {
                    self.by_proid.remove(&key);
                }
            }
        }
        Some(group)
    }

    /// Adds a group the cache does not hold, without noting it.
    fn put(&mut self, group: Group) {
        if let Some(proid) = self.pattern.proid_of(&group.sam_account_name) {
            let dns = self.by_proid.entry(proid.key()).or_default();
            if !dns.contains(&group.dn) {
                dns.push(group.dn.clone());
            }
        }
        self.groups.insert(group.dn.clone(), group);
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
        self.take(&group.dn);
        self.put(group);
    }

    /// Drops a group that vanished.
    pub fn forget(&mut self, dn: &Dn) {
        self.note(dn);
        self.take(dn);
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

        c.reset(vec![group("db-gmsa-hosts", &[])], |_| None);
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

    /// Where a member's spelling lives: a copy made apart has its own.
    fn spelling_of(c: &GroupCache, name: &str) -> Vec<*const u8> {
        let dn = group(name, &[]).dn;
        let group = c.get(&dn).expect("cached");
        std::iter::once(group.dn.as_str().as_ptr())
            .chain(group.members.iter().map(|m| m.as_str().as_ptr()))
            .collect()
    }

    #[test]
    fn a_reset_keeps_the_caches_own_copy_of_a_group_read_unchanged() {
        let mut c = cache();
        c.insert(group("web-gmsa-hosts", &["CN=h1,DC=x", "CN=h2,DC=x"]));
        c.insert(group("db-gmsa-hosts", &["CN=h1,DC=x"]));
        c.insert(group("ops-gmsa-hosts", &["CN=h1,DC=x"]));
        let web = spelling_of(&c, "web-gmsa-hosts");
        let db = spelling_of(&c, "db-gmsa-hosts");
        let ops = spelling_of(&c, "ops-gmsa-hosts");
        c.begin_read();
        // Copies made apart, as a read makes them: web as cached, db with
        // a member spelled in other case, ops with another member.
        let before = c.reset(
            vec![
                group("web-gmsa-hosts", &["CN=h1,DC=x", "CN=h2,DC=x"]),
                group("db-gmsa-hosts", &["cn=H1,DC=x"]),
                group("ops-gmsa-hosts", &["CN=h3,DC=x"]),
            ],
            |_| None,
        );
        assert_eq!(spelling_of(&c, "web-gmsa-hosts"), web, "the cache's copy");
        assert_ne!(spelling_of(&c, "db-gmsa-hosts"), db, "the read's spelling");
        assert_ne!(spelling_of(&c, "ops-gmsa-hosts"), ops);
        let db = c.get(&group("db-gmsa-hosts", &[]).dn).expect("db");
        assert_eq!(db.members.iter().next().map(Dn::as_str), Some("cn=H1,DC=x"));
        assert!(!before.drifted(db), "the same members, spelled otherwise");
        let ops = c.get(&group("ops-gmsa-hosts", &[]).dn).expect("ops");
        assert!(before.drifted(ops), "other members");
        for key in ["web", "db", "ops"] {
            assert_eq!(c.dns_of(key).len(), 1, "{key} found by its proid once");
        }
    }

    #[test]
    fn a_group_read_twice_is_taken_as_last_read_and_judged_against_the_cache() {
        let mut c = cache();
        c.insert(group("web-gmsa-hosts", &["CN=h1,DC=x"]));
        c.begin_read();
        let before = c.reset(
            vec![
                group("web-gmsa-hosts", &["CN=h1,DC=x", "CN=h2,DC=x"]),
                group("web-gmsa-hosts", &["CN=h1,DC=x"]),
                group("db-gmsa-hosts", &["CN=h1,DC=x"]),
                group("db-gmsa-hosts", &["CN=h2,DC=x"]),
            ],
            |_| None,
        );
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
        c.reset(vec![renamed], |_| None);
        assert!(c.dns_of("web").is_empty());
        assert_eq!(c.dns_of("api"), [dn_web]);
    }

    #[test]
    fn a_group_taken_from_a_read_shares_its_members_dns() {
        let mut c = cache();
        c.insert(group("web-gmsa-hosts", &["CN=h1,DC=x", "CN=h9,DC=x"]));
        let h1 = c
            .get(&group("web-gmsa-hosts", &[]).dn)
            .expect("web")
            .members
            .iter()
            .next()
            .expect("h1")
            .as_str()
            .as_ptr();
        let index_h2 = dn("CN=h2,DC=x");
        let h2 = index_h2.as_str().as_ptr();
        c.begin_read();
        // Read apart, changed: h1 as cached, h2 as the index has it, h3
        // unknown to both, h4 known to the index in another spelling, and
        // h9 gone.
        let shared = |d: &Dn| {
            [index_h2.clone(), dn("CN=H4,DC=x")]
                .into_iter()
                .find(|known| known == d)
        };
        c.reset(
            vec![group(
                "web-gmsa-hosts",
                &["CN=h1,DC=x", "CN=h2,DC=x", "CN=h3,DC=x", "CN=h4,DC=x"],
            )],
            shared,
        );
        let web = c.get(&group("web-gmsa-hosts", &[]).dn).expect("web");
        let at: Vec<*const u8> = web.members.iter().map(|m| m.as_str().as_ptr()).collect();
        assert_eq!(at[0], h1, "the cache's older copy");
        assert_eq!(at[1], h2, "the index's copy");
        let spelled: Vec<&str> = web.members.iter().map(Dn::as_str).collect();
        assert_eq!(
            spelled,
            ["CN=h1,DC=x", "CN=h2,DC=x", "CN=h3,DC=x", "CN=h4,DC=x"],
            "each as the directory spells it"
        );
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
        let before = c.reset(read, |_| None);
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

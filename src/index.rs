//! Per-proid, per-host reference counts: the desired state, kept up to date
//! one [`TreeEvent`] at a time.
//!
//! For every proid the index counts, per host DN, the instances of that proid
//! on in-scope hosts; `desired(proid)` is the DNs of the in-scope hosts
//! that run at least one instance of the proid (a count above zero). It
//! also knows which DNs are *managed* (belong to an
//! in-scope host, or lie under one of the `--host-ou` subtrees, whose every
//! member the reconciler owns whether or not a host still names it: that is
//! how ownership outlives a restart) and which DNs are *retiring* for a proid: they left its
//! desired set and may still sit in its groups, so the reconciler must delete
//! them there even when they are no longer managed (a host that left scope is
//! not managed any more, but its membership is still ours to remove).
//!
//! Applying an event returns the proids whose desired set changed, so that
//! the daemon reconciles only those. A whole snapshot is taken in one go
//! ([`Index::from_snapshot_with_warnings`]), more cheaply than event by
//! event but to the same result: a property test checks the two against
//! each other after every event.
//!
//! Hosts whose placement directory can't be read have *unknown* placements,
//! which is not the same as none: a source that can't be read is never
//! taken for an empty one, or its hosts would be removed from every group.
//! Their DNs are
//! *held*: [`Index::held`] names them, and the plan neither adds nor
//! deletes a held DN anywhere, so those hosts' memberships stay as they are
//! until the directory can be read again. What was known of their
//! placements stays counted meanwhile, so that reading the directory again
//! changes only what really changed.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::hash::{BuildHasher, RandomState};

use crate::model::{Dn, DnMap, HostName, PartitionGlob, Proid};
use crate::parallel::in_shares;
use crate::tree::names::{PLACEMENT, SERVERS};
use crate::tree::{Placed, ServerError, ServerInfo, Snapshot, TreeEvent};

/// The reference counts for one partition glob.
#[derive(Debug, Clone, Default)]
pub struct Index {
    partition: PartitionGlob,
    /// Hosts with an in-scope definition or with placements (or both).
    hosts: BTreeMap<HostName, HostState>,
    /// Per proid, per DN: instances on in-scope hosts. No zero counts and no
    /// empty maps are kept, so the keys are exactly the desired sets.
    counts: HashMap<Proid, DnMap<u32>>,
    /// Per DN: in-scope hosts that have it. No zero counts are kept.
    managed: DnMap<u32>,
    /// Per proid: DNs that left its desired set and are not yet known to be
    /// removed from its groups. Never empty sets.
    retiring: BTreeMap<Proid, BTreeSet<Dn>>,
    /// Hosts whose placements are unknown: their directory can't be read.
    unknown: BTreeSet<HostName>,
    /// Subtrees whose members are managed even when no in-scope host has
    /// them (`--host-ou`).
    host_ous: Vec<Dn>,
    /// Hosts never in scope whose server file can't be used: their DN is
    /// unknown, so it may be any member under a `--host-ou`.
    unusable: BTreeSet<HostName>,
    /// Hosts with a definition: kept up to date where definitions change,
    /// so that [`Index::stats`] does not walk every host.
    servers_in_scope: usize,
    /// Instances of the hosts with a definition, kept up to date likewise.
    placements: usize,
}

/// What one event changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Applied {
    /// Proids to reconcile: their desired set changed or DNs started retiring.
    pub dirty: BTreeSet<Proid>,
    /// Something about the event an operator should know (a broken server
    /// file, an instance name without a proid), naming the path.
    pub warning: Option<String>,
    /// A DN is no longer held ([`Index::held`]): while it was, its
    /// memberships were left alone in whatever groups it sits, which the
    /// index does not know, so every group needs comparing (a full sync).
    pub resync: bool,
}

/// Sizes, for logs and metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IndexStats {
    /// Hosts in scope.
    pub servers_in_scope: usize,
    /// Instances on in-scope hosts.
    pub placements: usize,
    /// Proids with at least one desired member.
    pub proids: usize,
}

/// What the index knows about one host.
#[derive(Debug, Clone, Default)]
struct HostState {
    /// The host's current in-scope definition, if any.
    definition: Option<Definition>,
    /// Its placed instances (only names with a proid), counted only while
    /// the host has a definition.
    instances: BTreeSet<String>,
}

/// The parts of an in-scope server file the index uses.
#[derive(Debug, Clone)]
struct Definition {
    dn: Dn,
    /// Lower-cased: DNS names compare without regard to case, and the DC
    /// list must not name one controller twice.
    dc: String,
}

impl Definition {
    /// Same DN spelling and same DC: nothing to redo.
    fn same(&self, other: &Definition) -> bool {
        self.dn.as_str() == other.dn.as_str() && self.dc == other.dc
    }
}

/// How a server file's content affects its host.
enum Verdict {
    InScope(Definition),
    /// A valid file that puts the host out of scope.
    OutOfScope,
    /// A file that can't be used; the host keeps what it had.
    Invalid(ServerError),
}

/// Presence of (proid, DN) pairs before an event touched them, to tell which
/// proids' desired sets really changed once the event is fully applied (a
/// DN change may take a pair out and put it back in). Retiring sets only grow
/// when a desired set shrinks, so this also covers them. Loading a whole
/// snapshot into an empty index needs no such answer, and tracks nothing.
struct Tracker {
    before: Option<HashMap<(Proid, Dn), bool>>,
}

impl Index {
    /// An empty index counting hosts whose partition matches `partition`.
    pub fn new(partition: PartitionGlob) -> Self {
        Index {
            partition,
            ..Index::default()
        }
    }

    /// The same index, also managing every DN under `host_ous` (`--host-ou`).
    pub fn with_host_ous(mut self, host_ous: Vec<Dn>) -> Self {
        self.host_ous = host_ous;
        self
    }

    /// An index holding a whole snapshot, without its warnings (see
    /// [`Index::from_snapshot_with_warnings`]).
    pub fn from_snapshot(partition: PartitionGlob, snapshot: Snapshot) -> Self {
        Index::from_snapshot_with_warnings(partition, snapshot).0
    }

    /// An index holding a whole snapshot, with the warnings that the scan
    /// could not give: server files that parse but can't be used (an
    /// unparsable `nt.dn` in the partition). Unreadable or unparsable files
    /// are already among the snapshot's warnings and are not repeated.
    ///
    /// The result is the one the snapshot's events would give (the property
    /// test below checks it after every event), built more cheaply: the
    /// instance names move from the snapshot into the index, each host's
    /// placements are added at once, and nothing is tracked for [`Applied`].
    pub fn from_snapshot_with_warnings(
        partition: PartitionGlob,
        mut snapshot: Snapshot,
    ) -> (Self, Vec<String>) {
        let mut index = Index::new(partition);
        let warnings = index.load_from(&mut snapshot, false);
        (index, warnings)
    }

    /// True when nothing was loaded or applied yet (or all of it went
    /// again): no host, no placement, nothing retiring or unknown.
    pub fn is_empty(&self) -> bool {
        self.hosts.is_empty()
            && self.counts.is_empty()
            && self.retiring.is_empty()
            && self.unknown.is_empty()
            && self.unusable.is_empty()
    }

    /// Loads a whole snapshot into this index, which must be empty
    /// ([`Index::is_empty`]), keeping its `--host-ou` subtrees: the result
    /// is the one the snapshot's events would give, as with
    /// [`Index::from_snapshot_with_warnings`]. The placements move out of
    /// `snapshot` into the index (its `placements` are left empty); the
    /// servers and the unknown hosts stay. Returns what applying each
    /// event would have warned about, unusable server files included.
    pub fn load(&mut self, snapshot: &mut Snapshot) -> Vec<String> {
        self.load_from(snapshot, true)
    }

    /// [`Index::load`]; the warnings about server files that can't be
    /// used only when `unusable_files` (the scan warns about them too).
    fn load_from(&mut self, snapshot: &mut Snapshot, unusable_files: bool) -> Vec<String> {
        assert!(
            self.is_empty(),
            "BUG: a snapshot is loaded into an empty index"
        );
        let mut warnings = Vec::new();
        let mut untracked = Tracker::off();
        self.unknown = snapshot.unknown.clone();
        for (host, info) in &snapshot.servers {
            let warning = self.upsert_server(host, info, &mut untracked);
            if unusable_files || info.is_ok() {
                warnings.extend(warning);
            }
        }
        for (host, instances) in std::mem::take(&mut snapshot.placements) {
            self.place_all(host, instances, &mut warnings);
        }
        // Nothing retires while an empty index loads: counting the
        // placements is all that is left.
        debug_assert!(self.retiring.is_empty() && self.counts.is_empty());
        self.counts = count_placements(&self.hosts);
        warnings
    }

    /// The placements (with a proid) of a host as the index holds them;
    /// `None` when it has none.
    pub fn placements_of(&self, host: &HostName) -> Option<&BTreeSet<String>> {
        self.hosts
            .get(host)
            .map(|state| &state.instances)
            .filter(|instances| !instances.is_empty())
    }

    /// Applies one event and says which proids need a reconcile.
    pub fn apply(&mut self, event: &TreeEvent) -> Applied {
        let mut tracker = Tracker::on();
        // Usually nothing is held, and nothing needs comparing.
        let held_before = (!self.unknown.is_empty()).then(|| self.held());
        let host_ous_suspended = self.host_ous_suspended();
        let warning = match event {
            TreeEvent::ServerUpserted { host, info } => {
                self.upsert_server(host, info, &mut tracker)
            }
            TreeEvent::ServerRemoved { host } => {
                self.unusable.remove(host);
                self.set_definition(host, None, &mut tracker);
                None
            }
            TreeEvent::PlacementAdded { host, instance } => {
                let Some(proid) = Proid::name_in(instance) else {
                    return Applied {
                        dirty: BTreeSet::new(),
                        warning: Some(no_proid(host, instance)),
                        resync: false,
                    };
                };
                let state = self.hosts.entry(host.clone()).or_default();
                // A rename over an existing file announces it again.
                if !state.instances.contains(instance) {
                    state.instances.insert(instance.clone());
                    if let Some(dn) = state.definition.as_ref().map(|d| d.dn.clone()) {
                        self.placements += 1;
                        self.add(proid, &dn, &mut tracker);
                    }
                }
                None
            }
            TreeEvent::PlacementRemoved { host, instance } => {
                if let Some(proid) = Proid::name_in(instance) {
                    if let Some(state) = self.hosts.get_mut(host) {
                        if state.instances.remove(instance) {
                            if let Some(dn) = state.definition.as_ref().map(|d| d.dn.clone()) {
                                self.placements -= 1;
                                self.sub(proid, &dn, &mut tracker);
                            }
                        }
                    }
                    self.prune(host);
                }
                None
            }
            TreeEvent::PlacementDirRemoved { host } => {
                self.unknown.remove(host);
                self.relist(host, &BTreeSet::new(), &mut tracker);
                None
            }
            TreeEvent::PlacementDirListed { host, instances } => {
                self.unknown.remove(host);
                self.relist(host, instances, &mut tracker);
                None
            }
            TreeEvent::PlacementsUnknown { host } => {
                self.unknown.insert(host.clone());
                None
            }
        };
        // The host OUs manage their members again: which of those are in
        // which groups, the index does not know.
        let resync = held_before.is_some_and(|before| !before.is_subset(&self.held()))
            || (host_ous_suspended && !self.host_ous_suspended());
        Applied {
            dirty: self.finish(tracker),
            warning,
            resync,
        }
    }

    /// A host's placements are now `listed` (names without a proid are
    /// left out: the listing has warned about them).
    fn relist(&mut self, host: &HostName, listed: &BTreeSet<String>, tracker: &mut Tracker) {
        let state = self.hosts.entry(host.clone()).or_default();
        let old = std::mem::take(&mut state.instances);
        let dn = state.definition.as_ref().map(|d| d.dn.clone());
        let new: BTreeSet<String> = listed
            .iter()
            .filter(|i| Proid::name_in(i).is_some())
            .cloned()
            .collect();
        if let Some(dn) = dn {
            self.placements = self.placements - old.len() + new.len();
            for gone in old.difference(&new) {
                self.sub(proid_of(gone), &dn, tracker);
            }
            for came in new.difference(&old) {
                self.add(proid_of(came), &dn, tracker);
            }
        }
        if let Some(state) = self.hosts.get_mut(host) {
            state.instances = new;
        }
        self.prune(host);
    }

    /// The DNs of in-scope hosts whose placements are unknown: the plan
    /// neither adds nor deletes them in any group.
    pub fn held(&self) -> BTreeSet<Dn> {
        self.unknown
            .iter()
            .filter_map(|host| self.hosts.get(host)?.definition.as_ref())
            .map(|def| def.dn.clone())
            .collect()
    }

    /// A server file was written: its host enters, leaves or stays out of
    /// scope, or keeps what it had when the file can't be used (the warning
    /// says so).
    fn upsert_server(
        &mut self,
        host: &HostName,
        info: &Result<ServerInfo, ServerError>,
        tracker: &mut Tracker,
    ) -> Option<String> {
        match self.judge(info) {
            Verdict::InScope(def) => {
                self.unusable.remove(host);
                self.set_definition(host, Some(def), tracker);
                None
            }
            Verdict::OutOfScope => {
                self.unusable.remove(host);
                self.set_definition(host, None, tracker);
                None
            }
            Verdict::Invalid(reason) => {
                let current = self.hosts.get(host).and_then(|s| s.definition.as_ref());
                Some(match current {
                    Some(def) => format!(
                        "{SERVERS}/{host}: {reason}; keeping its last good definition ({})",
                        def.dn
                    ),
                    None => {
                        self.unusable.insert(host.clone());
                        let held = if self.host_ous.is_empty() {
                            ""
                        } else {
                            "; members under --host-ou are not removed until it can be used"
                        };
                        format!("{SERVERS}/{host}: {reason}; the host stays out of scope{held}")
                    }
                })
            }
        }
    }

    /// A host's placements from a snapshot, as one `PlacementAdded` event
    /// each would place them (the property test checks that it does): names
    /// without a proid are left out with a warning. The host has none yet
    /// (a snapshot lists each host's placements once), so the set moves in
    /// whole. They are counted once every host is placed
    /// ([`Index::load_from`]).
    fn place_all(
        &mut self,
        host: HostName,
        mut instances: BTreeSet<String>,
        warnings: &mut Vec<String>,
    ) {
        instances.retain(|instance| {
            let placement = Proid::name_in(instance).is_some();
            if !placement {
                warnings.push(no_proid(&host, instance));
            }
            placement
        });
        if instances.is_empty() {
            return;
        }
        let state = self.hosts.entry(host).or_default();
        assert!(
            state.instances.is_empty(),
            "BUG: a snapshot places a host's instances once"
        );
        if state.definition.is_some() {
            self.placements += instances.len();
        }
        state.instances = instances;
    }

    /// Proids with at least one desired member, sorted.
    pub fn proids(&self) -> Vec<Proid> {
        let mut proids: Vec<Proid> = self.counts.keys().cloned().collect();
        proids.sort();
        proids
    }

    /// The DNs that should be members of the proid's groups.
    pub fn desired(&self, proid: &Proid) -> BTreeSet<Dn> {
        self.counts
            .get(proid)
            .map(|dns| dns.keys().cloned().collect())
            .unwrap_or_default()
    }

    /// The proid's desired set as the index holds it, for lookups without
    /// copying it.
    pub fn desired_set(&self, proid: &Proid) -> DesiredSet<'_> {
        DesiredSet(self.counts.get(proid))
    }

    /// True when the proid's desired set is not empty.
    pub fn has_desired(&self, proid: &Proid) -> bool {
        self.counts.contains_key(proid)
    }

    /// Every proid's desired set (proids with an empty set left out).
    pub fn desired_snapshot(&self) -> BTreeMap<Proid, BTreeSet<Dn>> {
        self.counts
            .iter()
            .map(|(proid, dns)| (proid.clone(), dns.keys().cloned().collect()))
            .collect()
    }

    /// True when the host has an in-scope definition: its placements count.
    pub fn in_scope(&self, host: &HostName) -> bool {
        self.hosts.get(host).is_some_and(|s| s.definition.is_some())
    }

    /// True when the DN belongs to an in-scope host or lies under a
    /// `--host-ou` subtree: the reconciler owns its memberships. While a
    /// server file that was never usable is in the tree, the subtrees
    /// manage nothing: that host's DN is unknown and may be any of their
    /// members, and a doubt is no reason to remove a host from its groups.
    pub fn is_managed(&self, dn: &Dn) -> bool {
        self.managed.contains_key(dn)
            || (self.unusable.is_empty() && self.host_ous.iter().any(|ou| dn.is_within(ou)))
    }

    /// True when `--host-ou` subtrees are given but manage nothing for now:
    /// a server file never usable is in the tree (see [`Index::is_managed`]).
    pub fn host_ous_suspended(&self) -> bool {
        !self.host_ous.is_empty() && !self.unusable.is_empty()
    }

    /// DNs that left the proid's desired set and may still be in its groups:
    /// to be deleted there even if no longer managed. Held DNs are left out,
    /// so that they stay retiring (and are not cleared as done) until they
    /// can be deleted.
    pub fn retiring(&self, proid: &Proid) -> BTreeSet<Dn> {
        let Some(dns) = self.retiring.get(proid) else {
            return BTreeSet::new();
        };
        if self.unknown.is_empty() {
            return dns.clone();
        }
        dns.difference(&self.held()).cloned().collect()
    }

    /// Proids with retiring DNs, sorted.
    pub fn retiring_proids(&self) -> Vec<Proid> {
        self.retiring.keys().cloned().collect()
    }

    /// Forgets retiring DNs once the proid's groups were reconciled without
    /// them (or the proid was found to have no group). Call it with the set
    /// [`Index::retiring`] returned when the plan was made.
    pub fn clear_retiring(&mut self, proid: &Proid, done: &BTreeSet<Dn>) {
        if let Some(dns) = self.retiring.get_mut(proid) {
            dns.retain(|dn| !done.contains(dn));
            if dns.is_empty() {
                self.retiring.remove(proid);
            }
        }
    }

    /// The distinct domain controllers of in-scope hosts (lower-cased), the
    /// one serving most hosts first, ties by name.
    pub fn dcs(&self) -> Vec<String> {
        let mut hosts_per_dc: BTreeMap<&str, usize> = BTreeMap::new();
        for def in self.hosts.values().filter_map(|s| s.definition.as_ref()) {
            *hosts_per_dc.entry(&def.dc).or_default() += 1;
        }
        let mut dcs: Vec<(&str, usize)> = hosts_per_dc.into_iter().collect();
        dcs.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
        dcs.into_iter().map(|(dc, _)| dc.to_owned()).collect()
    }

    /// Sizes, for logs and metrics, from counters kept up to date.
    pub fn stats(&self) -> IndexStats {
        IndexStats {
            servers_in_scope: self.servers_in_scope,
            placements: self.placements,
            proids: self.counts.len(),
        }
    }

    /// [`Index::stats`] counted from every host: the tests check the
    /// counters against it.
    #[cfg(test)]
    fn counted_stats(&self) -> IndexStats {
        let in_scope = self.hosts.values().filter(|s| s.definition.is_some());
        let (servers_in_scope, placements) = in_scope.fold((0, 0), |(servers, placements), s| {
            (servers + 1, placements + s.instances.len())
        });
        IndexStats {
            servers_in_scope,
            placements,
            proids: self.counts.len(),
        }
    }

    /// The proids to reconcile when `next` replaces `self`: those whose
    /// desired set differs, and those with DNs retiring in `next` that were
    /// not retiring in `self`. The property test compares indexes with it.
    #[cfg(test)]
    fn diff_dirty(&self, next: &Index) -> BTreeSet<Proid> {
        let mut dirty = BTreeSet::new();
        for proid in self.counts.keys().chain(next.counts.keys()) {
            let (old, new) = (self.counts.get(proid), next.counts.get(proid));
            let same = match (old, new) {
                (Some(old), Some(new)) => {
                    old.len() == new.len() && old.keys().all(|dn| new.contains_key(dn))
                }
                (None, None) => true,
                _ => false,
            };
            if !same {
                dirty.insert(proid.clone());
            }
        }
        for (proid, dns) in &next.retiring {
            let old = self.retiring.get(proid);
            if dns
                .iter()
                .any(|dn| !old.is_some_and(|old| old.contains(dn)))
            {
                dirty.insert(proid.clone());
            }
        }
        dirty
    }

    /// Decides what a server file's content means for its host.
    fn judge(&self, info: &Result<ServerInfo, ServerError>) -> Verdict {
        let info = match info {
            Ok(info) => info,
            Err(reason) => return Verdict::Invalid(reason.clone()),
        };
        if !self
            .partition
            .matches(info.partition.as_deref().unwrap_or(""))
        {
            return Verdict::OutOfScope;
        }
        let (Some(dc), Some(dn)) = (present(&info.dc), present(&info.dn)) else {
            return Verdict::OutOfScope;
        };
        match Dn::parse(dn) {
            Ok(dn) => Verdict::InScope(Definition {
                dn,
                dc: dc.to_lowercase(),
            }),
            Err(err) => Verdict::Invalid(ServerError::Dn(err)),
        }
    }

    /// Replaces a host's definition: every contribution of the old one goes,
    /// whatever the counts, then the new one's are added.
    fn set_definition(&mut self, host: &HostName, new: Option<Definition>, tracker: &mut Tracker) {
        let state = self.hosts.entry(host.clone()).or_default();
        if let (Some(old), Some(new)) = (&state.definition, &new) {
            if old.same(new) {
                return;
            }
        }
        let old = std::mem::replace(&mut state.definition, new.clone());
        // Out of the host's state while the counts change, and back after.
        let instances = std::mem::take(&mut state.instances);
        let proids = || instances.iter().filter_map(|i| Proid::name_in(i));
        if let Some(old) = old {
            self.servers_in_scope -= 1;
            self.placements -= instances.len();
            if let Some(hosts) = self.managed.get_mut(&old.dn) {
                *hosts -= 1;
                if *hosts == 0 {
                    self.managed.remove(&old.dn);
                }
            }
            for proid in proids() {
                self.sub(proid, &old.dn, tracker);
            }
        }
        if let Some(new) = new {
            self.servers_in_scope += 1;
            self.placements += instances.len();
            *self.managed.entry(new.dn.clone()).or_default() += 1;
            for proid in proids() {
                self.add(proid, &new.dn, tracker);
            }
        }
        if let Some(state) = self.hosts.get_mut(host) {
            state.instances = instances;
        }
        self.prune(host);
    }

    /// One more instance of `proid` on a host with `dn`. Proids are looked
    /// up by name: a `Proid` is made only for a proid not seen before.
    fn add(&mut self, proid: &str, dn: &Dn, tracker: &mut Tracker) {
        // Looked up once when the proid is known, as it nearly always is.
        let dns = match self.counts.get_mut(proid) {
            Some(dns) => dns,
            None => self.counts.entry(known_proid(proid)).or_default(),
        };
        let count = dns.entry(dn.clone()).or_default();
        *count += 1;
        let first = *count == 1;
        if tracker.is_on() {
            let (key, _) = self
                .counts
                .get_key_value(proid)
                .expect("BUG: the proid was inserted above");
            tracker.note(key.clone(), dn, !first);
        }
        if first {
            // Wanted again: deleting it now would be wrong.
            if let Some(retiring) = self.retiring.get_mut(proid) {
                retiring.remove(dn);
                if retiring.is_empty() {
                    self.retiring.remove(proid);
                }
            }
        }
    }

    /// One instance fewer of `proid` on a host with `dn`.
    fn sub(&mut self, proid: &str, dn: &Dn, tracker: &mut Tracker) {
        let Some((key, _)) = self.counts.get_key_value(proid) else {
            panic!("BUG: removing {proid} on {dn} which was never counted");
        };
        let key = key.clone();
        if tracker.is_on() {
            tracker.note(key.clone(), dn, true);
        }
        let dns = self.counts.get_mut(proid).expect("BUG: found above");
        let Some(count) = dns.get_mut(dn) else {
            panic!("BUG: removing {proid} on {dn} which was never counted");
        };
        *count -= 1;
        if *count == 0 {
            dns.remove(dn);
            if dns.is_empty() {
                self.counts.remove(proid);
            }
            self.retiring.entry(key).or_default().insert(dn.clone());
        }
    }

    /// True when `dn` is in `proid`'s desired set.
    fn has(&self, proid: &Proid, dn: &Dn) -> bool {
        self.counts
            .get(proid)
            .is_some_and(|dns| dns.contains_key(dn))
    }

    /// Drops a host the index no longer needs to remember.
    fn prune(&mut self, host: &HostName) {
        if self
            .hosts
            .get(host)
            .is_some_and(|s| s.definition.is_none() && s.instances.is_empty())
        {
            self.hosts.remove(host);
        }
    }

    /// The proids an event made dirty.
    fn finish(&self, tracker: Tracker) -> BTreeSet<Proid> {
        tracker
            .before
            .into_iter()
            .flatten()
            .filter(|((proid, dn), before)| self.has(proid, dn) != *before)
            .map(|((proid, _), _)| proid)
            .collect()
    }
}

/// The index's placements, for a rescan's diff: a host whose placements
/// are none is one of which nothing is known (the index keeps no empty
/// directories, and a removal of one that is not known changes nothing).
impl Placed for Index {
    fn hosts(&self) -> impl Iterator<Item = (&HostName, &BTreeSet<String>)> {
        self.hosts
            .iter()
            .map(|(host, state)| (host, &state.instances))
            .filter(|(_, instances)| !instances.is_empty())
    }

    fn of(&self, host: &HostName) -> Option<&BTreeSet<String>> {
        self.placements_of(host)
    }
}

/// One proid's desired set, borrowed from the index ([`Index::desired_set`]):
/// membership in O(1), iteration in no particular order.
#[derive(Debug, Clone, Copy)]
pub struct DesiredSet<'a>(Option<&'a DnMap<u32>>);

impl<'a> DesiredSet<'a> {
    /// True when `dn` is in the set.
    pub fn contains(&self, dn: &Dn) -> bool {
        self.0.is_some_and(|dns| dns.contains_key(dn))
    }

    /// How many DNs the set has.
    pub fn len(&self) -> usize {
        self.0.map_or(0, DnMap::len)
    }

    /// True when the set has no DN.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The DNs, spelled as the index keeps them, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = &'a Dn> + 'a {
        self.0.into_iter().flat_map(DnMap::keys)
    }
}

/// A key's value when it is there and not blank.
fn present(value: &Option<String>) -> Option<&str> {
    value.as_deref().map(str::trim).filter(|v| !v.is_empty())
}

/// The warning for an instance name that is not a placement (no proid, or
/// a control character in it).
fn no_proid(host: &HostName, instance: &str) -> String {
    let why = match Proid::of_instance(instance) {
        Err(why) => why.to_string(),
        Ok(_) => "not a placement".to_owned(),
    };
    format!("{PLACEMENT}/{host}/{instance}: {why}; ignored")
}

/// The proid of an instance name already known to have one.
fn proid_of(instance: &str) -> &str {
    Proid::name_in(instance).expect("BUG: only instances with a proid are placed")
}

/// Per proid, per DN: the instances of the hosts with a definition, as
/// [`Index::add`] would count them one by one. Counted on every core: each
/// thread goes through every host and keeps the proids of its share, so the
/// shares' maps have no key in common.
fn count_placements(hosts: &BTreeMap<HostName, HostState>) -> HashMap<Proid, DnMap<u32>> {
    let placed: Vec<(&Dn, &BTreeSet<String>)> = hosts
        .values()
        .filter(|state| !state.instances.is_empty())
        .filter_map(|state| Some((&state.definition.as_ref()?.dn, &state.instances)))
        .collect();
    let keys = RandomState::new();
    let shares = in_shares(|share, shares| {
        let mut counts: HashMap<Proid, DnMap<u32>> = HashMap::new();
        for (dn, instances) in &placed {
            for instance in instances.iter() {
                let proid = proid_of(instance);
                if shares > 1 && keys.hash_one(proid) % shares as u64 != share as u64 {
                    continue;
                }
                let dns = match counts.get_mut(proid) {
                    Some(dns) => dns,
                    None => counts.entry(known_proid(proid)).or_default(),
                };
                *dns.entry((*dn).clone()).or_default() += 1;
            }
        }
        counts
    });
    shares.into_iter().flatten().collect()
}

/// A `Proid` for a name already checked by [`Proid::name_in`].
fn known_proid(name: &str) -> Proid {
    Proid::new(name).expect("BUG: only valid proid names are counted")
}

impl Tracker {
    fn on() -> Tracker {
        Tracker {
            before: Some(HashMap::new()),
        }
    }

    fn off() -> Tracker {
        Tracker { before: None }
    }

    fn is_on(&self) -> bool {
        self.before.is_some()
    }

    /// Remembers whether (proid, dn) was desired before the event first touched it.
    fn note(&mut self, proid: Proid, dn: &Dn, present: bool) {
        if let Some(before) = &mut self.before {
            before.entry((proid, dn.clone())).or_insert(present);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(name: &str) -> HostName {
        HostName::new(name).expect("host")
    }

    fn proid(name: &str) -> Proid {
        Proid::new(name).expect("proid")
    }

    fn dn(s: &str) -> Dn {
        Dn::parse(s).expect("dn")
    }

    fn dns(items: &[&str]) -> BTreeSet<Dn> {
        items.iter().map(|s| dn(s)).collect()
    }

    fn proids(items: &[&str]) -> BTreeSet<Proid> {
        items.iter().map(|s| proid(s)).collect()
    }

    fn info(partition: &str, dc: &str, dn: &str) -> Result<ServerInfo, ServerError> {
        Ok(ServerInfo {
            partition: Some(partition.into()),
            dc: Some(dc.into()),
            dn: Some(dn.into()),
        })
    }

    fn upsert(index: &mut Index, h: &str, info: Result<ServerInfo, ServerError>) -> Applied {
        index.apply(&TreeEvent::ServerUpserted {
            host: host(h),
            info,
        })
    }

    fn remove_server(index: &mut Index, h: &str) -> Applied {
        index.apply(&TreeEvent::ServerRemoved { host: host(h) })
    }

    fn place(index: &mut Index, h: &str, instance: &str) -> Applied {
        index.apply(&TreeEvent::PlacementAdded {
            host: host(h),
            instance: instance.into(),
        })
    }

    fn unplace(index: &mut Index, h: &str, instance: &str) -> Applied {
        index.apply(&TreeEvent::PlacementRemoved {
            host: host(h),
            instance: instance.into(),
        })
    }

    fn east() -> Index {
        Index::new(PartitionGlob::parse("east*").expect("glob"))
    }

    const D1: &str = "CN=h1,OU=Hosts,DC=ad,DC=com";
    const D2: &str = "CN=h1-renamed,OU=Hosts,DC=ad,DC=com";
    const D3: &str = "CN=h2,OU=Hosts,DC=ad,DC=com";

    #[test]
    fn placements_count_once_the_server_is_in_scope() {
        let mut index = east();
        let applied = place(&mut index, "h1", "web.app#1");
        assert!(applied.dirty.is_empty(), "no server yet");
        assert!(index.desired(&proid("web")).is_empty());
        assert_eq!(index.stats(), IndexStats::default());

        let applied = upsert(&mut index, "h1", info("east-1", "dc1", D1));
        assert_eq!(applied.dirty, proids(&["web"]));
        assert_eq!(applied.warning, None);
        assert_eq!(index.desired(&proid("web")), dns(&[D1]));
        assert!(index.is_managed(&dn(D1)));

        let applied = place(&mut index, "h1", "web.app#2");
        assert!(
            applied.dirty.is_empty(),
            "count 1 -> 2 changes no desired set"
        );
        let applied = place(&mut index, "h1", "web.app#2");
        assert!(
            applied.dirty.is_empty(),
            "a re-announced instance changes nothing"
        );
        let applied = unplace(&mut index, "h1", "web.app#1");
        assert!(applied.dirty.is_empty(), "count 2 -> 1");
        assert_eq!(index.desired(&proid("web")), dns(&[D1]));
        let applied = unplace(&mut index, "h1", "web.app#2");
        assert_eq!(applied.dirty, proids(&["web"]), "count 1 -> 0");
        assert!(index.desired(&proid("web")).is_empty());
        assert!(index.proids().is_empty());
        assert!(index.is_managed(&dn(D1)), "the host is still in scope");
        let applied = unplace(&mut index, "h1", "web.app#2");
        assert!(
            applied.dirty.is_empty(),
            "removing an absent instance changes nothing"
        );
    }

    #[test]
    fn dn_change_moves_every_count() {
        let mut index = east();
        upsert(&mut index, "h1", info("east", "dc1", D1));
        place(&mut index, "h1", "web.app#1");
        place(&mut index, "h1", "web.app#2");
        place(&mut index, "h1", "db.app#1");
        let applied = upsert(&mut index, "h1", info("east", "dc1", D2));
        assert_eq!(applied.dirty, proids(&["db", "web"]));
        assert_eq!(index.desired(&proid("web")), dns(&[D2]));
        assert_eq!(index.desired(&proid("db")), dns(&[D2]));
        assert!(!index.is_managed(&dn(D1)));
        assert!(index.is_managed(&dn(D2)));
        assert_eq!(index.retiring(&proid("web")), dns(&[D1]));
        assert_eq!(index.retiring(&proid("db")), dns(&[D1]));
        // Both instances moved: removing them one by one empties the set.
        unplace(&mut index, "h1", "web.app#1");
        assert_eq!(index.desired(&proid("web")), dns(&[D2]));
        let applied = unplace(&mut index, "h1", "web.app#2");
        assert_eq!(applied.dirty, proids(&["web"]));
        assert!(index.desired(&proid("web")).is_empty());
        assert_eq!(index.retiring(&proid("web")), dns(&[D1, D2]));
    }

    #[test]
    fn a_respelled_dn_or_a_new_dc_is_not_a_change_of_members() {
        let mut index = east();
        upsert(&mut index, "h1", info("east", "dc1", D1));
        place(&mut index, "h1", "web.app#1");
        let respelled = "cn = H1 , ou=hosts,dc=AD,dc=com";
        let applied = upsert(&mut index, "h1", info("east", "dc2", respelled));
        assert!(applied.dirty.is_empty(), "{applied:?}");
        assert!(index.retiring(&proid("web")).is_empty());
        let desired: Vec<String> = index
            .desired(&proid("web"))
            .iter()
            .map(|d| d.as_str().to_owned())
            .collect();
        assert_eq!(desired, [respelled], "additions use the newest spelling");
        assert_eq!(index.dcs(), ["dc2"]);
    }

    #[test]
    fn partition_change_withdraws_and_returns() {
        let mut index = east();
        upsert(&mut index, "h1", info("east", "dc1", D1));
        place(&mut index, "h1", "web.app#1");
        place(&mut index, "h1", "web.app#2");
        let applied = upsert(&mut index, "h1", info("west", "dc1", D1));
        assert_eq!(applied.dirty, proids(&["web"]));
        assert!(index.desired(&proid("web")).is_empty());
        assert!(!index.is_managed(&dn(D1)));
        assert_eq!(index.retiring(&proid("web")), dns(&[D1]));
        assert_eq!(index.stats(), IndexStats::default());

        let applied = upsert(&mut index, "h1", info("east-2", "dc1", D1));
        assert_eq!(applied.dirty, proids(&["web"]), "placements were kept");
        assert_eq!(index.desired(&proid("web")), dns(&[D1]));
        assert!(index.retiring(&proid("web")).is_empty(), "wanted again");
        assert_eq!(
            index.stats(),
            IndexStats {
                servers_in_scope: 1,
                placements: 2,
                proids: 1
            }
        );
    }

    #[test]
    fn missing_or_empty_keys_and_missing_partition_withdraw() {
        let without = |f: fn(&mut ServerInfo)| {
            let mut i = info("east", "dc1", D1).expect("info");
            f(&mut i);
            Ok(i)
        };
        let cases: [Result<ServerInfo, ServerError>; 5] = [
            without(|i| i.dn = None),
            without(|i| i.dc = None),
            without(|i| i.dn = Some("  ".into())),
            without(|i| i.dc = Some(String::new())),
            without(|i| i.partition = None),
        ];
        for case in cases {
            let mut index = east();
            upsert(&mut index, "h1", info("east", "dc1", D1));
            place(&mut index, "h1", "web.app#1");
            let applied = upsert(&mut index, "h1", case.clone());
            assert_eq!(applied.dirty, proids(&["web"]), "{case:?}");
            assert_eq!(applied.warning, None);
            assert!(!index.is_managed(&dn(D1)), "{case:?}");
        }
        // An empty partition matches a glob that matches "".
        let mut index = Index::new(PartitionGlob::default());
        let mut no_partition = info("", "dc1", D1).expect("info");
        no_partition.partition = None;
        upsert(&mut index, "h1", Ok(no_partition));
        assert!(index.is_managed(&dn(D1)));
    }

    #[test]
    fn server_removed_and_added_again() {
        let mut index = east();
        upsert(&mut index, "h1", info("east", "dc1", D1));
        place(&mut index, "h1", "web.app#1");
        let applied = remove_server(&mut index, "h1");
        assert_eq!(applied.dirty, proids(&["web"]));
        assert!(index.proids().is_empty());
        assert!(!index.is_managed(&dn(D1)));
        let applied = remove_server(&mut index, "h1");
        assert!(applied.dirty.is_empty());
        let applied = upsert(&mut index, "h1", info("east", "dc1", D1));
        assert_eq!(applied.dirty, proids(&["web"]));
        assert_eq!(index.proids(), [proid("web")]);
    }

    #[test]
    fn an_unusable_file_keeps_the_last_good_definition() {
        let mut index = east();
        upsert(&mut index, "h1", info("east", "dc1", D1));
        place(&mut index, "h1", "web.app#1");
        let broken_dn = info("east", "dc1", "CN=h1\\");
        for bad in [
            Err(ServerError::NotYaml("oops".to_owned())),
            broken_dn.clone(),
        ] {
            let applied = upsert(&mut index, "h1", bad);
            assert!(applied.dirty.is_empty());
            let warning = applied.warning.expect("warned");
            assert!(
                warning.contains("servers/h1") && warning.contains("keeping"),
                "{warning}"
            );
            assert_eq!(index.desired(&proid("web")), dns(&[D1]));
            assert!(index.is_managed(&dn(D1)));
        }
        // A valid file (here: other partition) applies again.
        let applied = upsert(&mut index, "h1", info("west", "dc1", "CN=h1\\"));
        assert_eq!(
            applied.dirty,
            proids(&["web"]),
            "out of scope before the DN matters"
        );
        assert_eq!(applied.warning, None);
        // Never in scope: stays out, with a warning.
        let applied = upsert(&mut index, "h1", broken_dn);
        assert!(applied.dirty.is_empty());
        let warning = applied.warning.expect("warned");
        assert!(
            warning.contains("out of scope") && warning.contains("nt.dn"),
            "{warning}"
        );
        assert!(index.proids().is_empty());
        let applied = upsert(
            &mut index,
            "h2",
            Err(ServerError::Unreadable("cannot be read: denied".into())),
        );
        assert!(applied.warning.expect("warned").contains("servers/h2"));
        assert_eq!(index.stats(), IndexStats::default());
    }

    #[test]
    fn removing_a_placement_dir_drops_its_instances() {
        let mut index = east();
        upsert(&mut index, "h1", info("east", "dc1", D1));
        upsert(&mut index, "h2", info("east", "dc1", D3));
        for i in ["web.a#1", "web.a#2", "db.a#1"] {
            place(&mut index, "h1", i);
        }
        place(&mut index, "h2", "web.a#3");
        let applied = index.apply(&TreeEvent::PlacementDirRemoved { host: host("h1") });
        assert_eq!(applied.dirty, proids(&["db", "web"]));
        assert_eq!(index.desired(&proid("web")), dns(&[D3]));
        assert!(index.desired(&proid("db")).is_empty());
        assert!(index.is_managed(&dn(D1)), "the server is still in scope");
        assert_eq!(index.stats().placements, 1);
        // The directory may reappear.
        let applied = place(&mut index, "h1", "db.a#1");
        assert_eq!(applied.dirty, proids(&["db"]));
    }

    #[test]
    fn instances_without_a_proid_are_ignored_with_a_warning() {
        let mut index = east();
        upsert(&mut index, "h1", info("east", "dc1", D1));
        let applied = place(&mut index, "h1", "noproid#1");
        assert!(applied.dirty.is_empty());
        assert!(applied
            .warning
            .expect("warned")
            .contains("placement/h1/noproid#1"));
        assert_eq!(index.stats().placements, 0);
    }

    #[test]
    fn hosts_sharing_a_dn() {
        let mut index = east();
        upsert(&mut index, "h1", info("east", "dc1", D1));
        upsert(&mut index, "h2", info("east", "dc1", D1));
        place(&mut index, "h1", "web.a#1");
        place(&mut index, "h2", "web.a#2");
        let applied = remove_server(&mut index, "h1");
        assert!(applied.dirty.is_empty(), "h2 still contributes the same DN");
        assert!(index.is_managed(&dn(D1)));
        assert_eq!(index.desired(&proid("web")), dns(&[D1]));
        let applied = remove_server(&mut index, "h2");
        assert_eq!(applied.dirty, proids(&["web"]));
        assert!(!index.is_managed(&dn(D1)));
    }

    #[test]
    fn retiring_dns_until_cleared() {
        let mut index = east();
        upsert(&mut index, "h1", info("east", "dc1", D1));
        upsert(&mut index, "h2", info("east", "dc1", D3));
        place(&mut index, "h1", "web.a#1");
        place(&mut index, "h2", "web.a#2");
        place(&mut index, "h2", "db.a#1");
        remove_server(&mut index, "h1");
        remove_server(&mut index, "h2");
        assert_eq!(index.retiring(&proid("web")), dns(&[D1, D3]));
        assert_eq!(index.retiring(&proid("db")), dns(&[D3]));
        assert!(index.retiring(&proid("other")).is_empty());

        index.clear_retiring(&proid("web"), &dns(&[D1]));
        assert_eq!(index.retiring(&proid("web")), dns(&[D3]));
        index.clear_retiring(&proid("web"), &dns(&[D3]));
        assert!(index.retiring(&proid("web")).is_empty());
        assert_eq!(
            index.retiring(&proid("db")),
            dns(&[D3]),
            "other proids untouched"
        );

        // Back in scope and running db again: no longer to be deleted.
        upsert(&mut index, "h2", info("east", "dc1", D3));
        assert!(index.retiring(&proid("db")).is_empty());
    }

    #[test]
    fn a_held_dn_stays_retiring_until_it_can_be_deleted() {
        // h1's web placement went, then its directory became unreadable
        // before the reconcile: the DN is held, so the reconcile must not
        // count it as deleted, or it would be forgotten when h1 leaves.
        let mut index = east();
        upsert(&mut index, "h1", info("east", "dc1", D1));
        place(&mut index, "h1", "web.a#1");
        unplace(&mut index, "h1", "web.a#1");
        let unknown = index.apply(&TreeEvent::PlacementsUnknown { host: host("h1") });
        assert!(unknown.dirty.is_empty() && !unknown.resync);
        assert_eq!(index.held(), dns(&[D1]));
        assert!(
            index.retiring(&proid("web")).is_empty(),
            "held: not to delete now"
        );
        let planned = index.retiring(&proid("web"));
        index.clear_retiring(&proid("web"), &planned);

        let left = remove_server(&mut index, "h1");
        assert!(left.resync, "no longer held: every group is compared");
        assert!(index.held().is_empty());
        assert_eq!(
            index.retiring(&proid("web")),
            dns(&[D1]),
            "still ours to delete"
        );
    }

    #[test]
    fn a_listing_replaces_what_was_known_and_ends_the_hold() {
        let mut index = east();
        upsert(&mut index, "h1", info("east", "dc1", D1));
        place(&mut index, "h1", "web.a#1");
        place(&mut index, "h1", "db.a#1");
        index.apply(&TreeEvent::PlacementsUnknown { host: host("h1") });
        assert_eq!(index.desired(&proid("web")), dns(&[D1]), "last known kept");
        let listed = index.apply(&TreeEvent::PlacementDirListed {
            host: host("h1"),
            instances: ["web.a#1", "x.a#1"].map(String::from).into(),
        });
        assert_eq!(listed.dirty, proids(&["db", "x"]));
        assert!(listed.resync);
        assert_eq!(index.retiring(&proid("db")), dns(&[D1]));
        assert_eq!(index.desired(&proid("x")), dns(&[D1]));
        // Listed while nothing was unknown: a plain replacement.
        let again = index.apply(&TreeEvent::PlacementDirListed {
            host: host("h1"),
            instances: ["x.a#1"].map(String::from).into(),
        });
        assert_eq!(again.dirty, proids(&["web"]));
        assert!(!again.resync);
    }

    #[test]
    fn a_placement_removed_just_before_its_host_leaves_is_still_retired() {
        // The reconcile for the removal may not have run when the host
        // leaves scope; the DN must stay deletable from the group.
        let mut index = east();
        upsert(&mut index, "h1", info("east", "dc1", D1));
        place(&mut index, "h1", "web.a#1");
        let applied = unplace(&mut index, "h1", "web.a#1");
        assert_eq!(applied.dirty, proids(&["web"]));
        remove_server(&mut index, "h1");
        assert!(!index.is_managed(&dn(D1)));
        assert_eq!(index.retiring(&proid("web")), dns(&[D1]));
    }

    #[test]
    fn domain_controllers_most_hosts_first() {
        let mut index = east();
        upsert(&mut index, "h1", info("east", "dc-b.ad", "CN=h1"));
        upsert(&mut index, "h2", info("east", "DC-B.ad", "CN=h2"));
        upsert(&mut index, "h3", info("east", "dc-c.ad", "CN=h3"));
        upsert(&mut index, "h4", info("east", "dc-a.ad", "CN=h4"));
        upsert(&mut index, "h5", info("west", "dc-z.ad", "CN=h5"));
        assert_eq!(index.dcs(), ["dc-b.ad", "dc-a.ad", "dc-c.ad"]);
        assert_eq!(index.stats().servers_in_scope, 4);
    }

    #[test]
    fn from_snapshot_and_diff_dirty() {
        let mut snapshot = Snapshot::default();
        snapshot.servers.insert(host("h1"), info("east", "dc1", D1));
        snapshot.servers.insert(host("h2"), info("east", "dc1", D3));
        snapshot
            .servers
            .insert(host("h3"), Err(ServerError::NotAMapping));
        snapshot
            .placements
            .insert(host("h1"), ["web.a#1", "db.a#1"].map(String::from).into());
        snapshot
            .placements
            .insert(host("h3"), ["web.a#2"].map(String::from).into());
        snapshot
            .servers
            .insert(host("h4"), info("east", "dc1", "CN=h4\\"));
        let glob = PartitionGlob::parse("east").expect("glob");
        let (old, warnings) = Index::from_snapshot_with_warnings(glob.clone(), snapshot.clone());
        assert_eq!(
            warnings.len(),
            1,
            "broken files are the scan's to report: {warnings:?}"
        );
        assert!(warnings[0].contains("servers/h4") && warnings[0].contains("nt.dn"));
        let mut by_events = Index::new(glob.clone());
        for event in snapshot.events() {
            by_events.apply(&event);
        }
        assert_eq!(old.desired_snapshot(), by_events.desired_snapshot());
        assert_eq!(old.proids(), [proid("db"), proid("web")]);
        assert_eq!(old.desired(&proid("web")), dns(&[D1]));
        assert_eq!(
            old.stats(),
            IndexStats {
                servers_in_scope: 2,
                placements: 2,
                proids: 2
            }
        );
        assert!(old.diff_dirty(&old.clone()).is_empty());

        // What a rescan found that the events missed, applied as the daemon
        // applies it: as the events between the two snapshots.
        let before = snapshot.clone();
        snapshot
            .placements
            .insert(host("h2"), ["web.a#3"].map(String::from).into());
        snapshot
            .placements
            .get_mut(&host("h1"))
            .expect("h1")
            .remove("db.a#1");
        let (new, dirty) = rescan(&old, &before, &snapshot);
        assert_eq!(dirty, proids(&["db", "web"]));
        assert_eq!(old.diff_dirty(&new), dirty);
        assert_eq!(
            new.retiring(&proid("db")),
            dns(&[D1]),
            "left while unobserved"
        );
        assert!(new.diff_dirty(&new.clone()).is_empty());
    }

    /// `index` (built from `old`) after the events that turn `old` into
    /// `new`, and the proids they made dirty.
    fn rescan(index: &Index, old: &Snapshot, new: &Snapshot) -> (Index, BTreeSet<Proid>) {
        let mut index = index.clone();
        let mut dirty = BTreeSet::new();
        for event in old.diff(new) {
            dirty.extend(index.apply(&event).dirty);
        }
        (index, dirty)
    }

    #[test]
    fn a_snapshot_loaded_into_an_empty_index_keeps_its_host_ous_and_moves_the_placements() {
        let ou = dn("OU=Hosts,DC=ad,DC=com");
        let mut snapshot = Snapshot::default();
        snapshot.servers.insert(host("h1"), info("east", "dc1", D1));
        snapshot
            .servers
            .insert(host("h2"), Err(ServerError::NotYaml("truncated".into())));
        snapshot
            .placements
            .insert(host("h1"), ["web.a#1", "db.a#2"].map(String::from).into());
        snapshot
            .placements
            .insert(host("h3"), ["web.a#3"].map(String::from).into());
        snapshot.unknown.insert(host("h4"));

        // The same index, event by event.
        let mut replayed = east().with_host_ous(vec![ou.clone()]);
        let mut replay_warnings = Vec::new();
        for event in snapshot.events() {
            replay_warnings.extend(replayed.apply(&event).warning);
        }

        let mut loaded = east().with_host_ous(vec![ou.clone()]);
        assert!(loaded.is_empty());
        let servers = snapshot.servers.clone();
        let warnings = loaded.load(&mut snapshot);
        assert_eq!(warnings, replay_warnings, "every event's warning, in order");
        assert!(
            warnings[0].contains("members under --host-ou are not removed"),
            "{warnings:?}"
        );
        assert!(snapshot.placements.is_empty(), "moved into the index");
        assert_eq!(snapshot.servers, servers, "the servers stay");
        assert!(snapshot.unknown.contains(&host("h4")));
        assert!(!loaded.is_empty());
        assert_eq!(loaded.desired_snapshot(), replayed.desired_snapshot());
        assert_eq!(loaded.stats(), replayed.stats());
        assert_eq!(loaded.stats(), loaded.counted_stats(), "the counters kept");
        assert_eq!(loaded.held(), replayed.held());
        assert_eq!(
            loaded.host_ous_suspended(),
            replayed.host_ous_suspended(),
            "h2's file was never usable"
        );
        assert!(loaded.host_ous_suspended());
        assert_eq!(
            loaded.placements_of(&host("h3")),
            Some(&["web.a#3".to_owned()].into()),
            "a host out of scope keeps its placements"
        );
        assert_eq!(loaded.placements_of(&host("h2")), None);
        assert!(loaded.diff_dirty(&replayed).is_empty());
    }

    #[test]
    fn a_rescan_keeps_last_good_definitions_and_retires_vanished_hosts() {
        let mut old = east();
        upsert(&mut old, "h1", info("east", "dc1", D1));
        upsert(&mut old, "h2", info("east", "dc1", D3));
        place(&mut old, "h1", "web.a#1");
        place(&mut old, "h2", "web.a#2");
        remove_server(&mut old, "h2");
        upsert(&mut old, "h2", info("east", "dc1", D3));
        assert!(old.retiring(&proid("web")).is_empty());
        unplace(&mut old, "h2", "web.a#2");
        assert_eq!(
            old.retiring(&proid("web")),
            dns(&[D3]),
            "not yet reconciled"
        );

        // The tree as the events left it, then as a rescan finds it.
        let mut before = Snapshot::default();
        before.servers.insert(host("h1"), info("east", "dc1", D1));
        before.servers.insert(host("h2"), info("east", "dc1", D3));
        before
            .placements
            .insert(host("h1"), ["web.a#1"].map(String::from).into());
        before.placements.insert(host("h2"), BTreeSet::new());
        let mut snapshot = Snapshot::default();
        snapshot
            .servers
            .insert(host("h1"), Err(ServerError::NotYaml("truncated".into())));
        snapshot
            .placements
            .insert(host("h1"), ["web.a#1"].map(String::from).into());
        let (new, dirty) = rescan(&old, &before, &snapshot);
        assert!(dirty.is_empty(), "{dirty:?}");
        assert_eq!(
            new.desired(&proid("web")),
            dns(&[D1]),
            "last good definition kept"
        );
        assert!(!new.is_managed(&dn(D3)));
        assert_eq!(new.retiring(&proid("web")), dns(&[D3]), "carried over");
        assert!(old.diff_dirty(&new).is_empty());

        let fresh = Index::from_snapshot(old.partition.clone(), snapshot);
        assert!(
            fresh.proids().is_empty(),
            "without history the host is out of scope"
        );
    }
}

/// Incremental application against a rebuild from the final tree, over random
/// event sequences in a small universe.
#[cfg(test)]
mod property {
    use super::*;
    use proptest::prelude::*;

    const HOSTS: [&str; 3] = ["h1", "h2", "h3"];
    const INSTANCES: [&str; 6] = [
        "p1.web#1",
        "p1.web#2",
        "p2.db#1",
        "p3.x#1",
        "p3.x#2",
        "noproid#1",
    ];
    const PROIDS: [&str; 3] = ["p1", "p2", "p3"];
    const GLOB: &str = "east*";

    /// The server files a host may have: in and out of scope, an alternative
    /// spelling of the same DN, a DN shared by hosts, and unusable files.
    fn server_file(host: &str, kind: u8) -> Result<ServerInfo, ServerError> {
        let make = |partition: Option<&str>, dc: Option<&str>, dn: Option<String>| {
            Ok(ServerInfo {
                partition: partition.map(String::from),
                dc: dc.map(String::from),
                dn,
            })
        };
        let upper = host.to_uppercase();
        match kind {
            0 => make(Some("east"), Some("dc1"), Some(dn_a(host))),
            1 => make(
                Some("east-2"),
                Some("DC1"),
                Some(format!("cn = {upper} , ou=hosts,dc=AD,dc=com")),
            ),
            2 => make(Some("east"), Some("dc2"), Some(dn_b(host))),
            3 => make(Some("east"), Some("dc1"), Some(DN_SHARED.into())),
            4 => make(Some("west"), Some("dc1"), Some(dn_a(host))),
            5 => make(Some("east"), Some("dc1"), Some(format!("CN={host}\\"))),
            6 => make(Some("east"), Some("dc1"), None),
            7 => Err(ServerError::NotYaml("truncated".into())),
            8 => make(None, Some("dc1"), Some(dn_a(host))),
            9 => make(Some("east-3"), Some("dc3"), Some(dn_a(host))),
            _ => make(Some("west"), Some("dc1"), Some("CN=\\".into())),
        }
    }

    fn dn_a(host: &str) -> String {
        format!("CN={host},OU=Hosts,DC=ad,DC=com")
    }

    fn dn_b(host: &str) -> String {
        format!("CN={host}-b,OU=Hosts,DC=ad,DC=com")
    }

    const DN_SHARED: &str = "CN=shared,OU=Hosts,DC=ad,DC=com";

    fn universe_dns() -> Vec<Dn> {
        let mut dns = vec![Dn::parse(DN_SHARED).expect("dn")];
        for host in HOSTS {
            dns.push(Dn::parse(&dn_a(host)).expect("dn"));
            dns.push(Dn::parse(&dn_b(host)).expect("dn"));
        }
        dns
    }

    #[derive(Debug, Clone)]
    enum Op {
        Event(TreeEvent),
        /// The reconciler gets round to a proid's groups.
        Reconcile(usize),
    }

    fn op() -> impl Strategy<Value = Op> {
        let host = (0..HOSTS.len()).prop_map(|h| HostName::new(HOSTS[h]).expect("host"));
        let instance = (0..INSTANCES.len()).prop_map(|i| INSTANCES[i].to_owned());
        prop_oneof![
            4 => (host.clone(), 0u8..11).prop_map(|(host, kind)| {
                let info = server_file(host.as_str(), kind);
                Op::Event(TreeEvent::ServerUpserted { host, info })
            }),
            1 => host.clone().prop_map(|host| Op::Event(TreeEvent::ServerRemoved { host })),
            5 => (host.clone(), instance.clone()).prop_map(|(host, instance)| {
                Op::Event(TreeEvent::PlacementAdded { host, instance })
            }),
            3 => (host.clone(), instance).prop_map(|(host, instance)| {
                Op::Event(TreeEvent::PlacementRemoved { host, instance })
            }),
            1 => host.clone().prop_map(|host| Op::Event(TreeEvent::PlacementDirRemoved { host })),
            1 => (host.clone(), proptest::bits::u8::masked(0b11_1111)).prop_map(|(host, bits)| {
                // Listings never hold names without a proid: the scan left them out.
                let instances = INSTANCES
                    .iter()
                    .enumerate()
                    .filter(|(i, name)| bits & (1 << i) != 0 && Proid::name_in(name).is_some())
                    .map(|(_, name)| (*name).to_owned())
                    .collect();
                Op::Event(TreeEvent::PlacementDirListed { host, instances })
            }),
            1 => host.prop_map(|host| Op::Event(TreeEvent::PlacementsUnknown { host })),
            2 => (0..PROIDS.len()).prop_map(Op::Reconcile),
        ]
    }

    /// The tree as files, plus what the rules say each host's definition
    /// should come from.
    #[derive(Default)]
    struct Model {
        /// The server files as they are now.
        files: BTreeMap<HostName, Result<ServerInfo, ServerError>>,
        /// Per host, the last file that was usable (in scope or not): an
        /// unusable file leaves the host as that one made it.
        last_usable: BTreeMap<HostName, ServerInfo>,
        placements: BTreeMap<HostName, BTreeSet<String>>,
        /// Hosts whose directory was last found unreadable.
        unknown: BTreeSet<HostName>,
    }

    impl Model {
        fn apply(&mut self, event: &TreeEvent, glob: &PartitionGlob) {
            match event {
                TreeEvent::ServerUpserted { host, info } => {
                    self.files.insert(host.clone(), info.clone());
                    match info {
                        Ok(info) if !unusable(info, glob) => {
                            self.last_usable.insert(host.clone(), info.clone());
                        }
                        _ => {}
                    }
                }
                TreeEvent::ServerRemoved { host } => {
                    self.files.remove(host);
                    self.last_usable.remove(host);
                }
                TreeEvent::PlacementAdded { host, instance } => {
                    // The scan never reports names without a proid.
                    if Proid::from_instance(instance).is_some() {
                        self.placements
                            .entry(host.clone())
                            .or_default()
                            .insert(instance.clone());
                    }
                }
                TreeEvent::PlacementRemoved { host, instance } => {
                    if let Some(set) = self.placements.get_mut(host) {
                        set.remove(instance);
                    }
                }
                TreeEvent::PlacementDirRemoved { host } => {
                    self.placements.remove(host);
                    self.unknown.remove(host);
                }
                TreeEvent::PlacementDirListed { host, instances } => {
                    self.placements.insert(host.clone(), instances.clone());
                    self.unknown.remove(host);
                }
                TreeEvent::PlacementsUnknown { host } => {
                    self.unknown.insert(host.clone());
                }
            }
        }

        /// The tree as a scan would see it, except that each server file is
        /// replaced by the last usable one, which is what history makes of it.
        fn snapshot(&self) -> Snapshot {
            let servers = self
                .files
                .iter()
                .map(|(host, file)| {
                    let info = match self.last_usable.get(host) {
                        Some(usable) => Ok(usable.clone()),
                        None => file.clone(),
                    };
                    (host.clone(), info)
                })
                .collect();
            Snapshot {
                servers,
                placements: self.placements.clone(),
                unknown: self.unknown.clone(),
                warnings: Vec::new(),
            }
        }
    }

    /// A file in the partition with both keys but a DN that does not parse.
    fn unusable(info: &ServerInfo, glob: &PartitionGlob) -> bool {
        glob.matches(info.partition.as_deref().unwrap_or(""))
            && present(&info.dc).is_some()
            && present(&info.dn).is_some_and(|dn| Dn::parse(dn).is_err())
    }

    fn all_retiring(index: &Index) -> BTreeMap<Proid, BTreeSet<Dn>> {
        index.retiring.clone()
    }

    /// One step of a reconciler over fake groups: managed members that are
    /// not desired, and retiring DNs, are removed and desired DNs added,
    /// held DNs left as they are; then the retiring DNs are cleared.
    fn reconcile(index: &mut Index, groups: &mut BTreeMap<Proid, BTreeSet<Dn>>, proid: &Proid) {
        let want = index.desired(proid);
        let retiring = index.retiring(proid);
        let held = index.held();
        let members = groups.entry(proid.clone()).or_default();
        members.retain(|m| {
            held.contains(m)
                || !((index.is_managed(m) || retiring.contains(m)) && !want.contains(m))
        });
        members.extend(want.difference(&held).cloned());
        index.clear_retiring(proid, &retiring);
    }

    /// Applies the events of `ops` to the index and the model.
    fn run(ops: &[Op], index: &mut Index, model: &mut Model, glob: &PartitionGlob) {
        for op in ops {
            if let Op::Event(event) = op {
                index.apply(event);
                model.apply(event, glob);
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// The daemon keeps its placements in the index only: a rescan's
        /// diff from the index finds what a diff from the whole tree finds.
        #[test]
        fn a_rescan_from_the_index_finds_what_changed(
            before in proptest::collection::vec(op(), 0..40),
            missed in proptest::collection::vec(op(), 0..40),
        ) {
            let glob = PartitionGlob::parse(GLOB).expect("glob");
            let mut index = Index::new(glob.clone());
            let mut model = Model::default();
            run(&before, &mut index, &mut model, &glob);
            let tree = model.snapshot();
            let mut known = tree.clone();
            known.placements.clear();
            prop_assert!(
                known.diff_placed(&index, &tree).is_empty(),
                "the index holds the tree's placements"
            );

            // Changes no event told of, then a rescan.
            let mut later = model;
            let mut unobserved = index.clone();
            run(&missed, &mut unobserved, &mut later, &glob);
            // (The index those events would make is not what a rescan
            // makes: a scan cannot see a removal followed by an unusable
            // file, nor into an unreadable directory.)
            let newer = later.snapshot();
            let (mut from_index, mut from_tree) = (index.clone(), index.clone());
            let (mut dirty_index, mut dirty_tree) = (BTreeSet::new(), BTreeSet::new());
            for event in known.diff_placed(&index, &newer) {
                dirty_index.extend(from_index.apply(&event).dirty);
            }
            for event in tree.diff(&newer) {
                dirty_tree.extend(from_tree.apply(&event).dirty);
            }
            prop_assert_eq!(&dirty_index, &dirty_tree);
            prop_assert_eq!(from_index.desired_snapshot(), from_tree.desired_snapshot());
            prop_assert_eq!(from_index.stats(), from_tree.stats());
            prop_assert_eq!(from_index.held(), from_tree.held());
            prop_assert_eq!(&from_index.retiring, &from_tree.retiring);
            let mut after = newer.clone();
            after.placements.clear();
            prop_assert!(after.diff_placed(&from_index, &newer).is_empty());
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn incremental_equals_rebuild(ops in proptest::collection::vec(op(), 0..60)) {
            let glob = PartitionGlob::parse(GLOB).expect("glob");
            let mut index = Index::new(glob.clone());
            let mut model = Model::default();
            let mut groups: BTreeMap<Proid, BTreeSet<Dn>> = BTreeMap::new();
            let mut pending: BTreeSet<Proid> = BTreeSet::new();
            let dns = universe_dns();

            for op in &ops {
                let event = match op {
                    Op::Reconcile(p) => {
                        let proid = Proid::new(PROIDS[*p]).expect("proid");
                        if pending.remove(&proid) {
                            reconcile(&mut index, &mut groups, &proid);
                        }
                        continue;
                    }
                    Op::Event(event) => event,
                };
                let desired_before = index.desired_snapshot();
                let retiring_before = all_retiring(&index);
                let applied = index.apply(event);
                model.apply(event, &glob);

                // Dirty is exactly: desired set changed, or retiring grew.
                let desired_after = index.desired_snapshot();
                let retiring_after = all_retiring(&index);
                let mut expected = BTreeSet::new();
                for p in PROIDS {
                    let p = Proid::new(p).expect("proid");
                    if desired_before.get(&p) != desired_after.get(&p) {
                        expected.insert(p.clone());
                    }
                    let empty = BTreeSet::new();
                    let before = retiring_before.get(&p).unwrap_or(&empty);
                    if retiring_after.get(&p).is_some_and(|after| !after.is_subset(before)) {
                        expected.insert(p);
                    }
                }
                prop_assert_eq!(&applied.dirty, &expected, "event {:?}", event);
                pending.extend(applied.dirty);
                if applied.resync {
                    // A full sync: every proid's groups are compared.
                    pending.extend(PROIDS.map(|p| Proid::new(p).expect("proid")));
                }

                // Never retiring what is wanted.
                for (p, retiring) in &retiring_after {
                    prop_assert!(retiring.is_disjoint(&index.desired(p)));
                }

                // Same state as a rebuild from the tree.
                let rebuilt = Index::from_snapshot(glob.clone(), model.snapshot());
                prop_assert_eq!(&desired_after, &rebuilt.desired_snapshot(), "after {:?}", event);
                prop_assert_eq!(index.stats(), index.counted_stats(), "after {:?}", event);
                prop_assert_eq!(rebuilt.stats(), rebuilt.counted_stats());
                prop_assert_eq!(index.stats(), rebuilt.stats());
                prop_assert_eq!(index.proids(), rebuilt.proids());
                prop_assert_eq!(index.dcs(), rebuilt.dcs());
                prop_assert_eq!(index.held(), rebuilt.held());
                for dn in &dns {
                    prop_assert_eq!(index.is_managed(dn), rebuilt.is_managed(dn), "{}", dn);
                }
                // A rebuild has no history: nothing retires, nothing differs.
                prop_assert!(index.diff_dirty(&rebuilt).is_empty());
                let retiring: BTreeSet<Proid> = retiring_after.keys().cloned().collect();
                prop_assert_eq!(rebuilt.diff_dirty(&index), retiring);
            }

            // Once every dirty proid is reconciled, each group holds exactly
            // its desired members: nothing that ever was ours is left behind,
            // except what is held, which is left as it was.
            for p in std::mem::take(&mut pending) {
                reconcile(&mut index, &mut groups, &p);
            }
            let held = index.held();
            for p in PROIDS {
                let p = Proid::new(p).expect("proid");
                let members = groups.get(&p).cloned().unwrap_or_default();
                let members: BTreeSet<Dn> = members.difference(&held).cloned().collect();
                let want: BTreeSet<Dn> = index.desired(&p).difference(&held).cloned().collect();
                prop_assert_eq!(members, want, "group of {}", p);
            }
        }
    }
}

//! An in-memory directory over LDIF records: the fake server of the tests
//! and the engine under the LDIF file backend.
//!
//! It answers like the servers we meet, chosen by [`Flavour`]: one that
//! honours permissive modify (AD and Samba with the control), OpenLDAP
//! (codes 20 and 16) and AD without the control (codes 68 and 53); in the
//! last two a request applies nothing when any part of it fails.
//!
//! In the tests it is also the fake server: `MemoryDirectory::new` makes
//! one that records every call and can be told to fail the next calls, so
//! that tests can script a busy or unreachable server without a mocking
//! framework. The call log and the fault injection are compiled into test
//! builds only: the release binary has just the engine, which keeps nothing
//! per call, so a backend built on it (the LDIF file's) does not grow with
//! the number of calls a long-running daemon makes.
//!
//! Bad data never fails a whole search: a group whose DN does not parse, or
//! a `member` value that does not, is skipped and remembered as a warning.
//! It does not check that an added member's entry exists (AD answers 32 to
//! that); the hosts are usually not in the file at all.

use std::collections::{BTreeSet, HashSet};
use std::sync::{Mutex, MutexGuard, PoisonError};

use async_trait::async_trait;

use super::{rc, Capabilities, DirError, Directory, Group, MemberChange, Op};
use crate::ldif::{self, Record};
use crate::model::{Dn, DnCache};

/// objectClassViolation: what a server answers to `member` on an entry that
/// is not a group.
const OBJECT_CLASS_VIOLATION: u32 = 65;

/// Which server the directory behaves like when asked to change members.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavour {
    /// Advertises permissive modify: adding a present value or deleting an
    /// absent one succeeds and changes nothing.
    Permissive,
    /// OpenLDAP: add present → 20, delete absent → 16; all or nothing.
    OpenLdap,
    /// Active Directory without the control: add present → 68, delete
    /// absent → 53 "not a member"; all or nothing.
    ActiveDirectory,
}

#[cfg(test)]
pub use fake::Call;

/// A record with its DN parsed once (`None` when it does not parse).
#[derive(Debug)]
struct Entry {
    record: Record,
    dn: Option<Dn>,
}

/// A record and its DN, parsed by whoever read the record.
pub(crate) type Parsed = (Record, Option<Dn>);

impl From<Parsed> for Entry {
    fn from((record, dn): Parsed) -> Entry {
        Entry { record, dn }
    }
}

/// Parses the records' DNs (`None` for one that does not parse).
pub(crate) fn parse_dns(records: Vec<Record>) -> Vec<Parsed> {
    records
        .into_iter()
        .map(|record| {
            let dn = Dn::parse(&record.dn).ok();
            (record, dn)
        })
        .collect()
}

#[derive(Debug, Default)]
struct State {
    entries: Vec<Entry>,
    warnings: BTreeSet<String>,
    generation: u64,
    /// The fake's call log and pending faults; `None` for the engine under
    /// a backend, which records nothing even in a test build.
    #[cfg(test)]
    fake: Option<fake::Fake>,
}

impl State {
    /// The groups at or below `base`, in record order.
    fn groups(&mut self, base: &Dn) -> Vec<Group> {
        let mut groups = Vec::new();
        let mut dns = DnCache::default();
        for entry in &self.entries {
            if !is_group(&entry.record) {
                continue;
            }
            match &entry.dn {
                Some(dn) if dn.is_within(base) => {
                    groups.push(to_group(dn, &entry.record, &mut dns, &mut self.warnings));
                }
                Some(_) => {}
                None => {
                    let err = Dn::parse(&entry.record.dn).err();
                    let why = err.map_or_else(String::new, |e| e.to_string());
                    self.warnings.insert(format!("skipping group entry: {why}"));
                }
            }
        }
        groups
    }
}

/// An in-memory directory; see the module documentation.
#[derive(Debug)]
pub struct MemoryDirectory {
    flavour: Flavour,
    state: Mutex<State>,
}

impl MemoryDirectory {
    /// The engine of a backend, holding `entries` (their DNs parsed
    /// already) and answering like `flavour`. It keeps no record of the
    /// calls made to it.
    pub(crate) fn engine(entries: Vec<Parsed>, flavour: Flavour) -> Self {
        MemoryDirectory {
            flavour,
            state: Mutex::new(State {
                entries: entries.into_iter().map(Entry::from).collect(),
                ..State::default()
            }),
        }
    }

    /// Replaces every record (the generation moves on); warnings about the
    /// old records are forgotten.
    pub(crate) fn reset(&self, entries: Vec<Parsed>) {
        let mut state = self.lock();
        state.entries = entries.into_iter().map(Entry::from).collect();
        state.warnings.clear();
        state.generation += 1;
    }

    /// The records as they are now, as an LDIF content file.
    pub(crate) fn to_ldif(&self) -> String {
        ldif::write(self.lock().entries.iter().map(|e| &e.record))
    }

    /// The records as they are now, with their parsed DNs.
    pub(crate) fn entries(&self) -> Vec<Parsed> {
        let state = self.lock();
        state
            .entries
            .iter()
            .map(|e| (e.record.clone(), e.dn.clone()))
            .collect()
    }

    /// Applies one member change like [`Directory::modify_members`] (but,
    /// in a fake, without recording a call or using up a fault); whether
    /// anything changed.
    pub(crate) fn change_members(
        &self,
        group: &Dn,
        change: &MemberChange,
    ) -> Result<bool, DirError> {
        let mut state = self.lock();
        self.change_locked(&mut state, group, change)
    }

    fn change_locked(
        &self,
        state: &mut State,
        group: &Dn,
        change: &MemberChange,
    ) -> Result<bool, DirError> {
        let Some(at) = state
            .entries
            .iter()
            .position(|e| e.dn.as_ref() == Some(group))
        else {
            return Err(self.refuse(group, rc::NO_SUCH_OBJECT, "no such object".to_owned()));
        };
        let record = &state.entries[at].record;
        if !is_group(record) {
            return Err(self.refuse(
                group,
                OBJECT_CLASS_VIOLATION,
                "member is not allowed: the entry is not a group".to_owned(),
            ));
        }
        match self.apply(group, &record.attrs, change)? {
            Some(attrs) => {
                state.entries[at].record.attrs = attrs;
                state.generation += 1;
                Ok(true)
            }
            None => Ok(false),
        }
    }

    /// The server this directory behaves like.
    pub fn flavour(&self) -> Flavour {
        self.flavour
    }

    /// The records as they are now, in their original order.
    pub fn records(&self) -> Vec<Record> {
        self.snapshot().1
    }

    /// A counter that moves whenever a modify changed a record.
    pub fn generation(&self) -> u64 {
        self.lock().generation
    }

    /// The generation and the records that go with it, read together.
    pub(crate) fn snapshot(&self) -> (u64, Vec<Record>) {
        let state = self.lock();
        let records = state.entries.iter().map(|e| e.record.clone()).collect();
        (state.generation, records)
    }

    /// Data skipped while reading (unparsable DNs), sorted and without repeats.
    pub fn warnings(&self) -> Vec<String> {
        self.lock().warnings.iter().cloned().collect()
    }

    /// The state stays consistent at every point a panic could occur (it is
    /// only changed by whole assignments), so a poisoned lock is still good.
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn refuse(&self, group: &Dn, code: u32, message: String) -> DirError {
        DirError::Result {
            op: Op::Modify,
            dn: group.as_str().to_owned(),
            code,
            message,
        }
    }

    /// Applies `change` to a copy of `attrs`; the copy is returned only when
    /// every part succeeded, so a failure applies nothing.
    fn apply(
        &self,
        group: &Dn,
        attrs: &[(String, String)],
        change: &MemberChange,
    ) -> Result<Option<Vec<(String, String)>>, DirError> {
        // Each member value is parsed once per request: comparing every
        // requested value against every member, parsing as it goes, made a
        // sync of large groups quadratic.
        let parsed: Vec<Option<Dn>> = attrs
            .iter()
            .map(|(a, v)| {
                if is_member(a) {
                    Dn::parse(v).ok()
                } else {
                    None
                }
            })
            .collect();
        let mut present: HashSet<Dn> = parsed.iter().flatten().cloned().collect();
        let mut added: Vec<&Dn> = Vec::new();
        for value in &change.add {
            if !present.insert(value.clone()) {
                match self.flavour {
                    Flavour::Permissive => continue,
                    Flavour::OpenLdap => {
                        return Err(self.refuse(
                            group,
                            rc::ATTRIBUTE_OR_VALUE_EXISTS,
                            format!("modify/add: member: value {value} already exists"),
                        ))
                    }
                    Flavour::ActiveDirectory => {
                        return Err(self.refuse(
                            group,
                            rc::ENTRY_ALREADY_EXISTS,
                            format!("{value} is already a member of the group"),
                        ))
                    }
                }
            }
            added.push(value);
        }
        let mut removed: HashSet<&Dn> = HashSet::new();
        for value in &change.delete {
            if present.remove(value) {
                removed.insert(value);
                continue;
            }
            match self.flavour {
                Flavour::Permissive => {}
                Flavour::OpenLdap => {
                    return Err(self.refuse(
                        group,
                        rc::NO_SUCH_ATTRIBUTE,
                        format!("modify/delete: member: no such value {value}"),
                    ))
                }
                Flavour::ActiveDirectory => {
                    return Err(self.refuse(
                        group,
                        rc::UNWILLING_TO_PERFORM,
                        format!("{value} is not a member of the group"),
                    ))
                }
            }
        }
        if added.is_empty() && removed.is_empty() {
            return Ok(None);
        }
        // New values go after the existing ones, spelled like them, so the
        // saved file reads naturally; a value added and deleted in the same
        // request ends up absent, as if applied in order.
        let last = attrs.iter().rposition(|(a, _)| is_member(a));
        let name = last.map_or("member", |i| attrs[i].0.as_str());
        let at = last.map_or(attrs.len(), |i| i + 1);
        let new_values: Vec<(String, String)> = added
            .iter()
            .filter(|v| !removed.contains(*v))
            .map(|v| (name.to_owned(), v.as_str().to_owned()))
            .collect();
        let mut out = Vec::with_capacity(attrs.len() + new_values.len());
        for (i, (attr, dn)) in attrs.iter().zip(&parsed).enumerate() {
            if i == at {
                out.extend(new_values.iter().cloned());
            }
            if dn.as_ref().is_some_and(|dn| removed.contains(dn)) {
                continue;
            }
            out.push(attr.clone());
        }
        if at == attrs.len() {
            out.extend(new_values);
        }
        Ok(Some(out))
    }
}

fn is_member(attr: &str) -> bool {
    attr.eq_ignore_ascii_case("member")
}

fn is_group(record: &Record) -> bool {
    record
        .attrs
        .iter()
        .any(|(a, v)| a.eq_ignore_ascii_case("objectClass") && v.eq_ignore_ascii_case("group"))
}

fn to_group(dn: &Dn, record: &Record, dns: &mut DnCache, warnings: &mut BTreeSet<String>) -> Group {
    let sam_account_name = record
        .attrs
        .iter()
        .find(|(a, _)| a.eq_ignore_ascii_case("sAMAccountName"))
        .map(|(_, v)| v.clone())
        .unwrap_or_default();
    let mut members = BTreeSet::new();
    for (attr, value) in &record.attrs {
        if !is_member(attr) {
            continue;
        }
        match dns.parse(value) {
            Ok(member) => {
                members.insert(member);
            }
            Err(err) => {
                warnings.insert(format!("group {dn}: skipping member value: {err}"));
            }
        }
    }
    Group {
        dn: dn.clone(),
        sam_account_name,
        members,
    }
}

#[async_trait]
impl Directory for MemoryDirectory {
    async fn capabilities(&self) -> Result<Capabilities, DirError> {
        #[cfg(test)]
        self.lock().fake_call(Call::Capabilities)?;
        Ok(Capabilities {
            permissive_modify: self.flavour == Flavour::Permissive,
        })
    }

    async fn search_groups(&self, base: &Dn) -> Result<Vec<Group>, DirError> {
        let mut state = self.lock();
        #[cfg(test)]
        state.fake_call(Call::SearchGroups { base: base.clone() })?;
        Ok(state.groups(base))
    }

    async fn find_group(&self, base: &Dn, name: &str) -> Result<Option<Group>, DirError> {
        let mut state = self.lock();
        #[cfg(test)]
        state.fake_call(Call::FindGroup {
            base: base.clone(),
            name: name.to_owned(),
        })?;
        let name = name.to_lowercase();
        Ok(state
            .groups(base)
            .into_iter()
            .find(|g| g.sam_account_name.to_lowercase() == name))
    }

    async fn read_group(&self, dn: &Dn) -> Result<Option<Group>, DirError> {
        let mut state = self.lock();
        #[cfg(test)]
        state.fake_call(Call::ReadGroup { dn: dn.clone() })?;
        let state = &mut *state;
        Ok(state
            .entries
            .iter()
            .find(|e| e.dn.as_ref() == Some(dn) && is_group(&e.record))
            .and_then(|e| {
                e.dn.as_ref()
                    .map(|d| to_group(d, &e.record, &mut DnCache::default(), &mut state.warnings))
            }))
    }

    async fn modify_members(&self, group: &Dn, change: &MemberChange) -> Result<(), DirError> {
        let mut state = self.lock();
        #[cfg(test)]
        state.fake_call(Call::Modify {
            group: group.clone(),
            change: change.clone(),
        })?;
        self.change_locked(&mut state, group, change).map(|_| ())
    }

    async fn commit(&self) -> Result<(), DirError> {
        #[cfg(test)]
        self.lock().fake_call(Call::Commit)?;
        Ok(())
    }
}

/// The fake's side: the call log and injected faults. Test builds only.
#[cfg(test)]
mod fake {
    use super::*;

    /// One call made to the directory, in the order made.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub enum Call {
        /// [`Directory::capabilities`].
        Capabilities,
        /// [`Directory::search_groups`].
        SearchGroups {
            /// The search base.
            base: Dn,
        },
        /// [`Directory::find_group`].
        FindGroup {
            /// The search base.
            base: Dn,
            /// The `sAMAccountName` asked for.
            name: String,
        },
        /// [`Directory::read_group`].
        ReadGroup {
            /// The group asked for.
            dn: Dn,
        },
        /// [`Directory::modify_members`].
        Modify {
            /// The group.
            group: Dn,
            /// The change as asked.
            change: MemberChange,
        },
        /// [`Directory::commit`].
        Commit,
    }

    /// Which calls an injected fault hits.
    #[derive(Debug)]
    enum Target {
        /// `search_groups`, `find_group` and `read_group`.
        Read,
        /// `modify_members`, of one group or of any.
        Modify(Option<Dn>),
        /// `commit`.
        Commit,
    }

    impl Target {
        fn hits(&self, call: &Call) -> bool {
            match (self, call) {
                (
                    Target::Read,
                    Call::SearchGroups { .. } | Call::FindGroup { .. } | Call::ReadGroup { .. },
                ) => true,
                (Target::Modify(None), Call::Modify { .. }) => true,
                (Target::Modify(Some(dn)), Call::Modify { group, .. }) => dn == group,
                (Target::Commit, Call::Commit) => true,
                _ => false,
            }
        }
    }

    #[derive(Debug)]
    struct Fault {
        target: Target,
        err: DirError,
        remaining: usize,
    }

    /// What a fake keeps besides the records.
    #[derive(Debug, Default)]
    pub(super) struct Fake {
        calls: Vec<Call>,
        faults: Vec<Fault>,
    }

    impl State {
        /// In a fake: records `call`, then uses up the oldest injected
        /// fault that hits it (a failed call is recorded too). Nothing in
        /// the engine under a backend.
        pub(super) fn fake_call(&mut self, call: Call) -> Result<(), DirError> {
            let Some(fake) = &mut self.fake else {
                return Ok(());
            };
            let at = fake.faults.iter().position(|f| f.target.hits(&call));
            fake.calls.push(call);
            let Some(at) = at else {
                return Ok(());
            };
            let fault = &mut fake.faults[at];
            let err = fault.err.clone();
            fault.remaining -= 1;
            if fault.remaining == 0 {
                fake.faults.remove(at);
            }
            Err(err)
        }
    }

    impl MemoryDirectory {
        /// A fake directory holding `records`, answering like `flavour`,
        /// that records every call.
        pub fn new(records: Vec<Record>, flavour: Flavour) -> Self {
            MemoryDirectory {
                flavour,
                state: Mutex::new(State {
                    entries: parse_dns(records).into_iter().map(Entry::from).collect(),
                    fake: Some(Fake::default()),
                    ..State::default()
                }),
            }
        }

        /// Every call made so far, oldest first (none for an engine).
        pub fn calls(&self) -> Vec<Call> {
            let state = self.lock();
            state
                .fake
                .as_ref()
                .map_or_else(Vec::new, |f| f.calls.clone())
        }

        /// Makes the next `times` modifies of `group` (of any group when
        /// `None`) fail with `err` before touching anything.
        pub fn fail_next_modify(&self, group: Option<Dn>, err: DirError, times: usize) {
            self.add_fault(Target::Modify(group), err, times);
        }

        /// Makes the next `times` reads (`search_groups`, `find_group`,
        /// `read_group`) fail with `err`.
        pub fn fail_next_read(&self, err: DirError, times: usize) {
            self.add_fault(Target::Read, err, times);
        }

        /// Makes the next `times` commits fail with `err`.
        pub fn fail_next_commit(&self, err: DirError, times: usize) {
            self.add_fault(Target::Commit, err, times);
        }

        fn add_fault(&self, target: Target, err: DirError, times: usize) {
            let mut state = self.lock();
            let fake = state
                .fake
                .as_mut()
                .unwrap_or_else(|| panic!("BUG: a fault injected into a backend's engine"));
            if times > 0 {
                fake.faults.push(Fault {
                    target,
                    err,
                    remaining: times,
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ldif;

    const BASE: &str = "\
dn: OU=Groups,DC=ad,DC=com
objectClass: organizationalUnit

dn: CN=proid1-gmsa-hosts,OU=Groups,DC=ad,DC=com
objectClass: top
objectClass: Group
sAMAccountName: proid1-gmsa-hosts
description: hosts of proid1
member: CN=host1,OU=Hosts,DC=ad,DC=com
member: CN=host2,OU=Hosts,DC=ad,DC=com
whenChanged: 20240101000000.0Z

dn: CN=proid2-gmsa-hosts,OU=Groups,DC=ad,DC=com
objectClass: group
sAMAccountName: PROID2-gmsa-hosts

dn: CN=not-a-group,OU=Groups,DC=ad,DC=com
objectClass: user
sAMAccountName: not-a-group
member: CN=host1,OU=Hosts,DC=ad,DC=com

dn: CN=elsewhere-gmsa-hosts,OU=Other,DC=ad,DC=com
objectClass: group
sAMAccountName: elsewhere-gmsa-hosts
";

    fn dn(s: &str) -> Dn {
        Dn::parse(s).expect("valid DN")
    }

    fn directory(flavour: Flavour) -> MemoryDirectory {
        MemoryDirectory::new(ldif::parse(BASE).expect("valid LDIF"), flavour)
    }

    fn groups_ou() -> Dn {
        dn("OU=Groups,DC=ad,DC=com")
    }

    fn g1() -> Dn {
        dn("CN=proid1-gmsa-hosts,OU=Groups,DC=ad,DC=com")
    }

    fn host(n: u32) -> Dn {
        dn(&format!("CN=host{n},OU=Hosts,DC=ad,DC=com"))
    }

    fn change(add: &[Dn], delete: &[Dn]) -> MemberChange {
        MemberChange {
            add: add.to_vec(),
            delete: delete.to_vec(),
        }
    }

    fn members(group: &Group) -> Vec<String> {
        group
            .members
            .iter()
            .map(|m| m.as_str().to_owned())
            .collect()
    }

    async fn members_of(dir: &MemoryDirectory, group: &Dn) -> Vec<String> {
        let group = dir
            .read_group(group)
            .await
            .expect("read")
            .expect("group exists");
        members(&group)
    }

    fn member_values(dir: &MemoryDirectory, group: &Dn) -> Vec<(String, String)> {
        dir.records()
            .into_iter()
            .find(|r| dn(&r.dn) == *group)
            .expect("record")
            .attrs
            .into_iter()
            .filter(|(a, _)| is_member(a))
            .collect()
    }

    #[tokio::test]
    async fn search_finds_groups_within_the_base_only() {
        let dir = directory(Flavour::Permissive);
        let groups = dir.search_groups(&groups_ou()).await.expect("search");
        let names: Vec<_> = groups.iter().map(|g| g.sam_account_name.as_str()).collect();
        assert_eq!(names, ["proid1-gmsa-hosts", "PROID2-gmsa-hosts"]);
        assert_eq!(
            groups[0].dn.as_str(),
            "CN=proid1-gmsa-hosts,OU=Groups,DC=ad,DC=com"
        );
        assert_eq!(
            members(&groups[0]),
            [
                "CN=host1,OU=Hosts,DC=ad,DC=com",
                "CN=host2,OU=Hosts,DC=ad,DC=com"
            ]
        );
        assert!(groups[1].members.is_empty());
        let all = dir
            .search_groups(&dn("dc=AD,dc=COM"))
            .await
            .expect("search");
        assert_eq!(all.len(), 3);
        assert!(dir.warnings().is_empty());
    }

    #[tokio::test]
    async fn find_and_read_group() {
        let dir = directory(Flavour::Permissive);
        let found = dir
            .find_group(&groups_ou(), "proid2-GMSA-hosts")
            .await
            .expect("find");
        assert_eq!(
            found.map(|g| g.dn),
            Some(dn("CN=proid2-gmsa-hosts,OU=Groups,DC=ad,DC=com"))
        );
        let outside = dir
            .find_group(&groups_ou(), "elsewhere-gmsa-hosts")
            .await
            .expect("find");
        assert_eq!(outside, None);
        assert_eq!(
            dir.find_group(&groups_ou(), "not-a-group")
                .await
                .expect("find"),
            None
        );

        let read = dir
            .read_group(&dn("cn=PROID1-gmsa-hosts, ou=groups, dc=ad, dc=com"))
            .await
            .expect("read")
            .expect("present");
        assert_eq!(read.dn.as_str(), g1().as_str(), "the directory's spelling");
        assert_eq!(read.sam_account_name, "proid1-gmsa-hosts");
        let absent = dn("CN=nope,OU=Groups,DC=ad,DC=com");
        assert_eq!(dir.read_group(&absent).await.expect("read"), None);
        let user = dn("CN=not-a-group,OU=Groups,DC=ad,DC=com");
        assert_eq!(dir.read_group(&user).await.expect("read"), None);
    }

    #[tokio::test]
    async fn unparsable_dns_are_skipped_with_a_warning() {
        let text = "dn: CN=g1,OU=G\nobjectClass: group\nsAMAccountName: g1\n\
                    member: CN=h1,DC=x\nmember: not a dn\nmember: CN=h2,DC=x\n\n\
                    dn: CN=bad,,OU=G\nobjectClass: group\nsAMAccountName: bad\n\n\
                    dn: also bad\nobjectClass: user\n";
        let dir = MemoryDirectory::new(ldif::parse(text).expect("valid"), Flavour::Permissive);
        let groups = dir
            .search_groups(&dn("OU=G"))
            .await
            .expect("search never fails on data");
        assert_eq!(groups.len(), 1);
        assert_eq!(members(&groups[0]), ["CN=h1,DC=x", "CN=h2,DC=x"]);
        let warnings = dir.warnings();
        assert_eq!(warnings.len(), 2, "{warnings:?}");
        assert!(
            warnings.iter().any(|w| w.contains("not a dn")),
            "{warnings:?}"
        );
        assert!(
            warnings.iter().any(|w| w.contains("CN=bad,,OU=G")),
            "{warnings:?}"
        );
        // Asking again does not pile up copies of the same warning.
        dir.search_groups(&dn("OU=G")).await.expect("search");
        assert_eq!(dir.warnings(), warnings);
    }

    #[tokio::test]
    async fn adds_keep_the_given_spelling_and_deletes_match_any_spelling() {
        for flavour in [
            Flavour::Permissive,
            Flavour::OpenLdap,
            Flavour::ActiveDirectory,
        ] {
            let dir = directory(flavour);
            let new = dn("cn=Host3 , ou=hosts,DC=ad,DC=com");
            let gone = dn("CN=HOST1,OU=HOSTS,dc=ad,dc=com");
            let before = dir.generation();
            dir.modify_members(&g1(), &change(&[new], &[gone]))
                .await
                .expect("modify");
            assert!(dir.generation() > before);
            assert_eq!(
                member_values(&dir, &g1()),
                [
                    (
                        "member".to_owned(),
                        "CN=host2,OU=Hosts,DC=ad,DC=com".to_owned()
                    ),
                    (
                        "member".to_owned(),
                        "cn=Host3 , ou=hosts,DC=ad,DC=com".to_owned()
                    ),
                ],
                "{flavour:?}"
            );
            // The other attributes stay, in order, with the new value after
            // the existing members.
            let record = dir.records().into_iter().nth(1).expect("record");
            let names: Vec<_> = record.attrs.iter().map(|(a, _)| a.as_str()).collect();
            assert_eq!(
                names,
                [
                    "objectClass",
                    "objectClass",
                    "sAMAccountName",
                    "description",
                    "member",
                    "member",
                    "whenChanged"
                ]
            );
        }
    }

    #[tokio::test]
    async fn a_value_added_and_deleted_in_one_request_ends_absent_and_every_spelling_goes() {
        let text = "dn: CN=g,OU=G\nobjectClass: group\nsAMAccountName: g\n\
                    member: CN=h1,DC=x\nmember: cn=H1,dc=X\nmember: CN=h2,DC=x\ninfo: last\n";
        for flavour in [
            Flavour::Permissive,
            Flavour::OpenLdap,
            Flavour::ActiveDirectory,
        ] {
            let dir = MemoryDirectory::new(ldif::parse(text).expect("valid"), flavour);
            let group = dn("CN=g,OU=G");
            let (h1, h3) = (dn("CN=H1,DC=X"), dn("CN=h3,DC=x"));
            dir.modify_members(
                &group,
                &change(std::slice::from_ref(&h3), &[h3.clone(), h1]),
            )
            .await
            .expect("every part applies in order");
            let record = dir.records().into_iter().next().expect("record");
            let attrs: Vec<(&str, &str)> = record
                .attrs
                .iter()
                .map(|(a, v)| (a.as_str(), v.as_str()))
                .collect();
            assert_eq!(
                attrs,
                [
                    ("objectClass", "group"),
                    ("sAMAccountName", "g"),
                    ("member", "CN=h2,DC=x"),
                    ("info", "last")
                ],
                "{flavour:?}"
            );
        }
    }

    #[tokio::test]
    async fn first_member_of_an_empty_group_goes_at_the_end() {
        let dir = directory(Flavour::OpenLdap);
        let g2 = dn("CN=proid2-gmsa-hosts,OU=Groups,DC=ad,DC=com");
        dir.modify_members(&g2, &change(&[host(1)], &[]))
            .await
            .expect("modify");
        let record = dir.records().into_iter().nth(2).expect("record");
        assert_eq!(
            record.attrs.last(),
            Some(&("member".to_owned(), host(1).as_str().to_owned()))
        );
        dir.modify_members(&g2, &change(&[], &[host(1)]))
            .await
            .expect("modify");
        assert!(member_values(&dir, &g2).is_empty());
    }

    #[tokio::test]
    async fn permissive_flavour_ignores_present_adds_and_absent_deletes() {
        let dir = directory(Flavour::Permissive);
        assert!(dir.capabilities().await.expect("caps").permissive_modify);
        let before = dir.generation();
        dir.modify_members(&g1(), &change(&[host(1)], &[host(9)]))
            .await
            .expect("no-op succeeds");
        assert_eq!(dir.generation(), before, "nothing changed");
        dir.modify_members(&g1(), &change(&[host(1), host(3)], &[host(9), host(2)]))
            .await
            .expect("partly no-op succeeds");
        assert_eq!(
            members_of(&dir, &g1()).await,
            [
                "CN=host1,OU=Hosts,DC=ad,DC=com",
                "CN=host3,OU=Hosts,DC=ad,DC=com"
            ]
        );
    }

    /// For the strict flavours: the code of each refusal, and that a request
    /// with one bad part leaves the group exactly as it was.
    async fn strict(flavour: Flavour, add_code: u32, delete_code: u32) {
        let dir = directory(flavour);
        assert!(!dir.capabilities().await.expect("caps").permissive_modify);
        let records = dir.records();
        let generation = dir.generation();

        let err = dir
            .modify_members(&g1(), &change(&[host(3), host(1)], &[host(2)]))
            .await
            .expect_err("adding a present value");
        assert_eq!(err.code(), Some(add_code), "{err}");
        assert_eq!(dir.records(), records, "nothing applied");

        let err = dir
            .modify_members(&g1(), &change(&[host(3)], &[host(2), host(9)]))
            .await
            .expect_err("deleting an absent value");
        assert_eq!(err.code(), Some(delete_code), "{err}");
        assert_eq!(dir.records(), records, "nothing applied");
        assert_eq!(dir.generation(), generation);
        if flavour == Flavour::ActiveDirectory {
            assert!(err.to_string().contains("not a member"), "{err}");
        }

        // The same value twice in one add is also a present value.
        let err = dir
            .modify_members(&g1(), &change(&[host(4), host(4)], &[]))
            .await
            .expect_err("duplicate add");
        assert_eq!(err.code(), Some(add_code));
        assert_eq!(dir.records(), records, "nothing applied");
    }

    #[tokio::test]
    async fn openldap_flavour_refuses_with_20_and_16_atomically() {
        strict(
            Flavour::OpenLdap,
            rc::ATTRIBUTE_OR_VALUE_EXISTS,
            rc::NO_SUCH_ATTRIBUTE,
        )
        .await;
    }

    #[tokio::test]
    async fn ad_flavour_refuses_with_68_and_53_atomically() {
        strict(
            Flavour::ActiveDirectory,
            rc::ENTRY_ALREADY_EXISTS,
            rc::UNWILLING_TO_PERFORM,
        )
        .await;
    }

    #[tokio::test]
    async fn modify_of_a_missing_group_is_32_in_every_flavour() {
        for flavour in [
            Flavour::Permissive,
            Flavour::OpenLdap,
            Flavour::ActiveDirectory,
        ] {
            let dir = directory(flavour);
            let missing = dn("CN=gone,OU=Groups,DC=ad,DC=com");
            let err = dir
                .modify_members(&missing, &change(&[host(1)], &[]))
                .await
                .expect_err("missing group");
            assert_eq!(err.code(), Some(rc::NO_SUCH_OBJECT), "{flavour:?}: {err}");
            assert!(!err.is_transient());
            assert!(err.to_string().contains("CN=gone"), "{err}");
        }
        let dir = directory(Flavour::Permissive);
        let user = dn("CN=not-a-group,OU=Groups,DC=ad,DC=com");
        let err = dir
            .modify_members(&user, &change(&[host(2)], &[]))
            .await
            .expect_err("user");
        assert_eq!(err.code(), Some(OBJECT_CLASS_VIOLATION));
    }

    #[tokio::test]
    async fn calls_are_recorded_in_order() {
        let dir = directory(Flavour::Permissive);
        let c = change(&[host(3)], &[]);
        dir.capabilities().await.expect("caps");
        dir.search_groups(&groups_ou()).await.expect("search");
        dir.find_group(&groups_ou(), "x").await.expect("find");
        dir.read_group(&g1()).await.expect("read");
        dir.modify_members(&g1(), &c).await.expect("modify");
        dir.commit().await.expect("commit");
        assert_eq!(
            dir.calls(),
            [
                Call::Capabilities,
                Call::SearchGroups { base: groups_ou() },
                Call::FindGroup {
                    base: groups_ou(),
                    name: "x".to_owned()
                },
                Call::ReadGroup { dn: g1() },
                Call::Modify {
                    group: g1(),
                    change: c
                },
                Call::Commit,
            ]
        );
    }

    fn busy(dn: &Dn) -> DirError {
        DirError::Result {
            op: Op::Modify,
            dn: dn.to_string(),
            code: rc::BUSY,
            message: "busy".to_owned(),
        }
    }

    #[tokio::test]
    async fn injected_modify_faults_fail_the_given_number_of_times_then_clear() {
        let dir = directory(Flavour::Permissive);
        let g2 = dn("CN=proid2-gmsa-hosts,OU=Groups,DC=ad,DC=com");
        dir.fail_next_modify(Some(g1()), busy(&g1()), 2);
        let c = change(&[host(3)], &[]);

        // A fault for one group leaves the others alone.
        dir.modify_members(&g2, &c)
            .await
            .expect("other group unaffected");
        for _ in 0..2 {
            let err = dir.modify_members(&g1(), &c).await.expect_err("busy");
            assert_eq!(err.code(), Some(rc::BUSY));
            assert!(err.is_transient());
            assert_eq!(
                member_values(&dir, &g1()).len(),
                2,
                "a failed call applies nothing"
            );
        }
        dir.modify_members(&g1(), &c)
            .await
            .expect("third attempt succeeds");
        assert_eq!(member_values(&dir, &g1()).len(), 3);
        let modifies = dir
            .calls()
            .iter()
            .filter(|c| matches!(c, Call::Modify { .. }))
            .count();
        assert_eq!(modifies, 4, "failed calls are recorded too");

        // A fault for any group hits the next modify whatever its group.
        let down = DirError::Unreachable {
            op: Op::Modify,
            message: "connection refused".to_owned(),
        };
        dir.fail_next_modify(None, down, 1);
        let err = dir.modify_members(&g2, &c).await.expect_err("unreachable");
        assert!(matches!(err, DirError::Unreachable { .. }), "{err}");
        dir.modify_members(&g2, &c).await.expect("cleared");
        // Not even a missing group is noticed by a server that is down.
        dir.fail_next_modify(None, busy(&g1()), 1);
        let missing = dn("CN=gone,DC=x");
        let err = dir.modify_members(&missing, &c).await.expect_err("busy");
        assert_eq!(err.code(), Some(rc::BUSY));
    }

    #[tokio::test]
    async fn injected_read_and_commit_faults() {
        let dir = directory(Flavour::Permissive);
        let down = || DirError::Unreachable {
            op: Op::Search,
            message: "timed out".to_owned(),
        };
        dir.fail_next_read(down(), 3);
        assert!(dir.search_groups(&groups_ou()).await.is_err());
        assert!(dir
            .find_group(&groups_ou(), "proid1-gmsa-hosts")
            .await
            .is_err());
        assert!(dir.read_group(&g1()).await.is_err());
        assert!(dir.read_group(&g1()).await.expect("cleared").is_some());
        dir.fail_next_read(down(), 0);
        assert!(
            dir.search_groups(&groups_ou()).await.is_ok(),
            "zero times is no fault"
        );

        dir.fail_next_commit(DirError::Fatal("disk full".to_owned()), 1);
        let err = dir.commit().await.expect_err("commit fault");
        assert!(err.to_string().contains("disk full"));
        dir.commit().await.expect("cleared");
        // Reads and modifies were not affected by the commit fault.
        dir.modify_members(&g1(), &change(&[host(5)], &[]))
            .await
            .expect("modify");
    }
}

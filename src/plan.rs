//! The diff: desired membership against the groups read from the directory,
//! as a deterministic [`Plan`], and the mass-deletion guard that judges it.
//!
//! Pure functions over plain data: everything here can be tested without a
//! tree or a directory, and the same inputs always give the same plan.

use std::collections::{BTreeMap, BTreeSet};

use crate::directory::Group;
use crate::index::{DesiredSet, Index};
use crate::model::{Dn, GroupPattern, Proid};
use crate::parallel::in_parallel;

/// The changes to one group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupChange {
    /// The group's DN as the directory spelled it.
    pub group_dn: Dn,
    /// The proid the group belongs to.
    pub proid: Proid,
    /// Members to add, spelled as the servers' `nt.dn`.
    pub add: BTreeSet<Dn>,
    /// Members to delete, spelled as the directory spelled them.
    pub delete: BTreeSet<Dn>,
}

/// A proid that has placements but no group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MissingGroup {
    /// The proid.
    pub proid: Proid,
    /// The hosts that would be its members.
    pub desired: BTreeSet<Dn>,
}

/// Everything that differs, sorted by group DN (normalised); the daemon
/// writes a batch's changes oldest first instead.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// One entry per group that needs a change.
    pub changes: Vec<GroupChange>,
    /// Proids with placements and no group, sorted by proid.
    pub missing_groups: Vec<MissingGroup>,
    /// Groups of proids that were compared, changed or not.
    pub groups_compared: usize,
    /// Members of the compared groups that the reconciler manages: the base
    /// of the guard's percentage.
    pub managed_members: usize,
}

impl Plan {
    /// Total values to add.
    pub fn adds(&self) -> usize {
        self.changes.iter().map(|c| c.add.len()).sum()
    }

    /// Total values to delete.
    pub fn deletes(&self) -> usize {
        self.changes.iter().map(|c| c.delete.len()).sum()
    }

    /// The same plan without its deletions (what a refused plan still applies).
    pub fn without_deletions(&self) -> Plan {
        let changes = self
            .changes
            .iter()
            .filter(|c| !c.add.is_empty())
            .map(|c| GroupChange {
                delete: BTreeSet::new(),
                ..c.clone()
            })
            .collect();
        Plan {
            changes,
            ..self.clone()
        }
    }
}

/// Which proids to compare.
#[derive(Debug, Clone, Copy)]
pub enum Scope<'a> {
    /// Every group and every proid: a full sync.
    All,
    /// Only these proids (compared by [`Proid::key`]): an incremental reconcile.
    Only(&'a BTreeSet<Proid>),
}

/// Compares the desired state with the groups.
///
/// For each group of proid P: `add = desired(P) − members` and
/// `delete = (members ∩ (managed ∪ retiring(P))) − desired(P)`; members the
/// reconciler does not manage are never touched, and neither are held DNs
/// ([`Index::held`]: hosts whose placements are unknown), which are never
/// added or deleted.
pub fn plan<'g>(
    index: &Index,
    groups: impl IntoIterator<Item = &'g Group>,
    pattern: &GroupPattern,
    scope: Scope<'_>,
) -> Plan {
    let wanted: Option<BTreeSet<String>> = match scope {
        Scope::All => None,
        Scope::Only(proids) => Some(proids.iter().map(Proid::key).collect()),
    };
    let in_scope = |key: &String| wanted.as_ref().is_none_or(|w| w.contains(key));

    // Proids by key, in order: proids that differ only in case share a
    // group, whose desired members are the union of theirs; the first one
    // names the change.
    let mut sharing: BTreeMap<String, Vec<Proid>> = BTreeMap::new();
    let proids: Vec<Proid> = match scope {
        Scope::All => index.proids(),
        Scope::Only(proids) => proids.iter().cloned().collect(),
    };
    for proid in proids {
        sharing.entry(proid.key()).or_default().push(proid);
    }

    let held = index.held();
    // Each group is planned on its own, on every core: at cluster scale
    // the groups hold a million members to look up.
    let groups: Vec<&Group> = groups.into_iter().collect();
    let planned = in_parallel(&groups, |group| {
        let group_proid = pattern.proid_of(&group.sam_account_name)?;
        let key = group_proid.key();
        if !in_scope(&key) {
            return None;
        }
        let (proid, proids) = match sharing.get(&key) {
            Some(proids) => (proids[0].clone(), proids.as_slice()),
            None => (group_proid, &[][..]),
        };
        Some(plan_group(index, &held, group, key, proid, proids))
    });
    let mut plan = Plan::default();
    let mut with_group: BTreeSet<String> = BTreeSet::new();
    for planned in planned.into_iter().flatten() {
        plan.groups_compared += 1;
        plan.managed_members += planned.managed_members;
        with_group.insert(planned.key);
        plan.changes.extend(planned.change);
    }
    plan.changes.sort_by(|a, b| a.group_dn.cmp(&b.group_dn));
    // The desired sets are copied only for the proids without a group.
    plan.missing_groups = sharing
        .into_iter()
        .filter(|(key, proids)| {
            !with_group.contains(key) && proids.iter().any(|p| index.has_desired(p))
        })
        .map(|(_, proids)| {
            let mut desired = BTreeSet::new();
            for p in &proids {
                for dn in index.desired_set(p).iter() {
                    if !desired.contains(dn) {
                        desired.insert(dn.clone());
                    }
                }
            }
            MissingGroup {
                proid: proids[0].clone(),
                desired,
            }
        })
        .collect();
    plan
}

/// One group compared: its change (none when it is right), how many of its
/// members the reconciler manages, and its proid's key.
struct GroupPlan {
    key: String,
    managed_members: usize,
    change: Option<GroupChange>,
}

/// [`plan`] for one group of `proid`, whose desired members are those of
/// `proids` (the proids that share its key; none when no host wants it).
fn plan_group(
    index: &Index,
    held: &BTreeSet<Dn>,
    group: &Group,
    key: String,
    proid: Proid,
    proids: &[Proid],
) -> GroupPlan {
    let want: Vec<DesiredSet<'_>> = proids.iter().map(|p| index.desired_set(p)).collect();
    let retiring = index.retiring(&proid);

    // One pass over the members: which the reconciler manages, which are to
    // go, and how many are wanted.
    let mut delete: BTreeSet<Dn> = BTreeSet::new();
    let mut wanted_members = 0;
    let mut managed_members = 0;
    for member in &group.members {
        // A wanted DN is an in-scope host's, so managed: asked first, most
        // members of a group in sync need one lookup, not two.
        if want.iter().any(|w| w.contains(member)) {
            wanted_members += 1;
            managed_members += 1;
        } else if index.is_managed(member) || retiring.contains(member) {
            managed_members += 1;
            if !held.contains(member) {
                delete.insert(member.clone());
            }
        }
    }
    let mut add: BTreeSet<Dn> = BTreeSet::new();
    match want.as_slice() {
        [] => {}
        // The wanted members are distinct DNs of the one desired set: as
        // many of them as it has DNs means none is missing.
        [one] => {
            let mut missing = one.len() - wanted_members;
            for dn in one.iter() {
                if missing == 0 {
                    break;
                }
                if !group.members.contains(dn) {
                    missing -= 1;
                    if !held.contains(dn) {
                        add.insert(dn.clone());
                    }
                }
            }
        }
        // A union: a DN desired by several keeps the spelling of the first
        // proid that has it.
        several => {
            for dn in several.iter().flat_map(DesiredSet::iter) {
                if !group.members.contains(dn) && !held.contains(dn) && !add.contains(dn) {
                    add.insert(dn.clone());
                }
            }
        }
    }
    let change = (!add.is_empty() || !delete.is_empty()).then(|| GroupChange {
        group_dn: group.dn.clone(),
        proid,
        add,
        delete,
    });
    GroupPlan {
        key,
        managed_members,
        change,
    }
}

/// The plan as it was computed before [`plan`] stopped copying the desired
/// sets: the property test below checks that both give the same plan.
#[cfg(test)]
pub(crate) fn plan_reference(
    index: &Index,
    groups: &[Group],
    pattern: &GroupPattern,
    scope: Scope<'_>,
) -> Plan {
    let wanted: Option<BTreeSet<String>> = match scope {
        Scope::All => None,
        Scope::Only(proids) => Some(proids.iter().map(Proid::key).collect()),
    };
    let in_scope = |key: &String| wanted.as_ref().is_none_or(|w| w.contains(key));

    // Desired members by proid key: proids that differ only in case share a group.
    let mut desired: BTreeMap<String, (Proid, BTreeSet<Dn>)> = BTreeMap::new();
    let proids: Vec<Proid> = match scope {
        Scope::All => index.proids(),
        Scope::Only(proids) => proids.iter().cloned().collect(),
    };
    for proid in proids {
        let entry = desired
            .entry(proid.key())
            .or_insert_with(|| (proid.clone(), BTreeSet::new()));
        entry.1.extend(index.desired(&proid));
    }

    let held = index.held();
    let mut plan = Plan::default();
    let mut with_group: BTreeSet<String> = BTreeSet::new();
    for group in groups {
        let Some(group_proid) = pattern.proid_of(&group.sam_account_name) else {
            continue;
        };
        let key = group_proid.key();
        if !in_scope(&key) {
            continue;
        }
        let empty = (group_proid.clone(), BTreeSet::new());
        let (proid, want) = desired.get(&key).unwrap_or(&empty);
        let retiring = index.retiring(proid);
        let managed = |m: &Dn| index.is_managed(m) || retiring.contains(m);

        plan.groups_compared += 1;
        plan.managed_members += group.members.iter().filter(|m| managed(m)).count();
        let add: BTreeSet<Dn> = want
            .difference(&group.members)
            .filter(|m| !held.contains(*m))
            .cloned()
            .collect();
        let delete: BTreeSet<Dn> = group
            .members
            .iter()
            .filter(|m| managed(m) && !want.contains(*m) && !held.contains(*m))
            .cloned()
            .collect();
        with_group.insert(key);
        if !add.is_empty() || !delete.is_empty() {
            plan.changes.push(GroupChange {
                group_dn: group.dn.clone(),
                proid: proid.clone(),
                add,
                delete,
            });
        }
    }
    plan.changes.sort_by(|a, b| a.group_dn.cmp(&b.group_dn));
    plan.missing_groups = desired
        .into_iter()
        .filter(|(key, (_, want))| !want.is_empty() && !with_group.contains(key))
        .map(|(_, (proid, desired))| MissingGroup { proid, desired })
        .collect();
    plan
}

/// Limits on deletions: a plan whose deletions exceed `max_delete`
/// values, or exceed [`SMALL`](Self::SMALL) values and `max_delete_percent` of the managed
/// members now in the groups, has them refused unless `allow_mass_delete`
/// (additions are still applied).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuardOptions {
    /// Refuse more deletions than this.
    pub max_delete: usize,
    /// Refuse more than this percentage of the managed members (when more
    /// than [`GuardOptions::SMALL`] values are deleted).
    pub max_delete_percent: u32,
    /// Apply whatever the size.
    pub allow_mass_delete: bool,
}

impl GuardOptions {
    /// Deletions up to this many are never refused for their percentage.
    pub const SMALL: usize = 10;
}

impl Default for GuardOptions {
    fn default() -> Self {
        GuardOptions {
            max_delete: 500,
            max_delete_percent: 20,
            allow_mass_delete: false,
        }
    }
}

/// Why a plan's deletions are refused, or `None` when they may be applied.
pub fn guard(plan: &Plan, options: &GuardOptions) -> Option<String> {
    if options.allow_mass_delete {
        return None;
    }
    let deletes = plan.deletes();
    if deletes > options.max_delete {
        return Some(format!(
            "{deletes} deletions exceed --max-delete {}; rerun with --allow-mass-delete to apply them",
            options.max_delete
        ));
    }
    let base = plan.managed_members;
    let percent_exceeded =
        (deletes as u128) * 100 > (options.max_delete_percent as u128) * (base as u128);
    if deletes > GuardOptions::SMALL && percent_exceeded {
        return Some(format!(
            "{deletes} deletions are more than {}% of the {base} managed members in the groups (--max-delete-percent); rerun with --allow-mass-delete to apply them",
            options.max_delete_percent
        ));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{HostName, PartitionGlob};
    use crate::tree::{ServerInfo, TreeEvent};

    fn dn(s: &str) -> Dn {
        Dn::parse(s).expect("valid DN")
    }

    fn server(index: &mut Index, host: &str, partition: &str) {
        index.apply(&TreeEvent::ServerUpserted {
            host: HostName::new(host).expect("host"),
            info: Ok(ServerInfo {
                partition: Some(partition.into()),
                dc: Some("dc.ad.com".into()),
                dn: Some(format!("CN={host},OU=Hosts,DC=ad,DC=com")),
            }),
        });
    }

    fn place(index: &mut Index, host: &str, instance: &str) {
        index.apply(&TreeEvent::PlacementAdded {
            host: HostName::new(host).expect("host"),
            instance: instance.into(),
        });
    }

    fn group(name: &str, members: &[&str]) -> Group {
        Group {
            dn: dn(&format!("CN={name},OU=Groups,DC=ad,DC=com")),
            sam_account_name: name.into(),
            members: members.iter().map(|m| dn(m)).collect(),
        }
    }

    fn host_dn(host: &str) -> Dn {
        dn(&format!("CN={host},OU=Hosts,DC=ad,DC=com"))
    }

    fn pattern() -> GroupPattern {
        GroupPattern::parse("{}-gmsa-hosts").expect("pattern")
    }

    #[test]
    fn adds_deletes_and_leaves_unmanaged_members_alone() {
        let mut index = Index::new(PartitionGlob::default());
        server(&mut index, "h1", "p");
        server(&mut index, "h2", "p");
        place(&mut index, "h1", "web.app#1");
        let groups = [group(
            "web-gmsa-hosts",
            &[
                "cn=h2,ou=hosts,dc=AD,dc=com",
                "CN=someone-else,OU=Users,DC=ad,DC=com",
            ],
        )];
        let plan = plan(&index, &groups, &pattern(), Scope::All);
        assert_eq!(plan.changes.len(), 1);
        let change = &plan.changes[0];
        assert_eq!(change.add, BTreeSet::from([host_dn("h1")]));
        assert_eq!(change.delete, BTreeSet::from([host_dn("h2")]));
        let deleted: Vec<&str> = change.delete.iter().map(Dn::as_str).collect();
        assert_eq!(
            deleted,
            ["cn=h2,ou=hosts,dc=AD,dc=com"],
            "directory spelling kept"
        );
        assert_eq!(plan.managed_members, 1);
        assert_eq!(plan.groups_compared, 1);
    }

    #[test]
    fn members_under_a_host_ou_are_managed_without_a_server_file() {
        let mut index =
            Index::new(PartitionGlob::default()).with_host_ous(vec![dn("OU=Hosts,DC=ad,DC=com")]);
        server(&mut index, "h1", "p");
        place(&mut index, "h1", "web.app#1");
        let groups = [group(
            "web-gmsa-hosts",
            &[
                "CN=h1,OU=Hosts,DC=ad,DC=com",
                // A host whose server file went while nothing was running.
                "cn=gone, ou=Sub,ou=HOSTS,dc=ad,dc=com",
                // Not under the OU (a look-alike suffix, and another OU).
                "CN=x,OU=OtherHosts,DC=ad,DC=com",
                "CN=someone-else,OU=Users,DC=ad,DC=com",
            ],
        )];
        let plan = plan(&index, &groups, &pattern(), Scope::All);
        assert_eq!(plan.changes.len(), 1, "{plan:?}");
        let deleted: Vec<&str> = plan.changes[0].delete.iter().map(Dn::as_str).collect();
        assert_eq!(deleted, ["cn=gone, ou=Sub,ou=HOSTS,dc=ad,dc=com"]);
        assert!(plan.changes[0].add.is_empty());
        assert_eq!(plan.managed_members, 2, "the guard's base counts both");

        let without = Index::new(PartitionGlob::default());
        let plan = super::plan(&without, &groups, &pattern(), Scope::All);
        assert!(plan.changes.is_empty(), "{plan:?}");

        // A server file that can't be used hides a DN that may be any of
        // the OU's members: the OU manages nothing until it can be used.
        let broken = HostName::new("h2").expect("host");
        let applied = index.apply(&TreeEvent::ServerUpserted {
            host: broken.clone(),
            info: Err(crate::tree::ServerError::NotYaml("truncated".into())),
        });
        assert!(index.host_ous_suspended());
        assert!(applied.warning.is_some_and(|w| w.contains("--host-ou")));
        let plan = super::plan(&index, &groups, &pattern(), Scope::All);
        assert!(plan.changes.is_empty(), "{plan:?}");
        let applied = index.apply(&TreeEvent::ServerRemoved { host: broken });
        assert!(applied.resync, "every group is compared again");
        let plan = super::plan(&index, &groups, &pattern(), Scope::All);
        assert_eq!(plan.deletes(), 1, "{plan:?}");
    }

    #[test]
    fn spelling_differences_do_not_churn() {
        let mut index = Index::new(PartitionGlob::default());
        server(&mut index, "h1", "p");
        place(&mut index, "h1", "web.app#1");
        let groups = [group(
            "WEB-GMSA-HOSTS",
            &["cn = H1 , ou=hosts,dc=ad,dc=com"],
        )];
        let plan = plan(&index, &groups, &pattern(), Scope::All);
        assert!(plan.changes.is_empty(), "{plan:?}");
    }

    #[test]
    fn missing_groups_are_reported_and_scope_limits_the_plan() {
        let mut index = Index::new(PartitionGlob::default());
        server(&mut index, "h1", "p");
        place(&mut index, "h1", "web.app#1");
        place(&mut index, "h1", "db.app#1");
        let groups = [group("web-gmsa-hosts", &[]), group("other-gmsa-hosts", &[])];
        let full = plan(&index, &groups, &pattern(), Scope::All);
        assert_eq!(full.missing_groups.len(), 1);
        assert_eq!(full.missing_groups[0].proid.as_str(), "db");
        assert_eq!(full.changes.len(), 1);
        assert_eq!(full.groups_compared, 2);

        let only = BTreeSet::from([Proid::new("other").expect("proid")]);
        let partial = plan(&index, &groups, &pattern(), Scope::Only(&only));
        assert!(partial.changes.is_empty());
        assert!(partial.missing_groups.is_empty());
        assert_eq!(partial.groups_compared, 1);
    }

    #[test]
    fn plans_are_sorted_by_normalised_group_dn() {
        let mut index = Index::new(PartitionGlob::default());
        server(&mut index, "h1", "p");
        for p in ["b", "A", "c"] {
            place(&mut index, "h1", &format!("{p}.app#1"));
        }
        let groups = [
            group("c-gmsa-hosts", &[]),
            group("b-gmsa-hosts", &[]),
            group("A-gmsa-hosts", &[]),
        ];
        let plan = plan(&index, &groups, &pattern(), Scope::All);
        let order: Vec<&str> = plan.changes.iter().map(|c| c.proid.as_str()).collect();
        assert_eq!(order, ["A", "b", "c"]);
    }

    #[test]
    fn held_hosts_are_neither_added_nor_deleted() {
        // h1's directory can't be read: its placements are unknown, so its
        // memberships stay as they are, whatever was known of them; h2 and
        // h3 are reconciled as usual.
        let mut index = Index::new(PartitionGlob::default());
        for h in ["h1", "h2", "h3"] {
            server(&mut index, h, "p");
        }
        place(&mut index, "h1", "web.app#1");
        place(&mut index, "h2", "web.app#2");
        let h1 = HostName::new("h1").expect("host");
        let unknown = index.apply(&TreeEvent::PlacementsUnknown { host: h1.clone() });
        assert!(unknown.dirty.is_empty() && !unknown.resync);
        assert_eq!(index.held(), BTreeSet::from([host_dn("h1")]));
        let groups = [
            group("web-gmsa-hosts", &[]),
            group(
                "db-gmsa-hosts",
                &["CN=h1,OU=Hosts,DC=ad,DC=com", "CN=h3,OU=Hosts,DC=ad,DC=com"],
            ),
        ];
        let held = plan(&index, &groups, &pattern(), Scope::All);
        let changes: Vec<_> = held
            .changes
            .iter()
            .map(|c| (c.proid.as_str(), c.add.clone(), c.delete.clone()))
            .collect();
        assert_eq!(
            changes,
            [
                ("db", BTreeSet::new(), BTreeSet::from([host_dn("h3")])),
                ("web", BTreeSet::from([host_dn("h2")]), BTreeSet::new()),
            ]
        );

        // Listed again: h1 counts as usual, and everything is compared.
        let listed = index.apply(&TreeEvent::PlacementDirListed {
            host: h1,
            instances: BTreeSet::from(["web.app#1".to_owned()]),
        });
        assert!(listed.resync && listed.dirty.is_empty(), "{listed:?}");
        assert!(index.held().is_empty());
        let free = plan(&index, &groups, &pattern(), Scope::All);
        assert_eq!(free.adds(), 2);
        assert_eq!(free.deletes(), 2);
    }

    fn plan_with(deletes: usize, managed: usize) -> Plan {
        let delete = (0..deletes).map(|i| dn(&format!("CN=h{i},DC=x"))).collect();
        Plan {
            changes: vec![GroupChange {
                group_dn: dn("CN=g,DC=x"),
                proid: Proid::new("g").expect("proid"),
                add: BTreeSet::new(),
                delete,
            }],
            missing_groups: vec![],
            groups_compared: 1,
            managed_members: managed,
        }
    }

    #[test]
    fn guard_limits() {
        let opts = GuardOptions::default();
        assert_eq!(
            guard(&plan_with(10, 10), &opts),
            None,
            "ten or fewer always pass"
        );
        assert_eq!(
            guard(&plan_with(20, 100), &opts),
            None,
            "exactly 20% passes"
        );
        assert!(guard(&plan_with(21, 100), &opts).is_some());
        assert_eq!(guard(&plan_with(500, 100_000), &opts), None);
        let refusal = guard(&plan_with(501, 100_000), &opts).expect("refused");
        assert!(refusal.contains("--max-delete 500"), "{refusal}");
        let allow = GuardOptions {
            allow_mass_delete: true,
            ..opts
        };
        assert_eq!(guard(&plan_with(501, 501), &allow), None);
    }

    #[test]
    fn without_deletions_keeps_additions_only() {
        let mut p = plan_with(3, 3);
        p.changes[0].add.insert(dn("CN=new,DC=x"));
        p.changes.push(plan_with(2, 2).changes.remove(0));
        let kept = p.without_deletions();
        assert_eq!(kept.changes.len(), 1);
        assert_eq!(kept.deletes(), 0);
        assert_eq!(kept.adds(), 1);
    }

    #[test]
    fn proids_sharing_a_group_want_the_union_spelled_by_the_first() {
        // Two hosts share a DN, spelled two ways; each runs one of two
        // proids that differ only in case.
        let mut index = Index::new(PartitionGlob::default());
        for (host, spelled) in [
            ("h1", "CN=shared,OU=Hosts,DC=ad,DC=com"),
            ("h2", "cn=SHARED , ou=hosts,dc=ad,dc=com"),
        ] {
            index.apply(&TreeEvent::ServerUpserted {
                host: HostName::new(host).expect("host"),
                info: Ok(ServerInfo {
                    partition: Some("p".into()),
                    dc: Some("dc.ad.com".into()),
                    dn: Some(spelled.into()),
                }),
            });
        }
        server(&mut index, "h3", "p");
        place(&mut index, "h1", "web.app#1");
        place(&mut index, "h2", "WEB.app#1");
        place(&mut index, "h3", "web.app#2");
        let groups = [group("Web-gmsa-hosts", &[])];
        let planned = plan(&index, &groups, &pattern(), Scope::All);
        assert_eq!(
            format!("{planned:?}"),
            format!(
                "{:?}",
                plan_reference(&index, &groups, &pattern(), Scope::All)
            )
        );
        let [change] = planned.changes.as_slice() else {
            panic!("one change: {planned:?}");
        };
        assert_eq!(change.proid.as_str(), "WEB", "the first proid names it");
        let added: Vec<&str> = change.add.iter().map(Dn::as_str).collect();
        assert_eq!(
            added,
            [
                "CN=h3,OU=Hosts,DC=ad,DC=com",
                "cn=SHARED , ou=hosts,dc=ad,dc=com"
            ]
        );
        // Without its group, the same union is reported missing.
        let missing = plan(&index, &[], &pattern(), Scope::All);
        assert_eq!(
            format!("{missing:?}"),
            format!("{:?}", plan_reference(&index, &[], &pattern(), Scope::All))
        );
        let desired: Vec<&str> = missing.missing_groups[0]
            .desired
            .iter()
            .map(Dn::as_str)
            .collect();
        assert_eq!(desired, added);
    }

    mod same_as_reference {
        use super::*;
        use proptest::prelude::*;

        const HOSTS: [&str; 4] = ["h1", "h2", "h3", "h4"];
        /// Proids that differ only in case share a group.
        const PROIDS: [&str; 4] = ["web", "WEB", "db", "x"];
        const SHARED: &str = "CN=shared,OU=Hosts,DC=ad,DC=com";

        /// The DN spellings hosts and groups use: two spellings of the same
        /// host DNs, a DN under the host OU, one outside it.
        fn spelling(host: &str, kind: u8) -> String {
            match kind % 4 {
                0 => format!("CN={host},OU=Hosts,DC=ad,DC=com"),
                1 => format!("cn = {} , ou=hosts,dc=AD,dc=com", host.to_uppercase()),
                2 => format!("CN={host},OU=Sub,OU=Hosts,DC=ad,DC=com"),
                _ => format!("CN={host},OU=Users,DC=ad,DC=com"),
            }
        }

        fn event() -> impl Strategy<Value = TreeEvent> {
            let host = proptest::sample::select(HOSTS.to_vec())
                .prop_map(|h| HostName::new(h).expect("host"));
            let instance = (proptest::sample::select(PROIDS.to_vec()), 0..3u8)
                .prop_map(|(p, n)| format!("{p}.app#{n}"));
            prop_oneof![
                3 => (host.clone(), 0..10u8).prop_map(|(host, kind)| {
                    let shared = |raw: &str| Ok(ServerInfo {
                        partition: Some("p".into()),
                        dc: Some("dc.ad.com".into()),
                        dn: Some(raw.into()),
                    });
                    let info = match kind {
                        // Hosts sharing a DN, spelled two ways.
                        6 | 8 => shared(SHARED),
                        7 | 9 => shared("cn=SHARED , ou=hosts,dc=ad,dc=com"),
                        4 => Err(crate::tree::ServerError::NotYaml("truncated".into())),
                        5 => Ok(ServerInfo {
                            partition: Some("other".into()),
                            dc: Some("dc.ad.com".into()),
                            dn: Some(spelling(host.as_str(), 0)),
                        }),
                        kind => Ok(ServerInfo {
                            partition: Some("p".into()),
                            dc: Some("dc.ad.com".into()),
                            dn: Some(spelling(host.as_str(), kind)),
                        }),
                    };
                    TreeEvent::ServerUpserted { host, info }
                }),
                1 => host.clone().prop_map(|host| TreeEvent::ServerRemoved { host }),
                3 => (host.clone(), instance.clone())
                    .prop_map(|(host, instance)| TreeEvent::PlacementAdded { host, instance }),
                2 => (host.clone(), instance)
                    .prop_map(|(host, instance)| TreeEvent::PlacementRemoved { host, instance }),
                1 => host.clone().prop_map(|host| TreeEvent::PlacementsUnknown { host }),
                1 => host.prop_map(|host| TreeEvent::PlacementDirListed {
                    host,
                    instances: BTreeSet::from(["web.app#0".to_owned()]),
                }),
            ]
        }

        /// A group of one of the proids (any case), or of none, with members
        /// among every spelling of every host and a user.
        fn groups() -> impl Strategy<Value = Vec<Group>> {
            let name = proptest::sample::select(vec!["web", "Web", "WEB", "db", "x", "none"]);
            let members =
                proptest::collection::vec((proptest::sample::select(HOSTS.to_vec()), 0..6u8), 0..8);
            proptest::collection::vec((name, 0..3u8, members), 0..5).prop_map(|groups| {
                groups
                    .into_iter()
                    .map(|(name, ou, members)| {
                        let sam = if name == "none" {
                            "unrelated".to_owned()
                        } else {
                            format!("{name}-gmsa-hosts")
                        };
                        Group {
                            dn: dn(&format!("CN={sam},OU=G{ou},DC=ad,DC=com")),
                            sam_account_name: sam,
                            members: members
                                .into_iter()
                                .map(|(h, kind)| match kind {
                                    4 => dn(&format!("CN={h}-user,OU=Users,DC=ad,DC=com")),
                                    5 => dn(SHARED),
                                    kind => dn(&spelling(h, kind)),
                                })
                                .collect(),
                        }
                    })
                    .collect()
            })
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(1024))]

            /// Same changes, same order, same spellings, same counts and
            /// missing groups as the plan that copied the desired sets;
            /// with `spread`, the groups are copied under other OUs until
            /// there are enough of them to be planned on several threads.
            #[test]
            fn plans_equal_the_reference(
                host_ou in any::<bool>(),
                events in proptest::collection::vec(event(), 0..40),
                groups in groups(),
                spread in any::<bool>(),
                scope in proptest::option::of(proptest::collection::btree_set(
                    proptest::sample::select(vec!["web", "WEB", "Web", "db", "x", "y"]),
                    0..4,
                )),
            ) {
                let mut index = Index::new(PartitionGlob::parse("p").expect("glob"));
                if host_ou {
                    index = index.with_host_ous(vec![dn("OU=Hosts,DC=ad,DC=com")]);
                }
                for event in &events {
                    index.apply(event);
                }
                let only: Option<BTreeSet<Proid>> = scope.map(|names| {
                    names.into_iter().map(|n| Proid::new(n).expect("proid")).collect()
                });
                let scope = match &only {
                    None => Scope::All,
                    Some(proids) => Scope::Only(proids),
                };
                let groups: Vec<Group> = if spread && !groups.is_empty() {
                    (0..3 * crate::parallel::CHUNK)
                        .map(|i| {
                            let group = &groups[i % groups.len()];
                            Group {
                                dn: dn(&format!("{},OU=Copy{i:03}", group.dn)),
                                ..group.clone()
                            }
                        })
                        .collect()
                } else {
                    groups
                };
                let new = plan(&index, &groups, &pattern(), scope);
                let old = plan_reference(&index, &groups, &pattern(), scope);
                // Debug shows every DN as spelled, not only as compared.
                prop_assert_eq!(format!("{new:?}"), format!("{old:?}"));
                prop_assert_eq!(new, old);
            }
        }
    }
}

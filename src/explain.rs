//! `explain`: why each host is or is not in a proid's group, in terms an AD
//! administrator can check against the tree and the directory.
//!
//! The answer is built from the same parts `plan` uses (the scan, the
//! index, the plan and the guard over the whole tree), never from a second
//! reading of the rules: a host is in scope when the index says so, an
//! addition or deletion is one when the plan has it, a deletion is held
//! back when the guard refused the plan. What this module adds is the
//! *why*: which rule put a host out of scope, which placements count, which
//! memberships the reconciler owns and which it leaves alone.
//!
//! [`explain`] is pure; the text rendering is all `#` comments (harmless if
//! fed to `ldapmodify`) with every quoted value escaped as in `plan`'s
//! output, and the JSON rendering is one object.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use serde::Serialize;

use crate::directory::Group;
use crate::index::Index;
use crate::model::{escape_controls, Dn, GroupPattern, HostName, PartitionGlob, Proid};
use crate::output::{one_line, Format};
use crate::plan::Plan;
use crate::tree::names::{PLACEMENT, SERVERS};
use crate::tree::{ServerError, ServerInfo, Snapshot};

/// What was asked: one proid, optionally one host.
#[derive(Debug, Clone)]
pub struct Question<'a> {
    /// The proid whose group is explained.
    pub proid: &'a Proid,
    /// Only this host, when given (reported whether it matters or not).
    pub host: Option<&'a HostName>,
}

/// Everything `explain` needs, read once.
#[derive(Debug, Clone, Copy)]
pub struct Facts<'a> {
    /// The tree's root, to name files relative to it.
    pub root: &'a Path,
    /// The tree as scanned, warnings included.
    pub snapshot: &'a Snapshot,
    /// The index built from that snapshot.
    pub index: &'a Index,
    /// Every group found under `--group-ou`.
    pub groups: &'a [Group],
    /// `--group-pattern`.
    pub pattern: &'a GroupPattern,
    /// `--partition`.
    pub partition: &'a PartitionGlob,
    /// The full plan, before the guard.
    pub plan: &'a Plan,
    /// Why the guard refused the plan's deletions, if it did.
    pub refused: Option<&'a str>,
}

/// The answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Explanation {
    /// The proid.
    pub proid: Proid,
    /// The account name its group must have.
    pub group_name: String,
    /// The proid's groups as the directory spelled their DNs (none: the
    /// group is missing, and groups are never created).
    pub groups: Vec<Dn>,
    /// `--partition`.
    pub partition: String,
    /// Why the guard refused the plan's deletions, if it did.
    pub refused: Option<String>,
    /// Every host that matters, by name.
    pub hosts: Vec<HostReport>,
    /// Members of the proid's groups that are no server file's `nt.dn`.
    pub other_members: Vec<OtherMember>,
}

/// One host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostReport {
    /// Its name in `servers/` and `placement/`.
    pub host: HostName,
    /// What its server file gave.
    pub server: ServerFile,
    /// Why it is out of scope; empty when it is in scope.
    pub out_of_scope: Vec<String>,
    /// What its placement directory gave.
    pub placements: Placements,
    /// Its instances of the proid.
    pub instances: Vec<String>,
    /// Its DN should be in the proid's group.
    pub desired: bool,
    /// The reconciler owns its memberships (it is in scope).
    pub managed: bool,
    /// Its membership of each of the proid's groups.
    pub groups: Vec<Membership>,
    /// Warnings of the scan about its files, relative to the tree's root.
    pub notes: Vec<String>,
}

/// What a host's server file gave.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerFile {
    /// There is none.
    Missing,
    /// It can't be used, and why.
    Unusable(ServerError),
    /// Its values.
    Read(ServerInfo),
}

/// What a host's placement directory gave.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Placements {
    /// There is none.
    None,
    /// It was listed: this many placements of any proid.
    Listed(usize),
    /// It can't be read: the host's placements are unknown.
    Unreadable,
}

/// A host's (or a member's) standing in one group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Membership {
    /// The group.
    pub group_dn: Dn,
    /// The DN is a member now.
    pub member: bool,
    /// What the plan does about it.
    pub action: Action,
}

/// What the plan does with one DN in one group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Action {
    /// Nothing: a member that should be one.
    InPlace,
    /// Nothing: not a member, and should not be one.
    Absent,
    /// To be added.
    Add,
    /// To be deleted.
    Delete,
    /// To be deleted, but the mass-deletion guard held the deletion back.
    DeleteRefused,
    /// Left as it is: the host's placements are unknown.
    Held,
    /// Left as it is: a member the reconciler does not manage.
    Unmanaged,
    /// Not added: the host has instances, but it is out of scope, so
    /// they do not count.
    NotCounted,
}

impl Action {
    fn code(self) -> &'static str {
        match self {
            Action::InPlace => "in-place",
            Action::Absent => "none",
            Action::Add => "add",
            Action::Delete => "delete",
            Action::DeleteRefused => "delete-refused",
            Action::Held => "held",
            Action::Unmanaged => "unmanaged",
            Action::NotCounted => "not-counted",
        }
    }

    fn text(self) -> &'static str {
        match self {
            Action::InPlace => "nothing to do",
            Action::Absent => "nothing to do",
            Action::Add => "to be added",
            Action::Delete => "to be deleted",
            Action::DeleteRefused => {
                "to be deleted, but the mass-deletion guard holds the deletion back"
            }
            Action::Held => "left as it is: the host's placements are unknown",
            Action::Unmanaged => "left as it is: not managed by the reconciler",
            Action::NotCounted => {
                "not added: the host is out of scope, so its instances do not count"
            }
        }
    }
}

/// A member of the proid's group that no server file names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OtherMember {
    /// The member DN as the directory spelled it.
    pub dn: Dn,
    /// The reconciler owns it (an in-scope host has it).
    pub managed: bool,
    /// Its standing in the group.
    pub membership: Membership,
}

/// Answers the question from the facts.
pub fn explain(question: &Question<'_>, facts: &Facts<'_>) -> Explanation {
    let proid = question.proid;
    let key = proid.key();
    let groups: Vec<&Group> = facts
        .groups
        .iter()
        .filter(|g| {
            facts
                .pattern
                .proid_of(&g.sam_account_name)
                .is_some_and(|p| p.key() == key)
        })
        .collect();
    let snapshot = facts.snapshot;
    let placed_of = |host: &HostName| -> Vec<String> {
        snapshot
            .placements
            .get(host)
            .into_iter()
            .flatten()
            .filter(|i| Proid::name_in(i).is_some_and(|p| p.to_lowercase() == key))
            .cloned()
            .collect()
    };
    // Hosts by the DN their server file gives, to find members' hosts.
    let mut by_dn: BTreeMap<Dn, Vec<HostName>> = BTreeMap::new();
    for (host, info) in &snapshot.servers {
        if let Some(dn) = server_dn(info) {
            by_dn.entry(dn).or_default().push(host.clone());
        }
    }

    let hosts: BTreeSet<HostName> = match question.host {
        Some(host) => BTreeSet::from([host.clone()]),
        None => {
            let placed = snapshot
                .placements
                .keys()
                .filter(|h| !placed_of(h).is_empty());
            let members = groups
                .iter()
                .flat_map(|g| g.members.iter())
                .filter_map(|m| by_dn.get(m))
                .flatten();
            // Unknown placements hold a host's memberships in every group.
            let held = snapshot.unknown.iter().filter(|h| facts.index.in_scope(h));
            placed.chain(members).chain(held).cloned().collect()
        }
    };
    let held = facts.index.held();
    let reports = hosts
        .iter()
        .map(|host| {
            let server = match snapshot.servers.get(host) {
                None => ServerFile::Missing,
                Some(Err(why)) => ServerFile::Unusable(why.clone()),
                Some(Ok(info)) => ServerFile::Read(info.clone()),
            };
            let in_scope = facts.index.in_scope(host);
            let out_of_scope = if in_scope {
                Vec::new()
            } else {
                why_out_of_scope(&server, facts.partition)
            };
            let unusable = matches!(server, ServerFile::Unusable(_));
            let placements = if snapshot.unknown.contains(host) {
                Placements::Unreadable
            } else {
                match snapshot.placements.get(host) {
                    Some(instances) => Placements::Listed(instances.len()),
                    None => Placements::None,
                }
            };
            let instances = placed_of(host);
            let dn = snapshot.servers.get(host).and_then(server_dn);
            let desired = in_scope && !instances.is_empty();
            let managed = dn.as_ref().is_some_and(|dn| facts.index.is_managed(dn));
            let memberships = groups
                .iter()
                .map(|g| {
                    let member = dn.as_ref().is_some_and(|dn| g.members.contains(dn));
                    let is_held = dn.as_ref().is_some_and(|dn| held.contains(dn));
                    let action =
                        match action(facts, g, dn.as_ref(), member, desired, managed, is_held) {
                            Action::Absent if !in_scope && !instances.is_empty() => {
                                Action::NotCounted
                            }
                            other => other,
                        };
                    Membership {
                        group_dn: g.dn.clone(),
                        member,
                        action,
                    }
                })
                .collect();
            HostReport {
                host: host.clone(),
                server,
                out_of_scope,
                placements,
                instances,
                desired,
                managed,
                groups: memberships,
                notes: notes(facts.root, snapshot, host, unusable),
            }
        })
        .collect();

    let mut other_members = Vec::new();
    if question.host.is_none() {
        for group in &groups {
            for member in group.members.iter().filter(|m| !by_dn.contains_key(*m)) {
                let managed = facts.index.is_managed(member);
                let action = action(facts, group, Some(member), true, false, managed, false);
                other_members.push(OtherMember {
                    dn: member.clone(),
                    managed,
                    membership: Membership {
                        group_dn: group.dn.clone(),
                        member: true,
                        action,
                    },
                });
            }
        }
    }

    Explanation {
        proid: proid.clone(),
        group_name: facts.pattern.render(proid),
        groups: groups.iter().map(|g| g.dn.clone()).collect(),
        partition: facts.partition.to_string(),
        refused: facts.refused.map(str::to_owned),
        hosts: reports,
        other_members,
    }
}

/// The DN a server file gives, when it gives one.
fn server_dn(info: &Result<ServerInfo, ServerError>) -> Option<Dn> {
    let dn = info.as_ref().ok()?.dn.as_deref()?.trim();
    if dn.is_empty() {
        return None;
    }
    Dn::parse(dn).ok()
}

/// What the plan does with `dn` in `group`, read from the plan itself.
fn action(
    facts: &Facts<'_>,
    group: &Group,
    dn: Option<&Dn>,
    member: bool,
    desired: bool,
    managed: bool,
    held: bool,
) -> Action {
    // Group DNs are unique: the plan's change for this group, if any.
    let change = facts.plan.changes.iter().find(|c| c.group_dn == group.dn);
    if let (Some(change), Some(dn)) = (change, dn) {
        if change.add.contains(dn) {
            return Action::Add;
        }
        if change.delete.contains(dn) {
            return match facts.refused {
                Some(_) => Action::DeleteRefused,
                None => Action::Delete,
            };
        }
    }
    match (member, desired) {
        _ if held => Action::Held,
        (true, true) => Action::InPlace,
        (true, false) if !managed => Action::Unmanaged,
        // Neither added nor deleted: the plan found nothing to do.
        (true, false) => Action::InPlace,
        (false, _) => Action::Absent,
    }
}

/// Why a host is out of scope, rule by rule: a host is in scope only when
/// its server file parses to a mapping, its partition matches the
/// `--partition` glob, and both `nt.dc` and `nt.dn` are present and not
/// empty; each rule it breaks is one line here.
fn why_out_of_scope(server: &ServerFile, glob: &PartitionGlob) -> Vec<String> {
    let info = match server {
        ServerFile::Missing => return vec!["no server file".to_owned()],
        ServerFile::Unusable(_) => {
            return vec![
                "the server file can't be used (a running daemon keeps the host's last good definition, if it had one)".to_owned(),
            ]
        }
        ServerFile::Read(info) => info,
    };
    let mut why = Vec::new();
    let partition = info.partition.as_deref().unwrap_or("");
    if !glob.matches(partition) {
        why.push(match &info.partition {
            None => format!(
                "no partition, and --partition {:?} does not match an empty one",
                glob.to_string()
            ),
            Some(p) => format!(
                "partition {p:?} does not match --partition {:?}",
                glob.to_string()
            ),
        });
    }
    let blank = |v: &Option<String>| v.as_deref().map(str::trim).is_none_or(str::is_empty);
    if blank(&info.dc) {
        why.push("nt.dc is missing or empty".to_owned());
    }
    if blank(&info.dn) {
        why.push("nt.dn is missing or empty".to_owned());
    } else if server_dn(&Ok(info.clone())).is_none() {
        why.push("nt.dn is not a DN".to_owned());
    }
    if why.is_empty() {
        why.push("out of scope".to_owned());
    }
    why
}

/// The scan's warnings about a host's server file and placement directory,
/// with the paths relative to the tree's root; those about an unusable
/// server file are left out when `unusable` (the report says why already).
fn notes(root: &Path, snapshot: &Snapshot, host: &HostName, unusable: bool) -> Vec<String> {
    let root_text = format!("{}/", root.display());
    let server = format!("{SERVERS}/{host}:");
    let placement = format!("{PLACEMENT}/{host}");
    snapshot
        .warnings
        .iter()
        .filter_map(|w| w.strip_prefix(&root_text))
        .filter(|w| {
            (w.starts_with(&server) && !unusable)
                || w.strip_prefix(&placement)
                    .is_some_and(|rest| rest.starts_with([':', '/']))
        })
        .map(str::to_owned)
        .collect()
}

impl Explanation {
    /// Renders the answer in the given format.
    pub fn render(&self, format: Format) -> String {
        match format {
            Format::Ldif => self.text(),
            Format::Json => self.json(),
        }
    }

    fn counts(&self) -> BTreeMap<Action, usize> {
        let mut counts = BTreeMap::new();
        for m in self
            .hosts
            .iter()
            .flat_map(|h| h.groups.iter())
            .chain(self.other_members.iter().map(|o| &o.membership))
        {
            *counts.entry(m.action).or_default() += 1;
        }
        counts
    }

    fn text(&self) -> String {
        let q = |s: &str| escape_controls(s).into_owned();
        let counts = self.counts();
        let count = |a: Action| counts.get(&a).copied().unwrap_or(0);
        let mut out = format!(
            "# gmsa-reconciler explain: proid {}, group {}, --partition \"{}\"\n",
            q(self.proid.as_str()),
            q(&self.group_name),
            q(&self.partition),
        );
        out += &format!(
            "# {} {}: {} to add, {} to delete, {} held back by the guard\n",
            self.hosts.len(),
            if self.hosts.len() == 1 {
                "host"
            } else {
                "hosts"
            },
            count(Action::Add),
            count(Action::Delete),
            count(Action::DeleteRefused),
        );
        if self.groups.is_empty() {
            out += &format!(
                "# no group named {}: groups are never created, so nothing is added\n",
                q(&self.group_name)
            );
        }
        for group in &self.groups {
            out += &format!("# group: {}\n", q(group.as_str()));
        }
        match &self.refused {
            Some(reason) => {
                out += &format!(
                    "# mass-deletion guard: deletions refused: {}\n",
                    one_line(reason)
                )
            }
            None => out += "# mass-deletion guard: deletions allowed\n",
        }
        for host in &self.hosts {
            out += "#\n";
            host.text(&mut out, &self.proid);
        }
        if !self.other_members.is_empty() {
            out += "#\n# members that no server file names:\n";
            for other in &self.other_members {
                out += &format!(
                    "#   {} in {}: {}\n",
                    q(other.dn.as_str()),
                    q(other.membership.group_dn.as_str()),
                    other.membership.action.text()
                );
            }
        }
        out
    }

    fn json(&self) -> String {
        let counts = self.counts();
        let count = |a: Action| counts.get(&a).copied().unwrap_or(0);
        let json = JsonExplanation {
            proid: self.proid.to_string(),
            group_name: self.group_name.clone(),
            groups: self.groups.iter().map(|g| g.as_str().to_owned()).collect(),
            partition: self.partition.clone(),
            refused: self.refused.as_ref().map(|reason| JsonGuard {
                reason: reason.clone(),
            }),
            hosts: self.hosts.iter().map(HostReport::json).collect(),
            other_members: self
                .other_members
                .iter()
                .map(|o| JsonOther {
                    member: o.dn.as_str().to_owned(),
                    group_dn: o.membership.group_dn.as_str().to_owned(),
                    managed: o.managed,
                    action: o.membership.action.code(),
                })
                .collect(),
            summary: JsonSummary {
                hosts: self.hosts.len(),
                add: count(Action::Add),
                delete: count(Action::Delete),
                refused_deletes: count(Action::DeleteRefused),
            },
        };
        match serde_json::to_string_pretty(&json) {
            Ok(mut text) => {
                text.push('\n');
                text
            }
            Err(err) => {
                panic!("BUG: an explanation of strings and numbers always serialises: {err}")
            }
        }
    }
}

impl HostReport {
    fn text(&self, out: &mut String, proid: &Proid) {
        let q = |s: &str| escape_controls(s).into_owned();
        let yes = |b: bool| if b { "yes" } else { "no" };
        *out += &format!("# host {}\n", q(self.host.as_str()));
        *out += &match &self.server {
            ServerFile::Missing => "#   server file: none\n".to_owned(),
            ServerFile::Unusable(why) => {
                format!(
                    "#   server file: unusable: {}\n",
                    one_line(&why.to_string())
                )
            }
            ServerFile::Read(info) => {
                let value = |v: &Option<String>| match v {
                    None => "none".to_owned(),
                    Some(v) => format!("\"{}\"", q(v)),
                };
                format!(
                    "#   server file: partition {}, nt.dc {}, nt.dn {}\n",
                    value(&info.partition),
                    value(&info.dc),
                    value(&info.dn)
                )
            }
        };
        if self.out_of_scope.is_empty() {
            *out += "#   in scope: yes\n";
        } else {
            let why: Vec<String> = self.out_of_scope.iter().map(|w| one_line(w)).collect();
            *out += &format!("#   in scope: no: {}\n", why.join("; "));
        }
        *out += &match self.placements {
            Placements::None => "#   placement directory: none\n".to_owned(),
            Placements::Listed(n) => format!(
                "#   placement directory: {n} {}\n",
                if n == 1 { "placement" } else { "placements" }
            ),
            Placements::Unreadable => {
                "#   placement directory: unreadable: its placements are unknown\n".to_owned()
            }
        };
        if self.instances.is_empty() {
            *out += &format!("#   instances of {}: none\n", q(proid.as_str()));
        } else {
            let names: Vec<String> = self.instances.iter().map(|i| q(i)).collect();
            *out += &format!(
                "#   instances of {}: {}\n",
                q(proid.as_str()),
                names.join(", ")
            );
        }
        *out += &format!(
            "#   desired: {}; managed: {}\n",
            yes(self.desired),
            yes(self.managed)
        );
        if self.groups.is_empty() {
            *out += "#   member: there is no group to be a member of\n";
        }
        for m in &self.groups {
            *out += &format!(
                "#   member of {}: {}; {}\n",
                q(m.group_dn.as_str()),
                yes(m.member),
                m.action.text()
            );
        }
        for note in &self.notes {
            *out += &format!("#   note: {}\n", one_line(note));
        }
    }

    fn json(&self) -> JsonHost {
        let (status, error, values) = match &self.server {
            ServerFile::Missing => ("missing", None, ServerInfo::default()),
            ServerFile::Unusable(why) => ("unusable", Some(why.to_string()), ServerInfo::default()),
            ServerFile::Read(info) => ("ok", None, info.clone()),
        };
        JsonHost {
            host: self.host.to_string(),
            server_file: JsonServer {
                status,
                error,
                partition: values.partition,
                nt_dc: values.dc,
                nt_dn: values.dn,
            },
            in_scope: self.out_of_scope.is_empty(),
            out_of_scope: self.out_of_scope.clone(),
            placements: match self.placements {
                Placements::None => "none",
                Placements::Listed(_) => "listed",
                Placements::Unreadable => "unreadable",
            },
            instances: self.instances.clone(),
            desired: self.desired,
            managed: self.managed,
            groups: self
                .groups
                .iter()
                .map(|m| JsonMembership {
                    group_dn: m.group_dn.as_str().to_owned(),
                    member: m.member,
                    action: m.action.code(),
                })
                .collect(),
            notes: self.notes.clone(),
        }
    }
}

#[derive(Serialize)]
struct JsonExplanation {
    proid: String,
    group_name: String,
    groups: Vec<String>,
    partition: String,
    refused: Option<JsonGuard>,
    hosts: Vec<JsonHost>,
    other_members: Vec<JsonOther>,
    summary: JsonSummary,
}

#[derive(Serialize)]
struct JsonGuard {
    reason: String,
}

#[derive(Serialize)]
struct JsonHost {
    host: String,
    server_file: JsonServer,
    in_scope: bool,
    out_of_scope: Vec<String>,
    placements: &'static str,
    instances: Vec<String>,
    desired: bool,
    managed: bool,
    groups: Vec<JsonMembership>,
    notes: Vec<String>,
}

#[derive(Serialize)]
struct JsonServer {
    status: &'static str,
    error: Option<String>,
    partition: Option<String>,
    #[serde(rename = "nt.dc")]
    nt_dc: Option<String>,
    #[serde(rename = "nt.dn")]
    nt_dn: Option<String>,
}

#[derive(Serialize)]
struct JsonMembership {
    group_dn: String,
    member: bool,
    action: &'static str,
}

#[derive(Serialize)]
struct JsonOther {
    member: String,
    group_dn: String,
    managed: bool,
    action: &'static str,
}

#[derive(Serialize)]
struct JsonSummary {
    hosts: usize,
    add: usize,
    delete: usize,
    refused_deletes: usize,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn glob(g: &str) -> PartitionGlob {
        PartitionGlob::parse(g).expect("glob")
    }

    #[test]
    fn every_rule_that_puts_a_host_out_of_scope_is_named() {
        let info = |partition: Option<&str>, dc: Option<&str>, dn: Option<&str>| {
            ServerFile::Read(ServerInfo {
                partition: partition.map(str::to_owned),
                dc: dc.map(str::to_owned),
                dn: dn.map(str::to_owned),
            })
        };
        assert_eq!(
            why_out_of_scope(&info(Some("west"), Some(" "), None), &glob("east")),
            [
                "partition \"west\" does not match --partition \"east\"",
                "nt.dc is missing or empty",
                "nt.dn is missing or empty",
            ]
        );
        assert_eq!(
            why_out_of_scope(&info(None, Some("dc"), Some("CN=h")), &glob("e*")),
            ["no partition, and --partition \"e*\" does not match an empty one"]
        );
        assert_eq!(
            why_out_of_scope(&ServerFile::Missing, &glob("*")),
            ["no server file"]
        );
        let unusable =
            why_out_of_scope(&ServerFile::Unusable(ServerError::NotAMapping), &glob("*"));
        assert!(unusable[0].contains("can't be used"), "{unusable:?}");
    }
}

//! The apply ladder on real servers (send the request; retry a transient
//! failure with backoff; on any other, re-read the group and re-plan; then
//! send values one by one, where "already there" and "already gone" count
//! as success): `reconcile::apply_plan`
//! through an `LdapDirectory` against slapd (result codes 20, 16, 32) and
//! Samba (68, 53, 32), with the permissive-modify control on and off; the
//! transient path with slapd stopped while a change is being applied; and
//! the binary's `sync` surviving slapd being killed and restarted in the
//! middle of applying 300 groups.
//!
//! Each case first sends its change to an identical twin group, so the test
//! shows which answer the server really gives for it, then lets the ladder
//! apply it to the real group and counts the requests it took.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Read};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use gmsa_reconciler::directory::ldap::{Bind, LdapConfig, LdapDirectory, Password, PermissiveMode};
use gmsa_reconciler::directory::{rc, DirError, Directory, MemberChange};
use gmsa_reconciler::model::{Dn, Proid};
use gmsa_reconciler::plan::{GroupChange, Plan};
use gmsa_reconciler::reconcile::{apply_group, apply_plan, ApplyOptions, Backoff};
use support::e2e::{self, dn, read_groups};
use support::{SambaDc, Slapd};

fn set(dns: &[&Dn]) -> BTreeSet<Dn> {
    dns.iter().map(|d| (*d).clone()).collect()
}

/// One group of a ladder test.
struct Case {
    /// The case's name, part of its group's name.
    name: &'static str,
    /// The group's members before; `None`: the group does not exist.
    members: Option<Vec<Dn>>,
    add: Vec<Dn>,
    delete: Vec<Dn>,
    /// The server's answer to the whole change as one request (`None`:
    /// accepted), checked on a twin group.
    answer: Option<u32>,
    /// Modify requests the ladder must send.
    requests: usize,
    /// Re-reads of the group the ladder must make.
    reads: u64,
    /// Values that must be reported not applied (with the code given).
    not_applied: Option<(Vec<Dn>, u32)>,
    /// The group is expected to be reported vanished.
    vanished: bool,
    /// The group's members afterwards.
    after: Vec<Dn>,
}

/// Where a ladder test's groups live: its own OU, and names that start
/// with the OU's name (Samba wants every `sAMAccountName` unique in the
/// domain).
struct Ladder {
    ou: Dn,
    tag: String,
}

impl Ladder {
    fn new(parent: &str, tag: &str) -> Ladder {
        Ladder {
            ou: Dn::child("OU", tag, &dn(parent)),
            tag: tag.to_lowercase(),
        }
    }

    fn group(&self, name: &str) -> Dn {
        Dn::child("CN", &format!("{}-{name}", self.tag), &self.ou)
    }

    fn twin(&self, name: &str) -> Dn {
        self.group(&format!("probe-{name}"))
    }

    fn change(&self, case: &Case) -> GroupChange {
        GroupChange {
            group_dn: self.group(case.name),
            proid: Proid::new(&format!("{}-{}", self.tag, case.name)).expect("proid"),
            add: case.add.iter().cloned().collect(),
            delete: case.delete.iter().cloned().collect(),
        }
    }

    /// Change records creating the OU, each existing case's group and its
    /// twin.
    fn ldif(&self, cases: &[Case]) -> String {
        let mut ldif = format!(
            "dn: {}\nchangetype: add\nobjectClass: organizationalUnit\n\n",
            self.ou
        );
        for case in cases {
            if let Some(members) = &case.members {
                ldif += &group_ldif(&self.group(case.name), members);
                ldif += &group_ldif(&self.twin(case.name), members);
            }
        }
        ldif
    }

    /// Sends each case's change as one request to its twin and checks the
    /// server's answer, so that the ladder is known to meet it.
    async fn probe(&self, probe_dir: &LdapDirectory, cases: &[Case], server: &str) {
        for case in cases {
            let twin = match case.members {
                Some(_) => self.twin(case.name),
                None => self.group(case.name),
            };
            let change = MemberChange {
                add: case.add.clone(),
                delete: case.delete.clone(),
            };
            let answer = match probe_dir.modify_members(&twin, &change).await {
                Ok(()) => None,
                Err(err) => Some(
                    err.code()
                        .unwrap_or_else(|| panic!("{server} {}: no result code: {err}", case.name)),
                ),
            };
            assert_eq!(
                answer, case.answer,
                "{server}: the answer to case {:?} sent as one request",
                case.name
            );
        }
    }

    /// Applies all cases as one plan and checks every result, the requests
    /// sent and the groups afterwards.
    async fn run(&self, dir: &LdapDirectory, cases: &[Case], reader: &Reader) {
        let plan = Plan {
            changes: cases.iter().map(|c| self.change(c)).collect(),
            ..Plan::default()
        };
        // Capabilities are read once and remembered: read them now, so
        // that every search counted below is one of the ladder's re-reads.
        dir.capabilities().await.expect("root DSE");
        let before = dir.stats();
        let results = apply_plan(dir, &plan, &ApplyOptions::default()).await;
        let stats = dir.stats();
        assert_eq!(results.len(), cases.len());
        for (case, result) in cases.iter().zip(&results) {
            let name = case.name;
            let planned = self.change(case);
            assert_eq!(result.planned, planned, "{name}");
            assert_eq!(result.vanished, case.vanished, "{name}: vanished");
            assert_eq!(result.requests, case.requests, "{name}: modify requests");
            assert_eq!(result.retries, 0, "{name}: nothing here is transient");
            let (not_added, not_deleted) = match (&result.failed, &case.not_applied) {
                (None, None) => (BTreeSet::new(), BTreeSet::new()),
                (Some((left, err)), Some((values, code))) => {
                    assert_eq!(err.code(), Some(*code), "{name}: {err}");
                    let values: BTreeSet<Dn> = values.iter().cloned().collect();
                    let left_values: BTreeSet<Dn> = left.add.union(&left.delete).cloned().collect();
                    assert_eq!(left_values, values, "{name}: not applied");
                    (left.add.clone(), left.delete.clone())
                }
                (failed, want) => {
                    panic!("{name}: failed {failed:?}, expected not applied: {want:?}")
                }
            };
            // Everything planned is reported either applied or not
            // applied; a vanished group has nothing applied.
            if case.vanished {
                assert!(
                    result.applied.add.is_empty() && result.applied.delete.is_empty(),
                    "{name}: nothing is applied to a vanished group: {:?}",
                    result.applied
                );
            } else {
                let add: BTreeSet<Dn> = planned.add.difference(&not_added).cloned().collect();
                let delete: BTreeSet<Dn> =
                    planned.delete.difference(&not_deleted).cloned().collect();
                assert_eq!(result.applied.add, add, "{name}: applied additions");
                assert_eq!(result.applied.delete, delete, "{name}: applied deletions");
            }
        }
        let requests: usize = cases.iter().map(|c| c.requests).sum();
        assert_eq!(
            (stats.modifies - before.modifies) as usize,
            requests,
            "modify requests in all: one per group unless something was in the way"
        );
        let reads: u64 = cases.iter().map(|c| c.reads).sum();
        assert_eq!(
            stats.searches - before.searches,
            reads,
            "re-reads of groups in all"
        );

        let groups = reader.groups(&self.ou).await;
        for case in cases {
            let group = self.group(case.name);
            match groups.get(&group) {
                None => assert!(
                    case.members.is_none(),
                    "{name}: group is gone",
                    name = case.name
                ),
                Some(members) => {
                    let want: BTreeSet<Dn> = case.after.iter().cloned().collect();
                    assert_eq!(members, &want, "{}: members afterwards", case.name);
                }
            }
        }
    }
}

/// A change record adding a group.
fn group_ldif(group: &Dn, members: &[Dn]) -> String {
    let name = group
        .as_str()
        .split_once(',')
        .and_then(|(rdn, _)| rdn.split_once('='))
        .map(|(_, v)| v.to_owned())
        .expect("CN=name,...");
    let mut ldif = format!(
        "dn: {group}\nchangetype: add\nobjectClass: group\ncn: {name}\nsAMAccountName: {name}\n"
    );
    for m in members {
        ldif += &format!("member: {m}\n");
    }
    ldif.push('\n');
    ldif
}

/// Reads groups back independently of the directory under test.
struct Reader {
    url: String,
    bind_dn: String,
    password: String,
}

impl Reader {
    async fn groups(&self, base: &Dn) -> e2e::Groups {
        read_groups(&self.url, &self.bind_dn, &self.password, base.as_str()).await
    }
}

// ---------------------------------------------------------------------------
// slapd

fn slapd_config(url: &str, permissive: PermissiveMode) -> LdapConfig {
    LdapConfig {
        timeout: Duration::from_secs(10),
        permissive,
        ..LdapConfig::new(
            vec![url.to_owned()],
            Bind::Simple {
                dn: Slapd::SVC_DN.into(),
                password: Password::new(Slapd::SVC_PASSWORD),
            },
        )
    }
}

fn slapd_dir(url: &str, permissive: PermissiveMode) -> LdapDirectory {
    LdapDirectory::new(slapd_config(url, permissive)).expect("valid config")
}

fn host(i: usize) -> Dn {
    dn(&format!("cn=h{i},ou=Computers,dc=ad,dc=com"))
}

/// The slapd cases. slapd does not list the permissive-modify control.
/// Forced on, it lets an addition of a present value through, but not a
/// deletion of an absent one (16 still), and a deletion of a present and
/// an absent value together passes or fails depending on the order of the
/// values in the request, which is not ours to fix (a set): with the
/// control forced, the cases below delete absent values alone.
fn slapd_cases(permissive: PermissiveMode) -> Vec<Case> {
    let forced = permissive == PermissiveMode::Always;
    let (h1, h2, h3, h9) = (host(1), host(2), host(3), host(9));
    let unless_forced = |dns: Vec<Dn>| if forced { vec![] } else { dns };
    vec![
        Case {
            name: "clean",
            members: Some(vec![h1.clone()]),
            add: vec![h2.clone(), h3.clone()],
            delete: vec![h1.clone()],
            answer: None,
            requests: 1,
            reads: 0,
            not_applied: None,
            vanished: false,
            after: vec![h2.clone(), h3.clone()],
        },
        // A present value among new ones: 20 without the control.
        Case {
            name: "present",
            members: Some(vec![h1.clone(), h2.clone()]),
            add: vec![h1.clone(), h3.clone()],
            delete: vec![h2.clone()],
            answer: (!forced).then_some(rc::ATTRIBUTE_OR_VALUE_EXISTS),
            requests: if forced { 1 } else { 2 },
            reads: if forced { 0 } else { 1 },
            not_applied: None,
            vanished: false,
            after: vec![h1.clone(), h3.clone()],
        },
        // An absent value (among present ones without the control): 16.
        Case {
            name: "absent",
            members: Some(vec![h1.clone(), h2.clone()]),
            add: vec![h3.clone()],
            delete: [unless_forced(vec![h1.clone()]), vec![h9.clone()]].concat(),
            answer: Some(rc::NO_SUCH_ATTRIBUTE),
            requests: 2,
            reads: 1,
            not_applied: None,
            vanished: false,
            after: if forced {
                vec![h1.clone(), h2.clone(), h3.clone()]
            } else {
                vec![h2.clone(), h3.clone()]
            },
        },
        // Both in one request: the first change that fails decides the code.
        Case {
            name: "both",
            members: Some(vec![h1.clone(), h2.clone()]),
            add: vec![h1.clone(), h3.clone()],
            delete: [unless_forced(vec![h2.clone()]), vec![h9.clone()]].concat(),
            answer: Some(if forced {
                rc::NO_SUCH_ATTRIBUTE
            } else {
                rc::ATTRIBUTE_OR_VALUE_EXISTS
            }),
            requests: 2,
            reads: 1,
            not_applied: None,
            vanished: false,
            after: if forced {
                vec![h1.clone(), h2.clone(), h3.clone()]
            } else {
                vec![h1.clone(), h3.clone()]
            },
        },
        // The group is not there: 32, dropped after one re-read.
        Case {
            name: "vanished",
            members: None,
            add: vec![h1.clone()],
            delete: vec![h2.clone()],
            answer: Some(rc::NO_SUCH_OBJECT),
            requests: 1,
            reads: 1,
            not_applied: None,
            vanished: true,
            after: vec![],
        },
    ]
}

async fn slapd_ladder(permissive: PermissiveMode, tag: &str) {
    let slapd = Slapd::shared();
    let ladder = Ladder::new(Slapd::BASE, tag);
    let cases = slapd_cases(permissive);
    slapd.ldapmodify(&ladder.ldif(&cases));
    ladder
        .probe(&slapd_dir(&slapd.url(), permissive), &cases, "slapd")
        .await;
    let reader = Reader {
        url: slapd.url(),
        bind_dn: slapd.admin_dn().into(),
        password: slapd.admin_password().into(),
    };
    ladder
        .run(&slapd_dir(&slapd.url(), permissive), &cases, &reader)
        .await;
}

#[tokio::test]
async fn slapd_ladder_without_permissive_modify() {
    slapd_ladder(PermissiveMode::Never, "LadderNever").await;
}

#[tokio::test]
async fn slapd_ladder_with_permissive_modify_forced() {
    slapd_ladder(PermissiveMode::Always, "LadderAlways").await;
}

#[tokio::test]
async fn slapd_ladder_with_permissive_modify_when_listed() {
    // slapd does not list the control: Auto behaves as Never.
    let dir = slapd_dir(&Slapd::shared().url(), PermissiveMode::Auto);
    assert!(
        !dir.capabilities()
            .await
            .expect("root DSE")
            .permissive_modify
    );
    slapd_ladder(PermissiveMode::Auto, "LadderAuto").await;
}

/// A group change on an OU of the given slapd, with the group created.
fn transient_setup(slapd: &Slapd, ou: &str) -> GroupChange {
    let ou = dn(&format!("ou={ou},dc=ad,dc=com"));
    let group = Dn::child("cn", "g", &ou);
    slapd.ldapmodify(&format!(
        "dn: {ou}\nchangetype: add\nobjectClass: organizationalUnit\n\n{}",
        group_ldif(&group, &[host(1), host(2)])
    ));
    GroupChange {
        group_dn: group,
        proid: Proid::new("g").expect("proid"),
        add: set(&[&host(3), &host(4)]),
        delete: set(&[&host(1)]),
    }
}

async fn members_of(slapd: &Slapd, group: &Dn) -> BTreeSet<Dn> {
    let base = group.to_string();
    read_groups(
        &slapd.url(),
        slapd.admin_dn(),
        slapd.admin_password(),
        &base,
    )
    .await
    .remove(group)
    .expect("group exists")
}

/// slapd goes away after the plan was made: the Modify finds no server, is
/// retried with backoff, and goes through once slapd is back on its port.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_stopped_mid_plan_is_retried_until_it_is_back() {
    let mut slapd = Slapd::start();
    let change = transient_setup(&slapd, "Transient");
    let dir = slapd_dir(&slapd.url(), PermissiveMode::Never);
    let caps = dir.capabilities().await.expect("root DSE");
    // The plan was made on a live connection.
    dir.read_group(&change.group_dn)
        .await
        .expect("read")
        .expect("exists");
    slapd.stop();

    let options = ApplyOptions {
        // Many short tries: the restart below decides when it succeeds.
        backoff: Backoff {
            attempts: 1000,
            initial: Duration::from_millis(10),
            max: Duration::from_millis(50),
            ..Backoff::default()
        },
        ..ApplyOptions::default()
    };
    let restarter = async {
        // Restart only once a request has failed for want of a server.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while dir.stats().modifies < 2 {
            assert!(tokio::time::Instant::now() < deadline, "no retry seen");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        tokio::task::spawn_blocking(move || {
            slapd.restart();
            slapd
        })
        .await
        .expect("restart slapd")
    };
    let (result, slapd) = tokio::join!(apply_group(&dir, caps, &change, &options), restarter);

    assert!(result.is_complete(), "{:?}", result.failed);
    assert!(result.retries >= 1, "the first try cannot have worked");
    assert_eq!(result.requests, result.retries + 1);
    assert_eq!(result.applied, change);
    assert!(dir.stats().connects >= 2, "reconnected: {:?}", dir.stats());
    assert_eq!(
        members_of(&slapd, &change.group_dn).await,
        set(&[&host(2), &host(3), &host(4)])
    );
}

/// slapd does not come back within the attempts: the change is reported
/// not applied with a transient error, and nothing of it was applied.
#[tokio::test]
async fn a_server_that_stays_away_leaves_the_change_not_applied() {
    let mut slapd = Slapd::start();
    let change = transient_setup(&slapd, "Away");
    let dir = slapd_dir(&slapd.url(), PermissiveMode::Never);
    let caps = dir.capabilities().await.expect("root DSE");
    slapd.stop();
    let options = ApplyOptions {
        backoff: Backoff {
            attempts: 3,
            initial: Duration::from_millis(10),
            max: Duration::from_millis(20),
            ..Backoff::default()
        },
        ..ApplyOptions::default()
    };
    let result = apply_group(&dir, caps, &change, &options).await;
    let (left, err) = result.failed.clone().expect("not applied");
    assert!(
        matches!(err, DirError::Unreachable { .. }) && err.is_transient(),
        "{err:?}"
    );
    assert_eq!(left, change);
    assert!(result.applied.add.is_empty() && result.applied.delete.is_empty());
    assert!(!result.vanished);
    assert_eq!((result.requests, result.retries), (3, 2));

    slapd.restart();
    assert_eq!(
        members_of(&slapd, &change.group_dn).await,
        set(&[&host(1), &host(2)]),
        "nothing was applied"
    );
}

// ---------------------------------------------------------------------------
// Samba

fn samba_dir(dc: &SambaDc, permissive: PermissiveMode) -> LdapDirectory {
    LdapDirectory::new(LdapConfig {
        timeout: Duration::from_secs(30),
        permissive,
        ..LdapConfig::new(
            vec![dc.url()],
            Bind::Simple {
                dn: SambaDc::ADMIN.into(),
                password: Password::from_file(&dc.admin_password_file()).expect("password"),
            },
        )
    })
    .expect("valid config")
}

fn contact(i: usize) -> Dn {
    dn(&SambaDc::bulk_contact(i))
}

/// The Samba cases. Samba lists the permissive-modify control but ignores
/// it for `member`: whatever the mode, a present member gets 68 and an
/// absent one 53, and the whole request is refused, so the ladder re-reads
/// and re-plans. A member whose object does not exist gets 32, the code
/// of a missing group: only the re-read tells the two apart.
fn samba_cases(ou: &Dn) -> Vec<Case> {
    let c = contact;
    let nobody = dn(&format!("CN=nobody,{ou}"));
    vec![
        Case {
            name: "clean",
            members: Some(vec![c(1)]),
            add: vec![c(2), c(3)],
            delete: vec![c(1)],
            answer: None,
            requests: 1,
            reads: 0,
            not_applied: None,
            vanished: false,
            after: vec![c(2), c(3)],
        },
        Case {
            name: "present",
            members: Some(vec![c(1), c(2)]),
            add: vec![c(1), c(3)],
            delete: vec![c(2)],
            answer: Some(rc::ENTRY_ALREADY_EXISTS),
            requests: 2,
            reads: 1,
            not_applied: None,
            vanished: false,
            after: vec![c(1), c(3)],
        },
        Case {
            name: "absent",
            members: Some(vec![c(1), c(2)]),
            add: vec![c(3)],
            delete: vec![c(1), c(9)],
            answer: Some(rc::UNWILLING_TO_PERFORM),
            requests: 2,
            reads: 1,
            not_applied: None,
            vanished: false,
            after: vec![c(2), c(3)],
        },
        Case {
            name: "vanished",
            members: None,
            add: vec![c(1)],
            delete: vec![c(2)],
            answer: Some(rc::NO_SUCH_OBJECT),
            requests: 1,
            reads: 1,
            not_applied: None,
            vanished: true,
            after: vec![],
        },
        // The batch (32), the re-planned batch (32 again), then value by
        // value: two good values and the bad one, which a last re-read
        // confirms is not there.
        Case {
            name: "nomember",
            members: Some(vec![c(1), c(2)]),
            add: vec![c(4), nobody.clone()],
            delete: vec![c(1)],
            answer: Some(rc::NO_SUCH_OBJECT),
            requests: 5,
            reads: 2,
            not_applied: Some((vec![nobody], rc::NO_SUCH_OBJECT)),
            vanished: false,
            after: vec![c(2), c(4)],
        },
    ]
}

async fn samba_ladder(permissive: PermissiveMode, tag: &str) {
    let dc = SambaDc::shared();
    let ladder = Ladder::new(SambaDc::BASE, tag);
    let cases = samba_cases(&ladder.ou);
    dc.ldapmodify(&ladder.ldif(&cases));
    let dir = samba_dir(dc, permissive);
    // The control is listed; with Auto it is sent (and ignored).
    assert!(
        dir.capabilities()
            .await
            .expect("root DSE")
            .permissive_modify
    );
    ladder
        .probe(&samba_dir(dc, permissive), &cases, "samba")
        .await;
    let reader = Reader {
        url: dc.url(),
        bind_dn: SambaDc::ADMIN.into(),
        password: dc.admin_password(),
    };
    ladder.run(&dir, &cases, &reader).await;
}

#[tokio::test]
async fn samba_ladder_with_permissive_modify_listed_but_ignored() {
    samba_ladder(PermissiveMode::Auto, "LadderAuto").await;
}

#[tokio::test]
async fn samba_ladder_without_permissive_modify() {
    samba_ladder(PermissiveMode::Never, "LadderNever").await;
}

// ---------------------------------------------------------------------------
// The binary: slapd killed and restarted while `sync` applies 300 groups

const GROUPS: usize = 300;
const HOSTS: usize = 60;

fn recon_host(i: usize) -> String {
    format!("cn=r{:02},ou=Computers,dc=ad,dc=com", i % HOSTS)
}

/// Group `i` must hold hosts i, i+1, i+2 and holds i+2, i+30, i+31: two
/// additions and two deletions each.
fn recon_desired(i: usize) -> BTreeSet<Dn> {
    (0..3).map(|k| dn(&recon_host(i + k))).collect()
}

fn recon_initial(i: usize) -> Vec<String> {
    [2, 30, 31].iter().map(|k| recon_host(i + k)).collect()
}

fn recon_group(i: usize) -> Dn {
    dn(&format!("cn=p{i:03}-gmsa-hosts,ou=Recon,dc=ad,dc=com"))
}

fn recon_ldif() -> String {
    let mut ldif =
        String::from("dn: ou=Recon,dc=ad,dc=com\nobjectClass: organizationalUnit\nou: Recon\n\n");
    for i in 0..GROUPS {
        let name = format!("p{i:03}-gmsa-hosts");
        ldif += &format!(
            "dn: {}\nobjectClass: group\ncn: {name}\nsAMAccountName: {name}\n",
            recon_group(i)
        );
        for m in recon_initial(i) {
            ldif += &format!("member: {m}\n");
        }
        ldif.push('\n');
    }
    ldif
}

fn recon_tree() -> support::tree::Tree {
    let tree = support::tree::Tree::new();
    for h in 0..HOSTS {
        tree.server(&format!("r{h:02}"), "p", &recon_host(h));
    }
    for i in 0..GROUPS {
        for k in 0..3 {
            let host = format!("r{:02}", (i + k) % HOSTS);
            tree.place(&host, &format!("p{i:03}.app#{:010}", i * 3 + k));
        }
    }
    tree.mark_ready();
    tree
}

/// What one `sync --format json` reported, by group.
#[derive(Debug, Default)]
struct SyncReport {
    applied: BTreeMap<Dn, (BTreeSet<Dn>, BTreeSet<Dn>)>,
    not_applied: BTreeMap<Dn, (BTreeSet<Dn>, BTreeSet<Dn>)>,
}

fn parse_report(stdout: &str) -> SyncReport {
    let v: serde_json::Value = serde_json::from_str(stdout)
        .unwrap_or_else(|e| panic!("sync output is not JSON ({e}):\n{stdout}"));
    let change = |c: &serde_json::Value| {
        let dns = |key: &str| -> BTreeSet<Dn> {
            c[key]
                .as_array()
                .unwrap_or_else(|| panic!("{key} in {c}"))
                .iter()
                .map(|d| dn(d.as_str().expect("a DN string")))
                .collect()
        };
        let group = dn(c["group_dn"].as_str().expect("group_dn"));
        (group, (dns("add"), dns("delete")))
    };
    let mut report = SyncReport::default();
    for c in v["changes"].as_array().expect("changes") {
        let (group, values) = change(c);
        assert!(
            report.applied.insert(group, values).is_none(),
            "one entry per group"
        );
    }
    for n in v["not_applied"].as_array().into_iter().flatten() {
        assert!(n["error"].as_str().is_some_and(|e| !e.is_empty()), "{n}");
        let (group, values) = change(n);
        assert!(
            report.not_applied.insert(group, values).is_none(),
            "one entry per group"
        );
    }
    report
}

/// A running `sync` whose output is collected as it comes (a full pipe
/// must never hold it up).
struct Running {
    child: std::process::Child,
    stdout: std::thread::JoinHandle<String>,
    stderr: Arc<Mutex<String>>,
    stderr_reader: std::thread::JoinHandle<()>,
}

impl Running {
    fn start(args: &[String]) -> Running {
        let mut child = e2e::spawn_bin(args);
        let mut out = child.stdout.take().expect("stdout is piped");
        let stdout = std::thread::spawn(move || {
            let mut text = String::new();
            out.read_to_string(&mut text).expect("read stdout");
            text
        });
        let err = child.stderr.take().expect("stderr is piped");
        let stderr = Arc::new(Mutex::new(String::new()));
        let sink = Arc::clone(&stderr);
        let stderr_reader = std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                let mut text = sink.lock().expect("stderr lock");
                text.push_str(&line);
                text.push('\n');
            }
        });
        Running {
            child,
            stdout,
            stderr,
            stderr_reader,
        }
    }

    fn signal(&self, sig: libc::c_int) {
        // SAFETY: kill(2) of our own child, which has not been reaped yet.
        let rc = unsafe { libc::kill(self.child.id() as libc::pid_t, sig) };
        assert_eq!(rc, 0, "signal {sig} to sync");
    }

    fn exited(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }

    fn stderr_contains(&self, text: &str) -> bool {
        self.stderr.lock().expect("stderr lock").contains(text)
    }

    /// Waits for the exit: `(code, stdout, stderr)`.
    fn finish(mut self) -> (i32, String, String) {
        let status = self.child.wait().expect("wait for sync");
        let stdout = self.stdout.join().expect("stdout reader");
        self.stderr_reader.join().expect("stderr reader");
        let stderr = self.stderr.lock().expect("stderr lock").clone();
        (status.code().unwrap_or(-1), stdout, stderr)
    }
}

/// When slapd comes back after being killed under a running `sync`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Restart {
    /// As soon as it can: `sync` may well reconnect and complete.
    AtOnce,
    /// Once `sync` has given up on at least one group: what it could not
    /// apply must be named, the rest applied after the reconnect.
    AfterAGroupGaveUp,
}

async fn interrupted_sync(restart: Restart) {
    let mut slapd = Slapd::start_with(&[&recon_ldif()]);
    let tree = recon_tree();
    let tmp = tempfile::tempdir().expect("temp dir");
    let password = e2e::password_file(tmp.path(), Slapd::SVC_PASSWORD);
    let mut args = vec!["sync".to_owned()];
    args.extend(e2e::ldap_args(&slapd.url(), Slapd::SVC_DN, &password));
    args.extend(
        [
            "--group-ou=ou=Recon,dc=ad,dc=com",
            "--partition=p",
            // 600 deletions are a mass deletion; this test is not about that.
            "--allow-mass-delete",
            "--format=json",
            "--timeout=5s",
        ]
        .map(str::to_owned),
    );
    args.push(format!("--fs-root={}", tree.root().display()));
    let admin = (slapd.admin_dn(), slapd.admin_password());
    let read = |url: String| async move {
        read_groups(&url, admin.0, admin.1, "ou=Recon,dc=ad,dc=com").await
    };
    let desired: e2e::Groups = (0..GROUPS)
        .map(|i| (recon_group(i), recon_desired(i)))
        .collect();

    let mut sync = Running::start(&args);
    // Freeze `sync` as soon as its first group has changed, so that the
    // server goes away while it still has groups to apply.
    let first = recon_group(0);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let now = read_groups(&slapd.url(), admin.0, admin.1, first.as_str()).await;
        if now.get(&first) == desired.get(&first) {
            break;
        }
        assert!(Instant::now() < deadline, "sync changed nothing");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    sync.signal(libc::SIGSTOP);
    let done_before = read(slapd.url())
        .await
        .iter()
        .filter(|(g, m)| desired.get(*g) == Some(*m))
        .count();
    assert!(
        done_before < GROUPS,
        "sync had applied every group before it could be interrupted: make the workload larger"
    );

    // Kill slapd, let `sync` run into the dead server, then bring slapd
    // back on the same port.
    slapd.kill();
    sync.signal(libc::SIGCONT);
    if restart == Restart::AfterAGroupGaveUp {
        // It gives up after its backoff (a few seconds at most), or ends:
        // a `sync` that never gives up fails the checks below.
        let deadline = Instant::now() + Duration::from_secs(30);
        while !sync.stderr_contains("not fully applied") && !sync.exited() {
            if Instant::now() > deadline {
                let log = sync.stderr.lock().expect("stderr lock").clone();
                panic!("sync never gave up on a group:\n{log}");
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    let slapd = tokio::task::spawn_blocking(move || {
        slapd.restart();
        slapd
    })
    .await
    .expect("restart slapd");
    let (code, stdout, stderr) = tokio::task::spawn_blocking(move || sync.finish())
        .await
        .expect("sync");
    let report = parse_report(&stdout);
    eprintln!(
        "{restart:?}: exit {code}, {done_before} of {GROUPS} groups done when slapd was killed, \
         {} groups not applied",
        report.not_applied.len()
    );
    match code {
        0 => assert!(report.not_applied.is_empty(), "{stdout}"),
        1 => assert!(
            !report.not_applied.is_empty(),
            "exit 1 names what was not applied: {stdout}\n{stderr}"
        ),
        _ => panic!("exit {code}: {stderr}"),
    }
    if restart == Restart::AfterAGroupGaveUp {
        assert_eq!(code, 1, "a group was given up: {stderr}");
        // The warning names the group it gave up on in its own fields.
        for line in stderr.lines() {
            if let Some((_, fields)) = line.split_once("not fully applied") {
                assert!(
                    fields.contains(" proid=") && fields.contains(" group="),
                    "{line}"
                );
            }
        }
    }

    // Every planned value is reported exactly once, applied or not.
    let after = read(slapd.url()).await;
    for i in 0..GROUPS {
        let group = recon_group(i);
        let initial: BTreeSet<Dn> = recon_initial(i).iter().map(|s| dn(s)).collect();
        let want = &desired[&group];
        let planned_add: BTreeSet<Dn> = want.difference(&initial).cloned().collect();
        let planned_delete: BTreeSet<Dn> = initial.difference(want).cloned().collect();
        let empty = (BTreeSet::new(), BTreeSet::new());
        let applied = report.applied.get(&group).unwrap_or(&empty);
        let failed = report.not_applied.get(&group).unwrap_or(&empty);
        assert!(
            applied.0.is_disjoint(&failed.0) && applied.1.is_disjoint(&failed.1),
            "{group}"
        );
        let add: BTreeSet<Dn> = applied.0.union(&failed.0).cloned().collect();
        let delete: BTreeSet<Dn> = applied.1.union(&failed.1).cloned().collect();
        assert_eq!(
            (&add, &delete),
            (&planned_add, &planned_delete),
            "{group}: reported"
        );
        // Nothing is reported applied that the server does not hold.
        let members = &after[&group];
        for a in &applied.0 {
            assert!(
                members.contains(a),
                "{group}: {a} reported added, not there"
            );
        }
        for d in &applied.1 {
            assert!(
                !members.contains(d),
                "{group}: {d} reported deleted, still there"
            );
        }
    }

    // A second run converges and applies only what the first did not.
    let (code, stdout, stderr) = Running::start(&args).finish();
    assert_eq!(code, 0, "second sync: {stdout}\n{stderr}");
    let second = parse_report(&stdout);
    assert!(second.not_applied.is_empty());
    for (group, (add, delete)) in &second.applied {
        let left = report
            .not_applied
            .get(group)
            .unwrap_or_else(|| panic!("{group}: changed again though reported applied"));
        assert!(
            add.is_subset(&left.0) && delete.is_subset(&left.1),
            "{group}"
        );
    }
    let after = read(slapd.url()).await;
    assert_eq!(e2e::show(&after), e2e::show(&desired));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_reconnects_to_slapd_killed_and_restarted_mid_apply() {
    interrupted_sync(Restart::AtOnce).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_names_the_groups_it_gave_up_while_slapd_was_away() {
    interrupted_sync(Restart::AfterAGroupGaveUp).await;
}

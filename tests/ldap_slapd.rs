//! The LDAP directory against a real OpenLDAP slapd with Active Directory's
//! size limits: paging, filter escaping, result codes, bind failures,
//! failover, reconnects and TLS. Tests that leave the server running share
//! one slapd and keep to their own OU; the others start their own.

mod support;

use std::collections::BTreeSet;
use std::time::Duration;

use gmsa_reconciler::directory::ldap::{Bind, LdapConfig, LdapDirectory, Password};
use gmsa_reconciler::directory::{rc, DirError, Directory, MemberChange, Op};
use gmsa_reconciler::model::Dn;
use support::Slapd;

fn dn(s: &str) -> Dn {
    Dn::parse(s).expect("valid DN")
}

fn svc() -> Bind {
    Bind::Simple {
        dn: Slapd::SVC_DN.into(),
        password: Password::new(Slapd::SVC_PASSWORD),
    }
}

fn config(urls: &[String]) -> LdapConfig {
    LdapConfig {
        timeout: Duration::from_secs(10),
        ..LdapConfig::new(urls.to_vec(), svc())
    }
}

fn directory(slapd: &Slapd) -> LdapDirectory {
    LdapDirectory::new(config(&[slapd.url()])).expect("valid config")
}

fn host(i: usize) -> String {
    format!("cn=host{i},ou=Computers,dc=ad,dc=com")
}

/// An OU and groups in it, as LDIF content records.
fn ou_with_groups(ou: &str, groups: &[(&str, Vec<String>)]) -> String {
    let mut ldif =
        format!("dn: ou={ou},dc=ad,dc=com\nobjectClass: organizationalUnit\nou: {ou}\n\n");
    for (name, members) in groups {
        ldif.push_str(&format!(
            "dn: cn={cn},ou={ou},dc=ad,dc=com\nobjectClass: group\ncn: {name}\nsAMAccountName: {name}\n",
            cn = gmsa_reconciler::model::escape_dn_value(name),
        ));
        for m in members {
            ldif.push_str(&format!("member: {m}\n"));
        }
        ldif.push('\n');
    }
    ldif
}

fn members(dns: &[String]) -> BTreeSet<Dn> {
    dns.iter().map(|s| dn(s)).collect()
}

fn code_of(err: &DirError) -> u32 {
    err.code()
        .unwrap_or_else(|| panic!("expected an LDAP result code, got {err:?}"))
}

#[tokio::test]
async fn paged_search_returns_more_than_1000_groups_that_an_unpaged_search_cannot() {
    const GROUPS: usize = 1234;
    let names: Vec<String> = (0..GROUPS)
        .map(|i| format!("proid{i:04}-gmsa-hosts"))
        .collect();
    let groups: Vec<(&str, Vec<String>)> = names
        .iter()
        .enumerate()
        .map(|(i, n)| (n.as_str(), (0..i % 3).map(|k| host(i + k)).collect()))
        .collect();
    let slapd = Slapd::start_with(&[&ou_with_groups("Many", &groups)]);
    let base = dn("ou=Many,dc=ad,dc=com");

    // The same search without paging, as the same account, hits the limit.
    let (conn, mut ldap) = ldap3::LdapConnAsync::new(&slapd.url())
        .await
        .expect("connect");
    ldap3::drive!(conn);
    ldap.simple_bind(Slapd::SVC_DN, Slapd::SVC_PASSWORD)
        .await
        .expect("bind")
        .success()
        .expect("bind accepted");
    let ldap3::SearchResult(entries, result) = ldap
        .search(
            base.as_str(),
            ldap3::Scope::Subtree,
            "(objectClass=group)",
            vec!["cn"],
        )
        .await
        .expect("unpaged search answered");
    assert_eq!(result.rc, rc::SIZE_LIMIT_EXCEEDED, "{result:?}");
    assert!(entries.len() < GROUPS);

    let dir = LdapDirectory::new(LdapConfig {
        page_size: 500,
        ..config(&[slapd.url()])
    })
    .expect("valid config");
    let found = dir.search_groups(&base).await.expect("paged search");
    assert_eq!(found.len(), GROUPS);
    let found_names: BTreeSet<&str> = found.iter().map(|g| g.sam_account_name.as_str()).collect();
    assert_eq!(found_names, names.iter().map(String::as_str).collect());
    for (i, group) in found.iter().enumerate() {
        // Sorted by DN, which here is the order of the names.
        assert_eq!(group.sam_account_name, names[i]);
        let want: Vec<String> = (0..i % 3).map(|k| host(i + k)).collect();
        assert_eq!(group.members, members(&want), "{}", group.dn);
    }
    let stats = dir.stats();
    assert_eq!(stats.searches, GROUPS.div_ceil(500) as u64, "{stats:?}");
    assert_eq!(stats.range_reads, 0, "whole values need no range reads");
}

#[tokio::test]
async fn find_group_takes_filter_metacharacters_literally() {
    let slapd = Slapd::shared();
    let names = ["web*(x)", "webfoo(x)", "web", "a\\b)"];
    let groups: Vec<(&str, Vec<String>)> = names
        .iter()
        .enumerate()
        .map(|(i, n)| (*n, vec![host(i)]))
        .collect();
    slapd.add_entries(&ou_with_groups("Find", &groups));
    let dir = directory(slapd);
    let base = dn("ou=Find,dc=ad,dc=com");

    for (i, name) in names.iter().enumerate() {
        let group = dir
            .find_group(&base, name)
            .await
            .expect("search")
            .unwrap_or_else(|| panic!("{name} not found"));
        assert_eq!(group.sam_account_name, *name);
        assert_eq!(group.members, members(&[host(i)]));
    }
    // Unescaped, `web*` would be a substring filter matching three groups.
    assert_eq!(dir.find_group(&base, "web*").await.expect("search"), None);
    assert_eq!(dir.find_group(&base, "*").await.expect("search"), None);
    // sAMAccountName compares without regard to case, like AD.
    let upper = dir.find_group(&base, "WEB").await.expect("search");
    assert_eq!(upper.map(|g| g.sam_account_name), Some("web".to_owned()));
}

#[tokio::test]
async fn read_group_of_a_missing_group_is_none() {
    let slapd = Slapd::shared();
    slapd.add_entries(&ou_with_groups("Read", &[("g1", vec![host(1), host(2)])]));
    let dir = directory(slapd);

    let group = dir
        .read_group(&dn("cn=g1,ou=Read,dc=ad,dc=com"))
        .await
        .expect("read")
        .expect("g1 exists");
    assert_eq!(group.sam_account_name, "g1");
    assert_eq!(group.members, members(&[host(1), host(2)]));
    // Missing below an existing OU, below a missing OU, and not a group.
    for missing in [
        "cn=nope,ou=Read,dc=ad,dc=com",
        "cn=g1,ou=Nowhere,dc=ad,dc=com",
        "ou=Read,dc=ad,dc=com",
    ] {
        assert_eq!(
            dir.read_group(&dn(missing)).await.expect("read"),
            None,
            "{missing}"
        );
    }
}

#[tokio::test]
async fn modify_members_adds_and_deletes_in_one_request() {
    let slapd = Slapd::shared();
    slapd.add_entries(&ou_with_groups("Modify", &[("g", vec![host(1), host(2)])]));
    let dir = directory(slapd);
    let group = dn("cn=g,ou=Modify,dc=ad,dc=com");

    let change = MemberChange {
        add: vec![dn(&host(3)), dn(&host(4))],
        delete: vec![dn(&host(1))],
    };
    dir.modify_members(&group, &change).await.expect("modify");
    assert_eq!(dir.stats().modifies, 1);
    let now = dir.read_group(&group).await.expect("read").expect("exists");
    assert_eq!(now.members, members(&[host(2), host(3), host(4)]));

    // Deleting the last members leaves an empty group (AD allows it).
    let change = MemberChange {
        add: vec![],
        delete: vec![dn(&host(2)), dn(&host(3)), dn(&host(4))],
    };
    dir.modify_members(&group, &change).await.expect("modify");
    let now = dir.read_group(&group).await.expect("read").expect("exists");
    assert!(now.members.is_empty());
}

#[tokio::test]
async fn result_codes_surface_as_results_and_a_failed_request_changes_nothing() {
    let slapd = Slapd::shared();
    slapd.add_entries(&ou_with_groups("Codes", &[("g", vec![host(1)])]));
    let dir = directory(slapd);
    let group = dn("cn=g,ou=Codes,dc=ad,dc=com");
    // slapd does not list permissive modify, so Auto leaves it out.
    assert!(
        !dir.capabilities()
            .await
            .expect("root DSE")
            .permissive_modify
    );

    let add_present = MemberChange {
        add: vec![dn(&host(1))],
        delete: vec![],
    };
    let err = dir
        .modify_members(&group, &add_present)
        .await
        .expect_err("present");
    assert_eq!(code_of(&err), rc::ATTRIBUTE_OR_VALUE_EXISTS, "{err}");
    assert!(matches!(&err, DirError::Result { op: Op::Modify, dn, .. } if dn == group.as_str()));
    assert!(!err.is_transient());

    let delete_absent = MemberChange {
        add: vec![dn(&host(2))],
        delete: vec![dn(&host(9))],
    };
    let err = dir
        .modify_members(&group, &delete_absent)
        .await
        .expect_err("absent");
    assert_eq!(code_of(&err), rc::NO_SUCH_ATTRIBUTE, "{err}");
    // The add in the same request was not applied either.
    let now = dir.read_group(&group).await.expect("read").expect("exists");
    assert_eq!(now.members, members(&[host(1)]));

    let missing = dn("cn=gone,ou=Codes,dc=ad,dc=com");
    let err = dir
        .modify_members(&missing, &add_present)
        .await
        .expect_err("missing");
    assert_eq!(code_of(&err), rc::NO_SUCH_OBJECT, "{err}");
}

/// slapd does not list permissive modify, but honours it for adds when
/// sent: so `Always` proves the control goes out and is well formed. (Its
/// permissive deletes are unreliable: an absent value after a present one
/// in the same request still gets 16, so they are not tested here.)
#[tokio::test]
async fn permissive_modify_when_forced_is_sent_and_honoured_by_slapd() {
    use gmsa_reconciler::directory::ldap::PermissiveMode;
    let slapd = Slapd::shared();
    slapd.add_entries(&ou_with_groups(
        "Permissive",
        &[("g", vec![host(1), host(2)])],
    ));
    let group = dn("cn=g,ou=Permissive,dc=ad,dc=com");
    let with_control = |permissive| {
        LdapDirectory::new(LdapConfig {
            permissive,
            ..config(&[slapd.url()])
        })
        .expect("valid config")
    };

    // A present value among new ones.
    let change = MemberChange {
        add: vec![dn(&host(1)), dn(&host(3))],
        delete: vec![],
    };
    let forced = with_control(PermissiveMode::Always);
    forced
        .modify_members(&group, &change)
        .await
        .expect("permissive");
    let now = forced
        .read_group(&group)
        .await
        .expect("read")
        .expect("exists");
    assert_eq!(now.members, members(&[host(1), host(2), host(3)]));

    // The same kind of request without the control fails.
    let change = MemberChange {
        add: vec![dn(&host(1)), dn(&host(4))],
        delete: vec![],
    };
    let plain = with_control(PermissiveMode::Auto);
    let err = plain
        .modify_members(&group, &change)
        .await
        .expect_err("no control");
    assert_eq!(code_of(&err), rc::ATTRIBUTE_OR_VALUE_EXISTS, "{err}");
}

#[tokio::test]
async fn a_wrong_password_fails_the_bind_without_revealing_it() {
    let slapd = Slapd::shared();
    let secret = "Wr0ng-but-Secret-4711";
    let dir = LdapDirectory::new(LdapConfig::new(
        vec![slapd.url()],
        Bind::Simple {
            dn: Slapd::SVC_DN.into(),
            password: Password::new(secret),
        },
    ))
    .expect("valid config");
    let err = dir
        .read_group(&dn("cn=g,dc=ad,dc=com"))
        .await
        .expect_err("bad password");
    assert!(
        matches!(
            &err,
            DirError::Result {
                op: Op::Connect,
                code: 49,
                ..
            }
        ),
        "{err:?}"
    );
    for text in [err.to_string(), format!("{err:?}"), format!("{dir:?}")] {
        assert!(!text.contains(secret), "password leaked: {text}");
    }
}

#[tokio::test]
async fn failover_uses_the_next_url_when_the_first_is_dead() {
    let slapd = Slapd::shared();
    slapd.add_entries(&ou_with_groups("Failover", &[("g", vec![host(1)])]));
    let dead = format!("ldap://127.0.0.1:{}", support::free_port());
    let dir = LdapDirectory::new(config(&[dead, slapd.url()])).expect("valid config");

    let group = dir
        .read_group(&dn("cn=g,ou=Failover,dc=ad,dc=com"))
        .await
        .expect("second URL answers")
        .expect("exists");
    assert_eq!(group.members, members(&[host(1)]));
    assert_eq!(dir.connected_url().await, Some(slapd.url()));
    assert_eq!(dir.stats().connects, 1);
}

#[tokio::test]
async fn an_operation_after_a_server_restart_reconnects() {
    let mut slapd = Slapd::start_with(&[&ou_with_groups("Restart", &[("g", vec![host(1)])])]);
    let dir = directory(&slapd);
    let group = dn("cn=g,ou=Restart,dc=ad,dc=com");
    assert!(dir.read_group(&group).await.expect("read").is_some());

    slapd.stop();
    let err = dir.read_group(&group).await.expect_err("server is down");
    assert!(matches!(err, DirError::Unreachable { .. }), "{err:?}");
    assert!(err.is_transient());

    slapd.restart();
    let change = MemberChange {
        add: vec![dn(&host(2))],
        delete: vec![],
    };
    dir.modify_members(&group, &change)
        .await
        .expect("reconnected");
    let now = dir.read_group(&group).await.expect("read").expect("exists");
    assert_eq!(now.members, members(&[host(1), host(2)]));
    assert_eq!(dir.stats().connects, 2);
}

#[tokio::test]
async fn a_server_that_never_answers_times_out_as_unreachable() {
    // Accepts connections and reads nothing: every request must time out.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let url = format!("ldap://{}", listener.local_addr().expect("addr"));
    let dir = LdapDirectory::new(LdapConfig {
        timeout: Duration::from_millis(500),
        ..LdapConfig::new(vec![url], svc())
    })
    .expect("valid config");
    let err = dir
        .read_group(&dn("cn=g,dc=ad,dc=com"))
        .await
        .expect_err("no answer");
    assert!(matches!(err, DirError::Unreachable { .. }), "{err:?}");
    assert!(err.is_transient());
    drop(listener);
}

#[tokio::test]
async fn tls_is_verified_against_the_given_ca() {
    let slapd = Slapd::start_tls();
    slapd.add_entries(&ou_with_groups("Tls", &[("g", vec![host(1)])]));
    let group = dn("cn=g,ou=Tls,dc=ad,dc=com");
    let tls = |url: String, starttls: bool, ca: bool, insecure: bool| {
        LdapDirectory::new(LdapConfig {
            starttls,
            tls_ca_file: ca.then(|| slapd.ca_file()),
            tls_insecure: insecure,
            ..config(&[url])
        })
        .expect("valid config")
    };

    for (url, starttls) in [(slapd.url(), true), (slapd.ldaps_url(), false)] {
        let verified = tls(url.clone(), starttls, true, false);
        let found = verified.read_group(&group).await.expect("trusted CA");
        assert_eq!(found.map(|g| g.members), Some(members(&[host(1)])), "{url}");

        let untrusted = tls(url.clone(), starttls, false, false);
        let err = untrusted.read_group(&group).await.expect_err("unknown CA");
        let DirError::Fatal(message) = &err else {
            panic!("{url}: an untrusted certificate must be fatal, got {err:?}")
        };
        assert!(message.contains("TLS"), "{message}");

        let insecure = tls(url.clone(), starttls, false, true);
        assert!(
            insecure
                .read_group(&group)
                .await
                .expect("insecure")
                .is_some(),
            "{url}"
        );
    }
}

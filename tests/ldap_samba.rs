//! The LDAP directory against a real Samba AD domain controller: the
//! permissive-modify control, AD's result codes, and ranged retrieval of
//! a 3,000-member group. The tests share one DC and each keeps
//! to its own OU.

mod support;

use std::collections::BTreeSet;
use std::time::Duration;

use gmsa_reconciler::directory::ldap::{Bind, LdapConfig, LdapDirectory, Password, PermissiveMode};
use gmsa_reconciler::directory::{rc, DirError, Directory, MemberChange, Op};
use gmsa_reconciler::model::Dn;
use support::{SambaDc, SAMBA_BULK_CONTACTS};

fn dn(s: &str) -> Dn {
    Dn::parse(s).expect("valid DN")
}

fn config(dc: &SambaDc) -> LdapConfig {
    LdapConfig {
        timeout: Duration::from_secs(30),
        ..LdapConfig::new(
            vec![dc.url()],
            Bind::Simple {
                dn: SambaDc::ADMIN.into(),
                password: Password::from_file(&dc.admin_password_file()).expect("password file"),
            },
        )
    }
}

fn directory(dc: &SambaDc, permissive: PermissiveMode) -> LdapDirectory {
    LdapDirectory::new(LdapConfig {
        permissive,
        ..config(dc)
    })
    .expect("valid config")
}

fn contact(i: usize) -> Dn {
    dn(&SambaDc::bulk_contact(i))
}

/// Creates `OU=<ou>` with one group `CN=<name>` holding `members`; returns
/// the group's DN.
fn ou_with_group(dc: &SambaDc, ou: &str, name: &str, members: &[Dn]) -> Dn {
    let base = SambaDc::BASE;
    let mut ldif = format!(
        "dn: OU={ou},{base}\nchangetype: add\nobjectClass: organizationalUnit\n\n\
         dn: CN={name},OU={ou},{base}\nchangetype: add\nobjectClass: group\nsAMAccountName: {name}\n"
    );
    for m in members {
        ldif.push_str(&format!("member: {m}\n"));
    }
    dc.ldapmodify(&ldif);
    dn(&format!("CN={name},OU={ou},{base}"))
}

fn code_and_message(err: &DirError) -> (u32, String) {
    match err {
        DirError::Result {
            op: Op::Modify,
            code,
            message,
            ..
        } => (*code, message.clone()),
        other => panic!("expected a modify result code, got {other:?}"),
    }
}

#[tokio::test]
async fn capabilities_list_permissive_modify() {
    let dc = SambaDc::shared();
    let dir = directory(dc, PermissiveMode::Auto);
    assert!(
        dir.capabilities()
            .await
            .expect("root DSE")
            .permissive_modify
    );
    // Read once and remembered.
    let searches = dir.stats().searches;
    dir.capabilities().await.expect("cached");
    assert_eq!(dir.stats().searches, searches);
}

/// Samba lists permissive modify and honours it for ordinary attributes,
/// but its linked-attribute code (`member` is one) never looks at it: a
/// present member still gets 68 and an absent one 53, control or not, and
/// nothing of the request is applied. Against Samba the reconciler's
/// result-code path is the one that runs; real AD honours the control.
#[tokio::test]
async fn samba_lists_permissive_modify_but_ignores_it_for_member() {
    let dc = SambaDc::shared();
    let group = ou_with_group(
        dc,
        "Permissive",
        "perm-gmsa-hosts",
        &[contact(0), contact(1)],
    );
    let dir = directory(dc, PermissiveMode::Auto);
    assert!(
        dir.capabilities()
            .await
            .expect("root DSE")
            .permissive_modify
    );

    let add_present = MemberChange {
        add: vec![contact(0), contact(2)],
        delete: vec![],
    };
    let err = dir
        .modify_members(&group, &add_present)
        .await
        .expect_err("68");
    assert_eq!(code_and_message(&err).0, rc::ENTRY_ALREADY_EXISTS, "{err}");
    let delete_absent = MemberChange {
        add: vec![],
        delete: vec![contact(5), contact(1)],
    };
    let err = dir
        .modify_members(&group, &delete_absent)
        .await
        .expect_err("53");
    assert_eq!(code_and_message(&err).0, rc::UNWILLING_TO_PERFORM, "{err}");
    let now = dir.read_group(&group).await.expect("read").expect("exists");
    assert_eq!(now.members, [contact(0), contact(1)].into());

    // Requests whose values are all new, or all present, go through.
    let change = MemberChange {
        add: vec![contact(2), contact(3)],
        delete: vec![contact(1)],
    };
    dir.modify_members(&group, &change).await.expect("modify");
    let now = dir.read_group(&group).await.expect("read").expect("exists");
    assert_eq!(now.members, [contact(0), contact(2), contact(3)].into());
    assert_eq!(dir.stats().modifies, 3);
}

#[tokio::test]
async fn without_permissive_modify_ad_codes_surface() {
    let dc = SambaDc::shared();
    let group = ou_with_group(dc, "Strict", "strict-gmsa-hosts", &[contact(0)]);
    let dir = directory(dc, PermissiveMode::Never);

    let add_present = MemberChange {
        add: vec![contact(0)],
        delete: vec![],
    };
    let err = dir
        .modify_members(&group, &add_present)
        .await
        .expect_err("present");
    let (code, message) = code_and_message(&err);
    eprintln!("samba, add present member: {code} {message:?}");
    assert_eq!(code, rc::ENTRY_ALREADY_EXISTS);

    let delete_absent = MemberChange {
        add: vec![contact(1)],
        delete: vec![contact(9)],
    };
    let err = dir
        .modify_members(&group, &delete_absent)
        .await
        .expect_err("absent");
    let (code, message) = code_and_message(&err);
    eprintln!("samba, delete absent member: {code} {message:?}");
    assert_eq!(code, rc::UNWILLING_TO_PERFORM);
    // Nothing of a failed request is applied.
    let now = dir.read_group(&group).await.expect("read").expect("exists");
    assert_eq!(now.members, [contact(0)].into());

    // A member whose object does not exist.
    let no_object = MemberChange {
        add: vec![dn(&format!("CN=nobody,OU=Bulk,{}", SambaDc::BASE))],
        delete: vec![],
    };
    let err = dir
        .modify_members(&group, &no_object)
        .await
        .expect_err("no object");
    let (code, message) = code_and_message(&err);
    eprintln!("samba, add a member that does not exist: {code} {message:?}");
    assert_eq!(code, rc::NO_SUCH_OBJECT);
}

#[tokio::test]
async fn modify_of_a_missing_group_is_no_such_object() {
    let dc = SambaDc::shared();
    for permissive in [PermissiveMode::Auto, PermissiveMode::Never] {
        let dir = directory(dc, permissive);
        let missing = dn(&format!(
            "CN=missing-gmsa-hosts,OU=Nowhere,{}",
            SambaDc::BASE
        ));
        let change = MemberChange {
            add: vec![contact(0)],
            delete: vec![],
        };
        let err = dir
            .modify_members(&missing, &change)
            .await
            .expect_err("missing");
        let (code, message) = code_and_message(&err);
        eprintln!("samba, modify a missing group ({permissive:?}): {code} {message:?}");
        assert_eq!(code, rc::NO_SUCH_OBJECT);
        assert_eq!(dir.read_group(&missing).await.expect("read"), None);
    }
}

#[tokio::test]
async fn a_3000_member_group_is_read_whole_in_ranges_and_plainly() {
    const { assert!(SAMBA_BULK_CONTACTS >= 3000) };
    let dc = SambaDc::shared();
    let group = ou_with_group(dc, "Ranged", "big-gmsa-hosts", &[]);
    let other = dn(&format!("CN=small-gmsa-hosts,OU=Ranged,{}", SambaDc::BASE));
    dc.ldapmodify(&format!(
        "dn: {other}\nchangetype: add\nobjectClass: group\nsAMAccountName: small-gmsa-hosts\nmember: {}\n",
        contact(7)
    ));
    let all: BTreeSet<Dn> = (0..3000).map(contact).collect();
    let writer = directory(dc, PermissiveMode::Auto);
    let change = MemberChange {
        add: all.iter().cloned().collect(),
        delete: vec![],
    };
    writer
        .modify_members(&group, &change)
        .await
        .expect("add 3000 members");

    let ranged = LdapDirectory::new(LdapConfig {
        range_window: Some(1000),
        ..config(dc)
    })
    .expect("valid config");
    let read = ranged
        .read_group(&group)
        .await
        .expect("read")
        .expect("exists");
    assert_eq!(read.members.len(), 3000);
    assert_eq!(read.members, all);
    let stats = ranged.stats();
    // 0-999 with the first read, then 1000-1999 and 2000-*: three rounds.
    assert!(stats.range_reads >= 2, "{stats:?}");

    let before = ranged.stats().range_reads;
    let ou = dn(&format!("OU=Ranged,{}", SambaDc::BASE));
    let groups = ranged.search_groups(&ou).await.expect("search");
    assert_eq!(groups.len(), 2);
    assert_eq!(groups[0].dn, group);
    assert_eq!(groups[0].members, all);
    assert_eq!(groups[1].members, [contact(7)].into());
    // Only the big group needed more rounds.
    assert!(ranged.stats().range_reads - before >= 2);
    let found = ranged
        .find_group(&ou, "BIG-gmsa-hosts")
        .await
        .expect("find");
    assert_eq!(found.map(|g| g.members.len()), Some(3000));

    // Samba, unlike AD, hands out every value of a plain read.
    let plain = directory(dc, PermissiveMode::Auto);
    let read = plain
        .read_group(&group)
        .await
        .expect("read")
        .expect("exists");
    assert_eq!(read.members, all);
    let groups = plain.search_groups(&ou).await.expect("search");
    assert_eq!(groups[0].members, all);
    assert_eq!(plain.stats().range_reads, 0);
}

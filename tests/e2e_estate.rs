//! A realistic estate's large groups, end to end: the binary's `sync` on a
//! group of more than 1,500 members, most of them accounts the reconciler
//! does not own, against a real Samba AD DC (read in ranges, with a window
//! forced smaller than the group by `--range-window`, and plainly) and a
//! real slapd. The hosts' DNs carry escaped commas and non-ASCII letters,
//! and `--host-ou` makes stale hosts the reconciler's. The first `sync`
//! must make exactly the changes due (a member missed in some range would
//! be added again, a stale one left), the second none at all, and the
//! group must end with every member it should have.

mod support;

use std::collections::BTreeSet;
use std::path::Path;

use gmsa_reconciler::model::Dn;
use support::e2e::{bin, dn, ldap_args, password_file, read_groups};
use support::tree::Tree;
use support::{SambaDc, Slapd, SAMBA_BULK_CONTACTS};

/// Members the reconciler does not own.
const OTHERS: usize = 1_600;
/// Hosts in scope, all placed: the first `PRESENT` are members already.
const HOSTS: usize = 40;
const PRESENT: usize = 30;
/// Members under the hosts' OU that no server file names.
const STALE: usize = 5;

/// Where the test's objects live on one server.
struct Estate {
    url: String,
    bind_dn: String,
    password: String,
    password_file: std::path::PathBuf,
    /// `OU=Hosts,...`: the hosts' OU.
    host_ou: String,
    /// The OU holding the group.
    group_ou: String,
    group: Dn,
    /// The proid whose group it is (group names are unique in a domain).
    proid: String,
    others: Vec<String>,
}

/// The computer DN of host `i`: some with an escaped comma, some with a
/// non-ASCII letter, as AD names real machines after people and places.
fn host_cn(i: usize) -> String {
    match i % 4 {
        0 => format!("Smith\\, John {i:02}"),
        1 => format!("Hôte-{i:02}"),
        _ => format!("host{i:02}"),
    }
}

fn host_dn(estate_hosts: &str, i: usize) -> String {
    format!("CN={},{estate_hosts}", host_cn(i))
}

fn stale_dn(estate_hosts: &str, i: usize) -> String {
    format!("CN=gone{i:02},{estate_hosts}")
}

/// The tree: every host in scope with one instance of the estate's proid.
fn tree(estate: &Estate) -> Tree {
    let tree = Tree::new();
    for i in 0..HOSTS {
        let name = format!("host{i:02}.ad.test");
        // The file spells the DN with other case and spacing than the
        // directory. (Not `cn = x`: Samba refuses spaces around `=` in a
        // member value, result 34, and RFC 4514 has none there.)
        let spelled = host_dn(&estate.host_ou, i)
            .replacen("CN=", "cn=", 1)
            .replace(",OU=", ", ou=");
        tree.server_raw(
            &name,
            &format!(
                "partition: estate\nnt.dc: dc1.ad.test\nnt.dn: {}\n",
                serde_yaml::to_string(&spelled).expect("yaml").trim_end()
            ),
        );
        tree.place(&name, &format!("{}.app#{i:010}", estate.proid));
    }
    tree.mark_ready();
    tree
}

fn sync(estate: &Estate, tree: &Tree, extra: &[&str]) -> (i32, String, String) {
    let out = bin()
        .arg("sync")
        .arg(format!("--fs-root={}", tree.root().display()))
        .arg(format!("--group-ou={}", estate.group_ou))
        .arg(format!("--host-ou={}", estate.host_ou))
        .args(["--partition=estate", "--timeout=20s"])
        .args(ldap_args(
            &estate.url,
            &estate.bind_dn,
            &estate.password_file,
        ))
        .args(extra)
        .output()
        .expect("run sync");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

async fn members(estate: &Estate) -> BTreeSet<Dn> {
    let groups = read_groups(
        &estate.url,
        &estate.bind_dn,
        &estate.password,
        &estate.group_ou,
    )
    .await;
    groups.get(&estate.group).cloned().unwrap_or_default()
}

/// `member:` lines under `add:` and `delete:` in a sync's LDIF output.
fn counted(out: &str) -> (usize, usize) {
    let (mut adds, mut deletes, mut in_add) = (0, 0, None);
    for line in out.lines() {
        match line {
            "add: member" => in_add = Some(true),
            "delete: member" => in_add = Some(false),
            "-" => in_add = None,
            l if l.starts_with("member:") => match in_add {
                Some(true) => adds += 1,
                Some(false) => deletes += 1,
                None => {}
            },
            _ => {}
        }
    }
    (adds, deletes)
}

async fn converges(estate: &Estate, extra: &[&str]) {
    let tree = tree(estate);
    let (code, out, err) = sync(estate, &tree, extra);
    assert_eq!(code, 0, "{out}\n{err}");
    assert_eq!(
        counted(&out),
        (HOSTS - PRESENT, STALE),
        "exactly the missing hosts added and the stale ones removed:\n{out}"
    );
    let (code, again, err) = sync(estate, &tree, extra);
    assert_eq!(code, 0, "{again}\n{err}");
    assert!(
        !again.contains("changetype:"),
        "a second sync changes nothing:\n{again}"
    );
    let mut want: BTreeSet<Dn> = estate.others.iter().map(|d| dn(d)).collect();
    want.extend((0..HOSTS).map(|i| dn(&host_dn(&estate.host_ou, i))));
    let got = members(estate).await;
    assert_eq!(got.len(), OTHERS + HOSTS);
    assert!(
        got == want,
        "the group ends with exactly what it should hold"
    );
}

/// The initial group: the others, the present hosts and the stale ones.
fn initial_members(estate: &Estate) -> Vec<String> {
    let mut all = estate.others.clone();
    all.extend((0..PRESENT).map(|i| host_dn(&estate.host_ou, i)));
    all.extend((0..STALE).map(|i| stale_dn(&estate.host_ou, i)));
    all
}

/// On Samba: members must exist, so the hosts are contacts of their own
/// OU, and the others are the server's bulk contacts.
fn samba_estate(dc: &SambaDc, name: &str) -> Estate {
    const { assert!(SAMBA_BULK_CONTACTS >= OTHERS) };
    let base = format!("OU={name},{}", SambaDc::BASE);
    let proid = name.to_ascii_lowercase();
    let host_ou = format!("OU=Hosts,{base}");
    let group_ou = format!("OU=gMSA,OU=Service Groups,{base}");
    let estate = Estate {
        url: dc.url(),
        bind_dn: SambaDc::ADMIN.to_owned(),
        password: dc.admin_password(),
        password_file: dc.admin_password_file(),
        group: dn(&format!("CN={proid}-gmsa-hosts,{group_ou}")),
        proid: proid.clone(),
        host_ou,
        group_ou,
        others: (0..OTHERS).map(SambaDc::bulk_contact).collect(),
    };
    let mut ldif = String::new();
    let ou = |dn: &str| format!("dn: {dn}\nchangetype: add\nobjectClass: organizationalUnit\n\n");
    ldif += &ou(&base);
    ldif += &ou(&estate.host_ou);
    ldif += &ou(&format!("OU=Service Groups,{base}"));
    ldif += &ou(&estate.group_ou);
    let contacts = (0..HOSTS)
        .map(|i| host_dn(&estate.host_ou, i))
        .chain((0..STALE).map(|i| stale_dn(&estate.host_ou, i)));
    for contact in contacts {
        ldif += &record(&contact, &[("objectClass", "contact")]);
    }
    let sam = format!("{}-gmsa-hosts", estate.proid);
    let mut attrs = vec![("objectClass", "group"), ("sAMAccountName", sam.as_str())];
    let initial = initial_members(&estate);
    attrs.extend(initial.iter().map(|m| ("member", m.as_str())));
    ldif += &record(estate.group.as_str(), &attrs);
    dc.ldapmodify(&ldif);
    estate
}

/// An LDIF add record, values base64-encoded where LDIF needs it.
fn record(dn: &str, attrs: &[(&str, &str)]) -> String {
    let mut out = String::new();
    gmsa_reconciler::ldif::write_value(&mut out, "dn", dn);
    out += "changetype: add\n";
    for (attr, value) in attrs {
        gmsa_reconciler::ldif::write_value(&mut out, attr, value);
    }
    out.push('\n');
    out
}

#[tokio::test]
async fn a_group_of_over_1500_members_converges_on_samba_read_in_forced_ranges() {
    let dc = SambaDc::shared();
    let estate = samba_estate(dc, "Ranged");
    // 1,635 members in windows of 500: four ranged reads of the group.
    converges(&estate, &["--range-window=500"]).await;
}

#[tokio::test]
async fn a_group_of_over_1500_members_converges_on_samba_read_plainly() {
    let dc = SambaDc::shared();
    let estate = samba_estate(dc, "Plain");
    converges(&estate, &[]).await;
}

#[tokio::test]
async fn a_group_of_over_1500_members_converges_on_slapd() {
    let mut estate = Estate {
        url: String::new(),
        bind_dn: Slapd::SVC_DN.to_owned(),
        password: Slapd::SVC_PASSWORD.to_owned(),
        password_file: Path::new("/nonexistent").to_owned(),
        host_ou: "OU=Hosts,OU=Estate,DC=ad,DC=com".to_owned(),
        group_ou: "ou=gMSA,ou=Service Groups,ou=Estate,dc=ad,dc=com".to_owned(),
        group: dn("cn=big-gmsa-hosts,ou=gMSA,ou=Service Groups,ou=Estate,dc=ad,dc=com"),
        proid: "big".to_owned(),
        others: (0..OTHERS)
            .map(|i| format!("CN=user{i:04},OU=People,DC=ad,DC=com"))
            .collect(),
    };
    let mut ldif = String::new();
    for ou in [
        "ou=Estate,dc=ad,dc=com",
        "ou=Hosts,ou=Estate,dc=ad,dc=com",
        "ou=Service Groups,ou=Estate,dc=ad,dc=com",
        "ou=gMSA,ou=Service Groups,ou=Estate,dc=ad,dc=com",
    ] {
        let name = ou.split([',', '=']).nth(1).expect("ou name");
        ldif += &format!("dn: {ou}\nobjectClass: organizationalUnit\nou: {name}\n\n");
    }
    let initial = initial_members(&estate);
    let mut group = String::new();
    gmsa_reconciler::ldif::write_value(&mut group, "dn", estate.group.as_str());
    group += "objectClass: group\ncn: big-gmsa-hosts\nsAMAccountName: big-gmsa-hosts\n";
    for m in &initial {
        gmsa_reconciler::ldif::write_value(&mut group, "member", m);
    }
    ldif += &group;
    let slapd = Slapd::start_with(&[&ldif]);
    let dir = tempfile::tempdir().expect("temp dir");
    estate.url = slapd.url();
    estate.password_file = password_file(dir.path(), Slapd::SVC_PASSWORD);
    converges(&estate, &[]).await;
}

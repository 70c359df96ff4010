//! Kerberos (GSSAPI) binds against a Samba AD domain controller and its
//! KDC, with the `kerberos` feature. A binary of its own: the Kerberos
//! library finds its configuration and ticket cache through the process
//! environment (`KRB5_CONFIG`, `KRB5CCNAME`), which is set once here before
//! any other test could read it.

#![cfg(feature = "kerberos")]

mod support;

use std::time::Duration;

use gmsa_reconciler::directory::ldap::{Bind, LdapConfig, LdapDirectory};
use gmsa_reconciler::directory::{DirError, Directory, MemberChange};
use gmsa_reconciler::model::Dn;
use support::SambaDc;

fn dn(s: &str) -> Dn {
    Dn::parse(s).expect("valid DN")
}

fn gssapi(url: String, starttls: bool) -> Result<LdapDirectory, DirError> {
    LdapDirectory::new(LdapConfig {
        starttls,
        // Samba's own certificate names DC1.ad.test, not the loopback
        // address; verification is covered by the slapd tests.
        tls_insecure: true,
        timeout: Duration::from_secs(30),
        ..LdapConfig::new(vec![url], Bind::Gssapi)
    })
}

#[test]
fn gssapi_bind_works_over_tls_and_is_refused_over_plain_ldap() {
    let dc = SambaDc::start();
    let (krb5_conf, ccache) = dc.kinit_admin();
    // The service principal for the name the client connects to.
    dc.samba_tool(&["spn", "add", &format!("ldap/{}", dc.ip()), "DC1$"]);
    std::env::set_var("KRB5_CONFIG", &krb5_conf);
    std::env::set_var("KRB5CCNAME", &ccache);

    let base = SambaDc::BASE;
    dc.ldapmodify(&format!(
        "dn: OU=Krb,{base}\nchangetype: add\nobjectClass: organizationalUnit\n\n\
         dn: CN=krb-gmsa-hosts,OU=Krb,{base}\nchangetype: add\nobjectClass: group\n\
         sAMAccountName: krb-gmsa-hosts\n"
    ));
    let group = dn(&format!("CN=krb-gmsa-hosts,OU=Krb,{base}"));
    let ou = dn(&format!("OU=Krb,{base}"));

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        for (i, (url, starttls)) in [(dc.ldaps_url(), false), (dc.url(), true)]
            .into_iter()
            .enumerate()
        {
            let dir = gssapi(url.clone(), starttls).expect("GSSAPI over TLS is accepted");
            // Samba answers nothing below the root DSE without a bind, so a
            // search and a write prove the Kerberos identity took effect.
            let change = MemberChange {
                add: vec![dn(&SambaDc::bulk_contact(i))],
                delete: vec![],
            };
            dir.modify_members(&group, &change)
                .await
                .unwrap_or_else(|e| panic!("{url}: {e}"));
            let groups = dir.search_groups(&ou).await.expect("search");
            assert_eq!(groups.len(), 1, "{url}");
            assert_eq!(groups[0].members.len(), i + 1, "{url}");
            assert_eq!(dir.stats().connects, 1);
        }
    });

    let refused = gssapi(dc.url(), false).expect_err("plain ldap:// is refused");
    let DirError::Fatal(message) = refused else {
        panic!("not fatal: {refused:?}")
    };
    assert!(message.contains("needs TLS"), "{message}");
}

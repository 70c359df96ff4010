//! Where the membership wait reads: this host's own domain controller.
//!
//! The reconciler writes a membership to whichever DC it is connected to;
//! the host asks *its* DC (`nt.dc` of its server file) for the gMSA's
//! password, and that DC knows of the membership only once replication has
//! brought it there. So the wait asks the host's DC, not the writer's:
//!
//! - `--check-ldap-url URL` when given (a DC the operator names);
//! - else `<scheme>://<nt.dc>`, the scheme being that of the first
//!   `--ldap-url` (`ldap` when none is given), with `nt.dc`'s own port if it
//!   has one and otherwise the scheme's default (389 or 636): every DC of a
//!   domain listens on the same well-known ports, while the writer's URL may
//!   name a port of its own (a proxy, a tunnel) that other DCs do not have.
//!   Bind, StartTLS, CA file and timeout are those of `--ldap-url`.
//! - with the LDIF directory (`--directory`) there is no DC: the file is read.
//!
//! A server file without a usable `nt.dc` is not replaced by the writer's
//! DC: that would bring back the race this module exists to avoid, and such
//! a host is out of the reconciler's scope anyway (it never joins). The
//! check reports it (a transient error: the mirror may fix the file), so
//! the wait ends with `aborted`/`gmsa` naming the file and the problem.
//!
//! The DC is read from the server file at each check, so a host moved to
//! another DC is followed; the connection is kept while the URL stays.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use crate::cli::{DirectoryChoice, LdapChoice};
use crate::directory::{self, Directory};
use crate::model::{Dn, HostName};
use crate::tree::names;
use crate::tree::scan::server_of;

use super::wait::HostProblem;
use super::CheckError;

/// Which server the membership wait asks.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Source {
    /// `--check-ldap-url`.
    Named(String),
    /// `nt.dc` of the server file, with this scheme.
    HostDc(String),
    /// The directory the daemon reads anyway (an LDIF file).
    Same,
}

/// This host's computer DN and the directory its membership is read from.
pub struct OwnDc {
    source: Source,
    ldap: Option<LdapChoice>,
    fs_root: PathBuf,
    hostname: HostName,
    opened: Mutex<Option<(String, Arc<dyn Directory>)>>,
}

impl OwnDc {
    /// The wait's source for a directory choice and an optional
    /// `--check-ldap-url`.
    pub fn new(
        choice: &DirectoryChoice,
        check_url: Option<String>,
        fs_root: PathBuf,
        hostname: HostName,
    ) -> OwnDc {
        let (source, ldap) = match choice {
            DirectoryChoice::LdifFile(_) => (Source::Same, None),
            DirectoryChoice::Ldap(ldap) => {
                let source = match check_url {
                    Some(url) => Source::Named(url),
                    None => Source::HostDc(scheme_of(ldap.urls.first().map(String::as_str))),
                };
                (source, Some(ldap.clone()))
            }
        };
        OwnDc {
            source,
            ldap,
            fs_root,
            hostname,
            opened: Mutex::new(None),
        }
    }

    /// Reads this host's server file: its computer DN, and the directory
    /// to ask (`same` when there is no DC to ask).
    pub fn host(&self, same: &Arc<dyn Directory>) -> Result<(Dn, Arc<dyn Directory>), CheckError> {
        let bad = |problem: HostProblem| CheckError::Host {
            host: self.hostname.clone(),
            problem,
        };
        let server = server_of(&self.fs_root, &self.hostname).map_err(|err| bad(err.into()))?;
        let dn = match server.dn.as_deref().map(str::trim) {
            Some(dn) if !dn.is_empty() => Dn::parse(dn).map_err(|e| bad(HostProblem::BadDn(e)))?,
            _ => return Err(bad(HostProblem::NoDn)),
        };
        let (url, why) = match &self.source {
            Source::Same => return Ok((dn, same.clone())),
            Source::Named(url) => (url.clone(), "--check-ldap-url".to_owned()),
            Source::HostDc(scheme) => match server.dc.as_deref().map(str::trim) {
                Some(dc) if !dc.is_empty() => (
                    format!("{scheme}://{}", dc.to_lowercase()),
                    format!("nt.dc of {}/{}", names::SERVERS, self.hostname),
                ),
                _ => return Err(bad(HostProblem::NoDc)),
            },
        };
        Ok((dn, self.open(&url, &why)?))
    }

    /// The directory at `url`, opened once and kept while the URL stays.
    fn open(&self, url: &str, why: &str) -> Result<Arc<dyn Directory>, CheckError> {
        let mut opened = self
            .opened
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some((current, dir)) = opened.as_ref() {
            if current == url {
                return Ok(dir.clone());
            }
        }
        let Some(ldap) = &self.ldap else {
            panic!("BUG: an LDAP source without LDAP settings");
        };
        let choice = DirectoryChoice::Ldap(LdapChoice {
            urls: vec![url.to_owned()],
            ..ldap.clone()
        });
        let dir: Arc<dyn Directory> = match directory::open(&choice, &[]) {
            Ok(dir) => Arc::from(dir),
            Err(directory::OpenError::Directory(err)) => return Err(CheckError::Directory(err)),
            Err(err) => return Err(CheckError::Open(err)),
        };
        tracing::info!(
            dc = url,
            from = why,
            host = %self.hostname,
            "the gMSA group membership wait reads this host's domain controller"
        );
        *opened = Some((url.to_owned(), dir.clone()));
        Ok(dir)
    }
}

/// `ldaps` when the writer's URL is `ldaps://`, else `ldap`.
fn scheme_of(url: Option<&str>) -> String {
    match url.and_then(|u| u.split_once("://")) {
        Some((scheme, _)) if scheme.eq_ignore_ascii_case("ldaps") => "ldaps".to_owned(),
        _ => "ldap".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::PasswordSource;
    use crate::directory::memory::{Flavour, MemoryDirectory};

    fn ldap(urls: &[&str]) -> DirectoryChoice {
        DirectoryChoice::Ldap(LdapChoice {
            urls: urls.iter().map(|u| (*u).to_owned()).collect(),
            bind_dn: None,
            password: PasswordSource::None,
            gssapi: false,
            starttls: false,
            tls_ca_file: None,
            tls_insecure: false,
            timeout: std::time::Duration::from_secs(1),
            range_window: None,
        })
    }

    fn tree(server: Option<&str>) -> tempfile::TempDir {
        let tmp = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir(tmp.path().join("servers")).expect("mkdir");
        if let Some(content) = server {
            std::fs::write(tmp.path().join("servers/h1"), content).expect("write");
        }
        tmp
    }

    fn own(choice: &DirectoryChoice, url: Option<&str>, tmp: &tempfile::TempDir) -> OwnDc {
        OwnDc::new(
            choice,
            url.map(str::to_owned),
            tmp.path().to_owned(),
            HostName::new("h1").expect("host"),
        )
    }

    fn same() -> Arc<dyn Directory> {
        Arc::new(MemoryDirectory::new(Vec::new(), Flavour::OpenLdap))
    }

    /// The URL the check reads, from the log-free side: the source and the
    /// cached URL after one `host` call.
    fn url_read(own: &OwnDc) -> Option<String> {
        own.opened
            .lock()
            .expect("lock")
            .as_ref()
            .map(|(u, _)| u.clone())
    }

    #[test]
    fn the_host_dc_gets_the_writers_scheme_and_its_own_port() {
        let tmp = tree(Some("nt.dc: DC7.ad.com:3890\nnt.dn: CN=h1,DC=ad\n"));
        for (writer, expected) in [
            (
                &["ldaps://writer.ad.com:10636"][..],
                "ldaps://dc7.ad.com:3890",
            ),
            (
                &["ldap://writer.ad.com:10389"][..],
                "ldap://dc7.ad.com:3890",
            ),
            (&[][..], "ldap://dc7.ad.com:3890"),
        ] {
            let own = own(&ldap(writer), None, &tmp);
            let (dn, _) = own.host(&same()).expect("usable");
            assert_eq!(dn, Dn::parse("cn=h1,dc=ad").expect("dn"));
            assert_eq!(url_read(&own).as_deref(), Some(expected), "{writer:?}");
        }
        let tmp = tree(Some("nt.dc: dc7.ad.com\nnt.dn: CN=h1,DC=ad\n"));
        let own = own(&ldap(&["ldaps://w:1"]), None, &tmp);
        own.host(&same()).expect("usable");
        assert_eq!(url_read(&own).as_deref(), Some("ldaps://dc7.ad.com"));
    }

    #[test]
    fn check_ldap_url_wins_over_nt_dc() {
        let tmp = tree(Some("nt.dn: CN=h1,DC=ad\n"));
        let own = own(&ldap(&["ldap://w"]), Some("ldap://near.ad.com"), &tmp);
        own.host(&same()).expect("no nt.dc needed");
        assert_eq!(url_read(&own).as_deref(), Some("ldap://near.ad.com"));
    }

    #[test]
    fn no_usable_nt_dc_is_reported_not_replaced_by_the_writer() {
        // Which problem each is, by name.
        let kind = |p: &HostProblem| match p {
            HostProblem::Server(_) => "unusable file",
            HostProblem::NoDn => "no nt.dn",
            HostProblem::BadDn(_) => "bad nt.dn",
            HostProblem::NoDc => "no nt.dc",
        };
        for (content, expected, problem) in [
            ("nt.dn: CN=h1,DC=ad\n", "no nt.dc", "no nt.dc"),
            ("nt.dc: ''\nnt.dn: CN=h1,DC=ad\n", "no nt.dc", "no nt.dc"),
            (
                "nt.dc: 'dc/../x'\nnt.dn: CN=h1,DC=ad\n",
                "nt.dc",
                "unusable file",
            ),
            ("nt.dc: dc1\n", "no nt.dn", "no nt.dn"),
        ] {
            let tmp = tree(Some(content));
            let own = own(&ldap(&["ldap://writer"]), None, &tmp);
            let Err(err) = own.host(&same()) else {
                panic!("{content:?} accepted");
            };
            let CheckError::Host { problem: found, .. } = &err else {
                panic!("{content:?}: not a host problem: {err:?}");
            };
            assert_eq!(kind(found), problem, "{content:?}: {err:?}");
            let text = err.to_string();
            assert!(
                text.starts_with("servers/h1: ") && text.contains(expected),
                "{content:?}: {text}"
            );
            assert!(err.is_transient(), "the mirror may still fix {content:?}");
            assert_eq!(url_read(&own), None);
        }
        let tmp = tree(None);
        let err = own(&ldap(&["ldap://w"]), None, &tmp)
            .host(&same())
            .err()
            .expect("no server file");
        assert!(err.to_string().starts_with("servers/h1: "), "{err}");
    }

    #[test]
    fn an_ldif_directory_is_read_itself() {
        let tmp = tree(Some("nt.dn: CN=h1,DC=ad\n"));
        let own = own(&DirectoryChoice::LdifFile("/x.ldif".into()), None, &tmp);
        let same = same();
        let (_, dir) = own.host(&same).expect("usable");
        assert!(Arc::ptr_eq(&dir, &same));
    }
}

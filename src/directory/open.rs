//! Opening the directory the configuration names: the LDIF content file,
//! or LDAP servers (the given URLs, else the domain controllers the tree's
//! servers name) with their bind settings and password.
//!
//! Every command and the daemon open their directory here, so that the
//! password is read, and an unusable choice refused, the same way for all.

use thiserror::Error;

use super::ldap::{Bind, LdapConfig, LdapDirectory, Password};
use super::ldif_file::LdifFileDirectory;
use super::{DirError, Directory};
use crate::cli::{DirectoryChoice, LdapChoice, PasswordSource, PASSWORD_ENV};

/// Why the configured directory could not be opened.
#[derive(Debug, Error)]
pub enum OpenError {
    /// No `--ldap-url`, and no server in the tree names a domain controller.
    #[error("--ldap-url: no LDAP server: give --ldap-url, or --directory, or servers with nt.dc in the tree")]
    NoServer,
    /// The password file could not be read (its content is never shown).
    #[error("--bind-password-file {path}: {source}")]
    PasswordFile {
        /// The file, as configured.
        path: String,
        /// Why it could not be read.
        source: std::io::Error,
    },
    /// The backend refused to open.
    #[error(transparent)]
    Directory(#[from] DirError),
}

/// Opens the configured directory; `dcs` are the servers' domain
/// controllers, used when no `--ldap-url` is given.
pub fn open(choice: &DirectoryChoice, dcs: &[String]) -> Result<Box<dyn Directory>, OpenError> {
    match choice {
        DirectoryChoice::LdifFile(path) => Ok(Box::new(LdifFileDirectory::open(path)?)),
        DirectoryChoice::Ldap(choice) => {
            Ok(Box::new(LdapDirectory::new(ldap_config(choice, dcs)?)?))
        }
    }
}

/// The LDAP settings with the URLs resolved (the servers' DCs when none
/// were given) and the password read.
fn ldap_config(choice: &LdapChoice, dcs: &[String]) -> Result<LdapConfig, OpenError> {
    let urls: Vec<String> = if choice.urls.is_empty() {
        dcs.iter().map(|dc| format!("ldap://{dc}")).collect()
    } else {
        choice.urls.clone()
    };
    if urls.is_empty() {
        return Err(OpenError::NoServer);
    }
    let password = match &choice.password {
        PasswordSource::None => None,
        PasswordSource::File(path) => {
            Some(
                Password::from_file(path).map_err(|source| OpenError::PasswordFile {
                    path: path.display().to_string(),
                    source,
                })?,
            )
        }
        PasswordSource::Env => std::env::var(PASSWORD_ENV).ok().map(Password::new),
    };
    let bind = match (&choice.bind_dn, password) {
        _ if choice.gssapi => Bind::Gssapi,
        (Some(dn), Some(password)) => Bind::Simple {
            dn: dn.clone(),
            password,
        },
        _ => Bind::Anonymous,
    };
    let mut config = LdapConfig::new(urls, bind);
    config.starttls = choice.starttls;
    config.tls_ca_file = choice.tls_ca_file.clone();
    config.tls_insecure = choice.tls_insecure;
    config.timeout = choice.timeout;
    config.range_window = choice.range_window;
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn no_url_and_no_domain_controller_is_refused() {
        let err = open(&ldap(&[]), &[]).err().expect("refused");
        assert!(matches!(err, OpenError::NoServer), "{err}");
    }

    #[test]
    fn a_missing_password_file_is_named() {
        let DirectoryChoice::Ldap(mut choice) = ldap(&["ldap://127.0.0.1:1"]) else {
            unreachable!("built as LDAP")
        };
        choice.bind_dn = Some("CN=svc,DC=x".into());
        choice.password = PasswordSource::File("/nonexistent/pw".into());
        let err = open(&DirectoryChoice::Ldap(choice), &[])
            .err()
            .expect("refused");
        assert!(
            matches!(&err, OpenError::PasswordFile { path, .. } if path == "/nonexistent/pw"),
            "{err}"
        );
    }
}

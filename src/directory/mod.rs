//! The directory the groups live in, behind one trait.
//!
//! [`Directory`] is what the reconciler needs of a directory and nothing
//! more: find the proids' groups, read one group, change one group's members
//! in one request. Implementations: [`ldap`] (a real server, the only module
//! that speaks LDAP), [`ldif_file`] (an LDIF content file, for quick starts,
//! offline planning and scenario tests) and [`memory`] (the in-memory engine
//! under the LDIF file; in test builds also the fake server that records
//! every call and can be told to fail).

pub mod ldap;
pub mod ldif_file;
pub mod memory;
mod open;

pub use open::{open, OpenError};

use std::collections::BTreeSet;
use std::fmt;

use async_trait::async_trait;
use thiserror::Error;

use crate::model::Dn;

/// A group as read from the directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Group {
    /// The DN the directory returned, as it spelled it.
    pub dn: Dn,
    /// The group's `sAMAccountName`.
    pub sam_account_name: String,
    /// Its `member` values, as the directory spelled them.
    pub members: BTreeSet<Dn>,
}

/// The domain a directory serves, as read from it: what a Windows
/// container's credential spec names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainFacts {
    /// The domain's DNS name (its crossRef's `dnsRoot`).
    pub dns_name: String,
    /// The forest root domain's DNS name.
    pub dns_tree_name: String,
    /// The domain's NetBIOS name (its crossRef's `nETBIOSName`).
    pub netbios_name: String,
    /// The domain object's binary `objectSid`.
    pub sid: Vec<u8>,
    /// The domain object's binary `objectGUID`.
    pub guid: Vec<u8>,
}

/// `DC=ad,DC=example,DC=com` as `ad.example.com`.
pub fn dns_name_of(naming_context: &str) -> String {
    naming_context
        .split(',')
        .filter_map(|rdn| {
            let (attr, value) = rdn.split_once('=')?;
            attr.trim()
                .eq_ignore_ascii_case("dc")
                .then(|| value.trim().to_owned())
        })
        .collect::<Vec<_>>()
        .join(".")
}

/// What the directory can do, from its root DSE.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Capabilities {
    /// The server lists the permissive-modify control
    /// (1.2.840.113556.1.4.1413): adding a present value or deleting an
    /// absent one succeeds.
    pub permissive_modify: bool,
}

/// One change of a group's members, sent as a single Modify request with
/// `add: member` before `delete: member`. Neither list is sent when empty.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MemberChange {
    /// Values to add.
    pub add: Vec<Dn>,
    /// Values to delete.
    pub delete: Vec<Dn>,
}

impl MemberChange {
    /// True when there is nothing to send.
    pub fn is_empty(&self) -> bool {
        self.add.is_empty() && self.delete.is_empty()
    }
}

/// Which operation failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Connecting, binding or reading the root DSE.
    Connect,
    /// A search.
    Search,
    /// A modify.
    Modify,
    /// Saving the directory (the LDIF file backend).
    Save,
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Op::Connect => "connect",
            Op::Search => "search",
            Op::Modify => "modify",
            Op::Save => "save",
        })
    }
}

/// LDAP result codes the reconciler acts on (RFC 4511 and AD).
pub mod rc {
    /// sizeLimitExceeded.
    pub const SIZE_LIMIT_EXCEEDED: u32 = 4;
    /// noSuchAttribute: deleting an absent value (OpenLDAP).
    pub const NO_SUCH_ATTRIBUTE: u32 = 16;
    /// attributeOrValueExists: adding a present value (OpenLDAP).
    pub const ATTRIBUTE_OR_VALUE_EXISTS: u32 = 20;
    /// noSuchObject: the entry does not exist.
    pub const NO_SUCH_OBJECT: u32 = 32;
    /// busy.
    pub const BUSY: u32 = 51;
    /// unavailable.
    pub const UNAVAILABLE: u32 = 52;
    /// unwillingToPerform: AD's answer to deleting a value that is not a member.
    pub const UNWILLING_TO_PERFORM: u32 = 53;
    /// entryAlreadyExists: AD's answer to adding a present member.
    pub const ENTRY_ALREADY_EXISTS: u32 = 68;
    /// other.
    pub const OTHER: u32 = 80;

    /// The name RFC 4511 (and the RFCs that add codes) gives a result code,
    /// as errors show it next to the number.
    pub fn name(code: u32) -> Option<&'static str> {
        Some(match code {
            0 => "success",
            1 => "operationsError",
            2 => "protocolError",
            3 => "timeLimitExceeded",
            4 => "sizeLimitExceeded",
            5 => "compareFalse",
            6 => "compareTrue",
            7 => "authMethodNotSupported",
            8 => "strongerAuthRequired",
            10 => "referral",
            11 => "adminLimitExceeded",
            12 => "unavailableCriticalExtension",
            13 => "confidentialityRequired",
            14 => "saslBindInProgress",
            16 => "noSuchAttribute",
            17 => "undefinedAttributeType",
            18 => "inappropriateMatching",
            19 => "constraintViolation",
            20 => "attributeOrValueExists",
            21 => "invalidAttributeSyntax",
            32 => "noSuchObject",
            33 => "aliasProblem",
            34 => "invalidDNSyntax",
            36 => "aliasDereferencingProblem",
            48 => "inappropriateAuthentication",
            49 => "invalidCredentials",
            50 => "insufficientAccessRights",
            51 => "busy",
            52 => "unavailable",
            53 => "unwillingToPerform",
            54 => "loopDetect",
            64 => "namingViolation",
            65 => "objectClassViolation",
            66 => "notAllowedOnNonLeaf",
            67 => "notAllowedOnRDN",
            68 => "entryAlreadyExists",
            69 => "objectClassModsProhibited",
            71 => "affectsMultipleDSAs",
            80 => "other",
            118 => "canceled",
            119 => "noSuchOperation",
            120 => "tooLate",
            121 => "cannotCancel",
            122 => "assertionFailed",
            123 => "authorizationDenied",
            4096 => "e-syncRefreshRequired",
            _ => return None,
        })
    }

    /// `LDAP 49 invalidCredentials: <the server's text>`: how every error
    /// shows a result, so that an operator can look the code up and read
    /// what the server said (or that it said nothing).
    pub fn describe(code: u32, message: &str) -> String {
        let name = name(code).unwrap_or("(unknown result code)");
        let message = message.trim();
        if message.is_empty() {
            format!("LDAP {code} {name} (the server gave no diagnostic text)")
        } else {
            format!("LDAP {code} {name}: {message}")
        }
    }
}

/// A directory failure, classified by what happens next.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum DirError {
    /// The server answered with a result code.
    #[error("{op} {dn}: {}", rc::describe(*code, message))]
    Result {
        /// The operation.
        op: Op,
        /// The entry or search base.
        dn: String,
        /// The LDAP result code.
        code: u32,
        /// The server's diagnostic message.
        message: String,
    },
    /// No answer: connection refused or dropped, timeout. Retried.
    #[error("{op}: {message}")]
    Unreachable {
        /// The operation.
        op: Op,
        /// What happened.
        message: String,
    },
    /// Not sent: every server stopped answering within the timeout a moment
    /// ago, so asking again now would only wait out another timeout. A
    /// later attempt may work (it is transient), but not one made at once.
    #[error("{op}: not sent: {message}")]
    Stalled {
        /// The operation.
        op: Op,
        /// Which servers stopped answering.
        message: String,
    },
    /// A problem that retrying will not fix (configuration, a broken file,
    /// an answer that makes no sense).
    #[error("{0}")]
    Fatal(String),
}

impl DirError {
    /// The LDAP result code, if the server gave one.
    pub fn code(&self) -> Option<u32> {
        match self {
            DirError::Result { code, .. } => Some(*code),
            _ => None,
        }
    }

    /// What a failure is called where only a word fits (the outcome label
    /// of the Modify counter): the result code's name, or the kind of
    /// failure when the server gave no code.
    pub fn kind(&self) -> &'static str {
        match self {
            DirError::Result { code, .. } => rc::name(*code).unwrap_or("unknownResultCode"),
            DirError::Unreachable { .. } => "unreachable",
            DirError::Stalled { .. } => "stalled",
            DirError::Fatal(_) => "failure",
        }
    }

    /// True for failures that go away by themselves: busy, unavailable,
    /// other, timeouts and lost connections.
    pub fn is_transient(&self) -> bool {
        match self {
            DirError::Result { code, .. } => {
                matches!(*code, rc::BUSY | rc::UNAVAILABLE | rc::OTHER)
            }
            DirError::Unreachable { .. } | DirError::Stalled { .. } => true,
            DirError::Fatal(_) => false,
        }
    }

    /// True for transient failures worth retrying within the same pass,
    /// after a short backoff: not [`DirError::Stalled`], whose servers are
    /// left alone for a whole timeout.
    pub fn retry_soon(&self) -> bool {
        self.is_transient() && !matches!(self, DirError::Stalled { .. })
    }
}

/// What the reconciler needs of a directory.
#[async_trait]
pub trait Directory: Send + Sync {
    /// What the server supports; read once and remembered.
    async fn capabilities(&self) -> Result<Capabilities, DirError>;

    /// Every `(objectClass=group)` entry at or below `base`, with all of its
    /// members.
    async fn search_groups(&self, base: &Dn) -> Result<Vec<Group>, DirError>;

    /// The group at or below `base` whose `sAMAccountName` is `name`.
    async fn find_group(&self, base: &Dn, name: &str) -> Result<Option<Group>, DirError>;

    /// One group by DN; `None` when it does not exist.
    async fn read_group(&self, dn: &Dn) -> Result<Option<Group>, DirError>;

    /// Changes one group's members in one request.
    async fn modify_members(&self, group: &Dn, change: &MemberChange) -> Result<(), DirError>;

    /// The domain's identity, for container credential specs (node mode).
    async fn domain_facts(&self) -> Result<DomainFacts, DirError> {
        Err(DirError::Fatal(
            "this directory holds no domain facts: give them with the --domain-* options".into(),
        ))
    }

    /// Makes the changes so far durable (the LDIF file backend saves here;
    /// a server has already made them durable).
    async fn commit(&self) -> Result<(), DirError> {
        Ok(())
    }

    /// True when a change is held only once [`Directory::commit`] saves
    /// it, not when its Modify is answered.
    fn saves_on_commit(&self) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn results_are_shown_by_number_and_name_with_the_servers_text() {
        let err = |code, message: &str| DirError::Result {
            op: Op::Connect,
            dn: "cn=svc,dc=ad,dc=com".into(),
            code,
            message: message.into(),
        };
        assert_eq!(
            err(49, "80090308: LdapErr: DSID-0C09044E, data 52e").to_string(),
            "connect cn=svc,dc=ad,dc=com: LDAP 49 invalidCredentials: 80090308: LdapErr: DSID-0C09044E, data 52e"
        );
        assert_eq!(
            err(49, "").to_string(),
            "connect cn=svc,dc=ad,dc=com: LDAP 49 invalidCredentials (the server gave no diagnostic text)"
        );
        assert_eq!(
            err(9999, "odd").to_string(),
            "connect cn=svc,dc=ad,dc=com: LDAP 9999 (unknown result code): odd"
        );
        for (code, name) in [
            (rc::NO_SUCH_ATTRIBUTE, "noSuchAttribute"),
            (rc::ATTRIBUTE_OR_VALUE_EXISTS, "attributeOrValueExists"),
            (rc::NO_SUCH_OBJECT, "noSuchObject"),
            (rc::BUSY, "busy"),
            (rc::UNAVAILABLE, "unavailable"),
            (rc::UNWILLING_TO_PERFORM, "unwillingToPerform"),
            (rc::ENTRY_ALREADY_EXISTS, "entryAlreadyExists"),
            (rc::OTHER, "other"),
            (50, "insufficientAccessRights"),
        ] {
            assert_eq!(rc::name(code), Some(name));
        }
    }
}

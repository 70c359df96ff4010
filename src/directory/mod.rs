//! The directory the groups live in, behind one trait.
//!
//! [`Directory`] is what the reconciler needs of a directory and nothing
//! more: find the proids' groups, read one group, change one group's members
//! in one request. Implementations: [`ldap`] (a real server, the only module
//! that speaks LDAP), [`ldif_file`] (an LDIF content file, for quick starts,
//! offline planning and scenario tests) and [`memory`] (in-memory, records
//! every call and can be told to fail, for tests).

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
}

/// A directory failure, classified by what happens next.
#[derive(Debug, Clone, Error)]
pub enum DirError {
    /// The server answered with a result code.
    #[error("{op} {dn}: LDAP result {code}: {message}")]
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
}

//! The placement tree mirrored from the cluster's coordination store: the
//! server definitions and placements the reconciler works from.
//!
//! [`names`] holds the tree's names; [`scan`] reads a whole tree into a
//! [`Snapshot`]; [`event`] classifies the path of a file system
//! notification; [`watch`] is the only place that talks to the kernel's
//! notifier (inotify), and turns what it reports into [`TreeEvent`]s. A snapshot can
//! also be expressed as the events that build it ([`Snapshot::events`]);
//! the index takes a snapshot in one go and later changes event by event.

pub mod event;
pub mod names;
pub mod scan;
pub mod watch;

use std::collections::{BTreeMap, BTreeSet};

use serde::Deserialize;
use thiserror::Error;

use crate::model::{host_port_problem, reject_controls, Dn, HostName, ModelError, PartitionGlob};

/// The keys of a server file that the reconciler uses; everything else in
/// the file is ignored.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServerInfo {
    /// The cell partition the host belongs to.
    pub partition: Option<String>,
    /// FQDN of the host's domain controller (`nt.dc`).
    pub dc: Option<String>,
    /// DN of the host's AD computer object (`nt.dn`), as spelled in the file.
    pub dn: Option<String>,
}

/// Why a server file can't be used. It is a problem for that host only: a
/// host already in scope keeps its last good definition until the file is
/// valid again or deleted, and one that never was stays out of scope.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ServerError {
    /// The file could not be read: not a regular file (a FIFO, a socket, a
    /// device or a symlink in its place), above the size cap, or an I/O
    /// error. What the read found, without the path.
    #[error("{0}")]
    Unreadable(String),
    /// The content is not UTF-8 text.
    #[error("not UTF-8")]
    NotUtf8,
    /// The content is neither YAML nor JSON; the parser's message.
    #[error("not YAML or JSON: {0}")]
    NotYaml(String),
    /// The document is not a mapping.
    #[error("not a mapping")]
    NotAMapping,
    /// A mapping whose keys hold what no server file holds; the parser's
    /// message.
    #[error("unexpected content: {0}")]
    UnexpectedContent(String),
    /// A value the reconciler uses holds a control character.
    #[error(transparent)]
    Control(ModelError),
    /// `nt.dn` is not a DN.
    #[error("nt.dn: {0}")]
    Dn(ModelError),
    /// `nt.dc` is not a host name with an optional port. The value is not
    /// quoted: it may hold a password.
    #[error("nt.dc: not a host name with an optional :port: {0}")]
    Dc(&'static str),
    /// There is no server file for the host asked about.
    #[error("does not exist")]
    Missing,
    /// Something that is not a file (what it is) stands where the server
    /// file of the host asked about should be.
    #[error("{0}, not a server file")]
    NotAFile(&'static str),
}

#[derive(Deserialize)]
struct RawServer {
    partition: Option<serde_yaml::Value>,
    #[serde(rename = "nt.dc")]
    dc: Option<serde_yaml::Value>,
    #[serde(rename = "nt.dn")]
    dn: Option<serde_yaml::Value>,
}

impl ServerInfo {
    /// Parses the content of a server file: a YAML (or JSON, which is YAML)
    /// mapping. Anything else is an error naming what is wrong, and so is a
    /// value the reconciler uses that holds a control character, or an
    /// `nt.dn` that is not a DN: such a file is as unusable as one that
    /// does not parse, so that no value read from the tree can break a
    /// line of output or a log.
    pub fn parse(content: &[u8]) -> Result<ServerInfo, ServerError> {
        let text = std::str::from_utf8(content).map_err(|_| ServerError::NotUtf8)?;
        // The usual case in one pass, without building a value for each of
        // the keys the reconciler ignores; when that fails, the second pass
        // says what is wrong with the file.
        // A file with none of the three keys goes the long way too: the one
        // pass reads a tag with no value (`!x`) as an empty mapping.
        let info = match serde_yaml::from_str::<Option<MappingOnly>>(text) {
            Ok(Some(MappingOnly(raw))) if raw.has_any() => raw.info(),
            _ => ServerInfo::parse_checked(text)?,
        };
        info.check()?;
        Ok(info)
    }

    /// The values' own rules, checked where the file is read so that the
    /// scan and the watcher cannot differ on them.
    fn check(&self) -> Result<(), ServerError> {
        for (key, value) in [
            ("partition", &self.partition),
            ("nt.dc", &self.dc),
            ("nt.dn", &self.dn),
        ] {
            if let Some(value) = value {
                reject_controls(key, value).map_err(ServerError::Control)?;
            }
        }
        if let Some(dn) = &self.dn {
            Dn::parse(dn).map_err(ServerError::Dn)?;
        }
        if let Some(dc) = &self.dc {
            check_dc(dc)?;
        }
        Ok(())
    }

    /// Parses through a whole YAML value, which tells a document that is not
    /// a mapping from one that is not YAML at all.
    fn parse_checked(text: &str) -> Result<ServerInfo, ServerError> {
        let mut value: serde_yaml::Value = match serde_yaml::from_str(text) {
            Ok(value) => value,
            // A JSON document is read as JSON when YAML refuses it: YAML
            // takes a raw U+2028 or U+2029 in a string for a line break.
            Err(yaml) => {
                serde_json::from_str(text).map_err(|_| ServerError::NotYaml(yaml.to_string()))?
            }
        };
        // As in the one pass, a tag on the document is no matter.
        if let serde_yaml::Value::Tagged(tagged) = value {
            value = tagged.value;
        }
        if !value.is_mapping() {
            return Err(ServerError::NotAMapping);
        }
        let raw: RawServer = serde_yaml::from_value(value)
            .map_err(|e| ServerError::UnexpectedContent(e.to_string()))?;
        Ok(raw.info())
    }
}

/// `nt.dc` becomes the host of an `ldap://` URL, so it must be `HOST[:PORT]`
/// as [`host_port_problem`] checks every server address: a value such as
/// `user:secret@dc` or `dc/x?y` would otherwise smuggle credentials or a
/// path into the URL.
fn check_dc(dc: &str) -> Result<(), ServerError> {
    if dc.is_empty() {
        // Empty is absent: the index treats the host as out of scope.
        return Ok(());
    }
    match host_port_problem(dc) {
        None => Ok(()),
        Some(why) => Err(ServerError::Dc(why)),
    }
}

/// [`RawServer`] read from a mapping only: a struct alone would also take a
/// list, as its fields in order.
struct MappingOnly(RawServer);

impl<'de> Deserialize<'de> for MappingOnly {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Mapping;
        impl<'de> serde::de::Visitor<'de> for Mapping {
            type Value = MappingOnly;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a mapping")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                map: A,
            ) -> Result<MappingOnly, A::Error> {
                RawServer::deserialize(serde::de::value::MapAccessDeserializer::new(map))
                    .map(MappingOnly)
            }
        }
        deserializer.deserialize_map(Mapping)
    }
}

impl RawServer {
    fn has_any(&self) -> bool {
        self.partition.is_some() || self.dc.is_some() || self.dn.is_some()
    }

    fn info(&self) -> ServerInfo {
        ServerInfo {
            partition: self.partition.as_ref().and_then(scalar),
            dc: self.dc.as_ref().and_then(scalar),
            dn: self.dn.as_ref().and_then(scalar),
        }
    }
}

/// A scalar YAML value as text (partitions may be written as numbers).
fn scalar(value: &serde_yaml::Value) -> Option<String> {
    match value {
        serde_yaml::Value::String(s) => Some(s.clone()),
        serde_yaml::Value::Number(n) => Some(n.to_string()),
        serde_yaml::Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

/// A change in the tree, in the reconciler's own terms.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TreeEvent {
    /// A server file was written; `Err` holds why it could not be used.
    ServerUpserted {
        /// The host the file describes.
        host: HostName,
        /// Its parsed content, or why it could not be read or parsed.
        info: Result<ServerInfo, ServerError>,
    },
    /// A server file was deleted.
    ServerRemoved {
        /// The host whose file went away.
        host: HostName,
    },
    /// An instance was placed on a host.
    PlacementAdded {
        /// The host.
        host: HostName,
        /// The instance name, `<proid>.<app>#<id>`.
        instance: String,
    },
    /// An instance left a host.
    PlacementRemoved {
        /// The host.
        host: HostName,
        /// The instance name.
        instance: String,
    },
    /// A host's placement directory went away with everything in it.
    PlacementDirRemoved {
        /// The host.
        host: HostName,
    },
    /// A host's placement directory was listed: these are all of its
    /// placements now (they replace what was known, and end
    /// [`TreeEvent::PlacementsUnknown`]).
    PlacementDirListed {
        /// The host.
        host: HostName,
        /// Every placement in the directory.
        instances: BTreeSet<String>,
    },
    /// A host's placement directory is there but can't be read (a symlink,
    /// a loop, an I/O error): its placements are unknown until it is listed
    /// or goes away. What was known of them is kept, and the host's
    /// memberships are left as they are meanwhile.
    PlacementsUnknown {
        /// The host.
        host: HostName,
    },
}

impl TreeEvent {
    /// The host the event is about.
    pub fn host(&self) -> &HostName {
        match self {
            TreeEvent::ServerUpserted { host, .. }
            | TreeEvent::ServerRemoved { host }
            | TreeEvent::PlacementAdded { host, .. }
            | TreeEvent::PlacementRemoved { host, .. }
            | TreeEvent::PlacementDirRemoved { host }
            | TreeEvent::PlacementDirListed { host, .. }
            | TreeEvent::PlacementsUnknown { host } => host,
        }
    }
}

/// The placements known of a tree, host by host: what a rescan's diff
/// ([`Snapshot::diff_placed`]) starts from. A snapshot's are its own
/// `placements`; the daemon's are in its index.
pub trait Placed {
    /// Each host with placements known (possibly none), once, with them.
    fn hosts(&self) -> impl Iterator<Item = (&HostName, &BTreeSet<String>)>;
    /// The placements known of a host; `None` when nothing is known of
    /// its directory.
    fn of(&self, host: &HostName) -> Option<&BTreeSet<String>>;
}

impl Placed for BTreeMap<HostName, BTreeSet<String>> {
    fn hosts(&self) -> impl Iterator<Item = (&HostName, &BTreeSet<String>)> {
        self.iter()
    }

    fn of(&self, host: &HostName) -> Option<&BTreeSet<String>> {
        self.get(host)
    }
}

/// A whole tree read at one time.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// Every server file, parsed or with the reason it could not be used.
    pub servers: BTreeMap<HostName, Result<ServerInfo, ServerError>>,
    /// Every placement directory and the instances in it.
    pub placements: BTreeMap<HostName, BTreeSet<String>>,
    /// Hosts whose placement directory exists but could not be read: their
    /// placements are unknown, which is not "none": their memberships are
    /// left as they are, never removed. A scan
    /// has no placements for them; a snapshot kept up to date by events
    /// (the daemon's) keeps the last ones it knew.
    pub unknown: BTreeSet<HostName>,
    /// Entries that were skipped, each naming the path and why.
    pub warnings: Vec<String>,
}

impl Snapshot {
    /// The snapshot as the events that build it from an empty tree.
    pub fn events(&self) -> impl Iterator<Item = TreeEvent> + '_ {
        let servers = self
            .servers
            .iter()
            .map(|(host, info)| TreeEvent::ServerUpserted {
                host: host.clone(),
                info: info.clone(),
            });
        let placements = self.placements.iter().flat_map(|(host, instances)| {
            instances
                .iter()
                .map(move |instance| TreeEvent::PlacementAdded {
                    host: host.clone(),
                    instance: instance.clone(),
                })
        });
        let unknown = self
            .unknown
            .iter()
            .map(|host| TreeEvent::PlacementsUnknown { host: host.clone() });
        servers.chain(placements).chain(unknown)
    }

    /// A warning when no usable server file has a partition the glob
    /// matches: every host is out of scope, which is most often a mistyped
    /// `--partition` and should not pass in silence. It names the glob and
    /// (some of) the partitions the server files do have.
    pub fn partition_warning(&self, glob: &PartitionGlob) -> Option<String> {
        let partitions: BTreeSet<&str> = self
            .servers
            .values()
            .filter_map(|info| info.as_ref().ok())
            .map(|info| info.partition.as_deref().unwrap_or(""))
            .collect();
        if partitions.iter().any(|p| glob.matches(p)) {
            return None;
        }
        const SHOWN: usize = 5;
        let usable = self.servers.values().filter(|i| i.is_ok()).count();
        let seen = if partitions.is_empty() {
            "there is no usable server file".to_owned()
        } else {
            let mut list: Vec<String> = partitions
                .iter()
                .take(SHOWN)
                .map(|p| format!("{p:?}"))
                .collect();
            if partitions.len() > SHOWN {
                list.push(format!("and {} more", partitions.len() - SHOWN));
            }
            format!(
                "the {usable} usable server {} {}",
                if usable == 1 {
                    "file has"
                } else {
                    "files have"
                },
                if partitions.len() == 1 {
                    "partition"
                } else {
                    "partitions"
                },
            ) + " "
                + &list.join(", ")
        };
        Some(format!(
            "--partition {:?} matches no server file: {seen}; every host is out of scope",
            glob.to_string()
        ))
    }

    /// Updates the snapshot as the event says the tree changed.
    pub fn apply(&mut self, event: &TreeEvent) {
        match event {
            TreeEvent::ServerUpserted { host, info } => {
                self.servers.insert(host.clone(), info.clone());
            }
            TreeEvent::ServerRemoved { host } => {
                self.servers.remove(host);
            }
            TreeEvent::PlacementAdded { host, instance } => {
                self.placements
                    .entry(host.clone())
                    .or_default()
                    .insert(instance.clone());
            }
            TreeEvent::PlacementRemoved { host, instance } => {
                if let Some(instances) = self.placements.get_mut(host) {
                    instances.remove(instance);
                }
            }
            TreeEvent::PlacementDirRemoved { host } => {
                self.placements.remove(host);
                self.unknown.remove(host);
            }
            TreeEvent::PlacementDirListed { host, instances } => {
                self.placements.insert(host.clone(), instances.clone());
                self.unknown.remove(host);
            }
            TreeEvent::PlacementsUnknown { host } => {
                self.unknown.insert(host.clone());
            }
        }
    }

    /// Replaces `self` with a newer scan, except for what the scan could not
    /// know: the last known placements of hosts it found unreadable.
    ///
    /// What did not change keeps `self`'s copy, and only what did is cloned
    /// from `newer` (a host's name is shared, not copied), so that almost
    /// nothing of a scan made on other threads outlives it among the pages
    /// its placements are freed from: the allocator cannot hand back a page
    /// that still holds one live entry.
    pub fn replace_with(&mut self, newer: Snapshot) {
        if self.servers.is_empty() && self.placements.is_empty() {
            // Nothing to keep (the first scan): taken as it is.
            *self = newer;
            return;
        }
        self.servers
            .retain(|host, info| newer.servers.get(host) == Some(info));
        for (host, info) in &newer.servers {
            if !self.servers.contains_key(host) {
                self.servers.insert(host.clone(), info.clone());
            }
        }
        self.placements.retain(|host, instances| {
            newer.unknown.contains(host) || newer.placements.get(host) == Some(instances)
        });
        for (host, instances) in &newer.placements {
            if !self.placements.contains_key(host) {
                self.placements.insert(host.clone(), instances.clone());
            }
        }
        if self.unknown != newer.unknown {
            self.unknown = newer.unknown.clone();
        }
        if self.warnings != newer.warnings {
            self.warnings = newer.warnings.clone();
        }
    }

    /// The events that turn `self` into `newer`: what a full rescan found
    /// that the events missed.
    pub fn diff(&self, newer: &Snapshot) -> Vec<TreeEvent> {
        self.diff_placed(&self.placements, newer)
    }

    /// [`Snapshot::diff`] from a tree whose servers and unknown hosts are
    /// `self`'s and whose placements are `placed` (`self.placements` are
    /// not looked at): the daemon keeps its placements in its index only.
    pub fn diff_placed(&self, placed: &impl Placed, newer: &Snapshot) -> Vec<TreeEvent> {
        let mut events = Vec::new();
        for (host, info) in &newer.servers {
            if self.servers.get(host) != Some(info) {
                events.push(TreeEvent::ServerUpserted {
                    host: host.clone(),
                    info: info.clone(),
                });
            }
        }
        for host in self
            .servers
            .keys()
            .filter(|h| !newer.servers.contains_key(*h))
        {
            events.push(TreeEvent::ServerRemoved { host: host.clone() });
        }
        let empty = BTreeSet::new();
        for (host, old) in placed.hosts() {
            if newer.unknown.contains(host) {
                // Unreadable now: what was known of it stays.
                continue;
            }
            match newer.placements.get(host) {
                None => events.push(TreeEvent::PlacementDirRemoved { host: host.clone() }),
                Some(_) if self.unknown.contains(host) => {}
                Some(new) => {
                    events.extend(
                        old.difference(new)
                            .map(|instance| TreeEvent::PlacementRemoved {
                                host: host.clone(),
                                instance: instance.clone(),
                            }),
                    )
                }
            }
        }
        for (host, new) in &newer.placements {
            if newer.unknown.contains(host) {
                continue;
            }
            if self.unknown.contains(host) {
                // Readable again: the listing replaces what was kept.
                events.push(TreeEvent::PlacementDirListed {
                    host: host.clone(),
                    instances: new.clone(),
                });
                continue;
            }
            let old = placed.of(host).unwrap_or(&empty);
            events.extend(
                new.difference(old)
                    .map(|instance| TreeEvent::PlacementAdded {
                        host: host.clone(),
                        instance: instance.clone(),
                    }),
            );
        }
        for host in newer.unknown.difference(&self.unknown) {
            events.push(TreeEvent::PlacementsUnknown { host: host.clone() });
        }
        for host in self.unknown.difference(&newer.unknown) {
            if !newer.placements.contains_key(host) && placed.of(host).is_none() {
                // Gone while unknown, with nothing known to take along.
                events.push(TreeEvent::PlacementDirRemoved { host: host.clone() });
            }
        }
        events
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_files_in_yaml_and_json() {
        let yaml = b"partition: p1\nnt.dc: dc.ad.com\nnt.dn: CN=h,DC=ad\ncpu: 100%\n";
        let json =
            br#"{"partition": "p1", "nt.dc": "dc.ad.com", "nt.dn": "CN=h,DC=ad", "traits": []}"#;
        let want = ServerInfo {
            partition: Some("p1".into()),
            dc: Some("dc.ad.com".into()),
            dn: Some("CN=h,DC=ad".into()),
        };
        assert_eq!(ServerInfo::parse(yaml), Ok(want.clone()));
        assert_eq!(ServerInfo::parse(json), Ok(want));
        assert_eq!(
            ServerInfo::parse(b"partition: 7").map(|s| s.partition),
            Ok(Some("7".into()))
        );
    }

    #[test]
    fn json_with_a_raw_line_separator_in_a_string_reads_as_json() {
        // Valid JSON that YAML refuses: U+2028 and U+2029 are line breaks
        // to YAML, and plain characters inside a JSON string.
        for sep in ['\u{2028}', '\u{2029}'] {
            let text = format!(r#"{{"partition": "a{sep}b", "labels": {{"{sep}": null}}}}"#);
            assert!(serde_yaml::from_str::<serde_yaml::Value>(&text).is_err());
            assert_eq!(
                ServerInfo::parse(text.as_bytes()).map(|s| s.partition),
                Ok(Some(format!("a{sep}b"))),
                "{text:?}"
            );
        }
        // Neither YAML nor JSON is still the YAML error.
        let result = ServerInfo::parse(b"{\"partition\": [\n");
        assert!(
            matches!(&result, Err(ServerError::NotYaml(_))),
            "{result:?}"
        );
    }

    #[test]
    fn one_pass_and_checked_parse_agree() {
        for text in [
            "partition: p1\nnt.dc: dc.ad.com\nnt.dn: CN=h,DC=ad\n",
            "nt.dn: CN=h,DC=ad\ntraits: [a, b]\nlabels: {x: 1, y: [2, {z: 3}]}\n",
            "base: &b {cpu: 1}\nother: *b\npartition: 12\nnt.dc: true\n",
            "partition: !custom p\nnt.dc: [dc1, dc2]\nnt.dn: {x: 1}\n",
            "{\"partition\": null, \"nt.dn\": \"CN=h\", \"memory\": 1.5}",
            "cpu: 100%\n",
        ] {
            assert_eq!(
                ServerInfo::parse(text.as_bytes()),
                ServerInfo::parse_checked(text),
                "{text:?}"
            );
            assert!(ServerInfo::parse(text.as_bytes()).is_ok(), "{text:?}");
        }
    }

    #[test]
    fn values_with_control_characters_make_the_file_unusable() {
        for (text, key, code) in [
            (
                r#"{"nt.dn": "CN=h1,DC=ad\ndn: CN=x", "nt.dc": "dc"}"#,
                "nt.dn",
                "U+000A",
            ),
            (
                r#"{"nt.dn": "CN=h1,DC=ad\r", "nt.dc": "dc"}"#,
                "nt.dn",
                "U+000D",
            ),
            (
                r#"{"nt.dn": "CN=h1\u0000,DC=ad", "nt.dc": "dc"}"#,
                "nt.dn",
                "U+0000",
            ),
            ("nt.dn: CN=h1\nnt.dc: \"dc1\\x1b[2J\"\n", "nt.dc", "U+001B"),
            (
                "partition: \"p1\\x7f\"\nnt.dn: CN=h1\n",
                "partition",
                "U+007F",
            ),
            ("partition: |\n  p1\n  p2\n", "partition", "U+000A"),
            ("nt.dn: \"CN=h1\\tx\"\n", "nt.dn", "U+0009"),
        ] {
            let err = ServerInfo::parse(text.as_bytes()).expect_err(text);
            assert!(matches!(err, ServerError::Control(_)), "{text:?}: {err:?}");
            let err = err.to_string();
            assert!(err.starts_with(key), "{text:?}: {err}");
            assert!(err.contains(code), "{text:?}: {err}");
            assert!(!err.chars().any(crate::model::is_control), "{err:?}");
        }
        // Spaces, `:`, `<` and letters beyond ASCII are not control characters.
        let info =
            ServerInfo::parse("nt.dn: ' CN=Zoë: <x>\\, j,DC=ad'\n".as_bytes()).expect("usable");
        assert_eq!(info.dn.as_deref(), Some(" CN=Zoë: <x>\\, j,DC=ad"));
    }

    #[test]
    fn an_nt_dc_that_is_not_a_host_name_makes_the_file_unusable() {
        for bad in [
            "user:secret@dc1",
            "dc1/x",
            "dc1?x",
            "dc 1",
            "dc1:",
            "dc1:port",
            "dc1..ad",
            "dc1:99999",
            "dc1:0",
            "dc1:389:secret",
            "[::1",
            "[dc1]",
        ] {
            let text = format!(
                "{{\"nt.dn\": \"CN=h1\", \"nt.dc\": {}}}",
                serde_json::json!(bad)
            );
            let err = ServerInfo::parse(text.as_bytes()).expect_err(bad);
            assert!(matches!(err, ServerError::Dc(_)), "{bad:?}: {err:?}");
            let err = err.to_string();
            assert!(err.starts_with("nt.dc: "), "{bad:?}: {err}");
            assert!(!err.contains("secret"), "the value is never quoted: {err}");
        }
        for good in [
            "dc1",
            "dc1.ad.com",
            "dc1.ad.com.",
            "dc_1-a.ad",
            "10.0.0.1",
            "dc1:389",
            "dc1:65535",
            "[::1]:636",
            "",
        ] {
            let text = format!(
                "{{\"nt.dn\": \"CN=h1\", \"nt.dc\": {}}}",
                serde_json::json!(good)
            );
            let info = ServerInfo::parse(text.as_bytes()).expect(good);
            assert_eq!(info.dc.as_deref(), Some(good));
        }
    }

    #[test]
    fn an_nt_dn_that_is_not_a_dn_makes_the_file_unusable() {
        for bad in ["not a dn", "CN=a,,DC=b", "CN=a\\", "=x"] {
            let text = format!(
                "{{\"nt.dc\": \"dc\", \"nt.dn\": {}}}",
                serde_json::json!(bad)
            );
            let err = ServerInfo::parse(text.as_bytes()).expect_err(bad);
            assert!(matches!(err, ServerError::Dn(_)), "{bad:?}: {err:?}");
            assert!(
                err.to_string().starts_with("nt.dn: invalid DN"),
                "{bad:?}: {err}"
            );
        }
        // An empty DN is a DN; the index treats it as absent.
        assert!(ServerInfo::parse(b"nt.dn: ''\n").is_ok());
    }

    /// Found by the `server_info` fuzz target
    /// (fuzz/corpus/server_info/crash-a-tag-alone): the one pass took a tag
    /// with no value (`!x`) for an empty mapping, and a list for the three
    /// fields in order.
    #[test]
    fn only_a_mapping_is_a_server_file() {
        for bad in [
            "!x",
            "!x\n",
            " !e",
            "!x []",
            "[p1, dc.ad.com, CN=h]",
            "- p1\n- dc\n- CN=h\n",
        ] {
            assert_eq!(
                ServerInfo::parse(bad.as_bytes()),
                Err(ServerError::NotAMapping),
                "{bad:?}"
            );
        }
        // A tag on the document says nothing about its keys.
        let tagged = ServerInfo::parse(b"!host {partition: p1}").map(|s| s.partition);
        assert_eq!(tagged, Ok(Some("p1".to_owned())));
    }

    fn host(name: &str) -> HostName {
        HostName::new(name).expect("host")
    }

    fn snapshot(servers: &[(&str, &str)], placements: &[(&str, &[&str])]) -> Snapshot {
        Snapshot {
            servers: servers
                .iter()
                .map(|(h, p)| {
                    let info = ServerInfo {
                        partition: Some((*p).into()),
                        ..ServerInfo::default()
                    };
                    (host(h), Ok(info))
                })
                .collect(),
            placements: placements
                .iter()
                .map(|(h, i)| (host(h), i.iter().map(|s| s.to_string()).collect()))
                .collect(),
            unknown: BTreeSet::new(),
            warnings: vec![],
        }
    }

    #[test]
    fn diff_then_apply_reaches_the_newer_snapshot() {
        let old = snapshot(
            &[("a", "p1"), ("b", "p1"), ("c", "p1")],
            &[("a", &["x.1#1", "y.1#2"]), ("b", &["x.1#3"])],
        );
        let new = snapshot(
            &[("a", "p1"), ("b", "p2"), ("d", "p1")],
            &[("a", &["y.1#2", "z.1#4"]), ("c", &[]), ("d", &["x.1#5"])],
        );
        let mut walked = old.clone();
        for event in old.diff(&new) {
            walked.apply(&event);
        }
        // An empty placement directory contributes nothing, so no event names it.
        let mut want = new.clone();
        want.placements.retain(|_, instances| !instances.is_empty());
        walked
            .placements
            .retain(|_, instances| !instances.is_empty());
        assert_eq!(walked, want);
        assert!(new.diff(&new).is_empty());
    }

    #[test]
    fn a_rescan_keeps_its_own_copy_of_what_did_not_change() {
        let mut tree = snapshot(&[("a", "p1"), ("b", "p1")], &[]);
        let kept = |tree: &Snapshot, h: &str| {
            let info = tree.servers[&host(h)].as_ref().expect("usable");
            info.partition.as_ref().map(|p| p.as_ptr())
        };
        let a = kept(&tree, "a");
        // A scan made apart: a as it was, b moved to another partition,
        // c new.
        let mut scanned = snapshot(&[("a", "p1"), ("b", "p2"), ("c", "p1")], &[]);
        scanned.warnings.push("skipped x".to_owned());
        let want = scanned.clone();
        tree.replace_with(scanned);
        assert_eq!(tree, want);
        assert_eq!(kept(&tree, "a"), a, "unchanged: the tree's own copy");
    }

    #[test]
    fn unknown_hosts_keep_what_was_known_across_rescans() {
        let old = snapshot(&[("a", "p1")], &[("a", &["x.1#1"]), ("b", &["y.1#2"])]);
        // a's directory became unreadable: a scan has nothing for it.
        let mut scanned = snapshot(&[("a", "p1")], &[("b", &["y.1#2"])]);
        scanned.unknown.insert(host("a"));
        let events = old.diff(&scanned);
        assert_eq!(events, [TreeEvent::PlacementsUnknown { host: host("a") }]);
        let mut tree = old.clone();
        for event in &events {
            tree.apply(event);
        }
        tree.replace_with(scanned.clone());
        assert_eq!(tree.placements[&host("a")], ["x.1#1".to_owned()].into());
        assert!(
            tree.diff(&scanned).is_empty(),
            "still unknown: nothing changes"
        );

        // Readable again, with other placements: one listing replaces them.
        let readable = snapshot(&[("a", "p1")], &[("a", &["z.1#3"]), ("b", &["y.1#2"])]);
        let listed = tree.diff(&readable);
        assert_eq!(
            listed,
            [TreeEvent::PlacementDirListed {
                host: host("a"),
                instances: ["z.1#3".to_owned()].into(),
            }]
        );
        let mut walked = tree.clone();
        for event in &listed {
            walked.apply(event);
        }
        assert_eq!(walked, readable);

        // Gone while unknown, with nothing known of it.
        let mut never_read = snapshot(&[], &[]);
        never_read.unknown.insert(host("c"));
        assert_eq!(
            never_read.diff(&snapshot(&[], &[])),
            [TreeEvent::PlacementDirRemoved { host: host("c") }]
        );
        assert_eq!(
            never_read.events().collect::<Vec<_>>(),
            [TreeEvent::PlacementsUnknown { host: host("c") }]
        );
    }

    #[test]
    fn a_partition_glob_matching_no_server_file_is_named() {
        let servers = snapshot(&[("a", "east"), ("b", "west")], &[]);
        let glob = |g: &str| PartitionGlob::parse(g).expect("glob");
        assert_eq!(servers.partition_warning(&glob("*")), None);
        assert_eq!(servers.partition_warning(&glob("we[s]t")), None);
        let warning = servers.partition_warning(&glob("eats")).expect("warned");
        assert_eq!(
            warning,
            "--partition \"eats\" matches no server file: the 2 usable server files have partitions \"east\", \"west\"; every host is out of scope"
        );
        let one = snapshot(&[("a", "east")], &[]);
        let warning = one.partition_warning(&glob("west")).expect("warned");
        assert!(
            warning.contains("the 1 usable server file has partition \"east\";"),
            "{warning}"
        );
        let mut broken = snapshot(&[], &[]);
        broken
            .servers
            .insert(host("c"), Err(ServerError::NotAMapping));
        let warning = broken.partition_warning(&glob("*")).expect("warned");
        assert!(
            warning.contains("there is no usable server file"),
            "{warning}"
        );
    }

    #[test]
    fn broken_server_files() {
        for bad in [
            &b"- a\n- b"[..],
            b"just text",
            b"{unclosed",
            b"\xff\xfe",
            b"",
            b"~",
            b"null",
            b"---\n",
            b"partition: a\n---\npartition: b\n",
            b"partition: [a\n",
            b"7",
        ] {
            assert!(
                ServerInfo::parse(bad).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }
}

/// Property tests of the server-file parser, at the cases CI can afford;
/// the fuzz target `server_info` (fuzz/) checks the same on any bytes.
#[cfg(test)]
mod properties {
    use super::*;
    use proptest::prelude::*;
    use serde_yaml::{Mapping, Value};

    /// Text a YAML reader could mistake for something else when unquoted.
    fn text() -> impl Strategy<Value = String> {
        prop_oneof![
            "[a-zA-Z0-9 .,=:#\\-\\[\\]{}'\"&*!|>%@`]{0,12}",
            Just("null".to_owned()),
            Just("~".to_owned()),
            Just("yes".to_owned()),
            Just("1e3".to_owned()),
            "\\PC{0,8}",
        ]
    }

    /// Any YAML value, nested a little: what the keys the reconciler
    /// ignores may hold.
    fn any_value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(|n| Value::Number(n.into())),
            text().prop_map(Value::String),
        ];
        leaf.prop_recursive(3, 16, 4, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::Sequence),
                proptest::collection::vec((text(), inner), 0..4).prop_map(|pairs| {
                    Value::Mapping(
                        pairs
                            .into_iter()
                            .map(|(k, v)| (Value::String(k), v))
                            .collect(),
                    )
                }),
            ]
        })
    }

    /// A field as a server file may write it: text, a number, a boolean,
    /// or something the reconciler cannot use (and reads as absent).
    fn field() -> impl Strategy<Value = Option<Value>> {
        prop_oneof![
            Just(None),
            text().prop_map(|s| Some(Value::String(s))),
            any::<u32>().prop_map(|n| Some(Value::Number(n.into()))),
            any::<bool>().prop_map(|b| Some(Value::Bool(b))),
            any_value().prop_map(Some),
        ]
    }

    /// `nt.dn` must be a DN when it is text: one built from any value, or
    /// something the reconciler cannot use.
    fn dn_field() -> impl Strategy<Value = Option<Value>> {
        prop_oneof![
            Just(None),
            text().prop_map(|cn| {
                let dn = format!("CN={},OU=Hosts,DC=ad", crate::model::escape_dn_value(&cn));
                Some(Value::String(dn))
            }),
            any_value()
                .prop_filter("not a scalar", |v| v.is_sequence() || v.is_mapping())
                .prop_map(Some),
        ]
    }

    /// `nt.dc` must be a host name, with a port from 1 to 65535, when it is
    /// text (a number or a boolean reads as one), or something the
    /// reconciler cannot use.
    fn dc_field() -> impl Strategy<Value = Option<Value>> {
        prop_oneof![
            Just(None),
            "[a-z0-9_-]{1,8}(\\.[a-z0-9-]{1,6}){0,3}(:[1-9][0-9]{0,3})?"
                .prop_map(|s| Some(Value::String(s))),
            any::<u32>().prop_map(|n| Some(Value::Number(n.into()))),
            any::<bool>().prop_map(|b| Some(Value::Bool(b))),
            any_value()
                .prop_filter("not a scalar", |v| v.is_sequence() || v.is_mapping())
                .prop_map(Some),
        ]
    }

    /// What the reconciler should make of a field, spelled out here rather
    /// than taken from the parser.
    fn expected(field: &Option<Value>) -> Option<String> {
        match field.as_ref()? {
            Value::String(s) => Some(s.clone()),
            Value::Number(n) => Some(n.to_string()),
            Value::Bool(true) => Some("true".to_owned()),
            Value::Bool(false) => Some("false".to_owned()),
            _ => None,
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]

        #[test]
        fn generated_server_files_read_back(
            partition in field(),
            dc in dc_field(),
            dn in dn_field(),
            others in proptest::collection::vec((text(), any_value()), 0..4),
            json in any::<bool>(),
        ) {
            let mut doc = Mapping::new();
            for (key, value) in others {
                if !matches!(key.as_str(), "partition" | "nt.dc" | "nt.dn") {
                    doc.insert(Value::String(key), value);
                }
            }
            for (key, value) in [("partition", &partition), ("nt.dc", &dc), ("nt.dn", &dn)] {
                if let Some(value) = value {
                    doc.insert(Value::String(key.to_owned()), value.clone());
                }
            }
            let text = if json {
                serde_json::to_string(&doc).expect("JSON")
            } else {
                serde_yaml::to_string(&doc).expect("YAML")
            };
            let want = ServerInfo {
                partition: expected(&partition),
                dc: expected(&dc),
                dn: expected(&dn),
            };
            prop_assert_eq!(ServerInfo::parse(text.as_bytes()), Ok(want), "{}", text);
            prop_assert_eq!(ServerInfo::parse(text.as_bytes()), ServerInfo::parse_checked(&text));
        }

        #[test]
        fn any_bytes_parse_or_are_refused(bytes in prop_oneof![
            any::<Vec<u8>>(),
            "[a-z.: \\n\\-\\[\\]{}\"'&*!#]{0,40}".prop_map(String::into_bytes),
        ]) {
            let parsed = ServerInfo::parse(&bytes);
            if let Ok(text) = std::str::from_utf8(&bytes) {
                if let (Ok(info), Ok(checked)) = (&parsed, ServerInfo::parse_checked(text)) {
                    prop_assert_eq!(info, &checked);
                }
            } else {
                prop_assert!(parsed.is_err());
            }
        }
    }
}

//! The placement tree mirrored from the cluster's coordination store: the
//! server definitions and placements the reconciler works from.
//!
//! [`scan`] reads a whole tree into a [`Snapshot`]; [`event`] turns file
//! system notifications into [`TreeEvent`]s; [`watch`] is the only place that
//! talks to the file system notifier. A snapshot is itself expressed as a
//! sequence of events, so the index has one way in.

pub mod event;
pub mod scan;
pub mod watch;

use std::collections::{BTreeMap, BTreeSet};

use serde::Deserialize;

use crate::model::HostName;

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
    /// mapping. Anything else is an error naming what is wrong.
    pub fn parse(content: &[u8]) -> Result<ServerInfo, String> {
        let text = std::str::from_utf8(content).map_err(|_| "not UTF-8".to_owned())?;
        let value: serde_yaml::Value =
            serde_yaml::from_str(text).map_err(|e| format!("not YAML or JSON: {e}"))?;
        if !value.is_mapping() {
            return Err("not a mapping".to_owned());
        }
        let raw: RawServer =
            serde_yaml::from_value(value).map_err(|e| format!("unexpected content: {e}"))?;
        Ok(ServerInfo {
            partition: raw.partition.as_ref().and_then(scalar),
            dc: raw.dc.as_ref().and_then(scalar),
            dn: raw.dn.as_ref().and_then(scalar),
        })
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
        info: Result<ServerInfo, String>,
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
}

/// A whole tree read at one time.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// Every server file, parsed or with the reason it could not be used.
    pub servers: BTreeMap<HostName, Result<ServerInfo, String>>,
    /// Every placement directory and the instances in it.
    pub placements: BTreeMap<HostName, BTreeSet<String>>,
    /// Entries that were skipped, each naming the path and why.
    pub warnings: Vec<String>,
}

impl Snapshot {
    /// The snapshot as the events that build it from an empty tree.
    pub fn events(&self) -> impl Iterator<Item = TreeEvent> + '_ {
        let servers = self.servers.iter().map(|(host, info)| TreeEvent::ServerUpserted {
            host: host.clone(),
            info: info.clone(),
        });
        let placements = self.placements.iter().flat_map(|(host, instances)| {
            instances.iter().map(move |instance| TreeEvent::PlacementAdded {
                host: host.clone(),
                instance: instance.clone(),
            })
        });
        servers.chain(placements)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_files_in_yaml_and_json() {
        let yaml = b"partition: p1\nnt.dc: dc.ad.com\nnt.dn: CN=h,DC=ad\ncpu: 100%\n";
        let json = br#"{"partition": "p1", "nt.dc": "dc.ad.com", "nt.dn": "CN=h,DC=ad", "traits": []}"#;
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
    fn broken_server_files() {
        for bad in [&b"- a\n- b"[..], b"just text", b"{unclosed", b"\xff\xfe", b""] {
            assert!(ServerInfo::parse(bad).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
    }
}

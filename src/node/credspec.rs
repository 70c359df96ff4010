//! Credential specs: the JSON file that tells a Windows container runtime
//! which gMSA a container runs as, and the domain facts it needs.
//!
//! The domain facts come in a [`DomainInfo`], from configuration or read
//! from the directory by the caller; [`sid_to_string`] and
//! [`guid_to_string`] turn AD's binary `objectSid` and `objectGUID` into the
//! string forms a credential spec holds. Nothing here touches the network.

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// The facts about the AD domain that every credential spec repeats.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DomainInfo {
    /// The domain's DNS name, e.g. `ad.example.com`.
    pub dns_name: String,
    /// The domain's NetBIOS name, e.g. `AD`.
    pub netbios_name: String,
    /// The domain SID, `S-1-5-21-...`.
    pub sid: String,
    /// The domain object's GUID, `xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx`.
    pub guid: String,
    /// The DNS name of the forest root.
    pub dns_tree_name: String,
}

/// A problem with domain facts or with a binary SID or GUID.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum CredSpecError {
    /// A field of [`DomainInfo`] is missing or malformed.
    #[error("domain {field}: {why}")]
    Domain {
        /// The field.
        field: &'static str,
        /// What is wrong.
        why: String,
    },
    /// A binary `objectSid` that does not decode.
    #[error("invalid binary SID ({len} bytes): {why}")]
    Sid {
        /// Its length.
        len: usize,
        /// What is wrong.
        why: &'static str,
    },
    /// A binary `objectGUID` that is not 16 bytes.
    #[error("invalid binary GUID: {0} bytes, want 16")]
    Guid(usize),
}

impl DomainInfo {
    /// Checks every field, so a typo in configuration is found at start-up
    /// rather than in a container that cannot log on.
    pub fn validate(&self) -> Result<(), CredSpecError> {
        let bad = |field, why: &str| {
            Err(CredSpecError::Domain {
                field,
                why: why.to_owned(),
            })
        };
        for (field, value) in [
            ("dns_name", &self.dns_name),
            ("netbios_name", &self.netbios_name),
            ("dns_tree_name", &self.dns_tree_name),
        ] {
            if value.is_empty() || value.contains(|c: char| c.is_whitespace() || c.is_control()) {
                return bad(field, "must be a non-empty name without spaces");
            }
        }
        if !is_sid(&self.sid) {
            return bad("sid", "must look like S-1-5-21-...");
        }
        if !is_guid(&self.guid) {
            return bad(
                "guid",
                "must look like xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx",
            );
        }
        Ok(())
    }

    /// The credential spec of a proid's gMSA, as JSON text.
    pub fn credential_spec(&self, proid: &str) -> String {
        let spec = CredentialSpec {
            cms_plugins: vec!["ActiveDirectory".to_owned()],
            domain_join_config: DomainJoinConfig {
                sid: self.sid.clone(),
                machine_account_name: proid.to_owned(),
                guid: self.guid.clone(),
                dns_tree_name: self.dns_tree_name.clone(),
                dns_name: self.dns_name.clone(),
                net_bios_name: self.netbios_name.clone(),
            },
            active_directory_config: ActiveDirectoryConfig {
                group_managed_service_accounts: vec![
                    GmsaRef {
                        name: proid.to_owned(),
                        scope: self.dns_name.clone(),
                    },
                    GmsaRef {
                        name: proid.to_owned(),
                        scope: self.netbios_name.clone(),
                    },
                ],
            },
        };
        match serde_json::to_string_pretty(&spec) {
            Ok(text) => text + "\n",
            Err(err) => panic!("BUG: a struct of strings always serialises: {err}"),
        }
    }
}

/// The credential spec file format read by Windows container runtimes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct CredentialSpec {
    /// Always `["ActiveDirectory"]`.
    pub cms_plugins: Vec<String>,
    /// The domain and the account the container presents as.
    pub domain_join_config: DomainJoinConfig,
    /// The gMSAs the container may use.
    pub active_directory_config: ActiveDirectoryConfig,
}

/// The `DomainJoinConfig` part of a credential spec.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct DomainJoinConfig {
    /// The domain SID.
    pub sid: String,
    /// The gMSA's account name (the proid).
    pub machine_account_name: String,
    /// The domain GUID.
    pub guid: String,
    /// The forest root's DNS name.
    pub dns_tree_name: String,
    /// The domain's DNS name.
    pub dns_name: String,
    /// The domain's NetBIOS name.
    #[serde(rename = "NetBiosName")]
    pub net_bios_name: String,
}

/// The `ActiveDirectoryConfig` part of a credential spec.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActiveDirectoryConfig {
    /// The gMSA under each of the domain's names.
    #[serde(rename = "GroupManagedServiceAccounts")]
    pub group_managed_service_accounts: Vec<GmsaRef>,
}

/// One gMSA reference.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct GmsaRef {
    /// The account name.
    pub name: String,
    /// The domain name it is found under.
    pub scope: String,
}

/// Decodes a binary SID (`objectSid`): revision, sub-authority count,
/// 48-bit big-endian identifier authority, then little-endian 32-bit
/// sub-authorities; written `S-<rev>-<authority>-<sub>...`, the authority in
/// hex when it does not fit 32 bits, as Windows writes it.
pub fn sid_to_string(bytes: &[u8]) -> Result<String, CredSpecError> {
    let bad = |why| CredSpecError::Sid {
        len: bytes.len(),
        why,
    };
    let (&revision, rest) = bytes.split_first().ok_or_else(|| bad("empty"))?;
    let (&count, rest) = rest
        .split_first()
        .ok_or_else(|| bad("no sub-authority count"))?;
    if revision != 1 {
        return Err(bad("revision is not 1"));
    }
    if count > 15 {
        return Err(bad("more than 15 sub-authorities"));
    }
    if rest.len() != 6 + 4 * usize::from(count) {
        return Err(bad("length does not match the sub-authority count"));
    }
    let (authority, subs) = rest.split_at(6);
    let authority = authority
        .iter()
        .fold(0u64, |acc, &b| (acc << 8) | u64::from(b));
    let mut out = format!("S-{revision}-");
    if authority >> 32 == 0 {
        let _ = write!(out, "{authority}");
    } else {
        let _ = write!(out, "0x{authority:012X}");
    }
    for sub in subs.chunks_exact(4) {
        let value = u32::from_le_bytes([sub[0], sub[1], sub[2], sub[3]]);
        let _ = write!(out, "-{value}");
    }
    Ok(out)
}

/// Decodes a binary GUID (`objectGUID`): the first three fields are stored
/// little-endian, the last eight bytes in order; written in lower case.
pub fn guid_to_string(bytes: &[u8]) -> Result<String, CredSpecError> {
    let b: &[u8; 16] = bytes
        .try_into()
        .map_err(|_| CredSpecError::Guid(bytes.len()))?;
    Ok(format!(
        "{:02x}{:02x}{:02x}{:02x}-{:02x}{:02x}-{:02x}{:02x}-{:02x}{:02x}-{:02x}{:02x}{:02x}{:02x}{:02x}{:02x}",
        b[3], b[2], b[1], b[0], b[5], b[4], b[7], b[6], b[8], b[9], b[10], b[11], b[12], b[13],
        b[14], b[15]
    ))
}

fn is_sid(s: &str) -> bool {
    let mut parts = s.split('-');
    parts.next() == Some("S")
        && parts.next() == Some("1")
        && parts.clone().count() >= 2
        && parts.all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
}

fn is_guid(s: &str) -> bool {
    let lens: Vec<usize> = s.split('-').map(str::len).collect();
    lens == [8, 4, 4, 4, 12] && s.bytes().all(|b| b == b'-' || b.is_ascii_hexdigit())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
            .collect()
    }

    #[test]
    fn sids_decode_to_their_string_form() {
        let cases = [
            (
                "010500000000000515000000c7f7fed77c7755c8945ace01f5030000",
                "S-1-5-21-3623811015-3361044348-30300820-1013",
            ),
            ("01020000000000052000000020020000", "S-1-5-32-544"),
            ("010100000000000100000000", "S-1-1-0"),
            ("0100000000000005", "S-1-5"),
            ("010100010000000000000000", "S-1-0x000100000000-0"),
            ("010100000100000000000000", "S-1-16777216-0"),
        ];
        for (bytes, want) in cases {
            assert_eq!(sid_to_string(&hex(bytes)).as_deref(), Ok(want), "{bytes}");
        }
    }

    #[test]
    fn malformed_sids_are_errors() {
        for bad in [
            "",
            "01",
            "020100000000000100000000",
            "0101000000000001000000",
            "01010000000000010000000000",
        ] {
            assert!(sid_to_string(&hex(bad)).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn guids_decode_with_mixed_endianness() {
        let bytes: Vec<u8> = (0u8..16).collect();
        assert_eq!(
            guid_to_string(&bytes).as_deref(),
            Ok("03020100-0504-0706-0809-0a0b0c0d0e0f")
        );
        let ad = hex("1d8fd3a4aa39b34d9fbb3d1c6a1f3b4e");
        assert_eq!(
            guid_to_string(&ad).as_deref(),
            Ok("a4d38f1d-39aa-4db3-9fbb-3d1c6a1f3b4e")
        );
        assert_eq!(guid_to_string(&bytes[..15]), Err(CredSpecError::Guid(15)));
    }

    fn domain() -> DomainInfo {
        DomainInfo {
            dns_name: "ad.example.com".into(),
            netbios_name: "AD".into(),
            sid: "S-1-5-21-3623811015-3361044348-30300820".into(),
            guid: "a4d38f1d-39aa-4db3-9fbb-3d1c6a1f3b4e".into(),
            dns_tree_name: "example.com".into(),
        }
    }

    #[test]
    fn credential_spec_has_the_runtime_format() {
        let text = domain().credential_spec("proid1");
        let json: serde_json::Value = serde_json::from_str(&text).expect("json");
        assert_eq!(json["CmsPlugins"], serde_json::json!(["ActiveDirectory"]));
        let join = &json["DomainJoinConfig"];
        assert_eq!(join["Sid"], "S-1-5-21-3623811015-3361044348-30300820");
        assert_eq!(join["MachineAccountName"], "proid1");
        assert_eq!(join["Guid"], "a4d38f1d-39aa-4db3-9fbb-3d1c6a1f3b4e");
        assert_eq!(join["DnsTreeName"], "example.com");
        assert_eq!(join["DnsName"], "ad.example.com");
        assert_eq!(join["NetBiosName"], "AD");
        assert_eq!(
            json["ActiveDirectoryConfig"]["GroupManagedServiceAccounts"],
            serde_json::json!([
                {"Name": "proid1", "Scope": "ad.example.com"},
                {"Name": "proid1", "Scope": "AD"}
            ])
        );
    }

    #[test]
    fn domain_facts_are_validated() {
        assert_eq!(domain().validate(), Ok(()));
        let mut d = domain();
        d.sid = "S-1-5".into();
        assert!(d.validate().is_err());
        let mut d = domain();
        d.guid = "a4d38f1d39aa4db39fbb3d1c6a1f3b4e".into();
        assert!(d.validate().is_err());
        let mut d = domain();
        d.netbios_name = String::new();
        assert!(d.validate().is_err());
        let mut d = domain();
        d.dns_name = "ad example".into();
        assert!(d.validate().is_err());
    }
}

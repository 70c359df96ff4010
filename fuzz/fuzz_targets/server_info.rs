//! The server-file parser on arbitrary bytes: it never panics, and when it
//! accepts a file its values hold no control character, its `nt.dn` is a
//! DN, and its three fields are what a plain reading of the whole
//! YAML document finds under `partition`, `nt.dc` and `nt.dn` (the parser
//! takes a one-pass shortcut; this checks the shortcut against the long way).
#![no_main]

use gmsa_reconciler::model::{is_control, Dn};
use gmsa_reconciler::tree::ServerInfo;
use libfuzzer_sys::fuzz_target;
use serde_yaml::Value;

/// A scalar as the server file's fields are read: text, or a number or
/// boolean written as text.
fn scalar(value: Option<&Value>) -> Option<String> {
    match value? {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

fuzz_target!(|data: &[u8]| {
    let parsed = ServerInfo::parse(data);
    let Ok(info) = parsed else {
        return;
    };
    // What it hands on is usable: no control characters, a DN that parses.
    for value in [&info.partition, &info.dc, &info.dn].into_iter().flatten() {
        assert!(!value.chars().any(is_control), "{value:?}");
    }
    if let Some(dn) = &info.dn {
        assert!(Dn::parse(dn).is_ok(), "{dn:?}");
    }
    let text = std::str::from_utf8(data).expect("an accepted server file is UTF-8");
    // A document the whole-value reader refuses (a duplicated key the
    // reconciler ignores, say) has nothing to compare with.
    let Ok(value) = serde_yaml::from_str::<Value>(text) else {
        return;
    };
    // A tag on the document is no matter to the parser.
    let value = match value {
        Value::Tagged(tagged) => tagged.value,
        value => value,
    };
    let Value::Mapping(map) = value else {
        panic!("accepted a server file that is not a mapping: {value:?}");
    };
    assert_eq!(info.partition, scalar(map.get("partition")), "partition");
    assert_eq!(info.dc, scalar(map.get("nt.dc")), "nt.dc");
    assert_eq!(info.dn, scalar(map.get("nt.dn")), "nt.dn");
});

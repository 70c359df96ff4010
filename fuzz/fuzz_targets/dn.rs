//! The DN parser and normaliser on arbitrary text. A DN that parses keeps
//! its spelling; its normal form parses to itself (normalising twice is
//! stable) and compares equal to it; two DNs compare as their normal forms
//! do, in `==`, `cmp` and hash alike; and a child built over it from any
//! value parses, lies within it and decodes back to that value.
#![no_main]

use std::cmp::Ordering;
use std::hash::{BuildHasher, RandomState};

use gmsa_reconciler::model::{escape_dn_value, Dn, DnCache};
use libfuzzer_sys::fuzz_target;

fn check_one(raw: &str, hasher: &RandomState) -> Option<Dn> {
    let dn = Dn::parse(raw).ok()?;
    assert_eq!(dn.as_str(), raw, "the spelling is kept");
    assert_eq!(dn.to_string(), raw);
    let norm = dn.normalised();
    let again =
        Dn::parse(norm).unwrap_or_else(|e| panic!("the normal form {norm:?} does not parse: {e}"));
    assert_eq!(
        again.normalised(),
        norm,
        "normalising twice changed {raw:?}"
    );
    assert_eq!(again, dn);
    assert_eq!(again.cmp(&dn), Ordering::Equal);
    assert_eq!(hasher.hash_one(&again), hasher.hash_one(&dn));
    assert!(dn.is_within(&dn) && dn.is_within(&again));
    let cached = DnCache::default()
        .parse(raw)
        .expect("the cache parses what parse does");
    assert_eq!(cached.normalised(), norm);
    Some(dn)
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let hasher = RandomState::new();
    // Up to the first NUL is one DN, the rest a second DN or a value.
    let (a, b) = text.split_once('\0').unwrap_or((text, ""));
    let first = check_one(a, &hasher);
    let second = check_one(b, &hasher);
    if let (Some(x), Some(y)) = (&first, &second) {
        let same = x.normalised() == y.normalised();
        assert_eq!(x == y, same);
        assert_eq!(x.cmp(y), x.normalised().cmp(y.normalised()));
        if same {
            assert_eq!(hasher.hash_one(x), hasher.hash_one(y));
        }
    }
    if let Some(parent) = &first {
        let child = Dn::child("CN", b, parent);
        assert!(child.is_within(parent), "{child:?} not within {parent:?}");
        let rdn = format!("cn={}", escape_dn_value(&b.to_lowercase()));
        let want = if parent.normalised().is_empty() {
            rdn
        } else {
            format!("{rdn},{}", parent.normalised())
        };
        assert_eq!(child.normalised(), want, "child of {parent:?} named {b:?}");
    }
});

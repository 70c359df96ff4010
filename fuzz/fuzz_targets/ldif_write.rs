//! The LDIF writer on arbitrary records (any DN and value text, any valid
//! attribute description): what it writes reads back as the same records,
//! one record per `dn:` line, and no value leaks onto a line of its own.
#![no_main]

use arbitrary::Arbitrary;
use gmsa_reconciler::ldif::{self, Record};
use libfuzzer_sys::fuzz_target;

#[derive(Debug, Arbitrary)]
struct Input {
    records: Vec<(String, Vec<(Name, String)>)>,
}

/// An attribute description built from the characters it may hold.
#[derive(Debug, Arbitrary)]
struct Name(Vec<u8>);

impl Name {
    fn text(&self) -> String {
        const FIRST: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
        const REST: &[u8] = b"abcXYZ019-.;=*";
        let mut out = String::new();
        let first = self.0.first().copied().unwrap_or(0);
        out.push(FIRST[usize::from(first) % FIRST.len()] as char);
        for &b in self.0.iter().skip(1).take(16) {
            out.push(REST[usize::from(b) % REST.len()] as char);
        }
        // A record's own keywords are not attributes.
        if out.eq_ignore_ascii_case("dn") || out.eq_ignore_ascii_case("changetype") {
            out.push('x');
        }
        out
    }
}

fuzz_target!(|input: Input| {
    let records: Vec<Record> = input
        .records
        .into_iter()
        .map(|(dn, attrs)| Record {
            dn,
            attrs: attrs
                .into_iter()
                .enumerate()
                .map(|(i, (name, value))| {
                    let mut name = name.text();
                    // `control:` first in a record starts a change record.
                    if i == 0 && name.eq_ignore_ascii_case("control") {
                        name.push('x');
                    }
                    (name, value)
                })
                .collect(),
        })
        .collect();
    let text = ldif::write(&records);
    let dn_lines = text.lines().filter(|l| l.starts_with("dn:")).count();
    assert_eq!(dn_lines, records.len(), "{text}");
    let lines = text.lines().filter(|l| !l.is_empty()).count();
    let values: usize = records.iter().map(|r| 1 + r.attrs.len()).sum();
    assert_eq!(lines, 1 + values, "one line per value:\n{text}");
    assert_eq!(ldif::parse(&text), Ok(records), "{text}");
});

//! LDIF (RFC 2849): the reader and writer of content records, and the one
//! line writer that the change-record output shares.
//!
//! The LDIF file backend keeps the whole directory in one content file, so
//! this module reads what AD exports and `ldapsearch` print (folded lines,
//! base64 values, comments, CRLF line ends) and writes it back in a form that
//! reads back to the same records. It works on text only: attribute names
//! are kept as spelled, values are UTF-8 strings, and nothing here knows
//! what a DN or a group is. URL values (`attr:< file:///...`) and change
//! records are refused: a content file that needs them is not one we can
//! rewrite faithfully.

use base64::alphabet;
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig, STANDARD};
use base64::engine::DecodePaddingMode;
use base64::Engine;
use thiserror::Error;

/// One entry of a content file: its DN and its attributes in file order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Record {
    /// The DN as written (after base64 decoding).
    pub dn: String,
    /// `(attribute description, value)` pairs in file order; the name keeps
    /// its spelling and options (`member;range=0-*` is just a name here).
    pub attrs: Vec<(String, String)>,
}

/// A syntax error in an LDIF text.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("line {line}: {what}")]
pub struct LdifError {
    /// The 1-based line the problem starts on.
    pub line: usize,
    /// What is wrong.
    pub what: String,
}

impl LdifError {
    fn new(line: usize, what: impl Into<String>) -> Self {
        LdifError {
            line,
            what: what.into(),
        }
    }
}

/// A logical line: folded continuations joined, with the number of the
/// physical line it started on.
struct Line {
    number: usize,
    text: String,
}

/// The value part of an `attr: value` line.
enum Spec<'a> {
    Text(&'a str),
    Base64(&'a str),
    Url,
}

/// Parses an LDIF content file into its records, in file order.
pub fn parse(text: &str) -> Result<Vec<Record>, LdifError> {
    Ok(parse_numbered(text)?.into_iter().map(|(_, r)| r).collect())
}

/// Like [`parse`], with the line each record's `dn:` starts on, for
/// errors that concern whole records (two entries with one DN).
pub fn parse_numbered(text: &str) -> Result<Vec<(usize, Record)>, LdifError> {
    let mut groups = group_records(unfold(text)?);
    if let Some(first) = groups.first_mut() {
        if let Some(line) = first.first() {
            let (name, spec) = split_line(line)?;
            if name.eq_ignore_ascii_case("version") {
                let version = value_of(line, name, spec)?;
                if version.trim_end() != "1" {
                    return Err(LdifError::new(
                        line.number,
                        format!("unsupported LDIF version {version:?}: only version 1 is known"),
                    ));
                }
                first.remove(0);
            }
        }
    }
    groups
        .iter()
        .filter_map(|lines| lines.split_first())
        .map(|(first, rest)| Ok((first.number, parse_record(first, rest)?)))
        .collect()
}

/// Joins folded lines and drops comments; `None` stands for a blank line.
fn unfold(text: &str) -> Result<Vec<Option<Line>>, LdifError> {
    // Windows tools like to start UTF-8 files with a byte order mark.
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut out: Vec<Option<Line>> = Vec::new();
    // A continuation of a comment is part of the comment, so it must be
    // dropped with it rather than glued to the line before the comment.
    let mut in_comment = false;
    for (i, raw) in text.split('\n').enumerate() {
        let number = i + 1;
        let raw = raw.strip_suffix('\r').unwrap_or(raw);
        if let Some(rest) = raw.strip_prefix(' ') {
            if in_comment {
                continue;
            }
            match out.last_mut() {
                Some(Some(line)) => line.text.push_str(rest),
                _ => {
                    return Err(LdifError::new(
                        number,
                        "a continuation line (starting with a space) with no line before it",
                    ))
                }
            }
        } else if raw.is_empty() {
            in_comment = false;
            out.push(None);
        } else if raw.starts_with('#') {
            in_comment = true;
        } else {
            in_comment = false;
            out.push(Some(Line {
                number,
                text: raw.to_owned(),
            }));
        }
    }
    Ok(out)
}

/// Splits logical lines into records at blank lines.
fn group_records(lines: Vec<Option<Line>>) -> Vec<Vec<Line>> {
    let mut groups = vec![Vec::new()];
    for line in lines {
        match line {
            Some(line) => {
                if let Some(last) = groups.last_mut() {
                    last.push(line);
                }
            }
            None => {
                if groups.last().is_some_and(|g| !g.is_empty()) {
                    groups.push(Vec::new());
                }
            }
        }
    }
    groups
}

fn parse_record(first: &Line, rest: &[Line]) -> Result<Record, LdifError> {
    let (name, spec) = split_line(first)?;
    if !name.eq_ignore_ascii_case("dn") {
        return Err(LdifError::new(
            first.number,
            format!("a record must start with `dn:`, found `{name}:`"),
        ));
    }
    let dn = value_of(first, name, spec)?;
    let mut attrs = Vec::with_capacity(rest.len());
    for (i, line) in rest.iter().enumerate() {
        let (name, spec) = split_line(line)?;
        let change_record = name.eq_ignore_ascii_case("changetype")
            || (i == 0 && name.eq_ignore_ascii_case("control"));
        if change_record {
            return Err(LdifError::new(
                line.number,
                format!("`{name}:` starts a change record; a content file holds entries only"),
            ));
        }
        if name.eq_ignore_ascii_case("dn") {
            return Err(LdifError::new(
                line.number,
                "a second `dn:` in one record (is the blank line between records missing?)",
            ));
        }
        let value = value_of(line, name, spec)?;
        attrs.push((name.to_owned(), value));
    }
    Ok(Record { dn, attrs })
}

/// Splits `name: value`, `name:: base64` or `name:< url`.
fn split_line(line: &Line) -> Result<(&str, Spec<'_>), LdifError> {
    let Some((name, rest)) = line.text.split_once(':') else {
        return Err(LdifError::new(
            line.number,
            format!(
                "expected `attribute: value`, found {:?}",
                shorten(&line.text)
            ),
        ));
    };
    if !valid_name(name) {
        return Err(LdifError::new(
            line.number,
            format!("invalid attribute name {:?}", shorten(name)),
        ));
    }
    let spec = if let Some(b64) = rest.strip_prefix(':') {
        Spec::Base64(b64.trim_matches(' '))
    } else if rest.starts_with('<') {
        Spec::Url
    } else {
        Spec::Text(rest.trim_start_matches(' '))
    };
    Ok((name, spec))
}

fn value_of(line: &Line, name: &str, spec: Spec<'_>) -> Result<String, LdifError> {
    match spec {
        Spec::Text(text) => Ok(text.to_owned()),
        Spec::Base64(b64) => {
            let bytes = LENIENT_BASE64.decode(b64).map_err(|err| {
                LdifError::new(
                    line.number,
                    format!("invalid base64 value of {name}: {err}"),
                )
            })?;
            String::from_utf8(bytes).map_err(|_| {
                LdifError::new(
                    line.number,
                    format!("the base64 value of {name} is not UTF-8 text"),
                )
            })
        }
        Spec::Url => Err(LdifError::new(
            line.number,
            format!("URL values (`{name}:<`) are not supported; put the value in the file"),
        )),
    }
}

/// Some exporters leave out the `=` padding; the value is no less clear.
const LENIENT_BASE64: GeneralPurpose = GeneralPurpose::new(
    &alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// An attribute description: a name or OID, then `;option`s (AD's range
/// option `range=0-*` brings `=` and `*` along).
fn valid_name(name: &str) -> bool {
    name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | ';' | '=' | '*'))
}

/// Enough of a bad line to recognise it, without flooding the message.
fn shorten(text: &str) -> String {
    const MAX: usize = 60;
    match text.char_indices().nth(MAX) {
        Some((at, _)) => format!("{}...", &text[..at]),
        None => text.to_owned(),
    }
}

/// Writes records as an LDIF content file: `version: 1`, then each record
/// after a blank line. Attribute names are written as given and must be
/// valid attribute descriptions.
pub fn write<'a>(records: impl IntoIterator<Item = &'a Record>) -> String {
    let mut out = String::from("version: 1\n");
    for record in records {
        out.push('\n');
        write_value(&mut out, "dn", &record.dn);
        for (attr, value) in &record.attrs {
            write_value(&mut out, attr, value);
        }
    }
    out
}

/// Appends one `attr: value` line, or `attr:: base64` when the value is not
/// an RFC 2849 SAFE-STRING (so that it reads back byte for byte).
pub fn write_value(out: &mut String, attr: &str, value: &str) {
    out.push_str(attr);
    if is_safe_string(value) {
        out.push(':');
        if !value.is_empty() {
            out.push(' ');
            out.push_str(value);
        }
    } else {
        out.push_str(":: ");
        out.push_str(&STANDARD.encode(value));
    }
    out.push('\n');
}

/// RFC 2849 SAFE-STRING, and no trailing space (which readers may strip)
/// and no other control character either: a tab or an escape sequence
/// printed raw is still a value an operator reading the plan can't see.
fn is_safe_string(value: &str) -> bool {
    let safe_char = |b: u8| matches!(b, 0x20..=0x7E);
    let bytes = value.as_bytes();
    match (bytes.first(), bytes.last()) {
        (None, _) | (_, None) => true,
        (Some(first), Some(last)) => {
            !matches!(first, b' ' | b':' | b'<')
                && *last != b' '
                && bytes.iter().all(|&b| safe_char(b))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn rec(dn: &str, attrs: &[(&str, &str)]) -> Record {
        Record {
            dn: dn.to_owned(),
            attrs: attrs
                .iter()
                .map(|(a, v)| ((*a).to_owned(), (*v).to_owned()))
                .collect(),
        }
    }

    fn parse_ok(text: &str) -> Vec<Record> {
        parse(text).expect("valid LDIF")
    }

    fn parse_err(text: &str) -> LdifError {
        match parse(text) {
            Ok(records) => panic!("expected an error, parsed {records:?}"),
            Err(err) => err,
        }
    }

    #[test]
    fn plain_records_in_file_order() {
        let text = "version: 1\n\
                    dn: OU=Groups,DC=ad\n\
                    objectClass: organizationalUnit\n\
                    \n\
                    \n\
                    dn: CN=g1,OU=Groups,DC=ad\n\
                    objectClass: top\n\
                    objectClass: group\n\
                    member;range=0-*: CN=h1,DC=ad\n\
                    sAMAccountName:   g1\n";
        assert_eq!(
            parse_ok(text),
            vec![
                rec("OU=Groups,DC=ad", &[("objectClass", "organizationalUnit")]),
                rec(
                    "CN=g1,OU=Groups,DC=ad",
                    &[
                        ("objectClass", "top"),
                        ("objectClass", "group"),
                        ("member;range=0-*", "CN=h1,DC=ad"),
                        ("sAMAccountName", "g1"),
                    ]
                ),
            ]
        );
    }

    #[test]
    fn version_line_is_optional_and_must_be_one() {
        let records = parse_ok("dn: CN=a\ncn: a\n");
        assert_eq!(records, vec![rec("CN=a", &[("cn", "a")])]);
        assert_eq!(
            parse_ok("# header\n\nversion: 1\n\ndn: CN=a\ncn: a\n"),
            records
        );
        assert_eq!(parse_ok("version: 1\ndn: CN=a\ncn: a\n"), records);
        assert!(parse_ok("version: 1\n").is_empty());
        assert!(parse_ok("").is_empty());
        let err = parse_err("\nversion: 2\ndn: CN=a\n");
        assert_eq!(err.line, 2);
        assert!(err.what.contains("version"), "{err}");
    }

    #[test]
    fn folded_lines_join_without_the_leading_space() {
        let text = "dn: CN=a very long name,\n OU=Groups,DC=ad\ndescription: one\n  two\n three\n";
        assert_eq!(
            parse_ok(text),
            vec![rec(
                "CN=a very long name,OU=Groups,DC=ad",
                &[("description", "one twothree")]
            )]
        );
        // The name itself may be folded too.
        assert_eq!(
            parse_ok("dn: x\nsAMAcc\n ountName: g\n"),
            vec![rec("x", &[("sAMAccountName", "g")])]
        );
    }

    #[test]
    fn comments_and_their_continuations_are_dropped() {
        let text = "# leading comment\n\
                    #  folded onto\n  more comment: not an attribute\n\
                    dn: CN=a\n\
                    # a comment inside a record\n continued\n\
                    cn: a\n \
                    b\n";
        assert_eq!(parse_ok(text), vec![rec("CN=a", &[("cn", "ab")])]);
    }

    #[test]
    fn base64_values_and_dns() {
        // "CN=Zoë,DC=ad" and " lead", plus an unpadded value.
        let text = "dn:: Q049Wm/DqyxEQz1hZA==\ndescription:: IGxlYWQ=\nx:: YWI\ny::\n";
        assert_eq!(
            parse_ok(text),
            vec![rec(
                "CN=Zoë,DC=ad",
                &[("description", " lead"), ("x", "ab"), ("y", "")]
            )]
        );
    }

    #[test]
    fn crlf_line_ends() {
        let text = "version: 1\r\n\r\ndn: CN=a\r\ncn: a\r\n b\r\n\r\ndn: CN=b\r\ncn: b\r\n";
        assert_eq!(
            parse_ok(text),
            vec![rec("CN=a", &[("cn", "ab")]), rec("CN=b", &[("cn", "b")])]
        );
    }

    #[test]
    fn empty_values_and_a_byte_order_mark() {
        assert_eq!(
            parse_ok("\u{feff}dn:\ncn:\nsn: \n"),
            vec![rec("", &[("cn", ""), ("sn", "")])]
        );
    }

    #[test]
    fn errors_name_the_line() {
        let cases: &[(&str, usize, &str)] = &[
            (" x\ndn: a\n", 1, "continuation"),
            ("dn: a\n\n continued\n", 3, "continuation"),
            (
                "dn: a\ncn: a\nno colon here\n",
                3,
                "expected `attribute: value`",
            ),
            ("dn: a\nc n: a\n", 2, "invalid attribute name"),
            ("cn: a\n", 1, "must start with `dn:`"),
            ("dn: a\ncn: a\n\n# c\ncn: b\n", 5, "must start with `dn:`"),
            ("dn: a\njpegPhoto:< file:///tmp/x\n", 2, "URL values"),
            ("dn:< file:///x\n", 1, "URL values"),
            ("dn: a\ncn:: !!!\n", 2, "invalid base64"),
            ("dn: a\ncn:: /w==\n", 2, "not UTF-8"),
            (
                "dn: a\nchangetype: modify\nadd: member\n",
                2,
                "change record",
            ),
            (
                "dn: a\ncontrol: 1.2.3\nchangetype: add\n",
                2,
                "change record",
            ),
            ("dn: a\ncn: a\ndn: b\n", 3, "second `dn:`"),
            (
                "version: 1\r\n\r\ndn: a\r\ncn: a\r\n b\r\nbad\r\n",
                6,
                "expected",
            ),
        ];
        for (text, line, what) in cases {
            let err = parse_err(text);
            assert_eq!(err.line, *line, "{text:?}: {err}");
            assert!(err.what.contains(what), "{text:?}: {err}");
            assert!(
                err.to_string().starts_with(&format!("line {line}: ")),
                "{err}"
            );
        }
    }

    #[test]
    fn records_are_numbered_by_their_dn_line() {
        let text = "version: 1\n\n# first\ndn: a\ncn: a\n\n\ndn:: Yg==\nmember: x\n";
        let numbered = parse_numbered(text).expect("valid");
        let lines: Vec<(usize, &str)> = numbered.iter().map(|(n, r)| (*n, r.dn.as_str())).collect();
        assert_eq!(lines, [(4, "a"), (8, "b")]);
    }

    #[test]
    fn writer_uses_base64_exactly_when_the_value_is_not_safe() {
        let line = |value: &str| {
            let mut out = String::new();
            write_value(&mut out, "cn", value);
            out
        };
        assert_eq!(line("plain value"), "cn: plain value\n");
        assert_eq!(line("a:b<c#"), "cn: a:b<c#\n");
        assert_eq!(line(""), "cn:\n");
        for unsafe_value in [
            " lead",
            "trail ",
            ":x",
            "<x",
            "a\nb",
            "a\rb",
            "a\0b",
            "Zoë",
            "a\tb",
            "\u{1b}[2J",
            "a\u{7f}",
        ] {
            let out = line(unsafe_value);
            let b64 = out
                .strip_prefix("cn:: ")
                .and_then(|s| s.strip_suffix('\n'))
                .expect("base64 line");
            assert_eq!(
                STANDARD.decode(b64).expect("base64"),
                unsafe_value.as_bytes()
            );
        }
    }

    #[test]
    fn write_layout() {
        let records = vec![
            rec("CN=a,DC=ad", &[("cn", "a"), ("member", "CN=h,DC=ad")]),
            rec("CN=é", &[]),
        ];
        assert_eq!(
            write(&records),
            "version: 1\n\ndn: CN=a,DC=ad\ncn: a\nmember: CN=h,DC=ad\n\ndn:: Q049w6k=\n"
        );
    }

    fn attr_name() -> impl Strategy<Value = String> {
        "[a-zA-Z][a-zA-Z0-9-]{0,8}(;[a-zA-Z0-9=*-]{1,8})?"
            .prop_filter("reserved in a record", |n| {
                !n.eq_ignore_ascii_case("dn") && !n.eq_ignore_ascii_case("changetype")
            })
    }

    fn value() -> impl Strategy<Value = String> {
        prop_oneof![".*", "[ :<#a-z\\r\\n\\x00]{0,6}", any::<String>()]
    }

    fn record() -> impl Strategy<Value = Record> {
        (
            value(),
            proptest::collection::vec((attr_name(), value()), 0..6),
        )
            .prop_map(|(dn, attrs)| Record { dn, attrs })
    }

    proptest! {
        #[test]
        fn parse_reads_back_what_write_wrote(records in proptest::collection::vec(record(), 0..5)) {
            let text = write(&records);
            prop_assert_eq!(parse(&text), Ok(records));
        }

        #[test]
        fn crlf_reads_like_lf(records in proptest::collection::vec(record(), 0..4)) {
            let text = write(&records).replace('\n', "\r\n");
            prop_assert_eq!(parse(&text), Ok(records));
        }
    }
}

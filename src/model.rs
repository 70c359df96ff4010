//! The vocabulary of the product: proids, host names, distinguished names,
//! the group-name pattern and the partition glob.
//!
//! These newtypes carry the comparison rules so that no other module has
//! to remember them: a [`Dn`] compares in normalised form
//! but prints as it was spelled, a [`GroupPattern`] matches case-insensitively,
//! a [`HostName`] can never name a path outside its directory.
//!
//! Names from the tree end up in LDIF output, comments and logs, where a
//! line break or a terminal escape would let whoever named a file write a
//! line of their own. So the rule about control characters lives here too
//! ([`is_control`], [`escape_controls`]): names that hold one are refused
//! where they are made, and text quoted for people is escaped.

use std::borrow::Cow;
use std::cmp::Ordering;
use std::fmt::{self, Write as _};
use std::hash::{BuildHasher, Hash, Hasher, RandomState};
use std::sync::{Arc, OnceLock};

use thiserror::Error;

/// A problem with a value given by the operator or found in the inputs.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ModelError {
    /// A DN that does not follow RFC 4514.
    #[error("invalid DN {dn:?}: {why}")]
    Dn {
        /// The DN as given.
        dn: String,
        /// What is wrong with it.
        why: &'static str,
    },
    /// A group pattern without exactly one `{}`.
    #[error(
        "invalid group pattern {0:?}: it must contain `{{}}` exactly once and no other braces"
    )]
    GroupPattern(String),
    /// A partition glob that does not parse.
    #[error("invalid partition glob {glob:?}: {why}")]
    Partition {
        /// The glob as given.
        glob: String,
        /// What is wrong with it.
        why: String,
    },
    /// A host name that is not a plain file name.
    #[error("invalid host name {0:?}: must be a plain file name")]
    HostName(String),
    /// A name or value from outside holding a control character.
    #[error("{what} {value:?} contains a control character ({})", code_point(*found))]
    Control {
        /// What the text is (`host name`, `instance name`, ...).
        what: &'static str,
        /// The text as given (printed escaped).
        value: String,
        /// The first control character in it.
        found: char,
    },
    /// An instance name without a proid before its first `.`.
    #[error("not a placement: no proid")]
    NoProid,
}

/// True for the characters refused in names and server values as control
/// characters: below U+0020, and U+007F. None of them belongs in a name or
/// a server value, and each can break a line or drive a terminal.
pub fn is_control(c: char) -> bool {
    c < ' ' || c == '\u{7f}'
}

/// `Err` naming `what` and the first control character in `value`, if any.
pub fn reject_controls(what: &'static str, value: &str) -> Result<(), ModelError> {
    match value.chars().find(|&c| is_control(c)) {
        None => Ok(()),
        Some(found) => Err(ModelError::Control {
            what,
            value: value.to_owned(),
            found,
        }),
    }
}

/// `U+000A`: how messages name a character.
fn code_point(c: char) -> String {
    format!("U+{:04X}", u32::from(c))
}

/// True for what [`escape_controls`] escapes: control characters in the
/// wider Unicode sense (C0, DEL and C1, where U+0085 is a line break and
/// U+009B starts a terminal sequence) and the Unicode line and paragraph
/// separators.
fn needs_escape(c: char) -> bool {
    c.is_control() || c == '\u{2028}' || c == '\u{2029}'
}

/// `text` with every character that could start a new line or drive a
/// terminal written as an escape (`\n`, `\r`, `\t`, `\u{1b}`), for text
/// quoted in comments and logs. Text without one is returned as it is.
pub fn escape_controls(text: &str) -> Cow<'_, str> {
    if !text.chars().any(needs_escape) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        match c {
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if needs_escape(c) => {
                let _ = write!(out, "\\u{{{:x}}}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

/// A service account name: the part of an instance name before the first `.`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Proid(Arc<str>);

impl Proid {
    /// Wraps a proid name as given (for example on the command line);
    /// `None` for an empty name or one with a `.`, `/` or control character.
    pub fn new(name: &str) -> Option<Self> {
        Proid::is_valid(name).then(|| Proid(name.into()))
    }

    /// The proid of an instance name `<proid>.<app>#<id>`, or `None` when the
    /// name is not a placement ([`Proid::of_instance`] says why).
    pub fn from_instance(instance: &str) -> Option<Self> {
        Proid::name_in(instance).map(|name| Proid(name.into()))
    }

    /// The proid part of an instance name, as [`Proid::from_instance`] reads
    /// it, without making a `Proid` of it: the tree scan and the index look
    /// at hundreds of thousands of instance names.
    pub fn name_in(instance: &str) -> Option<&str> {
        Proid::of_instance(instance).ok()
    }

    /// The proid part of an instance name, or why the name is not a
    /// placement: it holds a control character (anywhere: the whole name
    /// is quoted in warnings and comments), or has no proid.
    pub fn of_instance(instance: &str) -> Result<&str, ModelError> {
        reject_controls("instance name", instance)?;
        match instance.split_once('.') {
            Some((proid, _)) if Proid::is_valid(proid) => Ok(proid),
            _ => Err(ModelError::NoProid),
        }
    }

    fn is_valid(name: &str) -> bool {
        !name.is_empty() && !name.contains(['.', '/']) && !name.chars().any(is_control)
    }

    /// The name as spelled.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The key under which proids are matched with groups: AD compares
    /// account names without regard to case.
    pub fn key(&self) -> String {
        self.0.to_lowercase()
    }
}

/// Maps keyed by proid can be searched with the name alone: a `Proid`
/// hashes and compares as its name does.
impl std::borrow::Borrow<str> for Proid {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Proid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A host name taken from a directory entry: a plain file name that cannot
/// address anything outside the directory it came from.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct HostName(Arc<str>);

impl HostName {
    /// Accepts a plain, non-empty file name that is not `.` or `..` and has
    /// no `/` and no control character.
    pub fn new(name: &str) -> Result<Self, ModelError> {
        if name.is_empty() || name == "." || name == ".." || name.contains('/') {
            return Err(ModelError::HostName(name.to_owned()));
        }
        reject_controls("host name", name)?;
        Ok(HostName(name.into()))
    }

    /// The name as spelled.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for HostName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Why `authority` is not `HOST[:PORT]`, if it is not: the one check of a
/// server's address, for `--ldap-url`, `--check-ldap-url` and `nt.dc`.
/// HOST is a DNS name (labels of 1 to 63 letters, digits, `-` or `_`, at
/// most 253 characters, a final dot allowed), an IPv4 address, or an IPv6
/// address in brackets; PORT is a number from 1 to 65535. The answer never
/// quotes the value: a mistyped one may hold a password.
pub fn host_port_problem(authority: &str) -> Option<&'static str> {
    if authority.contains('@') {
        return Some("it holds userinfo (user:password@), which is refused");
    }
    let (host, port) = if let Some(rest) = authority.strip_prefix('[') {
        let Some((inside, after)) = rest.split_once(']') else {
            return Some("an IPv6 address opened with [ is not closed with ]");
        };
        if inside.parse::<std::net::Ipv6Addr>().is_err() {
            return Some("the address in brackets is not an IPv6 address");
        }
        match after {
            "" => (None, None),
            _ => match after.strip_prefix(':') {
                Some(port) => (None, Some(port)),
                None => return Some("only :PORT may follow an IPv6 address in brackets"),
            },
        }
    } else {
        match authority.split_once(':') {
            Some((host, port)) => (Some(host), Some(port)),
            None => (Some(authority), None),
        }
    };
    if let Some(host) = host {
        if host.is_empty() {
            return Some("no host is named");
        }
        if host.len() > 253 {
            return Some("the host name is longer than 253 characters");
        }
        let labels: Vec<&str> = host.strip_suffix('.').unwrap_or(host).split('.').collect();
        if labels.iter().any(|label| label.is_empty()) {
            return Some("the host name has an empty label (two dots, or a leading dot)");
        }
        if labels.iter().any(|label| label.len() > 63) {
            return Some("a label of the host name is longer than 63 characters");
        }
        if !labels.iter().all(|label| {
            label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        }) {
            return Some("the host is not a host name (letters, digits, -, _ and dots), an IPv4 address or an [IPv6] address");
        }
    }
    if let Some(port) = port {
        let number =
            (!port.is_empty() && port.len() <= 5 && port.bytes().all(|b| b.is_ascii_digit()))
                .then(|| port.parse::<u32>().ok())
                .flatten();
        if !matches!(number, Some(1..=65535)) {
            return Some("the port is not a number from 1 to 65535");
        }
    }
    None
}

/// A distinguished name: compared, ordered and hashed in normalised form,
/// displayed exactly as it was spelled. Cloning is cheap.
///
/// The hash of the normalised form is taken once, when the DN is made: the
/// plan looks every member of a changed group up in the index's hash maps,
/// thousands of lookups per pass for a large group, and each would
/// otherwise hash the whole string again.
#[derive(Clone)]
pub struct Dn(Arc<DnInner>);

struct DnInner {
    raw: Box<str>,
    norm: Box<str>,
    /// [`norm_hash`] of `norm`.
    hash: u64,
}

/// The hash of a normalised DN, keyed at random once per process as the
/// standard maps are: names in the tree and the directory come from outside,
/// and must not be able to choose their collisions.
fn norm_hash(norm: &str) -> u64 {
    static KEYS: OnceLock<RandomState> = OnceLock::new();
    KEYS.get_or_init(RandomState::new).hash_one(norm)
}

impl Dn {
    /// Parses an RFC 4514 string. The spelling is kept for output.
    pub fn parse(raw: &str) -> Result<Self, ModelError> {
        let norm = normalise_dn(raw).map_err(|why| ModelError::Dn {
            dn: raw.to_owned(),
            why,
        })?;
        Ok(Dn(Arc::new(DnInner {
            raw: raw.into(),
            hash: norm_hash(&norm),
            norm: norm.into(),
        })))
    }

    /// The DN as spelled by whoever wrote it.
    pub fn as_str(&self) -> &str {
        &self.0.raw
    }

    /// The normalised form used for comparisons.
    pub fn normalised(&self) -> &str {
        &self.0.norm
    }

    /// True when `self` is `base` or lies below it.
    pub fn is_within(&self, base: &Dn) -> bool {
        let (me, base) = (self.normalised(), base.normalised());
        base.is_empty()
            || me == base
            || (me.len() > base.len()
                && me.ends_with(base)
                && me.as_bytes()[me.len() - base.len() - 1] == b',')
    }

    /// Builds `<attr>=<value>,<parent>`, escaping the value per RFC 4514.
    pub fn child(attr: &str, value: &str, parent: &Dn) -> Dn {
        let rdn = format!("{attr}={}", escape_dn_value(value));
        // A root may be spelled with spaces only; nothing may follow the
        // comma then.
        let raw = if parent.normalised().is_empty() {
            rdn
        } else {
            format!("{rdn},{}", parent.as_str())
        };
        match Dn::parse(&raw) {
            Ok(dn) => dn,
            Err(err) => panic!("BUG: an escaped RDN over a valid parent must parse: {err}"),
        }
    }
}

impl PartialEq for Dn {
    fn eq(&self, other: &Self) -> bool {
        // One DN shared (a DnCache's) is equal at once; two with different
        // hashes differ without a look at their strings.
        Arc::ptr_eq(&self.0, &other.0)
            || (self.0.hash == other.0.hash && self.0.norm == other.0.norm)
    }
}

impl Eq for Dn {}

impl Hash for Dn {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write_u64(self.0.hash)
    }
}

/// A map keyed by DN that takes each DN's own hash as it is.
pub type DnMap<V> = std::collections::HashMap<Dn, V, DnHash>;

/// The hashers of a [`DnMap`]. A DN's hash is taken once, keyed at random
/// per process, when the DN is made; hashing it again, as
/// the standard maps do, would cost more than the lookup itself, and adds
/// nothing to what names from outside can do.
#[derive(Debug, Clone, Copy, Default)]
pub struct DnHash;

impl BuildHasher for DnHash {
    type Hasher = DnHasher;

    fn build_hasher(&self) -> DnHasher {
        DnHasher(0)
    }
}

/// The hasher of a [`DnMap`]: a [`Dn`] writes one `u64`, which it keeps.
#[derive(Debug, Clone, Copy, Default)]
pub struct DnHasher(u64);

impl Hasher for DnHasher {
    fn write_u64(&mut self, hash: u64) {
        self.0 = hash;
    }

    /// Only DNs are the keys of a [`DnMap`], and they write one `u64`;
    /// other bytes are folded in all the same, with SipHash's keys.
    fn write(&mut self, bytes: &[u8]) {
        static KEYS: OnceLock<RandomState> = OnceLock::new();
        self.0 ^= KEYS.get_or_init(RandomState::new).hash_one(bytes);
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

impl PartialOrd for Dn {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Dn {
    fn cmp(&self, other: &Self) -> Ordering {
        if Arc::ptr_eq(&self.0, &other.0) {
            return Ordering::Equal;
        }
        self.0.norm.cmp(&other.0.norm)
    }
}

impl fmt::Display for Dn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0.raw)
    }
}

impl fmt::Debug for Dn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Dn({:?})", self.as_str())
    }
}

/// Characters that RFC 4514 requires to be escaped anywhere in a value.
const DN_SPECIALS: &[char] = &['"', '+', ',', ';', '<', '>', '\\', '='];

/// Escapes an attribute value for use in a DN string (RFC 4514 section 2.4).
pub fn escape_dn_value(value: &str) -> String {
    let mut out = String::with_capacity(value.len() + 4);
    push_escaped(&mut out, value);
    out
}

/// [`escape_dn_value`], appended to `out`.
fn push_escaped(out: &mut String, value: &str) {
    let last = value.chars().count().saturating_sub(1);
    for (i, c) in value.chars().enumerate() {
        match c {
            '\0' => out.push_str("\\00"),
            ' ' if i == 0 || i == last => out.push_str("\\ "),
            '#' if i == 0 => out.push_str("\\#"),
            c if DN_SPECIALS.contains(&c) => {
                out.push('\\');
                out.push(c);
            }
            c => out.push(c),
        }
    }
}

/// Parses DNs, handing out one shared [`Dn`] per spelling. At cluster scale
/// a host is a member of many groups (175,000 member values name 10,000
/// hosts): reading every group through one cache normalises each spelling
/// once and keeps one copy of it.
#[derive(Debug, Default)]
pub struct DnCache {
    seen: std::collections::HashMap<Box<str>, Dn>,
}

impl DnCache {
    /// [`Dn::parse`], or the `Dn` this cache already made for `raw`.
    pub fn parse(&mut self, raw: &str) -> Result<Dn, ModelError> {
        if let Some(dn) = self.seen.get(raw) {
            return Ok(dn.clone());
        }
        let dn = Dn::parse(raw)?;
        self.seen.insert(raw.into(), dn.clone());
        Ok(dn)
    }
}

/// Escapes a value for use inside an LDAP search filter (RFC 4515 section 3).
pub fn escape_filter_value(value: &str) -> String {
    let mut out = String::with_capacity(value.len() + 4);
    for c in value.chars() {
        match c {
            '*' => out.push_str("\\2a"),
            '(' => out.push_str("\\28"),
            ')' => out.push_str("\\29"),
            '\\' => out.push_str("\\5c"),
            '\0' => out.push_str("\\00"),
            c => out.push(c),
        }
    }
    out
}

/// Normalises a DN: attribute types and values lower-cased, insignificant
/// spaces dropped, escapes decoded and then re-encoded in one canonical way,
/// and the parts of a multi-valued RDN sorted.
///
/// Every group member and host DN goes through here (hundreds of thousands
/// at cluster scale), so the result is written into one string as the DN is
/// read, with one reused buffer for decoded values.
fn normalise_dn(raw: &str) -> Result<String, &'static str> {
    let mut out = String::with_capacity(raw.len());
    let mut parser = DnParser {
        chars: raw.chars().collect(),
        pos: 0,
    };
    if parser.skip_spaces() {
        return Ok(out);
    }
    let mut value = Vec::new();
    // Where the current RDN starts in `out`, and where each of its
    // attribute-value pairs does.
    let mut rdn_start = 0;
    let mut avas: Vec<usize> = Vec::new();
    loop {
        avas.push(out.len());
        parser.attribute_type(&mut out)?;
        out.push('=');
        parser.attribute_value(&mut value)?;
        let value = std::str::from_utf8(&value).map_err(|_| "escaped bytes are not UTF-8")?;
        if value.is_ascii() {
            // Lower-casing keeps an ASCII value's length: escape as we go.
            let start = out.len();
            push_escaped(&mut out, value);
            out[start..].make_ascii_lowercase();
        } else {
            push_escaped(&mut out, &value.to_lowercase());
        }
        let separator = parser.next();
        match separator {
            Some('+') => out.push('+'),
            None | Some(',') | Some(';') => {
                if avas.len() > 1 {
                    sort_avas(&mut out, rdn_start, &avas);
                }
                avas.clear();
                if separator.is_none() {
                    break;
                }
                out.push(',');
                rdn_start = out.len();
            }
            Some(_) => return Err("unexpected character after a value"),
        }
        if parser.skip_spaces() {
            return Err("a separator must be followed by an attribute");
        }
    }
    Ok(out)
}

/// Sorts the attribute-value pairs of the multi-valued RDN that ends `out`;
/// `starts` holds where each pair starts (the first at `rdn_start`).
fn sort_avas(out: &mut String, rdn_start: usize, starts: &[usize]) {
    let ends = starts[1..].iter().map(|s| s - 1).chain([out.len()]);
    let mut avas: Vec<String> = starts
        .iter()
        .zip(ends)
        .map(|(&start, end)| out[start..end].to_owned())
        .collect();
    avas.sort();
    out.truncate(rdn_start);
    out.push_str(&avas.join("+"));
}

struct DnParser {
    chars: Vec<char>,
    pos: usize,
}

impl DnParser {
    fn peek(&self) -> Option<char> {
        self.chars.get(self.pos).copied()
    }

    fn next(&mut self) -> Option<char> {
        let c = self.peek()?;
        self.pos += 1;
        Some(c)
    }

    /// Skips spaces; true when the input is exhausted.
    fn skip_spaces(&mut self) -> bool {
        while self.peek() == Some(' ') {
            self.pos += 1;
        }
        self.peek().is_none()
    }

    /// Reads an attribute type and its `=`, appending it lower-cased to `out`.
    fn attribute_type(&mut self, out: &mut String) -> Result<(), &'static str> {
        self.skip_spaces();
        let start = out.len();
        while let Some(c) = self.peek() {
            if c == '=' {
                break;
            }
            if !(c.is_ascii_alphanumeric() || c == '-' || c == '.') {
                if c == ' ' {
                    self.skip_spaces();
                    if self.peek() == Some('=') {
                        break;
                    }
                }
                return Err("attribute type must be letters, digits, '-' or an OID");
            }
            out.push(c.to_ascii_lowercase());
            self.pos += 1;
        }
        if self.next() != Some('=') {
            return Err("attribute without '='");
        }
        if out.len() == start {
            return Err("empty attribute type");
        }
        Ok(())
    }

    /// Reads a value up to an unescaped separator into `bytes` (cleared
    /// first), decoding escapes and dropping unescaped leading and trailing
    /// spaces.
    fn attribute_value(&mut self, bytes: &mut Vec<u8>) -> Result<(), &'static str> {
        bytes.clear();
        self.skip_spaces();
        if self.peek() == Some('"') {
            return self.quoted_value(bytes);
        }
        // Length of `bytes` up to the last character that was escaped or not a space.
        let mut significant = 0;
        while let Some(c) = self.peek() {
            match c {
                ',' | ';' | '+' => break,
                '\\' => {
                    self.pos += 1;
                    match self.next() {
                        None => return Err("trailing backslash"),
                        Some(h) if h.is_ascii_hexdigit() => {
                            let l = self.next().filter(char::is_ascii_hexdigit);
                            let Some(l) = l else {
                                return Err("a hex escape needs two hex digits");
                            };
                            let byte = (hex_digit(h) << 4) | hex_digit(l);
                            bytes.push(byte);
                        }
                        Some(e) if e == ' ' || e == '#' || DN_SPECIALS.contains(&e) => {
                            push_char(bytes, e);
                        }
                        Some(_) => return Err("invalid escape"),
                    }
                    significant = bytes.len();
                }
                _ => {
                    self.pos += 1;
                    push_char(bytes, c);
                    if c != ' ' {
                        significant = bytes.len();
                    }
                }
            }
        }
        bytes.truncate(significant);
        Ok(())
    }

    fn quoted_value(&mut self, bytes: &mut Vec<u8>) -> Result<(), &'static str> {
        self.pos += 1;
        loop {
            match self.next() {
                None => return Err("unterminated quoted value"),
                Some('"') => break,
                Some('\\') => match self.next() {
                    Some(c) => push_char(bytes, c),
                    None => return Err("trailing backslash"),
                },
                Some(c) => push_char(bytes, c),
            }
        }
        self.skip_spaces();
        Ok(())
    }
}

fn push_char(bytes: &mut Vec<u8>, c: char) {
    let mut buf = [0u8; 4];
    bytes.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
}

fn hex_digit(c: char) -> u8 {
    c.to_digit(16).map_or(0, |d| d as u8)
}

/// The name pattern of the proids' groups: a text with exactly one `{}`
/// standing for the proid, matched against `sAMAccountName` without regard
/// to case.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupPattern {
    prefix: String,
    suffix: String,
}

impl GroupPattern {
    /// Parses a pattern such as `{}-gmsa-hosts`.
    pub fn parse(pattern: &str) -> Result<Self, ModelError> {
        let err = || ModelError::GroupPattern(pattern.to_owned());
        let (prefix, suffix) = pattern.split_once("{}").ok_or_else(err)?;
        if prefix.contains(['{', '}']) || suffix.contains(['{', '}']) {
            return Err(err());
        }
        Ok(GroupPattern {
            prefix: prefix.to_owned(),
            suffix: suffix.to_owned(),
        })
    }

    /// The group's account name for a proid.
    pub fn render(&self, proid: &Proid) -> String {
        format!("{}{}{}", self.prefix, proid, self.suffix)
    }

    /// The proid whose group this account name is, spelled as in the name.
    pub fn proid_of(&self, sam_account_name: &str) -> Option<Proid> {
        let name = sam_account_name;
        let (p, s) = (self.prefix.len(), self.suffix.len());
        if name.len() <= p + s
            || !name.is_char_boundary(p)
            || !name.is_char_boundary(name.len() - s)
        {
            return None;
        }
        let (head, rest) = name.split_at(p);
        let (middle, tail) = rest.split_at(rest.len() - s);
        if head.to_lowercase() == self.prefix.to_lowercase()
            && tail.to_lowercase() == self.suffix.to_lowercase()
        {
            Proid::new(middle)
        } else {
            None
        }
    }
}

impl fmt::Display for GroupPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{{}}{}", self.prefix, self.suffix)
    }
}

/// A shell-style glob (`*`, `?`, `[...]`) over partition names.
#[derive(Debug, Clone)]
pub struct PartitionGlob(glob::Pattern);

impl PartitionGlob {
    /// Parses a glob.
    pub fn parse(glob: &str) -> Result<Self, ModelError> {
        glob::Pattern::new(glob)
            .map(PartitionGlob)
            .map_err(|e| ModelError::Partition {
                glob: glob.to_owned(),
                why: e.msg.to_owned(),
            })
    }

    /// True when the partition name matches.
    pub fn matches(&self, partition: &str) -> bool {
        self.0.matches(partition)
    }
}

impl Default for PartitionGlob {
    fn default() -> Self {
        match PartitionGlob::parse("*") {
            Ok(glob) => glob,
            Err(err) => panic!("BUG: `*` is a valid glob: {err}"),
        }
    }
}

impl fmt::Display for PartitionGlob {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dn(s: &str) -> Dn {
        Dn::parse(s).expect("valid DN")
    }

    #[test]
    fn dn_spellings_that_must_compare_equal() {
        let base = dn("CN=server1,OU=Hosts,DC=ad,DC=com");
        for other in [
            "cn=server1,ou=hosts,dc=AD,dc=COM",
            "CN = server1 , OU=Hosts ,DC=ad,DC=com",
            "  CN=server1,OU=Hosts,DC=ad,DC=com  ",
            "CN=\\73erver1,OU=Hosts,DC=ad,DC=com",
            "cn=SERVER1;ou=hosts;dc=ad;dc=com",
            "CN=\"server1\",OU=Hosts,DC=ad,DC=com",
        ] {
            assert_eq!(dn(other), base, "{other}");
        }
        assert_eq!(dn(" cn = server1 ").as_str(), " cn = server1 ");
    }

    #[test]
    fn a_dn_map_finds_every_spelling_of_a_dn_and_only_it() {
        let mut map: DnMap<u32> = DnMap::default();
        map.insert(dn("CN=server1,OU=Hosts,DC=ad,DC=com"), 1);
        map.insert(dn("CN=server2,OU=Hosts,DC=ad,DC=com"), 2);
        assert_eq!(map.get(&dn("cn=SERVER1;ou=hosts;dc=ad;dc=com")), Some(&1));
        assert_eq!(
            map.get(&dn(r"CN=\73erver2,OU=Hosts,DC=ad,DC=com")),
            Some(&2)
        );
        assert_eq!(map.get(&dn("CN=server3,OU=Hosts,DC=ad,DC=com")), None);
        // The hash a map uses is the one the DN was made with.
        let one = dn("CN=server1,OU=Hosts,DC=ad,DC=com");
        assert_eq!(
            DnHash.hash_one(&one),
            DnHash.hash_one(dn(" cn=server1,ou=hosts,dc=ad,dc=com"))
        );
        assert_ne!(
            DnHash.hash_one(&one),
            DnHash.hash_one(dn("CN=server2,OU=Hosts,DC=ad,DC=com"))
        );
    }

    #[test]
    fn escaped_comma_forms_are_equal_and_differ_from_a_separator() {
        let a = dn("CN=Smith\\, John,OU=Users,DC=ad");
        let b = dn("CN=Smith\\2C John,OU=Users,DC=ad");
        let c = dn("CN=smith\\2c john,ou=users,dc=AD");
        assert_eq!(a, b);
        assert_eq!(a, c);
        assert_ne!(a, dn("CN=Smith,CN=John,OU=Users,DC=ad"));
        assert_eq!(a.normalised(), "cn=smith\\, john,ou=users,dc=ad");
    }

    #[test]
    fn escaped_spaces_are_significant() {
        assert_ne!(dn("CN=a\\ ,DC=x"), dn("CN=a,DC=x"));
        assert_eq!(dn("CN=\\ a,DC=x"), dn("CN=\\20a,DC=x"));
    }

    #[test]
    fn multi_valued_rdns_compare_in_any_order() {
        assert_eq!(dn("CN=a+UID=b,DC=x"), dn("uid=B + cn=A,dc=x"));
        assert_eq!(
            dn("UID=B + CN=A,OU=X+CN=Z\\+Y,DC=x").normalised(),
            "cn=a+uid=b,cn=z\\+y+ou=x,dc=x"
        );
    }

    #[test]
    fn a_dn_cache_shares_one_dn_per_spelling() {
        let mut cache = DnCache::default();
        let a = cache.parse("CN=h1,DC=ad").expect("dn");
        let b = cache.parse("CN=h1,DC=ad").expect("dn");
        assert!(std::ptr::eq(a.as_str(), b.as_str()), "one copy");
        let c = cache.parse("cn=H1,dc=AD").expect("dn");
        assert_eq!(a, c);
        assert_eq!(c.as_str(), "cn=H1,dc=AD", "each spelling is kept");
        assert!(cache.parse("not a dn").is_err());
        assert!(cache.parse("not a dn").is_err());
    }

    #[test]
    fn normalised_forms() {
        assert_eq!(
            dn("CN=\"Smith, J\" ,OU=Ünits;DC=AD").normalised(),
            "cn=smith\\, j,ou=ünits,dc=ad"
        );
        // Values are lower-cased as whole strings (a final capital sigma
        // becomes a final small sigma).
        assert_eq!(
            dn("CN=ΟΔΟΣ,DC=x").normalised(),
            format!("cn={},dc=x", "ΟΔΟΣ".to_lowercase())
        );
        assert_eq!(dn("cn=\\#A\\00 ,dc=x").normalised(), "cn=\\#a\\00,dc=x");
        assert_eq!(dn(" CN = a ").normalised(), "cn=a");
    }

    #[test]
    fn invalid_dns_are_rejected() {
        for bad in [
            "CN",
            "=x",
            "CN=a,",
            "CN=a\\",
            "CN=a\\zz",
            "CN=a\\4",
            "CN=a,,DC=b",
            "C N=a",
        ] {
            assert!(Dn::parse(bad).is_err(), "{bad:?} should not parse");
        }
        assert_eq!(dn("").normalised(), "");
    }

    #[test]
    fn within() {
        let ou = dn("OU=Groups,DC=ad,DC=com");
        assert!(dn("CN=g,ou=groups,dc=AD,dc=com").is_within(&ou));
        assert!(ou.is_within(&ou));
        assert!(!dn("CN=g,OU=XGroups,DC=ad,DC=com").is_within(&ou));
        assert!(!dn("DC=ad,DC=com").is_within(&ou));
    }

    #[test]
    fn dn_built_from_a_name_is_escaped_and_round_trips() {
        let ou = dn("OU=Groups,DC=ad");
        for name in [
            "plain", "a,b", " lead", "trail ", "#hash", "x+y=z", "q\"\\<>;",
        ] {
            let child = Dn::child("CN", name, &ou);
            let again = dn(child.as_str());
            assert_eq!(child, again);
            assert!(child.is_within(&ou));
            assert_eq!(
                again.normalised(),
                format!(
                    "cn={},ou=groups,dc=ad",
                    escape_dn_value(&name.to_lowercase())
                )
            );
        }
        assert_eq!(escape_dn_value(" a,b "), "\\ a\\,b\\ ");
        assert_eq!(escape_dn_value("#a#"), "\\#a#");
    }

    /// Found by the `dn` fuzz target (fuzz/corpus/dn/crash-child-of-a-blank-root):
    /// a root spelled as spaces made `child` write `CN=x, ` and panic.
    #[test]
    fn child_of_a_root_spelled_with_spaces() {
        for root in [" ", "  "] {
            let root = dn(root);
            let child = Dn::child("CN", "x", &root);
            assert_eq!(child.as_str(), "CN=x");
            assert!(child.is_within(&root));
        }
    }

    #[test]
    fn filter_values_are_escaped() {
        assert_eq!(escape_filter_value("a*(b)\\c\0"), "a\\2a\\28b\\29\\5cc\\00");
    }

    #[test]
    fn group_pattern() {
        let p = GroupPattern::parse("{}-gmsa-hosts").expect("valid");
        let proid = Proid::new("proid1").expect("valid");
        assert_eq!(p.render(&proid), "proid1-gmsa-hosts");
        assert_eq!(p.proid_of("proid1-gmsa-hosts"), Some(proid.clone()));
        assert_eq!(
            p.proid_of("PROID1-GMSA-HOSTS").map(|p| p.key()),
            Some(proid.key())
        );
        assert_eq!(p.proid_of("-gmsa-hosts"), None);
        assert_eq!(p.proid_of("proid1-gmsa"), None);
        assert_eq!(p.proid_of("proid1-gmsa-hostsx"), None);
        let q = GroupPattern::parse("gmsa_{}_hosts").expect("valid");
        assert_eq!(
            q.proid_of("GMSA_Web_Hosts").map(|p| p.to_string()),
            Some("Web".into())
        );
        for bad in ["", "gmsa-hosts", "{}{}", "{}-{x}", "{-}", "{ }-x"] {
            assert!(GroupPattern::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn proid_from_instance() {
        let p = |s| Proid::from_instance(s).map(|p| p.to_string());
        assert_eq!(p("proid1.web#0000000042"), Some("proid1".into()));
        assert_eq!(p("proid1.web.x#1"), Some("proid1".into()));
        assert_eq!(p("noproid#1"), None);
        assert_eq!(p(".web#1"), None);
    }

    #[test]
    fn host_names() {
        assert!(HostName::new("host1.ad.com").is_ok());
        for bad in ["", ".", "..", "a/b"] {
            assert!(HostName::new(bad).is_err());
        }
        for ok in [" lead", ":x", "<x", "h\u{e9}", "h\u{85}"] {
            assert!(HostName::new(ok).is_ok(), "{ok:?}");
        }
    }

    /// Every character below U+0020 and U+007F, in every place of a name.
    fn with_each_control(base: &str) -> impl Iterator<Item = (char, String)> + '_ {
        let controls = (0u8..0x20).chain([0x7f]).map(char::from);
        controls.flat_map(move |c| {
            (0..=base.len())
                .filter(|&i| base.is_char_boundary(i))
                .map(move |i| (c, format!("{}{c}{}", &base[..i], &base[i..])))
        })
    }

    #[test]
    fn control_characters_are_refused_in_host_names_proids_and_instances() {
        for (c, name) in with_each_control("h1.ad") {
            let err = HostName::new(&name).expect_err(&name);
            let text = err.to_string();
            assert!(
                text.starts_with("host name") && text.contains(&code_point(c)),
                "{text}"
            );
            assert!(
                !text.chars().any(is_control),
                "the error quotes escaped: {text:?}"
            );
        }
        for (_, name) in with_each_control("proid1") {
            assert_eq!(Proid::new(&name), None, "{name:?}");
        }
        for (c, name) in with_each_control("proid1.web#1") {
            let err = Proid::of_instance(&name).expect_err(&name);
            assert!(
                matches!(&err, ModelError::Control { what: "instance name", found, .. } if *found == c),
                "{name:?}: {err:?}"
            );
            assert_eq!(Proid::name_in(&name), None);
            assert_eq!(Proid::from_instance(&name), None);
        }
        assert_eq!(Proid::of_instance("proid1.web#1"), Ok("proid1"));
        assert_eq!(Proid::of_instance("web#1"), Err(ModelError::NoProid));
        assert!(reject_controls("x", "tab\there").is_err());
        assert!(reject_controls("x", " :<\u{e9}\u{85}\u{2028}").is_ok());
    }

    #[test]
    fn escaping_leaves_no_line_break_or_terminal_control() {
        assert!(matches!(escape_controls("CN=h1,DC=ad"), Cow::Borrowed(_)));
        assert_eq!(
            escape_controls("a\nb\rc\td\0e\u{1b}[2J\u{7f}\u{85}\u{2028}\u{2029}"),
            "a\\nb\\rc\\td\\u{0}e\\u{1b}[2J\\u{7f}\\u{85}\\u{2028}\\u{2029}"
        );
        for c in (0..=0x3000u32).filter_map(char::from_u32) {
            let text = format!("x{c}y");
            let escaped = escape_controls(&text);
            assert!(
                !escaped.chars().any(needs_escape),
                "{c:?} left as {escaped:?}"
            );
            assert!(!escaped.contains(['\n', '\r']));
        }
    }

    #[test]
    fn partition_globs() {
        let g = PartitionGlob::parse("part[12]-*").expect("valid");
        assert!(g.matches("part1-east"));
        assert!(!g.matches("part3-east"));
        assert!(PartitionGlob::parse("?").expect("valid").matches("x"));
        assert!(PartitionGlob::default().matches(""));
        assert!(PartitionGlob::parse("[").is_err());
    }
}

/// Property tests of the DN parser and normaliser, at the cases CI can
/// afford; the fuzz target `dn` (fuzz/) checks the same on any text.
#[cfg(test)]
mod properties {
    use super::*;
    use proptest::prelude::*;

    /// Values with the characters that DNs make special, spaces where they
    /// are insignificant, and text that changes under lower-casing.
    fn value() -> impl Strategy<Value = String> {
        prop_oneof![
            "[ a-zA-Z0-9#\"+,;<>=\\\\\0\n]{0,8}",
            "[ aZßİΣσÅ\u{fffd}\u{10000}]{0,6}",
            any::<String>(),
        ]
    }

    fn attr() -> impl Strategy<Value = String> {
        prop_oneof![
            "[a-zA-Z][a-zA-Z0-9-]{0,6}",
            "[0-9]{1,3}(\\.[0-9]{1,3}){0,3}"
        ]
    }

    /// A DN written from its parts in one of the spellings RFC 4514 allows
    /// for the same name: attribute types in any case, spaces around `=`
    /// and separators, `;` for `,`, escaped values.
    fn spell(rdns: &[Vec<(String, String)>], style: u8) -> String {
        let pad = if style & 1 == 1 { " " } else { "" };
        let sep = if style & 2 == 2 { ";" } else { "," };
        let rdn = |avas: &Vec<(String, String)>| {
            avas.iter()
                .map(|(a, v)| {
                    let a = if style & 4 == 4 {
                        a.to_ascii_uppercase()
                    } else {
                        a.clone()
                    };
                    format!("{a}{pad}={pad}{}", escape_dn_value(v))
                })
                .collect::<Vec<_>>()
                .join(&format!("{pad}+{pad}"))
        };
        rdns.iter()
            .map(rdn)
            .collect::<Vec<_>>()
            .join(&format!("{pad}{sep}{pad}"))
    }

    fn rdns() -> impl Strategy<Value = Vec<Vec<(String, String)>>> {
        proptest::collection::vec(proptest::collection::vec((attr(), value()), 1..3), 1..4)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]

        #[test]
        fn any_text_parses_or_is_refused_and_a_normal_form_is_stable(raw in prop_oneof![
            any::<String>(),
            "[ a-cA-C=,;+#\"\\\\0-9]{0,16}",
        ]) {
            if let Ok(dn) = Dn::parse(&raw) {
                prop_assert_eq!(dn.as_str(), raw.as_str());
                let again = Dn::parse(dn.normalised()).expect("a normal form parses");
                prop_assert_eq!(again.normalised(), dn.normalised());
                prop_assert_eq!(&again, &dn);
            }
        }

        #[test]
        fn spellings_of_one_dn_compare_equal(rdns in rdns(), a in 0u8..8, b in 0u8..8) {
            let (x, y) = (spell(&rdns, a), spell(&rdns, b));
            let dx = Dn::parse(&x).expect("an escaped DN parses");
            let dy = Dn::parse(&y).expect("an escaped DN parses");
            prop_assert_eq!(dx.as_str(), x.as_str(), "the spelling is kept");
            prop_assert_eq!(&dx, &dy);
            prop_assert_eq!(dx.cmp(&dy), Ordering::Equal);
            // The normal form, built independently: each pair lower-cased
            // and escaped, the pairs of an RDN sorted.
            let want = rdns
                .iter()
                .map(|avas| {
                    let mut avas: Vec<String> = avas
                        .iter()
                        .map(|(a, v)| {
                            format!("{}={}", a.to_ascii_lowercase(), escape_dn_value(&v.to_lowercase()))
                        })
                        .collect();
                    avas.sort();
                    avas.join("+")
                })
                .collect::<Vec<_>>()
                .join(",");
            prop_assert_eq!(dx.normalised(), want.as_str());
            let again = Dn::parse(&want).expect("a normal form parses");
            prop_assert_eq!(again.normalised(), want.as_str());
        }

        #[test]
        fn a_child_from_any_value_lies_within_its_parent(rdns in rdns(), name in value()) {
            let parent = Dn::parse(&spell(&rdns, 0)).expect("an escaped DN parses");
            let child = Dn::child("CN", &name, &parent);
            prop_assert!(child.is_within(&parent));
            prop_assert_eq!(
                child.normalised(),
                format!("cn={},{}", escape_dn_value(&name.to_lowercase()), parent.normalised())
            );
        }
    }
}

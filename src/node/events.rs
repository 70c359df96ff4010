//! App events: how the node tells the cluster what became of an instance.
//!
//! An event is a file in `<app-root>/appevents/` named
//! `<unix time with fractional seconds>,<instance>,<type>,<data>`, empty or
//! holding a YAML payload. A separate process ships and deletes these files,
//! so each one is written whole under a dot-prefixed temp name and renamed
//! into place: the shipper never sees half an event.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::files;

/// The kinds of event the node posts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum EventKind {
    /// The container directory is ready; data: the unique id.
    Configured,
    /// The instance could not run; data: why (`invalid-manifest`, `gmsa`, ...).
    Aborted,
    /// The container was killed; data: by what (`oom`).
    Killed,
    /// The container ended on its own; data: `<return code>.<signal>`.
    Finished,
}

impl EventKind {
    /// The type field of the event file name.
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Configured => "configured",
            EventKind::Aborted => "aborted",
            EventKind::Killed => "killed",
            EventKind::Finished => "finished",
        }
    }

    /// The kind named by a type field.
    pub fn parse(s: &str) -> Option<EventKind> {
        [
            EventKind::Configured,
            EventKind::Aborted,
            EventKind::Killed,
            EventKind::Finished,
        ]
        .into_iter()
        .find(|k| k.as_str() == s)
    }
}

impl fmt::Display for EventKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One event about one instance.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// When it happened.
    pub time: SystemTime,
    /// The instance name.
    pub instance: String,
    /// What happened.
    pub kind: EventKind,
    /// The data field of the file name; made safe for a file name when posted.
    pub data: String,
    /// The file's content, when there is more to say.
    pub payload: Option<serde_yaml::Value>,
}

impl Event {
    /// An event happening now.
    pub fn now(instance: &str, kind: EventKind, data: &str) -> Event {
        Event {
            time: SystemTime::now(),
            instance: instance.to_owned(),
            kind,
            data: data.to_owned(),
            payload: None,
        }
    }

    /// The same event with a payload.
    pub fn with_payload(mut self, payload: serde_yaml::Value) -> Event {
        self.payload = Some(payload);
        self
    }

    /// The event's file name: microsecond time, instance, type, data.
    pub fn file_name(&self) -> String {
        let since = self.time.duration_since(UNIX_EPOCH).unwrap_or_default();
        format!(
            "{}.{:06},{},{},{}",
            since.as_secs(),
            since.subsec_micros(),
            self.instance,
            self.kind,
            safe_data(&self.data)
        )
    }

    /// The file content: empty, or the payload as YAML.
    pub fn content(&self) -> Result<String, serde_yaml::Error> {
        match &self.payload {
            None => Ok(String::new()),
            Some(payload) => serde_yaml::to_string(payload),
        }
    }
}

/// Posts an event into an events directory, atomically. Returns the path.
pub fn post(dir: &Path, event: &Event) -> std::io::Result<PathBuf> {
    let content = event
        .content()
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
    let path = dir.join(event.file_name());
    files::write_atomic(&path, content.as_bytes(), 0o644)?;
    Ok(path)
}

/// An event file's name read back: time, instance, kind and data. `None`
/// for names that are not events (temp files among them).
pub fn parse_file_name(name: &str) -> Option<(SystemTime, String, EventKind, String)> {
    if name.starts_with('.') {
        return None;
    }
    let mut fields = name.splitn(4, ',');
    let time = fields.next()?;
    let instance = fields.next()?;
    let kind = EventKind::parse(fields.next()?)?;
    let data = fields.next()?;
    let (secs, frac) = time.split_once('.').unwrap_or((time, "0"));
    let secs: u64 = secs.parse().ok()?;
    let frac = format!("{frac:0<9}");
    let nanos: u32 = frac.get(..9)?.parse().ok()?;
    let time = UNIX_EPOCH + Duration::new(secs, nanos);
    Some((time, instance.to_owned(), kind, data.to_owned()))
}

/// The data field as it can stand in a file name: characters other than
/// letters, digits and `_ . : @ + = -` become `_`, and it is kept short.
fn safe_data(data: &str) -> String {
    data.chars()
        .take(128)
        .map(|c| {
            if c.is_ascii_alphanumeric() || "_.:@+=-".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_names_round_trip() {
        let event = Event {
            time: UNIX_EPOCH + Duration::new(1_700_000_000, 123_456_789),
            instance: "proid1.web#0000000042".into(),
            kind: EventKind::Finished,
            data: "0.15".into(),
            payload: None,
        };
        let name = event.file_name();
        assert_eq!(
            name,
            "1700000000.123456,proid1.web#0000000042,finished,0.15"
        );
        let (time, instance, kind, data) = parse_file_name(&name).expect("parses");
        assert_eq!(time, UNIX_EPOCH + Duration::new(1_700_000_000, 123_456_000));
        assert_eq!(
            (instance.as_str(), kind, data.as_str()),
            ("proid1.web#0000000042", EventKind::Finished, "0.15")
        );
        assert_eq!(parse_file_name(".1700000000.1,a.b#1,finished,0.0"), None);
        assert_eq!(parse_file_name("x,a.b#1,finished,0.0"), None);
        assert_eq!(parse_file_name("1,a.b#1,exploded,0.0"), None);
    }

    #[test]
    fn data_cannot_break_the_name() {
        let event = Event::now("p.a#1", EventKind::Aborted, "../x,y z/");
        let name = event.file_name();
        assert!(name.ends_with(",p.a#1,aborted,.._x_y_z_"), "{name}");
        assert_eq!(name.matches(',').count(), 3);
    }

    #[test]
    fn posting_writes_the_payload_whole() {
        let dir = tempfile::tempdir().expect("tempdir");
        let event = Event::now("p.a#1", EventKind::Aborted, "invalid-manifest")
            .with_payload(serde_yaml::Value::String("missing `cpu`".into()));
        let path = post(dir.path(), &event).expect("post");
        let text = std::fs::read_to_string(&path).expect("read");
        let back: serde_yaml::Value = serde_yaml::from_str(&text).expect("yaml");
        assert_eq!(back, serde_yaml::Value::String("missing `cpu`".into()));
        let plain =
            post(dir.path(), &Event::now("p.a#1", EventKind::Configured, "x")).expect("post");
        assert_eq!(std::fs::read(plain).expect("read"), b"");
        assert_eq!(files::data_names(dir.path()).expect("list").len(), 2);
        assert_eq!(std::fs::read_dir(dir.path()).expect("list").count(), 2);
    }
}

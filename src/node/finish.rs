//! `gmsa-reconciler finish <container_dir>`: what became of a container that
//! stopped, told to the cluster as exactly one event.
//!
//! The markers in the container's `data/` decide, in this order: `aborted`
//! (an `aborted` event with its `why`), `oom` (a `killed` event), `terminated`
//! (the node stopped it on purpose: no event, whatever else is there),
//! `exitinfo` (a `finished` event with `<return code>.<signal>`); with none,
//! nothing is said yet. The supervisor may call finish more than once, and a
//! crash may interrupt it, so the chosen event is first recorded in
//! `data/.finish-event` (first decision wins), then posted under that same
//! name, then `data/.finish-posted` closes the matter.
//!
//! Containers made by the original node agent are finished the same way:
//! their `exitinfo` is `{"service", "return_code", "signal"}` without a
//! timestamp, and they may have no `data/app.json`, so the instance then
//! comes from the directory's name. An `exitinfo` that lacks a field counts
//! it as 256, one that cannot be read or parsed counts as `{}`: a container
//! that ended always gets its one `finished` event, whose file holds the
//! exitinfo as it was read. Markers are only regular files (see
//! `node::files`): a planted link is never followed, and counts as absent.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::events::{self, Event, EventKind};
use super::files::{self, MarkerText};
use super::unique::Instance;
use super::{NodeError, APPEVENTS_DIR, APPS_DIR};

/// Marker: the container was aborted; JSON `{why, payload}`.
pub const ABORTED: &str = "aborted";
/// Marker: the container was killed for running out of memory.
pub const OOM: &str = "oom";
/// Marker: the node terminated the container (its placement went away).
pub const TERMINATED: &str = "terminated";
/// Marker: how the container's process ended; JSON written by `finish`.
pub const EXITINFO: &str = "exitinfo";

const FINISH_EVENT: &str = ".finish-event";
const FINISH_POSTED: &str = ".finish-posted";

/// The value of an `exitinfo` field that is missing (or not a number).
pub const MISSING: i64 = 256;

/// How a container's process ended, as its `data/exitinfo` tells it.
#[derive(Debug, Clone, PartialEq)]
pub struct ExitInfo {
    /// The exit code; [`MISSING`] when not given.
    pub return_code: i64,
    /// The signal that ended it, or 0; [`MISSING`] when not given.
    pub signal: i64,
    /// The file's JSON object as read; `{}` when it was not one.
    pub as_read: serde_json::Value,
}

impl ExitInfo {
    /// Reads `exitinfo` text: a JSON object whose `return_code` and `signal`
    /// are integers; any other key is kept but not needed. Text that is not
    /// a JSON object reads as `{}`.
    pub fn parse(text: &str) -> ExitInfo {
        let as_read = match serde_json::from_str::<serde_json::Value>(text) {
            Ok(value @ serde_json::Value::Object(_)) => value,
            _ => serde_json::Value::Object(serde_json::Map::new()),
        };
        let field = |key: &str| as_read.get(key).and_then(|v| v.as_i64()).unwrap_or(MISSING);
        ExitInfo {
            return_code: field("return_code"),
            signal: field("signal"),
            as_read: as_read.clone(),
        }
    }

    /// The `finished` event's data: `<return code>.<signal>`.
    pub fn data(&self) -> String {
        format!("{}.{}", self.return_code, self.signal)
    }
}

/// The `aborted` marker's content.
#[derive(Debug, Deserialize)]
struct AbortedMarker {
    why: Option<String>,
    #[serde(default)]
    payload: serde_json::Value,
}

/// What finish needs of `data/app.json`: the instance's name.
#[derive(Debug, Deserialize)]
struct AppName {
    name: String,
}

/// The decided event, kept so that a retry posts the same file.
#[derive(Debug, Serialize, Deserialize)]
struct Recorded {
    name: String,
    content: String,
}

/// The app root of a container directory `<app-root>/apps/<unique name>`.
pub fn app_root_of(container_dir: &Path) -> Option<PathBuf> {
    let apps = container_dir.parent()?;
    if apps.file_name()? != APPS_DIR {
        return None;
    }
    apps.parent().map(Path::to_path_buf)
}

/// True when a container directory shows its process is over: `exitinfo`,
/// `aborted` or `oom` is present.
pub fn is_finished(container_dir: &Path) -> bool {
    let data = container_dir.join("data");
    [EXITINFO, ABORTED, OOM]
        .iter()
        .any(|marker| files::marker(&data.join(marker)))
}

/// Posts the one event the markers of `container_dir/data` call for, into
/// `<app_root>/appevents/`. Returns the event when this call posted it;
/// `None` when there is nothing to say or it was already said.
pub fn finish(app_root: &Path, container_dir: &Path) -> Result<Option<Event>, NodeError> {
    let data =
        files::data_dir(container_dir).map_err(NodeError::io(&container_dir.join("data")))?;
    if files::marker(&data.join(FINISH_POSTED)) {
        return Ok(None);
    }
    let instance = instance_of(container_dir, &data)?;
    let Some(event) = decide(&data, instance.name())? else {
        return Ok(None);
    };
    let content = event.content().map_err(|e| NodeError::Data {
        path: data.clone(),
        why: format!("payload cannot be written as YAML: {e}"),
    })?;
    let recorded = Recorded {
        name: event.file_name(),
        content,
    };
    let record_path = data.join(FINISH_EVENT);
    let record = serde_json::to_vec(&recorded).map_err(|e| NodeError::Data {
        path: record_path.clone(),
        why: e.to_string(),
    })?;
    let recorded =
        if files::write_new(&record_path, &record).map_err(NodeError::io(&record_path))? {
            recorded
        } else {
            // An earlier call decided and may have posted: post that same file again.
            let text = match files::read_marker(&record_path) {
                MarkerText::Text(text) => text,
                MarkerText::Absent => {
                    return Err(NodeError::Data {
                        path: record_path,
                        why: "not a regular file".to_owned(),
                    })
                }
                MarkerText::Unreadable(why) => {
                    return Err(NodeError::Data {
                        path: record_path,
                        why,
                    })
                }
            };
            serde_json::from_str(&text).map_err(|e| NodeError::Data {
                path: record_path.clone(),
                why: e.to_string(),
            })?
        };
    let Some((time, instance, kind, data_field)) = events::parse_file_name(&recorded.name) else {
        return Err(NodeError::Data {
            path: record_path,
            why: format!("not an event name: {:?}", recorded.name),
        });
    };
    let target = app_root.join(APPEVENTS_DIR).join(&recorded.name);
    files::write_atomic(&target, recorded.content.as_bytes(), 0o644)
        .map_err(NodeError::io(&target))?;
    let posted = data.join(FINISH_POSTED);
    files::touch(&posted).map_err(NodeError::io(&posted))?;
    let payload = if recorded.content.is_empty() {
        None
    } else {
        serde_yaml::from_str(&recorded.content).ok()
    };
    Ok(Some(Event {
        time,
        instance,
        kind,
        data: data_field,
        payload,
    }))
}

/// The instance a container was made for: the name in `data/app.json`, or,
/// when that file is missing or unusable, the one the directory's name
/// stands for.
fn instance_of(container_dir: &Path, data: &Path) -> Result<Instance, NodeError> {
    let app_json = data.join("app.json");
    let from_json = match files::read_marker(&app_json) {
        MarkerText::Absent => None,
        MarkerText::Unreadable(why) => Some(why),
        MarkerText::Text(text) => match serde_json::from_str::<AppName>(&text) {
            Ok(app) => match Instance::parse(&app.name) {
                Ok(instance) => return Ok(instance),
                Err(why) => Some(why.to_string()),
            },
            Err(e) => Some(e.to_string()),
        },
    };
    if let Some(why) = &from_json {
        tracing::warn!(path = %app_json.display(), %why, "app.json unusable; the instance comes from the directory's name");
    }
    let dir_name = container_dir
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default();
    match Instance::from_unique_name(dir_name) {
        Ok((instance, _)) => Ok(instance),
        Err(why) => Err(NodeError::Data {
            path: container_dir.to_owned(),
            why: match from_json {
                Some(json_why) => format!("{why}; and data/app.json: {json_why}"),
                None => format!("{why}, and there is no data/app.json"),
            },
        }),
    }
}

/// The event the markers call for, by precedence.
fn decide(data: &Path, instance: &str) -> Result<Option<Event>, NodeError> {
    let aborted = match files::read_marker(&data.join(ABORTED)) {
        MarkerText::Absent => None,
        // There, but its reason cannot be read: aborted all the same.
        MarkerText::Unreadable(_) => Some(String::new()),
        MarkerText::Text(text) => Some(text),
    };
    if let Some(text) = aborted {
        let (why, payload) = match serde_json::from_str::<AbortedMarker>(&text) {
            Ok(marker) => (
                marker.why.filter(|w| !w.trim().is_empty()),
                serde_yaml::to_value(&marker.payload)
                    .ok()
                    .filter(|p| !p.is_null()),
            ),
            Err(_) if text.trim().is_empty() => (None, None),
            Err(_) => (None, Some(serde_yaml::Value::String(text))),
        };
        let mut event = Event::now(
            instance,
            EventKind::Aborted,
            why.as_deref().unwrap_or("unknown"),
        );
        event.payload = payload;
        return Ok(Some(event));
    }
    if files::marker(&data.join(OOM)) {
        return Ok(Some(Event::now(instance, EventKind::Killed, "oom")));
    }
    if files::marker(&data.join(TERMINATED)) {
        return Ok(None);
    }
    let path = data.join(EXITINFO);
    let text = match files::read_marker(&path) {
        MarkerText::Absent => return Ok(None),
        MarkerText::Unreadable(why) => {
            tracing::warn!(path = %path.display(), %why, "exitinfo unreadable; read as {{}}");
            String::new()
        }
        MarkerText::Text(text) => text,
    };
    let info = ExitInfo::parse(&text);
    if !matches!(
        serde_json::from_str::<serde_json::Value>(&text),
        Ok(serde_json::Value::Object(_))
    ) {
        tracing::warn!(path = %path.display(), "exitinfo is not a JSON object; read as {{}}");
    }
    let payload = serde_yaml::to_value(&info.as_read).map_err(|e| NodeError::Data {
        path: path.clone(),
        why: e.to_string(),
    })?;
    Ok(Some(
        Event::now(instance, EventKind::Finished, &info.data()).with_payload(payload),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::node::manifest::{AppJson, EphemeralPorts, Manifest, Service};
    use std::fs;

    struct Fixture {
        root: tempfile::TempDir,
        container: PathBuf,
    }

    impl Fixture {
        fn new() -> Fixture {
            let root = tempfile::tempdir().expect("tempdir");
            let container = root.path().join("apps/proid1.web-0000000001-0000000000abc");
            fs::create_dir_all(container.join("data")).expect("mkdir");
            fs::create_dir_all(root.path().join("appevents")).expect("mkdir");
            let app = AppJson {
                name: "proid1.web#0000000001".into(),
                app: "proid1.web".into(),
                task: "0000000001".into(),
                uniqueid: "0000000000abc".into(),
                credential_spec: None,
                manifest: Manifest {
                    proid: "proid1".into(),
                    environment: "dev".into(),
                    cpu: "10%".into(),
                    memory: "1M".into(),
                    disk: "1M".into(),
                    services: vec![Service {
                        name: "web".into(),
                        command: "true".into(),
                    }],
                    environ: vec![],
                    endpoints: vec![],
                    ephemeral_ports: EphemeralPorts::default(),
                },
            };
            let json = serde_json::to_vec(&app).expect("json");
            fs::write(container.join("data/app.json"), json).expect("write");
            Fixture { root, container }
        }

        fn marker(&self, name: &str, content: &str) {
            fs::write(self.container.join("data").join(name), content).expect("write marker");
        }

        fn finish(&self) -> Option<Event> {
            finish(self.root.path(), &self.container).expect("finish")
        }

        /// Every posted event as (type, data, content).
        fn posted(&self) -> Vec<(EventKind, String, String)> {
            let dir = self.root.path().join("appevents");
            files::data_names(&dir)
                .expect("list")
                .into_iter()
                .map(|name| {
                    let (_, instance, kind, data) =
                        events::parse_file_name(&name).expect("event name");
                    assert_eq!(instance, "proid1.web#0000000001");
                    let content = fs::read_to_string(dir.join(&name)).expect("read");
                    (kind, data, content)
                })
                .collect()
        }
    }

    const EXIT: &str =
        r#"{"service": "web", "return_code": 3, "signal": 0, "timestamp": 1700000000}"#;

    #[test]
    fn exitinfo_gives_finished_with_code_and_signal() {
        let f = Fixture::new();
        f.marker(EXITINFO, &EXIT.replace("\"signal\": 0", "\"signal\": 9"));
        let event = f.finish().expect("an event");
        assert_eq!(
            (event.kind, event.data.as_str()),
            (EventKind::Finished, "3.9")
        );
        let posted = f.posted();
        assert_eq!(posted.len(), 1);
        assert_eq!(
            (posted[0].0, posted[0].1.as_str()),
            (EventKind::Finished, "3.9")
        );
        let held: serde_json::Value = serde_yaml::from_str(&posted[0].2).expect("yaml");
        let written: serde_json::Value =
            serde_json::from_str(&EXIT.replace("\"signal\": 0", "\"signal\": 9")).expect("json");
        assert_eq!(held, written, "the event holds the exitinfo as read");
    }

    #[test]
    fn exitinfo_as_the_original_system_writes_it_or_worse() {
        for (text, data) in [
            (
                r#"{"service": "web_server", "return_code": 0, "signal": 0}"#,
                "0.0",
            ),
            (r#"{"service": "web", "return_code": 3}"#, "3.256"),
            (r#"{"signal": 15}"#, "256.15"),
            (r#"{"return_code": "3", "signal": null}"#, "256.256"),
            ("{}", "256.256"),
            ("{", "256.256"),
            ("[1, 2]", "256.256"),
            ("", "256.256"),
        ] {
            let f = Fixture::new();
            f.marker(EXITINFO, text);
            let event = f.finish().expect("an event");
            assert_eq!(
                (event.kind, event.data.as_str()),
                (EventKind::Finished, data),
                "{text:?}"
            );
            let posted = f.posted();
            assert_eq!(posted.len(), 1, "{text:?}");
            let held: serde_json::Value = serde_yaml::from_str(&posted[0].2).expect("yaml");
            let expected = match serde_json::from_str::<serde_json::Value>(text) {
                Ok(v @ serde_json::Value::Object(_)) => v,
                _ => serde_json::json!({}),
            };
            assert_eq!(held, expected, "{text:?}");
        }
    }

    #[test]
    fn without_app_json_the_instance_comes_from_the_directory_name() {
        let f = Fixture::new();
        fs::remove_file(f.container.join("data/app.json")).expect("rm");
        f.marker(OOM, "");
        let event = f.finish().expect("an event");
        assert_eq!(event.instance, "proid1.web#0000000001");
        let bad = f.root.path().join("apps/not-a-container");
        fs::create_dir_all(bad.join("data")).expect("mkdir");
        fs::write(bad.join("data/oom"), "").expect("write");
        let err = finish(f.root.path(), &bad).expect_err("no instance");
        assert!(err.to_string().contains("not-a-container"), "{err}");
    }

    #[test]
    fn linked_markers_count_as_absent_and_are_not_read() {
        let f = Fixture::new();
        let outside = f.root.path().join("outside");
        fs::write(&outside, r#"{"why": "planted"}"#).expect("write");
        let data = f.container.join("data");
        std::os::unix::fs::symlink(&outside, data.join(ABORTED)).expect("symlink");
        std::os::unix::fs::symlink(&outside, data.join(TERMINATED)).expect("symlink");
        f.marker(EXITINFO, EXIT);
        let event = f.finish().expect("an event");
        assert_eq!(
            (event.kind, event.data.as_str()),
            (EventKind::Finished, "3.0")
        );
        assert_eq!(f.posted().len(), 1);
    }

    #[test]
    fn a_second_call_posts_nothing_new() {
        let f = Fixture::new();
        f.marker(EXITINFO, EXIT);
        assert!(f.finish().is_some());
        assert_eq!(f.finish(), None);
        f.marker(OOM, "");
        assert_eq!(f.finish(), None);
        assert_eq!(f.posted().len(), 1);
    }

    #[test]
    fn an_interrupted_call_is_completed_with_the_same_event() {
        let f = Fixture::new();
        f.marker(EXITINFO, EXIT);
        let first = f.finish().expect("an event");
        // As if the process died after posting, before closing the matter.
        fs::remove_file(f.container.join("data").join(FINISH_POSTED)).expect("rm");
        f.marker(OOM, "");
        let again = f.finish().expect("the same event again");
        assert_eq!(again.file_name(), first.file_name());
        assert_eq!(f.posted().len(), 1, "same file name, so still one event");
    }

    #[test]
    fn nothing_without_markers_then_the_event_once_they_appear() {
        let f = Fixture::new();
        assert_eq!(f.finish(), None);
        assert!(f.posted().is_empty());
        f.marker(EXITINFO, EXIT);
        assert!(f.finish().is_some());
        assert_eq!(f.posted().len(), 1);
    }

    #[test]
    fn terminated_wins_over_exitinfo() {
        let f = Fixture::new();
        f.marker(TERMINATED, "");
        f.marker(EXITINFO, EXIT);
        assert_eq!(f.finish(), None);
        assert!(f.posted().is_empty());
    }

    #[test]
    fn oom_gives_killed_even_when_terminated() {
        let f = Fixture::new();
        f.marker(TERMINATED, "");
        f.marker(EXITINFO, EXIT);
        f.marker(OOM, "");
        f.finish().expect("an event");
        assert_eq!(
            f.posted(),
            [(EventKind::Killed, "oom".into(), String::new())]
        );
    }

    #[test]
    fn aborted_wins_over_everything_and_carries_its_payload() {
        let f = Fixture::new();
        f.marker(OOM, "");
        f.marker(TERMINATED, "");
        f.marker(EXITINFO, EXIT);
        f.marker(
            ABORTED,
            r#"{"why": "port-conflict", "payload": {"port": 8000}}"#,
        );
        f.finish().expect("an event");
        let posted = f.posted();
        assert_eq!(posted.len(), 1);
        let (kind, data, content) = &posted[0];
        assert_eq!(
            (kind, data.as_str()),
            (&EventKind::Aborted, "port-conflict")
        );
        let payload: serde_yaml::Value = serde_yaml::from_str(content).expect("yaml");
        assert_eq!(payload["port"], serde_yaml::Value::from(8000));
    }

    #[test]
    fn aborted_without_a_reason_is_unknown() {
        for content in ["", "not json", r#"{"why": ""}"#, r#"{"payload": 1}"#] {
            let f = Fixture::new();
            f.marker(ABORTED, content);
            let event = f.finish().expect("an event");
            assert_eq!(
                (event.kind, event.data.as_str()),
                (EventKind::Aborted, "unknown"),
                "{content:?}"
            );
        }
    }

    #[test]
    fn the_app_root_is_found_from_the_container_dir() {
        assert_eq!(
            app_root_of(Path::new("/srv/node/apps/p.a-1-x")),
            Some(PathBuf::from("/srv/node"))
        );
        assert_eq!(app_root_of(Path::new("/srv/node/other/p.a-1-x")), None);
    }
}

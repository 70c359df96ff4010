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

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::events::{self, Event, EventKind};
use super::manifest::AppJson;
use super::{files, NodeError, APPEVENTS_DIR, APPS_DIR};

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

/// What the `finish` script records when the container's process ends.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExitInfo {
    /// The service that ended.
    pub service: String,
    /// Its exit code (256 when killed by a signal, -1 when unknown).
    pub return_code: i64,
    /// The signal that killed it, or 0.
    pub signal: i64,
    /// Unix time of the exit.
    pub timestamp: f64,
}

/// The `aborted` marker's content.
#[derive(Debug, Deserialize)]
struct AbortedMarker {
    why: Option<String>,
    #[serde(default)]
    payload: serde_json::Value,
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
        .any(|marker| files::exists(&data.join(marker)))
}

/// Posts the one event the markers of `container_dir/data` call for, into
/// `<app_root>/appevents/`. Returns the event when this call posted it;
/// `None` when there is nothing to say or it was already said.
pub fn finish(app_root: &Path, container_dir: &Path) -> Result<Option<Event>, NodeError> {
    let data = container_dir.join("data");
    if files::exists(&data.join(FINISH_POSTED)) {
        return Ok(None);
    }
    let app_json = data.join("app.json");
    let text = fs::read_to_string(&app_json).map_err(NodeError::io(&app_json))?;
    let app: AppJson = serde_json::from_str(&text).map_err(|e| NodeError::Data {
        path: app_json.clone(),
        why: e.to_string(),
    })?;
    let Some(event) = decide(&data, &app.name)? else {
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
            let text = fs::read(&record_path).map_err(NodeError::io(&record_path))?;
            serde_json::from_slice(&text).map_err(|e| NodeError::Data {
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

/// The event the markers call for, by precedence.
fn decide(data: &Path, instance: &str) -> Result<Option<Event>, NodeError> {
    if let Some(text) = read_marker(&data.join(ABORTED))? {
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
    if files::exists(&data.join(OOM)) {
        return Ok(Some(Event::now(instance, EventKind::Killed, "oom")));
    }
    if files::exists(&data.join(TERMINATED)) {
        return Ok(None);
    }
    let path = data.join(EXITINFO);
    let Some(text) = read_marker(&path)? else {
        return Ok(None);
    };
    let info: ExitInfo = serde_json::from_str(&text).map_err(|e| NodeError::Data {
        path,
        why: e.to_string(),
    })?;
    let data = format!("{}.{}", info.return_code, info.signal);
    Ok(Some(Event::now(instance, EventKind::Finished, &data)))
}

fn read_marker(path: &Path) -> Result<Option<String>, NodeError> {
    match fs::read(path) {
        Ok(bytes) => Ok(Some(String::from_utf8_lossy(&bytes).into_owned())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(NodeError::io(path)(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::node::manifest::{EphemeralPorts, Manifest, Service};

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
        assert_eq!(
            f.posted(),
            [(EventKind::Finished, "3.9".into(), String::new())]
        );
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
    fn broken_exitinfo_is_an_error_not_an_event() {
        let f = Fixture::new();
        f.marker(EXITINFO, "{");
        assert!(finish(f.root.path(), &f.container).is_err());
        assert!(f.posted().is_empty());
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

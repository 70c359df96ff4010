//! Configure: from a placed instance's manifest to a container directory
//! linked into `running/`.
//!
//! The order of the steps is what makes a crash harmless. Nothing is made
//! before the manifest is known to be valid. The container directory's name
//! is a function of the manifest file, so a rerun finds the directory it
//! started and completes it; each file is written atomically; the
//! `running/` link comes last but one, so the supervisor never sees half a
//! container; the `configured` event is last, with a marker so that it is
//! posted once even if the link was made just before a crash.

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Read};

use crate::safe_fs::{self, ReadError};
use crate::tree::names::{PLACEMENT, SCHEDULED};

use serde_yaml::{Mapping, Value};
use thiserror::Error;

use super::finish::{self, TERMINATED};
use super::manifest::{self, AppJson, Manifest};
use super::script::{self, RunWhat};
use super::unique::{self, Instance, Stamp};
use super::{files, Added, ConfigProblem, Event, EventKind, Inner, NodeError};

/// How many unique ids of one manifest file are tried before giving up:
/// each costs a whole placement of the same file that ended.
const MAX_GENERATIONS: u32 = 64;

/// Marker: the `configured` event of this container has been posted.
const CONFIGURED_POSTED: &str = ".configured-posted";

/// A valid manifest with what the container keeps of it.
pub(super) struct Loaded {
    /// The manifest as written, with the placement's data added.
    pub doc: Mapping,
    /// The validated manifest.
    pub manifest: Manifest,
    /// What the unique id is derived from.
    pub stamp: Stamp,
}

/// What is wrong with an instance's manifest (`rel` is its path under the
/// tree): the instance is aborted with reason `invalid-manifest`.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub(super) enum ManifestError {
    /// There is no manifest.
    #[error("{rel}: no such manifest")]
    Missing { rel: String },
    /// It is not a regular file, or is too large; what was found.
    #[error("{rel}: {refused}")]
    Refused { rel: String, refused: String },
    /// It is not UTF-8 text.
    #[error("{rel}: not UTF-8")]
    NotUtf8 { rel: String },
    /// It does not validate; every problem found.
    #[error("{rel}: {}", problems.join("; "))]
    Invalid { rel: String, problems: Vec<String> },
}

impl Inner {
    /// Reads and validates `scheduled/<instance>`. The inner `Err` is a
    /// problem with the manifest itself, for an `aborted` event; the outer
    /// one a failure to read it at all.
    pub(super) fn load_manifest(
        &self,
        inst: &Instance,
    ) -> Result<Result<Loaded, ManifestError>, NodeError> {
        let rel = format!("{SCHEDULED}/{}", inst.name());
        let path = self.config.fs_root.join(&rel);
        // Only a regular file is a manifest (the mirror writes nothing
        // else): a FIFO must not stall the node, a link must not lead out.
        let file = match safe_fs::open_regular(&path, safe_fs::MAX_FILE) {
            Ok((file, _)) => file,
            Err(ReadError::NotFound) => return Ok(Err(ManifestError::Missing { rel })),
            Err(ReadError::Io(e)) => return Err(NodeError::io(&path)(e)),
            Err(refused) => {
                tracing::warn!(path = %path.display(), problem = %refused, "manifest refused");
                let refused = refused.to_string();
                return Ok(Err(ManifestError::Refused { rel, refused }));
            }
        };
        // The stamp comes from the file that was read, not from whatever
        // the name points to a moment later.
        let meta = file.metadata().map_err(NodeError::io(&path))?;
        let mut bytes = Vec::new();
        file.take(safe_fs::MAX_FILE + 1)
            .read_to_end(&mut bytes)
            .map_err(NodeError::io(&path))?;
        if bytes.len() as u64 > safe_fs::MAX_FILE {
            let refused = ReadError::TooLarge {
                size: bytes.len() as u64,
                cap: safe_fs::MAX_FILE,
            };
            tracing::warn!(path = %path.display(), problem = %refused, "manifest refused");
            let refused = refused.to_string();
            return Ok(Err(ManifestError::Refused { rel, refused }));
        }
        let Ok(text) = String::from_utf8(bytes) else {
            return Ok(Err(ManifestError::NotUtf8 { rel }));
        };
        let (mut doc, manifest) = match manifest::parse(inst, &text) {
            Ok(parsed) => parsed,
            Err(problems) => return Ok(Err(ManifestError::Invalid { rel, problems })),
        };
        for (key, value) in self.placement_data(inst) {
            // The manifest was validated as it is: placement data only adds.
            if !doc.contains_key(&key) {
                doc.insert(key, value);
            }
        }
        Ok(Ok(Loaded {
            doc,
            manifest,
            stamp: Stamp::of(&meta),
        }))
    }

    /// The content of `placement/<hostname>/<instance>` (expiry, identity,
    /// ...): a mapping, or nothing when it is absent, empty or unreadable.
    fn placement_data(&self, inst: &Instance) -> Mapping {
        let path = self
            .config
            .fs_root
            .join(PLACEMENT)
            .join(self.config.hostname.as_str())
            .join(inst.name());
        let text = match safe_fs::read_regular(&path, safe_fs::MAX_FILE) {
            Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
            Err(ReadError::NotFound) => return Mapping::new(),
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "placement data unreadable");
                return Mapping::new();
            }
        };
        match serde_yaml::from_str::<Value>(&text) {
            Ok(Value::Mapping(map)) => map,
            Ok(Value::Null) => Mapping::new(),
            Ok(_) | Err(_) => {
                tracing::warn!(path = %path.display(), "placement data is not a mapping; ignored");
                Mapping::new()
            }
        }
    }

    /// Makes (or completes) the container of a valid manifest, links it
    /// into `running/` and posts `configured`. Called with the fs lock held.
    pub(super) fn configure(
        &self,
        inst: &Instance,
        loaded: &Loaded,
        gmsa: bool,
    ) -> Result<Added, NodeError> {
        let unique_id = self.choose_unique_id(inst, &loaded.stamp)?;
        let unique_name = inst.unique_name(&unique_id);
        let dir = self.container_dir(&unique_name);
        let created = match fs::create_dir(&dir) {
            Ok(()) => true,
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => false,
            Err(e) => return Err(NodeError::io(&dir)(e)),
        };
        if let Err(err) = self.write_container(inst, loaded, gmsa, &unique_id) {
            if created {
                // Leave nothing half-made that a later attempt would not redo.
                let _ = fs::remove_dir_all(&dir);
                let _ = files::remove_file_if_exists(&self.credential_spec_path(&unique_name));
            }
            return Err(err);
        }
        let link = self.layout.running.join(inst.name());
        let target = std::path::Path::new("..")
            .join(super::APPS_DIR)
            .join(&unique_name);
        files::symlink_atomic(&target, &link).map_err(NodeError::io(&link))?;
        self.ensure_configured_event(inst, &unique_name)?;
        tracing::info!(instance = %inst, %unique_name, resumed = !created, gmsa, "configured");
        Ok(Added::Configured {
            unique_name,
            container_dir: dir,
            resumed: !created,
        })
    }

    /// The unique id for a manifest: the first of its ids whose directory is
    /// free or an unfinished earlier attempt (to be completed). Ids of
    /// containers that already stopped are skipped, so a second placement
    /// of the same unchanged manifest still gets a new one.
    fn choose_unique_id(&self, inst: &Instance, stamp: &Stamp) -> Result<String, NodeError> {
        for generation in 0..MAX_GENERATIONS {
            let id = unique::unique_id(stamp, inst.number(), generation);
            let name = inst.unique_name(&id);
            if !files::exists(&self.container_dir(&name)) || !self.is_stopped(&name) {
                return Ok(id);
            }
        }
        Err(NodeError::Data {
            path: self.layout.apps.clone(),
            why: format!(
                "{MAX_GENERATIONS} containers of {inst} from one manifest file; rewrite it"
            ),
        })
    }

    /// True for a container that ended or was told to: it is in `cleanup/`,
    /// or its `data/` holds `terminated`, `exitinfo`, `aborted` or `oom`.
    pub(super) fn is_stopped(&self, unique_name: &str) -> bool {
        let dir = self.container_dir(unique_name);
        files::exists(&self.layout.cleanup.join(unique_name))
            || files::marker(&dir.join("data").join(TERMINATED))
            || finish::is_finished(&dir)
    }

    fn write_container(
        &self,
        inst: &Instance,
        loaded: &Loaded,
        gmsa: bool,
        unique_id: &str,
    ) -> Result<(), NodeError> {
        let unique_name = inst.unique_name(unique_id);
        let dir = self.container_dir(&unique_name);
        let dir_str = dir
            .to_str()
            .ok_or_else(|| ConfigProblem::NotUtf8 { path: dir.clone() })?;
        for sub in ["data", "log"] {
            let path = dir.join(sub);
            fs::create_dir_all(&path).map_err(NodeError::io(&path))?;
        }
        let write = |path: std::path::PathBuf, content: &[u8], mode: u32| {
            files::write_atomic(&path, content, mode).map_err(NodeError::io(&path))
        };

        let credential_spec = if gmsa {
            let Some(domain) = &self.config.domain else {
                panic!("BUG: Node::new requires domain facts when proids may have a gMSA");
            };
            let path = self.credential_spec_path(&unique_name);
            write(
                path.clone(),
                domain.credential_spec(inst.proid().as_str()).as_bytes(),
                0o644,
            )?;
            path.to_str().map(str::to_owned)
        } else {
            None
        };

        let manifest_yml = serde_yaml::to_string(&loaded.doc).map_err(|e| NodeError::Data {
            path: dir.join("data/manifest.yml"),
            why: e.to_string(),
        })?;
        write(
            dir.join("data/manifest.yml"),
            manifest_yml.as_bytes(),
            0o644,
        )?;

        let app = AppJson {
            name: inst.name().to_owned(),
            app: inst.app().to_owned(),
            task: inst.task().to_owned(),
            uniqueid: unique_id.to_owned(),
            credential_spec: credential_spec.clone(),
            manifest: loaded.manifest.clone(),
        };
        let app_json = serde_json::to_string_pretty(&app).map_err(|e| NodeError::Data {
            path: dir.join("data/app.json"),
            why: e.to_string(),
        })? + "\n";
        write(dir.join("data/app.json"), app_json.as_bytes(), 0o644)?;

        let services = &loaded.manifest.services;
        let rendered;
        let what = match &self.run_template {
            Some(template) => {
                rendered = template.render(&run_values(dir_str, inst, credential_spec.as_deref()));
                RunWhat::Command(&rendered)
            }
            None => RunWhat::Services(services),
        };
        let run = script::run_script(inst.name(), dir_str, &loaded.manifest.environ, what);
        let service = match services.as_slice() {
            [one] => one.name.as_str(),
            _ => inst.app_short(),
        };
        let app_root = self.config.app_root.to_str().unwrap_or_default();
        let finish_command = self
            .finish_template
            .render(&std::collections::BTreeMap::from([
                ("container_dir", dir_str.to_owned()),
                ("app_root", app_root.to_owned()),
            ]));
        let names: Vec<&str> = services.iter().map(|s| s.name.as_str()).collect();
        let finish = script::finish_script(inst.name(), dir_str, service, &names, &finish_command);
        write(dir.join("run"), run.as_bytes(), 0o755)?;
        write(dir.join("finish"), finish.as_bytes(), 0o755)?;
        write(
            dir.join("log/run"),
            script::log_run_script(inst.name(), dir_str).as_bytes(),
            0o755,
        )?;
        write(dir.join("type"), b"longrun\n", 0o644)?;
        Ok(())
    }

    /// Posts `configured` for a container unless that was done already.
    pub(super) fn ensure_configured_event(
        &self,
        inst: &Instance,
        unique_name: &str,
    ) -> Result<(), NodeError> {
        let marker = self
            .container_dir(unique_name)
            .join("data")
            .join(CONFIGURED_POSTED);
        if files::marker(&marker) {
            return Ok(());
        }
        let unique_id = unique_name
            .strip_prefix(&inst.unique_prefix())
            .unwrap_or(unique_name);
        let event = Event::now(inst.name(), EventKind::Configured, unique_id);
        super::events::post(&self.layout.appevents, &event)
            .map_err(NodeError::io(&self.layout.appevents))?;
        files::touch(&marker).map_err(NodeError::io(&marker))
    }
}

/// Values for the run command's placeholders.
fn run_values(
    container_dir: &str,
    inst: &Instance,
    credential_spec: Option<&str>,
) -> BTreeMap<&'static str, String> {
    BTreeMap::from([
        ("container_dir", container_dir.to_owned()),
        ("instance", inst.name().to_owned()),
        ("proid", inst.proid().as_str().to_owned()),
        (
            "credential_spec",
            credential_spec.unwrap_or_default().to_owned(),
        ),
    ])
}

#[cfg(test)]
mod tests {
    use super::super::testing::{TestNode, MANIFEST};
    use super::super::{DomainInfo, GmsaProids, Node};
    use super::*;

    #[tokio::test]
    async fn placement_data_adds_to_the_manifest_but_never_overrides_it() {
        let t = TestNode::new();
        t.schedule("proid1.web#1", MANIFEST);
        t.place(
            "proid1.web#1",
            r#"{"expires": 5, "proid": "root", "identity": 0}"#,
        );
        let Added::Configured { container_dir, .. } = t
            .node
            .placement_added("proid1.web#1")
            .await
            .expect("configure")
        else {
            panic!("not configured");
        };
        let text = fs::read_to_string(container_dir.join("data/manifest.yml")).expect("read");
        let doc: Mapping = serde_yaml::from_str(&text).expect("yaml");
        assert_eq!(doc.get("proid"), Some(&Value::from("proid1")));
        assert_eq!(doc.get("expires"), Some(&Value::from(5)));
        assert_eq!(doc.get("identity"), Some(&Value::from(0)));
        assert_eq!(doc.get("command"), Some(&Value::from("exec sleep 100")));
    }

    #[tokio::test]
    async fn unreadable_placement_data_is_ignored() {
        let t = TestNode::new();
        t.schedule("proid1.web#1", MANIFEST);
        t.place("proid1.web#1", "[not, a, mapping]");
        let added = t
            .node
            .placement_added("proid1.web#1")
            .await
            .expect("configure");
        assert!(matches!(added, Added::Configured { .. }), "{added:?}");
    }

    #[tokio::test]
    async fn an_interrupted_configuration_is_completed_in_the_same_directory() {
        let t = TestNode::new();
        t.schedule("proid1.web#1", MANIFEST);
        let name = t.first_unique_name("proid1.web#1");
        // As if a crash hit after the directory and one file were made.
        let dir = t.inner().container_dir(&name);
        fs::create_dir_all(dir.join("data")).expect("mkdir");
        fs::write(dir.join("type"), "longrun\n").expect("write");
        let added = t
            .node
            .placement_added("proid1.web#1")
            .await
            .expect("configure");
        assert_eq!(
            added,
            Added::Configured {
                unique_name: name.clone(),
                container_dir: dir.clone(),
                resumed: true
            }
        );
        assert!(dir.join("run").is_file() && dir.join("data/app.json").is_file());
        assert_eq!(
            files::data_names(&t.inner().layout.apps).expect("list"),
            [name]
        );
    }

    #[tokio::test]
    async fn a_failed_configuration_leaves_nothing_behind() {
        let t = TestNode::new();
        t.schedule("proid1.web#1", MANIFEST);
        let name = t.first_unique_name("proid1.web#1");
        let mut config = t.node.config().clone();
        config.gmsa_proids = GmsaProids::Glob(glob::Pattern::new("*").expect("glob"));
        config.domain = Some(DomainInfo {
            dns_name: "ad.test".into(),
            netbios_name: "AD".into(),
            sid: "S-1-5-21-1-2-3".into(),
            guid: "a4d38f1d-39aa-4db3-9fbb-3d1c6a1f3b4e".into(),
            dns_tree_name: "ad.test".into(),
        });
        let node = Node::new(config.clone(), None).expect("node");
        // A directory where the credential spec must go makes the
        // configuration fail after its container directory was made.
        let spec = config.credential_spec_dir.join(format!("{name}.json"));
        fs::create_dir_all(spec.join("in-the-way")).expect("mkdir");
        assert!(node.placement_added("proid1.web#1").await.is_err());
        let layout = node.layout();
        for dir in [&layout.apps, &layout.running, &layout.appevents] {
            assert!(
                files::data_names(dir).expect("list").is_empty(),
                "{}",
                dir.display()
            );
        }
        // Once the obstacle is gone, a retry succeeds in the same place.
        fs::remove_dir_all(&spec).expect("rm");
        let added = node.placement_added("proid1.web#1").await.expect("retry");
        assert!(
            matches!(&added, Added::Configured { unique_name, resumed: false, .. } if *unique_name == name),
            "{added:?}"
        );
        assert!(spec.is_file());
    }
}

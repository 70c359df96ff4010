//! App manifests: the YAML file `scheduled/<instance>` checked into a
//! [`Manifest`] with every optional part filled in, and the `app.json` a
//! container directory keeps.
//!
//! Validation collects every problem rather than stopping at the first, so
//! the `aborted` event of an invalid manifest tells the operator all that is
//! wrong in one go. Nothing here touches the file system.

use serde::{Deserialize, Serialize};
use serde_yaml::{Mapping, Value};

use super::unique::Instance;

/// The environments an app may run in.
pub const ENVIRONMENTS: &[&str] = &["dev", "qa", "uat", "prod"];

/// A validated manifest with defaults filled in.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// The service account the app runs as; equal to the instance's proid.
    pub proid: String,
    /// One of [`ENVIRONMENTS`].
    pub environment: String,
    /// CPU share, `N%`.
    pub cpu: String,
    /// Memory limit, a size such as `512M`.
    pub memory: String,
    /// Disk quota, a size such as `1G`.
    pub disk: String,
    /// The services to run, at least one; a manifest's `command` becomes one
    /// service named after the app.
    pub services: Vec<Service>,
    /// Environment variables for the services, in the manifest's order.
    pub environ: Vec<EnvVar>,
    /// Ports the app listens on.
    pub endpoints: Vec<Endpoint>,
    /// How many ephemeral ports to reserve.
    pub ephemeral_ports: EphemeralPorts,
}

/// One service of an app.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Service {
    /// Its name: letters, digits, `_`, `.`, `-` in a `services` list; the
    /// service of a `command` has the app's short name, as it is.
    pub name: String,
    /// The command, run by `/bin/sh -c`.
    pub command: String,
}

/// One environment variable.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnvVar {
    /// A shell variable name.
    pub name: String,
    /// Its value.
    pub value: String,
}

/// One endpoint of an app.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Endpoint {
    /// Its name, unique within the app.
    pub name: String,
    /// The port, 1 to 65535.
    pub port: u16,
    /// `tcp` (the default) or `udp`.
    pub proto: String,
}

/// Numbers of ephemeral ports.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EphemeralPorts {
    /// TCP ports.
    pub tcp: u16,
    /// UDP ports.
    pub udp: u16,
}

/// What a container directory records about its app in `data/app.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppJson {
    /// The instance name, `<proid>.<app>#<task>`.
    pub name: String,
    /// `<proid>.<app>`.
    pub app: String,
    /// The task, the digits after `#`.
    pub task: String,
    /// The 13-character unique id of this placement.
    pub uniqueid: String,
    /// The container's credential spec file, when the proid has a gMSA.
    pub credential_spec: Option<String>,
    /// The validated manifest.
    #[serde(flatten)]
    pub manifest: Manifest,
}

/// Parses and validates manifest text for an instance. On success returns
/// the document as written (to be kept with the container) and the
/// validated manifest; on failure, every problem found.
pub fn parse(instance: &Instance, text: &str) -> Result<(Mapping, Manifest), Vec<String>> {
    let doc: Value = serde_yaml::from_str(text).map_err(|e| vec![format!("not YAML: {e}")])?;
    let Value::Mapping(doc) = doc else {
        return Err(vec!["not a mapping".to_owned()]);
    };
    let manifest = validate(instance, &doc)?;
    Ok((doc, manifest))
}

/// Validates a manifest document for an instance.
pub fn validate(instance: &Instance, doc: &Mapping) -> Result<Manifest, Vec<String>> {
    let mut v = Validator {
        doc,
        problems: Vec::new(),
    };
    let proid = v.required_string("proid").unwrap_or_default();
    if !proid.is_empty() && proid != instance.proid().as_str() {
        v.problem(format!(
            "`proid` {proid:?} is not the instance's proid {:?}",
            instance.proid().as_str()
        ));
    }
    let environment = v.required_string("environment").unwrap_or_default();
    if !environment.is_empty() && !ENVIRONMENTS.contains(&environment.as_str()) {
        v.problem(format!(
            "`environment` {environment:?} is not one of {}",
            ENVIRONMENTS.join(", ")
        ));
    }
    let cpu = v.required_scalar("cpu").unwrap_or_default();
    if !cpu.is_empty() && !is_percentage(&cpu) {
        v.problem(format!("`cpu` {cpu:?} is not a percentage such as 100%"));
    }
    let memory = v.size("memory");
    let disk = v.size("disk");
    let services = v.services(instance);
    let environ = v.environ();
    let endpoints = v.endpoints();
    let ephemeral_ports = v.ephemeral_ports();
    if v.problems.is_empty() {
        Ok(Manifest {
            proid,
            environment,
            cpu,
            memory,
            disk,
            services,
            environ,
            endpoints,
            ephemeral_ports,
        })
    } else {
        Err(v.problems)
    }
}

struct Validator<'a> {
    doc: &'a Mapping,
    problems: Vec<String>,
}

impl<'a> Validator<'a> {
    fn problem(&mut self, problem: String) {
        self.problems.push(problem);
    }

    fn get(&self, key: &str) -> Option<&'a Value> {
        let doc: &'a Mapping = self.doc;
        doc.get(key).filter(|v| !v.is_null())
    }

    fn required_string(&mut self, key: &str) -> Option<String> {
        match self.get(key) {
            None => {
                self.problem(format!("missing `{key}`"));
                None
            }
            Some(Value::String(s)) if !s.is_empty() => Some(s.clone()),
            Some(_) => {
                self.problem(format!("`{key}` must be a non-empty string"));
                None
            }
        }
    }

    fn required_scalar(&mut self, key: &str) -> Option<String> {
        match self.get(key) {
            None => {
                self.problem(format!("missing `{key}`"));
                None
            }
            Some(value) => match scalar(value) {
                Some(s) if !s.is_empty() => Some(s),
                _ => {
                    self.problem(format!("`{key}` must be a non-empty scalar"));
                    None
                }
            },
        }
    }

    fn size(&mut self, key: &str) -> String {
        let value = self.required_scalar(key).unwrap_or_default();
        if !value.is_empty() && !is_size(&value) {
            self.problem(format!(
                "`{key}` {value:?} is not a size such as 512M or 2G"
            ));
        }
        value
    }

    fn services(&mut self, instance: &Instance) -> Vec<Service> {
        match (self.get("services"), self.get("command")) {
            (Some(_), Some(_)) => {
                self.problem("give either `services` or `command`, not both".to_owned());
                Vec::new()
            }
            (None, None) => {
                self.problem("missing `services` (or `command`)".to_owned());
                Vec::new()
            }
            (None, Some(Value::String(command))) if !command.trim().is_empty() => {
                let name = instance.app_short().to_owned();
                vec![Service {
                    name,
                    command: command.clone(),
                }]
            }
            (None, Some(_)) => {
                self.problem("`command` must be a non-empty string".to_owned());
                Vec::new()
            }
            (Some(Value::Sequence(list)), None) if !list.is_empty() => {
                let mut services: Vec<Service> = Vec::new();
                for (i, item) in list.iter().enumerate() {
                    let name = field_string(item, "name");
                    let command = field_string(item, "command");
                    match (name, command) {
                        (Some(name), Some(command)) if !command.trim().is_empty() => {
                            if !is_name(&name) {
                                self.problem(format!(
                                    "service {name:?}: a name is letters, digits, '_', '.' and '-'"
                                ));
                            } else if services.iter().any(|s| s.name == name) {
                                self.problem(format!("service {name:?} is listed twice"));
                            }
                            services.push(Service { name, command });
                        }
                        _ => self.problem(format!(
                            "`services[{i}]` must be a mapping with a `name` and a non-empty `command`"
                        )),
                    }
                }
                services
            }
            (Some(_), None) => {
                self.problem("`services` must be a non-empty list of {name, command}".to_owned());
                Vec::new()
            }
        }
    }

    fn environ(&mut self) -> Vec<EnvVar> {
        let mut environ: Vec<EnvVar> = Vec::new();
        let pairs: Vec<(Option<String>, Option<String>)> = match self.get("environ") {
            None => return environ,
            Some(Value::Sequence(list)) => list
                .iter()
                .map(|item| (field_string(item, "name"), field_scalar(item, "value")))
                .collect(),
            Some(Value::Mapping(map)) => map
                .iter()
                .map(|(k, v)| (k.as_str().map(str::to_owned), scalar_or_empty(v)))
                .collect(),
            Some(_) => {
                self.problem("`environ` must be a list of {name, value} or a mapping".to_owned());
                return environ;
            }
        };
        for (i, pair) in pairs.into_iter().enumerate() {
            match pair {
                (Some(name), Some(value)) => {
                    if !is_env_name(&name) {
                        self.problem(format!("environ {name:?} is not a variable name"));
                    } else if environ.iter().any(|e| e.name == name) {
                        self.problem(format!("environ {name:?} is given twice"));
                    }
                    environ.push(EnvVar { name, value });
                }
                _ => self.problem(format!(
                    "`environ[{i}]` must have a `name` and a scalar `value`"
                )),
            }
        }
        environ
    }

    fn endpoints(&mut self) -> Vec<Endpoint> {
        let mut endpoints: Vec<Endpoint> = Vec::new();
        let list = match self.get("endpoints") {
            None => return endpoints,
            Some(Value::Sequence(list)) => list,
            Some(_) => {
                self.problem("`endpoints` must be a list of {name, port}".to_owned());
                return endpoints;
            }
        };
        for (i, item) in list.iter().enumerate() {
            let name = field_string(item, "name");
            let port = item
                .get("port")
                .and_then(Value::as_u64)
                .and_then(|p| u16::try_from(p).ok())
                .filter(|&p| p > 0);
            let proto = match item.get("proto") {
                None | Some(Value::Null) => Some("tcp".to_owned()),
                Some(Value::String(p)) if p == "tcp" || p == "udp" => Some(p.clone()),
                Some(_) => None,
            };
            match (name, port, proto) {
                (Some(name), Some(port), Some(proto)) => {
                    if !is_name(&name) {
                        self.problem(format!(
                            "endpoint {name:?}: a name is letters, digits, '_', '.' and '-'"
                        ));
                    } else if endpoints.iter().any(|e| e.name == name) {
                        self.problem(format!("endpoint {name:?} is listed twice"));
                    }
                    endpoints.push(Endpoint { name, port, proto });
                }
                _ => self.problem(format!(
                    "`endpoints[{i}]` needs a `name`, a `port` from 1 to 65535 and a `proto` of tcp or udp"
                )),
            }
        }
        endpoints
    }

    fn ephemeral_ports(&mut self) -> EphemeralPorts {
        let Some(value) = self.get("ephemeral_ports") else {
            return EphemeralPorts::default();
        };
        let count = |key: &str| match value.get(key) {
            None | Some(Value::Null) => Some(0),
            Some(v) => v.as_u64().and_then(|n| u16::try_from(n).ok()),
        };
        match (value.is_mapping(), count("tcp"), count("udp")) {
            (true, Some(tcp), Some(udp)) => EphemeralPorts { tcp, udp },
            _ => {
                self.problem(
                    "`ephemeral_ports` must be a mapping of `tcp` and `udp` to counts".to_owned(),
                );
                EphemeralPorts::default()
            }
        }
    }
}

/// A scalar as text: sizes and values may be written as numbers or booleans.
fn scalar(value: &Value) -> Option<String> {
    match value {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

fn scalar_or_empty(value: &Value) -> Option<String> {
    if value.is_null() {
        Some(String::new())
    } else {
        scalar(value)
    }
}

fn field_string(item: &Value, key: &str) -> Option<String> {
    item.get(key).and_then(Value::as_str).map(str::to_owned)
}

fn field_scalar(item: &Value, key: &str) -> Option<String> {
    if !item.is_mapping() {
        return None;
    }
    scalar_or_empty(item.get(key).unwrap_or(&Value::Null))
}

/// `N%` with N a positive whole number.
fn is_percentage(s: &str) -> bool {
    s.strip_suffix('%').is_some_and(|n| {
        !n.is_empty()
            && n.bytes().all(|b| b.is_ascii_digit())
            && n.parse::<u64>().is_ok_and(|n| n > 0)
    })
}

/// A positive whole number of bytes, optionally followed by K, M, G or T
/// (either case) and an optional B.
fn is_size(s: &str) -> bool {
    let s = s.strip_suffix(['B', 'b']).unwrap_or(s);
    let digits = s
        .strip_suffix(['K', 'M', 'G', 'T', 'k', 'm', 'g', 't'])
        .unwrap_or(s);
    !digits.is_empty()
        && digits.bytes().all(|b| b.is_ascii_digit())
        && digits.parse::<u64>().is_ok_and(|n| n > 0)
}

/// Service and endpoint names: they become file names and script words.
fn is_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && !s.starts_with('.')
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

/// A POSIX shell variable name.
fn is_env_name(s: &str) -> bool {
    let mut bytes = s.bytes();
    bytes
        .next()
        .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn instance() -> Instance {
        Instance::parse("proid1.web#0000000001").expect("valid instance")
    }

    fn check(text: &str) -> Result<Manifest, Vec<String>> {
        parse(&instance(), text).map(|(_, m)| m)
    }

    const GOOD: &str = "
proid: proid1
environment: prod
cpu: 50%
memory: 512M
disk: 1G
services:
  - name: web
    command: exec python3 -m http.server
";

    #[test]
    fn a_minimal_manifest_gets_its_defaults() {
        let m = check(GOOD).expect("valid");
        assert_eq!(m.proid, "proid1");
        assert_eq!(m.environment, "prod");
        assert_eq!(m.cpu, "50%");
        assert_eq!((m.memory.as_str(), m.disk.as_str()), ("512M", "1G"));
        assert_eq!(
            m.services,
            [Service {
                name: "web".into(),
                command: "exec python3 -m http.server".into()
            }]
        );
        assert!(m.environ.is_empty() && m.endpoints.is_empty());
        assert_eq!(m.ephemeral_ports, EphemeralPorts::default());
    }

    #[test]
    fn command_becomes_a_service_named_after_the_app() {
        let text = GOOD.replace(
            "services:\n  - name: web\n    command: exec python3 -m http.server\n",
            "command: sleep 1000\n",
        );
        let m = check(&text).expect("valid");
        assert_eq!(
            m.services,
            [Service {
                name: "web".into(),
                command: "sleep 1000".into()
            }]
        );
    }

    /// Found by the `manifest` fuzz target
    /// (fuzz/corpus/manifest/crash-command-named-after-any-app): the service
    /// of a `command` is named after the app, whose name may hold what a
    /// listed service's may not (`+`, `*`, `(`, more than 64 bytes). It
    /// runs under that name; the scripts quote it.
    #[test]
    fn a_command_service_takes_the_app_name_as_it_is() {
        let text = GOOD.replace(
            "services:\n  - name: web\n    command: exec python3 -m http.server\n",
            "command: sleep 1000\n",
        );
        let long = format!("proid1.{}#1", "a".repeat(80));
        for name in ["proid1.a+p(*)#1", &long] {
            let inst = Instance::parse(name).expect("valid instance");
            let (_, m) = parse(&inst, &text).expect("valid");
            assert_eq!(m.services[0].name, inst.app_short());
            assert!(!is_name(inst.app_short()));
        }
    }

    #[test]
    fn optional_parts_are_read() {
        let text = format!(
            "{GOOD}environ:\n  - {{name: A, value: x y}}\n  - {{name: B_2, value: 3}}\n\
             endpoints:\n  - {{name: http, port: 8000}}\n  - {{name: dns, port: 53, proto: udp}}\n\
             ephemeral_ports: {{tcp: 2}}\n"
        );
        let m = check(&text).expect("valid");
        assert_eq!(
            m.environ,
            [
                EnvVar {
                    name: "A".into(),
                    value: "x y".into()
                },
                EnvVar {
                    name: "B_2".into(),
                    value: "3".into()
                }
            ]
        );
        assert_eq!(m.endpoints[0].proto, "tcp");
        assert_eq!(m.endpoints[1].port, 53);
        assert_eq!(m.ephemeral_ports, EphemeralPorts { tcp: 2, udp: 0 });
        let as_map = format!("{GOOD}environ: {{A: x}}\n");
        assert_eq!(check(&as_map).expect("valid").environ[0].value, "x");
    }

    #[test]
    fn every_problem_is_reported() {
        let problems = check("cpu: lots\nmemory: 0\nservices: []\n").expect_err("invalid");
        let all = problems.join("\n");
        for want in [
            "missing `proid`",
            "missing `environment`",
            "`cpu` \"lots\"",
            "`memory` \"0\"",
            "missing `disk`",
            "`services` must be a non-empty list",
        ] {
            assert!(all.contains(want), "{want:?} not in:\n{all}");
        }
    }

    #[test]
    fn invalid_values_are_rejected() {
        let cases = [
            ("environment: prod", "environment: live", "`environment`"),
            ("proid: proid1", "proid: proid2", "not the instance's proid"),
            ("cpu: 50%", "cpu: 50", "`cpu`"),
            ("memory: 512M", "memory: 512X", "`memory`"),
            ("name: web", "name: 'we b'", "a name is"),
            ("command: exec", "command: ''\n    x: exec", "`services[0]`"),
        ];
        for (from, to, want) in cases {
            let text = GOOD.replace(from, to);
            let problems = check(&text).expect_err(&text).join("\n");
            assert!(problems.contains(want), "{want:?} not in {problems:?}");
        }
        for (extra, want) in [
            ("command: x\n", "not both"),
            ("environ: [{name: 1A, value: x}]\n", "not a variable name"),
            ("environ: 5\n", "`environ` must be"),
            ("endpoints: [{name: a, port: 70000}]\n", "`endpoints[0]`"),
            (
                "endpoints: [{name: a, port: 1, proto: sctp}]\n",
                "`endpoints[0]`",
            ),
            ("ephemeral_ports: {tcp: -1}\n", "`ephemeral_ports`"),
        ] {
            let text = format!("{GOOD}{extra}");
            let problems = check(&text).expect_err(&text).join("\n");
            assert!(problems.contains(want), "{want:?} not in {problems:?}");
        }
        assert_eq!(check("- a\n").expect_err("list"), ["not a mapping"]);
        assert!(check("a: [")
            .expect_err("broken")
            .join("")
            .starts_with("not YAML"));
    }

    #[test]
    fn duplicates_are_rejected() {
        let text = GOOD.replace("services:\n", "services:\n  - {name: web, command: x}\n");
        let problems = check(&text).expect_err("duplicate").join("\n");
        assert!(problems.contains("listed twice"), "{problems}");
    }

    #[test]
    fn sizes_and_percentages() {
        for good in ["1", "512M", "2g", "10KB", "3Tb"] {
            assert!(is_size(good), "{good}");
        }
        for bad in ["", "0", "M", "1.5G", "-1M", "1MM", "1 G"] {
            assert!(!is_size(bad), "{bad}");
        }
        assert!(is_percentage("100%") && is_percentage("5%"));
        for bad in ["%", "0%", "5", "5 %", "1.5%"] {
            assert!(!is_percentage(bad), "{bad}");
        }
    }

    #[test]
    fn app_json_flattens_the_manifest() {
        let app = AppJson {
            name: "proid1.web#0000000001".into(),
            app: "proid1.web".into(),
            task: "0000000001".into(),
            uniqueid: "0000000000abc".into(),
            credential_spec: None,
            manifest: check(GOOD).expect("valid"),
        };
        let json = serde_json::to_value(&app).expect("serialise");
        assert_eq!(json["proid"], "proid1");
        assert_eq!(json["services"][0]["name"], "web");
        let back: AppJson = serde_json::from_value(json).expect("read back");
        assert_eq!(back, app);
    }
}

/// Property tests of the manifest parser, at the cases CI can afford; the
/// fuzz target `manifest` (fuzz/) checks the same on any text.
#[cfg(test)]
mod properties {
    use super::*;
    use proptest::prelude::*;

    fn name() -> impl Strategy<Value = String> {
        "[a-zA-Z0-9_-][a-zA-Z0-9_.-]{0,12}"
    }

    /// Text written into YAML through the serialiser, so any of it is fair.
    fn text() -> impl Strategy<Value = String> {
        prop_oneof!["[ a-z0-9:#\\-'\"{}\\[\\]&*!|>%]{1,12}", "\\PC{1,8}"]
            .prop_filter("a command is not blank", |s| !s.trim().is_empty())
    }

    /// A valid manifest for `proid1.web#1` with `services` or `command`.
    fn manifest() -> impl Strategy<Value = Manifest> {
        (
            proptest::sample::select(ENVIRONMENTS),
            1u32..1000,
            (
                1u64..1 << 40,
                proptest::sample::select(&["", "K", "m", "G", "tb"][..]),
            ),
            proptest::collection::btree_map(name(), text(), 1..4),
            proptest::collection::btree_map("[A-Za-z_][A-Za-z0-9_]{0,8}", "\\PC{0,8}", 0..4),
            proptest::collection::btree_map(name(), (1u16.., any::<bool>()), 0..3),
            (any::<u16>(), any::<u16>()),
        )
            .prop_map(
                |(env, cpu, (size, unit), services, environ, endpoints, (tcp, udp))| {
                    let size = format!("{size}{unit}");
                    Manifest {
                        proid: "proid1".into(),
                        environment: env.to_string(),
                        cpu: format!("{cpu}%"),
                        memory: size.clone(),
                        disk: size,
                        services: services
                            .into_iter()
                            .map(|(name, command)| Service { name, command })
                            .collect(),
                        environ: environ
                            .into_iter()
                            .map(|(name, value)| EnvVar { name, value })
                            .collect(),
                        endpoints: endpoints
                            .into_iter()
                            .map(|(name, (port, udp))| Endpoint {
                                name,
                                port,
                                proto: if udp { "udp" } else { "tcp" }.into(),
                            })
                            .collect(),
                        ephemeral_ports: EphemeralPorts { tcp, udp },
                    }
                },
            )
    }

    /// The manifest written as an operator would: YAML, `proto` left out
    /// when it is the default, no empty lists.
    fn write(m: &Manifest) -> String {
        let mut doc = serde_yaml::Mapping::new();
        let mut put = |key: &str, value: Value| {
            doc.insert(Value::String(key.to_owned()), value);
        };
        let s = |text: &str| Value::String(text.to_owned());
        put("proid", s(&m.proid));
        put("environment", s(&m.environment));
        put("cpu", s(&m.cpu));
        put("memory", s(&m.memory));
        put("disk", s(&m.disk));
        let pair = |a: (&str, Value), b: (&str, Value)| {
            Value::Mapping([(s(a.0), a.1), (s(b.0), b.1)].into_iter().collect())
        };
        put(
            "services",
            Value::Sequence(
                m.services
                    .iter()
                    .map(|x| pair(("name", s(&x.name)), ("command", s(&x.command))))
                    .collect(),
            ),
        );
        if !m.environ.is_empty() {
            put(
                "environ",
                Value::Sequence(
                    m.environ
                        .iter()
                        .map(|e| pair(("name", s(&e.name)), ("value", s(&e.value))))
                        .collect(),
                ),
            );
        }
        if !m.endpoints.is_empty() {
            put(
                "endpoints",
                Value::Sequence(
                    m.endpoints
                        .iter()
                        .map(|e| {
                            let mut map = serde_yaml::Mapping::new();
                            map.insert(s("name"), s(&e.name));
                            map.insert(s("port"), Value::Number(e.port.into()));
                            if e.proto != "tcp" {
                                map.insert(s("proto"), s(&e.proto));
                            }
                            Value::Mapping(map)
                        })
                        .collect(),
                ),
            );
        }
        let ports = m.ephemeral_ports;
        put(
            "ephemeral_ports",
            pair(
                ("tcp", Value::Number(ports.tcp.into())),
                ("udp", Value::Number(ports.udp.into())),
            ),
        );
        serde_yaml::to_string(&doc).expect("YAML")
    }

    fn instance() -> Instance {
        Instance::parse("proid1.web#1").expect("valid instance")
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]

        #[test]
        fn a_written_manifest_reads_back(m in manifest()) {
            let text = write(&m);
            let (doc, read) = parse(&instance(), &text).map_err(|p| {
                TestCaseError::fail(format!("{p:?}\n{text}"))
            })?;
            prop_assert_eq!(&read, &m, "{}", text);
            prop_assert_eq!(validate(&instance(), &doc), Ok(m));
        }

        #[test]
        fn one_broken_field_is_reported_and_nothing_accepted(
            m in manifest(),
            (key, bad) in proptest::sample::select(&[
                ("proid", "proid2"),
                ("environment", "live"),
                ("cpu", "0%"),
                ("memory", "1.5G"),
                ("disk", "-1"),
                ("services", "[]"),
                ("environ", "[{name: 1A, value: x}]"),
                ("endpoints", "[{name: a, port: 0}]"),
                ("ephemeral_ports", "{tcp: 70000}"),
            ][..]),
        ) {
            let mut doc: Mapping = serde_yaml::from_str(&write(&m)).expect("YAML");
            let bad_value: Value = serde_yaml::from_str(bad).expect("YAML");
            doc.insert(Value::String(key.to_owned()), bad_value);
            let text = serde_yaml::to_string(&doc).expect("YAML");
            let problems = parse(&instance(), &text).expect_err("a broken manifest");
            prop_assert_eq!(problems.len(), 1, "{:?}", problems);
            prop_assert!(problems[0].contains(key), "{:?} does not name {}", problems, key);
        }

        #[test]
        fn any_text_is_validated_or_refused_with_reasons(text in prop_oneof![
            any::<String>(),
            "[a-z_:\\- \\n\\[\\]{}0-9%]{0,60}",
        ]) {
            match parse(&instance(), &text) {
                Ok((_, m)) => {
                    prop_assert_eq!(m.proid.as_str(), "proid1");
                    prop_assert!(!m.services.is_empty());
                }
                Err(problems) => prop_assert!(!problems.is_empty()),
            }
        }
    }
}

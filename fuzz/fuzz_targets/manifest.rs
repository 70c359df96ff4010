//! The app manifest parser on arbitrary text, for an instance named on the
//! input's first line (a fixed one when that line is not an instance name).
//! It never panics; a refusal lists at least one problem; an accepted
//! manifest keeps every promise its type documents (a listed service's
//! name is checked; a `command`'s service is named after the app), validates
//! to itself again, and survives the JSON of `data/app.json`.
#![no_main]

use gmsa_reconciler::node::manifest::{self, AppJson, ENVIRONMENTS};
use gmsa_reconciler::node::Instance;
use libfuzzer_sys::fuzz_target;

fn is_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && !s.starts_with('.')
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

fn unique<'a>(names: impl Iterator<Item = &'a str>) -> bool {
    let mut seen = std::collections::BTreeSet::new();
    names.into_iter().all(|n| seen.insert(n))
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (first, rest) = text.split_once('\n').unwrap_or((text, ""));
    let (instance, text) = match Instance::parse(first) {
        Ok(instance) => (instance, rest),
        Err(_) => (
            Instance::parse("proid1.web#0000000001").expect("a valid instance name"),
            text,
        ),
    };
    let (doc, m) = match manifest::parse(&instance, text) {
        Ok(parsed) => parsed,
        Err(problems) => {
            assert!(!problems.is_empty(), "refused without a reason");
            return;
        }
    };
    assert_eq!(m.proid, instance.proid().as_str());
    assert!(ENVIRONMENTS.contains(&m.environment.as_str()), "{m:?}");
    assert!(!m.cpu.is_empty() && !m.memory.is_empty() && !m.disk.is_empty());
    assert!(!m.services.is_empty(), "{m:?}");
    // A `command` is one service named after the app, whatever the app's
    // name holds; a listed service's name is checked.
    if doc.contains_key("command") {
        assert_eq!(m.services.len(), 1);
        assert_eq!(m.services[0].name, instance.app_short());
    }
    for service in &m.services {
        assert!(
            doc.contains_key("command") || is_name(&service.name),
            "{service:?}"
        );
        assert!(!service.command.trim().is_empty(), "{service:?}");
    }
    assert!(unique(m.services.iter().map(|s| s.name.as_str())), "{m:?}");
    for endpoint in &m.endpoints {
        assert!(is_name(&endpoint.name), "{endpoint:?}");
        assert!(endpoint.port > 0, "{endpoint:?}");
        assert!(endpoint.proto == "tcp" || endpoint.proto == "udp");
    }
    assert!(unique(m.endpoints.iter().map(|e| e.name.as_str())), "{m:?}");
    for var in &m.environ {
        let mut bytes = var.name.bytes();
        assert!(bytes
            .next()
            .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_'));
        assert!(
            bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_'),
            "{var:?}"
        );
    }
    assert!(unique(m.environ.iter().map(|e| e.name.as_str())), "{m:?}");
    assert_eq!(manifest::validate(&instance, &doc).as_ref(), Ok(&m));
    let app = AppJson {
        name: instance.name().to_owned(),
        app: instance.app().to_owned(),
        task: instance.task().to_owned(),
        uniqueid: "0000000000abc".to_owned(),
        credential_spec: None,
        manifest: m,
    };
    let json = serde_json::to_string(&app).expect("app.json serialises");
    let back: AppJson = serde_json::from_str(&json).expect("app.json reads back");
    assert_eq!(back, app);
});

//! End to end: the binary's `sync` against a real slapd and a real Samba AD
//! DC, on every scenario of `fixtures/scenarios/`, must end where the same
//! `sync` against the scenario's LDIF directory ends: the same exit code,
//! the same groups with the same members (compared as sets of normalised
//! DNs), and the same output (byte for byte on slapd, which holds the
//! scenario's own DNs; DN for DN on Samba, where each scenario lives in an
//! OU of its own under another domain).
//!
//! The LDIF run is the reference, made afresh from the scenario's files;
//! where the scenario's golden files exist (`expected-exit`,
//! `expected-sync.ldif`, `expected-directory.ldif`) the reference must also
//! equal them, so all three backends meet the same golden files. On every
//! backend a second `sync` must change nothing.

mod support;

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;
use std::sync::OnceLock;

use gmsa_reconciler::ldif::{self, Record};
use gmsa_reconciler::model::Dn;
use support::e2e::{self, dn, ldif_groups, read_groups, show, Groups};
use support::scenario::{copy_dir, diff, Scenario};
use support::{fixtures, SambaDc, Slapd};

/// Scenarios whose `sync` stops before it reads the directory (the tree
/// cannot be trusted): nothing to compare against a server. The test fails
/// if this list and the scenarios' behaviour drift apart.
const FAIL_BEFORE_DIRECTORY: [&str; 2] = [
    "016-tree-without-modified-writes-nothing",
    "017-missing-placement-dir-writes-nothing",
];

/// The scenarios' suffix, which is also slapd's.
const SUFFIX: &str = "dc=ad,dc=com";

/// What `sync` did against the scenario's LDIF directory.
struct Reference {
    code: i32,
    stdout: String,
    groups: Groups,
    /// The output of a second `sync` right after.
    again: String,
}

/// Runs `sync` twice on a copy of the scenario with the LDIF backend;
/// `None` for the scenarios that fail before touching the directory.
fn reference(scenario: &Scenario, failures: &mut Vec<String>) -> Option<Reference> {
    let tmp = tempfile::tempdir().expect("temp dir");
    let tree = tmp.path().join("tree");
    copy_dir(&scenario.dir.join("tree"), &tree);
    let directory = tmp.path().join("directory.ldif");
    fs::copy(scenario.dir.join("directory.ldif"), &directory).expect("copy directory");
    let mut args = vec![
        format!("--fs-root={}", tree.display()),
        format!("--directory={}", directory.display()),
    ];
    args.extend(scenario.options());
    let first = sync(&args);
    let after = fs::read_to_string(&directory).expect("directory after sync");
    let again = sync(&args);

    let name = scenario.name.as_str();
    let fails_early = first.0 == 1 && first.1.is_empty();
    let listed = FAIL_BEFORE_DIRECTORY.contains(&name);
    if fails_early != listed {
        failures.push(format!(
            "{name}: sync exit {} with {} output, but the scenario is {}in FAIL_BEFORE_DIRECTORY:\n{}",
            first.0,
            if first.1.is_empty() { "no" } else { "some" },
            if listed { "" } else { "not " },
            first.2
        ));
        return None;
    }
    if fails_early {
        let original =
            fs::read_to_string(scenario.dir.join("directory.ldif")).expect("directory.ldif");
        assert_eq!(
            after, original,
            "{name}: a failed sync wrote to the directory"
        );
        return None;
    }
    let refused = first.1.contains("# refused by the mass-deletion guard");
    if !(first.0 == 0 || (first.0 == 1 && refused)) {
        failures.push(format!(
            "{name}: sync neither succeeded nor was refused (exit {}):\n{}{}",
            first.0, first.1, first.2
        ));
        return None;
    }
    // Whatever the directory's spelling of a DN, one sync converges: a
    // second one has nothing left to change (a refused plan shows its
    // deletions as comments only).
    if again.1.lines().any(|l| l.starts_with("changetype:")) {
        failures.push(format!(
            "{name}: a second sync changed something again:\n{}",
            again.1
        ));
    }
    let reference = Reference {
        code: first.0,
        stdout: first.1,
        groups: ldif_groups(&after),
        again: again.1,
    };
    check_golden(scenario, &reference, failures);
    Some(reference)
}

/// The reference against the scenario's golden files, where they exist.
fn check_golden(scenario: &Scenario, reference: &Reference, failures: &mut Vec<String>) {
    let name = &scenario.name;
    let read = |file: &str| fs::read_to_string(scenario.dir.join(file)).ok();
    if let Some(exit) = read("expected-exit") {
        let code = exit
            .lines()
            .find_map(|l| l.strip_prefix("sync: "))
            .and_then(|c| c.trim().parse::<i32>().ok());
        if code != Some(reference.code) {
            failures.push(format!(
                "{name}: sync exit {} but expected-exit says {code:?}",
                reference.code
            ));
        }
    }
    if let Some(golden) = read("expected-sync.ldif") {
        if golden != reference.stdout {
            failures.push(format!(
                "{name}: LDIF sync output differs from expected-sync.ldif:\n{}",
                diff(&golden, &reference.stdout)
            ));
        }
    }
    if let Some(golden) = read("expected-directory.ldif") {
        let (want, got) = (show(&ldif_groups(&golden)), show(&reference.groups));
        if want != got {
            failures.push(format!(
                "{name}: LDIF directory after sync differs from expected-directory.ldif:\n{}",
                diff(&want, &got)
            ));
        }
    }
}

/// `gmsa-reconciler sync <args>`: `(exit code, stdout, stderr)`.
fn sync(args: &[String]) -> (i32, String, String) {
    let out = e2e::bin()
        .arg("sync")
        .args(args)
        .output()
        .expect("run gmsa-reconciler");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The scenarios to run against servers with their references (made once
/// for the binary), and what is wrong with the references.
fn cases() -> (&'static [(Scenario, Reference)], Vec<String>) {
    type Cases = (Vec<(Scenario, Reference)>, Vec<String>);
    static CASES: OnceLock<Cases> = OnceLock::new();
    let (cases, failures) = CASES.get_or_init(|| {
        let all = Scenario::all();
        assert!(all.len() >= 19, "fixtures/scenarios/ went missing");
        for listed in FAIL_BEFORE_DIRECTORY {
            assert!(
                all.iter().any(|s| s.name == listed),
                "{listed} is listed in FAIL_BEFORE_DIRECTORY but does not exist"
            );
        }
        let mut failures = Vec::new();
        let cases = all
            .into_iter()
            .filter_map(|s| reference(&s, &mut failures).map(|r| (s, r)))
            .collect();
        (cases, failures)
    });
    (cases, failures.clone())
}

fn records(text: &str) -> Vec<Record> {
    ldif::parse(text).expect("valid LDIF")
}

/// An LDIF change record adding `record` (with only `attrs`, when given).
fn add_record(dn: &str, attrs: &[(String, String)]) -> String {
    let mut out = String::new();
    ldif::write_value(&mut out, "dn", dn);
    out += "changetype: add\n";
    for (attr, value) in attrs {
        ldif::write_value(&mut out, attr, value);
    }
    out.push('\n');
    out
}

// ---------------------------------------------------------------------------
// slapd

/// One slapd for the whole binary, holding one scenario's directory at a
/// time (and the account the binary binds as).
struct ScenarioSlapd {
    slapd: Slapd,
    /// What was added for the current scenario, parents first.
    loaded: Vec<String>,
}

impl ScenarioSlapd {
    fn start() -> ScenarioSlapd {
        let slapd = Slapd::start();
        let keep = [dn(SUFFIX), dn(Slapd::SVC_DN)];
        let base = fs::read_to_string(fixtures().join("base.ldif")).expect("base.ldif");
        let loaded = records(&base)
            .into_iter()
            .map(|r| r.dn)
            .filter(|d| !keep.contains(&dn(d)))
            .collect();
        ScenarioSlapd { slapd, loaded }
    }

    /// Replaces whatever is loaded with the scenario's directory (its
    /// suffix entry aside, which slapd already holds).
    fn load(&mut self, scenario: &Scenario) {
        let mut ldif = String::new();
        for entry in self.loaded.drain(..).rev() {
            ldif += &format!("dn: {entry}\nchangetype: delete\n\n");
        }
        let text = fs::read_to_string(scenario.dir.join("directory.ldif")).expect("directory.ldif");
        for record in records(&text) {
            if dn(&record.dn) != dn(SUFFIX) {
                ldif += &add_record(&record.dn, &record.attrs);
                self.loaded.push(record.dn);
            }
        }
        self.slapd.ldapmodify(&ldif);
    }
}

async fn on_slapd(
    server: &mut ScenarioSlapd,
    scenario: &Scenario,
    reference: &Reference,
    failures: &mut Vec<String>,
) {
    let name = &scenario.name;
    server.load(scenario);
    let slapd = &server.slapd;
    let tmp = tempfile::tempdir().expect("temp dir");
    let tree = tmp.path().join("tree");
    copy_dir(&scenario.dir.join("tree"), &tree);
    let password = e2e::password_file(tmp.path(), Slapd::SVC_PASSWORD);
    let mut args = vec![format!("--fs-root={}", tree.display())];
    args.extend(e2e::ldap_args(&slapd.url(), Slapd::SVC_DN, &password));
    args.extend(scenario.options());

    let (code, stdout, stderr) = sync(&args);
    let again = sync(&args);
    let groups = read_groups(
        &slapd.url(),
        slapd.admin_dn(),
        slapd.admin_password(),
        SUFFIX,
    )
    .await;
    if code != reference.code {
        failures.push(format!(
            "{name} on slapd: exit {code}, LDIF exit {}:\n{stderr}",
            reference.code
        ));
    }
    if stdout != reference.stdout {
        failures.push(format!(
            "{name} on slapd: output differs from the LDIF run's:\n{}",
            diff(&reference.stdout, &stdout)
        ));
    }
    if again.1 != reference.again {
        failures.push(format!(
            "{name} on slapd: output of a second sync differs from the LDIF run's:\n{}",
            diff(&reference.again, &again.1)
        ));
    }
    let (want, got) = (show(&reference.groups), show(&groups));
    if want != got {
        failures.push(format!(
            "{name} on slapd: groups differ from the LDIF directory's:\n{}",
            diff(&want, &got)
        ));
    }
}

#[tokio::test]
async fn sync_on_slapd_ends_like_the_ldif_directory() {
    let (cases, mut failures) = cases();
    let mut server = ScenarioSlapd::start();
    for (scenario, reference) in cases {
        on_slapd(&mut server, scenario, reference, &mut failures).await;
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

// ---------------------------------------------------------------------------
// Samba

/// One scenario moved into `OU=S<nnn>,DC=ad,DC=test`: every
/// `dc=ad,dc=com` (in any case) in the directory, the server files and the
/// options becomes that OU's DN, the rest of each DN spelled as before.
struct Moved {
    ou: String,
    /// The normalised suffix of everything moved, with its leading comma.
    norm_suffix: String,
}

impl Moved {
    fn new(scenario: &Scenario) -> Moved {
        let ou = format!("OU=S{},{}", &scenario.name[..3], SambaDc::BASE);
        let norm_suffix = format!(",{}", dn(&ou).normalised());
        Moved { ou, norm_suffix }
    }

    /// Rewrites a text; fails when a spelling of the suffix would be missed.
    fn text(&self, text: &str) -> String {
        let needle = SUFFIX;
        let lower = text.to_ascii_lowercase();
        let mut out = String::new();
        let mut rest = 0;
        while let Some(at) = lower[rest..].find(needle) {
            out += &text[rest..rest + at];
            out += &self.ou;
            rest += at + needle.len();
        }
        out += &text[rest..];
        assert!(
            !out.to_ascii_lowercase().contains("dc=com"),
            "a spelling of {SUFFIX} this test cannot move:\n{text}"
        );
        out
    }

    /// Rewrites an LDIF text record by record, so that base64 values
    /// (non-ASCII DNs) move too.
    fn ldif(&self, text: &str) -> String {
        let moved: Vec<Record> = records(text)
            .into_iter()
            .map(|r| Record {
                dn: self.text(&r.dn),
                attrs: r
                    .attrs
                    .into_iter()
                    .map(|(a, v)| (a, self.text(&v)))
                    .collect(),
            })
            .collect();
        ldif::write(&moved)
    }

    /// A DN read from Samba, back in the scenario's own namespace.
    fn back(&self, moved: &Dn) -> Dn {
        let norm = moved.normalised();
        let inner = norm
            .strip_suffix(&self.norm_suffix)
            .unwrap_or_else(|| panic!("{moved} is not inside {}", self.ou));
        dn(&format!("{inner},{SUFFIX}"))
    }

    fn groups_back(&self, groups: &Groups) -> Groups {
        groups
            .iter()
            .map(|(g, members)| (self.back(g), members.iter().map(|m| self.back(m)).collect()))
            .collect()
    }
}

/// The parts of a DN: the RDNs from the entry up (escapes left as they are).
fn rdns(raw: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let (mut start, mut escaped) = (0, false);
    for (i, c) in raw.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' => escaped = true,
            ',' => {
                out.push(raw[start..i].trim());
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(raw[start..].trim());
    out
}

fn object_class(record: &Record, class: &str) -> bool {
    record
        .attrs
        .iter()
        .any(|(a, v)| a.eq_ignore_ascii_case("objectClass") && v.eq_ignore_ascii_case(class))
}

/// The moved scenario as Samba entries, parents first: the scenario root
/// and every `organizationalUnit` as an OU; every computer, and every DN
/// a group or a server file names that has no entry, as a `contact` (Samba
/// refuses members whose object does not exist); groups with their
/// `sAMAccountName` and members.
/// Returns the change records and the DNs they add, in order.
fn samba_ldif(moved: &Moved, directory: &str, tree: &Path) -> (String, Vec<String>) {
    let records = records(directory);
    let root = dn(&moved.ou);
    // By normalised DN: the spelling to create it with and its kind.
    let mut entries: BTreeMap<Dn, (String, &str)> = BTreeMap::new();
    let mut groups = Vec::new();
    let mut referenced: Vec<String> = Vec::new();
    for record in &records {
        let entry = dn(&record.dn);
        if entry == root || object_class(record, "organizationalUnit") {
            entries.insert(entry, (record.dn.clone(), "ou"));
        } else if object_class(record, "computer") {
            entries.insert(entry, (record.dn.clone(), "contact"));
        } else if object_class(record, "group") {
            referenced.extend(
                record
                    .attrs
                    .iter()
                    .filter(|(a, _)| a.eq_ignore_ascii_case("member"))
                    .map(|(_, v)| v.clone()),
            );
            groups.push(record);
        } else {
            panic!("no Samba counterpart for entry {}", record.dn);
        }
    }
    for file in fs::read_dir(tree.join("servers")).expect("servers/") {
        let path = file.expect("entry").path();
        let text = fs::read_to_string(&path).unwrap_or_default();
        let value: Option<serde_yaml::Value> = serde_yaml::from_str(&text).ok();
        if let Some(nt_dn) = value.as_ref().and_then(|v| v.get("nt.dn")?.as_str()) {
            if Dn::parse(nt_dn).is_ok() {
                referenced.push(nt_dn.to_owned());
            }
        }
    }
    for raw in referenced {
        let parts = rdns(&raw);
        // The object itself, then any missing parent up to the root.
        for depth in 0..parts.len() {
            let spelled = parts[depth..].join(",");
            let entry = dn(&spelled);
            assert!(entry.is_within(&root), "{raw} is outside the scenario");
            if entry == root {
                break;
            }
            let kind = if depth == 0 { "contact" } else { "ou" };
            if kind == "ou" && !parts[depth].to_ascii_lowercase().starts_with("ou=") {
                panic!("{raw}: no Samba counterpart for its parent {spelled}");
            }
            entries.entry(entry).or_insert((spelled, kind));
        }
    }
    let mut ordered: Vec<&(String, &str)> = entries.values().collect();
    ordered.sort_by_key(|(spelled, _)| rdns(spelled).len());
    let mut ldif = String::new();
    let mut added = Vec::new();
    for (spelled, kind) in ordered {
        let class = match *kind {
            "ou" => "organizationalUnit",
            _ => "contact",
        };
        ldif += &add_record(spelled, &[("objectClass".into(), class.into())]);
        added.push(spelled.clone());
    }
    for group in groups {
        let mut attrs = vec![("objectClass".to_owned(), "group".to_owned())];
        attrs.extend(
            group
                .attrs
                .iter()
                .filter(|(a, _)| {
                    a.eq_ignore_ascii_case("sAMAccountName") || a.eq_ignore_ascii_case("member")
                })
                .cloned(),
        );
        ldif += &add_record(&group.dn, &attrs);
        added.push(group.dn.clone());
    }
    (ldif, added)
}

/// Output lines with every DN in normalised form, moved back when `moved`
/// is given, so that outputs from different namespaces compare.
fn normalise_output(stdout: &str, moved: Option<&Moved>) -> String {
    let mut out = String::new();
    for line in stdout.lines() {
        let split = ["# dn: ", "# member: ", "dn: ", "member: ", "#   "]
            .iter()
            .find_map(|p| line.strip_prefix(p).map(|rest| (*p, rest)));
        match split.and_then(|(p, rest)| Dn::parse(rest).ok().map(|d| (p, d))) {
            Some((prefix, value)) => {
                let value = moved.map_or(value.clone(), |m| m.back(&value));
                out += &format!("{prefix}{}\n", value.normalised());
            }
            None => {
                out += line;
                out.push('\n');
            }
        }
    }
    out
}

/// Deletes entries in the reverse order of their creation.
fn delete_ldif(added: &[String]) -> String {
    added
        .iter()
        .rev()
        .map(|d| format!("dn: {d}\nchangetype: delete\n\n"))
        .collect()
}

async fn on_samba(
    dc: &SambaDc,
    loaded: &mut Vec<String>,
    scenario: &Scenario,
    reference: &Reference,
    failures: &mut Vec<String>,
) {
    let name = &scenario.name;
    let moved = Moved::new(scenario);
    let tmp = tempfile::tempdir().expect("temp dir");
    let tree = tmp.path().join("tree");
    copy_dir(&scenario.dir.join("tree"), &tree);
    for file in fs::read_dir(tree.join("servers")).expect("servers/") {
        let path = file.expect("entry").path();
        let text = fs::read_to_string(&path).expect("server file");
        fs::write(&path, moved.text(&text)).expect("rewrite server file");
    }
    let directory = fs::read_to_string(scenario.dir.join("directory.ldif")).expect("directory");
    // Group names are unique in a domain: the previous scenario's entries
    // go before this one's come.
    let (add, added) = samba_ldif(&moved, &moved.ldif(&directory), &tree);
    dc.ldapmodify(&(delete_ldif(loaded) + &add));
    *loaded = added;

    let mut args = vec![format!("--fs-root={}", tree.display())];
    args.extend(e2e::ldap_args(
        &dc.url(),
        SambaDc::ADMIN,
        &dc.admin_password_file(),
    ));
    args.extend(scenario.options().iter().map(|o| moved.text(o)));
    let (code, stdout, stderr) = sync(&args);
    let again = sync(&args);
    let groups = read_groups(&dc.url(), SambaDc::ADMIN, &dc.admin_password(), &moved.ou).await;

    if code != reference.code {
        failures.push(format!(
            "{name} on samba: exit {code}, LDIF exit {}:\n{stdout}{stderr}",
            reference.code
        ));
    }
    for (what, want, got) in [
        ("output", &reference.stdout, &stdout),
        ("output of a second sync", &reference.again, &again.1),
    ] {
        let (want, got) = (
            normalise_output(want, None),
            normalise_output(got, Some(&moved)),
        );
        if want != got {
            failures.push(format!(
                "{name} on samba: {what} differs from the LDIF run's (DNs normalised):\n{}",
                diff(&want, &got)
            ));
        }
    }
    let (want, got) = (show(&reference.groups), show(&moved.groups_back(&groups)));
    if want != got {
        failures.push(format!(
            "{name} on samba: groups differ from the LDIF directory's:\n{}",
            diff(&want, &got)
        ));
    }
}

#[tokio::test]
async fn sync_on_samba_ends_like_the_ldif_directory() {
    let dc = SambaDc::shared();
    let (cases, mut failures) = cases();
    let mut loaded = Vec::new();
    for (scenario, reference) in cases {
        on_samba(dc, &mut loaded, scenario, reference, &mut failures).await;
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

#[test]
fn moving_a_scenario_keeps_every_dn_inside_its_ou() {
    let scenario = Scenario::all()
        .into_iter()
        .find(|s| s.name.starts_with("008"))
        .expect("scenario 008");
    let moved = Moved::new(&scenario);
    assert_eq!(moved.ou, "OU=S008,DC=ad,DC=test");
    assert_eq!(
        moved.text("nt.dn: CN=Server1,OU=Computers,DC=AD,DC=COM\nx: dc=ad,dc=com"),
        "nt.dn: CN=Server1,OU=Computers,OU=S008,DC=ad,DC=test\nx: OU=S008,DC=ad,DC=test"
    );
    let inside = dn("CN=\\73erver3,OU=Computers,OU=S008,DC=ad,DC=test");
    assert_eq!(
        moved.back(&inside),
        dn("cn=server3,ou=computers,dc=ad,dc=com")
    );
    assert_eq!(
        rdns("CN=a\\,b,OU=x ,DC=y"),
        vec!["CN=a\\,b", "OU=x", "DC=y"]
    );
}

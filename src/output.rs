//! What `plan` and `sync` print: LDIF change records an operator can feed to
//! `ldapmodify`, or one JSON object for programs.
//!
//! Both renderings come from one [`Report`], so they always agree. Records
//! are sorted by normalised group DN, `add` comes before `delete` within a
//! record and values are sorted; everything that is not a change (missing
//! groups, refused deletions, failures) is a `#` comment in LDIF.
//!
//! Names and DNs come from the tree and the directory, so nothing is
//! printed as it came: values go through [`write_value`] (base64 unless
//! plainly printable) and text quoted in comments is escaped
//! ([`escape_controls`]), so that no input can add a line, least of all a
//! change record of its own.

use std::collections::BTreeSet;

use serde::Serialize;

use crate::ldif::write_value;
use crate::model::{escape_controls, Dn};
use crate::plan::{GroupChange, MissingGroup, Plan};

/// Output format of `plan` and `sync`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Format {
    /// RFC 2849 change records.
    #[default]
    Ldif,
    /// One JSON object.
    Json,
}

/// A change that was planned but not (or not fully) applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NotApplied {
    /// The part of the change that was not applied.
    pub change: GroupChange,
    /// Why.
    pub error: String,
}

/// Everything one run of `plan` or `sync` has to say.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// `plan` or `sync`, for the summary line.
    pub verb: &'static str,
    /// The plan, or for `sync` what was applied.
    pub plan: Plan,
    /// Why deletions were refused by the guard, if they were.
    pub refused: Option<String>,
    /// The deletions the guard held back.
    pub refused_changes: Vec<GroupChange>,
    /// Changes that failed (`sync` only).
    pub not_applied: Vec<NotApplied>,
}

impl Report {
    /// Renders the report in the given format.
    pub fn render(&self, format: Format) -> String {
        match format {
            Format::Ldif => self.ldif(),
            Format::Json => self.json(),
        }
    }

    fn summary(&self) -> String {
        let p = &self.plan;
        let mut line = format!(
            "# gmsa-reconciler {}: {} {}, {} {}, {} {}",
            self.verb,
            p.changes.len(),
            plural(p.changes.len(), "group", "groups"),
            p.adds(),
            plural(p.adds(), "addition", "additions"),
            p.deletes(),
            plural(p.deletes(), "deletion", "deletions"),
        );
        if !p.missing_groups.is_empty() {
            line += &format!(", {} missing", p.missing_groups.len());
            line += plural(p.missing_groups.len(), " group", " groups");
        }
        if self.refused.is_some() {
            line += &format!(", {} refused", self.refused_deletes());
        }
        if !self.not_applied.is_empty() {
            line += &format!(", {} not applied", self.not_applied.len());
        }
        line
    }

    fn ldif(&self) -> String {
        let mut out = self.summary();
        out.push('\n');
        for change in &self.plan.changes {
            out.push('\n');
            change_record(&mut out, change, "");
        }
        for missing in &self.plan.missing_groups {
            out.push('\n');
            out += &format!(
                "# missing group: proid {} has placements on {} {} but no group\n",
                escape_controls(missing.proid.as_str()),
                missing.desired.len(),
                plural(missing.desired.len(), "host", "hosts"),
            );
            for dn in &missing.desired {
                out += &format!("#   {}\n", escape_controls(dn.as_str()));
            }
        }
        if let Some(reason) = &self.refused {
            out.push('\n');
            out += &format!(
                "# refused by the mass-deletion guard: {}\n",
                one_line(reason)
            );
            out += "# these deletions were not applied:\n";
            for change in &self.refused_changes {
                change_record(&mut out, change, "# ");
            }
        }
        for failed in &self.not_applied {
            out.push('\n');
            out += &format!("# not applied: {}\n", one_line(&failed.error));
            change_record(&mut out, &failed.change, "# ");
        }
        out
    }

    /// Deletions the guard held back, counted.
    pub fn refused_deletes(&self) -> usize {
        self.refused_changes.iter().map(|c| c.delete.len()).sum()
    }

    /// True when the report holds anything to do: changes, or deletions
    /// held back by the guard. `plan --exit-code` exits 2 exactly then, so
    /// its exit code and the printed summary always agree.
    pub fn has_changes(&self) -> bool {
        !self.plan.changes.is_empty() || self.refused.is_some()
    }

    fn json(&self) -> String {
        let json = JsonReport {
            changes: self.plan.changes.iter().map(JsonChange::from).collect(),
            missing_groups: self
                .plan
                .missing_groups
                .iter()
                .map(JsonMissing::from)
                .collect(),
            refused: self.refused.as_ref().map(|reason| JsonRefused {
                reason: reason.clone(),
                deletions: self
                    .refused_changes
                    .iter()
                    .map(|c| JsonDeletion {
                        group_dn: c.group_dn.as_str().to_owned(),
                        proid: c.proid.to_string(),
                        delete: strings(&c.delete),
                    })
                    .collect(),
            }),
            not_applied: self
                .not_applied
                .iter()
                .map(|n| JsonNotApplied {
                    change: JsonChange::from(&n.change),
                    error: n.error.clone(),
                })
                .collect(),
            summary: JsonSummary {
                groups: self.plan.changes.len(),
                adds: self.plan.adds(),
                deletes: self.plan.deletes(),
                refused_deletes: self.refused_deletes(),
            },
        };
        match serde_json::to_string_pretty(&json) {
            Ok(mut text) => {
                text.push('\n');
                text
            }
            Err(err) => panic!("BUG: a report of strings and numbers always serialises: {err}"),
        }
    }
}

fn plural(n: usize, one: &'static str, many: &'static str) -> &'static str {
    if n == 1 {
        one
    } else {
        many
    }
}

/// Free text (a reason, a server's error message) for a comment: its line
/// breaks and runs of space made one space, anything else that could break
/// the line or drive a terminal escaped.
pub(crate) fn one_line(text: &str) -> String {
    escape_controls(&text.split_whitespace().collect::<Vec<_>>().join(" ")).into_owned()
}

/// Appends one change record, every line prefixed (`"# "` comments it out).
fn change_record(out: &mut String, change: &GroupChange, prefix: &str) {
    let mut record = String::new();
    write_value(&mut record, "dn", change.group_dn.as_str());
    record += "changetype: modify\n";
    for (op, values) in [("add", &change.add), ("delete", &change.delete)] {
        if values.is_empty() {
            continue;
        }
        record += &format!("{op}: member\n");
        for value in values {
            write_value(&mut record, "member", value.as_str());
        }
        record += "-\n";
    }
    for line in record.lines() {
        out.push_str(prefix);
        out.push_str(line);
        out.push('\n');
    }
}

#[derive(Serialize)]
struct JsonReport {
    changes: Vec<JsonChange>,
    missing_groups: Vec<JsonMissing>,
    refused: Option<JsonRefused>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    not_applied: Vec<JsonNotApplied>,
    summary: JsonSummary,
}

/// The guard's refusal as data: why, and every deletion it held back.
#[derive(Serialize)]
struct JsonRefused {
    reason: String,
    deletions: Vec<JsonDeletion>,
}

#[derive(Serialize)]
struct JsonDeletion {
    group_dn: String,
    proid: String,
    delete: Vec<String>,
}

#[derive(Serialize)]
struct JsonChange {
    group_dn: String,
    proid: String,
    add: Vec<String>,
    delete: Vec<String>,
}

fn strings(set: &BTreeSet<Dn>) -> Vec<String> {
    set.iter().map(|d| d.as_str().to_owned()).collect()
}

impl From<&GroupChange> for JsonChange {
    fn from(c: &GroupChange) -> Self {
        JsonChange {
            group_dn: c.group_dn.as_str().to_owned(),
            proid: c.proid.to_string(),
            add: strings(&c.add),
            delete: strings(&c.delete),
        }
    }
}

#[derive(Serialize)]
struct JsonMissing {
    proid: String,
    desired: Vec<String>,
}

impl From<&MissingGroup> for JsonMissing {
    fn from(m: &MissingGroup) -> Self {
        JsonMissing {
            proid: m.proid.to_string(),
            desired: strings(&m.desired),
        }
    }
}

#[derive(Serialize)]
struct JsonNotApplied {
    #[serde(flatten)]
    change: JsonChange,
    error: String,
}

#[derive(Serialize)]
struct JsonSummary {
    groups: usize,
    adds: usize,
    deletes: usize,
    refused_deletes: usize,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Proid;

    fn dn(s: &str) -> Dn {
        Dn::parse(s).expect("dn")
    }

    fn report() -> Report {
        Report {
            verb: "plan",
            plan: Plan {
                changes: vec![GroupChange {
                    group_dn: dn("CN=web-gmsa-hosts,OU=Groups,DC=ad"),
                    proid: Proid::new("web").expect("proid"),
                    add: [dn("CN=h2,DC=ad"), dn("CN=h1,DC=ad")].into(),
                    delete: [dn("CN=old,DC=ad")].into(),
                }],
                missing_groups: vec![MissingGroup {
                    proid: Proid::new("db").expect("proid"),
                    desired: [dn("CN=h1,DC=ad")].into(),
                }],
                groups_compared: 1,
                managed_members: 1,
            },
            ..Report::default()
        }
    }

    #[test]
    fn ldif_rendering() {
        let text = report().render(Format::Ldif);
        let want = "\
# gmsa-reconciler plan: 1 group, 2 additions, 1 deletion, 1 missing group

dn: CN=web-gmsa-hosts,OU=Groups,DC=ad
changetype: modify
add: member
member: CN=h1,DC=ad
member: CN=h2,DC=ad
-
delete: member
member: CN=old,DC=ad
-

# missing group: proid db has placements on 1 host but no group
#   CN=h1,DC=ad
";
        assert_eq!(text, want);
    }

    #[test]
    fn json_rendering_has_the_specified_shape() {
        let text = report().render(Format::Json);
        let v: serde_json::Value = serde_json::from_str(&text).expect("json");
        assert_eq!(
            v["changes"][0]["group_dn"],
            "CN=web-gmsa-hosts,OU=Groups,DC=ad"
        );
        assert_eq!(v["changes"][0]["proid"], "web");
        assert_eq!(v["changes"][0]["add"][0], "CN=h1,DC=ad");
        assert_eq!(v["changes"][0]["delete"][0], "CN=old,DC=ad");
        assert_eq!(v["missing_groups"][0]["proid"], "db");
        assert!(v["refused"].is_null());
        assert_eq!(v["summary"]["groups"], 1);
        assert_eq!(v["summary"]["adds"], 2);
        assert_eq!(v["summary"]["deletes"], 1);
        assert_eq!(v["summary"]["refused_deletes"], 0);
    }

    /// A report whose every name, DN and text tries to start a line.
    fn hostile_report() -> Report {
        let evil =
            "\ndn: CN=Domain Admins,DC=ad\nchangetype: modify\nadd: member\nmember: CN=x\n-\n";
        let group = dn(&format!("CN=g{},OU=Groups,DC=ad", evil.replace(',', "\\,")));
        let host = dn(&format!("CN=h\r{},DC=ad", evil.replace(',', "\\,")));
        let change = GroupChange {
            group_dn: group,
            proid: Proid::new("web\u{85}\u{2028}x").expect("not a control character"),
            add: [host.clone(), dn("CN=\u{1b}[2J\u{7f},DC=ad")].into(),
            delete: [dn("CN=old\t,DC=ad")].into(),
        };
        Report {
            verb: "sync",
            plan: Plan {
                changes: vec![change.clone()],
                missing_groups: vec![MissingGroup {
                    proid: Proid::new("db\u{2029}dn: CN=y").expect("not a control character"),
                    desired: [host].into(),
                }],
                groups_compared: 1,
                managed_members: 1,
            },
            refused: Some(format!("too many{evil}\u{1b}]0;title\u{7}")),
            refused_changes: vec![change.clone()],
            not_applied: vec![NotApplied {
                change,
                error: format!("LDAP 80 other: {evil}\r\0"),
            }],
        }
    }

    #[test]
    fn nothing_quoted_can_add_a_line() {
        let text = hostile_report().render(Format::Ldif);
        let bad = |c: char| (crate::model::is_control(c) && c != '\n') || c == '\u{85}';
        assert!(!text.chars().any(bad), "{text:?}");
        assert!(!text.contains(['\u{2028}', '\u{2029}']), "{text:?}");
        // The only lines that are not comments are the one change record's.
        let live: Vec<&str> = text
            .lines()
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .collect();
        let shape: Vec<String> = live
            .iter()
            .map(|l| l.split(' ').next().unwrap_or_default().to_owned())
            .collect();
        assert_eq!(
            shape,
            [
                "dn::",
                "changetype:",
                "add:",
                "member::",
                "member::",
                "-",
                "delete:",
                "member::",
                "-"
            ],
            "{text}"
        );
        assert!(
            text.contains("# missing group: proid db\\u{2029}dn: CN=y has"),
            "{text}"
        );
        assert!(
            text.contains("#   CN=h\\r\\ndn: CN=Domain Admins\\,DC=ad\\n"),
            "{text}"
        );
        assert!(
            text.contains("# refused by the mass-deletion guard: too many dn: CN=Domain"),
            "{text}"
        );
        assert!(text.contains("\\u{1b}]0;title\\u{7}\n"), "{text}");
        assert!(text.contains("# not applied: LDAP 80 other: dn: CN=Domain Admins,DC=ad changetype: modify add: member member: CN=x - \\u{0}\n"), "{text}");
    }

    #[test]
    fn refused_deletions_are_comments() {
        let mut r = report();
        r.refused = Some("too many".into());
        r.refused_changes = r.plan.changes.clone();
        r.plan = r.plan.without_deletions();
        let text = r.render(Format::Ldif);
        assert!(text.contains("# refused by the mass-deletion guard: too many\n"));
        assert!(text.contains("# delete: member\n# member: CN=old,DC=ad\n"));
        assert!(!text.contains("\ndelete: member"), "{text}");
        let v: serde_json::Value = serde_json::from_str(&r.render(Format::Json)).expect("json");
        assert_eq!(v["refused"]["reason"], "too many");
        let deletion = &v["refused"]["deletions"][0];
        assert_eq!(deletion["group_dn"], "CN=web-gmsa-hosts,OU=Groups,DC=ad");
        assert_eq!(deletion["proid"], "web");
        assert_eq!(deletion["delete"], serde_json::json!(["CN=old,DC=ad"]));
        assert!(deletion.get("add").is_none(), "{deletion}");
        assert_eq!(v["summary"]["deletes"], 0);
        assert_eq!(v["summary"]["refused_deletes"], 1);
        assert!(r.has_changes());
    }
}

//! Instance names and the unique names of their containers.
//!
//! An instance (`<proid>.<app>#<task>`) can be placed on a host more than
//! once over its life; each placement gets its own container directory, named
//! `<instance with # replaced by ->-<unique id>`. The unique id is 13 base-62
//! characters derived from the manifest file's ctime and inode and the
//! instance number: the same file always gives the same id, so a rerun after
//! a crash finds the directory it started, while a rewritten manifest (a new
//! placement) gives a new one. A generation number, zero unless the first
//! choice is already taken by a dead container, keeps ids apart when the
//! manifest was not rewritten between two placements.

use std::fmt;
use std::fs::Metadata;
use std::os::unix::fs::MetadataExt;

use thiserror::Error;

use crate::model::Proid;

/// The number of base-62 characters in a unique id.
pub const UNIQUE_ID_LEN: usize = 13;

const BASE62: &[u8; 62] = b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ";

/// A name refused as an instance name, and why.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("invalid instance name {name:?}: {why}")]
pub struct InstanceError {
    /// The name as given.
    pub name: String,
    /// What is wrong with it.
    pub why: InstanceProblem,
}

/// What is wrong with an instance name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum InstanceProblem {
    /// It would be a hidden file.
    #[error("starts with '.'")]
    Dot,
    /// It would not be one file name, one event-file field or one word.
    #[error("contains '/', ',', whitespace or a control character")]
    Character,
    /// There is no `#<task>`.
    #[error("no '#<task>'")]
    NoTask,
    /// The task is not digits.
    #[error("the task after '#' must be digits")]
    TaskNotDigits,
    /// The task does not fit a number.
    #[error("the task number is too large")]
    TaskTooLarge,
    /// There is no proid.
    #[error("no proid before the first '.'")]
    NoProid,
    /// The app name is empty or holds a `#`.
    #[error("the app name after the proid is empty or holds '#'")]
    App,
}

/// A directory name refused as a container's unique name, and why.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("{unique_name:?} is not a container name: {why}")]
pub struct UniqueNameError {
    /// The name as given.
    pub unique_name: String,
    /// What is wrong with it.
    pub why: UniqueNameProblem,
}

/// What is wrong with a container's unique name.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum UniqueNameProblem {
    /// There is no `-` at all.
    #[error("no '-<unique id>' at the end")]
    NoId,
    /// What follows the last `-` is not a unique id.
    #[error("it does not end in '-' and a 13-character unique id")]
    BadId,
    /// There is no `-<task>` before the id.
    #[error("no '-<task>' before the unique id")]
    NoTask,
    /// The instance it stands for is not a valid instance name.
    #[error(transparent)]
    Instance(InstanceError),
}

/// A validated instance name, `<proid>.<app>#<task>` with a numeric task.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Instance {
    name: String,
    proid: Proid,
    hash: usize,
    number: u64,
}

impl Instance {
    /// Accepts a name that can be a file name, an event-file field and a
    /// container name: no `/`, `,`, whitespace or control characters, not
    /// starting with `.`, with a proid, an app and a numeric task.
    pub fn parse(name: &str) -> Result<Instance, InstanceError> {
        use InstanceProblem::*;
        let bad = |why| {
            Err(InstanceError {
                name: name.to_owned(),
                why,
            })
        };
        if name.starts_with('.') {
            return bad(Dot);
        }
        if name
            .chars()
            .any(|c| c == '/' || c == ',' || c.is_whitespace() || c.is_control())
        {
            return bad(Character);
        }
        let Some(hash) = name.rfind('#') else {
            return bad(NoTask);
        };
        let (app, task) = (&name[..hash], &name[hash + 1..]);
        if task.is_empty() || !task.bytes().all(|b| b.is_ascii_digit()) {
            return bad(TaskNotDigits);
        }
        let Ok(number) = task.parse::<u64>() else {
            return bad(TaskTooLarge);
        };
        let Some(proid) = Proid::from_instance(app) else {
            return bad(NoProid);
        };
        if app.len() == proid.as_str().len() + 1 || app.contains('#') {
            return bad(App);
        }
        Ok(Instance {
            name: name.to_owned(),
            proid,
            hash,
            number,
        })
    }

    /// The name as given.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The service account the instance runs as.
    pub fn proid(&self) -> &Proid {
        &self.proid
    }

    /// `<proid>.<app>`, the part before `#`.
    pub fn app(&self) -> &str {
        &self.name[..self.hash]
    }

    /// The short app name, between the proid's `.` and `#`.
    pub fn app_short(&self) -> &str {
        &self.name[self.proid.as_str().len() + 1..self.hash]
    }

    /// The task, the digits after `#`, as spelled.
    pub fn task(&self) -> &str {
        &self.name[self.hash + 1..]
    }

    /// The task as a number.
    pub fn number(&self) -> u64 {
        self.number
    }

    /// The prefix of every unique name of this instance: the name with `#`
    /// replaced by `-`, then `-`.
    pub fn unique_prefix(&self) -> String {
        format!("{}-{}-", self.app(), self.task())
    }

    /// The container name for a unique id.
    pub fn unique_name(&self, unique_id: &str) -> String {
        format!("{}{unique_id}", self.unique_prefix())
    }

    /// The instance and unique id a container directory's name stands for:
    /// `<app>-<task>-<unique id>` back to `<app>#<task>`. For containers
    /// whose `data/app.json` is missing (made by another node agent, or
    /// lost): the name is all there is.
    pub fn from_unique_name(unique_name: &str) -> Result<(Instance, String), UniqueNameError> {
        let bad = |why| {
            Err(UniqueNameError {
                unique_name: unique_name.to_owned(),
                why,
            })
        };
        let Some((rest, id)) = unique_name.rsplit_once('-') else {
            return bad(UniqueNameProblem::NoId);
        };
        if !is_unique_id(id) {
            return bad(UniqueNameProblem::BadId);
        }
        let Some((app, task)) = rest.rsplit_once('-') else {
            return bad(UniqueNameProblem::NoTask);
        };
        match Instance::parse(&format!("{app}#{task}")) {
            Ok(instance) => Ok((instance, id.to_owned())),
            Err(why) => bad(UniqueNameProblem::Instance(why)),
        }
    }
}

impl fmt::Display for Instance {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name)
    }
}

/// What the unique id is derived from in a manifest file's metadata.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    /// Status-change time, seconds.
    pub ctime_sec: i64,
    /// Status-change time, nanoseconds within the second.
    pub ctime_nsec: i64,
    /// Inode number.
    pub inode: u64,
}

impl Stamp {
    /// The stamp of a file, from its metadata.
    pub fn of(meta: &Metadata) -> Stamp {
        Stamp {
            ctime_sec: meta.ctime(),
            ctime_nsec: meta.ctime_nsec(),
            inode: meta.ino(),
        }
    }
}

/// The unique id of a placement: 13 base-62 characters.
///
/// The inputs are mixed rather than packed so that ids of files created in
/// the same second, or of neighbouring inodes, differ in every position;
/// the mixing is our own fixed function, so ids stay the same across builds.
pub fn unique_id(stamp: &Stamp, instance_number: u64, generation: u32) -> String {
    let words = [
        stamp.ctime_sec as u64,
        stamp.ctime_nsec as u64,
        stamp.inode,
        instance_number,
        u64::from(generation),
    ];
    let (mut h1, mut h2) = (0x243f_6a88_85a3_08d3_u64, 0x1319_8a2e_0370_7344_u64);
    for word in words {
        h1 = mix(h1 ^ word);
        h2 = mix(h2.wrapping_add(word).rotate_left(29) ^ h1);
    }
    to_base62((u128::from(h1) << 64) | u128::from(h2))
}

/// The last 13 base-62 digits of `value`, most significant first, zero-padded.
pub fn to_base62(mut value: u128) -> String {
    let mut digits = [b'0'; UNIQUE_ID_LEN];
    for slot in digits.iter_mut().rev() {
        *slot = BASE62[(value % 62) as usize];
        value /= 62;
    }
    digits.iter().map(|&b| char::from(b)).collect()
}

/// True for a well-formed unique id.
pub fn is_unique_id(id: &str) -> bool {
    id.len() == UNIQUE_ID_LEN && id.bytes().all(|b| b.is_ascii_alphanumeric())
}

/// The final avalanche step of SplitMix64: every input bit moves about half
/// of the output bits.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stamp(sec: i64, nsec: i64, inode: u64) -> Stamp {
        Stamp {
            ctime_sec: sec,
            ctime_nsec: nsec,
            inode,
        }
    }

    #[test]
    fn base62_is_zero_padded_and_ordered_digits_lower_upper() {
        assert_eq!(to_base62(0), "0000000000000");
        assert_eq!(to_base62(61), "000000000000Z");
        assert_eq!(to_base62(62), "0000000000010");
        assert_eq!(to_base62(10 * 62 + 36), "00000000000aA");
        // 62^13 - 1 is the largest value that fits; 62^13 wraps to zero.
        let max = 62u128.pow(13);
        assert_eq!(to_base62(max - 1), "ZZZZZZZZZZZZZ");
        assert_eq!(to_base62(max), "0000000000000");
    }

    #[test]
    fn ids_are_stable_and_change_with_every_input() {
        let base = unique_id(&stamp(1_700_000_000, 5, 42), 7, 0);
        assert!(is_unique_id(&base), "{base}");
        assert_eq!(base, unique_id(&stamp(1_700_000_000, 5, 42), 7, 0));
        let others = [
            unique_id(&stamp(1_700_000_001, 5, 42), 7, 0),
            unique_id(&stamp(1_700_000_000, 6, 42), 7, 0),
            unique_id(&stamp(1_700_000_000, 5, 43), 7, 0),
            unique_id(&stamp(1_700_000_000, 5, 42), 8, 0),
            unique_id(&stamp(1_700_000_000, 5, 42), 7, 1),
        ];
        for other in &others {
            assert!(is_unique_id(other), "{other}");
            assert_ne!(&base, other);
        }
        let distinct: std::collections::BTreeSet<_> = others.iter().collect();
        assert_eq!(distinct.len(), others.len());
    }

    #[test]
    fn ids_of_many_neighbouring_files_do_not_collide() {
        let ids: std::collections::BTreeSet<String> = (0..10_000u64)
            .map(|i| unique_id(&stamp(1_700_000_000, 0, 1000 + i), 1, 0))
            .collect();
        assert_eq!(ids.len(), 10_000);
    }

    #[test]
    fn instance_names() {
        let i = Instance::parse("proid1.web.x#0000000042").expect("valid");
        assert_eq!(i.proid().as_str(), "proid1");
        assert_eq!(i.app(), "proid1.web.x");
        assert_eq!(i.app_short(), "web.x");
        assert_eq!(i.task(), "0000000042");
        assert_eq!(i.number(), 42);
        assert_eq!(
            i.unique_name("0000000000abc"),
            "proid1.web.x-0000000042-0000000000abc"
        );
        use InstanceProblem::*;
        for (bad, problem) in [
            ("proid1.web", NoTask),
            ("proid1.web#", TaskNotDigits),
            ("proid1.web#12a", TaskNotDigits),
            ("proid1#1", NoProid),
            ("proid1.#1", App),
            (".web#1", Dot),
            (".proid.web#1", Dot),
            ("p.a#b#1", App),
            ("p.a/b#1", Character),
            ("p.a,b#1", Character),
            ("p.a b#1", Character),
            ("p.a#99999999999999999999999", TaskTooLarge),
        ] {
            let err = Instance::parse(bad).expect_err(bad);
            assert_eq!(err.why, problem, "{bad:?}");
            assert_eq!(
                err.to_string(),
                format!("invalid instance name {bad:?}: {problem}")
            );
        }
    }

    #[test]
    fn container_names_give_back_their_instance() {
        for (name, instance, id) in [
            (
                "proid.myapp-001-0000000ID1234",
                "proid.myapp#001",
                "0000000ID1234",
            ),
            (
                "p.a-b.c-0000000042-0000000000abc",
                "p.a-b.c#0000000042",
                "0000000000abc",
            ),
        ] {
            let (inst, unique_id) = Instance::from_unique_name(name).expect(name);
            assert_eq!((inst.name(), unique_id.as_str()), (instance, id));
            assert_eq!(inst.unique_name(&unique_id), name);
        }
        for (bad, problem) in [
            ("proid.myapp-001", UniqueNameProblem::BadId),
            ("proid.myapp-001-0000000ID123", UniqueNameProblem::BadId),
            ("proid.myapp-001-0000000ID12_4", UniqueNameProblem::BadId),
            ("proid.myapp-0000000ID1234", UniqueNameProblem::NoTask),
            ("proidmyapp", UniqueNameProblem::NoId),
        ] {
            let err = Instance::from_unique_name(bad).expect_err(bad);
            assert_eq!(err.why, problem, "{bad:?}");
            assert!(err
                .to_string()
                .starts_with(&format!("{bad:?} is not a container name: ")));
        }
        for bad in ["proid.myapp-x1-0000000ID1234", "proid-001-0000000ID1234"] {
            let err = Instance::from_unique_name(bad).expect_err(bad);
            assert!(
                matches!(err.why, UniqueNameProblem::Instance(_)),
                "{bad:?}: {err}"
            );
            assert!(err.to_string().contains("invalid instance name"), "{err}");
        }
    }
}

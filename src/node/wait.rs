//! Waiting for this host to join a proid's gMSA group before its container
//! is configured: a container started earlier could not fetch the gMSA's
//! password.
//!
//! The directory is reached through [`MembershipCheck`], so the node does
//! not depend on how (LDAP, an LDIF file, a test double); polling backs off
//! exponentially with jitter on tokio's clock, so tests can pause time.

use std::time::Duration;

use async_trait::async_trait;
use tokio::time::Instant;

use crate::backoff::{Backoff, Jitter};
use crate::directory::{DirError, OpenError};
use crate::model::{HostName, ModelError, Proid};
use crate::tree::{names, ServerError};

/// Why a membership check got no answer, by what happens next.
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    /// The directory failed; a transient failure is asked again.
    #[error(transparent)]
    Directory(#[from] DirError),
    /// The directory to ask cannot be opened as configured (the password
    /// file cannot be read); asking again will not fix it.
    #[error(transparent)]
    Open(OpenError),
    /// This host's server file does not tell what the check needs right
    /// now; the mirror may still fix it, so it is asked again.
    #[error("{}/{host}: {problem}", names::SERVERS)]
    Host {
        /// This host.
        host: HostName,
        /// What its server file does not tell.
        problem: HostProblem,
    },
}

/// What this host's server file does not tell the membership check.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HostProblem {
    /// The file can't be used at all (missing, unreadable, invalid).
    #[error(transparent)]
    Server(#[from] ServerError),
    /// It has no `nt.dn`: this host's computer DN is unknown.
    #[error("no nt.dn")]
    NoDn,
    /// Its `nt.dn` is not a DN.
    #[error("nt.dn: {0}")]
    BadDn(ModelError),
    /// It has no `nt.dc`, and no `--check-ldap-url` names the server to ask.
    #[error("no nt.dc: this host's domain controller is unknown, so its membership cannot be checked where it will be used (give --check-ldap-url)")]
    NoDc,
}

impl CheckError {
    /// True when asking again may get an answer.
    pub fn is_transient(&self) -> bool {
        match self {
            CheckError::Directory(err) => err.is_transient(),
            CheckError::Open(_) => false,
            CheckError::Host { .. } => true,
        }
    }
}

/// First pause between two membership checks.
pub const INITIAL_DELAY: Duration = Duration::from_secs(1);
/// Longest pause between two membership checks.
pub const MAX_DELAY: Duration = Duration::from_secs(30);
/// The pauses: doubling from [`INITIAL_DELAY`] to [`MAX_DELAY`], each
/// within 20% of its nominal length.
const POLL: Backoff = Backoff {
    attempts: u32::MAX,
    initial: INITIAL_DELAY,
    max: MAX_DELAY,
    jitter: Jitter::Within(20),
};

/// What the node asks the directory about a proid's group.
#[async_trait]
pub trait MembershipCheck: Send + Sync {
    /// Whether the proid has a group at all: with the default gMSA
    /// selection, exactly those proids have a gMSA.
    async fn group_exists(&self, proid: &Proid) -> Result<bool, CheckError>;

    /// Whether this host's computer DN is a member of the proid's group.
    async fn is_member(&self, proid: &Proid) -> Result<bool, CheckError>;
}

/// How a wait ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WaitOutcome {
    /// The host is in the group.
    Member,
    /// The instance is no longer wanted (its placement went away).
    Cancelled,
    /// The time ran out; the last answer or error, for the operator.
    TimedOut(String),
    /// The check failed in a way that asking again will not fix.
    Failed(String),
}

/// Asks `check` until this host is a member of `proid`'s group, `still_wanted`
/// turns false, or `wait` has passed. Transient errors from the check count
/// as "not yet" (the directory may be briefly unreachable); any other error
/// ends the wait.
pub async fn wait_until_member(
    check: &dyn MembershipCheck,
    proid: &Proid,
    wait: Duration,
    still_wanted: impl Fn() -> bool,
) -> WaitOutcome {
    let deadline = Instant::now() + wait;
    let mut retry = 0;
    // The last answer or error: a check cut short by the deadline must not
    // hide why the ones before it failed (a refused connection, a name
    // that does not resolve).
    let mut last: Option<String> = None;
    loop {
        if !still_wanted() {
            return WaitOutcome::Cancelled;
        }
        let answer = match tokio::time::timeout_at(deadline, check.is_member(proid)).await {
            Ok(Ok(true)) => return WaitOutcome::Member,
            Ok(Ok(false)) => "not a member".to_owned(),
            Ok(Err(err)) if err.is_transient() => format!("check failed: {err}"),
            Ok(Err(err)) => {
                return WaitOutcome::Failed(format!("checking the group of {proid}: {err}"))
            }
            Err(_) => match last.take() {
                Some(before) => format!("{before}; the last check did not answer in time"),
                None => "check did not answer".to_owned(),
            },
        };
        let last = last.insert(answer);
        let now = Instant::now();
        if now >= deadline {
            return WaitOutcome::TimedOut(format!(
                "this host is not in the group of {proid} after {}s ({last})",
                wait.as_secs()
            ));
        }
        tracing::debug!(%proid, why = %last, "waiting for gMSA group membership");
        let pause = POLL.delay(retry);
        tokio::time::sleep_until((now + pause).min(deadline)).await;
        retry = retry.saturating_add(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Mutex;

    /// Answers "no" a given number of times, then "yes", noting when it was asked.
    struct Fake {
        noes: usize,
        asked: Mutex<Vec<Instant>>,
    }

    #[async_trait]
    impl MembershipCheck for Fake {
        async fn group_exists(&self, _: &Proid) -> Result<bool, CheckError> {
            Ok(true)
        }
        async fn is_member(&self, _: &Proid) -> Result<bool, CheckError> {
            let mut asked = self.asked.lock().expect("lock");
            asked.push(Instant::now());
            match asked.len() {
                n if n <= self.noes && n % 2 == 0 => {
                    Err(CheckError::Directory(DirError::Unreachable {
                        op: crate::directory::Op::Search,
                        message: "unreachable".into(),
                    }))
                }
                n if n <= self.noes => Ok(false),
                _ => Ok(true),
            }
        }
    }

    fn proid() -> Proid {
        Proid::new("proid1").expect("valid")
    }

    #[tokio::test(start_paused = true)]
    async fn polls_with_growing_pauses_until_member() {
        let fake = Fake {
            noes: 5,
            asked: Mutex::new(Vec::new()),
        };
        let out = wait_until_member(&fake, &proid(), Duration::from_secs(600), || true).await;
        assert_eq!(out, WaitOutcome::Member);
        let asked = fake.asked.lock().expect("lock");
        assert_eq!(asked.len(), 6);
        let pauses: Vec<Duration> = asked.windows(2).map(|w| w[1] - w[0]).collect();
        for (i, pause) in pauses.iter().enumerate() {
            let nominal = (INITIAL_DELAY * 2u32.pow(i as u32)).min(MAX_DELAY);
            assert!(
                // tokio's timers tick in whole milliseconds.
                *pause >= nominal.mul_f64(0.8)
                    && *pause <= nominal.mul_f64(1.2) + Duration::from_millis(1),
                "pause {i} was {pause:?}, nominal {nominal:?}"
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn gives_up_at_the_deadline() {
        let fake = Fake {
            noes: usize::MAX,
            asked: Mutex::new(Vec::new()),
        };
        let start = Instant::now();
        let wait = Duration::from_secs(120);
        let out = wait_until_member(&fake, &proid(), wait, || true).await;
        let WaitOutcome::TimedOut(why) = out else {
            panic!("expected a timeout, got {out:?}");
        };
        assert!(why.contains("proid1") && why.contains("120s"), "{why}");
        assert!(Instant::now() - start >= wait);
        let asked = fake.asked.lock().expect("lock").len();
        // With pauses doubling up to 30s, 120s hold between 5 and 10 questions.
        assert!((5..=10).contains(&asked), "asked {asked} times");
    }

    #[tokio::test(start_paused = true)]
    async fn stops_when_no_longer_wanted() {
        let fake = Fake {
            noes: usize::MAX,
            asked: Mutex::new(Vec::new()),
        };
        let calls = AtomicUsize::new(0);
        let out = wait_until_member(&fake, &proid(), Duration::from_secs(600), || {
            calls.fetch_add(1, Ordering::SeqCst) < 3
        })
        .await;
        assert_eq!(out, WaitOutcome::Cancelled);
        assert_eq!(fake.asked.lock().expect("lock").len(), 3);
    }

    /// A check that never answers must not hold the wait past its deadline.
    struct Hangs;

    #[async_trait]
    impl MembershipCheck for Hangs {
        async fn group_exists(&self, _: &Proid) -> Result<bool, CheckError> {
            Ok(true)
        }
        async fn is_member(&self, _: &Proid) -> Result<bool, CheckError> {
            std::future::pending().await
        }
    }

    /// A server that refuses every connection at once.
    struct Unreachable;

    #[async_trait]
    impl MembershipCheck for Unreachable {
        async fn group_exists(&self, _: &Proid) -> Result<bool, CheckError> {
            Ok(true)
        }
        async fn is_member(&self, _: &Proid) -> Result<bool, CheckError> {
            // Each check takes a moment, as a connection attempt does, so
            // the one started at the deadline is cut short.
            tokio::time::sleep(Duration::from_millis(10)).await;
            Err(CheckError::Directory(DirError::Unreachable {
                op: crate::directory::Op::Connect,
                message: "ldap://dc1:389: Connection refused (os error 111)".into(),
            }))
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_wait_that_runs_out_names_the_last_error_not_only_the_cut_short_check() {
        for seconds in [1, 4, 60] {
            let out =
                wait_until_member(&Unreachable, &proid(), Duration::from_secs(seconds), || {
                    true
                })
                .await;
            assert!(
                matches!(out, WaitOutcome::TimedOut(ref why) if why.contains("Connection refused")),
                "{seconds}s: {out:?}"
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_hanging_check_times_out() {
        let out = wait_until_member(&Hangs, &proid(), Duration::from_secs(60), || true).await;
        assert!(
            matches!(out, WaitOutcome::TimedOut(ref why) if why.contains("did not answer")),
            "{out:?}"
        );
    }

    /// A check refused for good (no right to read the group).
    struct Refused;

    #[async_trait]
    impl MembershipCheck for Refused {
        async fn group_exists(&self, _: &Proid) -> Result<bool, CheckError> {
            Ok(true)
        }
        async fn is_member(&self, _: &Proid) -> Result<bool, CheckError> {
            Err(CheckError::Directory(DirError::Result {
                op: crate::directory::Op::Search,
                dn: "OU=Groups,DC=x".into(),
                code: 50,
                message: "no read access".into(),
            }))
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_check_that_can_never_answer_ends_the_wait_at_once() {
        let start = Instant::now();
        let out = wait_until_member(&Refused, &proid(), Duration::from_secs(600), || true).await;
        assert!(
            matches!(out, WaitOutcome::Failed(ref why) if why.contains("insufficientAccessRights")),
            "{out:?}"
        );
        assert_eq!(Instant::now(), start, "not polled until the deadline");
    }
}

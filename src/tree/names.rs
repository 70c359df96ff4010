//! The names the placement tree is made of, as the mirror writes them under
//! `--fs-root`: one place, so that the scan, the watcher, the index's
//! warnings, `explain` and node mode cannot spell them differently.
//!
//! Only the tree's names are here. Node mode's own directories (`apps/`,
//! `running/`, `cleanup/`, `appevents/` and a container's `data/`) lie
//! under `--app-root`, which this process writes, not the mirror, and
//! belong to [`crate::node`].

/// The readiness marker at the root: the mirror writes it once its first
/// full sync is complete (and touches it on every later update). Until it
/// exists the tree is incomplete and nothing is acted on.
pub const MODIFIED: &str = ".modified";

/// The directory of server files, one per host (`servers/<host>`), each a
/// YAML or JSON mapping with the host's partition, `nt.dc` and `nt.dn`.
pub const SERVERS: &str = "servers";

/// The directory of per-host placement directories
/// (`placement/<host>/<instance>`, one file per instance placed there).
pub const PLACEMENT: &str = "placement";

/// The directory of app manifests (`scheduled/<instance>`), read only by
/// node mode when it configures an instance.
pub const SCHEDULED: &str = "scheduled";

#[cfg(test)]
mod tests {
    use super::*;

    /// The names are the mirror's, not ours to choose: a change here
    /// would make every tree look empty or never ready.
    #[test]
    fn the_names_are_the_mirrors() {
        assert_eq!(
            [MODIFIED, SERVERS, PLACEMENT, SCHEDULED],
            [".modified", "servers", "placement", "scheduled"]
        );
    }

    /// The marker is a dot name, which the tree otherwise ignores; the
    /// directories are not, or their entries would be ignored as well.
    #[test]
    fn only_the_marker_is_a_dot_name() {
        assert!(MODIFIED.starts_with('.'));
        for dir in [SERVERS, PLACEMENT, SCHEDULED] {
            assert!(!dir.starts_with('.') && !dir.contains('/'), "{dir}");
        }
    }
}

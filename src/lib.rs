//! gmsa-reconciler keeps Active Directory gMSA host groups equal to the set
//! of hosts that currently run each service account's ("proid's")
//! containers, so that a host can fetch a gMSA password exactly while it
//! needs it.
//!
//! # Layout
//! - [`model`]: proids, host names, normalised DNs, the group pattern, partition globs.
//! - [`tree`]: the placement tree: its names, the server-file parser, whole-tree scan, path classification, the watcher.
//! - [`index`]: per-proid, per-host reference counts, updated event by event.
//! - [`plan`]: desired state against the directory's groups, as a deterministic plan, and the mass-deletion guard that judges it.
//! - [`ldif`]: the LDIF reader and writer (RFC 2849).
//! - [`directory`]: the directory trait, its LDAP and LDIF-file backends, the in-memory engine under the LDIF one (the tests' recording fake in test builds), and opening the configured one.
//! - [`reconcile`]: one reconcile pass (plan and guard, missing groups, apply, record), shared by `sync` and the daemon; result codes, retries.
//! - [`audit`]: the audit trail of applied membership changes: one INFO line per group, and JSON lines in `--audit-log`, each pass's intents written before its first Modify.
//! - [`backoff`]: how long to wait before trying again, for every retry and poll.
//! - [`output`]: the LDIF and JSON renderings of plans and results.
//! - [`cli`]: options from flags, environment and config file, validated into a config.
//! - [`commands`]: `plan`, `sync`, `check`, `explain` and `finish` on top of the above.
//! - [`config_check`]: `config`: every source of options checked, the effective options with their origin.
//! - [`explain`]: why each host is or is not in a proid's group.
//! - [`daemon`]: `run`: the event loop (`mod.rs`) wiring its parts: the setup before the loop and what the daemon runs on (`start`), the tree side (`tree`), the directory side with the driving of directory work (`sync`), the schedule (`schedule`, pure timing), the group cache (`groups`), leadership and readiness (`leadership`), signals (`signals`), and node mode (`node`).
//! - [`election`]: which replica writes: leader election through a ZooKeeper lock.
//! - [`metrics`]: Prometheus metrics, health and readiness over HTTP.
//! - [`safe_fs`]: how the files other processes write are opened (the tree, manifests, container markers, the LDIF directory file, the audit log): regular files only, no links followed, sizes capped.
//! - [`node`]: node mode: container directories, credential specs and app events for this host's placements.

pub mod audit;
pub mod backoff;
pub mod cli;
pub mod commands;
pub mod config_check;
pub mod daemon;
pub mod directory;
pub mod election;
pub mod explain;
pub mod index;
pub mod ldif;
pub mod metrics;
pub mod model;
pub mod node;
pub mod output;
pub mod parallel;
pub mod plan;
pub mod reconcile;
pub mod safe_fs;
pub mod tree;

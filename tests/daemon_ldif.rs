//! The daemon against the LDIF-file directory and a real temp tree: a fast
//! check of the event loop's logic. The same behaviours against a real
//! slapd are in `daemon_slapd.rs`.

mod support;

use std::fs;
use std::sync::Arc;
use std::time::Duration;

use gmsa_reconciler::cli::{self, Command, RunConfig};
use gmsa_reconciler::daemon;
use gmsa_reconciler::metrics::Metrics;
use support::tree::{eventually, Tree};

fn run_config(tree: &Tree, directory: &std::path::Path, extra: &[&str]) -> RunConfig {
    let mut argv = vec![
        "gmsa-reconciler".to_owned(),
        "run".to_owned(),
        format!("--fs-root={}", tree.root().display()),
        format!("--directory={}", directory.display()),
        "--group-ou=OU=Groups,DC=ad,DC=com".to_owned(),
        "--batch-window=20ms".to_owned(),
        "--no-lock".to_owned(),
        "--partition=p1".to_owned(),
    ];
    argv.extend(extra.iter().map(|s| s.to_string()));
    match cli::parse(argv).expect("parse").command {
        Command::Run(args) => RunConfig::from_args(&args).expect("valid"),
        _ => panic!("not run"),
    }
}

fn members(directory: &std::path::Path, group: &str) -> Vec<String> {
    let text = fs::read_to_string(directory).expect("directory");
    let records = gmsa_reconciler::ldif::parse(&text).expect("ldif");
    let record = records
        .iter()
        .find(|r| {
            r.dn.eq_ignore_ascii_case(&format!("cn={group},ou=Groups,dc=ad,dc=com"))
        })
        .expect("group");
    let mut members: Vec<String> = record
        .attrs
        .iter()
        .filter(|(k, _)| k.eq_ignore_ascii_case("member"))
        .map(|(_, v)| v.to_lowercase())
        .collect();
    members.sort();
    members
}

fn host_dn(host: &str) -> String {
    format!("cn={host},ou=computers,dc=ad,dc=com")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follows_placements_and_shuts_down_cleanly() {
    support::tree::init_logs();
    let tree = Tree::new();
    tree.server("h1", "p1", &host_dn("h1"));
    tree.server("h2", "p1", &host_dn("h2"));
    tree.place("h1", "web.app#1");
    let dir = tempfile::tempdir().expect("tmp");
    let directory = dir.path().join("directory.ldif");
    fs::write(
        &directory,
        support::tree::groups_ldif(&[
            ("web-gmsa-hosts", &[host_dn("h2").as_str()]),
            ("db-gmsa-hosts", &[]),
        ]),
    )
    .expect("write directory");

    let metrics = Arc::new(Metrics::new());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let config = run_config(&tree, &directory, &[]);
    let handle = tokio::spawn(daemon::run(config, metrics.clone(), async {
        let _ = stopped.await;
    }));

    // Not ready until the mirror says the tree is complete.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!metrics.is_ready());
    tree.mark_ready();
    eventually("initial sync", || {
        members(&directory, "web-gmsa-hosts") == vec![host_dn("h1")]
    })
    .await;
    // The file is written before the sync counts as applied.
    eventually("ready after the initial sync", || metrics.is_ready()).await;

    tree.place("h2", "web.app#2");
    tree.place("h2", "db.app#1");
    eventually("placements added", || {
        members(&directory, "web-gmsa-hosts") == vec![host_dn("h1"), host_dn("h2")]
            && members(&directory, "db-gmsa-hosts") == vec![host_dn("h2")]
    })
    .await;

    tree.unplace("h1", "web.app#1");
    eventually("placement removed", || {
        members(&directory, "web-gmsa-hosts") == vec![host_dn("h2")]
    })
    .await;

    // A new host whose placement directory is filled before the server file appears.
    tree.place("h3", "db.app#7");
    tree.server("h3", "p1", &host_dn("h3"));
    eventually("new host", || {
        members(&directory, "db-gmsa-hosts") == vec![host_dn("h2"), host_dn("h3")]
    })
    .await;

    // The server leaves the partition: its memberships go with it.
    tree.server("h3", "p2", &host_dn("h3"));
    eventually("partition change", || {
        members(&directory, "db-gmsa-hosts") == vec![host_dn("h2")]
    })
    .await;

    // The mirror withdraws its readiness marker: writes stop until it is back.
    std::fs::remove_file(tree.root().join(".modified")).expect("remove .modified");
    eventually("not ready without .modified", || !metrics.is_ready()).await;
    tree.place("h1", "db.app#9");
    tree.mark_ready();
    eventually("ready again", || metrics.is_ready()).await;
    eventually("changes made meanwhile applied", || {
        members(&directory, "db-gmsa-hosts") == vec![host_dn("h1"), host_dn("h2")]
    })
    .await;

    stop.send(()).expect("daemon running");
    handle.await.expect("join").expect("clean stop");
}

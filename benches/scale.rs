//! Criterion micro-benchmarks of the reconciler's pure core at cluster
//! scale: the tree scan, building the index from a snapshot, single events
//! applied to a full index, the plan of every group and of one dirty proid
//! (among every group, and from its own group alone as a daemon batch plans it),
//! and reading the LDIF directory.
//!
//! The estate is the `L` preset of the generator (10,000 hosts, 200,000
//! placements, 5,000 proids), written once into a temp directory; set
//! `GMSA_BENCH_PRESET=S` for a quick run. Before anything is timed the
//! setup checks that the scan reads back what was written and that the plan
//! finds exactly the drift the generator put in, so the numbers come from
//! correct runs.
//!
//! ```text
//! cargo bench --bench scale
//! cargo bench --bench scale -- plan/     # one group of benchmarks
//! ```

#[allow(dead_code)]
#[path = "support/estate.rs"]
mod estate;

use std::collections::BTreeSet;
use std::hint::black_box;
use std::time::Duration;

use criterion::{BatchSize, Criterion};
use estate::{Estate, Params, GROUP_OU, PARTITION};
use gmsa_reconciler::directory::ldif_file::LdifFileDirectory;
use gmsa_reconciler::directory::Directory;
use gmsa_reconciler::index::Index;
use gmsa_reconciler::model::{Dn, GroupPattern, HostName, PartitionGlob, Proid};
use gmsa_reconciler::plan::{plan, Scope};
use gmsa_reconciler::tree::scan::scan;
use gmsa_reconciler::tree::{ServerInfo, TreeEvent};

fn preset() -> (String, Params) {
    let name = std::env::var("GMSA_BENCH_PRESET").unwrap_or_else(|_| "L".to_owned());
    let params = Params::preset(&name).expect("GMSA_BENCH_PRESET is S or L");
    (name, params)
}

fn all(c: &mut Criterion) {
    let (size, params) = preset();
    let estate = Estate::generate(params);
    let dir = tempfile::tempdir().expect("temp dir");
    let root = dir.path().join("tree");
    let ldif = dir.path().join("directory.ldif");
    estate.write_tree(&root).expect("write the tree");
    estate.write_ldif(&ldif).expect("write the LDIF");

    let snapshot = scan(&root).expect("scan");
    assert_eq!(
        snapshot,
        estate.snapshot(),
        "the scan reads what was written"
    );
    let partition = PartitionGlob::parse(PARTITION).expect("glob");
    let index = Index::from_snapshot(partition.clone(), snapshot.clone());
    let groups = estate.directory_groups();
    let pattern = GroupPattern::parse("{}-gmsa-hosts").expect("pattern");
    let full = plan(&index, &groups, &pattern, Scope::All);
    let want = estate.expected;
    assert_eq!(
        (full.changes.len(), full.adds(), full.deletes()),
        (want.groups_changed, want.adds, want.deletes),
        "the plan finds the generated drift"
    );

    let mut g = c.benchmark_group(format!("scan/{size}"));
    g.bench_function("tree", |b| b.iter(|| scan(black_box(&root)).expect("scan")));
    g.finish();

    let mut g = c.benchmark_group(format!("index/{size}"));
    // The index takes the snapshot's instance names over, so each
    // iteration gets a copy made outside the timing. Freeing the index is
    // timed, as `iter` would time it.
    g.bench_function("from_snapshot", |b| {
        b.iter_batched(
            || snapshot.clone(),
            |copy| drop(Index::from_snapshot(partition.clone(), black_box(copy))),
            BatchSize::LargeInput,
        )
    });
    // A new (proid, host) pair and its removal: both change a desired set,
    // the path that marks a proid dirty. The index is the same after each
    // iteration, so every iteration does the same work.
    let mut live = index.clone();
    let largest = (0..estate.proids.len())
        .max_by_key(|&k| estate.desired[k].len())
        .expect("proids");
    let host_index = (0..estate.hosts.len())
        .find(|h| !estate.desired[largest].contains(h))
        .unwrap_or(0);
    let host = HostName::new(&estate.hosts[host_index].name).expect("host");
    let instance = format!("{}.bench#9999999999", estate.proids[largest]);
    let added = TreeEvent::PlacementAdded {
        host: host.clone(),
        instance: instance.clone(),
    };
    let removed = TreeEvent::PlacementRemoved {
        host: host.clone(),
        instance,
    };
    g.bench_function("placement_added_then_removed", |b| {
        b.iter(|| {
            let a = live.apply(black_box(&added));
            let r = live.apply(black_box(&removed));
            assert_eq!(a.dirty.len() + r.dirty.len(), 2);
        })
    });
    // A server whose DN changes and changes back: every placement on it
    // moves to the new DN and back.
    let h = &estate.hosts[host_index];
    let server = |dn: &str| TreeEvent::ServerUpserted {
        host: host.clone(),
        info: Ok(ServerInfo {
            partition: Some(PARTITION.into()),
            dc: Some(h.dc.clone()),
            dn: Some(dn.to_owned()),
        }),
    };
    let (moved, back) = (
        server("CN=RENAMED,OU=Computers,DC=ad,DC=com"),
        server(&h.nt_dn),
    );
    g.bench_function("server_dn_changed_then_back", |b| {
        b.iter(|| {
            live.apply(black_box(&moved));
            live.apply(black_box(&back));
        })
    });
    g.finish();

    let mut g = c.benchmark_group(format!("plan/{size}"));
    g.bench_function("all", |b| {
        b.iter(|| plan(black_box(&index), &groups, &pattern, Scope::All))
    });
    let one = |k: usize| BTreeSet::from([Proid::new(&estate.proids[k]).expect("proid")]);
    let big = one(largest);
    g.bench_function("one_proid_largest", |b| {
        b.iter(|| plan(black_box(&index), &groups, &pattern, Scope::Only(&big)))
    });
    // What a daemon batch plans: the proid's own group, not every group.
    let own = std::slice::from_ref(&groups[largest]);
    assert_eq!(
        plan(&index, own, &pattern, Scope::Only(&big)),
        plan(&index, &groups, &pattern, Scope::Only(&big)),
        "the proid's own group is all its plan needs"
    );
    g.bench_function("one_proid_largest_own_group", |b| {
        b.iter(|| plan(black_box(&index), own, &pattern, Scope::Only(&big)))
    });
    let mut by_size: Vec<usize> = (0..estate.proids.len()).collect();
    by_size.sort_by_key(|&k| estate.desired[k].len());
    let typical = one(by_size[by_size.len() / 2]);
    g.bench_function("one_proid_median", |b| {
        b.iter(|| plan(black_box(&index), &groups, &pattern, Scope::Only(&typical)))
    });
    g.finish();

    let mut g = c.benchmark_group(format!("directory/{size}"));
    let ou = Dn::parse(GROUP_OU).expect("OU");
    g.bench_function("ldif_open_and_search_groups", |b| {
        b.iter(|| {
            let directory = LdifFileDirectory::open(black_box(&ldif)).expect("open");
            futures::executor::block_on(directory.search_groups(&ou)).expect("search")
        })
    });
    g.finish();
}

fn main() {
    // Few samples and short windows: the whole run stays within a few
    // minutes on two shared cores, most of it writing and removing the tree.
    let mut c = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .configure_from_args();
    all(&mut c);
    c.final_summary();
}

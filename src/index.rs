//! Per-proid, per-host reference counts (stub: API only).
#![allow(missing_docs, unused_variables)]

use std::collections::BTreeSet;

use crate::model::{Dn, PartitionGlob, Proid};
use crate::tree::{Snapshot, TreeEvent};

#[derive(Debug, Clone, Default)]
pub struct Index {}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Applied {
    pub dirty: BTreeSet<Proid>,
    pub warning: Option<String>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IndexStats {
    pub servers_in_scope: usize,
    pub placements: usize,
    pub proids: usize,
}

impl Index {
    pub fn new(partition: PartitionGlob) -> Self { Index {} }
    pub fn from_snapshot(partition: PartitionGlob, snapshot: &Snapshot) -> Self { Index {} }
    pub fn apply(&mut self, event: &TreeEvent) -> Applied { Applied::default() }
    pub fn proids(&self) -> Vec<Proid> { vec![] }
    pub fn desired(&self, proid: &Proid) -> BTreeSet<Dn> { BTreeSet::new() }
    pub fn is_managed(&self, dn: &Dn) -> bool { false }
    pub fn retiring(&self, proid: &Proid) -> BTreeSet<Dn> { BTreeSet::new() }
    pub fn clear_retiring(&mut self, proid: &Proid, done: &BTreeSet<Dn>) {}
    pub fn dcs(&self) -> Vec<String> { vec![] }
    pub fn stats(&self) -> IndexStats { IndexStats::default() }
}

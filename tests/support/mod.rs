//! Test support shared by the integration tests.
#![allow(dead_code)]

pub mod scenario;
pub mod tree;
pub mod zookeeper;

//! stub
#![allow(missing_docs)]
use std::path::Path;
use crate::model::HostName;
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathKind { Modified, ServersDir, PlacementDir, Server(HostName), HostDir(HostName), Placement(HostName, String), Ignored }
pub fn classify(_root: &Path, _path: &Path) -> PathKind { PathKind::Ignored }

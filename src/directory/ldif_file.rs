//! stub
#![allow(missing_docs)]
use super::*;
use crate::model::Dn;
pub struct LdifFileDirectory;
impl LdifFileDirectory {
    pub fn open(_p: &std::path::Path) -> Result<Self, DirError> {
        Err(DirError::Fatal("stub".into()))
    }
}
#[async_trait]
impl Directory for LdifFileDirectory {
    async fn capabilities(&self) -> Result<Capabilities, DirError> {
        todo!()
    }
    async fn search_groups(&self, _b: &Dn) -> Result<Vec<Group>, DirError> {
        todo!()
    }
    async fn find_group(&self, _b: &Dn, _n: &str) -> Result<Option<Group>, DirError> {
        todo!()
    }
    async fn read_group(&self, _d: &Dn) -> Result<Option<Group>, DirError> {
        todo!()
    }
    async fn modify_members(&self, _g: &Dn, _c: &MemberChange) -> Result<(), DirError> {
        todo!()
    }
}

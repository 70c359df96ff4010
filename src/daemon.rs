//! stub
#![allow(missing_docs)]
use crate::cli::RunConfig;
pub async fn run_until_signalled(_c: RunConfig) -> Result<u8, crate::commands::CommandError> {
    Ok(0)
}

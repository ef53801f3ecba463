//! (being written) `pgrelay tail`.
use crate::config::TailArgs;

#[derive(Debug, thiserror::Error)]
pub enum TailError {
    #[error("not implemented yet")]
    NotYet,
}

pub async fn run(
    _args: TailArgs,
    _until: impl std::future::Future<Output = ()>,
) -> Result<(), TailError> {
    Err(TailError::NotYet)
}

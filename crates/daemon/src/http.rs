//! The HTTP listener of the daemon (`[daemon] listen`).

use std::sync::Arc;

use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::state::Shared;
use pgkeep_core::error::{Error, Result};

/// Binds `[daemon] listen` and serves until `stop` turns true; `None` when no listener is
/// configured. Binding errors fail the daemon's start.
pub async fn start(
    shared: Arc<Shared>,
    stop: watch::Receiver<bool>,
) -> Result<Option<JoinHandle<()>>> {
    let _ = stop;
    match shared.file().daemon.listen.clone() {
        None => Ok(None),
        Some(l) => Err(Error::usage(format!(
            "[daemon] listen = {l:?}: the HTTP listener is not built yet"
        ))),
    }
}

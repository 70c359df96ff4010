//! Signals: the first SIGINT or SIGTERM shuts the daemon down cleanly, a
//! second exits at once.

use std::sync::Arc;

use tokio::sync::mpsc;
use tracing::{info, warn};

use super::run;
use crate::cli::RunConfig;
use crate::commands::{CommandError, EXIT_OK};
use crate::metrics::Metrics;

/// Runs until SIGINT or SIGTERM; a second signal exits at once.
pub async fn run_until_signalled(config: RunConfig) -> Result<u8, CommandError> {
    let (tx, mut rx) = mpsc::channel::<()>(1);
    tokio::spawn(async move {
        let mut signals = 0;
        loop {
            wait_for_signal().await;
            signals += 1;
            if signals == 1 {
                info!("signal received: shutting down");
                let _ = tx.send(()).await;
            } else {
                warn!("second signal: exiting at once");
                std::process::exit(1);
            }
        }
    });
    let shutdown = async move {
        let _ = rx.recv().await;
    };
    run(config, Arc::new(Metrics::new()), shutdown).await?;
    Ok(EXIT_OK)
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match (
            signal(SignalKind::interrupt()),
            signal(SignalKind::terminate()),
        ) {
            (Ok(mut int), Ok(mut term)) => {
                tokio::select! {
                    _ = int.recv() => {}
                    _ = term.recv() => {}
                }
            }
            _ => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

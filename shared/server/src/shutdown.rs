//! Waiting for the process to be asked to stop.

/// Resolves on SIGINT (Ctrl-C) or SIGTERM (Kubernetes, systemd). If a handler
/// cannot be installed the process would be unstoppable gracefully, so that is
/// logged and the other signal still works.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %e, "cannot listen for SIGINT");
            std::future::pending::<()>().await;
        }
    };
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        () = ctrl_c => tracing::info!(signal = "SIGINT", "stop signal received"),
        () = terminate => tracing::info!(signal = "SIGTERM", "stop signal received"),
    }
}

//! Waiting for the process to be asked to stop.

use std::future::Future;

use tokio::signal::unix::{SignalKind, signal};

/// Resolves on SIGINT (Ctrl-C) or SIGTERM (Kubernetes, systemd).
///
/// The handlers are installed by this call, not when the future is first
/// polled: a service passes this future to its server before it logs that it is
/// serving, and a SIGTERM sent right after that line (while the server's first
/// poll is still under way on a busy machine) must stop it gracefully rather
/// than kill it with the signal's default action. Call it inside the runtime.
/// If a handler cannot be installed the process would be unstoppable
/// gracefully, so that is logged and the other signal still works.
pub fn shutdown_signal() -> impl Future<Output = ()> {
    let listen = |kind: SignalKind, name: &'static str| {
        let installed = signal(kind);
        async move {
            match installed {
                Ok(mut stream) => {
                    stream.recv().await;
                }
                Err(e) => {
                    tracing::error!(error = %e, signal = name, "cannot listen for the signal");
                    std::future::pending::<()>().await;
                }
            }
        }
    };
    let interrupt = listen(SignalKind::interrupt(), "SIGINT");
    let terminate = listen(SignalKind::terminate(), "SIGTERM");
    async move {
        tokio::select! {
            () = interrupt => tracing::info!(signal = "SIGINT", "stop signal received"),
            () = terminate => tracing::info!(signal = "SIGTERM", "stop signal received"),
        }
    }
}

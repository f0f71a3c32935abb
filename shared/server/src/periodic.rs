//! The one periodic loop the services' background tasks share (the gateway's
//! catalog refresher, inventory's payment sweeper, the wallet's hold sweeper).

use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// Runs `tick` at once and then every `interval` until `stop` is cancelled.
/// A run that overruns delays the next one rather than bunching the missed
/// ones; `stop` ends the loop between runs (a run in progress finishes first).
///
/// `tick` makes each run's future (a plain closure returning one, rather than
/// an async closure, whose futures the compiler cannot yet prove `Send` for a
/// spawned task).
pub async fn every<F, Fut>(interval: Duration, stop: &CancellationToken, mut tick: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = ()>,
{
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            () = stop.cancelled() => return,
        }
        tick().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn runs_at_once_then_every_interval_until_stopped() {
        let stop = CancellationToken::new();
        let started = tokio::time::Instant::now();
        let runs = std::sync::Mutex::new(Vec::new());
        every(Duration::from_secs(10), &stop, || {
            let mut runs = runs.lock().unwrap();
            runs.push(started.elapsed().as_secs());
            if runs.len() == 3 {
                stop.cancel();
            }
            std::future::ready(())
        })
        .await;
        assert_eq!(runs.into_inner().unwrap(), [0, 10, 20]);
    }
}

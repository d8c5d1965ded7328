//! The worker's stop signal, shared by every task: set once on shutdown or when the run is done.

use std::time::Duration;

use tokio::sync::watch;

/// Sets the stop signal.
#[derive(Debug)]
pub struct StopSender(watch::Sender<bool>);

/// Observes the stop signal; cheap to clone into tasks.
#[derive(Debug, Clone)]
pub struct Stop(watch::Receiver<bool>);

/// A new, unset stop signal.
pub fn stop_signal() -> (StopSender, Stop) {
    let (tx, rx) = watch::channel(false);
    (StopSender(tx), Stop(rx))
}

impl StopSender {
    /// Asks every task to stop.
    pub fn stop(&self) {
        // send_replace: works even when every receiver is gone.
        self.0.send_replace(true);
    }
}

impl Stop {
    /// True once stop was asked for.
    pub fn is_set(&self) -> bool {
        *self.0.borrow()
    }

    /// Resolves when stop is asked for (or the sender is gone, which means the same).
    pub async fn wait(&self) {
        let mut rx = self.0.clone();
        let _ = rx.wait_for(|s| *s).await;
    }

    /// Sleeps for `d`; returns true when stop was asked for meanwhile.
    pub async fn sleep(&self, d: Duration) -> bool {
        tokio::select! {
            _ = tokio::time::sleep(d) => self.is_set(),
            _ = self.wait() => true,
        }
    }
}

//! Liveness as the worker sees it, and the gRPC health endpoint that reports it: SERVING once
//! the model is loaded and registered and while calls succeed; NOT_SERVING before that, and when
//! every attempt has been failing for longer than the stall window (a peer unreachable, weights
//! unusable), so an orchestrator can restart a stuck worker.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use medrl_proto::server::{GrpcServer, ServerOptions, bind};
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tonic_health::ServingStatus;

use crate::error::WorkerError;
use crate::stop::Stop;

/// Success and failure of the worker's calls, as health sees them.
#[derive(Debug, Default)]
pub struct Progress {
    ready: AtomicBool,
    failing_since: Mutex<Option<Instant>>,
    // Wakes the health task on a change, so readiness shows at once rather than a tick later.
    changed: Notify,
}

impl Progress {
    /// The worker can work (model loaded, registered) or no longer can (stopping).
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::SeqCst);
        self.changed.notify_one();
    }

    /// A call succeeded: any failure streak ends.
    pub fn ok(&self) {
        if self.failing_since.lock().unwrap_or_else(PoisonError::into_inner).take().is_some() {
            self.changed.notify_one();
        }
    }

    /// Resolves at the next change of readiness or the end of a failure streak.
    pub async fn changed(&self) {
        self.changed.notified().await;
    }

    /// A call failed: a failure streak starts unless one is running.
    pub fn failed(&self) {
        self.failing_since.lock().unwrap_or_else(PoisonError::into_inner).get_or_insert_with(Instant::now);
    }

    /// True when failing without a success for longer than `stall_after`.
    pub fn stuck(&self, stall_after: Duration) -> bool {
        self.failing_since.lock().unwrap_or_else(PoisonError::into_inner).is_some_and(|since| since.elapsed() > stall_after)
    }

    /// What health should report now.
    pub fn status(&self, stall_after: Duration) -> ServingStatus {
        if self.ready.load(Ordering::SeqCst) && !self.stuck(stall_after) { ServingStatus::Serving } else { ServingStatus::NotServing }
    }
}

/// Serves `grpc.health.v1` (and reflection) on `addr` and keeps the status of the server as a
/// whole ("") in step with `progress` until `stop`. Returns the bound address.
pub async fn start(addr: SocketAddr, progress: Arc<Progress>, stall_after: Duration, stop: Stop) -> Result<(SocketAddr, JoinHandle<()>), WorkerError> {
    let serve_err = |cause: String| WorkerError::Serve { what: "health", addr, cause };
    let (listener, local) = bind(addr).await.map_err(|e| serve_err(e.to_string()))?;
    let server = GrpcServer::new(&ServerOptions::default()).map_err(|e| serve_err(e.to_string()))?;
    let reporter = server.health();
    reporter.set_service_status("", ServingStatus::NotServing).await;
    let task = tokio::spawn(async move {
        let shutdown = stop.clone();
        let serving = tokio::spawn(async move { server.serve(listener, async move { shutdown.wait().await }).await });
        // Poll often enough that a change shows within a second, and well within the window.
        let tick = (stall_after / 4).clamp(Duration::from_millis(20), Duration::from_secs(1));
        let mut last = ServingStatus::NotServing;
        loop {
            let now = progress.status(stall_after);
            if now != last {
                tracing::info!(status = ?now, "health changed");
                reporter.set_service_status("", now).await;
                last = now;
            }
            tokio::select! {
                _ = progress.changed() => {}
                _ = tokio::time::sleep(tick) => {}
                _ = stop.wait() => break,
            }
        }
        reporter.set_service_status("", ServingStatus::NotServing).await;
        match serving.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::error!(error = %e, "health endpoint failed"),
            Err(e) => tracing::error!(error = %e, "health endpoint task failed"),
        }
    });
    tracing::info!(%local, "health endpoint listening");
    Ok((local, task))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_follows_readiness_and_failure_streaks() {
        let p = Progress::default();
        let window = Duration::from_millis(30);
        assert_eq!(p.status(window), ServingStatus::NotServing, "not ready yet");
        p.set_ready(true);
        assert_eq!(p.status(window), ServingStatus::Serving);
        p.failed();
        assert_eq!(p.status(window), ServingStatus::Serving, "a short streak is not stuck");
        std::thread::sleep(Duration::from_millis(40));
        p.failed();
        assert_eq!(p.status(window), ServingStatus::NotServing, "the streak started at the first failure");
        p.ok();
        assert_eq!(p.status(window), ServingStatus::Serving);
    }
}

//! The background sweep: expires overdue leases and dead workers' leases (their prompts go back
//! to the queue), and keeps gRPC health in step with the run: NOT_SERVING once the run is done,
//! stalled, or its journal has failed. It also appends the support snapshot of each completed
//! epoch to `support.jsonl` (`support_log`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use crate::service::Shared;
use crate::support_log::SupportLog;

/// What health reports and why.
fn health_of(done: bool, stalled: bool, journal_failed: bool) -> (ServingStatus, &'static str) {
    if journal_failed {
        (ServingStatus::NotServing, "journal failed")
    } else if done {
        (ServingStatus::NotServing, "run finished")
    } else if stalled {
        (ServingStatus::NotServing, "run stalled")
    } else {
        (ServingStatus::Serving, "serving")
    }
}

/// Sets the status of the coordinator service and of the server as a whole ("").
pub async fn set_health(health: &HealthReporter, status: ServingStatus) {
    health.set_service_status(medrl_proto::service_names::COORDINATOR, status).await;
    health.set_service_status("", status).await;
}

/// Sweeps every `interval` until `shutdown` turns true; publishes "run done" on `done`.
pub async fn run(
    shared: Arc<Shared>,
    health: HealthReporter,
    interval: Duration,
    mut shutdown: watch::Receiver<bool>,
    done: watch::Sender<bool>,
) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last = None;
    let mut support = shared.config.journal.as_deref().and_then(|j| shared.core.lock().ok().map(|core| SupportLog::new(j, &core)));
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.wait_for(|stop| *stop) => break,
        }
        let now = Instant::now();
        let snapshot = shared.core.lock().map(|mut core| {
            let reaped = core.reap(now);
            let lines = support.as_mut().map(|s| s.due(&core)).unwrap_or_default();
            (reaped, core.is_done(), core.is_stalled(now), lines)
        });
        // Drop the poisoned guard (if any) before awaiting.
        let snapshot = snapshot.map_err(|_| ());
        let Ok((reaped, is_done, stalled, lines)) = snapshot else {
            tracing::error!("state lock poisoned; the sweeper stops");
            set_health(&health, ServingStatus::NotServing).await;
            break;
        };
        if let Some(s) = &support {
            s.append(&lines);
        }
        let metrics = &shared.metrics;
        metrics.leases_expired.inc_by(u64::from(reaped.expired_leases));
        metrics.prompts_requeued.inc_by(u64::from(reaped.requeued));
        metrics.workers_lost.inc_by(reaped.dead_workers.len() as u64);
        let (status, why) = health_of(is_done, stalled, shared.journal.failure().is_some());
        if last != Some(status) {
            tracing::info!(status = ?status, why, "health");
            set_health(&health, status).await;
            last = Some(status);
        }
        done.send_if_modified(|d| {
            let changed = *d != is_done;
            *d = is_done;
            changed
        });
    }
    // The last epoch may complete between the final tick and the shutdown.
    if let Some(s) = support.as_mut() {
        let lines = shared.core.lock().map(|core| s.due(&core)).unwrap_or_default();
        s.append(&lines);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn health_follows_the_run() {
        assert_eq!(health_of(false, false, false).0, ServingStatus::Serving);
        assert_eq!(health_of(true, false, false).0, ServingStatus::NotServing);
        assert_eq!(health_of(false, true, false).0, ServingStatus::NotServing);
        assert_eq!(health_of(false, false, true).0, ServingStatus::NotServing);
    }
}

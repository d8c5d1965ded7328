//! Keeps gRPC health in step with the learner: SERVING while it runs and makes progress,
//! NOT_SERVING once it stopped, failed or finished, or when groups have waited for longer than the
//! stall timeout without a step or a new group.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use crate::service::state::{Phase, Shared};

/// How often the watchdog looks.
const INTERVAL: Duration = Duration::from_millis(500);

/// Sets the status of both learner services and of the server as a whole ("").
pub async fn set_health(health: &HealthReporter, status: ServingStatus) {
    for name in [medrl_proto::service_names::LEARNER, medrl_proto::service_names::WEIGHTS, ""] {
        health.set_service_status(name, status).await;
    }
}

/// The status the state calls for, and why.
fn judge(shared: &Shared, stall: Duration) -> (ServingStatus, &'static str) {
    let Ok(inner) = shared.lock() else {
        return (ServingStatus::NotServing, "state lock poisoned");
    };
    match inner.phase {
        Phase::Running => {}
        Phase::Done => return (ServingStatus::NotServing, "run finished"),
        Phase::Stopped => return (ServingStatus::NotServing, "stopped"),
        Phase::Failed(_) => return (ServingStatus::NotServing, "step loop failed"),
    }
    let has_work = inner.buffer.len() + inner.buffer.in_training() > 0;
    if has_work && inner.last_progress.elapsed() > stall {
        return (ServingStatus::NotServing, "no step or new group within the stall timeout");
    }
    (ServingStatus::Serving, "serving")
}

/// Watches until `stop` turns true.
pub async fn watch_health(shared: Arc<Shared>, health: HealthReporter, stall: Duration, mut stop: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last = None;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.wait_for(|s| *s) => break,
        }
        let (status, why) = judge(&shared, stall);
        if last != Some(status) {
            tracing::info!(status = ?status, why, "learner health");
            set_health(&health, status).await;
            last = Some(status);
        }
    }
    set_health(&health, ServingStatus::NotServing).await;
}

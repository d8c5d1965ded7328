//! The worker's side of the Coordinator service: registration (again after the coordinator
//! forgets the worker), and the calls of the lease cycle under the current worker id.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use medrl_proto::client::AuthedChannel;
use medrl_proto::v1::coordinator_client::CoordinatorClient;
use medrl_proto::v1::{
    AckLeaseRequest, AckLeaseResponse, DeliveredPrompt, GetImageRequest, HeartbeatRequest, ImageRef, HeartbeatResponse, LeasePromptsRequest,
    LeasePromptsResponse, RegisterWorkerRequest, WorkerCapabilities,
};
use tonic::{Code, Status};

use crate::backoff::Backoff;
use crate::state::SharedState;
use crate::stop::Stop;

/// Heartbeat period used when the coordinator names none.
const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(10);

/// A connection to the coordinator under one worker identity.
pub struct Session {
    client: CoordinatorClient<AuthedChannel>,
    name: String,
    capabilities: WorkerCapabilities,
    worker_id: Mutex<String>,
    heartbeat: Mutex<Duration>,
    registrations: AtomicU64,
    // Serialises re-registration, so the heartbeat task and the main loop noticing the same
    // lost identity register once, not twice.
    registering: tokio::sync::Mutex<()>,
}

/// True when the coordinator does not know the worker id (it restarted or declared us dead).
pub fn is_unknown_worker(status: &Status) -> bool {
    status.code() == Code::NotFound && status.message().contains("`worker_id`")
}

/// True when the coordinator refuses the policy version we report as nonexistent.
pub fn is_version_refused(status: &Status) -> bool {
    status.code() == Code::FailedPrecondition && status.message().contains("`policy_version`")
}

impl Session {
    /// A session not yet registered.
    pub fn new(client: CoordinatorClient<AuthedChannel>, name: &str, capabilities: WorkerCapabilities) -> Self {
        Session {
            client,
            name: name.to_string(),
            capabilities,
            worker_id: Mutex::new(String::new()),
            heartbeat: Mutex::new(DEFAULT_HEARTBEAT),
            registrations: AtomicU64::new(0),
            registering: tokio::sync::Mutex::new(()),
        }
    }

    /// The current worker id (empty before registration).
    pub fn worker_id(&self) -> String {
        self.worker_id.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// Successful registrations so far.
    pub fn registrations(&self) -> u64 {
        self.registrations.load(Ordering::SeqCst)
    }

    /// The heartbeat period the coordinator asked for.
    pub fn heartbeat_interval(&self) -> Duration {
        *self.heartbeat.lock().unwrap_or_else(PoisonError::into_inner)
    }

    async fn register_once(&self, state: &SharedState) -> Result<(), Status> {
        let request = RegisterWorkerRequest { worker_name: self.name.clone(), capabilities: Some(self.capabilities.clone()) };
        let reply = self.client.clone().register_worker(request).await?.into_inner();
        if reply.worker_id.is_empty() {
            return Err(Status::internal("the coordinator answered RegisterWorker with an empty worker_id"));
        }
        // A nonsense period from a peer is clamped, not trusted: too fast floods, too slow expires.
        let period = match reply.heartbeat_interval_ms {
            0 => DEFAULT_HEARTBEAT,
            ms => Duration::from_millis(ms).clamp(Duration::from_millis(50), Duration::from_secs(600)),
        };
        // Heartbeat twice per period asked: one lost heartbeat must not cost the worker its leases.
        *self.heartbeat.lock().unwrap_or_else(PoisonError::into_inner) = period / 2;
        state.set_published(reply.policy_version);
        tracing::info!(worker_id = %reply.worker_id, run_id = %reply.run_id, policy_version = reply.policy_version, "registered with the coordinator");
        *self.worker_id.lock().unwrap_or_else(PoisonError::into_inner) = reply.worker_id;
        self.registrations.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    /// Registers, retrying with backoff until it works; false when stopped first.
    pub async fn register(&self, state: &SharedState, backoff: &mut Backoff, stop: &Stop) -> bool {
        let _guard = self.registering.lock().await;
        self.register_with_guard(state, backoff, stop).await
    }

    async fn register_with_guard(&self, state: &SharedState, backoff: &mut Backoff, stop: &Stop) -> bool {
        loop {
            if stop.is_set() {
                return false;
            }
            match self.register_once(state).await {
                Ok(()) => {
                    backoff.reset();
                    return true;
                }
                Err(status) => {
                    let delay = backoff.next_delay();
                    tracing::warn!(code = ?status.code(), message = status.message(), retry_in = ?delay, "registration failed");
                    if stop.sleep(delay).await {
                        return false;
                    }
                }
            }
        }
    }

    /// Registers again if `stale_id` is still the current id (someone else may have already);
    /// the leases of the old identity are revoked. False when stopped first.
    pub async fn reregister(&self, stale_id: &str, state: &SharedState, backoff: &mut Backoff, stop: &Stop) -> bool {
        let _guard = self.registering.lock().await;
        if self.worker_id() != stale_id {
            return true;
        }
        tracing::warn!(worker_id = stale_id, "the coordinator no longer knows this worker; registering again");
        state.leases().revoke_all();
        self.register_with_guard(state, backoff, stop).await
    }

    /// Asks for up to `max_prompts` prompts while holding `version`.
    pub async fn lease(&self, max_prompts: u32, version: u64) -> Result<LeasePromptsResponse, Status> {
        let request = LeasePromptsRequest { worker_id: self.worker_id(), max_prompts, policy_version: version };
        Ok(self.client.clone().lease_prompts(request).await?.into_inner())
    }

    /// Reports liveness and the version held, renewing `lease_ids`.
    pub async fn heartbeat(&self, version: u64, lease_ids: Vec<String>) -> Result<HeartbeatResponse, Status> {
        let request = HeartbeatRequest { worker_id: self.worker_id(), policy_version: version, lease_ids };
        Ok(self.client.clone().heartbeat(request).await?.into_inner())
    }

    /// Closes a lease, naming the prompts whose groups reached the learner.
    pub async fn ack(&self, lease_id: &str, worker_id: &str, delivered: Vec<DeliveredPrompt>) -> Result<AckLeaseResponse, Status> {
        let request = AckLeaseRequest { lease_id: lease_id.to_string(), worker_id: worker_id.to_string(), delivered };
        Ok(self.client.clone().ack_lease(request).await?.into_inner())
    }

    /// The bytes of an image by content address (unverified: see `images`); the name lets a
    /// restarted coordinator find them.
    pub async fn image(&self, image: &ImageRef) -> Result<Bytes, Status> {
        let reply = self.client.clone().get_image(GetImageRequest::from(image)).await?.into_inner();
        Ok(reply.data)
    }
}

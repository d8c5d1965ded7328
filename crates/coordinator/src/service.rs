//! The `medrl.v1.Coordinator` gRPC service: checks each request, runs it against the core under
//! one lock, queues its journal events in order, and answers once they are durable.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use medrl_proto::v1::coordinator_server::Coordinator;
use medrl_proto::v1::{
    AckLeaseRequest, AckLeaseResponse, GetImageRequest, GetImageResponse, GetNcclIdRequest, GetRunStateRequest, HeartbeatRequest,
    HeartbeatResponse, ImageRef, Lease, LeasePromptsRequest, LeasePromptsResponse, LeasedPrompt, NcclRendezvous,
    PublishNcclIdRequest, PublishNcclIdResponse, PublishVersionRequest, PublishVersionResponse, RegisterWorkerRequest,
    RegisterWorkerResponse, ReportConsumedRequest, ReportConsumedResponse, RunState, SyncLearnerRequest, SyncLearnerResponse,
};
use tonic::{Request, Response, Status};
use tracing::Instrument;

use crate::config::CoordinatorConfig;
use crate::core::{Core, LeaseOutcome};
use crate::images::{ImageError, ImageStore};
use crate::journal::{Event, Journal, Ticket};
use crate::metrics::{Metrics, ReasonLabel};
use crate::request_error::RequestError;

/// State shared by the service, the sweeper and the metrics endpoint.
pub struct Shared {
    /// The state machine.
    pub core: Mutex<Core>,
    /// Durable log of the state machine's events.
    pub journal: Journal,
    /// Content-addressed images.
    pub images: ImageStore,
    /// Prometheus metrics.
    pub metrics: Metrics,
    /// The settings.
    pub config: CoordinatorConfig,
}

impl Shared {
    /// Locks the core; a poisoned lock (a panic elsewhere) is an internal error, not a crash.
    pub fn lock(&self) -> Result<MutexGuard<'_, Core>, RequestError> {
        self.core.lock().map_err(|_| RequestError::Internal("state lock poisoned".into()))
    }

    /// Refuses changes once a journal write has failed: memory would run ahead of the disk.
    fn writable(&self) -> Result<(), RequestError> {
        match self.journal.failure() {
            Some(e) => Err(RequestError::Unavailable(format!("the coordinator's journal failed ({e}); it accepts no changes"))),
            None => Ok(()),
        }
    }

    /// Journals events (caller holds the core lock, so the order is the state's order) and
    /// counts what they mean for the metrics.
    pub fn record(&self, events: &[Event]) -> Ticket {
        for event in events {
            match event {
                Event::Delivered { prompts, .. } => self.metrics.prompts_delivered.inc_by(prompts.len() as u64),
                Event::Trained { prompts, .. } => self.metrics.prompts_trained.inc_by(prompts.len() as u64),
                Event::Requeued { prompts, .. } => self.metrics.prompts_requeued.inc_by(prompts.len() as u64),
                Event::Skipped { reason, prompts, .. } => {
                    self.metrics.prompts_skipped.get_or_create(&ReasonLabel { reason: reason.as_str() }).inc_by(prompts.len() as u64)
                }
                _ => 0,
            };
        }
        self.journal.append(events)
    }
}

fn unix_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

async fn durable(ticket: Ticket) -> Result<(), RequestError> {
    ticket.durable().await.map_err(|e| RequestError::Unavailable(e.to_string()))
}

/// The gRPC face of the coordinator.
#[derive(Clone)]
pub struct CoordinatorService {
    shared: Arc<Shared>,
}

impl CoordinatorService {
    /// Serves the shared state.
    pub fn new(shared: Arc<Shared>) -> CoordinatorService {
        CoordinatorService { shared }
    }

    fn finish<T>(&self, rpc: &'static str, result: Result<T, RequestError>) -> Result<Response<T>, Status> {
        match result {
            Ok(v) => Ok(Response::new(v)),
            Err(e) => {
                let status = Status::from(e);
                tracing::warn!(rpc, code = ?status.code(), message = status.message(), "request refused");
                self.shared.metrics.count_error(rpc, &status);
                Err(status)
            }
        }
    }

    async fn lease(&self, req: LeasePromptsRequest) -> Result<LeasePromptsResponse, RequestError> {
        let shared = &self.shared;
        shared.writable()?;
        let (outcome, prompts) = {
            let mut core = shared.lock()?;
            let (outcome, events) = core.lease_prompts(&req.worker_id, req.max_prompts, req.policy_version, Instant::now())?;
            // Lease-path events (epoch openings, skips, failures) are re-derived identically on
            // replay, so the answer need not wait for the disk.
            drop(shared.record(&events));
            (outcome, core.prompts().clone())
        };
        let grant = match outcome {
            LeaseOutcome::Wait { reason, done } => {
                return Ok(LeasePromptsResponse {
                    lease: None,
                    retry_after_ms: shared.config.retry_after_ms,
                    done,
                    wait_reason: reason as i32,
                });
            }
            LeaseOutcome::Granted(grant) => grant,
        };
        // Hash images outside the lock: the first use of an image reads the whole file.
        let indexes: Vec<u32> = grant.prompts.iter().map(|g| g.index).collect();
        let (worker_shared, worker_prompts) = (shared.clone(), prompts.clone());
        let resolved = tokio::task::spawn_blocking(move || {
            indexes
                .into_iter()
                .map(|index| {
                    let images = worker_prompts.get(index).map_or(&[][..], |r| &r.images[..]);
                    let refs: Result<Vec<ImageRef>, ImageError> = images
                        .iter()
                        .map(|name| {
                            worker_shared.images.resolve(name).map(|r| ImageRef {
                                sha256: r.sha256,
                                size_bytes: r.size_bytes,
                                name: name.clone(),
                            })
                        })
                        .collect();
                    (index, refs)
                })
                .collect::<Vec<_>>()
        })
        .await
        .map_err(|e| RequestError::Internal(format!("image task: {e}")))?;
        let mut leased = Vec::with_capacity(resolved.len());
        for ((index, refs), granted) in resolved.into_iter().zip(&grant.prompts) {
            let record = prompts.get(index).ok_or_else(|| RequestError::Internal(format!("prompt index {index}")))?;
            match refs {
                Ok(images) => leased.push(LeasedPrompt {
                    prompt_id: record.id.clone(),
                    record_json: serde_json::to_string(record).map_err(|e| RequestError::Internal(e.to_string()))?,
                    images,
                    attempt: granted.attempt,
                }),
                Err(e) => {
                    let mut core = shared.lock()?;
                    let events = core.fail_leased(grant.seq, index, e.to_string())?;
                    drop(shared.record(&events));
                }
            }
        }
        if leased.is_empty() {
            return Ok(LeasePromptsResponse {
                lease: None,
                retry_after_ms: 0,
                done: false,
                wait_reason: medrl_proto::WaitReason::Unspecified as i32,
            });
        }
        shared.metrics.leases_granted.inc();
        shared.metrics.prompts_leased.inc_by(leased.len() as u64);
        let ttl_ms = grant.ttl.as_millis() as u64;
        tracing::debug!(lease = %grant.lease_id, epoch = grant.epoch, prompts = leased.len(), version = grant.version, "lease granted");
        Ok(LeasePromptsResponse {
            lease: Some(Lease {
                lease_id: grant.lease_id,
                epoch: grant.epoch,
                ttl_ms,
                deadline_unix_ms: unix_ms() + ttl_ms as i64,
                policy_version: grant.version,
                prompts: leased,
            }),
            retry_after_ms: 0,
            done: false,
            wait_reason: medrl_proto::WaitReason::Unspecified as i32,
        })
    }

    async fn image(&self, req: GetImageRequest) -> Result<GetImageResponse, RequestError> {
        if !medrl_proto::is_sha256_hex(&req.sha256) {
            return Err(RequestError::invalid("sha256", "expected 64 lowercase hex digits"));
        }
        let shared = self.shared.clone();
        let sha = req.sha256.clone();
        let read = tokio::task::spawn_blocking(move || shared.images.read(&sha, &req.name))
            .await
            .map_err(|e| RequestError::Internal(format!("image task: {e}")))?;
        match read {
            Ok(data) => Ok(GetImageResponse { sha256: req.sha256, data }),
            Err(ImageError::Unknown(_)) => Err(RequestError::unknown("sha256", &req.sha256, "no leased image has this address")),
            Err(e) => {
                tracing::error!(error = %e, "image could not be served");
                Err(RequestError::precondition("sha256", format!("the image {} cannot be served: {e}", req.sha256)))
            }
        }
    }

    async fn ack(&self, req: AckLeaseRequest) -> Result<AckLeaseResponse, RequestError> {
        let shared = &self.shared;
        shared.writable()?;
        let delivered: Vec<(String, Option<f32>)> = req.delivered.into_iter().map(|d| (d.prompt_id, d.pass_rate)).collect();
        let (result, ticket) = {
            let mut core = shared.lock()?;
            let (result, events) = core.ack(&req.lease_id, &req.worker_id, &delivered, Instant::now())?;
            (result, shared.record(&events))
        };
        durable(ticket).await?;
        for s in &result.staleness {
            shared.metrics.delivered_staleness.observe(*s as f64);
        }
        if result.late {
            tracing::info!(lease = %req.lease_id, delivered = result.delivered, "late ack of an expired lease accepted");
        }
        Ok(AckLeaseResponse { delivered: result.delivered, duplicate: result.duplicate, requeued: result.requeued, late: result.late })
    }

    async fn consumed(&self, req: ReportConsumedRequest) -> Result<ReportConsumedResponse, RequestError> {
        let shared = &self.shared;
        shared.writable()?;
        let trained: Vec<(u32, Vec<String>)> = req.trained.into_iter().map(|e| (e.epoch, e.prompt_ids)).collect();
        let requeue: Vec<(u32, Vec<String>)> = req.requeue.into_iter().map(|e| (e.epoch, e.prompt_ids)).collect();
        let (result, version, ticket) = {
            let mut core = shared.lock()?;
            let (result, events) = core.report_consumed(req.new_version, &trained, &requeue, Instant::now())?;
            (result, core.learner_version(), shared.record(&events))
        };
        durable(ticket).await?;
        Ok(ReportConsumedResponse { trained: result.trained, duplicate: result.duplicate, requeued: result.requeued, learner_version: version })
    }

    async fn sync(&self, req: SyncLearnerRequest) -> Result<SyncLearnerResponse, RequestError> {
        let shared = &self.shared;
        shared.writable()?;
        let (result, version, run_id, ticket) = {
            let mut core = shared.lock()?;
            let (result, events) = core.sync_learner(req.high_water_version, Instant::now())?;
            (result, core.published_version(), core.run_id().to_string(), shared.record(&events))
        };
        durable(ticket).await?;
        tracing::info!(
            high_water = req.high_water_version,
            requeued_delivered = result.requeued_delivered,
            requeued_trained = result.requeued_trained,
            expired_leases = result.expired_leases,
            requeued_leased = result.requeued_leased,
            "learner synced"
        );
        Ok(SyncLearnerResponse {
            requeued_delivered: result.requeued_delivered,
            requeued_trained: result.requeued_trained,
            policy_version: version,
            run_id,
        })
    }

    async fn publish(&self, req: PublishVersionRequest) -> Result<PublishVersionResponse, RequestError> {
        let shared = &self.shared;
        shared.writable()?;
        let (version, ticket) = {
            let mut core = shared.lock()?;
            let events = core.publish(req.version, &req.sha256, &req.format)?;
            (core.published_version(), shared.record(&events))
        };
        durable(ticket).await?;
        tracing::info!(version, "policy version published");
        Ok(PublishVersionResponse { policy_version: version })
    }
}

#[tonic::async_trait]
impl Coordinator for CoordinatorService {
    async fn register_worker(&self, request: Request<RegisterWorkerRequest>) -> Result<Response<RegisterWorkerResponse>, Status> {
        let req = request.into_inner();
        let span = tracing::info_span!("register_worker", name = %req.worker_name);
        let _enter = span.enter();
        let result = (|| {
            let mut core = self.shared.lock()?;
            let id = core.register(&req.worker_name, Instant::now())?;
            tracing::info!(worker = %id, caps = ?req.capabilities, "worker registered");
            let cfg = &self.shared.config;
            Ok(RegisterWorkerResponse {
                worker_id: id,
                run_id: core.run_id().to_string(),
                heartbeat_interval_ms: cfg.heartbeat_interval().as_millis() as u64,
                lease_ttl_ms: cfg.lease_ttl().as_millis() as u64,
                policy_version: core.published_version(),
            })
        })();
        self.finish("RegisterWorker", result)
    }

    async fn lease_prompts(&self, request: Request<LeasePromptsRequest>) -> Result<Response<LeasePromptsResponse>, Status> {
        let started = Instant::now();
        let req = request.into_inner();
        let span = tracing::info_span!("lease_prompts", worker = %req.worker_id, max = req.max_prompts);
        let result = self.lease(req).instrument(span).await;
        self.shared.metrics.lease_latency.observe(started.elapsed().as_secs_f64());
        self.finish("LeasePrompts", result)
    }

    async fn get_image(&self, request: Request<GetImageRequest>) -> Result<Response<GetImageResponse>, Status> {
        let req = request.into_inner();
        let span = tracing::debug_span!("get_image", sha256 = %req.sha256);
        let result = self.image(req).instrument(span).await;
        self.finish("GetImage", result)
    }

    async fn heartbeat(&self, request: Request<HeartbeatRequest>) -> Result<Response<HeartbeatResponse>, Status> {
        let req = request.into_inner();
        let span = tracing::debug_span!("heartbeat", worker = %req.worker_id);
        let _enter = span.enter();
        let result = (|| {
            let mut core = self.shared.lock()?;
            let (version, valid) = core.heartbeat(&req.worker_id, req.policy_version, &req.lease_ids, Instant::now())?;
            let (valid_lease_ids, ttl_ms) = valid.into_iter().map(|(id, ttl)| (id, ttl.as_millis() as u64)).unzip();
            Ok(HeartbeatResponse { policy_version: version, valid_lease_ids, ttl_ms, done: core.is_done() })
        })();
        self.finish("Heartbeat", result)
    }

    async fn ack_lease(&self, request: Request<AckLeaseRequest>) -> Result<Response<AckLeaseResponse>, Status> {
        let req = request.into_inner();
        let span = tracing::info_span!("ack_lease", lease = %req.lease_id, worker = %req.worker_id);
        let result = self.ack(req).instrument(span).await;
        self.finish("AckLease", result)
    }

    async fn report_consumed(&self, request: Request<ReportConsumedRequest>) -> Result<Response<ReportConsumedResponse>, Status> {
        let req = request.into_inner();
        let span = tracing::info_span!("report_consumed", new_version = req.new_version);
        let result = self.consumed(req).instrument(span).await;
        self.finish("ReportConsumed", result)
    }

    async fn sync_learner(&self, request: Request<SyncLearnerRequest>) -> Result<Response<SyncLearnerResponse>, Status> {
        let req = request.into_inner();
        let span = tracing::info_span!("sync_learner", high_water = req.high_water_version);
        let result = self.sync(req).instrument(span).await;
        self.finish("SyncLearner", result)
    }

    async fn publish_version(&self, request: Request<PublishVersionRequest>) -> Result<Response<PublishVersionResponse>, Status> {
        let req = request.into_inner();
        let span = tracing::info_span!("publish_version", version = req.version);
        let result = self.publish(req).instrument(span).await;
        self.finish("PublishVersion", result)
    }

    async fn get_run_state(&self, _request: Request<GetRunStateRequest>) -> Result<Response<RunState>, Status> {
        let result = self.shared.lock().map(|core| core.run_state(Instant::now()));
        self.finish("GetRunState", result)
    }

    async fn publish_nccl_id(&self, request: Request<PublishNcclIdRequest>) -> Result<Response<PublishNcclIdResponse>, Status> {
        let req = request.into_inner();
        let span = tracing::info_span!("publish_nccl_id", world_size = req.world_size);
        let _enter = span.enter();
        let result = self.shared.lock().and_then(|mut core| {
            let generation = core.publish_nccl(req.unique_id, req.world_size, req.members)?;
            tracing::info!(generation, "NCCL id published");
            Ok(PublishNcclIdResponse { generation })
        });
        self.finish("PublishNcclId", result)
    }

    async fn get_nccl_id(&self, request: Request<GetNcclIdRequest>) -> Result<Response<NcclRendezvous>, Status> {
        let req = request.into_inner();
        let result = self.shared.lock().and_then(|core| core.nccl(req.min_generation));
        self.finish("GetNcclId", result)
    }
}

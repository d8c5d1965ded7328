//! The learner's calls to the coordinator, each with a deadline, retried while the failure looks
//! transient (the coordinator restarting, a network blip) for a bounded time.

use std::future::Future;
use std::time::{Duration, Instant};

use medrl_proto::client::AuthedChannel;
use medrl_proto::v1::coordinator_client::CoordinatorClient;
use medrl_proto::v1::{
    EpochPrompts, GetImageRequest, GetImageResponse, GetRunStateRequest, ImageRef, PublishVersionRequest, PublishVersionResponse, ReportConsumedRequest,
    ReportConsumedResponse, RunState, SyncLearnerRequest, SyncLearnerResponse,
};
use medrl_proto::{ClientOptions, connect, with_deadline};
use tonic::{Code, Status};

use crate::service::error::{ServiceError, ServiceResult};

/// Pause between retries; doubled up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Codes after which the same call may succeed later.
fn transient(code: Code) -> bool {
    matches!(code, Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled | Code::Unknown | Code::Aborted)
}

/// A coordinator client with the learner's deadlines and retry window.
#[derive(Clone)]
pub struct CoordinatorRpc {
    client: CoordinatorClient<AuthedChannel>,
    timeout: Duration,
    retry_for: Duration,
}

impl CoordinatorRpc {
    /// Connects to `endpoint`, retrying for `retry_for` while the coordinator is not up yet.
    pub async fn connect(endpoint: &str, options: &ClientOptions, timeout: Duration, retry_for: Duration) -> ServiceResult<Self> {
        let deadline = Instant::now() + retry_for;
        let mut backoff = FIRST_BACKOFF;
        let channel = loop {
            match connect(endpoint, options).await {
                Ok(channel) => break channel,
                Err(e @ medrl_proto::ProtoError::Connect { .. }) if Instant::now() + backoff < deadline => {
                    tracing::warn!(error = %e, "coordinator not reachable yet; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
                Err(e) => return Err(e.into()),
            }
        };
        Ok(CoordinatorRpc { client: options.coordinator(channel), timeout, retry_for })
    }

    /// Runs `call` until it succeeds, fails for good, or the retry window closes.
    async fn retry<T, F, Fut>(&self, rpc: &'static str, mut call: F) -> ServiceResult<T>
    where
        F: FnMut(CoordinatorClient<AuthedChannel>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, Status>>,
    {
        let deadline = Instant::now() + self.retry_for;
        let mut backoff = FIRST_BACKOFF;
        loop {
            match call(self.client.clone()).await {
                Ok(response) => return Ok(response.into_inner()),
                Err(status) if transient(status.code()) && Instant::now() + backoff < deadline => {
                    tracing::warn!(rpc, code = ?status.code(), message = status.message(), "coordinator call failed; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
                Err(status) => return Err(ServiceError::coordinator(rpc, status)),
            }
        }
    }

    /// Aligns the coordinator with the learner's durable state at `high_water`.
    pub async fn sync_learner(&self, high_water: u64) -> ServiceResult<SyncLearnerResponse> {
        let t = self.timeout;
        self.retry("SyncLearner", |mut c| async move { c.sync_learner(with_deadline(SyncLearnerRequest { high_water_version: high_water }, t)).await })
            .await
    }

    /// Announces that `version` with checksum `sha256` can be fetched.
    pub async fn publish_version(&self, version: u64, sha256: &str) -> ServiceResult<PublishVersionResponse> {
        let t = self.timeout;
        let request = PublishVersionRequest { version, sha256: sha256.to_string(), format: medrl_weight_sync::FORMAT.to_string() };
        self.retry("PublishVersion", |mut c| {
            let request = request.clone();
            async move { c.publish_version(with_deadline(request, t)).await }
        })
        .await
    }

    /// Reports a step's trained and refused prompts (idempotent on the coordinator's side).
    pub async fn report_consumed(&self, new_version: u64, trained: Vec<EpochPrompts>, requeue: Vec<EpochPrompts>) -> ServiceResult<ReportConsumedResponse> {
        let t = self.timeout;
        let request = ReportConsumedRequest { new_version, trained, requeue };
        self.retry("ReportConsumed", |mut c| {
            let request = request.clone();
            async move { c.report_consumed(with_deadline(request, t)).await }
        })
        .await
    }

    /// The run's progress.
    pub async fn run_state(&self) -> ServiceResult<RunState> {
        let t = self.timeout;
        self.retry("GetRunState", |mut c| async move { c.get_run_state(with_deadline(GetRunStateRequest {}, t)).await }).await
    }

    /// Image bytes by content address (the name lets a restarted coordinator find them).
    pub async fn get_image(&self, image: &ImageRef) -> ServiceResult<GetImageResponse> {
        let t = self.timeout;
        let request = GetImageRequest::from(image);
        self.retry("GetImage", |mut c| {
            let request = request.clone();
            async move { c.get_image(with_deadline(request, t)).await }
        })
        .await
    }
}

//! The `medrl.v1.Learner` gRPC service: workers stream rollout groups; each is admitted (or not)
//! as it arrives, and the reply counts the outcomes and names the refused groups.

use std::sync::Arc;

use medrl_proto::v1::learner_server::Learner;
use medrl_proto::v1::{RolloutGroup, SubmitGroupsResponse};
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument;

use crate::service::images::ImageStore;
use crate::service::state::{Shared, Verdict};

/// Refused group ids listed in one reply at most, so a flood of bad groups cannot make the reply
/// itself exceed the message limit.
const MAX_LISTED_REJECTIONS: usize = 1024;

/// The gRPC face of the learner's buffer.
#[derive(Clone)]
pub struct SubmitService {
    shared: Arc<Shared>,
    images: Arc<ImageStore>,
}

impl SubmitService {
    /// Serves `shared`; accepted groups' images are prefetched into `images`.
    pub fn new(shared: Arc<Shared>, images: Arc<ImageStore>) -> SubmitService {
        SubmitService { shared, images }
    }

    async fn take(&self, mut stream: Streaming<RolloutGroup>) -> Result<SubmitGroupsResponse, Status> {
        let mut reply = SubmitGroupsResponse::default();
        // A stream error (peer gone, oversized message) ends the call; the groups admitted before
        // it stay admitted, and a retry of them counts as duplicates.
        while let Some(group) = stream.message().await? {
            let group_id = group.group_id.clone();
            let images = group.images.clone();
            let verdict = self.shared.admit(group).map_err(|e| Status::internal(e.to_string()))?;
            let mut reject = || {
                if reply.rejected_group_ids.len() < MAX_LISTED_REJECTIONS {
                    reply.rejected_group_ids.push(group_id.clone());
                }
            };
            match verdict {
                Verdict::Accepted => {
                    reply.accepted += 1;
                    // Fetch images now, while the trainer is busy, so the step does not wait.
                    self.images.prefetch(images);
                }
                Verdict::Duplicate => reply.duplicate += 1,
                Verdict::Stale => {
                    reply.stale += 1;
                    reject();
                }
                Verdict::Invalid(problem) => {
                    tracing::warn!(group = %group_id, %problem, "group refused as malformed");
                    reply.invalid += 1;
                    reject();
                }
                Verdict::Full => {
                    return Err(Status::resource_exhausted(format!(
                        "the learner's buffer is full ({} groups); retry later (group {group_id} and later ones were not taken)",
                        self.shared.max_buffered
                    )));
                }
            }
        }
        Ok(reply)
    }
}

#[tonic::async_trait]
impl Learner for SubmitService {
    async fn submit_groups(&self, request: Request<Streaming<RolloutGroup>>) -> Result<Response<SubmitGroupsResponse>, Status> {
        let span = tracing::info_span!("submit_groups");
        let reply = self.take(request.into_inner()).instrument(span.clone()).await?;
        span.in_scope(|| {
            tracing::debug!(accepted = reply.accepted, duplicate = reply.duplicate, stale = reply.stale, invalid = reply.invalid, "groups taken")
        });
        Ok(Response::new(reply))
    }
}

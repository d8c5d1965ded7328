//! A (re)starting learner joins its run: it tells the coordinator which version is durable
//! (SyncLearner, so delivered-but-untrained prompts and prompts of lost steps are requeued),
//! re-reports what its consumed log says was trained (the coordinator may have missed the last
//! report), and publishes its current weights as that version.

use candle_core::DType;
use medrl_proto::v1::EpochPrompts;
use medrl_weight_sync::{PublishedWeights, WeightPublisher, encode_weights};
use std::sync::Arc;

use crate::service::consumed::ConsumedIndex;
use crate::service::coordinator::CoordinatorRpc;
use crate::service::error::{ServiceError, ServiceResult};
use crate::trainer::Trainer;

/// Prompts per catch-up report, so a long run's log never makes one oversized message.
const CATCH_UP_CHUNK: usize = 10_000;

/// Syncs the coordinator to `version` and re-reports the consumed log.
pub async fn sync_with_coordinator(rpc: &CoordinatorRpc, version: u64, consumed: &ConsumedIndex) -> ServiceResult<()> {
    let sync = rpc.sync_learner(version).await?;
    tracing::info!(
        version,
        run_id = %sync.run_id,
        requeued_delivered = sync.requeued_delivered,
        requeued_trained = sync.requeued_trained,
        "synced with the coordinator"
    );
    // Version 0 has trained nothing; the coordinator refuses trained prompts for it anyway.
    if version == 0 || consumed.is_empty() {
        return Ok(());
    }
    let mut reported = 0u32;
    let mut duplicates = 0u32;
    for (epoch, prompts) in consumed.prompts_by_epoch() {
        for chunk in prompts.chunks(CATCH_UP_CHUNK) {
            let trained = vec![EpochPrompts { epoch, prompt_ids: chunk.to_vec() }];
            let answer = rpc.report_consumed(version, trained, Vec::new()).await?;
            reported += answer.trained;
            duplicates += answer.duplicate;
        }
    }
    tracing::info!(newly_trained = reported, already_known = duplicates, "consumed log re-reported");
    Ok(())
}

/// Encodes and publishes the trainer's current weights as its version, off the async threads
/// (a 7B model takes seconds). Gives the trainer back with the publication.
pub async fn publish_current(trainer: Trainer, publisher: &WeightPublisher, dtype: DType) -> ServiceResult<(Trainer, Arc<PublishedWeights>)> {
    let publisher = publisher.clone();
    let task = tokio::task::spawn_blocking(move || {
        let version = trainer.step;
        let published = trainer
            .policy
            .merged_weights()
            .map_err(ServiceError::from)
            .and_then(|w| encode_weights(&w, dtype).map_err(ServiceError::from))
            .and_then(|blob| publisher.publish(version, blob).map_err(ServiceError::from));
        (trainer, published)
    });
    let (trainer, published) = task.await.map_err(|e| ServiceError::Stopped(format!("weight encoding task: {e}")))?;
    Ok((trainer, published?))
}

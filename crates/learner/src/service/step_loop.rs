//! The learner's step loop, on a thread of its own (a step is minutes of blocking compute on a
//! large model; async tasks keep serving meanwhile). It waits for a step's worth of groups, trains
//! on them, and then, in this order: records the step in the consumed log (fsync), publishes the
//! new weights, tells the coordinator (PublishVersion, then ReportConsumed), writes metrics, and
//! checkpoints when due. It ends when the coordinator says the run is done and no group waits.
//!
//! The order makes a crash at any point safe: before the log line the step never happened (the
//! coordinator requeues its prompts when the restarted learner syncs); after it, a restarted
//! learner resumed from an older checkpoint rewinds the log past it, and one resumed from a
//! checkpoint containing it refuses those prompts as duplicates and reports them trained.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use candle_core::DType;
use medrl_proto::v1::{EpochPrompts, RunState};
use medrl_weight_sync::{WeightPublisher, encode_weights_into};
use tokio::runtime::Handle;
use tokio::sync::watch;

use crate::batch::Group;
use crate::service::buffer::Accepted;
use crate::service::consumed::{ConsumedGroup, ConsumedLog};
use crate::service::convert::to_batch_group;
use crate::service::coordinator::CoordinatorRpc;
use crate::service::error::{ServiceError, ServiceResult};
use crate::service::images::ImageStore;
use crate::service::settings::LearnerSettings;
use crate::service::state::{Phase, Shared};
use crate::service::steplog::{StepLog, StepSummary};
use crate::trainer::Trainer;

/// Name of the final model folder inside the run directory (Hugging Face layout).
pub const FINAL_MODEL: &str = "final";

/// How the loop ended.
#[derive(Debug, Clone, PartialEq)]
pub struct LoopOutcome {
    /// The last policy version.
    pub version: u64,
    /// Steps this process took.
    pub steps: u64,
    /// True when the run finished; false when the loop was stopped first.
    pub finished: bool,
    /// The newest checkpoint written by this process.
    pub checkpoint: Option<PathBuf>,
    /// The final model (only when the run finished).
    pub final_model: Option<PathBuf>,
}

/// What the loop needs, assembled by `serve_learner`.
pub struct LoopParts {
    /// The model and optimizer.
    pub trainer: Trainer,
    /// State shared with the services.
    pub shared: Arc<Shared>,
    /// Settings.
    pub settings: LearnerSettings,
    /// Coordinator calls.
    pub rpc: CoordinatorRpc,
    /// Image fetches.
    pub images: Arc<ImageStore>,
    /// The Weights service's state.
    pub publisher: WeightPublisher,
    /// The durable consumed log.
    pub log: ConsumedLog,
    /// metrics.jsonl.
    pub steplog: StepLog,
    /// The runtime the async calls run on.
    pub runtime: Handle,
    /// Turns true when the loop should stop after the current step.
    pub stop: watch::Receiver<bool>,
    /// Dtype of the published weights.
    pub weight_dtype: DType,
}

/// What to do next.
enum Next {
    Step(Vec<Accepted>),
    Finish,
    Wait,
}

/// The loop's state.
pub struct StepLoop {
    p: LoopParts,
    /// Step of the newest checkpoint on disk that equals the trainer's state, if any.
    checkpointed_step: Option<u64>,
    last_checkpoint: Option<PathBuf>,
    failures: u32,
    /// Since when delivered prompts have had no group here (see `requeue_orphans`).
    orphans_since: Option<Instant>,
}

fn unix_seconds() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

/// The checkpoint folder `save_checkpoint` writes for `step`.
fn checkpoint_dir(run_dir: &Path, step: u64) -> PathBuf {
    run_dir.join("checkpoints").join(format!("step-{step:06}"))
}

/// Prompt ids grouped per epoch, as the coordinator's reports want them.
fn by_epoch<'a>(keys: impl IntoIterator<Item = &'a ConsumedGroup>) -> Vec<EpochPrompts> {
    let mut map: BTreeMap<u32, Vec<String>> = BTreeMap::new();
    for k in keys {
        map.entry(k.epoch).or_default().push(k.prompt_id.clone());
    }
    map.into_iter().map(|(epoch, prompt_ids)| EpochPrompts { epoch, prompt_ids }).collect()
}

impl StepLoop {
    /// A loop over `parts`.
    pub fn new(parts: LoopParts) -> StepLoop {
        let step = parts.trainer.step;
        let on_disk = checkpoint_dir(&parts.settings.run_dir, step);
        let checkpointed = on_disk.join("trainer.json").exists();
        StepLoop {
            checkpointed_step: checkpointed.then_some(step),
            last_checkpoint: checkpointed.then_some(on_disk),
            p: parts,
            failures: 0,
            orphans_since: None,
        }
    }

    /// Runs until the run is done, a stop is asked for, or a fatal error; gives the trainer back.
    pub fn run(mut self) -> (Trainer, ServiceResult<LoopOutcome>) {
        let span = tracing::info_span!("step_loop");
        let result = span.in_scope(|| self.run_inner());
        let phase = match &result {
            Ok(o) if o.finished => Phase::Done,
            Ok(_) => Phase::Stopped,
            Err(e) => {
                tracing::error!(error = %e, "learner step loop failed");
                Phase::Failed(e.to_string())
            }
        };
        self.p.shared.set_phase(phase);
        (self.p.trainer, result)
    }

    fn run_inner(&mut self) -> ServiceResult<LoopOutcome> {
        loop {
            if *self.p.stop.borrow() {
                return self.stop();
            }
            match self.next()? {
                Next::Step(groups) => self.step_counting_failures(groups)?,
                Next::Finish => return self.finish(),
                Next::Wait => self.wait(),
            }
        }
    }

    fn take(&self, n: usize) -> ServiceResult<Vec<Accepted>> {
        Ok(self.p.shared.lock()?.buffer.take(n))
    }

    /// Decides between a full step, a partial last step, finishing and waiting.
    fn next(&mut self) -> ServiceResult<Next> {
        let per_step = self.p.settings.prompts_per_step;
        if self.p.shared.lock()?.buffer.len() >= per_step {
            self.orphans_since = None;
            return Ok(Next::Step(self.take(per_step)?));
        }
        self.flush_catch_up()?;
        // A stop must not wait out the retries of an unreachable coordinator.
        let (rpc, stop) = (&self.p.rpc, &mut self.p.stop);
        let polled = self.p.runtime.block_on(async {
            tokio::select! {
                state = rpc.run_state() => Some(state),
                _ = stop.wait_for(|s| *s) => None,
            }
        });
        let Some(state) = polled else { return Ok(Next::Wait) };
        let state: RunState = state?;
        if state.done {
            let dropped = self.p.shared.lock()?.buffer.drain_pending();
            if !dropped.is_empty() {
                // Their prompts are already final on the coordinator (trained, skipped, failed).
                tracing::warn!(groups = dropped.len(), "the run is done; dropping groups that arrived for finished prompts");
            }
            return Ok(Next::Finish);
        }
        // When nothing is pending or leased and no epoch is left to open, every delivered prompt
        // is in the buffer: no more groups can come, so train on what there is (the run's last
        // step). An unopened epoch means workers will lease more (epochs open on demand).
        let all_opened = state.epoch_counts.len() >= state.epochs as usize;
        let open: u64 = state.epoch_counts.iter().map(|e| u64::from(e.pending) + u64::from(e.leased)).sum();
        let delivered: u64 = state.epoch_counts.iter().map(|e| u64::from(e.delivered)).sum();
        let (waiting, in_training) = {
            let inner = self.p.shared.lock()?;
            (inner.buffer.len(), inner.buffer.in_training())
        };
        if open == 0 && waiting > 0 && all_opened {
            tracing::info!(groups = waiting, "no prompt is pending or leased; taking a partial step");
            self.orphans_since = None;
            return Ok(Next::Step(self.take(per_step)?));
        }
        if open == 0 && waiting == 0 && in_training == 0 && delivered > 0 {
            // No epoch condition here: orphans count against the lease budget, so with enough of
            // them no worker could lease and open the next epoch.
            self.requeue_orphans(delivered)?;
        } else {
            self.orphans_since = None;
        }
        Ok(Next::Wait)
    }

    /// Reports prompts refused as duplicates of the consumed log when no step is coming to carry
    /// them (otherwise the coordinator would wait for them forever).
    fn flush_catch_up(&mut self) -> ServiceResult<()> {
        let (catch_up, version) = {
            let mut inner = self.p.shared.lock()?;
            if inner.catch_up.is_empty() || !inner.buffer.is_empty() {
                return Ok(());
            }
            (std::mem::take(&mut inner.catch_up), inner.version)
        };
        let trained = catch_up.into_iter().map(|(epoch, prompts)| EpochPrompts { epoch, prompt_ids: prompts.into_iter().collect() }).collect();
        self.p.runtime.block_on(self.p.rpc.report_consumed(version, trained, Vec::new()))?;
        Ok(())
    }

    /// Delivered prompts with no group here can never be trained: a worker acked a group this
    /// learner refused at step time (after the refusal was reported), or a previous learner held
    /// it. Once that has lasted a moment (not a race between an ack and this poll), a sync at the
    /// current version sends them back to the queue; every step up to it is in the consumed log,
    /// so nothing else changes.
    fn requeue_orphans(&mut self, delivered: u64) -> ServiceResult<()> {
        let grace = (self.p.settings.poll_interval() * 5).max(Duration::from_secs(1));
        let since = *self.orphans_since.get_or_insert_with(Instant::now);
        if since.elapsed() < grace {
            return Ok(());
        }
        let version = self.p.trainer.step;
        tracing::warn!(delivered, version, "delivered prompts have no group at the learner; requeueing them");
        self.p.runtime.block_on(self.p.rpc.sync_learner(version))?;
        self.orphans_since = None;
        Ok(())
    }

    /// Sleeps until a group arrives, the poll interval passes, or a stop is asked for.
    fn wait(&mut self) {
        let poll = self.p.settings.poll_interval();
        let shared = self.p.shared.clone();
        let stop = &mut self.p.stop;
        self.p.runtime.block_on(async {
            tokio::select! {
                _ = shared.wake.notified() => {}
                _ = tokio::time::sleep(poll) => {}
                _ = stop.wait_for(|s| *s) => {}
            }
        });
    }

    fn step_counting_failures(&mut self, groups: Vec<Accepted>) -> ServiceResult<()> {
        match self.step(groups)? {
            None => {
                self.failures = 0;
                Ok(())
            }
            Some(e) => {
                self.failures += 1;
                self.p.shared.metrics.step_failures.inc();
                tracing::error!(error = %e, failures = self.failures, "step failed; its prompts go back to the queue");
                if self.failures >= self.p.settings.max_step_failures {
                    return Err(ServiceError::Stopped(format!("{} consecutive steps failed; the last: {e}", self.failures)));
                }
                Ok(())
            }
        }
    }

    /// Decodes and preprocesses one group's images, then builds the trainer's group.
    fn prepare(&self, accepted: Accepted) -> Result<Group, String> {
        let vlm = &self.p.trainer.vlm;
        let mut images = Vec::with_capacity(accepted.group.images.len());
        for image in &accepted.group.images {
            let bytes = self.p.runtime.block_on(self.p.images.get(image, Some(&self.p.shared.metrics))).map_err(|e| e.to_string())?;
            let name = if image.name.is_empty() { image.sha256.as_str() } else { image.name.as_str() };
            images.push(vlm.images.process_bytes(&bytes, name).map_err(|e| e.to_string())?);
        }
        to_batch_group(accepted, images, vlm, self.p.settings.max_staleness > 0)
    }

    /// Reports refused groups and forgets them. Used when a step trains nothing.
    fn refuse_all(&self, version: u64, refused: &[ConsumedGroup]) -> ServiceResult<()> {
        self.p.runtime.block_on(self.p.rpc.report_consumed(version, Vec::new(), by_epoch(refused)))?;
        self.p.shared.lock()?.buffer.release(refused);
        Ok(())
    }

    /// One step. `Ok(Some(e))` is a failed training step (its prompts were requeued); errors
    /// that leave the learner unable to continue are `Err`.
    fn step(&mut self, taken: Vec<Accepted>) -> ServiceResult<Option<crate::Error>> {
        let started = Instant::now();
        let version = self.p.trainer.step;
        let span = tracing::info_span!("step", version, groups = taken.len());
        let _enter = span.enter();
        let mut refused: Vec<ConsumedGroup> = Vec::new();
        // The keys of the groups in `batch`, in the same order.
        let mut trained: Vec<ConsumedGroup> = Vec::new();
        let mut batch: Vec<Group> = Vec::new();
        for accepted in taken {
            let key = accepted.key();
            // Staleness is checked again: a group accepted before the last step may be too old now.
            if self.p.shared.is_stale(accepted.group.policy_version, version) {
                tracing::info!(group = %key.group_id, sampled = accepted.group.policy_version, "group went stale in the buffer");
                refused.push(key);
                continue;
            }
            match self.prepare(accepted) {
                Ok(group) => {
                    batch.push(group);
                    trained.push(key);
                }
                Err(problem) => {
                    tracing::warn!(group = %key.group_id, %problem, "group unusable at step time");
                    refused.push(key);
                }
            }
        }
        if batch.is_empty() {
            self.refuse_all(version, &refused)?;
            return Ok(None);
        }
        let report = match self.p.trainer.step(&batch) {
            Ok(report) => report,
            Err(e) => {
                refused.extend(trained);
                self.refuse_all(version, &refused)?;
                return Ok(Some(e));
            }
        };
        let step_seconds = started.elapsed().as_secs_f64();
        let new_version = self.p.trainer.step;
        crate::testhook::pause_if_asked("step", new_version);

        // 1. The durable record: from here on the step has happened.
        self.p.log.append(new_version, &trained)?;
        let catch_up = {
            let mut inner = self.p.shared.lock()?;
            for key in &trained {
                inner.consumed.insert(new_version, key);
            }
            inner.buffer.release(&trained);
            inner.buffer.release(&refused);
            inner.version = new_version;
            inner.steps += 1;
            inner.last_progress = Instant::now();
            std::mem::take(&mut inner.catch_up)
        };

        // 2. The new weights.
        let publish_started = Instant::now();
        // Written over the version before the current one, unless a worker still reads it.
        let blob = encode_weights_into(&self.p.trainer.policy.merged_weights()?, self.p.weight_dtype, self.p.publisher.spare_buffer())?;
        let weight_bytes = blob.len();
        let published = self.p.publisher.publish(new_version, blob)?;
        let publish_seconds = publish_started.elapsed().as_secs_f64();

        // 3. The coordinator: the version goes live, then the prompts count as trained.
        let mut report_trained = by_epoch(&trained);
        for (epoch, prompts) in catch_up {
            report_trained.push(EpochPrompts { epoch, prompt_ids: prompts.into_iter().collect() });
        }
        self.p.runtime.block_on(self.p.rpc.publish_version(new_version, &published.sha256))?;
        self.p.runtime.block_on(self.p.rpc.report_consumed(new_version, report_trained, by_epoch(&refused)))?;

        // 4. Metrics.
        let staleness: Vec<u64> = batch.iter().map(|g| version.saturating_sub(g.version)).collect();
        for &s in &staleness {
            self.p.shared.metrics.staleness.observe(s as f64);
        }
        let summary = StepSummary {
            step: report.step,
            version: new_version,
            loss: report.loss,
            grad_norm: report.grad_norm,
            mean_reward: report.mean_reward,
            mean_accuracy: report.mean_accuracy,
            mean_format: report.mean_format,
            tokens: report.tokens,
            groups: trained.len(),
            refused: refused.len(),
            // `batch` is non-empty here (an empty one returned above).
            mean_staleness: staleness.iter().sum::<u64>() as f64 / staleness.len() as f64,
            max_staleness: staleness.iter().copied().max().unwrap_or(0),
            lr: report.lr,
            step_seconds,
            publish_seconds,
            weight_bytes,
            time: unix_seconds(),
        };
        self.p.steplog.append(&summary)?;
        self.p.shared.metrics.observe_step(&summary);
        tracing::info!(
            version = new_version,
            loss = summary.loss,
            reward = summary.mean_reward,
            accuracy = summary.mean_accuracy,
            tokens = summary.tokens,
            seconds = step_seconds,
            "step done"
        );

        // 5. Checkpoint when due.
        let every = self.p.settings.save_every;
        if every > 0 && new_version.is_multiple_of(every) {
            self.checkpoint()?;
        }
        // Last, so a caller that sees the summary sees a step with everything done.
        self.p.shared.lock()?.last_step = Some(summary);
        Ok(None)
    }

    /// Writes a checkpoint of the current state unless one already exists.
    fn checkpoint(&mut self) -> ServiceResult<()> {
        let step = self.p.trainer.step;
        if self.checkpointed_step == Some(step) {
            return Ok(());
        }
        let started = Instant::now();
        let path = self.p.trainer.save_checkpoint(&self.p.settings.run_dir, &self.p.settings.base_model)?;
        tracing::info!(step, path = %path.display(), seconds = started.elapsed().as_secs_f64(), "checkpoint written");
        self.checkpointed_step = Some(step);
        self.last_checkpoint = Some(path);
        Ok(())
    }

    fn outcome(&self, finished: bool, final_model: Option<PathBuf>) -> ServiceResult<LoopOutcome> {
        let steps = self.p.shared.lock()?.steps;
        Ok(LoopOutcome { version: self.p.trainer.step, steps, finished, checkpoint: self.last_checkpoint.clone(), final_model })
    }

    /// Stops early: the current state is checkpointed so a restart loses nothing.
    fn stop(&mut self) -> ServiceResult<LoopOutcome> {
        if self.p.trainer.step > 0 {
            self.checkpoint()?;
        }
        tracing::info!(version = self.p.trainer.step, "step loop stopped");
        self.outcome(false, None)
    }

    /// The run is done: final checkpoint, then the final model in the HF layout.
    fn finish(&mut self) -> ServiceResult<LoopOutcome> {
        if self.p.trainer.step > 0 {
            self.checkpoint()?;
        }
        let run_dir = &self.p.settings.run_dir;
        let dest = run_dir.join(FINAL_MODEL);
        let tmp = run_dir.join(format!(".{FINAL_MODEL}.tmp"));
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |e| ServiceError::io(path, e)
        };
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).map_err(io(&tmp))?;
        }
        // Written aside and renamed, so `final` is either the complete model or absent.
        self.p.trainer.save_model(&tmp)?;
        if dest.exists() {
            std::fs::remove_dir_all(&dest).map_err(io(&dest))?;
        }
        std::fs::rename(&tmp, &dest).map_err(io(&dest))?;
        tracing::info!(version = self.p.trainer.step, path = %dest.display(), "run finished; final model written");
        self.outcome(true, Some(dest))
    }
}

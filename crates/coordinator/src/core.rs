//! The coordinator's state machine, free of I/O: leases, workers, the version clock, the staleness
//! gate and support-aware skipping. Every durable change is expressed as a journal [`Event`] and
//! applied through [`Core::apply`], the same function a restart replays, so a resumed run holds
//! exactly the state that was acknowledged before the crash.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use medrl_proto::v1::{EpochCounts, NcclRendezvous, RunState, WaitReason};

use crate::config::CoordinatorConfig;
use crate::journal::{Event, JournalError, SkipReason};
use crate::ledger::{Counts, EpochLedger, Status};
use crate::prompts::PromptSet;
use crate::request_error::{RequestError, check_str};
use crate::support::{PromptSupport, SupportClass, classify, skip_reason};

/// Longest worker name, lease id or prompt id accepted, in bytes.
pub const MAX_ID_BYTES: usize = 512;

/// A lease's life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseState {
    /// Out with its worker.
    Active,
    /// Its deadline passed or its worker died; its undelivered prompts went back to the queue.
    Expired,
    /// The worker acked it.
    Acked,
}

/// One lease (not durable).
#[derive(Debug, Clone)]
pub struct LeaseEntry {
    /// Wire id, `"{incarnation}-{seq}"`.
    pub id: String,
    /// Holder.
    pub worker_id: String,
    /// Epoch of its prompts.
    pub epoch: u32,
    /// Policy version to sample with.
    pub version: u64,
    /// Prompt indexes.
    pub prompts: Vec<u32>,
    /// When it was granted.
    pub granted_at: Instant,
    /// When it expires unless renewed.
    pub deadline: Instant,
    /// Active, expired or acked.
    pub state: LeaseState,
    /// When it stopped being active.
    pub closed_at: Option<Instant>,
}

/// A registered worker (not durable).
#[derive(Debug, Clone)]
pub struct Worker {
    /// Name given at registration.
    pub name: String,
    /// Last call seen from it.
    pub last_seen: Instant,
    /// Policy version it reported holding.
    pub version: u64,
}

/// One prompt of a grant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrantedPrompt {
    /// Prompt index.
    pub index: u32,
    /// Distinct per grant within the epoch, across restarts: incarnation in the high 32 bits.
    pub attempt: u64,
}

/// A lease that was just granted.
#[derive(Debug, Clone)]
pub struct Grant {
    /// Lease sequence number.
    pub seq: u64,
    /// Wire id.
    pub lease_id: String,
    /// Epoch of the prompts.
    pub epoch: u32,
    /// Policy version to sample with.
    pub version: u64,
    /// Lifetime.
    pub ttl: Duration,
    /// The prompts.
    pub prompts: Vec<GrantedPrompt>,
}

/// The answer to a lease request.
#[derive(Debug, Clone)]
pub enum LeaseOutcome {
    /// Prompts to work on.
    Granted(Grant),
    /// Nothing now.
    Wait {
        /// Why.
        reason: WaitReason,
        /// The run is finished.
        done: bool,
    },
}

/// What an ack did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AckResult {
    /// Newly delivered.
    pub delivered: u32,
    /// Already delivered or trained.
    pub duplicate: u32,
    /// Back to the queue.
    pub requeued: u32,
    /// The lease had expired.
    pub late: bool,
    /// Learner version minus lease version, per newly delivered prompt.
    pub staleness: Vec<u64>,
}

/// What a consumption report did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConsumedResult {
    /// Newly trained.
    pub trained: u32,
    /// Already trained.
    pub duplicate: u32,
    /// Sent back to the queue.
    pub requeued: u32,
}

/// What a learner sync did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SyncResult {
    /// Delivered prompts requeued.
    pub requeued_delivered: u32,
    /// Trained-after-the-high-water-mark prompts requeued.
    pub requeued_trained: u32,
    /// Leases granted at a version after the high-water mark, expired.
    pub expired_leases: u32,
    /// Their prompts, requeued.
    pub requeued_leased: u32,
}

/// What a sweep did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReapResult {
    /// Leases that expired.
    pub expired_leases: u32,
    /// Prompts that went back to the queue.
    pub requeued: u32,
    /// Workers declared dead.
    pub dead_workers: Vec<String>,
}

/// Support map entry: prompts of one modality in one class.
#[derive(Debug, Clone, PartialEq)]
pub struct ModalitySupport {
    /// Modality (or dataset when the record has none).
    pub modality: String,
    /// Prompts per class, in `SupportClass::ALL` order.
    pub counts: [u32; 4],
    /// Mean last pass rate over observed prompts, if any.
    pub mean_pass_rate: Option<f64>,
}

/// The whole coordinator state.
pub struct Core {
    cfg: CoordinatorConfig,
    prompts: Arc<PromptSet>,
    run_id: String,
    incarnation: u32,
    epochs: Vec<EpochLedger>,
    support: Vec<PromptSupport>,
    learner_version: u64,
    published_version: u64,
    published_sha256: String,
    published_format: String,
    leases: HashMap<u64, LeaseEntry>,
    lease_seq: u64,
    workers: HashMap<String, Worker>,
    worker_seq: u64,
    nccl: Option<NcclRendezvous>,
    last_progress: Instant,
}

fn lease_id(incarnation: u32, seq: u64) -> String {
    format!("{incarnation}-{seq}")
}

fn parse_lease_id(id: &str) -> Option<(u32, u64)> {
    let (inc, seq) = id.split_once('-')?;
    Some((inc.parse().ok()?, seq.parse().ok()?))
}

impl Core {
    /// A fresh run, or the run recorded in `events` (a replayed journal), now as `incarnation`
    /// (`Started` events included). Returns the core and the `Started` event to journal.
    pub fn restore(
        cfg: &CoordinatorConfig,
        prompts: Arc<PromptSet>,
        events: &[Event],
        journal_name: &std::path::Path,
        now: Instant,
    ) -> Result<(Core, Event), JournalError> {
        let n = prompts.len();
        let mut core = Core {
            cfg: cfg.clone(),
            prompts,
            run_id: String::new(),
            incarnation: 0,
            epochs: Vec::new(),
            support: vec![PromptSupport::default(); n as usize],
            learner_version: 0,
            published_version: 0,
            published_sha256: String::new(),
            published_format: String::new(),
            leases: HashMap::new(),
            lease_seq: 0,
            workers: HashMap::new(),
            worker_seq: 0,
            nccl: None,
            last_progress: now,
        };
        let mismatch = |problem: String| JournalError::Mismatch { path: journal_name.to_path_buf(), problem };
        for (i, event) in events.iter().enumerate() {
            if let Event::Started { run_id, incarnation, seed, dataset_digest, prompts: count, .. } = event {
                if *seed != cfg.seed {
                    return Err(mismatch(format!("written with seed {seed}, config has seed {}", cfg.seed)));
                }
                if dataset_digest != core.prompts.digest() || *count != n {
                    return Err(mismatch(format!(
                        "written for another prompt set ({count} prompts, digest {dataset_digest}); this one has {n} prompts, digest {}",
                        core.prompts.digest()
                    )));
                }
                core.run_id.clone_from(run_id);
                core.incarnation = *incarnation;
            } else if i == 0 {
                return Err(mismatch("the first event is not `started`".into()));
            }
            core.apply(event).map_err(|problem| JournalError::Corrupt {
                path: journal_name.to_path_buf(),
                line: i + 1,
                problem,
            })?;
        }
        if core.epochs.len() as u32 > cfg.epochs {
            return Err(mismatch(format!("the run already opened {} epochs; config has epochs {}", core.epochs.len(), cfg.epochs)));
        }
        if core.run_id.is_empty() {
            core.run_id = format!("{:016x}", rand::random::<u64>());
        } else {
            core.incarnation += 1;
        }
        let started = Event::Started {
            run_id: core.run_id.clone(),
            incarnation: core.incarnation,
            seed: cfg.seed,
            dataset_digest: core.prompts.digest().to_string(),
            prompts: n,
            epochs: cfg.epochs,
        };
        Ok((core, started))
    }

    /// Applies one durable event. The guards make it idempotent, so replaying is safe.
    pub fn apply(&mut self, event: &Event) -> Result<(), String> {
        match event {
            Event::Started { .. } => {}
            Event::EpochOpened { epoch } => {
                let next = self.epochs.len() as u32;
                if *epoch > next {
                    return Err(format!("epoch {epoch} opened before epoch {next}"));
                }
                if *epoch == next {
                    self.epochs.push(EpochLedger::open(next, self.prompts.len(), self.cfg.seed));
                }
            }
            Event::Delivered { epoch, prompts, pass_rates, .. } => {
                let indexes = self.indexes(prompts)?;
                let ledger = self.ledger_mut(*epoch)?;
                for &p in &indexes {
                    if !matches!(ledger.status(p), Status::Delivered | Status::Trained(_)) {
                        ledger.set(p, Status::Delivered);
                    }
                }
                for (p, rate) in indexes.iter().zip(pass_rates) {
                    if let (Some(rate), Some(s)) = (rate, self.support.get_mut(*p as usize)) {
                        s.observe(*epoch, *rate);
                    }
                }
            }
            Event::Trained { epoch, version, prompts } => {
                let indexes = self.indexes(prompts)?;
                let ledger = self.ledger_mut(*epoch)?;
                for p in indexes {
                    if !matches!(ledger.status(p), Status::Trained(_)) {
                        ledger.set(p, Status::Trained(*version));
                    }
                }
            }
            Event::Requeued { epoch, prompts, .. } => {
                let indexes = self.indexes(prompts)?;
                let ledger = self.ledger_mut(*epoch)?;
                for p in indexes {
                    if !matches!(ledger.status(p), Status::Pending | Status::Leased(_)) {
                        ledger.set(p, Status::Pending);
                    }
                }
            }
            Event::Skipped { epoch, prompts, .. } => {
                let indexes = self.indexes(prompts)?;
                let ledger = self.ledger_mut(*epoch)?;
                for p in indexes {
                    if matches!(ledger.status(p), Status::Pending | Status::Leased(_)) {
                        ledger.set(p, Status::Skipped);
                    }
                }
            }
            Event::Failed { epoch, prompt, .. } => {
                let p = self.indexes(std::slice::from_ref(prompt))?[0];
                let ledger = self.ledger_mut(*epoch)?;
                if matches!(ledger.status(p), Status::Pending | Status::Leased(_)) {
                    ledger.set(p, Status::Failed);
                }
            }
            Event::LearnerVersion { version } => self.learner_version = self.learner_version.max(*version),
            Event::Published { version, sha256, format } => {
                self.published_version = *version;
                self.published_sha256.clone_from(sha256);
                self.published_format.clone_from(format);
                self.learner_version = self.learner_version.max(*version);
            }
            Event::VersionReset { version } => {
                self.learner_version = *version;
                if self.published_version > *version {
                    self.published_version = *version;
                    self.published_sha256.clear();
                    self.published_format.clear();
                }
            }
        }
        Ok(())
    }

    fn indexes(&self, ids: &[String]) -> Result<Vec<u32>, String> {
        ids.iter().map(|id| self.prompts.index_of(id).ok_or_else(|| format!("unknown prompt id {id:?}"))).collect()
    }

    fn ledger_mut(&mut self, epoch: u32) -> Result<&mut EpochLedger, String> {
        self.epochs.get_mut(epoch as usize).ok_or_else(|| format!("epoch {epoch} was never opened"))
    }

    /// Applies a live event and records it for the journal.
    fn emit(&mut self, event: Event, out: &mut Vec<Event>) -> Result<(), RequestError> {
        self.apply(&event).map_err(RequestError::Internal)?;
        out.push(event);
        Ok(())
    }

    fn id_of(&self, index: u32) -> String {
        self.prompts.get(index).map(|r| r.id.clone()).unwrap_or_default()
    }

    // ---- read side -----------------------------------------------------------------------

    /// Run id, stable across restarts.
    pub fn run_id(&self) -> &str {
        &self.run_id
    }

    /// Starts of this run so far, minus one.
    pub fn incarnation(&self) -> u32 {
        self.incarnation
    }

    /// Version whose weights are live.
    pub fn published_version(&self) -> u64 {
        self.published_version
    }

    /// Newest version the learner reported.
    pub fn learner_version(&self) -> u64 {
        self.learner_version
    }

    /// The prompt set.
    pub fn prompts(&self) -> &Arc<PromptSet> {
        &self.prompts
    }

    /// The configuration.
    pub fn config(&self) -> &CoordinatorConfig {
        &self.cfg
    }

    /// The opened epochs.
    pub fn epochs(&self) -> &[EpochLedger] {
        &self.epochs
    }

    /// A lease by sequence number.
    pub fn lease(&self, seq: u64) -> Option<&LeaseEntry> {
        self.leases.get(&seq)
    }

    /// Every prompt of every configured epoch has a final status.
    pub fn is_done(&self) -> bool {
        self.epochs.len() as u32 == self.cfg.epochs && self.epochs.iter().all(EpochLedger::is_complete)
    }

    /// No progress for the stall timeout while work remains.
    pub fn is_stalled(&self, now: Instant) -> bool {
        !self.is_done() && now.duration_since(self.last_progress).as_secs_f64() > self.cfg.stall_timeout_s
    }

    /// Sum of counts over opened epochs.
    pub fn total_counts(&self) -> Counts {
        self.epochs.iter().fold(Counts::default(), |mut acc, e| {
            let c = e.counts();
            acc.pending += c.pending;
            acc.leased += c.leased;
            acc.delivered += c.delivered;
            acc.trained += c.trained;
            acc.skipped += c.skipped;
            acc.failed += c.failed;
            acc
        })
    }

    /// The oldest epoch with unfinished prompts (the last epoch once all are done).
    pub fn current_epoch(&self) -> u32 {
        self.epochs.iter().find(|e| !e.is_complete()).map_or(self.epochs.len().saturating_sub(1) as u32, |e| e.epoch)
    }

    /// Workers alive.
    pub fn workers_alive(&self) -> u32 {
        self.workers.len() as u32
    }

    /// Largest gap between the learner's version and the version of an active lease.
    pub fn max_active_staleness(&self) -> u64 {
        self.leases
            .values()
            .filter(|l| l.state == LeaseState::Active)
            .map(|l| self.learner_version.saturating_sub(l.version))
            .max()
            .unwrap_or(0)
    }

    /// The run's progress as the wire message.
    pub fn run_state(&self, now: Instant) -> RunState {
        RunState {
            run_id: self.run_id.clone(),
            incarnation: self.incarnation,
            epoch: self.current_epoch(),
            epochs: self.cfg.epochs,
            published_version: self.published_version,
            published_sha256: self.published_sha256.clone(),
            learner_version: self.learner_version,
            max_staleness: self.cfg.max_staleness,
            prompts_per_step: self.cfg.prompts_per_step,
            epoch_counts: self
                .epochs
                .iter()
                .map(|e| {
                    let c = e.counts();
                    EpochCounts {
                        epoch: e.epoch,
                        total: e.len(),
                        pending: c.pending,
                        leased: c.leased,
                        delivered: c.delivered,
                        trained: c.trained,
                        skipped: c.skipped,
                        failed: c.failed,
                    }
                })
                .collect(),
            workers_alive: self.workers_alive(),
            done: self.is_done(),
            stalled: self.is_stalled(now),
        }
    }

    /// Per-modality support classes and mean pass rates.
    pub fn support_map(&self) -> Vec<ModalitySupport> {
        let mut by: BTreeMap<String, ([u32; 4], f64, u32)> = BTreeMap::new();
        for (i, s) in self.support.iter().enumerate() {
            let Some(record) = self.prompts.get(i as u32) else { continue };
            let key = if record.modality.is_empty() { record.dataset.clone() } else { record.modality.clone() };
            let entry = by.entry(key).or_default();
            let class = classify(&self.cfg.support, s);
            let slot = SupportClass::ALL.iter().position(|c| *c == class).unwrap_or(0);
            entry.0[slot] += 1;
            if s.observations > 0 {
                entry.1 += f64::from(s.last_pass_rate);
                entry.2 += 1;
            }
        }
        by.into_iter()
            .map(|(modality, (counts, sum, seen))| ModalitySupport {
                modality,
                counts,
                mean_pass_rate: (seen > 0).then(|| sum / f64::from(seen)),
            })
            .collect()
    }

    // ---- workers --------------------------------------------------------------------------

    fn touch_worker(&mut self, worker_id: &str, field: &str, now: Instant) -> Result<&mut Worker, RequestError> {
        check_str(field, worker_id, MAX_ID_BYTES)?;
        let worker = self.workers.get_mut(worker_id).ok_or_else(|| {
            RequestError::unknown(field, worker_id, "register again (the coordinator may have restarted or declared the worker dead)")
        })?;
        worker.last_seen = now;
        Ok(worker)
    }

    fn check_worker_version(&self, version: u64) -> Result<(), RequestError> {
        let newest = self.learner_version.max(self.published_version);
        if version > newest {
            return Err(RequestError::precondition(
                "policy_version",
                format!("version {version} does not exist; the newest is {newest} (fetch the published weights again)"),
            ));
        }
        Ok(())
    }

    /// Registers a worker and returns its id.
    pub fn register(&mut self, name: &str, now: Instant) -> Result<String, RequestError> {
        check_str("worker_name", name, MAX_ID_BYTES)?;
        self.worker_seq += 1;
        let id = format!("w{}-{}", self.incarnation, self.worker_seq);
        self.workers.insert(id.clone(), Worker { name: name.to_string(), last_seen: now, version: 0 });
        Ok(id)
    }

    // ---- leases ---------------------------------------------------------------------------

    /// Prompts that may be leased now without exceeding `max_staleness`.
    pub fn lease_budget(&self) -> u64 {
        let lag = self.learner_version.saturating_sub(self.published_version);
        let steps = (u64::from(self.cfg.max_staleness) + 1).saturating_sub(lag);
        let allowed = steps * u64::from(self.cfg.prompts_per_step);
        allowed.saturating_sub(u64::from(self.total_counts().in_flight()))
    }

    /// The oldest epoch with pending prompts, opening the next epoch when none has any.
    fn epoch_with_pending(&mut self, events: &mut Vec<Event>) -> Result<Option<usize>, RequestError> {
        loop {
            if let Some(i) = self.epochs.iter().position(|e| e.counts().pending > 0) {
                return Ok(Some(i));
            }
            let next = self.epochs.len() as u32;
            if next >= self.cfg.epochs {
                return Ok(None);
            }
            self.emit(Event::EpochOpened { epoch: next }, events)?;
        }
    }

    /// Leases up to `max_prompts` prompts of one epoch to a worker, within the staleness gate.
    pub fn lease_prompts(
        &mut self,
        worker_id: &str,
        max_prompts: u32,
        worker_version: u64,
        now: Instant,
    ) -> Result<(LeaseOutcome, Vec<Event>), RequestError> {
        self.check_worker_version(worker_version)?;
        self.touch_worker(worker_id, "worker_id", now)?.version = worker_version;
        let mut events = Vec::new();
        if self.is_done() {
            return Ok((LeaseOutcome::Wait { reason: WaitReason::Done, done: true }, events));
        }
        let budget = self.lease_budget();
        if budget == 0 {
            return Ok((LeaseOutcome::Wait { reason: WaitReason::StalenessGate, done: false }, events));
        }
        let cap = if max_prompts == 0 { self.cfg.prompts_per_lease } else { max_prompts.min(self.cfg.prompts_per_lease) };
        let want = u64::from(cap).min(budget) as usize;
        let seq = self.lease_seq + 1;
        let mut chosen: Vec<u32> = Vec::new();
        let mut chosen_epoch = 0usize;
        let mut skipped: HashMap<SkipReason, Vec<String>> = HashMap::new();
        while chosen.is_empty() {
            let Some(ei) = self.epoch_with_pending(&mut events)? else { break };
            chosen_epoch = ei;
            let epoch = self.epochs[ei].epoch;
            let mut progressed = false;
            while chosen.len() < want {
                let Some(p) = self.epochs[ei].next_pending() else { break };
                progressed = true;
                let attempts = self.epochs[ei].bump_attempt(p);
                if self.cfg.max_attempts > 0 && attempts > self.cfg.max_attempts {
                    let reason = format!("gave up after {} leases in epoch {epoch} without a delivered group", self.cfg.max_attempts);
                    tracing::error!(prompt = %self.id_of(p), epoch, "{reason}");
                    self.emit(Event::Failed { epoch, prompt: self.id_of(p), reason }, &mut events)?;
                    continue;
                }
                if let Some(reason) = skip_reason(&self.cfg.support, &self.support[p as usize], epoch) {
                    self.epochs[ei].set(p, Status::Skipped);
                    skipped.entry(reason).or_default().push(self.id_of(p));
                    continue;
                }
                self.epochs[ei].set(p, Status::Leased(seq));
                chosen.push(p);
            }
            if !progressed {
                // Counts say pending but the queue had none: never expected; avoid spinning.
                return Err(RequestError::Internal(format!("epoch {epoch}: pending count and queue disagree")));
            }
            // Skipped prompts were set directly above; journal them per reason.
            for (reason, prompts) in skipped.drain() {
                events.push(Event::Skipped { epoch, reason, prompts });
            }
        }
        if chosen.is_empty() {
            let c = self.total_counts();
            let (reason, done) = if self.is_done() {
                (WaitReason::Done, true)
            } else if c.leased > 0 {
                (WaitReason::AllLeased, false)
            } else if c.delivered > 0 {
                (WaitReason::Learner, false)
            } else {
                (WaitReason::AllLeased, false)
            };
            return Ok((LeaseOutcome::Wait { reason, done }, events));
        }
        self.lease_seq = seq;
        let ttl = self.cfg.lease_ttl();
        let ledger = &mut self.epochs[chosen_epoch];
        let epoch = ledger.epoch;
        let inc = u64::from(self.incarnation) << 32;
        let prompts: Vec<GrantedPrompt> =
            chosen.iter().map(|&p| GrantedPrompt { index: p, attempt: inc | u64::from(ledger.attempts_of(p)) }).collect();
        let id = lease_id(self.incarnation, seq);
        self.leases.insert(
            seq,
            LeaseEntry {
                id: id.clone(),
                worker_id: worker_id.to_string(),
                epoch,
                version: self.published_version,
                prompts: chosen,
                granted_at: now,
                deadline: now + ttl,
                state: LeaseState::Active,
                closed_at: None,
            },
        );
        self.last_progress = now;
        let grant = Grant { seq, lease_id: id, epoch, version: self.published_version, ttl, prompts };
        Ok((LeaseOutcome::Granted(grant), events))
    }

    /// Marks a leased prompt failed (e.g. its image cannot be read) and drops it from the lease.
    pub fn fail_leased(&mut self, seq: u64, prompt: u32, reason: String) -> Result<Vec<Event>, RequestError> {
        let mut events = Vec::new();
        let Some(lease) = self.leases.get_mut(&seq) else { return Ok(events) };
        lease.prompts.retain(|&p| p != prompt);
        let epoch = lease.epoch;
        tracing::error!(prompt = %self.id_of(prompt), epoch, %reason, "prompt failed");
        self.emit(Event::Failed { epoch, prompt: self.id_of(prompt), reason }, &mut events)?;
        Ok(events)
    }

    fn find_lease(&self, field: &str, id: &str) -> Result<u64, RequestError> {
        check_str(field, id, MAX_ID_BYTES)?;
        let Some((inc, seq)) = parse_lease_id(id) else {
            return Err(RequestError::invalid(field, format!("{id:?} is not a lease id (`<incarnation>-<n>`)")));
        };
        if inc != self.incarnation {
            return Err(RequestError::unknown(
                field,
                id,
                format!(
                    "it was issued before the coordinator restarted (now incarnation {}); its prompts went back to the queue",
                    self.incarnation
                ),
            ));
        }
        if self.leases.contains_key(&seq) { Ok(seq) } else { Err(RequestError::unknown(field, id, "no such lease")) }
    }

    /// Liveness and lease renewal; returns (published version, valid lease ids with ttl).
    pub fn heartbeat(
        &mut self,
        worker_id: &str,
        version: u64,
        lease_ids: &[String],
        now: Instant,
    ) -> Result<(u64, Vec<(String, Duration)>), RequestError> {
        self.check_worker_version(version)?;
        self.touch_worker(worker_id, "worker_id", now)?.version = version;
        let ttl = self.cfg.lease_ttl();
        let max_life = self.cfg.lease_max_lifetime();
        let mut valid = Vec::new();
        for (i, id) in lease_ids.iter().enumerate() {
            check_str(&format!("lease_ids[{i}]"), id, MAX_ID_BYTES)?;
            let Some((inc, seq)) = parse_lease_id(id) else { continue };
            if inc != self.incarnation {
                continue;
            }
            if let Some(lease) = self.leases.get_mut(&seq)
                && lease.state == LeaseState::Active
                && lease.worker_id == worker_id
            {
                lease.deadline = (now + ttl).min(lease.granted_at + max_life);
                valid.push((id.clone(), lease.deadline.saturating_duration_since(now)));
            }
        }
        Ok((self.published_version, valid))
    }

    /// Closes a lease: delivered prompts are marked, the rest go back to the queue.
    pub fn ack(
        &mut self,
        lease_id_text: &str,
        worker_id: &str,
        delivered: &[(String, Option<f32>)],
        now: Instant,
    ) -> Result<(AckResult, Vec<Event>), RequestError> {
        let seq = self.find_lease("lease_id", lease_id_text)?;
        let lease = self.leases.get(&seq).cloned().ok_or_else(|| RequestError::Internal("lease vanished".into()))?;
        if !worker_id.is_empty() && worker_id != lease.worker_id && self.workers.contains_key(worker_id) {
            return Err(RequestError::precondition(
                "worker_id",
                format!("lease {lease_id_text} is held by {}, not {worker_id}", lease.worker_id),
            ));
        }
        if let Some(w) = self.workers.get_mut(&lease.worker_id) {
            w.last_seen = now;
        }
        // Validate everything before changing anything.
        let mut seen = HashSet::new();
        let mut items: Vec<(u32, Option<f32>)> = Vec::new();
        for (i, (id, rate)) in delivered.iter().enumerate() {
            let field = format!("delivered[{i}].prompt_id");
            check_str(&field, id, MAX_ID_BYTES)?;
            let p = self
                .prompts
                .index_of(id)
                .filter(|p| lease.prompts.contains(p))
                .ok_or_else(|| RequestError::invalid(&field, format!("{id:?} is not a prompt of lease {lease_id_text}")))?;
            if let Some(r) = rate
                && !(r.is_finite() && (0.0..=1.0).contains(r))
            {
                return Err(RequestError::invalid(format!("delivered[{i}].pass_rate"), format!("{r} is not in [0, 1]")));
            }
            if seen.insert(p) {
                items.push((p, *rate));
            }
        }
        let epoch = lease.epoch;
        let ledger = self.ledger_mut(epoch).map_err(RequestError::Internal)?;
        let mut result = AckResult { late: lease.state == LeaseState::Expired, ..AckResult::default() };
        let mut new_ids = Vec::new();
        let mut new_rates = Vec::new();
        for &(p, rate) in &items {
            if matches!(ledger.status(p), Status::Delivered | Status::Trained(_)) {
                result.duplicate += 1;
            } else {
                new_ids.push(p);
                new_rates.push(rate);
            }
        }
        for &p in &lease.prompts {
            if !seen.contains(&p) && ledger.status(p) == Status::Leased(seq) {
                ledger.set(p, Status::Pending);
                result.requeued += 1;
            }
        }
        result.delivered = new_ids.len() as u32;
        result.staleness = vec![self.learner_version.saturating_sub(lease.version); new_ids.len()];
        let mut events = Vec::new();
        if !new_ids.is_empty() {
            let prompts = new_ids.iter().map(|&p| self.id_of(p)).collect();
            self.emit(Event::Delivered { epoch, lease_id: lease.id.clone(), prompts, pass_rates: new_rates }, &mut events)?;
            self.last_progress = now;
        }
        if let Some(l) = self.leases.get_mut(&seq)
            && l.state == LeaseState::Active
        {
            l.state = LeaseState::Acked;
            l.closed_at = Some(now);
        }
        Ok((result, events))
    }

    fn check_epoch_prompts(&self, field: &str, groups: &[(u32, Vec<String>)]) -> Result<Vec<(u32, Vec<u32>)>, RequestError> {
        let mut out = Vec::new();
        for (i, (epoch, ids)) in groups.iter().enumerate() {
            if *epoch as usize >= self.epochs.len() {
                return Err(RequestError::invalid(
                    format!("{field}[{i}].epoch"),
                    format!("epoch {epoch} has not been opened ({} so far)", self.epochs.len()),
                ));
            }
            let mut idx = Vec::with_capacity(ids.len());
            for (j, id) in ids.iter().enumerate() {
                let f = format!("{field}[{i}].prompt_ids[{j}]");
                check_str(&f, id, MAX_ID_BYTES)?;
                idx.push(self.prompts.index_of(id).ok_or_else(|| RequestError::unknown(&f, id, "not a prompt of this run"))?);
            }
            out.push((*epoch, idx));
        }
        Ok(out)
    }

    /// The learner trained `trained` in the step that produced `new_version`; `requeue` go back.
    pub fn report_consumed(
        &mut self,
        new_version: u64,
        trained: &[(u32, Vec<String>)],
        requeue: &[(u32, Vec<String>)],
        now: Instant,
    ) -> Result<(ConsumedResult, Vec<Event>), RequestError> {
        let trained = self.check_epoch_prompts("trained", trained)?;
        let requeue = self.check_epoch_prompts("requeue", requeue)?;
        if new_version == 0 && trained.iter().any(|(_, p)| !p.is_empty()) {
            return Err(RequestError::invalid("new_version", "a training step produces version 1 or later"));
        }
        let mut result = ConsumedResult::default();
        let mut events = Vec::new();
        for (epoch, prompts) in trained {
            let ledger = &self.epochs[epoch as usize];
            let mut fresh = Vec::new();
            for p in prompts {
                if matches!(ledger.status(p), Status::Trained(_)) || fresh.contains(&p) {
                    result.duplicate += 1;
                } else {
                    fresh.push(p);
                }
            }
            if !fresh.is_empty() {
                result.trained += fresh.len() as u32;
                let prompts = fresh.iter().map(|&p| self.id_of(p)).collect();
                self.emit(Event::Trained { epoch, version: new_version, prompts }, &mut events)?;
                self.last_progress = now;
            }
        }
        for (epoch, prompts) in requeue {
            let ledger = &self.epochs[epoch as usize];
            let back: Vec<u32> = prompts.into_iter().filter(|&p| ledger.status(p) == Status::Delivered).collect();
            if !back.is_empty() {
                result.requeued += back.len() as u32;
                let prompts = back.iter().map(|&p| self.id_of(p)).collect();
                self.emit(Event::Requeued { epoch, reason: "refused by the learner".into(), prompts }, &mut events)?;
            }
        }
        if new_version > self.learner_version {
            self.emit(Event::LearnerVersion { version: new_version }, &mut events)?;
        }
        Ok((result, events))
    }

    /// The learner restarted from `high_water`: untrained deliveries and prompts trained by lost
    /// steps go back to the queue, and the version clock returns to the high-water mark. Leases
    /// granted at a lost version expire: their workers would wait for weights that no longer
    /// exist, and they would hold the staleness budget the redone steps need.
    pub fn sync_learner(&mut self, high_water: u64, now: Instant) -> Result<(SyncResult, Vec<Event>), RequestError> {
        let mut result = SyncResult::default();
        let mut events = Vec::new();
        let lost_leases: Vec<u64> =
            self.leases.iter().filter(|(_, l)| l.state == LeaseState::Active && l.version > high_water).map(|(s, _)| *s).collect();
        for seq in lost_leases {
            result.expired_leases += 1;
            result.requeued_leased += self.expire_lease(seq, now);
        }
        for ei in 0..self.epochs.len() {
            let ledger = &self.epochs[ei];
            let epoch = ledger.epoch;
            let delivered = ledger.prompts_where(|s| s == Status::Delivered);
            let lost = ledger.prompts_where(|s| matches!(s, Status::Trained(v) if v > high_water));
            result.requeued_delivered += delivered.len() as u32;
            result.requeued_trained += lost.len() as u32;
            let back: Vec<String> = delivered.iter().chain(&lost).map(|&p| self.id_of(p)).collect();
            if !back.is_empty() {
                let reason = format!("learner restarted from version {high_water}");
                self.emit(Event::Requeued { epoch, reason, prompts: back }, &mut events)?;
            }
        }
        if self.learner_version != high_water || self.published_version > high_water {
            self.emit(Event::VersionReset { version: high_water }, &mut events)?;
        }
        self.last_progress = now;
        Ok((result, events))
    }

    /// Weights of `version` are live.
    pub fn publish(&mut self, version: u64, sha256: &str, format: &str) -> Result<Vec<Event>, RequestError> {
        if !medrl_proto::is_sha256_hex(sha256) {
            return Err(RequestError::invalid("sha256", "expected 64 lowercase hex digits"));
        }
        check_str("format", format, 64)?;
        if version < self.published_version {
            return Err(RequestError::precondition(
                "version",
                format!("{version} is older than the published version {}", self.published_version),
            ));
        }
        if version == self.published_version && !self.published_sha256.is_empty() {
            if self.published_sha256 == sha256 {
                return Ok(Vec::new());
            }
            return Err(RequestError::precondition("sha256", format!("version {version} was already published with another checksum")));
        }
        let mut events = Vec::new();
        self.emit(Event::Published { version, sha256: sha256.to_string(), format: format.to_string() }, &mut events)?;
        Ok(events)
    }

    /// Closes an active lease as expired and puts its prompts back in the queue, at their places
    /// in the data order; returns how many went back.
    fn expire_lease(&mut self, seq: u64, now: Instant) -> u32 {
        let Some(lease) = self.leases.get_mut(&seq) else { return 0 };
        lease.state = LeaseState::Expired;
        lease.closed_at = Some(now);
        let (epoch, prompts, id) = (lease.epoch, lease.prompts.clone(), lease.id.clone());
        let mut requeued = 0;
        if let Some(ledger) = self.epochs.get_mut(epoch as usize) {
            for p in prompts {
                if ledger.status(p) == Status::Leased(seq) {
                    ledger.set(p, Status::Pending);
                    requeued += 1;
                }
            }
        }
        tracing::info!(lease = %id, epoch, "lease expired; its prompts went back to the queue");
        requeued
    }

    /// Expires overdue leases and dead workers' leases; forgets long-closed leases.
    pub fn reap(&mut self, now: Instant) -> ReapResult {
        let mut result = ReapResult::default();
        let timeout = self.cfg.worker_timeout();
        let dead: Vec<String> =
            self.workers.iter().filter(|(_, w)| now.duration_since(w.last_seen) > timeout).map(|(id, _)| id.clone()).collect();
        for id in &dead {
            self.workers.remove(id);
            tracing::warn!(worker = %id, "worker silent for {:?}; declared dead", timeout);
        }
        let overdue: Vec<u64> = self
            .leases
            .iter()
            .filter(|(_, l)| l.state == LeaseState::Active && (l.deadline <= now || dead.contains(&l.worker_id)))
            .map(|(s, _)| *s)
            .collect();
        for seq in overdue {
            result.expired_leases += 1;
            result.requeued += self.expire_lease(seq, now);
        }
        // Keep closed leases long enough to recognise late acks, then forget them.
        let keep = self.cfg.lease_max_lifetime();
        self.leases.retain(|_, l| l.closed_at.is_none_or(|t| now.duration_since(t) < keep));
        result.dead_workers = dead;
        result
    }

    // ---- NCCL rendezvous ---------------------------------------------------------------------

    /// Stores a new NCCL unique id and returns its generation.
    pub fn publish_nccl(&mut self, unique_id: bytes::Bytes, world_size: u32, members: Vec<String>) -> Result<u64, RequestError> {
        if unique_id.len() != medrl_proto::NCCL_UNIQUE_ID_LEN {
            return Err(RequestError::invalid(
                "unique_id",
                format!("{} bytes; an ncclUniqueId has {}", unique_id.len(), medrl_proto::NCCL_UNIQUE_ID_LEN),
            ));
        }
        if world_size == 0 {
            return Err(RequestError::invalid("world_size", "must be at least 1"));
        }
        if !members.is_empty() && members.len() != world_size as usize {
            return Err(RequestError::invalid("members", format!("{} members for world size {world_size}", members.len())));
        }
        for (i, m) in members.iter().enumerate() {
            check_str(&format!("members[{i}]"), m, MAX_ID_BYTES)?;
        }
        let generation = self.nccl.as_ref().map_or(0, |n| n.generation) + 1;
        self.nccl = Some(NcclRendezvous { unique_id, generation, world_size, members });
        Ok(generation)
    }

    /// The NCCL rendezvous of at least `min_generation`.
    pub fn nccl(&self, min_generation: u64) -> Result<NcclRendezvous, RequestError> {
        match &self.nccl {
            Some(n) if n.generation >= min_generation => Ok(n.clone()),
            _ => Err(RequestError::unknown(
                "min_generation",
                &min_generation.to_string(),
                "no NCCL id of this generation has been published yet; ask again",
            )),
        }
    }
}

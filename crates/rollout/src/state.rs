//! What the worker's tasks share: the policy version held and the newest one published, the run's
//! `done` flag, and the book of open leases (what heartbeats renew, what is still worth
//! delivering).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::watch;

/// Versions and flags shared between the main loop, the heartbeat and delivery tasks.
#[derive(Debug, Default)]
pub struct SharedState {
    held: AtomicU64,
    /// A channel, not an atomic, so a fetch can wait for its version to be withdrawn.
    published: watch::Sender<u64>,
    done: AtomicBool,
    version_refused: Mutex<Option<u64>>,
    leases: LeaseBook,
}

impl SharedState {
    /// State of a worker holding `version`.
    pub fn new(version: u64) -> Self {
        let state = SharedState::default();
        state.held.store(version, Ordering::SeqCst);
        state.published.send_replace(version);
        state
    }

    /// The policy version whose weights the worker holds.
    pub fn held(&self) -> u64 {
        self.held.load(Ordering::SeqCst)
    }

    /// Records the version now held.
    pub fn set_held(&self, version: u64) {
        self.held.store(version, Ordering::SeqCst);
    }

    /// The newest published version the coordinator has reported.
    pub fn published(&self) -> u64 {
        *self.published.borrow()
    }

    /// Records the published version the coordinator just reported (registration, lease or
    /// heartbeat). The coordinator is authoritative, so this may go back: after a learner restart
    /// its clock returns to the learner's checkpoint, and a worker must stop waiting for weights
    /// that will never be served.
    pub fn set_published(&self, version: u64) {
        self.published.send_replace(version);
    }

    /// Resolves once the published version is below `version`: a learner restarted from an older
    /// checkpoint withdrew it, and weights of `version` may never be served.
    pub async fn withdrawn(&self, version: u64) {
        let mut published = self.published.subscribe();
        // The sender lives in `self`, so the wait ends only by the condition.
        let _ = published.wait_for(|&p| p < version).await;
    }

    /// True once the coordinator said the run is done.
    pub fn is_done(&self) -> bool {
        self.done.load(Ordering::SeqCst)
    }

    /// Marks the run done.
    pub fn set_done(&self) {
        self.done.store(true, Ordering::SeqCst);
    }

    /// Records that the coordinator refused `version` (the one a call reported) as nonexistent.
    pub fn set_version_refused(&self, version: u64) {
        *self.version_refused.lock().unwrap_or_else(PoisonError::into_inner) = Some(version);
    }

    /// Takes the refusal, if any: the version the coordinator refused.
    pub fn take_version_refused(&self) -> Option<u64> {
        self.version_refused.lock().unwrap_or_else(PoisonError::into_inner).take()
    }

    /// The open leases.
    pub fn leases(&self) -> &LeaseBook {
        &self.leases
    }
}

#[derive(Debug, Clone, Copy)]
struct LeaseLife {
    /// Local deadline: when the coordinator would expire it without further renewal.
    deadline: Instant,
    /// The coordinator no longer lists it as valid (expired, acked elsewhere, restarted).
    revoked: bool,
}

/// Open leases by id, with their local deadlines.
#[derive(Debug, Default)]
pub struct LeaseBook {
    inner: Mutex<HashMap<String, LeaseLife>>,
}

impl LeaseBook {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, LeaseLife>> {
        // A panic elsewhere cannot leave the map half-updated (single inserts and removes).
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Opens a lease that lives `ttl` from now.
    pub fn open(&self, lease_id: &str, ttl: Duration) {
        self.lock().insert(lease_id.to_string(), LeaseLife { deadline: Instant::now() + ttl, revoked: false });
    }

    /// Closes a lease (acked or abandoned): heartbeats stop renewing it.
    pub fn close(&self, lease_id: &str) {
        self.lock().remove(lease_id);
    }

    /// Ids of the open leases that are still worth renewing.
    pub fn renewable(&self) -> Vec<String> {
        self.lock().iter().filter(|(_, l)| !l.revoked).map(|(id, _)| id.clone()).collect()
    }

    /// Applies a heartbeat answer: `asked` were sent, `valid` came back with their new ttl.
    pub fn renewed(&self, asked: &[String], valid: &[String], ttl_ms: &[u64]) {
        let now = Instant::now();
        let mut book = self.lock();
        for id in asked {
            let Some(life) = book.get_mut(id) else { continue };
            match valid.iter().position(|v| v == id) {
                Some(i) => {
                    // A malformed answer without a ttl keeps the old deadline rather than guessing.
                    if let Some(ms) = ttl_ms.get(i) {
                        life.deadline = now + Duration::from_millis(*ms);
                    }
                }
                None => life.revoked = true,
            }
        }
    }

    /// Revokes every open lease (the coordinator forgot this worker, e.g. after a restart).
    pub fn revoke_all(&self) {
        for life in self.lock().values_mut() {
            life.revoked = true;
        }
    }

    /// True while work on the lease can still count: open, not revoked, not past its deadline.
    pub fn is_live(&self, lease_id: &str) -> bool {
        self.lock().get(lease_id).is_some_and(|l| !l.revoked && Instant::now() < l.deadline)
    }

    /// Open leases, revoked or not.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// True when no lease is open.
    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leases_renew_revoke_and_expire() {
        let book = LeaseBook::default();
        book.open("1-1", Duration::from_secs(60));
        book.open("1-2", Duration::from_millis(0));
        assert!(book.is_live("1-1"));
        assert!(!book.is_live("1-2"), "past its deadline");
        book.renewed(&["1-1".into(), "1-2".into()], &["1-2".into()], &[60_000]);
        assert!(!book.is_live("1-1"), "not in the valid list: revoked");
        assert!(book.is_live("1-2"), "renewed");
        assert_eq!(book.renewable(), vec!["1-2".to_string()]);
        book.close("1-2");
        assert!(!book.is_live("1-2"));
        assert_eq!(book.len(), 1);
    }

    #[test]
    fn versions_and_the_refused_flag() {
        let s = SharedState::new(0);
        s.set_published(3);
        s.set_published(2);
        assert_eq!(s.published(), 2, "the coordinator's word is final");
        s.set_held(2);
        assert_eq!(s.held(), 2);
        assert_eq!(s.take_version_refused(), None);
        s.set_version_refused(2);
        assert_eq!(s.take_version_refused(), Some(2));
        assert_eq!(s.take_version_refused(), None);
    }

    #[tokio::test]
    async fn a_wait_for_a_version_ends_when_it_is_withdrawn() {
        let s = std::sync::Arc::new(SharedState::new(3));
        let waiting = tokio::spawn({
            let s = s.clone();
            async move { s.withdrawn(3).await }
        });
        s.set_published(4);
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished(), "version 3 is still published (4 >= 3)");
        s.set_published(2);
        tokio::time::timeout(Duration::from_secs(5), waiting).await.expect("ends once 3 is withdrawn").expect("task");
        // Already withdrawn: no wait at all.
        tokio::time::timeout(Duration::from_secs(5), s.withdrawn(3)).await.expect("immediate");
    }
}

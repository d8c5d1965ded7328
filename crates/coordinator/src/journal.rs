//! The run journal: an append-only JSONL file of durable events, fsynced before the calls that
//! caused them are answered. A restarted coordinator replays it to rebuild its accounting.
//!
//! Writes go through one writer thread fed by a channel: events are queued in the order the
//! state changed (the caller holds the state lock while queueing), the thread writes whatever
//! has queued up and fsyncs once for the lot (group commit), and each caller awaits its ticket
//! outside the lock. The async runtime never blocks on the disk.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::thread::JoinHandle;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

/// Why prompts were skipped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SkipReason {
    /// The last groups were all wrong: nothing to reinforce.
    ZeroSupport,
    /// The last groups were all right: nothing left to learn.
    Saturated,
}

impl SkipReason {
    /// Label used in metrics and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            SkipReason::ZeroSupport => "zero_support",
            SkipReason::Saturated => "saturated",
        }
    }
}

/// One durable fact about the run. Leases and workers are not journaled: after a restart every
/// in-flight lease is expired anyway, and workers register again.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "ev", rename_all = "snake_case")]
pub enum Event {
    /// A coordinator process started on this journal.
    Started {
        /// Stable id of the run.
        run_id: String,
        /// Starts before this one.
        incarnation: u32,
        /// Seed of the epoch orders.
        seed: u64,
        /// Digest of the prompt ids in file order.
        dataset_digest: String,
        /// Number of prompts.
        prompts: u32,
        /// Epochs configured at this start.
        epochs: u32,
    },
    /// Leasing from an epoch began; its order is `epoch_order(prompts, seed, epoch)`.
    EpochOpened {
        /// The epoch.
        epoch: u32,
    },
    /// Groups of these prompts reached the learner.
    Delivered {
        /// The epoch.
        epoch: u32,
        /// The acked lease, for audits.
        lease_id: String,
        /// Prompt ids.
        prompts: Vec<String>,
        /// Pass rate of each prompt's group, when the worker scored it.
        pass_rates: Vec<Option<f32>>,
    },
    /// The learner trained these prompts in the step that produced `version`.
    Trained {
        /// The epoch.
        epoch: u32,
        /// Version produced by the step.
        version: u64,
        /// Prompt ids.
        prompts: Vec<String>,
    },
    /// These prompts went back to the queue (learner refusal or learner restart).
    Requeued {
        /// The epoch.
        epoch: u32,
        /// Why, for audits.
        reason: String,
        /// Prompt ids.
        prompts: Vec<String>,
    },
    /// Support-aware scheduling passed over these prompts this epoch.
    Skipped {
        /// The epoch.
        epoch: u32,
        /// Zero support or saturated.
        reason: SkipReason,
        /// Prompt ids.
        prompts: Vec<String>,
    },
    /// A prompt could not be served (unreadable image, too many attempts).
    Failed {
        /// The epoch.
        epoch: u32,
        /// Prompt id.
        prompt: String,
        /// What went wrong.
        reason: String,
    },
    /// The learner reported reaching this version.
    LearnerVersion {
        /// The version.
        version: u64,
    },
    /// Weights of this version are live.
    Published {
        /// The version.
        version: u64,
        /// Hex sha256 of the weight blob.
        sha256: String,
        /// Blob format.
        format: String,
    },
    /// The learner restarted from this version; anything newer is gone.
    VersionReset {
        /// The learner's durable high-water mark.
        version: u64,
    },
}

/// One line of the journal file.
#[derive(Debug, Serialize, Deserialize)]
struct Line {
    seq: u64,
    unix_ms: u64,
    #[serde(flatten)]
    event: Event,
}

/// The journal could not be read or written.
#[derive(Debug, Clone, thiserror::Error)]
pub enum JournalError {
    /// Reading, creating or writing the file failed.
    #[error("journal {path}: {problem}")]
    Io {
        /// The journal file.
        path: PathBuf,
        /// The I/O error.
        problem: String,
    },
    /// A complete line is not a valid event.
    #[error("journal {path}:{line}: {problem}")]
    Corrupt {
        /// The journal file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// Why the line is not an event.
        problem: String,
    },
    /// The journal belongs to another prompt set or seed.
    #[error("journal {path}: {problem}")]
    Mismatch {
        /// The journal file.
        path: PathBuf,
        /// What differs.
        problem: String,
    },
    /// An earlier write failed; the coordinator no longer accepts changes.
    #[error("journal write failed earlier: {0}")]
    Failed(String),
    /// The journal was closed.
    #[error("journal closed")]
    Closed,
}

fn unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// Reads every complete event; a torn last line (a crash mid-write) is cut off the file.
pub fn replay(path: &Path) -> Result<Vec<Event>, JournalError> {
    let io = |e: std::io::Error| JournalError::Io { path: path.to_path_buf(), problem: e.to_string() };
    let data = match std::fs::read(path) {
        Ok(d) => d,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io(e)),
    };
    let mut events = Vec::new();
    let mut start = 0usize;
    let mut line_no = 0usize;
    while start < data.len() {
        let Some(rel_end) = data[start..].iter().position(|&b| b == b'\n') else {
            // No newline: the last write was cut short. It was never acknowledged, so dropping it
            // loses nothing that a peer was told; trim it so the next append starts a clean line.
            tracing::warn!(path = %path.display(), bytes = data.len() - start, "journal: dropping a torn last line");
            let file = OpenOptions::new().write(true).open(path).map_err(io)?;
            file.set_len(start as u64).map_err(io)?;
            file.sync_all().map_err(io)?;
            break;
        };
        line_no += 1;
        let text = &data[start..start + rel_end];
        start += rel_end + 1;
        if text.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let line: Line = serde_json::from_slice(text).map_err(|e| JournalError::Corrupt {
            path: path.to_path_buf(),
            line: line_no,
            problem: e.to_string(),
        })?;
        events.push(line.event);
    }
    Ok(events)
}

/// Resolves when the events it covers are on disk.
#[must_use = "await the ticket before answering the call that caused the events"]
pub struct Ticket(Option<oneshot::Receiver<Result<(), String>>>);

impl Ticket {
    /// Waits until the events are durable.
    pub async fn durable(self) -> Result<(), JournalError> {
        match self.0 {
            None => Ok(()),
            Some(rx) => match rx.await {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(JournalError::Failed(e)),
                Err(_) => Err(JournalError::Closed),
            },
        }
    }
}

struct Batch {
    bytes: Vec<u8>,
    done: oneshot::Sender<Result<(), String>>,
}

/// The writer side of the journal (or a no-op when the run keeps no journal).
pub struct Journal {
    tx: Mutex<Option<mpsc::Sender<Batch>>>,
    thread: Mutex<Option<JoinHandle<()>>>,
    seq: AtomicU64,
    failed: Arc<Mutex<Option<String>>>,
}

impl Journal {
    /// A journal that writes nothing (runs without a journal path).
    pub fn in_memory() -> Journal {
        Journal { tx: Mutex::new(None), thread: Mutex::new(None), seq: AtomicU64::new(0), failed: Arc::default() }
    }

    /// Opens `path` for appending (creating it and its folder), after [`replay`] has read it.
    pub fn open(path: &Path, next_seq: u64) -> Result<Journal, JournalError> {
        let io = |e: std::io::Error| JournalError::Io { path: path.to_path_buf(), problem: e.to_string() };
        let existed = path.exists();
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        let file = OpenOptions::new().create(true).append(true).open(path).map_err(io)?;
        if !existed {
            // Make the new directory entry itself durable, not only the file's contents.
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                File::open(dir).and_then(|d| d.sync_all()).map_err(io)?;
            }
        }
        let (tx, rx) = mpsc::channel::<Batch>();
        let failed: Arc<Mutex<Option<String>>> = Arc::default();
        let thread_failed = failed.clone();
        let thread_path = path.to_path_buf();
        let thread = std::thread::Builder::new()
            .name("medrl-journal".into())
            .spawn(move || writer_loop(file, rx, thread_failed, thread_path))
            .map_err(io)?;
        Ok(Journal { tx: Mutex::new(Some(tx)), thread: Mutex::new(Some(thread)), seq: AtomicU64::new(next_seq), failed })
    }

    /// The first write error, if any; after one, every append fails.
    pub fn failure(&self) -> Option<String> {
        self.failed.lock().ok().and_then(|f| f.clone())
    }

    /// Queues events in order; the ticket resolves once they are fsynced. Call while holding the
    /// state lock so the journal order equals the order of the state changes.
    pub fn append(&self, events: &[Event]) -> Ticket {
        if events.is_empty() {
            return Ticket(None);
        }
        let Ok(guard) = self.tx.lock() else {
            return failed_ticket("journal lock poisoned".into());
        };
        let Some(tx) = guard.as_ref() else {
            // No file: nothing to wait for (in-memory runs), or closed (sending would be lost).
            return Ticket(None);
        };
        if let Some(e) = self.failure() {
            return failed_ticket(e);
        }
        let mut bytes = Vec::new();
        let now = unix_ms();
        for event in events {
            let seq = self.seq.fetch_add(1, Ordering::Relaxed);
            let line = Line { seq, unix_ms: now, event: event.clone() };
            match serde_json::to_vec(&line) {
                Ok(mut b) => {
                    bytes.append(&mut b);
                    bytes.push(b'\n');
                }
                Err(e) => return failed_ticket(format!("encoding event: {e}")),
            }
        }
        let (done, rx) = oneshot::channel();
        if tx.send(Batch { bytes, done }).is_err() {
            return failed_ticket("journal writer stopped".into());
        }
        Ticket(Some(rx))
    }

    /// Flushes what is queued and stops the writer thread.
    pub fn close(&self) {
        if let Ok(mut tx) = self.tx.lock() {
            tx.take();
        }
        let thread = self.thread.lock().ok().and_then(|mut t| t.take());
        if let Some(t) = thread {
            let _ = t.join();
        }
    }
}

impl Drop for Journal {
    fn drop(&mut self) {
        self.close();
    }
}

fn failed_ticket(error: String) -> Ticket {
    let (tx, rx) = oneshot::channel();
    let _ = tx.send(Err(error));
    Ticket(Some(rx))
}

fn writer_loop(mut file: File, rx: mpsc::Receiver<Batch>, failed: Arc<Mutex<Option<String>>>, path: PathBuf) {
    while let Ok(first) = rx.recv() {
        // Take everything already queued: one fsync covers the whole group.
        let mut batch = vec![first];
        while let Ok(more) = rx.try_recv() {
            batch.push(more);
        }
        let previous = failed.lock().ok().and_then(|f| f.clone());
        let result = match previous {
            Some(e) => Err(e),
            None => write_group(&mut file, &batch).map_err(|e| {
                let msg = format!("{}: {e}", path.display());
                tracing::error!(error = %msg, "journal write failed; refusing further changes");
                if let Ok(mut f) = failed.lock() {
                    *f = Some(msg.clone());
                }
                msg
            }),
        };
        for b in batch {
            let _ = b.done.send(result.clone());
        }
    }
}

fn write_group(file: &mut File, batch: &[Batch]) -> std::io::Result<()> {
    let mut all = Vec::with_capacity(batch.iter().map(|b| b.bytes.len()).sum());
    for b in batch {
        all.extend_from_slice(&b.bytes);
    }
    file.write_all(&all)?;
    file.sync_data()
}

/// The sequence number to continue from after replaying `events`.
pub fn next_seq(events: &[Event]) -> u64 {
    events.len() as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn events_round_trip_and_a_torn_tail_is_cut() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("sub/journal.jsonl");
        let events = vec![
            Event::EpochOpened { epoch: 0 },
            Event::Delivered { epoch: 0, lease_id: "1-1".into(), prompts: vec!["a".into()], pass_rates: vec![Some(0.5)] },
            Event::Skipped { epoch: 1, reason: SkipReason::Saturated, prompts: vec!["b".into()] },
        ];
        {
            let journal = Journal::open(&path, 0).expect("open");
            journal.append(&events[..2]).durable().await.expect("durable");
            journal.append(&events[2..]).durable().await.expect("durable");
            journal.close();
        }
        assert_eq!(replay(&path).expect("replay"), events);
        let mut f = OpenOptions::new().append(true).open(&path).expect("open");
        f.write_all(b"{\"seq\":3,\"unix_ms\":1,\"ev\":\"epo").expect("write");
        drop(f);
        assert_eq!(replay(&path).expect("replay torn"), events);
        {
            let journal = Journal::open(&path, 3).expect("reopen");
            journal.append(&[Event::LearnerVersion { version: 2 }]).durable().await.expect("durable");
        }
        let again = replay(&path).expect("replay");
        assert_eq!(again.len(), 4);
        std::fs::write(&path, "{\"seq\":0}\n{}\n").expect("write");
        let err = replay(&path).expect_err("corrupt");
        assert!(err.to_string().contains("journal.jsonl:1"), "{err}");
    }
}

//! Checksums: [`sha256_hex`] for small content, and the checksum of a weight blob: SHA-256 over the SHA-256 digests of its [`PIECE_BYTES`] pieces
//! in order (the last piece may be shorter; an empty blob is one empty piece).
//!
//! One SHA-256 over the whole blob runs on one core at about 1.7 GB/s with SHA-NI (`openssl speed
//! -evp sha256` on the development machine): 10 s for a 7B model in bf16, on the learner at every
//! publish and on every worker at every fetch, and a ceiling below the weight stream's 2 GB/s
//! goal. Pieces hash in parallel: [`blob_digest`] on all cores at publish, [`PieceHasher`] on
//! worker threads while the stream is still arriving.

use std::sync::{Arc, Mutex, mpsc};
use std::thread::JoinHandle;

use bytes::Bytes;
use sha2::{Digest, Sha256};

/// Lowercase hex SHA-256 of `bytes` (images and other small content-addressed data).
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Bytes per hashed piece.
pub const PIECE_BYTES: usize = 4 << 20;

type PieceDigest = [u8; 32];

/// The SHA-256 of one piece, given as the fragments it arrived in.
fn hash_fragments<B: AsRef<[u8]>>(fragments: &[B]) -> PieceDigest {
    let mut h = Sha256::new();
    fragments.iter().for_each(|f| h.update(f));
    h.finalize().into()
}

fn combine(pieces: &[PieceDigest]) -> String {
    let mut h = Sha256::new();
    pieces.iter().for_each(|p| h.update(p));
    hex::encode(h.finalize())
}

fn hash_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get()).min(16)
}

/// The digest of `blob` (lowercase hex), its pieces hashed on every core.
pub fn blob_digest(blob: &[u8]) -> String {
    let pieces: Vec<&[u8]> = if blob.is_empty() { vec![blob] } else { blob.chunks(PIECE_BYTES).collect() };
    let mut digests = vec![[0u8; 32]; pieces.len()];
    let per_thread = pieces.len().div_ceil(hash_threads());
    std::thread::scope(|s| {
        for (slots, work) in digests.chunks_mut(per_thread).zip(pieces.chunks(per_thread)) {
            s.spawn(move || slots.iter_mut().zip(work).for_each(|(slot, piece)| *slot = hash_fragments(&[*piece])));
        }
    });
    combine(&digests)
}

/// Worker threads hashing pieces sent to them, answering with (index, digest).
struct Pool {
    jobs: mpsc::Sender<(usize, Vec<Bytes>)>,
    results: mpsc::Receiver<(usize, PieceDigest)>,
    workers: Vec<JoinHandle<()>>,
}

impl Pool {
    fn new() -> Self {
        let (jobs, queue) = mpsc::channel::<(usize, Vec<Bytes>)>();
        let (done, results) = mpsc::channel();
        let queue = Arc::new(Mutex::new(queue));
        let workers = (0..hash_threads())
            .map(|_| {
                let (queue, done) = (queue.clone(), done.clone());
                std::thread::spawn(move || {
                    loop {
                        // The lock is held only to take a job; a poisoned lock ends the worker.
                        let job = match queue.lock() {
                            Ok(q) => q.recv(),
                            Err(_) => return,
                        };
                        let Ok((index, fragments)) = job else { return };
                        if done.send((index, hash_fragments(&fragments))).is_err() {
                            return;
                        }
                    }
                })
            })
            .collect();
        Pool { jobs, results, workers }
    }
}

/// Hashes a blob that arrives in chunks of any size: from the first complete piece on, pieces go
/// to worker threads (one per core, at most 16), so hashing overlaps receiving. The chunks are
/// shared (`Bytes`), not copied.
#[derive(Default)]
pub struct PieceHasher {
    pool: Option<Pool>,
    /// Fragments of the piece being filled, and its length so far.
    open: Vec<Bytes>,
    open_len: usize,
    /// Pieces handed out so far.
    pieces: usize,
    /// Digests computed on the caller's thread (a lone last piece, or no worker to take one).
    local: Vec<(usize, PieceDigest)>,
}

impl std::fmt::Debug for PieceHasher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PieceHasher").field("pieces", &self.pieces).field("open_len", &self.open_len).finish()
    }
}

impl PieceHasher {
    /// A hasher with nothing received yet; its threads start with the first complete piece.
    pub fn new() -> Self {
        Self::default()
    }

    /// Takes the next bytes of the blob.
    pub fn update(&mut self, mut data: Bytes) {
        while !data.is_empty() {
            let take = data.len().min(PIECE_BYTES - self.open_len);
            self.open.push(data.split_to(take));
            self.open_len += take;
            if self.open_len == PIECE_BYTES {
                let piece = self.take_open();
                let pool = self.pool.get_or_insert_with(Pool::new);
                if let Err(mpsc::SendError((index, fragments))) = pool.jobs.send(piece) {
                    // Every worker is gone: hash here rather than lose the piece.
                    self.local.push((index, hash_fragments(&fragments)));
                }
            }
        }
    }

    /// Closes the open piece: its index and fragments.
    fn take_open(&mut self) -> (usize, Vec<Bytes>) {
        self.open_len = 0;
        self.pieces += 1;
        (self.pieces - 1, std::mem::take(&mut self.open))
    }

    /// Waits for every piece and returns the blob's digest (lowercase hex).
    pub fn finish(mut self) -> String {
        if self.open_len > 0 || self.pieces == 0 {
            let (index, fragments) = self.take_open();
            self.local.push((index, hash_fragments(&fragments)));
        }
        let mut digests = vec![[0u8; 32]; self.pieces];
        let mut missing = self.pieces - self.local.len();
        for (index, digest) in self.local.drain(..) {
            digests[index] = digest;
        }
        if let Some(pool) = self.pool.take() {
            drop(pool.jobs);
            // Ends early only if a worker died; its piece stays zero and the digest cannot match.
            while missing > 0 {
                let Ok((index, digest)) = pool.results.recv() else { break };
                digests[index] = digest;
                missing -= 1;
            }
            pool.workers.into_iter().for_each(|w| drop(w.join()));
        }
        combine(&digests)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blob(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 31 % 251) as u8).collect()
    }

    #[test]
    fn the_digest_is_the_sha256_of_the_piece_digests() {
        let b = blob(2 * PIECE_BYTES + 5);
        let pieces: Vec<u8> = b.chunks(PIECE_BYTES).flat_map(|p| Sha256::digest(p).to_vec()).collect();
        assert_eq!(blob_digest(&b), hex::encode(Sha256::digest(&pieces)));
        assert_eq!(blob_digest(&[]), hex::encode(Sha256::digest(Sha256::digest([]))));
        assert_ne!(blob_digest(&b), blob_digest(&b[..b.len() - 1]));
    }

    #[test]
    fn streamed_hashing_equals_whole_blob_hashing_for_any_chunking() {
        let b = Bytes::from(blob(3 * PIECE_BYTES + 1234));
        for chunk in [1 << 20, PIECE_BYTES, PIECE_BYTES + 7, 3 * PIECE_BYTES - 1, b.len()] {
            let mut h = PieceHasher::new();
            let mut at = 0;
            while at < b.len() {
                let end = b.len().min(at + chunk);
                h.update(b.slice(at..end));
                at = end;
            }
            assert_eq!(h.finish(), blob_digest(&b), "chunks of {chunk}");
        }
        assert_eq!(PieceHasher::new().finish(), blob_digest(&[]));
    }
}

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

use bytes::BytesMut;
use sha2::{Digest, Sha256};

/// Lowercase hex SHA-256 of `bytes` (images and other small content-addressed data).
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Bytes per hashed piece.
pub const PIECE_BYTES: usize = 4 << 20;

type PieceDigest = [u8; 32];

fn hash_piece(piece: &[u8]) -> PieceDigest {
    Sha256::digest(piece).into()
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
            s.spawn(move || slots.iter_mut().zip(work).for_each(|(slot, piece)| *slot = hash_piece(piece)));
        }
    });
    combine(&digests)
}

/// A piece of the blob with its place in it.
type Piece = (usize, BytesMut);

/// Worker threads that hash the pieces sent to them and hand each back with its digest.
struct Pool {
    jobs: mpsc::Sender<Piece>,
    results: mpsc::Receiver<(Piece, PieceDigest)>,
    workers: Vec<JoinHandle<()>>,
}

impl Pool {
    fn new() -> Self {
        let (jobs, queue) = mpsc::channel::<Piece>();
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
                        let Ok(piece) = job else { return };
                        let digest = hash_piece(&piece.1);
                        if done.send((piece, digest)).is_err() {
                            return;
                        }
                    }
                })
            })
            .collect();
        Pool { jobs, results, workers }
    }
}

/// Receives a blob into one buffer and hashes it while it arrives: each complete piece is split
/// off the front of the buffer (no copy) and hashed on a worker thread (one per core, at most
/// 16), which hands it back. [`PieceHasher::finish`] rejoins the pieces, which lie side by side
/// in one allocation, so the blob is never copied after it is written. The data written need
/// not stay alive: the stream's chunks can go back to the transport at once.
pub struct PieceHasher {
    pool: Option<Pool>,
    /// The piece being filled; its free capacity is where the rest of the blob goes.
    open: BytesMut,
    /// Pieces handed out so far.
    pieces: usize,
    /// Pieces hashed on the caller's thread (no worker left to take them).
    local: Vec<(Piece, PieceDigest)>,
}

impl std::fmt::Debug for PieceHasher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PieceHasher").field("pieces", &self.pieces).field("open_len", &self.open.len()).finish()
    }
}

impl PieceHasher {
    /// Writes into `buffer` (emptied first; its memory is reused when large enough). Threads
    /// start with the first complete piece.
    pub fn new(mut buffer: BytesMut) -> Self {
        buffer.clear();
        PieceHasher { pool: None, open: buffer, pieces: 0, local: Vec::new() }
    }

    /// Makes room for `additional` more bytes in one allocation, so the pieces stay adjacent.
    pub fn reserve(&mut self, additional: usize) {
        self.open.reserve(additional);
    }

    /// Bytes written so far.
    pub fn len(&self) -> usize {
        self.pieces * PIECE_BYTES + self.open.len()
    }

    /// Whether nothing was written yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Appends the next bytes of the blob.
    pub fn extend_from_slice(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            let take = data.len().min(PIECE_BYTES - self.open.len());
            self.open.extend_from_slice(&data[..take]);
            data = &data[take..];
            if self.open.len() == PIECE_BYTES {
                let piece = (self.pieces, self.open.split_to(PIECE_BYTES));
                self.pieces += 1;
                let pool = self.pool.get_or_insert_with(Pool::new);
                if let Err(mpsc::SendError(piece)) = pool.jobs.send(piece) {
                    // Every worker is gone: hash here rather than lose the piece.
                    let digest = hash_piece(&piece.1);
                    self.local.push((piece, digest));
                }
            }
        }
    }

    /// Waits for every piece; returns the whole blob and its digest (lowercase hex), or `None`
    /// if a hashing thread died with a piece.
    pub fn finish(mut self) -> Option<(BytesMut, String)> {
        let mut done: Vec<Option<(BytesMut, PieceDigest)>> = (0..self.pieces).map(|_| None).collect();
        let mut missing = self.pieces - self.local.len();
        for ((index, piece), digest) in self.local.drain(..) {
            done[index] = Some((piece, digest));
        }
        if let Some(pool) = self.pool.take() {
            drop(pool.jobs);
            while missing > 0 {
                let Ok(((index, piece), digest)) = pool.results.recv() else { break };
                done[index] = Some((piece, digest));
                missing -= 1;
            }
            pool.workers.into_iter().for_each(|w| drop(w.join()));
        }
        let mut blob = BytesMut::new();
        let mut digests = Vec::with_capacity(self.pieces + 1);
        for slot in done {
            let (piece, digest) = slot?;
            // Adjacent pieces of one allocation: `unsplit` only moves the end.
            blob.unsplit(piece);
            digests.push(digest);
        }
        // The open piece is the last one, unless it is empty and earlier pieces exist.
        if !self.open.is_empty() || self.pieces == 0 {
            digests.push(hash_piece(&self.open));
        }
        blob.unsplit(self.open);
        Some((blob, combine(&digests)))
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
        let b = blob(3 * PIECE_BYTES + 1234);
        for chunk in [1 << 20, PIECE_BYTES, PIECE_BYTES + 7, 3 * PIECE_BYTES - 1, b.len()] {
            let mut h = PieceHasher::new(BytesMut::new());
            h.reserve(b.len());
            b.chunks(chunk).for_each(|c| h.extend_from_slice(c));
            assert_eq!(h.len(), b.len());
            let (got, digest) = h.finish().expect("no thread died");
            assert_eq!(digest, blob_digest(&b), "chunks of {chunk}");
            assert!(got == b, "chunks of {chunk}: the rejoined blob differs");
        }
        let exact = blob(2 * PIECE_BYTES);
        let mut h = PieceHasher::new(BytesMut::new());
        h.extend_from_slice(&exact);
        assert_eq!(h.finish().map(|(_, d)| d), Some(blob_digest(&exact)), "a blob of whole pieces");
        let (empty, digest) = PieceHasher::new(BytesMut::from(&b"stale"[..])).finish().expect("empty");
        assert!(empty.is_empty());
        assert_eq!(digest, blob_digest(&[]));
    }

    #[test]
    fn pieces_are_rejoined_without_a_copy() {
        let b = blob(2 * PIECE_BYTES + 10);
        let mut h = PieceHasher::new(BytesMut::with_capacity(b.len()));
        let mut buffer_start = None;
        for c in b.chunks(1 << 20) {
            h.extend_from_slice(c);
            buffer_start.get_or_insert(h.open.as_ptr());
        }
        let (got, _) = h.finish().expect("no thread died");
        assert_eq!(Some(got.as_ptr()), buffer_start, "the blob must stay where it was written");
        assert!(got == b);
    }
}

//! Reassembles a weight blob from stream chunks and refuses anything but a complete, in-order,
//! checksum-matching transfer: a half or corrupt blob must never reach a model.

use bytes::{Bytes, BytesMut};
use medrl_proto::v1::WeightChunk;

use crate::codec::FORMAT;
use crate::digest::PieceHasher;
use crate::error::{Result, WeightSyncError};

/// A completely received and verified blob.
#[derive(Debug, Clone, PartialEq)]
pub struct FetchedWeights {
    /// Policy version of the blob.
    pub version: u64,
    /// Lowercase hex digest ([`crate::digest`]), verified against the bytes.
    pub sha256: String,
    /// The blob.
    pub blob: Bytes,
}

/// What the first chunk declared; every later chunk must repeat it.
#[derive(Debug)]
struct Header {
    version: u64,
    total: u64,
    sha256: String,
    format: String,
}

/// Accepts chunks one by one, checking each against the stream's rules.
#[derive(Debug)]
pub struct Assembler {
    min_version: u64,
    max_total_bytes: u64,
    header: Option<Header>,
    /// Holds the bytes received and hashes them as they come.
    received: PieceHasher,
    chunks: usize,
}

impl Assembler {
    /// Expects a version `>= min_version` of at most `max_total_bytes` bytes, written into
    /// `buffer`: an empty one, or the memory of an earlier blob ([`reusable_buffer`]).
    pub fn new(min_version: u64, max_total_bytes: u64, buffer: BytesMut) -> Self {
        Assembler { min_version, max_total_bytes, header: None, received: PieceHasher::new(buffer), chunks: 0 }
    }

    /// Bytes received so far.
    pub fn received(&self) -> u64 {
        self.received.len() as u64
    }

    /// Takes the next chunk of the stream.
    pub fn push(&mut self, chunk: WeightChunk) -> Result<()> {
        let index = self.chunks;
        let bad = |problem: String| WeightSyncError::Stream { chunk: index, problem };
        match &self.header {
            None => {
                if chunk.version < self.min_version {
                    return Err(bad(format!("version {} is older than the {} asked for", chunk.version, self.min_version)));
                }
                if !medrl_proto::is_sha256_hex(&chunk.sha256) {
                    return Err(bad("field `sha256`: expected 64 lowercase hex digits".into()));
                }
                if chunk.format != FORMAT {
                    return Err(bad(format!("field `format`: {:?}, expected {FORMAT:?}", chunk.format)));
                }
                if chunk.total_size > self.max_total_bytes {
                    return Err(bad(format!("total size {} exceeds the limit of {} bytes", chunk.total_size, self.max_total_bytes)));
                }
                // The size is bounded by the limit above, so reserving it up front is safe and
                // saves the copies of a growing buffer on multi-GB blobs. A reused buffer that is
                // large enough is kept as it is.
                let total = usize::try_from(chunk.total_size).map_err(|_| bad(format!("total size {} does not fit in memory", chunk.total_size)))?;
                self.received.reserve(total);
                self.header = Some(Header { version: chunk.version, total: chunk.total_size, sha256: chunk.sha256.clone(), format: chunk.format.clone() });
            }
            Some(h) => {
                if chunk.version != h.version || chunk.total_size != h.total || chunk.sha256 != h.sha256 || chunk.format != h.format {
                    return Err(bad(format!(
                        "header changed mid-stream: version {} size {} sha256 {} format {:?}, the stream began with version {} size {} sha256 {} format {:?}",
                        chunk.version, chunk.total_size, chunk.sha256, chunk.format, h.version, h.total, h.sha256, h.format
                    )));
                }
            }
        }
        let received = self.received();
        if chunk.offset != received {
            return Err(bad(format!("offset {} but {received} bytes were received: chunks must arrive in order without gaps", chunk.offset)));
        }
        let total = self.header.as_ref().map_or(0, |h| h.total);
        if received + chunk.data.len() as u64 > total {
            return Err(bad(format!("{} bytes at offset {} run past the declared size {total}", chunk.data.len(), chunk.offset)));
        }
        if chunk.data.is_empty() && total > 0 {
            return Err(bad("an empty chunk in a non-empty blob".into()));
        }
        // Copied, not kept: the chunk's memory goes back to the transport for the next message.
        self.received.extend_from_slice(&chunk.data);
        self.chunks += 1;
        Ok(())
    }

    /// Ends the stream: the size and checksum must match the header.
    pub fn finish(self) -> Result<FetchedWeights> {
        let Some(header) = self.header else {
            return Err(WeightSyncError::Stream { chunk: 0, problem: "the stream ended before its first chunk".into() });
        };
        let received = self.received.len() as u64;
        if received != header.total {
            return Err(WeightSyncError::Truncated { version: header.version, received, total: header.total });
        }
        let (blob, actual) = self.received.finish().ok_or(WeightSyncError::Hashing { version: header.version })?;
        if actual != header.sha256 {
            return Err(WeightSyncError::Checksum { version: header.version, expected: header.sha256, actual });
        }
        Ok(FetchedWeights { version: header.version, sha256: actual, blob: blob.freeze() })
    }
}

/// The memory of a blob nobody else holds, emptied, for the next fetch to write into; an empty
/// buffer if the blob is still shared. Memory already written to needs no page faults: on the
/// development VM fresh memory cost 0.7 CPU s per GiB in faults, seven times the copy into it.
pub fn reusable_buffer(blob: Bytes) -> BytesMut {
    // `bytes` moves a unique buffer's contents to the front of its allocation; a fetched blob
    // starts there, so the move is a no-op (1.5 us for 1 GiB).
    let mut buffer = blob.try_into_mut().unwrap_or_default();
    buffer.clear();
    buffer
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::digest::blob_digest as sha256_hex;

    fn chunk(version: u64, offset: u64, data: &'static [u8], blob: &[u8]) -> WeightChunk {
        WeightChunk {
            version,
            offset,
            data: Bytes::from_static(data),
            total_size: blob.len() as u64,
            sha256: sha256_hex(blob),
            format: FORMAT.into(),
        }
    }

    const BLOB: &[u8] = b"0123456789";

    #[test]
    fn a_complete_in_order_stream_is_accepted() -> Result<()> {
        let mut a = Assembler::new(1, 100, BytesMut::new());
        a.push(chunk(2, 0, b"0123", BLOB))?;
        a.push(chunk(2, 4, b"4567", BLOB))?;
        a.push(chunk(2, 8, b"89", BLOB))?;
        let got = a.finish()?;
        assert_eq!((got.version, got.blob.as_ref()), (2, BLOB));
        Ok(())
    }

    #[test]
    fn a_reused_buffer_keeps_its_memory_and_loses_its_old_bytes() -> Result<()> {
        let mut first = Assembler::new(0, 100, BytesMut::new());
        first.push(chunk(1, 0, b"0123456789", BLOB))?;
        let old = first.finish()?.blob;
        let address = old.as_ptr();
        let buffer = reusable_buffer(old);
        assert!(buffer.is_empty() && buffer.capacity() >= BLOB.len());
        const SHORT: &[u8] = b"abcd";
        let mut second = Assembler::new(0, 100, buffer);
        second.push(chunk(2, 0, b"abcd", SHORT))?;
        let got = second.finish()?;
        assert_eq!((got.version, got.blob.as_ref()), (2, SHORT));
        assert_eq!(got.blob.as_ptr(), address, "the second blob must live in the first one's memory");
        // A blob someone still holds is left alone.
        let shared = got.blob.clone();
        assert_eq!(reusable_buffer(got.blob).capacity(), 0);
        assert_eq!(shared.as_ref(), SHORT);
        Ok(())
    }

    #[test]
    fn gaps_overlaps_changes_and_overruns_are_refused() {
        let mut a = Assembler::new(0, 100, BytesMut::new());
        a.push(chunk(1, 0, b"0123", BLOB)).expect("first");
        assert!(a.push(chunk(1, 6, b"67", BLOB)).is_err(), "gap");
        let mut a = Assembler::new(0, 100, BytesMut::new());
        a.push(chunk(1, 0, b"0123", BLOB)).expect("first");
        assert!(a.push(chunk(1, 2, b"23", BLOB)).is_err(), "overlap");
        let mut a = Assembler::new(0, 100, BytesMut::new());
        a.push(chunk(1, 0, b"0123", BLOB)).expect("first");
        assert!(a.push(chunk(2, 4, b"4567", BLOB)).is_err(), "version changed");
        let mut a = Assembler::new(0, 100, BytesMut::new());
        a.push(chunk(1, 0, b"0123", BLOB)).expect("first");
        assert!(a.push(chunk(1, 4, b"456789xyz", BLOB)).is_err(), "past the end");
        assert!(Assembler::new(3, 100, BytesMut::new()).push(chunk(2, 0, b"0123", BLOB)).is_err(), "older than asked");
        assert!(Assembler::new(0, 5, BytesMut::new()).push(chunk(1, 0, b"0123", BLOB)).is_err(), "over the size limit");
        let mut wrong_format = chunk(1, 0, b"0123", BLOB);
        wrong_format.format = "pickle".into();
        assert!(Assembler::new(0, 100, BytesMut::new()).push(wrong_format).is_err());
    }

    #[test]
    fn truncated_corrupt_and_empty_streams_fail_at_the_end() {
        let mut a = Assembler::new(0, 100, BytesMut::new());
        a.push(chunk(1, 0, b"0123", BLOB)).expect("first");
        assert!(matches!(a.finish(), Err(WeightSyncError::Truncated { received: 4, total: 10, .. })));
        let mut a = Assembler::new(0, 100, BytesMut::new());
        a.push(chunk(1, 0, b"01234", BLOB)).expect("first");
        a.push(chunk(1, 5, b"5678X", BLOB)).expect("second");
        assert!(matches!(a.finish(), Err(WeightSyncError::Checksum { .. })));
        assert!(Assembler::new(0, 100, BytesMut::new()).finish().is_err());
    }
}

//! Typed errors of weight transport: each says which tensor, chunk or field was wrong, so a worker
//! log tells an operator whether the blob, the stream or the network failed.

use std::time::Duration;

/// Everything that can go wrong while encoding, publishing, fetching or decoding weights.
#[derive(Debug, thiserror::Error)]
pub enum WeightSyncError {
    /// A tensor could not be converted for the blob.
    #[error("encoding weights: tensor `{name}`: {problem}")]
    Encode {
        /// Legacy HF name of the tensor.
        name: String,
        /// What failed.
        problem: String,
    },

    /// The blob is not a readable safetensors buffer.
    #[error("weight blob: {0}")]
    Blob(String),

    /// A tensor of the blob does not fit the model config.
    #[error("weight blob: tensor `{name}`: {problem}")]
    Tensor {
        /// Legacy HF name of the tensor.
        name: String,
        /// What is wrong with it (missing, shape, dtype, duplicate).
        problem: String,
    },

    /// A publication would move the version backwards or change published bytes.
    #[error("publishing version {version}: {problem}")]
    Publish {
        /// The version offered.
        version: u64,
        /// Why it was refused.
        problem: String,
    },

    /// A setting is out of range.
    #[error("setting `{field}`: {problem}")]
    Config {
        /// Field name.
        field: &'static str,
        /// What is wrong with it.
        problem: String,
    },

    /// The server sent a chunk that breaks the stream's rules (gap, overlap, changed header).
    #[error("weight stream, chunk {chunk}: {problem}")]
    Stream {
        /// Index of the offending chunk (0-based).
        chunk: usize,
        /// What the chunk did wrong.
        problem: String,
    },

    /// The stream ended before the declared size arrived.
    #[error("weight stream truncated: {received} of {total} bytes of version {version}")]
    Truncated {
        /// Version being received.
        version: u64,
        /// Bytes received.
        received: u64,
        /// Bytes declared.
        total: u64,
    },

    /// The received bytes do not hash to the declared checksum.
    #[error("weight stream of version {version}: sha256 {actual} does not match the declared {expected}")]
    Checksum {
        /// Version being received.
        version: u64,
        /// Declared digest.
        expected: String,
        /// Digest of the bytes received.
        actual: String,
    },

    /// A thread hashing the received blob died, taking part of it along.
    #[error("weight stream of version {version}: a hashing thread died; the blob is incomplete")]
    Hashing {
        /// Version being received.
        version: u64,
    },

    /// The call failed with a gRPC status (including a server-side wait that ran out).
    #[error("weights call failed: {0}")]
    Status(Box<tonic::Status>),

    /// The whole fetch did not finish within its deadline.
    #[error("fetching weights timed out after {0:?}")]
    Timeout(Duration),

    /// Setting up a server or channel failed.
    #[error(transparent)]
    Proto(#[from] medrl_proto::ProtoError),

    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),

    /// An NCCL or CUDA call failed (only with the `cuda` feature).
    #[error("nccl: {0}")]
    Nccl(String),
}

impl From<tonic::Status> for WeightSyncError {
    fn from(status: tonic::Status) -> Self {
        // Boxed: a Status is large and would bloat every Result of this crate.
        WeightSyncError::Status(Box::new(status))
    }
}

/// Result with [`WeightSyncError`].
pub type Result<T> = std::result::Result<T, WeightSyncError>;

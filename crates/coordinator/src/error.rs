//! Errors of starting and running the coordinator (per-call errors are gRPC statuses).

use std::path::PathBuf;

/// The coordinator could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum CoordinatorError {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// The prompt set could not be read.
    #[error("prompt set: {0}")]
    Records(#[from] medrl_vqa::RecordError),
    /// The prompt set is unusable (empty, duplicate ids).
    #[error("prompt set: {0}")]
    Prompts(String),
    /// The journal could not be read, replayed or written.
    #[error(transparent)]
    Journal(#[from] crate::journal::JournalError),
    /// The gRPC server could not be set up or failed.
    #[error(transparent)]
    Grpc(#[from] medrl_proto::ProtoError),
    /// The metrics endpoint could not be bound.
    #[error("metrics endpoint {addr}: {cause}")]
    Metrics {
        /// The address asked for.
        addr: std::net::SocketAddr,
        /// The socket error.
        cause: std::io::Error,
    },
    /// A background task ended abnormally.
    #[error("coordinator task failed: {0}")]
    Task(String),
    /// A file could not be written.
    #[error("{path}: {cause}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        cause: std::io::Error,
    },
}

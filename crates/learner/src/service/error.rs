//! Typed errors of the learner role: each names the setting, file, call or peer that failed.

use std::net::SocketAddr;
use std::path::PathBuf;

/// Everything that can stop the learner role.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// A setting is out of range.
    #[error("learner setting `{field}`: {problem}")]
    Settings {
        /// Field name.
        field: &'static str,
        /// What is wrong with it.
        problem: String,
    },

    /// Reading or writing a file of the run directory failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },

    /// The consumed log has a line that cannot be read (not a torn last line).
    #[error("{path}:{line}: {problem}")]
    ConsumedLog {
        /// The log file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        problem: String,
    },

    /// A coordinator call failed (after retries, for transient failures).
    #[error("coordinator {rpc}: {status}")]
    Coordinator {
        /// Method name.
        rpc: &'static str,
        /// The final status.
        status: Box<tonic::Status>,
    },

    /// An image from the coordinator is unusable.
    #[error("image {sha256}: {problem}")]
    Image {
        /// Content address of the image.
        sha256: String,
        /// What is wrong.
        problem: String,
    },

    /// Setting up a server or channel failed.
    #[error(transparent)]
    Proto(#[from] medrl_proto::ProtoError),

    /// Encoding or publishing weights failed.
    #[error(transparent)]
    WeightSync(#[from] medrl_weight_sync::WeightSyncError),

    /// The trainer failed (loading, stepping, checkpointing).
    #[error(transparent)]
    Trainer(#[from] crate::Error),

    /// The metrics endpoint could not be bound or stopped with an error.
    #[error("metrics endpoint {addr}: {source}")]
    Metrics {
        /// Address asked for.
        addr: SocketAddr,
        /// The socket error.
        source: std::io::Error,
    },

    /// The step loop or a server task ended abnormally.
    #[error("learner stopped: {0}")]
    Stopped(String),
}

impl ServiceError {
    /// A setting `field` that is out of range.
    pub fn settings(field: &'static str, problem: impl Into<String>) -> Self {
        ServiceError::Settings { field, problem: problem.into() }
    }

    /// An I/O error on `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        ServiceError::Io { path: path.into(), source }
    }

    /// A failed coordinator call.
    pub fn coordinator(rpc: &'static str, status: tonic::Status) -> Self {
        ServiceError::Coordinator { rpc, status: Box::new(status) }
    }
}

/// Result with [`ServiceError`].
pub type ServiceResult<T> = std::result::Result<T, ServiceError>;

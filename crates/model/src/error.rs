//! Typed errors of the model library: each names the file, field or tensor and what was expected.

use std::path::PathBuf;

/// Everything that can go wrong while loading, preprocessing or running the model.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    // The cause is part of the message, not a `source`, so error chains do not print it twice.
    #[error("{path}: {cause}")]
    Io { path: PathBuf, cause: std::io::Error },

    #[error("{path}: invalid JSON: {cause}")]
    Json { path: PathBuf, cause: serde_json::Error },

    #[error("{path}: field `{field}`: {expected}")]
    Config { path: PathBuf, field: String, expected: String },

    #[error("{path}: tensor `{name}`: {problem}")]
    Weights { path: PathBuf, name: String, problem: String },

    #[error("image {source_name}: {problem}")]
    Image { source_name: String, problem: String },

    #[error("tokenizer {path}: {problem}")]
    Tokenizer { path: PathBuf, problem: String },

    #[error("chat template: {0}")]
    Template(String),

    /// A module whose projections cannot be fused, or that needs them unfused.
    #[error("{module}: {problem}")]
    Fusion { module: String, problem: String },

    #[error("bad input: {0}")]
    Input(String),

    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// Result with the model library's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// An I/O error on `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io { path: path.into(), cause: source }
    }

    /// A config field that is missing or has the wrong value.
    pub fn config(path: impl Into<PathBuf>, field: impl Into<String>, expected: impl Into<String>) -> Self {
        Error::Config { path: path.into(), field: field.into(), expected: expected.into() }
    }
}

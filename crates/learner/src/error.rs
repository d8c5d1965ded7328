//! Typed errors of the learner: each says which input, setting or file was wrong and how.

use std::path::PathBuf;

/// Everything that can go wrong in the learner's tensor code.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A tensor argument has the wrong rank or size.
    #[error("tensor `{name}`: expected shape {expected}, got {got:?}")]
    Shape {
        /// Argument name.
        name: &'static str,
        /// What was expected, in words (`[B, T]`, `same as logprobs`, ...).
        expected: String,
        /// The dimensions received.
        got: Vec<usize>,
    },

    /// Two slices that must describe the same completions differ in length.
    #[error("`{name}` has {got} entries, expected {expected}")]
    Length {
        /// Argument name.
        name: &'static str,
        /// Expected number of entries.
        expected: usize,
        /// Number received.
        got: usize,
    },

    /// A setting is out of its valid range.
    #[error("setting `{field}`: {problem}")]
    Config {
        /// Field name as written in the config.
        field: &'static str,
        /// What is wrong with it.
        problem: String,
    },

    /// The batch has nothing to average over (no completion tokens, no sequences).
    #[error("empty batch: {0}")]
    EmptyBatch(String),

    /// A value that must be finite is NaN or infinite.
    #[error("{what} is not finite: {value}")]
    NonFinite {
        /// What the value is.
        what: String,
        /// The value.
        value: f64,
    },

    /// A token range lies outside its sequence.
    #[error("span {start}..{end} is outside a sequence of length {len}")]
    Span {
        /// Start of the range.
        start: usize,
        /// End of the range (exclusive).
        end: usize,
        /// Length of the sequence.
        len: usize,
    },

    /// Saved optimizer state does not fit the parameters it is loaded for.
    #[error("optimizer state {path}: {problem}")]
    State {
        /// File that was read.
        path: PathBuf,
        /// What does not match.
        problem: String,
    },

    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },

    /// A JSON file could not be read or written.
    #[error("{path}: invalid JSON: {source}")]
    Json {
        /// The file.
        path: PathBuf,
        /// The JSON error.
        source: serde_json::Error,
    },

    /// Input data (a recorded batch, a checkpoint) is malformed; the message names where.
    #[error("{0}")]
    Input(String),

    /// A candle tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),

    /// A model-library call failed.
    #[error(transparent)]
    Model(#[from] medrl_model::Error),
}

/// Result with the learner's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// A setting `field` that is out of range.
    pub fn config(field: &'static str, problem: impl Into<String>) -> Self {
        Error::Config {
            field,
            problem: problem.into(),
        }
    }

    /// A tensor `name` whose dimensions `got` are not `expected`.
    pub fn shape(name: &'static str, expected: impl Into<String>, got: &[usize]) -> Self {
        Error::Shape {
            name,
            expected: expected.into(),
            got: got.to_vec(),
        }
    }
}

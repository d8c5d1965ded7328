//! Typed errors of the evaluation library: each names the file, line or setting at fault.

use std::path::PathBuf;

/// Everything that can go wrong while evaluating, reporting, plotting or probing.
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    // Causes are part of the message rather than a `source`, so error chains print them once.
    /// Reading or writing a file failed.
    #[error("{path}: {cause}")]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// What the OS said.
        cause: std::io::Error,
    },
    /// One line of a JSONL file is not what it should be.
    #[error("{path}:{line}: {problem}")]
    Line {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What is wrong with it.
        problem: String,
    },
    /// A setting has a value that cannot be used.
    #[error("setting `{name}`: {problem}")]
    Config {
        /// Name of the setting (config key or flag).
        name: &'static str,
        /// What is wrong with its value.
        problem: String,
    },
    /// Input data (records, samples, images, labels) that cannot be evaluated.
    #[error("{0}")]
    Data(String),
    /// The VQA record file could not be read.
    #[error(transparent)]
    Record(#[from] medrl_vqa::RecordError),
    /// Pass@k is undefined for the given counts.
    #[error("pass@k: {0}")]
    PassAtK(#[from] medrl_vqa::PassAtKError),
    /// Loading or running the model failed.
    #[error("model: {0}")]
    Model(#[from] medrl_model::Error),
    /// A tensor operation failed.
    #[error("tensor: {0}")]
    Tensor(#[from] candle_core::Error),
    /// Drawing a figure failed.
    #[error("plot {path}: {problem}")]
    Plot {
        /// The figure file.
        path: PathBuf,
        /// What the drawing backend said.
        problem: String,
    },
}

/// Result with the evaluation library's [`EvalError`].
pub type Result<T> = std::result::Result<T, EvalError>;

impl EvalError {
    /// An I/O error on `path`.
    pub fn io(path: impl Into<PathBuf>, cause: std::io::Error) -> Self {
        EvalError::Io { path: path.into(), cause }
    }

    /// A setting with an unusable value.
    pub fn config(name: &'static str, problem: impl Into<String>) -> Self {
        EvalError::Config { name, problem: problem.into() }
    }
}

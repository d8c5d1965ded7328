//! The one error type of the dataset loaders: every variant names the file, and row-level
//! variants name the line (or array index) and the field, so a bad input can be found and fixed.

use std::path::PathBuf;

use crate::record::RecordError;

/// A dataset could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// The file could not be opened, read or written.
    #[error("{path}: {cause}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        #[source]
        cause: std::io::Error,
    },
    /// One row (line, CSV record, array entry) has a bad field.
    #[error("{path}:{line}: field `{field}`: {problem}")]
    Field {
        /// The file.
        path: PathBuf,
        /// 1-based line of a text file, or the 0-based entry index of an array file.
        line: usize,
        /// Name of the field (column, JSON key, npz key).
        field: String,
        /// What is wrong with it.
        problem: String,
    },
    /// The file as a whole is unusable (missing column or key, wrong shape, unknown name).
    #[error("{path}: {problem}")]
    File {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        problem: String,
    },
    /// Reading or writing the common record JSONL failed.
    #[error(transparent)]
    Record(#[from] RecordError),
    /// Arguments that cannot be satisfied (e.g. an empty family list).
    #[error("{0}")]
    Invalid(String),
}

impl DataError {
    /// An I/O error on `path`.
    pub fn io(path: impl Into<PathBuf>, cause: std::io::Error) -> Self {
        Self::Io { path: path.into(), cause }
    }

    /// A bad field on one row of `path`.
    pub fn field(path: impl Into<PathBuf>, line: usize, field: impl Into<String>, problem: impl Into<String>) -> Self {
        Self::Field { path: path.into(), line, field: field.into(), problem: problem.into() }
    }

    /// A problem with `path` as a whole.
    pub fn file(path: impl Into<PathBuf>, problem: impl Into<String>) -> Self {
        Self::File { path: path.into(), problem: problem.into() }
    }
}

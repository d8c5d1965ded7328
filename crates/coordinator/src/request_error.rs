//! Why a peer's request was refused, as a typed error that maps onto a gRPC status naming the
//! field. The state is never changed by a refused request.

use medrl_proto::status;
use tonic::Status;

/// A refused request.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RequestError {
    /// A field has a malformed value.
    #[error("field `{field}`: {problem}")]
    Invalid {
        /// Path of the field, e.g. `delivered[2].pass_rate`.
        field: String,
        /// What is wrong and what was expected.
        problem: String,
    },
    /// A field names something the coordinator does not know.
    #[error("field `{field}`: unknown {value:?}; {hint}")]
    Unknown {
        /// Path of the field.
        field: String,
        /// The unknown value.
        value: String,
        /// What the peer should do.
        hint: String,
    },
    /// A field is well formed but contradicts the run's state.
    #[error("field `{field}`: {problem}")]
    Precondition {
        /// Path of the field.
        field: String,
        /// How it contradicts the run.
        problem: String,
    },
    /// The coordinator cannot accept changes now (journal failure).
    #[error("{0}")]
    Unavailable(String),
    /// An internal invariant broke; the call changed nothing.
    #[error("internal error: {0}")]
    Internal(String),
}

impl RequestError {
    /// A malformed field.
    pub fn invalid(field: impl Into<String>, problem: impl Into<String>) -> RequestError {
        RequestError::Invalid { field: field.into(), problem: problem.into() }
    }

    /// An unknown id.
    pub fn unknown(field: impl Into<String>, value: &str, hint: impl Into<String>) -> RequestError {
        RequestError::Unknown { field: field.into(), value: value.to_string(), hint: hint.into() }
    }

    /// A field at odds with the run's state.
    pub fn precondition(field: impl Into<String>, problem: impl Into<String>) -> RequestError {
        RequestError::Precondition { field: field.into(), problem: problem.into() }
    }
}

impl From<RequestError> for Status {
    fn from(e: RequestError) -> Status {
        match e {
            RequestError::Invalid { field, problem } => status::invalid_field(&field, problem),
            RequestError::Unknown { field, value, hint } => status::unknown(&field, &value, &hint),
            RequestError::Precondition { field, problem } => status::precondition(&field, problem),
            RequestError::Unavailable(m) => Status::unavailable(m),
            RequestError::Internal(m) => Status::internal(m),
        }
    }
}

/// Checks a string field: non-empty and at most `max` bytes.
pub fn check_str(field: &str, value: &str, max: usize) -> Result<(), RequestError> {
    if value.is_empty() {
        return Err(RequestError::invalid(field, "must not be empty"));
    }
    if value.len() > max {
        return Err(RequestError::invalid(field, format!("{} bytes, at most {max} allowed", value.len())));
    }
    Ok(())
}

//! Error statuses that name the offending request field, so a peer's log says what to fix.

use std::fmt::Display;

use tonic::Status;

/// `INVALID_ARGUMENT` naming the field: "field `x`: problem".
pub fn invalid_field(field: &str, problem: impl Display) -> Status {
    Status::invalid_argument(format!("field `{field}`: {problem}"))
}

/// `NOT_FOUND` naming the field and the unknown value.
pub fn unknown(field: &str, value: &str, hint: &str) -> Status {
    if hint.is_empty() {
        Status::not_found(format!("field `{field}`: unknown {value:?}"))
    } else {
        Status::not_found(format!("field `{field}`: unknown {value:?}; {hint}"))
    }
}

/// `FAILED_PRECONDITION` naming the field.
pub fn precondition(field: &str, problem: impl Display) -> Status {
    Status::failed_precondition(format!("field `{field}`: {problem}"))
}

/// Checks that a string field is non-empty and at most `max` bytes long.
pub fn require_str(field: &str, value: &str, max: usize) -> Result<(), Status> {
    if value.is_empty() {
        return Err(invalid_field(field, "must not be empty"));
    }
    if value.len() > max {
        return Err(invalid_field(field, format_args!("{} bytes, at most {max} allowed", value.len())));
    }
    Ok(())
}

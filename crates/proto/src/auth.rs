//! Shared-token authentication hooks for every gRPC service and client.
//!
//! Every service is wrapped in [`AuthInterceptor`] from day one, even when no token is set, so
//! turning authentication on later changes a value, not the types of every server and client.

use std::sync::Arc;

use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::{Request, Status};

/// Metadata key carrying `Bearer <token>`.
pub const AUTHORIZATION: &str = "authorization";

/// Server side: rejects calls without the shared token (`UNAUTHENTICATED`); open when no token.
#[derive(Clone, Default)]
pub struct AuthInterceptor {
    expected: Option<Arc<[u8]>>,
}

impl AuthInterceptor {
    /// Lets every call through (loopback runs and tests).
    pub fn open() -> Self {
        AuthInterceptor { expected: None }
    }

    /// Requires `authorization: Bearer <token>` on every call.
    pub fn with_token(token: &str) -> Self {
        AuthInterceptor { expected: Some(format!("Bearer {token}").into_bytes().into()) }
    }

    /// True when a token is required.
    pub fn is_enforced(&self) -> bool {
        self.expected.is_some()
    }
}

impl std::fmt::Debug for AuthInterceptor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the token itself.
        f.debug_struct("AuthInterceptor").field("enforced", &self.is_enforced()).finish()
    }
}

impl Interceptor for AuthInterceptor {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        let Some(expected) = &self.expected else {
            return Ok(request);
        };
        let given = request.metadata().get(AUTHORIZATION).map(|v| v.as_bytes()).unwrap_or_default();
        if constant_time_eq(given, expected) {
            Ok(request)
        } else {
            Err(Status::unauthenticated("missing or wrong `authorization` token"))
        }
    }
}

/// Compares without an early exit, so response timing does not reveal a matching prefix.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Client side: adds the shared token (when set) to every call.
#[derive(Clone, Default)]
pub struct ClientAuth {
    header: Option<MetadataValue<Ascii>>,
}

impl ClientAuth {
    /// Sends no token.
    pub fn none() -> Self {
        ClientAuth { header: None }
    }

    /// Sends `authorization: Bearer <token>`; `None` if the token is not printable ASCII.
    pub fn with_token(token: &str) -> Option<Self> {
        let value = format!("Bearer {token}").parse().ok()?;
        Some(ClientAuth { header: Some(value) })
    }
}

impl std::fmt::Debug for ClientAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientAuth").field("token", &self.header.is_some()).finish()
    }
}

impl Interceptor for ClientAuth {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(value) = &self.header {
            request.metadata_mut().insert(AUTHORIZATION, value.clone());
        }
        Ok(request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_is_required_only_when_set() {
        assert!(AuthInterceptor::open().call(Request::new(())).is_ok());
        let mut guard = AuthInterceptor::with_token("s3cret");
        assert_eq!(guard.call(Request::new(())).expect_err("no token").code(), tonic::Code::Unauthenticated);
        let mut client = ClientAuth::with_token("s3cret").expect("ascii");
        let request = client.call(Request::new(())).expect("adds header");
        assert!(guard.call(request).is_ok());
        let mut wrong = ClientAuth::with_token("s3creT").expect("ascii");
        let request = wrong.call(Request::new(())).expect("adds header");
        assert!(guard.call(request).is_err());
        assert!(!format!("{guard:?}").contains("s3cret"));
    }
}

//! Shared-token authentication hooks for every gRPC service and client.
//!
//! Every service is wrapped in [`AuthInterceptor`] from day one, even when no token is set, so
//! turning authentication on later changes a value, not the types of every server and client.
//! With mutual TLS the same hook also requires a verified client certificate: the TLS layer lets
//! certificate-less clients finish the handshake (so health probes work), and only the medrl
//! services, which are the ones wrapped here, refuse them.

use std::sync::Arc;

use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::{Request, Status};

use crate::error::ProtoError;
use crate::security::Token;

/// Metadata key carrying `Bearer <token>`.
pub const AUTHORIZATION: &str = "authorization";

/// Server side: rejects calls without the shared token (`UNAUTHENTICATED`); open when no token.
#[derive(Clone, Default)]
pub struct AuthInterceptor {
    expected: Option<Arc<[u8]>>,
    require_client_cert: bool,
}

impl AuthInterceptor {
    /// Lets every call through (loopback runs and tests).
    pub fn open() -> Self {
        AuthInterceptor { expected: None, require_client_cert: false }
    }

    /// Requires `authorization: Bearer <token>` on every call.
    pub fn with_token(token: &str) -> Self {
        AuthInterceptor { expected: Some(format!("Bearer {token}").into_bytes().into()), require_client_cert: false }
    }

    /// Requires the token when one is given, otherwise lets calls through.
    pub fn from_token(token: Option<&Token>) -> Self {
        token.map_or_else(AuthInterceptor::open, |t| AuthInterceptor::with_token(t.expose()))
    }

    /// Also requires a client certificate verified by the TLS layer (mutual TLS).
    pub fn require_client_cert(mut self, required: bool) -> Self {
        self.require_client_cert = required;
        self
    }

    /// True when a token is required.
    pub fn is_enforced(&self) -> bool {
        self.expected.is_some()
    }

    /// True when a verified client certificate is required.
    pub fn requires_client_cert(&self) -> bool {
        self.require_client_cert
    }
}

impl std::fmt::Debug for AuthInterceptor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the token itself.
        f.debug_struct("AuthInterceptor")
            .field("enforced", &self.is_enforced())
            .field("require_client_cert", &self.require_client_cert)
            .finish()
    }
}

impl Interceptor for AuthInterceptor {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        if self.require_client_cert {
            // Present only when the TLS layer verified a chain to `client_ca`; a client that sent
            // no certificate got through the handshake only so that health probes work.
            let has_cert = request.peer_certs().is_some_and(|certs| !certs.is_empty());
            if !has_cert {
                tracing::debug!(peer = ?request.remote_addr(), "refused a call without a client certificate");
                return Err(Status::unauthenticated("a client certificate signed by the run's client CA is required"));
            }
        }
        let Some(expected) = &self.expected else {
            return Ok(request);
        };
        let given = request.metadata().get(AUTHORIZATION).map(|v| v.as_bytes()).unwrap_or_default();
        if constant_time_eq(given, expected) {
            Ok(request)
        } else {
            // Debug level: a peer hammering with bad tokens must not be able to flood the log.
            tracing::debug!(peer = ?request.remote_addr(), "refused a call with a missing or wrong token");
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

    /// Sends the token when one is given; an error (naming no secret) if it cannot be a header.
    pub fn from_token(token: Option<&Token>) -> Result<Self, ProtoError> {
        match token {
            None => Ok(ClientAuth::none()),
            Some(t) => ClientAuth::with_token(t.expose()).ok_or_else(|| ProtoError::Security {
                setting: "token".into(),
                problem: "not usable as an HTTP header (printable ASCII only)".into(),
            }),
        }
    }

    /// True when calls carry a token.
    pub fn is_set(&self) -> bool {
        self.header.is_some()
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

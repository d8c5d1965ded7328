//! The gRPC contract between medrl processes (`proto/medrl.proto`, package `medrl.v1`): the
//! generated messages and stubs, the encoded descriptor set for reflection, and small helpers
//! every role shares (server setup with health, reflection and limits; the `/metrics` endpoint;
//! client channels with deadlines; TLS and the shared token; group ids; field-naming error statuses).

#![warn(missing_docs)]

pub mod auth;
pub mod client;
pub mod codec;
pub mod error;
pub mod ids;
pub mod metrics;
pub mod security;
pub mod server;
pub mod status;

/// Generated messages, enums and service stubs of package `medrl.v1`.
#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod v1 {
    tonic::include_proto!("medrl.v1");
}

pub use v1::*;

pub use auth::{AuthInterceptor, ClientAuth};
pub use client::{ClientOptions, connect, with_deadline};
pub use error::ProtoError;
pub use ids::{GroupId, NCCL_UNIQUE_ID_LEN, group_id, is_sha256_hex};
pub use security::{Security, SecuritySection, TlsSettings, Token};
pub use server::{GrpcServer, Guarded, ServerOptions};

impl From<&ImageRef> for GetImageRequest {
    /// Asks for `image` by address, naming it so a restarted coordinator can find it.
    fn from(image: &ImageRef) -> Self {
        GetImageRequest { sha256: image.sha256.clone(), name: image.name.clone() }
    }
}

/// Encoded `FileDescriptorSet` of `medrl.proto`, for gRPC reflection and tooling.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("medrl_descriptor");

/// Fully qualified gRPC service names, as health checks and reflection list them.
pub mod service_names {
    /// `medrl.v1.Coordinator`.
    pub const COORDINATOR: &str = "medrl.v1.Coordinator";
    /// `medrl.v1.Learner`.
    pub const LEARNER: &str = "medrl.v1.Learner";
    /// `medrl.v1.Weights`.
    pub const WEIGHTS: &str = "medrl.v1.Weights";
}

//! One way to stand up a medrl gRPC server: standard health and reflection services, message size
//! limits, keepalive, TLS and the auth hook, so every role's server behaves the same.
//!
//! TLS, when set, covers the whole listener (health and reflection included); the token and the
//! client-certificate check cover the medrl services (Coordinator, Learner, Weights) only, so
//! probes can ask `grpc.health.v1.Health` without secrets.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::{JoinError, JoinHandle};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Server;
use tonic::transport::server::{Router, TcpIncoming};
use tonic_health::server::HealthReporter;

use crate::auth::AuthInterceptor;
use crate::error::ProtoError;
use crate::security::{Security, TlsSettings};
use crate::v1::coordinator_server::{Coordinator, CoordinatorServer};
use crate::v1::learner_server::{Learner, LearnerServer};
use crate::v1::weights_server::{Weights, WeightsServer};

/// A medrl service behind the shared-token check.
pub type Guarded<S> = InterceptedService<S, AuthInterceptor>;

/// Default message size limit both ways: large enough for an image or a weight chunk of a few
/// MiB, small enough that one bad peer cannot make the server allocate gigabytes.
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;

/// HTTP/2 flow-control window per stream, both directions: the protocol's 64 KiB default makes a
/// multi-GB weight stream stop for a window update every 64 KiB.
pub const HTTP2_STREAM_WINDOW_BYTES: u32 = 8 << 20;
/// HTTP/2 flow-control window per connection (several streams share one).
pub const HTTP2_CONNECTION_WINDOW_BYTES: u32 = 32 << 20;
/// Largest HTTP/2 frame either side accepts: the protocol's 16 KiB default cuts a 4 MiB weight
/// chunk into 256 frames, each one a wake-up and a copy into the gRPC decoder.
pub const HTTP2_MAX_FRAME_BYTES: u32 = 1 << 20;

/// Settings shared by every medrl server.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// Largest message accepted or sent, in bytes (default 64 MiB).
    pub max_message_bytes: usize,
    /// Server-side cap on a call's duration; `None` (default) leaves deadlines to the clients,
    /// because a client stream of groups may legitimately last long.
    pub request_timeout: Option<Duration>,
    /// HTTP/2 keepalive pings, so dead peers are noticed (default 30 s).
    pub http2_keepalive_interval: Option<Duration>,
    /// Concurrent calls per connection (default 256).
    pub concurrency_limit_per_connection: usize,
    /// Shared-token check on medrl services; health and reflection stay open for probes.
    pub auth: AuthInterceptor,
    /// TLS on the whole listener (`None`: plaintext).
    pub tls: Option<TlsSettings>,
    /// Time a client gets to finish the TLS handshake (default 10 s), so half-open connections
    /// cannot pile up.
    pub tls_handshake_timeout: Duration,
}

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions {
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
            request_timeout: None,
            http2_keepalive_interval: Some(Duration::from_secs(30)),
            concurrency_limit_per_connection: 256,
            auth: AuthInterceptor::open(),
            tls: None,
            tls_handshake_timeout: Duration::from_secs(10),
        }
    }
}

impl ServerOptions {
    /// These options with the token check, TLS and (when `client_ca` is set) the
    /// client-certificate check of `security`.
    pub fn with_security(mut self, security: &Security) -> ServerOptions {
        let mutual = security.tls.as_ref().is_some_and(TlsSettings::mutual);
        self.auth = AuthInterceptor::from_token(security.token.as_ref()).require_client_cert(mutual);
        self.tls = security.tls.clone();
        self
    }

    /// The Coordinator service with this server's limits and auth.
    pub fn coordinator<T: Coordinator>(&self, service: T) -> Guarded<CoordinatorServer<T>> {
        let server = CoordinatorServer::new(service)
            .max_decoding_message_size(self.max_message_bytes)
            .max_encoding_message_size(self.max_message_bytes);
        InterceptedService::new(server, self.auth.clone())
    }

    /// The Learner service with this server's limits and auth.
    pub fn learner<T: Learner>(&self, service: T) -> Guarded<LearnerServer<T>> {
        let server = LearnerServer::new(service)
            .max_decoding_message_size(self.max_message_bytes)
            .max_encoding_message_size(self.max_message_bytes);
        InterceptedService::new(server, self.auth.clone())
    }

    /// The Weights service with this server's limits and auth.
    pub fn weights<T: Weights>(&self, service: T) -> Guarded<WeightsServer<T>> {
        let server = WeightsServer::new(service)
            .max_decoding_message_size(self.max_message_bytes)
            .max_encoding_message_size(self.max_message_bytes);
        InterceptedService::new(server, self.auth.clone())
    }
}

/// A server with health and reflection already added; add medrl services, then serve.
pub struct GrpcServer {
    router: Router,
    health: HealthReporter,
    options: ServerOptions,
}

impl GrpcServer {
    /// Builds the transport with the options and adds `grpc.health.v1` and reflection (v1).
    pub fn new(options: &ServerOptions) -> Result<GrpcServer, ProtoError> {
        let (health, health_service) = tonic_health::server::health_reporter();
        let reflection = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(crate::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1()?;
        let mut builder = Server::builder()
            .tcp_nodelay(true)
            .initial_stream_window_size(HTTP2_STREAM_WINDOW_BYTES)
            .initial_connection_window_size(HTTP2_CONNECTION_WINDOW_BYTES)
            .max_frame_size(HTTP2_MAX_FRAME_BYTES)
            .http2_keepalive_interval(options.http2_keepalive_interval)
            .concurrency_limit_per_connection(options.concurrency_limit_per_connection);
        match &options.tls {
            Some(tls) => {
                builder = builder.tls_config(tls.server_config(options.tls_handshake_timeout)?).map_err(ProtoError::Tls)?;
            }
            None if options.auth.requires_client_cert() => {
                // Without TLS no call could ever carry a certificate: refuse to start rather than
                // serve a server that rejects everything.
                return Err(ProtoError::Security {
                    setting: "security.tls".into(),
                    problem: "client certificates are required but TLS is off".into(),
                });
            }
            None => {}
        }
        if let Some(timeout) = options.request_timeout {
            builder = builder.timeout(timeout);
        }
        let router = builder.add_service(health_service).add_service(reflection);
        Ok(GrpcServer { router, health, options: options.clone() })
    }

    /// The reporter that sets each service's health status.
    pub fn health(&self) -> HealthReporter {
        self.health.clone()
    }

    /// Adds a Coordinator service.
    pub fn with_coordinator<T: Coordinator>(mut self, service: T) -> GrpcServer {
        self.router = self.router.add_service(self.options.coordinator(service));
        self
    }

    /// Adds a Learner service.
    pub fn with_learner<T: Learner>(mut self, service: T) -> GrpcServer {
        self.router = self.router.add_service(self.options.learner(service));
        self
    }

    /// Adds a Weights service.
    pub fn with_weights<T: Weights>(mut self, service: T) -> GrpcServer {
        self.router = self.router.add_service(self.options.weights(service));
        self
    }

    /// The underlying router, to add other services or serve it another way.
    pub fn into_router(self) -> Router {
        self.router
    }

    /// Serves on an already bound listener until `shutdown` completes.
    pub async fn serve(self, listener: TcpListener, shutdown: impl Future<Output = ()> + Send) -> Result<(), ProtoError> {
        if let Ok(addr) = listener.local_addr() {
            let tls = self.options.tls.is_some();
            if !tls && !addr.ip().is_loopback() {
                // Said once at start: the operator should know what crosses the network in clear.
                if self.options.auth.is_enforced() {
                    tracing::warn!(%addr, "gRPC without TLS: the shared token travels in clear; set security.tls");
                } else {
                    tracing::warn!(%addr, "gRPC without TLS or token: anyone who reaches this address can call it");
                }
            }
            tracing::info!(%addr, tls, mutual_tls = self.options.auth.requires_client_cert(), token = self.options.auth.is_enforced(), "gRPC serving");
        }
        // `Server::tcp_nodelay` only reaches sockets tonic accepts itself; with our own listener
        // the accepted sockets must get it here, or Nagle's algorithm holds the response's last
        // frame until the client's delayed ACK and every unary call takes ~40 ms.
        let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
        self.router.serve_with_incoming_shutdown(incoming, shutdown).await.map_err(ProtoError::Serve)
    }
}

/// Binds a TCP listener (port 0 picks a free port) and returns it with its actual address.
pub async fn bind(addr: SocketAddr) -> Result<(TcpListener, SocketAddr), ProtoError> {
    listen(addr).await.map_err(|cause| ProtoError::Bind { addr, cause })
}

/// [`bind`] with the bare I/O error, for endpoints whose errors name them in their own way (the
/// metrics endpoint of each role).
pub async fn listen(addr: SocketAddr) -> std::io::Result<(TcpListener, SocketAddr)> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    Ok((listener, local))
}

/// Resolves once `rx` reads `true` (or its sender is gone): the stop future a role hands to each
/// of its servers.
pub async fn stop_signal(mut rx: watch::Receiver<bool>) {
    let _ = rx.wait_for(|stop| *stop).await;
}

/// Awaits a role's named tasks in order (after their stop signal was sent) and returns the first
/// failure: a task's own error, logged as `"{role} task failed"`, or `joined(name, error)` for a
/// task that panicked or was cancelled. Every task is awaited even after a failure.
pub async fn join_tasks<E: std::fmt::Display>(
    role: &'static str,
    tasks: Vec<(&'static str, JoinHandle<Result<(), E>>)>,
    joined: impl Fn(&'static str, JoinError) -> E,
) -> Result<(), E> {
    let mut first_error = None;
    for (name, task) in tasks {
        match task.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::error!(task = name, error = %e, "{role} task failed");
                first_error.get_or_insert(e);
            }
            Err(e) => {
                first_error.get_or_insert(joined(name, e));
            }
        }
    }
    first_error.map_or(Ok(()), Err)
}

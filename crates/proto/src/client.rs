//! Client channels with deadlines, limits and TLS, and typed clients that carry the auth hook.

use std::time::Duration;

use tonic::Request;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

use crate::auth::ClientAuth;
use crate::error::ProtoError;
use crate::security::{Security, TlsSettings};
use crate::server::{DEFAULT_MAX_MESSAGE_BYTES, HTTP2_CONNECTION_WINDOW_BYTES, HTTP2_MAX_FRAME_BYTES, HTTP2_STREAM_WINDOW_BYTES};
use crate::v1::coordinator_client::CoordinatorClient;
use crate::v1::learner_client::LearnerClient;
use crate::v1::weights_client::WeightsClient;

/// A channel whose every call carries the shared token (when one is set).
pub type AuthedChannel = InterceptedService<Channel, ClientAuth>;

/// Settings of a client channel.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// Time allowed to establish the connection (default 5 s).
    pub connect_timeout: Duration,
    /// Deadline of every call on the channel (default 30 s); `None` only for channels used by
    /// long streams, which then set deadlines per call with [`with_deadline`].
    pub request_timeout: Option<Duration>,
    /// Largest message accepted or sent, in bytes (default 64 MiB).
    pub max_message_bytes: usize,
    /// HTTP/2 keepalive pings, so a dead server is noticed between calls (default 30 s).
    pub keepalive_interval: Duration,
    /// The shared token sent with every call.
    pub auth: ClientAuth,
    /// TLS (`None`: plaintext); with it, `http://` endpoints are dialled as `https://`.
    pub tls: Option<TlsSettings>,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            connect_timeout: Duration::from_secs(5),
            request_timeout: Some(Duration::from_secs(30)),
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
            keepalive_interval: Duration::from_secs(30),
            auth: ClientAuth::none(),
            tls: None,
        }
    }
}

impl ClientOptions {
    /// These options with the token and the TLS settings of `security`.
    pub fn with_security(mut self, security: &Security) -> Result<ClientOptions, ProtoError> {
        self.auth = ClientAuth::from_token(security.token.as_ref())?;
        self.tls = security.tls.clone();
        Ok(self)
    }
}

/// The endpoint to dial: with TLS on, `http://` becomes `https://` (configs list peers once, and
/// upgrading never weakens anything); without TLS, `https://` is an error rather than a silent
/// plaintext connection or a handshake with no trusted CA.
fn dial_uri(endpoint: &str, tls: bool) -> Result<String, ProtoError> {
    match (tls, endpoint.strip_prefix("http://"), endpoint.starts_with("https://")) {
        (true, Some(rest), _) => Ok(format!("https://{rest}")),
        (false, _, true) => Err(ProtoError::Security {
            setting: "security.tls".into(),
            problem: format!("endpoint {endpoint} is https but TLS is not configured (set security.tls.ca)"),
        }),
        _ => Ok(endpoint.to_string()),
    }
}

/// Connects to `endpoint` (e.g. `http://127.0.0.1:50051`) within the connect timeout, over TLS
/// when the options carry TLS settings.
pub async fn connect(endpoint: &str, options: &ClientOptions) -> Result<Channel, ProtoError> {
    let uri = dial_uri(endpoint, options.tls.is_some())?;
    let mut ep = Endpoint::from_shared(uri)
        .map_err(|cause| ProtoError::Endpoint { endpoint: endpoint.to_string(), cause })?
        .connect_timeout(options.connect_timeout)
        .tcp_nodelay(true)
        .initial_stream_window_size(HTTP2_STREAM_WINDOW_BYTES)
        .initial_connection_window_size(HTTP2_CONNECTION_WINDOW_BYTES)
        .max_frame_size(HTTP2_MAX_FRAME_BYTES)
        .http2_keep_alive_interval(options.keepalive_interval)
        .keep_alive_while_idle(true);
    if let Some(timeout) = options.request_timeout {
        ep = ep.timeout(timeout);
    }
    if let Some(tls) = &options.tls {
        ep = ep.tls_config(tls.client_config()?).map_err(ProtoError::Tls)?;
    }
    ep.connect().await.map_err(|cause| ProtoError::Connect { endpoint: endpoint.to_string(), cause })
}

impl ClientOptions {
    /// A Coordinator client on `channel` with these limits and auth.
    pub fn coordinator(&self, channel: Channel) -> CoordinatorClient<AuthedChannel> {
        CoordinatorClient::with_interceptor(channel, self.auth.clone())
            .max_decoding_message_size(self.max_message_bytes)
            .max_encoding_message_size(self.max_message_bytes)
    }

    /// A Learner client on `channel` with these limits and auth.
    pub fn learner(&self, channel: Channel) -> LearnerClient<AuthedChannel> {
        LearnerClient::with_interceptor(channel, self.auth.clone())
            .max_decoding_message_size(self.max_message_bytes)
            .max_encoding_message_size(self.max_message_bytes)
    }

    /// A Weights client on `channel` with these limits and auth.
    pub fn weights(&self, channel: Channel) -> WeightsClient<AuthedChannel> {
        WeightsClient::with_interceptor(channel, self.auth.clone())
            .max_decoding_message_size(self.max_message_bytes)
            .max_encoding_message_size(self.max_message_bytes)
    }
}

/// Wraps a message in a request with a deadline (sent as `grpc-timeout`, enforced both sides).
pub fn with_deadline<T>(message: T, deadline: Duration) -> Request<T> {
    let mut request = Request::new(message);
    request.set_timeout(deadline);
    request
}

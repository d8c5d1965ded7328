//! Client channels with deadlines and limits, and typed clients that carry the auth hook.

use std::time::Duration;

use tonic::Request;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

use crate::auth::ClientAuth;
use crate::error::ProtoError;
use crate::server::DEFAULT_MAX_MESSAGE_BYTES;
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
    /// Token and later TLS settings.
    pub auth: ClientAuth,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            connect_timeout: Duration::from_secs(5),
            request_timeout: Some(Duration::from_secs(30)),
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
            keepalive_interval: Duration::from_secs(30),
            auth: ClientAuth::none(),
        }
    }
}

/// Connects to `endpoint` (e.g. `http://127.0.0.1:50051`) within the connect timeout.
pub async fn connect(endpoint: &str, options: &ClientOptions) -> Result<Channel, ProtoError> {
    let mut ep = Endpoint::from_shared(endpoint.to_string())
        .map_err(|cause| ProtoError::Endpoint { endpoint: endpoint.to_string(), cause })?
        .connect_timeout(options.connect_timeout)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(options.keepalive_interval)
        .keep_alive_while_idle(true);
    if let Some(timeout) = options.request_timeout {
        ep = ep.timeout(timeout);
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

//! Errors of setting up servers and channels (not of individual calls, which are `Status`es).

/// Setting up a gRPC server or client failed.
#[derive(Debug, thiserror::Error)]
pub enum ProtoError {
    /// The endpoint text is not a valid URI.
    #[error("endpoint {endpoint:?}: {cause}")]
    Endpoint {
        /// The endpoint as given.
        endpoint: String,
        /// Why it does not parse.
        cause: tonic::transport::Error,
    },
    /// Connecting to the endpoint failed (within the connect timeout).
    #[error("connecting to {endpoint}: {cause}")]
    Connect {
        /// The endpoint.
        endpoint: String,
        /// The transport error.
        cause: tonic::transport::Error,
    },
    /// Binding the listening socket failed.
    #[error("binding {addr}: {cause}")]
    Bind {
        /// The address asked for.
        addr: std::net::SocketAddr,
        /// The socket error.
        cause: std::io::Error,
    },
    /// The reflection service could not read the descriptor set.
    #[error("building the reflection service: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    /// The server stopped with a transport error.
    #[error("serving gRPC: {0}")]
    Serve(tonic::transport::Error),
    /// A token or TLS file could not be read.
    #[error("reading {what}: {cause}")]
    Secret {
        /// Which secret (file or variable name, never its value).
        what: String,
        /// The read error.
        cause: std::io::Error,
    },
    /// A security setting is missing, inconsistent or holds the wrong kind of data.
    #[error("{setting}: {problem}")]
    Security {
        /// The setting, variable or file (never a secret's value).
        setting: String,
        /// What is wrong and what was expected.
        problem: String,
    },
    /// The TLS configuration was refused by the transport (after the files parsed).
    #[error("setting up TLS: {0}")]
    Tls(tonic::transport::Error),
}

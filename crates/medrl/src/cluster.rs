//! The `cluster` section: where the roles listen and find each other.

use std::net::SocketAddr;
use std::path::PathBuf;

use medrl_proto::TlsSettings;
use serde::{Deserialize, Serialize};

/// Addresses, ports and the secrets of a multi-process run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClusterSection {
    /// The coordinator as workers and the learner reach it (`http://host:50051`).
    pub coordinator: String,
    /// The learner as workers reach it (`http://host:50052`).
    pub learner: String,
    /// Where the learner's gRPC server (groups + weights + health) listens.
    pub learner_listen: SocketAddr,
    pub learner_metrics_listen: Option<SocketAddr>,
    /// Where a worker's health server listens.
    pub worker_health_listen: Option<SocketAddr>,
    pub worker_metrics_listen: Option<SocketAddr>,
    /// Rollout workers `medrl train` runs in its own process.
    pub local_workers: usize,
    /// A file holding the shared token every gRPC call must carry (also `MEDRL_TOKEN_FILE`).
    pub token_file: Option<PathBuf>,
    /// TLS on every gRPC server and channel of the roles, the weight stream included: PEM files
    /// `cert` + `key` (this process), `ca` (trusted for servers), `client_ca` (set: mutual TLS),
    /// `domain` (name to verify); `null` (default) is plaintext. See docs/security.md.
    pub tls: Option<TlsSettings>,
}

impl Default for ClusterSection {
    fn default() -> Self {
        ClusterSection {
            coordinator: "http://127.0.0.1:50051".into(),
            learner: "http://127.0.0.1:50052".into(),
            learner_listen: SocketAddr::from(([0, 0, 0, 0], 50052)),
            learner_metrics_listen: Some(SocketAddr::from(([0, 0, 0, 0], 9091))),
            worker_health_listen: Some(SocketAddr::from(([0, 0, 0, 0], 50053))),
            worker_metrics_listen: Some(SocketAddr::from(([0, 0, 0, 0], 9092))),
            local_workers: 2,
            token_file: None,
            tls: None,
        }
    }
}

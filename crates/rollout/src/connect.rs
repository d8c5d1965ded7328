//! Opening channels to the coordinator and the learner: a malformed endpoint is a fatal error, an
//! unreachable one is retried (peers may start after the worker, e.g. in the same pod rollout).

use medrl_proto::{ClientOptions, ProtoError};
use tonic::transport::Channel;

use crate::backoff::Backoff;
use crate::error::WorkerError;
use crate::stop::Stop;

/// Connects to `endpoint`, retrying with backoff; `None` when stopped first.
pub async fn connect_retrying(what: &str, endpoint: &str, options: &ClientOptions, backoff: &mut Backoff, stop: &Stop) -> Result<Option<Channel>, WorkerError> {
    loop {
        if stop.is_set() {
            return Ok(None);
        }
        match medrl_proto::connect(endpoint, options).await {
            Ok(channel) => {
                backoff.reset();
                tracing::info!(%endpoint, "connected to the {what}");
                return Ok(Some(channel));
            }
            Err(e @ ProtoError::Endpoint { .. }) => return Err(WorkerError::Endpoint(e)),
            Err(e) => {
                let delay = backoff.next_delay();
                tracing::warn!(error = %e, retry_in = ?delay, "cannot reach the {what} yet");
                if stop.sleep(delay).await {
                    return Ok(None);
                }
            }
        }
    }
}

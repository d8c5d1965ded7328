//! Typed errors of the worker, by how far they reach: a [`WorkerError`] stops the worker, a
//! [`PromptError`] loses one prompt of a lease (it goes back to the queue), a [`WeightError`]
//! loses one weight update (the old weights stay).

use std::net::SocketAddr;

use crate::config::RolloutConfigError;

/// The worker cannot start or go on.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// The rollout section is out of range.
    #[error(transparent)]
    Config(#[from] RolloutConfigError),
    /// A reward weight is unusable.
    #[error("rewards: {0}")]
    Rewards(#[from] medrl_vqa::reward::RewardConfigError),
    /// The model directory could not be loaded.
    #[error("loading the model: {0}")]
    LoadModel(medrl_model::Error),
    /// A peer endpoint is not a valid URI.
    #[error(transparent)]
    Endpoint(medrl_proto::ProtoError),
    /// The health or metrics endpoint could not be opened or failed.
    #[error("{what} endpoint {addr}: {cause}")]
    Serve {
        /// `health` or `metrics`.
        what: &'static str,
        /// The address asked for.
        addr: SocketAddr,
        /// Why.
        cause: String,
    },
    /// A background task panicked or was cancelled.
    #[error("worker task {0}")]
    Task(String),
}

/// One leased prompt could not be turned into a group.
#[derive(Debug, thiserror::Error)]
pub enum PromptError {
    /// `record_json` is not a valid `VqaRecord`.
    #[error("prompt {prompt_id}: field `record_json`: {problem}")]
    Record {
        /// The leased prompt id.
        prompt_id: String,
        /// What is wrong with it.
        problem: String,
    },
    /// The lease's image list does not match the record's.
    #[error("prompt {prompt_id}: field `images`: the record names {record} images, the lease {leased}")]
    ImageCount {
        /// The leased prompt id.
        prompt_id: String,
        /// Images in the record.
        record: usize,
        /// Image refs in the lease.
        leased: usize,
    },
    /// An image reference cannot be fetched as given.
    #[error("image {sha256:?}: {problem}")]
    ImageRef {
        /// The content address as leased.
        sha256: String,
        /// What is wrong with it.
        problem: String,
    },
    /// The coordinator refused or failed to serve an image.
    #[error("image {sha256}: GetImage failed: {code:?}: {message}")]
    ImageFetch {
        /// The content address.
        sha256: String,
        /// gRPC status code.
        code: tonic::Code,
        /// Status message.
        message: String,
    },
    /// The bytes served do not hash to their address.
    #[error("image {sha256}: the served bytes hash to {actual}")]
    ImageHash {
        /// The content address asked for.
        sha256: String,
        /// sha256 of what arrived.
        actual: String,
    },
    /// The prompt with its image tokens is longer than `max_prompt_tokens`.
    #[error("prompt {prompt_id}: {tokens} tokens, more than rollout.max_prompt_tokens = {max}")]
    TooLong {
        /// The leased prompt id.
        prompt_id: String,
        /// Tokens of the encoded prompt.
        tokens: usize,
        /// The configured limit.
        max: usize,
    },
    /// Preprocessing, encoding or generation failed.
    #[error("prompt {prompt_id}: {cause}")]
    Model {
        /// The leased prompt id.
        prompt_id: String,
        /// The model library's error.
        cause: medrl_model::Error,
    },
    /// The sampling thread panicked.
    #[error("prompt {prompt_id}: sampling task failed: {cause}")]
    Task {
        /// The leased prompt id.
        prompt_id: String,
        /// The join error.
        cause: String,
    },
}

/// A weight update failed; the worker keeps sampling with the weights it holds.
#[derive(Debug, thiserror::Error)]
pub enum WeightError {
    /// Downloading (or checksumming) the blob failed.
    #[error("fetching weights (version >= {min_version}): {cause}")]
    Fetch {
        /// The version asked for.
        min_version: u64,
        /// The transport's error.
        cause: medrl_weight_sync::WeightSyncError,
    },
    /// The blob is not usable weights for this model.
    #[error("weights of version {version}: {cause}")]
    Decode {
        /// Version of the blob.
        version: u64,
        /// Why it cannot be used.
        cause: medrl_weight_sync::WeightSyncError,
    },
    /// Building the model from decoded weights failed.
    #[error("weights of version {version}: building the model: {cause}")]
    Build {
        /// Version of the blob.
        version: u64,
        /// The model library's error.
        cause: medrl_model::Error,
    },
    /// The learner served an older version than asked for.
    #[error("asked for version >= {min_version}, the learner served {served}")]
    Older {
        /// The version asked for.
        min_version: u64,
        /// The version served.
        served: u64,
    },
    /// The decoding thread panicked.
    #[error("weight update task failed: {0}")]
    Task(String),
    /// The coordinator withdrew the version while it was being fetched: the learner went back to
    /// an older checkpoint, so it may never be served.
    #[error("version {min_version} was withdrawn (the coordinator now publishes {published})")]
    Withdrawn {
        /// The version asked for.
        min_version: u64,
        /// The version the coordinator publishes now.
        published: u64,
    },
}

//! The medrl rollout worker: registers with the coordinator, pulls prompt leases, samples K
//! completions per prompt with the model library (the prompt prefilled once per group), scores
//! rule rewards, streams one `RolloutGroup` per prompt to the learner with an idempotent group id,
//! acks the lease once the learner has the groups, and takes new weights only between groups.
//!
//! Entry point: [`run_worker`] with [`WorkerSettings`]; the `rollout:` section of a run config is
//! [`RolloutConfig`].

#![warn(missing_docs)]

pub mod backoff;
pub mod config;
pub mod connect;
pub mod deliver;
pub mod error;
pub mod health;
pub mod heartbeat;
pub mod images;
pub mod lease;
pub mod metrics;
pub mod policy;
pub mod prompt;
pub mod sample;
pub mod scoring;
pub mod seed;
pub mod session;
pub mod settings;
pub mod state;
pub mod stats;
pub mod stop;
pub mod weights;
pub mod worker;

pub use config::{RolloutConfig, RolloutConfigError};
pub use error::{PromptError, WeightError, WorkerError};
pub use sample::{GroupJob, GroupSettings, SampledGroup, sample_group};
pub use seed::group_seed;
pub use settings::{WorkerSettings, WorkerTuning};
pub use stats::WorkerStats;
pub use worker::run_worker;

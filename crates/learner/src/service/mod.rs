//! The learner role server: hosts `medrl.v1.Learner` (rollout groups in: validated, deduplicated
//! against the buffer and a durable consumed log, stale ones refused) and `medrl.v1.Weights`
//! (each version's weights out), plus gRPC health, reflection and Prometheus `/metrics`; a step
//! loop trains on each step's groups, publishes the new version, reports to the coordinator,
//! checkpoints, and writes `metrics.jsonl`.
//!
//! Entry points: [`resume_or_new`] for the trainer, then [`serve_learner`].

pub mod buffer;
pub mod cache;
pub mod consumed;
pub mod convert;
pub mod coordinator;
pub mod error;
pub mod handle;
pub mod health;
pub mod images;
pub mod metrics;
pub mod resume;
pub mod settings;
pub mod startup;
pub mod state;
pub mod step_loop;
pub mod steplog;
pub mod submit;
pub mod validate;

pub use consumed::CONSUMED_LOG;
pub use error::{ServiceError, ServiceResult};
pub use handle::{LearnerHandle, serve_learner};
pub use resume::resume_or_new;
pub use settings::{LearnerSettings, WeightDType};
pub use state::{LearnerStatus, Phase, SubmitCounts};
pub use step_loop::{FINAL_MODEL, LoopOutcome};
pub use steplog::{METRICS_JSONL, StepSummary};

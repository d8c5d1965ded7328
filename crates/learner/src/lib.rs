//! The learner's pure tensor code, independent of the model: the clipped policy loss with its
//! normalisations and KL penalty, per-token entropy, completion masks, GRPO-CARE's consistency
//! bonus with the answer-span finder and the EMA reference update, AdamW with f32 master weights
//! (plus SGD, clipping, accumulation and resumable state), and learning-rate schedules.



pub mod batch;
pub mod care;
pub mod checkpoint;
pub mod config;
pub mod entropy;
pub mod error;
pub mod loss;
pub mod mask;
pub mod optim;
pub mod policy;
pub mod schedule;
pub mod service;
mod testhook;
pub mod trainer;

pub use care::{CareConfig, CareGroup, EmaConfig, care_bonus, care_bonus_grouped};
pub use entropy::token_entropy_chunked;
pub use error::{Error, Result};
pub use loss::{
    Aggregation, KlEstimator, LossMetrics, PolicyLoss, PolicyLossConfig, PolicyLossInputs,
    policy_loss,
};
pub use optim::{AdamW, AdamWConfig, GradAccumulator, MomentDType, Optimizer, Sgd, clip_grad_norm};
pub use schedule::{LrSchedule, ScheduleConfig, ScheduleKind};

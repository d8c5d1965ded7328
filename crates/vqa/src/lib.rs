//! The medical VQA task: prompt templates, answer parsing, rewards, group advantages, Pass@K.

pub mod advantage;
pub mod datasets;
pub mod passk;
mod pytext;
pub mod record;
pub mod reward;
pub mod synthetic;
pub mod template;

pub use advantage::{
    AdvantageConfig, AdvantageError, AdvantageKind, GroupAdvantages, compute_advantages,
};
pub use passk::{PassAtKError, SampleCounts, mean_pass_at_k, pass_at_k};
pub use reward::{Gold, RewardConfig, RewardOutcome};
pub use record::{RecordError, VqaRecord, read_records, write_records};
pub use template::{Prompt, PromptTemplate};

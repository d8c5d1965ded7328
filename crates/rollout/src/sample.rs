//! Sampling one group on the model thread: preprocess the images, encode the prompt, sample K
//! completions from one prefill (the model forks its KV cache), score them, and package the
//! result as the wire `RolloutGroup`. Pure CPU/GPU work with no I/O, run under `spawn_blocking`.

use std::time::{Duration, Instant};

use bytes::Bytes;
use medrl_model::pipeline::Vlm;
use medrl_proto::v1::{Completion, LeasedPrompt, RolloutGroup};
use medrl_vqa::{PromptTemplate, RewardConfig, VqaRecord};

use crate::config::RolloutConfig;
use crate::error::PromptError;
use crate::prompt::{encode, prompt_text};
use crate::scoring::{finish_reason, pass_rate, score};
use crate::seed::group_seed;

/// The settings every group of a worker is sampled with.
#[derive(Debug, Clone)]
pub struct GroupSettings {
    /// Sampling settings.
    pub rollout: RolloutConfig,
    /// Prompt template.
    pub template: PromptTemplate,
    /// System turn override.
    pub system_prompt: Option<String>,
    /// Rule rewards.
    pub rewards: RewardConfig,
}

/// One leased prompt with everything its group needs, moved onto the sampling thread.
#[derive(Debug, Clone)]
pub struct GroupJob {
    /// Epoch of the lease.
    pub epoch: u32,
    /// Lease the prompt came in.
    pub lease_id: String,
    /// This worker's id at the coordinator.
    pub worker_id: String,
    /// The prompt as leased (id, record JSON, image refs, attempt).
    pub prompt: LeasedPrompt,
    /// The parsed record.
    pub record: VqaRecord,
    /// Verified image files, in the order of `prompt.images`.
    pub images: Vec<Bytes>,
}

/// A sampled, scored group ready for the learner.
#[derive(Debug, Clone)]
pub struct SampledGroup {
    /// The wire message.
    pub group: RolloutGroup,
    /// Fraction of correct completions, for the lease ack.
    pub pass_rate: Option<f32>,
    /// Completion tokens sampled.
    pub completion_tokens: usize,
    /// Wall time of preprocessing, prefill and decoding.
    pub elapsed: Duration,
}

/// Samples and scores the group of `job` with the weights of `policy_version`.
pub fn sample_group(vlm: &Vlm, policy_version: u64, job: GroupJob, settings: &GroupSettings) -> Result<SampledGroup, PromptError> {
    let started = Instant::now();
    let prompt_id = job.prompt.prompt_id.clone();
    let model_err = |cause| PromptError::Model { prompt_id: prompt_id.clone(), cause };
    let mut processed = Vec::with_capacity(job.images.len());
    for (bytes, image) in job.images.iter().zip(&job.prompt.images) {
        processed.push(vlm.images.process_bytes(bytes, &image.name).map_err(model_err)?);
    }
    let text = prompt_text(settings.template, settings.system_prompt.as_deref(), &job.record);
    let encoded = encode(vlm, &prompt_id, &text, processed, settings.rollout.max_prompt_tokens)?;
    let seed = group_seed(settings.rollout.seed, job.epoch, &prompt_id, job.prompt.attempt);
    let params = settings.rollout.generation_params(seed);
    let k = settings.rollout.group_size as usize;
    let span = tracing::debug_span!("generate", prompt = %prompt_id, k, prompt_tokens = encoded.ids.len());
    let sampled = span.in_scope(|| vlm.generate(std::slice::from_ref(&encoded), k, &params)).map_err(model_err)?;
    let samples = sampled.into_iter().next().unwrap_or_default();

    let eos = &vlm.model.config.eos_token_ids;
    let mut accuracies = Vec::with_capacity(samples.len());
    let mut completion_tokens = 0;
    let completions: Vec<Completion> = samples
        .into_iter()
        .map(|s| {
            let (reward, accuracy) = score(&settings.rewards, &s.text, &job.record);
            accuracies.push(accuracy);
            completion_tokens += s.completion.token_ids.len();
            let finish = finish_reason(s.completion.stopped, s.completion.token_ids.last().copied(), eos);
            Completion {
                token_ids: s.completion.token_ids,
                logprobs: s.completion.logprobs,
                text: s.text,
                reward: Some(reward),
                finish_reason: finish.to_string(),
            }
        })
        .collect();
    let group = RolloutGroup {
        group_id: medrl_proto::group_id(job.epoch, &prompt_id, job.prompt.attempt),
        prompt_id,
        epoch: job.epoch,
        lease_id: job.lease_id,
        worker_id: job.worker_id,
        policy_version,
        prompt_token_ids: encoded.ids,
        completions,
        attempt: job.prompt.attempt,
        record_json: job.prompt.record_json,
        images: job.prompt.images,
    };
    Ok(SampledGroup { group, pass_rate: pass_rate(&accuracies), completion_tokens, elapsed: started.elapsed() })
}

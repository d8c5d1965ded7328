//! Batched generation: each prompt (images + text) is prefilled once, its KV cache shared by its K
//! samples, and all samples of all prompts decode together until a stop token or the token
//! budget; a prompt leaves the batch when its last sample stops. Tokens are picked on the device
//! that holds the logits (see [`crate::sample`]).

use candle_core::{IndexOp, Tensor};
use rand::{Rng, SeedableRng, rngs::StdRng};

use crate::decoder::KvCache;
use crate::group_cache::GroupCache;
use crate::image::ProcessedImage;
use crate::model::{Qwen25Vl, Sequence};
use crate::nn::Exec;
use crate::sample::{Excluded, pick};
use crate::vision::index_tensor;
use crate::{Error, Result};

pub use crate::sample::Sampling;

/// Generation settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GenerationParams {
    pub sampling: Sampling,
    pub max_new_tokens: usize,
    /// Sample `s` of request `r` draws from its own stream seeded by (seed, r, s), so results do not
    /// depend on how requests are batched.
    pub seed: u64,
}

/// One prompt to sample from.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    pub prompt: &'a [u32],
    pub images: &'a [ProcessedImage],
    pub num_samples: usize,
}

/// One sampled completion.
#[derive(Debug, Clone, PartialEq)]
pub struct Completion {
    pub token_ids: Vec<u32>,
    /// Log-prob of each sampled token under the temperature-scaled policy, before top-k / top-p
    /// truncation (the distribution the learner recomputes); plain log-softmax when greedy.
    pub logprobs: Vec<f32>,
    /// True when a stop token ended it (the stop token is included in `token_ids`).
    pub stopped: bool,
}

struct Row {
    rng: StdRng,
    position: i64,
    out: Completion,
    /// False once the row has stopped, and from the start for the padding rows of a prompt that
    /// asks for fewer samples than the batch's K.
    decoding: bool,
}

/// The K rows of one prompt.
struct Group {
    request: usize,
    rows: Vec<Row>,
}

/// Samples `num_samples` completions for every request.
///
/// Every prompt keeps K = max(num_samples) rows in the batch until all of its rows have stopped,
/// so its prefill stays shared (see [`GroupCache`]); a stopped row's steps are computed and
/// ignored, and the prompt leaves the batch when its last row stops.
pub fn generate(model: &Qwen25Vl, requests: &[Request<'_>], params: &GenerationParams, stop_ids: &[u32], pad_id: u32) -> Result<Vec<Vec<Completion>>> {
    let limit = model.config.text.max_position_embeddings;
    let samples = requests.iter().map(|r| r.num_samples).max().unwrap_or(0);
    let mut out: Vec<Vec<Completion>> = requests.iter().map(|r| Vec::with_capacity(r.num_samples)).collect();
    if samples == 0 {
        return Ok(out);
    }
    let longest = requests.iter().map(|r| r.prompt.len()).max().unwrap_or(0);
    let mut groups = Vec::with_capacity(requests.len());
    let mut prefills = Vec::with_capacity(requests.len());
    let mut prompt_logits = Vec::with_capacity(requests.len());
    for (ri, req) in requests.iter().enumerate() {
        let batch = model.batch(&[Sequence { ids: req.prompt, images: req.images }], pad_id)?;
        let next = batch.next_position[0];
        if next as usize + params.max_new_tokens > limit {
            return Err(Error::Input(format!(
                "prompt {ri} ends at position {next}; with {} new tokens it exceeds the model's context of {limit}",
                params.max_new_tokens
            )));
        }
        let mut cache = KvCache::default();
        let hidden = model.forward_with_cache(&batch, Some(&mut cache), Exec::Infer)?;
        prompt_logits.push(model.logits(&hidden.i((0, batch.len() - 1))?.unsqueeze(0)?)?);
        prefills.push(cache.left_pad(longest)?);
        let rows = (0..samples)
            .map(|s| Row {
                rng: StdRng::seed_from_u64(mix(params.seed, ri as u64, s as u64)),
                position: next,
                out: Completion { token_ids: Vec::new(), logprobs: Vec::new(), stopped: false },
                decoding: s < req.num_samples && params.max_new_tokens > 0,
            })
            .collect();
        groups.push(Group { request: ri, rows });
    }
    let pads: Vec<usize> = requests.iter().map(|r| longest - r.prompt.len()).collect();
    let mut cache = GroupCache::new(KvCache::concat(&prefills)?, &pads, samples, params.max_new_tokens.max(1))?;
    drop(prefills);
    let excluded = Excluded::new(&model.config.placeholder_token_ids(), model.config.text.vocab_size, model.device())?;
    let mut finished: Vec<Group> = Vec::new();
    // Step 0 draws every row from its prompt's logits; later steps from the decoded rows'.
    let first_rows: Vec<usize> = (0..groups.len() * samples).map(|r| r / samples).collect();
    let mut logits = Tensor::cat(&prompt_logits, 0)?.index_select(&index_tensor(&first_rows, model.device())?, 0)?;
    drop(prompt_logits);
    for step in 0..params.max_new_tokens {
        let active: Vec<usize> = groups.iter().flat_map(|g| &g.rows).enumerate().filter(|(_, r)| r.decoding).map(|(i, _)| i).collect();
        let mut rows: Vec<&mut Row> = groups.iter_mut().flat_map(|g| g.rows.iter_mut()).filter(|r| r.decoding).collect();
        let uniforms: Vec<f64> = rows.iter_mut().map(|r| r.rng.random::<f64>()).collect();
        for (row, (token, lp)) in rows.into_iter().zip(pick(&logits, &active, &uniforms, params.sampling, &excluded)?) {
            row.out.token_ids.push(token);
            row.out.logprobs.push(lp);
            row.out.stopped = stop_ids.contains(&token);
            row.decoding = !row.out.stopped && step + 1 < params.max_new_tokens;
        }
        let keep: Vec<usize> = (0..groups.len()).filter(|&g| groups[g].rows.iter().any(|r| r.decoding)).collect();
        if keep.len() < groups.len() {
            let mut kept = Vec::with_capacity(keep.len());
            for (g, group) in groups.into_iter().enumerate() {
                if keep.binary_search(&g).is_ok() { kept.push(group) } else { finished.push(group) }
            }
            groups = kept;
            if groups.is_empty() {
                break;
            }
            cache.keep_prompts(&keep)?;
        }
        let rows = groups.iter().flat_map(|g| &g.rows);
        let ids: Vec<u32> = rows.clone().map(|r| if r.decoding { r.out.token_ids.last().copied().unwrap_or(pad_id) } else { pad_id }).collect();
        let positions: Vec<i64> = rows.map(|r| r.position + step as i64).collect();
        logits = model.decode_step(&ids, &positions, &mut cache)?;
    }
    for group in finished.into_iter().chain(groups) {
        let wanted = requests[group.request].num_samples;
        out[group.request] = group.rows.into_iter().take(wanted).map(|r| r.out).collect();
    }
    Ok(out)
}

fn mix(seed: u64, a: u64, b: u64) -> u64 {
    // splitmix64 over the three numbers: distinct, well-spread streams per (request, sample).
    let mut z = seed ^ a.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ b.wrapping_mul(0xC2B2_AE3D_27D4_EB4F);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeded_streams_are_distinct_per_request_and_sample() {
        assert_eq!(mix(1, 2, 3), mix(1, 2, 3));
        assert_ne!(mix(1, 2, 3), mix(1, 2, 4));
        assert_ne!(mix(1, 2, 3), mix(1, 3, 2));
    }
}

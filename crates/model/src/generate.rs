//! Batched generation with a KV cache: each prompt (images + text) is prefilled once, its cache
//! forked for the K samples, and all samples of all prompts decode together, left-padded, until
//! a stop token or the token budget; finished rows leave the batch.

use candle_core::IndexOp;
use rand::{Rng, SeedableRng, rngs::StdRng};

use crate::decoder::KvCache;
use crate::image::ProcessedImage;
use crate::model::{Qwen25Vl, Sequence};
use crate::nn::Exec;
use crate::vision::index_tensor;
use crate::{Error, Result};

/// How the next token is chosen.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Sampling {
    /// The most likely token.
    Greedy,
    /// Temperature, then top-k (0 = off), then top-p (1.0 = off), as transformers orders them.
    Random { temperature: f64, top_p: f64, top_k: usize },
}

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
    request: usize,
    sample: usize,
    rng: StdRng,
    position: i64,
    pad: usize,
    out: Completion,
}

/// Samples `num_samples` completions for every request.
pub fn generate(model: &Qwen25Vl, requests: &[Request<'_>], params: &GenerationParams, stop_ids: &[u32], pad_id: u32) -> Result<Vec<Vec<Completion>>> {
    let limit = model.config.text.max_position_embeddings;
    let mut rows: Vec<Row> = Vec::new();
    let mut caches = Vec::new();
    let mut first_logits = Vec::new();
    let longest = requests.iter().map(|r| r.prompt.len()).max().unwrap_or(0);
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
        let last = hidden.i((0, batch.len() - 1))?;
        let logits = model.logits(&last)?.to_vec1::<f32>()?;
        caches.push(cache.fork(req.num_samples)?.left_pad(longest)?);
        for s in 0..req.num_samples {
            rows.push(Row {
                request: ri,
                sample: s,
                rng: StdRng::seed_from_u64(mix(params.seed, ri as u64, s as u64)),
                position: next,
                pad: longest - req.prompt.len(),
                out: Completion { token_ids: Vec::new(), logprobs: Vec::new(), stopped: false },
            });
            first_logits.push(logits.clone());
        }
    }
    let mut cache = KvCache::concat(&caches)?;
    let mut finished: Vec<Row> = Vec::new();
    let mut logits = first_logits;
    let placeholders = model.config.placeholder_token_ids();
    for step in 0..params.max_new_tokens {
        let mut keep = Vec::new();
        let mut still: Vec<Row> = Vec::new();
        for (i, (mut row, lg)) in rows.into_iter().zip(logits.iter()).enumerate() {
            let (token, lp) = choose_except(lg, params.sampling, &mut row.rng, &placeholders);
            row.out.token_ids.push(token);
            row.out.logprobs.push(lp);
            if stop_ids.contains(&token) {
                row.out.stopped = true;
                finished.push(row);
            } else if step + 1 == params.max_new_tokens {
                finished.push(row);
            } else {
                keep.push(i);
                still.push(row);
            }
        }
        rows = still;
        if rows.is_empty() {
            break;
        }
        if keep.len() < logits.len() {
            cache = cache.select_rows(&index_tensor(&keep, model.device())?)?;
        }
        let ids: Vec<u32> = rows.iter().map(|r| r.out.token_ids.last().copied().unwrap_or(pad_id)).collect();
        let positions: Vec<i64> = rows.iter().map(|r| r.position + step as i64).collect();
        let pads: Vec<usize> = rows.iter().map(|r| r.pad).collect();
        let next = model.decode_step(&ids, &positions, &pads, &mut cache)?;
        logits = next.to_vec2::<f32>()?;
    }
    finished.extend(rows);
    let mut out: Vec<Vec<Completion>> = requests.iter().map(|r| Vec::with_capacity(r.num_samples)).collect();
    finished.sort_by_key(|r| (r.request, r.sample));
    for row in finished {
        out[row.request].push(row.out);
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

fn log_sum_exp(x: &[f32]) -> f32 {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = x.iter().map(|&v| ((v - max) as f64).exp()).sum();
    max + sum.ln() as f32
}

fn log_softmax(x: &[f32]) -> Vec<f32> {
    let lse = log_sum_exp(x);
    x.iter().map(|&v| v - lse).collect()
}

/// Picks the next token from one row of logits; returns it with its log-prob.
pub fn choose(logits: &[f32], sampling: Sampling, rng: &mut StdRng) -> (u32, f32) {
    choose_except(logits, sampling, rng, &[])
}

/// [`choose`] never picking a token of `excluded`. Exclusion is a truncation like top-k: the
/// log-prob stays that of the full distribution, which is what a learner recomputes.
fn choose_except(logits: &[f32], sampling: Sampling, rng: &mut StdRng, excluded: &[u32]) -> (u32, f32) {
    let allowed = |i: usize| !excluded.contains(&(i as u32));
    match sampling {
        Sampling::Greedy => {
            // First index of the maximum, as torch.argmax.
            let mut best: Option<usize> = None;
            for (i, &v) in logits.iter().enumerate() {
                if allowed(i) && best.is_none_or(|b| v > logits[b]) {
                    best = Some(i);
                }
            }
            let best = best.unwrap_or(0);
            // One log-prob is needed, not the vocabulary's: no per-token vector.
            (best as u32, logits[best] - log_sum_exp(logits))
        }
        Sampling::Random { temperature, top_p, top_k } => {
            let t = temperature.max(1e-6) as f32;
            let scaled: Vec<f32> = logits.iter().map(|&v| v / t).collect();
            let lp = log_softmax(&scaled);
            if top_k == 0 && top_p >= 1.0 {
                // Nothing is truncated: draw from the full distribution without sorting 152k logits.
                let mass = 1.0 - excluded.iter().filter_map(|&i| lp.get(i as usize)).map(|&l| (l as f64).exp()).sum::<f64>();
                return draw(lp.iter().enumerate().filter(|&(i, _)| allowed(i)).map(|(i, &l)| (i, (l as f64).exp())), mass, rng, &lp);
            }
            let mut order: Vec<usize> = (0..scaled.len()).filter(|&i| allowed(i)).collect();
            order.sort_by(|&a, &b| scaled[b].total_cmp(&scaled[a]).then(a.cmp(&b)));
            if top_k > 0 && top_k < order.len() {
                order.truncate(top_k);
            }
            let probs: Vec<f64> = order.iter().map(|&i| (lp[i] as f64).exp()).collect();
            let total: f64 = probs.iter().sum();
            let mut keep = order.len();
            if top_p < 1.0 {
                let mut cum = 0.0;
                for (n, p) in probs.iter().enumerate() {
                    cum += p / total;
                    if cum >= top_p {
                        keep = n + 1;
                        break;
                    }
                }
            }
            let mass: f64 = probs[..keep].iter().sum();
            draw(order[..keep].iter().copied().zip(probs[..keep].iter().copied()), mass, rng, &lp)
        }
    }
}

/// Inverse-CDF draw over `(token, probability)` pairs of total `mass`; returns the token and its log-prob.
fn draw(candidates: impl Iterator<Item = (usize, f64)>, mass: f64, rng: &mut StdRng, lp: &[f32]) -> (u32, f32) {
    let mut u = rng.random::<f64>() * mass;
    let mut last = 0;
    for (token, p) in candidates {
        if u < p {
            return (token as u32, lp[token]);
        }
        u -= p;
        last = token;
    }
    // Rounding left u just above the summed mass: the last candidate.
    (last as u32, lp[last])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_takes_the_first_maximum() {
        let mut rng = StdRng::seed_from_u64(0);
        let (t, lp) = choose(&[0.0, 2.0, 2.0, -1.0], Sampling::Greedy, &mut rng);
        assert_eq!(t, 1);
        assert!((lp - log_softmax(&[0.0, 2.0, 2.0, -1.0])[1]).abs() < 1e-7);
    }

    #[test]
    fn excluded_tokens_are_never_chosen_and_keep_full_log_probs() {
        let mut rng = StdRng::seed_from_u64(3);
        let logits = [0.0f32, 5.0, 1.0, 4.0];
        let full = log_softmax(&logits);
        let (t, lp) = choose_except(&logits, Sampling::Greedy, &mut rng, &[1]);
        assert_eq!((t, lp), (3, full[3]));
        for s in [Sampling::Random { temperature: 1.0, top_p: 1.0, top_k: 0 }, Sampling::Random { temperature: 0.7, top_p: 0.9, top_k: 2 }] {
            for _ in 0..200 {
                let (t, lp) = choose_except(&logits, s, &mut rng, &[1]);
                assert_ne!(t, 1);
                if let Sampling::Random { temperature: 1.0, .. } = s {
                    assert_eq!(lp, full[t as usize]);
                }
            }
        }
    }

    #[test]
    fn top_k_one_is_greedy_and_top_p_cuts_the_tail() {
        let logits = [0.1f32, 3.0, 1.0, 2.9];
        let mut rng = StdRng::seed_from_u64(7);
        for _ in 0..50 {
            let (t, _) = choose(&logits, Sampling::Random { temperature: 1.0, top_p: 1.0, top_k: 1 }, &mut rng);
            assert_eq!(t, 1);
            let (t, _) = choose(&logits, Sampling::Random { temperature: 1.0, top_p: 0.5, top_k: 0 }, &mut rng);
            assert!(t == 1 || t == 3, "top-p 0.5 keeps only the two leading tokens, got {t}");
        }
    }

    #[test]
    fn seeded_streams_are_reproducible() {
        let logits: Vec<f32> = (0..50).map(|i| (i as f32 * 0.37).sin()).collect();
        let s = Sampling::Random { temperature: 0.7, top_p: 0.9, top_k: 0 };
        let draw = |seed| {
            let mut rng = StdRng::seed_from_u64(seed);
            (0..20).map(|_| choose(&logits, s, &mut rng).0).collect::<Vec<_>>()
        };
        assert_eq!(draw(mix(1, 2, 3)), draw(mix(1, 2, 3)));
        assert_ne!(draw(mix(1, 2, 3)), draw(mix(1, 2, 4)));
    }
}

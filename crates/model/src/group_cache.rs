//! The KV cache of a decoding batch in which every prompt has K sample rows. Each prompt's
//! prefill is stored once and read by all of its rows instead of being copied K times, and the
//! sampled tokens' keys and values go into buffers sized for the whole token budget up front, so
//! a step writes one position in place instead of concatenating (copying) the cache.

use std::sync::OnceLock;

use candle_core::{D, Device, Tensor};

use crate::decoder::KvCache;
use crate::nn::{Exec, MASKED, softmax_f32};
use crate::vision::index_tensor;
use crate::{Error, Result};

/// False when `MEDRL_DECODE_ATTENTION=ops` asks for candle ops instead of the fused kernel (an
/// A/B measurement, or a fallback).
fn fused_attention_wanted() -> bool {
    static WANTED: OnceLock<bool> = OnceLock::new();
    *WANTED.get_or_init(|| std::env::var("MEDRL_DECODE_ATTENTION").map_or(true, |v| v != "ops"))
}

/// The attention a decoding step runs on `device`: `fused-cuda` (the kernel of
/// `kernels/decode_attention.cu`, for contexts that fit its shared memory) or `candle-ops`.
pub fn decode_attention_kind(device: &Device) -> &'static str {
    if cfg!(feature = "cuda") && device.is_cuda() && fused_attention_wanted() { "fused-cuda" } else { "candle-ops" }
}

/// Keys and values of `N` prompts × `K` sample rows; rows are prompt-major (`row = n·K + k`).
#[derive(Debug)]
pub struct GroupCache {
    /// Per layer, the prompts' keys and values `[N, Hkv, P, D]`, left-padded to the longest.
    prefix: Vec<(Tensor, Tensor)>,
    /// Additive mask of the prefix padding `[N, 1, 1, P]`; none when no prompt is padded.
    prefix_mask: Option<Tensor>,
    /// Left-pad positions of each prompt `[N]` (u32), for the fused CUDA kernel.
    pads: Tensor,
    /// Per layer, the sampled tokens' keys and values `[N·K, Hkv, capacity, D]`.
    suffix: Vec<(Tensor, Tensor)>,
    samples: usize,
    len: usize,
}

impl GroupCache {
    /// A cache over `prefill` (the prompts' caches concatenated along the batch, each left-padded
    /// by `pads[n]` positions) for `samples` rows per prompt and up to `capacity` decoded tokens.
    pub fn new(prefill: KvCache, pads: &[usize], samples: usize, capacity: usize) -> Result<Self> {
        let prefix = prefill.into_layers();
        let Some((k0, _)) = prefix.first() else { return Err(Error::Input("the prefill cache is empty".into())) };
        let (n, hkv, p, d) = k0.dims4()?;
        if pads.len() != n || samples == 0 || capacity == 0 {
            return Err(Error::Input(format!(
                "group cache: {n} prompts with {} pads, {samples} samples each, capacity {capacity}",
                pads.len()
            )));
        }
        let (dtype, device) = (k0.dtype(), k0.device().clone());
        let prefix_mask = if pads.iter().any(|&pad| pad > 0) {
            let m: Vec<f32> = pads.iter().flat_map(|&pad| (0..p).map(move |j| if j < pad { MASKED } else { 0.0 })).collect();
            Some(Tensor::from_vec(m, (n, 1, 1, p), &device)?.to_dtype(dtype)?)
        } else {
            None
        };
        let zeros = || Tensor::zeros((n * samples, hkv, capacity, d), dtype, &device);
        let suffix = prefix.iter().map(|_| Ok((zeros()?, zeros()?))).collect::<Result<Vec<_>>>()?;
        let pads = Tensor::from_vec(pads.iter().map(|&p| p as u32).collect::<Vec<_>>(), n, &device)?;
        Ok(GroupCache { prefix, prefix_mask, pads, suffix, samples, len: 0 })
    }

    /// Prompts still in the batch.
    pub fn prompts(&self) -> usize {
        self.prefix.first().map_or(0, |(k, _)| k.dim(0).unwrap_or(0))
    }

    /// Keeps only the listed prompts (indices into the current batch) and their rows, in order.
    pub fn keep_prompts(&mut self, keep: &[usize]) -> Result<()> {
        let device = match self.prefix.first() {
            Some((k, _)) => k.device().clone(),
            None => return Ok(()),
        };
        let prompts = index_tensor(keep, &device)?;
        let rows: Vec<usize> = keep.iter().flat_map(|&n| n * self.samples..(n + 1) * self.samples).collect();
        let rows = index_tensor(&rows, &device)?;
        for (k, v) in &mut self.prefix {
            *k = k.index_select(&prompts, 0)?;
            *v = v.index_select(&prompts, 0)?;
        }
        if let Some(m) = &mut self.prefix_mask {
            *m = m.index_select(&prompts, 0)?;
        }
        self.pads = self.pads.index_select(&prompts, 0)?;
        for (k, v) in &mut self.suffix {
            *k = k.index_select(&rows, 0)?;
            *v = v.index_select(&rows, 0)?;
        }
        Ok(())
    }

    /// Attention of one new token per row at `layer`: stores its key and value `[N·K, Hkv, 1, D]`,
    /// then attends `q` `[N·K, H, 1, D]` over the row's prompt and its tokens so far.
    pub(crate) fn attend(&self, layer: usize, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
        let (rows, heads, _, d) = q.dims4()?;
        let (pk, pv) = &self.prefix[layer];
        let (sk, sv) = &self.suffix[layer];
        let (n, hkv, p, _) = pk.dims4()?;
        let (samples, group, capacity) = (self.samples, heads / hkv, sk.dim(2)?);
        if rows != n * samples || self.len >= capacity {
            return Err(Error::Input(format!("decode step: {rows} rows for {n} prompts × {samples} samples at token {} of {capacity}", self.len)));
        }
        sk.slice_set(&k.contiguous()?, 2, self.len)?;
        sv.slice_set(&v.contiguous()?, 2, self.len)?;
        let s = self.len + 1;
        #[cfg(feature = "cuda")]
        if fused_attention_wanted()
            && let Some(out) = crate::cuda_attention::decode_attention(q, (pk, pv), (sk, sv), &self.pads, samples, s)?
        {
            return Ok(out);
        }
        let (sk, sv) = (sk.narrow(2, 0, s)?, sv.narrow(2, 0, s)?);
        let q = (q * (1.0 / (d as f64).sqrt()))?;
        // The rows of one prompt, grouped per KV head, read the prompt's keys once.
        let by_prompt = |t: &Tensor, last: usize| -> Result<Tensor> {
            Ok(t.reshape((n, samples, hkv, group, last))?.transpose(1, 2)?.contiguous()?.reshape((n, hkv, samples * group, last))?)
        };
        let by_row = |t: &Tensor, last: usize| -> Result<Tensor> {
            Ok(t.reshape((n, hkv, samples, group, last))?.transpose(1, 2)?.contiguous()?.reshape((rows, hkv, group, last))?)
        };
        let prompt_scores = by_prompt(&q, d)?.matmul(&pk.t()?)?;
        let prompt_scores = match &self.prefix_mask {
            Some(m) => prompt_scores.broadcast_add(m)?,
            None => prompt_scores,
        };
        let own_scores = q.contiguous()?.reshape((rows, hkv, group, d))?.matmul(&sk.t()?)?;
        let scores = Tensor::cat(&[&by_row(&prompt_scores, p)?, &own_scores], D::Minus1)?;
        let probs = softmax_f32(&scores, v.dtype(), Exec::Infer)?;
        let from_prompt = by_prompt(&probs.narrow(D::Minus1, 0, p)?.contiguous()?, p)?.matmul(pv)?;
        let from_own = probs.narrow(D::Minus1, p, s)?.contiguous()?.matmul(&sv)?;
        Ok((by_row(&from_prompt, d)? + from_own)?.reshape((rows, heads, 1, d))?)
    }

    /// Marks the step's token as stored in every layer.
    pub(crate) fn advance(&mut self) {
        self.len += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::attention;
    use candle_core::{Device, IndexOp};

    /// Plain attention of row `r` over its prompt (unpadded) and its own tokens, materialised.
    fn reference(q: &Tensor, prompt: &(Tensor, Tensor), pad: usize, own: &[(Tensor, Tensor)], r: usize) -> Result<Tensor> {
        let p = prompt.0.dim(2)?;
        let keys: Vec<Tensor> = std::iter::once(prompt.0.narrow(2, pad, p - pad)).chain(own.iter().map(|(k, _)| k.narrow(0, r, 1))).collect::<candle_core::Result<_>>()?;
        let values: Vec<Tensor> = std::iter::once(prompt.1.narrow(2, pad, p - pad)).chain(own.iter().map(|(_, v)| v.narrow(0, r, 1))).collect::<candle_core::Result<_>>()?;
        attention(&q.narrow(0, r, 1)?, &Tensor::cat(&keys, 2)?, &Tensor::cat(&values, 2)?, None, Exec::Train)
    }

    #[test]
    fn shared_prompt_attention_equals_attention_over_each_rows_own_copy() -> Result<()> {
        let dev = Device::Cpu;
        let (n, samples, heads, hkv, d, p) = (3, 2, 4, 2, 8, 5);
        let pads = [2usize, 0, 1];
        let prompts: Vec<(Tensor, Tensor)> = (0..n).map(|_| Ok((Tensor::randn(0f32, 1., (1, hkv, p, d), &dev)?, Tensor::randn(0f32, 1., (1, hkv, p, d), &dev)?))).collect::<Result<_>>()?;
        let mut prefill = Vec::new();
        for l in 0..2 {
            let keys = prompts.iter().map(|kv| &kv.0 * (l + 1) as f64).collect::<candle_core::Result<Vec<_>>>()?;
            let values: Vec<&Tensor> = prompts.iter().map(|kv| &kv.1).collect();
            prefill.push((Tensor::cat(&keys, 0)?, Tensor::cat(&values, 0)?));
        }
        let mut cache = GroupCache::new(KvCache::from_layers(prefill.clone()), &pads, samples, 4)?;
        let rows = n * samples;
        let mut own: Vec<Vec<(Tensor, Tensor)>> = vec![Vec::new(), Vec::new()];
        for step in 0..3 {
            for layer in 0..2 {
                let q = Tensor::randn(0f32, 1., (rows, heads, 1, d), &dev)?;
                let kv = (Tensor::randn(0f32, 1., (rows, hkv, 1, d), &dev)?, Tensor::randn(0f32, 1., (rows, hkv, 1, d), &dev)?);
                own[layer].push(kv.clone());
                let got = cache.attend(layer, &q, &kv.0, &kv.1)?;
                for r in 0..rows {
                    let prompt = (prefill[layer].0.narrow(0, r / samples, 1)?, prefill[layer].1.narrow(0, r / samples, 1)?);
                    let want = reference(&q, &prompt, pads[r / samples], &own[layer], r)?;
                    let diff = (got.i(r)? - want.squeeze(0)?)?.abs()?.max_all()?.to_scalar::<f32>()?;
                    assert!(diff < 1e-5, "step {step} layer {layer} row {r}: {diff}");
                }
            }
            cache.advance();
        }
        // Dropping prompt 0 keeps prompts 1 and 2 with their rows' tokens so far.
        cache.keep_prompts(&[1, 2])?;
        assert_eq!(cache.prompts(), 2);
        let q = Tensor::randn(0f32, 1., (4, heads, 1, d), &dev)?;
        let kv = (Tensor::randn(0f32, 1., (4, hkv, 1, d), &dev)?, Tensor::randn(0f32, 1., (4, hkv, 1, d), &dev)?);
        let got = cache.attend(0, &q, &kv.0, &kv.1)?;
        let kept: Vec<(Tensor, Tensor)> = own[0].iter().map(|(k, v)| Ok((k.narrow(0, samples, 4)?, v.narrow(0, samples, 4)?))).chain(std::iter::once(Ok(kv.clone()))).collect::<Result<_>>()?;
        for r in 0..4 {
            let prompt = (prefill[0].0.narrow(0, 1 + r / samples, 1)?, prefill[0].1.narrow(0, 1 + r / samples, 1)?);
            let want = reference(&q, &prompt, pads[1 + r / samples], &kept, r)?;
            let diff = (got.i(r)? - want.squeeze(0)?)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(diff < 1e-5, "after dropping prompt 0, row {r}: {diff}");
        }
        cache.advance();
        assert!(cache.attend(0, &q, &kv.0, &kv.1).is_err(), "the token budget of 4 is used up");
        Ok(())
    }
}

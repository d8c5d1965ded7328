//! The whole Qwen2.5-VL: vision tower + decoder, batching with left padding, image-feature
//! scatter, the forward pass and per-token log-probs of completions.

use std::path::Path;

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};

use crate::config::Config;
use crate::decoder::{KvCache, Step, TextModel};
use crate::group_cache::GroupCache;
use crate::image::ProcessedImage;
use crate::logprobs::token_logprobs;
use crate::nn::{Exec, MASKED};
use crate::rope::{Grid, Rotary, rope_index};
use crate::vision::{VisionTower, index_tensor};
use crate::weights::Weights;
use crate::{Error, Result};

/// Vocabulary rows per chunk of the log-softmax, bounding memory at large vocabularies.
pub const LOGPROB_VOCAB_CHUNK: usize = 16_384;

/// One token sequence and the images its image-pad runs stand for, in order.
#[derive(Debug, Clone, Copy)]
pub struct Sequence<'a> {
    pub ids: &'a [u32],
    pub images: &'a [ProcessedImage],
}

/// A left-padded batch ready for the decoder.
pub struct Batch {
    /// Token ids `[B, T]`.
    pub ids: Tensor,
    /// Number of left-pad positions per row.
    pub pad: Vec<usize>,
    /// Position ids per row and token: `[t, h, w]`.
    pub positions: Vec<Vec<[i64; 3]>>,
    /// Next decoding position per row (max position + 1).
    pub next_position: Vec<i64>,
    /// All images' patches `[N, patch_dim]` and grids, rows in order.
    pub pixel_values: Option<Tensor>,
    pub grids: Vec<Grid>,
}

impl Batch {
    /// Padded length T.
    pub fn len(&self) -> usize {
        self.positions.first().map_or(0, |p| p.len())
    }

    /// True for an empty batch.
    pub fn is_empty(&self) -> bool {
        self.positions.is_empty()
    }
}

/// Qwen2.5-VL for conditional generation.
pub struct Qwen25Vl {
    pub config: Config,
    pub vision: VisionTower,
    pub text: TextModel,
    dtype: DType,
    device: Device,
}

impl Qwen25Vl {
    /// Builds the model from weights with legacy names.
    pub fn new(config: Config, weights: &Weights, dtype: DType, device: &Device) -> Result<Self> {
        let vision = VisionTower::new(&config.vision, weights)?;
        let text = TextModel::new(&config.text, config.tie_word_embeddings, weights)?;
        Ok(Qwen25Vl { config, vision, text, dtype, device: device.clone() })
    }

    /// Loads `config.json` and the safetensors of `model_dir`.
    pub fn load(model_dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        let config = Config::load(model_dir)?;
        let weights = Weights::load(model_dir, &config, dtype, device)?;
        Self::new(config, &weights, dtype, device)
    }

    /// Compute dtype.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Device the weights live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Left-pads sequences into one batch and computes their 3-axis position ids.
    pub fn batch(&self, seqs: &[Sequence<'_>], pad_id: u32) -> Result<Batch> {
        let t = seqs.iter().map(|s| s.ids.len()).max().unwrap_or(0);
        let merge = self.config.vision.spatial_merge_size;
        let mut ids = Vec::with_capacity(seqs.len() * t);
        let mut pad = Vec::new();
        let mut positions = Vec::new();
        let mut next_position = Vec::new();
        let mut grids = Vec::new();
        let mut pixels: Vec<Tensor> = Vec::new();
        for (row, s) in seqs.iter().enumerate() {
            if s.ids.is_empty() {
                return Err(Error::Input(format!("sequence {row} has no tokens")));
            }
            let limit = self.config.text.max_position_embeddings;
            let row_grids: Vec<Grid> = s.images.iter().map(|im| im.grid_thw).collect();
            let (pos, _) = rope_index(s.ids, &row_grids, self.config.image_token_id, merge)?;
            let next = pos.iter().flat_map(|p| p.iter().copied()).max().unwrap_or(-1) + 1;
            if next as usize > limit {
                return Err(Error::Input(format!("sequence {row} reaches position {next}, beyond the model's context of {limit}")));
            }
            let p = t - s.ids.len();
            ids.extend(std::iter::repeat_n(pad_id, p));
            ids.extend_from_slice(s.ids);
            // transformers gives padding position 1 on every axis; it is masked anyway.
            let mut row_pos = vec![[1i64; 3]; p];
            row_pos.extend(pos);
            positions.push(row_pos);
            pad.push(p);
            next_position.push(next);
            for im in s.images {
                let rows = im.num_patches();
                let dim = self.config.vision.patch_dim();
                if im.pixel_values.len() != rows * dim {
                    return Err(Error::Input(format!("image of grid {:?} has {} values, expected {}", im.grid_thw, im.pixel_values.len(), rows * dim)));
                }
                pixels.push(Tensor::from_slice(&im.pixel_values, (rows, dim), &self.device)?);
                grids.push(im.grid_thw);
            }
        }
        let pixel_values = if pixels.is_empty() { None } else { Some(Tensor::cat(&pixels, 0)?) };
        Ok(Batch { ids: Tensor::from_vec(ids, (seqs.len(), t), &self.device)?, pad, positions, next_position, pixel_values, grids })
    }

    /// Input embeddings `[B, T, H]` with image-pad rows replaced by the vision features.
    pub fn embed(&self, batch: &Batch, exec: Exec) -> Result<Tensor> {
        let text = self.text.embed(&batch.ids)?.to_dtype(self.dtype)?;
        let Some(pixels) = &batch.pixel_values else { return Ok(text) };
        let features = self.vision.forward(pixels, &batch.grids, self.dtype, exec)?;
        let (b, t, h) = text.dims3()?;
        let ids = batch.ids.flatten_all()?.to_vec1::<u32>()?;
        // Gather from [text rows ; image rows]: differentiable, unlike an in-place scatter.
        let mut next_image = 0usize;
        let mut source = Vec::with_capacity(ids.len());
        for (i, &id) in ids.iter().enumerate() {
            if id == self.config.image_token_id {
                source.push(b * t + next_image);
                next_image += 1;
            } else {
                source.push(i);
            }
        }
        let n = features.dim(0)?;
        if next_image != n {
            return Err(Error::Input(format!("the batch has {next_image} image tokens but its images give {n} features")));
        }
        let all = Tensor::cat(&[&text.reshape((b * t, h))?, &features.to_dtype(self.dtype)?], 0)?;
        Ok(all.index_select(&index_tensor(&source, &self.device)?, 0)?.reshape((b, t, h))?)
    }

    /// Additive causal + padding mask `[B, 1, Tq, Tk]` for queries at the end of `tk` keys,
    /// or none when no position needs masking.
    pub fn mask(&self, pad: &[usize], tq: usize, tk: usize) -> Result<Option<Tensor>> {
        if tq == 1 && pad.iter().all(|&p| p == 0) {
            return Ok(None);
        }
        let mut m = Vec::with_capacity(pad.len() * tq * tk);
        for &p in pad {
            for i in 0..tq {
                let q_abs = tk - tq + i;
                for j in 0..tk {
                    m.push(if j > q_abs || j < p { MASKED } else { 0.0 });
                }
            }
        }
        Ok(Some(Tensor::from_vec(m, (pad.len(), 1, tq, tk), &self.device)?))
    }

    /// Final-normed hidden states `[B, T, H]` of a whole batch (no cache).
    pub fn hidden(&self, batch: &Batch, exec: Exec) -> Result<Tensor> {
        self.forward_with_cache(batch, None, exec)
    }

    /// Like [`Self::hidden`], filling `cache` for generation.
    pub fn forward_with_cache(&self, batch: &Batch, cache: Option<&mut KvCache>, exec: Exec) -> Result<Tensor> {
        let x = self.embed(batch, exec)?;
        let (rotary, mask) = self.decoder_inputs(batch, exec)?;
        let step = Step { rotary: &rotary, mask: mask.as_ref() };
        self.text.forward(&x, &step, cache, exec)
    }

    /// Rotary tables and mask of a whole-sequence pass.
    fn decoder_inputs(&self, batch: &Batch, exec: Exec) -> Result<(Rotary, Option<Tensor>)> {
        let t = batch.len();
        let rotary = Rotary::new(&batch.positions, &self.config.text, self.dtype, &self.device, exec)?;
        Ok((rotary, self.mask(&batch.pad, t, t)?))
    }

    /// Every linear layer (vision tower, merger, decoder) with its HF module name; an error after
    /// [`Self::fuse_projections`].
    pub fn linears_mut(&mut self) -> Result<Vec<(String, &mut crate::nn::Linear)>> {
        let mut out = self.vision.linears_mut();
        out.extend(self.text.linears_mut()?);
        Ok(out)
    }

    /// Fuses the decoder's q/k/v and gate/up projections for inference-only use; see
    /// [`TextModel::fuse_projections`] (refuses LoRA-adapted or trainable projections).
    pub fn fuse_projections(&mut self) -> Result<()> {
        self.text.fuse_projections()
    }

    /// Gradient of `loss_of(log-probs of spans)` for every variable, recomputing each decoder
    /// layer during the backward pass so that only the layers' inputs stay alive (gradient
    /// checkpointing). Returns the detached log-probs, the loss value and the gradients.
    pub fn checkpointed_backward(
        &self,
        batch: &Batch,
        spans: &[std::ops::Range<usize>],
        loss_of: &mut dyn FnMut(&Tensor) -> Result<Tensor>,
    ) -> Result<(Tensor, f64, GradStore)> {
        let embeds = self.embed(batch, Exec::Train)?;
        let (rotary, mask) = self.decoder_inputs(batch, Exec::Train)?;
        let step = Step { rotary: &rotary, mask: mask.as_ref() };
        let mut inputs = vec![embeds.detach()];
        for i in 0..self.text.num_layers() {
            let y = self.text.layer(i, &inputs[i], &step, Exec::Train)?.detach();
            inputs.push(y);
        }
        let top = Var::from_tensor(&inputs[self.text.num_layers()])?;
        let hidden = self.text.final_norm(top.as_tensor(), Exec::Train)?;
        let lp = self.gather_logprobs(&hidden, batch, spans)?;
        let loss = loss_of(&lp)?;
        let loss_value = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        let mut grads = loss.backward()?;
        let mut upstream = grads.remove(top.as_tensor()).ok_or_else(|| Error::Input("the loss does not depend on the model".into()))?;
        for i in (0..self.text.num_layers()).rev() {
            let x = Var::from_tensor(&inputs[i])?;
            let y = self.text.layer(i, x.as_tensor(), &step, Exec::Train)?;
            // Vector-Jacobian product: d<y, upstream>/d(x, params).
            let mut layer_grads = (y * upstream.detach())?.sum_all()?.backward()?;
            upstream = layer_grads.remove(x.as_tensor()).ok_or_else(|| Error::Input(format!("layer {i} does not depend on its input")))?;
            grads.extend(layer_grads)?;
        }
        grads.extend((embeds * upstream.detach())?.sum_all()?.backward()?)?;
        Ok((lp.detach(), loss_value, grads))
    }

    /// Log-probs of the span tokens from final hidden states `[B, T, H]`.
    fn gather_logprobs(&self, hidden: &Tensor, batch: &Batch, spans: &[std::ops::Range<usize>]) -> Result<Tensor> {
        let (b, t, h) = hidden.dims3()?;
        let ids = batch.ids.to_vec2::<u32>()?;
        let mut rows = Vec::new();
        let mut targets = Vec::new();
        for (r, span) in spans.iter().enumerate() {
            let p = batch.pad[r];
            for pos in span.clone() {
                if pos == 0 || p + pos >= t {
                    return Err(Error::Input(format!("row {r}: token {pos} cannot be scored (needs a previous token inside the sequence)")));
                }
                rows.push(r * t + p + pos - 1);
                targets.push(ids[r][p + pos]);
            }
        }
        let selected = hidden.reshape((b * t, h))?.index_select(&index_tensor(&rows, &self.device)?, 0)?;
        let targets = Tensor::from_vec(targets, rows.len(), &self.device)?;
        token_logprobs(&selected, &self.text.lm_head, &targets, LOGPROB_VOCAB_CHUNK)
    }

    /// One decoding step of the rows of `cache`: `ids` `[N·K]` at `positions` (per row).
    /// Returns logits `[N·K, V]` in f32.
    pub fn decode_step(&self, ids: &[u32], positions: &[i64], cache: &mut GroupCache) -> Result<Tensor> {
        let b = ids.len();
        let x = self.text.embed(&Tensor::from_slice(ids, (b, 1), &self.device)?)?.to_dtype(self.dtype)?;
        let pos: Vec<Vec<[i64; 3]>> = positions.iter().map(|&p| vec![[p; 3]]).collect();
        let rotary = Rotary::new(&pos, &self.config.text, self.dtype, &self.device, Exec::Infer)?;
        let step = Step { rotary: &rotary, mask: None };
        let h = self.text.decode(&x, &step, cache)?;
        self.logits(&h.squeeze(1)?)
    }

    /// Logits in f32 for hidden states of any leading shape.
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        let head = crate::nn::Linear::new(self.text.lm_head.clone(), None);
        Ok(head.forward(hidden)?.to_dtype(DType::F32)?)
    }

    /// Log-prob of each token `ids[row][p]` for `p` in `spans[row]` (unpadded positions) given
    /// everything before it: one tensor `[n_tokens]` over all rows in order, vocabulary chunked.
    pub fn span_logprobs(&self, batch: &Batch, spans: &[std::ops::Range<usize>], exec: Exec) -> Result<Tensor> {
        let hidden = self.hidden(batch, exec)?;
        self.gather_logprobs(&hidden, batch, spans)
    }
}

//! The vision tower: patch embedding, 2-D rotary ViT blocks with window and full attention, and
//! the 2x2 patch merger into language-model tokens.

use candle_core::{DType, Device, Tensor};

use crate::config::VisionConfig;
use crate::nn::{Exec, Linear, apply_rotary, attention, rms_norm};
use crate::rope::{Grid, frame_cu_seqlens, vision_cos_sin, window_index};
use crate::weights::Weights;
use crate::{Error, Result};

const VISION_EPS: f64 = 1e-6;

struct Block {
    norm1: Tensor,
    norm2: Tensor,
    qkv: Linear,
    proj: Linear,
    gate: Linear,
    up: Linear,
    down: Linear,
    full_attention: bool,
}

/// Qwen2.5-VL's vision transformer with its merger.
pub struct VisionTower {
    config: VisionConfig,
    patch_embed: Linear,
    blocks: Vec<Block>,
    ln_q: Tensor,
    fc1: Linear,
    fc2: Linear,
}

fn linear(w: &Weights, prefix: &str, bias: bool) -> Result<Linear> {
    let weight = w.get(&format!("{prefix}.weight"))?.clone();
    let bias = if bias { Some(w.get(&format!("{prefix}.bias"))?.clone()) } else { None };
    Ok(Linear::new(weight, bias))
}

impl VisionTower {
    /// Builds the tower from `visual.*` weights.
    pub fn new(config: &VisionConfig, w: &Weights) -> Result<Self> {
        // Conv3d with kernel = stride over rows already flattened in (C, T, ph, pw) order is a matmul.
        let conv = w.get("visual.patch_embed.proj.weight")?;
        let patch_embed = Linear::new(conv.reshape((config.hidden_size, config.patch_dim()))?, None);
        let blocks = (0..config.depth)
            .map(|i| {
                let p = format!("visual.blocks.{i}");
                Ok(Block {
                    norm1: w.get(&format!("{p}.norm1.weight"))?.clone(),
                    norm2: w.get(&format!("{p}.norm2.weight"))?.clone(),
                    qkv: linear(w, &format!("{p}.attn.qkv"), true)?,
                    proj: linear(w, &format!("{p}.attn.proj"), true)?,
                    gate: linear(w, &format!("{p}.mlp.gate_proj"), true)?,
                    up: linear(w, &format!("{p}.mlp.up_proj"), true)?,
                    down: linear(w, &format!("{p}.mlp.down_proj"), true)?,
                    full_attention: config.fullatt_block_indexes.contains(&i),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(VisionTower {
            config: config.clone(),
            patch_embed,
            blocks,
            ln_q: w.get("visual.merger.ln_q.weight")?.clone(),
            fc1: linear(w, "visual.merger.mlp.0", true)?,
            fc2: linear(w, "visual.merger.mlp.2", true)?,
        })
    }

    /// Every linear layer of the blocks and merger with its HF module name.
    pub fn linears_mut(&mut self) -> Vec<(String, &mut Linear)> {
        let mut out = Vec::new();
        for (i, b) in self.blocks.iter_mut().enumerate() {
            let p = format!("visual.blocks.{i}");
            out.push((format!("{p}.attn.qkv"), &mut b.qkv));
            out.push((format!("{p}.attn.proj"), &mut b.proj));
            out.push((format!("{p}.mlp.gate_proj"), &mut b.gate));
            out.push((format!("{p}.mlp.up_proj"), &mut b.up));
            out.push((format!("{p}.mlp.down_proj"), &mut b.down));
        }
        out.push(("visual.merger.mlp.0".into(), &mut self.fc1));
        out.push(("visual.merger.mlp.2".into(), &mut self.fc2));
        out
    }

    /// Encodes the patches of one or more images, `pixel_values` `[N, patch_dim]`, into merged
    /// tokens `[N / 4, out_hidden]` in raster order of each image's merged grid.
    pub fn forward(&self, pixel_values: &Tensor, grids: &[Grid], dtype: DType, exec: Exec) -> Result<Tensor> {
        let c = &self.config;
        let n: usize = grids.iter().map(|g| g.iter().product::<usize>()).sum();
        let (rows, dim) = pixel_values.dims2()?;
        if rows != n || dim != c.patch_dim() {
            return Err(Error::Input(format!("pixel_values is [{rows}, {dim}], the grids need [{n}, {}]", c.patch_dim())));
        }
        let unit = c.merge_unit();
        let device = pixel_values.device();
        let window = window_index(grids, c.spatial_merge_size, c.merged_window_side());
        let order = index_tensor(&window.index, device)?;
        let x = self.patch_embed.forward(&pixel_values.to_dtype(dtype)?)?;
        let hidden = c.hidden_size;
        let mut x = x.reshape((n / unit, unit * hidden))?.index_select(&order, 0)?.reshape((n, hidden))?;
        let (cos, sin) = vision_cos_sin(grids, c.spatial_merge_size, c.head_dim(), c.rope_theta, &window, device)?;
        let (cos, sin) = (cos.unsqueeze(1)?, sin.unsqueeze(1)?);
        let full = frame_cu_seqlens(grids);
        for block in &self.blocks {
            let cu = if block.full_attention { &full } else { &window.cu_seqlens };
            x = self.block_forward(block, &x, cu, &cos, &sin, exec)?;
        }
        let merged = rms_norm(&x, &self.ln_q, VISION_EPS, exec)?.reshape((n / unit, unit * hidden))?;
        let y = self.fc2.forward(&self.fc1.forward(&merged)?.gelu_erf()?)?;
        let mut inverse = vec![0usize; window.index.len()];
        for (slot, &token) in window.index.iter().enumerate() {
            inverse[token] = slot;
        }
        Ok(y.index_select(&index_tensor(&inverse, device)?, 0)?)
    }

    fn block_forward(&self, b: &Block, x: &Tensor, cu: &[usize], cos: &Tensor, sin: &Tensor, exec: Exec) -> Result<Tensor> {
        let c = &self.config;
        let (n, hidden) = x.dims2()?;
        let (heads, hd) = (c.num_heads, c.head_dim());
        let qkv = b.qkv.forward(&rms_norm(x, &b.norm1, VISION_EPS, exec)?)?.reshape((n, 3, heads, hd))?;
        let dtype = x.dtype();
        // Rotary in f32 and back, as transformers' apply_rotary_pos_emb_vision.
        let rot = |t: Tensor| -> Result<Tensor> { Ok(apply_rotary(&t.to_dtype(DType::F32)?, cos, sin)?.to_dtype(dtype)?) };
        let q = rot(qkv.narrow(1, 0, 1)?.squeeze(1)?)?;
        let k = rot(qkv.narrow(1, 1, 1)?.squeeze(1)?)?;
        let v = qkv.narrow(1, 2, 1)?.squeeze(1)?;
        let mut outs = Vec::new();
        for (start, len, count) in equal_length_runs(cu) {
            // `count` consecutive segments of `len` patches attend within themselves: one batched call.
            let seg = |t: &Tensor| -> Result<Tensor> { Ok(t.narrow(0, start, len * count)?.reshape((count, len, heads, hd))?.transpose(1, 2)?) };
            let o = attention(&seg(&q)?, &seg(&k)?, &seg(&v)?, None, exec)?;
            outs.push(o.transpose(1, 2)?.reshape((len * count, hidden))?);
        }
        let attn = b.proj.forward(&Tensor::cat(&outs, 0)?)?;
        let x = (x + attn)?;
        let h = rms_norm(&x, &b.norm2, VISION_EPS, exec)?;
        let mlp = b.down.forward(&(b.gate.forward(&h)?.silu()? * b.up.forward(&h)?)?)?;
        Ok((x + mlp)?)
    }
}

/// Splits cumulative segment bounds into runs of consecutive equal-length segments:
/// (first row, segment length, number of segments).
fn equal_length_runs(cu: &[usize]) -> Vec<(usize, usize, usize)> {
    let mut runs: Vec<(usize, usize, usize)> = Vec::new();
    for pair in cu.windows(2) {
        let len = pair[1] - pair[0];
        if len == 0 {
            continue;
        }
        match runs.last_mut() {
            Some((_, l, count)) if *l == len => *count += 1,
            _ => runs.push((pair[0], len, 1)),
        }
    }
    runs
}

/// A u32 index tensor.
pub fn index_tensor(values: &[usize], device: &Device) -> Result<Tensor> {
    let v: Vec<u32> = values.iter().map(|&x| x as u32).collect();
    Ok(Tensor::from_vec(v, values.len(), device)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_group_consecutive_equal_segments() {
        assert_eq!(equal_length_runs(&[0, 16, 32, 40, 56, 72]), vec![(0, 16, 2), (32, 8, 1), (40, 16, 2)]);
        assert_eq!(equal_length_runs(&[0]), vec![]);
    }
}

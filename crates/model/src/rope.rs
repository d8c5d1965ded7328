//! Positions: the vision tower's 2-D rotary angles and window permutation, and the decoder's
//! 3-axis M-RoPE position ids (`get_rope_index`) and cos/sin tables, computed on the host, and
//! the decoder's rotation with them.

use candle_core::{D, DType, Device, Tensor};

use crate::config::TextConfig;
use crate::nn::{Exec, apply_rotary};
use crate::{Error, Result};

/// Image grid in patches: (t, h, w).
pub type Grid = [usize; 3];

/// Inverse frequencies `1 / theta^(2i / dim)` for i < dim / 2, in f32 like transformers.
pub fn inv_freq(dim: usize, theta: f64) -> Vec<f32> {
    (0..dim / 2).map(|i| 1.0f32 / (theta as f32).powf((2 * i) as f32 / dim as f32)).collect()
}

/// (h, w) of every patch, in the block-major order of the processor's rows.
fn patch_positions(grids: &[Grid], merge: usize) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    for &[t, h, w] in grids {
        for _ in 0..t {
            for bh in 0..h / merge {
                for bw in 0..w / merge {
                    for ih in 0..merge {
                        for iw in 0..merge {
                            out.push((bh * merge + ih, bw * merge + iw));
                        }
                    }
                }
            }
        }
    }
    out
}

/// The window permutation of merged tokens and the cumulative window lengths in patches.
#[derive(Debug, Clone, PartialEq)]
pub struct WindowIndex {
    /// Merged-token index (raster order) at each window-ordered slot.
    pub index: Vec<usize>,
    /// Cumulative patch counts at window boundaries, starting at 0, without repeats.
    pub cu_seqlens: Vec<usize>,
}

/// Groups merged tokens into windows of `side x side` (transformers' `get_window_index`).
pub fn window_index(grids: &[Grid], merge: usize, side: usize) -> WindowIndex {
    let unit = merge * merge;
    let mut index = Vec::new();
    let mut cu = vec![0usize];
    let mut offset = 0;
    for &[t, h, w] in grids {
        let (lh, lw) = (h / merge, w / merge);
        let (nh, nw) = (lh.div_ceil(side), lw.div_ceil(side));
        for ti in 0..t {
            for wh in 0..nh {
                for ww in 0..nw {
                    let mut count = 0;
                    for r in wh * side..((wh + 1) * side).min(lh) {
                        for c in ww * side..((ww + 1) * side).min(lw) {
                            index.push(offset + ti * lh * lw + r * lw + c);
                            count += 1;
                        }
                    }
                    if count > 0 {
                        let last = cu.last().copied().unwrap_or(0);
                        cu.push(last + count * unit);
                    }
                }
            }
        }
        offset += t * lh * lw;
    }
    WindowIndex { index, cu_seqlens: cu }
}

/// Cumulative patch counts per frame, for the full-attention blocks.
pub fn frame_cu_seqlens(grids: &[Grid]) -> Vec<usize> {
    let mut cu = vec![0usize];
    for &[t, h, w] in grids {
        for _ in 0..t {
            let last = cu.last().copied().unwrap_or(0);
            cu.push(last + h * w);
        }
    }
    cu
}

/// Vision rotary cos and sin `[N, head_dim]`, rows already in window order.
pub fn vision_cos_sin(grids: &[Grid], merge: usize, head_dim: usize, theta: f64, window: &WindowIndex, device: &Device) -> Result<(Tensor, Tensor)> {
    let freqs = inv_freq(head_dim / 2, theta);
    let nf = freqs.len();
    let positions = patch_positions(grids, merge);
    let unit = merge * merge;
    let mut cos = Vec::with_capacity(positions.len() * head_dim);
    let mut sin = Vec::with_capacity(positions.len() * head_dim);
    for &merged in &window.index {
        for p in 0..unit {
            let (h, w) = positions[merged * unit + p];
            let mut angles = Vec::with_capacity(2 * nf);
            angles.extend(freqs.iter().map(|f| h as f32 * f));
            angles.extend(freqs.iter().map(|f| w as f32 * f));
            for _ in 0..2 {
                cos.extend(angles.iter().map(|a| a.cos()));
                sin.extend(angles.iter().map(|a| a.sin()));
            }
        }
    }
    let n = positions.len();
    Ok((Tensor::from_vec(cos, (n, head_dim), device)?, Tensor::from_vec(sin, (n, head_dim), device)?))
}

/// 3-axis position ids of one unpadded sequence, `[t, h, w]` per token, and the rope delta
/// (`max + 1 - len`) that continues them while decoding.
pub fn rope_index(ids: &[u32], grids: &[Grid], image_token_id: u32, merge: usize) -> Result<(Vec<[i64; 3]>, i64)> {
    let mut pos: Vec<[i64; 3]> = Vec::with_capacity(ids.len());
    let mut next: i64 = 0;
    let mut st = 0usize;
    for (n, &[t, h, w]) in grids.iter().enumerate() {
        let Some(ed) = ids[st..].iter().position(|&id| id == image_token_id).map(|p| p + st) else {
            return Err(Error::Input(format!("{} images given but only {n} image placeholder runs in the prompt", grids.len())));
        };
        for _ in st..ed {
            pos.push([next; 3]);
            next += 1;
        }
        let (lt, lh, lw) = (t, h / merge, w / merge);
        let count = lt * lh * lw;
        if ed + count > ids.len() || ids[ed..ed + count].iter().any(|&id| id != image_token_id) {
            return Err(Error::Input(format!("image {n} needs {count} consecutive image tokens in the prompt")));
        }
        let start = next;
        for ti in 0..lt {
            for hi in 0..lh {
                for wi in 0..lw {
                    pos.push([start + ti as i64, start + hi as i64, start + wi as i64]);
                }
            }
        }
        next = start + lh.max(lw) as i64;
        st = ed + count;
    }
    if ids[st..].contains(&image_token_id) {
        return Err(Error::Input(format!("the prompt has more image placeholder runs than the {} images given", grids.len())));
    }
    for _ in st..ids.len() {
        pos.push([next; 3]);
        next += 1;
    }
    let max = pos.iter().flat_map(|p| p.iter().copied()).max().unwrap_or(-1);
    Ok((pos, max + 1 - ids.len() as i64))
}

/// M-RoPE cos and sin half tables `[B, T, head_dim / 2]` from position ids
/// `positions[b][t] = [t, h, w]`: frequency j comes from the axis whose `mrope_section` holds j.
/// (The full tables of transformers repeat the half twice.)
pub fn mrope_cos_sin(positions: &[Vec<[i64; 3]>], head_dim: usize, theta: f64, section: &[usize], device: &Device) -> Result<(Tensor, Tensor)> {
    let freqs = inv_freq(head_dim, theta);
    let half = freqs.len();
    let mut axis_of = Vec::with_capacity(half);
    for (axis, &len) in section.iter().enumerate() {
        axis_of.extend(std::iter::repeat_n(axis % 3, len));
    }
    axis_of.resize(half, 0);
    let b = positions.len();
    let t = positions.first().map_or(0, |p| p.len());
    let mut cos = Vec::with_capacity(b * t * half);
    let mut sin = Vec::with_capacity(b * t * half);
    for row in positions {
        for p in row {
            for j in 0..half {
                let angle = p[axis_of[j]] as f32 * freqs[j];
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
    }
    Ok((Tensor::from_vec(cos, (b, t, half), device)?, Tensor::from_vec(sin, (b, t, half), device)?))
}

/// The decoder's rotary tables for one pass, built once on the device in the compute dtype and
/// shared by every layer.
pub struct Rotary {
    cos: Tensor,
    sin: Tensor,
    exec: Exec,
}

impl Rotary {
    /// Tables for `positions` (see [`mrope_cos_sin`]); `Infer` keeps the half tables `[B, T, D/2]`
    /// for candle's fused kernel, `Train` the full `[B, 1, T, D]` ones for differentiable ops.
    pub fn new(positions: &[Vec<[i64; 3]>], config: &TextConfig, dtype: DType, device: &Device, exec: Exec) -> Result<Self> {
        let (cos, sin) = mrope_cos_sin(positions, config.head_dim, config.rope_theta, &config.mrope_section, device)?;
        let shape = |t: Tensor| -> Result<Tensor> {
            let t = t.to_dtype(dtype)?;
            Ok(match exec {
                Exec::Infer => t,
                Exec::Train => Tensor::cat(&[&t, &t], D::Minus1)?.unsqueeze(1)?,
            })
        };
        Ok(Rotary { cos: shape(cos)?, sin: shape(sin)?, exec })
    }

    /// Rotates `x` `[B, heads, T, D]`; the result is contiguous.
    pub fn apply(&self, x: &Tensor) -> Result<Tensor> {
        match self.exec {
            Exec::Infer => Ok(candle_nn::rotary_emb::rope(&x.contiguous()?, &self.cos, &self.sin)?),
            Exec::Train => Ok(apply_rotary(x, &self.cos, &self.sin)?.contiguous()?),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rope_index_matches_the_worked_example() -> Result<()> {
        // 32 tokens, image tokens from position 4, grid 1x8x12 (24 merged tokens): reference §5.
        let image = 9u32;
        let mut ids = vec![1u32; 4];
        ids.extend(std::iter::repeat_n(image, 24));
        ids.extend([1u32; 4]);
        let (pos, delta) = rope_index(&ids, &[[1, 8, 12]], image, 2)?;
        assert_eq!(pos[4], [4, 4, 4]);
        assert_eq!(pos[5], [4, 4, 5]);
        assert_eq!(pos[4 + 6], [4, 5, 4]);
        assert_eq!(pos[28], [10, 10, 10]);
        assert_eq!(delta, -18);
        Ok(())
    }

    #[test]
    fn window_index_pads_partial_windows() {
        // Merged grid 3x5 with side 2: windows of 4, 4, 2 / 2, 2, 1 tokens.
        let w = window_index(&[[1, 6, 10]], 2, 2);
        assert_eq!(&w.index[..4], &[0, 1, 5, 6]);
        assert_eq!(&w.index[8..10], &[4, 9]);
        assert_eq!(w.cu_seqlens, vec![0, 16, 32, 40, 48, 56, 60]);
        let mut sorted = w.index.clone();
        sorted.sort();
        assert_eq!(sorted, (0..15).collect::<Vec<_>>());
    }

    #[test]
    fn mismatched_image_tokens_are_errors() {
        assert!(rope_index(&[1, 9, 9, 1], &[[1, 4, 4]], 9, 2).is_err());
        assert!(rope_index(&[1, 9, 9, 9, 9], &[], 9, 2).is_err());
        assert!(rope_index(&[1, 2], &[[1, 2, 2]], 9, 2).is_err());
    }
}

//! Completion masks from sampled token ids: which positions the loss counts.
//!
//! As released: every position up to and including the first EOS counts; everything after it is
//! masked. A completion without EOS (cut at the length limit) counts all its tokens.

use candle_core::{Device, Tensor};

use crate::{Error, Result};

/// Index of the first token of `ids` that is one of `eos_ids`.
pub fn first_eos(ids: &[u32], eos_ids: &[u32]) -> Option<usize> {
    ids.iter().position(|id| eos_ids.contains(id))
}

/// Number of positions the loss counts: through the first EOS, or all of `ids` without one.
pub fn counted_len(ids: &[u32], eos_ids: &[u32]) -> usize {
    first_eos(ids, eos_ids).map_or(ids.len(), |i| i + 1)
}

/// A `[B, width]` f32 mask for completions of possibly different lengths (right-padded).
///
/// The released trainer passes only the tokenizer's EOS (`<|im_end|>` for Qwen2.5-VL) here,
/// not every stop token of the generation config; pass the same for parity.
pub fn completion_mask<S: AsRef<[u32]>>(
    completions: &[S],
    eos_ids: &[u32],
    width: usize,
    device: &Device,
) -> Result<Tensor> {
    let mut data = Vec::with_capacity(completions.len() * width);
    for ids in completions {
        let ids = ids.as_ref();
        if ids.len() > width {
            return Err(Error::Length {
                name: "completion",
                expected: width,
                got: ids.len(),
            });
        }
        let n = counted_len(ids, eos_ids);
        data.extend((0..width).map(|t| if t < n { 1f32 } else { 0f32 }));
    }
    Ok(Tensor::from_vec(data, (completions.len(), width), device)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mask_runs_through_the_first_eos() -> Result<()> {
        let eos = [9u32];
        let rows: Vec<Vec<u32>> = vec![vec![1, 2, 9, 9, 5], vec![1, 2, 3], vec![9]];
        let m = completion_mask(&rows, &eos, 5, &Device::Cpu)?.to_vec2::<f32>()?;
        assert_eq!(
            m,
            vec![
                vec![1., 1., 1., 0., 0.],
                vec![1., 1., 1., 0., 0.],
                vec![1., 0., 0., 0., 0.],
            ]
        );
        assert_eq!(first_eos(&rows[0], &eos), Some(2));
        assert_eq!(first_eos(&rows[1], &eos), None);
        Ok(())
    }

    #[test]
    fn too_long_completion_is_an_error() {
        let rows = [vec![1u32, 2, 3]];
        assert!(matches!(
            completion_mask(&rows, &[9], 2, &Device::Cpu),
            Err(Error::Length { .. })
        ));
    }
}

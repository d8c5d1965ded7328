//! How per-token values `[B, T]` become one scalar: the three normalisations in use for GRPO-style
//! losses, expressed as per-token weights so that the aggregate is `Σ value · weight`.
//!
//! Weights are built on the host from the per-sequence token counts (a `[B]` read-back), which
//! keeps every mode one multiply-and-sum on the device and lets a caller that splits an optimizer
//! batch into micro-batches pass the whole batch's denominator.

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// Normalisation of a per-token loss over a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Aggregation {
    /// Mean over each sequence's tokens, then mean over sequences (the released GRPO-CARE code
    /// and the original GRPO; length-biased: a token of a short sequence weighs more).
    #[default]
    SeqMeanTokenMean,
    /// Sum over all tokens divided by the number of tokens (DAPO).
    TokenMean,
    /// Per-sequence token sum divided by a constant length, then mean over sequences (Dr. GRPO).
    SeqMeanTokenSumNorm,
}

/// Per-token weights `[B, T]` (f32) and the counts they were built from.
#[derive(Debug, Clone)]
pub struct TokenWeights {
    /// `mask[b, t] · c_b`; the aggregate of `x` is `(x · weights).sum_all()`.
    pub weights: Tensor,
    /// Sum of the mask over the batch (number of completion tokens for a 0/1 mask).
    pub tokens: f64,
    /// Sequences with at least one completion token.
    pub nonempty_sequences: usize,
}

impl TokenWeights {
    /// Weights for `mode` from a completion mask `[B, T]` (any float dtype, 1 for real tokens).
    ///
    /// `norm_len` is Dr. GRPO's constant length (ignored by the other modes). `denominator`, when
    /// given, replaces the count this batch would divide by (sequences for the two seq-mean
    /// modes, tokens for `token-mean`): pass the optimizer batch's count when this call sees only
    /// one micro-batch, so that the summed micro-batch losses equal the full-batch loss.
    ///
    /// A sequence without completion tokens contributes nothing and, in `seq-mean-token-mean`,
    /// is not counted (its own mean would be 0/0, which the released code turns into NaN).
    pub fn new(
        mode: Aggregation,
        mask: &Tensor,
        norm_len: usize,
        denominator: Option<f64>,
    ) -> Result<Self> {
        let (batch, _) = mask
            .dims2()
            .map_err(|_| Error::shape("mask", "[B, T]", mask.dims()))?;
        let mask = mask.to_dtype(DType::F32)?;
        let lens: Vec<f64> = mask
            .sum(1)?
            .to_vec1::<f32>()?
            .into_iter()
            .map(f64::from)
            .collect();
        let tokens: f64 = lens.iter().sum();
        let nonempty = lens.iter().filter(|&&l| l > 0.0).count();
        let denom = match denominator {
            Some(d) if !(d.is_finite() && d > 0.0) => {
                return Err(Error::config(
                    "denominator",
                    format!("must be finite and > 0, got {d}"),
                ));
            }
            Some(d) => d,
            None => match mode {
                Aggregation::SeqMeanTokenMean => nonempty as f64,
                Aggregation::TokenMean => tokens,
                Aggregation::SeqMeanTokenSumNorm => batch as f64,
            },
        };
        if denom <= 0.0 {
            return Err(Error::EmptyBatch(format!(
                "{mode:?} over {batch} sequences with {tokens} completion tokens"
            )));
        }
        if mode == Aggregation::SeqMeanTokenSumNorm && norm_len == 0 {
            return Err(Error::config("max_completion_length", "must be > 0"));
        }
        let per_seq: Vec<f32> = lens
            .iter()
            .map(|&len| {
                let c = match mode {
                    Aggregation::SeqMeanTokenMean if len > 0.0 => 1.0 / (len * denom),
                    Aggregation::SeqMeanTokenMean => 0.0,
                    Aggregation::TokenMean => 1.0 / denom,
                    Aggregation::SeqMeanTokenSumNorm => 1.0 / (norm_len as f64 * denom),
                };
                c as f32
            })
            .collect();
        let scale = Tensor::from_vec(per_seq, (batch, 1), mask.device())?;
        Ok(TokenWeights {
            weights: mask.broadcast_mul(&scale)?,
            tokens,
            nonempty_sequences: nonempty,
        })
    }

    /// The scalar `Σ values · weights`; differentiable in `values`.
    pub fn apply(&self, values: &Tensor) -> Result<Tensor> {
        Ok(values.to_dtype(DType::F32)?.mul(&self.weights)?.sum_all()?)
    }
}

/// The aggregate of `values` `[B, T]` under `mask` in `mode`, as a host number (for metrics).
pub fn aggregate_value(
    mode: Aggregation,
    values: &Tensor,
    mask: &Tensor,
    norm_len: usize,
) -> Result<f64> {
    let w = TokenWeights::new(mode, mask, norm_len, None)?;
    Ok(f64::from(w.apply(&values.detach())?.to_scalar::<f32>()?))
}

/// A `[B, T]` f32 mask from per-row lengths (first `len` positions are 1), for tests and callers
/// that hold lengths rather than masks.
pub fn mask_from_lengths(lengths: &[usize], width: usize, device: &Device) -> Result<Tensor> {
    let mut data = Vec::with_capacity(lengths.len() * width);
    for &len in lengths {
        if len > width {
            return Err(Error::Span {
                start: 0,
                end: len,
                len: width,
            });
        }
        data.extend((0..width).map(|t| if t < len { 1f32 } else { 0f32 }));
    }
    Ok(Tensor::from_vec(data, (lengths.len(), width), device)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values() -> Result<(Tensor, Tensor)> {
        let dev = Device::Cpu;
        // Row 0 has 2 tokens (1, 3), row 1 has 4 tokens (2, 4, 6, 8); masked positions hold 100.
        let x = Tensor::new(&[[1f32, 3., 100., 100.], [2., 4., 6., 8.]], &dev)?;
        let m = mask_from_lengths(&[2, 4], 4, &dev)?;
        Ok((x, m))
    }

    #[test]
    fn seq_mean_token_mean_by_hand() -> Result<()> {
        let (x, m) = values()?;
        // Row means 2 and 5, mean 3.5.
        let v = aggregate_value(Aggregation::SeqMeanTokenMean, &x, &m, 8)?;
        assert!((v - 3.5).abs() < 1e-6, "{v}");
        Ok(())
    }

    #[test]
    fn token_mean_by_hand() -> Result<()> {
        let (x, m) = values()?;
        // (1 + 3 + 2 + 4 + 6 + 8) / 6 = 4.
        let v = aggregate_value(Aggregation::TokenMean, &x, &m, 8)?;
        assert!((v - 4.0).abs() < 1e-6, "{v}");
        Ok(())
    }

    #[test]
    fn seq_mean_token_sum_norm_by_hand() -> Result<()> {
        let (x, m) = values()?;
        // Row sums 4 and 20, each / 8, then mean over 2 rows: (0.5 + 2.5) / 2 = 1.5.
        let v = aggregate_value(Aggregation::SeqMeanTokenSumNorm, &x, &m, 8)?;
        assert!((v - 1.5).abs() < 1e-6, "{v}");
        Ok(())
    }

    #[test]
    fn empty_rows_are_skipped_in_seq_mean_and_all_empty_is_an_error() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::new(&[[1f32, 3.], [7., 7.]], &dev)?;
        let m = mask_from_lengths(&[2, 0], 2, &dev)?;
        let v = aggregate_value(Aggregation::SeqMeanTokenMean, &x, &m, 2)?;
        assert!((v - 2.0).abs() < 1e-6, "{v}");
        let none = mask_from_lengths(&[0, 0], 2, &dev)?;
        assert!(matches!(
            aggregate_value(Aggregation::TokenMean, &x, &none, 2),
            Err(Error::EmptyBatch(_))
        ));
        Ok(())
    }

    #[test]
    fn micro_batches_with_batch_denominator_sum_to_the_full_batch() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::new(&[[1f32, 3., 5.], [2., 4., 0.], [9., 0., 0.]], &dev)?;
        let m = mask_from_lengths(&[3, 2, 1], 3, &dev)?;
        for mode in [
            Aggregation::SeqMeanTokenMean,
            Aggregation::TokenMean,
            Aggregation::SeqMeanTokenSumNorm,
        ] {
            let full = TokenWeights::new(mode, &m, 4, None)?
                .apply(&x)?
                .to_scalar::<f32>()?;
            let denom = match mode {
                Aggregation::TokenMean => 6.0,
                _ => 3.0,
            };
            let mut parts = 0f32;
            for (start, len) in [(0, 2), (2, 1)] {
                let w = TokenWeights::new(mode, &m.narrow(0, start, len)?, 4, Some(denom))?;
                parts += w.apply(&x.narrow(0, start, len)?)?.to_scalar::<f32>()?;
            }
            assert!((full - parts).abs() < 1e-6, "{mode:?}: {full} vs {parts}");
        }
        Ok(())
    }

    #[test]
    fn serde_names_are_the_documented_ones() -> Result<()> {
        for (mode, name) in [
            (Aggregation::SeqMeanTokenMean, "\"seq-mean-token-mean\""),
            (Aggregation::TokenMean, "\"token-mean\""),
            (
                Aggregation::SeqMeanTokenSumNorm,
                "\"seq-mean-token-sum-norm\"",
            ),
        ] {
            let json =
                serde_json::to_string(&mode).map_err(|e| Error::config("mode", e.to_string()))?;
            assert_eq!(json, name);
            let back: Aggregation =
                serde_json::from_str(name).map_err(|e| Error::config("mode", e.to_string()))?;
            assert_eq!(back, mode);
        }
        Ok(())
    }
}

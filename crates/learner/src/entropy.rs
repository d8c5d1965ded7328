//! Per-token entropy of the policy's next-token distribution, for logging only.
//!
//! Like `medrl_model::logprobs`, the logits `h Wᵀ` are produced `chunk` vocabulary rows at a time
//! so that no `[tokens, vocab]` matrix exists at once; the chunks are merged with a running
//! maximum. No gradient: inputs are detached.

use candle_core::{D, DType, Tensor};

use crate::{Error, Result};

/// Running softmax statistics relative to the running maximum `m`:
/// `s = Σ exp(z − m)` and `y = Σ exp(z − m)·(z − m)`, so that `H = ln s − y / s`.
struct Stats {
    m: Tensor,
    s: Tensor,
    y: Tensor,
}

impl Stats {
    fn of_chunk(logits: &Tensor) -> Result<Self> {
        let m = logits.max_keepdim(D::Minus1)?;
        let centred = logits.broadcast_sub(&m)?;
        let e = centred.exp()?;
        Ok(Stats {
            s: e.sum(D::Minus1)?,
            y: (&e * &centred)?.sum(D::Minus1)?,
            m: m.squeeze(D::Minus1)?,
        })
    }

    /// Merges two sets of statistics. Re-centring `y` on the new maximum `M` uses
    /// `Σ e^{z−M}(z−M) = a·(y + s·(m − M))` with `a = e^{m−M}`; keeping everything relative to
    /// the maximum avoids cancelling large logits against their mean.
    fn merge(self, other: Stats) -> Result<Self> {
        let m = self.m.maximum(&other.m)?;
        let shift = |st: &Stats| -> Result<(Tensor, Tensor)> {
            let delta = (&st.m - &m)?;
            let a = delta.exp()?;
            let s = (&st.s * &a)?;
            let y = ((&st.y + (&st.s * &delta)?)? * &a)?;
            Ok((s, y))
        };
        let (s1, y1) = shift(&self)?;
        let (s2, y2) = shift(&other)?;
        Ok(Stats {
            m,
            s: (s1 + s2)?,
            y: (y1 + y2)?,
        })
    }
}

/// Entropy `[N]` (f32, nats) of `softmax(hidden [N, H] · weight [V, H]ᵀ)`, `chunk` vocabulary
/// rows at a time, without gradient.
pub fn token_entropy_chunked(hidden: &Tensor, weight: &Tensor, chunk: usize) -> Result<Tensor> {
    let (_, h_dim) = hidden
        .dims2()
        .map_err(|_| Error::shape("hidden", "[N, H]", hidden.dims()))?;
    let (vocab, w_dim) = weight
        .dims2()
        .map_err(|_| Error::shape("weight", "[V, H]", weight.dims()))?;
    if w_dim != h_dim {
        return Err(Error::shape(
            "weight",
            format!("[V, {h_dim}]"),
            weight.dims(),
        ));
    }
    if vocab == 0 {
        return Err(Error::shape("weight", "[V, H] with V > 0", weight.dims()));
    }
    let chunk = chunk.max(1);
    // The matmul runs in the hidden dtype (as the model's log-probs do); statistics in f32.
    let h = hidden.detach();
    let w = weight.detach().to_dtype(h.dtype())?;
    let mut stats: Option<Stats> = None;
    let mut start = 0;
    while start < vocab {
        let len = chunk.min(vocab - start);
        let logits = h
            .matmul(&w.narrow(0, start, len)?.t()?)?
            .to_dtype(DType::F32)?;
        let part = Stats::of_chunk(&logits)?;
        stats = Some(match stats {
            None => part,
            Some(acc) => acc.merge(part)?,
        });
        start += len;
    }
    let st = stats.ok_or_else(|| Error::shape("weight", "[V, H] with V > 0", weight.dims()))?;
    Ok((st.s.log()? - (&st.y / &st.s)?)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn uniform_logits_have_entropy_ln_v() -> Result<()> {
        let dev = Device::Cpu;
        let h = Tensor::zeros((2, 3), DType::F32, &dev)?;
        let w = Tensor::randn(0f32, 1., (10, 3), &dev)?;
        let e = token_entropy_chunked(&h, &w, 3)?.to_vec1::<f32>()?;
        for v in e {
            assert!((f64::from(v) - 10f64.ln()).abs() < 1e-6, "{v}");
        }
        Ok(())
    }

    #[test]
    fn two_point_distribution_by_hand() -> Result<()> {
        // Logits (ln 3, 0): p = (0.75, 0.25), H = −0.75 ln 0.75 − 0.25 ln 0.25 = 0.5623351446.
        let dev = Device::Cpu;
        let h = Tensor::new(&[[3f32.ln()]], &dev)?;
        let w = Tensor::new(&[[1f32], [0.0]], &dev)?;
        let e = token_entropy_chunked(&h, &w, 1)?.to_vec1::<f32>()?;
        assert!(
            (f64::from(e[0]) - 0.562_335_144_618_808_2).abs() < 1e-6,
            "{e:?}"
        );
        Ok(())
    }

    #[test]
    fn chunked_equals_full_softmax_entropy() -> Result<()> {
        let dev = Device::Cpu;
        let h = (Tensor::randn(0f32, 1., (5, 8), &dev)? * 3.0)?;
        let w = Tensor::randn(0f32, 1., (37, 8), &dev)?;
        let logits = h.matmul(&w.t()?)?;
        let logp = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
        let full = (logp.exp()? * &logp)?.sum(D::Minus1)?.neg()?;
        for chunk in [1, 5, 8, 37, 100] {
            let chunked = token_entropy_chunked(&h, &w, chunk)?;
            let diff = (&chunked - &full)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(diff < 1e-4, "chunk {chunk}: differs by {diff}");
        }
        Ok(())
    }

    #[test]
    fn mismatched_hidden_size_is_an_error() -> Result<()> {
        let dev = Device::Cpu;
        let h = Tensor::zeros((2, 3), DType::F32, &dev)?;
        let w = Tensor::zeros((4, 5), DType::F32, &dev)?;
        assert!(matches!(
            token_entropy_chunked(&h, &w, 2),
            Err(Error::Shape { name: "weight", .. })
        ));
        Ok(())
    }
}

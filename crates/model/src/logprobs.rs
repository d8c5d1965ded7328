//! Per-token log-probs `log softmax(h Wᵀ)[target]`, chunked over the vocabulary in both directions,
//! so neither the forward nor the backward pass holds a `[tokens, vocab]` matrix at once.

use candle_core::{CpuStorage, CudaStorage, CustomOp3, D, DType, Layout, Shape, Tensor};
use candle_core::backend::BackendStorage;

use crate::Result;

/// Log-probs `[N]` (f32) of `targets` `[N]` under logits `hidden [N, H] · weightᵀ [H, V]`,
/// computed `chunk` vocabulary rows at a time. Differentiable in `hidden` and `weight`.
pub fn token_logprobs(hidden: &Tensor, weight: &Tensor, targets: &Tensor, chunk: usize) -> Result<Tensor> {
    let vocab = weight.dim(0)?;
    let chunk = chunk.max(1);
    let (h, w) = (hidden.detach(), weight.detach().to_dtype(hidden.dtype())?);
    let lse = chunked_logsumexp(&h, &w, vocab, chunk)?;
    let target_logit = h.to_dtype(DType::F32)?.mul(&w.index_select(targets, 0)?.to_dtype(DType::F32)?)?.sum(D::Minus1)?;
    let value = (target_logit - &lse)?.contiguous()?;
    if !hidden.track_op() && !weight.track_op() {
        return Ok(value);
    }
    let op = LogprobGrad { targets: targets.clone(), lse, chunk };
    Ok(hidden.apply_op3(weight, &value, op)?)
}

/// `log Σ exp(x)` over the last dimension, kept as `[.., 1]`.
pub(crate) fn log_sum_exp(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?;
    Ok((x.broadcast_sub(&max)?.exp()?.sum_keepdim(D::Minus1)?.log()? + max)?)
}

fn chunked_logsumexp(h: &Tensor, w: &Tensor, vocab: usize, chunk: usize) -> Result<Tensor> {
    let mut lse: Option<Tensor> = None;
    let mut start = 0;
    while start < vocab {
        let len = chunk.min(vocab - start);
        let logits = h.matmul(&w.narrow(0, start, len)?.t()?)?.to_dtype(DType::F32)?;
        let part = log_sum_exp(&logits)?.squeeze(D::Minus1)?;
        lse = Some(match lse {
            None => part,
            Some(acc) => {
                let m = acc.maximum(&part)?;
                (((acc - &m)?.exp()? + (part - &m)?.exp()?)?.log()? + m)?
            }
        });
        start += len;
    }
    lse.ok_or_else(|| crate::Error::Input("empty vocabulary".into()))
}

/// Forward passes the precomputed value through; backward recomputes softmax chunk by chunk.
struct LogprobGrad {
    targets: Tensor,
    lse: Tensor,
    chunk: usize,
}

impl CustomOp3 for LogprobGrad {
    fn name(&self) -> &'static str {
        "chunked-token-logprobs"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout, v: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        Ok((v.try_clone(l)?, l.shape().clone()))
    }

    fn cuda_fwd(&self, _: &CudaStorage, _: &Layout, _: &CudaStorage, _: &Layout, v: &CudaStorage, l: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        Ok((v.try_clone(l)?, l.shape().clone()))
    }

    fn bwd(&self, hidden: &Tensor, weight: &Tensor, _: &Tensor, _: &Tensor, grad: &Tensor) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        // d lp / d logits = onehot(target) - softmax; chain through logits = h Wᵀ.
        let dtype = hidden.dtype();
        let h = hidden.detach();
        let w = weight.detach().to_dtype(dtype)?;
        let g = grad.to_dtype(DType::F32)?.unsqueeze(1)?;
        let vocab = w.dim(0)?;
        let want_w = weight.track_op();
        let mut grad_h = w.index_select(&self.targets, 0)?.to_dtype(DType::F32)?.broadcast_mul(&g)?;
        let mut grad_w_chunks = Vec::new();
        let mut start = 0;
        while start < vocab {
            let len = self.chunk.min(vocab - start);
            let wc = w.narrow(0, start, len)?;
            let logits = h.matmul(&wc.t()?)?.to_dtype(DType::F32)?;
            let p = logits.broadcast_sub(&self.lse.unsqueeze(1)?)?.exp()?.broadcast_mul(&g)?;
            grad_h = (grad_h - p.matmul(&wc.to_dtype(DType::F32)?)?)?;
            if want_w {
                grad_w_chunks.push(p.t()?.matmul(&h.to_dtype(DType::F32)?)?.neg()?);
            }
            start += len;
        }
        let grad_w = if want_w {
            let dense = Tensor::cat(&grad_w_chunks, 0)?;
            let rows = h.to_dtype(DType::F32)?.broadcast_mul(&g)?;
            Some(dense.index_add(&self.targets, &rows, 0)?.to_dtype(weight.dtype())?)
        } else {
            None
        };
        Ok((Some(grad_h.to_dtype(dtype)?), grad_w, None))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn chunked_equals_full_log_softmax_with_gradients() -> Result<()> {
        let dev = Device::Cpu;
        let h = Var::from_tensor(&Tensor::randn(0f32, 1., (5, 8), &dev)?)?;
        let w = Var::from_tensor(&Tensor::randn(0f32, 1., (37, 8), &dev)?)?;
        let targets = Tensor::new(&[0u32, 36, 5, 5, 20], &dev)?;

        let chunked = token_logprobs(h.as_tensor(), w.as_tensor(), &targets, 8)?;
        let full = candle_nn::ops::log_softmax(&h.as_tensor().matmul(&w.as_tensor().t()?)?, D::Minus1)?
            .gather(&targets.unsqueeze(1)?, 1)?
            .squeeze(1)?;
        let diff = (&chunked - &full)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-5, "values differ by {diff}");

        let coef = Tensor::new(&[1f32, -2., 0.5, 3., 1.], &dev)?;
        let ga = (chunked * &coef)?.sum_all()?.backward()?;
        let gb = (full * &coef)?.sum_all()?.backward()?;
        for v in [&h, &w] {
            let a = ga.get(v.as_tensor()).expect("chunked grad");
            let b = gb.get(v.as_tensor()).expect("full grad");
            let diff = (a - b)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(diff < 1e-4, "gradients differ by {diff}");
        }
        Ok(())
    }

    #[test]
    fn frozen_weight_gets_no_gradient() -> Result<()> {
        let dev = Device::Cpu;
        let h = Var::from_tensor(&Tensor::randn(0f32, 1., (3, 4), &dev)?)?;
        let w = Tensor::randn(0f32, 1., (11, 4), &dev)?;
        let lp = token_logprobs(h.as_tensor(), &w, &Tensor::new(&[1u32, 2, 3], &dev)?, 4)?;
        let g = lp.sum_all()?.backward()?;
        assert!(g.get(&w).is_none());
        assert!(g.get(h.as_tensor()).is_some());
        Ok(())
    }
}

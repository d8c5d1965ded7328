//! Building blocks shared by the vision tower and the decoder, with two execution paths: `Train`
//! uses only ops that candle can differentiate (its fused softmax / rms_norm / rope cut gradients
//! silently); `Infer` may use the fused kernels.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CudaStorage, CustomOp2, D, DType, Layout, Shape, Tensor};

use crate::Result;

/// How a forward pass runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exec {
    /// Every op differentiable; used for log-probs that are trained on.
    Train,
    /// Fused kernels allowed; no gradient needed.
    Infer,
}

/// A low-rank adapter: adds `scale · x Aᵀ Bᵀ` to a linear layer's output.
#[derive(Debug, Clone)]
pub struct Lora {
    /// `[rank, in]`.
    pub a: Tensor,
    /// `[out, rank]`.
    pub b: Tensor,
    /// `alpha / rank`.
    pub scale: f64,
}

impl Lora {
    /// The weight delta `scale · B A` `[out, in]` that merging adds to the base weight.
    pub fn delta(&self) -> Result<Tensor> {
        Ok((self.b.matmul(&self.a)? * self.scale)?)
    }
}

/// A linear layer `y = x Wᵀ + b` whose frozen weight never receives a gradient, optionally with
/// a LoRA adapter.
#[derive(Debug, Clone)]
pub struct Linear {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    pub lora: Option<Lora>,
}

impl Linear {
    /// A layer from its weight `[out, in]` and optional bias `[out]`.
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Linear { weight, bias, lora: None }
    }

    /// Applies the layer over the last dimension of `x`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let (in_dim, out_dim) = (dims[dims.len() - 1], self.weight.dim(0)?);
        let flat = x.reshape(((), in_dim))?;
        let weight = if self.weight.dtype() == x.dtype() { self.weight.clone() } else { self.weight.to_dtype(x.dtype())? };
        let y = if !weight.track_op() && flat.track_op() {
            frozen_matmul(&flat, &weight)?
        } else {
            flat.matmul(&weight.t()?)?
        };
        let y = match &self.bias {
            Some(b) => y.broadcast_add(&b.to_dtype(y.dtype())?)?,
            None => y,
        };
        let y = match &self.lora {
            Some(l) => {
                let low = flat.matmul(&l.a.to_dtype(flat.dtype())?.t()?)?;
                (y + (low.matmul(&l.b.to_dtype(flat.dtype())?.t()?)? * l.scale)?)?
            }
            None => y,
        };
        let mut out_dims = dims;
        let last = out_dims.len() - 1;
        out_dims[last] = out_dim;
        Ok(y.reshape(out_dims)?)
    }
}

/// `x Wᵀ` for a weight outside the graph: the gradient flows to `x` only. candle's matmul
/// backward would also build a weight-sized gradient for `W`, which frozen weights must not cost.
fn frozen_matmul(x: &Tensor, weight: &Tensor) -> Result<Tensor> {
    let value = x.detach().matmul(&weight.t()?)?.contiguous()?;
    Ok(x.apply_op2(&value, FrozenWeightGrad { weight: weight.clone() })?)
}

/// Returns its second argument unchanged; its backward sends `grad · W` to the first.
struct FrozenWeightGrad {
    weight: Tensor,
}

impl CustomOp2 for FrozenWeightGrad {
    fn name(&self) -> &'static str {
        "frozen-weight-matmul"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout, value: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        Ok((value.try_clone(layout)?, layout.shape().clone()))
    }

    fn cuda_fwd(&self, _: &CudaStorage, _: &Layout, value: &CudaStorage, layout: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        Ok((value.try_clone(layout)?, layout.shape().clone()))
    }

    fn bwd(&self, _: &Tensor, _: &Tensor, _: &Tensor, grad: &Tensor) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some(grad.matmul(&self.weight)?), None))
    }
}

/// RMSNorm computed in f32 and cast back before the weight, as transformers does.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64, exec: Exec) -> Result<Tensor> {
    let dtype = x.dtype();
    if exec == Exec::Infer {
        // One kernel; in bf16 it rounds once where transformers rounds before and after the weight.
        return Ok(candle_nn::ops::rms_norm(&x.contiguous()?, &weight.to_dtype(dtype)?, eps as f32)?);
    }
    let xf = x.to_dtype(DType::F32)?;
    let var = xf.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = xf.broadcast_div(&(var + eps)?.sqrt()?)?.to_dtype(dtype)?;
    Ok(normed.broadcast_mul(&weight.to_dtype(dtype)?)?)
}

/// Softmax over the last dimension in f32 (as transformers' eager attention), cast back to `dtype`.
pub fn softmax_f32(x: &Tensor, dtype: DType, exec: Exec) -> Result<Tensor> {
    let xf = x.to_dtype(DType::F32)?;
    let p = match exec {
        Exec::Train => candle_nn::ops::softmax(&xf, D::Minus1)?,
        Exec::Infer => candle_nn::ops::softmax_last_dim(&xf.contiguous()?)?,
    };
    Ok(p.to_dtype(dtype)?)
}

/// `cat(-x[.., d/2..], x[.., ..d/2])` over the last dimension.
pub fn rotate_half(x: &Tensor) -> Result<Tensor> {
    let d = x.dim(D::Minus1)?;
    let x1 = x.narrow(D::Minus1, 0, d / 2)?;
    let x2 = x.narrow(D::Minus1, d / 2, d - d / 2)?;
    Ok(Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?)
}

/// `x·cos + rotate_half(x)·sin`, with `cos`/`sin` broadcast against `x`.
pub fn apply_rotary(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    Ok((x.broadcast_mul(cos)? + rotate_half(x)?.broadcast_mul(sin)?)?)
}

/// A value large and negative enough to mask a logit without producing NaN rows.
pub const MASKED: f32 = -3.0e38;

/// Scaled dot-product attention with grouped KV heads, softmax in f32.
/// `q`: `[B, H, Tq, D]`, `k`/`v`: `[B, Hkv, Tk, D]`, `mask`: additive, broadcastable to `[B, 1, Tq, Tk]`.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, mask: Option<&Tensor>, exec: Exec) -> Result<Tensor> {
    let (b, h, tq, d) = q.dims4()?;
    let hkv = k.dim(1)?;
    let tk = k.dim(2)?;
    let rep = h / hkv;
    // Group query heads per KV head instead of repeating K and V (no KV copy while decoding).
    let qg = q.reshape((b, hkv, rep * tq, d))?;
    let scale = 1.0 / (d as f64).sqrt();
    let scores = (qg.contiguous()?.matmul(&k.t()?.contiguous()?)? * scale)?;
    let scores = match mask {
        Some(m) => scores.reshape((b, hkv, rep, tq, tk))?.broadcast_add(&m.unsqueeze(1)?.to_dtype(scores.dtype())?)?.reshape((b, hkv, rep * tq, tk))?,
        None => scores,
    };
    let probs = softmax_f32(&scores, v.dtype(), exec)?;
    let out = probs.matmul(&v.contiguous()?)?;
    Ok(out.reshape((b, h, tq, d))?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn frozen_weight_gets_no_gradient_but_input_does() -> Result<()> {
        let dev = Device::Cpu;
        let w = Tensor::new(&[[1f32, 2.], [3., 4.], [5., 6.]], &dev)?;
        let x = Var::new(&[[1f32, -1.]], &dev)?;
        let lin = Linear::new(w.clone(), None);
        let y = lin.forward(x.as_tensor())?;
        assert_eq!(y.to_vec2::<f32>()?, vec![vec![-1., -1., -1.]]);
        let grads = y.sum_all()?.backward()?;
        assert!(grads.get(&w).is_none(), "a frozen weight must not get a gradient");
        let gx = grads.get(x.as_tensor()).expect("input gradient").to_vec2::<f32>()?;
        assert_eq!(gx, vec![vec![9., 12.]]);
        Ok(())
    }

    #[test]
    fn trainable_weight_gets_its_gradient() -> Result<()> {
        let dev = Device::Cpu;
        let w = Var::new(&[[1f32, 2.], [3., 4.]], &dev)?;
        let x = Tensor::new(&[[1f32, 2.]], &dev)?;
        let y = Linear::new(w.as_tensor().clone(), None).forward(&x)?;
        let grads = y.sum_all()?.backward()?;
        assert_eq!(grads.get(w.as_tensor()).expect("grad").to_vec2::<f32>()?, vec![vec![1., 2.], vec![1., 2.]]);
        Ok(())
    }

    #[test]
    fn differentiable_and_fused_paths_agree() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::new(&[[0.5f32, -1.0, 2.0, 0.25], [1.0, 1.0, -3.0, 0.0]], &dev)?;
        let w = Tensor::new(&[1.0f32, 0.5, 2.0, -1.0], &dev)?;
        let a = rms_norm(&x, &w, 1e-6, Exec::Train)?.to_vec2::<f32>()?;
        let b = rms_norm(&x, &w, 1e-6, Exec::Infer)?.to_vec2::<f32>()?;
        let sa = softmax_f32(&x, DType::F32, Exec::Train)?.to_vec2::<f32>()?;
        let sb = softmax_f32(&x, DType::F32, Exec::Infer)?.to_vec2::<f32>()?;
        for (ra, rb) in a.iter().chain(sa.iter()).zip(b.iter().chain(sb.iter())) {
            for (u, v) in ra.iter().zip(rb) {
                assert!((u - v).abs() < 1e-6, "{u} vs {v}");
            }
        }
        Ok(())
    }

    #[test]
    fn grouped_attention_equals_repeated_heads() -> Result<()> {
        let dev = Device::Cpu;
        let q = Tensor::randn(0f32, 1., (1, 4, 3, 8), &dev)?;
        let k = Tensor::randn(0f32, 1., (1, 2, 3, 8), &dev)?;
        let v = Tensor::randn(0f32, 1., (1, 2, 3, 8), &dev)?;
        let grouped = attention(&q, &k, &v, None, Exec::Infer)?;
        for head in 0..4 {
            let qh = q.narrow(1, head, 1)?;
            let kh = k.narrow(1, head / 2, 1)?;
            let vh = v.narrow(1, head / 2, 1)?;
            let single = attention(&qh, &kh, &vh, None, Exec::Train)?;
            let diff = (grouped.narrow(1, head, 1)? - single)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(diff < 1e-5, "head {head}: {diff}");
        }
        Ok(())
    }
}

//! One-pass, all-core kernels for the optimizer work on tensors in host memory: gradient sums,
//! their norm and scaling, and the AdamW update.
//!
//! Why not candle ops: candle's CPU element-wise ops and reductions run on one core and allocate
//! a tensor per op, and AdamW written with them makes about ten passes over the state. For a 7B
//! model whose state is kept in host memory (ZeRO-Offload style, 33 GB of f32 master weights
//! alone) that is minutes per step; here each tensor is read and written once, on all cores.

use candle_core::{CpuStorage, DType, Device, Storage, Tensor, WithDType};
use half::{bf16, f16};
use rayon::prelude::*;

use crate::{Error, Result};

/// Elements per task: large enough to amortise scheduling, small enough to balance cores.
const CHUNK: usize = 1 << 15;

/// A float element the kernels read and write.
trait Elem: WithDType {
    fn to_f32(self) -> f32;
    fn from_f32(x: f32) -> Self;
}

impl Elem for f32 {
    fn to_f32(self) -> f32 {
        self
    }
    fn from_f32(x: f32) -> Self {
        x
    }
}

/// bf16 and f16 convert through `half`'s own f32 conversions.
macro_rules! half_elem {
    ($t:ty) => {
        impl Elem for $t {
            fn to_f32(self) -> f32 {
                <$t>::to_f32(self)
            }
            fn from_f32(x: f32) -> Self {
                <$t>::from_f32(x)
            }
        }
    };
}

half_elem!(bf16);
half_elem!(f16);

/// The elements of a contiguous host tensor, borrowed.
#[derive(Clone, Copy)]
enum Slice<'a> {
    F32(&'a [f32]),
    Bf16(&'a [bf16]),
    F16(&'a [f16]),
}

/// Calls `f` with the elements of `t` in row-major order: a GPU tensor is made contiguous there
/// and copied over, a host one is made contiguous if needed (free when it already is, as the
/// gradients of candle's backward pass are).
fn with_elems<R>(t: &Tensor, f: impl FnOnce(Slice<'_>) -> Result<R>) -> Result<R> {
    let host = t.contiguous()?.to_device(&Device::Cpu)?;
    let (storage, layout) = host.storage_and_layout();
    let (Storage::Cpu(cpu), Some((start, end))) = (&*storage, layout.contiguous_offsets()) else {
        return Err(Error::Input("host optimizer kernels need a contiguous host tensor".into()));
    };
    match cpu {
        CpuStorage::F32(v) => f(Slice::F32(&v[start..end])),
        CpuStorage::BF16(v) => f(Slice::Bf16(&v[start..end])),
        CpuStorage::F16(v) => f(Slice::F16(&v[start..end])),
        _ => Err(Error::Input(format!("host optimizer kernels take f32, bf16 or f16 tensors, got {:?}", host.dtype()))),
    }
}

fn host_tensor<T: Elem>(v: Vec<T>, shape: &[usize]) -> Result<Tensor> {
    Ok(Tensor::from_vec(v, shape, &Device::Cpu)?)
}

/// `sum + scale · grad` as a new f32 host tensor (`grad · scale` when there is no sum yet);
/// `grad` may be on any device and in any float dtype.
pub(crate) fn accumulate(sum: Option<&Tensor>, grad: &Tensor, scale: f32) -> Result<Tensor> {
    let shape = grad.dims().to_vec();
    let n = grad.elem_count();
    if let Some(s) = sum
        && s.dims() != shape.as_slice()
    {
        return Err(Error::Input(format!("gradient sum {:?} and gradient {:?} differ in shape", s.dims(), shape)));
    }
    let mut out = vec![0f32; n];
    with_elems(grad, |g| match sum {
        Some(s) => with_elems(s, |prior| match prior {
            Slice::F32(prior) => {
                add_scaled(&mut out, Some(prior), g, scale);
                Ok(())
            }
            _ => Err(Error::Input("gradient sums are f32".into())),
        }),
        None => {
            add_scaled(&mut out, None, g, scale);
            Ok(())
        }
    })?;
    host_tensor(out, &shape)
}

fn add_scaled(out: &mut [f32], prior: Option<&[f32]>, grad: Slice<'_>, scale: f32) {
    match grad {
        Slice::F32(g) => add_scaled_typed(out, prior, g, scale),
        Slice::Bf16(g) => add_scaled_typed(out, prior, g, scale),
        Slice::F16(g) => add_scaled_typed(out, prior, g, scale),
    }
}

fn add_scaled_typed<G: Elem>(out: &mut [f32], prior: Option<&[f32]>, grad: &[G], scale: f32) {
    out.par_chunks_mut(CHUNK).enumerate().for_each(|(c, out)| {
        let (base, len) = (c * CHUNK, out.len());
        let grad = &grad[base..base + len];
        match prior {
            Some(p) => {
                for ((o, &p), &g) in out.iter_mut().zip(&p[base..base + len]).zip(grad) {
                    *o = p + g.to_f32() * scale;
                }
            }
            None => {
                for (o, &g) in out.iter_mut().zip(grad) {
                    *o = g.to_f32() * scale;
                }
            }
        }
    });
}

/// Σ x² over the tensor, squares in f32 summed in f64, the same on every run: blocks are summed
/// in parallel, then in order (rayon's own `sum` depends on how work was split).
pub(crate) fn sum_squares(t: &Tensor) -> Result<f64> {
    fn run<T: Elem>(x: &[T]) -> f64 {
        let blocks: Vec<f64> = x.par_chunks(CHUNK).map(|c| c.iter().map(|&v| f64::from(v.to_f32() * v.to_f32())).sum::<f64>()).collect();
        blocks.iter().sum()
    }
    with_elems(t, |s| {
        Ok(match s {
            Slice::F32(x) => run(x),
            Slice::Bf16(x) => run(x),
            Slice::F16(x) => run(x),
        })
    })
}

/// `t · coef` as a new f32 host tensor.
pub(crate) fn scaled(t: &Tensor, coef: f32) -> Result<Tensor> {
    accumulate(None, t, coef)
}

/// The scalars of one AdamW step, as torch's single-tensor AdamW applies them.
#[derive(Debug, Clone, Copy)]
pub(crate) struct AdamWStep {
    /// `1 − lr · weight_decay`.
    pub decay: f32,
    /// `1 − β1`, rounded from f64 (`1 − 0.9f32` is 2.4e-8 off).
    pub one_minus_beta1: f32,
    pub beta2: f32,
    /// `1 − β2`, rounded from f64.
    pub one_minus_beta2: f32,
    /// `sqrt(1 − β2^t)`.
    pub bias2_sqrt: f32,
    pub eps: f32,
    /// `lr / (1 − β1^t)`.
    pub step_size: f32,
}

/// Adam moments in host memory.
#[derive(Debug)]
enum Moments {
    F32(Vec<f32>, Vec<f32>),
    Bf16(Vec<bf16>, Vec<bf16>),
}

/// One parameter's AdamW state in host memory, updated in place: a step allocates nothing, so
/// it does not pay the page faults of fresh buffers (tens of GB per step at 7B).
#[derive(Debug)]
pub(crate) struct HostState {
    shape: Vec<usize>,
    master: Vec<f32>,
    moments: Moments,
    /// The variable's dtype, which the model's copy is rounded to.
    weight_dtype: DType,
}

/// Room for one parameter's rounded weights on their way to the model, shared by all
/// parameters so that it costs the largest one's size, not the model's.
#[derive(Debug, Default)]
pub(crate) struct WeightScratch {
    bf16: Vec<bf16>,
    f16: Vec<f16>,
}

/// Where the kernel writes the rounded weights.
enum WeightOut<'a> {
    /// The variable is f32: the master is its copy.
    Master,
    Bf16(&'a mut [bf16]),
    F16(&'a mut [f16]),
}

fn to_vec<T: Elem>(t: &Tensor) -> Result<Vec<T>> {
    fn convert<S: Elem, T: Elem>(x: &[S]) -> Vec<T> {
        x.par_iter().map(|&v| T::from_f32(v.to_f32())).collect()
    }
    with_elems(t, |s| {
        Ok(match s {
            Slice::F32(x) => convert(x),
            Slice::Bf16(x) => convert(x),
            Slice::F16(x) => convert(x),
        })
    })
}

impl HostState {
    /// State from saved (or initial) tensors: f32 `master`, moments in f32 or bf16, for a
    /// variable of dtype `weight_dtype`.
    pub(crate) fn new(master: &Tensor, exp_avg: &Tensor, exp_avg_sq: &Tensor, weight_dtype: DType) -> Result<Self> {
        let shape = master.dims().to_vec();
        if exp_avg.dims() != shape.as_slice() || exp_avg_sq.dims() != shape.as_slice() {
            return Err(Error::Input(format!("moments {:?} / {:?} do not match the weights {shape:?}", exp_avg.dims(), exp_avg_sq.dims())));
        }
        if !matches!(weight_dtype, DType::F32 | DType::BF16 | DType::F16) {
            return Err(Error::Input(format!("host AdamW writes f32, bf16 or f16 weights, not {weight_dtype:?}")));
        }
        let moments = match exp_avg.dtype() {
            DType::BF16 => Moments::Bf16(to_vec(exp_avg)?, to_vec(exp_avg_sq)?),
            _ => Moments::F32(to_vec(exp_avg)?, to_vec(exp_avg_sq)?),
        };
        Ok(HostState { shape, master: to_vec(master)?, moments, weight_dtype })
    }

    /// The f32 master weights as a host tensor (a copy).
    pub(crate) fn master(&self) -> Result<Tensor> {
        Ok(Tensor::from_slice(&self.master, self.shape.as_slice(), &Device::Cpu)?)
    }

    /// The two moments as host tensors (copies), in their storage dtype.
    pub(crate) fn moments(&self) -> Result<(Tensor, Tensor)> {
        let shape = self.shape.as_slice();
        Ok(match &self.moments {
            Moments::F32(m, v) => (Tensor::from_slice(m, shape, &Device::Cpu)?, Tensor::from_slice(v, shape, &Device::Cpu)?),
            Moments::Bf16(m, v) => (Tensor::from_slice(m, shape, &Device::Cpu)?, Tensor::from_slice(v, shape, &Device::Cpu)?),
        })
    }

    /// One AdamW step from `grad` (any device, any float dtype) in one pass on all cores;
    /// returns the new weights rounded to the variable's dtype, on `device` (copied there
    /// straight from host memory).
    pub(crate) fn step(&mut self, k: AdamWStep, grad: &Tensor, scratch: &mut WeightScratch, device: &Device) -> Result<Tensor> {
        if grad.dims() != self.shape.as_slice() {
            return Err(Error::Input(format!("gradient {:?} does not match the weights {:?}", grad.dims(), self.shape)));
        }
        let n = self.master.len();
        // The scratch only grows, to the largest parameter's size.
        fn room<T: Elem>(v: &mut Vec<T>, n: usize) -> &mut [T] {
            if v.len() < n {
                v.resize(n, T::from_f32(0.0));
            }
            &mut v[..n]
        }
        let out = match self.weight_dtype {
            DType::BF16 => WeightOut::Bf16(room(&mut scratch.bf16, n)),
            DType::F16 => WeightOut::F16(room(&mut scratch.f16, n)),
            _ => WeightOut::Master,
        };
        with_elems(grad, |g| {
            let theta = &mut self.master;
            match &mut self.moments {
                Moments::F32(m, v) => adamw_for_grad(k, theta, m, v, g, out),
                Moments::Bf16(m, v) => adamw_for_grad(k, theta, m, v, g, out),
            }
            Ok(())
        })?;
        let shape = self.shape.as_slice();
        Ok(match self.weight_dtype {
            DType::BF16 => Tensor::from_slice(&scratch.bf16[..n], shape, device)?,
            DType::F16 => Tensor::from_slice(&scratch.f16[..n], shape, device)?,
            _ => Tensor::from_slice(&self.master, shape, device)?,
        })
    }
}

fn adamw_for_grad<M: Elem>(k: AdamWStep, theta: &mut [f32], m: &mut [M], v: &mut [M], g: Slice<'_>, out: WeightOut<'_>) {
    match g {
        Slice::F32(g) => adamw_for_weight(k, theta, m, v, g, out),
        Slice::Bf16(g) => adamw_for_weight(k, theta, m, v, g, out),
        Slice::F16(g) => adamw_for_weight(k, theta, m, v, g, out),
    }
}

fn adamw_for_weight<M: Elem, G: Elem>(k: AdamWStep, theta: &mut [f32], m: &mut [M], v: &mut [M], g: &[G], out: WeightOut<'_>) {
    match out {
        WeightOut::Master => adamw_in_place::<M, G, f32>(k, theta, m, v, g, None),
        WeightOut::Bf16(w) => adamw_in_place(k, theta, m, v, g, Some(w)),
        WeightOut::F16(w) => adamw_in_place(k, theta, m, v, g, Some(w)),
    }
}

fn adamw_in_place<M: Elem, G: Elem, W: Elem>(k: AdamWStep, theta: &mut [f32], m: &mut [M], v: &mut [M], g: &[G], weight: Option<&mut [W]>) {
    let update = |th: &mut f32, m: &mut M, v: &mut M, g: G| {
        let g = g.to_f32();
        // torch's order: decay the weight, update the moments, then the bias-corrected step.
        if k.decay != 1.0 {
            *th *= k.decay;
        }
        let mi = m.to_f32();
        let mi = mi + (g - mi) * k.one_minus_beta1;
        let vi = v.to_f32() * k.beta2 + g * g * k.one_minus_beta2;
        let denom = vi.sqrt() / k.bias2_sqrt + k.eps;
        *th -= mi / denom * k.step_size;
        (*m, *v) = (M::from_f32(mi), M::from_f32(vi));
    };
    let blocks = theta.par_chunks_mut(CHUNK).zip(m.par_chunks_mut(CHUNK)).zip(v.par_chunks_mut(CHUNK)).zip(g.par_chunks(CHUNK));
    match weight {
        Some(w) => blocks.zip(w.par_chunks_mut(CHUNK)).for_each(|((((th, m), v), g), w)| {
            for i in 0..th.len() {
                update(&mut th[i], &mut m[i], &mut v[i], g[i]);
                w[i] = W::from_f32(th[i]);
            }
        }),
        None => blocks.for_each(|(((th, m), v), g)| {
            for i in 0..th.len() {
                update(&mut th[i], &mut m[i], &mut v[i], g[i]);
            }
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Over more than two blocks (the last one partial), from bf16 and f16 gradients.
    #[test]
    fn sums_norms_and_scaling_match_plain_arithmetic() -> Result<()> {
        let n = 3 * (2 * CHUNK / 3 + 41); // past two blocks and a multiple of 3, for a 2-D shape
        let a: Vec<f32> = (0..n).map(|i| ((i % 97) as f32 - 48.0) / 16.0).collect();
        let b: Vec<f32> = (0..n).map(|i| ((i % 13) as f32 - 6.0) / 4.0).collect();
        let dev = Device::Cpu;
        // Both are exact in bf16 / f16, so the expected values are exact in f32.
        let ga = Tensor::new(a.as_slice(), &dev)?.to_dtype(DType::BF16)?.reshape((n / 3, 3))?;
        let gb = Tensor::new(b.as_slice(), &dev)?.to_dtype(DType::F16)?.reshape((n / 3, 3))?;
        let sum = accumulate(None, &ga, 0.5)?;
        let sum = accumulate(Some(&sum), &gb, 2.0)?;
        assert_eq!((sum.dims(), sum.dtype()), (ga.dims(), DType::F32));
        let got = sum.flatten_all()?.to_vec1::<f32>()?;
        let want: Vec<f32> = a.iter().zip(&b).map(|(x, y)| x * 0.5 + y * 2.0).collect();
        assert_eq!(got, want);

        let norm2 = sum_squares(&sum)?;
        let exact: f64 = want.iter().map(|&x| f64::from(x) * f64::from(x)).sum();
        assert!((norm2 - exact).abs() <= exact * 1e-12, "{norm2} vs {exact}");

        let halved = scaled(&sum, 0.5)?.flatten_all()?.to_vec1::<f32>()?;
        assert!(halved.iter().zip(&want).all(|(h, w)| *h == w * 0.5));

        // A transposed (strided) tensor reads in logical order.
        let m = Tensor::new(want.as_slice(), &dev)?.reshape((n / 3, 3))?;
        let mt = m.t()?.contiguous()?.t()?;
        assert!(!mt.is_contiguous());
        let got = accumulate(None, &mt, 1.0)?.flatten_all()?.to_vec1::<f32>()?;
        assert_eq!(got, want);
        let wide = Tensor::new(want.as_slice(), &dev)?.reshape((3, n / 3))?;
        let got = accumulate(None, &wide.t()?.contiguous()?.t()?, 2.0)?.flatten_all()?.to_vec1::<f32>()?;
        assert!(got.iter().zip(&want).all(|(g, w)| *g == w * 2.0));

        let wrong = Tensor::zeros((3, n / 3), DType::F32, &dev)?;
        assert!(accumulate(Some(&wrong), &ga, 1.0).is_err(), "shapes must match");
        Ok(())
    }
}

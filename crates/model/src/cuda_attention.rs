//! The fused decode-attention kernel (`kernels/decode_attention.cu`, built to PTX by `build.rs` in
//! CUDA builds): one launch per layer and step instead of candle's ~16 ops of
//! [`GroupCache::attend`](crate::group_cache::GroupCache), f32 accumulation in every dtype.
//! `MEDRL_DECODE_ATTENTION=ops` turns it off ([`crate::group_cache::decode_attention_kind`]).
#![allow(unsafe_code)] // kernel launches and uninitialised device buffers are FFI.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{CudaView, DeviceRepr, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::{CpuStorage, CudaStorage, CustomOp1, DType, Layout, Shape, Storage, Tensor, bail};

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/decode_attention.ptx"));
const THREADS: u32 = 128;
/// Shared memory a block may use without opting in.
const SHARED_LIMIT: usize = 48 * 1024;

/// Attention of one new token per row (`q` `[rows, H, 1, D]`) over the prompt keys `prefix`
/// `[N, Hkv, P, D]` (positions below `pads[n]` masked) and the first `len` positions of the
/// row's own `suffix` buffers `[rows, Hkv, C, D]`; `None` where the kernel does not apply (not
/// CUDA, an unsupported dtype, or too long a context for shared memory).
pub(crate) fn decode_attention(q: &Tensor, prefix: (&Tensor, &Tensor), suffix: (&Tensor, &Tensor), pads: &Tensor, samples: usize, len: usize) -> crate::Result<Option<Tensor>> {
    let (rows, heads, one, dim) = q.dims4()?;
    let prefix_len = prefix.0.dim(2)?;
    let shared = (dim + prefix_len + len + 32) * 4;
    if !q.device().is_cuda() || one != 1 || !matches!(q.dtype(), DType::F32 | DType::BF16 | DType::F16) || shared > SHARED_LIMIT {
        return Ok(None);
    }
    let op = DecodeAttention {
        prefix_k: prefix.0.contiguous()?,
        prefix_v: prefix.1.contiguous()?,
        suffix_k: suffix.0.contiguous()?,
        suffix_v: suffix.1.contiguous()?,
        pads: pads.contiguous()?,
        samples,
        len,
    };
    let out = q.contiguous()?.reshape((rows, heads, dim))?.apply_op1_no_bwd(&op)?;
    Ok(Some(out.reshape((rows, heads, 1, dim))?))
}

struct DecodeAttention {
    prefix_k: Tensor,
    prefix_v: Tensor,
    suffix_k: Tensor,
    suffix_v: Tensor,
    pads: Tensor,
    samples: usize,
    len: usize,
}

/// A contiguous tensor's elements on the device.
fn view<'a, T: CudaDType>(storage: &'a CudaStorage, layout: &Layout, what: &str) -> candle_core::Result<CudaView<'a, T>> {
    let Some((start, end)) = layout.contiguous_offsets() else { bail!("decode attention: {what} is not contiguous") };
    Ok(T::as_cuda_slice(storage)?.slice(start..end))
}

impl DecodeAttention {
    fn launch<T: CudaDType + DeviceRepr>(&self, kernel: &str, q: &CudaStorage, q_layout: &Layout) -> candle_core::Result<CudaStorage> {
        let tensors = [&self.prefix_k, &self.prefix_v, &self.suffix_k, &self.suffix_v, &self.pads];
        let guards = tensors.map(|t| t.storage_and_layout());
        let mut storages = Vec::with_capacity(guards.len());
        for (guard, layout) in &guards {
            match &**guard {
                Storage::Cuda(s) => storages.push((s, *layout)),
                _ => bail!("decode attention: every input must be on the GPU"),
            }
        }
        let (rows, heads, dim) = q_layout.shape().dims3()?;
        let (_, kv_heads, prefix_len, _) = self.prefix_k.dims4()?;
        let capacity = self.suffix_k.dim(2)?;
        if heads % kv_heads != 0 || rows % self.samples != 0 || self.len > capacity {
            bail!("decode attention: {rows} rows of {heads} heads over {kv_heads} KV heads, {} samples, {} of {capacity} tokens", self.samples, self.len);
        }
        let dev = q.device();
        let func = dev.get_or_load_custom_func(kernel, "medrl_decode_attention", PTX)?;
        let q = view::<T>(q, q_layout, "q")?;
        let pk = view::<T>(storages[0].0, storages[0].1, "prefix keys")?;
        let pv = view::<T>(storages[1].0, storages[1].1, "prefix values")?;
        let sk = view::<T>(storages[2].0, storages[2].1, "suffix keys")?;
        let sv = view::<T>(storages[3].0, storages[3].1, "suffix values")?;
        let pads = view::<u32>(storages[4].0, storages[4].1, "pads")?;
        // SAFETY: the kernel writes every element before anything reads the buffer.
        let out = unsafe { dev.alloc::<T>(rows * heads * dim)? };
        let dims = [self.samples, heads, kv_heads, prefix_len, capacity, self.len, dim].map(|d| d as u32);
        let scale = 1.0f32 / (dim as f32).sqrt();
        let mut args = func.builder();
        args.arg(&q).arg(&pk).arg(&pv).arg(&sk).arg(&sv).arg(&pads).arg(&out);
        for d in &dims {
            args.arg(d);
        }
        args.arg(&scale);
        let config = LaunchConfig { grid_dim: (rows as u32, heads as u32, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: ((dim + prefix_len + self.len + 32) * 4) as u32 };
        // SAFETY: the argument list matches the kernel's signature; sizes were checked above.
        unsafe { args.launch(config) }.w()?;
        Ok(T::wrap_cuda_slice(out, dev.clone()))
    }
}

impl CustomOp1 for DecodeAttention {
    fn name(&self) -> &'static str {
        "medrl-decode-attention"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        bail!("the fused decode attention runs on CUDA only")
    }

    fn cuda_fwd(&self, q: &CudaStorage, layout: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        let out = match q.dtype() {
            DType::F32 => self.launch::<f32>("decode_attention_f32", q, layout)?,
            DType::BF16 => self.launch::<half::bf16>("decode_attention_bf16", q, layout)?,
            DType::F16 => self.launch::<half::f16>("decode_attention_f16", q, layout)?,
            other => bail!("decode attention: unsupported dtype {other:?}"),
        };
        Ok((out, layout.shape().clone()))
    }
}

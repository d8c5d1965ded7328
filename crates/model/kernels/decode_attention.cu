// One decoding step of attention for a batch in which N prompts have K sample rows each
// (medrl_model::group_cache::GroupCache): every query row attends over its prompt's keys, stored
// once per prompt and left-padded, then over its own sampled tokens' keys. One block per
// (row, query head); a warp scores one key at a time with its lanes across the head dimension
// (coalesced 2-byte loads), then the block normalises in shared memory and each thread sums one
// output dimension over the values. Accumulation is in f32 for every storage type.
//
// Shapes (contiguous): q [rows, H, D]; prefix k/v [N, Hkv, P, D]; suffix k/v [rows, Hkv, C, D] of
// which the first `len` positions are filled; pads [N] (prefix positions j < pads[n] are masked);
// out [rows, H, D]. Shared memory: (D + P + len + 32) floats.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_f32(__half x) { return __half2float(x); }
template <typename T> __device__ __forceinline__ T from_f32(float x);
template <> __device__ __forceinline__ float from_f32<float>(float x) { return x; }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float x) { return __float2bfloat16(x); }
template <> __device__ __forceinline__ __half from_f32<__half>(float x) { return __float2half(x); }

__device__ __forceinline__ float warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Reduces one value per thread over the block; every thread gets the result.
template <bool MAX>
__device__ float block_reduce(float v, float* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  v = MAX ? warp_max(v) : warp_sum(v);
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  float r = MAX ? -INFINITY : 0.0f;
  for (int w = 0; w < warps; ++w) r = MAX ? fmaxf(r, scratch[w]) : r + scratch[w];
  return r;
}

template <typename T>
__device__ void decode_attention(const T* __restrict__ q, const T* __restrict__ pk, const T* __restrict__ pv,
                                 const T* __restrict__ sk, const T* __restrict__ sv, const uint32_t* __restrict__ pads,
                                 T* __restrict__ out, uint32_t samples, uint32_t heads, uint32_t kv_heads,
                                 uint32_t prefix_len, uint32_t capacity, uint32_t len, uint32_t dim, float scale) {
  extern __shared__ float smem[];
  float* query = smem;                       // [dim]
  float* scores = smem + dim;                // [prefix_len + len]
  float* scratch = scores + prefix_len + len;  // [32]
  const uint32_t row = blockIdx.x, head = blockIdx.y;
  const uint32_t prompt = row / samples, kv = head / (heads / kv_heads);
  const uint32_t pad = pads[prompt], total = prefix_len + len;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;

  const T* qrow = q + ((size_t)row * heads + head) * dim;
  for (uint32_t d = threadIdx.x; d < dim; d += blockDim.x) query[d] = to_f32(qrow[d]) * scale;
  __syncthreads();

  const T* pk_base = pk + ((size_t)prompt * kv_heads + kv) * prefix_len * dim;
  const T* sk_base = sk + ((size_t)row * kv_heads + kv) * capacity * dim;
  float local_max = -INFINITY;
  for (uint32_t j = warp; j < total; j += warps) {
    float s = -INFINITY;
    if (j >= pad) {
      const T* key = j < prefix_len ? pk_base + (size_t)j * dim : sk_base + (size_t)(j - prefix_len) * dim;
      float acc = 0.0f;
      for (uint32_t d = lane; d < dim; d += 32) acc += query[d] * to_f32(key[d]);
      s = warp_sum(acc);
    }
    if (lane == 0) scores[j] = s;
    local_max = fmaxf(local_max, s);
  }
  const float max = block_reduce<true>(local_max, scratch);  // syncs: every score is stored
  float local_sum = 0.0f;
  for (uint32_t j = threadIdx.x; j < total; j += blockDim.x) {
    const float e = j < pad ? 0.0f : __expf(scores[j] - max);
    scores[j] = e;
    local_sum += e;
  }
  const float inv = 1.0f / block_reduce<false>(local_sum, scratch);  // syncs: every weight is stored

  const T* pv_base = pv + ((size_t)prompt * kv_heads + kv) * prefix_len * dim;
  const T* sv_base = sv + ((size_t)row * kv_heads + kv) * capacity * dim;
  T* orow = out + ((size_t)row * heads + head) * dim;
  for (uint32_t d = threadIdx.x; d < dim; d += blockDim.x) {
    float acc = 0.0f;
    for (uint32_t j = pad; j < prefix_len; ++j) acc += scores[j] * to_f32(pv_base[(size_t)j * dim + d]);
    for (uint32_t j = 0; j < len; ++j) acc += scores[prefix_len + j] * to_f32(sv_base[(size_t)j * dim + d]);
    orow[d] = from_f32<T>(acc * inv);
  }
}

#define DECODE_ATTENTION(NAME, T)                                                                          \
  extern "C" __global__ void NAME(const T* q, const T* pk, const T* pv, const T* sk, const T* sv,           \
                                  const uint32_t* pads, T* out, uint32_t samples, uint32_t heads,           \
                                  uint32_t kv_heads, uint32_t prefix_len, uint32_t capacity, uint32_t len,  \
                                  uint32_t dim, float scale) {                                              \
    decode_attention<T>(q, pk, pv, sk, sv, pads, out, samples, heads, kv_heads, prefix_len, capacity, len, \
                        dim, scale);                                                                        \
  }

DECODE_ATTENTION(decode_attention_f32, float)
DECODE_ATTENTION(decode_attention_bf16, __nv_bfloat16)
DECODE_ATTENTION(decode_attention_f16, __half)

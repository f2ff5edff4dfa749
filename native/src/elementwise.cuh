// The small kernels between matrix products on the prefill / large-batch path (the decode GEMV path fuses
// them into its prologues and epilogues). Each moves a few KB per token: bandwidth- and launch-bound.
#pragma once
#include "common.cuh"
#include "gemv.cuh"

namespace decima {

// residual[t][:] = embed[tokens[t]][:] (fp32 residual stream). Bytes: 2 x hidden per token read, 4 x written.
template <typename T>
__global__ void embedding_kernel(const T* __restrict__ embed, const int* __restrict__ tokens, float* __restrict__ resid, int hidden) {
  pdl_wait();
  pdl_launch_dependents();  // the step's first kernel: see pdl_wait
  const int t = blockIdx.x;
  const uint4* src = reinterpret_cast<const uint4*>(embed + (size_t)tokens[t] * hidden);
  float* dst = resid + (size_t)t * hidden;
  for (int c = threadIdx.x; c < hidden / 8; c += blockDim.x) {
    float f[8];
    unpack8(src[c], f, T());
    reinterpret_cast<float4*>(dst + c * 8)[0] = make_float4(f[0], f[1], f[2], f[3]);
    reinterpret_cast<float4*>(dst + c * 8)[1] = make_float4(f[4], f[5], f[6], f[7]);
  }
}

// out[i][:] = RMSNorm(residual[rows ? rows[i] : i][:]) as T; `rows` gathers (e.g. each sequence's last
// token before the LM head). Bytes: 4 x hidden read, 2 x hidden written per row.
template <typename T>
__global__ void rmsnorm_kernel(const float* __restrict__ resid, const int* __restrict__ rows, const T* __restrict__ gain,
                               T* __restrict__ out, int hidden, float eps) {
  __shared__ float scratch[32];
  pdl_launch_dependents();
  pdl_wait();
  const int src_row = rows ? rows[blockIdx.x] : blockIdx.x;
  const float* r = resid + (size_t)src_row * hidden;
  float ss = 0.f;
  for (int k = threadIdx.x; k < hidden; k += blockDim.x) ss += r[k] * r[k];
  const float rstd = rsqrtf(block_sum(ss, scratch) / hidden + eps);
  T* o = out + (size_t)blockIdx.x * hidden;
  for (int k = threadIdx.x; k < hidden; k += blockDim.x) o[k] = from_float<T>(r[k] * rstd * to_float(gain[k]));
}

// From a fused QKV product [tokens][(heads + 2 kv_heads) x hd]: rotate Q and K, write Q to `q`, K and V into
// the paged cache. One block per token, one thread per rotation pair.
template <typename T>
__global__ void rope_kv_write_kernel(const T* __restrict__ qkv, int hd, int heads, int kv_heads, int block_size, T* __restrict__ q,
                                     T* __restrict__ k_cache, T* __restrict__ v_cache, RopeArgs rope) {
  pdl_launch_dependents();
  pdl_wait();
  const int t = blockIdx.x, half = hd / 2;
  const int width = (heads + 2 * kv_heads) * hd;
  const int pos = rope.positions[t], slot = rope.slots[t];
  for (int i = threadIdx.x; i < (heads + 2 * kv_heads) * half; i += blockDim.x) {
    const int head = i / half, p = i % half;
    const T* src = qkv + (size_t)t * width + head * hd + p;
    float x1 = to_float(src[0]), x2 = to_float(src[half]);
    if (head < heads + kv_heads) {
      const float2 cs = rope.table[(size_t)pos * half + p];
      const float y1 = x1 * cs.x - x2 * cs.y, y2 = x2 * cs.x + x1 * cs.y;
      x1 = y1;
      x2 = y2;
    }
    T* dst;
    if (head < heads) {
      dst = q + (size_t)t * heads * hd + head * hd + p;
    } else {
      const bool is_k = head < heads + kv_heads;
      const int g = is_k ? head - heads : head - heads - kv_heads;
      dst = (is_k ? k_cache : v_cache) + kv_index(slot, g, kv_heads, block_size, hd) + p;
    }
    dst[0] = from_float<T>(x1);
    dst[half] = from_float<T>(x2);
  }
}

// act[t][i] = silu(gate[t][i]) * up[t][i], from the packed [gate | up] product. Bytes: 4 x inter read, 2 written.
template <typename T>
__global__ void silu_mul_kernel(const T* __restrict__ gate_up, T* __restrict__ act, int inter) {
  pdl_launch_dependents();
  pdl_wait();
  const int t = blockIdx.y;
  const T* g = gate_up + (size_t)t * 2 * inter;
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < inter; i += gridDim.x * blockDim.x) {
    const float gv = to_float(g[i]), uv = to_float(g[inter + i]);
    act[(size_t)t * inter + i] = from_float<T>(gv / (1.f + __expf(-gv)) * uv);
  }
}

}  // namespace decima

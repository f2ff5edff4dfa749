// Decode-time matrix-vector products for 1 to 8 activation rows: y[b][r] = sum_k W[r][k] x[b][k].
//
// Bytes: every weight once (rows x cols x 2), activations from shared memory. FLOPs: 2 x rows x cols x B,
// far under the tensor cores' rate, so the limit is memory bandwidth: the goal is to stream W at its rate.
// Each warp owns whole rows (1 or 2) over the full width, with 16-byte loads, U loads per row in flight per
// lane, and the first loads issued before waiting for the previous kernel (PDL), so a kernel's weight stream
// starts while the one before it drains. The small work around the product is fused in: a prologue that
// builds the input (plain copy, or RMSNorm of the fp32 residual stream) in shared memory, and an epilogue
// that consumes the dot products (residual add, RoPE + KV-cache write, SiLU(gate) x up, fp32 logits).
#pragma once
#include "common.cuh"

namespace decima {

constexpr int kGemvWarps = 8;
constexpr int kGemvThreads = kGemvWarps * 32;

// ---- prologues: fill xs[b][k] (B rows of `cols` values, type T) -----------------------------------------

template <typename T> struct ProPlain {
  const T* x;  // [batch][ld]
  int ld;
  __device__ void load(T* xs, int B, int batch, int cols, float*) const {
    const int chunks = cols / 8;
    for (int i = threadIdx.x; i < B * chunks; i += blockDim.x) {
      const int b = i / chunks, c = i % chunks;
      uint4 v = make_uint4(0, 0, 0, 0);
      if (b < batch) v = reinterpret_cast<const uint4*>(x + (size_t)b * ld)[c];
      reinterpret_cast<uint4*>(xs + (size_t)b * cols)[c] = v;
    }
  }
};

// Llama's RMSNorm of the fp32 residual stream, rounded once to T: x * rsqrt(mean(x^2) + eps) * gain.
template <typename T> struct ProRmsNorm {
  const float* resid;  // [batch][ld]
  int ld;
  const T* gain;
  float eps;
  __device__ void load(T* xs, int B, int batch, int cols, float* scratch) const {
    for (int b = 0; b < B; b++) {
      const float* r = resid + (size_t)b * ld;
      float ss = 0.f;
      if (b < batch)
        for (int k = threadIdx.x * 4; k < cols; k += blockDim.x * 4) {
          float4 v = *reinterpret_cast<const float4*>(r + k);
          ss += v.x * v.x + v.y * v.y + v.z * v.z + v.w * v.w;
        }
      const float rstd = rsqrtf(block_sum(ss, scratch) / cols + eps);
      for (int k = threadIdx.x; k < cols; k += blockDim.x)
        xs[(size_t)b * cols + k] = b < batch ? from_float<T>(r[k] * rstd * to_float(gain[k])) : from_float<T>(0.f);
    }
  }
};

// ---- epilogues: which rows a warp owns, and what becomes of their dot products (stored by lane 0) --------

// One row per warp, consecutive across the grid.
struct RowsLinear {
  static constexpr int ROWS = 1;
  int rows;
  __device__ bool map(int block, int warp, int r[1]) const {
    r[0] = block * kGemvWarps + warp;
    return r[0] < rows;
  }
  static int blocks(int rows) { return ceil_div(rows, kGemvWarps); }
};

// residual[b][r] += y: the O and down projections write straight into the fp32 residual stream.
struct EpiResidual : RowsLinear {
  float* resid;
  int ld;
  template <int B> __device__ void store(const int r[1], const float (&acc)[1][B], int batch) const {
#pragma unroll
    for (int b = 0; b < B; b++)
      if (b < batch) resid[(size_t)b * ld + r[0]] += acc[0][b];
  }
};

// fp32 logits for the sampler.
struct EpiLogits : RowsLinear {
  float* out;
  int ld;
  template <int B> __device__ void store(const int r[1], const float (&acc)[1][B], int batch) const {
#pragma unroll
    for (int b = 0; b < B; b++)
      if (b < batch) out[(size_t)b * ld + r[0]] = acc[0][b];
  }
};

// Plain T output (used where a product feeds a separate kernel, and by tests).
template <typename T> struct EpiStore : RowsLinear {
  T* out;
  int ld;
  template <int B> __device__ void store(const int r[1], const float (&acc)[1][B], int batch) const {
#pragma unroll
    for (int b = 0; b < B; b++)
      if (b < batch) out[(size_t)b * ld + r[0]] = from_float<T>(acc[0][b]);
  }
};

// Gate/up packed as [gate; up]: a warp takes gate row i and up row i and writes silu(g) * u.
template <typename T> struct EpiSiluMul {
  static constexpr int ROWS = 2;
  int inter;
  T* out;
  int ld;
  __device__ bool map(int block, int warp, int r[2]) const {
    r[0] = block * kGemvWarps + warp;
    r[1] = r[0] + inter;
    return r[0] < inter;
  }
  static int blocks(int inter) { return ceil_div(inter, kGemvWarps); }
  template <int B> __device__ void store(const int r[2], const float (&acc)[2][B], int batch) const {
#pragma unroll
    for (int b = 0; b < B; b++) {
      if (b >= batch) continue;
      const float g = acc[0][b], u = acc[1][b];
      out[(size_t)b * ld + r[0]] = from_float<T>(g / (1.f + __expf(-g)) * u);
    }
  }
};

// Where a token's K and V go: slot = block * block_size + offset; cache layout [block][kv_head][offset][HD].
__device__ __forceinline__ size_t kv_index(int slot, int kv_head, int kv_heads, int block_size, int hd) {
  const int block = slot / block_size, off = slot % block_size;
  return (((size_t)block * kv_heads + kv_head) * block_size + off) * hd;
}

// Rotary embedding as Hugging Face's Llama applies it (rotate_half): element p pairs with p + HD/2.
// `rope` holds (cos, sin) per position and frequency, [max_pos][HD/2].
struct RopeArgs {
  const float2* table;
  const int* positions;  // per token
  const int* slots;      // per token: where its K/V go
};

// Fused Q/K/V: rows are [Q heads | K heads | V heads] x HD. A warp takes a rotation pair (p, p + HD/2) of
// one head, so RoPE is applied before anything is written; K and V go straight into the paged cache.
template <typename T> struct EpiQkvRope {
  static constexpr int ROWS = 2;
  int hd, heads, kv_heads, block_size;
  T* q;  // [batch][q_ld]
  int q_ld;
  T* k_cache;
  T* v_cache;
  RopeArgs rope;
  __device__ bool map(int block, int warp, int r[2]) const {
    const int per_head = hd / 2 / kGemvWarps;  // blocks per head
    const int head = block / per_head, p = (block % per_head) * kGemvWarps + warp;
    r[0] = head * hd + p;
    r[1] = r[0] + hd / 2;
    return head < heads + 2 * kv_heads;
  }
  static int blocks(int hd, int heads, int kv_heads) { return (heads + 2 * kv_heads) * (hd / 2 / kGemvWarps); }
  template <int B> __device__ void store(const int r[2], const float (&acc)[2][B], int batch) const {
    const int head = r[0] / hd, p = r[0] % hd;
#pragma unroll
    for (int b = 0; b < B; b++) {
      if (b >= batch) continue;
      float x1 = acc[0][b], x2 = acc[1][b];
      if (head < heads + kv_heads) {  // Q and K rotate; V does not
        const float2 cs = rope.table[(size_t)rope.positions[b] * (hd / 2) + p];
        const float y1 = x1 * cs.x - x2 * cs.y, y2 = x2 * cs.x + x1 * cs.y;
        x1 = y1;
        x2 = y2;
      }
      T* dst;
      if (head < heads) {
        dst = q + (size_t)b * q_ld + head * hd + p;
      } else {
        const int slot = rope.slots[b];
        const bool is_k = head < heads + kv_heads;
        const int g = is_k ? head - heads : head - heads - kv_heads;
        dst = (is_k ? k_cache : v_cache) + kv_index(slot, g, kv_heads, block_size, hd) + p;
      }
      dst[0] = from_float<T>(x1);
      dst[hd / 2] = from_float<T>(x2);
    }
  }
};

// ---- the kernel ------------------------------------------------------------------------------------------

__device__ __forceinline__ uint4 load_stream(const uint4* p) { return __ldcs(p); }

template <typename T, int B, int U, class Pro, class Epi>
__global__ void __launch_bounds__(kGemvThreads) gemv_kernel(const T* __restrict__ w, int cols, int batch, Pro pro, Epi epi) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  __shared__ float scratch[32];
  T* xs = reinterpret_cast<T*>(smem_raw);
  constexpr int R = Epi::ROWS;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int chunks = cols / 8;

  int row[R];
  const bool active = epi.map(blockIdx.x, warp, row);
  const uint4* wrow[R];
#pragma unroll
  for (int i = 0; i < R; i++) wrow[i] = reinterpret_cast<const uint4*>(w + (size_t)(active ? row[i] : 0) * cols);

  // Weights depend on nothing earlier in the step: start streaming them before waiting.
  uint4 buf[R][U];
#pragma unroll
  for (int u = 0; u < U; u++) {
    const int c = lane + 32 * u;
#pragma unroll
    for (int i = 0; i < R; i++) buf[i][u] = (active && c < chunks) ? load_stream(wrow[i] + c) : make_uint4(0, 0, 0, 0);
  }
  pdl_launch_dependents();
  pdl_wait();
  pro.load(xs, B, batch, cols, scratch);
  __syncthreads();
  if (!active) return;

  float acc[R][B];
#pragma unroll
  for (int i = 0; i < R; i++)
#pragma unroll
    for (int b = 0; b < B; b++) acc[i][b] = 0.f;

  for (int c0 = lane; c0 < chunks; c0 += 32 * U) {
    uint4 next[R][U];
#pragma unroll
    for (int u = 0; u < U; u++) {
      const int c = c0 + 32 * (U + u);
#pragma unroll
      for (int i = 0; i < R; i++) next[i][u] = c < chunks ? load_stream(wrow[i] + c) : make_uint4(0, 0, 0, 0);
    }
#pragma unroll
    for (int u = 0; u < U; u++) {
      const int c = c0 + 32 * u;
      if (c >= chunks) break;
      float wf[R][8];
#pragma unroll
      for (int i = 0; i < R; i++) unpack8(buf[i][u], wf[i], T());
#pragma unroll
      for (int b = 0; b < B; b++) {
        float xf[8];
        unpack8(reinterpret_cast<const uint4*>(xs + (size_t)b * cols)[c], xf, T());
#pragma unroll
        for (int i = 0; i < R; i++)
#pragma unroll
          for (int j = 0; j < 8; j++) acc[i][b] = fmaf(wf[i][j], xf[j], acc[i][b]);
      }
    }
#pragma unroll
    for (int u = 0; u < U; u++)
#pragma unroll
      for (int i = 0; i < R; i++) buf[i][u] = next[i][u];
  }
#pragma unroll
  for (int i = 0; i < R; i++)
#pragma unroll
    for (int b = 0; b < B; b++) acc[i][b] = warp_sum(acc[i][b]);
  if (lane == 0) epi.template store<B>(row, acc, batch);
}

template <typename T, int B, class Pro, class Epi>
void gemv_launch_b(const Launch& l, const T* w, int cols, int batch, int blocks, const Pro& pro, const Epi& epi) {
  constexpr int U = B <= 2 ? 4 : 2;
  auto kernel = gemv_kernel<T, B, U, Pro, Epi>;
  const size_t smem = (size_t)B * cols * sizeof(T);
  static size_t configured = 48 * 1024;  // per instantiation: raise the dynamic shared-memory limit once
  if (smem > configured) {
    CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
    configured = smem;
  }
  launch(l, kernel, dim3(blocks), dim3(kGemvThreads), smem, w, cols, batch, pro, epi);
}

constexpr int kGemvMaxBatch = 8;

// Dispatch on the batch: B is the smallest of 1, 2, 4, 8 that holds it.
template <typename T, class Pro, class Epi>
void gemv(const Launch& l, const T* w, int cols, int batch, int blocks, const Pro& pro, const Epi& epi) {
  if (batch <= 1) gemv_launch_b<T, 1>(l, w, cols, batch, blocks, pro, epi);
  else if (batch <= 2) gemv_launch_b<T, 2>(l, w, cols, batch, blocks, pro, epi);
  else if (batch <= 4) gemv_launch_b<T, 4>(l, w, cols, batch, blocks, pro, epi);
  else if (batch <= 8) gemv_launch_b<T, 8>(l, w, cols, batch, blocks, pro, epi);
  else throw CudaError("gemv: batch " + std::to_string(batch) + " is over " + std::to_string(kGemvMaxBatch));
}

}  // namespace decima

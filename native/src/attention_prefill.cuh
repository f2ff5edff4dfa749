// Prefill attention: many query tokens per sequence, causal, grouped-query, over the paged KV cache (which
// already holds this step's K and V). FlashAttention-2 style on the tensor cores (mma.sync m16n8k16, fp32
// accumulation): a block takes 64 queries of one head, each of its 4 warps 16 of them, and walks the keys
// in tiles of 64 with an online softmax, so scores never leave registers.
// FLOPs: 4 x queries x keys x hd / 2 (causal); bytes: K and V tiles from L2, re-read by each query block and
// head of a group. Compute-bound for long prompts.
#pragma once
#include "common.cuh"
#include "gemv.cuh"

namespace decima {

constexpr int kPrefillRows = 64;  // queries per block
constexpr int kPrefillKeys = 64;  // keys per tile
constexpr int kPrefillThreads = 128;

struct PrefillAttnArgs {
  const int* seqs;
  const int* query_starts;
  const int* context_lens;
  const int* block_tables;
  int table_width;
  int heads, kv_heads, block_size;
  float scale_log2;  // log2(e) / sqrt(hd): softmax in base 2
};

template <typename T> __device__ __forceinline__ uint32_t pack2(float a, float b);
template <> __device__ __forceinline__ uint32_t pack2<half>(float a, float b) {
  half2 h = __floats2half2_rn(a, b);
  return *reinterpret_cast<uint32_t*>(&h);
}
template <> __device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float a, float b) {
  __nv_bfloat162 h = __floats2bfloat162_rn(a, b);
  return *reinterpret_cast<uint32_t*>(&h);
}

// (a, b) as a packed pair of T, and the rounding error left over, also as T.
template <typename T> __device__ __forceinline__ void split2(float a, float b, uint32_t& hi, uint32_t& lo) {
  hi = pack2<T>(a, b);
  const T* h = reinterpret_cast<const T*>(&hi);
  lo = pack2<T>(a - to_float(h[0]), b - to_float(h[1]));
}

// D += A (16x16, row) x B (16x8, col), fp32 accumulators.
__device__ __forceinline__ void mma16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1, half) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
__device__ __forceinline__ void mma16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1, __nv_bfloat16) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

template <int HD> __host__ __device__ constexpr int tile_stride() { return HD + 8; }  // 16-byte rows, no conflicts

template <typename T, int HD>
__global__ void __launch_bounds__(kPrefillThreads)
    attention_prefill_kernel(const T* __restrict__ q, int q_ld, const T* __restrict__ k_cache, const T* __restrict__ v_cache,
                             T* __restrict__ out, int out_ld, PrefillAttnArgs a) {
  __shared__ __align__(16) T ks[kPrefillKeys * tile_stride<HD>()];
  __shared__ __align__(16) T vs[kPrefillKeys * tile_stride<HD>()];
  pdl_launch_dependents();
  pdl_wait();

  const int s = a.seqs[blockIdx.z], h = blockIdx.y;
  const int g = h / (a.heads / a.kv_heads);
  const int qs0 = a.query_starts[s], qlen = a.query_starts[s + 1] - qs0;
  const int ctx = a.context_lens[s], first_pos = ctx - qlen;
  const int q0 = blockIdx.x * kPrefillRows;
  if (q0 >= qlen) return;
  const int* table = a.block_tables + (size_t)s * a.table_width;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int quad = lane >> 2, tig = lane & 3;

  // This thread's two query rows (r and r + 8 of the warp's 16) and their positions.
  const int r0 = q0 + warp * 16 + quad, r1 = r0 + 8;
  const int pos0 = r0 < qlen ? first_pos + r0 : -1, pos1 = r1 < qlen ? first_pos + r1 : -1;

  // Q fragments for the warp's 16 rows, HD/16 k-steps.
  uint32_t qa[HD / 16][4];
  auto qword = [&](int r, int col) -> uint32_t {
    if (r >= qlen) return 0u;
    return *reinterpret_cast<const uint32_t*>(q + (size_t)(qs0 + r) * q_ld + h * HD + col);
  };
#pragma unroll
  for (int kk = 0; kk < HD / 16; kk++) {
    const int col = kk * 16 + tig * 2;
    qa[kk][0] = qword(r0, col);
    qa[kk][1] = qword(r1, col);
    qa[kk][2] = qword(r0, col + 8);
    qa[kk][3] = qword(r1, col + 8);
  }

  float o[HD / 8][4];
#pragma unroll
  for (int n = 0; n < HD / 8; n++) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f;
  float m0 = -INFINITY, m1 = -INFINITY, l0 = 0.f, l1 = 0.f;

  const int last_row = min(q0 + kPrefillRows, qlen) - 1;
  const int kv_end = first_pos + last_row + 1;  // keys this block needs
  for (int j0 = 0; j0 < kv_end; j0 += kPrefillKeys) {
    __syncthreads();  // the previous tile is no longer read
    for (int i = threadIdx.x; i < kPrefillKeys * (HD / 8); i += blockDim.x) {
      const int t = i / (HD / 8), c = i % (HD / 8), pos = j0 + t;
      uint4 kv4 = make_uint4(0, 0, 0, 0), vv4 = make_uint4(0, 0, 0, 0);
      if (pos < kv_end) {
        const int slot = table[pos / a.block_size] * a.block_size + pos % a.block_size;
        const size_t idx = kv_index(slot, g, a.kv_heads, a.block_size, HD) + c * 8;
        kv4 = *reinterpret_cast<const uint4*>(k_cache + idx);
        vv4 = *reinterpret_cast<const uint4*>(v_cache + idx);
      }
      *reinterpret_cast<uint4*>(ks + t * tile_stride<HD>() + c * 8) = kv4;
      *reinterpret_cast<uint4*>(vs + t * tile_stride<HD>() + c * 8) = vv4;
    }
    __syncthreads();

    // S = Q K^T for 16 rows x 64 keys: 8 tiles of 8 keys.
    float sc[kPrefillKeys / 8][4];
#pragma unroll
    for (int n = 0; n < kPrefillKeys / 8; n++) {
      sc[n][0] = sc[n][1] = sc[n][2] = sc[n][3] = 0.f;
      const T* krow = ks + (n * 8 + quad) * tile_stride<HD>() + tig * 2;
#pragma unroll
      for (int kk = 0; kk < HD / 16; kk++) {
        const uint32_t b0 = *reinterpret_cast<const uint32_t*>(krow + kk * 16);
        const uint32_t b1 = *reinterpret_cast<const uint32_t*>(krow + kk * 16 + 8);
        mma16816(sc[n], qa[kk], b0, b1, T());
      }
    }
    // Causal mask, scale, running max.
    float mx0 = m0, mx1 = m1;
#pragma unroll
    for (int n = 0; n < kPrefillKeys / 8; n++) {
#pragma unroll
      for (int e = 0; e < 2; e++) {
        const int key = j0 + n * 8 + tig * 2 + e;
        sc[n][e] = key <= pos0 ? sc[n][e] * a.scale_log2 : -INFINITY;
        sc[n][2 + e] = key <= pos1 ? sc[n][2 + e] * a.scale_log2 : -INFINITY;
        mx0 = fmaxf(mx0, sc[n][e]);
        mx1 = fmaxf(mx1, sc[n][2 + e]);
      }
    }
#pragma unroll
    for (int off = 1; off <= 2; off <<= 1) {
      mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, off));
      mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, off));
    }
    // Rows with nothing visible yet keep max -inf; subtract 0 there so exp2 gives 0, not NaN.
    const float base0 = mx0 == -INFINITY ? 0.f : mx0, base1 = mx1 == -INFINITY ? 0.f : mx1;
    const float alpha0 = exp2f(m0 - base0), alpha1 = exp2f(m1 - base1);
    m0 = mx0;
    m1 = mx1;
    l0 *= alpha0;
    l1 *= alpha1;
#pragma unroll
    for (int n = 0; n < HD / 8; n++) {
      o[n][0] *= alpha0;
      o[n][1] *= alpha0;
      o[n][2] *= alpha1;
      o[n][3] *= alpha1;
    }
#pragma unroll
    for (int n = 0; n < kPrefillKeys / 8; n++) {
      sc[n][0] = exp2f(sc[n][0] - base0);
      sc[n][1] = exp2f(sc[n][1] - base0);
      sc[n][2] = exp2f(sc[n][2] - base1);
      sc[n][3] = exp2f(sc[n][3] - base1);
      l0 += sc[n][0] + sc[n][1];
      l1 += sc[n][2] + sc[n][3];
    }
    // O += P V: the score accumulators of two adjacent key tiles are exactly an A fragment. P goes in as
    // two 16-bit parts (P = hi + lo), so the products keep ~16 bits of P, as the fp32 decode kernel does.
#pragma unroll
    for (int kt = 0; kt < kPrefillKeys / 16; kt++) {
      uint32_t hi[4], lo[4];
      split2<T>(sc[2 * kt][0], sc[2 * kt][1], hi[0], lo[0]);
      split2<T>(sc[2 * kt][2], sc[2 * kt][3], hi[1], lo[1]);
      split2<T>(sc[2 * kt + 1][0], sc[2 * kt + 1][1], hi[2], lo[2]);
      split2<T>(sc[2 * kt + 1][2], sc[2 * kt + 1][3], hi[3], lo[3]);
      const int key = kt * 16 + tig * 2;
#pragma unroll
      for (int n = 0; n < HD / 8; n++) {
        const T* vcol = vs + n * 8 + quad;
        T b01[2] = {vcol[key * tile_stride<HD>()], vcol[(key + 1) * tile_stride<HD>()]};
        T b23[2] = {vcol[(key + 8) * tile_stride<HD>()], vcol[(key + 9) * tile_stride<HD>()]};
        const uint32_t b0 = *reinterpret_cast<uint32_t*>(b01), b1 = *reinterpret_cast<uint32_t*>(b23);
        mma16816(o[n], hi, b0, b1, T());
        mma16816(o[n], lo, b0, b1, T());
      }
    }
  }

#pragma unroll
  for (int off = 1; off <= 2; off <<= 1) {
    l0 += __shfl_xor_sync(0xffffffffu, l0, off);
    l1 += __shfl_xor_sync(0xffffffffu, l1, off);
  }
  const float inv0 = l0 > 0.f ? 1.f / l0 : 0.f, inv1 = l1 > 0.f ? 1.f / l1 : 0.f;
#pragma unroll
  for (int n = 0; n < HD / 8; n++) {
    const int col = h * HD + n * 8 + tig * 2;
    if (r0 < qlen) *reinterpret_cast<uint32_t*>(out + (size_t)(qs0 + r0) * out_ld + col) = pack2<T>(o[n][0] * inv0, o[n][1] * inv0);
    if (r1 < qlen) *reinterpret_cast<uint32_t*>(out + (size_t)(qs0 + r1) * out_ld + col) = pack2<T>(o[n][2] * inv1, o[n][3] * inv1);
  }
}

template <typename T, int HD>
void attention_prefill(const Launch& l, int num_seqs, int max_query_len, const T* q, int q_ld, const T* k_cache, const T* v_cache,
                       T* out, int out_ld, const PrefillAttnArgs& a) {
  launch(l, attention_prefill_kernel<T, HD>, dim3(ceil_div(max_query_len, kPrefillRows), a.heads, num_seqs), dim3(kPrefillThreads), 0,
         q, q_ld, k_cache, v_cache, out, out_ld, a);
}

}  // namespace decima

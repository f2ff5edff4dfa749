// Decode attention (one new query token per sequence) over the paged KV cache, flash-decoding style.
//
// One block per (sequence, KV head, partition of kPartition positions). It serves every query head that
// shares the KV head (grouped-query attention), so each K and V vector is read once for all of them. Its 8
// warps split the partition 64 positions each: a lane scores two positions against every query head, a
// block-wide softmax per head follows, then each warp sums its positions' V rows (a lane per pair of
// dimensions) and the warps' sums meet in shared memory. Contexts longer than one partition spread over
// several blocks, and the last block of a (sequence, KV head) to finish merges their partial results (no
// second kernel). Bytes: the context's K and V once (context x kv_heads x hd x 2 x 2); FLOPs: 4 x context x
// heads x hd. Memory- and latency-bound: the kernel is built for few dependent memory round trips.
#pragma once
#include "common.cuh"
#include "gemv.cuh"

namespace decima {

constexpr int kPartition = 512;
constexpr int kDecodeWarps = 8;
constexpr int kDecodeThreads = kDecodeWarps * 32;
constexpr int kWarpPositions = kPartition / kDecodeWarps;  // 64: two per lane

struct DecodeAttnArgs {
  const int* seqs;          // which sequences (indices into the per-sequence arrays)
  const int* query_starts;  // token row of each sequence's query
  const int* context_lens;
  const int* block_tables;  // [seq][table_width]
  int table_width;
  int heads, kv_heads, block_size, max_partitions;
  float scale;
  float* part_m;  // [seq][heads][max_partitions]
  float* part_l;
  float* part_o;  // [seq][heads][max_partitions][hd]
  int* counters;  // [seq][kv_heads], zero between launches
};

template <int HD> size_t attention_decode_smem(int group) {
  return sizeof(float) * ((size_t)group * HD                     // queries
                          + (size_t)group * kPartition           // scores, then probabilities
                          + (size_t)kDecodeWarps * group * HD)   // per-warp outputs
         + sizeof(int) * (kPartition + 2 * group);               // slots, then (max, sum) per head
}

// G: query heads per KV head, a compile-time constant so that the per-head sums stay in registers.
template <typename T, int HD, int G>
__global__ void __launch_bounds__(kDecodeThreads)
    attention_decode_kernel(const T* __restrict__ q, int q_ld, const T* __restrict__ k_cache, const T* __restrict__ v_cache,
                            T* __restrict__ out, int out_ld, DecodeAttnArgs a) {
  static_assert(HD % 64 == 0, "a lane takes HD / 32 dimensions");
  constexpr int DL = HD / 32;  // dimensions per lane in the V sums
  extern __shared__ __align__(16) unsigned char smem_raw[];
  constexpr int group = G;
  float* qs = reinterpret_cast<float*>(smem_raw);   // [group][HD]
  float* sc = qs + group * HD;                      // [group][kPartition]
  float* wo = sc + group * kPartition;              // [warp][group][HD]
  int* slots = reinterpret_cast<int*>(wo + kDecodeWarps * group * HD);  // [kPartition]
  float* stats = reinterpret_cast<float*>(slots + kPartition);          // [group][2]
  __shared__ int is_last;

  pdl_launch_dependents();
  pdl_wait();
  const int part = blockIdx.x, g = blockIdx.y, s = a.seqs[blockIdx.z];
  const int ctx = a.context_lens[s];
  const int parts = ceil_div(ctx, kPartition);
  if (part >= parts) return;
  const int t0 = part * kPartition, n = min(kPartition, ctx - t0);
  const int row = a.query_starts[s];
  const int* table = a.block_tables + (size_t)s * a.table_width;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;

  for (int i = threadIdx.x; i < group * HD; i += blockDim.x) qs[i] = to_float(q[(size_t)row * q_ld + g * group * HD + i]) * a.scale;
  for (int t = threadIdx.x; t < n; t += blockDim.x) {
    const int pos = t0 + t;
    slots[t] = table[pos / a.block_size] * a.block_size + pos % a.block_size;
  }
  __syncthreads();

  // Scores: a lane takes positions lane and lane + 32 of its warp's 64, against every query head.
#pragma unroll
  for (int e = 0; e < 2; e++) {
    const int t = warp * kWarpPositions + lane + 32 * e;
    uint4 k[HD / 8];
    if (t < n) {
      const uint4* src = reinterpret_cast<const uint4*>(k_cache + kv_index(slots[t], g, a.kv_heads, a.block_size, HD));
#pragma unroll
      for (int c = 0; c < HD / 8; c++) k[c] = src[c];
    }
    for (int h = 0; h < group; h++) {
      float acc = 0.f;
#pragma unroll
      for (int c = 0; c < HD / 8; c++) {
        float kf[8];
        unpack8(k[c], kf, T());
#pragma unroll
        for (int j = 0; j < 8; j++) acc = fmaf(qs[h * HD + c * 8 + j], kf[j], acc);
      }
      sc[h * kPartition + t] = t < n ? acc : -INFINITY;
    }
  }
  __syncthreads();

  // Softmax per head over the partition: a warp per head.
  for (int h = warp; h < group; h += kDecodeWarps) {
    float m = -INFINITY;
    for (int t = lane; t < n; t += 32) m = fmaxf(m, sc[h * kPartition + t]);
    m = warp_max(m);
    float l = 0.f;
    for (int t = lane; t < kPartition; t += 32) {
      const float p = t < n ? __expf(sc[h * kPartition + t] - m) : 0.f;
      sc[h * kPartition + t] = p;
      l += p;
    }
    l = warp_sum(l);
    if (lane == 0) {
      stats[2 * h] = m;
      stats[2 * h + 1] = l;
    }
  }
  __syncthreads();

  // Each warp sums V over its positions; a lane owns DL consecutive dimensions.
  float o[G][DL];
#pragma unroll
  for (int h = 0; h < G; h++)
#pragma unroll
    for (int d = 0; d < DL; d++) o[h][d] = 0.f;
  const int first = warp * kWarpPositions, last = min(first + kWarpPositions, n);
  for (int t = first; t < last; t++) {
    const T* src = v_cache + kv_index(slots[t], g, a.kv_heads, a.block_size, HD) + lane * DL;
    float v[DL];
#pragma unroll
    for (int d = 0; d < DL; d++) v[d] = to_float(src[d]);
#pragma unroll
    for (int h = 0; h < G; h++) {
      const float p = sc[h * kPartition + t];
#pragma unroll
      for (int d = 0; d < DL; d++) o[h][d] = fmaf(p, v[d], o[h][d]);
    }
  }
#pragma unroll
  for (int h = 0; h < G; h++)
#pragma unroll
    for (int d = 0; d < DL; d++) wo[(warp * group + h) * HD + lane * DL + d] = o[h][d];
  __syncthreads();

  float* my_m = a.part_m + ((size_t)s * a.heads + g * group) * a.max_partitions;
  float* my_l = a.part_l + ((size_t)s * a.heads + g * group) * a.max_partitions;
  float* my_o = a.part_o + ((size_t)s * a.heads + g * group) * a.max_partitions * HD;
  for (int i = threadIdx.x; i < group * HD; i += blockDim.x) {
    const int h = i / HD, d = i % HD;
    float acc = 0.f;
#pragma unroll
    for (int w = 0; w < kDecodeWarps; w++) acc += wo[(w * group + h) * HD + d];
    if (parts == 1) {
      out[(size_t)row * out_ld + (g * group + h) * HD + d] = from_float<T>(acc / stats[2 * h + 1]);
    } else {
      my_o[((size_t)h * a.max_partitions + part) * HD + d] = acc;
      if (d == 0) {
        my_m[h * a.max_partitions + part] = stats[2 * h];
        my_l[h * a.max_partitions + part] = stats[2 * h + 1];
      }
    }
  }
  if (parts == 1) return;

  // The last block of this (sequence, KV head) to get here merges every partition.
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) {
    int* counter = a.counters + (size_t)s * a.kv_heads + g;
    is_last = atomicAdd(counter, 1) == parts - 1;
    if (is_last) *counter = 0;
  }
  __syncthreads();
  if (!is_last) return;
  __threadfence();
  for (int i = threadIdx.x; i < group * HD; i += blockDim.x) {
    const int h = i / HD, d = i % HD;
    float m = -INFINITY;
    for (int p = 0; p < parts; p++) m = fmaxf(m, __ldcg(my_m + h * a.max_partitions + p));
    float l = 0.f, acc = 0.f;
    for (int p = 0; p < parts; p++) {
      const float w = __expf(__ldcg(my_m + h * a.max_partitions + p) - m);
      l += w * __ldcg(my_l + h * a.max_partitions + p);
      acc += w * __ldcg(my_o + ((size_t)h * a.max_partitions + p) * HD + d);
    }
    out[(size_t)row * out_ld + (g * group + h) * HD + d] = from_float<T>(acc / l);
  }
}

template <typename T, int HD, int G>
void attention_decode_g(const Launch& l, int num_seqs, const T* q, int q_ld, const T* k_cache, const T* v_cache, T* out, int out_ld,
                        const DecodeAttnArgs& a) {
  auto kernel = attention_decode_kernel<T, HD, G>;
  const size_t smem = attention_decode_smem<HD>(G);
  static size_t configured = 48 * 1024;
  if (smem > configured) {
    CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
    configured = smem;
  }
  launch(l, kernel, dim3(a.max_partitions, a.kv_heads, num_seqs), dim3(kDecodeThreads), smem, q, q_ld, k_cache, v_cache, out, out_ld, a);
}

template <typename T, int HD>
void attention_decode(const Launch& l, int num_seqs, const T* q, int q_ld, const T* k_cache, const T* v_cache, T* out, int out_ld,
                      const DecodeAttnArgs& a) {
  switch (a.heads / a.kv_heads) {
    case 1: return attention_decode_g<T, HD, 1>(l, num_seqs, q, q_ld, k_cache, v_cache, out, out_ld, a);
    case 2: return attention_decode_g<T, HD, 2>(l, num_seqs, q, q_ld, k_cache, v_cache, out, out_ld, a);
    case 4: return attention_decode_g<T, HD, 4>(l, num_seqs, q, q_ld, k_cache, v_cache, out, out_ld, a);
    case 8: return attention_decode_g<T, HD, 8>(l, num_seqs, q, q_ld, k_cache, v_cache, out, out_ld, a);
    case 16: return attention_decode_g<T, HD, 16>(l, num_seqs, q, q_ld, k_cache, v_cache, out, out_ld, a);
    case 32: return attention_decode_g<T, HD, 32>(l, num_seqs, q, q_ld, k_cache, v_cache, out, out_ld, a);
  }
  throw CudaError("decode attention: " + std::to_string(a.heads / a.kv_heads) + " query heads per KV head (1, 2, 4, 8, 16 or 32 are built)");
}

}  // namespace decima

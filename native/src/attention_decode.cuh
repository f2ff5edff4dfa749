// Decode attention (one new query token per sequence) over the paged KV cache, flash-decoding style.
//
// One block per (sequence, KV head, partition of kPartition positions). It serves every query head that
// shares the KV head (grouped-query attention), so each K and V vector is read once for all of them. All of
// the partition's loads leave together (each thread's K row into registers, the V tile into shared memory),
// each thread scores its position against every query head, a warp per head takes the softmax and then the
// weighted sum of V (a lane per HD / 32 dimensions). Contexts longer than one partition spread over several
// blocks, and the last block of a (sequence, KV head) to finish merges their partial results (no second
// kernel). Bytes: the context's K and V once (context x kv_heads x hd x 2 x 2); FLOPs: 4 x context x
// heads x hd. Memory- and latency-bound: the kernel is built for few dependent memory round trips.
#pragma once
#include "common.cuh"
#include "gemv.cuh"

namespace decima {

constexpr int kPartition = 256;
constexpr int kDecodeWarps = 8;
constexpr int kDecodeThreads = kDecodeWarps * 32;

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

template <typename T, int HD> constexpr int v_stride() { return HD + 8; }  // 16-byte rows, spread over banks

template <typename T, int HD> size_t attention_decode_smem(int group) {
  return sizeof(float) * ((size_t)group * HD + (size_t)group * kPartition + 2 * group)  // queries, scores, (max, sum)
         + sizeof(int) * kPartition                                                      // slots
         + sizeof(T) * (size_t)kPartition * v_stride<T, HD>();                           // the V tile
}

// G: query heads per KV head, a compile-time constant so that the per-head sums stay in registers.
template <typename T, int HD, int G>
__global__ void __launch_bounds__(kDecodeThreads)
    attention_decode_kernel(const T* __restrict__ q, int q_ld, const T* __restrict__ k_cache, const T* __restrict__ v_cache,
                            T* __restrict__ out, int out_ld, DecodeAttnArgs a) {
  static_assert(HD % 64 == 0, "a lane takes HD / 32 dimensions");
  constexpr int DL = HD / 32;  // dimensions per lane in the V sums
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* vs = reinterpret_cast<T*>(smem_raw);                                    // [kPartition][v_stride]
  float* qs = reinterpret_cast<float*>(vs + kPartition * v_stride<T, HD>());  // [G][HD]
  float* sc = qs + G * HD;                                                   // [G][kPartition]
  float* stats = sc + G * kPartition;                                        // [G][2]
  int* slots = reinterpret_cast<int*>(stats + 2 * G);                        // [kPartition]
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

  for (int i = threadIdx.x; i < G * HD; i += blockDim.x) qs[i] = to_float(q[(size_t)row * q_ld + g * G * HD + i]) * a.scale;
  for (int t = threadIdx.x; t < n; t += blockDim.x) {
    const int pos = t0 + t;
    slots[t] = table[pos / a.block_size] * a.block_size + pos % a.block_size;
  }
  __syncthreads();

  // Every K and V load of the partition goes out at once: K into registers (a position per thread), the V
  // tile into shared memory.
  uint4 k[HD / 8];
  const int t = threadIdx.x;  // kPartition == blockDim.x
  if (t < n) {
    const uint4* src = reinterpret_cast<const uint4*>(k_cache + kv_index(slots[t], g, a.kv_heads, a.block_size, HD));
#pragma unroll
    for (int c = 0; c < HD / 8; c++) k[c] = src[c];
  }
  for (int i = threadIdx.x; i < n * (HD / 8); i += blockDim.x) {
    const int tt = i / (HD / 8), c = i % (HD / 8);
    *reinterpret_cast<uint4*>(vs + tt * v_stride<T, HD>() + c * 8) =
        reinterpret_cast<const uint4*>(v_cache + kv_index(slots[tt], g, a.kv_heads, a.block_size, HD))[c];
  }
  if (t < n) {
#pragma unroll
    for (int h = 0; h < G; h++) {
      float acc = 0.f;
#pragma unroll
      for (int c = 0; c < HD / 8; c++) {
        float kf[8];
        unpack8(k[c], kf, T());
#pragma unroll
        for (int j = 0; j < 8; j++) acc = fmaf(qs[h * HD + c * 8 + j], kf[j], acc);
      }
      sc[h * kPartition + t] = acc;
    }
  }
  __syncthreads();

  // Softmax per head over the partition: a warp per head.
  for (int h = warp; h < G; h += kDecodeWarps) {
    float m = -INFINITY;
    for (int i = lane; i < n; i += 32) m = fmaxf(m, sc[h * kPartition + i]);
    m = warp_max(m);
    float l = 0.f;
    for (int i = lane; i < n; i += 32) {
      const float p = __expf(sc[h * kPartition + i] - m);
      sc[h * kPartition + i] = p;
      l += p;
    }
    l = warp_sum(l);
    if (lane == 0) {
      stats[2 * h] = m;
      stats[2 * h + 1] = l;
    }
  }
  __syncthreads();

  // P V: a warp per head, a lane per DL dimensions, over the whole tile in shared memory.
  float* my_m = a.part_m + ((size_t)s * a.heads + g * G) * a.max_partitions;
  float* my_l = a.part_l + ((size_t)s * a.heads + g * G) * a.max_partitions;
  float* my_o = a.part_o + ((size_t)s * a.heads + g * G) * a.max_partitions * HD;
  for (int h = warp; h < G; h += kDecodeWarps) {
    float o[DL];
#pragma unroll
    for (int d = 0; d < DL; d++) o[d] = 0.f;
    for (int i = 0; i < n; i++) {
      const float p = sc[h * kPartition + i];
      const T* v = vs + i * v_stride<T, HD>() + lane * DL;
#pragma unroll
      for (int d = 0; d < DL; d++) o[d] = fmaf(p, to_float(v[d]), o[d]);
    }
#pragma unroll
    for (int d = 0; d < DL; d++) {
      const int dim = lane * DL + d;
      if (parts == 1) {
        out[(size_t)row * out_ld + (g * G + h) * HD + dim] = from_float<T>(o[d] / stats[2 * h + 1]);
      } else {
        my_o[((size_t)h * a.max_partitions + part) * HD + dim] = o[d];
      }
    }
    if (parts > 1 && lane == 0) {
      my_m[h * a.max_partitions + part] = stats[2 * h];
      my_l[h * a.max_partitions + part] = stats[2 * h + 1];
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
  for (int i = threadIdx.x; i < G * HD; i += blockDim.x) {
    const int h = i / HD, d = i % HD;
    float m = -INFINITY;
    for (int p = 0; p < parts; p++) m = fmaxf(m, __ldcg(my_m + h * a.max_partitions + p));
    float l = 0.f, acc = 0.f;
    for (int p = 0; p < parts; p++) {
      const float w = __expf(__ldcg(my_m + h * a.max_partitions + p) - m);
      l += w * __ldcg(my_l + h * a.max_partitions + p);
      acc += w * __ldcg(my_o + ((size_t)h * a.max_partitions + p) * HD + d);
    }
    out[(size_t)row * out_ld + (g * G + h) * HD + d] = from_float<T>(acc / l);
  }
}

template <typename T, int HD, int G>
void attention_decode_g(const Launch& l, int num_seqs, const T* q, int q_ld, const T* k_cache, const T* v_cache, T* out, int out_ld,
                        const DecodeAttnArgs& a) {
  static_assert(kPartition == kDecodeThreads, "a thread scores one position");
  auto kernel = attention_decode_kernel<T, HD, G>;
  const size_t smem = attention_decode_smem<T, HD>(G);
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

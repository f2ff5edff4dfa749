// Decode attention (one new query token per sequence) over the paged KV cache, flash-decoding style.
//
// One block per (sequence, KV head, partition of kPartition positions). It serves every query head that
// shares the KV head (grouped-query attention), so each K and V vector is read once for all of them. The
// partition's K and V go to shared memory in one round of asynchronous copies; then the block's threads
// split the work by (query head, position) for the scores and by (query head, dimension pair) for the
// weighted sum of V, so no thread walks the whole partition. Contexts longer than one partition spread
// over several blocks, and the last block of a (sequence, KV head) to finish merges their partial results
// (no second kernel). Bytes: the context's K and V once (context x kv_heads x hd x 2 x 2); FLOPs: 4 x
// context x heads x hd. At decode sizes it is latency-bound: small partitions put a short critical path
// on many SMs (64 positions: three dependent memory round trips and about a microsecond of arithmetic).
#pragma once
#include "common.cuh"
#include "gemv.cuh"

namespace decima {

constexpr int kPartition = 64;
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

template <int HD> constexpr int kv_stride() { return HD + 8; }  // 16-byte rows, spread over banks

template <typename T, int HD> size_t attention_decode_smem(int group) {
  return sizeof(T) * 2 * (size_t)kPartition * kv_stride<HD>()                               // the K and V tiles
         + sizeof(float) * ((size_t)group * HD + (size_t)group * kPartition + 2 * group);  // queries, scores, (max, sum)
}

// While the previous kernel drains: the partition's K and V lines into L2, so that the copies after the
// wait find them there rather than in device memory. A prefetch reads nothing into the kernel, so this may
// use metadata an earlier kernel is still updating (a context length one short costs one line); its reads
// bypass L1 (__ldcg), which would otherwise keep a stale copy for the reads after the wait.
template <int HD, typename T>
__device__ __forceinline__ void prefetch_partition(const T* k_cache, const T* v_cache, const DecodeAttnArgs& a) {
  constexpr int kLines = HD * (int)sizeof(T) / 128;  // 128-byte lines per K or V row
  const int s = __ldcg(a.seqs + blockIdx.z);
  const int t0 = blockIdx.x * kPartition, n = min(kPartition, __ldcg(a.context_lens + s) - t0);
  for (int i = threadIdx.x; i < n * kLines * 2; i += blockDim.x) {
    const int t = i / (kLines * 2), line = i % (kLines * 2), pos = t0 + t;
    const int block = __ldcg(a.block_tables + (size_t)s * a.table_width + pos / a.block_size);
    const T* base = line < kLines ? k_cache : v_cache;
    const T* at = base + kv_index(block * a.block_size + pos % a.block_size, blockIdx.y, a.kv_heads, a.block_size, HD) + (line % kLines) * (128 / sizeof(T));
    asm volatile("prefetch.global.L2 [%0];" ::"l"(at));
  }
}

// G: query heads per KV head, a compile-time constant so that the loops over heads unroll.
template <typename T, int HD, int G>
__global__ void __launch_bounds__(kDecodeThreads)
    attention_decode_kernel(const T* __restrict__ q, int q_ld, const T* __restrict__ k_cache, const T* __restrict__ v_cache,
                            T* __restrict__ out, int out_ld, DecodeAttnArgs a) {
  static_assert(HD % 8 == 0, "16-byte rows");
  constexpr int VPR = HD / 8;  // 16-byte vectors per K or V row
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* ks = reinterpret_cast<T*>(smem_raw);                // [kPartition][kv_stride]
  T* vs = ks + kPartition * kv_stride<HD>();             // [kPartition][kv_stride]
  float* qs = reinterpret_cast<float*>(vs + kPartition * kv_stride<HD>());  // [G][HD], scaled
  float* sc = qs + G * HD;                               // [G][kPartition]: scores, then probabilities
  float* stats = sc + G * kPartition;                    // [G][2]: max, sum
  __shared__ int is_last;

  pdl_launch_dependents();
  prefetch_partition<HD>(k_cache, v_cache, a);
  pdl_wait();
  const int part = blockIdx.x, g = blockIdx.y, s = a.seqs[blockIdx.z];
  const int ctx = a.context_lens[s];
  const int parts = ceil_div(ctx, kPartition);
  if (part >= parts) return;
  const int t0 = part * kPartition, n = min(kPartition, ctx - t0);
  const int row = a.query_starts[s];
  const int* table = a.block_tables + (size_t)s * a.table_width;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;

  // One round of copies: the partition's K and V rows (a 16-byte vector per thread at a time) into shared
  // memory, the queries beside them.
  for (int i = threadIdx.x; i < n * VPR; i += blockDim.x) {
    const int t = i / VPR, c = i % VPR, pos = t0 + t;
    const size_t at = kv_index(table[pos / a.block_size] * a.block_size + pos % a.block_size, g, a.kv_heads, a.block_size, HD) + c * 8;
    cp_async16(ks + t * kv_stride<HD>() + c * 8, k_cache + at);
    cp_async16(vs + t * kv_stride<HD>() + c * 8, v_cache + at);
  }
  for (int i = threadIdx.x; i < G * HD; i += blockDim.x) qs[i] = to_float(q[(size_t)row * q_ld + g * G * HD + i]) * a.scale;
  cp_async_wait_all();
  __syncthreads();

  // Scores: a thread per (head, position); a warp shares its head, so its query reads are broadcasts.
  for (int i = threadIdx.x; i < G * kPartition; i += blockDim.x) {
    const int h = i / kPartition, t = i % kPartition;
    if (t >= n) continue;
    float acc = 0.f;
#pragma unroll
    for (int c = 0; c < VPR; c++) {
      float kf[8];
      unpack8(*reinterpret_cast<const uint4*>(ks + t * kv_stride<HD>() + c * 8), kf, T());
#pragma unroll
      for (int j = 0; j < 8; j++) acc = fmaf(qs[h * HD + c * 8 + j], kf[j], acc);
    }
    sc[h * kPartition + t] = acc;
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

  // P V: a thread per (head, pair of dimensions), over the partition's rows in shared memory.
  float* my_m = a.part_m + ((size_t)s * a.heads + g * G) * a.max_partitions;
  float* my_l = a.part_l + ((size_t)s * a.heads + g * G) * a.max_partitions;
  float* my_o = a.part_o + ((size_t)s * a.heads + g * G) * a.max_partitions * HD;
  for (int i = threadIdx.x; i < G * HD / 2; i += blockDim.x) {
    const int h = i / (HD / 2), d = 2 * (i % (HD / 2));
    float o0 = 0.f, o1 = 0.f;
    for (int t = 0; t < n; t++) {
      const float p = sc[h * kPartition + t];
      const uint32_t pair = *reinterpret_cast<const uint32_t*>(vs + t * kv_stride<HD>() + d);
      const T* v = reinterpret_cast<const T*>(&pair);
      o0 = fmaf(p, to_float(v[0]), o0);
      o1 = fmaf(p, to_float(v[1]), o1);
    }
    if (parts == 1) {
      const float inv = 1.f / stats[2 * h + 1];
      T* dst = out + (size_t)row * out_ld + (g * G + h) * HD + d;
      dst[0] = from_float<T>(o0 * inv);
      dst[1] = from_float<T>(o1 * inv);
    } else {
      float* dst = my_o + ((size_t)h * a.max_partitions + part) * HD + d;
      dst[0] = o0;
      dst[1] = o1;
    }
  }
  if (parts == 1) return;
  if (threadIdx.x < G) {
    my_m[threadIdx.x * a.max_partitions + part] = stats[2 * threadIdx.x];
    my_l[threadIdx.x * a.max_partitions + part] = stats[2 * threadIdx.x + 1];
  }

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

// Decode attention (one new query token per sequence) over the paged KV cache, flash-decoding style.
//
// One block per (sequence, KV head, partition of kPartition positions). The block serves every query head
// that shares the KV head (grouped-query attention), so each K and V vector is read once for all of them.
// Long contexts spread over many blocks; each writes its partial (max, sum, unnormalised output) and the last
// block of a (sequence, KV head) to finish merges them (no second kernel). Bytes: the sequence's K and V
// (context x kv_heads x hd x 2 x 2) once; FLOPs: 4 x context x heads x hd. Memory- and latency-bound.
#pragma once
#include "common.cuh"
#include "gemv.cuh"

namespace decima {

constexpr int kPartition = 64;
constexpr int kDecodeThreads = 128;

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

template <int HD> __host__ __device__ constexpr int kv_stride() { return HD + 2; }  // padded: conflict-free

template <typename T, int HD>
__global__ void __launch_bounds__(kDecodeThreads)
    attention_decode_kernel(const T* __restrict__ q, int q_ld, const T* __restrict__ k_cache, const T* __restrict__ v_cache,
                            T* __restrict__ out, int out_ld, DecodeAttnArgs a) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int group = a.heads / a.kv_heads;
  float* qs = reinterpret_cast<float*>(smem_raw);  // [group][HD]
  float* sc = qs + group * HD;                     // [group][kPartition]
  T* kv = reinterpret_cast<T*>(sc + group * kPartition);  // [kPartition][HD + 2]
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

  for (int i = threadIdx.x; i < group * HD; i += blockDim.x)
    qs[i] = to_float(q[(size_t)row * q_ld + (g * group) * HD + i]) * a.scale;

  // Copy kPartition positions of one KV head (K or V) into shared memory, 16 bytes at a time.
  auto load_tile = [&](const T* cache) {
    for (int i = threadIdx.x; i < n * (HD / 8); i += blockDim.x) {
      const int t = i / (HD / 8), c = i % (HD / 8);
      const int pos = t0 + t;
      const int slot = table[pos / a.block_size] * a.block_size + pos % a.block_size;
      const uint4 v = *reinterpret_cast<const uint4*>(cache + kv_index(slot, g, a.kv_heads, a.block_size, HD) + c * 8);
      const uint32_t* w = reinterpret_cast<const uint32_t*>(&v);
      uint32_t* dst = reinterpret_cast<uint32_t*>(kv + t * kv_stride<HD>() + c * 8);
#pragma unroll
      for (int j = 0; j < 4; j++) dst[j] = w[j];
    }
  };
  load_tile(k_cache);
  __syncthreads();

  for (int i = threadIdx.x; i < group * kPartition; i += blockDim.x) {
    const int h = i / kPartition, t = i % kPartition;
    float acc = -INFINITY;
    if (t < n) {
      acc = 0.f;
      const T* k = kv + t * kv_stride<HD>();
#pragma unroll 8
      for (int d = 0; d < HD; d++) acc = fmaf(qs[h * HD + d], to_float(k[d]), acc);
    }
    sc[i] = acc;
  }
  __syncthreads();

  // Per head: partition max and exponentials; a warp per head.
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  float* my_m = a.part_m + ((size_t)s * a.heads + g * group) * a.max_partitions;
  float* my_l = a.part_l + ((size_t)s * a.heads + g * group) * a.max_partitions;
  for (int h = warp; h < group; h += kDecodeThreads / 32) {
    float m = -INFINITY;
    for (int t = lane; t < n; t += 32) m = fmaxf(m, sc[h * kPartition + t]);
    m = warp_max(m);
    float l = 0.f;
    for (int t = lane; t < kPartition; t += 32) {
      const float e = t < n ? __expf(sc[h * kPartition + t] - m) : 0.f;
      sc[h * kPartition + t] = e;
      l += e;
    }
    l = warp_sum(l);
    if (lane == 0) {
      my_m[h * a.max_partitions + part] = m;
      my_l[h * a.max_partitions + part] = l;
    }
  }
  __syncthreads();
  load_tile(v_cache);
  __syncthreads();

  float* my_o = a.part_o + ((size_t)s * a.heads + g * group) * a.max_partitions * HD;
  for (int i = threadIdx.x; i < group * HD / 2; i += blockDim.x) {
    const int h = i / (HD / 2), d = (i % (HD / 2)) * 2;
    float o0 = 0.f, o1 = 0.f;
    for (int t = 0; t < n; t++) {
      const float e = sc[h * kPartition + t];
      const T* v = kv + t * kv_stride<HD>() + d;
      o0 = fmaf(e, to_float(v[0]), o0);
      o1 = fmaf(e, to_float(v[1]), o1);
    }
    if (parts == 1) {  // the whole context in one block: normalise and finish
      const float inv = 1.f / my_l[h * a.max_partitions];
      T* o = out + (size_t)row * out_ld + (g * group + h) * HD + d;
      o[0] = from_float<T>(o0 * inv);
      o[1] = from_float<T>(o1 * inv);
    } else {
      float* po = my_o + ((size_t)h * a.max_partitions + part) * HD + d;
      po[0] = o0;
      po[1] = o1;
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
    float l = 0.f, o = 0.f;
    for (int p = 0; p < parts; p++) {
      const float w = __expf(__ldcg(my_m + h * a.max_partitions + p) - m);
      l += w * __ldcg(my_l + h * a.max_partitions + p);
      o += w * __ldcg(my_o + ((size_t)h * a.max_partitions + p) * HD + d);
    }
    out[(size_t)row * out_ld + (g * group + h) * HD + d] = from_float<T>(o / l);
  }
}

template <typename T, int HD> size_t attention_decode_smem(int group) {
  return (size_t)group * HD * 4 + (size_t)group * kPartition * 4 + (size_t)kPartition * kv_stride<HD>() * sizeof(T);
}

template <typename T, int HD>
void attention_decode(const Launch& l, int num_seqs, const T* q, int q_ld, const T* k_cache, const T* v_cache, T* out, int out_ld,
                      const DecodeAttnArgs& a) {
  auto kernel = attention_decode_kernel<T, HD>;
  const size_t smem = attention_decode_smem<T, HD>(a.heads / a.kv_heads);
  if (smem > 48 * 1024) CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
  launch(l, kernel, dim3(a.max_partitions, a.kv_heads, num_seqs), dim3(kDecodeThreads), smem, q, q_ld, k_cache, v_cache, out,
         out_ld, a);
}

}  // namespace decima

// The MLP of a few activation rows in one kernel, for int4 weights on the tensor cores:
// resid[b] += down(silu(gate x) * (up x)), x = RMSNorm(resid[b]).
//
// As a gate/up GEMV then a down GEMV, the MLP is two dependent kernels, since every down row needs every
// activation. Cut along the intermediate dimension instead, it falls into independent pieces: a cluster of
// blocks owns a chunk of 128 intermediate values, computes their gate and up rows (over every hidden
// column), then the down projection's 128 columns of that chunk for every hidden row, and adds those
// partial sums into the residual stream (red.global.add.f32). No cluster waits for another, and the second
// kernel's launch, wait for its predecessor and ramp-up go away.
//
// A cluster's blocks split the chunk's gate/up tiles (8 gate rows and their 8 up rows each) and the hidden
// rows of the down projection; the activations pass between them through distributed shared memory. In a
// block, each gate/up tile's steps are shared by kWpt warps, whose sums meet once, and each down tile
// (16 rows, the chunk's 128 columns) belongs to one warp. The weight loads run P items ahead of use through
// both products, so the down weights stream while the gate/up sums are exchanged.
//
// Bytes: both matrices once (DeciCoder-1b: 12.1 + 6.0 MB and their scales), 4 x hidden x batch per cluster
// of additions; FLOPs 6 x hidden x inter x batch. Like the GEMVs it is bound by latency, not bandwidth:
// measured on the 1B shape, the int4 step at one row went from 0.655-0.660 to 0.643-0.648 ms, at two to
// eight rows 5-9% faster (BENCHMARKS.md). Its blocks (16 warps, about 100 registers each) hold an SM alone,
// so unlike the small GEMV blocks they cannot start during the previous kernel; staging each warp's gate/up
// weights in shared memory before the wait, so that all its loads leave at once, did not change that (one
// row 0.665-0.679 ms).
//
// The fp32 additions arrive in no fixed order, so the residual can differ in its last bits from run to run
// (RunnerOptions::fused_mlp turns the kernel off). The norm reads a copy of the residual, since other
// clusters' additions land in the stream while a block is still reading it: the O GEMV writes the copy
// beside the stream (EpiResidual::copy), or, where O is fused into attention, the QKV product's prologue
// copies the stream and attention adds into both (AttnOProj::copy).
#pragma once
#include "cluster.cuh"
#include "gemv.cuh"

namespace decima {

constexpr int kMlpChunk = 128;  // intermediate values per cluster: one int4 group
constexpr int kMlpCluster = 2;  // blocks per cluster
constexpr int kMlpWarps = 16;
template <typename T, int P, class F, class Pro>
__global__ void __launch_bounds__(kMlpWarps * 32)
    gemv_mlp_kernel(F gate_up, F down, int hidden, int inter, int batch, Pro pro, float* __restrict__ out, int out_ld) {
  using M = typename MmaOf<F>::type;
  using L = typename M::Layout;
  constexpr int kTiles = kMlpChunk / 8 / kMlpCluster;  // gate/up tiles per block
  constexpr int kWpt = kMlpWarps / kTiles;             // warps per gate/up tile
  constexpr int kDownSteps = kMlpChunk / M::kStep;     // steps per down tile
  static_assert(kMlpWarps % kTiles == 0, "whole gate/up tiles per block");
  extern __shared__ __align__(16) unsigned char smem_raw[];
  __shared__ float4 sums[kMlpWarps][32];
  const int xstride = hidden + L::kPad, astride = kMlpChunk + L::kPad;
  T* xs = reinterpret_cast<T*>(smem_raw);  // [batch][xstride]: the normalised residual
  T* act = xs + (size_t)batch * xstride;   // [batch][astride]: the chunk's activations
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int rank = cluster_rank(), chunk = blockIdx.x / kMlpCluster;
  // Gate/up: the warp's tile (gate rows gate_row, up rows inter + gate_row) and steps sub, sub + kWpt, ...
  const int tile = rank * kTiles + warp / kWpt, sub = warp % kWpt;
  const int gate_row = chunk * kMlpChunk + tile * 8 + g;
  const int n1 = ceil_div(hidden / M::kStep - sub, kWpt);  // at least 1 (gemv_mlp_fits)
  // Down: the block's hidden rows from row0, tiles of 16 dealt to the warps in turn, from the chunk's vector v0.
  const int block_rows = hidden / kMlpCluster, row0 = rank * block_rows, down_tiles = block_rows / 16;
  const int n2 = (warp < down_tiles ? ceil_div(down_tiles - warp, kMlpWarps) : 0) * kDownSteps;
  const int v0 = chunk * kMlpChunk / M::kStep * 4;
  auto down_row = [&](int d) { return row0 + (warp + d / kDownSteps * kMlpWarps) * 16 + g; };

  const int items = n1 + n2;
  int next = 0;  // the warp's item to load: gate/up steps, then down steps
  auto load = [&](MmaItem& it) {
    const int j = next++;
    if (j < n1) {
      it = mma_item(gate_up, gate_row, inter + gate_row, (sub + j * kWpt) * 4 + t, 2 * inter);
    } else if (j < items) {
      const int d = j - n1, r = down_row(d);
      it = mma_item(down, r, r + 8, v0 + d % kDownSteps * 4 + t, hidden);
    }
  };
  MmaItem buf[P];
#pragma unroll
  for (int u = 0; u < P; u++) load(buf[u]);
  cluster_arrive();
  pdl_launch_dependents();
  pdl_wait();
  pro.template load<L>(xs, batch, xstride, batch, hidden);
  __syncthreads();

  // The lane's x and activations: batch row g (or the last), its quarter of a step.
  const int xb = min(g, batch - 1);
  const T* xrow = xs + (size_t)xb * xstride + t * (M::kStep / 4);
  const T* arow = act + (size_t)xb * astride + t * (M::kStep / 4);
  float acc[4] = {0.f, 0.f, 0.f, 0.f};
  for (int j0 = 0; j0 < items; j0 += P) {
#pragma unroll
    for (int u = 0; u < P; u++) {
      const int j = j0 + u;
      if (j >= items) break;
      const int d = j - n1;
      mma_accumulate<M>(acc, buf[u], j < n1 ? xrow + (sub + j * kWpt) * M::kStep : arow + d % kDownSteps * M::kStep, t);
      load(buf[u]);
      if (j == n1 - 1) {  // gate/up done: the tile's warps add their sums, its first applies SiLU x up
        sums[warp][lane] = make_float4(acc[0], acc[1], acc[2], acc[3]);
        acc[0] = acc[1] = acc[2] = acc[3] = 0.f;
        __syncthreads();
        cluster_wait();  // every peer has started: its shared memory may be written
        if (sub == 0) {
          float4 v = sums[warp][lane];
#pragma unroll
          for (int m = 1; m < kWpt; m++) {
            const float4 o = sums[warp + m][lane];
            v.x += o.x, v.y += o.y, v.z += o.z, v.w += o.w;
          }
          // Lane (g, t): gate row g in v.x, v.y and its up row in v.z, v.w, for batch rows 2t and 2t + 1,
          // rounded to T as the unfused path stores them.
          const int k = L::at(tile * 8 + g);
          const float gate[2] = {round_to<T>(v.x), round_to<T>(v.y)}, up[2] = {round_to<T>(v.z), round_to<T>(v.w)};
#pragma unroll
          for (int e = 0; e < 2; e++) {
            const int b = 2 * t + e;
            if (b >= batch) break;
            const T a = from_float<T>(gate[e] / (1.f + __expf(-gate[e])) * up[e]);
#pragma unroll
            for (int r = 0; r < kMlpCluster; r++) cluster_peer(act, r)[(size_t)b * astride + k] = a;
          }
        }
        cluster_sync();  // the chunk's activations are in every block
      } else if (j >= n1 && d % kDownSteps == kDownSteps - 1) {  // a down tile done: add into the residual
        const int r = down_row(d);
#pragma unroll
        for (int e = 0; e < 2; e++) {
          const int b = 2 * t + e;
          if (b >= batch) break;
          atomicAdd(out + (size_t)b * out_ld + r, acc[e]);
          atomicAdd(out + (size_t)b * out_ld + r + 8, acc[2 + e]);
        }
        acc[0] = acc[1] = acc[2] = acc[3] = 0.f;
      }
    }
  }
}

// Whether the fused MLP takes a model's shapes (weights as `quant`, model.h's Quant, in groups of `group`):
// int4 on the tensor cores (gemv_on_tensor_cores), whole chunks of the intermediate size, whole row tiles
// per block, and a gate/up step for each of a tile's warps; clusters (Hopper on). Not int8: its steps are
// half as wide, so a warp has twice the steps in sequence, and the fused kernel was slower than the two
// GEMVs at one and two rows (BENCHMARKS.md).
inline bool gemv_mlp_fits(int quant, int group, int hidden, int inter) {
  static const bool clusters = device_attribute(cudaDevAttrClusterLaunch) != 0;
  constexpr int wpt = kMlpWarps * 8 * kMlpCluster / kMlpChunk, step = 128;
  return clusters && quant == 2 && gemv_on_tensor_cores(quant, group, hidden, 1) && gemv_on_tensor_cores(quant, group, inter, 1) &&
         inter % kMlpChunk == 0 && hidden % (16 * kMlpCluster) == 0 && hidden / step >= wpt;
}

// `out` ([batch][out_ld] fp32) gains the MLP of `batch` (1 to 8) rows that `pro` normalises.
template <typename T, class F, class Pro>
void gemv_mlp(const Launch& l, const F& gate_up, const F& down, int hidden, int inter, int batch, const Pro& pro, float* out, int out_ld) {
  using L = typename MmaOf<F>::type::Layout;
  auto kernel = gemv_mlp_kernel<T, 4, F, Pro>;
  const size_t smem = (size_t)batch * (hidden + L::kPad + kMlpChunk + L::kPad) * sizeof(T);
  static size_t configured = 0;  // see launch_gemv_grid
  if (smem > configured) {
    CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
    configured = smem;
  }
  launch(l, kMlpCluster, kernel, dim3(inter / kMlpChunk * kMlpCluster), dim3(kMlpWarps * 32), smem, gate_up, down, hidden, inter, batch, pro, out,
         out_ld);
}

}  // namespace decima

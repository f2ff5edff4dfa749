// Decode-time matrix products for 1 to 32 activation rows: y[b][r] = sum_k W[r][k] x[b][k].
//
// Bytes: every weight once (rows x cols x 2); FLOPs: 2 x rows x cols x batch, far under the tensor cores'
// rate: the limit is memory bandwidth, so the kernel exists to keep enough weight loads in flight.
// Each block owns a tile of 16 rows; its 8 warps split the columns (32 at a time, round robin) and stream
// their part of the tile with 16-byte loads, several chunks deep, the first ones issued before waiting for
// the previous kernel (PDL). The products run on the tensor cores (mma.m16n8k16, fp32 accumulation) with
// the k order inside each 32-column chunk permuted so that every lane's 16-byte load is directly its
// fragment: no shuffles, no conversions, a handful of instructions per 32 bytes of weights. The warps'
// partial sums meet in shared memory, where a fused epilogue consumes them (residual add, RoPE + KV-cache
// write, SiLU(gate) x up, fp32 logits). A prologue builds the activations in shared memory first: a plain
// copy, or the RMSNorm of the fp32 residual stream.
#pragma once
#include "common.cuh"

namespace decima {

constexpr int kGemvWarps = 8;
constexpr int kGemvThreads = kGemvWarps * 32;
constexpr int kGemvMaxBatch = 32;
constexpr int kGemvPad = 32;  // shared-memory row padding (elements): rows of x fall in different banks

// ---- prologues: fill xs[b][k] (rows of `stride` elements; rows at or past `batch` are zero) -------------

template <typename T> struct ProPlain {
  const T* x;  // [batch][ld]
  int ld;
  ProPlain shifted(int b) const { return {x + (size_t)b * ld, ld}; }
  __device__ void load(T* xs, int rows, int stride, int batch, int cols, float*) const {
    const int chunks = stride / 8;
    for (int i = threadIdx.x; i < rows * chunks; i += blockDim.x) {
      const int b = i / chunks, c = i % chunks;
      uint4 v = make_uint4(0, 0, 0, 0);
      if (b < batch && c * 8 < cols) v = reinterpret_cast<const uint4*>(x + (size_t)b * ld)[c];
      reinterpret_cast<uint4*>(xs + (size_t)b * stride)[c] = v;
    }
  }
};

// Llama's RMSNorm of the fp32 residual stream, rounded once to T: x * rsqrt(mean(x^2) + eps) * gain.
template <typename T> struct ProRmsNorm {
  const float* resid;  // [batch][ld]
  int ld;
  const T* gain;
  float eps;
  ProRmsNorm shifted(int b) const { return {resid + (size_t)b * ld, ld, gain, eps}; }
  __device__ void load(T* xs, int rows, int stride, int batch, int cols, float* scratch) const {
    for (int b = 0; b < rows; b++) {
      const float* r = resid + (size_t)b * ld;
      float ss = 0.f;
      if (b < batch)
        for (int k = threadIdx.x * 4; k < cols; k += blockDim.x * 4) {
          const float4 v = *reinterpret_cast<const float4*>(r + k);
          ss += v.x * v.x + v.y * v.y + v.z * v.z + v.w * v.w;
        }
      if (b < batch) {
        const float rstd = rsqrtf(block_sum(ss, scratch) / cols + eps);
        for (int k = threadIdx.x; k < stride; k += blockDim.x)
          xs[(size_t)b * stride + k] = from_float<T>(k < cols ? r[k] * rstd * to_float(gain[k]) : 0.f);
      } else {
        for (int k = threadIdx.x; k < stride; k += blockDim.x) xs[(size_t)b * stride + k] = from_float<T>(0.f);
      }
    }
  }
};

// ---- epilogues -------------------------------------------------------------------------------------------
// A block's 16 rows are two groups of 8, starting at rows `lo` and `hi`; lane-level results arrive as
// (i, b, v_lo, v_hi): rows lo + i and hi + i, batch row b. Pairing the groups puts a RoPE pair, or a gate
// row and its up row, in the same thread.

struct TileRows {
  int lo, hi;
};

// 16 consecutive rows per block.
struct RowsLinear {
  int rows;
  __device__ TileRows tile(int block) const { return {block * 16, block * 16 + 8}; }
  static int tiles(int rows) { return ceil_div(rows, 16); }
  __device__ bool valid(int row) const { return row < rows; }
};

// residual[b][r] += y: the O and down projections add straight into the fp32 residual stream.
struct EpiResidual : RowsLinear {
  float* resid;
  int ld;
  EpiResidual shifted(int b) const {
    EpiResidual e = *this;
    e.resid += (size_t)b * ld;
    return e;
  }
  __device__ void store(const TileRows& t, int i, int b, float lo, float hi) const {
    if (valid(t.lo + i)) resid[(size_t)b * ld + t.lo + i] += lo;
    if (valid(t.hi + i)) resid[(size_t)b * ld + t.hi + i] += hi;
  }
};

// fp32 logits for the sampler.
struct EpiLogits : RowsLinear {
  float* out;
  int ld;
  EpiLogits shifted(int b) const {
    EpiLogits e = *this;
    e.out += (size_t)b * ld;
    return e;
  }
  __device__ void store(const TileRows& t, int i, int b, float lo, float hi) const {
    if (valid(t.lo + i)) out[(size_t)b * ld + t.lo + i] = lo;
    if (valid(t.hi + i)) out[(size_t)b * ld + t.hi + i] = hi;
  }
};

// Plain T output (tests).
template <typename T> struct EpiStore : RowsLinear {
  T* out;
  int ld;
  EpiStore shifted(int b) const {
    EpiStore e = *this;
    e.out += (size_t)b * ld;
    return e;
  }
  __device__ void store(const TileRows& t, int i, int b, float lo, float hi) const {
    if (valid(t.lo + i)) out[(size_t)b * ld + t.lo + i] = from_float<T>(lo);
    if (valid(t.hi + i)) out[(size_t)b * ld + t.hi + i] = from_float<T>(hi);
  }
};

// Gate/up packed as [gate; up]: a block takes gate rows i..i+7 and their up rows, writes silu(g) x u.
template <typename T> struct EpiSiluMul {
  int inter;
  T* out;
  int ld;
  EpiSiluMul shifted(int b) const { return {inter, out + (size_t)b * ld, ld}; }
  __device__ TileRows tile(int block) const { return {block * 8, inter + block * 8}; }
  static int tiles(int inter) { return ceil_div(inter, 8); }
  __device__ void store(const TileRows& t, int i, int b, float lo, float hi) const {
    if (t.lo + i >= inter) return;
    const float g = round_to<T>(lo), u = round_to<T>(hi);
    out[(size_t)b * ld + t.lo + i] = from_float<T>(g / (1.f + __expf(-g)) * u);
  }
};

// Where a token's K and V go: slot = block * block_size + offset; cache layout [block][kv_head][offset][HD].
__device__ __forceinline__ size_t kv_index(int slot, int kv_head, int kv_heads, int block_size, int hd) {
  const int block = slot / block_size, off = slot % block_size;
  return (((size_t)block * kv_heads + kv_head) * block_size + off) * hd;
}

// Rotary embedding as Hugging Face's Llama applies it (rotate_half): element p pairs with p + HD/2.
// `table` holds (cos, sin) per position and frequency, [max_pos][HD/2].
struct RopeArgs {
  const float2* table;
  const int* positions;  // per token
  const int* slots;      // per token: where its K/V go
};

// Fused Q/K/V: rows are [Q heads | K heads | V heads] x HD. A block takes 8 rotation pairs (p, p + HD/2) of
// one head, so RoPE is applied before anything is written; K and V go straight into the paged cache.
template <typename T> struct EpiQkvRope {
  int hd, heads, kv_heads, block_size;
  T* q;  // [batch][q_ld]
  int q_ld;
  T* k_cache;
  T* v_cache;
  RopeArgs rope;
  EpiQkvRope shifted(int b) const {
    EpiQkvRope e = *this;
    e.q += (size_t)b * q_ld;
    e.rope.positions += b;
    e.rope.slots += b;
    return e;
  }
  __device__ TileRows tile(int block) const {
    const int per_head = hd / 16, head = block / per_head, p = (block % per_head) * 8;
    return {head * hd + p, head * hd + p + hd / 2};
  }
  static int tiles(int hd, int heads, int kv_heads) { return (heads + 2 * kv_heads) * (hd / 16); }
  __device__ void store(const TileRows& t, int i, int b, float lo, float hi) const {
    const int head = t.lo / hd, p = t.lo % hd + i;
    float x1 = round_to<T>(lo), x2 = round_to<T>(hi);
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
      const bool is_k = head < heads + kv_heads;
      const int g = is_k ? head - heads : head - heads - kv_heads;
      dst = (is_k ? k_cache : v_cache) + kv_index(rope.slots[b], g, kv_heads, block_size, hd) + p;
    }
    dst[0] = from_float<T>(x1);
    dst[hd / 2] = from_float<T>(x2);
  }
};

// ---- the kernel ------------------------------------------------------------------------------------------

__device__ __forceinline__ void mma_bf16_or_f16(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint32_t b0, uint32_t b1,
                                                __nv_bfloat16) {
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
               : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}
__device__ __forceinline__ void mma_bf16_or_f16(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint32_t b0, uint32_t b1,
                                                half) {
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
               : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

__device__ __forceinline__ uint4 load_stream(const void* p) { return __ldcs(reinterpret_cast<const uint4*>(p)); }

// NT n-tiles of 8 batch rows (batch <= 8 NT); P chunks of 32 columns in flight per warp. The grid is
// persistent: a block builds the activations once, then walks tiles blockIdx.x, + gridDim.x, ..., its
// warps' loads streaming on across tile boundaries.
template <typename T, int NT, int P, class Pro, class Epi>
__global__ void __launch_bounds__(kGemvThreads) gemv_kernel(const T* __restrict__ w, int rows, int cols, int batch, int tiles, Pro pro, Epi epi) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  __shared__ float scratch[32];
  __shared__ float red[2][kGemvWarps][16][8 * NT];  // two, so that a tile's sums never wait for the last tile's epilogue
  const int stride = cols + kGemvPad;
  T* xs = reinterpret_cast<T*>(smem_raw);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, quad = lane >> 2, tig = lane & 3;
  const int chunks = ceil_div(cols, 32);
  const int per_tile = ceil_div(chunks, kGemvWarps);  // the same for every warp: barriers stay uniform
  const int my_tiles = blockIdx.x < tiles ? ceil_div(tiles - blockIdx.x, gridDim.x) : 0;
  const int items = my_tiles * per_tile;

  // Item j of this warp: tile blockIdx.x + (j / per_tile) * gridDim.x, chunk warp + (j % per_tile) * 8.
  // Lane (quad, tig) loads rows lo + quad and hi + quad, columns [32 c + 8 tig, 32 c + 8 tig + 8).
  auto load = [&](int j, uint4& lo, uint4& hi) {
    lo = hi = make_uint4(0, 0, 0, 0);
    if (j >= items) return;
    const TileRows t = epi.tile(blockIdx.x + (j / per_tile) * gridDim.x);
    const int col = (warp + (j % per_tile) * kGemvWarps) * 32 + tig * 8;
    if (col >= cols) return;
    if (t.lo + quad < rows) lo = load_stream(w + (size_t)(t.lo + quad) * cols + col);
    if (t.hi + quad < rows) hi = load_stream(w + (size_t)(t.hi + quad) * cols + col);
  };

  // The weights depend on nothing earlier in the step: start streaming them before waiting.
  uint4 a_lo[P], a_hi[P];
#pragma unroll
  for (int u = 0; u < P; u++) load(u, a_lo[u], a_hi[u]);
  pdl_launch_dependents();
  pdl_wait();
  pro.load(xs, 8 * NT, stride, batch, cols, scratch);
  __syncthreads();

  float acc[NT][4];
#pragma unroll
  for (int n = 0; n < NT; n++) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.f;
  for (int j0 = 0; j0 < items; j0 += P) {
#pragma unroll
    for (int u = 0; u < P; u++) {
      const int j = j0 + u;
      if (j < items) {
        const int c = warp + (j % per_tile) * kGemvWarps;
#pragma unroll
        for (int n = 0; n < NT; n++) {
          const uint4 x = *reinterpret_cast<const uint4*>(xs + (size_t)(n * 8 + quad) * stride + c * 32 + tig * 8);
          // Two k16 steps: elements 0-3 of the lane's 8 columns, then 4-7 (see the note at the top).
          mma_bf16_or_f16(acc[n], a_lo[u].x, a_hi[u].x, a_lo[u].y, a_hi[u].y, x.x, x.y, T());
          mma_bf16_or_f16(acc[n], a_lo[u].z, a_hi[u].z, a_lo[u].w, a_hi[u].w, x.z, x.w, T());
        }
        load(j + P, a_lo[u], a_hi[u]);
        if (j % per_tile == per_tile - 1) {  // the warp's last chunk of this tile: sums meet, epilogue runs
          const int k = j / per_tile;
          float(*r)[16][8 * NT] = red[k & 1];
#pragma unroll
          for (int n = 0; n < NT; n++) {  // acc[n]: rows (quad, quad + 8) x batch (n * 8 + 2 tig, + 1)
            r[warp][quad][n * 8 + 2 * tig] = acc[n][0];
            r[warp][quad][n * 8 + 2 * tig + 1] = acc[n][1];
            r[warp][quad + 8][n * 8 + 2 * tig] = acc[n][2];
            r[warp][quad + 8][n * 8 + 2 * tig + 1] = acc[n][3];
            acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.f;
          }
          __syncthreads();
          const TileRows t = epi.tile(blockIdx.x + k * gridDim.x);
          for (int i = threadIdx.x; i < 8 * 8 * NT; i += blockDim.x) {
            const int row = i / (8 * NT), b = i % (8 * NT);
            if (b >= batch) continue;
            float lo = 0.f, hi = 0.f;
#pragma unroll
            for (int v = 0; v < kGemvWarps; v++) {
              lo += r[v][row][b];
              hi += r[v][row + 8][b];
            }
            epi.store(t, row, b, lo, hi);
          }
        }
      }
    }
  }
}

// Blocks that fit on the GPU at once for this instantiation: the persistent grid's size.
template <typename K> int resident_blocks(K kernel, size_t smem) {
  static int sms = 0;
  if (sms == 0) {
    int dev = 0;
    CUDA_CHECK(cudaGetDevice(&dev));
    CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  }
  int per_sm = 0;
  CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kGemvThreads, smem));
  return std::max(1, per_sm) * sms;
}

template <typename T, int NT, class Pro, class Epi>
void gemv_launch(const Launch& l, const T* w, int rows, int cols, int batch, int tiles, const Pro& pro, const Epi& epi) {
  constexpr int P = 8;
  auto kernel = gemv_kernel<T, NT, P, Pro, Epi>;
  const size_t smem = (size_t)8 * NT * (cols + kGemvPad) * sizeof(T);
  static size_t configured = 48 * 1024;  // per instantiation: raise the dynamic shared-memory limit once
  if (smem > configured) {
    CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
    configured = smem;
  }
  const int grid = std::min(tiles, resident_blocks(kernel, smem));
  launch(l, kernel, dim3(grid), dim3(kGemvThreads), smem, w, rows, cols, batch, tiles, pro, epi);
}

// Shared memory holds 8 NT rows of x: past this, a batch is split into parts that each read W again.
constexpr size_t kGemvMaxSmem = 200 * 1024;

// `rows` bounds the weight rows read; `tiles` (16 rows each) comes from the epilogue's tiling. Batches of
// up to 32 rows; the prologue and epilogue index the batch from row 0, so a split shifts their pointers.
template <typename T, class Pro, class Epi>
void gemv(const Launch& l, const T* w, int rows, int cols, int batch, int tiles, const Pro& pro, const Epi& epi) {
  const size_t row_bytes = (size_t)(cols + kGemvPad) * sizeof(T);
  if (batch <= 8) gemv_launch<T, 1>(l, w, rows, cols, batch, tiles, pro, epi);
  else if (batch <= 16) gemv_launch<T, 2>(l, w, rows, cols, batch, tiles, pro, epi);
  else if (batch <= 32 && 32 * row_bytes <= kGemvMaxSmem) gemv_launch<T, 4>(l, w, rows, cols, batch, tiles, pro, epi);
  else if (batch <= kGemvMaxBatch) {
    gemv_launch<T, 2>(l, w, rows, cols, 16, tiles, pro, epi);
    gemv_launch<T, 2>(l, w, rows, cols, batch - 16, tiles, pro.shifted(16), epi.shifted(16));
  } else {
    throw CudaError("gemv: batch " + std::to_string(batch) + " is over " + std::to_string(kGemvMaxBatch));
  }
}

}  // namespace decima

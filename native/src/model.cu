#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <map>

#include "advance.cuh"
#include "attention_decode.cuh"
#include "attention_prefill.cuh"
#include "elementwise.cuh"
#include "gemm.h"
#include "gemv.cuh"
#include "gemv_mlp.cuh"
#include "model.h"
#include "profiler.h"
#include "rope_table.h"
#include "sampling.cuh"

namespace decima {
namespace {

std::string mib(size_t bytes) { return std::to_string(bytes >> 20) + " MiB"; }

// Device memory owned in one place: a failed allocation is a one-line error with what was asked and why.
class Arena {
 public:
  ~Arena() {
    for (void* p : device_) cudaFree(p);
    for (void* p : host_) cudaFreeHost(p);
  }
  template <typename X> X* device(size_t count, const char* what) {
    void* p = nullptr;
    const size_t bytes = std::max<size_t>(count * sizeof(X), 256);
    if (cudaMalloc(&p, bytes) != cudaSuccess) {
      cudaGetLastError();
      size_t free_b = 0, total_b = 0;
      cudaMemGetInfo(&free_b, &total_b);
      throw CudaError("out of GPU memory: " + mib(bytes) + " for " + what + ", " + mib(free_b) + " free of " + mib(total_b));
    }
    device_.push_back(p);
    return static_cast<X*>(p);
  }
  template <typename X> X* host(size_t count, const char* what) {
    void* p = nullptr;
    if (cudaMallocHost(&p, std::max<size_t>(count * sizeof(X), 256)) != cudaSuccess) {
      cudaGetLastError();
      throw CudaError(std::string("cannot allocate pinned host memory for ") + what);
    }
    host_.push_back(p);
    return static_cast<X*>(p);
  }

 private:
  std::vector<void*> device_, host_;
};

constexpr int kMaxSteps = 64;           // decode steps in one call
constexpr int kMaxPenaltyTokens = 1 << 18;

// The per-step inputs live at fixed device addresses (captured graphs read them there); a pinned host
// mirror with the same layout is filled and copied in at most three transfers.
struct InputRegion {
  int32_t *tokens, *positions, *slots, *query_starts, *context_lens, *last_rows, *dec_seqs, *pre_seqs, *top_k, *pen_starts;
  uint32_t *seed, *counter;
  float *temperature, *top_p, *min_p, *repetition, *frequency, *presence;
  uint8_t* sample;
  int32_t *block_tables, *pen_tokens, *pen_counts;
  size_t fixed_words;

  // Carve the region out of `base` (device or host), in 32-bit words; returns the words used.
  size_t layout(uint32_t* base, int max_tokens, int max_seqs, int table_width) {
    size_t used = 0;
    auto take = [&](size_t words) {
      uint32_t* r = base + used;
      used += (words + 3) & ~size_t(3);  // keep 16-byte alignment
      return r;
    };
    tokens = (int32_t*)take(max_tokens);
    positions = (int32_t*)take(max_tokens);
    slots = (int32_t*)take(max_tokens);
    query_starts = (int32_t*)take(max_seqs + 1);
    context_lens = (int32_t*)take(max_seqs);
    last_rows = (int32_t*)take(max_seqs);
    dec_seqs = (int32_t*)take(max_seqs);
    pre_seqs = (int32_t*)take(max_seqs);
    top_k = (int32_t*)take(max_seqs);
    pen_starts = (int32_t*)take(max_seqs + 1);
    seed = take(max_seqs);
    counter = take(max_seqs);
    temperature = (float*)take(max_seqs);
    top_p = (float*)take(max_seqs);
    min_p = (float*)take(max_seqs);
    repetition = (float*)take(max_seqs);
    frequency = (float*)take(max_seqs);
    presence = (float*)take(max_seqs);
    sample = (uint8_t*)take((max_seqs + 3) / 4);
    fixed_words = used;
    block_tables = (int32_t*)take((size_t)max_seqs * table_width);
    pen_tokens = (int32_t*)take(kMaxPenaltyTokens);
    pen_counts = (int32_t*)take(kMaxPenaltyTokens);
    return used;
  }
};

// A linear layer's storage: 16-bit values, or quantized values and their scales (fp16).
struct Linear {
  void* data;
  half* scales;
  Quant quant;
};

struct LayerWeights {
  void *in_norm, *post_norm;
  Linear qkv, o, gate_up, down;
};

template <typename T, int HD> class Runner final : public Model {
 public:
  Runner(const ModelDims& d, const RunnerOptions& o) : d_(d), o_(o), gemm_(32u << 20), prof_(o.profile) {
    if (o_.profile) o_.graphs = false;  // the profiler times eager launches
    table_width_ = ceil_div(d.max_pos, o.block_size);
    allocate_weights();
    allocate_workspace();
    allocate_kv();
    CUDA_CHECK(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
  }
  ~Runner() override {
    for (auto& [key, exec] : graphs_) cudaGraphExecDestroy(exec);
    for (cudaEvent_t e : staged_)
      if (e) cudaEventDestroy(e);
    cudaStreamDestroy(stream_);
  }

  int kv_blocks() const override { return kv_blocks_; }
  std::vector<WeightInfo> weights() const override { return weight_info_; }
  std::string describe() const override {
    cudaDeviceProp p{};
    int dev = 0;
    cudaGetDevice(&dev);
    cudaGetDeviceProperties(&p, dev);
    return std::string("cuda ") + (d_.dtype == DType::F16 ? "float16" : "bfloat16") + " on " + p.name;
  }

  void upload(const std::string& name, int layer, const void* data, size_t bytes) override {
    CUDA_CHECK(cudaMemcpy(weight_slot(name, layer, bytes), data, bytes, cudaMemcpyHostToDevice));
  }

  void upload_file(const std::string& name, int layer, const std::string& path, size_t offset, size_t bytes) override {
    char* dst = static_cast<char*>(weight_slot(name, layer, bytes));
    const int fd = open(path.c_str(), O_RDONLY);
    if (fd < 0) throw CudaError("cannot open " + path + ": " + std::strerror(errno));
    if (!staging_[0]) {
      for (int i = 0; i < 2; i++) {
        staging_[i] = arena_.host<char>(kStagingBytes, "weight staging");
        CUDA_CHECK(cudaEventCreateWithFlags(&staged_[i], cudaEventDisableTiming));
      }
    }
    try {
      for (size_t done = 0, i = 0; done < bytes; i++) {
        const size_t n = std::min(kStagingBytes, bytes - done);
        char* buf = staging_[i % 2];
        CUDA_CHECK(cudaEventSynchronize(staged_[i % 2]));  // its previous copy is done
        for (size_t got = 0; got < n;) {
          const ssize_t r = pread(fd, buf + got, n - got, (off_t)(offset + done + got));
          if (r <= 0) throw CudaError(path + ": short read at byte " + std::to_string(offset + done + got));
          got += (size_t)r;
        }
        CUDA_CHECK(cudaMemcpyAsync(dst + done, buf, n, cudaMemcpyHostToDevice, stream_));
        CUDA_CHECK(cudaEventRecord(staged_[i % 2], stream_));
        done += n;
      }
      CUDA_CHECK(cudaStreamSynchronize(stream_));
    } catch (...) {
      close(fd);
      throw;
    }
    close(fd);
  }

  void warmup(int max_seqs) override {
    if (o_.block_size < 16) throw CudaError("warm-up: block size under 16");
    step(warmup_input(1, 16));  // a prefill
    const int top = std::min(max_seqs, o_.max_seqs);
    for (int seqs = 1;; seqs = bucket(seqs + 1)) {
      step(warmup_input(std::min(seqs, top), 1));  // decodes: each bucket's graph
      if (seqs >= top) break;
    }
  }

  // `seqs` sequences of `len` new tokens each, all on block 0 (their K/V overwrite each other: nothing reads them).
  static StepInput warmup_input(int seqs, int len) {
    StepInput in;
    in.num_tokens = seqs * len;
    in.num_seqs = seqs;
    in.table_width = 1;
    in.tokens.assign(in.num_tokens, 0);
    for (int s = 0; s <= seqs; s++) in.query_starts.push_back(s * len);
    in.context_lens.assign(seqs, len);
    in.block_tables.assign(seqs, 0);
    in.sample.assign(seqs, 1);
    in.temperature.assign(seqs, 0.f);
    in.top_k.assign(seqs, 0);
    in.top_p.assign(seqs, 1.f);
    in.min_p.assign(seqs, 0.f);
    in.repetition.assign(seqs, 1.f);
    in.frequency.assign(seqs, 0.f);
    in.presence.assign(seqs, 0.f);
    in.seed.assign(seqs, 0);
    in.counter.assign(seqs, 0);
    in.pen_starts.assign(seqs + 1, 0);
    return in;
  }

  StepOutput step(const StepInput& in) override {
    validate(in);
    const bool decode_only = in.num_tokens == in.num_seqs && all_single(in);
    if (in.steps > 1 && (!decode_only || in.logits != 0)) throw CudaError("several steps at once need a decode-only batch without logits");
    if (decode_only && in.logits == 0) return decode(in);
    return general(in);
  }

 private:
  // ---- allocation ---------------------------------------------------------------------------------------

  // Where weight `name` of `layer` goes, once its size is checked.
  void* weight_slot(const std::string& name, int layer, size_t bytes) {
    for (const auto& w : weight_info_) {
      if (w.name != name || w.layer != layer) continue;
      if (w.bytes != bytes) throw CudaError("weight " + name + " of layer " + std::to_string(layer) + " has " + std::to_string(bytes) + " bytes, expected " + std::to_string(w.bytes));
      return weight_ptr_.at(key(name, layer));
    }
    throw CudaError("unknown weight " + name + " (layer " + std::to_string(layer) + ")");
  }

  static std::string key(const std::string& name, int layer) { return name + "#" + std::to_string(layer); }

  void add_weight(const std::string& name, int layer, size_t elements) {
    weight_info_.push_back({name, layer, elements * sizeof(T)});
  }

  // A linear layer's data and, when quantized, its scales ("<name>.scales"), in the layout of
  // src/model/weights.ts.
  void add_linear(const std::string& name, int layer, size_t rows, size_t cols, Quant quant) {
    switch (quant) {
      case Quant::None: add_weight(name, layer, rows * cols); return;
      case Quant::Int8:
        weight_info_.push_back({name, layer, rows * cols});
        weight_info_.push_back({name + ".scales", layer, rows * 2});
        return;
      case Quant::Int4:
        weight_info_.push_back({name, layer, rows * cols / 2});
        weight_info_.push_back({name + ".scales", layer, rows * (cols / d_.group) * 2});
        return;
    }
  }

  Linear linear(const std::string& name, int layer, Quant quant) {
    return Linear{weight_ptr_.at(key(name, layer)), quant != Quant::None ? (half*)weight_ptr_.at(key(name + ".scales", layer)) : nullptr, quant};
  }

  // Call f with the linear layer as its kernels read it (DenseW, Int8W or Int4W, see gemv.cuh).
  template <class F> void with_linear(const Linear& lin, int cols, F&& f) const {
    with_weight_format<T>(static_cast<int>(lin.quant), lin.data, lin.scales, cols, d_.group, f);
  }

  // Rows [r0, r0 + rows) of a linear layer as 16-bit values for cuBLASLt: itself, or dequantized into scratch.
  const void* dense(const Launch& l, const Linear& lin, int cols, int r0, int rows) {
    if (lin.quant == Quant::None) return static_cast<const T*>(lin.data) + (size_t)r0 * cols;
    with_linear(lin, cols, [&](const auto& w) {
      using W = std::decay_t<decltype(w)>;
      const int vecs = rows * (cols / W::kPerVec);
      launch(l, dequantize_kernel<T, W>, dim3(std::min(ceil_div(vecs, 256), 4096)), dim3(256), 0, w.from_row(r0), rows, dequant_);
    });
    return dequant_;
  }

  // out[rows][vocab] = x (rows of `hidden`) times the LM head, through cuBLASLt. A quantized head goes in
  // slices of vocabulary rows that fit the dequantization scratch, each slice's logits copied into place
  // (a scratch for the whole head would be the size of the 16-bit head the quantization saved).
  void head_gemm(const Launch& l, const T* x, int rows, float* out) {
    const int h = d_.hidden, v = d_.vocab;
    if (lm_head_.quant == Quant::None) {
      gemm_.run(stream_, d_.dtype, lm_head_.data, x, out, rows, v, h, true, false);
      return;
    }
    for (int r0 = 0; r0 < v; r0 += head_slice_) {
      const int n = std::min(head_slice_, v - r0);
      gemm_.run(stream_, d_.dtype, dense(l, lm_head_, h, r0, n), x, head_logits_, rows, n, h, true, false);
      CUDA_CHECK(cudaMemcpy2DAsync(out + r0, (size_t)v * 4, head_logits_, (size_t)n * 4, (size_t)n * 4, rows, cudaMemcpyDeviceToDevice, stream_));
    }
  }

  void allocate_weights() {
    const size_t h = d_.hidden;
    add_weight("embed", -1, (size_t)d_.vocab * h);
    for (int i = 0; i < (int)d_.layers.size(); i++) {
      const LayerDims& l = d_.layers[i];
      add_weight("in_norm", i, h);
      add_linear("qkv", i, (size_t)(l.heads + 2 * l.kv_heads) * l.head_dim, h, d_.quant);
      add_linear("o", i, h, (size_t)l.heads * l.head_dim, d_.quant);
      add_weight("post_norm", i, h);
      add_linear("gate_up", i, 2 * (size_t)l.inter, h, d_.quant);
      add_linear("down", i, h, l.inter, d_.quant);
    }
    add_weight("norm", -1, h);
    if (!d_.tied) add_linear("lm_head", -1, d_.vocab, h, d_.head_quant);
    size_t total = 0;
    for (const auto& w : weight_info_) total += (w.bytes + 255) & ~size_t(255);
    char* base = arena_.device<char>(total, "weights");
    for (const auto& w : weight_info_) {
      weight_ptr_[key(w.name, w.layer)] = base;
      base += (w.bytes + 255) & ~size_t(255);
    }
    layers_.resize(d_.layers.size());
    for (int i = 0; i < (int)d_.layers.size(); i++) {
      LayerWeights& lw = layers_[i];
      lw.in_norm = weight_ptr_[key("in_norm", i)];
      lw.qkv = linear("qkv", i, d_.quant);
      lw.o = linear("o", i, d_.quant);
      lw.post_norm = weight_ptr_[key("post_norm", i)];
      lw.gate_up = linear("gate_up", i, d_.quant);
      lw.down = linear("down", i, d_.quant);
    }
    embed_ = (T*)weight_ptr_[key("embed", -1)];
    norm_ = (T*)weight_ptr_[key("norm", -1)];
    lm_head_ = d_.tied ? Linear{embed_, nullptr, Quant::None} : linear("lm_head", -1, d_.head_quant);
  }

  void allocate_workspace() {
    int max_heads = 0, max_inter = 0, max_qkv = 0;
    for (const auto& l : d_.layers) {
      max_heads = std::max(max_heads, l.heads);
      max_inter = std::max(max_inter, l.inter);
      max_qkv = std::max(max_qkv, (l.heads + 2 * l.kv_heads) * HD);
    }
    const size_t t = o_.max_tokens, s = o_.max_seqs, h = d_.hidden;
    // Steps of up to gemv_rows_ tokens run the GEMVs, so every layer's products must take that many rows.
    gemv_rows_ = kGemvMmaMaxBatch;
    for (const auto& l : d_.layers)
      for (int cols : {d_.hidden, l.heads * HD, l.inter}) gemv_rows_ = std::min(gemv_rows_, gemv_max_batch(static_cast<int>(d_.quant), d_.group, cols));
    // The fused kernels take int4 weights alone (gemv_mlp_fits, attention_o_fits).
    fused_mlp_ = o_.fused_mlp;
    for (const auto& l : d_.layers) {
      fused_mlp_ = fused_mlp_ && gemv_mlp_fits(static_cast<int>(d_.quant), d_.group, d_.hidden, l.inter);
      auto fits = [&](int seqs) {
        return attention_o_fits(static_cast<int>(d_.quant), d_.group, d_.hidden, l.heads, l.kv_heads, HD, decode_cluster(seqs));
      };
      fused_o_.push_back(o_.fused_o && fits(1) && fits(kAttnOMaxSeqs));
    }
    resid_ = arena_.device<float>(t * h, "residual stream");
    if (fused_mlp_) resid_copy_ = arena_.device<float>((size_t)gemv_rows_ * h, "residual stream copy");
    xnorm_ = arena_.device<T>(t * h, "normalised activations");
    qkv_ = arena_.device<T>(t * max_qkv, "QKV products");
    q_ = arena_.device<T>(t * max_heads * HD, "queries");
    attn_ = arena_.device<T>(t * max_heads * HD, "attention output");
    gate_up_ = arena_.device<T>(t * 2 * max_inter, "gate/up products");
    size_t biggest = 0;  // the largest quantized linear layer, or LM head slice, dequantized for cuBLASLt
    if (d_.quant != Quant::None)
      for (const auto& l : d_.layers)
        biggest = std::max({biggest, (size_t)(l.heads + 2 * l.kv_heads) * HD * h, 2 * (size_t)l.inter * h, (size_t)l.inter * h});
    if (lm_head_.quant != Quant::None) {
      // At most half the vocabulary, so that even tiny test models cross a slice boundary.
      head_slice_ = (int)std::min<size_t>(ceil_div(d_.vocab, 2), biggest ? biggest / h : 8192);
      biggest = std::max(biggest, (size_t)head_slice_ * h);
      head_logits_ = arena_.device<float>(s * head_slice_, "LM head slice logits");
    }
    if (biggest) dequant_ = arena_.device<T>(biggest, "dequantized weights");
    act_ = arena_.device<T>(t * max_inter, "MLP activations");
    logits_ = arena_.device<float>(s * d_.vocab, "logits");
    probs_ = arena_.device<float>(s * d_.vocab, "sampling probabilities");
    cur_tokens_ = arena_.device<int>(s, "sampling");
    cur_logprobs_ = arena_.device<float>(s, "sampling");
    cur_top_ids_ = arena_.device<int>(s * kMaxTopLogprobs, "sampling");
    cur_top_lps_ = arena_.device<float>(s * kMaxTopLogprobs, "sampling");
    pen_saved_ = arena_.device<float>(kMaxPenaltyTokens, "penalties");
    step_idx_ = arena_.device<int>(1, "step counter");
    out_tokens_ = arena_.device<int>(kMaxSteps * s, "step outputs");
    out_logprobs_ = arena_.device<float>(kMaxSteps * s, "step outputs");
    out_top_ids_ = arena_.device<int>(kMaxSteps * s * kMaxTopLogprobs, "step outputs");
    out_top_lps_ = arena_.device<float>(kMaxSteps * s * kMaxTopLogprobs, "step outputs");
    host_out_i_ = arena_.host<int>(kMaxSteps * s * (1 + kMaxTopLogprobs), "step outputs");
    host_out_f_ = arena_.host<float>(kMaxSteps * s * (1 + kMaxTopLogprobs), "step outputs");

    const size_t words = InputRegion().layout(nullptr, o_.max_tokens, o_.max_seqs, table_width_);
    dev_in_base_ = arena_.device<uint32_t>(words, "step inputs");
    host_in_base_ = arena_.host<uint32_t>(words, "step inputs");
    dev_in_.layout(dev_in_base_, o_.max_tokens, o_.max_seqs, table_width_);
    host_in_.layout(host_in_base_, o_.max_tokens, o_.max_seqs, table_width_);

    std::vector<float2> table = rope_table(d_.rope_theta, d_.rope_factor, HD, d_.max_pos);
    rope_ = arena_.device<float2>(table.size(), "rotary table");
    CUDA_CHECK(cudaMemcpy(rope_, table.data(), table.size() * sizeof(float2), cudaMemcpyHostToDevice));
  }

  void allocate_kv() {
    size_t per_block = 0;  // bytes of one block across all layers, K and V
    for (const auto& l : d_.layers) per_block += 2 * (size_t)l.kv_heads * o_.block_size * HD * sizeof(T);
    kv_blocks_ = o_.kv_blocks;
    if (kv_blocks_ <= 0) {
      size_t free_b = 0, total_b = 0;
      CUDA_CHECK(cudaMemGetInfo(&free_b, &total_b));
      const size_t fit = (size_t)(free_b * o_.kv_fraction) / per_block;
      kv_blocks_ = (int)std::min<size_t>(fit > 1 ? fit - 1 : 0, INT32_MAX / 2);
      if (kv_blocks_ < 1) throw CudaError("out of GPU memory: no room for the KV cache (" + mib(free_b) + " free)");
    }
    // One block past the pool is scratch: padded batch rows write there.
    const size_t blocks = (size_t)kv_blocks_ + 1;
    for (const auto& l : d_.layers) {
      const size_t elems = blocks * l.kv_heads * o_.block_size * HD;
      k_cache_.push_back(arena_.device<T>(elems, "KV cache"));
      v_cache_.push_back(arena_.device<T>(elems, "KV cache"));
      CUDA_CHECK(cudaMemset(k_cache_.back() + (size_t)kv_blocks_ * l.kv_heads * o_.block_size * HD, 0, l.kv_heads * o_.block_size * HD * sizeof(T)));
      CUDA_CHECK(cudaMemset(v_cache_.back() + (size_t)kv_blocks_ * l.kv_heads * o_.block_size * HD, 0, l.kv_heads * o_.block_size * HD * sizeof(T)));
    }
  }

  // ---- inputs -----------------------------------------------------------------------------------------

  static bool all_single(const StepInput& in) {
    for (int s = 0; s < in.num_seqs; s++)
      if (in.query_starts[s + 1] - in.query_starts[s] != 1) return false;
    return true;
  }

  void validate(const StepInput& in) const {
    auto bad = [](const std::string& m) { throw CudaError("bad step: " + m); };
    if (in.num_seqs < 1 || in.num_seqs > o_.max_seqs) bad(std::to_string(in.num_seqs) + " sequences (at most " + std::to_string(o_.max_seqs) + ")");
    if (in.num_tokens < 1 || in.num_tokens > o_.max_tokens) bad(std::to_string(in.num_tokens) + " tokens (at most " + std::to_string(o_.max_tokens) + ")");
    if (in.table_width > table_width_) bad("block table width " + std::to_string(in.table_width));
    if (in.steps < 1 || in.steps > kMaxSteps) bad(std::to_string(in.steps) + " steps");
    if (in.top_n < 0 || in.top_n > kMaxTopLogprobs) bad(std::to_string(in.top_n) + " top log-probs");
    if ((int)in.pen_tokens.size() > kMaxPenaltyTokens) bad("too many penalised tokens");
    for (int t : in.tokens)
      if (t < 0 || t >= d_.vocab) bad("token id " + std::to_string(t) + " outside the vocabulary of " + std::to_string(d_.vocab));
    for (int s = 0; s < in.num_seqs; s++) {
      const int qlen = in.query_starts[s + 1] - in.query_starts[s], ctx = in.context_lens[s];
      if (qlen < 1 || ctx < qlen || ctx + in.steps - 1 > d_.max_pos) bad("sequence " + std::to_string(s) + " context " + std::to_string(ctx));
      const int needed = ceil_div(ctx + in.steps - 1, o_.block_size);
      if (needed > in.table_width) bad("sequence " + std::to_string(s) + " has too few KV blocks");
      for (int j = 0; j < needed; j++) {
        const int b = in.block_tables[(size_t)s * in.table_width + j];
        if (b < 0 || b >= kv_blocks_) bad("KV block " + std::to_string(b) + " outside the pool of " + std::to_string(kv_blocks_));
      }
    }
  }

  struct Shape {
    int tokens, seqs, n_dec, n_pre, max_qlen, pen;
  };

  // Fill the host mirror for `rows` sequences (>= in.num_seqs: the rest are padding) and copy it in.
  Shape stage(const StepInput& in, int rows) {
    InputRegion& h = host_in_;
    const int bs = o_.block_size;
    const int pad = rows - in.num_seqs;
    const int tokens = in.num_tokens + pad;
    Shape sh{tokens, rows, 0, 0, 0, (int)in.pen_tokens.size()};
    for (int s = 0; s < rows; s++) {
      const bool real = s < in.num_seqs;
      const int q0 = real ? in.query_starts[s] : in.num_tokens + (s - in.num_seqs);
      const int qlen = real ? in.query_starts[s + 1] - q0 : 1;
      const int ctx = real ? in.context_lens[s] : 1;
      h.query_starts[s] = q0;
      h.context_lens[s] = ctx;
      h.last_rows[s] = q0 + qlen - 1;
      if (qlen == 1) h.dec_seqs[sh.n_dec++] = s;
      else {
        h.pre_seqs[sh.n_pre++] = s;
        sh.max_qlen = std::max(sh.max_qlen, qlen);
      }
      int32_t* row = h.block_tables + (size_t)s * table_width_;
      for (int j = 0; j < table_width_; j++) row[j] = real && j < in.table_width ? in.block_tables[(size_t)s * in.table_width + j] : kv_blocks_;
      for (int j = 0; j < qlen; j++) {
        const int pos = ctx - qlen + j, t = q0 + j;
        h.tokens[t] = real ? in.tokens[t] : 0;
        h.positions[t] = pos;
        h.slots[t] = row[pos / bs] * bs + pos % bs;
      }
      h.temperature[s] = real ? in.temperature[s] : 0.f;
      h.top_k[s] = real ? in.top_k[s] : 0;
      h.top_p[s] = real ? in.top_p[s] : 1.f;
      h.min_p[s] = real ? in.min_p[s] : 0.f;
      h.repetition[s] = real ? in.repetition[s] : 1.f;
      h.frequency[s] = real ? in.frequency[s] : 0.f;
      h.presence[s] = real ? in.presence[s] : 0.f;
      h.seed[s] = real ? in.seed[s] : 0;
      h.counter[s] = real ? in.counter[s] : 0;
      h.sample[s] = real ? in.sample[s] : 1;
      h.pen_starts[s] = real ? in.pen_starts[s] : sh.pen;
    }
    h.query_starts[rows] = tokens;
    h.pen_starts[rows] = sh.pen;
    std::copy(in.pen_tokens.begin(), in.pen_tokens.end(), h.pen_tokens);
    std::copy(in.pen_counts.begin(), in.pen_counts.end(), h.pen_counts);

    CUDA_CHECK(cudaMemcpyAsync(dev_in_base_, host_in_base_, h.fixed_words * 4, cudaMemcpyHostToDevice, stream_));
    CUDA_CHECK(cudaMemcpyAsync(dev_in_.block_tables, h.block_tables, (size_t)rows * table_width_ * 4, cudaMemcpyHostToDevice, stream_));
    if (sh.pen) {
      CUDA_CHECK(cudaMemcpyAsync(dev_in_.pen_tokens, h.pen_tokens, sh.pen * 4, cudaMemcpyHostToDevice, stream_));
      CUDA_CHECK(cudaMemcpyAsync(dev_in_.pen_counts, h.pen_counts, sh.pen * 4, cudaMemcpyHostToDevice, stream_));
    }
    return sh;
  }

  // ---- the forward pass ---------------------------------------------------------------------------------

  Launch launch_config() const { return Launch{stream_, o_.pdl}; }

  RopeArgs rope_args() const { return RopeArgs{rope_, dev_in_.positions, dev_in_.slots}; }

  // One decoder step over `sh.tokens` rows, ending with sampled tokens in cur_*. With few rows the matrix
  // products are GEMVs with their neighbours fused in; otherwise cuBLASLt with small kernels between.
  void forward(const Shape& sh, int top_n, float* logits_to_host = nullptr) {
    const Launch l = launch_config();
    const int n = sh.tokens, h = d_.hidden;
    const bool small = n <= gemv_rows_;
    float* const copy = fused_mlp_ ? resid_copy_ : nullptr;  // for the fused MLP's norm: see gemv_mlp.cuh
    const DType dt = d_.dtype;
    prof_.begin(stream_);
    launch(l, embedding_kernel<T>, dim3(n), dim3(256), 0, (const T*)embed_, (const int*)dev_in_.tokens, resid_, h);
    prof_.mark(stream_, "embedding");
    for (size_t i = 0; i < d_.layers.size(); i++) {
      const LayerDims& ld = d_.layers[i];
      const LayerWeights& w = layers_[i];
      const int qw = ld.heads * HD, rows_qkv = (ld.heads + 2 * ld.kv_heads) * HD;
      const bool fuse_o = small && fused_o_[i] && sh.n_pre == 0 && n <= kAttnOMaxSeqs;  // attention_o
      if (small) {
        EpiQkvRope<T> epi{HD, ld.heads, ld.kv_heads, o_.block_size, q_, qw, k_cache_[i], v_cache_[i], rope_args()};
        with_linear(w.qkv, h, [&](const auto& wq) {
          const ProRmsNorm<T> pro{resid_, h, (const T*)w.in_norm, d_.eps, fuse_o ? copy : nullptr};
          gemv<T>(l, wq, rows_qkv, h, n, EpiQkvRope<T>::tiles(HD, ld.heads, ld.kv_heads), pro, epi);
        });
        prof_.mark(stream_, "gemv qkv+rope");
      } else {
        launch(l, rmsnorm_kernel<T>, dim3(n), dim3(256), 0, (const float*)resid_, (const int*)nullptr, (const T*)w.in_norm, xnorm_, h, d_.eps);
        prof_.mark(stream_, "rmsnorm");
        gemm_.run(stream_, dt, dense(l, w.qkv, h, 0, rows_qkv), xnorm_, qkv_, n, rows_qkv, h, false, false);
        prof_.mark(stream_, "gemm qkv");
        launch(l, rope_kv_write_kernel<T>, dim3(n), dim3(128), 0, (const T*)qkv_, HD, ld.heads, ld.kv_heads, o_.block_size, q_, k_cache_[i],
               v_cache_[i], rope_args());
        prof_.mark(stream_, "rope+kv write");
      }
      if (fuse_o) attention_o(l, sh, ld, i, w.o, copy);
      else attention(l, sh, ld, i);
      if (small) {
        EpiResidual epi{};
        epi.rows = h;
        epi.resid = resid_;
        epi.ld = h;
        epi.copy = copy;  // null wherever the down product below runs
        if (!fuse_o) {
          with_linear(w.o, qw, [&](const auto& wo) { gemv<T>(l, wo, h, qw, n, RowsLinear::tiles(h), ProPlain<T>{attn_, qw}, epi); });
          prof_.mark(stream_, "gemv o");
        }
        if (fused_mlp_) {
          mlp(l, w, ld, n);
          continue;
        }
        EpiSiluMul<T> act{ld.inter, act_, ld.inter};
        with_linear(w.gate_up, h, [&](const auto& wg) {
          gemv<T>(l, wg, 2 * ld.inter, h, n, EpiSiluMul<T>::tiles(ld.inter), ProRmsNorm<T>{resid_, h, (const T*)w.post_norm, d_.eps}, act);
        });
        prof_.mark(stream_, "gemv gate/up+silu");
        with_linear(w.down, ld.inter, [&](const auto& wd) { gemv<T>(l, wd, h, ld.inter, n, RowsLinear::tiles(h), ProPlain<T>{act_, ld.inter}, epi); });
        prof_.mark(stream_, "gemv down");
      } else {
        gemm_.run(stream_, dt, dense(l, w.o, qw, 0, h), attn_, resid_, n, h, qw, true, true);
        prof_.mark(stream_, "gemm o");
        launch(l, rmsnorm_kernel<T>, dim3(n), dim3(256), 0, (const float*)resid_, (const int*)nullptr, (const T*)w.post_norm, xnorm_, h, d_.eps);
        prof_.mark(stream_, "rmsnorm");
        gemm_.run(stream_, dt, dense(l, w.gate_up, h, 0, 2 * ld.inter), xnorm_, gate_up_, n, 2 * ld.inter, h, false, false);
        prof_.mark(stream_, "gemm gate/up");
        launch(l, silu_mul_kernel<T>, dim3(ceil_div(ld.inter, 256), n), dim3(256), 0, (const T*)gate_up_, act_, ld.inter);
        prof_.mark(stream_, "silu x up");
        gemm_.run(stream_, dt, dense(l, w.down, ld.inter, 0, h), act_, resid_, n, h, ld.inter, true, true);
        prof_.mark(stream_, "gemm down");
      }
    }
    lm_head(l, sh);
    prof_.mark(stream_, "lm head");
    // Raw logits leave before the penalties change them in place.
    if (logits_to_host) CUDA_CHECK(cudaMemcpyAsync(logits_to_host, logits_, (size_t)sh.seqs * d_.vocab * 4, cudaMemcpyDeviceToHost, stream_));
    sample(l, sh.seqs, top_n);
    prof_.mark(stream_, "sampling");
    prof_.end();
  }

  // The whole MLP of a few rows as one kernel (gemv_mlp.cuh): it normalises the residual's copy and adds
  // into the stream itself.
  void mlp(const Launch& l, const LayerWeights& w, const LayerDims& ld, int n) {
    const ProRmsNorm<T> pro{resid_copy_, d_.hidden, (const T*)w.post_norm, d_.eps};
    gemv_mlp<T>(l, int4(w.gate_up, d_.hidden), int4(w.down, ld.inter), d_.hidden, ld.inter, n, pro, resid_, d_.hidden);
    prof_.mark(stream_, "gemv mlp");
  }

  // A linear layer as the int4-only fused kernels read it (gemv_mlp_fits and attention_o_fits admit int4
  // engines alone).
  Int4W<T> int4(const Linear& lin, int cols) const {
    if (lin.quant != Quant::Int4) throw CudaError("fused kernels: int4 weights only");
    return Int4W<T>::make(static_cast<const uint8_t*>(lin.data), lin.scales, cols, d_.group);
  }

  DecodeAttnArgs decode_args(const LayerDims& ld) const {
    return {dev_in_.dec_seqs, dev_in_.query_starts, dev_in_.context_lens, dev_in_.block_tables, table_width_, ld.heads, ld.kv_heads,
            o_.block_size, 1.f / std::sqrt((float)HD)};
  }

  void attention(const Launch& l, const Shape& sh, const LayerDims& ld, size_t i) {
    const int qw = ld.heads * HD;
    if (sh.n_dec) {
      attention_decode<T, HD>(l, sh.n_dec, q_, qw, k_cache_[i], v_cache_[i], attn_, qw, decode_args(ld));
      prof_.mark(stream_, "attention decode");
    }
    if (sh.n_pre) {
      PrefillAttnArgs a{dev_in_.pre_seqs, dev_in_.query_starts, dev_in_.context_lens, dev_in_.block_tables, table_width_, ld.heads, ld.kv_heads,
                        o_.block_size, 1.4426950408889634f / std::sqrt((float)HD)};
      attention_prefill<T, HD>(l, sh.n_pre, sh.max_qlen, q_, qw, k_cache_[i], v_cache_[i], attn_, qw, a);
      prof_.mark(stream_, "attention prefill");
    }
  }

  // Decode attention with the O projection fused in (attention_decode.cuh), adding into the residual
  // stream and, for the fused MLP, its copy (which the QKV product's prologue made).
  void attention_o(const Launch& l, const Shape& sh, const LayerDims& ld, size_t i, const Linear& o, float* copy) {
    const int qw = ld.heads * HD;
    const AttnOProj<T> op{int4(o, qw), d_.hidden, resid_, copy, d_.hidden};
    attention_decode<T, HD>(l, sh.n_dec, q_, qw, k_cache_[i], v_cache_[i], nullptr, qw, decode_args(ld), decode_cluster(sh.n_dec), op);
    prof_.mark(stream_, "attention decode + o");
  }

  // Logits for each sequence's last row. When every row is its own sequence's last, the final norm fuses
  // into the LM head's GEMV; otherwise the rows are gathered and normalised first.
  void lm_head(const Launch& l, const Shape& sh) {
    const int h = d_.hidden, s = sh.seqs;
    EpiLogits epi{};
    epi.rows = d_.vocab;
    epi.out = logits_;
    epi.ld = d_.vocab;
    const int gemv_rows = gemv_max_batch(static_cast<int>(lm_head_.quant), d_.group, h);
    if (sh.tokens == s && s <= gemv_rows) {
      with_linear(lm_head_, h, [&](const auto& head) {
        gemv<T>(l, head, d_.vocab, h, s, RowsLinear::tiles(d_.vocab), ProRmsNorm<T>{resid_, h, norm_, d_.eps}, epi);
      });
      return;
    }
    launch(l, rmsnorm_kernel<T>, dim3(s), dim3(256), 0, (const float*)resid_, (const int*)dev_in_.last_rows, (const T*)norm_, xnorm_, h, d_.eps);
    if (s <= gemv_rows) {
      with_linear(lm_head_, h, [&](const auto& head) { gemv<T>(l, head, d_.vocab, h, s, RowsLinear::tiles(d_.vocab), ProPlain<T>{xnorm_, h}, epi); });
    } else {
      head_gemm(l, xnorm_, s, logits_);
    }
  }

  void sample(const Launch& l, int seqs, int top_n) {
    SampleOut out{cur_tokens_, cur_logprobs_, cur_top_ids_, cur_top_lps_};
    SamplingArgs a{dev_in_.temperature, dev_in_.top_k, dev_in_.top_p, dev_in_.min_p, dev_in_.repetition, dev_in_.frequency, dev_in_.presence,
                   dev_in_.seed, dev_in_.counter, dev_in_.sample, dev_in_.pen_starts, dev_in_.pen_tokens, dev_in_.pen_counts, pen_saved_};
    launch_sample(l, logits_, probs_, seqs, d_.vocab, top_n, a, out);
  }

  void advance(const Launch& l, int rows, int top_n) {
    AdvanceArgs a{dev_in_.tokens, dev_in_.positions, dev_in_.slots, dev_in_.context_lens, dev_in_.counter, dev_in_.block_tables, table_width_,
                  o_.block_size, kv_blocks_, cur_tokens_, cur_logprobs_, cur_top_ids_, cur_top_lps_, top_n, step_idx_, out_tokens_,
                  out_logprobs_, out_top_ids_, out_top_lps_};
    launch(l, advance_kernel, dim3(1), dim3(256), 0, rows, a);
  }

  // ---- step kinds -----------------------------------------------------------------------------------------

  static int bucket(int seqs) {
    int b = 1;
    while (b < seqs) b = b < 8 ? b * 2 : b + 8 * (b / 32 + 1);  // 1 2 4 8 16 24 32 48 64 ...
    return b;
  }

  // Decode-only batches: `steps` steps back to back, each a replay of the bucket's captured graph (the
  // sampled tokens feed the next step on the device), padded to the bucket's size.
  StepOutput decode(const StepInput& in) {
    const int rows = std::min(bucket(in.num_seqs), o_.max_seqs);
    const Shape sh = stage(in, rows);
    CUDA_CHECK(cudaMemsetAsync(step_idx_, 0, sizeof(int), stream_));
    if (o_.graphs) {
      cudaGraphExec_t exec = graph(sh, in.top_n);
      for (int k = 0; k < in.steps; k++) CUDA_CHECK(cudaGraphLaunch(exec, stream_));
    } else {
      for (int k = 0; k < in.steps; k++) decode_step(sh, in.top_n);
    }
    return collect(in, rows, in.steps, out_tokens_, out_logprobs_, out_top_ids_, out_top_lps_);
  }

  // One decode step as graphs capture it: the forward pass, then the sampled tokens fed back as the next inputs.
  void decode_step(const Shape& sh, int top_n) {
    forward(sh, top_n);
    advance(launch_config(), sh.seqs, top_n);
  }

  cudaGraphExec_t graph(const Shape& sh, int top_n) {
    const auto k = std::make_pair(sh.seqs, top_n);
    auto it = graphs_.find(k);
    if (it != graphs_.end()) return it->second;
    // One eager run first: kernels load, cuBLASLt tunes its shapes (it cannot while capturing). It computes
    // exactly what the first replay recomputes (same K/V slots, same sample), so it changes nothing.
    {
      Gemm::Tuning tuning(gemm_);
      forward(sh, top_n);
    }
    cudaGraph_t g = nullptr;
    CUDA_CHECK(cudaStreamBeginCapture(stream_, cudaStreamCaptureModeThreadLocal));
    try {
      decode_step(sh, top_n);
    } catch (...) {
      cudaStreamEndCapture(stream_, &g);
      if (g) cudaGraphDestroy(g);
      throw;
    }
    CUDA_CHECK(cudaStreamEndCapture(stream_, &g));
    cudaGraphExec_t exec = nullptr;
    const cudaError_t e = cudaGraphInstantiate(&exec, g, 0);
    cudaGraphDestroy(g);
    CUDA_CHECK(e);
    graphs_[k] = exec;
    return exec;
  }

  // Anything else (prefill, mixed prefill and decode, logits wanted): one eager step.
  StepOutput general(const StepInput& in) {
    const Shape sh = stage(in, in.num_seqs);
    std::vector<float> last(in.logits == 1 ? (size_t)in.num_seqs * d_.vocab : 0);
    forward(sh, in.top_n, in.logits == 1 ? last.data() : nullptr);
    StepOutput out = collect(in, in.num_seqs, 1, cur_tokens_, cur_logprobs_, cur_top_ids_, cur_top_lps_);
    if (in.logits == 1) out.logits = std::move(last);
    if (in.logits == 2) out.logits = all_logits(sh);
    return out;
  }

  // Logits of every token row, in chunks through the sampling scratch buffer.
  std::vector<float> all_logits(const Shape& sh) {
    const Launch l = launch_config();
    const int h = d_.hidden, chunk = o_.max_seqs;
    std::vector<float> all((size_t)sh.tokens * d_.vocab);
    for (int r0 = 0; r0 < sh.tokens; r0 += chunk) {
      const int rows = std::min(chunk, sh.tokens - r0);
      launch(l, rmsnorm_kernel<T>, dim3(rows), dim3(256), 0, (const float*)(resid_ + (size_t)r0 * h), (const int*)nullptr, (const T*)norm_, xnorm_,
             h, d_.eps);
      head_gemm(l, xnorm_, rows, probs_);
      CUDA_CHECK(cudaMemcpyAsync(all.data() + (size_t)r0 * d_.vocab, probs_, (size_t)rows * d_.vocab * 4, cudaMemcpyDeviceToHost, stream_));
    }
    CUDA_CHECK(cudaStreamSynchronize(stream_));
    return all;
  }

  StepOutput collect(const StepInput& in, int rows, int steps, const int* tokens, const float* logprobs, const int* top_ids, const float* top_lps) {
    const int n = steps * rows, tn = in.top_n;
    CUDA_CHECK(cudaMemcpyAsync(host_out_i_, tokens, n * 4, cudaMemcpyDeviceToHost, stream_));
    CUDA_CHECK(cudaMemcpyAsync(host_out_f_, logprobs, n * 4, cudaMemcpyDeviceToHost, stream_));
    if (tn) {
      CUDA_CHECK(cudaMemcpyAsync(host_out_i_ + n, top_ids, (size_t)n * tn * 4, cudaMemcpyDeviceToHost, stream_));
      CUDA_CHECK(cudaMemcpyAsync(host_out_f_ + n, top_lps, (size_t)n * tn * 4, cudaMemcpyDeviceToHost, stream_));
    }
    CUDA_CHECK(cudaStreamSynchronize(stream_));
    CUDA_CHECK(cudaGetLastError());
    StepOutput out;
    const int s = in.num_seqs;
    for (int k = 0; k < steps; k++)
      for (int i = 0; i < s; i++) {
        const int src = k * rows + i;
        out.tokens.push_back(host_out_i_[src]);
        out.logprobs.push_back(host_out_f_[src]);
        for (int j = 0; j < tn; j++) {
          out.top_ids.push_back(host_out_i_[n + src * tn + j]);
          out.top_lps.push_back(host_out_f_[n + src * tn + j]);
        }
      }
    return out;
  }

  ModelDims d_;
  RunnerOptions o_;
  Arena arena_;
  Gemm gemm_;
  Profiler prof_;
  cudaStream_t stream_ = nullptr;
  int table_width_ = 0, kv_blocks_ = 0;

  std::vector<WeightInfo> weight_info_;
  std::map<std::string, void*> weight_ptr_;
  std::vector<LayerWeights> layers_;
  int gemv_rows_ = 0;  // the most tokens a step runs through the GEMVs (allocate_workspace)
  T *embed_ = nullptr, *norm_ = nullptr;
  Linear lm_head_{};
  int head_slice_ = 0;  // vocabulary rows of a quantized LM head per cuBLASLt product
  float* head_logits_ = nullptr;
  std::vector<T*> k_cache_, v_cache_;

  bool fused_mlp_ = false;         // the MLP of GEMV steps as one kernel (allocate_workspace)
  std::vector<bool> fused_o_;      // per layer: decode steps' O projection inside attention (allocate_workspace)
  float* resid_;
  float* resid_copy_ = nullptr;    // the residual as the O projection leaves it, for the fused MLP's norm
  T *xnorm_, *qkv_, *q_, *attn_, *gate_up_, *act_, *dequant_ = nullptr;
  float *logits_, *probs_, *cur_logprobs_, *cur_top_lps_, *pen_saved_, *out_logprobs_, *out_top_lps_;
  int *cur_tokens_, *cur_top_ids_, *step_idx_, *out_tokens_, *out_top_ids_;
  int* host_out_i_;
  float* host_out_f_;
  float2* rope_;
  uint32_t *dev_in_base_, *host_in_base_;
  InputRegion dev_in_, host_in_;
  std::map<std::pair<int, int>, cudaGraphExec_t> graphs_;
  static constexpr size_t kStagingBytes = 32u << 20;
  char* staging_[2] = {nullptr, nullptr};
  cudaEvent_t staged_[2] = {nullptr, nullptr};
};

}  // namespace

std::unique_ptr<Model> create_model(const ModelDims& d, const RunnerOptions& o) {
  if (d.layers.empty()) throw CudaError("a model needs at least one layer");
  const int hd = d.layers[0].head_dim;
  for (const auto& l : d.layers)
    if (l.head_dim != hd) throw CudaError("the CUDA backend needs one head size for all layers");
  if (d.hidden % 8 || d.layers[0].inter % 8) throw CudaError("the CUDA backend needs hidden and MLP sizes that are multiples of 8");
  if (d.quant == Quant::Int8 && (d.hidden % 16 || d.layers[0].inter % 16 || (d.layers[0].heads * hd) % 16))
    throw CudaError("int8 weights on the CUDA backend need layer widths that are multiples of 16");
  const bool group_ok = d.group >= 32 && (d.group & (d.group - 1)) == 0;
  if (d.quant == Quant::Int4 && (!group_ok || d.hidden % d.group || d.layers[0].inter % d.group || (d.layers[0].heads * hd) % d.group))
    throw CudaError("int4 weights on the CUDA backend need a group size of 32 x a power of two (32, 64, 128, ...) that divides every layer width");
  if (o.max_tokens < o.max_seqs) throw CudaError("max tokens per step must be at least the max sequences per step");
  if (d.dtype == DType::F16) {
    if (hd == 64) return std::make_unique<Runner<half, 64>>(d, o);
    if (hd == 128) return std::make_unique<Runner<half, 128>>(d, o);
  } else {
    if (hd == 64) return std::make_unique<Runner<__nv_bfloat16, 64>>(d, o);
    if (hd == 128) return std::make_unique<Runner<__nv_bfloat16, 128>>(d, o);
  }
  throw CudaError("the CUDA backend supports head sizes 64 and 128, not " + std::to_string(hd));
}

}  // namespace decima

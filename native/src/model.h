// The native model: weights and the KV-cache pool on the GPU, and one step of the decoder over a batch of
// sequences (or several decode steps back to back, replaying a captured CUDA graph).
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "common.cuh"

namespace decima {

enum class Quant : int { None = 0, Int8 = 1, Int4 = 2 };

struct LayerDims {
  int heads, kv_heads, head_dim, inter;
};

struct ModelDims {
  int vocab = 0, hidden = 0;
  std::vector<LayerDims> layers;
  float eps = 1e-5f, rope_theta = 10000.f, rope_factor = 1.f;
  int max_pos = 2048;
  DType dtype = DType::F16;
  bool tied = false;
  Quant quant = Quant::None;  // the four linear layers of every decoder layer (src/model/quantize.ts)
  int group = 128;            // int4 group size (columns)
  Quant head_quant = Quant::None;  // the untied LM head: 16-bit, or int8 in quantized engines
};

struct RunnerOptions {
  int block_size = 16;
  int kv_blocks = 0;          // 0: size the pool from free memory
  double kv_fraction = 0.9;   // of the memory left after weights and workspace
  int max_tokens = 2048;      // per step
  int max_seqs = 256;         // per step
  bool graphs = true;         // capture decode steps as CUDA graphs
  bool pdl = true;            // programmatic dependent launch between kernels
  bool fused_mlp = true;      // the MLP of int4 GEMV steps as one kernel (gemv_mlp.cuh)
  bool fused_o = true;        // the O projection of int4 decode steps inside decode attention (attention_decode.cuh)
  bool profile = false;       // time every kernel of eager steps (see profiler.h)
};

// One step's inputs, as the runtime describes them (src/engine/backend.ts), copied off the JS heap.
struct StepInput {
  int num_tokens = 0, num_seqs = 0, table_width = 0;
  int steps = 1;       // decode steps to run back to back (decode-only batches)
  int top_n = 0;       // alternatives to report per sampled token
  int logits = 0;      // 0 none, 1 the last row of each sequence, 2 every token
  std::vector<int32_t> tokens, query_starts, context_lens, block_tables, top_k, pen_starts, pen_tokens, pen_counts;
  std::vector<uint8_t> sample;
  std::vector<float> temperature, top_p, min_p, repetition, frequency, presence;
  std::vector<uint32_t> seed, counter;
};

struct StepOutput {
  std::vector<int32_t> tokens;  // [steps][seqs]
  std::vector<float> logprobs;  // [steps][seqs]
  std::vector<int32_t> top_ids; // [steps][seqs][top_n]
  std::vector<float> top_lps;
  std::vector<float> logits;    // rows x vocab, as asked
};

struct WeightInfo {
  std::string name;  // embed, norm, lm_head, or per layer: in_norm, qkv, o, post_norm, gate_up, down
  int layer;         // -1 for the model-wide tensors
  size_t bytes;
};

class Model {
 public:
  virtual ~Model() = default;
  virtual void upload(const std::string& name, int layer, const void* data, size_t bytes) = 0;
  // The same from a file region (a decima engine's weights.bin): read in pinned chunks, copied while the
  // next chunk is read, so loading runs at the page cache's pace, not through the JavaScript heap.
  virtual void upload_file(const std::string& name, int layer, const std::string& path, size_t offset, size_t bytes) = 0;
  virtual StepOutput step(const StepInput& in) = 0;
  // Run a short prefill and decode steps on block 0 of the (still empty) pool, so that module loading,
  // cuBLASLt's first plans and the decode graphs of every batch size up to `max_seqs` (its bucket's
  // graph: tuned and captured) are done at load, not in a request.
  virtual void warmup(int max_seqs) = 0;
  virtual int kv_blocks() const = 0;
  virtual std::vector<WeightInfo> weights() const = 0;
  virtual std::string describe() const = 0;
};

std::unique_ptr<Model> create_model(const ModelDims& dims, const RunnerOptions& opts);

}  // namespace decima

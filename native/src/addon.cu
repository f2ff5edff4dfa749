// The N-API surface, kept coarse: create a model, upload its weights, run a step (off the JS thread),
// plus device facts, a bandwidth probe for benchmarks, and the single-kernel entry for tests.
#include <napi.h>

#include <atomic>
#include <cstring>
#include <cuda_runtime.h>

#include "kernel_tests.h"
#include "model.h"

namespace {

using decima::CudaError;

template <typename X> std::vector<X> vec(const Napi::Object& o, const char* key) {
  const Napi::Value v = o.Get(key);
  if (!v.IsTypedArray()) throw Napi::TypeError::New(o.Env(), std::string(key) + " must be a typed array");
  const Napi::TypedArray t = v.As<Napi::TypedArray>();
  const size_t bytes = t.ByteLength();
  const uint8_t* p = static_cast<const uint8_t*>(t.ArrayBuffer().Data()) + t.ByteOffset();
  std::vector<X> out(bytes / sizeof(X));
  if (bytes) std::memcpy(out.data(), p, bytes);
  return out;
}

int num(const Napi::Object& o, const char* key, int fallback) {
  const Napi::Value v = o.Get(key);
  return v.IsNumber() ? v.As<Napi::Number>().Int32Value() : fallback;
}

Napi::Value bytes_to_js(Napi::Env env, const std::vector<uint8_t>& b) {
  Napi::ArrayBuffer ab = Napi::ArrayBuffer::New(env, b.size());
  if (!b.empty()) std::memcpy(ab.Data(), b.data(), b.size());
  return Napi::Uint8Array::New(env, b.size(), ab, 0);
}

template <typename X, typename Arr> Arr typed(Napi::Env env, const std::vector<X>& v) {
  Arr a = Arr::New(env, v.size());
  if (!v.empty()) std::memcpy(a.Data(), v.data(), v.size() * sizeof(X));
  return a;
}

class StepWorker : public Napi::AsyncWorker {
 public:
  StepWorker(Napi::Env env, decima::Model* model, decima::StepInput in, std::atomic<bool>* busy)
      : Napi::AsyncWorker(env), model_(model), in_(std::move(in)), busy_(busy), deferred_(Napi::Promise::Deferred::New(env)) {}
  Napi::Promise promise() { return deferred_.Promise(); }

  void Execute() override {
    try {
      out_ = model_->step(in_);
    } catch (const std::exception& e) {
      SetError(e.what());
    }
  }
  void OnOK() override {
    busy_->store(false);
    Napi::Env env = Env();
    Napi::Object r = Napi::Object::New(env);
    r.Set("tokens", typed<int32_t, Napi::Int32Array>(env, out_.tokens));
    r.Set("logprobs", typed<float, Napi::Float32Array>(env, out_.logprobs));
    r.Set("topIds", typed<int32_t, Napi::Int32Array>(env, out_.top_ids));
    r.Set("topLogprobs", typed<float, Napi::Float32Array>(env, out_.top_lps));
    if (!out_.logits.empty()) r.Set("logits", typed<float, Napi::Float32Array>(env, out_.logits));
    deferred_.Resolve(r);
  }
  void OnError(const Napi::Error& e) override {
    busy_->store(false);
    deferred_.Reject(e.Value());
  }

 private:
  decima::Model* model_;
  decima::StepInput in_;
  decima::StepOutput out_;
  std::atomic<bool>* busy_;
  Napi::Promise::Deferred deferred_;
};

class NativeModel : public Napi::ObjectWrap<NativeModel> {
 public:
  static Napi::Function Init(Napi::Env env) {
    return DefineClass(env, "Model",
                       {InstanceMethod("upload", &NativeModel::Upload), InstanceMethod("uploadFile", &NativeModel::UploadFile),
                        InstanceMethod("step", &NativeModel::Step), InstanceMethod("warmup", &NativeModel::Warmup),
                        InstanceMethod("close", &NativeModel::Close), InstanceAccessor("numBlocks", &NativeModel::NumBlocks, nullptr),
                        InstanceAccessor("description", &NativeModel::Description, nullptr),
                        InstanceAccessor("weights", &NativeModel::Weights, nullptr)});
  }

  explicit NativeModel(const Napi::CallbackInfo& info) : Napi::ObjectWrap<NativeModel>(info) {
    const Napi::Object o = info[0].As<Napi::Object>();
    decima::ModelDims d;
    d.vocab = num(o, "vocab", 0);
    d.hidden = num(o, "hidden", 0);
    const Napi::Array layers = o.Get("layers").As<Napi::Array>();
    for (uint32_t i = 0; i < layers.Length(); i++) {
      const Napi::Object l = layers.Get(i).As<Napi::Object>();
      d.layers.push_back({num(l, "heads", 0), num(l, "kvHeads", 0), num(l, "headDim", 0), num(l, "inter", 0)});
    }
    d.eps = o.Get("eps").As<Napi::Number>().FloatValue();
    d.rope_theta = o.Get("ropeTheta").As<Napi::Number>().FloatValue();
    d.rope_factor = o.Get("ropeFactor").As<Napi::Number>().FloatValue();
    d.max_pos = num(o, "maxPos", 2048);
    d.dtype = o.Get("dtype").As<Napi::String>().Utf8Value() == "float16" ? decima::DType::F16 : decima::DType::BF16;
    d.tied = o.Get("tied").ToBoolean();
    const std::string quant = o.Get("quant").IsString() ? o.Get("quant").As<Napi::String>().Utf8Value() : "none";
    d.quant = quant == "int8" ? decima::Quant::Int8 : quant == "int4" ? decima::Quant::Int4 : decima::Quant::None;
    d.group = num(o, "groupSize", 128);
    const std::string head = o.Get("headQuant").IsString() ? o.Get("headQuant").As<Napi::String>().Utf8Value() : "none";
    d.head_quant = head == "int8" ? decima::Quant::Int8 : decima::Quant::None;
    decima::RunnerOptions r;
    r.block_size = num(o, "blockSize", r.block_size);
    r.kv_blocks = num(o, "kvBlocks", 0);
    if (o.Get("kvFraction").IsNumber()) r.kv_fraction = o.Get("kvFraction").As<Napi::Number>().DoubleValue();
    r.max_tokens = num(o, "maxTokens", r.max_tokens);
    r.max_seqs = num(o, "maxSeqs", r.max_seqs);
    if (o.Get("graphs").IsBoolean()) r.graphs = o.Get("graphs").ToBoolean();
    if (o.Get("pdl").IsBoolean()) r.pdl = o.Get("pdl").ToBoolean();
    if (o.Get("fusedMlp").IsBoolean()) r.fused_mlp = o.Get("fusedMlp").ToBoolean();
    if (o.Get("fusedO").IsBoolean()) r.fused_o = o.Get("fusedO").ToBoolean();
    if (o.Get("profile").IsBoolean()) r.profile = o.Get("profile").ToBoolean();
    try {
      model_ = decima::create_model(d, r);
    } catch (const std::exception& e) {
      throw Napi::Error::New(info.Env(), e.what());
    }
  }

 private:
  decima::Model& model(Napi::Env env) {
    if (!model_) throw Napi::Error::New(env, "the model is closed");
    if (busy_.load()) throw Napi::Error::New(env, "a step is already running on this model");
    return *model_;
  }

  Napi::Value Upload(const Napi::CallbackInfo& info) {
    decima::Model& m = model(info.Env());
    const std::string name = info[0].As<Napi::String>();
    const int layer = info[1].As<Napi::Number>().Int32Value();
    const Napi::TypedArray t = info[2].As<Napi::TypedArray>();
    const uint8_t* p = static_cast<const uint8_t*>(t.ArrayBuffer().Data()) + t.ByteOffset();
    try {
      m.upload(name, layer, p, t.ByteLength());
    } catch (const std::exception& e) {
      throw Napi::Error::New(info.Env(), e.what());
    }
    return info.Env().Undefined();
  }

  Napi::Value UploadFile(const Napi::CallbackInfo& info) {
    decima::Model& m = model(info.Env());
    const std::string name = info[0].As<Napi::String>(), path = info[2].As<Napi::String>();
    const int layer = info[1].As<Napi::Number>().Int32Value();
    const size_t offset = (size_t)info[3].As<Napi::Number>().DoubleValue(), bytes = (size_t)info[4].As<Napi::Number>().DoubleValue();
    try {
      m.upload_file(name, layer, path, offset, bytes);
    } catch (const std::exception& e) {
      throw Napi::Error::New(info.Env(), e.what());
    }
    return info.Env().Undefined();
  }

  Napi::Value Warmup(const Napi::CallbackInfo& info) {
    decima::Model& m = model(info.Env());
    try {
      m.warmup(info.Length() > 0 ? info[0].As<Napi::Number>().Int32Value() : 1);
    } catch (const std::exception& e) {
      throw Napi::Error::New(info.Env(), e.what());
    }
    return info.Env().Undefined();
  }

  Napi::Value Step(const Napi::CallbackInfo& info) {
    decima::Model& m = model(info.Env());
    const Napi::Object o = info[0].As<Napi::Object>();
    decima::StepInput in;
    in.tokens = vec<int32_t>(o, "tokens");
    in.query_starts = vec<int32_t>(o, "queryStarts");
    in.context_lens = vec<int32_t>(o, "contextLens");
    in.block_tables = vec<int32_t>(o, "blockTables");
    in.table_width = num(o, "blockTableWidth", 0);
    in.sample = vec<uint8_t>(o, "sample");
    in.temperature = vec<float>(o, "temperature");
    in.top_k = vec<int32_t>(o, "topK");
    in.top_p = vec<float>(o, "topP");
    in.min_p = vec<float>(o, "minP");
    in.repetition = vec<float>(o, "repetitionPenalty");
    in.frequency = vec<float>(o, "frequencyPenalty");
    in.presence = vec<float>(o, "presencePenalty");
    in.seed = vec<uint32_t>(o, "seed");
    in.counter = vec<uint32_t>(o, "counter");
    in.pen_starts = vec<int32_t>(o, "penaltyStarts");
    in.pen_tokens = vec<int32_t>(o, "penaltyTokens");
    in.pen_counts = vec<int32_t>(o, "penaltyCounts");
    in.num_tokens = (int)in.tokens.size();
    in.num_seqs = (int)in.context_lens.size();
    in.steps = num(o, "steps", 1);
    in.top_n = num(o, "topLogprobs", 0);
    in.logits = num(o, "logits", 0);
    const size_t s = in.num_seqs;
    if (in.query_starts.size() != s + 1 || in.sample.size() != s || in.temperature.size() != s || in.top_k.size() != s || in.top_p.size() != s ||
        in.min_p.size() != s || in.repetition.size() != s || in.frequency.size() != s || in.presence.size() != s || in.seed.size() != s ||
        in.counter.size() != s || in.pen_starts.size() != s + 1 || in.block_tables.size() != s * in.table_width ||
        in.pen_tokens.size() != in.pen_counts.size())
      throw Napi::Error::New(info.Env(), "step: per-sequence arrays disagree in length");
    busy_.store(true);
    auto* w = new StepWorker(info.Env(), model_.get(), std::move(in), &busy_);
    Napi::Promise p = w->promise();
    w->Queue();
    return p;
  }

  Napi::Value Close(const Napi::CallbackInfo& info) {
    if (busy_.load()) throw Napi::Error::New(info.Env(), "cannot close while a step is running");
    model_.reset();
    return info.Env().Undefined();
  }

  Napi::Value NumBlocks(const Napi::CallbackInfo& info) { return Napi::Number::New(info.Env(), model(info.Env()).kv_blocks()); }
  Napi::Value Description(const Napi::CallbackInfo& info) { return Napi::String::New(info.Env(), model(info.Env()).describe()); }
  Napi::Value Weights(const Napi::CallbackInfo& info) {
    const auto ws = model(info.Env()).weights();
    Napi::Array a = Napi::Array::New(info.Env(), ws.size());
    for (size_t i = 0; i < ws.size(); i++) {
      Napi::Object o = Napi::Object::New(info.Env());
      o.Set("name", ws[i].name);
      o.Set("layer", ws[i].layer);
      o.Set("bytes", (double)ws[i].bytes);
      a.Set(i, o);
    }
    return a;
  }

  std::unique_ptr<decima::Model> model_;
  std::atomic<bool> busy_{false};
};

// Device facts; `available` is false (with the reason) where no usable GPU is found.
Napi::Value DeviceInfo(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Napi::Object o = Napi::Object::New(env);
  int count = 0;
  const cudaError_t e = cudaGetDeviceCount(&count);
  if (e != cudaSuccess || count == 0) {
    o.Set("available", false);
    o.Set("reason", e != cudaSuccess ? cudaGetErrorString(e) : "no CUDA device");
    return o;
  }
  cudaDeviceProp p{};
  cudaGetDeviceProperties(&p, 0);
  size_t free_b = 0, total_b = 0;
  cudaMemGetInfo(&free_b, &total_b);
  o.Set("available", true);
  o.Set("name", p.name);
  o.Set("computeCapability", std::to_string(p.major) + "." + std::to_string(p.minor));
  o.Set("multiprocessors", p.multiProcessorCount);
  o.Set("totalMemory", (double)total_b);
  o.Set("freeMemory", (double)free_b);
  return o;
}

// Read bandwidth of device memory, for the benchmark's floor: a kernel that reads `bytes` (rotating over
// buffers bigger than L2), best of `iters` runs. Returns bytes per second.
__global__ void read_kernel(const uint4* __restrict__ p, size_t n, uint4* sink) {
  uint4 acc = make_uint4(0, 0, 0, 0);
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
    const uint4 v = __ldcs(p + i);
    acc.x ^= v.x; acc.y ^= v.y; acc.z ^= v.z; acc.w ^= v.w;
  }
  if ((acc.x ^ acc.y ^ acc.z ^ acc.w) == 0x12345678u) *sink = acc;
}

Napi::Value MeasureBandwidth(const Napi::CallbackInfo& info) {
  const size_t bytes = (size_t)info[0].As<Napi::Number>().DoubleValue();
  const int iters = info[1].As<Napi::Number>().Int32Value();
  try {
    void* buf = nullptr;
    CUDA_CHECK(cudaMalloc(&buf, bytes + 16));
    CUDA_CHECK(cudaMemset(buf, 1, bytes + 16));
    int sms = 0;
    CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
    cudaEvent_t a, b;
    cudaEventCreate(&a);
    cudaEventCreate(&b);
    float best = 1e30f;
    for (int i = 0; i < iters + 1; i++) {
      cudaEventRecord(a);
      read_kernel<<<sms * 8, 512>>>((const uint4*)buf, bytes / 16, (uint4*)((char*)buf + bytes));
      cudaEventRecord(b);
      CUDA_CHECK(cudaEventSynchronize(b));
      float ms = 0;
      cudaEventElapsedTime(&ms, a, b);
      if (i > 0) best = std::min(best, ms);  // the first run warms up
    }
    cudaEventDestroy(a);
    cudaEventDestroy(b);
    cudaFree(buf);
    return Napi::Number::New(info.Env(), bytes / (best * 1e-3));
  } catch (const std::exception& e) {
    throw Napi::Error::New(info.Env(), e.what());
  }
}

Napi::Value TestKernel(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const std::string name = info[0].As<Napi::String>();
  const Napi::Object inputs = info[1].As<Napi::Object>(), params = info[2].As<Napi::Object>();
  decima::BufferMap in;
  const Napi::Array keys = inputs.GetPropertyNames();
  for (uint32_t i = 0; i < keys.Length(); i++) {
    const std::string k = keys.Get(i).As<Napi::String>();
    in[k] = vec<uint8_t>(inputs, k.c_str());
  }
  decima::ParamMap p;
  const Napi::Array pk = params.GetPropertyNames();
  for (uint32_t i = 0; i < pk.Length(); i++) {
    const std::string k = pk.Get(i).As<Napi::String>();
    p[k] = params.Get(k).As<Napi::Number>().DoubleValue();
  }
  try {
    const decima::BufferMap out = decima::run_kernel_test(name, in, p);
    Napi::Object o = Napi::Object::New(env);
    for (const auto& [k, v] : out) o.Set(k, bytes_to_js(env, v));
    return o;
  } catch (const std::exception& e) {
    throw Napi::Error::New(env, e.what());
  }
}

Napi::Object Init(Napi::Env env, Napi::Object exports) {
  exports.Set("Model", NativeModel::Init(env));
  exports.Set("deviceInfo", Napi::Function::New(env, DeviceInfo));
  exports.Set("measureBandwidth", Napi::Function::New(env, MeasureBandwidth));
  exports.Set("testKernel", Napi::Function::New(env, TestKernel));
  return exports;
}

}  // namespace

NODE_API_MODULE(decima, Init)

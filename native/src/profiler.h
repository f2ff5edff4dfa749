// Where a step's GPU time goes, kernel by kernel (DECIMA_PROFILE=1): an event after every launch of an eager
// step, elapsed times summed by name, a table on stderr when the model closes. Events between kernels cost
// a little and break launch overlap, so profiled steps run slower than real ones; the split is what counts.
#pragma once
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <map>
#include <string>
#include <vector>

namespace decima {

class Profiler {
 public:
  explicit Profiler(bool on) : on_(on) {}
  ~Profiler() {
    if (on_ && steps_) print();
    for (cudaEvent_t e : pool_) cudaEventDestroy(e);
  }
  bool on() const { return on_; }

  void begin(cudaStream_t s) {
    if (!on_) return;
    used_ = 0;
    names_.clear();
    record(s);
  }
  void mark(cudaStream_t s, const char* name) {
    if (!on_) return;
    names_.push_back(name);
    record(s);
  }
  void end() {
    if (!on_ || used_ == 0) return;
    cudaEventSynchronize(pool_[used_ - 1]);
    for (size_t i = 0; i < names_.size(); i++) {
      float ms = 0;
      cudaEventElapsedTime(&ms, pool_[i], pool_[i + 1]);
      Entry& e = totals_[names_[i]];
      e.ms += ms;
      e.calls++;
    }
    steps_++;
  }

 private:
  struct Entry {
    double ms = 0;
    long calls = 0;
  };
  void record(cudaStream_t s) {
    if (used_ == pool_.size()) {
      cudaEvent_t e;
      cudaEventCreate(&e);
      pool_.push_back(e);
    }
    cudaEventRecord(pool_[used_++], s);
  }
  void print() const {
    std::vector<std::pair<std::string, Entry>> rows(totals_.begin(), totals_.end());
    std::sort(rows.begin(), rows.end(), [](const auto& a, const auto& b) { return a.second.ms > b.second.ms; });
    double total = 0;
    for (const auto& r : rows) total += r.second.ms;
    std::fprintf(stderr, "decima profile: %ld steps, %.3f ms of kernels per step\n", steps_, total / steps_);
    std::fprintf(stderr, "%-22s %10s %12s %12s %7s\n", "kernel", "calls/step", "us/call", "us/step", "share");
    for (const auto& [name, e] : rows)
      std::fprintf(stderr, "%-22s %10.1f %12.2f %12.1f %6.1f%%\n", name.c_str(), (double)e.calls / steps_, 1e3 * e.ms / e.calls,
                   1e3 * e.ms / steps_, 100 * e.ms / total);
  }

  bool on_;
  std::vector<cudaEvent_t> pool_;
  size_t used_ = 0;
  std::vector<std::string> names_;
  std::map<std::string, Entry> totals_;
  long steps_ = 0;
};

}  // namespace decima

// Rotary (cos, sin) per position and frequency, [max_pos][hd / 2], computed the way Hugging Face's Llama
// does in fp32: inv_freq = 1 / theta^(2i / hd) (divided by the linear scaling factor), angle = position x
// inv_freq rounded to fp32, then its cosine and sine.
#pragma once
#include <cuda_runtime.h>

#include <cmath>
#include <vector>

namespace decima {

inline std::vector<float2> rope_table(float theta, float factor, int hd, int max_pos) {
  std::vector<float2> table((size_t)max_pos * (hd / 2));
  for (int i = 0; i < hd / 2; i++) {
    const float inv_freq = (1.0f / std::pow(theta, (float)(2 * i) / (float)hd)) / factor;
    for (int p = 0; p < max_pos; p++) {
      const float angle = (float)p * inv_freq;
      table[(size_t)p * (hd / 2) + i] = make_float2((float)std::cos((double)angle), (float)std::sin((double)angle));
    }
  }
  return table;
}

}  // namespace decima

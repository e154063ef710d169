#include "ops/rope.h"

#include <cmath>
#include <vector>

#include "core/threads.h"

namespace sae::ops {

void rope_half(float* x, const int64_t* positions, int64_t tokens, int64_t heads, int64_t head_dim,
               double theta) {
  const int64_t half = head_dim / 2;
  // inv_freq as transformers computes it (f32), then the angle in f32.
  std::vector<float> inv_freq(static_cast<size_t>(half));
  for (int64_t i = 0; i < half; ++i)
    inv_freq[size_t(i)] = float(1.0 / std::pow(theta, double(2 * i) / double(head_dim)));
#pragma omp parallel for schedule(static) \
    num_threads(threads_for(double(tokens) * double(half), 15.0 + 2.0 * double(heads)))
  for (int64_t t = 0; t < tokens; ++t) {
    for (int64_t i = 0; i < half; ++i) {
      const float angle = float(positions[t]) * inv_freq[size_t(i)];
      const float c = std::cos(angle), s = std::sin(angle);
      for (int64_t h = 0; h < heads; ++h) {
        float* v = x + (t * heads + h) * head_dim;
        const float a = v[i], b = v[i + half];
        v[i] = a * c - b * s;
        v[i + half] = b * c + a * s;
      }
    }
  }
}

}  // namespace sae::ops

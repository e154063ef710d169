#include "ops/rms_norm.h"

#include <cmath>

#include "core/threads.h"

namespace sae::ops {

void rms_norm_gemma(const float* x, const float* w, float* y, int64_t rows, int64_t d, float eps) {
#pragma omp parallel for schedule(static) num_threads(threads_for(double(rows) * double(d), 0.5))
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * d;
    float* yr = y + r * d;
    float ss = 0.0f;  // torch reduces in f32 too
    for (int64_t i = 0; i < d; ++i) ss += xr[i] * xr[i];
    const float inv = 1.0f / std::sqrt(ss / float(d) + eps);
    for (int64_t i = 0; i < d; ++i) yr[i] = (xr[i] * inv) * (1.0f + w[i]);
  }
}

}  // namespace sae::ops

// RMSNorm as Gemma computes it: y = x / sqrt(mean(x^2) + eps) * (1 + w), in f32.
#pragma once

#include <cstdint>

namespace sae::ops {

// x, y: [rows, d] (may alias); w: [d].
void rms_norm_gemma(const float* x, const float* w, float* y, int64_t rows, int64_t d, float eps);

}  // namespace sae::ops

// GELU, tanh approximation (gelu_pytorch_tanh).
#pragma once

#include <cmath>
#include <cstdint>

namespace sae::ops {

inline float gelu_tanh(float x) {
  constexpr float k = 0.7978845608028654f;  // sqrt(2 / pi)
  return 0.5f * x * (1.0f + std::tanh(k * (x + 0.044715f * x * x * x)));
}

}  // namespace sae::ops

#include "ops/adam.h"

#include <cmath>

#include "core/threads.h"

namespace sae::ops {

namespace {

struct Coeffs {
  float w;          // 1 - beta1, the lerp weight
  float step_size;  // lr / bias_correction1
  float bc2_sqrt;   // sqrt(bias_correction2)
};

Coeffs coeffs(const AdamStep& a) {
  const double bc1 = 1.0 - std::pow(double(a.beta1), double(a.step));
  const double bc2 = 1.0 - std::pow(double(a.beta2), double(a.step));
  return {1.0f - a.beta1, float(a.lr / bc1), float(std::sqrt(bc2))};
}

// torch's lerp: start + w (end - start) for w < 0.5, else end - (end - start)(1 - w).
inline float lerp(float start, float end, float w) {
  return w < 0.5f ? start + w * (end - start) : end - (end - start) * (1.0f - w);
}

inline void update(float& p, float g, float& m, float& v, const AdamStep& a, const Coeffs& c) {
  m = lerp(m, g, c.w);
  v = v * a.beta2 + (1.0f - a.beta2) * g * g;
  const float denom = std::sqrt(v) / c.bc2_sqrt + a.eps;
  p = p + (-c.step_size) * (m / denom);
}

// beta1 = 0: torch's lerp with weight 1 returns the gradient exactly, so the first moment is
// the gradient and is neither read nor stored (it would only cost memory traffic).
inline void update_no_momentum(float& p, float g, float& v, const AdamStep& a, const Coeffs& c) {
  v = v * a.beta2 + (1.0f - a.beta2) * g * g;
  const float denom = std::sqrt(v) / c.bc2_sqrt + a.eps;
  p = p + (-c.step_size) * (g / denom);
}

}  // namespace

void adam_update(float* p, const float* g, float* m, float* v, int64_t n, const AdamStep& a,
                 float grad_scale) {
  const Coeffs c = coeffs(a);
  const int team = threads_for(double(n), 1.0);
  if (a.beta1 == 0.0f) {
#pragma omp parallel for simd schedule(static) num_threads(team)
    for (int64_t i = 0; i < n; ++i) update_no_momentum(p[i], g[i] * grad_scale, v[i], a, c);
    return;
  }
#pragma omp parallel for simd schedule(static) num_threads(team)
  for (int64_t i = 0; i < n; ++i) update(p[i], g[i] * grad_scale, m[i], v[i], a, c);
}

void adam_update_rows(float* p, const float* g, const uint8_t* has_grad, float* m, float* v,
                      int64_t rows, int64_t cols, const AdamStep& a, float grad_scale) {
  const Coeffs c = coeffs(a);
#pragma omp parallel for schedule(static) num_threads(threads_for(double(rows) * double(cols), 1.0))
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t o = r * cols;
    if (a.beta1 == 0.0f) {
      if (has_grad[r]) {
#pragma omp simd
        for (int64_t i = 0; i < cols; ++i)
          update_no_momentum(p[o + i], g[o + i] * grad_scale, v[o + i], a, c);
      } else {  // zero gradient, no momentum: p is unchanged, only v decays
#pragma omp simd
        for (int64_t i = 0; i < cols; ++i) v[o + i] *= a.beta2;
      }
      continue;
    }
    if (has_grad[r]) {
#pragma omp simd
      for (int64_t i = 0; i < cols; ++i)
        update(p[o + i], g[o + i] * grad_scale, m[o + i], v[o + i], a, c);
    } else {
#pragma omp simd
      for (int64_t i = 0; i < cols; ++i) update(p[o + i], 0.0f, m[o + i], v[o + i], a, c);
    }
  }
}

void adam_update_reference(float* p, const float* g, float* m, float* v, int64_t n,
                           const AdamStep& a, float grad_scale) {
  const double bc1 = 1.0 - std::pow(double(a.beta1), double(a.step));
  const double bc2 = 1.0 - std::pow(double(a.beta2), double(a.step));
  for (int64_t i = 0; i < n; ++i) {
    const double gi = double(g[i]) * grad_scale;
    const double mi = a.beta1 * double(m[i]) + (1.0 - a.beta1) * gi;
    const double vi = a.beta2 * double(v[i]) + (1.0 - a.beta2) * gi * gi;
    p[i] = float(p[i] - a.lr / bc1 * mi / (std::sqrt(vi) / std::sqrt(bc2) + a.eps));
    m[i] = float(mi);
    v[i] = float(vi);
  }
}

}  // namespace sae::ops

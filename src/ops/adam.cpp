#include "ops/adam.h"

#include <algorithm>
#include <cmath>

#include "core/threads.h"
#include "ops/cpu_kernels.h"

namespace sae::ops {

namespace {

AdamCoeffs coeffs(const AdamStep& a) {
  const double bc1 = 1.0 - std::pow(double(a.beta1), double(a.step));
  const double bc2 = 1.0 - std::pow(double(a.beta2), double(a.step));
  return {a.beta2, 1.0f - a.beta1, float(a.lr / bc1), float(std::sqrt(bc2)), a.eps};
}

}  // namespace

// With beta1 = 0 torch's lerp with weight 1 returns the gradient exactly, so the first moment is
// the gradient and is neither read nor stored (it would only cost memory traffic).
void adam_update(float* p, const float* g, float* m, float* v, int64_t n, const AdamStep& a,
                 float grad_scale) {
  const AdamCoeffs c = coeffs(a);
  const CpuKernels& k = cpu_kernels();
  float* first = a.beta1 == 0.0f ? nullptr : m;
  const int64_t chunk = 4096;
#pragma omp parallel for schedule(static) num_threads(threads_for(double(n), 1.0))
  for (int64_t i = 0; i < n; i += chunk) {
    const int64_t len = std::min(chunk, n - i);
    k.adam(p + i, g + i, first ? first + i : nullptr, v + i, len, c, grad_scale);
  }
}

void adam_update_rows(float* p, const float* g, const uint8_t* has_grad, float* m, float* v,
                      int64_t rows, int64_t cols, const AdamStep& a, float grad_scale) {
  const AdamCoeffs c = coeffs(a);
  const CpuKernels& k = cpu_kernels();
  float* first = a.beta1 == 0.0f ? nullptr : m;
#pragma omp parallel for schedule(static) num_threads(threads_for(double(rows) * double(cols), 1.0))
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t o = r * cols;
    k.adam(p + o, has_grad[r] ? g + o : nullptr, first ? first + o : nullptr, v + o, cols, c,
           grad_scale);
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

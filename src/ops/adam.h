// Adam, as torch.optim.Adam computes it (no weight decay, not amsgrad), fp32 state.
#pragma once

#include <cstdint>

namespace sae::ops {

struct AdamStep {
  float lr, beta1, beta2, eps;
  int64_t step;  // 1 on the first update
};

// p -= lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps), with
// m = lerp(m, g * grad_scale, 1 - beta1), v = beta2 v + (1 - beta2) (g * grad_scale)^2.
void adam_update(float* p, const float* g, float* m, float* v, int64_t n, const AdamStep& a,
                 float grad_scale);

// With beta1 == 0, m equals the gradient and is neither read nor written.
//
// The same over a [rows, cols] matrix whose rows with has_grad[r] == 0 have a zero gradient
// (g is not read there): sparse gradients, dense moments.
void adam_update_rows(float* p, const float* g, const uint8_t* has_grad, float* m, float* v,
                      int64_t rows, int64_t cols, const AdamStep& a, float grad_scale);

// Reference in double, element by element.
void adam_update_reference(float* p, const float* g, float* m, float* v, int64_t n,
                           const AdamStep& a, float grad_scale);

}  // namespace sae::ops

// Adam with the global gradient-norm clip fused in, on the GPU: one pass over each parameter
// (ops/adam.h is the reference; same arithmetic in fp32). The clip factor is computed on the
// device from the squared norm the backward accumulated, so no value travels to the host.
#pragma once

#include <cstdint>

#include "ops/adam.h"
#include "ops/cuda/runtime.h"

namespace sae::cuda {

// scale = clip > 0 ? min(clip / (sqrt(*norm_sq) + 1e-6), 1) : 1; then ops::adam_update on
// g * scale. m is not touched when beta1 == 0 (may be null). When bf16_copy is not null it
// receives bf16(p) after the update (the encoder's GEMM operand).
void adam_update(const Context& ctx, float* p, const float* g, float* m, float* v, int64_t n,
                 const ops::AdamStep& a, const double* norm_sq, double clip,
                 uint16_t* bf16_copy = nullptr);

}  // namespace sae::cuda

// Writing an activation through an ActOut (transformer.h) from a kernel: fp32, bf16 or both.
#pragma once

#include <cuda_bf16.h>

#include <cstdint>

#include "ops/cuda/transformer.h"

namespace sae::cuda {

__device__ inline void put(const ActOut& o, int64_t i, float v) {
  if (o.f32) o.f32[i] = v;
  if (o.bf16) {
    const __nv_bfloat16 b = __float2bfloat16_rn(v);
    o.bf16[i] = *reinterpret_cast<const uint16_t*>(&b);
  }
}

}  // namespace sae::cuda

#include <cuda_bf16.h>

#include <cmath>
#include <cstdint>

#include "core/error.h"

#include "ops/cuda/adam.h"

namespace sae::cuda {

namespace {

struct Coeffs {
  float beta1, beta2, eps, w, step_size, bc2_sqrt;
};

__device__ __forceinline__ float lerp_torch(float start, float end, float w) {
  return w < 0.5f ? start + w * (end - start) : end - (end - start) * (1.0f - w);
}

__device__ __forceinline__ void update(float& p, float g, float* m, float& v, const Coeffs& c) {
  v = v * c.beta2 + (1.0f - c.beta2) * g * g;
  const float mi = m ? lerp_torch(*m, g, c.w) : g;
  const float denom = sqrtf(v) / c.bc2_sqrt + c.eps;
  p = p + (-c.step_size) * (mi / denom);
  if (m) *m = mi;
}

// Four elements a thread (16-byte loads) over n4 * 4 elements, then the tail one by one.
__global__ void k_adam(float* p, const float* g, float* m, float* v, int64_t n, Coeffs c,
                       const double* norm_sq, double clip, __nv_bfloat16* copy) {
  float scale = 1.0f;
  if (clip > 0) scale = float(fmin(clip / (sqrt(*norm_sq) + 1e-6), 1.0));
  const int64_t n4 = n / 4, tid = blockIdx.x * int64_t(blockDim.x) + threadIdx.x,
                stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = tid; i < n4; i += stride) {
    float4 pv = reinterpret_cast<float4*>(p)[i], vv = reinterpret_cast<float4*>(v)[i];
    const float4 gv = reinterpret_cast<const float4*>(g)[i];
    float4 mv = m ? reinterpret_cast<float4*>(m)[i] : make_float4(0, 0, 0, 0);
    update(pv.x, gv.x * scale, m ? &mv.x : nullptr, vv.x, c);
    update(pv.y, gv.y * scale, m ? &mv.y : nullptr, vv.y, c);
    update(pv.z, gv.z * scale, m ? &mv.z : nullptr, vv.z, c);
    update(pv.w, gv.w * scale, m ? &mv.w : nullptr, vv.w, c);
    reinterpret_cast<float4*>(p)[i] = pv;
    reinterpret_cast<float4*>(v)[i] = vv;
    if (m) reinterpret_cast<float4*>(m)[i] = mv;
    if (copy) {
      reinterpret_cast<__nv_bfloat162*>(copy)[2 * i] = __floats2bfloat162_rn(pv.x, pv.y);
      reinterpret_cast<__nv_bfloat162*>(copy)[2 * i + 1] = __floats2bfloat162_rn(pv.z, pv.w);
    }
  }
  for (int64_t i = n4 * 4 + tid; i < n; i += stride) {
    update(p[i], g[i] * scale, m ? &m[i] : nullptr, v[i], c);
    if (copy) copy[i] = __float2bfloat16_rn(p[i]);
  }
}

}  // namespace

void adam_update(const Context& ctx, float* p, const float* g, float* m, float* v, int64_t n,
                 const ops::AdamStep& a, const double* norm_sq, double clip, uint16_t* bf16_copy) {
  if (n == 0) return;
  const double bc1 = 1.0 - std::pow(double(a.beta1), double(a.step));
  const double bc2 = 1.0 - std::pow(double(a.beta2), double(a.step));
  const Coeffs c{a.beta1, a.beta2, a.eps, 1.0f - a.beta1, float(a.lr / bc1), float(std::sqrt(bc2))};
  // 16-byte accesses need 16-byte alignment (cudaMalloc gives 256; sub-views may not).
  const bool aligned = (reinterpret_cast<uintptr_t>(p) | reinterpret_cast<uintptr_t>(g) |
                        reinterpret_cast<uintptr_t>(v) | reinterpret_cast<uintptr_t>(m) |
                        reinterpret_cast<uintptr_t>(bf16_copy)) %
                           16 ==
                       0;
  SAE_CHECK(aligned, "adam_update: buffers must be 16-byte aligned");
  const int blocks = int(std::min<int64_t>((n / 4 + 255) / 256 + 1, 132 * 16));
  k_adam<<<blocks, 256, 0, ctx.stream()>>>(p, g, a.beta1 == 0.0f ? nullptr : m, v, n, c, norm_sq,
                                           clip, reinterpret_cast<__nv_bfloat16*>(bf16_copy));
  SAE_CUDA_LAUNCHED();
}

}  // namespace sae::cuda

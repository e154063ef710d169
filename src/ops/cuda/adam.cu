#include <cuda_bf16.h>

#include <cmath>

#include "ops/cuda/adam.h"

namespace sae::cuda {

namespace {

struct Coeffs {
  float beta1, beta2, eps, w, step_size, bc2_sqrt;
};

__device__ __forceinline__ float lerp_torch(float start, float end, float w) {
  return w < 0.5f ? start + w * (end - start) : end - (end - start) * (1.0f - w);
}

__global__ void k_adam(float* p, const float* g, float* m, float* v, int64_t n, Coeffs c,
                       const double* norm_sq, double clip, __nv_bfloat16* copy) {
  float scale = 1.0f;
  if (clip > 0) scale = float(fmin(clip / (sqrt(*norm_sq) + 1e-6), 1.0));
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    const float gi = g[i] * scale;
    float vi = v[i] * c.beta2 + (1.0f - c.beta2) * gi * gi;
    const float mi = m ? lerp_torch(m[i], gi, c.w) : gi;
    const float denom = sqrtf(vi) / c.bc2_sqrt + c.eps;
    const float pi = p[i] + (-c.step_size) * (mi / denom);
    p[i] = pi;
    v[i] = vi;
    if (m) m[i] = mi;
    if (copy) copy[i] = __float2bfloat16_rn(pi);
  }
}

}  // namespace

void adam_update(const Context& ctx, float* p, const float* g, float* m, float* v, int64_t n,
                 const ops::AdamStep& a, const double* norm_sq, double clip, uint16_t* bf16_copy) {
  if (n == 0) return;
  const double bc1 = 1.0 - std::pow(double(a.beta1), double(a.step));
  const double bc2 = 1.0 - std::pow(double(a.beta2), double(a.step));
  const Coeffs c{a.beta1, a.beta2, a.eps, 1.0f - a.beta1, float(a.lr / bc1), float(std::sqrt(bc2))};
  const int blocks = int(std::min<int64_t>((n + 255) / 256, 132 * 16));
  k_adam<<<blocks, 256, 0, ctx.stream()>>>(p, g, a.beta1 == 0.0f ? nullptr : m, v, n, c, norm_sq,
                                           clip, reinterpret_cast<__nv_bfloat16*>(bf16_copy));
  SAE_CUDA_LAUNCHED();
}

}  // namespace sae::cuda

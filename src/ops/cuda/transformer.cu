// Gemma-2's non-GEMM kernels (transformer.h) but attention (attention.cu), fp32 arithmetic
// throughout.
#include <cuda_bf16.h>

#include <algorithm>
#include <cmath>

#include "core/error.h"
#include "ops/cuda/act_out.cuh"
#include "ops/cuda/block_reduce.cuh"
#include "ops/cuda/transformer.h"

namespace sae::cuda {

namespace {

constexpr int kThreads = 256;

__device__ inline float bf16_bits_to_float(uint16_t b) {
  return __uint_as_float(uint32_t(b) << 16);
}

int blocks_for(int64_t n) {
  return int(std::min<int64_t>((n + kThreads - 1) / kThreads, 65535 * 4));
}

__global__ void k_embed(const int32_t* ids, const void* embed, int bf16, int64_t d, float scale,
                        float* h) {
  const int64_t t = blockIdx.x;
  const int64_t row = int64_t(ids[t]) * d;
  for (int64_t i = threadIdx.x; i < d; i += blockDim.x) {
    const float e = bf16 ? bf16_bits_to_float(static_cast<const uint16_t*>(embed)[row + i])
                         : static_cast<const float*>(embed)[row + i];
    h[t * d + i] = e * scale;
  }
}

__global__ void k_rms_norm(const float* x, const float* w, int64_t d, float eps, ActOut y) {
  __shared__ float sh[32];
  const float* xr = x + int64_t(blockIdx.x) * d;
  float ss = 0.0f;
  for (int64_t i = threadIdx.x; i < d; i += blockDim.x) ss += xr[i] * xr[i];
  ss = block_sum(ss, sh);
  const float inv = 1.0f / sqrtf(ss / float(d) + eps);
  for (int64_t i = threadIdx.x; i < d; i += blockDim.x)
    put(y, int64_t(blockIdx.x) * d + i, (xr[i] * inv) * (1.0f + w[i]));
}

// Up to 16 values of a row per thread: the fused kernel keeps its row in registers.
constexpr int kFusedPerThread = 16;

// x = rms_norm(y) (1 + w_post); h += x; xn = rms_norm(h) (1 + w_next): one block per row, the
// row in registers, each step the arithmetic of k_rms_norm and k_add in their order (the same
// bits: __fmul_rn keeps the compiler from fusing the product into h's add).
__global__ void k_post_norm_add_norm(const float* y, const float* w_post, float* h,
                                     const float* w_next, int64_t d, float eps, float* x_out,
                                     ActOut xn) {
  __shared__ float sh[32];
  const int64_t base = int64_t(blockIdx.x) * d;
  float v[kFusedPerThread];
  float ss = 0.0f;
#pragma unroll
  for (int u = 0; u < kFusedPerThread; ++u) {
    const int64_t i = threadIdx.x + int64_t(u) * blockDim.x;
    v[u] = i < d ? y[base + i] : 0.0f;
    ss += v[u] * v[u];
  }
  ss = block_sum(ss, sh);
  const float inv = 1.0f / sqrtf(ss / float(d) + eps);
  float ss_h = 0.0f;
#pragma unroll
  for (int u = 0; u < kFusedPerThread; ++u) {
    const int64_t i = threadIdx.x + int64_t(u) * blockDim.x;
    if (i < d) {
      const float x = __fmul_rn(v[u] * inv, 1.0f + w_post[i]);
      if (x_out) x_out[base + i] = x;
      v[u] = h[base + i] + x;
      h[base + i] = v[u];
    }
    ss_h += v[u] * v[u];
  }
  if (!w_next) return;
  ss_h = block_sum(ss_h, sh);
  const float inv_h = 1.0f / sqrtf(ss_h / float(d) + eps);
#pragma unroll
  for (int u = 0; u < kFusedPerThread; ++u) {
    const int64_t i = threadIdx.x + int64_t(u) * blockDim.x;
    if (i < d) put(xn, base + i, (v[u] * inv_h) * (1.0f + w_next[i]));
  }
}

__global__ void k_rope(float* x, const int32_t* pos, int64_t heads, int64_t hd, double theta) {
  const int64_t t = blockIdx.x, half = hd / 2;
  for (int64_t i = threadIdx.x; i < half; i += blockDim.x) {
    const float inv_freq = float(1.0 / pow(theta, double(2 * i) / double(hd)));
    const float angle = float(pos[t]) * inv_freq;
    const float c = cosf(angle), s = sinf(angle);
    for (int64_t h = 0; h < heads; ++h) {
      float* v = x + (t * heads + h) * hd;
      const float a = v[i], b = v[i + half];
      v[i] = a * c - b * s;
      v[i + half] = b * c + a * s;
    }
  }
}

__device__ inline float gelu_tanh(float x) {
  constexpr float k = 0.7978845608028654f;  // sqrt(2 / pi)
  return 0.5f * x * (1.0f + tanhf(k * (x + 0.044715f * x * x * x)));
}

// Blocks along a row's columns (x) and along the rows (y), so that no thread divides by `inter`
// (it did a 64-bit division and a modulo per element before).
__global__ void k_gelu_mul(const float* gu, int64_t tokens, int64_t inter, ActOut out) {
  for (int64_t t = blockIdx.y; t < tokens; t += gridDim.y) {
    const float* row = gu + t * 2 * inter;
    for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < inter;
         i += int64_t(gridDim.x) * blockDim.x)
      put(out, t * inter + i, gelu_tanh(row[i]) * row[inter + i]);
  }
}

__global__ void k_add(float* h, const float* x, int64_t n) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x)
    h[i] += x[i];
}

__global__ void k_soft_cap(float* x, int64_t n, float cap) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x)
    x[i] = tanhf(x[i] / cap) * cap;
}

}  // namespace

void embed_rows(const Context& ctx, const int32_t* ids, int64_t tokens, const void* embed,
                bool embed_bf16, int64_t d, float scale, float* h) {
  if (tokens == 0) return;
  k_embed<<<unsigned(tokens), kThreads, 0, ctx.stream()>>>(ids, embed, embed_bf16, d, scale, h);
  SAE_CUDA_LAUNCHED();
}

void rms_norm_gemma(const Context& ctx, const float* x, const float* w, int64_t rows, int64_t d,
                    float eps, ActOut y) {
  if (rows == 0) return;
  k_rms_norm<<<unsigned(rows), kThreads, 0, ctx.stream()>>>(x, w, d, eps, y);
  SAE_CUDA_LAUNCHED();
}

bool fused_norm_fits(int64_t d) {
  return d <= int64_t(kFusedPerThread) * kThreads;
}

void post_norm_add_norm(const Context& ctx, const float* y, const float* w_post, float* h,
                        const float* w_next, int64_t rows, int64_t d, float eps, float* x_out,
                        ActOut xn) {
  SAE_CHECK(fused_norm_fits(d), "post_norm_add_norm: rows wider than 4096");
  if (rows == 0) return;
  k_post_norm_add_norm<<<unsigned(rows), kThreads, 0, ctx.stream()>>>(y, w_post, h, w_next, d, eps,
                                                                      x_out, xn);
  SAE_CUDA_LAUNCHED();
}

void rope_half(const Context& ctx, float* x, const int32_t* positions, int64_t tokens,
               int64_t heads, int64_t head_dim, double theta) {
  if (tokens == 0) return;
  const int threads = int(std::min<int64_t>(std::max<int64_t>(head_dim / 2, 32), kThreads));
  k_rope<<<unsigned(tokens), threads, 0, ctx.stream()>>>(x, positions, heads, head_dim, theta);
  SAE_CUDA_LAUNCHED();
}

void gelu_mul(const Context& ctx, const float* gu, int64_t tokens, int64_t inter, ActOut out) {
  if (tokens * inter == 0) return;
  const dim3 grid(unsigned(std::min<int64_t>((inter + kThreads - 1) / kThreads, 1024)),
                  unsigned(std::min<int64_t>(tokens, 65535)));
  k_gelu_mul<<<grid, kThreads, 0, ctx.stream()>>>(gu, tokens, inter, out);
  SAE_CUDA_LAUNCHED();
}

void add_into(const Context& ctx, float* h, const float* x, int64_t n) {
  if (n == 0) return;
  k_add<<<blocks_for(n), kThreads, 0, ctx.stream()>>>(h, x, n);
  SAE_CUDA_LAUNCHED();
}

void soft_cap(const Context& ctx, float* x, int64_t n, float cap) {
  if (n == 0) return;
  k_soft_cap<<<blocks_for(n), kThreads, 0, ctx.stream()>>>(x, n, cap);
  SAE_CUDA_LAUNCHED();
}

}  // namespace sae::cuda

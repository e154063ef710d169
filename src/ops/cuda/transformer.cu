// Gemma-2's non-GEMM kernels (transformer.h), fp32 arithmetic throughout.
#include <cuda_bf16.h>
#include <mma.h>

#include <algorithm>
#include <cmath>

#include "core/error.h"
#include "ops/cuda/block_reduce.cuh"
#include "ops/cuda/transformer.h"

namespace sae::cuda {

namespace {

constexpr int kThreads = 256;

__device__ inline void put(const ActOut& o, int64_t i, float v) {
  if (o.f32) o.f32[i] = v;
  if (o.bf16) {
    const __nv_bfloat16 b = __float2bfloat16_rn(v);
    o.bf16[i] = *reinterpret_cast<const uint16_t*>(&b);
  }
}

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

// One warp per (token, head): the lanes hold head_dim / 32 dimensions each of q and of the
// output, and walk the visible keys once with an online softmax (running max and sum).
constexpr int kMaxDimsPerLane = 8;  // head_dim <= 256
__global__ void k_attention(const float* q, const float* k, const float* v,
                            const int32_t* prompt_start, AttentionDims a, ActOut out) {
  const int64_t warp = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x & 31;
  if (warp >= a.tokens * a.heads) return;
  const int64_t t = warp / a.heads, h = warp % a.heads;
  const int64_t kvh = h / (a.heads / a.kv_heads), hd = a.head_dim;
  float qv[kMaxDimsPerLane], acc[kMaxDimsPerLane];
#pragma unroll
  for (int r = 0; r < kMaxDimsPerLane; ++r) {
    const int64_t c = lane + 32 * r;
    qv[r] = c < hd ? q[(t * a.heads + h) * hd + c] : 0.0f;
    acc[r] = 0.0f;
  }
  int64_t lo = prompt_start[t];
  if (a.window > 0) lo = max(lo, t - a.window + 1);
  float m = -INFINITY, l = 0.0f;
  for (int64_t j = lo; j <= t; ++j) {
    const float* kj = k + (j * a.kv_heads + kvh) * hd;
    float s = 0.0f;
#pragma unroll
    for (int r = 0; r < kMaxDimsPerLane; ++r) {
      const int64_t c = lane + 32 * r;
      if (c < hd) s += qv[r] * kj[c];
    }
    for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xFFFFFFFFu, s, o);
    s *= a.scale;
    if (a.softcap > 0.0f) s = tanhf(s / a.softcap) * a.softcap;
    const float m_new = fmaxf(m, s);
    const float corr = expf(m - m_new), p = expf(s - m_new);
    l = l * corr + p;
    const float* vj = v + (j * a.kv_heads + kvh) * hd;
#pragma unroll
    for (int r = 0; r < kMaxDimsPerLane; ++r) {
      const int64_t c = lane + 32 * r;
      if (c < hd) acc[r] = acc[r] * corr + p * vj[c];
    }
    m = m_new;
  }
  const float inv = 1.0f / l;
#pragma unroll
  for (int r = 0; r < kMaxDimsPerLane; ++r) {
    const int64_t c = lane + 32 * r;
    if (c < hd) put(out, (t * a.heads + h) * hd + c, acc[r] * inv);
  }
}

// The same attention on tensor cores (bf16 operands, fp32 accumulate and softmax): a block
// takes 64 consecutive queries of one head (4 warps, 16 query rows each) and walks the 64-key
// tiles of the visible range twice. Pass 1: S = Q K^T (WMMA) and, per row, the scale, soft-cap,
// mask and a running max and sum. Pass 2: S again, P = exp(S - max) / sum in bf16, O += P V
// with O in WMMA accumulators (registers: the final max is known, so O is never rescaled and
// needs no shared memory). K and then V of a tile share one buffer, which keeps a block at
// 93 KB of shared memory for head_dim 256 (two blocks per SM). Queries of one tile may belong
// to different prompts: the mask is per row. head_dim: a power of two from 16 to 256.
namespace wmma = nvcuda::wmma;
constexpr int kTq = 64, kTk = 64, kTcWarps = 4;

struct TcLayout {  // dynamic shared memory
  int dq, ds, dp;  // row strides in elements (padded against bank conflicts, multiples of 8)
  size_t off_kv, off_s, off_p, off_stats, bytes;
  explicit TcLayout(int hd) {
    dq = hd + 8, ds = kTk + 4, dp = kTk + 8;
    // In order: Q [kTq][dq] bf16; K, then V [kTk][dq] bf16; S [kTq][ds] fp32 (also the
    // output staging); P [kTq][dp] bf16; the max and the sum of each row, fp32.
    off_kv = size_t(kTq) * dq * 2;
    off_s = off_kv + size_t(kTk) * dq * 2;
    off_p = off_s + size_t(kTq) * ds * 4;
    off_stats = off_p + size_t(kTq) * dp * 2;
    bytes = off_stats + size_t(kTq) * 2 * 4;
  }
};

__device__ inline int64_t first_visible(const int32_t* prompt_start, int64_t i, int64_t window) {
  int64_t lo = prompt_start[i];
  if (window > 0) lo = max(lo, i - window + 1);
  return lo;
}

// Rows of fp32 [.., HD] (token stride `stride` floats) into bf16 shared rows of stride ld, rows
// past `valid` zero: float4 loads with index arithmetic by shifts (HD a power of two).
template <int HD, int Rows>
__device__ inline void stage_rows_bf16(const float* src, int64_t stride, int64_t valid,
                                       __nv_bfloat16* dst, int ld) {
  constexpr int kVecPerRow = HD / 4;
#pragma unroll 8
  for (int e = threadIdx.x; e < Rows * kVecPerRow; e += 32 * kTcWarps) {
    const int r = e / kVecPerRow, c = (e % kVecPerRow) * 4;
    const float4 x = r < valid ? *reinterpret_cast<const float4*>(src + r * stride + c)
                               : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    __nv_bfloat162* d = reinterpret_cast<__nv_bfloat162*>(dst + r * ld + c);
    d[0] = __floats2bfloat162_rn(x.x, x.y);
    d[1] = __floats2bfloat162_rn(x.z, x.w);
  }
}

// S[16 rows of this warp, 64 keys] = Q K^T.
template <int HD>
__device__ inline void tile_scores(const __nv_bfloat16* Qs, const __nv_bfloat16* Ks, float* S,
                                   const TcLayout& lay, int r0) {
  for (int n0 = 0; n0 < kTk; n0 += 16) {
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
    wmma::fill_fragment(acc, 0.0f);
#pragma unroll
    for (int d0 = 0; d0 < HD; d0 += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::row_major> fa;
      wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::col_major> fb;
      wmma::load_matrix_sync(fa, Qs + r0 * lay.dq + d0, lay.dq);
      wmma::load_matrix_sync(fb, Ks + n0 * lay.dq + d0, lay.dq);  // K^T, column-major
      wmma::mma_sync(acc, fa, fb, acc);
    }
    wmma::store_matrix_sync(S + r0 * lay.ds + n0, acc, lay.ds, wmma::mem_row_major);
  }
}

// The scaled, soft-capped, masked scores of row r of the tile at k0 (2 per lane; -inf masked).
__device__ inline void row_scores(const float* S, const TcLayout& lay, int r, int64_t i, int64_t lo,
                                  int64_t k0, const AttentionDims& a, int lane, float sv[2]) {
#pragma unroll
  for (int u = 0; u < 2; ++u) {
    const int c = lane + 32 * u;
    const int64_t j = k0 + c;
    float x = S[r * lay.ds + c] * a.scale;
    if (a.softcap > 0.0f) x = tanhf(x / a.softcap) * a.softcap;
    sv[u] = (j >= lo && j <= i && i < a.tokens) ? x : -INFINITY;
  }
}

template <int HD>
__global__ void __launch_bounds__(32 * kTcWarps, 2)
    k_attention_tc(const float* q, const float* k, const float* v, const int32_t* prompt_start,
                   AttentionDims a, ActOut out, TcLayout lay) {
#if __CUDA_ARCH__ >= 800
  static_assert(kTk == 64, "row_scores holds 2 keys per lane");
  extern __shared__ __align__(128) unsigned char smem[];
  __nv_bfloat16* Qs = reinterpret_cast<__nv_bfloat16*>(smem);
  __nv_bfloat16* KVs = reinterpret_cast<__nv_bfloat16*>(smem + lay.off_kv);
  float* S = reinterpret_cast<float*>(smem + lay.off_s);
  __nv_bfloat16* Ps = reinterpret_cast<__nv_bfloat16*>(smem + lay.off_p);
  float* row_m = reinterpret_cast<float*>(smem + lay.off_stats);
  float* row_l = row_m + kTq;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, r0 = warp * 16;
  const int64_t q0 = int64_t(blockIdx.x) * kTq, h = blockIdx.y;
  const int64_t kvh = h / (a.heads / a.kv_heads);
  const int64_t q_last = min(q0 + kTq, a.tokens) - 1;
  const int64_t kv_stride = a.kv_heads * HD;

  stage_rows_bf16<HD, kTq>(q + (q0 * a.heads + h) * HD, a.heads * HD, a.tokens - q0, Qs, lay.dq);
  // Each lane keeps the first visible key of the warp's 16 rows (lane rr: row r0 + rr).
  int64_t my_lo = 0;
  if (lane < 16 && q0 + r0 + lane < a.tokens)
    my_lo = first_visible(prompt_start, q0 + r0 + lane, a.window);
  float m_run = -INFINITY, l_run = 0.0f;  // lane rr < 16: row r0 + rr
  const int64_t k_begin = first_visible(prompt_start, q0, a.window);

  // Pass 1: each row's max and sum of exp over every visible key.
  for (int64_t k0 = k_begin; k0 <= q_last; k0 += kTk) {
    __syncthreads();
    stage_rows_bf16<HD, kTk>(k + k0 * kv_stride + kvh * HD, kv_stride, a.tokens - k0, KVs, lay.dq);
    __syncthreads();
    tile_scores<HD>(Qs, KVs, S, lay, r0);
    __syncwarp();
    for (int rr = 0; rr < 16; ++rr) {
      const int64_t i = q0 + r0 + rr, lo = __shfl_sync(0xFFFFFFFFu, my_lo, rr);
      float sv[2];
      row_scores(S, lay, r0 + rr, i, lo, k0, a, lane, sv);
      float mx = fmaxf(sv[0], sv[1]);
      for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xFFFFFFFFu, mx, o));
      const float m_old = __shfl_sync(0xFFFFFFFFu, m_run, rr), m_new = fmaxf(m_old, mx);
      float sum = m_new == -INFINITY ? 0.0f : expf(sv[0] - m_new) + expf(sv[1] - m_new);
      for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xFFFFFFFFu, sum, o);
      if (lane == rr) {
        l_run = (m_new == -INFINITY ? 1.0f : expf(m_old - m_new)) * l_run + sum;
        m_run = m_new;
      }
    }
  }
  if (lane < 16) row_m[r0 + lane] = m_run, row_l[r0 + lane] = l_run;
  __syncwarp();

  // Pass 2: O = sum over tiles of softmax(S) V, accumulated in registers.
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> o_acc[HD / 16];
#pragma unroll
  for (int n = 0; n < HD / 16; ++n) wmma::fill_fragment(o_acc[n], 0.0f);
  for (int64_t k0 = k_begin; k0 <= q_last; k0 += kTk) {
    __syncthreads();
    stage_rows_bf16<HD, kTk>(k + k0 * kv_stride + kvh * HD, kv_stride, a.tokens - k0, KVs, lay.dq);
    __syncthreads();
    tile_scores<HD>(Qs, KVs, S, lay, r0);
    __syncwarp();
    for (int rr = 0; rr < 16; ++rr) {
      const int r = r0 + rr;
      const int64_t i = q0 + r, lo = __shfl_sync(0xFFFFFFFFu, my_lo, rr);
      float sv[2];
      row_scores(S, lay, r, i, lo, k0, a, lane, sv);
      const float m = row_m[r], inv_l = row_l[r] > 0.0f ? 1.0f / row_l[r] : 0.0f;
#pragma unroll
      for (int u = 0; u < 2; ++u)
        Ps[r * lay.dp + lane + 32 * u] =
            __float2bfloat16_rn(m == -INFINITY ? 0.0f : expf(sv[u] - m) * inv_l);
    }
    __syncthreads();  // every warp is done with K: V takes its place
    stage_rows_bf16<HD, kTk>(v + k0 * kv_stride + kvh * HD, kv_stride, a.tokens - k0, KVs, lay.dq);
    __syncthreads();
#pragma unroll
    for (int n = 0; n < HD / 16; ++n)
#pragma unroll
      for (int kk = 0; kk < kTk; kk += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::row_major> fa;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::row_major> fb;
        wmma::load_matrix_sync(fa, Ps + r0 * lay.dp + kk, lay.dp);
        wmma::load_matrix_sync(fb, KVs + kk * lay.dq + n * 16, lay.dq);
        wmma::mma_sync(o_acc[n], fa, fb, o_acc[n]);
      }
  }
  // Out, 64 columns at a time through this warp's rows of S.
#pragma unroll
  for (int n0 = 0; n0 < HD; n0 += kTk) {
    __syncwarp();
#pragma unroll
    for (int n = 0; n < kTk / 16 && n0 + n * 16 < HD; ++n)
      wmma::store_matrix_sync(S + r0 * lay.ds + n * 16, o_acc[n0 / 16 + n], lay.ds,
                              wmma::mem_row_major);
    __syncwarp();
    const int cols = min(kTk, HD - n0);
    for (int e = lane; e < 16 * cols; e += 32) {
      const int rr = e / cols, c = e % cols;
      const int64_t t = q0 + r0 + rr;
      if (t < a.tokens) put(out, (t * a.heads + h) * HD + n0 + c, S[(r0 + rr) * lay.ds + c]);
    }
  }
#endif
}

__device__ inline float gelu_tanh(float x) {
  constexpr float k = 0.7978845608028654f;  // sqrt(2 / pi)
  return 0.5f * x * (1.0f + tanhf(k * (x + 0.044715f * x * x * x)));
}

__global__ void k_gelu_mul(const float* gu, int64_t tokens, int64_t inter, ActOut out) {
  const int64_t n = tokens * inter;
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < n;
       e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t t = e / inter, i = e % inter;
    const float* row = gu + t * 2 * inter;
    put(out, e, gelu_tanh(row[i]) * row[inter + i]);
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

void rope_half(const Context& ctx, float* x, const int32_t* positions, int64_t tokens,
               int64_t heads, int64_t head_dim, double theta) {
  if (tokens == 0) return;
  const int threads = int(std::min<int64_t>(std::max<int64_t>(head_dim / 2, 32), kThreads));
  k_rope<<<unsigned(tokens), threads, 0, ctx.stream()>>>(x, positions, heads, head_dim, theta);
  SAE_CUDA_LAUNCHED();
}

template <int HD>
void launch_attention_tc(const Context& ctx, const float* q, const float* k, const float* v,
                         const int32_t* prompt_start, const AttentionDims& dims, ActOut out) {
  const TcLayout lay(HD);
  static bool opted_in = false;  // once per instantiation: its shared memory above 48 KiB
  if (!opted_in) {
    SAE_CUDA(cudaFuncSetAttribute(k_attention_tc<HD>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                  int(lay.bytes)));
    opted_in = true;
  }
  const dim3 grid(unsigned((dims.tokens + kTq - 1) / kTq), unsigned(dims.heads));
  k_attention_tc<HD>
      <<<grid, 32 * kTcWarps, lay.bytes, ctx.stream()>>>(q, k, v, prompt_start, dims, out, lay);
  SAE_CUDA_LAUNCHED();
}

bool tensor_core_attention(int64_t head_dim) {
  static const int major = [] {
    int dev = 0, m = 0;
    SAE_CUDA(cudaGetDevice(&dev));
    SAE_CUDA(cudaDeviceGetAttribute(&m, cudaDevAttrComputeCapabilityMajor, dev));
    return m;
  }();
  return major >= 8 && head_dim >= 16 && head_dim <= 256 && (head_dim & (head_dim - 1)) == 0;
}

void attention_packed(const Context& ctx, const float* q, const float* k, const float* v,
                      const int32_t* prompt_start, const AttentionDims& dims, ActOut out,
                      bool bf16_math) {
  SAE_CHECK(dims.head_dim <= 32 * kMaxDimsPerLane, "attention: head_dim above 256");
  SAE_CHECK(dims.heads % dims.kv_heads == 0, "attention: heads not a multiple of kv_heads");
  const int64_t warps = dims.tokens * dims.heads;
  if (warps == 0) return;
  if (bf16_math && tensor_core_attention(dims.head_dim)) {
    switch (dims.head_dim) {
      case 16:
        return launch_attention_tc<16>(ctx, q, k, v, prompt_start, dims, out);
      case 32:
        return launch_attention_tc<32>(ctx, q, k, v, prompt_start, dims, out);
      case 64:
        return launch_attention_tc<64>(ctx, q, k, v, prompt_start, dims, out);
      case 128:
        return launch_attention_tc<128>(ctx, q, k, v, prompt_start, dims, out);
      default:
        return launch_attention_tc<256>(ctx, q, k, v, prompt_start, dims, out);
    }
  }
  constexpr int kWarpsPerBlock = 4;
  const int64_t blocks = (warps + kWarpsPerBlock - 1) / kWarpsPerBlock;
  k_attention<<<unsigned(blocks), 32 * kWarpsPerBlock, 0, ctx.stream()>>>(q, k, v, prompt_start,
                                                                          dims, out);
  SAE_CUDA_LAUNCHED();
}

void gelu_mul(const Context& ctx, const float* gu, int64_t tokens, int64_t inter, ActOut out) {
  if (tokens * inter == 0) return;
  k_gelu_mul<<<blocks_for(tokens * inter), kThreads, 0, ctx.stream()>>>(gu, tokens, inter, out);
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

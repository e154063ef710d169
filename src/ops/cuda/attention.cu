// Gemma-2's attention over packed prompts (transformer.h) on the GPU: a SIMT kernel in fp32 (the
// CPU's arithmetic) and two bf16 tensor-core kernels, two passes on WMMA and one pass on mma.sync.
#include <cuda_bf16.h>
#include <mma.h>

#include <cmath>

#include "core/error.h"
#include "ops/cuda/act_out.cuh"
#include "ops/cuda/transformer.h"

namespace sae::cuda {

namespace {

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
  // The K tile at k0 into KVs (once every warp is done with it), then this warp's rows of S.
  auto scores_of_tile = [&](int64_t k0) {
    __syncthreads();
    stage_rows_bf16<HD, kTk>(k + k0 * kv_stride + kvh * HD, kv_stride, a.tokens - k0, KVs, lay.dq);
    __syncthreads();
    tile_scores<HD>(Qs, KVs, S, lay, r0);
    __syncwarp();
  };

  // Pass 1: each row's max and sum of exp over every visible key.
  for (int64_t k0 = k_begin; k0 <= q_last; k0 += kTk) {
    scores_of_tile(k0);
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
    scores_of_tile(k0);
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

// The same attention in one pass, FlashAttention-2's scheme on mma.sync (bf16 m16n8k16, fp32
// accumulate): a block of 4 warps takes 64 consecutive queries of one head, 16 rows per warp,
// and walks the 64-key tiles of the visible range once. A warp's S = Q K^T stays in registers in
// the mma's accumulator layout; each row's running max and sum are updated per tile and its O
// ([16, HD] per warp, registers) rescaled by exp(m_old - m_new). The accumulator layout of S is
// the A-operand layout of P V, so P never goes through shared memory. V is staged transposed,
// so that a B fragment of P V is two 32-bit loads like one of Q K^T. A warp skips a tile its
// rows cannot see (before the first row's first key or after its last row).
//
// mma.m16n8k16 fragments (PTX ISA), with g = lane / 4 and c = 2 * (lane % 4):
//   A [16, 16] row-major: {row g, cols c..c+1}, {row g+8, c..c+1}, {row g, c+8..c+9}, {g+8, c+8..}
//   B [16, 8] (k, n):     {k c..c+1, n g}, {k c+8..c+9, n g}
//   C [16, 8] fp32:       (g, c), (g, c+1), (g+8, c), (g+8, c+1)
constexpr int kOpRows = 64, kOpKeys = 64, kOpWarps = 4;
static_assert(kOpWarps == kTcWarps, "stage_rows_bf16 strides by kTcWarps warps");

struct OnePassLayout {  // dynamic shared memory, bf16: Q and K [64][ldq], V^T [HD][ldv]
  int ldq, ldv;         // row strides, padded so that each fragment load hits 32 banks
  size_t off_k, off_vt, bytes;
  explicit OnePassLayout(int hd) : ldq(hd + 8), ldv(kOpKeys + 8) {
    off_k = size_t(kOpRows) * ldq * 2;
    off_vt = off_k + size_t(kOpKeys) * ldq * 2;
    bytes = off_vt + size_t(hd) * ldv * 2;
  }
};

__device__ inline uint32_t lds32(const __nv_bfloat16* p) {
  return *reinterpret_cast<const uint32_t*>(p);
}

__device__ inline uint32_t pack_bf16(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);  // .x (lo) in the low half
  return *reinterpret_cast<const uint32_t*>(&v);
}

// c += a b on one m16n8k16 tile.
__device__ inline void mma_bf16(float c[4], const uint32_t a[4], uint32_t b0, uint32_t b1) {
#if __CUDA_ARCH__ >= 800
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
}

// V rows [kOpKeys, HD] (fp32, token stride `stride`, rows past `valid` zero) into vt [HD][ld]
// bf16: a lane takes keys 2p and 2p+1 and 4 dims; each dim's pair is one 32-bit word of V^T,
// and the 32 lanes of a warp write 32 consecutive words.
template <int HD>
__device__ inline void stage_v_transposed(const float* src, int64_t stride, int64_t valid,
                                          __nv_bfloat16* vt, int ld) {
  constexpr int kPairs = kOpKeys / 2, kVecs = HD / 4;
  const float4 zero = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
#pragma unroll 4
  for (int e = threadIdx.x; e < kPairs * kVecs; e += 32 * kOpWarps) {
    const int r = 2 * (e % kPairs), c = (e / kPairs) * 4;
    const float4 x0 = r < valid ? *reinterpret_cast<const float4*>(src + r * stride + c) : zero;
    const float4 x1 =
        r + 1 < valid ? *reinterpret_cast<const float4*>(src + (r + 1) * stride + c) : zero;
    *reinterpret_cast<uint32_t*>(vt + (c + 0) * ld + r) = pack_bf16(x0.x, x1.x);
    *reinterpret_cast<uint32_t*>(vt + (c + 1) * ld + r) = pack_bf16(x0.y, x1.y);
    *reinterpret_cast<uint32_t*>(vt + (c + 2) * ld + r) = pack_bf16(x0.z, x1.z);
    *reinterpret_cast<uint32_t*>(vt + (c + 3) * ld + r) = pack_bf16(x0.w, x1.w);
  }
}

template <int HD>
__global__ void __launch_bounds__(32 * kOpWarps, 2)
    k_attention_one_pass(const float* q, const float* k, const float* v,
                         const int32_t* prompt_start, AttentionDims a, ActOut out,
                         OnePassLayout lay) {
#if __CUDA_ARCH__ >= 800
  static_assert(HD % 16 == 0 && kOpKeys % 16 == 0, "whole mma tiles");
  constexpr int kKeyBlocks = kOpKeys / 8, kDimBlocks = HD / 8;
  constexpr float kLog2e = 1.4426950408889634f;
  extern __shared__ __align__(128) unsigned char smem[];
  __nv_bfloat16* Qs = reinterpret_cast<__nv_bfloat16*>(smem);
  __nv_bfloat16* Ks = reinterpret_cast<__nv_bfloat16*>(smem + lay.off_k);
  __nv_bfloat16* Vt = reinterpret_cast<__nv_bfloat16*>(smem + lay.off_vt);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane / 4, c = 2 * (lane % 4);
  const int64_t q0 = int64_t(blockIdx.x) * kOpRows, h = blockIdx.y;
  const int64_t kvh = h / (a.heads / a.kv_heads);
  const int64_t q_last = min(q0 + kOpRows, a.tokens) - 1;
  const int64_t kv_stride = a.kv_heads * HD;
  // This thread's rows of the warp's 16: g and g + 8, with their first visible keys.
  const int64_t w0 = q0 + warp * 16, w_last = min(w0 + 15, a.tokens - 1);
  const int64_t row[2] = {w0 + g, w0 + g + 8};
  int64_t lo[2];
#pragma unroll
  for (int u = 0; u < 2; ++u)
    lo[u] = row[u] < a.tokens ? first_visible(prompt_start, row[u], a.window) : row[u] + 1;
  const int64_t w_lo = w0 < a.tokens ? first_visible(prompt_start, w0, a.window) : 0;

  stage_rows_bf16<HD, kOpRows>(q + (q0 * a.heads + h) * HD, a.heads * HD, a.tokens - q0, Qs,
                               lay.ldq);
  float o[kDimBlocks][4];
#pragma unroll
  for (int n = 0; n < kDimBlocks; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.0f;
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};  // l: this thread's columns only
  const __nv_bfloat16* q_frag = Qs + (warp * 16 + g) * lay.ldq + c;

  for (int64_t k0 = first_visible(prompt_start, q0, a.window); k0 <= q_last; k0 += kOpKeys) {
    __syncthreads();  // every warp is done with the previous tile
    stage_rows_bf16<HD, kOpKeys>(k + k0 * kv_stride + kvh * HD, kv_stride, a.tokens - k0, Ks,
                                 lay.ldq);
    stage_v_transposed<HD>(v + k0 * kv_stride + kvh * HD, kv_stride, a.tokens - k0, Vt, lay.ldv);
    __syncthreads();
    if (w0 >= a.tokens || k0 > w_last || k0 + kOpKeys - 1 < w_lo) continue;

    float s[kKeyBlocks][4];
#pragma unroll
    for (int n = 0; n < kKeyBlocks; ++n) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.0f;
#pragma unroll
    for (int d0 = 0; d0 < HD; d0 += 16) {
      const uint32_t qa[4] = {lds32(q_frag + d0), lds32(q_frag + 8 * lay.ldq + d0),
                              lds32(q_frag + d0 + 8), lds32(q_frag + 8 * lay.ldq + d0 + 8)};
#pragma unroll
      for (int n = 0; n < kKeyBlocks; ++n) {
        const __nv_bfloat16* kb = Ks + (n * 8 + g) * lay.ldq + d0 + c;
        mma_bf16(s[n], qa, lds32(kb), lds32(kb + 8));
      }
    }
    // Scale, soft-cap, mask (as the CPU: the cap before the mask); the tile's max per row.
    float tile_max[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int n = 0; n < kKeyBlocks; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int u = e / 2;
        const int64_t j = k0 + n * 8 + c + (e & 1);
        float x = s[n][e] * a.scale;
        if (a.softcap > 0.0f) x = tanhf(x / a.softcap) * a.softcap;
        s[n][e] = j >= lo[u] && j <= row[u] ? x : -INFINITY;
        tile_max[u] = fmaxf(tile_max[u], s[n][e]);
      }
    float corr[2], m_scaled[2];  // m_scaled: the new max times log2(e), 0 while nothing is seen
#pragma unroll
    for (int u = 0; u < 2; ++u) {  // the 4 lanes of a group hold the row's 64 keys
      tile_max[u] = fmaxf(tile_max[u], __shfl_xor_sync(0xFFFFFFFFu, tile_max[u], 1));
      tile_max[u] = fmaxf(tile_max[u], __shfl_xor_sync(0xFFFFFFFFu, tile_max[u], 2));
      const float m_new = fmaxf(m[u], tile_max[u]);
      m_scaled[u] = m_new == -INFINITY ? 0.0f : m_new * kLog2e;
      corr[u] = exp2f(m[u] * kLog2e - m_scaled[u]);  // 0 while m[u] is -inf
      m[u] = m_new;
      l[u] *= corr[u];
    }
    // P = exp(S - max) into l and, in bf16, into the A fragments of P V (16 keys each).
    uint32_t pa[kOpKeys / 16][4];
#pragma unroll
    for (int n = 0; n < kKeyBlocks; ++n) {
      const float p0 = exp2f(s[n][0] * kLog2e - m_scaled[0]);
      const float p1 = exp2f(s[n][1] * kLog2e - m_scaled[0]);
      const float p2 = exp2f(s[n][2] * kLog2e - m_scaled[1]);
      const float p3 = exp2f(s[n][3] * kLog2e - m_scaled[1]);
      l[0] += p0 + p1, l[1] += p2 + p3;
      pa[n / 2][(n % 2) * 2 + 0] = pack_bf16(p0, p1);  // row g, keys c..c+1 (+8 when n odd)
      pa[n / 2][(n % 2) * 2 + 1] = pack_bf16(p2, p3);  // row g + 8
    }
#pragma unroll
    for (int n = 0; n < kDimBlocks; ++n) {
      o[n][0] *= corr[0], o[n][1] *= corr[0];
      o[n][2] *= corr[1], o[n][3] *= corr[1];
    }
#pragma unroll
    for (int kc = 0; kc < kOpKeys / 16; ++kc)
#pragma unroll
      for (int n = 0; n < kDimBlocks; ++n) {
        const __nv_bfloat16* vb = Vt + (n * 8 + g) * lay.ldv + kc * 16 + c;
        mma_bf16(o[n], pa[kc], lds32(vb), lds32(vb + 8));
      }
  }
  // The row sums over the group's 4 lanes, then O / sum.
#pragma unroll
  for (int u = 0; u < 2; ++u) {
    l[u] += __shfl_xor_sync(0xFFFFFFFFu, l[u], 1);
    l[u] += __shfl_xor_sync(0xFFFFFFFFu, l[u], 2);
    if (row[u] >= a.tokens) continue;
    const float inv = l[u] > 0.0f ? 1.0f / l[u] : 0.0f;
    const int64_t base = (row[u] * a.heads + h) * HD + c;
#pragma unroll
    for (int n = 0; n < kDimBlocks; ++n) {
      put(out, base + n * 8, o[n][2 * u] * inv);
      put(out, base + n * 8 + 1, o[n][2 * u + 1] * inv);
    }
  }
#endif
}

// A kernel's dynamic shared memory above 48 KiB needs an opt-in, once per kernel.
template <class Kernel>
void allow_shared_bytes(Kernel* kernel, size_t bytes) {
  SAE_CUDA(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes)));
}

template <int HD>
void launch_attention_tc(const Context& ctx, const float* q, const float* k, const float* v,
                         const int32_t* prompt_start, const AttentionDims& dims, ActOut out,
                         TensorCoreAttention kind) {
  if (kind == TensorCoreAttention::OnePass) {
    const OnePassLayout lay(HD);
    static const bool allowed = (allow_shared_bytes(k_attention_one_pass<HD>, lay.bytes), true);
    (void)allowed;
    const dim3 grid(unsigned((dims.tokens + kOpRows - 1) / kOpRows), unsigned(dims.heads));
    k_attention_one_pass<HD>
        <<<grid, 32 * kOpWarps, lay.bytes, ctx.stream()>>>(q, k, v, prompt_start, dims, out, lay);
  } else {
    const TcLayout lay(HD);
    static const bool allowed = (allow_shared_bytes(k_attention_tc<HD>, lay.bytes), true);
    (void)allowed;
    const dim3 grid(unsigned((dims.tokens + kTq - 1) / kTq), unsigned(dims.heads));
    k_attention_tc<HD>
        <<<grid, 32 * kTcWarps, lay.bytes, ctx.stream()>>>(q, k, v, prompt_start, dims, out, lay);
  }
  SAE_CUDA_LAUNCHED();
}

}  // namespace

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
                      bool bf16_math, TensorCoreAttention kind) {
  SAE_CHECK(dims.head_dim <= 32 * kMaxDimsPerLane, "attention: head_dim above 256");
  SAE_CHECK(dims.heads % dims.kv_heads == 0, "attention: heads not a multiple of kv_heads");
  const int64_t warps = dims.tokens * dims.heads;
  if (warps == 0) return;
  if (bf16_math && tensor_core_attention(dims.head_dim)) {
    switch (dims.head_dim) {
      case 16:
        return launch_attention_tc<16>(ctx, q, k, v, prompt_start, dims, out, kind);
      case 32:
        return launch_attention_tc<32>(ctx, q, k, v, prompt_start, dims, out, kind);
      case 64:
        return launch_attention_tc<64>(ctx, q, k, v, prompt_start, dims, out, kind);
      case 128:
        return launch_attention_tc<128>(ctx, q, k, v, prompt_start, dims, out, kind);
      default:
        return launch_attention_tc<256>(ctx, q, k, v, prompt_start, dims, out, kind);
    }
  }
  constexpr int kWarpsPerBlock = 4;
  const int64_t blocks = (warps + kWarpsPerBlock - 1) / kWarpsPerBlock;
  k_attention<<<unsigned(blocks), 32 * kWarpsPerBlock, 0, ctx.stream()>>>(q, k, v, prompt_start,
                                                                          dims, out);
  SAE_CUDA_LAUNCHED();
}

}  // namespace sae::cuda

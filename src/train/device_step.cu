// The GPU training step (device_step.h). Stream-ordered phases, each a few kernels:
//   dead mask -> sae_in -> encoder GEMM (cuBLAS) -> BatchTopK (ops/cuda) -> level sweep with
//   per-entry d(pre) -> latent-major sort -> AuxK (dense over the dead latents, cuBLAS) ->
//   gradient rows (+ squared norm parts) -> d(b_dec) (+ W_enc db_enc GEMV) -> counters,
//   threshold -> clip + Adam. docs/gpu.md walks through them.
// The CPU step (step.cpp) is the reference; the comments there explain each formula.
#include <thrust/iterator/counting_iterator.h>
#include <cub/device/device_radix_sort.cuh>
#include <cub/device/device_select.cuh>

#include <algorithm>
#include <cmath>

#include "core/device.h"
#include "core/error.h"
#include "ops/cuda/adam.h"
#include "ops/cuda/batch_topk.h"
#include "ops/cuda/block_reduce.cuh"
#include "ops/cuda/gemm.h"
#include "ops/cuda/runtime.h"
#include "train/device_step.h"

namespace sae::train {

using cuda::block_sum;
using cuda::DeviceBuffer;

namespace {

constexpr int kMaxLevels = 16;
constexpr int kThreads = 256;

// The loss spec, passed to kernels by value.
struct Levels {
  int n;
  int64_t width[kMaxLevels];
  double weight[kMaxLevels];
  int l2[kMaxLevels];
  double l2_power;
  int detach;
};

__device__ __forceinline__ int level_of(int64_t j, const Levels& ls) {
  int l = 0;
  while (l < ls.n - 1 && j >= ls.width[l]) ++l;
  return l;
}

// Level i's loss R_i from its squared error ss, and the factor c_i/B dR/dr applies to the error
// (R = ||e||^2: -2 w; R = ||e||^p: -p ||e||^(p-2) w, guarded at ||e|| = 0).
__device__ void level_loss(const Levels& ls, int i, double ss, double inv_B, double* R,
                           double* coef) {
  const double w = ls.weight[i] * inv_B;
  if (!ls.l2[i]) {
    *R = ss;
    *coef = -2.0 * w;
  } else {
    const double norm = sqrt(ss), p = ls.l2_power;
    *R = pow(norm, p);
    *coef = norm > 1e-12 ? -p * pow(norm, p - 2.0) * w : 0.0;
  }
}

// The vecs slot that receives level i's (unscaled) residual for AuxK, or -1: each level's own
// with per-level AuxK, else the outer level's only.
__device__ __forceinline__ int aux_slot_of(const Levels& ls, int i, int n_aux, int per_level_aux) {
  if (n_aux == 0) return -1;
  if (per_level_aux) return ls.n + i;
  return i == ls.n - 1 ? ls.n : -1;
}

int blocks_for(int64_t n, int threads = kThreads) {
  return int(std::max<int64_t>(1, std::min<int64_t>((n + threads - 1) / threads, 132 * 32)));
}

#define GRID_STRIDE(i, n)                                                   \
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < (n); \
       i += int64_t(gridDim.x) * blockDim.x)

// Per column of x [B, d], the sum and the sum of squares (double) over each chunk of `rows` rows:
// part[(chunk * d + c) * 2 + {0, 1}]. Grid: (column blocks, row chunks).
__global__ void k_col_moments(const float* x, int64_t B, int64_t d, int64_t rows, double* part) {
  const int64_t c = blockIdx.x * int64_t(blockDim.x) + threadIdx.x, chunk = blockIdx.y;
  if (c >= d) return;
  const int64_t r1 = (chunk + 1) * rows < B ? (chunk + 1) * rows : B;
  double s = 0, q = 0;
  for (int64_t r = chunk * rows; r < r1; ++r) {
    const double v = x[r * d + c];
    s += v, q += v * v;
  }
  part[(chunk * d + c) * 2] = s;
  part[(chunk * d + c) * 2 + 1] = q;
}

// One block: sum over the columns of (sum of squares - sum^2 / B), each column's chunks and the
// columns added in a fixed order.
__global__ void k_sq_deviation(const double* part, int64_t n_chunks, int64_t B, int64_t d,
                               double* out) {
  __shared__ double sh[32];
  double acc = 0;
  for (int64_t c = threadIdx.x; c < d; c += blockDim.x) {
    double s = 0, q = 0;
    for (int64_t k = 0; k < n_chunks; ++k)
      s += part[(k * d + c) * 2], q += part[(k * d + c) * 2 + 1];
    acc += q - s * s / double(B);
  }
  acc = block_sum(acc, sh);
  if (threadIdx.x == 0) *out = acc;
}

// TrainingSae::to_inference on the device, with n_j the decoder norms (null: 1). The encoder:
// W_enc[c, j] = W_encT[j, c] * s * n_j, transposed through 32 x 32 tiles (block 32 x 8; grid
// over latents x columns) so that reads and writes both run along rows.
__global__ void k_inference_encoder(const float* W_encT, int64_t D, int64_t d, double s,
                                    const float* norms, float* W_enc) {
  __shared__ float tile[32][33];
  const int64_t j0 = int64_t(blockIdx.x) * 32, c0 = int64_t(blockIdx.y) * 32;
  for (int r = threadIdx.y; r < 32; r += blockDim.y) {
    const int64_t j = j0 + r, c = c0 + threadIdx.x;
    if (j < D && c < d)
      tile[r][threadIdx.x] =
          float(double(W_encT[j * d + c]) * s * (norms ? double(norms[j]) : 1.0));
  }
  __syncthreads();
  for (int r = threadIdx.y; r < 32; r += blockDim.y) {
    const int64_t c = c0 + r, j = j0 + threadIdx.x;
    if (j < D && c < d) W_enc[c * D + j] = tile[threadIdx.x][r];
  }
}

// The rest: W_dec / (n_j s), b_enc n_j, the threshold (theta in rescaled units, else theta n_j),
// b_dec / s.
__global__ void k_inference_rest(const float* W_dec, const float* b_enc, const float* b_dec,
                                 const double* theta, int64_t D, int64_t d, double s,
                                 const float* norms, int threshold_folded, float* W_dec_out,
                                 float* b_enc_out, float* b_dec_out, float* thr_out) {
  GRID_STRIDE(i, D * d) {
    const double nj = norms ? double(norms[i / d]) : 1.0;
    W_dec_out[i] = float(double(W_dec[i]) / (nj * s));
  }
  GRID_STRIDE(j, D) {
    const double nj = norms ? double(norms[j]) : 1.0;
    b_enc_out[j] = float(double(b_enc[j]) * nj);
    thr_out[j] = float(threshold_folded ? *theta : *theta * nj);
  }
  GRID_STRIDE(c, d) b_dec_out[c] = float(double(b_dec[c]) / s);
}

__global__ void k_scale(float* x, int64_t n, float s) {
  GRID_STRIDE(i, n) x[i] *= s;
}

__global__ void k_sae_in(const float* x, const float* b_dec, int apply, int64_t n, int64_t d,
                         float* sae_in) {
  GRID_STRIDE(i, n) sae_in[i] = x[i] - (apply ? b_dec[i % d] : 0.0f);
}

// norms[j] = float(sqrt(sum W_dec[j]^2)) in double, as TrainingSae::decoder_norms.
__global__ void k_row_norms(const float* W, int64_t rows, int64_t d, float* inv_norms) {
  __shared__ double sh[32];
  const int64_t j = blockIdx.x;
  double s = 0;
  for (int64_t c = threadIdx.x; c < d; c += blockDim.x) s += double(W[j * d + c]) * W[j * d + c];
  s = block_sum(s, sh);
  if (threadIdx.x == 0) {
    const float n = float(sqrt(s));
    inv_norms[rows + j] = n;  // second half: the norms themselves
    inv_norms[j] = 1.0f / n;  // first half: their inverses
  }
}

__global__ void k_dead(const int64_t* since, int64_t D, int64_t window, uint8_t* dead) {
  GRID_STRIDE(j, D) dead[j] = since[j] > window;
}

// Per-group dead counts (groups are levels with per_level_aux, else one), from the mask.
__global__ void k_dead_counts(const uint8_t* dead, int64_t D, Levels ls, int per_level,
                              int* counts) {
  GRID_STRIDE(j, D) if (dead[j]) atomicAdd(&counts[per_level ? level_of(j, ls) : 0], 1);
}

__global__ void k_aux_pos(const int32_t* list, const int* n_list, int32_t* pos) {
  GRID_STRIDE(q, *n_list) pos[list[q]] = int32_t(q);
}

// One block per token: r = b_dec + prefix sums of the active latents' rows, level by level.
// vecs[t][i] = c_i/B dR/dr at level i (then suffix-summed unless detached); vecs[t][L + a] = the
// residual that AuxK group a fits (unscaled). R_tok[t][i] = R_i, ss_outer[t] = ||e_outer||^2.
__global__ void k_levels(const float* x, const float* W_dec, const float* b_dec,
                         const int64_t* offsets, const int32_t* cols, const float* vals,
                         const float* inv_norms, Levels ls, int64_t d, int n_vec, int n_aux,
                         int per_level_aux, double inv_B, float* vecs, double* R_tok,
                         double* ss_outer, int32_t* token, float* dpre, float* u_out) {
  extern __shared__ float r[];
  __shared__ double sh[32];
  const int64_t t = blockIdx.x;
  const float* xt = x + t * d;
  float* vt = vecs + t * int64_t(n_vec) * d;
  for (int64_t c = threadIdx.x; c < d; c += blockDim.x) r[c] = b_dec[c];
  int64_t e = offsets[t];
  const int64_t end = offsets[t + 1];
  for (int i = 0; i < ls.n; ++i) {
    for (; e < end && cols[e] < ls.width[i]; ++e) {
      const int32_t j = cols[e];
      const float u = inv_norms ? vals[e] * inv_norms[j] : vals[e];
      const float* w = W_dec + int64_t(j) * d;
      for (int64_t c = threadIdx.x; c < d; c += blockDim.x) r[c] += u * w[c];
    }
    float* gi = vt + int64_t(i) * d;
    const int aux_slot = aux_slot_of(ls, i, n_aux, per_level_aux);
    double ss = 0;
    for (int64_t c = threadIdx.x; c < d; c += blockDim.x) {
      const float err = xt[c] - r[c];
      ss += double(err) * err;
      if (aux_slot >= 0) vt[int64_t(aux_slot) * d + c] = err;
    }
    ss = block_sum(ss, sh);
    double R, coef;
    level_loss(ls, i, ss, inv_B, &R, &coef);
    if (threadIdx.x == 0) {
      R_tok[t * ls.n + i] = R;
      if (i == ls.n - 1) ss_outer[t] = ss;
    }
    for (int64_t c = threadIdx.x; c < d; c += blockDim.x)
      gi[c] = float(coef * double(xt[c] - r[c]));
  }
  if (!ls.detach)
    for (int64_t c = threadIdx.x; c < d; c += blockDim.x)
      for (int i = ls.n - 2; i >= 0; --i) vt[int64_t(i) * d + c] += vt[int64_t(i + 1) * d + c];
  // The backward of the token's entries while its rows are in cache, one warp per entry:
  // d(pre) = <W_dec[j], vecs[t][level(j)]> and the value it decoded with.
  __syncthreads();  // the vectors above, written by every thread, are read across the block
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, n_warps = blockDim.x >> 5;
  for (int64_t e2 = offsets[t] + warp; e2 < end; e2 += n_warps) {
    const int32_t j = cols[e2];
    const float* w = W_dec + int64_t(j) * d;
    const float* g = vt + int64_t(level_of(j, ls)) * d;
    float s = 0;
    for (int64_t c = lane; c < d; c += 32) s += w[c] * g[c];
    for (int o = 16; o > 0; o >>= 1) s += __shfl_down_sync(0xFFFFFFFFu, s, o);
    if (lane == 0) {
      dpre[e2] = s;
      u_out[e2] = inv_norms ? vals[e2] * inv_norms[j] : vals[e2];
      token[e2] = int32_t(t);
    }
  }
}

// ---- float4 versions of the two widest kernels, for d_in % 4 == 0 (every real model): each
// thread keeps V float4 columns in registers (block of ceil(d/4/V) threads, a multiple of 32).
// Per element the arithmetic and its order are those of the scalar kernels above.

__device__ __forceinline__ float4 f4_fma(float a, float4 b, float4 c) {
  return make_float4(c.x + a * b.x, c.y + a * b.y, c.z + a * b.z, c.w + a * b.w);
}

template <int V>
__global__ void k_levels4(const float* x, const float* W_dec, const float* b_dec,
                          const int64_t* offsets, const int32_t* cols, const float* vals,
                          const float* inv_norms, Levels ls, int64_t d, int n_vec, int n_aux,
                          int per_level_aux, double inv_B, float* vecs, double* R_tok,
                          double* ss_outer, int32_t* token, float* dpre, float* u_out) {
  __shared__ double sh[32];
  const int64_t t = blockIdx.x, d4 = d / 4;
  const float4* xt = reinterpret_cast<const float4*>(x + t * d);
  const float4* W4 = reinterpret_cast<const float4*>(W_dec);
  float* vt = vecs + t * int64_t(n_vec) * d;
  float4* vt4 = reinterpret_cast<float4*>(vt);
  float4 r[V], xv[V];
#pragma unroll
  for (int k = 0; k < V; ++k) {
    const int64_t q = threadIdx.x + int64_t(k) * blockDim.x;
    r[k] = q < d4 ? reinterpret_cast<const float4*>(b_dec)[q] : make_float4(0, 0, 0, 0);
    xv[k] = q < d4 ? xt[q] : make_float4(0, 0, 0, 0);
  }
  int64_t e = offsets[t];
  const int64_t end = offsets[t + 1];
  for (int i = 0; i < ls.n; ++i) {
    for (; e < end && cols[e] < ls.width[i]; ++e) {
      const int32_t j = cols[e];
      const float u = inv_norms ? vals[e] * inv_norms[j] : vals[e];
      const float4* w = W4 + int64_t(j) * d4;
#pragma unroll
      for (int k = 0; k < V; ++k) {
        const int64_t q = threadIdx.x + int64_t(k) * blockDim.x;
        if (q < d4) r[k] = f4_fma(u, w[q], r[k]);
      }
    }
    const int aux_slot = aux_slot_of(ls, i, n_aux, per_level_aux);
    double ss = 0;
    float4 err[V];
#pragma unroll
    for (int k = 0; k < V; ++k) {
      const int64_t q = threadIdx.x + int64_t(k) * blockDim.x;
      err[k] = make_float4(xv[k].x - r[k].x, xv[k].y - r[k].y, xv[k].z - r[k].z, xv[k].w - r[k].w);
      if (q < d4) {
        ss += double(err[k].x) * err[k].x + double(err[k].y) * err[k].y +
              double(err[k].z) * err[k].z + double(err[k].w) * err[k].w;
        if (aux_slot >= 0) vt4[int64_t(aux_slot) * d4 + q] = err[k];
      }
    }
    ss = block_sum(ss, sh);
    double R, coef;
    level_loss(ls, i, ss, inv_B, &R, &coef);
    if (threadIdx.x == 0) {
      R_tok[t * ls.n + i] = R;
      if (i == ls.n - 1) ss_outer[t] = ss;
    }
#pragma unroll
    for (int k = 0; k < V; ++k) {
      const int64_t q = threadIdx.x + int64_t(k) * blockDim.x;
      if (q < d4)
        vt4[int64_t(i) * d4 + q] =
            make_float4(float(coef * double(err[k].x)), float(coef * double(err[k].y)),
                        float(coef * double(err[k].z)), float(coef * double(err[k].w)));
    }
  }
  if (!ls.detach)
#pragma unroll
    for (int k = 0; k < V; ++k) {
      const int64_t q = threadIdx.x + int64_t(k) * blockDim.x;
      if (q >= d4) continue;
      float4 acc = vt4[int64_t(ls.n - 1) * d4 + q];
      for (int i = ls.n - 2; i >= 0; --i) {
        const float4 g = vt4[int64_t(i) * d4 + q];
        acc = make_float4(g.x + acc.x, g.y + acc.y, g.z + acc.z, g.w + acc.w);
        vt4[int64_t(i) * d4 + q] = acc;
      }
    }
  __syncthreads();
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, n_warps = blockDim.x >> 5;
  for (int64_t e2 = offsets[t] + warp; e2 < end; e2 += n_warps) {
    const int32_t j = cols[e2];
    const float4* w = W4 + int64_t(j) * d4;
    const float4* g = vt4 + int64_t(level_of(j, ls)) * d4;
    float s = 0;
    for (int64_t q = lane; q < d4; q += 32) {
      const float4 a = w[q], b = g[q];
      s += a.x * b.x + a.y * b.y + a.z * b.z + a.w * b.w;
    }
    for (int o = 16; o > 0; o >>= 1) s += __shfl_down_sync(0xFFFFFFFFu, s, o);
    if (lane == 0) {
      dpre[e2] = s;
      u_out[e2] = inv_norms ? vals[e2] * inv_norms[j] : vals[e2];
      token[e2] = int32_t(t);
    }
  }
}

template <int V>
__global__ void k_grad_rows4(const int64_t* start, const int32_t* sorted_ids, const int32_t* token,
                             const float* u, const float* dpre, const float* vecs, int n_vec,
                             const float* sae_in, int64_t d, Levels ls, const int32_t* aux_pos,
                             const float* gwd, const float* gwe, const float* gb_aux, float* gW_dec,
                             float* gW_encT, float* gb_enc, double* norm_part) {
  __shared__ double sh[32];
  const int64_t j = blockIdx.x, d4 = d / 4;
  const int64_t s0 = start[j], s1 = start[j + 1];
  const int lvl = level_of(j, ls);
  const int32_t qa = aux_pos ? aux_pos[j] : -1;
  const float4* V4 = reinterpret_cast<const float4*>(vecs);
  const float4* X4 = reinterpret_cast<const float4*>(sae_in);
  float4 gd[V], ge[V];
#pragma unroll
  for (int k = 0; k < V; ++k) gd[k] = ge[k] = make_float4(0, 0, 0, 0);
  int64_t s = s0;
  for (; s + 1 < s1; s += 2) {  // two entries at a time, added in order
    const int32_t e0 = sorted_ids[s], e1 = sorted_ids[s + 1];
    const int64_t t0 = token[e0], t1 = token[e1];
    const float u0 = u[e0], d0 = dpre[e0], u1 = u[e1], d1 = dpre[e1];
    const float4 *g0 = V4 + (t0 * n_vec + lvl) * d4, *x0 = X4 + t0 * d4;
    const float4 *g1 = V4 + (t1 * n_vec + lvl) * d4, *x1 = X4 + t1 * d4;
#pragma unroll
    for (int k = 0; k < V; ++k) {
      const int64_t q = threadIdx.x + int64_t(k) * blockDim.x;
      if (q < d4) {
        const float4 a0 = g0[q], b0 = x0[q], a1 = g1[q], b1 = x1[q];
        gd[k] = f4_fma(u1, a1, f4_fma(u0, a0, gd[k]));
        ge[k] = f4_fma(d1, b1, f4_fma(d0, b0, ge[k]));
      }
    }
  }
  for (; s < s1; ++s) {
    const int32_t e = sorted_ids[s];
    const int64_t t = token[e];
    const float ue = u[e], de = dpre[e];
    const float4* g = V4 + (t * n_vec + lvl) * d4;
    const float4* xs = X4 + t * d4;
#pragma unroll
    for (int k = 0; k < V; ++k) {
      const int64_t q = threadIdx.x + int64_t(k) * blockDim.x;
      if (q < d4) gd[k] = f4_fma(ue, g[q], gd[k]), ge[k] = f4_fma(de, xs[q], ge[k]);
    }
  }
  float sq = 0;
#pragma unroll
  for (int k = 0; k < V; ++k) {
    const int64_t q = threadIdx.x + int64_t(k) * blockDim.x;
    if (q >= d4) continue;
    if (qa >= 0) {
      const float4 a = reinterpret_cast<const float4*>(gwd)[int64_t(qa) * d4 + q];
      const float4 b = reinterpret_cast<const float4*>(gwe)[int64_t(qa) * d4 + q];
      gd[k] = make_float4(gd[k].x + a.x, gd[k].y + a.y, gd[k].z + a.z, gd[k].w + a.w);
      ge[k] = make_float4(ge[k].x + b.x, ge[k].y + b.y, ge[k].z + b.z, ge[k].w + b.w);
    }
    reinterpret_cast<float4*>(gW_dec)[j * d4 + q] = gd[k];
    reinterpret_cast<float4*>(gW_encT)[j * d4 + q] = ge[k];
    sq += gd[k].x * gd[k].x + ge[k].x * ge[k].x + gd[k].y * gd[k].y + ge[k].y * ge[k].y +
          gd[k].z * gd[k].z + ge[k].z * ge[k].z + gd[k].w * gd[k].w + ge[k].w * ge[k].w;
  }
  double gb = 0;
  if (threadIdx.x == 0) {
    for (int64_t s = s0; s < s1; ++s) gb += dpre[sorted_ids[s]];
    float g = float(gb);
    if (qa >= 0) g += gb_aux[qa];
    gb_enc[j] = g;
    sq += g * g;
  }
  const double total = block_sum(double(sq), sh);
  if (threadIdx.x == 0) norm_part[j] = total;  // summed in a fixed order: reproducible
}

// Keys for the latent-major sort: the entry's latent, or D past the end (sorted last).
__global__ void k_sort_keys(const int64_t* offsets, int64_t B, const int32_t* cols, int64_t cap,
                            int32_t D, int32_t* keys, int32_t* ids) {
  const int64_t n = offsets[B];
  GRID_STRIDE(e, cap) {
    keys[e] = e < n ? cols[e] : D;
    ids[e] = int32_t(e);
  }
}

__global__ void k_latent_start(const int32_t* sorted_keys, int64_t cap, int64_t D, int64_t* start) {
  GRID_STRIDE(j, D + 1) {
    start[j] = cuda::lower_bound(sorted_keys, cap, int32_t(j));
  }
}

// ---- AuxK helpers ----
__global__ void k_gather_cols(const float* hp, int64_t B, int64_t D, const int32_t* list,
                              int64_t n_g, float* out) {
  GRID_STRIDE(i, B * n_g) out[i] = hp[(i / n_g) * D + list[i % n_g]];
}

__global__ void k_gather_rows(const float* W, const int32_t* list, int64_t n_g, int64_t d,
                              float* out) {
  GRID_STRIDE(i, n_g * d) out[i] = W[int64_t(list[i / d]) * d + i % d];
}

__global__ void k_aux_scatter(const int32_t* top_i, const float* top_v, int64_t B, int64_t k,
                              int64_t n_g, const int32_t* list, const float* inv_norms, float* acts,
                              uint8_t* sel) {
  GRID_STRIDE(i, B * k) {
    const int64_t t = i / k, c = top_i[i];
    const float u = inv_norms ? top_v[i] * inv_norms[list[c]] : top_v[i];
    acts[t * n_g + c] = u;
    sel[t * n_g + c] = 1;
  }
}

// h = 2 w (recon - residual); the loss sum sum (recon - residual)^2 into *loss.
__global__ void k_aux_h(const float* recon, const float* vecs, int n_vec, int slot, int64_t B,
                        int64_t d, double w, float* h, double* loss) {
  __shared__ double sh[32];
  double s = 0;
  GRID_STRIDE(i, B * d) {
    const int64_t t = i / d, c = i % d;
    const float diff = recon[i] - vecs[(t * n_vec + slot) * d + c];
    s += double(diff) * diff;
    h[i] = float(2.0 * w * diff);
  }
  s = block_sum(s, sh);
  if (threadIdx.x == 0) atomicAdd(loss, s);
}

__global__ void k_mask(float* v, const uint8_t* sel, int64_t n) {
  GRID_STRIDE(i, n) if (!sel[i]) v[i] = 0.0f;
}

__global__ void k_col_sums(const float* m, int64_t rows, int64_t cols, float* out) {
  GRID_STRIDE(q, cols) {
    double s = 0;
    for (int64_t t = 0; t < rows; ++t) s += m[t * cols + q];
    out[q] = float(s);
  }
}

// One block per latent: its gradient rows from its entries (token order) plus its AuxK part;
// untouched latents get zero rows. Adds the rows' squared norm to *norm_sq.
__global__ void k_grad_rows(const int64_t* start, const int32_t* sorted_ids, const int32_t* token,
                            const float* u, const float* dpre, const float* vecs, int n_vec,
                            const float* sae_in, int64_t d, Levels ls, const int32_t* aux_pos,
                            const float* gwd, const float* gwe, const float* gb_aux, float* gW_dec,
                            float* gW_encT, float* gb_enc, double* norm_part) {
  __shared__ double sh[32];
  const int64_t j = blockIdx.x;
  const int64_t s0 = start[j], s1 = start[j + 1];
  const int lvl = level_of(j, ls);
  const int32_t q = aux_pos ? aux_pos[j] : -1;
  float sq = 0;
  for (int64_t c = threadIdx.x; c < d; c += blockDim.x) {
    float gd = 0, ge = 0;
    for (int64_t s = s0; s < s1; ++s) {
      const int32_t e = sorted_ids[s];
      const int64_t t = token[e];
      gd += u[e] * vecs[(t * n_vec + lvl) * d + c];
      ge += dpre[e] * sae_in[t * d + c];
    }
    if (q >= 0) gd += gwd[int64_t(q) * d + c], ge += gwe[int64_t(q) * d + c];
    gW_dec[j * d + c] = gd;
    gW_encT[j * d + c] = ge;
    sq += gd * gd + ge * ge;
  }
  double gb = 0;
  if (threadIdx.x == 0) {
    for (int64_t s = s0; s < s1; ++s) gb += dpre[sorted_ids[s]];
    float g = float(gb);
    if (q >= 0) g += gb_aux[q];
    gb_enc[j] = g;
    sq += g * g;
  }
  const double total = block_sum(double(sq), sh);
  if (threadIdx.x == 0) norm_part[j] = total;  // summed in a fixed order: reproducible
}

// sum_t G_0[t][c] (every level's reconstruction includes b_dec), in double over token chunks.
__global__ void k_bdec_partial(const float* vecs, int n_vec, int64_t B, int64_t d, int64_t chunk,
                               double* acc) {
  const int64_t c = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (c >= d) return;
  const int64_t t0 = blockIdx.y * chunk, t1 = min(B, t0 + chunk);
  double s = 0;
  for (int64_t t = t0; t < t1; ++t) s += double(vecs[t * n_vec * d + c]);
  acc[blockIdx.y * d + c] = s;  // chunks summed in order by k_bdec_final
}

__global__ void __launch_bounds__(1024)
    k_bdec_final(const double* acc, int n_chunks, const float* wenc_db, int64_t d, float* gb_dec,
                 double* norm_part) {
  __shared__ double sh[32];
  double sq = 0;
  for (int64_t c = threadIdx.x; c < d; c += blockDim.x) {
    double a = 0;
    for (int ch = 0; ch < n_chunks; ++ch) a += acc[int64_t(ch) * d + c];
    const float g = float(a - (wenc_db ? double(wenc_db[c]) : 0.0));
    gb_dec[c] = g;
    sq += double(g) * g;
  }
  sq = block_sum(sq, sh);
  if (threadIdx.x == 0) *norm_part = sq;
}

// The squared gradient norm from the per-block parts, in a fixed order.
__global__ void __launch_bounds__(1024)
    k_norm_reduce(const double* part, int64_t n, double* norm_sq) {
  __shared__ double sh[32];
  double s = 0;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) s += part[i];
  s = block_sum(s, sh);
  if (threadIdx.x == 0) *norm_sq = s;
}

// Sums per level of R_tok and of ss_outer into out[0..L) and out[L].
__global__ void __launch_bounds__(1024)
    k_reduce_losses(const double* R_tok, const double* ss_outer, int64_t B, int L, double* out) {
  __shared__ double sh[32];
  for (int i = 0; i <= L; ++i) {
    double s = 0;
    for (int64_t t = threadIdx.x; t < B; t += blockDim.x)
      s += i < L ? R_tok[t * L + i] : ss_outer[t];
    s = block_sum(s, sh);
    if (threadIdx.x == 0) out[i] = s;
  }
}

__global__ void k_counters(const int64_t* start, int64_t D, int64_t window, int new_window,
                           int64_t* since, int64_t* counts, unsigned long long* dead_after) {
  __shared__ unsigned long long sh[32];
  unsigned long long dead = 0;
  GRID_STRIDE(j, D) {
    const int64_t n = start[j + 1] - start[j];
    since[j] = n > 0 ? 0 : since[j] + 1;
    counts[j] = (new_window ? 0 : counts[j]) + n;
    dead += since[j] > window;
  }
  dead = block_sum(dead, sh);
  if (threadIdx.x == 0) atomicAdd(dead_after, dead);
}

__global__ void k_threshold(double* theta, double lr, const float* min_selected,
                            const int64_t* n_active) {
  if (*n_active > 0) *theta = (1.0 - lr) * *theta + lr * double(*min_selected);
}

// The scalars one step reports, packed for a single copy to the host.
struct Report {
  double level[kMaxLevels];
  double outer_ss;
  double aux[kMaxLevels];
  double norm_sq;
  double threshold;
  double min_selected;
  int64_t n_active;
  unsigned long long dead_after;
};

__global__ void k_report(const double* losses, int L, const double* aux, int n_aux,
                         const double* norm_sq, const double* theta, const float* min_selected,
                         const int64_t* n_active, const unsigned long long* dead_after, Report* r) {
  for (int i = 0; i < L; ++i) r->level[i] = losses[i];
  r->outer_ss = losses[L];
  for (int i = 0; i < n_aux; ++i) r->aux[i] = aux[i];
  r->norm_sq = *norm_sq;
  r->threshold = *theta;
  r->min_selected = *min_selected;
  r->n_active = *n_active;
  r->dead_after = *dead_after;
}

}  // namespace

// ---------------------------------------------------------------------------------------------

// Everything that does not outlive a step: gradients, the batch, pre-activations, selection,
// level and AuxK buffers. Every buffer only grows (DeviceBuffer::resize), so trainers of
// different shapes that step one after another (each step ends synchronized) can share one.
struct DeviceStepScratch {
  // gradients
  DeviceBuffer<float> gW_encT, gW_dec, gb_enc, gb_dec;
  DeviceBuffer<double> norm_sq, norm_part, bdec_acc;
  // step scratch
  DeviceBuffer<uint16_t> sae_in_bf16;
  DeviceBuffer<float> x, sae_in, hidden_pre, norms2, vecs, wenc_db;
  DeviceBuffer<double> R_tok, ss_outer, losses, aux_loss, col_moments;
  cuda::DeviceRowSparse active;
  cuda::BatchTopkScratch topk_ws;
  DeviceBuffer<float> min_selected;
  DeviceBuffer<int32_t> token, keys, ids, keys_sorted, ids_sorted;
  DeviceBuffer<float> dpre, u;
  DeviceBuffer<int64_t> start;
  DeviceBuffer<uint8_t> cub_temp;
  // dead latents and AuxK
  DeviceBuffer<uint8_t> dead, aux_sel;
  DeviceBuffer<int32_t> dead_list, aux_pos, top_i;
  DeviceBuffer<int> dead_counts, n_dead_dev;
  DeviceBuffer<float> hp_g, top_v, aux_acts, wd, recon, h, aux_dpre, gwd, gwe, gb_aux;
  DeviceBuffer<unsigned long long> dead_after;
  DeviceBuffer<Report> report;
};

std::shared_ptr<DeviceStepScratch> DeviceTrainer::new_scratch() {
  return std::make_shared<DeviceStepScratch>();
}

struct DeviceTrainer::Impl {
  TrainSpec sp;
  AdamConfig adam;
  int64_t B, d, D, L, budget, n_groups, n_vec;
  cuda::Precision prec;
  cuda::Context ctx;
  Levels ls{};

  // parameters and optimizer state
  DeviceBuffer<float> W_encT, W_dec, b_enc, b_dec, v_W_encT, v_W_dec, v_b_enc, v_b_dec;
  DeviceBuffer<float> m_W_encT, m_W_dec, m_b_enc, m_b_dec;
  DeviceBuffer<uint16_t> W_encT_bf16;
  DeviceBuffer<double> theta;
  DeviceBuffer<int64_t> since, counts;
  // The step's scratch (this trainer's own, or shared), under the names the kernels use.
  std::shared_ptr<DeviceStepScratch> scratch;
  DeviceBuffer<float>& gW_encT = scratch->gW_encT;
  DeviceBuffer<float>& gW_dec = scratch->gW_dec;
  DeviceBuffer<float>& gb_enc = scratch->gb_enc;
  DeviceBuffer<float>& gb_dec = scratch->gb_dec;
  DeviceBuffer<double>& norm_sq = scratch->norm_sq;
  DeviceBuffer<double>& norm_part = scratch->norm_part;
  DeviceBuffer<double>& bdec_acc = scratch->bdec_acc;
  DeviceBuffer<uint16_t>& sae_in_bf16 = scratch->sae_in_bf16;
  DeviceBuffer<float>& x = scratch->x;
  DeviceBuffer<float>& sae_in = scratch->sae_in;
  DeviceBuffer<float>& hidden_pre = scratch->hidden_pre;
  DeviceBuffer<float>& norms2 = scratch->norms2;
  DeviceBuffer<float>& vecs = scratch->vecs;
  DeviceBuffer<float>& wenc_db = scratch->wenc_db;
  DeviceBuffer<double>& R_tok = scratch->R_tok;
  DeviceBuffer<double>& ss_outer = scratch->ss_outer;
  DeviceBuffer<double>& losses = scratch->losses;
  DeviceBuffer<double>& aux_loss = scratch->aux_loss;
  cuda::DeviceRowSparse& active = scratch->active;
  cuda::BatchTopkScratch& topk_ws = scratch->topk_ws;
  DeviceBuffer<float>& min_selected = scratch->min_selected;
  DeviceBuffer<int32_t>& token = scratch->token;
  DeviceBuffer<int32_t>& keys = scratch->keys;
  DeviceBuffer<int32_t>& ids = scratch->ids;
  DeviceBuffer<int32_t>& keys_sorted = scratch->keys_sorted;
  DeviceBuffer<int32_t>& ids_sorted = scratch->ids_sorted;
  DeviceBuffer<float>& dpre = scratch->dpre;
  DeviceBuffer<float>& u = scratch->u;
  DeviceBuffer<int64_t>& start = scratch->start;
  DeviceBuffer<uint8_t>& cub_temp = scratch->cub_temp;
  DeviceBuffer<uint8_t>& dead = scratch->dead;
  DeviceBuffer<uint8_t>& aux_sel = scratch->aux_sel;
  DeviceBuffer<int32_t>& dead_list = scratch->dead_list;
  DeviceBuffer<int32_t>& aux_pos = scratch->aux_pos;
  DeviceBuffer<int32_t>& top_i = scratch->top_i;
  DeviceBuffer<int>& dead_counts = scratch->dead_counts;
  DeviceBuffer<int>& n_dead_dev = scratch->n_dead_dev;
  DeviceBuffer<float>& hp_g = scratch->hp_g;
  DeviceBuffer<float>& top_v = scratch->top_v;
  DeviceBuffer<float>& aux_acts = scratch->aux_acts;
  DeviceBuffer<float>& wd = scratch->wd;
  DeviceBuffer<float>& recon = scratch->recon;
  DeviceBuffer<float>& h = scratch->h;
  DeviceBuffer<float>& aux_dpre = scratch->aux_dpre;
  DeviceBuffer<float>& gwd = scratch->gwd;
  DeviceBuffer<float>& gwe = scratch->gwe;
  DeviceBuffer<float>& gb_aux = scratch->gb_aux;
  DeviceBuffer<unsigned long long>& dead_after = scratch->dead_after;
  DeviceBuffer<Report>& report = scratch->report;
  // host side
  float* pinned_x = nullptr;
  const float* device_x = nullptr;  // set_device_batch(): the next step's batch, else pinned_x
  Report* pinned_report = nullptr;
  int* pinned_counts = nullptr;
  cudaEvent_t counts_ready = nullptr;
  bool timing = false;
  cudaEvent_t ev[9] = {};
  DeviceStepTimes times;

  Impl(const TrainSpec& s, const AdamConfig& a, int64_t batch, const std::string& precision,
       std::shared_ptr<DeviceStepScratch> shared)
      : sp(s),
        adam(a),
        B(batch),
        d(s.d_in),
        D(s.d_sae),
        L(s.n_levels()),
        budget(int64_t(s.k * double(batch))),
        n_groups(s.aux_coefficient != 0.0 ? (s.per_level_aux ? s.n_levels() : 1) : 0),
        n_vec(L + n_groups),
        prec(cuda::parse_precision(precision, "training")),
        scratch(shared ? std::move(shared) : DeviceTrainer::new_scratch()) {
    SAE_CHECK(L <= kMaxLevels, "at most ", kMaxLevels, " Matryoshka levels on the GPU");
    SAE_CHECK(D < (int64_t(1) << 30) && B * D < (int64_t(1) << 62), "shape too large");
    ls.n = int(L);
    for (int64_t i = 0; i < L; ++i) {
      ls.width[i] = sp.widths[size_t(i)];
      ls.weight[i] = sp.level_weight[size_t(i)];
      ls.l2[i] = sp.level_loss[size_t(i)] == LevelLoss::L2;
    }
    ls.l2_power = sp.l2_power;
    ls.detach = sp.detach_levels;
    const size_t Dd = size_t(D * d);
    for (auto* b : {&W_encT, &W_dec, &v_W_encT, &v_W_dec, &gW_encT, &gW_dec})
      b->resize(Dd, "SAE weights / optimizer state / gradients");
    for (auto* b : {&b_enc, &v_b_enc, &gb_enc}) b->resize(size_t(D), "SAE b_enc");
    for (auto* b : {&b_dec, &v_b_dec, &gb_dec}) b->resize(size_t(d), "SAE b_dec");
    if (adam.beta1 != 0.0) {
      m_W_encT.resize(Dd, "Adam first moment");
      m_W_dec.resize(Dd, "Adam first moment");
      m_b_enc.resize(size_t(D), "Adam first moment");
      m_b_dec.resize(size_t(d), "Adam first moment");
    }
    if (prec == cuda::Precision::Bf16) {
      W_encT_bf16.resize(Dd, "bf16 encoder copy");
      sae_in_bf16.resize(size_t(B * d), "bf16 encoder input");
    }
    theta.resize(1, "threshold");
    since.resize(size_t(D), "dead counters");
    counts.resize(size_t(D), "firing counts");
    norm_sq.resize(1, "gradient norm");
    bdec_acc.resize(size_t(d * ((B + 63) / 64)), "b_dec gradient");
    norm_part.resize(size_t(D + 1), "gradient norm parts");
    x.resize(size_t(B * d), "batch");
    sae_in.resize(size_t(B * d), "sae_in");
    wenc_db.resize(size_t(d), "W_enc db_enc");
    hidden_pre.resize(size_t(B * D), "pre-activations [batch, d_sae]");
    if (sp.rescale_acts_by_decoder_norm) norms2.resize(size_t(2 * D), "decoder norms");
    vecs.resize(size_t(B * n_vec * d), "per-token level gradients");
    R_tok.resize(size_t(B * L), "level losses");
    ss_outer.resize(size_t(B), "outer errors");
    losses.resize(size_t(L + 1), "losses");
    aux_loss.resize(size_t(std::max<int64_t>(n_groups, 1)), "aux losses");
    min_selected.resize(1, "min selected");
    const size_t cap = size_t(std::max<int64_t>(budget, 1));
    for (auto* b : {&token, &keys, &ids, &keys_sorted, &ids_sorted}) b->resize(cap, "entries");
    dpre.resize(cap, "entries");
    u.resize(cap, "entries");
    start.resize(size_t(D + 1), "latent offsets");
    dead.resize(size_t(D), "dead mask");
    dead_list.resize(size_t(D), "dead list");
    aux_pos.resize(size_t(D), "aux positions");
    dead_counts.resize(kMaxLevels, "dead counts");
    n_dead_dev.resize(1, "dead count");
    dead_after.resize(1, "dead count");
    report.resize(1, "report");
    size_t t1 = 0, t2 = 0;
    SAE_CUDA(cub::DeviceRadixSort::SortPairs(nullptr, t1, keys.data(), keys_sorted.data(),
                                             ids.data(), ids_sorted.data(), int64_t(cap), 0, 32,
                                             ctx.stream()));
    SAE_CUDA(cub::DeviceSelect::Flagged(nullptr, t2, thrust::counting_iterator<int32_t>(0),
                                        dead.data(), dead_list.data(), n_dead_dev.data(), D,
                                        ctx.stream()));
    cub_temp.resize(std::max(t1, t2), "sort scratch");
    SAE_CUDA(cudaMallocHost(reinterpret_cast<void**>(&pinned_x), size_t(B * d) * sizeof(float)));
    SAE_CUDA(cudaMallocHost(reinterpret_cast<void**>(&pinned_report), sizeof(Report)));
    SAE_CUDA(cudaMallocHost(reinterpret_cast<void**>(&pinned_counts), kMaxLevels * sizeof(int)));
    SAE_CUDA(cudaEventCreateWithFlags(&counts_ready, cudaEventDisableTiming));
    for (auto& e : ev) SAE_CUDA(cudaEventCreate(&e));
  }

  ~Impl() {
    cudaStreamSynchronize(ctx.stream());
    if (pinned_x) cudaFreeHost(pinned_x);
    if (pinned_report) cudaFreeHost(pinned_report);
    if (pinned_counts) cudaFreeHost(pinned_counts);
    if (counts_ready) cudaEventDestroy(counts_ready);
    for (auto& e : ev)
      if (e) cudaEventDestroy(e);
  }

  cudaStream_t s() const { return ctx.stream(); }
  // float4 columns per thread for the vectorised kernels (0: use the scalar ones), and the
  // block size that covers d_in / 4 with them.
  int vec_width() const {
    if (d % 4 != 0 || d > 4 * 4 * kThreads) return 0;
    return int((d / 4 + kThreads - 1) / kThreads);
  }
  unsigned vec_threads(int V) const {
    const int64_t t = (d / 4 + V - 1) / V;
    return unsigned((t + 31) / 32 * 32);
  }
  void mark(int i) {
    if (timing) SAE_CUDA(cudaEventRecord(ev[i], s()));
  }

  // Dead mask -> ordered dead list, per-group counts to the host (read after the GEMM is queued).
  void prepare_dead(bool from_counters, int64_t window) {
    if (from_counters) {
      k_dead<<<blocks_for(D), kThreads, 0, s()>>>(since.data(), D, window, dead.data());
      SAE_CUDA_LAUNCHED();
    }
    SAE_CUDA(cudaMemsetAsync(dead_counts.data(), 0, kMaxLevels * sizeof(int), s()));
    if (n_groups > 0) {
      k_dead_counts<<<blocks_for(D), kThreads, 0, s()>>>(dead.data(), D, ls, sp.per_level_aux,
                                                         dead_counts.data());
      SAE_CUDA_LAUNCHED();
    }
    SAE_CUDA(cudaMemcpyAsync(pinned_counts, dead_counts.data(), kMaxLevels * sizeof(int),
                             cudaMemcpyDeviceToHost, s()));
    SAE_CUDA(cudaEventRecord(counts_ready, s()));
  }

  // The forward and backward pass on x (already scaled): gradients into g*, their squared norm
  // into norm_sq, each AuxK group's size into last_group_n.
  void forward_backward() {
    const cudaStream_t st = s();
    const float* inv_norms = nullptr;
    // sae_in and the encoder GEMM
    k_sae_in<<<blocks_for(B * d), kThreads, 0, st>>>(
        x.data(), b_dec.data(), sp.apply_b_dec_to_input, B * d, d, sae_in.data());
    SAE_CUDA_LAUNCHED();
    mark(1);
    if (prec == cuda::Precision::Bf16) {
      cuda::to_bf16(ctx, sae_in.data(), sae_in_bf16.data(), B * d);
      cuda::gemm(ctx, ops::Trans::No, ops::Trans::Yes, B, D, d, 1.0f, {sae_in_bf16.data(), true, d},
                 {W_encT_bf16.data(), true, d}, 0.0f, hidden_pre.data(), D, prec);
    } else {
      cuda::gemm(ctx, ops::Trans::No, ops::Trans::Yes, B, D, d, 1.0f, {sae_in.data(), false, d},
                 {W_encT.data(), false, d}, 0.0f, hidden_pre.data(), D, prec);
    }
    mark(2);
    if (sp.rescale_acts_by_decoder_norm) {
      k_row_norms<<<unsigned(D), kThreads, 0, st>>>(W_dec.data(), D, d, norms2.data());
      SAE_CUDA_LAUNCHED();
      inv_norms = norms2.data();
    }
    // The dead counts decide whether AuxK runs (and needs hidden_pre written back).
    SAE_CUDA(cudaEventSynchronize(counts_ready));
    std::vector<int64_t> group_n(static_cast<size_t>(n_groups));
    int64_t n_dead = 0;
    for (int64_t a = 0; a < n_groups; ++a)
      group_n[size_t(a)] = pinned_counts[a], n_dead += group_n[size_t(a)];
    const bool aux = n_dead > 0;
    cuda::batch_topk(ctx, hidden_pre.data(), B, D, budget, b_enc.data(),
                     inv_norms ? inv_norms + D : nullptr, aux, active, topk_ws,
                     min_selected.data());
    mark(3);
    // levels
    const int n_aux_slots = aux ? int(n_groups) : 0;
    const int V = vec_width();
#define SAE_LEVELS_ARGS                                                                       \
  x.data(), W_dec.data(), b_dec.data(), active.offsets.data(), active.cols.data(),            \
      active.values.data(), inv_norms, ls, d, int(n_vec), n_aux_slots, sp.per_level_aux,      \
      1.0 / double(B), vecs.data(), R_tok.data(), ss_outer.data(), token.data(), dpre.data(), \
      u.data()
    if (V == 0)
      k_levels<<<unsigned(B), kThreads, size_t(d) * sizeof(float), st>>>(SAE_LEVELS_ARGS);
    else if (V == 1)
      k_levels4<1><<<unsigned(B), vec_threads(V), 0, st>>>(SAE_LEVELS_ARGS);
    else if (V == 2)
      k_levels4<2><<<unsigned(B), vec_threads(V), 0, st>>>(SAE_LEVELS_ARGS);
    else if (V == 3)
      k_levels4<3><<<unsigned(B), vec_threads(V), 0, st>>>(SAE_LEVELS_ARGS);
    else
      k_levels4<4><<<unsigned(B), vec_threads(V), 0, st>>>(SAE_LEVELS_ARGS);
#undef SAE_LEVELS_ARGS
    SAE_CUDA_LAUNCHED();
    k_reduce_losses<<<1, 1024, 0, st>>>(R_tok.data(), ss_outer.data(), B, int(L), losses.data());
    SAE_CUDA_LAUNCHED();
    mark(4);
    // latent-major order of the entries for the gradient rows
    const int64_t cap = std::max<int64_t>(budget, 1);
    k_sort_keys<<<blocks_for(cap), kThreads, 0, st>>>(active.offsets.data(), B, active.cols.data(),
                                                      cap, int32_t(D), keys.data(), ids.data());
    SAE_CUDA_LAUNCHED();
    int end_bit = 1;
    while ((int64_t(1) << end_bit) <= D) ++end_bit;
    size_t temp = cub_temp.size();
    SAE_CUDA(cub::DeviceRadixSort::SortPairs(cub_temp.data(), temp, keys.data(), keys_sorted.data(),
                                             ids.data(), ids_sorted.data(), cap, 0, end_bit, st));
    k_latent_start<<<blocks_for(D + 1), kThreads, 0, st>>>(keys_sorted.data(), cap, D,
                                                           start.data());
    SAE_CUDA_LAUNCHED();
    mark(5);
    // AuxK, dense over each group's dead latents
    SAE_CUDA(cudaMemsetAsync(aux_loss.data(), 0, aux_loss.bytes(), st));
    if (aux) run_aux(group_n, n_dead, inv_norms);
    mark(6);
    // gradient rows, b_dec, norm
#define SAE_ROWS_ARGS                                                                              \
  start.data(), ids_sorted.data(), token.data(), u.data(), dpre.data(), vecs.data(), int(n_vec),   \
      sae_in.data(), d, ls, aux ? aux_pos.data() : nullptr, gwd.data(), gwe.data(), gb_aux.data(), \
      gW_dec.data(), gW_encT.data(), gb_enc.data(), norm_part.data()
    if (V == 0)
      k_grad_rows<<<unsigned(D), kThreads, 0, st>>>(SAE_ROWS_ARGS);
    else if (V == 1)
      k_grad_rows4<1><<<unsigned(D), vec_threads(V), 0, st>>>(SAE_ROWS_ARGS);
    else if (V == 2)
      k_grad_rows4<2><<<unsigned(D), vec_threads(V), 0, st>>>(SAE_ROWS_ARGS);
    else if (V == 3)
      k_grad_rows4<3><<<unsigned(D), vec_threads(V), 0, st>>>(SAE_ROWS_ARGS);
    else
      k_grad_rows4<4><<<unsigned(D), vec_threads(V), 0, st>>>(SAE_ROWS_ARGS);
#undef SAE_ROWS_ARGS
    SAE_CUDA_LAUNCHED();
    const int64_t chunk = 64;
    k_bdec_partial<<<dim3(unsigned((d + kThreads - 1) / kThreads),
                          unsigned((B + chunk - 1) / chunk)),
                     kThreads, 0, st>>>(vecs.data(), int(n_vec), B, d, chunk, bdec_acc.data());
    SAE_CUDA_LAUNCHED();
    // Through sae_in = x - b_dec: -sum_t d(sae_in)[t] = -W_enc (sum_t d(pre)[t]) = -W_enc db_enc,
    // one GEMV instead of a [B, d_in] d(sae_in) (AuxK's part included, as db_enc holds it).
    if (sp.apply_b_dec_to_input) {
      const float one = 1.0f, zero = 0.0f;
      SAE_CUBLAS(cublasSgemv(ctx.blas(), CUBLAS_OP_N, int(d), int(D), &one, W_encT.data(), int(d),
                             gb_enc.data(), 1, &zero, wenc_db.data(), 1));
    }
    k_bdec_final<<<1, 1024, 0, st>>>(bdec_acc.data(), int((B + chunk - 1) / chunk),
                                     sp.apply_b_dec_to_input ? wenc_db.data() : nullptr, d,
                                     gb_dec.data(), norm_part.data() + D);
    SAE_CUDA_LAUNCHED();
    k_norm_reduce<<<1, 1024, 0, st>>>(norm_part.data(), D + 1, norm_sq.data());
    SAE_CUDA_LAUNCHED();
    mark(7);
    last_group_n = group_n;
  }
  std::vector<int64_t> last_group_n;

  void run_aux(const std::vector<int64_t>& group_n, int64_t n_dead, const float* inv_norms) {
    const cudaStream_t st = s();
    size_t temp = cub_temp.size();
    SAE_CUDA(cub::DeviceSelect::Flagged(cub_temp.data(), temp,
                                        thrust::counting_iterator<int32_t>(0), dead.data(),
                                        dead_list.data(), n_dead_dev.data(), D, st));
    SAE_CUDA(cudaMemsetAsync(aux_pos.data(), 0xFF, aux_pos.bytes(), st));  // -1
    k_aux_pos<<<blocks_for(D), kThreads, 0, st>>>(dead_list.data(), n_dead_dev.data(),
                                                  aux_pos.data());
    SAE_CUDA_LAUNCHED();
    gwd.resize(size_t(n_dead * d), "AuxK gradients");
    gwe.resize(size_t(n_dead * d), "AuxK gradients");
    gb_aux.resize(size_t(n_dead), "AuxK gradients");
    // Fp32 or tf32 for AuxK's GEMMs (bf16 would need converted copies of every operand).
    const cuda::Precision aux_prec =
        prec == cuda::Precision::Fp32 ? cuda::Precision::Fp32 : cuda::Precision::Tf32;
    const int64_t k_aux_max = d / 2;
    int64_t g0 = 0;
    for (int64_t a = 0; a < n_groups; ++a) {
      const int64_t n_g = group_n[size_t(a)];
      if (n_g == 0) continue;
      const int32_t* list = dead_list.data() + g0;
      const int64_t k_aux = std::min(k_aux_max, n_g);
      const double scale = std::min(double(n_g) / double(k_aux_max), 1.0);
      const double w = sp.aux_coefficient * scale / double(B);
      const int slot = int(L + a);
      hp_g.resize(size_t(B * n_g), "AuxK pre-activations");
      aux_acts.resize(size_t(B * n_g), "AuxK codes");
      aux_dpre.resize(size_t(B * n_g), "AuxK gradients");
      aux_sel.resize(size_t(B * n_g), "AuxK mask");
      top_i.resize(size_t(B * k_aux), "AuxK top-k");
      top_v.resize(size_t(B * k_aux), "AuxK top-k");
      wd.resize(size_t(n_g * d), "AuxK rows");
      recon.resize(size_t(B * d), "AuxK reconstruction");
      h.resize(size_t(B * d), "AuxK gradient");
      k_gather_cols<<<blocks_for(B * n_g), kThreads, 0, st>>>(hidden_pre.data(), B, D, list, n_g,
                                                              hp_g.data());
      SAE_CUDA_LAUNCHED();
      cuda::topk_rows(ctx, hp_g.data(), B, n_g, k_aux, top_i.data(), top_v.data());
      SAE_CUDA(cudaMemsetAsync(aux_acts.data(), 0, size_t(B * n_g) * sizeof(float), st));
      SAE_CUDA(cudaMemsetAsync(aux_sel.data(), 0, size_t(B * n_g), st));
      k_aux_scatter<<<blocks_for(B * k_aux), kThreads, 0, st>>>(top_i.data(), top_v.data(), B,
                                                                k_aux, n_g, list, inv_norms,
                                                                aux_acts.data(), aux_sel.data());
      SAE_CUDA_LAUNCHED();
      k_gather_rows<<<blocks_for(n_g * d), kThreads, 0, st>>>(W_dec.data(), list, n_g, d,
                                                              wd.data());
      SAE_CUDA_LAUNCHED();
      using ops::Trans;
      cuda::gemm(ctx, Trans::No, Trans::No, B, d, n_g, 1.0f, {aux_acts.data(), false, n_g},
                 {wd.data(), false, d}, 0.0f, recon.data(), d, aux_prec);
      k_aux_h<<<blocks_for(B * d), kThreads, 0, st>>>(recon.data(), vecs.data(), int(n_vec), slot,
                                                      B, d, w, h.data(), aux_loss.data() + a);
      SAE_CUDA_LAUNCHED();
      cuda::gemm(ctx, Trans::No, Trans::Yes, B, n_g, d, 1.0f, {h.data(), false, d},
                 {wd.data(), false, d}, 0.0f, aux_dpre.data(), n_g, aux_prec);
      k_mask<<<blocks_for(B * n_g), kThreads, 0, st>>>(aux_dpre.data(), aux_sel.data(), B * n_g);
      SAE_CUDA_LAUNCHED();
      cuda::gemm(ctx, Trans::Yes, Trans::No, n_g, d, B, 1.0f, {aux_acts.data(), false, n_g},
                 {h.data(), false, d}, 0.0f, gwd.data() + g0 * d, d, aux_prec);
      cuda::gemm(ctx, Trans::Yes, Trans::No, n_g, d, B, 1.0f, {aux_dpre.data(), false, n_g},
                 {sae_in.data(), false, d}, 0.0f, gwe.data() + g0 * d, d, aux_prec);
      k_col_sums<<<blocks_for(n_g), kThreads, 0, st>>>(aux_dpre.data(), B, n_g, gb_aux.data() + g0);
      SAE_CUDA_LAUNCHED();
      g0 += n_g;
    }
  }

  StepResult result_from(const Report& r, const std::vector<int64_t>& group_n) const {
    StepResult res;
    res.level_loss.assign(size_t(L), 0.0);
    for (int64_t i = 0; i < L; ++i) {
      res.level_loss[size_t(i)] = r.level[i] / double(B);
      res.loss += sp.level_weight[size_t(i)] * res.level_loss[size_t(i)];
    }
    res.outer_sq_error = r.outer_ss / double(B);
    const int64_t k_aux_max = d / 2;
    for (size_t a = 0; a < group_n.size(); ++a) {
      if (group_n[a] == 0) continue;
      const double scale = std::min(double(group_n[a]) / double(k_aux_max), 1.0);
      res.aux_loss += sp.aux_coefficient * scale * r.aux[a] / double(B);
      res.n_dead += group_n[a];
    }
    res.loss += res.aux_loss;
    res.n_active = r.n_active;
    res.min_selected = r.min_selected;
    return res;
  }

  void fetch_report() {
    k_report<<<1, 1, 0, s()>>>(losses.data(), int(L), aux_loss.data(), int(n_groups),
                               norm_sq.data(), theta.data(), min_selected.data(),
                               active.offsets.data() + B, dead_after.data(), report.data());
    SAE_CUDA_LAUNCHED();
    SAE_CUDA(
        cudaMemcpyAsync(pinned_report, report.data(), sizeof(Report), cudaMemcpyDeviceToHost, s()));
    ctx.sync();
  }
};

DeviceTrainer::DeviceTrainer(const TrainSpec& spec, const AdamConfig& adam, int64_t batch,
                             const std::string& precision,
                             std::shared_ptr<DeviceStepScratch> shared_scratch) {
  require_device(Device::Cuda);
  impl_ = std::make_unique<Impl>(spec, adam, batch, precision, std::move(shared_scratch));
}
DeviceTrainer::~DeviceTrainer() = default;

void DeviceTrainer::upload(const TrainingSae& sae, const Optimizer& opt,
                           const std::vector<int64_t>& since, const std::vector<int64_t>& counts) {
  Impl& m = *impl_;
  const cudaStream_t s = m.s();
  auto up = [&](DeviceBuffer<float>& dst, const std::vector<float>& src) {
    SAE_CHECK(src.size() <= dst.size(), "upload size");
    SAE_CUDA(cudaMemcpyAsync(dst.data(), src.data(), src.size() * 4, cudaMemcpyHostToDevice, s));
  };
  up(m.W_encT, sae.W_encT);
  up(m.W_dec, sae.W_dec);
  up(m.b_enc, sae.b_enc);
  up(m.b_dec, sae.b_dec);
  up(m.v_W_encT, opt.v_W_encT);
  up(m.v_W_dec, opt.v_W_dec);
  up(m.v_b_enc, opt.v_b_enc);
  up(m.v_b_dec, opt.v_b_dec);
  if (opt.has_first_moment()) {
    up(m.m_W_encT, opt.m_W_encT);
    up(m.m_W_dec, opt.m_W_dec);
    up(m.m_b_enc, opt.m_b_enc);
    up(m.m_b_dec, opt.m_b_dec);
  }
  SAE_CUDA(
      cudaMemcpyAsync(m.theta.data(), &sae.threshold, sizeof(double), cudaMemcpyHostToDevice, s));
  std::vector<int64_t> zeros(size_t(m.D), 0);
  const auto& sv = since.empty() ? zeros : since;
  const auto& cv = counts.empty() ? zeros : counts;
  SAE_CUDA(cudaMemcpyAsync(m.since.data(), sv.data(), size_t(m.D) * 8, cudaMemcpyHostToDevice, s));
  SAE_CUDA(cudaMemcpyAsync(m.counts.data(), cv.data(), size_t(m.D) * 8, cudaMemcpyHostToDevice, s));
  if (m.prec == cuda::Precision::Bf16)
    cuda::to_bf16(m.ctx, m.W_encT.data(), m.W_encT_bf16.data(), m.D * m.d);
  m.ctx.sync();
}

void DeviceTrainer::download(TrainingSae& sae, Optimizer* opt, std::vector<int64_t>* since,
                             std::vector<int64_t>* counts) const {
  Impl& m = *impl_;
  const cudaStream_t s = m.s();
  auto down = [&](std::vector<float>& dst, const DeviceBuffer<float>& src, size_t n) {
    dst.resize(n);
    SAE_CUDA(cudaMemcpyAsync(dst.data(), src.data(), n * 4, cudaMemcpyDeviceToHost, s));
  };
  const size_t Dd = size_t(m.D * m.d);
  down(sae.W_encT, m.W_encT, Dd);
  down(sae.W_dec, m.W_dec, Dd);
  down(sae.b_enc, m.b_enc, size_t(m.D));
  down(sae.b_dec, m.b_dec, size_t(m.d));
  SAE_CUDA(
      cudaMemcpyAsync(&sae.threshold, m.theta.data(), sizeof(double), cudaMemcpyDeviceToHost, s));
  if (opt) {
    down(opt->v_W_encT, m.v_W_encT, Dd);
    down(opt->v_W_dec, m.v_W_dec, Dd);
    down(opt->v_b_enc, m.v_b_enc, size_t(m.D));
    down(opt->v_b_dec, m.v_b_dec, size_t(m.d));
    if (opt->has_first_moment()) {
      down(opt->m_W_encT, m.m_W_encT, Dd);
      down(opt->m_W_dec, m.m_W_dec, Dd);
      down(opt->m_b_enc, m.m_b_enc, size_t(m.D));
      down(opt->m_b_dec, m.m_b_dec, size_t(m.d));
    }
  }
  if (since) {
    since->resize(size_t(m.D));
    SAE_CUDA(
        cudaMemcpyAsync(since->data(), m.since.data(), size_t(m.D) * 8, cudaMemcpyDeviceToHost, s));
  }
  if (counts) {
    counts->resize(size_t(m.D));
    SAE_CUDA(cudaMemcpyAsync(counts->data(), m.counts.data(), size_t(m.D) * 8,
                             cudaMemcpyDeviceToHost, s));
  }
  m.ctx.sync();
}

float* DeviceTrainer::host_batch() {
  return impl_->pinned_x;
}

void DeviceTrainer::set_device_batch(const float* device_x) {
  impl_->device_x = device_x;
}

std::unique_ptr<DeviceSae> DeviceTrainer::inference_sae(double input_scale, bool fold_decoder_norms,
                                                        const SaeConfig& cfg) const {
  Impl& m = *impl_;
  const cudaStream_t st = m.s();
  const bool fold = m.sp.rescale_acts_by_decoder_norm || fold_decoder_norms;
  DeviceBuffer<float> norms, W_enc, W_dec, b_enc, b_dec, thr;
  if (fold) {  // [inverses | norms], as the step's kernel writes them
    norms.resize(size_t(2 * m.D), "decoder norms");
    k_row_norms<<<unsigned(m.D), kThreads, 0, st>>>(m.W_dec.data(), m.D, m.d, norms.data());
    SAE_CUDA_LAUNCHED();
  }
  const float* n = fold ? norms.data() + m.D : nullptr;
  W_enc.resize(size_t(m.d * m.D), "inference W_enc");
  W_dec.resize(size_t(m.D * m.d), "inference W_dec");
  b_enc.resize(size_t(m.D), "inference b_enc");
  b_dec.resize(size_t(m.d), "inference b_dec");
  thr.resize(size_t(m.D), "inference threshold");
  k_inference_encoder<<<dim3(unsigned((m.D + 31) / 32), unsigned((m.d + 31) / 32)), dim3(32, 8), 0,
                        st>>>(m.W_encT.data(), m.D, m.d, input_scale, n, W_enc.data());
  SAE_CUDA_LAUNCHED();
  k_inference_rest<<<blocks_for(m.D * m.d), kThreads, 0, st>>>(
      m.W_dec.data(), m.b_enc.data(), m.b_dec.data(), m.theta.data(), m.D, m.d, input_scale, n,
      m.sp.rescale_acts_by_decoder_norm, W_dec.data(), b_enc.data(), b_dec.data(), thr.data());
  SAE_CUDA_LAUNCHED();
  m.ctx.sync();
  auto sae = std::make_unique<DeviceSae>(
      cfg, DeviceSaeWeights{W_enc.data(), W_dec.data(), b_enc.data(), b_dec.data(), thr.data()},
      "fp32");
  return sae;  // (its own copies made and synchronized: these buffers go now)
}

double DeviceTrainer::batch_sq_deviation() {
  Impl& m = *impl_;
  constexpr int64_t kRows = 64;
  const int64_t n_chunks = (m.B + kRows - 1) / kRows;
  DeviceBuffer<double>& part = m.scratch->col_moments;
  part.resize(size_t(n_chunks * m.d * 2 + 1), "batch moments");
  k_col_moments<<<dim3(unsigned((m.d + kThreads - 1) / kThreads), unsigned(n_chunks)), kThreads, 0,
                  m.s()>>>(m.x.data(), m.B, m.d, kRows, part.data());
  SAE_CUDA_LAUNCHED();
  double* out = part.data() + n_chunks * m.d * 2;
  k_sq_deviation<<<1, 1024, 0, m.s()>>>(part.data(), n_chunks, m.B, m.d, out);
  SAE_CUDA_LAUNCHED();
  return cuda::download(out, 1, m.s())[0];
}

DeviceTrainer::StepScalars DeviceTrainer::step(double input_scale, double lr, int64_t adam_step,
                                               int64_t dead_window, bool new_window) {
  Impl& m = *impl_;
  const cudaStream_t s = m.s();
  m.mark(0);
  if (m.device_x)  // a batch at a device address (the release's store; mapped host rows too)
    SAE_CUDA(cudaMemcpyAsync(m.x.data(), m.device_x, size_t(m.B * m.d) * 4, cudaMemcpyDefault, s));
  else
    SAE_CUDA(
        cudaMemcpyAsync(m.x.data(), m.pinned_x, size_t(m.B * m.d) * 4, cudaMemcpyHostToDevice, s));
  m.device_x = nullptr;
  m.prepare_dead(true, dead_window);
  if (input_scale != 1.0) {
    k_scale<<<blocks_for(m.B * m.d), kThreads, 0, s>>>(m.x.data(), m.B * m.d, float(input_scale));
    SAE_CUDA_LAUNCHED();
  }
  m.forward_backward();
  // counters and threshold (from this step's selection), then clip + Adam
  SAE_CUDA(cudaMemsetAsync(m.dead_after.data(), 0, sizeof(unsigned long long), s));
  k_counters<<<blocks_for(m.D), kThreads, 0, s>>>(m.start.data(), m.D, dead_window, new_window,
                                                  m.since.data(), m.counts.data(),
                                                  m.dead_after.data());
  SAE_CUDA_LAUNCHED();
  k_threshold<<<1, 1, 0, s>>>(m.theta.data(), m.sp.topk_threshold_lr, m.min_selected.data(),
                              m.active.offsets.data() + m.B);
  SAE_CUDA_LAUNCHED();
  const ops::AdamStep a{float(lr), float(m.adam.beta1), float(m.adam.beta2), float(m.adam.eps),
                        adam_step};
  const bool mom = m.adam.beta1 != 0.0;
  const double clip = m.adam.grad_clip;
  const int64_t Dd = m.D * m.d;
  cuda::adam_update(m.ctx, m.W_encT.data(), m.gW_encT.data(), mom ? m.m_W_encT.data() : nullptr,
                    m.v_W_encT.data(), Dd, a, m.norm_sq.data(), clip,
                    m.prec == cuda::Precision::Bf16 ? m.W_encT_bf16.data() : nullptr);
  cuda::adam_update(m.ctx, m.W_dec.data(), m.gW_dec.data(), mom ? m.m_W_dec.data() : nullptr,
                    m.v_W_dec.data(), Dd, a, m.norm_sq.data(), clip);
  cuda::adam_update(m.ctx, m.b_enc.data(), m.gb_enc.data(), mom ? m.m_b_enc.data() : nullptr,
                    m.v_b_enc.data(), m.D, a, m.norm_sq.data(), clip);
  cuda::adam_update(m.ctx, m.b_dec.data(), m.gb_dec.data(), mom ? m.m_b_dec.data() : nullptr,
                    m.v_b_dec.data(), m.d, a, m.norm_sq.data(), clip);
  // Timing events: 0 start, 1 batch in and sae_in, 2 encoder GEMM, 3 BatchTopK, 4 levels,
  // 5 per-entry backward and sort, 6 AuxK, 7 gradient rows, 8 counters and clip + Adam.
  m.mark(8);
  m.fetch_report();
  StepScalars out;
  out.result = m.result_from(*m.pinned_report, m.last_group_n);
  out.grad_norm = std::sqrt(m.pinned_report->norm_sq);
  out.threshold = m.pinned_report->threshold;
  out.dead_after = int64_t(m.pinned_report->dead_after);
  if (m.timing) {
    float ms[8] = {};
    for (int i = 0; i < 8; ++i) SAE_CUDA(cudaEventElapsedTime(&ms[i], m.ev[i], m.ev[i + 1]));
    m.times.upload += ms[0];
    m.times.encoder_gemm += ms[1];
    m.times.select += ms[2];
    m.times.levels += ms[3];
    m.times.backward += ms[4] + ms[6];
    m.times.aux += ms[5];
    m.times.optimizer += ms[7];
    m.times.steps++;
  }
  return out;
}

StepResult DeviceTrainer::forward_backward(const float* x, const std::vector<uint8_t>& dead,
                                           Grads& g) {
  Impl& m = *impl_;
  const cudaStream_t s = m.s();
  SAE_CUDA(cudaMemcpyAsync(m.x.data(), x, size_t(m.B * m.d) * 4, cudaMemcpyHostToDevice, s));
  if (dead.empty())
    SAE_CUDA(cudaMemsetAsync(m.dead.data(), 0, size_t(m.D), s));
  else
    SAE_CUDA(cudaMemcpyAsync(m.dead.data(), dead.data(), size_t(m.D), cudaMemcpyHostToDevice, s));
  m.prepare_dead(false, 0);
  m.forward_backward();
  m.fetch_report();
  StepResult r = m.result_from(*m.pinned_report, m.last_group_n);
  const size_t Dd = size_t(m.D * m.d);
  g.resize(m.d, m.D);
  SAE_CUDA(cudaMemcpyAsync(g.W_encT.data(), m.gW_encT.data(), Dd * 4, cudaMemcpyDeviceToHost, s));
  SAE_CUDA(cudaMemcpyAsync(g.W_dec.data(), m.gW_dec.data(), Dd * 4, cudaMemcpyDeviceToHost, s));
  SAE_CUDA(
      cudaMemcpyAsync(g.b_enc.data(), m.gb_enc.data(), size_t(m.D) * 4, cudaMemcpyDeviceToHost, s));
  SAE_CUDA(
      cudaMemcpyAsync(g.b_dec.data(), m.gb_dec.data(), size_t(m.d) * 4, cudaMemcpyDeviceToHost, s));
  std::vector<int64_t> start(size_t(m.D + 1));
  SAE_CUDA(
      cudaMemcpyAsync(start.data(), m.start.data(), start.size() * 8, cudaMemcpyDeviceToHost, s));
  m.ctx.sync();
  r.fired.assign(size_t(m.D), 0);
  for (int64_t j = 0; j < m.D; ++j) r.fired[size_t(j)] = start[size_t(j + 1)] > start[size_t(j)];
  for (int64_t j = 0; j < m.D; ++j) {
    bool any = false;
    for (int64_t c = 0; c < m.d && !any; ++c)
      any = g.W_dec[size_t(j * m.d + c)] != 0.0f || g.W_encT[size_t(j * m.d + c)] != 0.0f;
    if (any) g.row_touched[size_t(j)] = 1, g.touched.push_back(int32_t(j));
  }
  return r;
}

void DeviceTrainer::enable_timing(bool on) {
  impl_->timing = on;
}
const DeviceStepTimes& DeviceTrainer::times() const {
  return impl_->times;
}
void DeviceTrainer::reset_times() {
  impl_->times = {};
}

size_t DeviceTrainer::device_bytes() const {
  const cuda::MemoryInfo mi = cuda::memory_info();
  return mi.total - mi.free;
}

}  // namespace sae::train

#include "ops/attention.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "core/threads.h"
#include "ops/cpu_kernels.h"
#include "ops/gemm.h"

namespace sae::ops {

namespace {
// First key query i may see.
int64_t first_key(int64_t i, int64_t window) {
  return window > 0 ? std::max<int64_t>(0, i - window + 1) : 0;
}
}  // namespace

void attention_causal(const float* q, const float* k, const float* v, float* out,
                      const AttentionShape& s) {
  const int64_t T = s.tokens, H = s.heads, KV = s.kv_heads, hd = s.head_dim;
  const int64_t group = H / KV;
  // 128 queries at a time: the score block stays in cache-sized pieces and the causal upper
  // triangle wastes at most one block's worth of work per row of blocks. The (head, block)
  // pairs are independent: one parallel region over all of them, each pair's two GEMMs
  // single-threaded inside it (one region per call rather than one per block).
  const int64_t block = 128, n_blocks = (T + block - 1) / block;
  double work_ns = 0;  // for sizing the team: two GEMMs plus the soft-capped softmax per score
  for (int64_t i0 = 0; i0 < T; i0 += block)
    work_ns += double(std::min(T, i0 + block) - i0) *
               double(std::min(T, i0 + block) - first_key(i0, s.window)) *
               (2.0 * double(hd) * 0.03 + 15.0);
  const CpuKernels& kernels = cpu_kernels();
#pragma omp parallel num_threads(threads_for(double(H) * work_ns, 1.0))
  {
    std::vector<float> p(static_cast<size_t>(std::min(block, T) * T));
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < H * n_blocks; ++task) {
      const int64_t h = task / n_blocks, kvh = h / group;
      const int64_t i0 = (task % n_blocks) * block;
      const int64_t i1 = std::min(T, i0 + block), m = i1 - i0;
      const int64_t j0 = first_key(i0, s.window), n = i1 - j0;
      gemm(Trans::No, Trans::Yes, m, n, hd, s.scale, q + (i0 * H + h) * hd, H * hd,
           k + (j0 * KV + kvh) * hd, KV * hd, 0.0f, p.data(), n);
      for (int64_t r = 0; r < m; ++r) {
        const int64_t i = i0 + r;
        float* row = p.data() + r * n;
        const int64_t lo = first_key(i, s.window) - j0, hi = i - j0;  // visible: [lo, hi]
        if (s.softcap > 0) kernels.soft_cap(row + lo, hi - lo + 1, s.softcap);
        float mx = -INFINITY;
#pragma omp simd reduction(max : mx)
        for (int64_t j = lo; j <= hi; ++j) mx = std::max(mx, row[j]);
        const float inv = 1.0f / kernels.exp_sum(row + lo, hi - lo + 1, mx);
        for (int64_t j = 0; j < lo; ++j) row[j] = 0.0f;
        for (int64_t j = lo; j <= hi; ++j) row[j] *= inv;
        for (int64_t j = hi + 1; j < n; ++j) row[j] = 0.0f;
      }
      gemm(Trans::No, Trans::No, m, hd, n, 1.0f, p.data(), n, v + (j0 * KV + kvh) * hd, KV * hd,
           0.0f, out + (i0 * H + h) * hd, H * hd);
    }
  }
}

void attention_causal_reference(const float* q, const float* k, const float* v, float* out,
                                const AttentionShape& s) {
  const int64_t T = s.tokens, H = s.heads, KV = s.kv_heads, hd = s.head_dim;
  const int64_t group = H / KV;
  std::vector<float> p(static_cast<size_t>(T));
  for (int64_t h = 0; h < H; ++h)
    for (int64_t i = 0; i < T; ++i) {
      const int64_t kvh = h / group;
      const float* qi = q + (i * H + h) * hd;
      const int64_t j0 = first_key(i, s.window);
      float mx = -INFINITY;
      for (int64_t j = j0; j <= i; ++j) {
        const float* kj = k + (j * KV + kvh) * hd;
        float dot = 0.0f;
        for (int64_t c = 0; c < hd; ++c) dot += qi[c] * kj[c];
        float sc = dot * s.scale;
        if (s.softcap > 0) sc = std::tanh(sc / s.softcap) * s.softcap;
        p[size_t(j)] = sc;
        mx = std::max(mx, sc);
      }
      float sum = 0.0f;
      for (int64_t j = j0; j <= i; ++j) sum += (p[size_t(j)] = std::exp(p[size_t(j)] - mx));
      float* o = out + (i * H + h) * hd;
      for (int64_t c = 0; c < hd; ++c) o[c] = 0.0f;
      for (int64_t j = j0; j <= i; ++j) {
        const float w = p[size_t(j)] / sum;
        const float* vj = v + (j * KV + kvh) * hd;
        for (int64_t c = 0; c < hd; ++c) o[c] += w * vj[c];
      }
    }
}

}  // namespace sae::ops

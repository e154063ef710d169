#include "ops/attention.h"

#include <algorithm>
#include <cmath>
#include <vector>

namespace sae::ops {

void attention_causal(const float* q, const float* k, const float* v, float* out,
                      const AttentionShape& s) {
  const int64_t T = s.tokens, H = s.heads, KV = s.kv_heads, hd = s.head_dim;
  const int64_t group = H / KV;
#pragma omp parallel
  {
    std::vector<float> p(static_cast<size_t>(T));
#pragma omp for collapse(2) schedule(static)
    for (int64_t h = 0; h < H; ++h)
      for (int64_t i = 0; i < T; ++i) {
        const int64_t kvh = h / group;
        const float* qi = q + (i * H + h) * hd;
        const int64_t j0 = s.window > 0 ? std::max<int64_t>(0, i - s.window + 1) : 0;
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
}

}  // namespace sae::ops

#include "ops/sparse_decode.h"

#include <cstring>
#include <vector>

#include "core/threads.h"
#include "ops/cpu_kernels.h"

namespace sae::ops {

void sparse_decode(int64_t n_tokens, const int64_t* offsets, const int32_t* indices,
                   const float* values, const float* w, int64_t d, const float* bias, float* out) {
  const double entries = double(offsets[n_tokens] - offsets[0]);
  const CpuKernels& k = cpu_kernels();
#pragma omp parallel for schedule(static) \
    num_threads(threads_for((entries + double(n_tokens)) * double(d), 0.25))
  for (int64_t t = 0; t < n_tokens; ++t) {
    float* o = out + t * d;
    if (bias)
      std::memcpy(o, bias, size_t(d) * sizeof(float));
    else
      std::memset(o, 0, size_t(d) * sizeof(float));
    for (int64_t e = offsets[t]; e < offsets[t + 1]; ++e)
      k.axpy(values[e], w + int64_t(indices[e]) * d, o, d);
  }
}

void sparse_decode_reference(int64_t n_tokens, int64_t n_latents, const int64_t* offsets,
                             const int32_t* indices, const float* values, const float* w, int64_t d,
                             const float* bias, float* out) {
  std::vector<double> dense(static_cast<size_t>(n_latents));
  for (int64_t t = 0; t < n_tokens; ++t) {
    std::fill(dense.begin(), dense.end(), 0.0);
    for (int64_t e = offsets[t]; e < offsets[t + 1]; ++e) dense[size_t(indices[e])] += values[e];
    for (int64_t j = 0; j < d; ++j) {
      double acc = bias ? bias[j] : 0.0;
      for (int64_t i = 0; i < n_latents; ++i) acc += dense[size_t(i)] * w[i * d + j];
      out[t * d + j] = float(acc);
    }
  }
}

}  // namespace sae::ops

#include "ops/gemm_bf16.h"

#include <algorithm>
#include <map>
#include <mutex>
#include <tuple>

#include "core/dtype.h"
#include "core/threads.h"
#include "ops/gemm.h"

#ifdef SAECPP_HAS_DNNL
#include <oneapi/dnnl/dnnl.hpp>
#endif

namespace sae::ops {

void round_to_bf16(const float* x, uint16_t* out, int64_t n) {
#pragma omp parallel for simd schedule(static) num_threads(threads_for(double(n), 0.3))
  for (int64_t i = 0; i < n; ++i) out[i] = f32_to_bf16(x[i]);
}

namespace {

#ifdef SAECPP_HAS_DNNL
// One CPU engine and stream, and a matmul primitive per shape (building one costs far more
// than running it on a forward's shapes). Calls are serialised: one forward at a time uses it.
struct OneDnn {
  dnnl::engine engine{dnnl::engine::kind::cpu, 0};
  dnnl::stream stream{engine};
  struct Matmul {
    dnnl::matmul::primitive_desc pd;
    dnnl::matmul run;
  };
  std::map<std::tuple<int64_t, int64_t, int64_t, int64_t>, Matmul> primitives;
  std::vector<uint16_t> x_bf16;
  std::mutex mu;
  std::string impl;     // the implementation oneDNN picks, e.g. "brg:avx512_core_bf16"
  bool usable = false;  // with bf16 dot products in hardware (not oneDNN's reference loops)

  dnnl::matmul::primitive_desc describe(int64_t m, int64_t n, int64_t k, int64_t ldy) const {
    using dt = dnnl::memory::data_type;
    using tag = dnnl::memory::format_tag;
    const dnnl::memory::desc src({m, k}, dt::bf16, tag::ab);
    const dnnl::memory::desc wei({k, n}, dt::bf16, tag::ba);  // W [n, k] read as W^T
    const dnnl::memory::desc dst({m, n}, dt::f32, dnnl::memory::dims{ldy, 1});
    return dnnl::matmul::primitive_desc(dnnl::matmul::desc(src, wei, dst), engine);
  }

  OneDnn() {
    try {
      impl = describe(64, 256, 256, 256).impl_info_str();
      usable = impl.find("bf16") != std::string::npos || impl.find("amx") != std::string::npos;
    } catch (const dnnl::error& e) {
      impl = std::string("unavailable: ") + e.what();
    }
  }

  const Matmul& primitive(int64_t m, int64_t n, int64_t k, int64_t ldy) {
    const auto key = std::make_tuple(m, n, k, ldy);
    auto it = primitives.find(key);
    if (it != primitives.end()) return it->second;
    if (primitives.size() >= 64) primitives.clear();  // many token counts: keep it bounded
    auto pd = describe(m, n, k, ldy);
    return primitives.emplace(key, Matmul{pd, dnnl::matmul(pd)}).first->second;
  }
};

OneDnn& onednn() {
  static OneDnn d;
  return d;
}
#endif

}  // namespace

std::string bf16_gemm_path() {
#ifdef SAECPP_HAS_DNNL
  if (onednn().usable) return "oneDNN " + onednn().impl;
  return "sgemm on upcast weights (oneDNN: " + onednn().impl + ", no bf16 dot products here)";
#else
  return "sgemm on upcast weights (built without oneDNN)";
#endif
}

void gemm_bf16_weights(int64_t m, int64_t n, int64_t k, const float* x, const uint16_t* w, float* y,
                       int64_t ldy, std::vector<float>& scratch) {
  if (m == 0 || n == 0) return;
#ifdef SAECPP_HAS_DNNL
  OneDnn& d = onednn();
  if (d.usable) {
    std::lock_guard<std::mutex> lock(d.mu);
    d.x_bf16.resize(size_t(m * k));
    round_to_bf16(x, d.x_bf16.data(), m * k);
    const OneDnn::Matmul& mm = d.primitive(m, n, k, ldy);
    dnnl::memory src(mm.pd.src_desc(), d.engine, d.x_bf16.data());
    dnnl::memory wei(mm.pd.weights_desc(), d.engine, const_cast<uint16_t*>(w));
    dnnl::memory dst(mm.pd.dst_desc(), d.engine, y);
    mm.run.execute(d.stream, {{DNNL_ARG_SRC, src}, {DNNL_ARG_WEIGHTS, wei}, {DNNL_ARG_DST, dst}});
    d.stream.wait();
    return;
  }
#endif
  // x rounded to bf16 and back; W upcast (exact) in blocks of rows of at most 64 MB (the tied
  // embedding whole would be 2.2 GiB): sgemm then sums the same products.
  thread_local std::vector<float> x_rounded;
  x_rounded.resize(size_t(m * k));
#pragma omp parallel for simd schedule(static) num_threads(threads_for(double(m * k), 0.3))
  for (int64_t i = 0; i < m * k; ++i) x_rounded[size_t(i)] = bf16_to_f32(f32_to_bf16(x[i]));
  const int64_t block = std::max<int64_t>(1, (int64_t(1) << 24) / k);
  for (int64_t r0 = 0; r0 < n; r0 += block) {
    const int64_t rows = std::min(block, n - r0);
    scratch.resize(size_t(rows * k));
    const uint16_t* wr = w + r0 * k;
#pragma omp parallel for simd schedule(static) num_threads(threads_for(double(rows * k), 0.3))
    for (int64_t i = 0; i < rows * k; ++i) scratch[size_t(i)] = bf16_to_f32(wr[i]);
    gemm(Trans::No, Trans::Yes, m, rows, k, 1.0f, x_rounded.data(), k, scratch.data(), k, 0.0f,
         y + r0, ldy);
  }
}

void gemm_bf16_weights_reference(int64_t m, int64_t n, int64_t k, const float* x, const uint16_t* w,
                                 float* y, int64_t ldy) {
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < n; ++j) {
      double s = 0;
      for (int64_t c = 0; c < k; ++c)
        s += double(bf16_to_f32(f32_to_bf16(x[i * k + c]))) * double(bf16_to_f32(w[j * k + c]));
      y[i * ldy + j] = float(s);
    }
}

}  // namespace sae::ops

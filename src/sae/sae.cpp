#include "sae/sae.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include <omp.h>

#include "core/error.h"
#include "core/finite.h"
#include "core/threads.h"
#include "ops/gemm.h"
#include "ops/select.h"
#include "ops/sparse_decode.h"

namespace sae {

namespace {
// Tokens per encoder GEMM: large enough for BLAS to run near peak (1024-token chunks cost
// ~8% at d_sae 32768), small enough to bound the [chunk, d_sae] buffer at 512 MiB.
int64_t chunk_tokens(int64_t d_sae) {
  return std::clamp<int64_t>((int64_t(512) << 20) / (4 * d_sae), 256, 4096);
}
}  // namespace

Sae::Sae(SaeConfig c, bool allocate) : cfg(std::move(c)) {
  if (!allocate) return;
  const size_t din = size_t(cfg.d_in), dsae = size_t(cfg.d_sae);
  W_enc.assign(din * dsae, 0.0f);
  W_dec.assign(dsae * din, 0.0f);
  b_enc.assign(dsae, 0.0f);
  b_dec.assign(din, 0.0f);
  if (cfg.architecture == Architecture::JumpReLU) threshold.assign(dsae, 0.0f);
}

bool Sae::normalises_at_run_time() const {
  return cfg.normalize_activations == InputNorm::ConstantNormRescale ||
         cfg.normalize_activations == InputNorm::LayerNorm;
}

std::vector<float> Sae::decoder_norms() const {
  const int64_t din = cfg.d_in;
  std::vector<float> norms(static_cast<size_t>(cfg.d_sae));
#pragma omp parallel for schedule(static) \
    num_threads(threads_for(double(cfg.d_sae) * double(din), 1.0))
  for (int64_t i = 0; i < cfg.d_sae; ++i) {
    double s = 0;
    for (int64_t j = 0; j < din; ++j)
      s += double(W_dec[size_t(i * din + j)]) * W_dec[size_t(i * din + j)];
    norms[size_t(i)] = std::max(float(std::sqrt(s)), 1e-8f);
  }
  return norms;
}

void Sae::fold_W_dec_norm() {
  if (cfg.architecture == Architecture::TopK && !cfg.rescale_acts_by_decoder_norm)
    fail(
        "fold_W_dec_norm: folding changes which latents a topk SAE selects unless it was "
        "trained with rescale_acts_by_decoder_norm");
  const auto norms = decoder_norms();
  const int64_t din = cfg.d_in, dsae = cfg.d_sae;
  for (int64_t i = 0; i < dsae; ++i)
    for (int64_t j = 0; j < din; ++j) W_dec[size_t(i * din + j)] /= norms[size_t(i)];
  for (int64_t j = 0; j < din; ++j)
    for (int64_t i = 0; i < dsae; ++i) W_enc[size_t(j * dsae + i)] *= norms[size_t(i)];
  for (int64_t i = 0; i < dsae; ++i) b_enc[size_t(i)] *= norms[size_t(i)];
  if (cfg.architecture == Architecture::JumpReLU)
    for (int64_t i = 0; i < dsae; ++i) threshold[size_t(i)] *= norms[size_t(i)];
  // A topk SAE with unit decoder rows no longer needs the run-time rescale.
  if (cfg.architecture == Architecture::TopK) cfg.rescale_acts_by_decoder_norm = false;
}

void Sae::sae_input(const float* x, int64_t n, float* sae_in, float* out_scale,
                    float* out_shift) const {
  const int64_t din = cfg.d_in;
#pragma omp parallel for schedule(static) num_threads(threads_for(double(n) * double(din), 2.0))
  for (int64_t t = 0; t < n; ++t) {
    const float* xr = x + t * din;
    float* s = sae_in + t * din;
    float mul = 1.0f, add = 0.0f;  // decode undoes the normalisation as x_hat * mul + add
    if (cfg.normalize_activations == InputNorm::ConstantNormRescale) {
      double ss = 0;
      for (int64_t j = 0; j < din; ++j) ss += double(xr[j]) * xr[j];
      const float coeff = float(std::sqrt(double(din)) / std::sqrt(ss));
      for (int64_t j = 0; j < din; ++j) s[j] = xr[j] * coeff;
      mul = 1.0f / coeff;
    } else if (cfg.normalize_activations == InputNorm::LayerNorm) {
      double mean = 0;
      for (int64_t j = 0; j < din; ++j) mean += xr[j];
      mean /= double(din);
      double var = 0;
      for (int64_t j = 0; j < din; ++j) var += (xr[j] - mean) * (xr[j] - mean);
      const double std_unbiased = std::sqrt(var / double(din - 1));  // torch.std default
      const float denom = float(std_unbiased + 1e-5);
      for (int64_t j = 0; j < din; ++j) s[j] = float(xr[j] - mean) / denom;
      mul = float(std_unbiased);  // SAELens undoes with std, not std + eps
      add = float(mean);
    } else {
      std::memcpy(s, xr, size_t(din) * sizeof(float));
    }
    if (cfg.apply_b_dec_to_input)
      for (int64_t j = 0; j < din; ++j) s[j] -= b_dec[size_t(j)];
    if (out_scale) out_scale[t] = mul;
    if (out_shift) out_shift[t] = add;
  }
}

void Sae::pre_activations(const float* x, int64_t n, float* pre, float* out_scale,
                          float* out_shift) const {
  const int64_t din = cfg.d_in, dsae = cfg.d_sae;
  std::vector<float> in(static_cast<size_t>(n * din));
  sae_input(x, n, in.data(), out_scale, out_shift);
  ops::gemm(ops::Trans::No, ops::Trans::No, n, dsae, din, 1.0f, in.data(), din, W_enc.data(), dsae,
            0.0f, pre, dsae);
  std::vector<float> norms;
  const bool rescale = cfg.architecture == Architecture::TopK && cfg.rescale_acts_by_decoder_norm;
  if (rescale) norms = decoder_norms();
#pragma omp parallel for schedule(static) num_threads(threads_for(double(n) * double(dsae), 0.3))
  for (int64_t t = 0; t < n; ++t)
    for (int64_t i = 0; i < dsae; ++i) {
      float& v = pre[t * dsae + i];
      v += b_enc[size_t(i)];
      if (rescale) v *= norms[size_t(i)];
    }
}

namespace {

// Scratch reused across calls so that encoding does not page-fault a fresh
// [chunk, d_sae] buffer every time.
std::vector<float>& scratch(int slot, size_t n) {
  thread_local std::vector<float> buffers[2];
  if (buffers[slot].size() < n) buffers[slot].resize(n);
  return buffers[slot];
}

}  // namespace

void Sae::encode_chunk(const float* x, int64_t n, SparseCodes& out) const {
  const int64_t din = cfg.d_in, dsae = cfg.d_sae;
  float* in = scratch(0, size_t(n * din)).data();
  float* pre = scratch(1, size_t(n * dsae)).data();
  std::vector<float> scale(static_cast<size_t>(n)), shift(static_cast<size_t>(n));
  sae_input(x, n, in, scale.data(), shift.data());
  if (normalises_at_run_time()) {
    out.out_scale.insert(out.out_scale.end(), scale.begin(), scale.end());
    out.out_shift.insert(out.out_shift.end(), shift.begin(), shift.end());
  }
  // The one dense step: pre = sae_in @ W_enc (b_enc is added during selection below).
  ops::gemm(ops::Trans::No, ops::Trans::No, n, dsae, din, 1.0f, in, din, W_enc.data(), dsae, 0.0f,
            pre, dsae);

  const bool topk = cfg.architecture == Architecture::TopK;
  const float* thr = cfg.architecture == Architecture::JumpReLU ? threshold.data() : nullptr;
  std::vector<float> norms;
  if (topk && cfg.rescale_acts_by_decoder_norm) norms = decoder_norms();
  std::vector<int32_t> top_idx;
  std::vector<float> top_val;
  if (topk) {
    top_idx.resize(size_t(n * cfg.k));
    top_val.resize(size_t(n * cfg.k));
#pragma omp parallel for schedule(static) num_threads(threads_for(double(n) * double(dsae), 0.3))
    for (int64_t t = 0; t < n; ++t) {
      float* p = pre + t * dsae;
      for (int64_t i = 0; i < dsae; ++i) p[i] += b_enc[size_t(i)];
      if (!norms.empty())
        for (int64_t i = 0; i < dsae; ++i) p[i] *= norms[size_t(i)];
    }
    ops::topk_rows(pre, n, dsae, cfg.k, top_idx.data(), top_val.data());
  }

  // One pass: each thread collects its (contiguous) rows' active entries locally, then the
  // blocks are copied into place in row order.
  const size_t base_tok = out.offsets.size() - 1;
  std::vector<int64_t> counts(static_cast<size_t>(n));
  const int n_threads = omp_get_max_threads();
  std::vector<std::vector<int32_t>> local_idx(static_cast<size_t>(n_threads));
  std::vector<std::vector<float>> local_val(static_cast<size_t>(n_threads));
  std::vector<int64_t> first_row(static_cast<size_t>(n_threads), n);
#pragma omp parallel num_threads(threads_for(double(n) * double(topk ? cfg.k : dsae), 0.5))
  {
    const int tid = omp_get_thread_num();
    auto& li = local_idx[size_t(tid)];
    auto& lv = local_val[size_t(tid)];
#pragma omp for schedule(static)
    for (int64_t t = 0; t < n; ++t) {
      if (first_row[size_t(tid)] == n) first_row[size_t(tid)] = t;
      const size_t before = li.size();
      if (topk) {
        for (int64_t j = 0; j < cfg.k; ++j) {
          const float v = top_val[size_t(t * cfg.k + j)];
          if (v > 0.0f) li.push_back(top_idx[size_t(t * cfg.k + j)]), lv.push_back(v);
        }
      } else {
        // Active: relu(pre) != 0, and for jumprelu pre > threshold (strict, as SAELens).
        const float* p = pre + t * dsae;
        for (int64_t i = 0; i < dsae; ++i) {
          const float v = p[i] + b_enc[size_t(i)];
          if (v > 0.0f && (!thr || v > thr[i])) li.push_back(int32_t(i)), lv.push_back(v);
        }
      }
      counts[size_t(t)] = int64_t(li.size() - before);
    }
  }
  for (int64_t t = 0; t < n; ++t) out.offsets.push_back(out.offsets.back() + counts[size_t(t)]);
  out.indices.resize(size_t(out.offsets.back()));
  out.values.resize(size_t(out.offsets.back()));
  for (int tid = 0; tid < n_threads; ++tid) {
    if (first_row[size_t(tid)] == n) continue;
    const int64_t e = out.offsets[base_tok + size_t(first_row[size_t(tid)])];
    std::copy(local_idx[size_t(tid)].begin(), local_idx[size_t(tid)].end(),
              out.indices.begin() + e);
    std::copy(local_val[size_t(tid)].begin(), local_val[size_t(tid)].end(), out.values.begin() + e);
  }
}

SparseCodes Sae::encode(std::span<const float> x, int64_t n) const {
  if (int64_t(x.size()) != n * cfg.d_in)
    fail("encode", "x", cat("has ", x.size(), " values, expected ", n, " x d_in ", cfg.d_in));
  check_finite(x, n, cfg.d_in, "activations");
  SparseCodes codes;
  codes.n_tokens = n;
  codes.d_sae = cfg.d_sae;
  codes.offsets.reserve(size_t(n + 1));
  codes.offsets.push_back(0);
  const int64_t chunk = chunk_tokens(cfg.d_sae);
  for (int64_t t0 = 0; t0 < n; t0 += chunk)
    encode_chunk(x.data() + t0 * cfg.d_in, std::min(chunk, n - t0), codes);
  return codes;
}

std::vector<float> Sae::encode_dense(std::span<const float> x, int64_t n) const {
  return encode(x, n).to_dense();
}

std::vector<float> Sae::decode(const SparseCodes& codes) const {
  if (codes.d_sae != cfg.d_sae)
    fail("decode", "codes", cat("have d_sae ", codes.d_sae, ", SAE has ", cfg.d_sae));
  const int64_t n = codes.n_tokens, din = cfg.d_in;
  std::vector<float> out(size_t(n * din));
  const float* values = codes.values.data();
  std::vector<float> rescaled;
  if (cfg.architecture == Architecture::TopK && cfg.rescale_acts_by_decoder_norm) {
    // SAELens decodes acts / ||W_dec[i]|| when the selection was made on acts * ||W_dec[i]||.
    const auto norms = decoder_norms();
    rescaled.resize(codes.values.size());
    for (size_t e = 0; e < rescaled.size(); ++e)
      rescaled[e] = codes.values[e] / norms[size_t(codes.indices[e])];
    values = rescaled.data();
  }
  ops::sparse_decode(n, codes.offsets.data(), codes.indices.data(), values, W_dec.data(), din,
                     b_dec.data(), out.data());
  if (!codes.out_scale.empty()) {
#pragma omp parallel for schedule(static) num_threads(threads_for(double(n) * double(din), 0.3))
    for (int64_t t = 0; t < n; ++t)
      for (int64_t j = 0; j < din; ++j)
        out[size_t(t * din + j)] =
            out[size_t(t * din + j)] * codes.out_scale[size_t(t)] + codes.out_shift[size_t(t)];
  }
  return out;
}

std::vector<float> Sae::forward(std::span<const float> x, int64_t n) const {
  return decode(encode(x, n));
}

}  // namespace sae

#include "sae/sae.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "core/error.h"
#include "ops/gemm.h"
#include "ops/select.h"
#include "ops/sparse_decode.h"

namespace sae {

namespace {
// Tokens per encoder GEMM: bounds the [chunk, d_sae] pre-activation buffer (128 MiB at 32k).
constexpr int64_t kChunkTokens = 1024;
}  // namespace

Sae::Sae(SaeConfig c) : cfg(std::move(c)) {
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

void check_finite(std::span<const float> x, int64_t n, int64_t d, const std::string& where) {
  for (int64_t r = 0; r < n; ++r)
    for (int64_t c = 0; c < d; ++c)
      if (!std::isfinite(x[size_t(r * d + c)]))
        fail(where, cat("row ", r, ", column ", c),
             cat("activation is ", x[size_t(r * d + c)], " (NaN/Inf inputs are rejected)"));
}

std::vector<float> Sae::decoder_norms() const {
  const int64_t din = cfg.d_in;
  std::vector<float> norms(static_cast<size_t>(cfg.d_sae));
#pragma omp parallel for schedule(static)
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

void Sae::pre_activations(const float* x, int64_t n, float* pre, float* out_scale,
                          float* out_shift) const {
  const int64_t din = cfg.d_in, dsae = cfg.d_sae;
  // The SAE input: normalised (run-time modes only) then shifted by b_dec.
  std::vector<float> sae_in(size_t(n * din));
#pragma omp parallel for schedule(static)
  for (int64_t t = 0; t < n; ++t) {
    const float* xr = x + t * din;
    float* s = sae_in.data() + t * din;
    float mul = 1.0f, add = 0.0f;  // sae_in = (x - add) * (1/mul) before the b_dec shift
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
  // pre = sae_in @ W_enc + b_enc
#pragma omp parallel for schedule(static)
  for (int64_t t = 0; t < n; ++t) std::memcpy(pre + t * dsae, b_enc.data(), size_t(dsae) * 4);
  ops::gemm(ops::Trans::No, ops::Trans::No, n, dsae, din, 1.0f, sae_in.data(), din, W_enc.data(),
            dsae, 1.0f, pre, dsae);
  if (cfg.architecture == Architecture::TopK && cfg.rescale_acts_by_decoder_norm) {
    const auto norms = decoder_norms();
#pragma omp parallel for schedule(static)
    for (int64_t t = 0; t < n; ++t)
      for (int64_t i = 0; i < dsae; ++i) pre[t * dsae + i] *= norms[size_t(i)];
  }
}

void Sae::encode_chunk(const float* x, int64_t n, SparseCodes& out) const {
  const int64_t dsae = cfg.d_sae;
  std::vector<float> pre(size_t(n * dsae));
  std::vector<float> scale(static_cast<size_t>(n)), shift(static_cast<size_t>(n));
  pre_activations(x, n, pre.data(), scale.data(), shift.data());
  if (normalises_at_run_time()) {
    out.out_scale.insert(out.out_scale.end(), scale.begin(), scale.end());
    out.out_shift.insert(out.out_shift.end(), shift.begin(), shift.end());
  }

  // Per token: the candidate entries (all latents, or the top k), then keep the active ones.
  std::vector<int64_t> counts(static_cast<size_t>(n));
  std::vector<int32_t> top_idx;
  std::vector<float> top_val;
  const bool topk = cfg.architecture == Architecture::TopK;
  if (topk) {
    top_idx.resize(size_t(n * cfg.k));
    top_val.resize(size_t(n * cfg.k));
    ops::topk_rows(pre.data(), n, dsae, cfg.k, top_idx.data(), top_val.data());
  }
  const float* thr = cfg.architecture == Architecture::JumpReLU ? threshold.data() : nullptr;
  // Active: relu(pre) != 0, and for jumprelu pre > threshold (strict, as SAELens).
  auto active = [&](float v, int64_t i) { return v > 0.0f && (!thr || v > thr[i]); };

#pragma omp parallel for schedule(static)
  for (int64_t t = 0; t < n; ++t) {
    int64_t c = 0;
    if (topk) {
      for (int64_t j = 0; j < cfg.k; ++j) c += top_val[size_t(t * cfg.k + j)] > 0.0f;
    } else {
      const float* p = pre.data() + t * dsae;
      for (int64_t i = 0; i < dsae; ++i) c += active(p[i], i);
    }
    counts[size_t(t)] = c;
  }
  const size_t base_tok = out.offsets.size() - 1;
  for (int64_t t = 0; t < n; ++t) out.offsets.push_back(out.offsets.back() + counts[size_t(t)]);
  out.indices.resize(size_t(out.offsets.back()));
  out.values.resize(size_t(out.offsets.back()));
#pragma omp parallel for schedule(static)
  for (int64_t t = 0; t < n; ++t) {
    int64_t e = out.offsets[base_tok + size_t(t)];
    if (topk) {
      for (int64_t j = 0; j < cfg.k; ++j) {
        const float v = top_val[size_t(t * cfg.k + j)];
        if (v > 0.0f) {
          out.indices[size_t(e)] = top_idx[size_t(t * cfg.k + j)];
          out.values[size_t(e++)] = v;
        }
      }
    } else {
      const float* p = pre.data() + t * dsae;
      for (int64_t i = 0; i < dsae; ++i)
        if (active(p[i], i)) {
          out.indices[size_t(e)] = int32_t(i);
          out.values[size_t(e++)] = p[i];
        }
    }
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
  for (int64_t t0 = 0; t0 < n; t0 += kChunkTokens)
    encode_chunk(x.data() + t0 * cfg.d_in, std::min(kChunkTokens, n - t0), codes);
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
#pragma omp parallel for schedule(static)
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

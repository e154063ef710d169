#include "eval/metrics.h"

#include "sae/device_sae.h"

#include <algorithm>
#include <cmath>

#include "core/error.h"
#include "core/threads.h"
#include "sae/sae.h"

namespace sae {

MetricsAccumulator::MetricsAccumulator(int64_t d_in, int64_t d_sae, double dense_threshold)
    : d_in_(d_in),
      d_sae_(d_sae),
      dense_threshold_(dense_threshold),
      sum_x_(size_t(d_in), 0.0),
      fire_counts_(size_t(d_sae), 0) {}

void MetricsAccumulator::add_batch(std::span<const float> x, std::span<const float> x_hat,
                                   const SparseCodes& codes) {
  const int64_t n = codes.n_tokens, d = d_in_;
  SAE_CHECK(int64_t(x.size()) == n * d && x_hat.size() == x.size(), "metrics batch shapes");
  if (n == 0) return;

  std::vector<double> batch_mean(size_t(d), 0.0);
  for (int64_t t = 0; t < n; ++t)
    for (int64_t j = 0; j < d; ++j) batch_mean[size_t(j)] += x[size_t(t * d + j)];
  for (int64_t j = 0; j < d; ++j) {
    sum_x_[size_t(j)] += batch_mean[size_t(j)];
    batch_mean[size_t(j)] /= double(n);
  }

  double sq_norm = 0, sq_resid = 0, ev_legacy = 0, cos = 0, norm_in = 0, norm_out = 0;
  double ratio = 0, xhat_sq = 0, dot = 0;
#pragma omp parallel for schedule(static) num_threads(threads_for(double(n) * double(d), 2.0)) \
    reduction(+ : sq_norm, sq_resid, ev_legacy, cos, norm_in, norm_out, ratio, xhat_sq, dot)
  for (int64_t t = 0; t < n; ++t) {
    const float* xr = x.data() + t * d;
    const float* yr = x_hat.data() + t * d;
    double xx = 0, yy = 0, xy = 0, rr = 0, vv = 0;
    for (int64_t j = 0; j < d; ++j) {
      const double a = xr[j], b = yr[j];
      xx += a * a;
      yy += b * b;
      xy += a * b;
      rr += (a - b) * (a - b);
      vv += (a - batch_mean[size_t(j)]) * (a - batch_mean[size_t(j)]);
    }
    sq_norm += xx;
    sq_resid += rr;
    ev_legacy += 1.0 - rr / vv;
    cos += xy / (std::sqrt(xx) * std::sqrt(yy));
    const double nin = std::sqrt(xx), nout = std::sqrt(yy);
    norm_in += nin;
    norm_out += nout;
    ratio += nout / (std::abs(nin) < 1e-4 ? 1.0 : nin);
    xhat_sq += yy;
    dot += xy;
  }
  sum_sq_norm_ += sq_norm;
  sum_sq_resid_ += sq_resid;
  sum_ev_legacy_ += ev_legacy;
  sum_cos_ += cos;
  sum_norm_in_ += norm_in;
  sum_norm_out_ += norm_out;
  sum_ratio_ += ratio;
  sum_xhat_sq_ += xhat_sq;
  sum_dot_ += dot;

  for (int64_t t = 0; t < n; ++t)
    for (int64_t e = codes.offsets[size_t(t)]; e < codes.offsets[size_t(t + 1)]; ++e) {
      const float v = codes.values[size_t(e)];
      if (v == 0.0f) continue;
      sum_l0_ += 1;
      sum_l1_ += std::abs(v);
      fire_counts_[size_t(codes.indices[size_t(e)])] += 1;
    }
  n_ += n;
}

Metrics MetricsAccumulator::finish() const {
  Metrics m;
  m.n_tokens = n_;
  m.dense_threshold = dense_threshold_;
  m.log_density_histogram.assign(10, 0);
  if (n_ == 0) return m;
  const double n = double(n_);
  m.l0 = sum_l0_ / n;
  m.l1 = sum_l1_ / n;
  m.mse = sum_sq_resid_ / n;
  double mean_sq = 0;
  for (double s : sum_x_) mean_sq += (s / n) * (s / n);
  const double total_variance = sum_sq_norm_ / n - mean_sq;
  m.explained_variance =
      total_variance < 1e-10 ? (m.mse < 1e-10 ? 1.0 : 0.0) : 1.0 - m.mse / total_variance;
  m.explained_variance_legacy = sum_ev_legacy_ / n;
  m.explained_variance_about_zero = 1.0 - sum_sq_resid_ / sum_sq_norm_;
  m.cossim = sum_cos_ / n;
  m.l2_norm_in = sum_norm_in_ / n;
  m.l2_norm_out = sum_norm_out_ / n;
  m.l2_ratio = sum_ratio_ / n;
  m.relative_reconstruction_bias = sum_xhat_sq_ / sum_dot_;
  m.feature_density.resize(size_t(d_sae_));
  for (int64_t i = 0; i < d_sae_; ++i) {
    const double f = double(fire_counts_[size_t(i)]) / n;
    m.feature_density[size_t(i)] = f;
    if (fire_counts_[size_t(i)] == 0) {
      m.dead_latents++;
      continue;
    }
    if (f > dense_threshold_) m.dense_latents++;
    int bin = int(std::floor(std::log10(f))) + 10;
    m.log_density_histogram[size_t(std::clamp(bin, 0, 9))]++;
  }
  return m;
}

Metrics evaluate_in_batches(const Sae& sae, std::span<const float> x, int64_t n, int64_t batch,
                            double dense_threshold) {
  const int64_t d = sae.cfg.d_in;
  MetricsAccumulator acc(d, sae.cfg.d_sae, dense_threshold);
  for (int64_t t0 = 0; t0 < n; t0 += batch) {
    const int64_t b = std::min(batch, n - t0);
    std::span<const float> xs = x.subspan(size_t(t0 * d), size_t(b * d));
    SparseCodes codes = sae.encode(xs, b);
    acc.add_batch(xs, sae.decode(codes), codes);
  }
  return acc.finish();
}

Metrics evaluate_in_batches(DeviceSae& sae, std::span<const float> x, int64_t n, int64_t batch,
                            double dense_threshold) {
  const int64_t d = sae.cfg().d_in;
  MetricsAccumulator acc(d, sae.cfg().d_sae, dense_threshold);
  std::vector<float> x_hat;
  for (int64_t t0 = 0; t0 < n; t0 += batch) {
    const int64_t b = std::min(batch, n - t0);
    std::span<const float> xs = x.subspan(size_t(t0 * d), size_t(b * d));
    SparseCodes codes = sae.encode_decode(xs, b, x_hat);
    acc.add_batch(xs, x_hat, codes);
  }
  return acc.finish();
}

nlohmann::ordered_json Metrics::to_json(bool with_density) const {
  nlohmann::ordered_json j;
  j["n_tokens"] = n_tokens;
  j["l0"] = l0;
  j["l1"] = l1;
  j["mse"] = mse;
  j["explained_variance"] = explained_variance;
  j["explained_variance_legacy"] = explained_variance_legacy;
  j["explained_variance_about_zero"] = explained_variance_about_zero;
  j["cossim"] = cossim;
  j["l2_norm_in"] = l2_norm_in;
  j["l2_norm_out"] = l2_norm_out;
  j["l2_ratio"] = l2_ratio;
  j["relative_reconstruction_bias"] = relative_reconstruction_bias;
  j["dead_latents"] = dead_latents;
  j["dense_latents"] = dense_latents;
  j["dense_threshold"] = dense_threshold;
  j["log10_density_histogram"] = {{"bin_edges_log10", {-10, -9, -8, -7, -6, -5, -4, -3, -2, -1, 0}},
                                  {"counts", log_density_histogram}};
  if (with_density) j["feature_density"] = feature_density;
  return j;
}

}  // namespace sae

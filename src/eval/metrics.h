// Reconstruction and sparsity metrics over a stream of batches, with SAELens's definitions
// (sae_lens/evals.py, get_sparsity_and_variance_metrics) accumulated in double precision.
#pragma once

#include <cstdint>
#include <nlohmann/json.hpp>
#include <span>
#include <vector>

#include "sae/sparse_codes.h"

namespace sae {

struct Metrics {
  int64_t n_tokens = 0;
  double l0 = 0;   // mean number of non-zero latents per token
  double l1 = 0;   // mean sum |acts| per token
  double mse = 0;  // mean over tokens of sum_d (x - x_hat)^2
  // 1 - sum ||x - x_hat||^2 / sum ||x - mean(x)||^2, mean over the whole set (SAELens >= 6.45).
  double explained_variance = 0;
  // Per token 1 - ||x - x_hat||^2 / ||x - batch_mean||^2, averaged (SAELens "legacy" / SAEBench).
  double explained_variance_legacy = 0;
  // 1 - sum ||x - x_hat||^2 / sum ||x||^2: variance about zero (older SAELens eval form).
  double explained_variance_about_zero = 0;
  double cossim = 0;       // mean cosine(x, x_hat)
  double l2_norm_in = 0;   // mean ||x||
  double l2_norm_out = 0;  // mean ||x_hat||
  double l2_ratio = 0;     // mean ||x_hat|| / ||x|| (||x|| < 1e-4 counts as 1, as SAELens)
  double relative_reconstruction_bias = 0;  // E||x_hat||^2 / E<x, x_hat>
  int64_t dead_latents = 0;                 // never fired on the set
  int64_t dense_latents = 0;                // fired on more than dense_threshold of tokens
  double dense_threshold = 0.1;
  std::vector<double> feature_density;  // per latent: fraction of tokens it fired on
  // Histogram of log10(feature_density) for live latents: bin b counts densities in
  // [10^(b-10), 10^(b-9)), b = 0..9 (the last bin includes 1).
  std::vector<int64_t> log_density_histogram;

  nlohmann::ordered_json to_json(bool with_density = false) const;
};

class MetricsAccumulator {
 public:
  explicit MetricsAccumulator(int64_t d_in, int64_t d_sae, double dense_threshold = 0.1);
  // One batch: x and x_hat are [n, d_in]; codes hold the same n tokens. The legacy explained
  // variance uses this batch's mean, so results depend on how the stream is batched.
  void add_batch(std::span<const float> x, std::span<const float> x_hat, const SparseCodes& codes);
  Metrics finish() const;

 private:
  int64_t d_in_, d_sae_;
  double dense_threshold_;
  int64_t n_ = 0;
  std::vector<double> sum_x_;
  double sum_sq_norm_ = 0, sum_sq_resid_ = 0, sum_l0_ = 0, sum_l1_ = 0, sum_ev_legacy_ = 0;
  double sum_cos_ = 0, sum_norm_in_ = 0, sum_norm_out_ = 0, sum_ratio_ = 0;
  double sum_xhat_sq_ = 0, sum_dot_ = 0;
  std::vector<int64_t> fire_counts_;
};

class Sae;
class DeviceSae;

// Encodes and decodes x [n, d_in] in batches of `batch` tokens and accumulates the metrics
// (the legacy explained variance uses each batch's mean).
Metrics evaluate_in_batches(const Sae& sae, std::span<const float> x, int64_t n, int64_t batch,
                            double dense_threshold = 0.1);
// The same with the encode and decode on the GPU (the metrics are summed on the host).
Metrics evaluate_in_batches(DeviceSae& sae, std::span<const float> x, int64_t n, int64_t batch,
                            double dense_threshold = 0.1);

}  // namespace sae

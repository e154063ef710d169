// A synthetic activation source with known features: near-orthogonal unit directions in d_in
// (more features than dimensions: superposition), Zipf-like firing probabilities, a hierarchy
// in which a parent gates mutually exclusive children, and magnitude noise. Deterministic in
// the seed: the dictionary from the seed, batch b from (seed, b).
#pragma once

#include <cstdint>
#include <nlohmann/json.hpp>
#include <vector>

#include "data/source.h"

namespace sae::data {

struct SyntheticConfig {
  int64_t d_in = 64;
  int64_t n_roots = 32;             // top-level features
  int64_t n_parents = 12;           // the first n_parents roots (most frequent) have children
  int64_t children_per_parent = 3;  // mutually exclusive: at most one fires with its parent
  double max_firing_prob = 0.25;    // root i fires with max_firing_prob / (i + 1)^zipf
  double zipf_exponent = 0.5;
  double child_prob = 0.5;  // P(some child fires | parent fires)
  double magnitude_mean = 1.0, magnitude_std = 0.15;
  double noise_std = 0.01;   // isotropic Gaussian noise added to every token
  double correlation = 0.0;  // P(root i+1 also fires | root i fires), for even i
  int64_t heldout_tokens = 16384;
  uint64_t seed = 0;

  static SyntheticConfig from_json(const nlohmann::json& j, const std::string& where);
  nlohmann::json to_json() const;
};

// True features active on one token: (feature, magnitude).
struct TrueCodes {
  std::vector<int64_t> offsets{0};
  std::vector<int32_t> features;
  std::vector<float> magnitudes;
};

class SyntheticSource final : public ActivationSource {
 public:
  explicit SyntheticSource(SyntheticConfig cfg);

  int64_t d_in() const override { return cfg_.d_in; }
  void train_batch(int64_t index, int64_t batch, float* out) override;
  int64_t heldout_size(int64_t n) const override { return std::min(n, cfg_.heldout_tokens); }
  void heldout(int64_t n, float* out) override;
  std::string describe() const override;

  // Held-out tokens with their true codes (the same tokens heldout() returns).
  void heldout_with_truth(int64_t n, float* out, TrueCodes& truth);

  const SyntheticConfig& config() const { return cfg_; }
  int64_t n_features() const { return int64_t(parent_.size()); }
  const std::vector<float>& features() const { return features_; }  // [n_features, d_in]
  int32_t parent(int64_t f) const { return parent_[size_t(f)]; }    // -1 for roots
  const std::vector<std::vector<int32_t>>& children() const { return children_; }
  double expected_l0() const;  // mean number of true features per token

 private:
  void sample(uint64_t stream, int64_t n, float* out, TrueCodes* truth) const;

  SyntheticConfig cfg_;
  std::vector<float> features_;
  std::vector<int32_t> parent_;
  std::vector<std::vector<int32_t>> children_;  // per feature
  std::vector<double> root_prob_;
};

}  // namespace sae::data

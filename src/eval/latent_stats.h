// Per-latent statistics of an SAE over a stream of tokens, in one pass and bounded memory (the
// data of a feature dashboard): for every latent its firing count, moments and maximum, an
// activation histogram, the top-k activating tokens, samples per activation interval and per
// quantile, and the latents it fires with most often. Tokens are named by a global index that
// the caller keeps the meaning of (the dashboard job logs each token's id and document).
//
// Intervals and the histogram share one grid per latent: equal-width bins over [0, top), where
// top is the smallest power of two above every activation seen; when a larger activation
// arrives, top doubles and adjacent bins merge (counts exactly, interval samples by a weighted
// merge of the two reservoirs). So nothing needs the final maximum in advance, and the
// histogram is exact for its bins. Quantile groups come from one uniform reservoir of the
// latent's firing activations, sorted and cut into equal-count groups at the end.
// Co-firing partners are kept by the Space-Saving algorithm (Metwally et al. 2005): a latent's
// `cofire_slots` most frequent partners with counts that are exact while it has no more
// distinct partners than slots, and otherwise over-estimate by at most the evicted count
// (kept as each partner's error bound).
// Every random choice is a hash of (seed, latent, count): results do not depend on threads.
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "sae/sparse_codes.h"

namespace sae::eval {

struct LatentStatsConfig {
  int64_t d_sae = 0;
  int top_k = 20;            // top activating tokens kept per latent
  int interval_bins = 12;    // equal-width intervals over [0, top) (an even number)
  int interval_samples = 5;  // tokens sampled per interval
  int quantile_groups = 10;  // equal-count groups of the firing activations
  int quantile_samples = 5;  // tokens per quantile group
  int hist_bins = 64;        // histogram bins over [0, top) (an even number)
  int cofire_slots = 32;     // co-firing partners tracked per latent
  uint64_t seed = 1;
};

struct Example {
  int64_t token = 0;  // the caller's global token index
  float value = 0;
};

// One group of sampled tokens: activations in [lo, hi), `count` of them seen in the stream.
struct ExampleGroup {
  float lo = 0, hi = 0;
  int64_t count = 0;
  std::vector<Example> examples;  // highest activation first
};

struct Partner {
  int32_t latent = 0;
  int64_t count = 0;  // tokens where both fired: the Space-Saving estimate (never below it)
  int64_t error = 0;  // the estimate's bound: count - error <= true count (0: exact)
  int64_t at_least() const { return count - error; }
};

struct LatentSummary {
  int64_t fires = 0;
  float max = 0;
  // Moments of the firing (non-zero) activations.
  double mean = 0, mean_sq = 0, skew = 0, kurtosis = 0;
  float hist_width = 0;                 // width of each histogram bin (bins start at 0)
  std::vector<int64_t> hist;            // counts, trailing empty bins dropped
  std::vector<Example> top;             // highest first
  std::vector<ExampleGroup> intervals;  // non-empty ones, highest interval first
  std::vector<ExampleGroup> quantiles;  // highest quantile first
  std::vector<Partner> cofire;          // most frequent first
};

class LatentStats {
 public:
  explicit LatentStats(LatentStatsConfig cfg);

  // Adds n tokens' codes; token t of the batch is global token first_token + t. Tokens with
  // counted[t] == 0 (BOS and other special tokens) are skipped.
  void add(const SparseCodes& codes, int64_t first_token, std::span<const uint8_t> counted);

  int64_t tokens() const { return tokens_; }  // counted tokens so far
  int64_t fires(int64_t f) const { return fires_[size_t(f)]; }
  LatentSummary summary(int64_t f) const;
  const LatentStatsConfig& config() const { return cfg_; }

  // The whole state as a safetensors file (atomic), and back: a resumed pass continues exactly
  // as if never stopped. load() checks the file holds statistics of this configuration.
  void save(const std::string& path) const;
  void load(const std::string& path);

 private:
  struct Slot {
    int64_t token;
    float value;
  };
  void add_one(int64_t f, int64_t token, float v, std::span<const int32_t> fired_with);
  void double_grid(int64_t f);

  LatentStatsConfig cfg_;
  int64_t tokens_ = 0;
  std::vector<int64_t> fires_;
  std::vector<double> sum1_, sum2_, sum3_, sum4_;
  std::vector<float> max_, top_edge_;  // top_edge_ 0 until the latent first fires
  std::vector<int64_t> hist_;          // [d_sae, hist_bins]
  std::vector<Slot> heap_;             // [d_sae, top_k] min-heaps
  std::vector<int32_t> heap_size_;
  std::vector<Slot> interval_;          // [d_sae, interval_bins, interval_samples]
  std::vector<int64_t> interval_seen_;  // [d_sae, interval_bins]
  std::vector<Slot> quantile_;          // [d_sae, quantile_groups * quantile_samples]
  std::vector<Partner> cofire_;         // [d_sae, cofire_slots]
  std::vector<int32_t> cofire_used_;
};

}  // namespace sae::eval

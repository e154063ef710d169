// How well an SAE recovers the known features of a synthetic source.
#pragma once

#include <cstdint>
#include <nlohmann/json.hpp>
#include <vector>

#include "data/synthetic.h"
#include "sae/sae.h"

namespace sae {

struct GroundTruthMetrics {
  // Per true feature: the latent whose decoder row is closest in cosine, and that cosine.
  std::vector<int32_t> best_latent;
  std::vector<double> best_cosine;
  std::vector<double> f1;      // firing F1 of that latent against the feature, on held-out tokens
  double mean_max_cosine = 0;  // "recovery"
  double mean_f1 = 0;
  // Over parents with children: P(parent's latent silent | parent and one of its children
  // fire). High = the child latents absorbed the parent.
  double absorption = 0;
  // Over parents with children: how far the parent latent's unit decoder leans into its
  // children's span beyond the true parent direction (||P w|| - ||P f_parent||).
  double hedging = 0;

  nlohmann::ordered_json summary() const;
};

// x: the held-out tokens [n, d_in], truth: their true codes, codes: the SAE's codes on them.
GroundTruthMetrics ground_truth_metrics(const Sae& sae, const data::SyntheticSource& src,
                                        const data::TrueCodes& truth, const SparseCodes& codes);

}  // namespace sae

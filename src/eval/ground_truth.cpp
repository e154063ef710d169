#include "eval/ground_truth.h"

#include <cmath>

namespace sae {

nlohmann::ordered_json GroundTruthMetrics::summary() const {
  return {{"mean_max_cosine", mean_max_cosine},
          {"mean_f1", mean_f1},
          {"absorption", absorption},
          {"hedging", hedging}};
}

GroundTruthMetrics ground_truth_metrics(const Sae& sae, const data::SyntheticSource& src,
                                        const data::TrueCodes& truth, const SparseCodes& codes) {
  const int64_t d = sae.cfg.d_in, D = sae.cfg.d_sae, F = src.n_features();
  const auto& feat = src.features();
  GroundTruthMetrics m;
  m.best_latent.assign(size_t(F), 0);
  m.best_cosine.assign(size_t(F), -2.0);
  const std::vector<float> norms = sae.decoder_norms();
  for (int64_t f = 0; f < F; ++f)
    for (int64_t j = 0; j < D; ++j) {
      double dot = 0;
      for (int64_t c = 0; c < d; ++c)
        dot += double(sae.W_dec[size_t(j * d + c)]) * feat[size_t(f * d + c)];
      const double cosv = dot / norms[size_t(j)];
      if (cosv > m.best_cosine[size_t(f)])
        m.best_cosine[size_t(f)] = cosv, m.best_latent[size_t(f)] = int32_t(j);
    }

  // Firing on held-out tokens: per token, which features and which latents are on.
  const int64_t n = codes.n_tokens;
  std::vector<int64_t> both(size_t(F), 0), feat_on(size_t(F), 0), lat_on(size_t(D), 0);
  std::vector<uint8_t> active(size_t(D), 0);
  std::vector<int64_t> parent_events(size_t(F), 0), parent_absorbed(size_t(F), 0);
  for (int64_t t = 0; t < n; ++t) {
    for (int64_t e = codes.offsets[size_t(t)]; e < codes.offsets[size_t(t + 1)]; ++e)
      active[size_t(codes.indices[size_t(e)])] = 1, lat_on[size_t(codes.indices[size_t(e)])]++;
    for (int64_t e = truth.offsets[size_t(t)]; e < truth.offsets[size_t(t + 1)]; ++e) {
      const int32_t f = truth.features[size_t(e)];
      feat_on[size_t(f)]++;
      both[size_t(f)] += active[size_t(m.best_latent[size_t(f)])];
      const int32_t p = src.parent(f);
      if (p >= 0) {  // a child fired, so its parent did too
        parent_events[size_t(p)]++;
        parent_absorbed[size_t(p)] += !active[size_t(m.best_latent[size_t(p)])];
      }
    }
    for (int64_t e = codes.offsets[size_t(t)]; e < codes.offsets[size_t(t + 1)]; ++e)
      active[size_t(codes.indices[size_t(e)])] = 0;
  }
  m.f1.assign(size_t(F), 0.0);
  for (int64_t f = 0; f < F; ++f) {
    const double tp = double(both[size_t(f)]);
    const double prec = lat_on[size_t(m.best_latent[size_t(f)])]
                            ? tp / double(lat_on[size_t(m.best_latent[size_t(f)])])
                            : 0;
    const double rec = feat_on[size_t(f)] ? tp / double(feat_on[size_t(f)]) : 0;
    m.f1[size_t(f)] = prec + rec > 0 ? 2 * prec * rec / (prec + rec) : 0;
    m.mean_max_cosine += m.best_cosine[size_t(f)] / double(F);
    m.mean_f1 += m.f1[size_t(f)] / double(F);
  }

  // Absorption and hedging over parents with children.
  int64_t n_parents = 0;
  double hedge_sum = 0, absorb_sum = 0;
  for (int64_t p = 0; p < F; ++p) {
    const auto& ch = src.children()[size_t(p)];
    if (ch.empty()) continue;
    ++n_parents;
    if (parent_events[size_t(p)] > 0)
      absorb_sum += double(parent_absorbed[size_t(p)]) / double(parent_events[size_t(p)]);
    // Orthonormal basis of the children's span (Gram–Schmidt).
    std::vector<std::vector<double>> q;
    for (int32_t c : ch) {
      std::vector<double> v(feat.begin() + c * d, feat.begin() + (c + 1) * d);
      for (const auto& b : q) {
        double dot = 0;
        for (int64_t i = 0; i < d; ++i) dot += v[size_t(i)] * b[size_t(i)];
        for (int64_t i = 0; i < d; ++i) v[size_t(i)] -= dot * b[size_t(i)];
      }
      double nn = 0;
      for (double x : v) nn += x * x;
      if (nn < 1e-12) continue;
      for (double& x : v) x /= std::sqrt(nn);
      q.push_back(std::move(v));
    }
    auto proj_norm = [&](const float* w, double scale) {
      double s = 0;
      for (const auto& b : q) {
        double dot = 0;
        for (int64_t i = 0; i < d; ++i) dot += double(w[i]) * scale * b[size_t(i)];
        s += dot * dot;
      }
      return std::sqrt(s);
    };
    const int32_t j = m.best_latent[size_t(p)];
    hedge_sum += proj_norm(&sae.W_dec[size_t(j) * size_t(d)], 1.0 / norms[size_t(j)]) -
                 proj_norm(&feat[size_t(p * d)], 1.0);
  }
  if (n_parents > 0) {
    m.absorption = absorb_sum / double(n_parents);
    m.hedging = hedge_sum / double(n_parents);
  }
  return m;
}

}  // namespace sae

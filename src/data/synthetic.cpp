#include "data/synthetic.h"

#include <cmath>

#include "core/error.h"
#include "core/rng.h"

namespace sae::data {

namespace {

// Distinct, well-mixed streams per batch: SplitMix64 of (seed, index).
uint64_t mix(uint64_t a, uint64_t b) {
  uint64_t z = a * 0x9e3779b97f4a7c15ull + b + 0x632be59bd9b4e019ull;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}
constexpr uint64_t kHeldoutStream = ~uint64_t(0);

}  // namespace

SyntheticConfig SyntheticConfig::from_json(const nlohmann::json& j, const std::string& where) {
  SyntheticConfig c;
  for (auto it = j.begin(); it != j.end(); ++it) {
    const std::string& k = it.key();
    const auto& v = it.value();
    auto num = [&](const char* name) {
      if (!v.is_number()) fail(where, cat("data.", name), "must be a number");
      return v.get<double>();
    };
    auto integer = [&](const char* name) {
      if (!v.is_number_integer() || v.get<int64_t>() < 0)
        fail(where, cat("data.", name), "must be a non-negative integer");
      return v.get<int64_t>();
    };
    if (k == "type")
      continue;
    else if (k == "d_in")
      c.d_in = integer("d_in");
    else if (k == "n_roots")
      c.n_roots = integer("n_roots");
    else if (k == "n_parents")
      c.n_parents = integer("n_parents");
    else if (k == "children_per_parent")
      c.children_per_parent = integer("children_per_parent");
    else if (k == "max_firing_prob")
      c.max_firing_prob = num("max_firing_prob");
    else if (k == "zipf_exponent")
      c.zipf_exponent = num("zipf_exponent");
    else if (k == "child_prob")
      c.child_prob = num("child_prob");
    else if (k == "magnitude_mean")
      c.magnitude_mean = num("magnitude_mean");
    else if (k == "magnitude_std")
      c.magnitude_std = num("magnitude_std");
    else if (k == "noise_std")
      c.noise_std = num("noise_std");
    else if (k == "correlation")
      c.correlation = num("correlation");
    else if (k == "heldout_tokens")
      c.heldout_tokens = integer("heldout_tokens");
    else if (k == "seed")
      c.seed = uint64_t(integer("seed"));
    else
      fail(where, cat("data.", k), "unknown field");
  }
  if (c.d_in <= 0) fail(where, "data.d_in", "must be positive");
  if (c.n_roots <= 0) fail(where, "data.n_roots", "must be positive");
  if (c.n_parents > c.n_roots) fail(where, "data.n_parents", "cannot exceed n_roots");
  for (auto [name, p] : {std::pair{"max_firing_prob", c.max_firing_prob},
                         {"child_prob", c.child_prob},
                         {"correlation", c.correlation}})
    if (!(p >= 0 && p <= 1)) fail(where, cat("data.", name), "must be a probability in [0, 1]");
  return c;
}

nlohmann::json SyntheticConfig::to_json() const {
  return {{"type", "synthetic"},
          {"d_in", d_in},
          {"n_roots", n_roots},
          {"n_parents", n_parents},
          {"children_per_parent", children_per_parent},
          {"max_firing_prob", max_firing_prob},
          {"zipf_exponent", zipf_exponent},
          {"child_prob", child_prob},
          {"magnitude_mean", magnitude_mean},
          {"magnitude_std", magnitude_std},
          {"noise_std", noise_std},
          {"correlation", correlation},
          {"heldout_tokens", heldout_tokens},
          {"seed", seed}};
}

SyntheticSource::SyntheticSource(SyntheticConfig cfg) : cfg_(cfg) {
  const int64_t n = cfg_.n_roots + cfg_.n_parents * cfg_.children_per_parent;
  parent_.assign(size_t(n), -1);
  children_.assign(size_t(n), {});
  int64_t next = cfg_.n_roots;
  for (int64_t p = 0; p < cfg_.n_parents; ++p)
    for (int64_t c = 0; c < cfg_.children_per_parent; ++c) {
      parent_[size_t(next)] = int32_t(p);
      children_[size_t(p)].push_back(int32_t(next++));
    }
  for (int64_t i = 0; i < cfg_.n_roots; ++i)
    root_prob_.push_back(cfg_.max_firing_prob / std::pow(double(i + 1), cfg_.zipf_exponent));
  // Random unit directions: nearly orthogonal in high dimension, overlapping when n > d_in.
  Rng rng(mix(cfg_.seed, 0x5eed));
  features_.resize(size_t(n * cfg_.d_in));
  for (int64_t f = 0; f < n; ++f) {
    double ss = 0;
    float* v = &features_[size_t(f * cfg_.d_in)];
    for (int64_t c = 0; c < cfg_.d_in; ++c) v[c] = float(rng.normal()), ss += double(v[c]) * v[c];
    for (int64_t c = 0; c < cfg_.d_in; ++c) v[c] = float(v[c] / std::sqrt(ss));
  }
}

double SyntheticSource::expected_l0() const {
  double l0 = 0;
  for (int64_t i = 0; i < cfg_.n_roots; ++i) {
    double p = root_prob_[size_t(i)];
    if (cfg_.correlation > 0 && i % 2 == 1)  // odd roots also fire with their even neighbour
      p = p + (1 - p) * root_prob_[size_t(i - 1)] * cfg_.correlation;
    l0 += p * (1.0 + (children_[size_t(i)].empty() ? 0.0 : cfg_.child_prob));
  }
  return l0;
}

void SyntheticSource::sample(uint64_t stream, int64_t n, float* out, TrueCodes* truth) const {
  const int64_t d = cfg_.d_in;
  Rng rng(mix(cfg_.seed, stream));
  if (truth) *truth = TrueCodes{};
  std::vector<uint8_t> on(static_cast<size_t>(cfg_.n_roots));
  for (int64_t t = 0; t < n; ++t) {
    float* x = out + t * d;
    for (int64_t c = 0; c < d; ++c) x[c] = float(cfg_.noise_std * rng.normal());
    for (int64_t i = 0; i < cfg_.n_roots; ++i) {
      on[size_t(i)] = rng.uniform() < root_prob_[size_t(i)];
      if (i % 2 == 1 && !on[size_t(i)] && on[size_t(i - 1)] && cfg_.correlation > 0)
        on[size_t(i)] = rng.uniform() < cfg_.correlation;
    }
    auto fire = [&](int64_t f) {
      const float m = float(std::abs(cfg_.magnitude_mean + cfg_.magnitude_std * rng.normal()));
      const float* v = &features_[size_t(f * d)];
      for (int64_t c = 0; c < d; ++c) x[c] += m * v[c];
      if (truth) truth->features.push_back(int32_t(f)), truth->magnitudes.push_back(m);
    };
    for (int64_t i = 0; i < cfg_.n_roots; ++i) {
      if (!on[size_t(i)]) continue;
      fire(i);
      const auto& ch = children_[size_t(i)];
      if (!ch.empty() && rng.uniform() < cfg_.child_prob)
        fire(ch[size_t(rng.below(int64_t(ch.size())))]);
    }
    if (truth) truth->offsets.push_back(int64_t(truth->features.size()));
  }
}

void SyntheticSource::train_batch(int64_t index, int64_t batch, float* out) {
  sample(uint64_t(index), batch, out, nullptr);
}

void SyntheticSource::heldout(int64_t n, float* out) {
  sample(kHeldoutStream, heldout_size(n), out, nullptr);
}

void SyntheticSource::heldout_with_truth(int64_t n, float* out, TrueCodes& truth) {
  sample(kHeldoutStream, heldout_size(n), out, &truth);
}

std::string SyntheticSource::describe() const {
  return cat("synthetic hierarchy: d_in ", cfg_.d_in, ", ", n_features(), " true features (",
             cfg_.n_roots, " roots, ", cfg_.n_parents, " parents x ", cfg_.children_per_parent,
             " exclusive children), expected L0 ", expected_l0(), ", seed ", cfg_.seed);
}

}  // namespace sae::data

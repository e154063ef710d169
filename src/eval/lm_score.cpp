#include "eval/lm_score.h"

#include <algorithm>
#include <cmath>

#include "core/error.h"

namespace sae {

nlohmann::ordered_json LmScore::to_json() const {
  return {{"n_predictions", n_predictions},
          {"ce_clean", ce_clean},
          {"ce_sae", ce_sae},
          {"ce_zero_ablation", ce_zero},
          {"ce_loss_score", ce_loss_score},
          {"kl_sae", kl_sae},
          {"kl_zero_ablation", kl_zero},
          {"kl_score", kl_score}};
}

namespace {

// log-softmax of one row, in double.
std::vector<double> log_softmax(const float* z, int64_t v) {
  double mx = -INFINITY;
  for (int64_t i = 0; i < v; ++i) mx = std::max(mx, double(z[i]));
  double s = 0;
  for (int64_t i = 0; i < v; ++i) s += std::exp(double(z[i]) - mx);
  const double lse = mx + std::log(s);
  std::vector<double> out(static_cast<size_t>(v));
  for (int64_t i = 0; i < v; ++i) out[size_t(i)] = double(z[i]) - lse;
  return out;
}

// Groups prompts into packed batches of at most `budget` tokens (a longer prompt runs alone),
// keeping each prompt's index. Logits are [tokens, vocab], so the budget bounds their memory.
std::vector<std::pair<model::TokenBatch, std::vector<size_t>>> pack(
    const std::vector<std::vector<int32_t>>& prompts, int64_t budget) {
  std::vector<std::pair<model::TokenBatch, std::vector<size_t>>> out;
  for (size_t i = 0; i < prompts.size(); ++i) {
    if (out.empty() || out.back().first.n_tokens() + int64_t(prompts[i].size()) > budget)
      out.emplace_back();
    out.back().first.add(prompts[i]);
    out.back().second.push_back(i);
  }
  return out;
}

constexpr int64_t kLogitTokens = 512;

}  // namespace

namespace {

template <class Forward>
double mean_cross_entropy(const std::vector<std::vector<int32_t>>& prompts, int64_t V,
                          Forward forward, int64_t* n_predictions) {
  double sum = 0;
  int64_t n = 0;
  std::vector<float> logits;
  for (const auto& [batch, which] : pack(prompts, kLogitTokens)) {
    forward(batch, logits);
    for (int64_t s = 0; s < batch.n_prompts(); ++s)
      for (int64_t t = batch.starts[size_t(s)]; t + 1 < batch.starts[size_t(s + 1)]; ++t, ++n)
        sum -= log_softmax(&logits[size_t(t * V)], V)[size_t(batch.ids[size_t(t + 1)])];
  }
  if (n_predictions) *n_predictions = n;
  return n ? sum / double(n) : 0.0;
}

}  // namespace

double lm_loss(const model::Gemma2& m, const std::vector<std::vector<int32_t>>& prompts,
               int64_t* n_predictions) {
  const int64_t L = m.cfg.num_layers;
  return mean_cross_entropy(
      prompts, m.cfg.vocab_size,
      [&](const model::TokenBatch& b, std::vector<float>& logits) {
        m.forward(b, L - 1, nullptr, nullptr, &logits);
      },
      n_predictions);
}

double lm_loss(model::DeviceGemma2& m, const std::vector<std::vector<int32_t>>& prompts,
               int64_t* n_predictions) {
  const int64_t L = m.cfg().num_layers;
  return mean_cross_entropy(
      prompts, m.cfg().vocab_size,
      [&](const model::TokenBatch& b, std::vector<float>& logits) {
        m.forward(b, L - 1, nullptr, &logits);
      },
      n_predictions);
}

LmScore lm_score(const model::Gemma2& m, const Sae& sae, model::HookPoint point, int64_t layer,
                 const std::vector<std::vector<int32_t>>& prompts) {
  const int64_t V = m.cfg.vocab_size, L = m.cfg.num_layers, H = m.cfg.hidden_size;
  if (sae.cfg.d_in != H)
    fail("lm_score", "d_in",
         cat("SAE d_in ", sae.cfg.d_in, " differs from the model's hidden size ", H));
  if (layer < 0 || layer >= L)
    fail("lm_score", "layer", cat(layer, " is not a layer of the model"));
  std::vector<std::vector<int32_t>> usable;  // shorter prompts have nothing to change
  for (const auto& p : prompts)
    if (p.size() >= 3) usable.push_back(p);
  LmScore r;
  enum Mode { Clean, WithSae, Zero };
  std::vector<float> logits[3];
  for (const auto& [batch, which] : pack(usable, kLogitTokens)) {
    for (int mode : {Clean, WithSae, Zero}) {
      auto hook = [&](model::HookPoint p, int64_t l, float* act, int64_t) {
        if (mode == Clean || p != point || l != layer) return;
        for (int64_t s = 0; s < batch.n_prompts(); ++s) {
          float* rows = act + (batch.starts[size_t(s)] + 1) * H;  // keep BOS
          const int64_t k = batch.starts[size_t(s + 1)] - batch.starts[size_t(s)] - 1;
          if (mode == Zero) {
            std::fill(rows, rows + k * H, 0.0f);
          } else {
            std::vector<float> rec = sae.forward(std::span<const float>(rows, size_t(k * H)), k);
            std::copy(rec.begin(), rec.end(), rows);
          }
        }
      };
      m.forward(batch, L - 1, hook, nullptr, &logits[mode]);
    }
    for (int64_t s = 0; s < batch.n_prompts(); ++s)
      for (int64_t t = batch.starts[size_t(s)] + 1; t + 1 < batch.starts[size_t(s + 1)]; ++t) {
        const auto lc = log_softmax(&logits[Clean][size_t(t * V)], V);
        const auto ls = log_softmax(&logits[WithSae][size_t(t * V)], V);
        const auto lz = log_softmax(&logits[Zero][size_t(t * V)], V);
        const size_t next = size_t(batch.ids[size_t(t + 1)]);
        r.ce_clean -= lc[next];
        r.ce_sae -= ls[next];
        r.ce_zero -= lz[next];
        for (int64_t i = 0; i < V; ++i) {
          const double pc = std::exp(lc[size_t(i)]);
          r.kl_sae += pc * (lc[size_t(i)] - ls[size_t(i)]);
          r.kl_zero += pc * (lc[size_t(i)] - lz[size_t(i)]);
        }
        r.n_predictions++;
      }
  }
  if (r.n_predictions == 0)
    fail("lm_score", "prompts", "need at least one prompt of 3 or more tokens");
  const double n = double(r.n_predictions);
  r.ce_clean /= n, r.ce_sae /= n, r.ce_zero /= n, r.kl_sae /= n, r.kl_zero /= n;
  r.ce_loss_score = (r.ce_zero - r.ce_sae) / (r.ce_zero - r.ce_clean);
  r.kl_score = (r.kl_zero - r.kl_sae) / r.kl_zero;
  return r;
}

}  // namespace sae

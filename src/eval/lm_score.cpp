#include "eval/lm_score.h"

#include <algorithm>
#include <cmath>
#include <functional>
#include <span>

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

namespace {

// The activation rows of each prompt after its BOS, replaced by the SAE's reconstruction
// (`reconstruct(rows, n)`) or zeroed; act is the batch's hook activation on the host.
using Reconstruct = std::function<std::vector<float>(std::span<const float>, int64_t)>;
enum Mode { Clean, WithSae, Zero };
void splice(float* act, const model::TokenBatch& batch, int mode, int64_t H,
            const Reconstruct& reconstruct) {
  for (int64_t s = 0; s < batch.n_prompts(); ++s) {
    float* rows = act + (batch.starts[size_t(s)] + 1) * H;  // keep BOS
    const int64_t k = batch.starts[size_t(s + 1)] - batch.starts[size_t(s)] - 1;
    if (mode == Zero) {
      std::fill(rows, rows + k * H, 0.0f);
    } else {
      std::vector<float> rec = reconstruct(std::span<const float>(rows, size_t(k * H)), k);
      std::copy(rec.begin(), rec.end(), rows);
    }
  }
}

// Three forwards per batch (`forward(batch, mode, logits)` splices per mode), then CE and KL.
template <class Forward>
LmScore score(const model::Gemma2Config& c, int64_t sae_d_in, int64_t layer,
              const std::vector<std::vector<int32_t>>& prompts, Forward forward) {
  const int64_t V = c.vocab_size, L = c.num_layers, H = c.hidden_size;
  if (sae_d_in != H)
    fail("lm_score", "d_in",
         cat("SAE d_in ", sae_d_in, " differs from the model's hidden size ", H));
  if (layer < 0 || layer >= L)
    fail("lm_score", "layer", cat(layer, " is not a layer of the model"));
  std::vector<std::vector<int32_t>> usable;  // shorter prompts have nothing to change
  for (const auto& p : prompts)
    if (p.size() >= 3) usable.push_back(p);
  LmScore r;
  std::vector<float> logits[3];
  for (const auto& [batch, which] : pack(usable, kLogitTokens)) {
    for (int mode : {Clean, WithSae, Zero}) forward(batch, mode, logits[mode]);
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

}  // namespace

LmScore lm_score(const model::Gemma2& m, const Sae& sae, model::HookPoint point, int64_t layer,
                 const std::vector<std::vector<int32_t>>& prompts) {
  const int64_t H = m.cfg.hidden_size;
  const Reconstruct rec = [&](std::span<const float> x, int64_t n) { return sae.forward(x, n); };
  return score(m.cfg, sae.cfg.d_in, layer, prompts,
               [&](const model::TokenBatch& batch, int mode, std::vector<float>& logits) {
                 m.forward(
                     batch, m.cfg.num_layers - 1,
                     [&](model::HookPoint p, int64_t l, float* act, int64_t) {
                       if (mode != Clean && p == point && l == layer)
                         splice(act, batch, mode, H, rec);
                     },
                     nullptr, &logits);
               });
}

LmScore lm_score(model::DeviceGemma2& m, DeviceSae& sae, model::HookPoint point, int64_t layer,
                 const std::vector<std::vector<int32_t>>& prompts) {
  const int64_t H = m.cfg().hidden_size;
  const Reconstruct rec = [&](std::span<const float> x, int64_t n) {
    std::vector<float> x_hat;
    sae.encode_decode(x, n, x_hat);
    return x_hat;
  };
  return score(m.cfg(), sae.cfg().d_in, layer, prompts,
               [&](const model::TokenBatch& batch, int mode, std::vector<float>& logits) {
                 m.forward(
                     batch, m.cfg().num_layers - 1,
                     [&](model::HookPoint p, int64_t l, float* act, int64_t n) {
                       if (mode == Clean || p != point || l != layer) return;
                       // Through the host: the SAE's codes are made on the GPU by DeviceSae,
                       // whose interface takes host rows.
                       std::vector<float> host = m.to_host(act, n * H);
                       splice(host.data(), batch, mode, H, rec);
                       m.to_device(host, act);
                     },
                     &logits);
               });
}

}  // namespace sae

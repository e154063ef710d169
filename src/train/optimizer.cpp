#include "train/optimizer.h"

#include <cmath>

#include "ops/adam.h"

namespace sae::train {

Optimizer::Optimizer(const TrainingSae& sae, AdamConfig c) : cfg(c) {
  v_W_encT.assign(sae.W_encT.size(), 0.0f);
  v_W_dec.assign(sae.W_dec.size(), 0.0f);
  v_b_enc.assign(sae.b_enc.size(), 0.0f);
  v_b_dec.assign(sae.b_dec.size(), 0.0f);
  if (!has_first_moment()) return;  // the release recipe: 2 x 302 MB saved per SAE
  m_W_encT.assign(sae.W_encT.size(), 0.0f);
  m_W_dec.assign(sae.W_dec.size(), 0.0f);
  m_b_enc.assign(sae.b_enc.size(), 0.0f);
  m_b_dec.assign(sae.b_dec.size(), 0.0f);
}

double Optimizer::apply(TrainingSae& sae, Grads& g, double lr, double norm, int64_t row_begin,
                        int64_t row_end) {
  // torch: clip_coef = max_norm / (total_norm + 1e-6), clamped to 1, always applied.
  float scale = 1.0f;
  if (cfg.grad_clip > 0) scale = float(std::min(cfg.grad_clip / (norm + 1e-6), 1.0));
  ++t;
  const ops::AdamStep a{float(lr), float(cfg.beta1), float(cfg.beta2), float(cfg.eps), t};
  const int64_t d = sae.spec.d_in, D = sae.spec.d_sae;
  if (row_end < 0) row_end = D;
  const size_t o = size_t(row_begin * d);
  auto first = [&](std::vector<float>& m) { return m.empty() ? nullptr : m.data() + o; };
  ops::adam_update_rows(sae.W_encT.data() + o, g.W_encT.data() + o,
                        g.row_touched.data() + row_begin, first(m_W_encT), v_W_encT.data() + o,
                        row_end - row_begin, d, a, scale);
  ops::adam_update_rows(sae.W_dec.data() + o, g.W_dec.data() + o, g.row_touched.data() + row_begin,
                        first(m_W_dec), v_W_dec.data() + o, row_end - row_begin, d, a, scale);
  ops::adam_update(sae.b_enc.data(), g.b_enc.data(), m_b_enc.data(), v_b_enc.data(), D, a, scale);
  ops::adam_update(sae.b_dec.data(), g.b_dec.data(), m_b_dec.data(), v_b_dec.data(), d, a, scale);
  return norm;
}

}  // namespace sae::train

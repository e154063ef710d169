// Adam over a TrainingSae with SAELens's trainer semantics: the global gradient norm is
// clipped (torch.nn.utils.clip_grad_norm_), then every parameter takes an Adam step. Moments
// are dense fp32 (no first moment when beta1 = 0); gradient rows of latents that did not fire are
// known to be zero.
#pragma once

#include <cmath>
#include <cstdint>
#include <vector>

#include "train/step.h"

namespace sae::train {

struct AdamConfig {
  double beta1 = 0.9, beta2 = 0.999, eps = 1e-8;
  double grad_clip = 1.0;  // max global L2 norm; <= 0 disables
};

class Optimizer {
 public:
  Optimizer(const TrainingSae& sae, AdamConfig cfg);

  // One update at learning rate lr. Returns the gradient norm before clipping.
  double step(TrainingSae& sae, Grads& g, double lr) {
    return apply(sae, g, lr, std::sqrt(g.squared_norm()));
  }
  // The same with the gradient norm given, on latent rows [row_begin, row_end) of W_encT and
  // W_dec only (-1: all) and both biases: data parallel's sharded update, where each rank
  // steps the rows it owns.
  double apply(TrainingSae& sae, Grads& g, double lr, double grad_norm, int64_t row_begin = 0,
               int64_t row_end = -1);

  // With beta1 = 0 the first moment is the gradient itself: m_* stay empty (never allocated).
  bool has_first_moment() const { return cfg.beta1 != 0.0; }

  AdamConfig cfg;
  int64_t t = 0;  // updates taken
  std::vector<float> m_W_encT, v_W_encT, m_W_dec, v_W_dec, m_b_enc, v_b_enc, m_b_dec, v_b_dec;
};

}  // namespace sae::train

// A batch-TopK (Matryoshka) SAE being trained: fp32 master parameters, the float64 inference
// threshold, and the spec of its loss. SAELens's MatryoshkaBatchTopKTrainingSAE semantics;
// see docs/training.md for every term.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "sae/sae.h"

namespace sae::train {

enum class LevelLoss { Mse, L2 };  // ||e||^2 summed over d_in, or ||e||_2^p ("snap")

struct TrainSpec {
  int64_t d_in = 0, d_sae = 0;
  double k = 40;                      // average active latents per token (BatchTopK)
  std::vector<int64_t> widths;        // Matryoshka prefix widths, ascending, last = d_sae
  std::vector<LevelLoss> level_loss;  // one per level
  std::vector<double> level_weight;   // c_i, one per level
  double l2_power = 1.0;              // p for LevelLoss::L2
  bool detach_levels = false;         // level i's loss reaches only its own new latents
  bool rescale_acts_by_decoder_norm = false;
  bool apply_b_dec_to_input = true;
  double aux_coefficient = 1.0;
  bool per_level_aux = false;  // each level's dead latents fit that level's residual
  double topk_threshold_lr = 0.01;

  int64_t n_levels() const { return int64_t(widths.size()); }
  // Throws sae::Error naming `where` and the field when inconsistent.
  void validate(const std::string& where) const;
};

class TrainingSae {
 public:
  explicit TrainingSae(TrainSpec spec);

  TrainSpec spec;
  std::vector<float> W_encT;  // [d_sae, d_in]: encoder columns as rows, so sparse grads are rows
  std::vector<float> W_dec;   // [d_sae, d_in]
  std::vector<float> b_enc;   // [d_sae]
  std::vector<float> b_dec;   // [d_in]
  double threshold = 0.0;     // BatchTopK inference threshold (float64, as SAELens)

  // SAELens initialisation: W_dec rows kaiming-uniform, then scaled to `decoder_init_norm`
  // (skipped when <= 0); W_enc = W_dec^T; biases zero. Deterministic in `seed`.
  void init(uint64_t seed, double decoder_init_norm);

  // SAELens initialisation of rows [first_row, first_row + d_sae) of a larger SAE with the same
  // seed (latent parallel: each rank initialises only its latents, the same numbers as the
  // whole SAE's init would give them).
  void init_rows(uint64_t seed, double decoder_init_norm, int64_t first_row);

  // Latent parallel: the latents [begin, end) of this SAE as a TrainingSae of their own
  // (spec.d_sae = end - begin; spec.widths stay the whole SAE's), and back: the rows of
  // W_encT/W_dec/b_enc at `begin` replaced by `part`'s.
  TrainingSae latents(int64_t begin, int64_t end) const;
  void set_latents(int64_t begin, const TrainingSae& part);

  std::vector<float> decoder_norms() const;  // ||W_dec[j]||

  // SAELens's BatchTopK threshold rule: theta <- (1 - lr) theta + lr * (smallest value kept
  // this batch), in float64; no change when nothing was kept.
  void update_threshold(double min_selected, bool any_selected) {
    if (any_selected)
      threshold =
          (1.0 - spec.topk_threshold_lr) * threshold + spec.topk_threshold_lr * min_selected;
  }

  // The inference SAE (JumpReLU) whose codes on raw activations x are the training-time
  // pre-activations of s*x above the threshold: the input scaling factor s is folded out and,
  // when rescaling by decoder norms, the norms are folded in (every threshold = this->threshold).
  // Without rescaling, fold_decoder_norms still gives unit-norm decoder rows, with per-latent
  // thresholds threshold * ||W_dec[j]|| so that the codes are unchanged up to that scale.
  Sae to_inference(double input_scale, bool fold_decoder_norms,
                   const nlohmann::ordered_json& metadata) const;
  // The config of that inference SAE (what to_inference gives it, weights aside).
  SaeConfig inference_config(const nlohmann::ordered_json& metadata) const;
};

}  // namespace sae::train

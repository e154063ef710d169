// DeviceTrainer's planned bytes (device_step.h): what DeviceTrainer::Impl and DeviceStepScratch
// allocate, term by term in the order device_step.cu declares them. Compiled in every build,
// so memory plans are made (and tested) without a GPU.
#include <algorithm>

#include "train/device_step.h"

namespace sae::train {

int64_t DeviceTrainer::planned_state_bytes(const TrainSpec& spec, const AdamConfig& adam,
                                           const std::string& precision) {
  const int64_t d = spec.d_in, D = spec.d_sae, Dd = D * d;
  const bool mom = adam.beta1 != 0.0;
  int64_t b = Dd * 4 * (4 + (mom ? 2 : 0));                        // W_enc^T, W_dec, moments
  b += D * 4 * (2 + (mom ? 1 : 0)) + d * 4 * (2 + (mom ? 1 : 0));  // the biases and moments
  if (precision == "bf16") b += Dd * 2;                            // bf16 copy of W_enc^T
  b += 8 + D * 8 * 2;                                              // threshold, counters
  return b + (int64_t(32) << 20);  // the context's cuBLASLt workspace
}

int64_t DeviceTrainer::planned_scratch_bytes(const TrainSpec& spec, int64_t batch,
                                             const std::string& precision, int64_t max_dead) {
  const int64_t B = batch, d = spec.d_in, D = spec.d_sae, L = spec.n_levels();
  const int64_t Dd = D * d;
  const int64_t n_groups = spec.aux_coefficient != 0.0 ? (spec.per_level_aux ? L : 1) : 0;
  const int64_t n_vec = L + n_groups;
  const int64_t cap = std::max<int64_t>(int64_t(spec.k * double(B)), 1);
  int64_t b = Dd * 4 * 2 + D * 4 + d * 4;          // gradients
  b += 8 + d * ((B + 63) / 64) * 8 + (D + 1) * 8;  // norm, b_dec partials
  if (precision == "bf16") b += B * d * 2;         // bf16 encoder input
  b += B * d * 4 * 2 + d * 4;                      // x, sae_in, W_enc db_enc
  b += B * D * 4;                                  // pre-activations
  if (spec.rescale_acts_by_decoder_norm) b += 2 * D * 4;
  b += B * n_vec * d * 4;  // per-token level vectors
  b += B * L * 8 + B * 8 + (L + 1) * 8 + 8 * std::max<int64_t>(n_groups, 1) + 4;
  b += cap * (5 * 4 + 2 * 4) + (D + 1) * 8;  // entries, latent offsets
  b += D * (1 + 4 + 4);                      // dead mask, list, positions
  b += cap * 2 * 8 * 2;                      // sort scratch (CUB)
  // BatchTopK: the sparse output, candidates (2 cap + 64k), the selection, row counts, CUB
  const int64_t cand = 2 * cap + 65536;
  b += (B + 1) * 8 + cap * 8 + cand * 24 + cap * 24 + (B + 1) * 8 * 8 + cand * 24;
  // AuxK at its largest: gradients of every dead latent, one group's dense buffers.
  if (n_groups > 0 && max_dead > 0) {
    const int64_t n_g = max_dead, k_aux = std::min(d / 2, n_g);
    b += n_g * d * 4 * 2 + n_g * 4;
    b += B * n_g * (4 * 3 + 1) + B * k_aux * 8 + n_g * d * 4 + B * d * 4 * 2;
  }
  return b;
}

}  // namespace sae::train

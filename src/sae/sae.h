// An SAE's parameters and inference: encode (dense or sparse), decode from sparse, forward.
// Parameters are held in f32 whatever the stored dtype; the arithmetic is SAELens's for the
// architecture (see docs/formats.md for the few places we differ and why).
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "sae/config.h"
#include "sae/sparse_codes.h"

namespace sae {

class Sae {
 public:
  // Parameters zero-filled at the configured shapes (left empty with allocate = false, for
  // loaders that fill them).
  explicit Sae(SaeConfig cfg, bool allocate = true);

  SaeConfig cfg;
  std::vector<float> W_enc;         // [d_in, d_sae]
  std::vector<float> W_dec;         // [d_sae, d_in]
  std::vector<float> b_enc;         // [d_sae]
  std::vector<float> b_dec;         // [d_in]
  std::vector<float> threshold;     // [d_sae], jumprelu only
  DType stored_dtype = DType::F32;  // dtype of the weights as read from disk

  // x is [n, d_in] row-major. Non-finite inputs throw sae::Error naming the row and column.
  SparseCodes encode(std::span<const float> x, int64_t n) const;
  std::vector<float> encode_dense(std::span<const float> x, int64_t n) const;  // [n, d_sae]
  std::vector<float> decode(const SparseCodes& codes) const;                   // [n, d_in]
  std::vector<float> forward(std::span<const float> x, int64_t n) const;       // decode(encode)

  // Pre-activations (after input normalisation, b_dec subtraction, W_enc, b_enc and, for topk
  // with rescale_acts_by_decoder_norm, the decoder-norm scaling) for n tokens: [n, d_sae].
  // out_scale/out_shift receive the per-token undo factors when the SAE normalises at run time.
  void pre_activations(const float* x, int64_t n, float* pre, float* out_scale,
                       float* out_shift) const;

  std::vector<float> decoder_norms() const;  // ||W_dec[i]||, clamped below at 1e-8 as SAELens
  // Folds decoder norms into the encoder (SAELens fold_W_dec_norm): same codes times the norms,
  // same reconstructions, unit-norm decoder rows.
  void fold_W_dec_norm();

  bool normalises_at_run_time() const;

 private:
  // The SAE's input: run-time normalisation, then minus b_dec when apply_b_dec_to_input.
  void sae_input(const float* x, int64_t n, float* sae_in, float* out_scale,
                 float* out_shift) const;
  void encode_chunk(const float* x, int64_t n, SparseCodes& out) const;
};

}  // namespace sae

// A latent's direct effect on the logits: its unit-norm decoder direction times the unembedding
// (W_dec[f] / ||W_dec[f]|| · W_U^T), as SAEDashboard's logit tables and histogram show it. The
// final RMSNorm is not applied (SAEDashboard's convention too): the numbers rank tokens, they
// are not the logit change of a real forward. Gemma-2 ties W_U to the token embedding.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "model/gemma2.h"
#include "sae/sae.h"

namespace sae::eval {

struct LogitEffects {
  std::vector<int32_t> top_ids, bottom_ids;  // most promoted first; most suppressed first
  std::vector<float> top_values, bottom_values;
  float hist_lo = 0, hist_width = 0;  // equal-width bins from the smallest to the largest
  std::vector<int64_t> hist;
};

// Logit effects of latents [f0, f1); `unembed` is [vocab, d_in] (f32 or bf16 rows). Tokens with
// skip[id] != 0 (control tokens) are left out of the tables and the histogram.
std::vector<LogitEffects> logit_effects(const Sae& sae, const model::Weight& unembed,
                                        const std::vector<uint8_t>& skip, int64_t f0, int64_t f1,
                                        int n_top = 10, int hist_bins = 40);

// The tables and histograms from the products already made: logits [n, vocab], row i the unit
// decoder row of a latent times the unembedding (a GPU makes them: model::DeviceGemma2::unembed).
std::vector<LogitEffects> logit_effects_of(std::span<const float> logits, int64_t n,
                                           const std::vector<uint8_t>& skip, int n_top = 10,
                                           int hist_bins = 40);

// W_dec rows [f0, f1) scaled to unit norm ([f1 - f0, d_in]; a zero row stays zero).
std::vector<float> unit_decoder_rows(const Sae& sae, int64_t f0, int64_t f1);

}  // namespace sae::eval

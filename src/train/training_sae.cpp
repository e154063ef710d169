#include "train/training_sae.h"

#include <algorithm>
#include <cmath>

#include "core/error.h"
#include "core/rng.h"
#include "core/threads.h"

namespace sae::train {

void TrainSpec::validate(const std::string& where) const {
  if (d_in <= 0) fail(where, "d_in", "must be positive");
  if (d_sae <= 0 || d_sae > INT32_MAX) fail(where, "d_sae", "must be in [1, 2^31)");
  if (!(k > 0) || k > double(d_sae)) fail(where, "k", cat("must be in (0, d_sae], got ", k));
  if (widths.empty()) fail(where, "matryoshka_widths", "must not be empty");
  for (size_t i = 0; i < widths.size(); ++i) {
    if (widths[i] <= 0 || (i > 0 && widths[i] <= widths[i - 1]))
      fail(where, "matryoshka_widths", "must be positive and strictly increasing");
  }
  if (widths.back() != d_sae)
    fail(where, "matryoshka_widths", cat("the last width must equal d_sae (", d_sae, ")"));
  if (level_loss.size() != widths.size())
    fail(where, "level_losses", cat("needs one entry per level (", widths.size(), ")"));
  if (level_weight.size() != widths.size())
    fail(where, "level_weights", cat("needs one entry per level (", widths.size(), ")"));
  if (!(l2_power > 0)) fail(where, "l2_power", "must be positive");
  if (!(topk_threshold_lr >= 0 && topk_threshold_lr <= 1))
    fail(where, "topk_threshold_lr", "must be in [0, 1]");
}

TrainingSae::TrainingSae(TrainSpec s) : spec(std::move(s)) {
  const size_t d = size_t(spec.d_in), D = size_t(spec.d_sae);
  W_encT.assign(D * d, 0.0f);
  W_dec.assign(D * d, 0.0f);
  b_enc.assign(D, 0.0f);
  b_dec.assign(d, 0.0f);
}

void TrainingSae::init(uint64_t seed, double decoder_init_norm) {
  init_rows(seed, decoder_init_norm, 0);
}

void TrainingSae::init_rows(uint64_t seed, double decoder_init_norm, int64_t first_row) {
  const int64_t d = spec.d_in, D = spec.d_sae;
  Rng rng(seed);
  rng.engine().discard(uint64_t(first_row * d));  // one draw per element of the rows before
  // torch.nn.init.kaiming_uniform_ defaults: gain sqrt(2), fan_in = d_in.
  const double bound = std::sqrt(2.0) * std::sqrt(3.0 / double(d));
  for (auto& w : W_dec) w = float(rng.uniform(-bound, bound));
  if (decoder_init_norm > 0) {
    for (int64_t j = 0; j < D; ++j) {
      double s = 0;
      for (int64_t c = 0; c < d; ++c)
        s += double(W_dec[size_t(j * d + c)]) * W_dec[size_t(j * d + c)];
      const double f = decoder_init_norm / std::sqrt(s);
      for (int64_t c = 0; c < d; ++c)
        W_dec[size_t(j * d + c)] = float(W_dec[size_t(j * d + c)] * f);
    }
  }
  W_encT = W_dec;  // W_enc = W_dec^T
  std::fill(b_enc.begin(), b_enc.end(), 0.0f);
  std::fill(b_dec.begin(), b_dec.end(), 0.0f);
  threshold = 0.0;
}

std::vector<float> TrainingSae::decoder_norms() const {
  const int64_t d = spec.d_in, D = spec.d_sae;
  std::vector<float> n(static_cast<size_t>(D));
#pragma omp parallel for schedule(static) num_threads(threads_for(double(D) * double(d), 1.0))
  for (int64_t j = 0; j < D; ++j) {
    double s = 0;
    for (int64_t c = 0; c < d; ++c)
      s += double(W_dec[size_t(j * d + c)]) * W_dec[size_t(j * d + c)];
    n[size_t(j)] = float(std::sqrt(s));
  }
  return n;
}

SaeConfig TrainingSae::inference_config(const nlohmann::ordered_json& metadata) const {
  SaeConfig cfg;
  cfg.architecture = Architecture::JumpReLU;
  cfg.d_in = spec.d_in;
  cfg.d_sae = spec.d_sae;
  cfg.apply_b_dec_to_input = spec.apply_b_dec_to_input;
  cfg.json = nlohmann::ordered_json::object();
  cfg.json["metadata"] = metadata;
  return cfg;
}

Sae TrainingSae::to_inference(double s, bool fold_decoder_norms,
                              const nlohmann::ordered_json& metadata) const {
  const int64_t d = spec.d_in, D = spec.d_sae;
  Sae out(inference_config(metadata));
  const bool fold = spec.rescale_acts_by_decoder_norm || fold_decoder_norms;
  std::vector<float> n = fold ? decoder_norms() : std::vector<float>(size_t(D), 1.0f);
  // hidden_pre_train(s*x) = n * ((s*x - b_dec) W_enc + b_enc) must equal pre_inf(x):
  // W_enc' = s * n * W_enc, b_enc' = n * b_enc, b_dec' = b_dec / s; decoding
  // hidden_pre / n through W_dec and undoing s: W_dec' = W_dec / (n * s).
  // W_encT [D, d] to W_enc [d, D] in tiles of latents x columns, each written along its rows
  // (a plain loop's writes stride D floats apart: 1.5 s for the seed's shape, and every
  // evaluation and save makes one).
  constexpr int64_t kTile = 64;
#pragma omp parallel for schedule(static) num_threads(threads_for(double(D) * double(d), 1.0))
  for (int64_t j0 = 0; j0 < D; j0 += kTile) {
    const int64_t j1 = std::min(D, j0 + kTile);
    for (int64_t c0 = 0; c0 < d; c0 += kTile) {
      const int64_t c1 = std::min(d, c0 + kTile);
      for (int64_t c = c0; c < c1; ++c)
        for (int64_t j = j0; j < j1; ++j)
          out.W_enc[size_t(c * D + j)] =
              float(double(W_encT[size_t(j * d + c)]) * s * double(n[size_t(j)]));
    }
    for (int64_t j = j0; j < j1; ++j) {
      const double nj = n[size_t(j)];
      for (int64_t c = 0; c < d; ++c)
        out.W_dec[size_t(j * d + c)] = float(double(W_dec[size_t(j * d + c)]) / (nj * s));
    }
  }
  for (int64_t j = 0; j < D; ++j) {
    const double nj = n[size_t(j)];
    out.b_enc[size_t(j)] = float(double(b_enc[size_t(j)]) * nj);
    // Rescaled training selects on hidden_pre = pre * n, so the threshold is already in the
    // folded units; otherwise folding the norms scales each latent's threshold by its norm.
    out.threshold[size_t(j)] =
        float(spec.rescale_acts_by_decoder_norm ? threshold : threshold * nj);
  }
  for (int64_t c = 0; c < d; ++c) out.b_dec[size_t(c)] = float(double(b_dec[size_t(c)]) / s);
  return out;
}

TrainingSae TrainingSae::latents(int64_t begin, int64_t end) const {
  TrainSpec s = spec;
  s.d_sae = end - begin;
  TrainingSae part(s);
  const size_t d = size_t(spec.d_in);
  std::copy(W_encT.begin() + ptrdiff_t(size_t(begin) * d),
            W_encT.begin() + ptrdiff_t(size_t(end) * d), part.W_encT.begin());
  std::copy(W_dec.begin() + ptrdiff_t(size_t(begin) * d),
            W_dec.begin() + ptrdiff_t(size_t(end) * d), part.W_dec.begin());
  std::copy(b_enc.begin() + begin, b_enc.begin() + end, part.b_enc.begin());
  part.b_dec = b_dec;
  part.threshold = threshold;
  return part;
}

void TrainingSae::set_latents(int64_t begin, const TrainingSae& part) {
  const size_t d = size_t(spec.d_in);
  std::copy(part.W_encT.begin(), part.W_encT.end(), W_encT.begin() + ptrdiff_t(size_t(begin) * d));
  std::copy(part.W_dec.begin(), part.W_dec.end(), W_dec.begin() + ptrdiff_t(size_t(begin) * d));
  std::copy(part.b_enc.begin(), part.b_enc.end(), b_enc.begin() + begin);
}

}  // namespace sae::train

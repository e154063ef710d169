// One training step equals SAELens's MatryoshkaBatchTopKTrainingSAE (goldens made by
// scripts/make_goldens.py): loss parts, codes, gradients, the clipped Adam update of the
// SAELens trainer, the threshold update, and the saved JumpReLU SAE.
#include <gtest/gtest.h>

#include "io/json_file.h"
#include "io/safetensors.h"
#include "sae/load.h"
#include "test_util.h"
#include "train/optimizer.h"
#include "train/step.h"

namespace sae::train {
namespace {

struct Golden {
  bool rescale, per_level_aux;
  std::string name;
};

class SaeLensStep : public ::testing::TestWithParam<Golden> {};

// The SAELens config the golden used: d_in 16, d_sae 64, k 4, widths 8/24/64, all-mse levels.
TrainSpec golden_spec(const Golden& gp) {
  TrainSpec sp;
  sp.d_in = 16;
  sp.d_sae = 64;
  sp.k = 4;
  sp.widths = {8, 24, 64};
  sp.level_loss = {LevelLoss::Mse, LevelLoss::Mse, LevelLoss::Mse};
  sp.level_weight = {1, 1, 1};
  sp.rescale_acts_by_decoder_norm = gp.rescale;
  sp.per_level_aux = gp.per_level_aux;
  return sp;
}

std::vector<float> transpose(const std::vector<float>& a, int64_t rows, int64_t cols) {
  std::vector<float> t(a.size());
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) t[size_t(c * rows + r)] = a[size_t(r * cols + c)];
  return t;
}

TEST_P(SaeLensStep, MatchesSaeLens) {
  const Golden gp = GetParam();
  const std::string dir = test::golden(gp.name);
  SafetensorsFile in(dir + "/inputs.safetensors"), out(dir + "/outputs.safetensors");
  auto losses = read_json_file(dir + "/losses.json");
  const int64_t d = 16, D = 64, B = 24;

  TrainingSae sae(golden_spec(gp));
  sae.W_encT = transpose(in.read_f32("W_enc", {d, D}), d, D);
  sae.W_dec = in.read_f32("W_dec", {D, d});
  sae.b_enc = in.read_f32("b_enc", {D});
  sae.b_dec = in.read_f32("b_dec", {d});
  sae.threshold = in.read_scalar_f64("topk_threshold");
  const auto x = in.read_f32("x", {B, d});
  std::vector<uint8_t> dead;
  for (int64_t v : in.read_i64("dead")) dead.push_back(uint8_t(v));

  Grads g;
  g.resize(d, D);
  StepWorkspace ws;
  StepResult r = forward_backward(sae, x.data(), B, dead, g, ws);
  auto near = [](double got, double want, const char* what) {
    EXPECT_NEAR(got, want, 1e-5 * std::abs(want)) << what;
  };
  near(r.level_loss[0], losses["inner_mse_loss_8"].get<double>(), "inner_mse_loss_8");
  near(r.level_loss[1], losses["inner_mse_loss_24"].get<double>(), "inner_mse_loss_24");
  near(r.level_loss[2], losses["mse_loss"].get<double>(), "mse_loss");
  near(r.aux_loss, losses["auxiliary_reconstruction_loss"].get<double>(), "aux");
  near(r.loss, losses["loss"].get<double>(), "loss");

  // Codes: the same entries selected, same values.
  std::vector<float> acts(size_t(B * D), 0.0f);
  for (int64_t t = 0; t < B; ++t)
    for (int64_t e = ws.active.offsets[size_t(t)]; e < ws.active.offsets[size_t(t + 1)]; ++e)
      acts[size_t(t * D + ws.active.cols[size_t(e)])] = ws.active.values[size_t(e)];
  const auto want_acts = out.read_f32("feature_acts", {B, D});
  for (size_t i = 0; i < acts.size(); ++i) ASSERT_EQ(acts[i] != 0, want_acts[i] != 0) << i;
  test::expect_close(acts, want_acts, 1e-5, "feature_acts");

  // Gradients (rows not written are zero).
  test::expect_close(transpose(g.W_encT, D, d), out.read_f32("grad_W_enc", {d, D}), 1e-5,
                     "grad W_enc");
  test::expect_close(g.W_dec, out.read_f32("grad_W_dec", {D, d}), 1e-5, "grad W_dec");
  test::expect_close(g.b_enc, out.read_f32("grad_b_enc", {D}), 1e-5, "grad b_enc");
  test::expect_close(g.b_dec, out.read_f32("grad_b_dec", {d}), 1e-5, "grad b_dec");

  // Threshold update, then the trainer's clip + Adam(lr 1e-3, betas 0.9/0.999).
  sae.update_threshold(r.min_selected, r.n_active > 0);
  near(sae.threshold, losses["topk_threshold"].get<double>(), "topk_threshold");
  Optimizer opt(sae, AdamConfig{});
  opt.step(sae, g, 1e-3);
  test::expect_close(transpose(sae.W_encT, D, d), out.read_f32("after_W_enc", {d, D}), 1e-5,
                     "W_enc after Adam");
  test::expect_close(sae.W_dec, out.read_f32("after_W_dec", {D, d}), 1e-5, "W_dec after Adam");
  test::expect_close(sae.b_enc, out.read_f32("after_b_enc", {D}), 1e-5, "b_enc after Adam");
  test::expect_close(sae.b_dec, out.read_f32("after_b_dec", {d}), 1e-5, "b_dec after Adam");
}

TEST_P(SaeLensStep, SavedJumpReluMatchesSaeLensInferenceSave) {
  // save_inference_model ran after the step: updated threshold, weights after Adam.
  const Golden gp = GetParam();
  const std::string dir = test::golden(gp.name);
  SafetensorsFile in(dir + "/outputs.safetensors");
  auto losses = read_json_file(dir + "/losses.json");
  const int64_t d = 16, D = 64;
  TrainingSae sae(golden_spec(gp));
  sae.W_encT = transpose(in.read_f32("after_W_enc", {d, D}), d, D);
  sae.W_dec = in.read_f32("after_W_dec", {D, d});
  sae.b_enc = in.read_f32("after_b_enc", {D});
  sae.b_dec = in.read_f32("after_b_dec", {d});
  sae.threshold = losses["topk_threshold"].get<double>();
  Sae mine = sae.to_inference(1.0, /*fold_decoder_norms=*/false, nlohmann::ordered_json::object());
  LoadedSae theirs = load_from_disk(dir + "/inference");
  EXPECT_EQ(theirs.sae.cfg.architecture, Architecture::JumpReLU);
  test::expect_close(mine.W_enc, theirs.sae.W_enc, 1e-6, "W_enc");
  test::expect_close(mine.W_dec, theirs.sae.W_dec, 1e-6, "W_dec");
  test::expect_close(mine.b_enc, theirs.sae.b_enc, 1e-6, "b_enc");
  test::expect_close(mine.b_dec, theirs.sae.b_dec, 1e-6, "b_dec");
  test::expect_close(mine.threshold, theirs.sae.threshold, 1e-6, "threshold");
}

INSTANTIATE_TEST_SUITE_P(Goldens, SaeLensStep,
                         ::testing::Values(Golden{false, false, "train_matryoshka"},
                                           Golden{true, true, "train_matryoshka_rescale_levelaux"}),
                         [](const auto& info) { return info.param.name; });

}  // namespace
}  // namespace sae::train

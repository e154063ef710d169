// The training step against its double-precision dense reference: loss values, and every
// gradient by central finite differences of the reference. Also BatchTopK and Adam kernels.
#include <gtest/gtest.h>

#include <cmath>

#include "core/dtype.h"
#include "core/rng.h"
#include "ops/adam.h"
#include "ops/batch_topk.h"
#include "test_util.h"
#include "train/step.h"

namespace sae::train {
namespace {

TEST(BatchTopK, MatchesFullSortIncludingTiesAndShortfall) {
  const int64_t rows = 40, cols = 97;
  auto x = test::random_vector(size_t(rows * cols), 11);
  for (int64_t i = 0; i < rows * cols; i += 7) x[size_t(i)] = 0.5f;  // ties, likely at the cut
  for (int64_t budget : {0, 1, 37, 160, 400, 1000, 5000}) {
    ops::RowSparse a, b;
    ops::batch_topk(x.data(), rows, cols, budget, a);
    ops::batch_topk_reference(x.data(), rows, cols, budget, b);
    EXPECT_EQ(a.offsets, b.offsets) << budget;
    EXPECT_EQ(a.cols, b.cols) << budget;
    EXPECT_EQ(a.values, b.values) << budget;
  }
}

TEST(BatchTopK, MisleadingSampleFallsBackToExact) {
  // The sampled rows (every 4th) hold all the large values, so the estimated bound is too high.
  const int64_t rows = 1024, cols = 8;
  std::vector<float> x(size_t(rows * cols));
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c)
      x[size_t(r * cols + c)] =
          (r % 4 == 0 ? 100.0f : 1.0f) + 0.001f * float((r * 7 + c * 13) % 97);
  for (int64_t budget : {1000, 3000, 8000}) {
    ops::RowSparse a, b;
    ops::batch_topk(x.data(), rows, cols, budget, a);
    ops::batch_topk_reference(x.data(), rows, cols, budget, b);
    EXPECT_EQ(a.cols, b.cols) << budget;
    EXPECT_EQ(a.values, b.values) << budget;
    EXPECT_EQ(a.offsets, b.offsets) << budget;
    // The same through the fallback's second affine pass (nothing written back).
    std::vector<float> zero(size_t(cols), 0.0f), one(size_t(cols), 1.0f);
    ops::RowSparse c;
    ops::batch_topk(x.data(), rows, cols, budget, c, zero.data(), one.data(), false);
    EXPECT_EQ(c.values, b.values) << budget;
  }
}

TEST(BatchTopK, FusedBiasAndScaleEqualTransformThenSelect) {
  const int64_t rows = 33, cols = 70;
  auto x = test::random_vector(size_t(rows * cols), 12);
  auto bias = test::random_vector(size_t(cols), 13, 0.3f);
  auto scale = test::random_vector(size_t(cols), 14);
  for (auto& v : scale) v = std::abs(v) + 0.1f;
  auto y = x;
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c)
      y[size_t(r * cols + c)] = (y[size_t(r * cols + c)] + bias[size_t(c)]) * scale[size_t(c)];
  ops::RowSparse a, b;
  auto x0 = x;
  ops::RowSparse c;
  ops::batch_topk(x.data(), rows, cols, 200, c, bias.data(), scale.data(), /*write_back=*/false);
  EXPECT_EQ(x, x0);  // untouched
  ops::batch_topk(x.data(), rows, cols, 200, a, bias.data(), scale.data());
  ops::batch_topk_reference(y.data(), rows, cols, 200, b);
  EXPECT_EQ(x, y);  // transformed in place
  EXPECT_EQ(c.cols, b.cols);
  EXPECT_EQ(c.values, b.values);
  EXPECT_EQ(a.offsets, b.offsets);
  EXPECT_EQ(a.cols, b.cols);
  EXPECT_EQ(a.values, b.values);
}

TEST(Adam, MatchesReferenceAndRowsVariant) {
  for (float beta1 : {0.9f, 0.0f}) {
    const int64_t rows = 7, cols = 13, n = rows * cols;
    auto p0 = test::random_vector(size_t(n), 1), g = test::random_vector(size_t(n), 2);
    std::vector<uint8_t> has(size_t(rows), 1);
    has[2] = has[5] = 0;
    for (int64_t c = 0; c < cols; ++c) g[size_t(2 * cols + c)] = g[size_t(5 * cols + c)] = 0.0f;
    auto p1 = p0, p2 = p0;
    std::vector<float> m0(size_t(n), 0.1f), v0(size_t(n), 0.2f), m1 = m0, v1 = v0, m2 = m0, v2 = v0;
    for (int64_t step = 1; step <= 3; ++step) {
      ops::AdamStep a{1e-3f, beta1, 0.999f, 1e-8f, step};
      ops::adam_update(p0.data(), g.data(), m0.data(), v0.data(), n, a, 0.5f);
      ops::adam_update_rows(p1.data(), g.data(), has.data(), m1.data(), v1.data(), rows, cols, a,
                            0.5f);
      ops::adam_update_reference(p2.data(), g.data(), m2.data(), v2.data(), n, a, 0.5f);
    }
    EXPECT_EQ(p0, p1);
    EXPECT_EQ(m0, m1);
    test::expect_close(p0, p2, 1e-6, "adam vs reference");
    test::expect_close(v0, v2, 1e-6, "adam v vs reference");
  }
}

// A small SAE with random parameters (non-zero biases) and inputs.
struct Case {
  std::string name;
  TrainSpec spec;
  bool with_dead = false;
};

void PrintTo(const Case& c, std::ostream* os) {
  *os << c.name;
}

TrainSpec base_spec() {
  TrainSpec s;
  s.d_in = 8;
  s.d_sae = 32;
  s.k = 4;
  s.widths = {4, 12, 32};
  s.level_loss = {LevelLoss::Mse, LevelLoss::Mse, LevelLoss::Mse};
  s.level_weight = {1, 1, 1};
  return s;
}

std::vector<Case> cases() {
  std::vector<Case> out;
  out.push_back({"matryoshka_mse", base_spec()});
  {
    TrainSpec s = base_spec();
    s.widths = {32};
    s.level_loss = {LevelLoss::Mse};
    s.level_weight = {1};
    out.push_back({"plain_batchtopk", s});
  }
  {
    TrainSpec s = base_spec();
    s.level_loss = {LevelLoss::L2, LevelLoss::L2, LevelLoss::Mse};
    out.push_back({"snap", s});
  }
  {
    TrainSpec s = base_spec();
    s.level_loss = {LevelLoss::L2, LevelLoss::Mse, LevelLoss::L2};
    s.l2_power = 1.5;
    s.level_weight = {0.25, 0.5, 1.0};
    out.push_back({"l2_power_balanced", s});
  }
  {
    TrainSpec s = base_spec();
    s.detach_levels = true;
    out.push_back({"detached", s});
  }
  {
    TrainSpec s = base_spec();
    s.rescale_acts_by_decoder_norm = true;
    out.push_back({"rescale_with_aux", s, true});
  }
  {
    TrainSpec s = base_spec();
    s.per_level_aux = true;
    s.aux_coefficient = 0.7;
    out.push_back({"per_level_aux", s, true});
  }
  {
    TrainSpec s = base_spec();
    s.apply_b_dec_to_input = false;
    s.rescale_acts_by_decoder_norm = true;
    s.per_level_aux = true;
    s.level_loss = {LevelLoss::L2, LevelLoss::L2, LevelLoss::Mse};
    out.push_back({"snap_rescale_no_bdec_in", s, true});
  }
  return out;
}

struct Fixture {
  TrainingSae sae;
  std::vector<float> x;
  std::vector<uint8_t> dead;
  int64_t B = 6;
  explicit Fixture(const Case& c) : sae(c.spec) {
    Rng rng(42);
    for (auto& w : sae.W_encT) w = float(rng.normal() * 0.5);
    for (auto& w : sae.W_dec) w = float(rng.normal() * 0.4);
    for (auto& w : sae.b_enc) w = float(rng.normal() * 0.1);
    for (auto& w : sae.b_dec) w = float(rng.normal() * 0.2);
    x.resize(size_t(B * c.spec.d_in));
    for (auto& v : x) v = float(rng.normal());
    if (c.with_dead) {
      dead.assign(size_t(c.spec.d_sae), 0);
      for (int64_t j = 1; j < c.spec.d_sae; j += 3) dead[size_t(j)] = 1;  // in every level
    }
  }
};

class StepCase : public ::testing::TestWithParam<Case> {};

TEST_P(StepCase, LossMatchesDenseReference) {
  Fixture f(GetParam());
  Grads g;
  g.resize(f.sae.spec.d_in, f.sae.spec.d_sae);
  StepWorkspace ws;
  StepResult r = forward_backward(f.sae, f.x.data(), f.B, f.dead, g, ws);
  auto p = reference_params(f.sae);
  ReferenceLoss ref = reference_loss(f.sae.spec, p, p, f.x.data(), f.B, f.dead);
  EXPECT_EQ(r.n_active, ref.n_active);
  EXPECT_EQ(r.n_active, int64_t(f.sae.spec.k) * f.B);
  for (size_t i = 0; i < ref.level.size(); ++i)
    EXPECT_NEAR(r.level_loss[i], ref.level[i], 1e-5 * std::abs(ref.level[i])) << "level " << i;
  EXPECT_NEAR(r.aux_loss, ref.aux, 1e-5 * std::abs(ref.aux) + 1e-12);
  EXPECT_NEAR(r.loss, ref.total, 1e-5 * std::abs(ref.total));
  if (GetParam().with_dead) {
    EXPECT_GT(r.aux_loss, 0.0);
  }
}

// The clip's norm, taken row by row as the backward (and AuxK) finished each gradient row, is
// the norm of the gradient as written.
TEST_P(StepCase, FusedGradientNormIsTheNormOfTheGradient) {
  Fixture f(GetParam());
  Grads g;
  g.resize(f.sae.spec.d_in, f.sae.spec.d_sae);
  StepWorkspace ws;
  for (int round = 0; round < 2; ++round) {  // the second reuses the workspace and g
    g.clear();
    const StepResult r = forward_backward(f.sae, f.x.data(), f.B, f.dead, g, ws);
    const double want = g.squared_norm();
    EXPECT_GT(want, 0.0);
    EXPECT_NEAR(r.grad_squared_norm, want, 1e-6 * want) << "round " << round;
  }
}

// training.precision = bf16: the encoder GEMM on bf16 operands. With W_enc and the encoder's
// input already bf16 values (b_dec zero, x rounded) nothing is rounded, so the step equals the
// f32 step up to the GEMM's summation order — the plumbing is checked whichever path runs
// (ops/gemm_bf16.h is checked against its reference in test_ops).
TEST_P(StepCase, Bf16EncoderGemmIsTheStepOnBf16Operands) {
  Fixture f(GetParam());
  for (auto& w : f.sae.W_encT) w = bf16_to_f32(f32_to_bf16(w));
  for (auto& v : f.x) v = bf16_to_f32(f32_to_bf16(v));
  std::fill(f.sae.b_dec.begin(), f.sae.b_dec.end(), 0.0f);
  Grads g32, g16;
  g32.resize(f.sae.spec.d_in, f.sae.spec.d_sae), g16.resize(f.sae.spec.d_in, f.sae.spec.d_sae);
  StepWorkspace ws32, ws16;
  ws16.bf16_encoder_gemm = true;
  const StepResult a = forward_backward(f.sae, f.x.data(), f.B, f.dead, g32, ws32);
  const StepResult b = forward_backward(f.sae, f.x.data(), f.B, f.dead, g16, ws16);
  EXPECT_EQ(ws16.W_encT_bf16.size(), f.sae.W_encT.size()) << "the bf16 path ran";
  EXPECT_NEAR(a.loss, b.loss, 1e-5 * std::abs(a.loss));
  EXPECT_EQ(a.n_active, b.n_active);
  test::expect_close(g16.W_dec, g32.W_dec, 1e-4, "dW_dec");
  test::expect_close(g16.W_encT, g32.W_encT, 1e-4, "dW_enc");
  test::expect_close(g16.b_dec, g32.b_dec, 1e-4, "db_dec");
  // And with operands that are not bf16 values, the step sees them rounded: not the f32 step.
  Fixture h(GetParam());
  Grads gh;
  gh.resize(h.sae.spec.d_in, h.sae.spec.d_sae);
  StepWorkspace wsh;
  wsh.bf16_encoder_gemm = true;
  const StepResult c = forward_backward(h.sae, h.x.data(), h.B, h.dead, gh, wsh);
  Grads gh32;
  gh32.resize(h.sae.spec.d_in, h.sae.spec.d_sae);
  StepWorkspace wsh32;
  const StepResult d = forward_backward(h.sae, h.x.data(), h.B, h.dead, gh32, wsh32);
  EXPECT_NE(c.loss, d.loss);
  EXPECT_NEAR(c.loss, d.loss, 2e-2 * std::abs(d.loss));
}

TEST_P(StepCase, GradientsMatchFiniteDifferences) {
  Fixture f(GetParam());
  const TrainSpec& sp = f.sae.spec;
  const int64_t d = sp.d_in, D = sp.d_sae;
  Grads g;
  g.resize(d, D);
  StepWorkspace ws;
  forward_backward(f.sae, f.x.data(), f.B, f.dead, g, ws);
  const ReferenceParams frozen = reference_params(f.sae);
  // Central differences of the double reference, parameters perturbed, detached parts frozen.
  auto fd = [&](std::vector<double> ReferenceParams::*field, size_t i) {
    const double h = 1e-6;
    ReferenceParams p = frozen;
    (p.*field)[i] += h;
    const double up = reference_loss(sp, p, frozen, f.x.data(), f.B, f.dead).total;
    (p.*field)[i] -= 2 * h;
    const double down = reference_loss(sp, p, frozen, f.x.data(), f.B, f.dead).total;
    return (up - down) / (2 * h);
  };
  // Every coordinate of every parameter. The analytic gradient is f32 arithmetic over terms of
  // size ~|loss|, so the tolerance is relative to the largest gradient entry.
  struct Check {
    const char* name;
    std::vector<double> ReferenceParams::*field;
    std::function<float(size_t)> analytic;
    size_t n;
  };
  std::vector<Check> checks = {
      {"W_enc", &ReferenceParams::W_enc,
       [&](size_t i) { return g.W_encT[(i % size_t(D)) * size_t(d) + i / size_t(D)]; },
       size_t(d * D)},
      {"W_dec", &ReferenceParams::W_dec, [&](size_t i) { return g.W_dec[i]; }, size_t(D * d)},
      {"b_enc", &ReferenceParams::b_enc, [&](size_t i) { return g.b_enc[i]; }, size_t(D)},
      {"b_dec", &ReferenceParams::b_dec, [&](size_t i) { return g.b_dec[i]; }, size_t(d)},
  };
  for (const auto& c : checks) {
    std::vector<double> num(c.n), ana(c.n);
    double max_abs = 1e-12;
    for (size_t i = 0; i < c.n; ++i) {
      num[i] = fd(c.field, i);
      ana[i] = c.analytic(i);
      max_abs = std::max(max_abs, std::abs(num[i]));
    }
    int bad = 0;
    for (size_t i = 0; i < c.n; ++i)
      if (std::abs(num[i] - ana[i]) > 1e-4 * max_abs + 1e-4 * std::abs(num[i]))
        if (bad++ < 5)
          ADD_FAILURE() << c.name << "[" << i << "]: analytic " << ana[i] << " vs fd " << num[i];
    EXPECT_EQ(bad, 0) << c.name << " (max |grad| " << max_abs << ")";
  }
}

INSTANTIATE_TEST_SUITE_P(Specs, StepCase, ::testing::ValuesIn(cases()),
                         [](const auto& info) { return info.param.name; });

}  // namespace
}  // namespace sae::train

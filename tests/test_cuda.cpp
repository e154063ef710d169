// The CUDA backend against the CPU engine, which is its reference: each device kernel on random
// inputs of odd shapes (ties and shortfalls included), then the whole training step (codes,
// every loss, every gradient, the Adam update, the threshold, the counters) for each loss
// variant. Tolerances come from the arithmetic: fp32 sums in another order agree to ~1e-5
// relative; tf32 operands carry 10 mantissa bits (~5e-4), bf16 7 bits (~4e-3).
// Where no GPU is visible (or the build has no CUDA) every test skips with one line saying so.
#include <gtest/gtest.h>

#include <cmath>

#include "core/device.h"
#include "core/error.h"
#include "core/rng.h"
#include "data/synthetic.h"
#include "ops/adam.h"
#include "ops/batch_topk.h"
#include "ops/select.h"
#include "sae/device_sae.h"
#include "test_util.h"
#include "train/device_step.h"
#include "train/optimizer.h"
#include "train/step.h"
#include "train/trainer.h"

#if SAECPP_HAS_CUDA
#include "ops/cuda/adam.h"
#include "ops/cuda/batch_topk.h"
#include "ops/cuda/gather_rows.h"
#include "ops/cuda/gemm.h"
#endif

namespace sae {
namespace {

namespace fs = std::filesystem;

TEST(Cuda, DeviceQueriesNeverThrow) {
  // On any machine: the build reports itself and a missing GPU is a count of 0, not a crash.
  if (!cuda_compiled()) {
    EXPECT_EQ(cuda_device_count(), 0);
  }
  EXPECT_FALSE(cuda_device_description().empty());
  if (!cuda_compiled()) {
    train::TrainSpec s;
    EXPECT_THROW(train::DeviceTrainer(s, {}, 1, "fp32"), Error);
  }
  EXPECT_THROW(parse_device("tpu", "test"), Error);
}

TEST(Cuda, CliDeviceCudaEitherRunsOrSaysWhyNot) {
  // On a machine without a GPU (or a build without CUDA) the commands fail with one clear
  // line and leave no output; with a GPU they give the CPU's codes.
  test::TempDir dir;
  const std::string sae = test::golden("standard/sae"), x = test::golden("standard/x.npy");
  auto r =
      test::run_cli(cat("encode ", sae, " ", x, " --device cuda -o ", dir / "codes.safetensors"));
  if (cuda_device_count() == 0) {
    EXPECT_EQ(r.exit_code, 1) << r.output;
    EXPECT_NE(r.output.find(cuda_compiled() ? "no CUDA GPU is visible" : "built without CUDA"),
              std::string::npos)
        << r.output;
    EXPECT_FALSE(fs::exists(dir / "codes.safetensors"));
    auto t = test::run_cli(cat("train --preset hierarchy-snap --device cuda -o ", dir / "t"));
    EXPECT_EQ(t.exit_code, 1) << t.output;
    EXPECT_FALSE(fs::exists(dir / "t")) << "a refused run leaves no folder";
    return;
  }
  ASSERT_EQ(r.exit_code, 0) << r.output;
  auto c = test::run_cli(cat("encode ", sae, " ", x, " -o ", dir / "cpu.safetensors"));
  ASSERT_EQ(c.exit_code, 0) << c.output;
  const SparseCodes a = load_sparse_codes(dir / "codes.safetensors");
  const SparseCodes b = load_sparse_codes(dir / "cpu.safetensors");
  EXPECT_EQ(a.offsets, b.offsets);
  EXPECT_EQ(a.indices, b.indices);
  test::expect_close(a.values, b.values, 1e-5, "cli codes");
  auto e = test::run_cli(cat("eval ", sae, " ", x, " --device cuda --json"));
  EXPECT_EQ(e.exit_code, 0) << e.output;
}

#if SAECPP_HAS_CUDA

template <class T>
cuda::DeviceBuffer<T> to_device(const std::vector<T>& v, const cuda::Context& ctx) {
  cuda::DeviceBuffer<T> b(std::max<size_t>(v.size(), 1), "test");
  cuda::upload(b, std::span<const T>(v), ctx.stream(), "test");
  return b;
}

TEST(Cuda, OutOfMemorySaysHowMuchWasAskedAndIsFree) {
  REQUIRE_GPU();
  try {
    cuda::DeviceBuffer<float> huge(size_t(1) << 48, "a test buffer");  // 1 PiB
    FAIL() << "allocated 1 PiB";
  } catch (const Error& e) {
    const std::string m = e.what();
    EXPECT_NE(m.find("out of GPU memory allocating a test buffer"), std::string::npos) << m;
    EXPECT_NE(m.find("MiB free of"), std::string::npos) << m;
  }
}

// The activation store's row gather (by index list and as a contiguous move) against the
// plain loop, in float4 rows and in scalar ones (d % 4 != 0).
TEST(Cuda, GatherRowsMatchesTheHostLoop) {
  REQUIRE_GPU();
  cuda::Context ctx;
  for (int64_t d : {64, 7}) {
    const int64_t rows = 50;
    const auto src = test::random_vector(size_t(rows * d), uint32_t(d));
    const std::vector<int32_t> idx = {49, 0, 3, 3, 17, 48, 1};
    cuda::DeviceBuffer<float> dsrc, ddst(size_t(rows * d));
    cuda::DeviceBuffer<int32_t> didx;
    cuda::upload(dsrc, std::span<const float>(src), ctx.stream(), "src");
    cuda::upload(didx, std::span<const int32_t>(idx), ctx.stream(), "idx");
    cuda::gather_rows(ctx.stream(), dsrc.data(), didx.data(), 0, int64_t(idx.size()), d,
                      ddst.data());
    auto got = cuda::download(ddst.data(), idx.size() * size_t(d), ctx.stream());
    for (size_t i = 0; i < idx.size(); ++i)
      for (int64_t c = 0; c < d; ++c)
        ASSERT_EQ(got[i * size_t(d) + size_t(c)], src[size_t(idx[i] * d + c)]) << d << " " << i;
    cuda::gather_rows(ctx.stream(), dsrc.data(), nullptr, 20, 30, d, ddst.data());  // a move
    got = cuda::download(ddst.data(), size_t(30 * d), ctx.stream());
    EXPECT_EQ(got, std::vector<float>(src.begin() + 20 * d, src.end())) << d;
  }
}

TEST(Cuda, BatchTopKMatchesCpuIncludingTiesAndShortfall) {
  REQUIRE_GPU();
  cuda::Context ctx;
  for (auto [rows, cols] : {std::pair<int64_t, int64_t>{37, 301}, {5, 4099}, {129, 65}}) {
    auto x = test::random_vector(size_t(rows * cols), uint32_t(rows * 7 + cols));
    for (int64_t i = 0; i < rows * cols; i += 11) x[size_t(i)] = 0.75f;  // ties near the cut
    auto bias = test::random_vector(size_t(cols), 5, 0.2f);
    auto scale = test::random_vector(size_t(cols), 6);
    for (auto& v : scale) v = std::abs(v) + 0.2f;
    for (int64_t budget : {int64_t(0), int64_t(1), rows * 3 + 1, rows * cols / 5, rows * cols}) {
      for (bool affine : {false, true}) {
        for (bool write_back : {false, true}) {
          auto xc = x;
          ops::RowSparse want;
          ops::batch_topk(xc.data(), rows, cols, budget, want, affine ? bias.data() : nullptr,
                          affine ? scale.data() : nullptr, write_back);
          auto dx = to_device(x, ctx);
          auto db = to_device(bias, ctx);
          auto ds = to_device(scale, ctx);
          cuda::DeviceRowSparse out;
          cuda::BatchTopkScratch ws;
          cuda::DeviceBuffer<float> min_sel(1);
          cuda::batch_topk(ctx, dx.data(), rows, cols, budget, affine ? db.data() : nullptr,
                           affine ? ds.data() : nullptr, write_back, out, ws, min_sel.data());
          auto offsets = cuda::download(out.offsets.data(), size_t(rows + 1), ctx.stream());
          const auto n = size_t(offsets.back());
          auto gcols = cuda::download(out.cols.data(), n, ctx.stream());
          auto gvals = cuda::download(out.values.data(), n, ctx.stream());
          auto gx = cuda::download(dx.data(), size_t(rows * cols), ctx.stream());
          const std::string what = cat(rows, "x", cols, " budget ", budget, " affine ", affine,
                                       " write_back ", write_back);
          EXPECT_EQ(offsets, want.offsets) << what;
          EXPECT_EQ(gcols, want.cols) << what;
          EXPECT_EQ(gvals, want.values) << what;
          EXPECT_EQ(gx, xc) << what << " (the matrix after the call)";
          const float m = cuda::download(min_sel.data(), 1, ctx.stream())[0];
          const float want_min = want.values.empty()
                                     ? 0.0f
                                     : *std::min_element(want.values.begin(), want.values.end());
          EXPECT_EQ(m, want_min) << what;
        }
      }
    }
  }
}

// The sampled rows (every 4th) hold every large value, so the bound from the sample is too high;
// and a matrix of equal values overflows the candidate buffer: both take the exact row path.
TEST(Cuda, BatchTopKFallsBackToExactWhenTheSampleMisleadsOrCandidatesOverflow) {
  REQUIRE_GPU();
  cuda::Context ctx;
  const int64_t rows = 1024, cols = 300;
  std::vector<float> misleading(size_t(rows * cols)), flat(size_t(rows * cols), 1.0f);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c)
      misleading[size_t(r * cols + c)] =
          (r % 4 == 0 ? 100.0f : 1.0f) + 0.001f * float((r * 7 + c * 13) % 97);
  for (int64_t i = 0; i < rows * cols; i += 101) flat[size_t(i)] = 2.0f;
  for (const auto* x : {&misleading, &flat}) {
    for (int64_t budget : {int64_t(1000), int64_t(90000), int64_t(200000)}) {
      ops::RowSparse want;
      ops::batch_topk_reference(x->data(), rows, cols, budget, want);
      auto dx = to_device(*x, ctx);
      cuda::DeviceRowSparse out;
      cuda::BatchTopkScratch ws;
      cuda::DeviceBuffer<float> min_sel(1);
      cuda::batch_topk(ctx, dx.data(), rows, cols, budget, nullptr, nullptr, false, out, ws,
                       min_sel.data());
      auto offsets = cuda::download(out.offsets.data(), size_t(rows + 1), ctx.stream());
      const std::string what = cat(x == &flat ? "flat" : "misleading", " budget ", budget);
      EXPECT_EQ(offsets, want.offsets) << what;
      EXPECT_EQ(cuda::download(out.cols.data(), size_t(offsets.back()), ctx.stream()), want.cols)
          << what;
      EXPECT_EQ(cuda::download(out.values.data(), size_t(offsets.back()), ctx.stream()),
                want.values)
          << what;
    }
  }
}

TEST(Cuda, TopkRowsMatchesCpuWithTiesAndNegatives) {
  REQUIRE_GPU();
  cuda::Context ctx;
  for (auto [rows, cols, k] : {std::tuple<int64_t, int64_t, int64_t>{13, 77, 5},
                               {3, 2049, 1152},
                               {40, 9, 9},
                               {7, 300, 1}}) {
    auto x = test::random_vector(size_t(rows * cols), uint32_t(cols + k));
    for (int64_t i = 0; i < rows * cols; i += 5) x[size_t(i)] = -0.25f;
    for (int64_t i = 2; i < rows * cols; i += 13) x[size_t(i)] = 0.5f;
    std::vector<int32_t> wi(size_t(rows * k));
    std::vector<float> wv(size_t(rows * k));
    ops::topk_rows_reference(x.data(), rows, cols, k, wi.data(), wv.data());
    auto dx = to_device(x, ctx);
    cuda::DeviceBuffer<int32_t> gi(size_t(rows * k));
    cuda::DeviceBuffer<float> gv(size_t(rows * k));
    cuda::topk_rows(ctx, dx.data(), rows, cols, k, gi.data(), gv.data());
    EXPECT_EQ(cuda::download(gi.data(), wi.size(), ctx.stream()), wi) << rows << "x" << cols;
    EXPECT_EQ(cuda::download(gv.data(), wv.size(), ctx.stream()), wv) << rows << "x" << cols;
  }
}

TEST(Cuda, GemmMatchesCpuInEachPrecision) {
  REQUIRE_GPU();
  cuda::Context ctx;
  const int64_t M = 67, N = 131, K = 45;
  for (auto ta : {ops::Trans::No, ops::Trans::Yes})
    for (auto tb : {ops::Trans::No, ops::Trans::Yes})
      for (auto prec : {cuda::Precision::Fp32, cuda::Precision::Tf32, cuda::Precision::Bf16}) {
        auto a = test::random_vector(size_t(M * K), 1), b = test::random_vector(size_t(K * N), 2);
        auto c = test::random_vector(size_t(M * N), 3);
        const int64_t lda = ta == ops::Trans::No ? K : M, ldb = tb == ops::Trans::No ? N : K;
        auto want = c;
        ops::gemm(ta, tb, M, N, K, 0.5f, a.data(), lda, b.data(), ldb, 0.25f, want.data(), N);
        auto da = to_device(a, ctx), db = to_device(b, ctx), dc = to_device(c, ctx);
        cuda::DeviceBuffer<uint16_t> ha(a.size()), hb(b.size());
        const bool bf = prec == cuda::Precision::Bf16;
        if (bf) {
          cuda::to_bf16(ctx, da.data(), ha.data(), int64_t(a.size()));
          cuda::to_bf16(ctx, db.data(), hb.data(), int64_t(b.size()));
        }
        cuda::gemm(ctx, ta, tb, M, N, K, 0.5f,
                   {bf ? static_cast<const void*>(ha.data()) : da.data(), bf, lda},
                   {bf ? static_cast<const void*>(hb.data()) : db.data(), bf, ldb}, 0.25f,
                   dc.data(), N, prec);
        const double tol = prec == cuda::Precision::Fp32   ? 1e-5
                           : prec == cuda::Precision::Tf32 ? 3e-3
                                                           : 2e-2;
        test::expect_close(cuda::download(dc.data(), c.size(), ctx.stream()), want, tol,
                           cat("gemm ", cuda::precision_name(prec)));
      }
}

TEST(Cuda, AdamWithClipMatchesCpu) {
  REQUIRE_GPU();
  cuda::Context ctx;
  for (float beta1 : {0.9f, 0.0f}) {
    const int64_t n = 1001;
    auto p = test::random_vector(size_t(n), 1), g = test::random_vector(size_t(n), 2, 3.0f);
    std::vector<float> m(size_t(n), 0.1f), v(size_t(n), 0.2f);
    double norm_sq = 0;
    for (float x : g) norm_sq += double(x) * x;
    const float scale = float(std::min(1.0 / (std::sqrt(norm_sq) + 1e-6), 1.0));
    auto dp = to_device(p, ctx), dg = to_device(g, ctx), dm = to_device(m, ctx),
         dv = to_device(v, ctx);
    auto dn = to_device(std::vector<double>{norm_sq}, ctx);
    for (int64_t step = 1; step <= 3; ++step) {
      ops::AdamStep a{1e-3f, beta1, 0.999f, 1e-8f, step};
      ops::adam_update(p.data(), g.data(), m.data(), v.data(), n, a, scale);
      cuda::adam_update(ctx, dp.data(), dg.data(), dm.data(), dv.data(), n, a, dn.data(), 1.0);
    }
    test::expect_close(cuda::download(dp.data(), p.size(), ctx.stream()), p, 1e-6, "adam p");
    test::expect_close(cuda::download(dv.data(), v.size(), ctx.stream()), v, 1e-6, "adam v");
    if (beta1 != 0.0f)
      test::expect_close(cuda::download(dm.data(), m.size(), ctx.stream()), m, 1e-6, "adam m");
  }
}

// ---- inference ---------------------------------------------------------------------------------

TEST(CudaSae, EncodeAndDecodeMatchCpuForEveryArchitecture) {
  REQUIRE_GPU();
  struct Arch {
    Architecture a;
    InputNorm norm;
    bool rescale, b_dec_in;
    int64_t d_in;
  };
  for (const Arch& c :
       {Arch{Architecture::Standard, InputNorm::None, false, true, 72},
        Arch{Architecture::JumpReLU, InputNorm::None, false, true, 37},
        Arch{Architecture::TopK, InputNorm::None, false, true, 72},
        Arch{Architecture::TopK, InputNorm::None, true, false, 37},
        Arch{Architecture::Standard, InputNorm::ConstantNormRescale, false, true, 40},
        Arch{Architecture::JumpReLU, InputNorm::LayerNorm, false, false, 72}}) {
    SaeConfig cfg;
    cfg.architecture = c.a;
    cfg.d_in = c.d_in;
    cfg.d_sae = 333;
    cfg.k = 7;
    cfg.normalize_activations = c.norm;
    cfg.rescale_acts_by_decoder_norm = c.rescale;
    cfg.apply_b_dec_to_input = c.b_dec_in;
    Sae s(cfg);
    s.W_enc = test::random_vector(s.W_enc.size(), 1, 0.2f);
    s.W_dec = test::random_vector(s.W_dec.size(), 2, 0.2f);
    s.b_enc = test::random_vector(s.b_enc.size(), 3, 0.1f);
    s.b_dec = test::random_vector(s.b_dec.size(), 4, 0.1f);
    if (c.a == Architecture::JumpReLU) {
      s.threshold = test::random_vector(s.threshold.size(), 5, 0.3f);
      for (auto& v : s.threshold) v = std::abs(v);
    }
    const int64_t n = 301;
    auto x = test::random_vector(size_t(n * c.d_in), 6);
    const SparseCodes want = s.encode(x, n);
    const auto want_hat = s.decode(want);
    const std::string what = cat(architecture_name(c.a), " ", input_norm_name(c.norm), " d_in ",
                                 c.d_in, c.rescale ? " rescale" : "");
    for (const char* prec : {"fp32", "bf16"}) {
      DeviceSae dev(s, prec, 128);  // three chunks, the last partial: the double-buffered copy
      std::vector<float> hat;
      const SparseCodes got = dev.encode_decode(x, n, hat);
      if (std::string(prec) == "fp32") {
        EXPECT_EQ(got.offsets, want.offsets) << what;
        EXPECT_EQ(got.indices, want.indices) << what;
        test::expect_close(got.values, want.values, 1e-5, what + " values");
        test::expect_close(hat, want_hat, 1e-5, what + " decode");
        test::expect_close(got.out_scale, want.out_scale, 1e-6, what + " out_scale");
      } else {
        // bf16 operands move pre-activations by ~2^-9 relative, which swaps latents near the
        // cut (a TopK row's k-th value, a JumpReLU threshold): with random weights every swap
        // moves x_hat by a whole decoder row, so the bound is on the whole reconstruction.
        double num = 0, den = 0;
        for (size_t i = 0; i < hat.size(); ++i)
          num += std::pow(double(hat[i]) - want_hat[i], 2), den += std::pow(double(want_hat[i]), 2);
        EXPECT_LT(std::sqrt(num / den), 0.15) << what << " bf16 decode";
      }
    }
  }
}

// ---- the training step ----------------------------------------------------------------------

struct StepCase {
  std::string name;
  train::TrainSpec spec;
  bool with_dead = false;
};

void PrintTo(const StepCase& c, std::ostream* os) {
  *os << c.name;
}

train::TrainSpec base_spec() {
  train::TrainSpec s;
  s.d_in = 37;
  s.d_sae = 301;
  s.k = 6;
  s.widths = {19, 75, 301};
  s.level_loss = {train::LevelLoss::Mse, train::LevelLoss::Mse, train::LevelLoss::Mse};
  s.level_weight = {1, 1, 1};
  return s;
}

std::vector<StepCase> step_cases() {
  using train::LevelLoss;
  std::vector<StepCase> out;
  out.push_back({"matryoshka_mse", base_spec()});
  {
    auto s = base_spec();
    s.widths = {301};
    s.level_loss = {LevelLoss::Mse};
    s.level_weight = {1};
    out.push_back({"plain_batchtopk", s, true});
  }
  {
    auto s = base_spec();
    s.level_loss = {LevelLoss::L2, LevelLoss::L2, LevelLoss::Mse};
    out.push_back({"snap_per_level_aux", s, true});
    out.back().spec.per_level_aux = true;
  }
  {
    auto s = base_spec();
    s.level_loss = {LevelLoss::L2, LevelLoss::Mse, LevelLoss::L2};
    s.l2_power = 1.5;
    s.level_weight = {0.25, 0.5, 1.0};
    s.detach_levels = true;
    out.push_back({"balanced_detached", s});
  }
  {
    auto s = base_spec();
    s.rescale_acts_by_decoder_norm = true;
    s.aux_coefficient = 0.7;
    out.push_back({"rescale_with_aux", s, true});
  }
  {
    auto s = base_spec();
    s.apply_b_dec_to_input = false;
    s.rescale_acts_by_decoder_norm = true;
    s.per_level_aux = true;
    s.level_loss = {LevelLoss::L2, LevelLoss::L2, LevelLoss::Mse};
    out.push_back({"snap_rescale_no_bdec_in", s, true});
  }
  // d_in % 4 == 0 takes the float4 kernels (2, then 3 float4 per thread).
  {
    auto s = base_spec();
    s.d_in = 1028;
    out.push_back({"matryoshka_mse_d1028", s, true});
  }
  {
    auto s = base_spec();
    s.d_in = 2304;
    s.level_loss = {LevelLoss::L2, LevelLoss::L2, LevelLoss::Mse};
    s.per_level_aux = true;
    out.push_back({"snap_per_level_aux_d2304", s, true});
  }
  return out;
}

struct StepFixture {
  train::TrainingSae sae;
  std::vector<float> x;
  std::vector<uint8_t> dead;
  int64_t B = 67;
  explicit StepFixture(const StepCase& c) : sae(c.spec) {
    Rng rng(42);
    for (auto& w : sae.W_encT) w = float(rng.normal() * 0.3);
    for (auto& w : sae.W_dec) w = float(rng.normal() * 0.2);
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

class CudaStep : public ::testing::TestWithParam<StepCase> {};

TEST_P(CudaStep, ForwardBackwardMatchesCpuInFp32) {
  REQUIRE_GPU();
  StepFixture f(GetParam());
  train::Grads want;
  want.resize(f.sae.spec.d_in, f.sae.spec.d_sae);
  train::StepWorkspace ws;
  const train::StepResult r = train::forward_backward(f.sae, f.x.data(), f.B, f.dead, want, ws);

  train::Optimizer opt(f.sae, {});
  train::DeviceTrainer dev(f.sae.spec, {}, f.B, "fp32");
  dev.upload(f.sae, opt, {}, {});
  train::Grads got;
  const train::StepResult q = dev.forward_backward(f.x.data(), f.dead, got);

  EXPECT_EQ(q.n_active, r.n_active);
  EXPECT_EQ(q.fired, r.fired) << "the selected latents";
  // The GEMM sums in another order: values agree to rounding, the selection exactly.
  EXPECT_NEAR(q.min_selected, r.min_selected, 1e-5 * std::abs(r.min_selected));
  EXPECT_EQ(q.n_dead, r.n_dead);
  EXPECT_NEAR(q.loss, r.loss, 1e-5 * std::abs(r.loss));
  EXPECT_NEAR(q.aux_loss, r.aux_loss, 1e-5 * std::abs(r.aux_loss) + 1e-12);
  EXPECT_NEAR(q.outer_sq_error, r.outer_sq_error, 1e-5 * r.outer_sq_error);
  for (size_t i = 0; i < r.level_loss.size(); ++i)
    EXPECT_NEAR(q.level_loss[i], r.level_loss[i], 1e-5 * std::abs(r.level_loss[i])) << i;
  test::expect_close(got.W_encT, want.W_encT, 1e-4, "dW_encT");
  test::expect_close(got.W_dec, want.W_dec, 1e-4, "dW_dec");
  test::expect_close(got.b_enc, want.b_enc, 1e-4, "db_enc");
  test::expect_close(got.b_dec, want.b_dec, 1e-4, "db_dec");
}

TEST_P(CudaStep, FullStepsMatchCpuTrainerArithmetic) {
  // Three steps of: dead mask from the counters -> forward/backward -> threshold -> counters ->
  // clip + Adam, against the same sequence on the CPU.
  REQUIRE_GPU();
  StepFixture f(GetParam());
  train::TrainingSae cpu = f.sae;
  train::AdamConfig adam;
  adam.beta1 = GetParam().with_dead ? 0.0 : 0.9;  // both optimizer layouts
  train::Optimizer opt(cpu, adam);
  const int64_t D = f.sae.spec.d_sae, window = 1;
  std::vector<int64_t> since(size_t(D), 0), counts(size_t(D), 0);
  for (int64_t j = 0; j < D; j += 2) since[size_t(j)] = 5;  // some start dead
  train::DeviceTrainer dev(f.sae.spec, adam, f.B, "fp32");
  dev.upload(cpu, opt, since, counts);
  train::Grads g;
  g.resize(f.sae.spec.d_in, D);
  train::StepWorkspace ws;
  for (int64_t step = 1; step <= 3; ++step) {
    std::vector<float> x = test::random_vector(f.x.size(), uint32_t(100 + step));
    const double input_scale = 1.25;
    std::copy(x.begin(), x.end(), dev.host_batch());
    const auto out = dev.step(input_scale, 1e-3, step, window, step == 3);
    for (auto& v : x) v = float(v * input_scale);
    // The progress line's batch variance, taken on the device from the scaled batch.
    const double sq_dev = train::sum_sq_deviation(x.data(), f.B, f.sae.spec.d_in);
    EXPECT_NEAR(dev.batch_sq_deviation(), sq_dev, 1e-9 * sq_dev) << "step " << step;
    std::vector<uint8_t> dead(static_cast<size_t>(D));
    bool any = false;
    for (int64_t j = 0; j < D; ++j) any |= (dead[size_t(j)] = since[size_t(j)] > window) != 0;
    g.clear();
    const auto r =
        train::forward_backward(cpu, x.data(), f.B, any ? dead : std::vector<uint8_t>{}, g, ws);
    cpu.update_threshold(r.min_selected, r.n_active > 0);
    for (int64_t j = 0; j < D; ++j) {
      since[size_t(j)] = r.fired[size_t(j)] ? 0 : since[size_t(j)] + 1;
      if (step == 3) counts[size_t(j)] = 0;
    }
    for (int32_t j : ws.active.cols) counts[size_t(j)]++;
    const double norm = opt.step(cpu, g, 1e-3);
    EXPECT_NEAR(out.result.loss, r.loss, 1e-4 * std::abs(r.loss)) << "step " << step;
    EXPECT_EQ(out.result.n_active, r.n_active) << "step " << step;
    EXPECT_NEAR(out.grad_norm, norm, 1e-4 * norm) << "step " << step;
    EXPECT_NEAR(out.threshold, cpu.threshold, 1e-6 * std::abs(cpu.threshold)) << "step " << step;
  }
  train::TrainingSae got = f.sae;
  train::Optimizer got_opt(got, adam);
  std::vector<int64_t> got_since, got_counts;
  dev.download(got, &got_opt, &got_since, &got_counts);
  // Adam divides by sqrt(v): where a gradient is ~0 its rounding decides the step's sign (a move
  // of up to lr). So: nearly every entry within 1e-4 relative, none further than 2 lr per step.
  auto expect_params = [&](const std::vector<float>& a, const std::vector<float>& b,
                           const char* what) {
    ASSERT_EQ(a.size(), b.size());
    size_t loose = 0;
    for (size_t i = 0; i < a.size(); ++i) {
      const double diff = std::abs(double(a[i]) - b[i]);
      loose += diff > 1e-4 * (std::abs(double(b[i])) + 1e-3);
      EXPECT_LE(diff, 2 * 1e-3 * 3) << what << "[" << i << "]";
    }
    EXPECT_LE(double(loose), 1e-4 * double(a.size()) + 1) << what << ": entries beyond 1e-4";
  };
  expect_params(got.W_encT, cpu.W_encT, "W_encT");
  expect_params(got.W_dec, cpu.W_dec, "W_dec");
  expect_params(got.b_enc, cpu.b_enc, "b_enc");
  expect_params(got.b_dec, cpu.b_dec, "b_dec");
  test::expect_close(got_opt.v_W_dec, opt.v_W_dec, 1e-3, "v_W_dec");
  EXPECT_EQ(got_since, since);
  EXPECT_EQ(got_counts, counts);
}

TEST(CudaTrainer, EvaluationOnTheDeviceMatchesTheHost) {
  // A trainer on the GPU makes its inference SAE there (DeviceTrainer::inference_sae: the
  // input scale and decoder norms folded in as TrainingSae::to_inference does) and evaluates it
  // through DeviceSae (the levels' errors summed on the device): the same metrics and level EVs
  // as train::evaluate of the host's to_inference, in chunks of 128 tokens.
  REQUIRE_GPU();
  struct Case {
    int64_t d_in;
    double input_scale;
    bool fold, rescale;
  };
  for (const Case c : {Case{37, 1.0, true, false}, Case{37, 1.7, false, false},
                       Case{2304, 0.6, true, false}, Case{37, 1.3, true, true}}) {
    train::TrainSpec spec = base_spec();
    spec.d_in = c.d_in;
    spec.rescale_acts_by_decoder_norm = c.rescale;
    train::TrainingSae sae(spec);
    Rng rng(7);
    for (auto& w : sae.W_encT) w = float(rng.normal() * 0.3);
    for (auto& w : sae.W_dec) w = float(rng.normal() * 0.2);
    for (auto& w : sae.b_enc) w = float(rng.normal() * 0.1);
    for (auto& w : sae.b_dec) w = float(rng.normal() * 0.2);
    sae.threshold = c.rescale ? 3.0 : 1.5;
    const Sae inference = sae.to_inference(c.input_scale, c.fold, nlohmann::ordered_json());
    const int64_t n = 300;
    std::vector<float> x = test::random_vector(size_t(n * c.d_in), 9);
    for (size_t i = 0; i < x.size(); ++i) x[i] += float(i % size_t(c.d_in)) * 0.01f;  // a mean
    const std::string at = "d_in " + std::to_string(c.d_in) + ", scale " +
                           std::to_string(c.input_scale) + (c.fold ? ", folded" : "") +
                           (c.rescale ? ", rescaled" : "");
    const train::EvalResult host = train::evaluate(inference, spec.widths, x.data(), n);
    ASSERT_GT(host.metrics.l0, 1.0) << at;
    const double sq_dev = train::sum_sq_deviation(x.data(), n, c.d_in);
    auto expect_same = [&](const train::EvalResult& got, const std::string& how) {
      EXPECT_NEAR(got.metrics.l0, host.metrics.l0, 1e-3 * host.metrics.l0) << at << how;
      EXPECT_NEAR(got.metrics.l1, host.metrics.l1, 1e-3 * host.metrics.l1) << at << how;
      EXPECT_NEAR(got.metrics.mse, host.metrics.mse, 1e-4 * host.metrics.mse) << at << how;
      EXPECT_NEAR(got.metrics.explained_variance, host.metrics.explained_variance, 1e-4)
          << at << how;
      ASSERT_EQ(got.level_explained_variance.size(), spec.widths.size()) << at << how;
      for (size_t i = 0; i < spec.widths.size(); ++i)
        EXPECT_NEAR(got.level_explained_variance[i], host.level_explained_variance[i], 1e-4)
            << at << how << ", level " << i;
      // The outer level is the whole reconstruction.
      EXPECT_NEAR(got.level_explained_variance.back(), got.metrics.explained_variance, 1e-5)
          << at << how;
    };
    // The host's inference SAE uploaded.
    DeviceSae uploaded(inference, "fp32", 128);
    expect_same(train::evaluate(uploaded, spec.widths, x.data(), n, sq_dev), ": uploaded");
    // Made on the device from the training state.
    train::AdamConfig adam;
    train::Optimizer opt(sae, adam);
    train::DeviceTrainer dev(spec, adam, 64, "fp32");
    dev.upload(sae, opt, {}, {});
    const auto made = dev.inference_sae(c.input_scale, c.fold, sae.inference_config({}));
    ASSERT_TRUE(made);
    expect_same(train::evaluate(*made, spec.widths, x.data(), n, sq_dev), ": made there");
  }
}

TEST_P(CudaStep, ReducedPrecisionStaysWithinDerivedTolerance) {
  // tf32 / bf16 change only the encoder GEMM's operands: pre-activations move by ~2^-11 / 2^-8
  // relative, which can swap entries at the selection cut, so the check is on the losses and
  // the gradient as a whole (relative L2 error), not entry by entry.
  REQUIRE_GPU();
  StepFixture f(GetParam());
  train::Grads want;
  want.resize(f.sae.spec.d_in, f.sae.spec.d_sae);
  train::StepWorkspace ws;
  const auto r = train::forward_backward(f.sae, f.x.data(), f.B, f.dead, want, ws);
  train::Optimizer opt(f.sae, {});
  for (auto [prec, tol] : {std::pair<const char*, double>{"tf32", 2e-2}, {"bf16", 8e-2}}) {
    train::DeviceTrainer dev(f.sae.spec, {}, f.B, prec);
    dev.upload(f.sae, opt, {}, {});
    train::Grads got;
    const auto q = dev.forward_backward(f.x.data(), f.dead, got);
    EXPECT_NEAR(q.loss, r.loss, tol * std::abs(r.loss)) << prec;
    double num = 0, den = 0;
    for (size_t i = 0; i < want.W_dec.size(); ++i)
      num += std::pow(double(got.W_dec[i]) - want.W_dec[i], 2),
          den += std::pow(double(want.W_dec[i]), 2);
    EXPECT_LT(std::sqrt(num / den), 4 * tol) << prec << " dW_dec relative L2 error";
  }
}

// The trainer on the GPU: a run stopped between checkpoints and resumed in a fresh Trainer ends
// bit-identical to a straight run (every reduction on the device sums in a fixed order), in fp32
// and bf16, with AuxK active, also when the host drops its copy of the state between
// checkpoints; and it learns what the CPU run learns.
TEST(CudaTrainer, KillAndResumeIsBitIdenticalAndMatchesTheCpuRun) {
  REQUIRE_GPU();
  test::TempDir dir;
  using nlohmann::json;
  auto run = [&](const std::string& out, const std::string& device, const std::string& precision,
                 int64_t stop_at, bool keep_host_state = true) {
    json j = test::tiny_trainer_config(out);
    j["training"].update({{"total_tokens", 128 * 300},
                          {"eval_every_steps", 100},
                          {"log_every_steps", 50},
                          {"checkpoint_every_steps", 40},
                          {"device", device},
                          {"precision", precision}});
    j["optimizer"]["adam_beta1"] = 0.0;
    train::TrainConfig cfg = train::TrainConfig::from_json(j, "test");
    data::SyntheticSource src(data::SyntheticConfig::from_json(cfg.data, "test"));
    train::Trainer t(cfg, src, "test");
    t.keep_host_state = keep_host_state;
    if (!t.run(false, stop_at)) {
      if (!keep_host_state) {
        EXPECT_THROW(t.inference_sae(), Error);  // on the GPU only
      }
      train::Trainer t2(cfg, src, "test");
      t2.keep_host_state = keep_host_state;
      EXPECT_TRUE(t2.run(true));
      return t2.final_eval().metrics.explained_variance;
    }
    EXPECT_NO_THROW(t.inference_sae());  // finish() pulled it
    return t.final_eval().metrics.explained_variance;
  };
  for (const char* prec : {"fp32", "bf16"}) {
    const std::string p = prec;
    const double ev_a = run(dir / ("straight_" + p), "cuda", p, -1);
    const double ev_b = run(dir / ("killed_" + p), "cuda", p, 123);
    EXPECT_NEAR(ev_a, ev_b, 1e-9) << p;  // the host's evaluation sums over OpenMP threads
    // No host copy between checkpoints (a release's trainers): pulled again each time.
    const double ev_c = run(dir / ("dropped_" + p), "cuda", p, 123, false);
    EXPECT_NEAR(ev_a, ev_c, 1e-9) << p;
    for (const char* f : {"sae/sae_weights.safetensors", "sae/sparsity.safetensors"})
      for (const char* other : {"killed_", "dropped_"})
        EXPECT_EQ(test::read_bytes(dir / ("straight_" + p + "/" + f)),
                  test::read_bytes(dir / (other + p + "/" + f)))
            << p << " " << other << f;
    const double ev_cpu = run(dir / ("cpu_" + p), "cpu", "fp32", -1);
    EXPECT_NEAR(ev_a, ev_cpu, 0.01) << p << ": GPU EV " << ev_a << ", CPU EV " << ev_cpu;
  }
}

// A divergence on the device (a batch of values too large for f32 at the 18th step) rolls the
// SAE back to its checkpoint of step 15 as on the CPU: the state read back is uploaded (the
// poisoned one overwritten), with and without a host copy kept; the run ends near the CPU's,
// and one stopped after the rollback and resumed ends at the same bits.
TEST(CudaTrainer, DivergenceRollsBackOnTheDeviceAsOnTheCpu) {
  REQUIRE_GPU();
  test::TempDir dir;
  using nlohmann::json;
  auto huge = [](float* x, int64_t n) {
    for (int64_t i = 0; i < n; ++i) x[i] = x[i] < 0 ? -1e30f : 1e30f;
  };
  auto run = [&](const std::string& out, const std::string& device, int64_t stop_at,
                 bool keep_host_state) {
    json j = test::tiny_trainer_config(out);
    j["training"]["device"] = device;
    const train::TrainConfig cfg = train::TrainConfig::from_json(j, "test");
    data::SyntheticSource clean(data::SyntheticConfig::from_json(cfg.data, "test"));
    test::SpoiledSource spoiled(clean, 17, huge, 18);
    for (bool resume : {false, true}) {
      train::Trainer t(cfg, spoiled, "test");
      t.keep_host_state = keep_host_state;
      if (!t.run(resume, resume ? -1 : stop_at)) continue;
      EXPECT_EQ(t.rollbacks().size(), 1u) << device;
      EXPECT_EQ(t.skipped_steps(), 3) << device;
      return t.final_eval().metrics.explained_variance;
    }
    ADD_FAILURE() << "the resumed run did not finish";
    return 0.0;
  };
  const double ev_gpu = run(dir / "gpu", "cuda", -1, true);
  EXPECT_TRUE(std::isfinite(ev_gpu));
  const double ev_dropped = run(dir / "dropped", "cuda", -1, false);
  EXPECT_NEAR(ev_gpu, ev_dropped, 1e-9);
  const double ev_stopped = run(dir / "stopped", "cuda", 25, false);
  EXPECT_NEAR(ev_gpu, ev_stopped, 1e-9);
  for (const char* other : {"dropped", "stopped"})
    EXPECT_EQ(test::read_bytes(dir / "gpu/sae/sae_weights.safetensors"),
              test::read_bytes(dir / (std::string(other) + "/sae/sae_weights.safetensors")))
        << other;
  const double ev_cpu = run(dir / "cpu", "cpu", -1, true);
  EXPECT_NEAR(ev_gpu, ev_cpu, 0.01) << "GPU EV " << ev_gpu << ", CPU EV " << ev_cpu;
}

INSTANTIATE_TEST_SUITE_P(Specs, CudaStep, ::testing::ValuesIn(step_cases()),
                         [](const auto& info) { return info.param.name; });

#endif  // SAECPP_HAS_CUDA

}  // namespace
}  // namespace sae

// Every CPU kernel set this build has and this CPU runs (ops/cpu_kernels.h) against the plain
// references: the selection exactly (same arithmetic, any vector width), Adam against the double
// reference, the reductions within float rounding. Lengths cover empty, one vector, one vector
// and a tail, and release-sized rows.
#include <gtest/gtest.h>

#include <cmath>
#include <limits>

#include "ops/adam.h"
#include "ops/cpu_kernels.h"
#include "test_util.h"

namespace sae::ops {
namespace {

const int64_t kLengths[] = {0, 1, 7, 8, 15, 16, 17, 33, 1000, 2304, 32768 + 5};

std::string name_of(const CpuKernels& k, int64_t n) {
  return std::string(k.name) + " n=" + std::to_string(n);
}

TEST(CpuKernels, TheChosenSetIsTheBestRunnableOneUnlessPinned) {
  const auto sets = runnable_cpu_kernels();
  ASSERT_FALSE(sets.empty());
  const char* pinned = std::getenv("SAECPP_CPU");
  EXPECT_STREQ(cpu_kernels().name, pinned && *pinned ? pinned : sets.front()->name);
  EXPECT_NE(cpu_kernels_summary().find(cpu_kernels().name), std::string::npos);
#if defined(__x86_64__)
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl")) {
    EXPECT_STREQ(sets.front()->name, "avx512") << "this CPU has AVX-512: the set must be used";
  }
#endif
}

TEST(CpuKernels, AffineSelectEqualsReferenceInEverySet) {
  for (const CpuKernels* k : runnable_cpu_kernels())
    for (int64_t n : kLengths) {
      const auto x = test::random_vector(size_t(n), 1), bias = test::random_vector(size_t(n), 2),
                 scale = test::random_vector(size_t(n), 3);
      for (int affine = 0; affine < 4; ++affine)
        for (float lo : {0.0f, -1.0f, 0.8f, std::numeric_limits<float>::infinity()}) {
          const float* b = affine & 1 ? bias.data() : nullptr;
          const float* s = affine & 2 ? scale.data() : nullptr;
          std::vector<float> y(size_t(n), -7.0f), y_ref(size_t(n), -7.0f);
          std::vector<float> vals(size_t(n + 16)), vals_ref(size_t(n + 16));
          std::vector<int32_t> cols(size_t(n + 16)), cols_ref(size_t(n + 16));
          const int64_t got =
              k->affine_select(x.data(), b, s, n, lo, y.data(), cols.data(), vals.data());
          const int64_t want = affine_select_reference(x.data(), b, s, n, lo, y_ref.data(),
                                                       cols_ref.data(), vals_ref.data());
          const std::string what =
              name_of(*k, n) + " affine " + std::to_string(affine) + " lo " + std::to_string(lo);
          ASSERT_EQ(got, want) << what;
          EXPECT_EQ(y, y_ref) << what;
          cols.resize(size_t(got)), cols_ref.resize(size_t(got));
          vals.resize(size_t(got)), vals_ref.resize(size_t(got));
          EXPECT_EQ(cols, cols_ref) << what;
          EXPECT_EQ(vals, vals_ref) << what;
          // In place (y over x) and without y gives the same selection.
          auto x2 = x;
          EXPECT_EQ(k->affine_select(x2.data(), b, s, n, lo, x2.data(), cols.data(), vals.data()),
                    want)
              << what;
          EXPECT_EQ(x2, y_ref) << what;
          EXPECT_EQ(k->affine_select(x.data(), b, s, n, lo, nullptr, cols.data(), vals.data()),
                    want)
              << what;
        }
    }
}

TEST(CpuKernels, AffineSelectKeepsPositiveEntriesAtOrAboveTheBound) {
  const float inf = std::numeric_limits<float>::infinity(), nan = std::nanf("");
  std::vector<float> x = {0.0f, -0.0f, 1e-45f, -1e-45f, nan, inf, -inf, 0.5f, 0.5f, 0.49999997f};
  x.resize(40, -1.0f);  // past one vector so the vector path sees every special value
  for (const CpuKernels* k : runnable_cpu_kernels()) {
    std::vector<float> vals(x.size() + 16);
    std::vector<int32_t> cols(x.size() + 16);
    EXPECT_EQ(k->affine_select(x.data(), nullptr, nullptr, int64_t(x.size()), 0.0f, nullptr,
                               cols.data(), vals.data()),
              5)
        << k->name;  // the denormal 1e-45, inf, 0.5, 0.5, 0.49999997: not zeros, NaN, negatives
    const int64_t n = k->affine_select(x.data(), nullptr, nullptr, int64_t(x.size()), 0.5f, nullptr,
                                       cols.data(), vals.data());
    ASSERT_EQ(n, 3) << k->name;  // inf, 0.5, 0.5 (>= the bound; NaN never)
    EXPECT_EQ(cols[0], 5);
    EXPECT_EQ(cols[1], 7);
    EXPECT_EQ(cols[2], 8);
  }
}

TEST(CpuKernels, AdamEqualsTheDoubleReferenceInEverySet) {
  for (const CpuKernels* k : runnable_cpu_kernels())
    for (int64_t n : kLengths)
      for (float beta1 : {0.9f, 0.3f, 0.0f})  // lerp weight below and above 0.5; no momentum
        for (bool zero_grad : {false, true}) {
          const auto g = test::random_vector(size_t(n), 4);
          const std::vector<float> g_used = zero_grad ? std::vector<float>(size_t(n), 0.0f) : g;
          auto p = test::random_vector(size_t(n), 5), p_ref = p;
          auto m = test::random_vector(size_t(n), 6, 0.1f), m_ref = m;
          std::vector<float> v(static_cast<size_t>(n)), v_ref;
          for (size_t i = 0; i < v.size(); ++i) v[i] = 0.01f + 0.001f * float(i % 17);
          v_ref = v;
          for (int64_t step = 1; step <= 3; ++step) {
            const AdamStep a{1e-3f, beta1, 0.999f, 1e-8f, step};
            const double bc1 = 1.0 - std::pow(double(beta1), double(step));
            const double bc2 = 1.0 - std::pow(0.999, double(step));
            const AdamCoeffs c{0.999f, 1.0f - beta1, float(1e-3 / bc1), float(std::sqrt(bc2)),
                               1e-8f};
            k->adam(p.data(), zero_grad ? nullptr : g.data(), beta1 == 0.0f ? nullptr : m.data(),
                    v.data(), n, c, 0.5f);
            adam_update_reference(p_ref.data(), g_used.data(), m_ref.data(), v_ref.data(), n, a,
                                  0.5f);
          }
          const std::string what =
              name_of(*k, n) + " beta1 " + std::to_string(beta1) + (zero_grad ? " zero grad" : "");
          test::expect_close(p, p_ref, 1e-6, what + " p");
          test::expect_close(v, v_ref, 1e-6, what + " v");
          if (beta1 != 0.0f) test::expect_close(m, m_ref, 1e-6, what + " m");
        }
}

TEST(CpuKernels, DotAxpyAndSumSquaresEqualReferencesInEverySet) {
  for (const CpuKernels* k : runnable_cpu_kernels())
    for (int64_t n : kLengths) {
      const auto a = test::random_vector(size_t(n), 7), b = test::random_vector(size_t(n), 8);
      const auto y0 = test::random_vector(size_t(n), 9);
      const std::string what = name_of(*k, n);
      double abs_dot = 0, sq = 0;
      for (int64_t i = 0; i < n; ++i)
        abs_dot += std::abs(double(a[size_t(i)]) * b[size_t(i)]),
            sq += double(a[size_t(i)]) * a[size_t(i)];
      // Float accumulation in any order (one lane per element where a build does not vectorise,
      // e.g. the sanitizer build): rounding errors of random sign, so a few sqrt(n) float
      // epsilons of the sum of magnitudes (the worst case, n epsilons, is far looser).
      const double eps = 6e-8, spread = 4.0 * std::sqrt(double(n)) + 4.0;
      const double tol = spread * eps * abs_dot + 1e-30;
      EXPECT_NEAR(k->dot(a.data(), b.data(), n), dot_reference(a.data(), b.data(), n), tol) << what;
      EXPECT_NEAR(k->sum_squares(a.data(), n), sq, spread * eps * sq + 1e-30) << what;
      std::vector<float> y = y0, y_ref(static_cast<size_t>(n));
      k->axpy(-0.75f, a.data(), y.data(), n);
      for (int64_t i = 0; i < n; ++i) y_ref[size_t(i)] = y0[size_t(i)] + -0.75f * a[size_t(i)];
      test::expect_close(y, y_ref, 1e-7, what + " axpy");
      std::vector<float> y2 = y0;
      const float d = k->dot_axpy(b.data(), a.data(), -0.75f, y2.data(), n);
      EXPECT_NEAR(d, dot_reference(b.data(), a.data(), n), tol) << what;
      test::expect_close(y2, y_ref, 1e-7, what + " dot_axpy");
    }
}

// Gemma-2's elementwise passes against double-precision formulas: the vector tanh and exp are
// SLEEF's 1-ulp functions, so a few float ulps of the result (plus the input's rounding).
TEST(CpuKernels, GeluSoftCapAndExpSumEqualDoubleFormulasInEverySet) {
  for (const CpuKernels* k : runnable_cpu_kernels())
    for (int64_t n : kLengths) {
      const std::string what = name_of(*k, n);
      auto gate = test::random_vector(size_t(n), 10, 3.0f);
      const auto up = test::random_vector(size_t(n), 11), gate0 = gate;
      k->gelu_tanh_mul(gate.data(), up.data(), n);
      std::vector<float> want(static_cast<size_t>(n));
      for (int64_t i = 0; i < n; ++i) {
        const double x = gate0[size_t(i)];
        want[size_t(i)] =
            float(0.5 * x * (1.0 + std::tanh(0.7978845608028654 * (x + 0.044715 * x * x * x))) *
                  up[size_t(i)]);
      }
      test::expect_close(gate, want, 1e-6, what + " gelu_tanh_mul");

      auto logits = test::random_vector(size_t(n), 12, 40.0f);  // past the cap's knee
      const auto logits0 = logits;
      k->soft_cap(logits.data(), n, 30.0f);
      for (int64_t i = 0; i < n; ++i)
        want[size_t(i)] = float(std::tanh(double(logits0[size_t(i)]) / 30.0) * 30.0);
      test::expect_close(logits, want, 1e-6, what + " soft_cap");

      auto scores = test::random_vector(size_t(n), 13, 5.0f);
      const auto scores0 = scores;
      const float sum = k->exp_sum(scores.data(), n, 2.5f);
      double want_sum = 0;
      for (int64_t i = 0; i < n; ++i) {
        want[size_t(i)] = float(std::exp(double(scores0[size_t(i)]) - 2.5));
        want_sum += want[size_t(i)];
      }
      test::expect_close(scores, want, 1e-6, what + " exp_sum values");
      EXPECT_NEAR(sum, want_sum, 1e-5 * want_sum + 1e-30) << what;
    }
}

}  // namespace
}  // namespace sae::ops

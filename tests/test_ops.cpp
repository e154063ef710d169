// Every kernel in ops/ against its plain reference.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <tuple>

#include "core/dtype.h"
#include "ops/attention.h"
#include "ops/gemm.h"
#include "ops/gemm_bf16.h"
#include "ops/select.h"
#include "ops/sparse_decode.h"
#include "test_util.h"

namespace sae::ops {
namespace {

TEST(Gemm, MatchesReferenceAllTransposes) {
  const int64_t m = 37, n = 53, k = 29;
  for (Trans ta : {Trans::No, Trans::Yes})
    for (Trans tb : {Trans::No, Trans::Yes}) {
      auto a = test::random_vector(size_t(m * k), 1);
      auto b = test::random_vector(size_t(k * n), 2);
      auto c0 = test::random_vector(size_t(m * n), 3);
      auto c1 = c0;
      const int64_t lda = ta == Trans::Yes ? m : k, ldb = tb == Trans::Yes ? k : n;
      gemm(ta, tb, m, n, k, 0.5f, a.data(), lda, b.data(), ldb, 2.0f, c0.data(), n);
      gemm_reference(ta, tb, m, n, k, 0.5f, a.data(), lda, b.data(), ldb, 2.0f, c1.data(), n);
      // f32 accumulation over k terms: error ~ k * eps * |terms|.
      test::expect_close(c0, c1, 1e-5, "gemm");
    }
}

// bf16 weights and bf16-rounded inputs, f32 sums: whichever path this build and CPU take
// (oneDNN's bf16 brgemm or sgemm on upcast weights), against the double reference; shapes
// odd and large enough for oneDNN's blocked kernels, output rows strided, and W larger than
// the fallback's 64 MB upcast block (8200 x 2048: two blocks).
TEST(GemmBf16, MatchesReferenceOnEveryShape) {
  std::printf("bf16 GEMM path: %s\n", bf16_gemm_path().c_str());
  for (auto [m, n, k] : {std::tuple<int64_t, int64_t, int64_t>{1, 1, 1},
                         {7, 33, 65},
                         {64, 256, 256},
                         {130, 200, 2304},
                         {3, 8200, 2048}}) {
    SCOPED_TRACE(testing::Message() << m << "x" << n << "x" << k);
    const int64_t ldy = n + 5;
    auto x = test::random_vector(size_t(m * k), 11);
    auto wf = test::random_vector(size_t(n * k), 12);
    std::vector<uint16_t> w(wf.size());
    for (size_t i = 0; i < w.size(); ++i) w[i] = f32_to_bf16(wf[i]);
    std::vector<float> y(size_t(m * ldy), -7.0f), want(size_t(m * ldy), -7.0f), scratch;
    gemm_bf16_weights(m, n, k, x.data(), w.data(), y.data(), ldy, scratch);
    gemm_bf16_weights_reference(m, n, k, x.data(), w.data(), want.data(), ldy);
    test::expect_close(y, want, 1e-5 * std::sqrt(double(k)), "gemm_bf16");
    for (int64_t i = 0; i < m; ++i)  // the padding between rows is not written
      for (int64_t j = n; j < ldy; ++j) ASSERT_EQ(y[size_t(i * ldy + j)], -7.0f);
    // Twice (the cached primitive), and the inputs really are rounded: a non-bf16 x differs.
    gemm_bf16_weights(m, n, k, x.data(), w.data(), y.data(), ldy, scratch);
    test::expect_close(y, want, 1e-5 * std::sqrt(double(k)), "gemm_bf16 again");
  }
}

TEST(TopK, MatchesFullSortIncludingTies) {
  const int64_t rows = 64, cols = 300, k = 17;
  auto x = test::random_vector(size_t(rows * cols), 4);
  for (int64_t r = 0; r < rows; r += 3)  // many exact ties
    for (int64_t c = 0; c < cols; c += 5) x[size_t(r * cols + c)] = 1.0f;
  std::vector<int32_t> i0(size_t(rows * k)), i1(size_t(rows * k));
  std::vector<float> v0(size_t(rows * k)), v1(size_t(rows * k));
  topk_rows(x.data(), rows, cols, k, i0.data(), v0.data());
  topk_rows_reference(x.data(), rows, cols, k, i1.data(), v1.data());
  EXPECT_EQ(i0, i1);
  EXPECT_EQ(v0, v1);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t j = 1; j < k; ++j) EXPECT_LT(i0[size_t(r * k + j - 1)], i0[size_t(r * k + j)]);
}

TEST(TopK, KEqualsCols) {
  std::vector<float> x = {3, 1, 2};
  std::vector<int32_t> i(3);
  std::vector<float> v(3);
  topk_rows(x.data(), 1, 3, 3, i.data(), v.data());
  EXPECT_EQ(i, (std::vector<int32_t>{0, 1, 2}));
  EXPECT_EQ(v, x);
}

TEST(SparseDecode, MatchesDenseReference) {
  const int64_t n = 20, latents = 50, d = 13;
  auto w = test::random_vector(size_t(latents * d), 5);
  auto bias = test::random_vector(size_t(d), 6);
  std::vector<int64_t> offsets = {0};
  std::vector<int32_t> idx;
  std::vector<float> val;
  for (int64_t t = 0; t < n; ++t) {
    for (int32_t i = int32_t(t % 3); i < latents; i += 4 + int32_t(t % 5)) {
      idx.push_back(i);
      val.push_back(0.1f * float(i + t));
    }
    offsets.push_back(int64_t(idx.size()));
  }
  std::vector<float> a(size_t(n * d)), b(size_t(n * d));
  sparse_decode(n, offsets.data(), idx.data(), val.data(), w.data(), d, bias.data(), a.data());
  sparse_decode_reference(n, latents, offsets.data(), idx.data(), val.data(), w.data(), d,
                          bias.data(), b.data());
  test::expect_close(a, b, 1e-5, "sparse_decode");
}

TEST(Attention, GemmBlocksMatchReference) {
  // T > the 128-query block, windows shorter and longer than a block, GQA and MHA, soft-cap
  // on and off.
  struct Case {
    int64_t T, heads, kv, hd, window;
    float softcap;
  };
  for (const Case& c : {Case{300, 4, 2, 16, 0, 50.0f}, Case{300, 3, 1, 12, 40, 0.0f},
                        Case{260, 2, 2, 8, 200, 30.0f}, Case{5, 2, 1, 4, 3, 0.0f}}) {
    auto q = test::random_vector(size_t(c.T * c.heads * c.hd), 7);
    auto k = test::random_vector(size_t(c.T * c.kv * c.hd), 8);
    auto v = test::random_vector(size_t(c.T * c.kv * c.hd), 9);
    for (float& x : q) x *= 3.0f;  // scores large enough for the soft-cap to bend them
    const AttentionShape s{c.T, c.heads, c.kv, c.hd, 0.5f, c.softcap, c.window};
    std::vector<float> a(q.size()), b(q.size());
    attention_causal(q.data(), k.data(), v.data(), a.data(), s);
    attention_causal_reference(q.data(), k.data(), v.data(), b.data(), s);
    test::expect_close(a, b, 1e-5, "attention");
  }
}

}  // namespace
}  // namespace sae::ops

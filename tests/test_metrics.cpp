// Metrics equal SAELens's formulas (goldens: scripts/make_goldens.py, one batch).
#include <gtest/gtest.h>

#include "eval/metrics.h"
#include "io/json_file.h"
#include "sae/load.h"
#include "test_util.h"

namespace sae {
namespace {

class MetricsGolden : public ::testing::TestWithParam<std::string> {};

TEST_P(MetricsGolden, MatchSaeLensFormulas) {
  const std::string c = GetParam();
  LoadedSae l = load_from_disk(test::golden(c + "/sae"));
  auto x = test::read_npy_f32(test::golden(c + "/x.npy"));
  const int64_t n = int64_t(x.size()) / l.sae.cfg.d_in;
  SparseCodes codes = l.sae.encode(x, n);
  auto x_hat = l.sae.decode(codes);
  MetricsAccumulator acc(l.sae.cfg.d_in, l.sae.cfg.d_sae);
  acc.add_batch(x, x_hat, codes);
  Metrics m = acc.finish();
  auto want = read_json_file(test::golden(c + "/metrics.json"));
  auto got = m.to_json(true);
  // The goldens are double-precision formulas on SAELens's f32 outputs; ours run on our f32
  // outputs, which agree to ~1e-6 relative, so 1e-5 relative bounds the metric difference.
  for (const char* key : {"l0", "l1", "mse", "explained_variance", "explained_variance_legacy",
                          "explained_variance_about_zero", "cossim", "l2_norm_in", "l2_norm_out",
                          "l2_ratio", "relative_reconstruction_bias"}) {
    const double w = want[key].get<double>(), g = got[key].get<double>();
    EXPECT_NEAR(g, w, 1e-5 * std::max(1.0, std::abs(w))) << c << " " << key;
  }
  EXPECT_EQ(got["dead_latents"], want["dead_latents"]);
  EXPECT_EQ(got["dense_latents"], want["dense_latents"]);
  EXPECT_EQ(m.feature_density, want["feature_density"].get<std::vector<double>>());
  int64_t hist_total = 0;
  for (auto v : m.log_density_histogram) hist_total += v;
  EXPECT_EQ(hist_total + m.dead_latents, l.sae.cfg.d_sae);
}

INSTANTIATE_TEST_SUITE_P(Cases, MetricsGolden,
                         ::testing::Values("standard", "standard_layer_norm", "topk", "jumprelu",
                                           "pre6_topk"));

TEST(Metrics, StreamingEqualsOneBatchForGlobalTerms) {
  LoadedSae l = load_from_disk(test::golden("topk/sae"));
  auto x = test::read_npy_f32(test::golden("topk/x.npy"));
  const int64_t d = l.sae.cfg.d_in, n = int64_t(x.size()) / d;
  MetricsAccumulator whole(d, l.sae.cfg.d_sae), parts(d, l.sae.cfg.d_sae);
  auto codes = l.sae.encode(x, n);
  whole.add_batch(x, l.sae.decode(codes), codes);
  for (int64_t t0 = 0; t0 < n; t0 += 10) {
    int64_t m = std::min<int64_t>(10, n - t0);
    std::span<const float> xs(x.data() + t0 * d, size_t(m * d));
    auto c = l.sae.encode(xs, m);
    parts.add_batch(xs, l.sae.decode(c), c);
  }
  Metrics a = whole.finish(), b = parts.finish();
  // The GEMMs of 10 rows and of all rows may round differently (BLAS picks kernels by shape), so
  // the float reconstructions agree to float precision, not bit for bit.
  EXPECT_NEAR(a.explained_variance, b.explained_variance, 1e-6 * std::abs(a.explained_variance));
  EXPECT_NEAR(a.l0, b.l0, 1e-12);
  EXPECT_NEAR(a.mse, b.mse, 1e-6 * a.mse);
  EXPECT_EQ(a.feature_density, b.feature_density);
}

}  // namespace
}  // namespace sae

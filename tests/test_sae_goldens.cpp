// SAEs saved by the real SAELens load here and encode/decode as SAELens does
// (goldens from scripts/make_goldens.py).
#include <gtest/gtest.h>

#include "core/error.h"
#include "io/json_file.h"
#include "sae/load.h"
#include "sae/save.h"
#include "test_util.h"

namespace sae {
namespace {

// f32 throughout; SAELens and BLAS sum the 16-term dot products in different orders.
constexpr double kRel = 1e-5;

class SaeGolden : public ::testing::TestWithParam<std::string> {};

TEST_P(SaeGolden, EncodeDecodeMatchSaeLens) {
  const std::string c = GetParam();
  LoadedSae l = load_from_disk(test::golden(c + "/sae"));
  auto x = test::read_npy_f32(test::golden(c + "/x.npy"));
  auto want_acts = test::read_npy_f32(test::golden(c + "/feature_acts.npy"));
  auto want_out = test::read_npy_f32(test::golden(c + "/sae_out.npy"));
  const int64_t n = int64_t(x.size()) / l.sae.cfg.d_in;

  SparseCodes codes = l.sae.encode(x, n);
  auto acts = codes.to_dense();
  // The same latents are active (exact), with the same values.
  for (size_t i = 0; i < acts.size(); ++i)
    ASSERT_EQ(acts[i] != 0.0f, want_acts[i] != 0.0f) << c << " entry " << i;
  test::expect_close(acts, want_acts, kRel, c + " feature_acts");
  test::expect_close(l.sae.decode(codes), want_out, kRel, c + " sae_out");
  test::expect_close(l.sae.forward(x, n), want_out, kRel, c + " forward");
  for (int64_t t = 0; t < n; ++t)
    for (int64_t e = codes.offsets[size_t(t)] + 1; e < codes.offsets[size_t(t + 1)]; ++e)
      ASSERT_LT(codes.indices[size_t(e - 1)], codes.indices[size_t(e)]) << "codes index-sorted";
}

TEST_P(SaeGolden, SaveLoadRoundTripIsExact) {
  const std::string c = GetParam();
  LoadedSae l = load_from_disk(test::golden(c + "/sae"));
  test::TempDir dir;
  save_to_disk(l.sae, dir / "copy", DType::F32, l.sparsity);
  LoadedSae r = load_from_disk(dir / "copy");
  EXPECT_EQ(r.sae.W_enc, l.sae.W_enc);
  EXPECT_EQ(r.sae.W_dec, l.sae.W_dec);
  EXPECT_EQ(r.sae.b_enc, l.sae.b_enc);
  EXPECT_EQ(r.sae.b_dec, l.sae.b_dec);
  EXPECT_EQ(r.sae.threshold, l.sae.threshold);
  EXPECT_EQ(r.sparsity, l.sparsity);
  // Every config field survives, including ones sae.cpp does not interpret.
  auto a = l.sae.cfg.to_json(), b = r.sae.cfg.to_json();
  EXPECT_EQ(a, b);
}

INSTANTIATE_TEST_SUITE_P(Cases, SaeGolden,
                         ::testing::Values("standard", "standard_no_bdec_norm",
                                           "standard_layer_norm", "topk", "topk_rescale",
                                           "jumprelu", "jumprelu_bf16_weights", "pre6_standard",
                                           "pre6_topk"));

TEST(SaeConfig, Pre6ConvertedAsSaeLensDoes) {
  for (std::string c : {"pre6_standard", "pre6_topk"}) {
    LoadedSae l = load_from_disk(test::golden(c + "/sae"));
    auto want = read_json_file(test::golden(c + "/loaded_cfg.json"));
    auto got = l.sae.cfg.to_json();
    EXPECT_TRUE(l.sae.cfg.converted_from_pre_6);
    for (const char* key : {"architecture", "d_in", "d_sae", "dtype", "apply_b_dec_to_input",
                            "normalize_activations", "reshape_activations"})
      EXPECT_EQ(got[key], want[key]) << c << " " << key;
    if (want.contains("k")) {
      EXPECT_EQ(got["k"], want["k"]);
    }
    for (auto it = want["metadata"].begin(); it != want["metadata"].end(); ++it) {
      if (it.key() == "sae_lens_version") continue;  // SAELens stamps its own version
      EXPECT_EQ(got["metadata"][it.key()], it.value()) << c << " metadata." << it.key();
    }
  }
  // A field SAELens drops is kept by us.
  LoadedSae l = load_from_disk(test::golden("pre6_standard/sae"));
  EXPECT_EQ(l.sae.cfg.to_json()["some_field_sae_lens_drops"], nlohmann::json({1, 2, 3}));
}

TEST(SaeConfig, UnknownFieldsRoundTrip) {
  test::TempDir dir;
  LoadedSae l = load_from_disk(test::golden("jumprelu/sae"));
  l.sae.cfg.json["my_custom_field"] = {{"nested", true}};
  l.sae.cfg.json["metadata"]["my_meta"] = "kept";
  save_to_disk(l.sae, dir / "x");
  LoadedSae r = load_from_disk(dir / "x");
  EXPECT_EQ(r.sae.cfg.json["my_custom_field"]["nested"], true);
  EXPECT_EQ(r.sae.cfg.metadata_string("my_meta"), "kept");
  EXPECT_EQ(r.sae.cfg.metadata_string("hook_name"), "blocks.0.hook_resid_post");
}

TEST(SaeConvert, Bf16StorageRoundsWeightsOnly) {
  test::TempDir dir;
  LoadedSae l = load_from_disk(test::golden("topk/sae"));
  save_to_disk(l.sae, dir / "bf16", DType::BF16);
  LoadedSae r = load_from_disk(dir / "bf16");
  EXPECT_EQ(r.sae.stored_dtype, DType::BF16);
  EXPECT_EQ(r.sae.cfg.dtype, DType::BF16);
  for (size_t i = 0; i < l.sae.W_enc.size(); ++i)
    ASSERT_EQ(r.sae.W_enc[i], bf16_to_f32(f32_to_bf16(l.sae.W_enc[i])));
}

TEST(SaeFold, DecoderNormFoldKeepsReconstructions) {
  for (std::string c : {"standard", "jumprelu", "topk_rescale"}) {
    LoadedSae l = load_from_disk(test::golden(c + "/sae"));
    auto x = test::read_npy_f32(test::golden(c + "/x.npy"));
    const int64_t n = int64_t(x.size()) / l.sae.cfg.d_in;
    auto before = l.sae.forward(x, n);
    auto codes_before = l.sae.encode(x, n);
    l.sae.fold_W_dec_norm();
    for (float v : l.sae.decoder_norms()) ASSERT_NEAR(v, 1.0f, 1e-5);
    test::expect_close(l.sae.forward(x, n), before, 1e-5, c + " folded forward");
    EXPECT_EQ(l.sae.encode(x, n).indices, codes_before.indices) << c;
  }
  LoadedSae t = load_from_disk(test::golden("topk/sae"));
  EXPECT_THROW(t.sae.fold_W_dec_norm(), Error);  // would change the top-k selection
}

TEST(SparseCodesFile, SaveLoadRoundTrip) {
  LoadedSae l = load_from_disk(test::golden("standard_no_bdec_norm/sae"));
  auto x = test::read_npy_f32(test::golden("standard_no_bdec_norm/x.npy"));
  SparseCodes c = l.sae.encode(x, int64_t(x.size()) / 16);
  test::TempDir dir;
  save_sparse_codes(dir / "c.safetensors", c);
  SparseCodes r = load_sparse_codes(dir / "c.safetensors");
  EXPECT_EQ(r.offsets, c.offsets);
  EXPECT_EQ(r.indices, c.indices);
  EXPECT_EQ(r.values, c.values);
  EXPECT_EQ(r.out_scale, c.out_scale);  // constant_norm_rescale keeps its per-token factor
  EXPECT_EQ(l.sae.decode(r), l.sae.decode(c));
}

}  // namespace
}  // namespace sae

// CE-loss / KL scores and the model CLI commands on the tiny Gemma-2 checkpoint.
#include <gtest/gtest.h>

#include <cmath>

#include "core/error.h"
#include "eval/lm_score.h"
#include "io/json_file.h"
#include "io/safetensors.h"
#include "sae/save.h"
#include "test_util.h"

namespace sae {
namespace {

namespace fs = std::filesystem;
const std::string kModel = test::golden("gemma2/gqa_window/model");

// relu(x) - relu(-x) = x: a standard SAE that reconstructs any input exactly.
Sae identity_sae(int64_t d, const std::string& hook) {
  SaeConfig c;
  c.architecture = Architecture::Standard;
  c.d_in = d;
  c.d_sae = 2 * d;
  c.apply_b_dec_to_input = false;
  c.json = nlohmann::ordered_json::object();
  c.json["metadata"] = {{"hook_name", hook}};
  Sae s(c);
  for (int64_t i = 0; i < d; ++i) {
    s.W_enc[size_t(i * 2 * d + i)] = 1.0f;
    s.W_enc[size_t(i * 2 * d + d + i)] = -1.0f;
    s.W_dec[size_t(i * d + i)] = 1.0f;
    s.W_dec[size_t((d + i) * d + i)] = -1.0f;
  }
  return s;
}

TEST(LmLoss, EqualsCrossEntropyOfTransformersLogits) {
  model::Gemma2 m = model::Gemma2::load(kModel, {.verbose = false});
  auto prompts = read_json_file(test::golden("gemma2/gqa_window/prompts.json"))["prompts"]
                     .get<std::vector<std::vector<int32_t>>>();
  SafetensorsFile g(test::golden("gemma2/gqa_window/goldens.safetensors"));
  double want = 0;
  int64_t n = 0;
  for (size_t p = 0; p < prompts.size(); ++p) {
    const int64_t T = int64_t(prompts[p].size()), V = m.cfg.vocab_size;
    auto logits = g.read_f32(cat("prompt", p, ".logits"), {T, V});
    for (int64_t t = 0; t + 1 < T; ++t, ++n) {
      double mx = -1e30, s = 0;
      for (int64_t i = 0; i < V; ++i) mx = std::max(mx, double(logits[size_t(t * V + i)]));
      for (int64_t i = 0; i < V; ++i) s += std::exp(double(logits[size_t(t * V + i)]) - mx);
      want += mx + std::log(s) - logits[size_t(t * V + prompts[p][size_t(t + 1)])];
    }
  }
  int64_t got_n = 0;
  const double got = lm_loss(m, prompts, &got_n);
  EXPECT_EQ(got_n, n);
  EXPECT_NEAR(got, want / double(n), 1e-5 * want / double(n));
}

TEST(LmScore, PerfectSaeScoresOne) {
  model::Gemma2 m = model::Gemma2::load(kModel, {.verbose = false});
  auto prompts = read_json_file(test::golden("gemma2/gqa_window/prompts.json"))["prompts"]
                     .get<std::vector<std::vector<int32_t>>>();
  Sae s = identity_sae(m.cfg.hidden_size, "blocks.1.hook_resid_post");
  LmScore r = lm_score(m, s, model::HookPoint::ResidPost, 1, prompts);
  EXPECT_GT(r.n_predictions, 0);
  EXPECT_NEAR(r.ce_sae, r.ce_clean, 1e-5);
  // (A random model is worse than uniform, so ablation need not hurt; it must change things.)
  EXPECT_GT(std::abs(r.ce_zero - r.ce_clean), 1e-3);
  EXPECT_GT(r.kl_zero, 1e-3);
  EXPECT_NEAR(r.ce_loss_score, 1.0, 1e-4);
  EXPECT_NEAR(r.kl_sae, 0.0, 1e-6);
  EXPECT_NEAR(r.kl_score, 1.0, 1e-4);
  SaeConfig bad = s.cfg;
  bad.d_in = 3;
  EXPECT_THROW(lm_score(m, Sae(bad), model::HookPoint::ResidPost, 1, prompts), Error);
}

TEST(ModelCli, ActivationsLmLossAndEvalWithModel) {
  test::TempDir dir;
  auto r = test::run_cli("activations --model " + kModel +
                         " --text 'Hello world!' --layers 0-1 -o " + (dir / "acts.safetensors"));
  ASSERT_EQ(r.exit_code, 0) << r.output;
  SafetensorsFile f(dir / "acts.safetensors");
  auto ids = f.read_i64("tokens");
  auto want_ids =
      read_json_file(test::golden("gemma2/tokenizer.json"))["ids"][0].get<std::vector<int64_t>>();
  EXPECT_EQ(ids, want_ids);
  const int64_t T = int64_t(ids.size());
  SafetensorsFile g(test::golden("gemma2/gqa_window/goldens.safetensors"));
  test::expect_close(f.read_f32("blocks.0.hook_resid_post", {T, 64}),
                     g.read_f32("prompt0.hidden_states.1"), 1e-5, "layer 0");
  test::expect_close(f.read_f32("blocks.1.hook_resid_post", {T, 64}),
                     g.read_f32("prompt0.hidden_states.2"), 1e-5, "layer 1");

  auto l = test::run_cli("lm-loss --model " + kModel + " --text 'Hello world!'");
  ASSERT_EQ(l.exit_code, 0) << l.output;
  EXPECT_NE(l.output.find("cross-entropy"), std::string::npos);

  save_to_disk(identity_sae(64, "blocks.1.hook_resid_post"), dir / "sae");
  test::write_bytes(dir / "prompts.txt",
                    "Hello world!\nSparse autoencoders decompose the activations.\n");
  auto e = test::run_cli("eval " + (dir / "sae") + " --model " + kModel + " --text-file " +
                         (dir / "prompts.txt") + " --json");
  ASSERT_EQ(e.exit_code, 0) << e.output;
  auto j = nlohmann::json::parse(e.output.substr(e.output.find('{')));
  EXPECT_NEAR(j["explained_variance"].get<double>(), 1.0, 1e-5);
  EXPECT_NEAR(j["lm_score"]["ce_loss_score"].get<double>(), 1.0, 1e-4);
}

TEST(ModelCli, BadInputs) {
  test::TempDir dir;
  fs::copy(kModel, dir / "m");
  fs::remove(dir / "m/tokenizer.model");
  auto r = test::run_cli("lm-loss --model " + (dir / "m") + " --text hi");
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.output.find("tokenizer.model: tokenizer model not found"), std::string::npos)
      << r.output;
  auto j = read_json_file(kModel + "/config.json");
  j["model_type"] = "llama";
  fs::copy(kModel, dir / "llama");
  test::write_bytes(dir / "llama/config.json", j.dump());
  r = test::run_cli("activations --model " + (dir / "llama") + " --text hi -o " +
                    (dir / "x.safetensors"));
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.output.find("config.json: model_type"), std::string::npos) << r.output;
  EXPECT_FALSE(fs::exists(dir / "x.safetensors"));
  r = test::run_cli("lm-loss --model " + kModel + " --text " + std::string(9000, 'q'));
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.output.find("longer than the context"), std::string::npos) << r.output.substr(0, 300);
  r = test::run_cli("activations --model " + kModel + " --text hi --layers 0-7 -o " +
                    (dir / "y.safetensors"));
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.output.find("--layers"), std::string::npos);
}

}  // namespace
}  // namespace sae

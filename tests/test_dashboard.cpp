// Feature dashboards: the one-pass latent statistics against brute force over the same codes,
// `sae dashboard` on the tiny Gemma-2 against a dense computation over the same windows, the
// Neuronpedia files, bad input, and the pages in headless Chromium (when installed; the setup
// script installs it, so CI runs it).
#include <gtest/gtest.h>

#include <algorithm>
#include <fstream>
#include <map>
#include <numeric>
#include <random>
#include <regex>

#include "eval/latent_stats.h"
#include "eval/logit_effects.h"
#include "io/folder_lock.h"
#include "io/json_file.h"
#include "model/activations.h"
#include "model/gemma2.h"
#include "model/tokenizer.h"
#include "pipeline/activation_store.h"
#include "pipeline/dashboard.h"
#include "pipeline/job_status.h"
#include "sae/load.h"
#include "sae/save.h"
#include "test_util.h"

namespace sae {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;
const std::string kModel = test::golden("gemma2/gqa_window/model");

// Random sparse codes: each token fires 0..max_k latents of d with positive values.
SparseCodes random_codes(int64_t n, int64_t d, int max_k, std::mt19937& rng) {
  SparseCodes c;
  c.n_tokens = n;
  c.d_sae = d;
  c.offsets.push_back(0);
  std::uniform_int_distribution<int> k_dist(0, max_k);
  std::exponential_distribution<float> v_dist(0.7f);
  for (int64_t t = 0; t < n; ++t) {
    std::vector<int32_t> all(static_cast<size_t>(d));
    std::iota(all.begin(), all.end(), 0);
    std::shuffle(all.begin(), all.end(), rng);
    std::vector<int32_t> on(all.begin(), all.begin() + k_dist(rng));
    std::sort(on.begin(), on.end());
    for (int32_t f : on) {
      c.indices.push_back(f);
      c.values.push_back(0.01f + v_dist(rng) * float(1 + f % 3));
    }
    c.offsets.push_back(int64_t(c.indices.size()));
  }
  return c;
}

TEST(LatentStats, EqualBruteForceOverTheSameCodes) {
  const int64_t d = 12, n = 3000;
  std::mt19937 rng(5);
  eval::LatentStatsConfig cfg;
  cfg.d_sae = d;
  cfg.top_k = 7;
  cfg.interval_bins = 6;
  cfg.interval_samples = 3;
  cfg.hist_bins = 16;
  cfg.cofire_slots = 16;  // more than the partners a latent can have: counts exact
  eval::LatentStats stats(cfg);
  std::vector<SparseCodes> batches;
  std::vector<std::vector<uint8_t>> counted;
  int64_t first = 0;
  std::vector<int64_t> firsts;
  for (int b = 0; b < 6; ++b) {
    batches.push_back(random_codes(n / 6, d, 5, rng));
    std::vector<uint8_t> c(size_t(n / 6), 1);
    for (size_t t = 0; t < c.size(); t += 17) c[t] = 0;  // "special" tokens, skipped
    counted.push_back(c);
    firsts.push_back(first);
    stats.add(batches.back(), first, c);
    first += n / 6;
  }
  // Brute force: every firing (token, value) per latent, and co-firing counts.
  std::vector<std::vector<eval::Example>> fired(static_cast<size_t>(d));
  std::vector<std::map<int32_t, int64_t>> both(static_cast<size_t>(d));
  int64_t tokens = 0;
  for (size_t b = 0; b < batches.size(); ++b)
    for (int64_t t = 0; t < batches[b].n_tokens; ++t) {
      if (!counted[b][size_t(t)]) continue;
      ++tokens;
      const auto& c = batches[b];
      for (int64_t e = c.offsets[size_t(t)]; e < c.offsets[size_t(t) + 1]; ++e) {
        fired[size_t(c.indices[size_t(e)])].push_back({firsts[b] + t, c.values[size_t(e)]});
        for (int64_t e2 = c.offsets[size_t(t)]; e2 < c.offsets[size_t(t) + 1]; ++e2)
          if (e2 != e) ++both[size_t(c.indices[size_t(e)])][c.indices[size_t(e2)]];
      }
    }
  EXPECT_EQ(stats.tokens(), tokens);
  for (int64_t f = 0; f < d; ++f) {
    const eval::LatentSummary s = stats.summary(f);
    auto all = fired[size_t(f)];
    ASSERT_EQ(s.fires, int64_t(all.size())) << f;
    std::sort(all.begin(), all.end(), [](auto& a, auto& b) { return a.value > b.value; });
    double sum = 0, sum2 = 0;
    for (const auto& e : all) sum += e.value, sum2 += double(e.value) * e.value;
    EXPECT_NEAR(s.mean, sum / double(all.size()), 1e-9);
    EXPECT_NEAR(s.mean_sq, sum2 / double(all.size()), 1e-9);
    EXPECT_EQ(s.max, all[0].value);
    // Top-k: the same tokens and values, highest first.
    ASSERT_EQ(s.top.size(), size_t(cfg.top_k));
    for (size_t i = 0; i < s.top.size(); ++i) {
      EXPECT_EQ(s.top[i].token, all[i].token) << f << " rank " << i;
      EXPECT_EQ(s.top[i].value, all[i].value);
    }
    // The grid: max in [top / 2, top); histogram and interval counts exact for their bins;
    // every sample is one of the latent's real (token, value) pairs inside its interval.
    const float top = s.hist_width * float(cfg.hist_bins);
    EXPECT_LT(s.max, top);
    EXPECT_GE(s.max, top / 2);
    std::vector<int64_t> hist(size_t(cfg.hist_bins), 0);
    for (const auto& e : all)
      ++hist[size_t(std::min(cfg.hist_bins - 1, int(e.value / top * float(cfg.hist_bins))))];
    while (!hist.empty() && hist.back() == 0) hist.pop_back();
    EXPECT_EQ(s.hist, hist) << f;
    int64_t in_intervals = 0;
    for (const auto& g : s.intervals) {
      int64_t want = 0;
      for (const auto& e : all) want += e.value >= g.lo && e.value < g.hi;
      EXPECT_EQ(g.count, want) << f << " [" << g.lo << ", " << g.hi << ")";
      in_intervals += g.count;
      EXPECT_EQ(g.examples.size(), size_t(std::min<int64_t>(want, cfg.interval_samples)));
      for (const auto& e : g.examples) {
        EXPECT_GE(e.value, g.lo);
        EXPECT_LT(e.value, g.hi);
        EXPECT_TRUE(std::any_of(all.begin(), all.end(),
                                [&](auto& x) { return x.token == e.token && x.value == e.value; }));
      }
    }
    EXPECT_EQ(in_intervals, s.fires);
    // Quantile groups: highest first, each group's samples within its range.
    for (size_t q = 1; q < s.quantiles.size(); ++q)
      EXPECT_LE(s.quantiles[q].hi, s.quantiles[q - 1].lo);
    // Co-firing: exact counts (fewer partners than slots), most frequent first.
    ASSERT_EQ(s.cofire.size(), both[size_t(f)].size());
    for (const auto& p : s.cofire) {
      EXPECT_EQ(p.count, both[size_t(f)][p.latent]) << f << " with " << p.latent;
      EXPECT_EQ(p.error, 0);
    }
  }
}

TEST(LatentStats, CoFiringCountsBoundTheTruthWhenSlotsRunOut) {
  const int64_t d = 40;
  std::mt19937 rng(9);
  eval::LatentStatsConfig cfg;
  cfg.d_sae = d;
  cfg.cofire_slots = 4;
  eval::LatentStats stats(cfg);
  const SparseCodes c = random_codes(2000, d, 8, rng);
  stats.add(c, 0, std::vector<uint8_t>(2000, 1));
  std::vector<std::map<int32_t, int64_t>> both(static_cast<size_t>(d));
  for (int64_t t = 0; t < c.n_tokens; ++t)
    for (int64_t e = c.offsets[size_t(t)]; e < c.offsets[size_t(t) + 1]; ++e)
      for (int64_t e2 = c.offsets[size_t(t)]; e2 < c.offsets[size_t(t) + 1]; ++e2)
        if (e != e2) ++both[size_t(c.indices[size_t(e)])][c.indices[size_t(e2)]];
  for (int64_t f = 0; f < d; ++f)
    for (const auto& p : stats.summary(f).cofire) {
      EXPECT_LE(p.at_least(), both[size_t(f)][p.latent]);
      EXPECT_GE(p.count, both[size_t(f)][p.latent]);
    }
}

TEST(Dashboard, DisplayPieces) {
  EXPECT_EQ(pipeline::display_piece("\u2581the"), " the");
  EXPECT_EQ(pipeline::display_piece("<0x0A>"), "\u21b5\n");
  EXPECT_EQ(pipeline::display_piece("<0x41>"), "A");
  EXPECT_EQ(pipeline::display_piece("\u2581\u2581x"), "  x");
}

// A random TopK SAE for the tiny model's layer 1 with two Matryoshka levels in its metadata.
std::string write_tiny_sae(const test::TempDir& dir) {
  const int64_t d = 64, D = 48;
  SaeConfig c;
  c.architecture = Architecture::TopK;
  c.d_in = d;
  c.d_sae = D;
  c.k = 6;
  c.json = nlohmann::ordered_json::object();
  c.json["metadata"] = {{"hook_name", "blocks.1.hook_resid_post"},
                        {"model_name", "tiny-gemma2"},
                        {"training_architecture_details", {{"matryoshka_widths", {16, 48}}}}};
  Sae s(c);
  std::mt19937 rng(3);
  std::normal_distribution<float> g(0, 1);
  for (auto& w : s.W_enc) w = g(rng);
  for (auto& w : s.W_dec) w = g(rng) * 0.1f;
  const std::string folder = dir / "sae";
  save_to_disk(s, folder);
  return folder;
}

std::string write_corpus(const test::TempDir& dir) {
  std::ifstream in(test::test_dir() / "data/tiny_corpus.txt");
  std::vector<std::string> lines;
  for (std::string l; std::getline(in, l);)
    if (!l.empty()) lines.push_back(l);
  std::string text;
  for (int i = 0; i < 300; ++i)
    text += lines[size_t(i) % lines.size()] + " " + std::to_string(i) + "\n";
  test::write_bytes(dir / "corpus.txt", text);
  return dir / "corpus.txt";
}

std::string dashboard_args(const std::string& sae, const std::string& corpus,
                           const std::string& out) {
  return "dashboard " + sae + " --model " + kModel + " --dataset " + corpus +
         " --tokens 1500 --context-size 16 --holdout-every 3 --prompts-per-forward 4 -o " + out;
}

TEST(Dashboard, TopExamplesEqualADenseComputationAndFilesAreComplete) {
  test::TempDir dir;
  const std::string sae_dir = write_tiny_sae(dir), corpus = write_corpus(dir);
  const std::string out = dir / "dash";
  const auto r = test::run_cli(dashboard_args(sae_dir, corpus, out) + " --neuronpedia");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("tok/s"), std::string::npos) << r.output;  // the progress line
  EXPECT_FALSE(fs::exists(out + ".partial"));

  // The same held-out windows, run and encoded densely.
  const model::Gemma2 m = model::Gemma2::load(kModel, {.verbose = false});
  const model::Tokenizer tok(kModel + "/tokenizer.model");
  data::CorpusConfig cc;
  cc.shards = {corpus};
  cc.holdout_every = 3;
  data::Corpus heldout(cc, data::Split::Heldout);
  data::WindowConfig wc;
  wc.context_size = 16;
  wc.bos_id = tok.bos_id();
  wc.separator_id = tok.bos_id();
  pipeline::WindowStream windows(heldout, tok, wc);
  const json dash = read_json_file(out + "/dashboard.json");
  const int64_t n_windows = dash["meta"]["windows"].get<int64_t>();
  std::vector<std::vector<int32_t>> prompts;
  std::vector<data::TokenOrigin> origins;
  std::vector<int32_t> w;
  std::vector<data::TokenOrigin> wo;
  for (int64_t i = 0; i < n_windows && windows.next(w, &wo); ++i) {
    prompts.push_back(w);
    origins.insert(origins.end(), wo.begin(), wo.end());
  }
  ASSERT_EQ(int64_t(prompts.size()), n_windows);
  const auto acts = model::collect_activations(m, prompts, model::HookPoint::ResidPost, {1});
  const LoadedSae sae = load_from_disk(sae_dir);
  const int64_t n = int64_t(acts[0].size()) / 64, D = sae.sae.cfg.d_sae;
  const std::vector<float> dense = sae.sae.encode_dense(acts[0], n);
  std::vector<int32_t> ids;
  for (const auto& p : prompts) ids.insert(ids.end(), p.begin(), p.end());
  std::map<std::pair<int64_t, int64_t>, int64_t> token_at;  // (doc, pos) -> token
  for (int64_t t = 0; t < n; ++t)
    if (origins[size_t(t)].doc >= 0) token_at[{origins[size_t(t)].doc, origins[size_t(t)].pos}] = t;

  const std::string js = test::read_bytes(out + "/data/latents-000.js");
  const std::string prefix = "saeDash.add(\"latents\", 0, ";
  ASSERT_EQ(js.rfind(prefix, 0), 0u);
  const json latents = json::parse(js.substr(prefix.size(), js.rfind(");") - prefix.size()));
  ASSERT_EQ(int64_t(latents.size()), D);
  int checked = 0;
  for (int64_t f = 0; f < D; ++f) {
    // Brute force over every non-BOS token of the windows.
    std::vector<std::pair<float, int64_t>> all;
    for (int64_t t = 0; t < n; ++t)
      if (ids[size_t(t)] != tok.bos_id() && dense[size_t(t * D + f)] > 0)
        all.push_back({dense[size_t(t * D + f)], t});
    std::sort(all.begin(), all.end(), [](auto& a, auto& b) { return a.first > b.first; });
    const json& l = latents[std::to_string(f)];
    ASSERT_EQ(l["fires"].get<int64_t>(), int64_t(all.size())) << "latent " << f;
    const json& top = l["top"];
    ASSERT_EQ(top.size(), std::min<size_t>(20, all.size()));
    for (size_t i = 0; i < top.size(); ++i) {
      // Values in the brute-force order; equal values (repeated text) may come from any of the
      // tokens that have them, so the token is found by its document and position.
      EXPECT_NEAR(top[i]["v"].get<double>(), all[i].first, 1e-3 * all[i].first + 1e-6)
          << "latent " << f << " rank " << i;
      const auto it = token_at.find({top[i]["doc"].get<int64_t>(), top[i]["pos"].get<int64_t>()});
      ASSERT_NE(it, token_at.end()) << "no such token";
      const int64_t t = it->second;
      EXPECT_NEAR(top[i]["v"].get<double>(), dense[size_t(t * D + f)], 1e-3 * all[i].first + 1e-6);
      // The context: the window's tokens around t, with this latent's activations.
      const int64_t q = top[i]["q"].get<int64_t>();
      EXPECT_EQ(top[i]["t"][size_t(q)].get<int32_t>(), ids[size_t(t)]);
      for (size_t j = 0; j < top[i]["t"].size(); ++j) {
        const int64_t u = t - q + int64_t(j);
        EXPECT_EQ(u / 16, t / 16) << "context leaves the window";
        EXPECT_EQ(top[i]["t"][j].get<int32_t>(), ids[size_t(u)]);
        const float want = ids[size_t(u)] == tok.bos_id() ? 0.0f : dense[size_t(u * D + f)];
        EXPECT_NEAR(top[i]["a"][j].get<double>(), want, 1e-3 * want + 1e-6);
      }
      ++checked;
    }
    EXPECT_EQ(l["level"].get<int>(), f < 16 ? 0 : 1);
    EXPECT_EQ(l["logits_pos"].size(), 10u);
  }
  EXPECT_GT(checked, 100);

  // Index, meta, vocabulary, pages and assets, all in the folder.
  for (const char* f : {"index.html", "latent.html", "assets/dashboard.js", "assets/dashboard.css",
                        "data/meta.js", "data/vocab.js", "data/index-000.js"})
    EXPECT_TRUE(fs::exists(out + "/" + f)) << f;
  EXPECT_EQ(test::read_bytes(out + "/index.html").find("http"), std::string::npos)
      << "the page must not reach the network";

  // Neuronpedia: SAEDashboard's batch layout.
  const json batch = read_json_file(out + "/neuronpedia/batch-0.json");
  EXPECT_EQ(batch["layer"], 1);
  EXPECT_EQ(batch["model_id"], "tiny-gemma2");
  ASSERT_EQ(batch["features"].size(), size_t(D));
  for (const json& feat : batch["features"]) {
    for (const char* k :
         {"feature_index", "activations", "pos_str", "pos_values", "neg_str", "neg_values",
          "frac_nonzero", "freq_hist_data_bar_heights", "freq_hist_data_bar_values",
          "logits_hist_data_bar_heights", "logits_hist_data_bar_values", "n_prompts_total",
          "n_tokens_in_prompt", "dataset", "correlated_features_indices"})
      EXPECT_TRUE(feat.contains(k)) << k;
    EXPECT_EQ(feat["pos_str"].size(), 10u);
    EXPECT_EQ(feat["freq_hist_data_bar_heights"].size(), feat["freq_hist_data_bar_values"].size());
    const int64_t f = feat["feature_index"].get<int64_t>();
    EXPECT_NEAR(feat["frac_nonzero"].get<double>(),
                double(latents[std::to_string(f)]["fires"].get<int64_t>()) /
                    double(dash["meta"]["tokens"].get<int64_t>()),
                1e-9);
    for (const json& a : feat["activations"]) {
      for (const char* k :
           {"tokens", "values", "bin_min", "bin_max", "bin_contains", "qualifying_token_index"})
        EXPECT_TRUE(a.contains(k)) << k;
      EXPECT_EQ(a["tokens"].size(), a["values"].size());
      EXPECT_TRUE(a["tokens"][0].is_string());
    }
  }
  EXPECT_TRUE(read_json_file(out + "/neuronpedia/run_settings.json").contains("n_prompts_total"));
}

// Stopped part-way (checkpoint, exit 0), then --resume: the folder equals one made in one go.
TEST(Dashboard, StopsAndResumesToTheSameFolder) {
  test::TempDir dir;
  const std::string sae_dir = write_tiny_sae(dir), corpus = write_corpus(dir);
  const std::string args = " --neuronpedia --latents 0-47";
  auto r = test::run_cli(dashboard_args(sae_dir, corpus, dir / "whole") + args);
  ASSERT_EQ(r.exit_code, 0) << r.output;
  const std::string part = dir / "part";
  r = test::run_cli(dashboard_args(sae_dir, corpus, part) + args + " --stop-after-tokens 500");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("rerun with --resume"), std::string::npos) << r.output;
  EXPECT_FALSE(fs::exists(part));
  EXPECT_TRUE(fs::exists(part + ".partial/.work/state.json"));
  // Without --resume the interrupted run is not overwritten.
  r = test::run_cli(dashboard_args(sae_dir, corpus, part) + args);
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.output.find("pass --resume"), std::string::npos) << r.output;
  // Windows cut another way make another run.
  r = test::run_cli(dashboard_args(sae_dir, corpus, part) + args + " --resume --truncate");
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.output.find("concat"), std::string::npos) << r.output;
  // `sae status` of the dashboard stopped part-way (DIR or DIR.partial): the tokens of its
  // last checkpoint out of the run's, and its pace.
  for (const std::string& folder : {part, part + ".partial"}) {
    r = test::run_cli("status " + folder);
    EXPECT_EQ(r.exit_code, 0) << r.output;
    EXPECT_NE(r.output.find("of 1500 tokens ("), std::string::npos) << r.output;
    EXPECT_NE(r.output.find("at its last checkpoint, written "), std::string::npos) << r.output;
    EXPECT_NE(r.output.find(" tok/s; not running"), std::string::npos) << r.output;
  }
  {  // While another process writes it, a resume stops at once and leaves it as it was.
    const std::string state = test::read_bytes(part + ".partial/.work/state.json");
    FolderLock running(part + ".partial/.lock", "the test");
    const auto held = pipeline::job_status(part);  // running: the time left at its pace
    EXPECT_EQ(held["running"]["job"], "the test");
    EXPECT_GT(held["eta_seconds"].get<double>(), 0.0) << held.dump(1);
    EXPECT_NEAR(held["eta_seconds"].get<double>(),
                double(1500 - held["tokens"].get<int64_t>()) /
                    held["progress"]["tokens_per_s"].get<double>(),
                1e-6);
    r = test::run_cli(dashboard_args(sae_dir, corpus, part) + args + " --resume");
    EXPECT_EQ(r.exit_code, 1) << r.output;
    EXPECT_NE(r.output.find(".partial/.lock: this folder is in use by the test"), std::string::npos)
        << r.output;
    EXPECT_EQ(test::read_bytes(part + ".partial/.work/state.json"), state);
  }
  r = test::run_cli(dashboard_args(sae_dir, corpus, part) + args + " --resume");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("resuming after"), std::string::npos) << r.output;
  EXPECT_FALSE(fs::exists(part + ".partial"));
  EXPECT_FALSE(fs::exists(part + "/.lock")) << "the lock is the job's, not the dashboard's";
  r = test::run_cli("status " + part);
  EXPECT_EQ(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find(": finished (index.html written): 48 latents from "), std::string::npos)
      << r.output;
  for (const char* f : {"data/latents-000.js", "data/index-000.js", "neuronpedia/batch-0.json"})
    EXPECT_EQ(test::read_bytes(part + "/" + f), test::read_bytes(dir / "whole" + "/" + f)) << f;
}

TEST(Dashboard, BadInputsFailCleanly) {
  test::TempDir dir;
  const std::string sae_dir = write_tiny_sae(dir), corpus = write_corpus(dir);
  // An existing output folder is never overwritten.
  fs::create_directories(dir / "taken");
  auto r = test::run_cli(dashboard_args(sae_dir, corpus, dir / "taken"));
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.output.find("exists already"), std::string::npos) << r.output;
  // A latent outside the SAE.
  r = test::run_cli(dashboard_args(sae_dir, corpus, dir / "a") + " --latents 3,48");
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.output.find("latent 48 is outside 0..47"), std::string::npos) << r.output;
  EXPECT_FALSE(fs::exists(dir / "a"));
  // --device cuda where no GPU can run it: refused before anything is loaded or written (with
  // a GPU, CudaGemma2.DashboardOnTheDeviceEqualsTheCpus runs it); an unknown device.
  if (!cuda_compiled() || cuda_device_count() == 0) {
    r = test::run_cli(dashboard_args(sae_dir, corpus, dir / "gpu") + " --device cuda");
    EXPECT_EQ(r.exit_code, 1) << r.output;
    EXPECT_TRUE(r.output.find("no CUDA GPU") != std::string::npos ||
                r.output.find("without CUDA") != std::string::npos)
        << r.output;
    EXPECT_FALSE(fs::exists(dir / "gpu"));
    EXPECT_FALSE(fs::exists(dir / "gpu.partial"));
  }
  r = test::run_cli(dashboard_args(sae_dir, corpus, dir / "tpu") + " --device tpu");
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.output.find("--device"), std::string::npos) << r.output;
  EXPECT_FALSE(fs::exists(dir / "tpu.partial"));
  // An SAE without a hook name in its cfg.json.
  json cfg = read_json_file(sae_dir + "/cfg.json");
  cfg["metadata"].erase("hook_name");
  test::write_bytes(sae_dir + "/cfg.json", cfg.dump());
  r = test::run_cli(dashboard_args(sae_dir, corpus, dir / "b"));
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.output.find("metadata.hook_name"), std::string::npos) << r.output;
  EXPECT_FALSE(fs::exists(dir / "b"));
  EXPECT_FALSE(fs::exists(dir / "b.partial"));
  // A malformed --context.
  r = test::run_cli(dashboard_args(sae_dir, corpus, dir / "c") + " --context 24");
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.output.find("--context"), std::string::npos) << r.output;
}

// Chromium (Debian's package), headless, from file://: the page renders (it marks itself ready
// after drawing its data) and logs nothing to the console. Returns the DOM and the log.
struct Rendered {
  std::string dom, console;
};
Rendered render(const std::string& url, const std::string& log_path,
                const std::string& screenshot = "") {
  const std::string flags =
      "--headless --no-sandbox --disable-gpu --virtual-time-budget=10000 --window-size=1200,1600 "
      "--enable-logging=stderr --v=0 ";
  Rendered out;
  out.dom =
      test::run_shell("{ chromium " + flags + "--dump-dom '" + url + "' 2>'" + log_path + "'; }")
          .output;
  const std::string log = test::read_bytes(log_path);
  for (size_t a = 0, b; a < log.size(); a = b + 1) {
    b = log.find('\n', a);
    if (b == std::string::npos) b = log.size();
    const std::string line = log.substr(a, b - a);
    if (line.find("CONSOLE") != std::string::npos) out.console += line + "\n";
  }
  if (!screenshot.empty())
    test::run_shell("chromium " + flags + "--screenshot='" + screenshot + "' '" + url + "'");
  return out;
}

TEST(Dashboard, PagesRenderInHeadlessChromiumWithoutConsoleErrors) {
  if (test::run_shell("command -v chromium").exit_code != 0)
    GTEST_SKIP() << "chromium is not installed (scripts/setup.sh installs it)";
  test::TempDir dir;
  const std::string out = dir / "dash";
  const auto r = test::run_cli(dashboard_args(write_tiny_sae(dir), write_corpus(dir), out) +
                               " --latents 0-40");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  const std::string base = "file://" + fs::absolute(out).string();
  // The screenshot is kept as a test artifact beside the test binary's working folder.
  const std::string shot = fs::absolute("dashboard_latent.png").string();
  fs::remove(shot);
  const Rendered latent = render(base + "/latent.html?f=5", dir / "latent.log", shot);
  EXPECT_NE(latent.dom.find("data-ready=\"1\""), std::string::npos) << latent.dom.substr(0, 2000);
  EXPECT_NE(latent.dom.find("Latent 5"), std::string::npos);
  EXPECT_NE(latent.dom.find("class=\"example\""), std::string::npos);
  EXPECT_NE(latent.dom.find("<svg"), std::string::npos);
  EXPECT_EQ(latent.console, "");
  EXPECT_GT(fs::exists(shot) ? fs::file_size(shot) : 0, 10000u) << "no screenshot";

  const Rendered index = render(base + "/index.html", dir / "index.log");
  EXPECT_NE(index.dom.find("data-ready=\"1\""), std::string::npos) << index.dom.substr(0, 2000);
  EXPECT_NE(index.dom.find("41 of 41 latents"), std::string::npos);
  EXPECT_NE(index.dom.find("latent.html?f=40"), std::string::npos);
  EXPECT_EQ(index.console, "");
}

}  // namespace
}  // namespace sae

namespace sae {
namespace {

// Logit effects against a plain computation: unit decoder rows times every unembedding row in
// double, fully sorted (ties to the lower token id), control tokens left out.
TEST(LogitEffects, EqualAFullSortOfTheUnitDecoderTimesTheUnembedding) {
  const int64_t d = 24, D = 9, V = 700;
  SaeConfig c;
  c.architecture = Architecture::Standard;
  c.d_in = d;
  c.d_sae = D;
  c.json = nlohmann::ordered_json::object();
  Sae s(c);
  std::mt19937 rng(4);
  std::normal_distribution<float> g(0, 1);
  for (auto& w : s.W_dec) w = g(rng) * 3;
  model::Weight u;
  u.rows = V;
  u.cols = d;
  for (int64_t i = 0; i < V * d; ++i) u.f32.push_back(std::round(g(rng) * 4) / 4);  // ties
  std::vector<uint8_t> skip(size_t(V), 0);
  for (int64_t v = 0; v < V; v += 50) skip[size_t(v)] = 1;
  const auto got = eval::logit_effects(s, u, skip, 2, 8, 10, 20);
  ASSERT_EQ(got.size(), 6u);
  for (int64_t f = 2; f < 8; ++f) {
    double norm = 0;
    for (int64_t k = 0; k < d; ++k)
      norm += double(s.W_dec[size_t(f * d + k)]) * s.W_dec[size_t(f * d + k)];
    std::vector<std::pair<double, int32_t>> all;
    for (int64_t v = 0; v < V; ++v) {
      if (skip[size_t(v)]) continue;
      double x = 0;
      for (int64_t k = 0; k < d; ++k)
        x += double(s.W_dec[size_t(f * d + k)]) * u.f32[size_t(v * d + k)];
      all.push_back({x / std::sqrt(norm), int32_t(v)});
    }
    const auto& e = got[size_t(f - 2)];
    auto desc = all, asc = all;
    std::stable_sort(desc.begin(), desc.end(), [](auto& a, auto& b) { return a.first > b.first; });
    std::stable_sort(asc.begin(), asc.end(), [](auto& a, auto& b) { return a.first < b.first; });
    ASSERT_EQ(e.top_ids.size(), 10u);
    for (size_t i = 0; i < 10; ++i) {
      EXPECT_NEAR(e.top_values[i], desc[i].first, 1e-4) << f << " top " << i;
      EXPECT_NEAR(e.bottom_values[i], asc[i].first, 1e-4) << f << " bottom " << i;
      // The same token unless f32 rounding reorders values equal in exact arithmetic.
      auto isolated = [](const auto& v, size_t i) {
        return std::abs(v[i].first - v[i + 1].first) > 1e-4 &&
               (i == 0 || std::abs(v[i].first - v[i - 1].first) > 1e-4);
      };
      if (isolated(desc, i)) {
        EXPECT_EQ(e.top_ids[i], desc[i].second) << f << " top " << i;
      }
      if (isolated(asc, i)) {
        EXPECT_EQ(e.bottom_ids[i], asc[i].second) << f << " bottom " << i;
      }
    }
    int64_t total = 0;
    for (int64_t h : e.hist) total += h;
    EXPECT_EQ(total, int64_t(all.size()));
    EXPECT_NEAR(e.hist_lo, asc[0].first, 1e-4);
    EXPECT_NEAR(e.hist_lo + e.hist_width * 20, desc[0].first, 1e-4);
  }
}

}  // namespace
}  // namespace sae

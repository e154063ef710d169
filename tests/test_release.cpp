// The text -> release pipeline on the tiny Gemma-2: the activation store (every non-special token
// served once, the same token in every layer, deterministic) and `sae release` end to end
// (layout, loading back, the model card's numbers re-measured, stop and resume, bad input).
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cmath>
#include <cstring>
#include <fstream>
#include <functional>
#include <future>
#include <memory>
#include <numeric>
#include <random>
#include <regex>
#include <set>
#include <sstream>
#include <thread>
#include <tuple>

#include "core/device.h"
#include "core/error.h"
#include "core/memory.h"
#include "eval/metrics.h"
#include "io/folder_lock.h"
#include "io/json_file.h"
#include "io/safetensors.h"
#include "model/gemma2.h"
#include "model/tokenizer.h"
#include "pipeline/activation_store.h"
#include "pipeline/device_plan.h"
#include "pipeline/disk_plan.h"
#include "pipeline/job_status.h"
#include "pipeline/model_card.h"
#include "pipeline/release.h"
#include "sae/device_sae.h"
#include "sae/load.h"
#include "sae/pretrained.h"
#include "test_util.h"
#include "test_zstd.h"
#include "tiny_corpus.h"
#include "train/device_step.h"
#include "train/trainer.h"

namespace sae::pipeline {
namespace {

namespace fs = std::filesystem;
const std::string kModel = test::golden("gemma2/gqa_window/model");

// 400 short documents (the tiny corpus's lines, numbered) as one .jsonl.zst shard.
std::string write_corpus(const test::TempDir& dir) {
  test::write_bytes(dir / "pile-00.jsonl.zst", test::zstd_compress(test::tiny_corpus_jsonl()));
  return dir / "pile-*.jsonl.zst";
}

// Max abs difference between row r of `rows` [n, d] and x.
float row_distance(const std::vector<float>& rows, int64_t d, int64_t r, const float* x) {
  float dist = 0;
  for (int64_t c = 0; c < d; ++c) dist = std::max(dist, std::abs(rows[size_t(r * d + c)] - x[c]));
  return dist;
}

// The stores' tests' inputs: the tiny corpus (no held-out split), the tiny Gemma-2, its
// special tokens and the small store config.
struct TinyStoreInputs {
  test::TempDir dir;
  data::CorpusConfig cc;
  const model::Gemma2 m = model::Gemma2::load(kModel, {.verbose = false});
  const model::Tokenizer tok{kModel + "/tokenizer.model"};
  const std::vector<int32_t> special = {tok.bos_id(), tok.eos_id(), tok.pad_id()};
  StoreConfig sc = test::tiny_store_config(tok);
  TinyStoreInputs() {
    cc.shards = {write_corpus(dir)};
    cc.holdout_every = 0;
  }
};

TEST(ActivationStore, ServesEachNonSpecialTokenOnceWithLayersAligned) {
  TinyStoreInputs in;
  const std::vector<int64_t> layers = {0, 2};
  const int64_t d = in.m.cfg.hidden_size, n_batches = 12;

  // Every non-special token's activations, one window at a time, in corpus order.
  data::Corpus all_corpus(in.cc, data::Split::Train);
  WindowStream all_windows(all_corpus, in.tok, in.sc.windows);
  const Heldout all =
      collect_heldout(in.m, all_windows, model::HookPoint::ResidPost, layers, 1000, in.special);

  auto serve = [&](uint64_t seed) {
    in.sc.seed = seed;
    data::Corpus corpus(in.cc, data::Split::Train);
    WindowStream windows(corpus, in.tok, in.sc.windows);
    ActivationStore store(in.m, windows, model::HookPoint::ResidPost, layers, in.sc, in.special);
    std::vector<std::vector<float>> out(2), batch(2, std::vector<float>(size_t(20 * d)));
    for (int64_t b = 0; b < n_batches; ++b) {
      EXPECT_TRUE(store.next_batch({batch[0].data(), batch[1].data()}));
      for (int s = 0; s < 2; ++s) out[s].insert(out[s].end(), batch[s].begin(), batch[s].end());
    }
    return out;
  };
  const auto served = serve(7);
  // Each served pair of rows is one token's activations in layers 0 and 2 (never a BOS one),
  // and no token is served twice. Tokens with the same context have equal activations, so a
  // row takes the first unused token that matches it.
  std::set<int64_t> used;
  std::vector<int64_t> order;
  int64_t max_row = 0;
  for (int64_t r = 0; r < n_batches * 20; ++r) {
    int64_t found = -1;
    for (int64_t i = 0; i < all.n && found < 0; ++i)
      if (!used.count(i) && row_distance(all.acts[0], d, i, served[0].data() + r * d) < 1e-4f &&
          row_distance(all.acts[1], d, i, served[1].data() + r * d) < 1e-4f)
        found = i;
    ASSERT_GE(found, 0) << "row " << r << " is no unserved non-special token's activations";
    used.insert(found);
    order.push_back(found);
    max_row = std::max(max_row, found);
  }
  // Shuffled: not served in corpus order, and drawn from beyond the first batches' tokens.
  EXPECT_FALSE(std::is_sorted(order.begin(), order.end()));
  EXPECT_GT(max_row, n_batches * 20);
  EXPECT_EQ(serve(7), served);  // deterministic for a seed
  EXPECT_NE(serve(8), served);  // and the seed matters
}

// A stream of rows for the store's RowFill: row k of layer l is (k + l/2, -k) (d = 2); fills
// can be slowed down (every third) to make the consumer wait; `fail_after` rows: an Error.
struct CountingRows {
  int64_t next = 0, end = 0, fail_after = -1, calls = 0;
  bool slow = false;
  int64_t read(const std::vector<float*>& dst, int64_t max_rows) {
    if (slow && ++calls % 3 == 0) std::this_thread::sleep_for(std::chrono::milliseconds(2));
    if (fail_after >= 0 && next >= fail_after) fail("counting rows", "row", "no more by design");
    const int64_t n = std::min(max_rows, end - next);
    for (int64_t r = 0; r < n; ++r, ++next)
      for (size_t l = 0; l < dst.size(); ++l)
        dst[l][2 * r] = float(next) + 0.5f * float(l), dst[l][2 * r + 1] = -float(next);
    return n;
  }
};

// The store's algorithm on a plain buffer (fill to capacity in chunks of max_fill, shuffle,
// serve the front, keep half at the front, refill): every batch of layer 0, flattened.
std::vector<std::vector<float>> plain_buffer_batches(CountingRows src, const StoreConfig& sc,
                                                     int64_t max_fill) {
  const int64_t capacity =
      sc.n_batches_in_buffer * sc.prompts_per_forward * sc.windows.context_size;
  std::vector<float> buf(size_t((capacity + max_fill) * 2)), other(buf.size());
  std::mt19937_64 rng(sc.seed);
  int64_t rows = 0;
  bool exhausted = false;
  std::vector<std::vector<float>> batches;
  while (true) {
    while (rows < capacity && !exhausted) {
      const int64_t added = src.read({buf.data() + rows * 2, other.data() + rows * 2}, max_fill);
      exhausted = added == 0;
      rows += added;
    }
    std::vector<int64_t> perm(static_cast<size_t>(rows));
    std::iota(perm.begin(), perm.end(), 0);
    std::shuffle(perm.begin(), perm.end(), rng);
    std::vector<float> shuffled(size_t(rows * 2));
    for (int64_t r = 0; r < rows; ++r)
      std::copy_n(buf.begin() + perm[size_t(r)] * 2, 2, shuffled.begin() + r * 2);
    std::copy(shuffled.begin(), shuffled.end(), buf.begin());
    const int64_t keep = exhausted ? 0 : capacity / 2;
    const int64_t n_batches = std::max<int64_t>(0, (rows - keep) / sc.batch_tokens);
    if (n_batches == 0) return batches;
    for (int64_t b = 0; b < n_batches; ++b)
      batches.emplace_back(buf.begin() + b * sc.batch_tokens * 2,
                           buf.begin() + (b + 1) * sc.batch_tokens * 2);
    const int64_t served = n_batches * sc.batch_tokens;
    std::copy(buf.begin() + served * 2, buf.begin() + rows * 2, buf.begin());
    rows -= served;
  }
}

// The ring buffer (fills written after the kept rows, wrapping into the served ones) serves
// exactly the plain buffer's batches, filled between the batches or ahead on the store's
// thread (from the start or switched on midway, with slow fills and a slow consumer), through
// every refill to the end of the rows.
TEST(ActivationStore, TheRingServesThePlainBuffersBatchesFilledAheadOrNot) {
  StoreConfig sc;
  sc.windows.context_size = 16;
  sc.prompts_per_forward = 3;
  sc.n_batches_in_buffer = 4;  // capacity 192 rows
  sc.batch_tokens = 20;
  sc.seed = 11;
  const int64_t max_fill = 37;  // not a divisor of anything: fills straddle the ring's end
  CountingRows src{.end = 1500};
  const auto want = plain_buffer_batches(src, sc, max_fill);
  ASSERT_GT(want.size(), 60u);
  // The position a checkpoint records after each batch: the same in every mode (where the rows
  // not yet shuffled in begin), however far the thread has read.
  std::vector<int64_t> positions_in_turn;
  for (int mode = 0; mode < 4; ++mode) {  // between, ahead, ahead from batch 5, ahead + views
    SCOPED_TRACE("mode " + std::to_string(mode));
    CountingRows rows = src;
    rows.slow = mode > 0;
    ActivationStore store(
        [&](const std::vector<float*>& dst, int64_t n) { return rows.read(dst, n); }, max_fill, 2,
        2, sc);
    store.track_position([&rows] { return rows.next; });
    std::vector<int64_t> positions;
    if (mode == 1 || mode == 3) store.fill_ahead();
    std::vector<float> b0(size_t(sc.batch_tokens * 2)), b1(b0.size());
    std::vector<const float*> view;
    size_t n = 0;
    for (;; ++n) {
      if (mode == 2 && n == 5) store.fill_ahead();
      if (mode > 0 && n % 4 == 0) std::this_thread::sleep_for(std::chrono::milliseconds(3));
      if (mode == 3) {
        if (!store.next_batch_view(view)) break;
        std::copy_n(view[0], b0.size(), b0.begin());
        std::copy_n(view[1], b1.size(), b1.begin());
      } else if (!store.next_batch({b0.data(), b1.data()})) {
        break;
      }
      ASSERT_LT(n, want.size());
      ASSERT_EQ(b0, want[n]) << "batch " << n;
      for (size_t i = 0; i < b1.size(); i += 2) ASSERT_EQ(b1[i], b0[i] + 0.5f) << "layers aligned";
      if (mode == 1 && n % 10 == 0)  // the thread has read its round (or waits for slots)
        std::this_thread::sleep_for(std::chrono::milliseconds(30));
      positions.push_back(store.checkpoint_position());
    }
    EXPECT_EQ(n, want.size());
    if (mode == 0)
      positions_in_turn = positions;
    else
      EXPECT_EQ(positions, positions_in_turn);
    if (mode == 0) {
      EXPECT_EQ(store.wait_seconds(), 0.0);  // filled in turn: nothing to wait for
    }
  }
}

// Filling ahead, the fill's error reaches the batch call (no hang, no crash); stop_filling
// ends the thread whatever it waits for, and the store then refuses to refill; a store dropped
// while its thread waits for served rows returns.
TEST(ActivationStore, FillAheadReportsErrorsAndStops) {
  StoreConfig sc;
  sc.windows.context_size = 16;
  sc.prompts_per_forward = 3;
  sc.n_batches_in_buffer = 4;
  sc.batch_tokens = 20;
  std::vector<float> b0(40), b1(40);
  auto filling_ahead = [&](CountingRows& rows) {
    auto store = std::make_unique<ActivationStore>(
        [&rows](const std::vector<float*>& dst, int64_t n) { return rows.read(dst, n); }, 37, 2, 2,
        sc);
    store->fill_ahead();
    return store;
  };
  auto expect_error_naming = [&](ActivationStore& store, const std::string& what) {
    try {
      for (int b = 0; b < 100; ++b) store.next_batch({b0.data(), b1.data()});
      ADD_FAILURE() << "no error naming '" << what << "'";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(what), std::string::npos) << e.what();
    }
  };
  CountingRows failing{.end = 100000, .fail_after = 300}, endless{.end = 100000};
  expect_error_naming(*filling_ahead(failing), "no more by design");
  auto stopped = filling_ahead(endless);
  ASSERT_TRUE(stopped->next_batch({b0.data(), b1.data()}));
  stopped->stop_filling();
  expect_error_naming(*stopped, "stopped");  // once the shuffled batches are served
  endless.next = 0;
  auto dropped = filling_ahead(endless);
  ASSERT_TRUE(dropped->next_batch({b0.data(), b1.data()}));
  std::this_thread::sleep_for(std::chrono::milliseconds(20));  // the thread waits for slots
  // While it waits, the source is free and dropping the store returns (the thread is told to
  // stop). Each on a thread of its own, bounded: a regression fails here, not at ctest's timeout
  // (the store is then leaked, so that nothing joins the stuck thread).
  auto returns_in_time = [](std::function<void()> f) {
    auto done = std::make_shared<std::promise<void>>();
    std::future<void> finished = done->get_future();
    std::thread([f = std::move(f), done] { f(), done->set_value(); }).detach();
    return finished.wait_for(std::chrono::seconds(30)) == std::future_status::ready;
  };
  ActivationStore* raw = dropped.release();
  raw->track_position([&endless] { return endless.next; });
  ASSERT_TRUE(returns_in_time([raw] { raw->checkpoint_position(); }))
      << "checkpoint_position() blocked while the fill thread waits";
  ASSERT_TRUE(returns_in_time([raw] { delete raw; }))
      << "dropping a store whose fill thread waits did not return";
}

// From the model: a store that fills ahead (the forwards on its thread) serves the batches of
// one that fills between them.
TEST(ActivationStore, FillAheadServesTheSameBatchesFromTheModel) {
  TinyStoreInputs in;
  in.sc.seed = 3;
  const std::vector<int64_t> layers = {0, 2};
  const int64_t d = in.m.cfg.hidden_size;
  data::Corpus c_plain(in.cc, data::Split::Train), c_ahead(in.cc, data::Split::Train);
  WindowStream w_plain(c_plain, in.tok, in.sc.windows), w_ahead(c_ahead, in.tok, in.sc.windows);
  // The plain store's batches first: two CPU forwards at once would share OpenBLAS, which is
  // not safe to call from two threads (a GPU release's thread runs cuBLAS instead).
  ActivationStore plain(in.m, w_plain, model::HookPoint::ResidPost, layers, in.sc, in.special);
  const int n_batches = 30;  // several refills of the 192-row buffer
  std::vector<std::vector<float>> want(2 * n_batches, std::vector<float>(size_t(20 * d)));
  for (int b = 0; b < n_batches; ++b)
    ASSERT_TRUE(plain.next_batch({want[size_t(2 * b)].data(), want[size_t(2 * b + 1)].data()}));
  ActivationStore ahead(in.m, w_ahead, model::HookPoint::ResidPost, layers, in.sc, in.special);
  ahead.fill_ahead();
  std::vector<std::vector<float>> got(2, std::vector<float>(size_t(20 * d)));
  for (int b = 0; b < n_batches; ++b) {
    ASSERT_TRUE(ahead.next_batch({got[0].data(), got[1].data()}));
    for (int s = 0; s < 2; ++s)
      test::expect_close(got[size_t(s)], want[size_t(2 * b + s)], 1e-6,
                         "batch " + std::to_string(b) + " layer " + std::to_string(layers[s]));
  }
  EXPECT_GE(ahead.tokens_forwarded(), plain.tokens_forwarded());  // it reads ahead
}

// The release CLI's arguments for the tiny model: layers 0 and 2, 20k tokens per SAE.
std::string release_args(const std::string& corpus, const std::string& out) {
  return "release --model " + kModel + " --dataset '" + corpus +
         "' --layers 0,2 --tokens 20000 -o " + out +
         " --model-name tiny-gemma2 --context-size 16 --prompts-per-forward 4 "
         "--n-batches-in-buffer 4 --holdout-every 10 --heldout-tokens 512 --ce-windows 2 "
         "--log-every 50 --set sae.d_sae=64 --set sae.k=4 --set sae.matryoshka_widths=[16,64] "
         "--set training.batch_size=64 --set training.checkpoint_every_steps=50 "
         "--set optimizer.lr=3e-3";
}

// The model card's table rows: (sae id) -> {l0, explained variance, CE-loss score} as printed.
std::map<std::string, std::vector<double>> card_rows(const std::string& md) {
  std::map<std::string, std::vector<double>> rows;
  const std::regex row(R"(\| (\d+) \| (\S+) \| 64 \| ([-0-9.]+) \| ([-0-9.]+) \| ([-0-9.]+) \|)");
  for (auto it = std::sregex_iterator(md.begin(), md.end(), row); it != std::sregex_iterator();
       ++it)
    rows[(*it)[2]] = {std::stod((*it)[3]), std::stod((*it)[4]), std::stod((*it)[5])};
  return rows;
}

TEST(Release, TwoLayersTwoVariantsEndToEnd) {
  test::TempDir dir;
  const std::string corpus = write_corpus(dir), out = dir / "release";
  auto r = test::run_cli(release_args(corpus, out));
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("memory: model"), std::string::npos) << "no memory plan printed";
  // The checkpoint writer's states: one per SAE here (4 small SAEs, within its 1 GiB budget).
  // (Each: d_in 64, d_sae 64, W_encT, W_dec, b_enc, b_dec and Adam's v; counters.)
  const std::string states = fmt_bytes(4.0 * ((4 * 64 * 64 + 4 * 64) * 4 + 8 + 2 * 64 * 8));
  EXPECT_NE(r.output.find("+ checkpoint states " + states + " ="), std::string::npos)
      << states << "\n"
      << r.output;
  EXPECT_NE(r.output.find("tok/s"), std::string::npos);

  const auto release = read_json_file(out + "/release.json");
  const std::string card = test::read_bytes(out + "/README.md");
  const auto rows = card_rows(card);
  ASSERT_EQ(rows.size(), 4u) << card;
  // What is published names the model and the data, never a path on this machine.
  const std::string model_folder = fs::path(kModel).filename().string();
  EXPECT_EQ(release["model"], model_folder);
  EXPECT_EQ(release["corpus"]["shards"][0], fs::path(corpus).filename().string());
  for (const std::string& text : {card, release.dump()}) {
    EXPECT_EQ(text.find(dir.path.string()), std::string::npos) << text;
    EXPECT_EQ(text.find(test::test_dir().string()), std::string::npos) << text;
  }
  EXPECT_NE(card.find("hf upload <org>/<repo> . . --exclude \".work/*\""), std::string::npos);

  // The held-out activations the release evaluated on, rebuilt independently.
  const model::Gemma2 m = model::Gemma2::load(kModel, {.verbose = false});
  const model::Tokenizer tok(kModel + "/tokenizer.model");
  data::CorpusConfig cc;
  cc.shards = {corpus};
  cc.holdout_every = 10;
  data::Corpus held_corpus(cc, data::Split::Heldout);
  data::WindowConfig wc;
  wc.context_size = 16;
  WindowStream held_windows(held_corpus, tok, wc);
  const Heldout held = collect_heldout(m, held_windows, model::HookPoint::ResidPost, {0, 2}, 512,
                                       {tok.bos_id(), tok.eos_id(), tok.pad_id()});
  ASSERT_EQ(held.n, 512);

  for (const std::string variant : {"standard", "snap"})
    for (int64_t layer : {0, 2}) {
      const std::string hook = "blocks." + std::to_string(layer) + ".hook_resid_post";
      const std::string id = variant + "/" + hook;
      SCOPED_TRACE(id);
      // Loads through the release folder, as from_pretrained(<folder>, id) does.
      const LoadedSae l = load_from_disk(resolve_pretrained(out, id));
      EXPECT_EQ(l.sae.cfg.d_in, 64);
      EXPECT_EQ(l.sae.cfg.d_sae, 64);
      EXPECT_TRUE(l.sparsity.has_value());
      const auto cfg = read_json_file(l.folder + "/cfg.json");
      EXPECT_EQ(cfg["metadata"]["hook_name"], hook);
      EXPECT_EQ(cfg["metadata"]["model_name"], "tiny-gemma2");
      EXPECT_EQ(cfg["metadata"]["dataset_path"], fs::path(corpus).filename().string());
      EXPECT_EQ(cfg.dump().find(dir.path.string()), std::string::npos) << cfg.dump();
      EXPECT_EQ(cfg["metadata"]["context_size"], 16);
      EXPECT_EQ(cfg["metadata"]["prepend_bos"], true);

      // release.json holds what was measured, and the card prints the same numbers.
      const auto& res = release["results"][variant][hook];
      EXPECT_EQ(res["training_tokens"], 19968);
      EXPECT_EQ(res["heldout_tokens"], 512);
      const Metrics again = evaluate_in_batches(
          l.sae, {held.acts[size_t(layer == 2)].data(), size_t(512 * 64)}, 512, 512);
      EXPECT_NEAR(res["explained_variance"].get<double>(), again.explained_variance, 1e-5);
      EXPECT_NEAR(res["l0"].get<double>(), again.l0, 1e-9);
      EXPECT_GT(again.explained_variance, 0.3) << "trained SAEs reconstruct";
      EXPECT_GT(again.l0, 1.0);
      EXPECT_LT(again.l0, 16.0);
      const auto& row = rows.at(id);
      EXPECT_NEAR(row[0], res["l0"].get<double>(), 0.005);
      EXPECT_NEAR(row[1], res["explained_variance"].get<double>(), 5e-5);
      EXPECT_NEAR(row[2], res["ce_loss_score"].get<double>(), 5e-5);
      EXPECT_TRUE(std::isfinite(res["lm_score"]["ce_clean"].get<double>()));
    }
  // The disk plan, printed first, against what was written: each checkpoint's and each SAE
  // folder's tensors (their safetensors headers on top).
  EXPECT_NE(r.output.find("disk: checkpoints "), std::string::npos) << r.output;
  nlohmann::json c = train::preset("gemma-2-2b-matryoshka-standard");
  for (const char* o :
       {"sae.d_sae=64", "sae.k=4", "sae.matryoshka_widths=[16,64]", "training.batch_size=64"})
    train::apply_override(c, o);
  c["data"] = {{"type", "synthetic"}};
  const train::TrainConfig cfg = train::TrainConfig::from_json(c, "test");
  const int64_t d = model::read_gemma2_config(kModel).hidden_size;
  const int64_t ckpt = train::Trainer::planned_checkpoint_bytes(cfg, d);
  const int64_t sae = train::Trainer::planned_sae_bytes(cfg, d);
  for (const std::string variant : {"standard", "snap"})
    for (const std::string hook : {"blocks.0.hook_resid_post", "blocks.2.hook_resid_post"}) {
      const auto written = int64_t(
          fs::file_size(out + "/.work/" + variant + "/" + hook + "/checkpoint/state.safetensors"));
      EXPECT_GE(written, ckpt) << variant << "/" << hook;
      EXPECT_LE(written, ckpt + 4096) << variant << "/" << hook;
      const std::string folder = out + "/" + variant + "/" + hook;
      const auto tensors = int64_t(fs::file_size(folder + "/sae_weights.safetensors") +
                                   fs::file_size(folder + "/sparsity.safetensors"));
      EXPECT_GE(tensors, sae) << variant << "/" << hook;
      EXPECT_LE(tensors, sae + 4096) << variant << "/" << hook;
    }
}

// A disk too small for the plan stops the job before it trains, naming the folder and the
// sizes; a resumed job counts the checkpoints it has written already.
TEST(DiskPlan, RefusesWhatDoesNotFitAndCountsWhatIsThere) {
  nlohmann::json c = train::preset("gemma-2-2b-matryoshka-snap");
  c["data"] = {{"type", "synthetic"}};
  const train::TrainConfig cfg = train::TrainConfig::from_json(c, "test");
  // The seed's shape: 1.21 GB per checkpoint (Adam without momentum), 0.6 GB per SAE folder.
  const int64_t ckpt = train::Trainer::planned_checkpoint_bytes(cfg, 2304);
  EXPECT_EQ(ckpt, (4 * 32768 * 2304 + 2 * 32768 + 2 * 2304) * 4 + 8 + 2 * 32768 * 8);
  EXPECT_EQ(train::Trainer::planned_sae_bytes(cfg, 2304),
            (2 * 32768 * 2304 + 2 * 32768 + 2304) * 4 + 32768 * 4);
  const std::vector<train::TrainConfig> fifty(50, cfg);
  const DiskPlan fresh = plan_release_disk(fifty, 2304, 0);
  EXPECT_EQ(fresh.checkpoints, 50 * ckpt);
  EXPECT_EQ(fresh.replacing, ckpt);
  EXPECT_EQ(fresh.needed(), 51 * ckpt + 50 * train::Trainer::planned_sae_bytes(cfg, 2304));
  std::printf("the seed's release on disk: %s\n", fresh.describe().c_str());
  EXPECT_NO_THROW(check_disk(fresh, fresh.needed(), "out/release"));
  try {
    check_disk(fresh, fresh.needed() - 1, "out/release");
    ADD_FAILURE() << "a disk one byte short was accepted";
  } catch (const Error& e) {
    const std::string what = e.what();
    EXPECT_NE(what.find("out/release"), std::string::npos) << what;
    EXPECT_NE(what.find("free"), std::string::npos) << what;
    EXPECT_NE(what.find("--layers"), std::string::npos) << what;
  }
  // Resumed: the checkpoints on disk are rewritten in place (more than that is not counted).
  const DiskPlan resumed = plan_release_disk(fifty, 2304, 50 * ckpt + 12345);
  EXPECT_EQ(resumed.present, 50 * ckpt);
  EXPECT_EQ(resumed.needed(), fresh.needed() - 50 * ckpt);
  EXPECT_NE(resumed.describe().find("already written"), std::string::npos);
}

// Threads that share the machine (docs/threads.md): beside a CPU-bound process, the tiny
// release on every core the process may use must not collapse against one thread (it took
// 68x as long before its parallel regions were sized by their work). 3x is generous on
// purpose, so that other tests running at the same time cannot make it flaky.
TEST(Release, TinyReleaseBesideABusyProcessKeepsItsPace) {
  test::TempDir dir;
  const std::string corpus = write_corpus(dir);
  const pid_t busy = ::fork();
  ASSERT_GE(busy, 0);
  if (busy == 0) {
    std::atomic<uint64_t> spins{0};
    for (;;) spins.fetch_add(1, std::memory_order_relaxed);
  }
  // The defaults a user gets: no OMP_* settings, so the CLI picks its threads and wait policy.
  auto seconds = [&](const std::string& threads, const std::string& out) {
    const auto t0 = std::chrono::steady_clock::now();
    const auto r = test::run_cli_env("env -u OMP_NUM_THREADS -u OMP_WAIT_POLICY",
                                     threads + release_args(corpus, dir / out));
    EXPECT_EQ(r.exit_code, 0) << r.output;
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  };
  double one = 1e9, all = 1e9;
  for (int rep = 0; rep < 2; ++rep) {  // the better of two runs of each, interleaved
    one = std::min(one, seconds("--threads 1 ", "one" + std::to_string(rep)));
    all = std::min(all, seconds("", "all" + std::to_string(rep)));
  }
  ::kill(busy, SIGKILL);
  ::waitpid(busy, nullptr, 0);
  EXPECT_LT(all, 3.0 * one) << "1 thread " << one << " s, default threads " << all << " s";
  std::printf("beside a busy process: 1 thread %.2f s, default threads %.2f s\n", one, all);
}

// A resumed release ends as an uninterrupted one: every SAE trained on all its tokens, fitted
// and in place.
void expect_whole_release(const std::string& out) {
  const auto release = read_json_file(out + "/release.json");
  for (const std::string variant : {"standard", "snap"})
    for (const std::string hook : {"blocks.0.hook_resid_post", "blocks.2.hook_resid_post"}) {
      SCOPED_TRACE(variant + "/" + hook);
      EXPECT_EQ(release["results"][variant][hook]["training_tokens"], 19968);
      EXPECT_GT(release["results"][variant][hook]["explained_variance"].get<double>(), 0.3);
      EXPECT_TRUE(fs::exists(out + "/" + variant + "/" + hook + "/sae_weights.safetensors"));
    }
}

TEST(Release, StopsAndResumes) {
  test::TempDir dir;
  const std::string corpus = write_corpus(dir), out = dir / "release";
  // On the step cadence (training.checkpoint_every_steps = 50) instead of the clock.
  auto r = test::run_cli(release_args(corpus, out) + " --stop-at-step 120 --checkpoint-minutes 0");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  for (const char* at :
       {"checkpoint at step 50:", "checkpoint at step 100:", "checkpoint at step 120:"})
    EXPECT_NE(r.output.find(at), std::string::npos) << at << "\n" << r.output;
  EXPECT_EQ(r.output.find("checkpoint at step 51:"), std::string::npos) << r.output;
  EXPECT_FALSE(fs::exists(out + "/release.json"));
  EXPECT_FALSE(fs::exists(out + "/standard"));
  const auto state = read_json_file(out + "/.work/state.json");
  EXPECT_EQ(state["step"], 120);
  EXPECT_GT(state["corpus_next_document"].get<int64_t>(), 0);

  // Without --resume the job's folder is not overwritten.
  r = test::run_cli(release_args(corpus, out));
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.output.find("--resume"), std::string::npos) << r.output;

  // On the clock: a tiny period checkpoints after every step (and never at the step cadence's
  // 150 with the default of 30 minutes, below).
  r = test::run_cli(release_args(corpus, out) +
                    " --resume --checkpoint-minutes 1e-7 --stop-at-step 123");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  for (const char* at :
       {"checkpoint at step 121:", "checkpoint at step 122:", "checkpoint at step 123:"})
    EXPECT_NE(r.output.find(at), std::string::npos) << at << "\n" << r.output;
  EXPECT_EQ(read_json_file(out + "/.work/state.json")["step"], 123);

  r = test::run_cli(release_args(corpus, out) + " --resume");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("resuming at step 123"), std::string::npos) << r.output;
  EXPECT_EQ(r.output.find("checkpoint at step 150:"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("evaluation"), std::string::npos) << r.output;
  expect_whole_release(out);

  // The three runs' progress lines and checkpoints, appended to .work/progress.jsonl.
  std::vector<int64_t> checkpoints, steps;
  std::istringstream lines(test::read_bytes(out + "/.work/progress.jsonl"));
  for (std::string line; std::getline(lines, line);) {
    const auto rec = nlohmann::json::parse(line);
    if (rec.contains("checkpoint")) {
      checkpoints.push_back(rec["checkpoint"].get<int64_t>());
      EXPECT_GT(rec["bytes"].get<int64_t>(), 4 * 64 * 64 * 4) << line;  // 4 SAEs' weights at least
      continue;
    }
    steps.push_back(rec["step"].get<int64_t>());
    EXPECT_EQ(rec["tokens"].get<int64_t>(), rec["step"].get<int64_t>() * 64) << line;
    EXPECT_GT(rec["tokens_per_s"].get<double>(), 0.0) << line;
    const double parts = rec["forward_s"].get<double>() + rec["sae_steps_s"].get<double>() +
                         rec["evaluation_s"].get<double>() + rec["checkpoints_s"].get<double>();
    EXPECT_LE(parts, rec["seconds"].get<double>() * 1.01 + 1e-3) << line;  // shares of its time
    EXPECT_TRUE(rec.contains("mean_l0") && rec.contains("mean_ev") && rec.contains("rss_bytes"));
  }
  EXPECT_EQ(checkpoints, (std::vector<int64_t>{50, 100, 120, 121, 122, 123}));
  EXPECT_EQ(steps, (std::vector<int64_t>{50, 100, 150, 200, 250, 300, 312}));

  // Resumed once finished (a requeued job): nothing to do, nothing rewritten.
  const std::string written = test::read_bytes(out + "/release.json");
  r = test::run_cli(release_args(corpus, out) + " --resume");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("is finished already (19968 training tokens per SAE; release.json): "
                          "nothing to do"),
            std::string::npos)
      << r.output;
  EXPECT_EQ(test::read_bytes(out + "/release.json"), written);
  // Planned again (the disk plan counts what is there): the plans, nothing rewritten.
  r = test::run_cli(release_args(corpus, out) + " --resume --plan-only");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("release: plan only: it fits"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find(" - already written "), std::string::npos) << r.output;
  EXPECT_EQ(test::read_bytes(out + "/release.json"), written);
}

// In one process each checkpoint is a round: the SAEs' states taken between steps, written on
// a thread while the steps go on, the release state last. One state held at a time (SAEs taken
// at later steps as the disk frees up), on a 25-step cadence and on every step (each round
// then still being written when the next is due: it takes its last SAEs at the next round's
// step, which does not take them again). A round at every cadence step, and the SAEs end bit
// for bit as a run that never checkpointed (taking a state changes nothing).
// A step that fails (an SAE diverging at its second step, rollbacks off) ends the release with
// its error, after the round taken at the first step is on disk whole: every SAE's checkpoint of
// step 1 and the release state of step 1.
TEST(Release, AFailedStepLeavesTheRoundTakenBeforeItOnDisk) {
  test::TempDir dir;
  const std::string corpus = write_corpus(dir), out = dir / "r";
  const auto r = test::run_cli(release_args(corpus, out) +
                               " --checkpoint-minutes 0 --set training.checkpoint_every_steps=1 "
                               "--set optimizer.lr=1e36 --set training.max_rollbacks=0");
  EXPECT_EQ(r.exit_code, 1) << r.output;
  EXPECT_NE(r.output.find("step 2: the loss is"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("so the training diverged"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("the checkpoint of step 1 is intact"), std::string::npos) << r.output;
  EXPECT_EQ(read_json_file(out + "/.work/state.json")["step"], 1);
  for (const std::string variant : {"standard", "snap"})
    for (const std::string hook : {"blocks.0.hook_resid_post", "blocks.2.hook_resid_post"})
      EXPECT_EQ(
          read_json_file(out + "/.work/" + variant + "/" + hook + "/checkpoint/state.json")["step"],
          1)
          << variant << "/" << hook;
  EXPECT_FALSE(fs::exists(out + "/release.json"));
  // `sae status` names the error of each SAE that stopped it, and gives no ETA.
  const auto status = pipeline::job_status(out);
  EXPECT_FALSE(status.contains("eta_seconds"));
  const std::string text = pipeline::describe_job_status(status);
  EXPECT_NE(
      text.find("standard/blocks.0.hook_resid_post: stopped by an error at step 2: the loss "),
      std::string::npos)
      << text;
}

TEST(Release, CheckpointsBesideTheStepsChangeNothing) {
  test::TempDir dir;
  const std::string corpus = write_corpus(dir);
  auto r = test::run_cli(release_args(corpus, dir / "none") +
                         " --checkpoint-minutes 0 --set training.checkpoint_every_steps=0");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_EQ(r.output.find("release: checkpoint at"), std::string::npos) << r.output;
  for (const int64_t every : {25, 1}) {
    SCOPED_TRACE(every);
    const std::string out = dir / ("every" + std::to_string(every));
    r = test::run_cli(release_args(corpus, out) +
                      " --checkpoint-minutes 0 --checkpoint-snapshots 1 "
                      "--set training.checkpoint_every_steps=" +
                      std::to_string(every));
    ASSERT_EQ(r.exit_code, 0) << r.output;
    EXPECT_NE(r.output.find("written in"), std::string::npos) << r.output;
    EXPECT_NE(r.output.find("beside the steps"), std::string::npos) << r.output;
    for (const std::string variant : {"standard", "snap"})
      for (const std::string hook : {"blocks.0.hook_resid_post", "blocks.2.hook_resid_post"}) {
        const std::string sae = "/" + variant + "/" + hook + "/sae_weights.safetensors";
        EXPECT_EQ(test::read_bytes(dir / "none" + sae), test::read_bytes(out + sae)) << sae;
      }
    std::vector<int64_t> rounds, last_sae_step;
    int64_t rounds_after_a_late_one = 0;
    std::istringstream lines(test::read_bytes(out + "/.work/progress.jsonl"));
    for (std::string line; std::getline(lines, line);) {
      const auto rec = nlohmann::json::parse(line);
      if (!rec.contains("checkpoint")) continue;
      rounds.push_back(rec["checkpoint"].get<int64_t>());
      const int64_t first = rounds.back(), last = rec["last_sae_step"].get<int64_t>();
      EXPECT_GE(last, first) << line;
      EXPECT_LE(last, first + every) << line;  // the rest taken when the next round is due
      EXPECT_LE(rec["paused_s"].get<double>(), rec["seconds"].get<double>() + 1e-6) << line;
      // All 4 SAEs but those the last round took at this very step. Each SAE's state: d_in 64,
      // d_sae 64, W_encT, W_dec, b_enc, b_dec and Adam's v; counters.
      const int64_t taken = rec["saes"].get<int64_t>();
      EXPECT_EQ(taken + rec["saes_already_saved"].get<int64_t>(), 4) << line;
      if (rounds.size() < 2 || last_sae_step.back() < first) {
        EXPECT_EQ(taken, 4) << line;
      } else {
        EXPECT_GE(taken, 1) << line;  // the last round took its first SAE at its own step
        ++rounds_after_a_late_one;
      }
      EXPECT_EQ(rec["bytes"].get<int64_t>(), taken * ((4 * 64 * 64 + 4 * 64) * 4 + 8 + 2 * 64 * 8))
          << line;
      last_sae_step.push_back(last);
    }
    if (every == 1) {
      EXPECT_GT(rounds_after_a_late_one, 100);  // every other round at least
    }
    std::vector<int64_t> due;
    for (int64_t s = every; s < 312; s += every) due.push_back(s);
    if (rounds.size() + 1 == due.size()) due.pop_back();  // the last cut by the end
    EXPECT_EQ(rounds, due);
  }
  r = test::run_cli(release_args(corpus, dir / "bad") + " --checkpoint-snapshots -1");
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.output.find("checkpoint_snapshots"), std::string::npos) << r.output;
}

// A kill in the middle of a round (or of a checkpoint of several SAEs) leaves some SAEs'
// checkpoints ahead of the release state: the resume starts at the state's step and the SAEs
// ahead skip the steps they have taken, so every SAE ends with all its tokens. The picture is
// made by hand: two SAEs and the state put back to an earlier checkpoint.
TEST(Release, ResumesWithSomeSaesAheadOfTheState) {
  test::TempDir dir;
  const std::string corpus = write_corpus(dir), out = dir / "release", saved = dir / "at120";
  auto r = test::run_cli(release_args(corpus, out) + " --stop-at-step 120 --checkpoint-minutes 0");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  fs::copy(out + "/.work", saved, fs::copy_options::recursive);
  r = test::run_cli(release_args(corpus, out) + " --resume --stop-at-step 130");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  for (const std::string sae :
       {"standard/blocks.0.hook_resid_post", "snap/blocks.2.hook_resid_post"}) {
    fs::remove_all(out + "/.work/" + sae + "/checkpoint");
    fs::copy(saved + "/" + sae + "/checkpoint", out + "/.work/" + sae + "/checkpoint");
  }
  fs::copy_file(saved + "/state.json", out + "/.work/state.json",
                fs::copy_options::overwrite_existing);
  EXPECT_EQ(read_json_file(
                out + "/.work/standard/blocks.2.hook_resid_post/checkpoint/state.json")["step"],
            130);
  r = test::run_cli(release_args(corpus, out) + " --resume");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("resuming at step 120"), std::string::npos) << r.output;
  EXPECT_EQ(r.output.find("with settings other than"), std::string::npos) << r.output;
  expect_whole_release(out);
}

// A release resumed with another setting than it was started with (a lower learning rate, as
// after a divergence): every SAE records from which step it held, in release.json and in the
// model card, beside the recipe (the last run's). Bookkeeping (a log cadence) is not a change.
TEST(Release, ResumedWithOtherSettingsSaysSo) {
  test::TempDir dir;
  const std::string corpus = write_corpus(dir), out = dir / "release";
  auto r = test::run_cli(release_args(corpus, out) + " --stop-at-step 120 --checkpoint-minutes 0");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  // `sae status` of the stopped release: where it stands.
  const auto stopped = pipeline::job_status(out);
  EXPECT_EQ(stopped["kind"], "release");
  EXPECT_EQ(stopped["finished"], false);
  EXPECT_EQ(stopped["step"], 120);
  EXPECT_EQ(stopped["checkpoint"]["step"], 120);
  EXPECT_EQ(stopped["saes"].size(), 4u);
  EXPECT_EQ(stopped["running"], false);
  {  // a second process on a release that runs stops at once, writing nothing
    FolderLock running(out + "/.work/.lock", "the test");
    const std::string progress = test::read_bytes(out + "/.work/progress.jsonl");
    r = test::run_cli(release_args(corpus, out) + " --resume");
    EXPECT_EQ(r.exit_code, 1) << r.output;
    EXPECT_NE(r.output.find(".work/.lock: this folder is in use by the test (pid "),
              std::string::npos)
        << r.output;
    EXPECT_EQ(test::read_bytes(out + "/.work/progress.jsonl"), progress);
    EXPECT_EQ(pipeline::job_status(out)["running"]["job"], "the test");
  }
  EXPECT_EQ(stopped["tokens"],
            120 * stopped["total_tokens"].get<int64_t>() / stopped["total_steps"].get<int64_t>());
  const double lr0 =
      read_json_file(out + "/.work/snap/blocks.0.hook_resid_post/config.json")["optimizer"]["lr"]
          .get<double>();
  r = test::run_cli(release_args(corpus, out) +
                    " --resume --set optimizer.lr=0.00025 --set training.log_every_steps=7");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("] resumed at step 120 with settings other than its checkpoint's: "
                          "optimizer.lr "),
            std::string::npos)
      << r.output;
  const auto rel = read_json_file(out + "/release.json");
  const std::string card = test::read_bytes(out + "/README.md");
  const nlohmann::json want = {
      {{"step", 120}, {"changed", {{"optimizer.lr", {{"from", lr0}, {"to", 0.00025}}}}}}};
  for (const std::string variant : {"standard", "snap"})
    for (const std::string hook : {"blocks.0.hook_resid_post", "blocks.2.hook_resid_post"}) {
      EXPECT_EQ(rel["results"][variant][hook]["config_changes"], want) << variant << "/" << hook;
    }
  // Every SAE has the same history: said once; histories that differ, per SAE.
  EXPECT_NE(
      card.find("- Every SAE was resumed with other settings: from step 120, `optimizer.lr` "),
      std::string::npos)
      << card;
  auto partial = nlohmann::ordered_json::parse(rel.dump());
  partial["results"]["snap"]["blocks.2.hook_resid_post"].erase("config_changes");
  const std::string per_sae = pipeline::model_card(partial);
  EXPECT_EQ(per_sae.find("Every SAE"), std::string::npos) << per_sae;
  EXPECT_NE(per_sae.find("- `standard/blocks.0.hook_resid_post` was resumed with other settings: "
                         "from step 120, `optimizer.lr` "),
            std::string::npos)
      << per_sae;
  EXPECT_EQ(per_sae.find("`snap/blocks.2.hook_resid_post` was resumed"), std::string::npos)
      << per_sae;
  EXPECT_EQ(rel["recipe"]["variants"]["snap"]["config"]["optimizer"]["lr"], 0.00025);
  // `sae status` of the finished release: every SAE's history, the results.
  r = test::run_cli("status " + out);
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("finished (release.json written)"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("4 SAEs, 4 with rollbacks, resumes, an error or set aside:"),
            std::string::npos)
      << r.output;
  EXPECT_NE(r.output.find("snap/blocks.2.hook_resid_post: resumed at step 120 with optimizer.lr"),
            std::string::npos)
      << r.output;
  EXPECT_NE(r.output.find("results: 4 SAEs, mean L0"), std::string::npos) << r.output;
  r = test::run_cli("status --json " + out);
  ASSERT_EQ(r.exit_code, 0) << r.output;
  const auto js = nlohmann::json::parse(r.output.substr(r.output.find('{')));
  EXPECT_EQ(js["kind"], "release");
  EXPECT_EQ(js["step"], js["total_steps"]);
  EXPECT_EQ(js["saes"].size(), 4u);
  r = test::run_cli("status " + (dir / "nothing"));
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.output.find("nothing: no such folder"), std::string::npos) << r.output;
}

// Module parallel (docs/distributed.md): under mpirun each rank forwards its share of the
// corpus and trains its share of the SAEs on every rank's activations. 2 ranks (2 SAEs each)
// and 3 ranks (4 SAEs do not divide): every SAE is there, loads, and its held-out numbers agree
// with the single-process release on the same corpus (other batches, so not bit for bit).
TEST(Release, ModuleParallelAgreesWithOneProcess) {
  REQUIRE_MPI();
  test::TempDir dir;
  const std::string corpus = write_corpus(dir);
  auto one = test::run_cli(release_args(corpus, dir / "one"));
  ASSERT_EQ(one.exit_code, 0) << one.output;
  const auto base = read_json_file(dir / "one/release.json");
  for (int n : {2, 3}) {
    SCOPED_TRACE(n);
    const std::string out = dir / ("ranks" + std::to_string(n));
    const auto r = test::run_shell("timeout 300 " + test::mpirun(n) + SAECPP_CLI + " " +
                                   release_args(corpus, out));
    ASSERT_EQ(r.exit_code, 0) << r.output;
    EXPECT_NE(r.output.find("module parallel over " + std::to_string(n) + " ranks"),
              std::string::npos)
        << r.output;
    EXPECT_NE(r.output.find("release: rank " + std::to_string(n - 1) + ": "), std::string::npos)
        << "each rank's SAEs are listed\n"
        << r.output;
    const auto release = read_json_file(out + "/release.json");
    EXPECT_EQ(release["ranks"], n);
    EXPECT_EQ(card_rows(test::read_bytes(out + "/README.md")).size(), 4u);
    for (const std::string variant : {"standard", "snap"})
      for (const std::string hook : {"blocks.0.hook_resid_post", "blocks.2.hook_resid_post"}) {
        SCOPED_TRACE(variant + "/" + hook);
        const auto& res = release["results"][variant][hook];
        const auto& want = base["results"][variant][hook];
        EXPECT_EQ(res["training_tokens"], want["training_tokens"]);
        EXPECT_NEAR(res["explained_variance"].get<double>(),
                    want["explained_variance"].get<double>(), 0.02);
        EXPECT_NEAR(res["l0"].get<double>(), want["l0"].get<double>(),
                    0.1 * want["l0"].get<double>());
        const LoadedSae l = load_from_disk(resolve_pretrained(out, variant + "/" + hook));
        EXPECT_EQ(l.sae.cfg.d_sae, 64);
      }
  }
}

// Under mpirun a release stops and resumes as in one process (one state per rank), and
// refuses to resume with another number of ranks.
// Fewer SAEs than ranks (1 layer x 2 variants): under 3 ranks each SAE gets its own group
// ({0}, {1, 2}), data parallel inside it, so that no rank only forwards (stopped at step 120
// and resumed); `--parallel data` puts both SAEs on both ranks of 2. Every SAE is reported once
// and agrees with one process.
TEST(Release, DataParallelGroupsWhenFewerSaesThanRanks) {
  REQUIRE_MPI();
  test::TempDir dir;
  const std::string corpus = write_corpus(dir);
  auto one_layer = [&](const std::string& out) {
    std::string a = release_args(corpus, out);
    a.replace(a.find("--layers 0,2"), 12, "--layers 0");
    return a;
  };
  auto one = test::run_cli(one_layer(dir / "one"));
  ASSERT_EQ(one.exit_code, 0) << one.output;
  const auto base = read_json_file(dir / "one/release.json");
  for (const auto& [n, extra, says] :
       {std::tuple{3, std::string(), std::string("data parallel with ranks 1-2")},
        std::tuple{2, std::string(" --parallel data"),
                   std::string("data parallel with ranks 0-1")}}) {
    SCOPED_TRACE(n);
    const std::string out = dir / ("ranks" + std::to_string(n));
    if (n == 3) {  // stopped and resumed: the groups checkpoint and continue together
      const auto stopped = test::run_shell("timeout 300 " + test::mpirun(n) + SAECPP_CLI + " " +
                                           one_layer(out) + extra + " --stop-at-step 120");
      ASSERT_EQ(stopped.exit_code, 0) << stopped.output;
      ASSERT_FALSE(std::filesystem::exists(out + "/release.json"));
    }
    const auto r = test::run_shell("timeout 300 " + test::mpirun(n) + SAECPP_CLI + " " +
                                   one_layer(out) + extra + (n == 3 ? " --resume" : ""));
    ASSERT_EQ(r.exit_code, 0) << r.output;
    EXPECT_NE(r.output.find(says), std::string::npos) << r.output;
    if (n == 3) {
      EXPECT_NE(r.output.find("resuming at step 120"), std::string::npos) << r.output;
    }
    EXPECT_EQ(r.output.find("forward only"), std::string::npos) << r.output;
    const auto release = read_json_file(out + "/release.json");
    EXPECT_EQ(release["ranks"], n);
    EXPECT_EQ(card_rows(test::read_bytes(out + "/README.md")).size(), 2u);
    for (const std::string variant : {"standard", "snap"}) {
      SCOPED_TRACE(variant);
      const std::string hook = "blocks.0.hook_resid_post";
      const auto& res = release["results"][variant][hook];
      const auto& want = base["results"][variant][hook];
      EXPECT_EQ(res["training_tokens"], want["training_tokens"]);
      EXPECT_NEAR(res["explained_variance"].get<double>(), want["explained_variance"].get<double>(),
                  0.02);
      EXPECT_NEAR(res["l0"].get<double>(), want["l0"].get<double>(),
                  0.1 * want["l0"].get<double>());
      EXPECT_TRUE(res.contains("ce_loss_score"));
      const LoadedSae l = load_from_disk(resolve_pretrained(out, variant + "/" + hook));
      EXPECT_EQ(l.sae.cfg.d_sae, 64);
    }
  }
  // On GPUs the SAE steps' own exchange (data parallel) needs NCCL: refused, naming why, before
  // anything is loaded (a GPU or not).
  for (const std::string extra : {" --parallel data", ""}) {
    const std::string out = dir / "gpu";
    const auto r = test::run_shell("timeout 120 " + test::mpirun(3) + SAECPP_CLI + " " +
                                   one_layer(out) + extra + " --device cuda");
    EXPECT_NE(r.exit_code, 0);
    EXPECT_NE(r.output.find("module parallel only"), std::string::npos) << r.output;
    EXPECT_FALSE(std::filesystem::exists(out + "/.work"));
  }
}

TEST(Release, ModuleParallelStopsAndResumes) {
  REQUIRE_MPI();
  test::TempDir dir;
  const std::string corpus = write_corpus(dir), out = dir / "release";
  const std::string two = "timeout 300 " + test::mpirun(2) + SAECPP_CLI + " ";
  auto r = test::run_shell(two + release_args(corpus, out) + " --stop-at-step 120");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_FALSE(fs::exists(out + "/release.json"));
  for (int rank : {0, 1}) {
    const auto state =
        read_json_file(out + "/.work/state.rank" + std::to_string(rank) + "-of-2.json");
    EXPECT_EQ(state["step"], 120);
  }
  r = test::run_shell("timeout 300 " + test::mpirun(3) + SAECPP_CLI + " " +
                      release_args(corpus, out) + " --resume");
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.output.find("resume it with the same mpirun -np"), std::string::npos) << r.output;
  r = test::run_cli(release_args(corpus, out) + " --resume");  // one process: refused too
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.output.find("another number of ranks"), std::string::npos) << r.output;

  // On rank 0's clock, every step: every rank checkpoints at the same steps (no hang).
  r = test::run_shell(two + release_args(corpus, out) + " --resume --checkpoint-minutes 1e-7");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("resuming at step 120"), std::string::npos) << r.output;
  for (const char* at : {"checkpoint at step 121: ", "checkpoint at step 311: "})
    EXPECT_NE(r.output.find(std::string(at)), std::string::npos) << at << "\n" << r.output;
  EXPECT_NE(r.output.find("(this rank's SAEs)"), std::string::npos) << r.output;
  expect_whole_release(out);
}

// A release trained from an activation cache (no model): the hook, layers, windows and corpus
// come from cache.json, the last shard is the held-out set, and under mpirun each rank reads
// every N-th shard; the SAEs load and agree across the two; bad uses are clear errors.
TEST(Release, FromCacheInOneProcessAndModuleParallel) {
  test::TempDir dir;
  const std::string corpus = write_corpus(dir), cache = dir / "cache";
  auto r = test::tiny_cache(corpus, cache);
  ASSERT_EQ(r.exit_code, 0) << r.output;
  const std::string args =
      "release --from-cache " + cache +
      " --tokens 12800 --heldout-tokens 512 --prompts-per-forward 4 --n-batches-in-buffer 4 "
      "--log-every 50 --set sae.d_sae=64 --set sae.k=4 --set sae.matryoshka_widths=[16,64] "
      "--set training.batch_size=64 --set training.checkpoint_every_steps=50 "
      "--set optimizer.lr=3e-3 -o ";
  r = test::run_cli(args + (dir / "one"));
  ASSERT_EQ(r.exit_code, 0) << r.output;
  // The shards are read on the store's thread beside the SAE steps, or (--no-overlap) between
  // them: the same batches, so the same SAEs to the bit.
  EXPECT_NE(r.output.find("the cache's shards are read on their own thread beside the SAE steps"),
            std::string::npos)
      << r.output;
  EXPECT_NE(r.output.find("(reading the cache "), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("% waiting for it"), std::string::npos) << r.output;
  auto same_saes = [&](const std::string& a, const std::string& b) {
    for (const std::string variant : {"standard", "snap"})
      for (const std::string hook : {"blocks.0.hook_resid_post", "blocks.2.hook_resid_post"}) {
        const std::string sae = "/" + variant + "/" + hook + "/sae_weights.safetensors";
        EXPECT_EQ(test::read_bytes(a + sae), test::read_bytes(b + sae)) << a << " " << b << sae;
      }
  };
  r = test::run_cli(args + (dir / "in_turn") + " --no-overlap");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_EQ(r.output.find("beside the SAE steps"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("(reading the cache "), std::string::npos) << r.output;
  same_saes(dir / "one", dir / "in_turn");
  // Stopped and resumed, reading beside the steps or between them: the checkpoint records the
  // same cache position (where the rows not yet shuffled in begin, whether or not the thread is
  // reading the next ones), so the resumed runs train the same SAEs.
  std::vector<int64_t> stopped_at;
  for (const std::string mode : {"", " --no-overlap"}) {
    const std::string out = dir / (mode.empty() ? "stopped" : "stopped_in_turn");
    r = test::run_cli(args + out + mode + " --stop-at-step 90");
    ASSERT_EQ(r.exit_code, 0) << r.output;
    stopped_at.push_back(read_json_file(out + "/.work/state.json")["cache_next_shard"]);
    r = test::run_cli(args + out + mode + " --resume");
    ASSERT_EQ(r.exit_code, 0) << r.output;
  }
  EXPECT_EQ(stopped_at[0], stopped_at[1]);
  EXPECT_GT(stopped_at[0], 0);
  same_saes(dir / "stopped", dir / "stopped_in_turn");
  const auto one = read_json_file(dir / "one/release.json");
  EXPECT_EQ(one["from_cache"]["heldout_shards"], 1);
  EXPECT_EQ(one["from_cache"]["trained_shards"], 19);
  EXPECT_EQ(one["tokens_forwarded"], 0) << "no model ran";
  EXPECT_EQ(one["hook"], "resid_post");
  EXPECT_EQ(one["corpus"]["shards"][0], fs::path(corpus).filename().string());
  const std::string card = test::read_bytes(dir / "one/README.md");
  EXPECT_NE(card.find("Trained from an activation cache"), std::string::npos) << card;
  EXPECT_EQ(card.find("CE-loss score"), std::string::npos) << "no model, no CE-loss score";
  // The held-out rows are the first 512 of the last shard, never trained on.
  SafetensorsFile last(cache + "/blocks.2.hook_resid_post/shard-00019.safetensors");
  const std::vector<float> held = last.read_f32("activations");
  const LoadedSae l2 =
      load_from_disk(resolve_pretrained(dir / "one", "snap/blocks.2.hook_resid_post"));
  const Metrics m2 = evaluate_in_batches(l2.sae, {held.data(), size_t(512 * 64)}, 512, 512);
  EXPECT_NEAR(
      one["results"]["snap"]["blocks.2.hook_resid_post"]["explained_variance"].get<double>(),
      m2.explained_variance, 1e-5);
  for (const std::string variant : {"standard", "snap"})
    for (const std::string hook : {"blocks.0.hook_resid_post", "blocks.2.hook_resid_post"}) {
      EXPECT_EQ(one["results"][variant][hook]["training_tokens"], 12800);
      EXPECT_GT(one["results"][variant][hook]["explained_variance"].get<double>(), 0.3);
    }

  // Bad uses.
  r = test::run_cli(args + (dir / "bad") + " --model " + kModel);
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.output.find("drop --model"), std::string::npos) << r.output;
  r = test::run_cli("release --from-cache " + (dir / "nothing") + " -o " + (dir / "bad"));
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.output.find("nothing/cache.json"), std::string::npos) << r.output;
  r = test::run_cli(args + (dir / "bad") + " --layers 1");
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.output.find("the cache holds no layer 1"), std::string::npos) << r.output;
  r = test::run_cli("release --layers 0 -o " + (dir / "bad"));
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.output.find("--model"), std::string::npos) << r.output;
  EXPECT_FALSE(fs::exists(dir / "bad"));
  // A damaged shard (a NaN at row 10, column 5 of layer 2's fourth): refused when read, naming
  // the shard, before an SAE trains on it.
  fs::copy(cache, dir / "damaged", fs::copy_options::recursive);
  test::patch_f32(dir / "damaged/blocks.2.hook_resid_post/shard-00003.safetensors", "activations",
                  10 * 64 + 5, NAN);
  // A round every step: the read's error leaves the round taken before it whole on disk (every
  // SAE's checkpoint and the release state at the same step).
  r = test::run_cli(std::regex_replace(args, std::regex(cache), dir / "damaged") + (dir / "bad") +
                    " --checkpoint-minutes 0 --set training.checkpoint_every_steps=1");
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.output.find("shard-00003.safetensors: activations: row 10, column 5: activation is "
                          "nan"),
            std::string::npos)
      << r.output;
  EXPECT_FALSE(fs::exists(dir / "bad/release.json"));
  const int64_t state_step = read_json_file(dir / "bad/.work/state.json")["step"].get<int64_t>();
  EXPECT_GT(state_step, 0);
  for (const std::string variant : {"standard", "snap"})
    for (const std::string hook : {"blocks.0.hook_resid_post", "blocks.2.hook_resid_post"})
      EXPECT_EQ(read_json_file(
                    dir / ("bad/.work/" + variant + "/" + hook + "/checkpoint/state.json"))["step"],
                state_step)
          << variant << "/" << hook;

  // An outlier (one row of layer 2's fourth shard at 1e30, finite: it passes the read's check
  // and overflows the SAEs' f32 arithmetic): the two SAEs of layer 2 diverge on its batch, roll
  // back to their last checkpoint and train on; the others never notice. Said in release.json
  // and the model card.
  fs::copy(cache, dir / "outlier", fs::copy_options::recursive);
  test::patch_outlier_row(dir / "outlier/blocks.2.hook_resid_post/shard-00003.safetensors",
                          "activations", 10, 64, 1e30f);
  r = test::run_cli(std::regex_replace(args, std::regex(cache), dir / "outlier") +
                    (dir / "outlier_release") +
                    " --checkpoint-minutes 0 --set training.checkpoint_every_steps=10");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("the training diverged. Rolled back to the checkpoint of step "),
            std::string::npos)
      << r.output;
  EXPECT_NE(r.output.find("  rollbacks 2  RSS"), std::string::npos) << r.output;
  const auto outlier = read_json_file(dir / "outlier_release/release.json");
  const std::string card_out = test::read_bytes(dir / "outlier_release/README.md");
  for (const std::string variant : {"standard", "snap"}) {
    const auto& res2 = outlier["results"][variant]["blocks.2.hook_resid_post"];
    ASSERT_TRUE(res2.contains("rollbacks")) << res2;
    ASSERT_EQ(res2["rollbacks"].size(), 1u) << res2;
    const int64_t failed = res2["rollbacks"][0]["step"], to = res2["rollbacks"][0]["to_step"];
    EXPECT_EQ(to % 10, 0) << res2;  // a checkpoint's step
    EXPECT_GT(failed, to) << res2;
    EXPECT_LE(failed - to, 10) << res2;
    EXPECT_EQ(res2["skipped_tokens"], (failed - to) * 64) << res2;
    EXPECT_EQ(res2["training_tokens"], 12800) << res2;
    EXPECT_GT(res2["explained_variance"].get<double>(), 0.3) << res2;
    EXPECT_NE(card_out.find("`" + variant +
                            "/blocks.2.hook_resid_post` diverged and was rolled "
                            "back to its last checkpoint (step " +
                            std::to_string(failed) + " to step " + std::to_string(to) + "): " +
                            std::to_string((failed - to) * 64) + " training tokens skipped"),
              std::string::npos)
        << card_out;
    EXPECT_FALSE(outlier["results"][variant]["blocks.0.hook_resid_post"].contains("rollbacks"));
    // Layer 0 never met the outlier: its SAEs are the undamaged run's.
    EXPECT_EQ(outlier["results"][variant]["blocks.0.hook_resid_post"]["explained_variance"],
              one["results"][variant]["blocks.0.hook_resid_post"]["explained_variance"]);
  }

  if (std::string(SAECPP_MPIEXEC).empty()) return;  // the rest needs MPI
  r = test::run_shell("timeout 300 " + test::mpirun(2) + SAECPP_CLI + " " + args + (dir / "two"));
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("reads every N-th shard of the cache"), std::string::npos) << r.output;
  // Each rank reads its shards ahead, beside its steps and the exchanges (said once).
  const std::string beside = "the cache's shards are read on their own thread beside";
  EXPECT_NE(r.output.find(beside), std::string::npos) << r.output;
  EXPECT_EQ(r.output.find(beside), r.output.rfind(beside)) << r.output;
  r = test::run_shell("timeout 300 " + test::mpirun(2) + SAECPP_CLI + " " + args +
                      (dir / "two_in_turn") + " --no-overlap");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  same_saes(dir / "two", dir / "two_in_turn");
  const auto two = read_json_file(dir / "two/release.json");
  for (const std::string variant : {"standard", "snap"})
    for (const std::string hook : {"blocks.0.hook_resid_post", "blocks.2.hook_resid_post"}) {
      SCOPED_TRACE(variant + "/" + hook);
      EXPECT_NEAR(two["results"][variant][hook]["explained_variance"].get<double>(),
                  one["results"][variant][hook]["explained_variance"].get<double>(), 0.02);
      EXPECT_TRUE(fs::exists(dir / ("two/" + variant + "/" + hook + "/sae_weights.safetensors")));
    }
  // The outlier under mpirun: each rank's SAEs roll back on their own (one rank per SAE).
  r = test::run_shell("timeout 300 " + test::mpirun(2) + SAECPP_CLI + " " +
                      std::regex_replace(args, std::regex(cache), dir / "outlier") +
                      (dir / "outlier_two") +
                      " --checkpoint-minutes 0 --set training.checkpoint_every_steps=10");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  const auto outlier_two = read_json_file(dir / "outlier_two/release.json");
  for (const std::string variant : {"standard", "snap"}) {
    EXPECT_EQ(outlier_two["results"][variant]["blocks.2.hook_resid_post"]["rollbacks"].size(), 1u)
        << outlier_two["results"][variant];
    EXPECT_FALSE(outlier_two["results"][variant]["blocks.0.hook_resid_post"].contains("rollbacks"));
  }
}

// An SAE that keeps diverging (training.max_rollbacks spent) is set aside and the others train
// on: the release is written without it (exit 2), says where it stopped, and a resume keeps it
// aside. When the SAEs still training all diverge, the release stops as at any error, the last
// ones' checkpoints intact for a resume.
TEST(Release, AnSaeThatKeepsDivergingIsSetAsideAndTheOthersFinish) {
  test::TempDir dir;
  const std::string cache = dir / "cache";
  // Layer 2's SAEs roll back at the first of two outliers and diverge again at the second.
  const std::string args = test::diverging_release_args(write_corpus(dir), cache);
  auto r = test::run_cli(args + (dir / "straight"));
  ASSERT_EQ(r.exit_code, 2) << r.output;

  EXPECT_NE(r.output.find("snap/blocks.2.hook_resid_post set aside at step "), std::string::npos)
      << r.output;
  EXPECT_NE(r.output.find("release: 2 of 4 SAEs set aside"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("release: 2 SAEs written to "), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("  set aside 2  RSS"), std::string::npos) << r.output;
  const auto straight = read_json_file(dir / "straight/release.json");
  const std::string card = test::read_bytes(dir / "straight/README.md");
  for (const std::string variant : {"standard", "snap"}) {
    SCOPED_TRACE(variant);
    const auto& res2 = straight["results"][variant]["blocks.2.hook_resid_post"];
    ASSERT_TRUE(res2.contains("failed")) << res2;
    const auto& f = res2["failed"];
    EXPECT_EQ(f["rollbacks"], 1) << f;
    EXPECT_EQ(f["last_checkpoint_step"].get<int64_t>() % 10, 0) << f;
    EXPECT_GT(f["step"].get<int64_t>(), f["last_checkpoint_step"].get<int64_t>()) << f;
    EXPECT_NE(f["message"].get<std::string>().find("again after 1 rollback"), std::string::npos)
        << f;
    EXPECT_EQ(f["checkpoint"], ".work/" + variant + "/blocks.2.hook_resid_post/checkpoint");
    EXPECT_FALSE(res2.contains("l0")) << res2;
    EXPECT_FALSE(fs::exists(dir / ("straight/" + variant + "/blocks.2.hook_resid_post")));
    // Its last checkpoint is kept, finite, at the step it names.
    EXPECT_EQ(read_json_file(dir / ("straight/.work/" + variant +
                                    "/blocks.2.hook_resid_post/checkpoint/state.json"))["step"],
              f["last_checkpoint_step"]);
    EXPECT_NE(card.find("`" + variant +
                        "/blocks.2.hook_resid_post` is not in this release: it "
                        "diverged at step " +
                        std::to_string(f["step"].get<int64_t>()) + " again after 1 rollback"),
              std::string::npos)
        << card;
    EXPECT_NE(card.find("| 2 | " + variant + "/blocks.2.hook_resid_post | 64 | set aside |"),
              std::string::npos)
        << card;
    // Layer 0's SAEs trained on, whole.
    const auto& res0 = straight["results"][variant]["blocks.0.hook_resid_post"];
    EXPECT_EQ(res0["training_tokens"], 12800) << res0;
    EXPECT_GT(res0["explained_variance"].get<double>(), 0.3) << res0;
    EXPECT_TRUE(fs::exists(dir / ("straight/" + variant + "/blocks.0.hook_resid_post/cfg.json")));
  }
  // progress.jsonl's set_aside records: the SAEs named (every rank's under mpirun).
  auto set_aside_records = [](const std::string& release) {
    std::vector<std::string> saes;
    std::istringstream progress(test::read_bytes(release + "/.work/progress.jsonl"));
    for (std::string line; std::getline(progress, line);) {
      const auto rec = nlohmann::json::parse(line);
      if (!rec.contains("set_aside")) continue;
      saes.push_back(rec["set_aside"]["sae"].get<std::string>());
      EXPECT_TRUE(rec["set_aside"].contains("step") && rec["set_aside"].contains("message"))
          << line;
    }
    std::sort(saes.begin(), saes.end());
    return saes;
  };
  const std::vector<std::string> both_layer2 = {"snap/blocks.2.hook_resid_post",
                                                "standard/blocks.2.hook_resid_post"};
  EXPECT_EQ(set_aside_records(dir / "straight"), both_layer2);
  r = test::run_cli(args + (dir / "straight") + " --resume");  // finished: nothing to do
  EXPECT_EQ(r.exit_code, 2) << r.output;
  EXPECT_NE(r.output.find("is finished already"), std::string::npos) << r.output;
  r = test::run_cli("status " + (dir / "straight"));
  EXPECT_EQ(r.exit_code, 0) << r.output;

  EXPECT_NE(r.output.find("snap/blocks.2.hook_resid_post: set aside at step "), std::string::npos)
      << r.output;
  EXPECT_NE(r.output.find("results: 2 SAEs, mean L0"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("; 2 set aside, not in the release"), std::string::npos) << r.output;
  {  // Killed after a set-aside, before a state recorded it: progress.jsonl says it.
    auto state = read_json_file(dir / "straight/.work/state.json");
    state.erase("failed");
    test::write_bytes(dir / "killed.json", state.dump());
    fs::copy(dir / "straight", dir / "killed", fs::copy_options::recursive);
    fs::copy_file(dir / "killed.json", dir / "killed/.work/state.json",
                  fs::copy_options::overwrite_existing);
    const auto status = pipeline::job_status(dir / "killed");
    int64_t aside = 0;
    for (const auto& sae : status["saes"]) aside += sae.contains("set_aside");
    EXPECT_EQ(aside, 2) << status.dump(1);
  }

  // Stopped after the SAEs were set aside and resumed: they stay aside (recorded in the state),
  // and the others end as in the straight run.
  const int64_t aside_at =
      straight["results"]["snap"]["blocks.2.hook_resid_post"]["failed"]["step"];
  ASSERT_LT(aside_at + 10, 200);
  r = test::run_cli(args + (dir / "resumed") + " --stop-at-step " + std::to_string(aside_at + 10));
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_TRUE(read_json_file(dir / "resumed/.work/state.json")["failed"].contains(
      "snap/blocks.2.hook_resid_post"));
  r = test::run_cli(args + (dir / "resumed") + " --resume");
  ASSERT_EQ(r.exit_code, 2) << r.output;
  const auto resumed = read_json_file(dir / "resumed/release.json");
  for (const std::string variant : {"standard", "snap"}) {
    EXPECT_EQ(resumed["results"][variant]["blocks.2.hook_resid_post"]["failed"],
              straight["results"][variant]["blocks.2.hook_resid_post"]["failed"]);
    // (a resume refills the shuffling buffer from the state's data position: near, not equal)
    EXPECT_NEAR(
        resumed["results"][variant]["blocks.0.hook_resid_post"]["explained_variance"].get<double>(),
        straight["results"][variant]["blocks.0.hook_resid_post"]["explained_variance"]
            .get<double>(),
        0.02);
  }
  // Merged with other groups, an SAE set aside stays aside (no folder to link): the straight
  // release cut into a group of layer 0 and one of layer 2 (its SAEs both set aside) merges
  // back into its own results.
  for (const auto& [group, layer, other] : {std::tuple{"g0", 0, 2}, std::tuple{"g2", 2, 0}}) {
    fs::copy(dir / "straight", dir / group, fs::copy_options::recursive);
    auto rel = read_json_file(dir / (std::string(group) + "/release.json"));
    rel["layers"] = {layer};
    for (const std::string variant : {"standard", "snap"}) {
      rel["results"][variant].erase("blocks." + std::to_string(other) + ".hook_resid_post");
      fs::remove_all(dir / (std::string(group) + "/" + variant + "/blocks." +
                            std::to_string(other) + ".hook_resid_post"));
    }
    std::ofstream(dir / (std::string(group) + "/release.json")) << rel.dump(2);
  }
  r = test::run_cli("release-merge " + (dir / "g0") + " " + (dir / "g2") + " -o " +
                    (dir / "merged"));
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_EQ(read_json_file(dir / "merged/release.json")["results"], straight["results"]);
  EXPECT_NE(test::read_bytes(dir / "merged/README.md")
                .find("| 2 | snap/blocks.2.hook_resid_post | 64 | set aside |"),
            std::string::npos);

  // Trained again in a group of their own (here allowed more rollbacks: bookkeeping, the same
  // recipe), the SAEs set aside merge into the release in their place, said in release.json and
  // the card; a repair of one variant with another learning rate says what it changed.
  r = test::run_cli(args + (dir / "repair") + " --layers 2 --set training.max_rollbacks=3");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  r = test::run_cli("release-merge " + (dir / "straight") + " " + (dir / "repair") + " -o " +
                    (dir / "whole"));
  ASSERT_EQ(r.exit_code, 0) << r.output;
  const auto whole = read_json_file(dir / "whole/release.json");
  const auto repair = read_json_file(dir / "repair/release.json");
  const std::string whole_card = test::read_bytes(dir / "whole/README.md");
  for (const std::string variant : {"standard", "snap"}) {
    SCOPED_TRACE(variant);
    const std::string id = variant + "/blocks.2.hook_resid_post";
    auto res = whole["results"][variant]["blocks.2.hook_resid_post"];
    EXPECT_EQ(res["replaces"]["failed"],
              straight["results"][variant]["blocks.2.hook_resid_post"]["failed"]);
    EXPECT_FALSE(res.contains("recipe_changes")) << res;
    res.erase("replaces");
    EXPECT_EQ(res, repair["results"][variant]["blocks.2.hook_resid_post"]);
    EXPECT_EQ(res["rollbacks"].size(), 2u) << res;
    EXPECT_EQ(test::read_bytes(dir / ("whole/" + id + "/sae_weights.safetensors")),
              test::read_bytes(dir / ("repair/" + id + "/sae_weights.safetensors")));
    EXPECT_EQ(whole["results"][variant]["blocks.0.hook_resid_post"],
              straight["results"][variant]["blocks.0.hook_resid_post"]);
    EXPECT_NE(
        whole_card.find("`" + id + "` was trained again after its first run diverged at step " +
                        std::to_string(aside_at) + " again after 1 rollback and was set aside\n"),
        std::string::npos)
        << whole_card;
  }
  EXPECT_EQ(whole["layers"], nlohmann::json({0, 2}));
  EXPECT_EQ(whole["variants"], straight["variants"]);
  r = test::run_cli(args + (dir / "repair_lr") +
                    " --layers 2 --variants snap --set training.max_rollbacks=3 --set "
                    "optimizer.lr=2e-3");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  r = test::run_cli("release-merge " + (dir / "repair_lr") + " " + (dir / "straight") + " -o " +
                    (dir / "part"));
  ASSERT_EQ(r.exit_code, 0) << r.output;
  const auto part = read_json_file(dir / "part/release.json");
  EXPECT_EQ(part["variants"], straight["variants"]) << "the base group's, not the repair's";
  EXPECT_TRUE(part["results"]["standard"]["blocks.2.hook_resid_post"].contains("failed"));
  EXPECT_EQ(part["results"]["snap"]["blocks.2.hook_resid_post"]["recipe_changes"],
            nlohmann::json::parse(R"({"optimizer.lr": {"from": 0.003, "to": 0.002}})"));
  EXPECT_NE(test::read_bytes(dir / "part/README.md")
                .find("was set aside, with `optimizer.lr` 0.003 -> 0.002"),
            std::string::npos);
  // Refused: two groups that both trained an SAE; a repair of another shape.
  r = test::run_cli("release-merge " + (dir / "repair") + " " + (dir / "repair_lr") + " " +
                    (dir / "straight") + " -o " + (dir / "twice"));
  EXPECT_EQ(r.exit_code, 1) << r.output;
  EXPECT_NE(r.output.find("(snap/blocks.2.hook_resid_post) is also in"), std::string::npos)
      << r.output;
  r = test::run_cli(args + (dir / "repair_k") +
                    " --layers 2 --variants snap --set training.max_rollbacks=3 --set sae.k=3");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  r = test::run_cli("release-merge " + (dir / "straight") + " " + (dir / "repair_k") + " -o " +
                    (dir / "shape"));
  EXPECT_EQ(r.exit_code, 1) << r.output;
  EXPECT_NE(r.output.find("recipe.variants.snap.k: differs from"), std::string::npos) << r.output;
  EXPECT_FALSE(fs::exists(dir / "shape"));

  // Under mpirun (module parallel): the rank that trains layer 2's SAEs sets both aside and
  // goes on forwarding its share of the rows for the other rank's.
  if (!std::string(SAECPP_MPIEXEC).empty()) {
    r = test::run_shell("timeout 300 " + test::mpirun(2) + SAECPP_CLI + " " + args + (dir / "two"));
    ASSERT_EQ(r.exit_code, 2) << r.output;
    const auto two = read_json_file(dir / "two/release.json");
    EXPECT_EQ(set_aside_records(dir / "two"), both_layer2) << "rank 1's, written by rank 0";
    // `sae status` reads the ranks' states (state.rank<r>-of-2.json): the checkpoint, the SAEs
    // set aside.
    r = test::run_cli("status " + (dir / "two"));
    EXPECT_EQ(r.exit_code, 0) << r.output;
    EXPECT_NE(r.output.find("last checkpoint (every SAE and the data position): step 200"),
              std::string::npos)
        << r.output;
    EXPECT_NE(r.output.find("snap/blocks.2.hook_resid_post: set aside at step "), std::string::npos)
        << r.output;
    for (const std::string variant : {"standard", "snap"}) {
      SCOPED_TRACE(variant);
      EXPECT_TRUE(two["results"][variant]["blocks.2.hook_resid_post"].contains("failed"));
      EXPECT_EQ(two["results"][variant]["blocks.0.hook_resid_post"]["training_tokens"], 12800);
      EXPECT_NEAR(
          two["results"][variant]["blocks.0.hook_resid_post"]["explained_variance"].get<double>(),
          straight["results"][variant]["blocks.0.hook_resid_post"]["explained_variance"]
              .get<double>(),
          0.02);
    }
  }

  // Fewer SAEs than ranks (one variant, 2 SAEs, 4 ranks): each SAE's group of 2 ranks rolls it
  // back together, and sets it aside together, saying so once.
  if (!std::string(SAECPP_MPIEXEC).empty()) {
    r = test::run_shell("timeout 300 " + test::mpirun(4) + SAECPP_CLI + " " + args +
                        (dir / "groups") + " --variants snap");
    ASSERT_EQ(r.exit_code, 2) << r.output;
    const size_t said = r.output.find("snap/blocks.2.hook_resid_post set aside at step ");
    ASSERT_NE(said, std::string::npos) << r.output;
    EXPECT_EQ(r.output.find(" set aside at step ", said + 40), std::string::npos) << r.output;
    EXPECT_EQ(set_aside_records(dir / "groups"),
              std::vector<std::string>{"snap/blocks.2.hook_resid_post"});
    const auto groups = read_json_file(dir / "groups/release.json");
    EXPECT_EQ(groups["results"]["snap"]["blocks.2.hook_resid_post"]["failed"]["rollbacks"], 1);
    EXPECT_EQ(groups["results"]["snap"]["blocks.0.hook_resid_post"]["training_tokens"], 12800);
  }

  // Only layer 2: its two SAEs are the last training when they diverge the second time, so the
  // release stops with the error (exit 1, no release.json) and sets nothing aside.
  r = test::run_cli(args + (dir / "only2") + " --layers 2");
  EXPECT_EQ(r.exit_code, 1) << r.output;
  EXPECT_NE(r.output.find("again after 1 rollback (training.max_rollbacks = 1)"), std::string::npos)
      << r.output;
  EXPECT_FALSE(fs::exists(dir / "only2/release.json"));
  EXPECT_FALSE(read_json_file(dir / "only2/.work/state.json").contains("failed"));
}

TEST(Release, BadInputs) {
  test::TempDir dir;
  const std::string corpus = write_corpus(dir), out = dir / "release";
  auto expect_error = [&](const std::string& args, const std::string& names) {
    auto r = test::run_cli(args);
    EXPECT_EQ(r.exit_code, 1) << args << "\n" << r.output;
    EXPECT_NE(r.output.find(names), std::string::npos) << r.output;
    EXPECT_FALSE(fs::exists(out + "/release.json"));
  };
  const std::string base = release_args(corpus, out);
  expect_error(std::regex_replace(base, std::regex("--layers 0,2"), "--layers 0,3"), "--layers");
  expect_error(std::regex_replace(base, std::regex("pile-\\*"), "nothing-*"), "nothing-*");
  expect_error(base + " --variants standard,bogus", "bogus");
  expect_error(std::regex_replace(base, std::regex("--tokens 20000"), "--tokens 7Q"), "--tokens");
  expect_error(base + " --set sae.nonsense=1", "nonsense");
  expect_error(
      std::regex_replace(base, std::regex("--n-batches-in-buffer 4"), "--n-batches-in-buffer 1"),
      "n_batches_in_buffer");
  // The rows' place is a GPU release's choice.
  expect_error(base + " --activation-store host", "activation_store");
  // SAEs whose checkpoints alone (over 1 KB per latent at d_in 64) outgrow this disk's free
  // space: refused before the model loads or anything is allocated.
  const int64_t wide = available_bytes(dir.path.string()) / 1000 + 64;
  expect_error(base + " --set sae.d_sae=" + std::to_string(wide) +
                   " --set sae.matryoshka_widths=[16," + std::to_string(wide) + "]",
               "free space");
  expect_error(base + " --checkpoint-minutes -1", "checkpoint_minutes");
  expect_error(base + " --checkpoint-minutes nan", "checkpoint_minutes");
  if (cuda_device_count() == 0) {  // refused before the model loads; nothing written
    fs::remove_all(out);
    expect_error(base + " --device cuda", "--device cuda");
    EXPECT_FALSE(fs::exists(out));
  }
}

// The GPU memory plan, made without a GPU: each SAE's term is DeviceTrainer's allocation (its
// dense terms by hand at the release shape), only the planned layers' SAEs count, and the
// largest group that fits is the longest prefix of the layers under the free memory.
TEST(DevicePlan, TermsAndTheLargestGroupThatFits) {
  nlohmann::json release_cfg = train::preset("gemma-2-2b-matryoshka-snap");
  release_cfg["data"] = {{"type", "release"}};  // as sae release makes it
  train::TrainConfig t = train::TrainConfig::from_json(release_cfg, "test");
  const int64_t D = t.spec.d_sae, d = 2304, B = t.batch_size;
  t.spec.d_in = d;
  ASSERT_EQ(D, 32768);
  ASSERT_EQ(B, 4096);
  const int64_t L = t.spec.n_levels();
  const bool mom = t.adam.beta1 != 0;
  // An SAE's own state: parameters and Adam's moments; the step's scratch: the gradients, the
  // [B, D] pre-activations and the per-token level vectors (levels + AuxK groups), all but a
  // few per cent of it.
  const int64_t state = D * d * 4 * (4 + (mom ? 2 : 0));
  EXPECT_GT(train::DeviceTrainer::planned_state_bytes(t.spec, t.adam, "fp32"), state);
  EXPECT_LT(train::DeviceTrainer::planned_state_bytes(t.spec, t.adam, "fp32"),
            state + state / 50 + (int64_t(40) << 20));
  EXPECT_EQ(train::DeviceTrainer::planned_state_bytes(t.spec, t.adam, "bf16"),
            train::DeviceTrainer::planned_state_bytes(t.spec, t.adam, "fp32") + D * d * 2);
  const int64_t groups = t.spec.aux_coefficient != 0 ? (t.spec.per_level_aux ? L : 1) : 0;
  const int64_t dense = D * d * 4 * 2 + B * D * 4 + B * (L + groups) * d * 4;
  const int64_t fp32 = train::DeviceTrainer::planned_scratch_bytes(t.spec, B, "fp32", 0);
  EXPECT_GT(fp32, dense);
  EXPECT_LT(fp32, dense + dense / 10);
  EXPECT_EQ(train::DeviceTrainer::planned_scratch_bytes(t.spec, B, "bf16", 0), fp32 + B * d * 2);
  EXPECT_GT(train::DeviceTrainer::planned_scratch_bytes(t.spec, B, "fp32", D / 4),
            fp32 + B * (D / 4) * 13);  // AuxK's dense [B, dead] buffers
  // The seed's release on one GPU: 50 such SAEs sharing one scratch.
  std::printf("release shape: %.2f GiB state per SAE, %.2f GiB shared scratch (25%% dead)\n",
              double(train::DeviceTrainer::planned_state_bytes(t.spec, t.adam, t.precision)) /
                  double(1 << 30),
              double(train::DeviceTrainer::planned_scratch_bytes(t.spec, B, t.precision, D / 4)) /
                  double(1 << 30));

  DevicePlanShape shape;
  shape.model = model::read_gemma2_config(kModel);
  shape.forward_tokens = 4 * 16;
  shape.context_size = 16;
  shape.store_rows = 5 * shape.forward_tokens;
  const int64_t hd = shape.model.hidden_size;
  train::TrainConfig small = t;
  small.spec.d_in = hd;
  small.spec.d_sae = 64;
  small.spec.widths = {16, 64};
  small.spec.level_loss.resize(2), small.spec.level_weight.resize(2, 1.0);
  small.batch_size = 64;
  std::vector<PlannedSae> saes;
  for (int64_t l : {0, 1, 2})
    for (int v = 0; v < 2; ++v) saes.push_back({l, small});
  const int64_t one_sae =
      train::DeviceTrainer::planned_state_bytes(small.spec, small.adam, small.precision);
  const int64_t scratch =
      train::DeviceTrainer::planned_scratch_bytes(small.spec, 64, small.precision, 16);
  const DeviceReleasePlan p2 = plan_device_release(shape, {0, 2}, saes);
  EXPECT_EQ(p2.n_saes, 4);
  EXPECT_EQ(p2.saes, 4 * one_sae + scratch);           // one scratch for all
  EXPECT_EQ(p2.store, 3 * shape.store_rows * hd * 4);  // two layers and the spare
  EXPECT_EQ(p2.model, model::gemma2_weight_bytes(shape.model, shape.model.num_layers - 1, true));
  EXPECT_GT(p2.forward, model::device_forward_bytes(shape.model, 64, true, false));  // + logits
  // The evaluation's DeviceSae (fp32, the SAEs' levels, 4k codes per token) and the folded
  // weights it is made from.
  const int64_t eval_sae = planned_device_sae_bytes(hd, 64, "fp32", 2, int64_t(4 * small.spec.k)) +
                           (2 * 64 * hd + 4 * 64 + hd) * 4;
  EXPECT_EQ(p2.eval, eval_sae);
  EXPECT_GT(p2.eval, 2 * 64 * hd * 4);
  EXPECT_EQ(p2.total(), p2.model + p2.forward + p2.saes + p2.store + p2.eval);
  EXPECT_NE(p2.describe().find("4 SAEs"), std::string::npos) << p2.describe();
  EXPECT_EQ(p2.host_store, 0);
  // The store in pinned host memory: the same bytes there, none on the device.
  shape.store_on_host = true;
  const DeviceReleasePlan h = plan_device_release(shape, {0, 2}, saes);
  EXPECT_EQ(h.store, 0);
  EXPECT_EQ(h.host_store, p2.store);
  EXPECT_EQ(h.total(), p2.total() - p2.store);
  EXPECT_NE(h.describe().find("pinned host memory"), std::string::npos) << h.describe();
  shape.store_on_host = false;
  // Where "auto" puts the store: the device while the whole plan fits, then the host while that
  // fits, else the device (refused by the caller); "device" and "host" as asked.
  auto placed_on_host = [&](const std::string& mode, int64_t free) {
    return place_store(shape, mode, {0, 2}, saes, free).store_on_host;
  };
  EXPECT_FALSE(placed_on_host("auto", p2.total()));
  EXPECT_TRUE(placed_on_host("auto", p2.total() - 1));
  EXPECT_TRUE(placed_on_host("auto", h.total()));
  EXPECT_FALSE(placed_on_host("auto", h.total() - 1));
  EXPECT_FALSE(placed_on_host("device", 0));
  EXPECT_TRUE(placed_on_host("host", int64_t(1) << 50));
  // No CE score: the model only to the last layer, no logits; the SAEs are still evaluated.
  shape.ce_score = false;
  const DeviceReleasePlan q = plan_device_release(shape, {0, 1}, saes);
  EXPECT_EQ(q.model, model::gemma2_weight_bytes(shape.model, 1, true));
  EXPECT_EQ(q.forward, model::device_forward_bytes(shape.model, 64, true, false));
  EXPECT_EQ(q.eval, eval_sae);
  // From a cache: only the SAEs and their evaluation.
  shape.forward = false;
  const DeviceReleasePlan c = plan_device_release(shape, {0, 1, 2}, saes);
  EXPECT_EQ(c.total(), 6 * one_sae + scratch + eval_sae);
  shape.forward = true;

  const std::vector<int64_t> all = {0, 1, 2};
  const int64_t two = plan_device_release(shape, {0, 1}, saes).total();
  EXPECT_EQ(layers_that_fit(shape, all, saes, two), (std::vector<int64_t>{0, 1}));
  EXPECT_EQ(layers_that_fit(shape, all, saes, two - 1), (std::vector<int64_t>{0}));
  EXPECT_EQ(layers_that_fit(shape, all, saes, 1 << 20), std::vector<int64_t>{});
  EXPECT_EQ(layers_that_fit(shape, all, saes, int64_t(1) << 40), all);
}

// `sae release --plan-only`: the plans printed, nothing loaded or written. On the CPU the host's
// memory and the disk; on cuda the GPU's against --gpu-memory (a GPU this machine need not
// have: a Gemma-2-2b-shaped config.json alone), with the groups of layers that fit when the
// whole request does not. The SAEs are planned at the model's width (their d_in is known only
// to the trainer later: planned at 0 they came to 2.5 GiB for the seed's 50 instead of 60).
TEST(Release, PlanOnlyPrintsThePlansAndWritesNothing) {
  test::TempDir dir;
  const std::string corpus = write_corpus(dir), out = dir / "release";
  auto r = test::run_cli(release_args(corpus, out) + " --plan-only");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  for (const char* line : {"memory: model ", "disk: checkpoints ", "release: plan only: it fits"})
    EXPECT_NE(r.output.find(line), std::string::npos) << line << "\n" << r.output;
  EXPECT_FALSE(fs::exists(out));

  // google/gemma-2-2b's shape: its config.json only.
  const std::string g2 = dir / "gemma-2-2b";
  fs::create_directories(g2);
  test::write_bytes(g2 + "/config.json", R"({"architectures": ["Gemma2ForCausalLM"],
      "model_type": "gemma2", "vocab_size": 256000, "hidden_size": 2304,
      "intermediate_size": 9216, "num_hidden_layers": 26, "num_attention_heads": 8,
      "num_key_value_heads": 4, "head_dim": 256, "query_pre_attn_scalar": 256,
      "sliding_window": 4096, "max_position_embeddings": 8192, "attn_logit_softcapping": 50.0,
      "final_logit_softcapping": 30.0, "rms_norm_eps": 1e-06, "rope_theta": 10000.0,
      "hidden_activation": "gelu_pytorch_tanh", "bos_token_id": 2, "eos_token_id": 1,
      "pad_token_id": 0, "torch_dtype": "bfloat16"})");
  ReleaseOptions o;
  o.model = g2;
  o.corpus.shards = {corpus};
  o.layers.resize(25);
  std::iota(o.layers.begin(), o.layers.end(), 0);
  o.output_dir = out;
  o.device = "cuda";
  o.plan_only = true;
  o.check_disk = false;  // 85 GiB of checkpoints and folders: not this test's machine's disk
  o.gpu_memory = int64_t(141) << 30;
  const ReleaseEnd whole = run_release(o);
  EXPECT_FALSE(whole.finished);
  ASSERT_TRUE(whole.plan.contains("gpu")) << whole.plan.dump(1);
  const auto& gpu = whole.plan["gpu"];
  EXPECT_EQ(whole.plan["saes"], 50);
  EXPECT_EQ(whole.plan["fits"], true);
  EXPECT_EQ(gpu["memory"], int64_t(141) << 30);
  EXPECT_EQ(gpu["fits"], true);
  // 50 SAEs' state at d_in 2304 and one shared scratch (as the DevicePlan test derives them).
  nlohmann::json snap_cfg = train::preset("gemma-2-2b-matryoshka-snap");
  snap_cfg["data"] = {{"type", "release"}};
  train::TrainConfig t = train::TrainConfig::from_json(snap_cfg, "test");
  t.spec.d_in = 2304;
  const int64_t state = train::DeviceTrainer::planned_state_bytes(t.spec, t.adam, t.precision);
  const int64_t scratch = train::DeviceTrainer::planned_scratch_bytes(
      t.spec, t.batch_size, t.precision, int64_t(double(t.spec.d_sae) * kPlannedDeadShare));
  EXPECT_EQ(gpu["saes"].get<int64_t>(), 50 * state + scratch);
  EXPECT_GT(gpu["saes"].get<int64_t>(), int64_t(55) << 30);
  EXPECT_EQ(gpu["total"].get<int64_t>(),
            gpu["model"].get<int64_t>() + gpu["forward"].get<int64_t>() +
                gpu["saes"].get<int64_t>() + gpu["store"].get<int64_t>() +
                gpu["evaluation"].get<int64_t>());
  EXPECT_EQ(gpu["groups"], nlohmann::json::array({o.layers}));
  EXPECT_FALSE(fs::exists(out));

  // Half the memory: the layers in groups that fit, one after another (the store, which "auto"
  // would move to pinned host memory, planned there).
  o.gpu_memory = int64_t(40) << 30;
  const ReleaseEnd halves = run_release(o);
  EXPECT_EQ(halves.plan["fits"], false);
  const auto groups = halves.plan["gpu"]["groups"].get<std::vector<std::vector<int64_t>>>();
  ASSERT_GE(groups.size(), 2u) << halves.plan.dump(1);
  std::vector<int64_t> joined;
  for (const auto& g : groups) {
    EXPECT_FALSE(g.empty());
    joined.insert(joined.end(), g.begin(), g.end());
  }
  EXPECT_EQ(joined, o.layers);
  EXPECT_FALSE(fs::exists(out));
  // The CLI: exit 1, the groups as --layers takes them; a size it cannot read; on the CPU.
  const std::string g2_args = "release --model " + g2 + " --dataset '" + corpus +
                              "' --layers 0-24 -o " + out +
                              " --device cuda --plan-only --ignore-disk-plan --gpu-memory ";
  r = test::run_cli(g2_args + "40G");
  EXPECT_EQ(r.exit_code, 1) << r.output;
  std::string runs;
  for (const auto& g : groups)
    runs += (runs.empty() ? "--layers " : ", then --layers ") + layers_arg(g);
  EXPECT_NE(r.output.find("40.00 GiB is planned (--gpu-memory); the largest group of these layers "
                          "that fits is --layers " +
                          layers_arg(groups.front())),
            std::string::npos)
      << r.output;
  EXPECT_NE(r.output.find("run the layers in groups (" + runs + ")"), std::string::npos)
      << r.output;
  EXPECT_NE(r.output.find("plan only: it does not fit"), std::string::npos) << r.output;
  r = test::run_cli(g2_args + "141GiB");
  EXPECT_EQ(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("GPU memory plan: "), std::string::npos) << r.output;
  r = test::run_cli(g2_args + "lots");
  EXPECT_EQ(r.exit_code, 1) << r.output;
  EXPECT_NE(r.output.find("--gpu-memory: lots: expected a memory size like 80G"), std::string::npos)
      << r.output;
  r = test::run_cli(release_args(corpus, out) + " --plan-only --gpu-memory 80G");
  EXPECT_EQ(r.exit_code, 1) << r.output;
  EXPECT_NE(r.output.find("gpu_memory: plans a GPU's memory: give it with --device cuda"),
            std::string::npos)
      << r.output;
  EXPECT_FALSE(fs::exists(out));
  EXPECT_EQ(layers_arg({0, 1, 2, 5, 7, 8}), "0-2,5,7-8");

  // The same job over several GPUs, planned here (--ranks): one GPU of 40 GiB is too small, and
  // the plan names the fewest ranks whose every GPU plan fits; the SAEs spread over them once
  // each; fewer ranks do not fit.
  const int m = halves.plan["gpu"]["ranks_that_fit"].get<int>();
  ASSERT_GE(m, 2) << halves.plan.dump(1);
  EXPECT_EQ(whole.plan["gpu"]["ranks_that_fit"], 1);
  o.plan_ranks = m;
  const ReleaseEnd spread = run_release(o);
  EXPECT_EQ(spread.plan["fits"], true) << spread.plan.dump(1);
  EXPECT_FALSE(spread.plan.contains("gpu"));
  ASSERT_EQ(spread.plan["ranks"].size(), size_t(m));
  std::multiset<std::string> trained;
  for (const auto& rank : spread.plan["ranks"]) {
    const auto names = rank["saes"].get<std::vector<std::string>>();
    trained.insert(names.begin(), names.end());
    const auto& g = rank["gpu"];
    EXPECT_EQ(g["fits"], true);
    EXPECT_LE(g["total"].get<int64_t>(), int64_t(40) << 30);
    EXPECT_EQ(g["saes"].get<int64_t>(), int64_t(names.size()) * state + scratch);
    EXPECT_EQ(g["total"].get<int64_t>(), g["model"].get<int64_t>() + g["forward"].get<int64_t>() +
                                             g["saes"].get<int64_t>() + g["store"].get<int64_t>() +
                                             g["evaluation"].get<int64_t>());
  }
  EXPECT_EQ(trained.size(), 50u);
  EXPECT_EQ(std::set<std::string>(trained.begin(), trained.end()).size(), 50u);
  EXPECT_EQ(trained.count("snap/blocks.24.hook_resid_post"), 1u);
  // More ranks fit too: a rank whose store and NCCL's buffers do not both fit beside its SAEs
  // puts the store in pinned host memory (the exchange then goes through the host, no buffers).
  for (int more = m + 1; more <= m + 2; ++more) {
    o.plan_ranks = more;
    EXPECT_EQ(run_release(o).plan["fits"], true) << more << " ranks";
  }
  o.plan_ranks = m - 1;
  const ReleaseEnd fewer = run_release(o);
  EXPECT_EQ(fewer.plan["fits"], false);
  if (m - 1 > 1) {
    EXPECT_EQ(fewer.plan["ranks_that_fit"], m) << fewer.plan.dump(1);
  }
  EXPECT_FALSE(fs::exists(out));
  const std::string ms = std::to_string(m);
  r = test::run_cli(g2_args + "40G");
  EXPECT_NE(r.output.find("; or over " + ms + " GPUs: mpirun -np " + ms), std::string::npos)
      << r.output;
  r = test::run_cli(g2_args + "40G --ranks " + ms);
  EXPECT_EQ(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("release: module parallel over " + ms +
                          " ranks (planned with --ranks, not launched)"),
            std::string::npos)
      << r.output;
  EXPECT_NE(
      r.output.find("rank " + std::to_string(m - 1) + ": GPU memory plan (40.00 GiB planned)"),
      std::string::npos)
      << r.output;
  // On the CPU: each rank's SAEs and memory; --ranks only plans.
  r = test::run_cli(release_args(corpus, out) + " --plan-only --ranks 2");
  EXPECT_EQ(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("release: rank 1: standard/blocks.2.hook_resid_post, "
                          "snap/blocks.2.hook_resid_post; memory: model "),
            std::string::npos)
      << r.output;
  r = test::run_cli(release_args(corpus, out) + " --ranks 2");
  EXPECT_EQ(r.exit_code, 1) << r.output;
  EXPECT_NE(r.output.find("plan_ranks: plans a job of N ranks without launching it: give it with "
                          "--plan-only"),
            std::string::npos)
      << r.output;
  r = test::run_cli(release_args(corpus, out) + " --plan-only --ranks -1");
  EXPECT_EQ(r.exit_code, 1) << r.output;
  EXPECT_NE(r.output.find("plan_ranks: must be >= 0, got -1"), std::string::npos) << r.output;
  r = test::run_cli(g2_args + "80G --ranks 51");  // more GPUs than SAEs: refused as a run is
  EXPECT_EQ(r.exit_code, 1) << r.output;
  EXPECT_NE(r.output.find("cuda under 51 ranks runs module parallel only"), std::string::npos)
      << r.output;
  EXPECT_FALSE(fs::exists(out));
}

// A release run in two groups of layers and merged: one folder per variant with every layer's
// SAE (the groups' files), one release.json, one model card with every row; groups trained
// differently, overlapping layers, a used output folder and a missing release are refused,
// leaving nothing behind.
TEST(ReleaseMerge, GroupsOfLayersMergeIntoOneRelease) {
  test::TempDir dir;
  const std::string corpus = write_corpus(dir);
  auto group = [&](const std::string& layers, const std::string& out, const std::string& extra) {
    std::string args = release_args(corpus, dir / out);
    args.replace(args.find("--layers 0,2"), 12, "--layers " + layers);
    return test::run_cli(args + extra);
  };
  ASSERT_EQ(group("0", "a", "").exit_code, 0);
  // Group b logged, evaluated and checkpointed on other cadences, and allowed another number of
  // rollbacks (none happened): bookkeeping, not the recipe.
  ASSERT_EQ(group("2", "b",
                  " --set training.log_every_steps=25 --set training.eval_every_steps=70 --set "
                  "training.checkpoint_every_steps=70 --set training.checkpoint_every_minutes=5 "
                  "--set training.max_rollbacks=1")
                .exit_code,
            0);
  auto r = test::run_cli("release-merge " + (dir / "b") + " " + (dir / "a") + " -o " + (dir / "m"));
  ASSERT_EQ(r.exit_code, 0) << r.output;
  r = test::run_cli("status " + (dir / "m"));  // a merged release: its results
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("m: finished (release.json written)"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("results: 4 SAEs"), std::string::npos) << r.output;
  const auto merged = read_json_file(dir / "m/release.json");
  EXPECT_EQ(merged["layers"], nlohmann::json({0, 2}));
  ASSERT_EQ(merged["merged_from"].size(), 2u);
  const auto ra = read_json_file(dir / "a/release.json"),
             rb = read_json_file(dir / "b/release.json");
  EXPECT_EQ(merged["tokens_forwarded"].get<int64_t>(),
            ra["tokens_forwarded"].get<int64_t>() + rb["tokens_forwarded"].get<int64_t>());
  const auto rows = card_rows(test::read_bytes(dir / "m/README.md"));
  ASSERT_EQ(rows.size(), 4u);
  for (const std::string variant : {"standard", "snap"})
    for (int64_t layer : {0, 2}) {
      const std::string hook = "blocks." + std::to_string(layer) + ".hook_resid_post";
      const std::string id = variant + "/" + hook, group_dir = dir / (layer == 0 ? "a" : "b");
      SCOPED_TRACE(id);
      const auto& res = merged["results"][variant][hook];
      EXPECT_EQ(res, (layer == 0 ? ra : rb)["results"][variant][hook]);
      EXPECT_NEAR(rows.at(id)[1], res["explained_variance"].get<double>(), 5e-5);
      EXPECT_EQ(test::read_bytes(dir / ("m/" + id + "/sae_weights.safetensors")),
                test::read_bytes(group_dir + "/" + id + "/sae_weights.safetensors"));
      const LoadedSae l = load_from_disk(resolve_pretrained(dir / "m", id));
      EXPECT_EQ(l.sae.cfg.d_sae, 64);
    }
  EXPECT_FALSE(fs::exists(dir / "m/.work")) << "only the SAEs, not the groups' job state";
  // A release folder given where one SAE is wanted: how to name one, and which it holds.
  r = test::run_cli("info " + (dir / "m"));
  EXPECT_EQ(r.exit_code, 1) << r.output;
  EXPECT_NE(r.output.find("is not an SAE folder (no cfg.json) but holds 4 SAEs: name one as " +
                          (dir / "m") +
                          ":snap/blocks.0.hook_resid_post, or give its folder "
                          "(snap/blocks.0.hook_resid_post, snap/blocks.2.hook_resid_post, "
                          "standard/blocks.0.hook_resid_post, standard/blocks.2.hook_resid_post)"),
            std::string::npos)
      << r.output;
  r = test::run_cli("info " + (dir / "m") + ":snap/blocks.1.hook_resid_post");
  EXPECT_EQ(r.exit_code, 1) << r.output;
  EXPECT_NE(r.output.find("no such SAE in this release folder (it holds "
                          "snap/blocks.0.hook_resid_post, "),
            std::string::npos)
      << r.output;

  auto refused = [&](const std::string& args, const std::string& out, const std::string& says) {
    const auto f = test::run_cli("release-merge " + args + " -o " + out);
    EXPECT_EQ(f.exit_code, 1) << f.output;
    EXPECT_NE(f.output.find(says), std::string::npos) << f.output;
    EXPECT_FALSE(fs::exists(out + ".merging")) << "no partial output";
  };
  ASSERT_EQ(group("2", "c", " --set sae.k=3").exit_code, 0);
  refused((dir / "a") + " " + (dir / "c"), dir / "m2", "recipe.variants.standard.k");
  EXPECT_FALSE(fs::exists(dir / "m2"));
  refused((dir / "a") + " " + (dir / "a"), dir / "m3",
          "layer 0 (snap/blocks.0.hook_resid_post) is also in");
  // A model multiplied in bf16 gives other activations: its own recipe, not merged with f32.
  ASSERT_EQ(group("2", "d", " --bf16-matmul").exit_code, 0);
  EXPECT_EQ(read_json_file(dir / "d/release.json")["recipe"]["model_bf16_matmul"], true);
  EXPECT_NE(test::read_bytes(dir / "d/README.md").find("the model run in bf16"),
            std::string::npos);  // the card says so too
  EXPECT_EQ(test::read_bytes(dir / "a/README.md").find("run in bf16"), std::string::npos);
  refused((dir / "a") + " " + (dir / "d"), dir / "m4", "model_bf16_matmul");
  refused((dir / "a") + " " + (dir / "b"), dir / "m", "not empty");
  refused((dir / "a") + " " + (dir / "nowhere"), dir / "m4", "nowhere/release.json");
  // A group whose SAE folder lost its weights: refused while the merge is being built, naming
  // the file, and nothing left behind.
  fs::copy(dir / "b", dir / "b_damaged", fs::copy_options::recursive);
  fs::remove(dir / "b_damaged/snap/blocks.2.hook_resid_post/sae_weights.safetensors");
  refused((dir / "a") + " " + (dir / "b_damaged"), dir / "m5",
          "b_damaged/snap/blocks.2.hook_resid_post/sae_weights.safetensors: file: missing");
  EXPECT_FALSE(fs::exists(dir / "m5"));
}

TEST(ActivationCache, ShardsInCorpusOrderResumeAndTrainFrom) {
  test::TempDir dir;
  const std::string corpus = write_corpus(dir), cache = dir / "cache";
  const std::string args = "cache --model " + kModel + " --dataset '" + corpus +
                           "' --layers 0,2 --shard-tokens 1024 --context-size 16 "
                           "--prompts-per-forward 4 --holdout-every 0 -o ";
  // More tokens than this disk holds (2 layers x 64 floats a token): refused, nothing created.
  const int64_t too_many = (available_bytes(dir.path.string()) / 512 / 1024 + 1) * 1024;
  auto r = test::run_cli(args + (dir / "huge") + " --tokens " + std::to_string(too_many));
  EXPECT_EQ(r.exit_code, 1) << r.output;
  EXPECT_NE(r.output.find("MiB free"), std::string::npos) << r.output;
  EXPECT_FALSE(fs::exists(dir / "huge"));
  r = test::run_cli(args + cache + " --tokens 3072 --stop-after-shards 1");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("GiB on disk"), std::string::npos) << "no size estimate printed";
  auto manifest = read_json_file(cache + "/cache.json");
  EXPECT_EQ(manifest["shards"], 1);
  EXPECT_EQ(manifest["complete"], false);
  r = test::run_cli(args + cache + " --tokens 3072");
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.output.find("--resume"), std::string::npos) << r.output;
  {  // while another process writes the cache, a second one stops at once
    FolderLock running(cache + "/.lock", "the test");
    r = test::run_cli(args + cache + " --tokens 3072 --resume");
    EXPECT_EQ(r.exit_code, 1) << r.output;
    EXPECT_NE(r.output.find(".lock: this folder is in use by the test"), std::string::npos)
        << r.output;
    EXPECT_EQ(read_json_file(cache + "/cache.json")["shards"], 1);
    const auto held = pipeline::job_status(cache);
    EXPECT_EQ(held["running"]["job"], "the test");
    // While it runs: the time left at the pace cache.json keeps (2 shards to go).
    const double pace = manifest["tokens_per_s"].get<double>();
    ASSERT_GT(pace, 0.0);
    EXPECT_NEAR(held["eta_seconds"].get<double>(), 2048 / pace, 1e-6 * (2048 / pace));
    EXPECT_NE(pipeline::describe_job_status(held).find(" tok/s; running: the test, pid "),
              std::string::npos)
        << pipeline::describe_job_status(held);
  }
  r = test::run_cli("status " + cache);  // stopped after its first shard
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find(": 1 of 3 shards per layer (1024 of 3072 tokens) of 2 layer(s), last "
                          "written "),
            std::string::npos)
      << r.output;
  EXPECT_NE(r.output.find("; not running"), std::string::npos) << r.output;
  r = test::run_cli(args + cache + " --tokens 3072 --resume");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  manifest = read_json_file(cache + "/cache.json");
  EXPECT_EQ(manifest["shards"], 3);
  EXPECT_EQ(manifest["complete"], true);
  for (const char* hook : {"blocks.0.hook_resid_post", "blocks.2.hook_resid_post"})
    for (int i = 0; i < 3; ++i) {
      SafetensorsFile f(cache + "/" + hook + "/shard-0000" + std::to_string(i) + ".safetensors");
      EXPECT_EQ(f.read_f32("activations", {1024, 64}).size(), 1024u * 64u);
      EXPECT_EQ(f.read_i64("tokens").size(), 1024u);
    }

  // The first shard holds the corpus's first 1024 non-special tokens, in order, per layer.
  const model::Gemma2 m = model::Gemma2::load(kModel, {.verbose = false});
  const model::Tokenizer tok(kModel + "/tokenizer.model");
  data::CorpusConfig cc;
  cc.shards = {corpus};
  cc.holdout_every = 0;
  data::Corpus all(cc, data::Split::Train);
  data::WindowConfig wc;
  wc.context_size = 16;
  WindowStream windows(all, tok, wc);
  const Heldout first = collect_heldout(m, windows, model::HookPoint::ResidPost, {0, 2}, 1024,
                                        {tok.bos_id(), tok.eos_id(), tok.pad_id()});
  SafetensorsFile s0(cache + "/blocks.0.hook_resid_post/shard-00000.safetensors");
  SafetensorsFile s2(cache + "/blocks.2.hook_resid_post/shard-00000.safetensors");
  test::expect_close(s0.read_f32("activations", {1024, 64}), first.acts[0], 1e-5, "layer 0");
  test::expect_close(s2.read_f32("activations", {1024, 64}), first.acts[1], 1e-5, "layer 2");
  EXPECT_EQ(s0.read_i64("tokens"), s2.read_i64("tokens"));

  // bf16 storage: the same values rounded.
  r = test::run_cli(args + (dir / "cache16") + " --dtype bf16 --tokens 1024");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  SafetensorsFile h(dir / "cache16/blocks.2.hook_resid_post/shard-00000.safetensors");
  test::expect_close(h.read_f32("activations", {1024, 64}), first.acts[1], 8e-3, "bf16");

  // SAEs train from the cache later, without the model.
  r = test::run_cli(
      "train --preset gemma-2-2b-matryoshka-snap --set data.type=files --set "
      "'data.paths=[\"" +
      cache +
      "/blocks.2.hook_resid_post/*.safetensors\"]' "
      "--set data.heldout_tokens=512 --set sae.d_sae=64 --set sae.k=4 --set "
      "'sae.matryoshka_widths=[16,64]' --set training.batch_size=64 --set "
      "training.total_tokens=6400 --set training.eval_tokens=512 -o " +
      (dir / "run"));
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("3 shard(s), 3072 tokens of d_in 64 (512 held out)"), std::string::npos)
      << r.output;
  EXPECT_EQ(load_from_disk(dir / "run/sae").sae.cfg.d_sae, 64);

  // Bad input: a cache the disk cannot hold is refused before anything is written.
  r = test::run_cli(args + (dir / "huge") + " --tokens 1000T");
  EXPECT_EQ(r.exit_code, 1);
  r = test::run_cli(args + (dir / "huge") + " --tokens 900000B");
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.output.find("MiB free"), std::string::npos) << r.output;
  EXPECT_FALSE(fs::exists(dir / "huge"));
  if (cuda_device_count() == 0) {  // the GPU forward where there is none: refused up front
    r = test::run_cli(args + (dir / "gpu") + " --tokens 1024 --device cuda");
    EXPECT_EQ(r.exit_code, 1);
    EXPECT_NE(r.output.find("--device cuda"), std::string::npos) << r.output;
    EXPECT_FALSE(fs::exists(dir / "gpu"));
  }
}

}  // namespace
}  // namespace sae::pipeline

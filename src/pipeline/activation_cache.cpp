#include "pipeline/activation_cache.h"

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <optional>

#include "core/clock.h"
#include "core/device.h"
#include "core/dtype.h"
#include "core/error.h"
#include "core/finite.h"
#include "io/atomic_file.h"
#include "io/folder_lock.h"
#include "io/json_file.h"
#include "io/safetensors.h"
#include "model/device_gemma2.h"
#include "model/gemma2.h"
#include "model/tokenizer.h"
#include "pipeline/activation_store.h"
#include "pipeline/disk_plan.h"

namespace sae::pipeline {

namespace fs = std::filesystem;
using json = nlohmann::json;

namespace {

constexpr int kCacheVersion = 1;

std::string shard_name(int64_t i) {
  char b[32];
  std::snprintf(b, sizeof b, "shard-%05lld.safetensors", (long long)i);
  return b;
}

// The fields a resumed cache must share with the one on disk.
json identity(const CacheOptions& o) {
  json j = {{"model", o.model_dir},
            {"hook", o.hook},
            {"layers", o.layers},
            {"context_size", o.windows.context_size},
            {"concat", o.windows.concat},
            {"dtype", o.dtype},
            {"shard_tokens", o.shard_tokens},
            {"corpus", o.corpus.to_json()}};
  // Other activations than the f32 forward's: bf16 matmuls, on the CPU or the GPU.
  if (o.bf16_matmul || (o.device == "cuda" && o.precision == "bf16")) j["bf16_matmul"] = true;
  return j;
}

}  // namespace

int64_t cache_bytes(const CacheOptions& opt, int64_t hidden_size) {
  const int64_t width = opt.dtype == "bf16" ? 2 : 4;
  const int64_t tokens = opt.total_tokens / opt.shard_tokens * opt.shard_tokens;
  return tokens * int64_t(opt.layers.size()) * (hidden_size * width + 4);
}

bool write_activation_cache(const CacheOptions& opt, const std::atomic<bool>* stop) {
  if (opt.dtype != "f32" && opt.dtype != "bf16") fail("cache", "dtype", "must be f32 or bf16");
  if (opt.shard_tokens <= 0) fail("cache", "shard_tokens", "must be positive");
  if (opt.total_tokens < opt.shard_tokens)
    fail("cache", "tokens", cat("must be at least one shard (", opt.shard_tokens, " tokens)"));
  const fs::path out = opt.output_dir, manifest_path = out / "cache.json";
  if (!opt.resume && fs::exists(manifest_path))
    fail(out.string(), "cache.json",
         "holds a cache already: pass --resume to continue it, or choose another folder");
  const bool cuda = parse_device(opt.device, "cache") == Device::Cuda;
  if (cuda) model::DeviceGemma2::check_precision("cache", opt.precision);
  if (cuda) require_device(Device::Cuda);  // before anything is written or loaded
  const model::Gemma2Config mcfg = model::read_gemma2_config(opt.model_dir);
  const std::vector<int64_t> layers = checked_layers(opt.layers, mcfg.num_layers, "cache");
  const model::HookPoint point = model::parse_hook_kind(opt.hook);
  const int64_t d = mcfg.hidden_size, n_shards = opt.total_tokens / opt.shard_tokens;

  // Size first: refuse a cache the disk cannot hold, before creating anything.
  const int64_t bytes = cache_bytes(opt, d);
  const int64_t available = available_bytes(out.string());
  std::fprintf(stderr,
               "cache: %lld shards x %lld tokens x %zu layers = %.2f GiB on disk (%.2f GiB free)\n",
               (long long)n_shards, (long long)opt.shard_tokens, layers.size(),
               double(bytes) / double(1 << 30), double(available) / double(1 << 30));

  json manifest = identity(opt);
  manifest["layers"] = layers;
  int64_t shards_done = 0, corpus_pos = 0;
  if (opt.resume && fs::exists(manifest_path)) {
    const json old = read_json_file(manifest_path.string());
    if (old.value("version", 0) != kCacheVersion)
      fail(manifest_path.string(), "version", "unsupported cache version");
    for (const auto& [k, v] : manifest.items())
      if (old.value(k, json()) != v)
        fail(manifest_path.string(), k, "differs from this run's options; refusing to resume");
    shards_done = old.at("shards").get<int64_t>();
    corpus_pos = old.at("corpus_next_document").get<int64_t>();
  }
  const int64_t bytes_left = bytes / n_shards * (n_shards - shards_done);
  if (bytes_left > available)
    fail(out.string(), "tokens",
         cat("the cache needs ", bytes_left >> 20, " MiB more and the disk has ", available >> 20,
             " MiB free"));

  fs::create_directories(out);
  const FolderLock lock((out / ".lock").string(), "sae cache");  // one job per folder
  std::optional<model::Gemma2> m = model::Gemma2::load(
      opt.model_dir,
      {.last_layer = layers.back(),
       .keep_bf16 = opt.keep_bf16 || opt.bf16_matmul || (cuda && opt.precision == "bf16"),
       .bf16_matmul = opt.bf16_matmul && !cuda,
       .verbose = false});
  std::optional<model::DeviceGemma2> dm;  // --device cuda: uploaded, the host copy dropped
  if (cuda) {
    dm.emplace(*m, opt.precision);
    m.reset();
    std::fprintf(stderr, "cache: the forward on %s in %s\n", cuda_device_description().c_str(),
                 opt.precision.c_str());
  }
  const model::Tokenizer tok((fs::path(opt.model_dir) / "tokenizer.model").string());
  const std::vector<int32_t> special = {tok.bos_id(), tok.eos_id(), tok.pad_id()};
  data::WindowConfig wc = opt.windows;
  wc.bos_id = tok.bos_id();
  if (wc.separator_id) wc.separator_id = tok.bos_id();
  data::Corpus corpus(opt.corpus, data::Split::Train);
  corpus.seek(corpus_pos);
  WindowStream windows(corpus, tok, wc);
  for (int64_t l : layers) fs::create_directories(out / model::hook_name(point, l));

  // tokens_per_s: this run's pace so far (with planned_shards, `sae status` gives an ETA).
  auto write_manifest = [&](bool complete, double tokens_per_s) {
    manifest["version"] = kCacheVersion;
    manifest["shards"] = shards_done;
    manifest["planned_shards"] = n_shards;
    if (tokens_per_s > 0) manifest["tokens_per_s"] = tokens_per_s;
    manifest["tokens"] = shards_done * opt.shard_tokens;
    manifest["corpus_next_document"] = corpus.next_document();
    manifest["complete"] = complete;
    manifest["hidden_size"] = d;
    manifest["model_name"] = opt.model_name;
    manifest["model_id"] = opt.model_id;
    write_file_atomic(manifest_path.string(), manifest.dump(2) + "\n");
  };

  // Rows wait here until a whole shard is ready; one forward's overshoot carries over.
  std::vector<std::vector<float>> pending(layers.size());
  std::vector<int32_t> pending_ids;
  std::vector<uint16_t> half;
  const double t_start = now_seconds();
  const int64_t first = shards_done;
  int64_t written_now = 0;
  std::vector<int32_t> w;
  while (shards_done < n_shards) {
    if ((stop && stop->load()) ||
        (opt.stop_after_shards > 0 && written_now >= opt.stop_after_shards)) {
      std::fprintf(stderr, "cache: stopped after %lld shards; rerun with --resume\n",
                   (long long)shards_done);
      return false;
    }
    // One forward of prompts_per_forward windows.
    model::TokenBatch batch;
    for (int64_t p = 0; p < opt.prompts_per_forward && windows.next(w); ++p) batch.add(w);
    if (batch.n_prompts() == 0) {
      std::fprintf(stderr, "cache: the corpus ran out after %lld of %lld shards\n",
                   (long long)shards_done, (long long)n_shards);
      break;
    }
    const std::vector<uint8_t> keep = non_special(batch.ids, special);
    auto append_kept = [&](int64_t l, const float* a, int64_t n) {
      auto& dst = pending[size_t(std::find(layers.begin(), layers.end(), l) - layers.begin())];
      for (int64_t t = 0; t < n; ++t)
        if (keep[size_t(t)]) dst.insert(dst.end(), a + t * d, a + (t + 1) * d);
    };
    auto wanted = [&](model::HookPoint p, int64_t l) {
      return p == point && std::find(layers.begin(), layers.end(), l) != layers.end();
    };
    if (dm)
      dm->forward(
          batch, layers.back(),
          [&](model::HookPoint p, int64_t l, float* a, int64_t n) {
            if (wanted(p, l)) append_kept(l, dm->to_host(a, n * d).data(), n);
          },
          nullptr, /*hook_writes=*/false);
    else
      m->forward(batch, layers.back(), [&](model::HookPoint p, int64_t l, float* a, int64_t n) {
        if (wanted(p, l)) append_kept(l, a, n);
      });
    for (size_t t = 0; t < keep.size(); ++t)
      if (keep[t]) pending_ids.push_back(batch.ids[t]);

    while (int64_t(pending_ids.size()) >= opt.shard_tokens && shards_done < n_shards) {
      const int64_t S = opt.shard_tokens;
      for (size_t i = 0; i < layers.size(); ++i) {
        std::span<const float> rows(pending[i].data(), size_t(S * d));
        std::vector<TensorToWrite> t;
        if (opt.dtype == "bf16") {
          half.resize(rows.size());
          for (size_t j = 0; j < rows.size(); ++j) half[j] = f32_to_bf16(rows[j]);
          t.push_back(
              tensor_view("activations", std::span<const uint16_t>(half), DType::BF16, {S, d}));
        } else {
          t.push_back(tensor_view("activations", rows, {S, d}));
        }
        t.push_back(
            tensor_view("tokens", std::span<const int32_t>(pending_ids.data(), size_t(S)), {S}));
        write_safetensors(
            (out / model::hook_name(point, layers[i]) / shard_name(shards_done)).string(), t,
            {{"hook_name", model::hook_name(point, layers[i])}, {"model", opt.model_dir}});
        pending[i].erase(pending[i].begin(), pending[i].begin() + S * d);
      }
      pending_ids.erase(pending_ids.begin(), pending_ids.begin() + S);
      ++shards_done, ++written_now;
      const double el = now_seconds() - t_start;
      const double rate = double((shards_done - first) * S) / std::max(el, 1e-9);
      write_manifest(shards_done == n_shards, rate);
      std::fprintf(stderr, "cache: shard %lld/%lld  %lld tokens  %.0f tok/s  ETA %.0f s\n",
                   (long long)shards_done, (long long)n_shards, (long long)(shards_done * S), rate,
                   double((n_shards - shards_done) * S) / std::max(rate, 1e-9));
    }
  }
  write_manifest(shards_done == n_shards, 0.0);
  std::fprintf(stderr, "cache: %lld shards of %lld tokens per layer in %s\n",
               (long long)shards_done, (long long)opt.shard_tokens, out.string().c_str());
  return shards_done == n_shards;
}

CacheManifest read_cache_manifest(const std::string& folder) {
  CacheManifest c;
  c.folder = folder;
  const std::string where = (fs::path(folder) / "cache.json").string();
  if (!fs::exists(where))
    fail(where, "cache.json", "no activation cache here (sae cache writes one)");
  c.json = json::parse(read_json_file(where).dump());
  if (c.json.value("version", 0) != kCacheVersion)
    fail(where, "version", "unsupported cache version");
  try {
    c.hook = c.json.at("hook").get<std::string>();
    c.layers = c.json.at("layers").get<std::vector<int64_t>>();
    c.shards = c.json.at("shards").get<int64_t>();
    c.shard_tokens = c.json.at("shard_tokens").get<int64_t>();
    c.hidden_size = c.json.at("hidden_size").get<int64_t>();
    c.model_name = c.json.value("model_name", std::string());
    c.model_id = c.json.value("model_id", std::string());
  } catch (const json::exception& e) {
    fail(where, "fields", e.what());
  }
  if (c.shards <= 0) fail(where, "shards", "the cache holds no complete shard yet");
  return c;
}

CacheRows::CacheRows(const CacheManifest& c, std::vector<int64_t> layers,
                     std::vector<int64_t> shards)
    : c_(c), layers_(std::move(layers)), shards_(std::move(shards)) {}

int64_t CacheRows::next_shard() const {
  const size_t next = shard_pos_ + (row_ > 0 ? 1 : 0);
  return next < shards_.size() ? shards_[next] : (shards_.empty() ? 0 : shards_.back() + 1);
}

int64_t CacheRows::read(const std::vector<float*>& dst, int64_t max_rows) {
  const model::HookPoint point = model::parse_hook_kind(c_.hook);
  const int64_t S = c_.shard_tokens, d = c_.hidden_size;
  int64_t done = 0;
  while (done < max_rows && shard_pos_ < shards_.size()) {
    if (open_.empty())
      for (int64_t l : layers_) {
        const std::string path =
            (fs::path(c_.folder) / model::hook_name(point, l) / shard_name(shards_[shard_pos_]))
                .string();
        open_.push_back(std::make_unique<SafetensorsFile>(path));
        const TensorInfo& t = open_.back()->info("activations");
        if (t.shape != std::vector<int64_t>{S, d} || !dtype_is_float(t.dtype))
          fail(path, "activations",
               cat("expected a float tensor [", S, ", ", d, "] as cache.json says"));
      }
    const int64_t n = std::min(max_rows - done, S - row_);
    for (size_t i = 0; i < layers_.size(); ++i) {
      const TensorInfo& t = open_[i]->info("activations");
      const uint8_t* base = open_[i]->bytes(t).data();
      const size_t width = dtype_size(t.dtype);
      convert_to_f32(t.dtype, base + size_t(row_ * d) * width, dst[i] + done * d, size_t(n * d));
      check_finite({dst[i] + done * d, size_t(n * d)}, n, d, open_[i]->path() + ": activations",
                   row_);
    }
    done += n, row_ += n;
    if (row_ == S) open_.clear(), row_ = 0, ++shard_pos_;
  }
  rows_read_ += done;
  return done;
}

}  // namespace sae::pipeline

#include "pipeline/dashboard.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>

#include "core/clock.h"
#include "core/device.h"
#include "core/error.h"
#include "eval/logit_effects.h"
#include "io/atomic_file.h"
#include "io/folder_lock.h"
#include "io/json_file.h"
#include "io/mapped_file.h"
#include "model/device_gemma2.h"
#include "model/gemma2.h"
#include "model/tokenizer.h"
#include "ops/gemm.h"
#include "ops/select.h"
#include "pipeline/activation_store.h"
#include "sae/device_sae.h"
#include "sae/load.h"

namespace sae::pipeline {

namespace fs = std::filesystem;
using json = nlohmann::json;

namespace {

// The pages and their script and style, embedded at build time from dashboard_assets/.
#include "dashboard_assets.inc"

constexpr int64_t kLatentsPerFile = 128;  // latents-NNN.js
constexpr int64_t kIndexPerFile = 1024;   // index-NNN.js
constexpr int kNearest = 10;              // nearest latents by decoder cosine
constexpr int kCorrelated = 10;           // most correlated latents shown

// What the pass remembers of every token, on disk (bounded memory): its id, document and
// position, and its codes (CSR); read back memory-mapped for the examples' contexts.
class TokenLog {
 public:
  // A new log, or (tokens > 0) the one in `dir` cut back to its first `tokens` tokens and
  // `nnz` codes, as a checkpoint recorded them, and continued.
  TokenLog(const fs::path& dir, int64_t tokens, int64_t nnz) : dir_(dir), nnz_(nnz) {
    fs::create_directories(dir);
    const std::pair<const char*, int64_t> files[] = {
        {"ids", tokens * 4},           {"doc", tokens * 8},  {"pos", tokens * 4},
        {"offsets", (tokens + 1) * 8}, {"latents", nnz * 4}, {"values", nnz * 4}};
    for (const auto& [name, bytes] : files) {
      const fs::path path = dir / name;
      if (tokens > 0) {
        if (!fs::exists(path) || int64_t(fs::file_size(path)) < bytes)
          fail(path.string(), "", "the token log is shorter than its checkpoint says");
        fs::resize_file(path, uint64_t(bytes));
      }
      FILE* f = std::fopen(path.c_str(), tokens > 0 ? "ab" : "wb");
      if (!f) fail(path.string(), "", "cannot open the dashboard's token log");
      files_.emplace_back(f);
    }
    const int64_t zero = 0;
    if (tokens == 0) put(3, &zero, sizeof zero);
  }
  int64_t nnz() const { return nnz_; }
  void flush() {
    for (auto& f : files_)
      if (std::fflush(f.get()) != 0) fail(dir_.string(), "", "writing the token log failed");
  }
  ~TokenLog() { close(); }

  // One forward's tokens and their codes (empty rows for tokens that were not encoded).
  void add(std::span<const int32_t> ids, std::span<const data::TokenOrigin> origins,
           const SparseCodes& codes, std::span<const int64_t> code_row) {
    put(0, ids.data(), ids.size_bytes());
    for (const data::TokenOrigin& o : origins) {
      put(1, &o.doc, sizeof o.doc);
      put(2, &o.pos, sizeof o.pos);
    }
    for (size_t t = 0; t < ids.size(); ++t) {
      const int64_t r = code_row[t];
      if (r >= 0) {
        const int64_t b = codes.offsets[size_t(r)], e = codes.offsets[size_t(r) + 1];
        put(4, codes.indices.data() + b, size_t(e - b) * 4);
        put(5, codes.values.data() + b, size_t(e - b) * 4);
        nnz_ += e - b;
      }
      put(3, &nnz_, sizeof nnz_);
    }
  }
  void close() {
    for (auto& f : files_)
      if (f && std::fclose(f.release()) != 0)
        fail(dir_.string(), "", "writing the token log failed");
  }

 private:
  struct Closer {
    void operator()(FILE* f) const { std::fclose(f); }
  };
  void put(int i, const void* p, size_t n) {
    if (n && std::fwrite(p, 1, n, files_[size_t(i)].get()) != n)
      fail((dir_ / "log").string(), "", "writing the token log failed (disk full?)");
  }
  fs::path dir_;
  std::vector<std::unique_ptr<FILE, Closer>> files_;
  int64_t nnz_ = 0;
};

// The token log read back.
struct TokenLogView {
  explicit TokenLogView(const fs::path& dir)
      : ids((dir / "ids").string()),
        doc((dir / "doc").string()),
        pos((dir / "pos").string()),
        offsets((dir / "offsets").string()),
        latents((dir / "latents").string()),
        values((dir / "values").string()) {}
  MappedFile ids, doc, pos, offsets, latents, values;
  template <class T>
  static const T* as(const MappedFile& m) {
    return reinterpret_cast<const T*>(m.bytes().data());
  }
  int64_t n_tokens() const { return int64_t(ids.size() / 4); }
  // Latent f's activation at token t (0 when it did not fire).
  float act(int64_t t, int32_t f) const {
    const int64_t* off = as<int64_t>(offsets);
    const int32_t* lat = as<int32_t>(latents);
    const int32_t* b = lat + off[t];
    const int32_t* e = lat + off[t + 1];
    const int32_t* it = std::lower_bound(b, e, f);
    return it != e && *it == f ? as<float>(values)[it - lat] : 0.0f;
  }
};

// Rounded to 4 significant digits: the pages need no more, and the files stay small.
double r4(double v) {
  if (v == 0 || !std::isfinite(v)) return v;
  const double scale = std::pow(10.0, 3 - std::floor(std::log10(std::abs(v))));
  return std::round(v * scale) / scale;
}

// Display text of token ids for search and the index's top tokens.
struct Vocab {
  std::vector<std::string> pieces, display;
  std::vector<uint8_t> control;
};

// Matryoshka widths from the SAE's config (training metadata or a training config), else one
// level of the whole width.
std::vector<int64_t> matryoshka_widths(const Sae& s) {
  const auto& j = s.cfg.json;
  for (const auto* w :
       {j.contains("metadata") && j["metadata"].contains("training_architecture_details")
            ? &j["metadata"]["training_architecture_details"]
            : nullptr,
        &j})
    if (w && w->contains("matryoshka_widths") && (*w)["matryoshka_widths"].is_array()) {
      std::vector<int64_t> out;
      for (const auto& v : (*w)["matryoshka_widths"])
        if (v.is_number_integer()) out.push_back(v.get<int64_t>());
      if (!out.empty() && out.back() == s.cfg.d_sae && std::is_sorted(out.begin(), out.end()))
        return out;
    }
  return {s.cfg.d_sae};
}

int level_of(const std::vector<int64_t>& widths, int64_t f) {
  return int(std::upper_bound(widths.begin(), widths.end(), f) - widths.begin());
}

// Pearson correlation of two latents' firing indicators over n tokens.
double firing_correlation(int64_t n, int64_t a, int64_t b, int64_t both) {
  const double den = std::sqrt(double(a) * double(n - a) * double(b) * double(n - b));
  return den > 0 ? (double(n) * double(both) - double(a) * double(b)) / den : 0.0;
}

void write_js(const fs::path& path, const std::string& kind, const json& key, const json& data) {
  write_file_atomic(path.string(), "saeDash.add(" + json(kind).dump() + ", " + key.dump() + ", " +
                                       data.dump() + ");\n");
}

}  // namespace

std::string display_piece(const std::string& piece) {
  if (piece.size() == 6 && piece.rfind("<0x", 0) == 0 && piece[5] == '>') {
    const int byte = std::stoi(piece.substr(3, 2), nullptr, 16);
    if (byte == '\n') return "\u21b5\n";
    if (byte == '\t') return "\u2192\t";
    if (byte == '\r') return "\u240d";
    if (byte == ' ') return " ";
    if (byte >= 0x21 && byte < 0x7f) return std::string(1, char(byte));
    return piece;  // another byte of a multi-byte character: shown as itself
  }
  std::string out;
  for (size_t i = 0; i < piece.size();) {
    if (piece.compare(i, 3, "\u2581") == 0) {
      out += ' ';
      i += 3;
    } else {
      out += piece[i++];
    }
  }
  return out;
}

DashboardResult run_dashboard(const DashboardOptions& opt, const std::atomic<bool>* stop) {
  const double t_start = now_seconds();
  DashboardResult res;
  const fs::path out = opt.output_dir, partial = out.string() + ".partial";
  if (fs::exists(out))
    fail(out.string(), "output", "exists already: choose another folder or remove it");
  if (fs::exists(partial) && !opt.resume)  // before anything slow is loaded
    fail(partial.string(), "",
         "holds an interrupted dashboard: pass --resume to continue it, or remove the folder");
  // One job per folder (io/folder_lock.h): a resume of a dashboard another process still
  // writes stops here, before anything slow is loaded; a fresh one takes it on creating the
  // folder (below). Released however the process ends; removed before the folder is renamed.
  std::optional<FolderLock> lock;
  if (fs::exists(partial)) lock.emplace((partial / ".lock").string(), "sae dashboard");
  if (opt.tokens <= 0) fail("dashboard", "tokens", "must be positive");
  const bool cuda = parse_device(opt.device, "dashboard") == Device::Cuda;
  if (cuda) model::DeviceGemma2::check_precision("dashboard", opt.precision);
  if (cuda) require_device(Device::Cuda);  // before anything is loaded or written
  if (opt.context_before < 0 || opt.context_after < 0)
    fail("dashboard", "context", "token counts before and after must be >= 0");

  const LoadedSae loaded = load_sae_ref(opt.sae);
  const Sae& sae = loaded.sae;
  const std::string hook = sae.cfg.metadata_string("hook_name");
  if (hook.empty())
    fail(loaded.folder + "/cfg.json", "metadata.hook_name",
         "missing: the dashboard runs the model to the SAE's hook");
  const auto [point, layer] = model::parse_hook_name(hook);
  const model::Gemma2 m = model::Gemma2::load(
      opt.model,
      {.last_layer = layer,
       .keep_bf16 = opt.keep_bf16 || opt.bf16_matmul || (cuda && opt.precision == "bf16"),
       .bf16_matmul = opt.bf16_matmul && !cuda,
       .verbose = false});
  if (m.cfg.hidden_size != sae.cfg.d_in)
    fail(loaded.folder + "/cfg.json", "d_in",
         cat(sae.cfg.d_in, " does not match the model's hidden size ", m.cfg.hidden_size));
  for (int64_t f : opt.latents)
    if (f < 0 || f >= sae.cfg.d_sae)
      fail("dashboard", "latents", cat("latent ", f, " is outside 0..", sae.cfg.d_sae - 1));
  std::vector<int64_t> selected = opt.latents;
  if (selected.empty())
    for (int64_t f = 0; f < sae.cfg.d_sae; ++f) selected.push_back(f);
  std::sort(selected.begin(), selected.end());
  selected.erase(std::unique(selected.begin(), selected.end()), selected.end());
  // --device cuda: the forward, the SAE's encoder and the logit effects' products on the GPU;
  // the statistics, the token log and the pages stay on the host.
  std::optional<model::DeviceGemma2> dm;
  std::optional<DeviceSae> dsae;
  if (cuda) {
    dm.emplace(m, opt.precision);
    dsae.emplace(sae, "fp32");
    std::fprintf(stderr, "dashboard: the forward (%s) and the SAE (fp32) on %s\n",
                 opt.precision.c_str(), cuda_device_description().c_str());
  }

  const model::Tokenizer tok((fs::path(opt.model) / "tokenizer.model").string());
  const std::vector<int32_t> special = {tok.bos_id(), tok.eos_id(), tok.pad_id()};
  data::WindowConfig wc = opt.windows;
  wc.bos_id = tok.bos_id();
  if (wc.separator_id) wc.separator_id = tok.bos_id();
  const int64_t cs = wc.context_size;
  data::Corpus corpus(opt.corpus, opt.training_split ? data::Split::Train : data::Split::Heldout);
  WindowStream windows(corpus, tok, wc);

  // What a resumed run must share with the interrupted one.
  const json identity = {{"sae", fs::absolute(loaded.folder).lexically_normal().string()},
                         {"model", fs::absolute(opt.model).lexically_normal().string()},
                         {"corpus", opt.corpus.to_json()},
                         {"training_split", opt.training_split},
                         {"context_size", cs},
                         {"concat", wc.concat},
                         {"prompts_per_forward", opt.prompts_per_forward}};
  const fs::path work = partial / ".work", state_path = work / "state.json";
  eval::LatentStatsConfig sc = opt.stats;
  sc.d_sae = sae.cfg.d_sae;
  eval::LatentStats stats(sc);
  int64_t logged = 0, windows_done = 0, log_nnz = 0;
  if (opt.resume && fs::exists(state_path)) {
    const json state = read_json_file(state_path.string());
    for (const auto& [k, v] : identity.items())
      if (state.at("identity").value(k, json()) != v)
        fail(state_path.string(), k, "differs from this run's options; refusing to resume");
    stats.load((work / state.at("stats").get<std::string>()).string());
    logged = state.at("logged").get<int64_t>();
    log_nnz = state.at("nnz").get<int64_t>();
    windows_done = state.at("windows").get<int64_t>();
    std::vector<int32_t> skip;
    for (int64_t i = 0; i < windows_done; ++i)  // tokenised again, not run: the same windows
      if (!windows.next(skip)) fail(state_path.string(), "windows", "the corpus is shorter now");
    std::fprintf(stderr, "dashboard: resuming after %lld tokens (%lld windows)\n",
                 (long long)stats.tokens(), (long long)windows_done);
  } else {  // begin again: all of it but the lock
    if (fs::exists(partial))
      for (const auto& e : fs::directory_iterator(partial))
        if (e.path().filename() != ".lock") fs::remove_all(e.path());
  }
  fs::create_directories(partial / "data");
  if (!lock) lock.emplace((partial / ".lock").string(), "sae dashboard");
  // A run that fails before its first checkpoint leaves nothing behind; after one, the folder
  // stays for --resume.
  struct RemoveUnlessDone {
    fs::path path;
    bool done = false;
    ~RemoveUnlessDone() {
      std::error_code ec;
      if (!done) fs::remove_all(path, ec);
    }
  } cleanup{partial, logged > 0};
  auto log = std::make_unique<TokenLog>(work, logged, log_nnz);
  // Checkpoint: logs flushed, statistics saved under a new name, then state.json (the commit
  // point) names it; the previous statistics file goes last.
  std::string stats_file;
  if (fs::exists(state_path)) stats_file = read_json_file(state_path.string()).at("stats");
  // With the tokens done, the run's target and its pace (since it started or resumed), for
  // `sae status`.
  double t_pass = 0;
  int64_t tokens_at_start = 0;
  auto checkpoint = [&] {
    log->flush();
    const std::string name = "stats-" + std::to_string(windows_done) + ".safetensors";
    stats.save((work / name).string());
    const double seconds = now_seconds() - t_pass;
    write_file_atomic(state_path.string(),
                      json{{"identity", identity},
                           {"stats", name},
                           {"logged", logged},
                           {"nnz", log->nnz()},
                           {"windows", windows_done},
                           {"tokens", stats.tokens()},
                           {"planned_tokens", opt.tokens},
                           {"tokens_per_s",
                            seconds > 0 ? double(stats.tokens() - tokens_at_start) / seconds : 0.0}}
                          .dump(2));
    if (!stats_file.empty() && stats_file != name) fs::remove(work / stats_file);
    stats_file = name;
    cleanup.done = true;
  };
  std::fprintf(stderr,
               "dashboard: %s (%s, %lld latents) on %lld %s tokens, windows of %lld, %zu pages\n",
               loaded.folder.c_str(), hook.c_str(), (long long)sae.cfg.d_sae, (long long)opt.tokens,
               opt.training_split ? "training-split" : "held-out", (long long)cs, selected.size());

  // The pass: forward, encode the non-special tokens, update the statistics, log.
  t_pass = now_seconds();
  double last_print = t_pass, last_checkpoint = t_pass;
  tokens_at_start = stats.tokens();
  std::vector<int32_t> w;
  std::vector<data::TokenOrigin> wo;
  const int64_t d = sae.cfg.d_in;
  while (stats.tokens() < opt.tokens) {
    const bool stop_here = (stop && stop->load()) ||
                           (opt.stop_after_tokens > 0 && stats.tokens() >= opt.stop_after_tokens);
    if (stop_here || now_seconds() - last_checkpoint > opt.checkpoint_seconds) {
      checkpoint();
      last_checkpoint = now_seconds();
      if (stop_here) {
        std::fprintf(stderr, "dashboard: stopped after %lld tokens; rerun with --resume\n",
                     (long long)stats.tokens());
        res.tokens = stats.tokens();
        res.seconds = now_seconds() - t_start;
        return res;
      }
    }
    model::TokenBatch batch;
    std::vector<data::TokenOrigin> origins;
    for (int64_t p = 0; p < opt.prompts_per_forward && windows.next(w, &wo); ++p) {
      batch.add(w);
      origins.insert(origins.end(), wo.begin(), wo.end());
      ++windows_done;
    }
    if (batch.n_prompts() == 0) {
      std::fprintf(stderr, "dashboard: the corpus ran out after %lld tokens\n",
                   (long long)stats.tokens());
      break;
    }
    const std::vector<uint8_t> keep = non_special(batch.ids, special);
    std::vector<float> acts;
    double t0 = now_seconds();
    auto take_kept = [&](const float* a, int64_t n) {
      for (int64_t t = 0; t < n; ++t)
        if (keep[size_t(t)]) acts.insert(acts.end(), a + t * d, a + (t + 1) * d);
    };
    if (dm) {
      dm->forward(
          batch, layer,
          [&](model::HookPoint p, int64_t l, float* a, int64_t n) {
            if (p == point && l == layer) take_kept(dm->to_host(a, n * d).data(), n);
          },
          nullptr, /*hook_writes=*/false);
    } else {
      m.forward(batch, layer, [&](model::HookPoint p, int64_t l, float* a, int64_t n) {
        if (p == point && l == layer) take_kept(a, n);
      });
    }
    double t1 = now_seconds();
    const int64_t n_kept = int64_t(acts.size()) / d;
    const SparseCodes codes = dsae ? dsae->encode(acts, n_kept) : sae.encode(acts, n_kept);
    double t2 = now_seconds();
    // Code row of each token of the batch (-1: special, not encoded); stats see every token so
    // that token indices stay those of the log.
    std::vector<int64_t> code_row(keep.size(), -1);
    SparseCodes all;
    all.n_tokens = int64_t(keep.size());
    all.d_sae = codes.d_sae;
    all.offsets.assign(keep.size() + 1, 0);
    for (int64_t t = 0, r = 0; t < all.n_tokens; ++t) {
      const int64_t n =
          keep[size_t(t)] ? codes.offsets[size_t(r) + 1] - codes.offsets[size_t(r)] : 0;
      if (keep[size_t(t)]) code_row[size_t(t)] = r++;
      all.offsets[size_t(t) + 1] = all.offsets[size_t(t)] + n;
    }
    all.indices = codes.indices;
    all.values = codes.values;
    stats.add(all, logged, keep);
    log->add(batch.ids, origins, codes, code_row);
    logged += all.n_tokens;
    double t3 = now_seconds();
    res.model_seconds += t1 - t0, res.encode_seconds += t2 - t1, res.stats_seconds += t3 - t2;
    if (t3 - last_print > 5 || stats.tokens() >= opt.tokens) {
      last_print = t3;
      const double el = t3 - t_pass,
                   rate = double(stats.tokens() - tokens_at_start) / std::max(el, 1e-9);
      std::fprintf(stderr,
                   "dashboard: %lld/%lld tokens  %.0f tok/s  ETA %.0f s  (model %.0f%%, encode "
                   "%.0f%%, statistics %.0f%%)\n",
                   (long long)stats.tokens(), (long long)opt.tokens, rate,
                   double(std::max<int64_t>(0, opt.tokens - stats.tokens())) / std::max(rate, 1e-9),
                   100 * res.model_seconds / el, 100 * res.encode_seconds / el,
                   100 * res.stats_seconds / el);
    }
  }
  log->close();
  if (stats.tokens() == 0) fail("dashboard", "dataset", "no tokens to run (is the split empty?)");
  res.tokens = stats.tokens();
  const double t_write = now_seconds();

  // Vocabulary (display text), Matryoshka levels, unit decoder rows for nearest latents.
  Vocab vocab;
  const int64_t V = tok.vocab_size();
  for (int32_t i = 0; i < V; ++i) {
    vocab.pieces.push_back(tok.piece(i));
    vocab.control.push_back(tok.is_special(i));
    vocab.display.push_back(vocab.control.back() ? vocab.pieces.back()
                                                 : display_piece(vocab.pieces.back()));
  }
  const std::vector<int64_t> widths = matryoshka_widths(sae);
  const int64_t D = sae.cfg.d_sae, N = stats.tokens();
  const std::vector<float> unit_dec = eval::unit_decoder_rows(sae, 0, D);
  // Parents (an inner-level latent that fires on at least half of f's tokens) and, inverted,
  // children, over the whole SAE. Co-firing counts are Space-Saving's lower bounds (exact for
  // partners never evicted), so no probability is overstated.
  std::vector<std::vector<std::pair<int32_t, double>>> parents(static_cast<size_t>(D)),
      children(static_cast<size_t>(D));
  std::vector<eval::LatentSummary> summaries(static_cast<size_t>(D));
  for (int64_t f = 0; f < D; ++f) summaries[size_t(f)] = stats.summary(f);
  for (int64_t f = 0; f < D; ++f) {
    const auto& s = summaries[size_t(f)];
    if (s.fires == 0) continue;
    for (const eval::Partner& p : s.cofire) {
      const double given = double(p.at_least()) / double(s.fires);
      if (level_of(widths, p.latent) < level_of(widths, f) && given >= 0.5) {
        parents[size_t(f)].push_back({p.latent, given});
        children[size_t(p.latent)].push_back({int32_t(f), given});
      }
    }
  }
  for (auto& c : children)
    std::sort(c.begin(), c.end(), [](auto& a, auto& b) { return a.second > b.second; });

  const TokenLogView logv(partial / ".work");
  auto example_json = [&](int32_t f, const eval::Example& e) {
    const int64_t ws = e.token / cs * cs;
    const int64_t a = std::max(ws, e.token - opt.context_before);
    const int64_t b = std::min(ws + cs, e.token + opt.context_after + 1);
    json t = json::array(), v = json::array();
    for (int64_t u = a; u < b; ++u) {
      t.push_back(TokenLogView::as<int32_t>(logv.ids)[u]);
      v.push_back(r4(logv.act(u, f)));
    }
    return json{{"v", r4(e.value)},
                {"q", e.token - a},
                {"doc", TokenLogView::as<int64_t>(logv.doc)[e.token]},
                {"pos", TokenLogView::as<int32_t>(logv.pos)[e.token]},
                {"t", t},
                {"a", v}};
  };
  auto group_json = [&](int32_t f, const eval::ExampleGroup& g) {
    json ex = json::array();
    for (const auto& e : g.examples) ex.push_back(example_json(f, e));
    return json{{"lo", r4(g.lo)}, {"hi", r4(g.hi)}, {"count", g.count}, {"examples", ex}};
  };

  json index_rows = json::array();
  // Written block by block (the JSON of all 32768 latents would not fit in memory at once).
  std::vector<json> np_features;  // the Neuronpedia batch being filled
  int64_t np_batches = 0;
  const std::string np_set = opt.neuronpedia_set.empty()
                                 ? fs::path(loaded.folder).filename().string()
                                 : opt.neuronpedia_set;
  if (opt.neuronpedia) fs::create_directories(partial / "neuronpedia");
  auto flush_neuronpedia = [&](bool last) {
    while (np_features.size() >= size_t(kLatentsPerFile) || (last && !np_features.empty())) {
      const size_t n = std::min(np_features.size(), size_t(kLatentsPerFile));
      json batch = {{"model_id", sae.cfg.metadata_string("model_name")},
                    {"layer", layer},
                    {"sae_set", np_set},
                    {"features", json::array()}};
      for (size_t i = 0; i < n; ++i) batch["features"].push_back(std::move(np_features[i]));
      np_features.erase(np_features.begin(), np_features.begin() + long(n));
      write_file_atomic(
          (partial / "neuronpedia" / ("batch-" + std::to_string(np_batches++) + ".json")).string(),
          batch.dump());
    }
  };
  std::vector<uint8_t> skip = vocab.control;
  for (size_t c0 = 0; c0 < selected.size();) {
    // The selected latents of one latents-NNN.js file.
    const int64_t file = selected[c0] / kLatentsPerFile;
    size_t c1 = c0;
    while (c1 < selected.size() && selected[c1] / kLatentsPerFile == file) ++c1;
    const int64_t lo = selected[c0], hi = selected[c1 - 1] + 1;
    const std::vector<eval::LogitEffects> logits =
        dm ? eval::logit_effects_of(
                 dm->unembed(std::span(unit_dec).subspan(size_t(lo * d), size_t((hi - lo) * d)),
                             hi - lo),
                 hi - lo, skip)
           : eval::logit_effects(sae, m.embed, skip, lo, hi);
    // Nearest latents: decoder cosines of the block against every latent.
    std::vector<float> cos(size_t((hi - lo) * D));
    ops::gemm(ops::Trans::No, ops::Trans::Yes, hi - lo, D, d, 1.0f, unit_dec.data() + lo * d, d,
              unit_dec.data(), d, 0.0f, cos.data(), D);
    for (int64_t f = lo; f < hi; ++f) cos[size_t((f - lo) * D + f)] = -2;  // not itself
    const int k_near = int(std::min<int64_t>(kNearest, D - 1));
    std::vector<int32_t> near(size_t((hi - lo) * std::max(k_near, 1)));
    std::vector<float> near_cos(near.size());
    if (k_near > 0) ops::topk_rows(cos.data(), hi - lo, D, k_near, near.data(), near_cos.data());

    json file_data = json::object();
    for (size_t c = c0; c < c1; ++c) {
      const int32_t f = int32_t(selected[c]);
      const eval::LatentSummary& s = summaries[size_t(f)];
      const eval::LogitEffects& le = logits[size_t(f - lo)];
      json top = json::array(), intervals = json::array(), quantiles = json::array();
      for (const auto& e : s.top) top.push_back(example_json(f, e));
      for (const auto& g : s.intervals) intervals.push_back(group_json(f, g));
      for (const auto& g : s.quantiles) quantiles.push_back(group_json(f, g));
      json nearest = json::array(), correlated = json::array(), par = json::array(),
           chi = json::array();
      std::vector<std::pair<float, int32_t>> by_cos;  // topk_rows gives them by index
      for (int j = 0; j < k_near; ++j)
        by_cos.push_back(
            {-near_cos[size_t((f - lo) * k_near + j)], near[size_t((f - lo) * k_near + j)]});
      std::sort(by_cos.begin(), by_cos.end());
      for (const auto& [c, g] : by_cos) nearest.push_back({g, r4(-c)});
      std::vector<std::pair<int32_t, double>> corr;
      for (const eval::Partner& p : s.cofire)
        corr.push_back(
            {p.latent, firing_correlation(N, s.fires, stats.fires(p.latent), p.at_least())});
      std::sort(corr.begin(), corr.end(), [](auto& a, auto& b) { return a.second > b.second; });
      for (size_t j = 0; j < std::min<size_t>(kCorrelated, corr.size()); ++j)
        correlated.push_back({corr[j].first, r4(corr[j].second)});
      for (const auto& [g, p] : parents[size_t(f)]) par.push_back({g, r4(p)});
      for (size_t j = 0; j < std::min<size_t>(20, children[size_t(f)].size()); ++j)
        chi.push_back({children[size_t(f)][j].first, r4(children[size_t(f)][j].second)});
      json hist = json::array();
      for (int64_t h : s.hist) hist.push_back(h);
      json lhist = json::array();
      for (int64_t h : le.hist) lhist.push_back(h);
      const double density = double(s.fires) / double(N);
      // Top tokens: the most frequent tokens among the top examples' firing tokens.
      std::map<int32_t, int> counts;
      for (const auto& e : s.top) ++counts[TokenLogView::as<int32_t>(logv.ids)[e.token]];
      std::vector<std::pair<int, int32_t>> by_count;
      for (auto [id, n] : counts) by_count.push_back({-n, id});
      std::sort(by_count.begin(), by_count.end());
      json top_tokens = json::array();
      for (size_t j = 0; j < std::min<size_t>(3, by_count.size()); ++j)
        top_tokens.push_back(by_count[j].second);

      file_data[std::to_string(f)] = {{"fires", s.fires},
                                      {"density", r4(density)},
                                      {"max", r4(s.max)},
                                      {"mean", r4(s.mean)},
                                      {"mean_sq", r4(s.mean_sq)},
                                      {"skew", r4(s.skew)},
                                      {"kurtosis", r4(s.kurtosis)},
                                      {"level", level_of(widths, f)},
                                      {"hist_width", r4(s.hist_width)},
                                      {"hist", hist},
                                      {"top", top},
                                      {"intervals", intervals},
                                      {"quantiles", quantiles},
                                      {"logits_pos", le.top_ids},
                                      {"logits_pos_values", json::array()},
                                      {"logits_neg", le.bottom_ids},
                                      {"logits_neg_values", json::array()},
                                      {"logits_hist_lo", r4(le.hist_lo)},
                                      {"logits_hist_width", r4(le.hist_width)},
                                      {"logits_hist", lhist},
                                      {"nearest", nearest},
                                      {"correlated", correlated},
                                      {"parents", par},
                                      {"children", chi},
                                      {"top_tokens", top_tokens}};
      for (float v : le.top_values)
        file_data[std::to_string(f)]["logits_pos_values"].push_back(r4(v));
      for (float v : le.bottom_values)
        file_data[std::to_string(f)]["logits_neg_values"].push_back(r4(v));
      index_rows.push_back({f, r4(density), r4(s.max), level_of(widths, f), top_tokens});

      if (opt.neuronpedia) {
        json acts = json::array();
        auto np_act = [&](const eval::Example& e, double bmin, double bmax, double contains) {
          const json ex = example_json(f, e);
          json toks = json::array();
          for (int32_t id : ex["t"]) toks.push_back(vocab.pieces[size_t(id)]);
          return json{{"bin_min", bmin}, {"bin_max", bmax},   {"bin_contains", contains},
                      {"tokens", toks},  {"values", ex["a"]}, {"qualifying_token_index", ex["q"]}};
        };
        for (const auto& e : s.top) acts.push_back(np_act(e, -1, r4(s.max), -1));
        for (const auto& g : s.intervals)
          for (const auto& e : g.examples)
            acts.push_back(np_act(e, r4(g.lo), r4(g.hi), r4(double(g.count) / double(s.fires))));
        json pos_str = json::array(), neg_str = json::array(), hv = json::array(),
             lv = json::array();
        for (int32_t id : le.top_ids) pos_str.push_back(vocab.pieces[size_t(id)]);
        for (int32_t id : le.bottom_ids) neg_str.push_back(vocab.pieces[size_t(id)]);
        for (size_t h = 0; h < s.hist.size(); ++h)
          hv.push_back(r4((double(h) + 0.5) * s.hist_width));
        for (size_t h = 0; h < le.hist.size(); ++h)
          lv.push_back(r4(le.hist_lo + (double(h) + 0.5) * le.hist_width));
        json corr_idx = json::array(), corr_val = json::array();
        for (const auto& [g, r] : corr) corr_idx.push_back(g), corr_val.push_back(r4(r));
        np_features.push_back({{"feature_index", f},
                               {"neuron_alignment_indices", json::array()},
                               {"neuron_alignment_values", json::array()},
                               {"neuron_alignment_l1", json::array()},
                               {"correlated_neurons_indices", json::array()},
                               {"correlated_neurons_l1", json::array()},
                               {"correlated_neurons_pearson", json::array()},
                               {"correlated_features_indices", corr_idx},
                               {"correlated_features_l1", json::array()},
                               {"correlated_features_pearson", corr_val},
                               {"neg_str", neg_str},
                               {"neg_values", file_data[std::to_string(f)]["logits_neg_values"]},
                               {"pos_str", pos_str},
                               {"pos_values", file_data[std::to_string(f)]["logits_pos_values"]},
                               {"frac_nonzero", density},
                               {"freq_hist_data_bar_values", hv},
                               {"freq_hist_data_bar_heights", hist},
                               {"logits_hist_data_bar_heights", lhist},
                               {"logits_hist_data_bar_values", lv},
                               {"n_prompts_total", logged / cs},
                               {"n_tokens_in_prompt", cs},
                               {"dataset", opt.corpus.shards.empty() ? "" : opt.corpus.shards[0]},
                               {"decoder_weights_dist", json::array()},
                               {"activations", acts}});
      }
    }
    char name[64];
    std::snprintf(name, sizeof name, "latents-%03lld.js", (long long)file);
    write_js(partial / "data" / name, "latents", file, file_data);
    flush_neuronpedia(false);
    c0 = c1;
    if (now_seconds() - last_print > 5 || c0 == selected.size()) {
      last_print = now_seconds();
      const double el = last_print - t_write, rate = double(c0) / std::max(el, 1e-9);
      std::fprintf(stderr, "dashboard: pages %zu/%zu latents  %.0f latents/s  ETA %.0f s\n", c0,
                   selected.size(), rate, double(selected.size() - c0) / std::max(rate, 1e-9));
    }
  }
  flush_neuronpedia(true);

  // Index, vocabulary, pages, settings.
  const int64_t n_index = (int64_t(index_rows.size()) + kIndexPerFile - 1) / kIndexPerFile;
  for (int64_t i = 0; i < n_index; ++i) {
    json rows = json::array();
    for (int64_t r = i * kIndexPerFile;
         r < std::min<int64_t>(index_rows.size(), (i + 1) * kIndexPerFile); ++r)
      rows.push_back(index_rows[size_t(r)]);
    char name[64];
    std::snprintf(name, sizeof name, "index-%03lld.js", (long long)i);
    write_js(partial / "data" / name, "index", i, rows);
  }
  write_js(partial / "data" / "vocab.js", "vocab", 0, vocab.display);
  const json meta = {{"sae", loaded.folder},
                     {"hook", hook},
                     {"model", opt.model},
                     {"d_in", d},
                     {"d_sae", D},
                     {"levels", widths},
                     {"tokens", N},
                     {"windows", logged / cs},
                     {"context_size", cs},
                     {"split", opt.training_split ? "train" : "heldout"},
                     {"device", opt.device},
                     {"forward_precision", cuda              ? opt.precision
                                           : opt.bf16_matmul ? "bf16_matmul"
                                                             : "f32"},
                     {"latents", int64_t(selected.size())},
                     {"index_files", n_index},
                     {"latents_per_file", kLatentsPerFile},
                     {"saecpp_version", SAECPP_VERSION}};
  write_js(partial / "data" / "meta.js", "meta", 0, meta);
  fs::create_directories(partial / "assets");
  for (const auto& [name, text] : kDashboardAssets) {
    const std::string rel = name;
    write_file_atomic(
        (partial / (rel.find(".html") != std::string::npos ? rel : "assets/" + rel)).string(),
        text);
  }
  if (opt.neuronpedia) {
    write_file_atomic((partial / "neuronpedia" / "run_settings.json").string(),
                      json{{"sae_path", loaded.folder},
                           {"sae_set", np_set},
                           {"model_id", sae.cfg.metadata_string("model_name")},
                           {"hook_point", hook},
                           {"layer", layer},
                           {"n_prompts_total", logged / cs},
                           {"n_tokens_in_prompt", cs},
                           {"n_features_per_batch", kLatentsPerFile},
                           {"dataset_path", opt.corpus.shards},
                           {"prepend_bos", wc.prepend_bos},
                           {"n_top_activations", sc.top_k},
                           {"n_interval_bins", sc.interval_bins},
                           {"n_interval_samples", sc.interval_samples},
                           {"context_before", opt.context_before},
                           {"context_after", opt.context_after},
                           {"generator", "sae.cpp " SAECPP_VERSION}}
                          .dump(2));
  }
  res.latents_written = int64_t(selected.size());
  res.write_seconds = now_seconds() - t_write;
  res.seconds = now_seconds() - t_start;
  write_file_atomic((partial / "dashboard.json").string(),
                    json{{"meta", meta},
                         {"seconds", res.seconds},
                         {"model_seconds", res.model_seconds},
                         {"encode_seconds", res.encode_seconds},
                         {"statistics_seconds", res.stats_seconds},
                         {"write_seconds", res.write_seconds}}
                        .dump(2));
  fs::remove_all(partial / ".work");
  fs::remove(partial / ".lock");  // still held: the dashboard carries no lock file
  fs::rename(partial, out);
  cleanup.done = true;
  res.finished = true;
  std::fprintf(stderr,
               "dashboard: %lld latents from %lld tokens in %.1f s (model %.1f s, encode %.1f s, "
               "statistics %.1f s, pages %.1f s): %s/index.html\n",
               (long long)res.latents_written, (long long)N, res.seconds, res.model_seconds,
               res.encode_seconds, res.stats_seconds, res.write_seconds, out.string().c_str());
  return res;
}

}  // namespace sae::pipeline

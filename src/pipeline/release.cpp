#include "pipeline/release.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <filesystem>
#include <fstream>
#include <functional>
#include <limits>
#include <memory>
#include <optional>
#include <sstream>

#include "core/clock.h"
#include "core/device.h"
#include "core/error.h"
#include "core/memory.h"
#include "dist/comm.h"
#include "dist/nccl.h"
#include "eval/lm_score.h"
#include "io/atomic_file.h"
#include "io/folder_lock.h"
#include "io/json_file.h"
#include "model/checkpoint.h"
#include "model/device_gemma2.h"
#include "model/gemma2.h"
#include "model/tokenizer.h"
#include "pipeline/activation_cache.h"
#include "pipeline/device_plan.h"
#include "pipeline/disk_plan.h"
#include "pipeline/model_card.h"
#include "sae/load.h"
#include "train/checkpoint_writer.h"
#include "train/device_step.h"
#include "train/trainer.h"

namespace sae::pipeline {

namespace fs = std::filesystem;
using json = nlohmann::json;
using ojson = nlohmann::ordered_json;

std::string variant_preset(const std::string& variant) {
  if (variant == "standard") return "gemma-2-2b-matryoshka-standard";
  if (variant == "snap") return "gemma-2-2b-matryoshka-snap";
  return variant;
}

namespace {

constexpr int kStateVersion = 1;

// `part` as a whole percentage of `whole` ("42%"), and seconds with one decimal, for progress.
std::string pct(double part, double whole) {
  char b[32];
  std::snprintf(b, sizeof b, "%.0f%%", 100 * part / std::max(whole, 1e-9));
  return b;
}
std::string one_decimal(double x) {
  char b[32];
  std::snprintf(b, sizeof b, "%.1f", x);
  return b;
}

// What one layer's SAEs read through the Trainer's source interface: the held-out rows and,
// before training, the normalisation batches taken from the stream.
class LayerSource final : public data::ActivationSource {
 public:
  LayerSource(int64_t d, const std::vector<float>& heldout, int64_t n_heldout, std::string what)
      : d_(d), heldout_(heldout), n_heldout_(n_heldout), what_(std::move(what)) {}
  std::vector<float> norm_batches;  // [n * batch, d]

  int64_t d_in() const override { return d_; }
  void train_batch(int64_t index, int64_t batch, float* out) override {
    const size_t begin = size_t(index * batch * d_), n = size_t(batch * d_);
    if (begin + n > norm_batches.size())
      fail("release", "n_norm_batches", "more normalisation batches asked for than were drawn");
    std::copy_n(norm_batches.data() + begin, n, out);
  }
  int64_t heldout_size(int64_t n) const override { return std::min(n, n_heldout_); }
  void heldout(int64_t n, float* out) override {
    std::copy_n(heldout_.data(), size_t(n * d_), out);
  }
  std::string describe() const override { return what_; }

 private:
  int64_t d_;
  const std::vector<float>& heldout_;
  int64_t n_heldout_;
  std::string what_;
};

// How an SAE set aside stopped (release.json's results, the state, progress.jsonl), in one
// order wherever it is read back from.
ojson failure_record(int64_t step, int64_t rollbacks, int64_t checkpoint_step,
                     const std::string& message) {
  return {{"step", step},
          {"rollbacks", rollbacks},
          {"last_checkpoint_step", checkpoint_step},
          {"message", message}};
}

// The SAEs a release's results hold set aside ("variant/hook", in the results' order).
std::vector<std::string> set_aside_in(const ojson& results) {
  std::vector<std::string> ids;
  for (const auto& [v, per_hook] : results.items())
    for (const auto& [h, res] : per_hook.items())
      if (res.contains("failed")) ids.push_back(v + "/" + h);
  return ids;
}

struct Job {
  std::string variant, hook;
  int64_t layer = 0, layer_slot = 0;  // slot: index into the store's layers
  std::string level_losses;           // as the preset names it: mse / snap / l2
  json recipe;                        // the config without what is this SAE's own (its hook)
  train::TrainConfig cfg;
  std::unique_ptr<train::Trainer> trainer;
  std::vector<float> x;  // this SAE's copy of the batch (the trainer scales it in place)
  ojson result;
  // Set aside (null: training): it diverged again after its rollbacks, and the release went on
  // without it. {"step", "rollbacks", "last_checkpoint_step", "message"}; kept in the state.
  ojson failed;
  std::string id() const { return variant + "/" + hook; }
};

// Training memory of one SAE: weights, gradients, Adam moments (no first moment when beta1 =
// 0) and the encoder's [batch, d_sae] pre-activations.
double sae_bytes(const train::TrainConfig& c, int64_t d) {
  const double D = double(c.spec.d_sae), per = D * double(d) * 4.0;
  const double moments = c.adam.beta1 > 0 ? 4 : 2;
  return per * (2 + 2 + moments) + double(c.batch_size) * D * 4.0;
}

// How the published files (cfg.json, release.json, the model card) name the model and the
// data: by repo id, name and file name, never by a path on this machine.
struct PublishedNames {
  std::string model_name;  // cfg.json metadata.model_name: "gemma-2-2b"
  std::string model_id;    // "google/gemma-2-2b", or the checkpoint folder's name
  std::string dataset;     // cfg.json metadata.dataset_path
  ojson corpus;            // the corpus options with the shards by file name
};

PublishedNames published_names(const ReleaseOptions& opt, const model::Checkpoint& ckpt) {
  PublishedNames n;
  n.model_name = opt.model_name.empty() ? ckpt.name : opt.model_name;
  n.model_id = ckpt.repo_id.empty() ? ckpt.name : ckpt.repo_id;
  std::vector<std::string> files;
  for (const auto& s : opt.corpus.shards) files.push_back(fs::path(s).filename().string());
  n.dataset = opt.dataset_name;
  if (n.dataset.empty())
    for (size_t i = 0; i < files.size(); ++i) n.dataset += (i ? ", " : "") + files[i];
  n.corpus = ojson::parse(opt.corpus.to_json().dump());
  n.corpus["shards"] = files;
  return n;
}

// One training config per (variant, layer): the variant's preset, the overrides, this run's
// output folder and the SAELens metadata of the hook; all on one batch size (one stream).
std::vector<Job> make_jobs(const ReleaseOptions& opt, const PublishedNames& names,
                           const std::vector<int64_t>& layers, model::HookPoint point,
                           const fs::path& work) {
  std::vector<Job> jobs;
  for (const std::string& v : opt.variants)
    for (size_t s = 0; s < layers.size(); ++s) {
      Job j;
      j.variant = v, j.layer = layers[s], j.layer_slot = int64_t(s);
      j.hook = model::hook_name(point, layers[s]);
      json c = train::preset(variant_preset(v));
      c["training"]["log_every_steps"] = opt.log_every_steps;  // each SAE's JSONL log
      c["training"]["eval_tokens"] = opt.heldout_tokens;       // evaluate on all of them
      for (const auto& o : opt.overrides) train::apply_override(c, o);
      if (opt.total_tokens > 0) c["training"]["total_tokens"] = opt.total_tokens;
      c["output"]["dir"] = (work / v / j.hook).string();
      // Where the activations came from, recorded in the SAE's training config.
      c["data"] = {{"type", "release"},
                   {"model", names.model_id},
                   {"hook", j.hook},
                   {"corpus", opt.corpus.to_json()},
                   {"context_size", opt.store.windows.context_size}};
      j.level_losses = c["loss"].value("level_losses", std::string("mse"));
      auto& meta = c["output"]["metadata"];
      meta["model_name"] = names.model_name;
      meta["model_class_name"] = "HookedTransformer";
      meta["hook_name"] = j.hook;
      meta["hook_head_index"] = nullptr;
      meta["context_size"] = opt.store.windows.context_size;
      meta["prepend_bos"] = opt.store.windows.prepend_bos;
      meta["exclude_special_tokens"] = opt.store.exclude_special;
      meta["disable_concat_sequences"] = !opt.store.windows.concat;
      meta["sequence_separator_token"] = opt.store.windows.separator_id ? json("bos") : json();
      meta["dataset_path"] = names.dataset;
      meta["model_from_pretrained_kwargs"] = json::object();
      meta["seqpos_slice"] = {nullptr};
      j.recipe = c;
      j.recipe["output"].erase("dir");
      j.recipe["output"]["metadata"].erase("hook_name");
      j.recipe["data"].erase("hook");
      j.recipe["data"].erase("model");  // said once, in the recipe, by name
      j.recipe["data"].erase("corpus");
      j.cfg = train::TrainConfig::from_json(c, "variant " + v);
      if (!jobs.empty() && j.cfg.batch_size != jobs.front().cfg.batch_size)
        fail("variant " + v, "training.batch_size",
             "every SAE of one release must use the same batch size (one activation stream)");
      jobs.push_back(std::move(j));
    }
  return jobs;
}

// Module parallel: which rank trains each SAE. Largest first, each to the least loaded rank
// (ties to the lower rank): balanced by cost when the SAEs differ in width, and the same
// answer on every rank.
std::vector<int> assign_owners(const std::vector<Job>& jobs, int64_t d, int n_ranks) {
  std::vector<size_t> order(jobs.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = i;
  std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) {
    return sae_bytes(jobs[a].cfg, d) > sae_bytes(jobs[b].cfg, d);
  });
  std::vector<double> load(size_t(n_ranks), 0.0);
  std::vector<int> owner(jobs.size(), 0);
  for (size_t i : order) {
    const int r = int(std::min_element(load.begin(), load.end()) - load.begin());
    owner[i] = r;
    load[size_t(r)] += sae_bytes(jobs[i].cfg, d);
  }
  return owner;
}

// The ranks [first, last) that train each SAE: one owner each (module parallel); with fewer
// SAEs than ranks, SAE i's own contiguous group of about N/n ranks (data parallel inside it, so
// that no rank only forwards); with parallel = "data", every rank for every SAE.
std::vector<std::pair<int, int>> assign_rank_groups(const std::vector<Job>& jobs, int64_t d,
                                                    int n_ranks, const std::string& parallel) {
  const int n = int(jobs.size());
  std::vector<std::pair<int, int>> groups(jobs.size());
  if (parallel == "data") {
    for (auto& g : groups) g = {0, n_ranks};
  } else if (n < n_ranks) {
    for (int i = 0; i < n; ++i) groups[size_t(i)] = {n_ranks * i / n, n_ranks * (i + 1) / n};
  } else {
    const std::vector<int> owner = assign_owners(jobs, d, n_ranks);
    for (size_t i = 0; i < jobs.size(); ++i) groups[i] = {owner[i], owner[i] + 1};
  }
  return groups;
}

bool in_group(const std::pair<int, int>& g, int r) {
  return g.first <= r && r < g.second;
}

// One rank's GPU plan: its SAEs (those whose group holds it), the store placed as `mode` says
// with `reserve` bytes kept free beside the plan (NCCL's exchange buffers, which the store on
// the host would make unneeded: the exchange then goes through host memory).
struct RankGpuPlan {
  std::vector<PlannedSae> saes;
  DevicePlanShape shape;  // store_on_host decided
  DeviceReleasePlan plan;
};
RankGpuPlan plan_rank_gpu(const DevicePlanShape& shape, const std::string& mode,
                          const std::vector<int64_t>& layers, const std::vector<Job>& jobs,
                          const std::vector<std::pair<int, int>>& group, int r, int64_t d,
                          int64_t free_bytes, int64_t reserve) {
  RankGpuPlan p;
  for (size_t i = 0; i < jobs.size(); ++i)
    if (in_group(group[i], r)) {
      p.saes.push_back({jobs[i].layer, jobs[i].cfg});
      p.saes.back().cfg.spec.d_in = d;  // the trainer takes it from its rows later
    }
  p.shape = place_store(shape, mode, layers, p.saes, free_bytes - reserve);
  if (mode == "auto" && !p.shape.store_on_host &&
      plan_device_release(p.shape, layers, p.saes).total() + reserve > free_bytes) {
    DevicePlanShape host = shape;  // on the host it needs no reserve
    host.store_on_host = true;
    if (plan_device_release(host, layers, p.saes).total() <= free_bytes) p.shape = host;
  }
  p.plan = plan_device_release(p.shape, layers, p.saes);
  return p;
}

// NCCL's exchange assembles the global batch of each layer a rank trains on its GPU, plus
// DeviceRows' spare.
int64_t gpu_exchange_bytes(const std::vector<Job>& jobs,
                           const std::vector<std::pair<int, int>>& group, int r,
                           int64_t global_batch, int64_t d) {
  std::vector<int64_t> slots;
  for (size_t i = 0; i < jobs.size(); ++i)
    if (in_group(group[i], r)) slots.push_back(jobs[i].layer_slot);
  std::sort(slots.begin(), slots.end());
  const auto n_layers = std::unique(slots.begin(), slots.end()) - slots.begin();
  return (1 + n_layers) * global_batch * d * 4;
}

// Every rank's GPU plan in a job of m ranks (one GPU each) spread as `group` says: NCCL's
// buffers (with `nccl`, several ranks) added to each store unless some rank's store went to the
// host (the exchange then goes through host memory).
std::vector<RankGpuPlan> plan_ranks_gpu(const DevicePlanShape& shape, const std::string& mode,
                                        bool nccl, const std::vector<int64_t>& layers,
                                        const std::vector<Job>& jobs,
                                        const std::vector<std::pair<int, int>>& group, int m,
                                        int64_t d, int64_t global_batch, int64_t free_bytes) {
  auto exchange = [&](int r) {
    return nccl && m > 1 ? gpu_exchange_bytes(jobs, group, r, global_batch, d) : 0;
  };
  std::vector<RankGpuPlan> plans;
  bool on_host = false;
  for (int r = 0; r < m; ++r) {
    plans.push_back(plan_rank_gpu(shape, mode, layers, jobs, group, r, d, free_bytes, exchange(r)));
    on_host = on_host || plans.back().shape.store_on_host;
  }
  if (!on_host)
    for (int r = 0; r < m; ++r) plans[size_t(r)].plan.store += exchange(r);
  return plans;
}

// The fewest ranks (module parallel: at most one rank per SAE) from `from` up whose every GPU
// plan fits in `free_bytes`; 0 when none does.
int fewest_ranks_that_fit(int from, const DevicePlanShape& shape, const std::string& mode,
                          bool nccl, const std::vector<int64_t>& layers,
                          const std::vector<Job>& jobs, int64_t d, int64_t global_batch,
                          int64_t free_bytes) {
  for (int m = std::max(from, 1); m <= int(jobs.size()); ++m) {
    const auto plans =
        plan_ranks_gpu(shape, mode, nccl, layers, jobs, assign_rank_groups(jobs, d, m, "modules"),
                       m, d, global_batch, free_bytes);
    if (std::all_of(plans.begin(), plans.end(),
                    [&](const RankGpuPlan& p) { return p.plan.total() <= free_bytes; }))
      return m;
  }
  return 0;
}

ojson gpu_plan_record(const DeviceReleasePlan& p, int64_t memory, bool fits) {
  return {{"memory", memory},     {"model", p.model},   {"forward", p.forward},
          {"saes", p.saes},       {"store", p.store},   {"host_store", p.host_store},
          {"evaluation", p.eval}, {"total", p.total()}, {"fits", fits}};
}

// Module parallel's activation exchange: every rank forwards its share of the corpus and holds
// rows [B*r/N, B*(r+1)/N) of each layer's global batch; each layer's rows go to the ranks that
// own an SAE of that layer, which assemble the global batch in rank order. One plan (moves()),
// two transports: host memory through one MPI_Alltoallv, or GPU to GPU through NCCL.
class BatchExchange {
 public:
  BatchExchange(dist::Comm& comm, int64_t batch, int64_t d, std::vector<std::vector<uint8_t>> wants)
      : comm_(comm), B_(batch), d_(d), wants_(std::move(wants)) {}
  int64_t rows_of(int r) const { return B_ * (r + 1) / comm_.size() - B_ * r / comm_.size(); }
  int64_t first_row(int r) const { return B_ * r / comm_.size(); }

  // This rank's part of the exchange, in the order both transports use: for each peer q (in
  // rank order), the slots q wants (this rank's rows go there), and the slots this rank wants
  // (q's rows land at q's rows of the global batch).
  struct Moves {
    std::vector<std::pair<int, size_t>> sends, recvs;  // (peer, slot)
  };
  Moves moves() const {
    Moves m;
    const int me = comm_.rank();
    for (int q = 0; q < comm_.size(); ++q)
      for (size_t s = 0; s < wants_[0].size(); ++s) {
        if (wants_[size_t(q)][s]) m.sends.emplace_back(q, s);
        if (wants_[size_t(me)][s]) m.recvs.emplace_back(q, s);
      }
    return m;
  }

  // Host memory. local[s]: this rank's rows of slot s; global[s]: the whole batch, filled for
  // the slots this rank wants.
  void exchange(const std::vector<std::vector<float>>& local,
                std::vector<std::vector<float>>& global) {
    const int n = comm_.size(), me = comm_.rank();
    const Moves m = moves();
    std::vector<int64_t> send_floats(size_t(n), 0), recv_floats(size_t(n), 0);
    send_.clear();
    for (const auto& [q, s] : m.sends) {
      send_.insert(send_.end(), local[s].begin(), local[s].end());
      send_floats[size_t(q)] += rows_of(me) * d_;
    }
    for (const auto& [q, s] : m.recvs) recv_floats[size_t(q)] += rows_of(q) * d_;
    std::vector<int> send_counts(static_cast<size_t>(n), 0), recv_counts(static_cast<size_t>(n), 0);
    int64_t total = 0;
    for (int q = 0; q < n; ++q) {
      SAE_CHECK(send_floats[size_t(q)] < (int64_t(1) << 31) &&
                    recv_floats[size_t(q)] < (int64_t(1) << 31),
                "module parallel: one exchange of more than 2^31 floats");
      send_counts[size_t(q)] = int(send_floats[size_t(q)]);
      recv_counts[size_t(q)] = int(recv_floats[size_t(q)]);
      total += recv_floats[size_t(q)];
    }
    recv_.resize(size_t(total));
    comm_.alltoall(send_, send_counts, recv_, recv_counts);
    // recv: [source rank][wanted slot][its rows, d] -> global[slot]: [rank-ordered rows, d].
    size_t at = 0;
    for (const auto& [q, s] : m.recvs) {
      const size_t rows = size_t(rows_of(q));
      std::copy_n(recv_.data() + at, rows * size_t(d_),
                  global[s].data() + size_t(first_row(q) * d_));
      at += rows * size_t(d_);
    }
  }

  // GPU to GPU: local[s] and global[s] in device memory (global only for the wanted slots).
  void exchange(dist::NcclComm& nccl, const std::vector<const float*>& local,
                const std::vector<float*>& global) {
    const int me = comm_.rank();
    const Moves m = moves();
    std::vector<dist::DeviceSend> sends;
    std::vector<dist::DeviceRecv> recvs;
    for (const auto& [q, s] : m.sends) sends.push_back({q, local[s], rows_of(me) * d_});
    for (const auto& [q, s] : m.recvs)
      recvs.push_back({q, global[s] + first_row(q) * d_, rows_of(q) * d_});
    nccl.exchange(sends, recvs);
  }

 private:
  dist::Comm& comm_;
  int64_t B_, d_;
  std::vector<std::vector<uint8_t>> wants_;  // [rank][slot]: owns an SAE of that layer
  std::vector<float> send_, recv_;
};

// A release from an activation cache takes what the cache was made with from its cache.json.
ReleaseOptions options_from_cache(ReleaseOptions o, const CacheManifest& c) {
  const std::string where = (fs::path(c.folder) / "cache.json").string();
  o.hook = c.hook;
  if (o.layers.empty()) o.layers = c.layers;
  for (int64_t l : o.layers)
    if (std::find(c.layers.begin(), c.layers.end(), l) == c.layers.end())
      fail(where, "layers", cat("the cache holds no layer ", l));
  o.store.windows.context_size = c.json.at("context_size").get<int64_t>();
  o.store.windows.concat = c.json.at("concat").get<bool>();
  o.corpus = data::CorpusConfig::from_json(c.json.at("corpus"), where);
  o.ce_windows = 0;  // no model
  return o;
}

}  // namespace

ReleaseEnd run_release(const ReleaseOptions& options, const std::atomic<bool>* stop) {
  const bool from_cache = !options.from_cache.empty();
  std::optional<CacheManifest> cache;
  if (from_cache) cache = read_cache_manifest(options.from_cache);
  const ReleaseOptions opt = from_cache ? options_from_cache(options, *cache) : options;
  // Launched as several ranks (mpirun): module parallel; each rank trains its own SAEs.
  dist::Comm& comm = dist::world();
  const int rank = comm.rank(), n_ranks = comm.size();
  const bool lead = rank == 0;
  if (opt.variants.empty()) fail("release", "variants", "give at least one variant");
  const fs::path out = opt.output_dir, work = out / ".work";
  // One state per rank: where its share of the corpus stood.
  const fs::path state_path =
      work / (n_ranks == 1 ? std::string("state.json")
                           : cat("state.rank", rank, "-of-", n_ranks, ".json"));
  std::vector<std::string> states;  // any rank layout's
  if (fs::exists(work))
    for (const auto& e : fs::directory_iterator(work))
      if (e.path().filename().string().rfind("state", 0) == 0 && e.path().extension() == ".json")
        states.push_back(e.path().filename().string());
  if (!opt.resume && !states.empty())  // never overwrite days of training by accident
    fail(out.string(), "state",
         cat("holds a release job already (.work/", states.front(),
             "): pass --resume (Python: resume=True) to continue it, or choose another output "
             "folder"));
  if (opt.resume && !states.empty() && !fs::exists(state_path))
    fail((work / states.front()).string(), "ranks",
         cat("this release was run with another number of ranks than ", n_ranks,
             ": resume it with the same mpirun -np"));
  const model::HookPoint point = model::parse_hook_kind(opt.hook);
  const bool cuda = parse_device(opt.device, "release") == Device::Cuda;
  if (cuda) model::DeviceGemma2::check_precision("release", opt.precision);
  if (opt.checkpoint_snapshots < 0)
    fail("release", "checkpoint_snapshots",
         cat("must be >= 0 (0: as many SAE states as fit in 1 GiB, at least 2), got ",
             opt.checkpoint_snapshots));
  if (!(opt.checkpoint_minutes >= 0) || !std::isfinite(opt.checkpoint_minutes))
    fail("release", "checkpoint_minutes",
         cat("must be a number of minutes >= 0 (0: every training.checkpoint_every_steps "
             "steps), got ",
             opt.checkpoint_minutes));
  if (opt.activation_store != "auto" && opt.activation_store != "device" &&
      opt.activation_store != "host")
    fail("release", "activation_store",
         cat("must be auto, device or host, got '", opt.activation_store, "'"));
  if (opt.activation_store != "auto" && (!cuda || from_cache))
    fail("release", "activation_store",
         cat("'", opt.activation_store, "' places the rows of the model's forward on the GPU (",
             !cuda ? "--device cuda" : "not with --from-cache, whose rows are read on the host",
             ")"));
  // The model: its checkpoint, or (from a cache) only its names and width.
  model::Checkpoint ckpt;
  model::Gemma2Config mcfg;
  if (from_cache) {
    const std::string path = cache->json.value("model", std::string());
    ckpt.name = !cache->model_name.empty() ? cache->model_name : fs::path(path).filename().string();
    ckpt.repo_id = cache->model_id;
    mcfg.hidden_size = cache->hidden_size;
    mcfg.num_layers = *std::max_element(cache->layers.begin(), cache->layers.end()) + 1;
  } else {
    ckpt = model::resolve_checkpoint(opt.model);
    mcfg = model::read_gemma2_config(ckpt.folder);
  }
  const PublishedNames names = published_names(opt, ckpt);
  const std::vector<int64_t> layers = checked_layers(opt.layers, mcfg.num_layers, "release");

  std::vector<Job> jobs = make_jobs(opt, names, layers, point, work);
  if (cuda)
    for (Job& j : jobs) j.cfg.device = "cuda";
  if (opt.parallel != "modules" && opt.parallel != "data")
    fail("release", "parallel", cat("must be modules or data, got '", opt.parallel, "'"));
  // --plan-only --ranks N: the plans of a job of N ranks, made here in one process.
  if (opt.plan_ranks < 0 || (opt.plan_ranks > 0 && (!opt.plan_only || n_ranks > 1)))
    fail("release", "plan_ranks",
         opt.plan_ranks < 0 ? cat("must be >= 0, got ", opt.plan_ranks)
                            : std::string("plans a job of N ranks without launching it: give it "
                                          "with --plan-only, in one process"));
  const int planned_ranks = opt.plan_ranks > 0 ? int(opt.plan_ranks) : n_ranks;
  const bool plan_many = planned_ranks > n_ranks;  // ranks planned, not launched
  const std::vector<std::pair<int, int>> group =
      assign_rank_groups(jobs, mcfg.hidden_size, planned_ranks, opt.parallel);
  auto mine = [&](size_t i) { return in_group(group[i], rank); };
  // [rank][slot]: whether the rank trains an SAE of layers[slot] (it then needs its batches).
  std::vector<std::vector<uint8_t>> wants(size_t(planned_ranks),
                                          std::vector<uint8_t>(layers.size(), 0));
  for (size_t i = 0; i < jobs.size(); ++i)
    for (int q = group[i].first; q < group[i].second; ++q)
      wants[size_t(q)][size_t(jobs[i].layer_slot)] = 1;
  // The communicator each of this rank's SAEs is trained over (data parallel inside a group):
  // the whole job, one group's ranks (each rank is in one group when the groups are disjoint),
  // or none (one rank per SAE).
  // Several ranks on GPUs: module parallel only (each SAE on one rank's GPU). Data-parallel SAE
  // steps would need the step's own exchange on the device, not built.
  if (cuda && planned_ranks > 1 && (opt.parallel == "data" || int64_t(jobs.size()) < planned_ranks))
    fail("release", "device",
         cat("cuda under ", planned_ranks,
             " ranks runs module parallel only (at least as many SAEs as ranks, --parallel "
             "modules): data-parallel SAE steps on GPUs are not built yet (issue 12); ",
             jobs.size(), " SAEs here"));
  if (opt.plan_only && n_ranks > 1)
    fail("release", "plan_only", "plans one process: run --plan-only without mpirun");
  if (opt.gpu_memory < 0 || (opt.gpu_memory > 0 && !cuda))
    fail("release", "gpu_memory",
         opt.gpu_memory < 0 ? "must be a size in bytes >= 0"
                            : "plans a GPU's memory: give it with --device cuda");
  // A plan for a GPU of a given size needs none here.
  const bool gpu_here = cuda && !(opt.plan_only && opt.gpu_memory > 0);
  if (gpu_here) require_device(Device::Cuda);  // before anything is loaded or written
  ojson plan = {{"saes", jobs.size()},
                {"steps", jobs.front().cfg.total_steps()},
                {"batch_tokens", jobs.front().cfg.batch_size},
                {"device", opt.device}};  // plan_only's record
  bool plan_fits = true;
  int gpu_index = 0;
  bool gpu_exchange = false;  // NCCL between the ranks' GPUs (else through host memory)
  if (cuda && n_ranks > 1) {
    const int local = dist::local_rank(comm);
    gpu_index = use_cuda_device(local);
    // NCCL needs a GPU of its own for every rank; SAECPP_NCCL=0 keeps the host path.
    std::vector<double> shares = {local >= cuda_device_count() ? 1.0 : 0.0};
    comm.allreduce_max(shares);
    const char* env = std::getenv("SAECPP_NCCL");
    gpu_exchange = dist::nccl_compiled() && !from_cache && shares[0] == 0.0 &&
                   opt.activation_store != "host" && !(env && std::string(env) == "0");
  }
  std::unique_ptr<dist::Comm> my_group;
  dist::Comm* sae_comm = nullptr;
  if (opt.parallel == "data" && n_ranks > 1) {
    sae_comm = &comm;
  } else if (int64_t(jobs.size()) < n_ranks) {
    int color = 0;
    for (size_t i = 0; i < jobs.size(); ++i)
      if (mine(i)) color = int(i);
    my_group = comm.split(color);
    sae_comm = my_group.get();
  }
  StoreConfig store = opt.store;
  const int64_t global_batch = jobs.front().cfg.batch_size;
  BatchExchange exchange(comm, global_batch, mcfg.hidden_size, wants);
  store.batch_tokens = exchange.rows_of(rank);  // this rank's rows of every batch
  const int64_t d = mcfg.hidden_size, total_steps = jobs.front().cfg.total_steps();
  for (const Job& j : jobs)
    if (j.cfg.total_steps() != total_steps)
      fail("variant " + j.variant, "training.total_tokens",
           "every SAE of one release trains on the same tokens");
  // A finished release resumed (a requeued job, the same command run again): nothing to do,
  // unless more tokens are asked for (then its SAEs train on from their last checkpoints).
  if (opt.resume && !opt.plan_only && fs::exists(out / "release.json")) {
    const ojson done = read_json_file((out / "release.json").string());
    const int64_t trained = done.value("training_tokens", int64_t(0));
    if (trained >= total_steps * jobs.front().cfg.batch_size) {
      if (lead)
        std::fprintf(stderr,
                     "release: %s is finished already (%lld training tokens per SAE; "
                     "release.json): nothing to do (--tokens beyond that trains it on)\n",
                     out.string().c_str(), (long long)trained);
      return {.finished = true, .set_aside = set_aside_in(done.at("results")), .plan = {}};
    }
  }

  // The memory plan, before anything large is allocated.
  const int64_t last_needed = opt.ce_windows > 0 ? mcfg.num_layers - 1 : layers.back();
  const double model_b =
      from_cache
          ? 0.0
          : double(model::gemma2_weight_bytes(mcfg, last_needed, opt.keep_bf16 || opt.bf16_matmul));
  auto saes_of = [&](int r) {  // rank r's SAEs in host memory (on the CPU)
    double b = 0;
    for (size_t i = 0; i < jobs.size(); ++i)
      if (in_group(group[i], r)) b += sae_bytes(jobs[i].cfg, d);
    return b;
  };
  const double saes_b = saes_of(rank);
  // The store's ring (the buffer and one fill) per layer, and the shuffle's spare.
  const double buffer_b = double((store.n_batches_in_buffer + 1) * store.prompts_per_forward *
                                 store.windows.context_size * d * 4 * (int64_t(layers.size()) + 1));
  // One process writes its checkpoints beside the steps (below): the SAEs' states wait for the
  // disk in host memory, at most the writer's budget (--checkpoint-snapshots) and never more
  // than one state per SAE.
  int64_t snapshot_max = 0, snapshots_all = 0;
  for (size_t i = 0; i < jobs.size(); ++i)
    if (mine(i)) {
      const int64_t b = train::Trainer::planned_checkpoint_bytes(jobs[i].cfg, d);
      snapshot_max = std::max(snapshot_max, b), snapshots_all += b;
    }
  const int64_t writer_budget = opt.checkpoint_snapshots > 0
                                    ? opt.checkpoint_snapshots * snapshot_max
                                    : std::max<int64_t>(2 * snapshot_max, int64_t(1) << 30);
  const double states_b = n_ranks == 1 ? double(std::min(writer_budget, snapshots_all)) : 0.0;
  if (lead)
    std::fprintf(stderr,
                 "release: %zu SAEs (%zu variants x %zu layers), %lld steps of %lld tokens each\n",
                 jobs.size(), opt.variants.size(), layers.size(), (long long)total_steps,
                 (long long)global_batch);
  // The SAEs rank r trains ("variant/hook", in order).
  auto names_of = [&](int r) {
    std::vector<std::string> names;
    for (size_t i = 0; i < jobs.size(); ++i)
      if (in_group(group[i], r)) names.push_back(jobs[i].variant + "/" + jobs[i].hook);
    return names;
  };
  if (plan_many) plan["ranks"] = ojson::array();
  if (planned_ranks > 1) {
    // What each rank trains, and its memory: said by every rank, in rank order (or, planning
    // ranks not launched, made here for each).
    auto rank_line = [&](int r) {
      std::string list;
      for (size_t i = 0; i < jobs.size(); ++i)
        if (in_group(group[i], r)) {
          list += (list.empty() ? "" : ", ") + jobs[i].variant + "/" + jobs[i].hook;
          if (group[i].second - group[i].first > 1)
            list +=
                cat(" (data parallel with ranks ", group[i].first, "-", group[i].second - 1, ")");
        }
      return cat("rank ", r, ": ", list.empty() ? "forward only" : list,
                 cuda ? std::string("; on its GPU (its memory plan below)")
                      : cat("; memory: model ", fmt_bytes(model_b), " + SAEs ",
                            fmt_bytes(saes_of(r)), " + activation buffers ", fmt_bytes(buffer_b),
                            " = ", fmt_bytes(model_b + saes_of(r) + buffer_b)));
    };
    std::vector<std::string> lines;
    if (plan_many) {
      for (int r = 0; r < planned_ranks; ++r) {
        lines.push_back(rank_line(r));
        plan["ranks"].push_back({{"rank", r}, {"saes", names_of(r)}});
        if (!cuda)
          plan["ranks"].back()["memory"] = {{"model", int64_t(model_b)},
                                            {"saes", int64_t(saes_of(r))},
                                            {"activation_buffers", int64_t(buffer_b)},
                                            {"total", int64_t(model_b + saes_of(r) + buffer_b)}};
      }
    } else {
      lines = dist::allgather_strings(comm, rank_line(rank));
    }
    if (lead) {
      std::fprintf(
          stderr,
          "release: %s over %d ranks (%s): each %s (%lld-%lld rows of "
          "every batch) and trains its SAEs on all ranks' rows\n",
          opt.parallel == "data" ? "data parallel (every SAE on every rank)"
          : int64_t(jobs.size()) < planned_ranks
              ? "module parallel, data parallel inside each SAE's group"
              : "module parallel",
          planned_ranks,
          plan_many ? "planned with --ranks, not launched" : comm.transport().c_str(),
          from_cache ? "reads every N-th shard of the cache" : "forwards its share of the corpus",
          (long long)(global_batch / planned_ranks),
          (long long)((global_batch + planned_ranks - 1) / planned_ranks));
      for (const auto& l : lines) std::fprintf(stderr, "release: %s\n", l.c_str());
    }
  } else if (!cuda) {
    std::fprintf(
        stderr, "memory: model %s + SAEs %s + activation buffers %s + checkpoint states %s = %s\n",
        fmt_bytes(model_b).c_str(), fmt_bytes(saes_b).c_str(), fmt_bytes(buffer_b).c_str(),
        fmt_bytes(states_b).c_str(), fmt_bytes(model_b + saes_b + buffer_b + states_b).c_str());
    plan["memory"] = {{"model", int64_t(model_b)},
                      {"saes", int64_t(saes_b)},
                      {"activation_buffers", int64_t(buffer_b)},
                      {"checkpoint_states", int64_t(states_b)},
                      {"total", int64_t(model_b + saes_b + buffer_b + states_b)}};
  }
  const double plan_bytes = model_b + saes_b + buffer_b + states_b;
  // The disk plan: what the job's folder (one every rank sees) will hold at its fullest, every
  // rank's SAEs summed, against its free space; a resumed job's checkpoints are there already.
  {
    std::vector<train::TrainConfig> written;  // the SAEs this rank writes
    for (size_t i = 0; i < jobs.size(); ++i)
      if (plan_many || (mine(i) && group[i].first == rank)) written.push_back(jobs[i].cfg);
    const DiskPlan own = plan_release_disk(written, d, 0);
    std::vector<double> v = {double(own.checkpoints), double(own.replacing), double(own.saes),
                             lead ? double(folder_bytes(work.string())) : 0.0,
                             lead ? double(available_bytes(out.string())) : 0.0};
    if (n_ranks > 1) comm.allreduce_sum(v);
    DiskPlan disk;
    disk.checkpoints = int64_t(v[0]), disk.replacing = int64_t(v[1]), disk.saes = int64_t(v[2]);
    disk.present = std::min(int64_t(v[3]), disk.checkpoints);
    if (lead)
      std::fprintf(stderr, "disk: %s; %s free in %s\n", disk.describe().c_str(),
                   fmt_bytes(v[4]).c_str(), out.string().c_str());
    plan["disk"] = {{"checkpoints", disk.checkpoints},
                    {"replacing", disk.replacing},
                    {"saes", disk.saes},
                    {"present", disk.present},
                    {"needed", disk.needed()},
                    {"free", int64_t(v[4])},
                    {"fits", disk.needed() <= int64_t(v[4])}};
    if (opt.plan_only && opt.check_disk && disk.needed() > int64_t(v[4])) {
      plan_fits = false;
      try {
        check_disk(disk, int64_t(v[4]), out.string());
      } catch (const Error& e) {
        std::fprintf(stderr, "release: plan: %s\n", e.what());
      }
    } else if (opt.check_disk) {
      check_disk(disk, int64_t(v[4]), out.string());
    }
  }
  // On the GPU: the device's plan, checked before anything is allocated there.
  DeviceReleasePlan gpu_plan;
  bool store_on_host = false;  // the activation store's rows pinned on the host for the GPU
  if (cuda) {
    DevicePlanShape shape;
    shape.model = mcfg;
    shape.bf16_model = opt.precision == "bf16";
    shape.forward = !from_cache;
    shape.ce_score = !from_cache && opt.ce_windows > 0;
    shape.forward_tokens = store.prompts_per_forward * store.windows.context_size;
    shape.context_size = store.windows.context_size;
    shape.store_rows = store.n_batches_in_buffer * shape.forward_tokens + shape.forward_tokens;
    // The GPU's free memory, capped by --gpu-memory; or, planning only, that size itself.
    const int64_t free_bytes =
        !gpu_here ? opt.gpu_memory
                  : std::min<int64_t>(int64_t(cuda_memory().free),
                                      opt.gpu_memory > 0 ? opt.gpu_memory : INT64_MAX);
    // "auto" moves a store of the model's rows that does not fit beside the SAEs to pinned host
    // memory.
    const bool may_move = opt.activation_store == "auto" && !from_cache;
    const std::string mode =
        may_move || opt.activation_store != "auto" ? opt.activation_store : "device";
    const char* available = gpu_here ? " is free" : " is planned (--gpu-memory)";
    // Ranks not launched here (planned, or suggested when one GPU is too small): their global
    // batches planned as assembled by NCCL on their GPUs when this build has it, the larger plan.
    const bool nccl_planned =
        dist::nccl_compiled() && !from_cache && opt.activation_store != "host";
    auto fewest_ranks = [&](int from) {
      return fewest_ranks_that_fit(from, shape, mode, nccl_planned, layers, jobs, d, global_batch,
                                   free_bytes);
    };
    if (plan_many) {
      std::fprintf(stderr, "GPUs: each planned for %s (%s)\n",
                   fmt_bytes(double(free_bytes)).c_str(),
                   gpu_here ? cat("what is free on ", cuda_device_description()).c_str()
                            : "--gpu-memory; none used");
      const std::vector<RankGpuPlan> ranks =
          plan_ranks_gpu(shape, mode, nccl_planned, layers, jobs, group, planned_ranks, d,
                         global_batch, free_bytes);
      int worst = 0;
      for (int r = 0; r < planned_ranks; ++r) {
        const RankGpuPlan& p = ranks[size_t(r)];
        if (p.plan.total() > ranks[size_t(worst)].plan.total()) worst = r;
        const bool fits = p.plan.total() <= free_bytes;
        std::fprintf(stderr, "rank %d: GPU memory plan (%s planned%s): %s\n", r,
                     fmt_bytes(double(free_bytes)).c_str(), fits ? "" : ", does not fit",
                     p.plan.describe().c_str());
        plan["ranks"][size_t(r)]["gpu"] = gpu_plan_record(p.plan, free_bytes, fits);
      }
      const RankGpuPlan& largest = ranks[size_t(worst)];
      if (largest.plan.total() > free_bytes) {
        plan_fits = false;
        const int m = fewest_ranks(planned_ranks + 1);
        plan["ranks_that_fit"] = m > 0 ? ojson(m) : ojson(nullptr);
        std::fprintf(
            stderr, "release: plan: rank %d's GPU plan needs %s but %s%s; %s\n", worst,
            fmt_bytes(double(largest.plan.total())).c_str(), fmt_bytes(double(free_bytes)).c_str(),
            available,
            m > 0 ? cat("with --ranks ", m, " every rank's fits (mpirun -np ", m, ", one GPU each)")
                        .c_str()
                  : cat("no number of ranks up to one per SAE (", jobs.size(),
                        ") fits: run the layers in groups (--plan-only without --ranks names them)")
                        .c_str());
      }
    } else {
      // NCCL's buffers, if it is to be used, kept free when the store is placed.
      const int64_t exchange_b =
          gpu_exchange ? gpu_exchange_bytes(jobs, group, rank, global_batch, d) : 0;
      const RankGpuPlan mine_gpu =
          plan_rank_gpu(shape, mode, layers, jobs, group, rank, d, free_bytes, exchange_b);
      const std::vector<PlannedSae>& planned = mine_gpu.saes;  // this rank's SAEs
      shape = mine_gpu.shape;
      gpu_plan = mine_gpu.plan;
      const std::string who = n_ranks > 1 ? cat("rank ", rank, ": ") : std::string();
      if (shape.store_on_host && mode == "auto")
        std::fprintf(
            stderr,
            "%srelease: the activation store (%s) does not fit on the GPU beside the SAEs: "
            "it goes to pinned host memory, which the GPU reads across the bus (slower; "
            "--activation-store device to refuse instead)\n",
            who.c_str(), fmt_bytes(double(gpu_plan.host_store)).c_str());
      store_on_host = shape.store_on_host;
      if (n_ranks > 1) {  // NCCL moves device rows: one rank's store on the host sends all by MPI
        std::vector<double> on_host = {store_on_host ? 1.0 : 0.0};
        comm.allreduce_max(on_host);
        if (on_host[0] != 0.0) gpu_exchange = false;
      }
      DevicePlanShape fit_shape = shape;  // what "the largest group that fits" is planned with
      fit_shape.store_on_host = shape.store_on_host || may_move;
      // The global batches of this rank's layers, assembled on its GPU.
      if (gpu_exchange) gpu_plan.store += exchange_b;
      std::fprintf(
          stderr, "%sGPU %d: %s\n%sGPU memory plan: %s (%s %s; AuxK sized for %.0f%% dead)\n",
          who.c_str(), gpu_index,
          gpu_here
              ? cuda_device_description().c_str()
              : cat("none used: planned for ", fmt_bytes(double(free_bytes)), " (--gpu-memory)")
                    .c_str(),
          who.c_str(), gpu_plan.describe().c_str(), fmt_bytes(double(free_bytes)).c_str(),
          gpu_here ? "free" : "planned", 100 * kPlannedDeadShare);
      const bool fits = gpu_plan.total() <= free_bytes;
      // When it does not fit: the layers in groups that do, one after another (the first is the
      // largest group of the layers in order), each a release of its own for release-merge.
      const std::vector<std::vector<int64_t>> groups =
          fits ? std::vector<std::vector<int64_t>>{layers}
               : layer_groups_that_fit(fit_shape, layers, planned, free_bytes);
      // When it does not fit: also the fewest GPUs (more than now) whose ranks' plans would.
      const int ranks_that_fit = !fits ? fewest_ranks(n_ranks + 1) : 0;
      plan["gpu"] = gpu_plan_record(gpu_plan, free_bytes, fits);
      plan["gpu"]["groups"] = groups;
      if (n_ranks == 1)
        plan["gpu"]["ranks_that_fit"] = fits                 ? ojson(1)
                                        : ranks_that_fit > 0 ? ojson(ranks_that_fit)
                                                             : ojson(nullptr);
      if (!fits) {
        std::string runs;
        for (const auto& g : groups)
          runs += (runs.empty() ? "--layers " : ", then --layers ") + layers_arg(g);
        const std::string or_ranks =
            ranks_that_fit > 0
                ? cat("; or over ", ranks_that_fit, " GPUs: mpirun -np ", ranks_that_fit,
                      " (module parallel, one GPU each; --plan-only --ranks ", ranks_that_fit,
                      " prints each rank's plan)")
                : std::string();
        const std::string why =
            groups.empty()
                ? cat("the GPU plan needs ", fmt_bytes(double(gpu_plan.total())), " but ",
                      fmt_bytes(double(free_bytes)), available,
                      ": not even one layer's SAEs fit (a narrower SAE, a smaller "
                      "training.batch_size or store buffer)",
                      or_ranks)
                : cat("the GPU plan needs ", fmt_bytes(double(gpu_plan.total())), " but ",
                      fmt_bytes(double(free_bytes)), available,
                      "; the largest group of these layers that fits is --layers ",
                      layers_arg(groups.front()), " (",
                      fmt_bytes(
                          double(plan_device_release(fit_shape, groups.front(), planned).total())),
                      "): run the layers in groups (", runs,
                      ") and join them with sae release-merge", or_ranks);
        if (!opt.plan_only) fail("release", "layers", why);
        plan_fits = false;
        std::fprintf(stderr, "release: plan: %s\n", why.c_str());
      }
    }
  }
  if (opt.plan_only) {  // nothing loaded, nothing written
    plan["fits"] = plan_fits;
    std::fprintf(stderr, "release: plan only: %s\n",
                 plan_fits ? "it fits; nothing was loaded or written (drop --plan-only to run it)"
                           : "it does not fit (above); nothing was loaded or written");
    return {.finished = false, .set_aside = {}, .plan = plan};
  }

  const double t_load = now_seconds();
  std::optional<model::Gemma2> model;         // none when training from a cache
  std::optional<model::DeviceGemma2> dmodel;  // --device cuda: the model on the GPU only
  std::optional<model::Tokenizer> tok;
  std::vector<int32_t> special;
  if (!from_cache) {
    const bool bf16_weights = opt.keep_bf16 || opt.bf16_matmul || (cuda && opt.precision == "bf16");
    model = model::Gemma2::load(ckpt.folder, {.last_layer = last_needed,
                                              .keep_bf16 = bf16_weights,
                                              .bf16_matmul = opt.bf16_matmul && !cuda,
                                              .verbose = false});
    if (cuda) {  // uploaded, then the host copy goes
      dmodel.emplace(*model, opt.precision);
      model.reset();
    }
    tok.emplace((fs::path(ckpt.folder) / "tokenizer.model").string());
    special = {tok->bos_id(), tok->eos_id(), tok->pad_id()};
    store.windows.bos_id = tok->bos_id();
    if (store.windows.separator_id) store.windows.separator_id = tok->bos_id();
  }

  // A cache's last shards are its held-out rows; the others are trained on.
  int64_t cache_train_shards = 0, cache_heldout_shards = 0;
  if (from_cache) {
    cache_heldout_shards = (opt.heldout_tokens + cache->shard_tokens - 1) / cache->shard_tokens;
    cache_train_shards = cache->shards - cache_heldout_shards;
    if (cache_train_shards < n_ranks)
      fail((fs::path(cache->folder) / "cache.json").string(), "shards",
           cat(cache->shards, " shards: ", cache_heldout_shards, " held out for ",
               opt.heldout_tokens, " held-out tokens leave fewer than one shard per rank (",
               n_ranks, ") to train on"));
  }

  // Held-out activations (recomputed on resume: deterministic).
  const double t_heldout = now_seconds();
  // Each rank keeps the held-out activations of the layers it trains (my_slot: index there).
  std::vector<int64_t> my_layers;
  std::vector<int64_t> my_slot(layers.size(), -1);
  for (size_t s = 0; s < layers.size(); ++s)
    if (wants[size_t(rank)][s])
      my_slot[s] = int64_t(my_layers.size()), my_layers.push_back(layers[s]);
  Heldout heldout;
  if (!my_layers.empty() && from_cache) {
    std::vector<int64_t> held_shards;
    for (int64_t i = cache_train_shards; i < cache->shards; ++i) held_shards.push_back(i);
    CacheRows rows(*cache, my_layers, held_shards);
    heldout.acts.assign(my_layers.size(), std::vector<float>(size_t(opt.heldout_tokens * d)));
    std::vector<float*> dst;
    for (auto& a : heldout.acts) dst.push_back(a.data());
    heldout.n = rows.read(dst, opt.heldout_tokens);
  } else if (!my_layers.empty()) {  // (a rank that trains no SAE only forwards)
    data::Corpus heldout_corpus(opt.corpus, data::Split::Heldout);
    WindowStream heldout_windows(heldout_corpus, *tok, store.windows);
    heldout = dmodel ? collect_heldout(*dmodel, heldout_windows, point, my_layers,
                                       opt.heldout_tokens, special)
                     : collect_heldout(*model, heldout_windows, point, my_layers,
                                       opt.heldout_tokens, special);
  }
  if (!my_layers.empty() && heldout.n == 0)
    std::fprintf(stderr, "warning: no held-out tokens (corpus.holdout_every = %lld)\n",
                 (long long)opt.corpus.holdout_every);

  // Resume state: the step every SAE has reached and where the corpus stood.
  fs::create_directories(work);
  // One job per folder (rank 0 for all: the folder is one every rank sees), from its first
  // write on: a second process on it stops here.
  std::optional<FolderLock> folder_lock;
  if (lead) folder_lock.emplace((work / ".lock").string(), "sae release");
  int64_t corpus_pos = 0, state_step = 0;
  if (opt.resume && fs::exists(state_path)) {
    json st = json::parse(read_json_file(state_path.string()).dump());
    if (st.value("version", 0) != kStateVersion)
      fail(state_path.string(), "version", "unsupported release state version");
    corpus_pos = st.at(from_cache ? "cache_next_shard" : "corpus_next_document").get<int64_t>();
    state_step = st.at("step").get<int64_t>();
    for (Job& j : jobs)  // set aside before: they stay so (the data they would need went by)
      if (st.contains("failed") && st["failed"].contains(j.id())) {
        const json& f = st["failed"][j.id()];
        j.failed = failure_record(f.at("step"), f.at("rollbacks"), f.at("last_checkpoint_step"),
                                  f.at("message"));
      }
  }
  // The rows: this rank's share of the corpus through the model, or of the cache's shards.
  std::optional<data::Corpus> corpus;
  std::optional<WindowStream> windows;
  std::optional<CacheRows> cache_rows;
  std::optional<ActivationStore> acts_store;
  const int64_t fill_rows = store.prompts_per_forward * store.windows.context_size;
  if (from_cache) {
    std::vector<int64_t> shards;  // every N-th training shard from where this rank stood
    for (int64_t i = rank; i < cache_train_shards; i += n_ranks)
      if (i >= corpus_pos) shards.push_back(i);
    cache_rows.emplace(*cache, layers, shards);
    acts_store.emplace(
        [&](const std::vector<float*>& dst, int64_t n) { return cache_rows->read(dst, n); },
        fill_rows, d, layers.size(), store);
  } else {
    corpus.emplace(opt.corpus, data::Split::Train);
    if (n_ranks > 1) corpus->take_share(rank, n_ranks);
    corpus->seek(corpus_pos);
    windows.emplace(*corpus, *tok, store.windows);
    if (dmodel)
      acts_store.emplace(*dmodel, *windows, point, layers, store, special, store_on_host);
    else
      acts_store.emplace(*model, *windows, point, layers, store, special);
  }
  ActivationStore& acts = *acts_store;
  acts.track_position(
      [&]() -> int64_t { return from_cache ? cache_rows->next_shard() : corpus->next_document(); });
  const std::string data_what =
      from_cache ? cat("the activation cache ", fs::path(cache->folder).filename().string())
                 : cat(corpus->shard_paths().size(), " shard(s)");

  std::vector<std::unique_ptr<LayerSource>> sources(layers.size());
  for (size_t s = 0; s < layers.size(); ++s)
    if (my_slot[s] >= 0)
      sources[s] = std::make_unique<LayerSource>(
          d, heldout.acts[size_t(my_slot[s])], heldout.n,
          cat(opt.hook, " of layer ", layers[s], " from ", data_what));
  // local: this rank's rows of each layer's batch; batch: the whole batch of the layers this
  // rank trains (one process: the same buffers).
  std::vector<float*> ptrs(layers.size());
  // A GPU store in one process, or several GPUs with NCCL: batches stay in device memory
  // (device_view: this rank's rows; train_view: the global batch each SAE reads). Otherwise the
  // rows cross through host memory (one process on the CPU; MPI's exchange).
  const bool in_place = acts.on_device() && (n_ranks == 1 || gpu_exchange);
  std::vector<const float*> device_view, train_view;
  std::optional<dist::NcclComm> nccl;
  std::optional<DeviceRows> global_rows;  // NCCL: the global batches of this rank's layers
  std::vector<float*> global_dev(layers.size(), nullptr);
  if (gpu_exchange) {
    nccl.emplace(comm);
    size_t n_mine = 0;
    for (size_t s = 0; s < layers.size(); ++s) n_mine += my_slot[s] >= 0;
    global_rows.emplace(std::max<size_t>(n_mine, 1), global_batch, d, dmodel->stream());
    for (size_t s = 0, i = 0; s < layers.size(); ++s)
      if (my_slot[s] >= 0) global_dev[s] = global_rows->row(i++, 0);
  }
  if (lead && cuda && n_ranks > 1)
    std::fprintf(
        stderr, "release: activations between the GPUs: %s\n",
        gpu_exchange
            ? nccl->describe().c_str()
            : "through host memory over MPI (rows from a cache, no NCCL in this build, a GPU "
              "shared by ranks, an activation store in host memory, or SAECPP_NCCL=0)");
  std::vector<std::vector<float>> local(
      layers.size(), std::vector<float>(in_place ? 0 : size_t(store.batch_tokens * d)));
  std::vector<std::vector<float>> batch_all;
  if (n_ranks > 1 && !in_place)
    for (size_t s = 0; s < layers.size(); ++s)
      batch_all.emplace_back(my_slot[s] >= 0 ? size_t(global_batch * d) : 0);
  std::vector<std::vector<float>>& batch = n_ranks > 1 ? batch_all : local;
  for (size_t s = 0; s < layers.size(); ++s) ptrs[s] = local[s].data();
  // The next global batch on every rank; false on every rank when any rank's share ran out.
  auto next_batch = [&] {
    const bool ok = in_place ? acts.next_batch_view(device_view) : acts.next_batch(ptrs);
    if (n_ranks == 1) {
      train_view = device_view;
      return ok;
    }
    std::vector<double> out_of_data = {ok ? 0.0 : 1.0};
    comm.allreduce_max(out_of_data);
    if (out_of_data[0] != 0.0) return false;
    if (in_place) {
      exchange.exchange(*nccl, device_view, global_dev);
      train_view.assign(global_dev.begin(), global_dev.end());
    } else {
      exchange.exchange(local, batch_all);
    }
    return true;
  };

  // Normalisation batches, only when some SAE starts fresh and needs them.
  int64_t n_norm = 0;
  for (const Job& j : jobs)
    if (j.cfg.normalize_activations != "none" || j.cfg.b_dec_init == "mean")
      n_norm = std::max(n_norm, j.cfg.n_norm_batches);
  const bool fresh = !(opt.resume && fs::exists(state_path));
  if (n_ranks > 1) {  // every rank starts fresh, or every rank resumes
    std::vector<double> f = {fresh ? 1.0 : 0.0, fresh ? 0.0 : 1.0};
    comm.allreduce_max(f);
    if (f[0] != 0.0 && f[1] != 0.0)
      fail(work.string(), "state",
           cat("some ranks have a saved state and others not (", n_ranks,
               " ranks): the release folder must be one that every rank sees"));
  }
  if (n_norm > 0 && fresh)
    for (int64_t b = 0; b < n_norm; ++b) {
      if (!next_batch()) fail("release", "corpus", "ran out during normalisation");
      for (size_t s = 0; s < layers.size(); ++s) {
        if (!sources[s]) continue;
        auto& nb = sources[s]->norm_batches;
        if (in_place) {
          const std::vector<float> host = dmodel->to_host(train_view[s], global_batch * d);
          nb.insert(nb.end(), host.begin(), host.end());
        } else {
          nb.insert(nb.end(), batch[s].begin(), batch[s].end());
        }
      }
    }

  int64_t step = std::numeric_limits<int64_t>::max();
  // On the GPU the SAEs step one after another: one step scratch for all of them.
  const auto scratch = cuda ? train::DeviceTrainer::new_scratch() : nullptr;
  for (size_t i = 0; i < jobs.size(); ++i) {
    if (!mine(i) || !jobs[i].failed.is_null()) continue;
    Job& j = jobs[i];
    j.trainer = std::make_unique<train::Trainer>(j.cfg, *sources[size_t(j.layer_slot)],
                                                 j.variant + " " + j.hook, sae_comm);
    j.trainer->device_scratch = scratch;
    j.trainer->print_progress = false;
    j.trainer->auto_checkpoint = false;
    j.trainer->keep_host_state = false;  // on a GPU: no host copy of 50 SAEs between checkpoints
    j.trainer->begin(opt.resume);
    if (!in_place) j.x.resize(size_t(global_batch * d));
    step = std::min(step, j.trainer->step());
  }
  if (step == std::numeric_limits<int64_t>::max()) step = state_step;  // a rank with no SAE
  if (n_ranks > 1) {  // the ranks go in lockstep from the step the furthest-behind SAE is at
    std::vector<double> neg = {-double(step)};
    comm.allreduce_max(neg);
    step = int64_t(-neg[0]);
  }
  for (auto& s : sources)
    if (s) s->norm_batches = {};
  if (opt.resume && step != state_step)
    std::fprintf(stderr, "release: SAE checkpoints at step %lld, release state at %lld\n",
                 (long long)step, (long long)state_step);
  if (lead)
    std::fprintf(stderr, "release: %s at step %lld of %lld (%s %lld)\n",
                 step > 0 ? "resuming" : "starting", (long long)step, (long long)total_steps,
                 from_cache ? "cache shard" : "corpus document", (long long)corpus_pos);

  // This rank's SAEs set aside, by id: written into every state, whatever its step (an SAE set
  // aside stays so).
  auto with_failures = [&](json st) {
    st.erase("failed");
    for (const Job& j : jobs)
      if (!j.failed.is_null())  // only this rank's are set
        st["failed"][j.id()] = json::parse(j.failed.dump());
    return st;
  };
  auto state_now = [&] {
    json st = {{"version", kStateVersion}, {"step", step}};
    // Where the rows not yet shuffled in began (activation_store.h): the same with and without
    // the fill ahead.
    st[from_cache ? "cache_next_shard" : "corpus_next_document"] = acts.checkpoint_position();
    return with_failures(st);
  };
  auto write_state = [&] { write_file_atomic(state_path.string(), state_now().dump(2)); };
  // The progress line and each checkpoint as JSON records in .work/progress.jsonl (rank 0; a
  // resumed job appends): a long job's throughput and where its time went, for plotting.
  auto log_record = [&](const ojson& record) {
    if (!lead) return;
    {
      std::ofstream f(work / "progress.jsonl", std::ios::app);
      f << record.dump() << "\n";
    }
    if (opt.on_record) opt.on_record(record);
  };
  const int64_t ckpt_every = jobs.front().cfg.checkpoint_every_steps;
  double ckpt_seconds = 0, last_ckpt = now_seconds();
  int64_t last_ckpt_step = -1;
  auto checkpoint = [&] {                // every SAE first: the state never points past a saved SAE
    if (last_ckpt_step == step) return;  // saved at this step already (a stop after a cadence)
    last_ckpt_step = step;
    const double t0 = now_seconds();
    int64_t bytes = 0;
    for (Job& j : jobs) {
      if (!j.trainer || j.trainer->checkpoint_step() == j.trainer->step()) continue;
      j.trainer->save_checkpoint();
      std::error_code ec;
      const auto size =
          fs::file_size(fs::path(j.cfg.output_dir) / "checkpoint" / "state.safetensors", ec);
      if (!ec) bytes += int64_t(size);
    }
    write_state();
    last_ckpt = now_seconds();
    ckpt_seconds += last_ckpt - t0;
    log_record({{"checkpoint", step}, {"bytes", bytes}, {"seconds", last_ckpt - t0}});
    if (lead)
      std::fprintf(stderr, "release: checkpoint at step %lld: %s in %.1f s%s\n", (long long)step,
                   fmt_bytes(double(bytes)).c_str(), last_ckpt - t0,
                   n_ranks > 1 ? " (this rank's SAEs)" : "");
  };
  // A checkpoint on the release's clock (rank 0's for every rank), else on the step cadence.
  auto checkpoint_due = [&] {
    if (opt.checkpoint_minutes <= 0) return ckpt_every > 0 && step % ckpt_every == 0;
    return train::clock_due(opt.checkpoint_minutes, last_ckpt, &comm);
  };
  // One process: a checkpoint is a round in which each SAE's state is taken between steps (a
  // copy, or the pull from the GPU) and written on the writer's thread while the steps go on;
  // the release state — the data position at the round's first step — is written once every
  // SAE of the round is. The states wait for the disk in host memory, --checkpoint-snapshots
  // of them (default: 1 GiB's worth, at least 2 — the disk stays busy, and at the seed's shape
  // the host holds ~2.4 GB; small SAEs are all taken at the round's first step). A kill
  // mid-round leaves some SAEs' checkpoints ahead of the state, which the resume steps from
  // their own step (as after a kill mid-checkpoint). Several ranks: every SAE at once between
  // steps (checkpoint(), above).
  std::optional<train::CheckpointWriter> writer;
  if (n_ranks == 1) writer.emplace(writer_budget);
  // An SAE that diverges rolls back to its last checkpoint (train::Trainer::roll_back), which
  // must be on disk first; the other SAEs go on.
  for (Job& j : jobs)
    if (j.trainer && writer)
      j.trainer->flush_checkpoints = [&] {
        const double t0 = now_seconds();
        writer->wait();
        ckpt_seconds += now_seconds() - t0;
      };
  struct Round {
    int64_t step = 0, last_step = 0, bytes = 0;
    int64_t taken = 0, already = 0;  // SAEs taken; SAEs the last round took at this very step
    json state;                      // the release state at `step`, written when the round is
    size_t next = 0;                 // the next job to take
    double t0 = 0, write_start = 0;
  };
  std::optional<Round> round;
  // Takes the states the writer has room for; once all are written, the state (returns true).
  auto advance_round = [&] {
    const double t0 = now_seconds();
    for (; round->next < jobs.size(); ++round->next) {
      Job& j = jobs[round->next];
      if (!j.trainer) continue;
      if (j.trainer->checkpoint_step() == j.trainer->step()) {
        ++round->already;  // the last round, finished at this round's step, took it here
        continue;
      }
      if (!writer->has_room(train::Trainer::planned_checkpoint_bytes(j.cfg, d))) break;
      train::CheckpointData c = j.trainer->checkpoint_data(writer->take_spare());
      ++round->taken;
      round->bytes += c.bytes();
      round->last_step = std::max(round->last_step, c.step);
      writer->submit(std::move(c));
    }
    ckpt_seconds += now_seconds() - t0;
    if (round->next < jobs.size() || !writer->idle()) return false;
    write_file_atomic(state_path.string(), with_failures(round->state).dump(2));
    const double written = now_seconds() - round->t0;
    const double paused = ckpt_seconds - round->write_start;
    if (round->last_step == round->step) last_ckpt_step = round->step;  // every SAE at its step
    log_record({{"checkpoint", round->step},
                {"saes", round->taken},
                {"saes_already_saved", round->already},
                {"bytes", round->bytes},
                {"seconds", written},
                {"paused_s", paused},
                {"last_sae_step", round->last_step}});
    std::fprintf(stderr,
                 "release: checkpoint at step %lld: %lld SAE%s, %s written in %.1f s beside the "
                 "steps (steps paused %.1f s%s%s)\n",
                 (long long)round->step, (long long)round->taken, round->taken == 1 ? "" : "s",
                 fmt_bytes(double(round->bytes)).c_str(), written, paused,
                 round->last_step > round->step
                     ? cat("; SAEs taken at steps ", round->step, "-", round->last_step).c_str()
                     : "",
                 round->already > 0
                     ? cat("; ", round->already, " saved at this step by the last round").c_str()
                     : "");
    round.reset();
    return true;
  };
  // The checkpoint the cadence asks for: a round (the last one finished first, waiting for the
  // disk if it is slower than the cadence), or every SAE at once.
  auto start_checkpoint = [&] {
    if (!writer) return checkpoint();
    while (round && !advance_round()) {
      const double t0 = now_seconds();
      writer->wait();
      ckpt_seconds += now_seconds() - t0;
    }
    round.emplace();
    round->step = round->last_step = step;
    round->state = state_now();
    round->t0 = last_ckpt = now_seconds();
    round->write_start = ckpt_seconds;
    advance_round();
  };
  // Before anything else writes the SAEs' folders (a stop, the final phase): the round's
  // snapshots written and its state too (the SAEs not yet taken keep their last checkpoint).
  auto settle_round = [&] {
    if (!round) return;
    const double t0 = now_seconds();
    writer->wait();
    ckpt_seconds += now_seconds() - t0;
    if (round->next >= jobs.size()) {
      advance_round();
    } else {
      round.reset();  // a partial round: the state stays at the last whole checkpoint
    }
  };
  auto eval_seconds = [&] {
    double s = 0;
    for (const Job& j : jobs)
      if (j.trainer) s += j.trainer->eval_seconds();
    return s;
  };
  // The GPU memory in use (the whole device, CUDA contexts included), sampled after each step.
  auto gpu_in_use = [] {
    const CudaMemory m = cuda_memory();
    return int64_t(m.total - m.free);
  };
  int64_t gpu_peak = cuda ? gpu_in_use() : 0;
  const double t_start = now_seconds(), t_train = t_start;
  const int64_t step_start = step;
  double sae_seconds = 0, fwd_start = acts.forward_seconds(), wait_start = acts.wait_seconds();
  const double eval_start = eval_seconds();
  // The next fill's rows come on the store's thread beside the SAE steps: the model's forwards
  // on a GPU, or a cache's shards read (on either device). A CPU model's forwards run between
  // the steps (activation_store.h: OpenBLAS's buffers). Under mpirun each rank fills its own
  // store ahead; the exchanges stay on this thread (MPI, or NCCL on a stream of its own).
  const bool overlap = opt.overlap_forward && (cuda || from_cache);
  const char* fill_what = from_cache ? "reading the cache" : "forward";
  if (overlap) {
    acts.fill_ahead();
    if (lead)
      std::fprintf(stderr,
                   "release: %s on their own thread beside the SAE steps (--no-overlap: "
                   "between them)\n",
                   from_cache ? "the cache's shards are read" : "the model's forwards run");
  }
  // Whatever ends the steps by an error (a NaN, a diverged SAE, a damaged cache shard), the round
  // taken before it stays good: the writer writes the states it holds as it goes, and here the
  // round's release state is written when the round is whole. The error is the one reported.
  struct SettleOnError {
    std::function<void()> settle;
    int uncaught = std::uncaught_exceptions();
    ~SettleOnError() {
      if (std::uncaught_exceptions() > uncaught) try {
          settle();
        } catch (...) {
        }
    }
  } settle_on_error{settle_round};
  // The SAEs that diverged again after their rollbacks this step (training.max_rollbacks): set
  // aside, their last checkpoints kept, while any SAE of the release trains on (every rank takes
  // part: the count is the whole job's); the last one stops the release as any error does, its
  // checkpoint intact for a resume (with a lower optimizer.lr, say).
  auto set_aside = [&](const std::vector<std::pair<Job*, std::exception_ptr>>& diverged) {
    std::vector<double> n = {0.0, 0.0};  // SAEs training on; SAEs that diverged
    for (const Job& j : jobs) n[0] += j.trainer != nullptr;
    n[0] -= double(diverged.size()), n[1] = double(diverged.size());
    if (n_ranks > 1) comm.allreduce_sum(n);
    if (n[1] == 0) return;
    if (n[0] == 0) {
      if (!diverged.empty()) std::rethrow_exception(diverged.front().second);
      fail("release", "saes",
           "the last SAE training diverged on another rank (its error is said there): every SAE "
           "of the release has diverged");
    }
    ojson records = ojson::array();  // this rank's, for progress.jsonl (rank 0 writes it)
    for (const auto& [j, error] : diverged) {
      const bool says = group[size_t(j - jobs.data())].first == rank;  // once by an SAE's ranks
      try {
        std::rethrow_exception(error);
      } catch (const train::Diverged& e) {
        j->failed = failure_record(e.step, e.rollbacks, e.checkpoint_step, e.cause);
        if (says)
          std::fprintf(stderr,
                       "release: %s set aside at step %lld: %s. The other SAEs train on; its last "
                       "checkpoint (step %lld) stays in %s, and release.json and the model card "
                       "name it\n",
                       j->id().c_str(), (long long)e.step, e.cause.c_str(),
                       (long long)e.checkpoint_step, j->cfg.output_dir.c_str());
      }
      ojson record = {{"sae", j->id()}};
      record.update(j->failed);
      if (says) records.push_back({{"set_aside", record}});
      j->trainer.reset();  // its memory (on a GPU, the device's) back
      std::vector<float>().swap(j->x);
    }
    // Every rank's records, in rank order (a collective: every rank knows one was set aside).
    const std::vector<std::string> all = n_ranks > 1 ? dist::allgather_strings(comm, records.dump())
                                                     : std::vector<std::string>{records.dump()};
    for (const std::string& r : all)
      for (const ojson& record : ojson::parse(r)) log_record(record);
  };
  while (step < total_steps) {
    bool stop_now = (stop && stop->load()) || (opt.stop_at_step > 0 && step >= opt.stop_at_step);
    if (n_ranks > 1) {  // a signal to one rank stops every rank at the same step
      std::vector<double> any = {stop_now ? 1.0 : 0.0};
      comm.allreduce_max(any);
      stop_now = any[0] != 0.0;
    }
    if (stop_now) {
      settle_round();
      checkpoint();
      if (lead)
        std::fprintf(stderr, "release: stopped at step %lld; state saved, rerun with --resume\n",
                     (long long)step);
      return {};
    }
    if (!next_batch()) {
      if (lead)
        std::fprintf(stderr, "release: the corpus ran out at step %lld of %lld; finishing early\n",
                     (long long)step, (long long)total_steps);
      break;
    }
    const double t0 = now_seconds();
    std::vector<std::pair<Job*, std::exception_ptr>> diverged;
    for (Job& j : jobs) {
      if (!j.trainer || j.trainer->step() > step)
        continue;  // another rank's (or set aside), or ahead after a kill mid-checkpoint
      try {
        if (in_place) {
          j.trainer->train_step_on_device(train_view[size_t(j.layer_slot)]);
          continue;
        }
        std::copy(batch[size_t(j.layer_slot)].begin(), batch[size_t(j.layer_slot)].end(),
                  j.x.begin());
        j.trainer->train_step(j.x.data());
      } catch (const train::Diverged& e) {
        if (e.rollbacks == 0) throw;  // it could not roll back at all: the release stops
        diverged.push_back({&j, std::current_exception()});
      }
    }
    if (!diverged.empty() || n_ranks > 1) set_aside(diverged);
    sae_seconds += now_seconds() - t0;
    ++step;
    if (cuda) gpu_peak = std::max(gpu_peak, gpu_in_use());
    if (step % opt.log_every_steps == 0 || step == total_steps) {
      const double el = now_seconds() - t_start;
      const double fwd = acts.forward_seconds() - fwd_start;
      const double waited = acts.wait_seconds() - wait_start;
      const double evals = eval_seconds() - eval_start;  // within the SAEs' time
      const double rate = double((step - step_start) * global_batch) / std::max(el, 1e-9);
      // L0 and EV summed over the SAEs training (once each), the divergences rolled back and
      // the SAEs set aside.
      std::vector<double> sums = {0.0, 0.0, 0.0, 0.0, 0.0};
      for (size_t i = 0; i < jobs.size(); ++i) {
        const Job& j = jobs[i];
        if (j.trainer && j.trainer->lead())
          sums[0] += j.trainer->last_l0(), sums[1] += j.trainer->last_ev(),
              sums[2] += double(j.trainer->rollbacks().size()), sums[3] += 1;
        sums[4] += !j.failed.is_null() && group[i].first == rank;  // set on its ranks only
      }
      comm.allreduce_sum(sums);
      const double training = std::max(sums[3], 1.0);
      const double l0 = sums[0] / training, ev = sums[1] / training;
      const int64_t rollbacks = int64_t(sums[2]), set_aside_n = int64_t(sums[4]);
      // With the overlap, the forward's share is of its own thread's time; the SAEs waited
      // for it only `waited` of that (the rest ran under the steps). This rank's (the lead's).
      const std::string upkeep =
          cat(", evaluation ", pct(evals, el), ", checkpoints ", pct(ckpt_seconds, el));
      const std::string split =
          overlap
              ? cat(fill_what, " ", pct(fwd, el), " beside the SAE steps, ",
                    pct(sae_seconds - evals, el), " SAE steps, ", pct(waited, el),
                    " waiting for it", upkeep)
              : cat(fill_what, " ", pct(fwd, el), ", SAEs ", pct(sae_seconds - evals, el), upkeep);
      ojson record = {{"step", step},
                      {"tokens", step * global_batch},
                      {"tokens_per_s", rate},
                      {"seconds", el},
                      {"from_step", step_start},
                      {"forward_s", fwd},
                      {"sae_steps_s", sae_seconds - evals},
                      {"evaluation_s", evals},
                      {"checkpoints_s", ckpt_seconds},
                      {"mean_l0", l0},
                      {"mean_ev", ev},
                      {"rss_bytes", resident_bytes()}};
      if (overlap) record["waited_for_forward_s"] = waited;
      if (rollbacks > 0) record["rollbacks"] = rollbacks;
      if (set_aside_n > 0) record["saes_set_aside"] = set_aside_n;
      if (cuda) record["gpu_peak_bytes"] = gpu_peak;
      log_record(record);
      if (lead)
        std::fprintf(stderr,
                     "release: step %lld/%lld  tok %lld  %.0f tok/s  (%s)  "
                     "mean L0 %.2f  mean EV %.4f%s%s  RSS %s  ETA %.0f s\n",
                     (long long)step, (long long)total_steps, (long long)(step * global_batch),
                     rate, split.c_str(), l0, ev,
                     rollbacks > 0 ? cat("  rollbacks ", rollbacks).c_str() : "",
                     set_aside_n > 0 ? cat("  set aside ", set_aside_n).c_str() : "",
                     fmt_bytes(double(resident_bytes())).c_str(),
                     double(total_steps - step) * global_batch / std::max(rate, 1e-9));
    }
    if (round) advance_round();
    if (step < total_steps && checkpoint_due()) start_checkpoint();
  }
  settle_round();
  const double ckpt_written = writer ? writer->write_seconds() : 0.0;
  for (Job& j : jobs)  // no step is left to roll back
    if (j.trainer) j.trainer->flush_checkpoints = nullptr;
  writer.reset();  // its spare states' memory too

  // Final evaluation, the CE-loss score, then the release folder; the model is ours again.
  acts.stop_filling();
  const double t_final = now_seconds(), train_evals = eval_seconds() - eval_start;
  std::vector<std::vector<int32_t>> ce_windows(
      heldout.windows.begin(),
      heldout.windows.begin() + std::min<int64_t>(opt.ce_windows, int64_t(heldout.windows.size())));
  ojson summary = ojson::object(), my_results = ojson::array();
  for (size_t i = 0; i < jobs.size(); ++i) {
    Job& j = jobs[i];
    if (!j.failed.is_null()) {  // set aside: no SAE folder, said in its place (by its first rank)
      if (group[i].first != rank) continue;
      ojson failed = j.failed;
      failed["checkpoint"] = (fs::path(".work") / j.variant / j.hook / "checkpoint").string();
      j.result = {
          {"layer", j.layer}, {"sae_id", j.id()}, {"width", j.cfg.spec.d_sae}, {"failed", failed}};
      my_results.push_back({{"variant", j.variant}, {"hook", j.hook}, {"result", j.result}});
      continue;
    }
    if (!j.trainer) continue;  // another rank's
    j.trainer->finish();
    if (!j.trainer->lead()) continue;  // data parallel: its group's first rank reports it
    const train::EvalResult& r = j.trainer->final_eval();
    j.result = {{"layer", j.layer},
                {"sae_id", j.variant + "/" + j.hook},
                {"width", j.cfg.spec.d_sae},
                {"l0", r.metrics.l0},
                {"explained_variance", r.metrics.explained_variance},
                {"explained_variance_legacy", r.metrics.explained_variance_legacy},
                {"mse", r.metrics.mse},
                {"dead_latents", r.metrics.dead_latents},
                {"level_explained_variance", r.level_explained_variance},
                {"heldout_tokens", r.metrics.n_tokens},
                {"training_tokens", j.trainer->step() * j.cfg.batch_size}};
    if (!j.trainer->rollbacks().empty()) {  // divergences survived: the batches skipped
      ojson rollbacks = ojson::array();
      for (const auto& b : j.trainer->rollbacks())
        rollbacks.push_back({{"step", b.step}, {"to_step", b.to_step}});
      j.result["rollbacks"] = rollbacks;
      j.result["skipped_tokens"] = j.trainer->skipped_steps() * j.cfg.batch_size;
    }
    // Resumed with other settings: the recipe above is the last run's; from which step each
    // change held.
    if (!j.trainer->config_changes().empty())
      j.result["config_changes"] = ojson::parse(j.trainer->config_changes().dump());
    if (!ce_windows.empty()) {
      LmScore sc;
      if (dmodel) {  // the SAE made on the GPU: its host copy went with finish()'s checkpoint
        sc = lm_score(*dmodel, *j.trainer->device_inference_sae(), point, j.layer, ce_windows);
        gpu_peak = std::max(gpu_peak, gpu_in_use());
      } else {
        sc = lm_score(*model, j.trainer->inference_sae(), point, j.layer, ce_windows);
      }
      j.result["ce_loss_score"] = sc.ce_loss_score;
      j.result["lm_score"] = ojson::parse(sc.to_json().dump());
    }
    // The SAE folder, written whole by finish(), moves into place (one rename, no copy: 600 MB
    // per SAE at the release's width).
    const fs::path dst = out / j.variant / j.hook;
    std::error_code ec;
    fs::create_directories(dst.parent_path());
    fs::remove_all(dst, ec);
    fs::rename(fs::path(j.cfg.output_dir) / "sae", dst);
    my_results.push_back({{"variant", j.variant}, {"hook", j.hook}, {"result", j.result}});
  }
  // Every rank's results to rank 0, which writes release.json and the model card.
  for (const std::string& part : dist::allgather_strings(comm, my_results.dump()))
    for (const auto& r : ojson::parse(part))
      summary[r["variant"].get<std::string>()][r["hook"].get<std::string>()] = r["result"];
  // In job order (variant, then layer), whichever rank trained each.
  ojson ordered = ojson::object();
  for (const Job& j : jobs) ordered[j.variant][j.hook] = summary[j.variant][j.hook];
  summary = ordered;
  std::vector<double> forwarded = {double(from_cache ? 0 : acts.tokens_forwarded())};
  comm.allreduce_sum(forwarded);
  const int64_t tokens = step * global_batch;
  // How the SAEs were trained: what must be equal for groups of layers to merge (release_merge.h)
  // and everything the model card says.
  ojson variants = ojson::object();
  for (const Job& j : jobs)
    if (!variants.contains(j.variant))
      variants[j.variant] = {
          {"preset", variant_preset(j.variant)}, {"level_losses", j.level_losses},
          {"d_sae", j.cfg.spec.d_sae},           {"k", j.cfg.spec.k},
          {"widths", j.cfg.spec.widths},         {"config", ojson::parse(j.recipe.dump())}};
  ojson recipe = {{"sae_cpp_version", SAECPP_VERSION},
                  {"model_name", names.model_name},
                  {"model", names.model_id},
                  {"hook", opt.hook},
                  {"dataset", names.dataset},
                  {"corpus", names.corpus},
                  {"context_size", store.windows.context_size},
                  {"packed", opt.store.windows.concat},
                  {"training_tokens", tokens},
                  {"batch_size", global_batch},
                  {"buffer_tokens", acts.buffer_tokens()},
                  {"heldout_tokens", opt.heldout_tokens},
                  {"ce_windows", opt.ce_windows},
                  {"variants", variants}};
  // The model multiplied in bf16 gives other activations: a recipe of its own (release_merge.h
  // refuses to merge it with an f32 one). Recorded only when set, so older recipes still match.
  // A GPU forward in bf16 multiplies in bf16 too.
  if (opt.bf16_matmul || (dmodel && opt.precision == "bf16")) recipe["model_bf16_matmul"] = true;
  ojson release = {{"release", opt.release_name},
                   {"model", names.model_id},
                   {"hook", opt.hook},
                   {"layers", layers},
                   {"variants", opt.variants},
                   {"training_tokens", tokens},
                   {"context_size", store.windows.context_size},
                   {"corpus", names.corpus},
                   {"tokens_forwarded", int64_t(forwarded[0])},
                   {"recipe", recipe},
                   {"results", summary}};
  if (n_ranks > 1) release["ranks"] = n_ranks;
  if (cuda) release["device"] = {{"gpu", cuda_device_description()}, {"forward", opt.precision}};
  if (from_cache)  // where the activations came from, and which of them were held out
    release["from_cache"] = {{"shards", cache->shards},
                             {"shard_tokens", cache->shard_tokens},
                             {"trained_shards", cache_train_shards},
                             {"heldout_shards", cache_heldout_shards}};
  if (lead) {
    write_file_atomic((out / "release.json").string(), release.dump(2) + "\n");
    write_file_atomic((out / "README.md").string(), model_card(release));
  }
  write_state();  // finish() saved every SAE's final checkpoint
  const double t_end = now_seconds();
  const std::vector<std::string> failed = set_aside_in(summary);  // every rank's
  const size_t written = jobs.size() - failed.size();
  if (lead && !failed.empty()) {
    std::string ids;
    for (const std::string& id : failed) ids += (ids.empty() ? "" : ", ") + id;
    std::fprintf(stderr,
                 "release: %zu of %zu SAEs set aside (diverged again after their rollbacks, "
                 "not in the release; release.json says where each stopped): %s\n",
                 failed.size(), jobs.size(), ids.c_str());
  }
  if (lead)
    std::fprintf(
        stderr,
        "release: %zu SAE%s written to %s (model card README.md, release.json); peak RSS "
        "%s%s\n"
        "release: time: model load %.1f s, held-out activations and setup %.1f s, training %.1f s "
        "(%s %.1f s%s, SAE steps %.1f s, evaluation %.1f s, checkpoints %.1f s%s), "
        "final evaluation and saving %.1f s\n",
        written, written == 1 ? "" : "s", out.string().c_str(),
        fmt_bytes(double(peak_resident_bytes())).c_str(),
        // On a GPU the plan is the device's (below); the host holds the model until it is
        // uploaded, then the checkpoint writer's SAE states (--checkpoint-snapshots, + 1).
        cuda ? " on the host" : cat(" against the plan's ", fmt_bytes(plan_bytes)).c_str(),
        t_heldout - t_load, t_train - t_heldout, t_final - t_train,
        from_cache ? "reading the cache" : "model forward", acts.forward_seconds(),
        overlap
            ? cat(" beside the steps, which waited ", one_decimal(acts.wait_seconds()), " s for it")
                  .c_str()
            : "",
        sae_seconds - train_evals, train_evals, ckpt_seconds,
        ckpt_written > 0
            ? cat(" (written in ", one_decimal(ckpt_written), " s beside the steps)").c_str()
            : "",
        t_end - t_final);
  if (cuda) {
    const std::string line =
        cat("GPU memory: peak ", fmt_bytes(double(gpu_peak)),
            " in use on the device (CUDA contexts included) against the plan's ",
            fmt_bytes(double(gpu_plan.total())));
    const auto lines = dist::allgather_strings(comm, line);  // every rank's GPU, in rank order
    if (lead)
      for (size_t r = 0; r < lines.size(); ++r)
        std::fprintf(stderr, "release: %s%s\n", n_ranks > 1 ? cat("rank ", r, ": ").c_str() : "",
                     lines[r].c_str());
  }
  return {.finished = true, .set_aside = failed, .plan = {}};
}

}  // namespace sae::pipeline

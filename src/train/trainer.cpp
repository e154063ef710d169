#include "train/trainer.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <optional>
#include <tuple>

#include "core/clock.h"
#include "core/device.h"
#include "core/error.h"
#include "core/finite.h"
#include "core/memory.h"
#include "io/atomic_file.h"
#include "io/folder_lock.h"
#include "io/json_file.h"
#include "io/safetensors.h"
#include "ops/gemm.h"
#include "ops/gemm_bf16.h"
#include "ops/sparse_decode.h"
#include "sae/device_sae.h"
#include "sae/save.h"
#include "train/checkpoint_writer.h"
#include "train/latent_gather.h"

namespace sae::train {

namespace fs = std::filesystem;
using json = nlohmann::json;

namespace {

std::string fmt_duration(double s) {
  if (!(s >= 0) || s > 1e9) return "?";
  const int64_t t = int64_t(s + 0.5);
  char buf[32];
  if (t >= 3600)
    std::snprintf(buf, sizeof buf, "%lldh%02lldm", (long long)(t / 3600), (long long)(t / 60 % 60));
  else
    std::snprintf(buf, sizeof buf, "%lldm%02llds", (long long)(t / 60), (long long)(t % 60));
  return buf;
}

std::string fmt_count(double n) {
  char buf[32];
  if (n >= 1e9)
    std::snprintf(buf, sizeof buf, "%.2fB", n / 1e9);
  else if (n >= 1e6)
    std::snprintf(buf, sizeof buf, "%.2fM", n / 1e6);
  else if (n >= 1e3)
    std::snprintf(buf, sizeof buf, "%.1fk", n / 1e3);
  else
    std::snprintf(buf, sizeof buf, "%.0f", n);
  return buf;
}

constexpr int kCheckpointVersion = 1;

}  // namespace

nlohmann::ordered_json EvalResult::to_json() const {
  auto j = metrics.to_json(false);
  j.erase("log10_density_histogram");
  j["level_explained_variance"] = level_explained_variance;
  return j;
}

double sum_sq_deviation(const float* x, int64_t n, int64_t d) {
  std::vector<double> mean(size_t(d), 0.0);
  for (int64_t t = 0; t < n; ++t)
    for (int64_t c = 0; c < d; ++c) mean[size_t(c)] += x[t * d + c] / double(n);
  double total = 0;
  for (int64_t t = 0; t < n; ++t)
    for (int64_t c = 0; c < d; ++c)
      total += (x[t * d + c] - mean[size_t(c)]) * (x[t * d + c] - mean[size_t(c)]);
  return total;
}

EvalResult evaluate(const Sae& sae, const std::vector<int64_t>& widths, const float* x, int64_t n) {
  EvalResult r;
  const int64_t d = sae.cfg.d_in;
  std::span<const float> xs(x, size_t(n * d));
  SparseCodes codes = sae.encode(xs, n);
  std::vector<float> x_hat = sae.decode(codes);
  MetricsAccumulator acc(d, sae.cfg.d_sae);
  acc.add_batch(xs, x_hat, codes);
  r.metrics = acc.finish();
  // Per level: decode with the prefix [0, width) of each token's (index-sorted) codes.
  const double total = sum_sq_deviation(x, n, d);
  for (int64_t w : widths) {
    std::vector<int64_t> offsets(size_t(n + 1), 0);
    std::vector<int32_t> idx;
    std::vector<float> val;
    for (int64_t t = 0; t < n; ++t) {
      for (int64_t e = codes.offsets[size_t(t)];
           e < codes.offsets[size_t(t + 1)] && codes.indices[size_t(e)] < w; ++e)
        idx.push_back(codes.indices[size_t(e)]), val.push_back(codes.values[size_t(e)]);
      offsets[size_t(t + 1)] = int64_t(idx.size());
    }
    std::vector<float> part(size_t(n * d));
    ops::sparse_decode(n, offsets.data(), idx.data(), val.data(), sae.W_dec.data(), d,
                       sae.b_dec.data(), part.data());
    double resid = 0;
    for (int64_t i = 0; i < n * d; ++i)
      resid += double(x[i] - part[size_t(i)]) * (x[i] - part[size_t(i)]);
    r.level_explained_variance.push_back(total > 0 ? 1.0 - resid / total : 0.0);
  }
  return r;
}

EvalResult evaluate(DeviceSae& sae, const std::vector<int64_t>& widths, const float* x, int64_t n,
                    double total_sq_deviation) {
  EvalResult r;
  const int64_t d = sae.cfg().d_in;
  std::span<const float> xs(x, size_t(n * d));
  std::vector<float> x_hat;
  std::vector<double> level_sq_error;
  const SparseCodes codes = sae.encode_decode(xs, n, x_hat, widths, level_sq_error);
  MetricsAccumulator acc(d, sae.cfg().d_sae);
  acc.add_batch(xs, x_hat, codes);
  r.metrics = acc.finish();
  for (double e : level_sq_error)
    r.level_explained_variance.push_back(total_sq_deviation > 0 ? 1.0 - e / total_sq_deviation
                                                                : 0.0);
  return r;
}

Trainer::Trainer(TrainConfig cfg, data::ActivationSource& source, std::string label,
                 dist::Comm* comm, Parallel parallel)
    : cfg_(std::move(cfg)),
      source_(source),
      label_(std::move(label)),
      comm_(comm),
      shard_{parallel == Parallel::Data ? comm : nullptr, cfg_.batch_size},
      latents_{parallel == Parallel::Latents ? comm : nullptr, 0},
      sae_([&] {
        // Before anything is allocated or written: a GPU run needs a GPU.
        const char* mode = parallel == Parallel::Data ? "data" : "latent";
        if (many_ranks() && cfg_.device == "cuda")
          fail("training.device", "cuda",
               cat(mode, "-parallel training over ", comm->size(),
                   " ranks runs on the CPU for now (the GPU exchange through NCCL is not built "
                   "yet): launch one process, or set training.device = cpu"));
        if (shard_.split() && cfg_.batch_size < comm->size())
          fail("training.batch_size", cat(cfg_.batch_size),
               cat("fewer rows than the ", comm->size(), " ranks to split them over"));
        if (cfg_.device == "cuda") require_device(Device::Cuda);
        if (cfg_.device != "cuda" && cfg_.precision == "tf32")
          fail("training.precision", "tf32",
               "TF32 is a GPU format: on the CPU the encoder GEMM runs in fp32 or bf16");
        TrainSpec s = cfg_.spec;
        s.d_in = source.d_in();
        s.validate("train config");
        cfg_.spec = s;
        latents_.width = s.d_sae;
        if (latents_.split() && s.d_sae < comm->size())
          fail("sae.d_sae", cat(s.d_sae),
               cat("fewer latents than the ", comm->size(), " ranks to split them over"));
        s.d_sae = latents_.count();  // latent parallel: this rank's block
        return TrainingSae(s);
      }()),
      opt_(sae_, cfg_.adam) {
  if (cfg_.device != "cuda") grads_.resize(sae_.spec.d_in, sae_.spec.d_sae);  // GPU: on the device
  ws_.bf16_encoder_gemm = cfg_.precision == "bf16";
  steps_since_fired_.assign(size_t(sae_.spec.d_sae), 0);
  window_counts_.assign(size_t(sae_.spec.d_sae), 0);
  if (shard_.split())
    update_ = std::make_unique<ShardedUpdate>(*comm, sae_.spec.d_sae, sae_.spec.d_in);
  print_progress = lead();
  n_heldout_ = source_.heldout_size(cfg_.eval_tokens);  // rank 0 evaluates
  const int64_t n_read = lead() ? n_heldout_ : 0;
  heldout_.resize(size_t(n_read * sae_.spec.d_in));
  source_.heldout(n_read, heldout_.data());
}

void Trainer::prepare_normalisation() {
  // SAELens ActivationScaler: s = sqrt(d_in) / mean ||x|| over a few batches.
  if (cfg_.normalize_activations == "none" && cfg_.b_dec_init == "zeros")
    return;  // nothing to read
  const int64_t d = sae_.spec.d_in, B = cfg_.batch_size;
  std::vector<float> x(size_t(B * d));
  double norm_sum = 0;
  std::vector<double> mean(size_t(d), 0.0);
  const int64_t nb = cfg_.n_norm_batches;
  for (int64_t b = 0; b < nb; ++b) {
    source_.train_batch(b, B, x.data());
    for (int64_t t = 0; t < B; ++t) {
      double ss = 0;
      for (int64_t c = 0; c < d; ++c)
        ss += double(x[size_t(t * d + c)]) * x[size_t(t * d + c)],
            mean[size_t(c)] += x[size_t(t * d + c)];
      norm_sum += std::sqrt(ss);
    }
  }
  input_scale_ = cfg_.normalize_activations == "expected_average_only_in"
                     ? std::sqrt(double(d)) / (norm_sum / double(nb * B))
                     : 1.0;
  if (cfg_.b_dec_init == "mean")
    for (int64_t c = 0; c < d; ++c)
      sae_.b_dec[size_t(c)] = float(mean[size_t(c)] / double(nb * B) * input_scale_);
}

std::vector<int64_t> Trainer::gather_latent_values(const std::vector<int64_t>& mine) const {
  // Blocks padded to the largest; doubles hold the counts exactly (below 2^53).
  const int n = comm_->size();
  const int64_t most = (latents_.width + n - 1) / n;
  std::vector<double> padded(size_t(most), 0.0), all(size_t(most * n));
  std::copy(mine.begin(), mine.end(), padded.begin());
  comm_->allgather(padded, all);
  std::vector<int64_t> out;
  out.reserve(size_t(latents_.width));
  for (int q = 0; q < n; ++q)
    for (int64_t i = 0; i < latents_.first(q + 1) - latents_.first(q); ++i)
      out.push_back(int64_t(all[size_t(q * most + i)]));
  return out;
}

std::optional<TrainingSae> Trainer::whole_sae() const {
  std::vector<float> W_encT = gather_latent_rows(latents_, sae_.W_encT, sae_.spec.d_in);
  std::vector<float> W_dec = gather_latent_rows(latents_, sae_.W_dec, sae_.spec.d_in);
  std::vector<float> b_enc = gather_latent_rows(latents_, sae_.b_enc, 1);
  if (!lead()) return std::nullopt;
  TrainSpec s = sae_.spec;
  s.d_sae = 1;  // not allocated whole here: the gathered arrays move in
  TrainingSae whole(s);
  whole.spec.d_sae = latents_.width;
  whole.W_encT = std::move(W_encT);
  whole.W_dec = std::move(W_dec);
  whole.b_enc = std::move(b_enc);
  whole.b_dec = sae_.b_dec;
  whole.threshold = sae_.threshold;
  return whole;
}

std::optional<Sae> Trainer::gathered_inference_sae() const {
  if (!latents_.split()) return inference_sae();
  const std::optional<TrainingSae> whole = whole_sae();
  if (!whole) return std::nullopt;
  return inference_of(*whole);
}

Sae Trainer::inference_sae() const {
  if (latents_.split())
    fail("latent parallel: the whole SAE is gathered on rank 0 only (gathered_inference_sae)");
  if (sae_.W_encT.empty())
    fail("the SAE's weights are on the GPU only (keep_host_state = false): after finish()");
  return inference_of(sae_);
}

std::unique_ptr<DeviceSae> Trainer::device_inference_sae() const {
  if (!dev_) fail("training.device", cfg_.device, "the SAE is not on a GPU");
  return dev_->inference_sae(input_scale_, cfg_.fold_decoder_norms,
                             sae_.inference_config(nlohmann::ordered_json()));
}

Sae Trainer::inference_of(const TrainingSae& sae) const {
  auto meta = cfg_.metadata;
  meta["sae_lens_training_version"] = nullptr;
  meta["saecpp_version"] = SAECPP_VERSION;
  meta["training_architecture"] = "matryoshka_batchtopk";
  meta["training_architecture_details"] =
      nlohmann::ordered_json::parse(cfg_.to_json()["loss"].dump());
  meta["training_architecture_details"]["k"] = sae_.spec.k;
  meta["training_architecture_details"]["matryoshka_widths"] = sae_.spec.widths;
  meta["training_tokens"] = step_ * cfg_.batch_size;
  return sae.to_inference(input_scale_, cfg_.fold_decoder_norms, meta);
}

std::vector<float> Trainer::log_sparsity() const {
  const std::vector<int64_t> counts = window_counts_all();
  std::vector<float> s(counts.size());
  for (size_t j = 0; j < s.size(); ++j)
    s[j] =
        float(std::log10(double(counts[j]) / double(std::max<int64_t>(window_tokens_, 1)) + 1e-10));
  return s;
}

std::vector<int64_t> Trainer::window_counts_all() const {
  if (latents_.split()) return gather_latent_values(window_counts_);
  if (!shard_.split()) return window_counts_;
  std::vector<double> sum(window_counts_.begin(), window_counts_.end());  // exact below 2^53
  shard_.comm->allreduce_sum(sum);
  return std::vector<int64_t>(sum.begin(), sum.end());
}

void Trainer::check_ranks_agree(const char* when) const {
  if (!many_ranks()) return;
  // FNV-1a over the parameters' bits and the threshold's.
  uint64_t h = 1469598103934665603ull;
  auto add = [&](const void* p, size_t bytes) {
    const auto* b = static_cast<const uint8_t*>(p);
    for (size_t i = 0; i + 8 <= bytes; i += 8) {
      uint64_t w;
      std::memcpy(&w, b + i, 8);
      h = (h ^ w) * 1099511628211ull;
    }
    for (size_t i = bytes / 8 * 8; i < bytes; ++i) h = (h ^ b[i]) * 1099511628211ull;
  };
  // Latent parallel: only what every rank holds (b_dec, the threshold) is the same.
  for (const auto* v : {&sae_.W_encT, &sae_.W_dec, &sae_.b_enc, &sae_.b_dec})
    if (!latents_.split() || v == &sae_.b_dec) add(v->data(), v->size() * sizeof(float));
  add(&sae_.threshold, sizeof sae_.threshold);
  dist::Comm& comm = *comm_;
  const std::vector<double> mine = {double(h >> 32), double(h & 0xffffffffu), double(step_)};
  std::vector<double> all(mine.size() * size_t(comm.size()));
  comm.allgather(mine, all);
  const size_t n = mine.size();
  for (int q = 1; q < comm.size(); ++q)
    if (!std::equal(all.begin(), all.begin() + ptrdiff_t(n), all.begin() + ptrdiff_t(q * n)))
      fail(cat(latents_.split() ? "latent" : "data", " parallel: rank ", q,
               " holds other parameters than rank 0 at step ", int64_t(all[size_t(q) * n + 2]),
               " (", when, "); the ranks must run the same build with the same config and data"));
}

void Trainer::append_log(const json& record) {
  if (!lead()) return;
  {
    std::ofstream out(fs::path(cfg_.output_dir) / "log.jsonl", std::ios::app);
    out << record.dump() << "\n";
  }
  if (on_record) on_record(record);
}

void Trainer::pull(bool all) {
  if (!dev_) return;
  if (all)
    dev_->download(sae_, &opt_, &steps_since_fired_, &window_counts_);
  else
    dev_->download(sae_, nullptr, nullptr, nullptr);
}

void Trainer::drop_host_state() {
  if (!dev_ || keep_host_state) return;
  for (std::vector<float>* v :
       {&sae_.W_encT, &sae_.W_dec, &opt_.v_W_encT, &opt_.v_W_dec, &opt_.m_W_encT, &opt_.m_W_dec})
    std::vector<float>().swap(*v);
}

void Trainer::eval_and_log(bool final) {
  if (n_heldout_ == 0) return;
  const double t0 = now_seconds();
  struct Clock {  // whichever way this returns
    double& total;
    double t0;
    ~Clock() { total += now_seconds() - t0; }
  } clock{eval_seconds_, t0};
  EvalResult r;
  if (dev_) {
    // One process (the constructor says so): the inference SAE is made on the GPU from the state
    // there and evaluated there, not through the host (its weights' round trip, the host's
    // to_inference and encoder GEMM: 14.4 s per SAE at the seed's shape on 2 cores,
    // docs/benchmarks.md).
    if (heldout_sq_deviation_ < 0)
      heldout_sq_deviation_ = sum_sq_deviation(heldout_.data(), n_heldout_, sae_.spec.d_in);
    r = evaluate(*device_inference_sae(), sae_.spec.widths, heldout_.data(), n_heldout_,
                 heldout_sq_deviation_);
  } else {
    if (!lead() && !latents_.split()) return;
    const std::optional<Sae> inference = gathered_inference_sae();  // latent parallel: collective
    if (!lead()) return;
    r = evaluate(*inference, sae_.spec.widths, heldout_.data(), n_heldout_);
  }
  json rec = {{"eval", json::parse(r.to_json().dump())},
              {"step", step_},
              {"tokens", step_ * cfg_.batch_size}};
  append_log(rec);
  if (final) final_eval_ = r;
  if (!print_progress) return;
  std::string levels;
  for (double ev : r.level_explained_variance)
    levels += cat(levels.empty() ? "" : " ", int(ev * 1000) / 1000.0);
  std::fprintf(stderr, "[%s] eval step %lld: L0 %.2f  EV %.4f  levels EV [%s]  dead %lld\n",
               label_.c_str(), (long long)step_, r.metrics.l0, r.metrics.explained_variance,
               levels.c_str(), (long long)r.metrics.dead_latents);
}

void Trainer::log_progress(const StepResult& r, double lr, double grad_norm) {
  const double t = now_seconds();
  const double rate =
      double(interval_steps_ * cfg_.batch_size) / std::max(t - interval_start_, 1e-9);
  const double done = double(step_ - run_start_step_);
  const double eta = (t - run_start_) / std::max(done, 1.0) * double(cfg_.total_steps() - step_);
  int64_t dead = dead_now_;
  if (!dev_) {
    dead = 0;
    for (int64_t s : steps_since_fired_) dead += s > cfg_.dead_feature_window;
    if (latents_.split()) {  // each rank counted its own latents
      std::vector<double> all = {double(dead)};
      comm_->allreduce_sum(all);
      dead = int64_t(all[0]);
    }
  }
  const double ev = batch_variance_ > 0 ? 1.0 - r.outer_sq_error / batch_variance_ : 0.0;
  last_l0_ = double(r.n_active) / double(cfg_.batch_size);
  last_ev_ = ev;
  std::string levels;
  for (double l : r.level_loss) {
    char buf[32];
    std::snprintf(buf, sizeof buf, "%s%.4g", levels.empty() ? "" : "/", l);
    levels += buf;
  }
  if (print_progress)
    std::fprintf(
        stderr,
        "[%s] step %lld/%lld  tok %s  %s tok/s  loss %.4g (levels %s, aux %.3g)  L0 %.2f  EV %.4f  "
        "dead %lld  lr %.3g  ETA %s\n",
        label_.c_str(), (long long)step_, (long long)cfg_.total_steps(),
        fmt_count(double(step_ * cfg_.batch_size)).c_str(), fmt_count(rate).c_str(), r.loss,
        levels.c_str(), r.aux_loss, double(r.n_active) / double(cfg_.batch_size), ev,
        (long long)dead, lr, fmt_duration(eta).c_str());
  append_log({{"step", step_},
              {"tokens", step_ * cfg_.batch_size},
              {"tokens_per_s", rate},
              {"loss", r.loss},
              {"level_losses", r.level_loss},
              {"aux_loss", r.aux_loss},
              {"l0", double(r.n_active) / double(cfg_.batch_size)},
              {"explained_variance_batch", ev},
              {"dead", dead},
              {"lr", lr},
              {"grad_norm", grad_norm},
              {"threshold", sae_.threshold}});
  interval_start_ = t;
  interval_steps_ = 0;
}

int64_t Trainer::planned_checkpoint_bytes(const TrainConfig& cfg, int64_t d_in) {
  const int64_t d = d_in, D = cfg.spec.d_sae;
  int64_t floats = 4 * D * d + 2 * D + 2 * d;  // W_encT, W_dec, b_enc, b_dec and their v
  if (cfg.adam.beta1 != 0.0) floats += 2 * D * d + D + d;  // and their m
  return floats * 4 + 8 + 2 * D * 8;  // + the threshold and the two per-latent counters
}

int64_t Trainer::planned_sae_bytes(const TrainConfig& cfg, int64_t d_in) {
  const int64_t d = d_in, D = cfg.spec.d_sae, elem = cfg.save_dtype == "f32" ? 4 : 2;
  return (2 * D * d + 2 * D + d) * elem + D * 4;  // W_enc, W_dec, b_enc, threshold, b_dec; sparsity
}

bool clock_due(double minutes, double since, dist::Comm* comm) {
  if (minutes <= 0) return false;
  const bool many = comm && comm->size() > 1;
  std::vector<double> due = {
      (!many || comm->rank() == 0) && now_seconds() - since >= 60 * minutes ? 1.0 : 0.0};
  if (many) comm->allreduce_max(due);
  return due[0] != 0.0;
}

bool Trainer::checkpoint_due() const {
  if (cfg_.checkpoint_every_steps > 0 && step_ % cfg_.checkpoint_every_steps == 0) return true;
  return clock_due(cfg_.checkpoint_every_minutes, checkpoint_time_, comm_);
}

int64_t CheckpointData::bytes() const {
  int64_t n = 0;
  for (const std::vector<float>* v : {&W_encT, &W_dec, &b_enc, &b_dec, &v_W_encT, &v_W_dec,
                                      &v_b_enc, &v_b_dec, &m_W_encT, &m_W_dec, &m_b_enc, &m_b_dec})
    n += int64_t(v->size()) * 4;
  return n + int64_t(steps_since_fired.size() + window_counts.size()) * 8 + 8;
}

void write_checkpoint(const CheckpointData& c) {
  const fs::path dir = fs::path(c.output_dir) / "checkpoint";
  const fs::path tmp = fs::path(c.output_dir) / "checkpoint.tmp";
  const fs::path old = fs::path(c.output_dir) / "checkpoint.old";
  std::error_code ec;
  fs::remove_all(tmp, ec);
  fs::create_directories(tmp);
  const int64_t d = c.d_in, D = c.d_sae;
  const std::vector<double> thr = {c.threshold};
  auto f = [](const std::vector<float>& v) { return std::span<const float>(v); };
  std::vector<TensorToWrite> tensors = {
      tensor_view("W_encT", f(c.W_encT), {D, d}),
      tensor_view("W_dec", f(c.W_dec), {D, d}),
      tensor_view("b_enc", f(c.b_enc), {D}),
      tensor_view("b_dec", f(c.b_dec), {d}),
      tensor_view("v_W_encT", f(c.v_W_encT), {D, d}),
      tensor_view("v_W_dec", f(c.v_W_dec), {D, d}),
      tensor_view("v_b_enc", f(c.v_b_enc), {D}),
      tensor_view("v_b_dec", f(c.v_b_dec), {d}),
      tensor_view("threshold", std::span<const double>(thr), {1}),
      tensor_view("steps_since_fired", std::span<const int64_t>(c.steps_since_fired), {D}),
      tensor_view("window_counts", std::span<const int64_t>(c.window_counts), {D})};
  if (c.has_first_moment)
    for (auto [name, m, shape] : {std::tuple{"m_W_encT", &c.m_W_encT, std::vector<int64_t>{D, d}},
                                  std::tuple{"m_W_dec", &c.m_W_dec, std::vector<int64_t>{D, d}},
                                  std::tuple{"m_b_enc", &c.m_b_enc, std::vector<int64_t>{D}},
                                  std::tuple{"m_b_dec", &c.m_b_dec, std::vector<int64_t>{d}}})
      tensors.push_back(tensor_view(name, f(*m), shape));
  write_safetensors((tmp / "state.safetensors").string(), tensors);
  write_file_atomic((tmp / "state.json").string(), c.state.dump(2));
  // Swap in: the previous checkpoint stays until the new one is complete.
  fs::remove_all(old, ec);
  if (fs::exists(dir)) fs::rename(dir, old);
  fs::rename(tmp, dir);
  fs::remove_all(old, ec);
}

void Trainer::save_checkpoint() {
  // The trainer's own arrays lent to the checkpoint and given back after the write (whichever
  // way it ends): no copy of the state.
  CheckpointData c = gather_checkpoint({}, true);
  struct GiveBack {
    Trainer& t;
    CheckpointData& c;
    ~GiveBack() {
      if (!t.lends_arrays()) return;
      TrainingSae& s = t.sae_;
      Optimizer& o = t.opt_;
      s.W_encT = std::move(c.W_encT), s.W_dec = std::move(c.W_dec);
      o.v_W_encT = std::move(c.v_W_encT), o.v_W_dec = std::move(c.v_W_dec);
      if (c.has_first_moment) o.m_W_encT = std::move(c.m_W_encT), o.m_W_dec = std::move(c.m_W_dec);
    }
  } back{*this, c};
  if (lead()) write_checkpoint(c);  // rank 0 writes the state
}

bool Trainer::lends_arrays() const {
  return lead() && !latents_.split() && !(dev_ && !keep_host_state);
}

CheckpointData Trainer::checkpoint_data(CheckpointData reuse) {
  return gather_checkpoint(std::move(reuse), false);
}

CheckpointData Trainer::gather_checkpoint(CheckpointData reuse, bool lend) {
  checkpoint_step_ = step_;
  checkpoint_time_ = now_seconds();
  // A GPU trainer that keeps no host copy pulls its state into the reused arrays, whose pages
  // are mapped already, and hands them on below.
  if (dev_ && !keep_host_state && sae_.W_encT.empty()) {
    for (auto [mine, spare] : {std::pair{&sae_.W_encT, &reuse.W_encT},
                               {&sae_.W_dec, &reuse.W_dec},
                               {&opt_.v_W_encT, &reuse.v_W_encT},
                               {&opt_.v_W_dec, &reuse.v_W_dec},
                               {&opt_.m_W_encT, &reuse.m_W_encT},
                               {&opt_.m_W_dec, &reuse.m_W_dec}})
      mine->swap(*spare);
  }
  pull(true);
  struct Drop {  // whichever way this returns, the host copy goes again
    Trainer& t;
    ~Drop() { t.drop_host_state(); }
  } drop{*this};
  if (update_) update_->gather_moments(opt_);  // each rank's moments are current in its block
  std::vector<int64_t> window_counts = window_counts_all();
  check_ranks_agree("checkpoint");
  // Latent parallel: the checkpoint is the whole SAE's, as one process writes it (so a resume
  // may use another number of ranks); each per-latent array is gathered to rank 0.
  std::optional<TrainingSae> whole;
  std::optional<Optimizer> opt_whole;
  std::vector<int64_t> steps_since_fired;
  if (latents_.split()) {
    whole = whole_sae();
    if (lead()) opt_whole.emplace(opt_);  // this block's moments, replaced by the whole's below
    const int64_t d_in = sae_.spec.d_in;
    using Moment = std::vector<float> Optimizer::*;
    for (auto [m, len] : {std::pair<Moment, int64_t>{&Optimizer::v_W_encT, d_in},
                          {&Optimizer::v_W_dec, d_in},
                          {&Optimizer::v_b_enc, 1},
                          {&Optimizer::m_W_encT, d_in},
                          {&Optimizer::m_W_dec, d_in},
                          {&Optimizer::m_b_enc, 1}})
      if (!(opt_.*m).empty()) {  // (no first moment on any rank when beta1 = 0)
        std::vector<float> all = gather_latent_rows(latents_, opt_.*m, len);
        if (lead()) (*opt_whole).*m = std::move(all);
      }
    steps_since_fired = gather_latent_values(steps_since_fired_);
  }
  if (!lead()) return CheckpointData();
  // Into the reused arrays (a copy: the trainer goes on from its own), or moved when the host
  // copy goes anyway (gathered, or a GPU trainer that keeps none) or is lent (save_checkpoint).
  CheckpointData c = std::move(reuse);
  TrainingSae& sae = whole ? *whole : sae_;
  Optimizer& opt = opt_whole ? *opt_whole : opt_;
  const bool movable = whole.has_value() || (dev_ && !keep_host_state) || lend;
  auto take = [&](std::vector<float>& dst, std::vector<float>& src) {
    if (movable)
      dst = std::move(src);
    else
      dst.assign(src.begin(), src.end());
  };
  c.output_dir = cfg_.output_dir;
  c.step = step_;
  c.d_in = sae.spec.d_in, c.d_sae = sae.spec.d_sae;
  take(c.W_encT, sae.W_encT), take(c.W_dec, sae.W_dec);
  c.b_enc.assign(sae.b_enc.begin(), sae.b_enc.end());
  c.b_dec.assign(sae.b_dec.begin(), sae.b_dec.end());
  take(c.v_W_encT, opt.v_W_encT), take(c.v_W_dec, opt.v_W_dec);
  c.v_b_enc.assign(opt.v_b_enc.begin(), opt.v_b_enc.end());
  c.v_b_dec.assign(opt.v_b_dec.begin(), opt.v_b_dec.end());
  c.has_first_moment = opt.has_first_moment();
  if (c.has_first_moment) {
    take(c.m_W_encT, opt.m_W_encT), take(c.m_W_dec, opt.m_W_dec);
    c.m_b_enc.assign(opt.m_b_enc.begin(), opt.m_b_enc.end());
    c.m_b_dec.assign(opt.m_b_dec.begin(), opt.m_b_dec.end());
  } else {
    for (std::vector<float>* m : {&c.m_W_encT, &c.m_W_dec, &c.m_b_enc, &c.m_b_dec}) m->clear();
  }
  c.threshold = sae.threshold;
  const std::vector<int64_t>& since = whole ? steps_since_fired : steps_since_fired_;
  c.steps_since_fired.assign(since.begin(), since.end());
  c.window_counts = std::move(window_counts);
  c.state = {{"version", kCheckpointVersion},     {"step", step_},
             {"tokens", step_ * cfg_.batch_size}, {"optimizer_updates", opt.t},
             {"input_scale", input_scale_},       {"window_steps", window_steps_},
             {"window_tokens", window_tokens_},   {"data_next_batch", step_},
             {"config", cfg_.to_json()}};
  for (const Rollback& b : rollbacks_)
    c.state["rollbacks"].push_back({{"step", b.step}, {"to_step", b.to_step}});
  if (!config_changes_.empty()) c.state["config_changes"] = config_changes_;
  return c;
}

bool Trainer::load_checkpoint(json* saved_config) {
  fs::path dir = fs::path(cfg_.output_dir) / "checkpoint";
  if (!fs::exists(dir / "state.json"))
    dir = fs::path(cfg_.output_dir) / "checkpoint.old";  // killed mid-swap
  if (!fs::exists(dir / "state.json")) return false;
  const std::string where = (dir / "state.json").string();
  json state = json::parse(read_json_file(where).dump());
  if (state.value("version", 0) != kCheckpointVersion)
    fail(where, "version", "unsupported checkpoint version");
  // The model and loss must be the ones this run was started with.
  const json saved = state["config"], now = cfg_.to_json();
  for (const char* sec : {"sae", "loss"})
    if (saved[sec] != now[sec])
      fail(where, cat("config.", sec), "differs from this run's config; refusing to resume");
  if (saved["training"]["batch_size"] != now["training"]["batch_size"])
    fail(where, "config.training.batch_size", "differs from this run's config; refusing to resume");
  if (saved["optimizer"]["adam_beta1"] != now["optimizer"]["adam_beta1"])  // m is not kept at 0
    fail(where, "config.optimizer.adam_beta1",
         "differs from this run's config; refusing to resume");
  // The whole SAE's state; latent parallel keeps this rank's block of each per-latent array.
  const int64_t d = sae_.spec.d_in, D = latents_.split() ? latents_.width : sae_.spec.d_sae;
  const int64_t j0 = latents_.begin(), j1 = j0 + sae_.spec.d_sae;
  auto rows = [&](std::vector<float> v, int64_t len) {
    if (!latents_.split()) return v;
    return std::vector<float>(v.begin() + j0 * len, v.begin() + j1 * len);
  };
  SafetensorsFile st((dir / "state.safetensors").string());
  // A state holding NaN or infinity (a run that diverged before each step was checked, or a
  // damaged file) would train on as NaN: refused, naming the tensor.
  auto read = [&](const char* name, std::vector<int64_t> shape) {
    std::vector<float> v = st.read_f32(name, shape);
    if (const int64_t i = first_non_finite(v); i >= 0)
      fail(st.path(), name,
           cat("element ", i, " is ", v[size_t(i)],
               ": the checkpoint holds a state that had diverged, or is damaged; this run "
               "cannot continue from it (start it again)"));
    return v;
  };
  sae_.W_encT = rows(read("W_encT", {D, d}), d);
  sae_.W_dec = rows(read("W_dec", {D, d}), d);
  sae_.b_enc = rows(read("b_enc", {D}), 1);
  sae_.b_dec = read("b_dec", {d});
  opt_.v_W_encT = rows(read("v_W_encT", {D, d}), d);
  opt_.v_W_dec = rows(read("v_W_dec", {D, d}), d);
  opt_.v_b_enc = rows(read("v_b_enc", {D}), 1);
  opt_.v_b_dec = read("v_b_dec", {d});
  if (opt_.has_first_moment()) {
    opt_.m_W_encT = rows(read("m_W_encT", {D, d}), d);
    opt_.m_W_dec = rows(read("m_W_dec", {D, d}), d);
    opt_.m_b_enc = rows(read("m_b_enc", {D}), 1);
    opt_.m_b_dec = read("m_b_dec", {d});
  }
  sae_.threshold = st.read_scalar_f64("threshold");
  if (!std::isfinite(sae_.threshold))
    fail(st.path(), "threshold",
         cat("is ", sae_.threshold,
             ": the checkpoint holds a state that "
             "had diverged; this run cannot continue from it"));
  steps_since_fired_ = st.read_i64("steps_since_fired");
  window_counts_ = st.read_i64("window_counts");
  if (int64_t(steps_since_fired_.size()) != D || int64_t(window_counts_.size()) != D)
    fail(where, "steps_since_fired", cat("does not hold ", D, " latents"));
  if (latents_.split()) {
    steps_since_fired_ =
        std::vector<int64_t>(steps_since_fired_.begin() + j0, steps_since_fired_.begin() + j1);
    window_counts_ = std::vector<int64_t>(window_counts_.begin() + j0, window_counts_.begin() + j1);
  }
  step_ = state["step"].get<int64_t>();
  opt_.t = state["optimizer_updates"].get<int64_t>();
  input_scale_ = state["input_scale"].get<double>();
  window_steps_ = state["window_steps"].get<int64_t>();
  window_tokens_ = state["window_tokens"].get<int64_t>();
  config_changes_ = state.value("config_changes", json::array());
  if (saved_config) *saved_config = saved;
  rollbacks_.clear();
  for (const json& b : state.value("rollbacks", json::array()))
    rollbacks_.push_back({b.at("step").get<int64_t>(), b.at("to_step").get<int64_t>()});
  // Data parallel: the checkpoint holds the sum over the ranks; rank 0 carries it on.
  if (shard_.split() && !lead()) std::fill(window_counts_.begin(), window_counts_.end(), 0);
  return true;
}

bool Trainer::begin(bool resume) {
  if (cfg_.threads > 0) ops::set_num_threads(cfg_.threads);
  fs::create_directories(cfg_.output_dir);
  json saved_config;
  const bool resumed = resume && load_checkpoint(&saved_config);
  if (resumed) checkpoint_step_ = step_;  // that checkpoint is this step's
  // Resumed with other settings (a lower learning rate after a divergence, more tokens): what
  // changed and from which step, in the log and in every later checkpoint.
  if (const auto changed = resumed ? train::config_changes(saved_config, cfg_.to_json())
                                   : nlohmann::ordered_json::object();
      !changed.empty()) {
    const json record = {{"step", step_}, {"changed", json::parse(changed.dump())}};
    config_changes_.push_back(record);
    append_log({{"resumed_with_changes", record}});
    std::string what;
    for (const auto& [key, c] : changed.items())
      what += cat(what.empty() ? "" : ", ", key, " ", c["from"].dump(), " -> ", c["to"].dump());
    if (lead())
      std::fprintf(stderr,
                   "[%s] resumed at step %lld with settings other than its checkpoint's: %s\n",
                   label_.c_str(), (long long)step_, what.c_str());
  }
  if (many_ranks()) {
    // Every rank must resume from the same step (one folder that all of them see).
    std::vector<double> mine = {double(resumed), double(step_)};
    std::vector<double> all(2 * size_t(comm_->size()));
    comm_->allgather(mine, all);
    for (int q = 1; q < comm_->size(); ++q)
      if (all[size_t(2 * q)] != all[0] || all[size_t(2 * q + 1)] != all[1])
        fail(
            (fs::path(cfg_.output_dir) / "checkpoint").string(), "step",
            cat("rank 0 ", all[0] != 0.0 ? cat("resumes at step ", int64_t(all[1])) : "starts",
                " but rank ", q, " ",
                all[size_t(2 * q)] != 0.0 ? cat("resumes at step ", int64_t(all[size_t(2 * q + 1)]))
                                          : "found no checkpoint",
                ": the output folder must be one that every rank sees (a shared filesystem)"));
  }
  if (!resumed) {
    sae_.init_rows(cfg_.seed, cfg_.decoder_init_norm, latents_.begin());
    prepare_normalisation();
    if (lead()) {
      write_file_atomic((fs::path(cfg_.output_dir) / "config.json").string(),
                        cfg_.to_json().dump(2) + "\n");
      std::error_code ec;
      fs::remove(fs::path(cfg_.output_dir) / "log.jsonl", ec);
    }
  }
  check_ranks_agree(resumed ? "after resuming" : "after initialisation");
  if (cfg_.device == "cuda") {
    dev_ = std::make_unique<DeviceTrainer>(sae_.spec, cfg_.adam, cfg_.batch_size, cfg_.precision,
                                           device_scratch);
    dev_->upload(sae_, opt_, steps_since_fired_, window_counts_);
    drop_host_state();
    std::fprintf(stderr, "[%s] device: %s, encoder GEMM in %s\n", label_.c_str(),
                 cuda_device_description().c_str(), cfg_.precision.c_str());
  }
  if (!dev_ && cfg_.precision == "bf16" && lead())
    std::fprintf(stderr, "[%s] encoder GEMM in bf16: %s\n", label_.c_str(),
                 ops::bf16_gemm_path().c_str());
  if (lead())
    std::fprintf(
        stderr,
        "[%s] %s from step %lld of %lld (%s tokens, batch %lld); data: %s; input scale %.4g\n",
        label_.c_str(), resumed ? "resuming" : "training", (long long)step_,
        (long long)cfg_.total_steps(), fmt_count(double(cfg_.total_tokens)).c_str(),
        (long long)cfg_.batch_size, source_.describe().c_str(), input_scale_);
  if (lead() && shard_.split())
    std::fprintf(stderr,
                 "[%s] data parallel over %d ranks (%s): each steps on %lld-%lld rows of every "
                 "batch; rank 0 writes\n",
                 label_.c_str(), shard_.comm->size(), shard_.comm->transport().c_str(),
                 (long long)(cfg_.batch_size / shard_.comm->size()),
                 (long long)((cfg_.batch_size + shard_.comm->size() - 1) / shard_.comm->size()));
  if (lead() && latents_.split())
    std::fprintf(stderr,
                 "[%s] latent parallel over %d ranks (%s): each holds %lld-%lld of the %lld "
                 "latents and steps on every row; rank 0 writes\n",
                 label_.c_str(), comm_->size(), comm_->transport().c_str(),
                 (long long)(latents_.width / comm_->size()),
                 (long long)((latents_.width + comm_->size() - 1) / comm_->size()),
                 (long long)latents_.width);
  run_start_ = interval_start_ = checkpoint_time_ = now_seconds();
  run_start_step_ = step_;
  interval_steps_ = 0;
  return resumed;
}

void Trainer::train_step_on_device(const float* device_x) {
  if (!dev_)
    fail("training.device", cfg_.device, "a batch in GPU memory needs training.device = cuda");
  dev_->set_device_batch(device_x);
  train_step(nullptr);
}

void Trainer::train_step(float* x) {
  const int64_t d = sae_.spec.d_in, B = cfg_.batch_size, total = cfg_.total_steps();
  const double lr = cfg_.lr.at(step_, total);
  const bool new_window = window_steps_ >= cfg_.feature_sampling_window;
  if (new_window) window_steps_ = window_tokens_ = 0;
  StepResult r;
  double grad_norm = 0;
  if (dev_) {
    // Scaling, the dead mask, the counters and the threshold all happen on the device.
    float* staged = dev_->host_batch();
    if (x && x != staged) std::copy(x, x + B * d, staged);
    const auto out = dev_->step(input_scale_, lr, opt_.t + 1, cfg_.dead_feature_window, new_window);
    ++opt_.t;
    r = out.result;
    grad_norm = out.grad_norm;
    sae_.threshold = out.threshold;
    dead_now_ = out.dead_after;
  } else {
    if (input_scale_ != 1.0)
      for (int64_t i = 0; i < B * d; ++i) x[i] = float(x[i] * input_scale_);
    dead_.resize(size_t(sae_.spec.d_sae));
    bool any_dead = false;
    for (size_t j = 0; j < dead_.size(); ++j) {
      dead_[j] = steps_since_fired_[j] > cfg_.dead_feature_window;
      any_dead |= dead_[j] != 0;
    }
    if (latents_.split()) {  // AuxK runs on every rank or on none (it has collectives)
      std::vector<double> any = {double(any_dead)};
      comm_->allreduce_max(any);
      any_dead = any[0] != 0.0;
    }
    if (new_window) std::fill(window_counts_.begin(), window_counts_.end(), 0);
    grads_.clear();
    const int64_t first = shard_.begin(B), rows = shard_.end(B) - first;
    r = forward_backward(sae_, x + first * d, rows, any_dead ? dead_ : std::vector<uint8_t>{},
                         grads_, ws_, shard_, latents_);
    sae_.update_threshold(r.min_selected, r.n_active > 0);
    for (size_t j = 0; j < dead_.size(); ++j)
      steps_since_fired_[j] = r.fired[j] ? 0 : steps_since_fired_[j] + 1;
    for (int32_t j : ws_.active.cols) window_counts_[size_t(j)]++;  // this rank's rows/latents
    grad_norm = update_ ? update_->step(sae_, opt_, grads_, lr)
                        : opt_.apply(sae_, grads_, lr, std::sqrt(r.grad_squared_norm));
  }
  bool diverged = !std::isfinite(r.loss) || !std::isfinite(grad_norm);
  if (many_ranks()) {  // one rank's loss (its rows, its latents) is every rank's: decided together
    std::vector<double> any = {double(diverged)};
    comm_->allreduce_max(any);
    diverged = any[0] != 0.0;
  }
  if (diverged) {
    const std::string bad = bad_batch(x);  // every rank holds the whole batch: the same answer
    if (!bad.empty() || !can_roll_back()) fail_non_finite(r, grad_norm, x, bad);
    roll_back(r, grad_norm);  // bad data is never skipped: it stops the run above
    return;
  }
  window_steps_++;
  window_tokens_ += B;
  ++step_;
  ++interval_steps_;
  if (step_ % cfg_.log_every_steps == 0 || step_ == total) {
    // Batch variance for the progress line's explained variance, of the batch as the SAE saw
    // it (scaled): on the device when the batch is there.
    batch_variance_ = (dev_ ? dev_->batch_sq_deviation() : sum_sq_deviation(x, B, d)) / double(B);
    log_progress(r, lr, grad_norm);
  }
  if (cfg_.eval_every_steps > 0 && step_ % cfg_.eval_every_steps == 0 && step_ < total)
    eval_and_log(false);
  if (writer_) report_written(false);
  // With several ranks the others take part through save_checkpoint: the same collectives,
  // and they write nothing.
  if (auto_checkpoint && step_ < total && checkpoint_due()) {
    if (writer_)
      checkpoint_beside_steps();
    else
      save_checkpoint();
  }
}

namespace {

std::string non_finite_step(const StepResult& r, double grad_norm) {
  std::string levels;
  for (double v : r.level_loss) levels += cat(levels.empty() ? "" : ", ", v);
  return cat("the loss is ", r.loss, " (levels [", levels, "], aux ", r.aux_loss,
             "), the gradient norm ", grad_norm);
}

}  // namespace

std::string Trainer::batch_name(bool device_copy) const {
  // The CPU scales the host batch in place, the GPU its own copy.
  const bool scaled = input_scale_ != 1.0 && (device_copy || !dev_);
  return cat(device_copy ? "the batch on the GPU" : "the batch",
             scaled ? cat(" (scaled by ", input_scale_, ")") : "");
}

std::string Trainer::bad_batch(const float* x) const {
  const int64_t B = cfg_.batch_size, d = sae_.spec.d_in;
  // On the host, the first bad value's place; on the GPU, the batch's squared deviation (NaN or
  // infinite exactly when a value is).
  const int64_t bad = x ? first_non_finite({x, size_t(B * d)}) : -1;
  if (bad >= 0)
    return cat(batch_name(false), " holds ", x[bad], " at row ", bad / d, ", column ", bad % d);
  if (dev_ && !std::isfinite(dev_->batch_sq_deviation()))
    return cat(batch_name(true), " holds NaN or infinity");
  return "";
}

void Trainer::fail_non_finite(const StepResult& r, double grad_norm, const float* x,
                              const std::string& bad) {
  const int64_t B = cfg_.batch_size, d = sae_.spec.d_in;
  std::string what = non_finite_step(r, grad_norm) + ": ";
  if (!bad.empty())
    what += bad + ": bad activations (a NaN or infinity in the data, or values too large for f32)";
  else if (x)
    what += cat(batch_name(false), " is finite (largest magnitude ",
                std::abs(*std::max_element(
                    x, x + B * d, [](float a, float b) { return std::abs(a) < std::abs(b); })),
                "), so the training diverged");
  else
    what += "the batch is finite, so the training diverged";
  if (bad.empty())
    what += rollbacks_.empty()
                ? " (a lower optimizer.lr, or optimizer.grad_clip, may hold it)"
                : cat(" again after ", rollbacks_.size(), " rollback",
                      rollbacks_.size() == 1 ? "" : "s",
                      " (training.max_rollbacks = ", cfg_.max_rollbacks,
                      "): a lower optimizer.lr, or optimizer.grad_clip, may hold it");
  const std::string cause = what;
  what += checkpoint_step_ >= 0
              ? cat(". Nothing of this step was saved: the checkpoint of step ", checkpoint_step_,
                    " is intact, and --resume continues from it")
              : ". Nothing of this step was saved (no checkpoint yet: run it again from the start)";
  append_log({{"error", {{"step", step_ + 1}, {"message", what}}}});  // for `sae status`
  const std::string message = cat(label_, ": step ", step_ + 1, ": ", what);
  if (!bad.empty()) throw Error(message);
  throw Diverged(message, cause, step_ + 1, int64_t(rollbacks_.size()), checkpoint_step_);
}

bool Trainer::can_roll_back() const {
  // The same answer on every rank of one SAE: they checkpoint and roll back together.
  return int64_t(rollbacks_.size()) < cfg_.max_rollbacks && checkpoint_step_ >= 0;
}

void Trainer::roll_back(const StepResult& r, double grad_norm) {
  const int64_t failed = step_ + 1, taken = checkpoint_step_;
  const double t0 = now_seconds();
  if (flush_checkpoints) flush_checkpoints();
  if (writer_) report_written(true);
  if (many_ranks()) {  // rank 0 wrote it: on disk before any rank reads it back
    std::vector<double> written = {0.0};
    comm_->allreduce_max(written);
  }
  // load_checkpoint sets the checkpoint's lists; this run's go on.
  std::vector<Rollback> before = rollbacks_;
  const json changes = config_changes_;
  const bool loaded = load_checkpoint();
  if (!loaded || step_ != taken)
    fail(label_, cat("step ", failed),
         cat(non_finite_step(r, grad_norm), ": the training diverged, and the checkpoint of step ",
             taken, " it would roll back to is not on disk (",
             (fs::path(cfg_.output_dir) / "checkpoint").string(),
             loaded ? cat(" holds step ", step_) : std::string(" holds none"), ")"));
  rollbacks_ = std::move(before);
  rollbacks_.push_back({failed, taken});
  config_changes_ = changes;
  step_ = failed;  // batches taken + 1 .. failed are skipped; the schedule goes on from here
  if (dev_) {
    dev_->upload(sae_, opt_, steps_since_fired_, window_counts_);
    drop_host_state();
  }
  dead_now_ = std::count_if(steps_since_fired_.begin(), steps_since_fired_.end(),
                            [&](int64_t s) { return s > cfg_.dead_feature_window; });
  check_ranks_agree("after a rollback");
  const std::string why = non_finite_step(r, grad_norm);
  const double seconds = now_seconds() - t0;  // the wait for the writer, the read, the upload
  append_log({{"rollback",
               {{"step", failed},
                {"to_step", taken},
                {"skipped_steps", failed - taken},
                {"rollbacks", rollbacks_.size()},
                {"seconds", seconds},
                {"why", why}}}});
  if (lead())
    std::fprintf(stderr,
                 "[%s] step %lld: %s on a finite batch: the training diverged. Rolled back to the "
                 "checkpoint of step %lld in %.1f s, batches %lld-%lld skipped (rollback %zu of "
                 "at most %lld: training.max_rollbacks)\n",
                 label_.c_str(), (long long)failed, why.c_str(), (long long)taken, seconds,
                 (long long)taken + 1, (long long)failed, rollbacks_.size(),
                 (long long)cfg_.max_rollbacks);
}

int64_t Trainer::skipped_steps() const {
  int64_t n = 0;
  for (const Rollback& b : rollbacks_) n += b.step - b.to_step;
  return n;
}

void Trainer::checkpoint_beside_steps() {
  const double t0 = now_seconds();
  report_written(true);
  CheckpointData c = checkpoint_data(writer_->take_spare());  // into the last one's arrays
  pending_ = PendingCheckpoint{step_, c.bytes(), t0, now_seconds() - t0};
  writer_->submit(std::move(c));
}

void Trainer::report_written(bool wait) {
  if (wait)
    writer_->wait();
  else if (!writer_->idle())
    return;
  if (!pending_) return;
  const PendingCheckpoint p = *pending_;
  pending_.reset();
  const double seconds = now_seconds() - p.taken_at;
  append_log(
      {{"checkpoint", p.step}, {"bytes", p.bytes}, {"seconds", seconds}, {"paused_s", p.paused}});
  if (print_progress)
    std::fprintf(stderr,
                 "[%s] checkpoint at step %lld: %s written in %.1f s beside the steps (steps "
                 "paused %.2f s)\n",
                 label_.c_str(), (long long)p.step, fmt_bytes(double(p.bytes)).c_str(), seconds,
                 p.paused);
}

void Trainer::finish() {
  pull(true);
  eval_and_log(true);
  const fs::path out = fs::path(cfg_.output_dir) / "sae";
  const std::vector<float> sparsity = log_sparsity();  // collective with several ranks
  if (lead() || latents_.split()) {
    const std::optional<Sae> inference = gathered_inference_sae();  // latent parallel: collective
    if (lead())
      save_to_disk(*inference, out.string(), cfg_.save_dtype == "bf16" ? DType::BF16 : DType::F32,
                   sparsity);
  }
  if (lead()) {
    write_file_atomic((fs::path(cfg_.output_dir) / "eval.json").string(),
                      final_eval_.to_json().dump(2) + "\n");
  }
  save_checkpoint();  // the final state, so a longer run can continue from it
  if (lead())
    std::fprintf(stderr, "[%s] done: %lld steps%s, SAE saved to %s\n", label_.c_str(),
                 (long long)step_,
                 rollbacks_.empty() ? ""
                                    : cat(" (", skipped_steps(), " skipped by ", rollbacks_.size(),
                                          " rollback", rollbacks_.size() == 1 ? "" : "s", ")")
                                          .c_str(),
                 out.string().c_str());
}

bool Trainer::run(bool resume, int64_t stop_at_step, const std::atomic<bool>* stop) {
  // One job per folder: a second process on it stops here, before it writes anything.
  std::optional<FolderLock> lock;
  if (lead()) {
    fs::create_directories(cfg_.output_dir);
    lock.emplace((fs::path(cfg_.output_dir) / ".lock").string(), "sae train");
  }
  begin(resume);
  // The checkpoints on the schedule go to a writer thread (rank 0's) while the steps go on: at
  // the seed's shape a checkpoint is 1.21 GB, 3.1 s at the development machine's disk speed,
  // and on a GPU the preset's 1000 steps take seconds. The writer keeps the written state's
  // arrays for the next one (a copy into fresh memory costs as much as the write there), so
  // the host holds one state besides the trainer's own. When that state would take more than
  // half of the memory the host has available, they are written between two steps instead,
  // from the trainer's own arrays.
  const int64_t state_bytes = planned_checkpoint_bytes(cfg_, sae_.spec.d_in);
  const int64_t available = available_host_bytes();
  const bool beside = auto_checkpoint && (available == 0 || 2 * state_bytes <= available);
  std::optional<CheckpointWriter> writer;
  if (beside && lead()) writer.emplace(2 * state_bytes);
  if (auto_checkpoint && !beside && lead())
    std::fprintf(stderr,
                 "[%s] checkpoints written between the steps: a state of %s held beside the "
                 "training would leave too little of the host's %s available\n",
                 label_.c_str(), fmt_bytes(double(state_bytes)).c_str(),
                 fmt_bytes(double(available)).c_str());
  struct Detach {  // whichever way run() ends (the writer, destroyed after, finishes its write)
    Trainer& t;
    ~Detach() { t.writer_ = nullptr, t.pending_.reset(); }
  } detach{*this};
  writer_ = writer ? &*writer : nullptr;
  auto settle = [&] {  // the checkpoint being written, on disk before anything else writes
    if (writer_) report_written(true);
  };
  const int64_t d = sae_.spec.d_in, B = cfg_.batch_size;
  std::vector<float> host_x(dev_ ? 0 : size_t(B * d));
  float* x = dev_ ? dev_->host_batch() : host_x.data();  // page-locked when on the GPU
  while (step_ < cfg_.total_steps()) {
    bool stop_now = (stop_at_step >= 0 && step_ >= stop_at_step) || (stop && stop->load()) ||
                    (should_stop && should_stop());
    if (many_ranks()) {  // a signal reaches one rank: every rank stops at the same step
      std::vector<double> any = {double(stop_now)};
      comm_->allreduce_max(any);
      stop_now = any[0] != 0.0;
    }
    if (stop_now) {
      settle();
      if (checkpoint_step_ != step_) save_checkpoint();  // else saved at this step already
      if (lead())
        std::fprintf(stderr, "[%s] stopped at step %lld; checkpoint saved, resume with --resume\n",
                     label_.c_str(), (long long)step_);
      return false;
    }
    source_.train_batch(step_, B, x);
    train_step(x);
  }
  settle();
  finish();
  return true;
}

}  // namespace sae::train

// Training-step speed at the release's shape: d_in 2304, d_sae 32768, k 40, Matryoshka widths
// 128..32768, batch 4096 — the sparse step plus Adam, with the time split by phase and the
// encoder GEMM's share. Under mpirun, data parallel: each rank steps on its rows of the batch
// and the gradients of the touched rows are all-reduced; with --parallel latents each rank
// holds a block of the latents for every row (bench/data_parallel.sh compares).
//   build/release/bench/bench_train [--d-in 2304] [--d-sae 32768] [--batch 4096] [--steps 3]
//                                   [--dead 0] [--preset gemma-2-2b-matryoshka-standard]
//                                   [--parallel data|latents] [--precision fp32|bf16]
#include <cmath>
#include <cstdio>
#include <string>

#include "bench_util.h"
#include "core/rng.h"
#include "dist/comm.h"
#include "train/data_parallel.h"
#include "train/optimizer.h"
#include "train/step.h"
#include "train/train_config.h"

using namespace sae;

int main(int argc, char** argv) {
  dist::init(&argc, &argv);
  dist::Comm& comm = dist::world();
  const bool lead = comm.rank() == 0;
  if (!lead) std::freopen("/dev/null", "w", stdout);  // rank 0 reports
  int64_t d_in = 2304, d_sae = 32768, batch = 4096, steps = 3, n_dead = 0;
  std::string preset_name = "gemma-2-2b-matryoshka-standard", parallel = "data",
              precision = "fp32";
  for (int i = 1; i + 1 < argc; i += 2) {
    std::string a = argv[i], v = argv[i + 1];
    if (a == "--d-in")
      d_in = std::stoll(v);
    else if (a == "--d-sae")
      d_sae = std::stoll(v);
    else if (a == "--batch")
      batch = std::stoll(v);
    else if (a == "--steps")
      steps = std::stoll(v);
    else if (a == "--dead")
      n_dead = std::stoll(v);
    else if (a == "--preset")
      preset_name = v;
    else if (a == "--parallel" && (v == "data" || v == "latents"))
      parallel = v;
    else if (a == "--precision" && (v == "fp32" || v == "bf16"))
      precision = v;
    else if (a == "--threads")
      ops::set_num_threads(std::stoi(v));
    else {
      std::fprintf(stderr, "unknown option %s\n", a.c_str());
      return 2;
    }
  }
  bench::print_header(argc, argv);
  const bench::MachinePeak peak = bench::print_peak();
  std::printf("ranks: %d (%s)%s\n", comm.size(), comm.transport().c_str(),
              comm.size() == 1        ? ""
              : parallel == "latents" ? ", latent parallel"
                                      : ", data parallel");
  nlohmann::json j = train::preset(preset_name);
  j["sae"]["d_sae"] = d_sae;
  if (d_sae != 32768)
    j["sae"]["matryoshka_widths"] = {d_sae / 256, d_sae / 64, d_sae / 16, d_sae / 4, d_sae};
  j["training"]["batch_size"] = batch;
  j["training"]["total_tokens"] = batch * steps;
  j["data"] = {{"type", "synthetic"}};
  train::TrainConfig cfg = train::TrainConfig::from_json(j, "bench");
  cfg.spec.d_in = d_in;
  std::string widths;
  for (auto w : cfg.spec.widths) widths += std::to_string(w) + " ";
  std::printf(
      "config: preset %s, d_in %lld, d_sae %lld, k %.0f, widths %s, batch %lld, %lld dead "
      "latents (AuxK), steps %lld, encoder GEMM in %s\n",
      preset_name.c_str(), (long long)d_in, (long long)d_sae, cfg.spec.k, widths.c_str(),
      (long long)batch, (long long)n_dead, (long long)steps, precision.c_str());

  // Latent parallel: this rank's block of latents (all of them in one process).
  const train::LatentShard latents{parallel == "latents" ? &comm : nullptr, d_sae};
  train::TrainSpec local = cfg.spec;
  local.d_sae = latents.count();
  train::TrainingSae sae(local);
  sae.init_rows(0, 0.1, latents.begin());
  train::Optimizer opt(sae, cfg.adam);
  train::Grads g;
  g.resize(d_in, local.d_sae);
  train::StepWorkspace ws;
  ws.bf16_encoder_gemm = precision == "bf16";
  std::vector<float> x(size_t(batch * d_in));
  Rng rng(1);
  for (auto& v : x) v = float(rng.normal());
  std::vector<uint8_t> dead;
  if (n_dead > 0) {
    dead.assign(size_t(d_sae), 0);
    for (int64_t q = 0; q < n_dead; ++q) dead[size_t(q * (d_sae / n_dead))] = 1;
    dead = std::vector<uint8_t>(dead.begin() + latents.begin(),
                                dead.begin() + latents.begin() + latents.count());
  }

  // Data parallel: this rank's rows of the batch (all of them in one process).
  const train::BatchShard shard{parallel == "data" ? &comm : nullptr, batch};
  const float* rows = x.data() + shard.begin(batch) * d_in;
  const int64_t n_rows = shard.end(batch) - shard.begin(batch);
  double grad_sq = 0;  // the step's fused gradient norm (one process), as the trainer uses it
  auto step = [&] {
    train::StepResult r = train::forward_backward(sae, rows, n_rows, dead, g, ws, shard, latents);
    sae.update_threshold(r.min_selected, r.n_active > 0);
    grad_sq = r.grad_squared_norm;
  };
  train::ShardedUpdate sharded(comm, d_sae, d_in);
  auto update = [&] {
    if (shard.split())
      sharded.step(sae, opt, g, 1e-4);
    else
      opt.apply(sae, g, 1e-4, std::sqrt(grad_sq));
  };
  // Warm-up step (allocations, page faults), then timed steps.
  g.clear();
  step();
  update();
  ws.times = {};
  sharded.times = {};
  double t_clear = 0, t_opt = 0;
  comm.barrier();
  const double t0 = now_seconds();
  for (int64_t s = 0; s < steps; ++s) {
    double a = now_seconds();
    g.clear();
    t_clear += now_seconds() - a;
    step();
    a = now_seconds();
    update();
    t_opt += now_seconds() - a;
  }
  comm.barrier();
  const double per_step = (now_seconds() - t0) / double(steps);
  const auto& t = ws.times;
  const double n = double(steps);
  const double gemm_flop = 2.0 * double(batch) * double(d_in) * double(d_sae);
  std::printf("\n%-28s %10s %8s\n", "phase", "ms/step", "share");
  auto row = [&](const char* name, double secs) {
    std::printf("%-28s %10.1f %7.1f%%\n", name, secs / n * 1e3, 100.0 * secs / n / per_step);
  };
  row("encoder GEMM", t.encoder_gemm);
  row("bias + BatchTopK select", t.select);
  row("levels (sparse decode+loss)", t.levels);
  row("AuxK", t.aux);
  row("sparse backward", t.backward);
  if (shard.split()) row("losses, masks (all-reduce)", t.exchange);
  if (latents.split()) row("  of which exchange", t.exchange);  // inside the rows above
  if (shard.split()) {
    row("reduce-scatter grads + norm", sharded.times.reduce_scatter);
    row("Adam (own rows)", sharded.times.adam);
    row("all-gather updated rows", sharded.times.allgather);
  } else {
    row("Adam + clip", t_opt);
  }
  row("zero grads", t_clear);
  const double gemm_gflops = gemm_flop / double(comm.size()) / (t.encoder_gemm / n) * 1e-9;
  std::printf("%-28s %10.1f   (%.0f tokens/s, encoder GEMM at %.1f GFLOP/s)\n", "total",
              per_step * 1e3, double(batch) / per_step, gemm_gflops);
  // Adam's memory traffic (fp32): a touched row reads p, g, v (and m) and writes p, v (and m);
  // an untouched one updates v (and p, m with momentum); the clip's norm is taken in the
  // backward (one process) or with the reduce-scatter (ranks): no reads of its own here.
  // Data parallel: this rank's own rows only.
  const double rows_all = double(d_sae) / double(comm.size());
  const double touched =
      std::min(double(g.touched.size()) / double(latents.split() ? 1 : comm.size()), rows_all);
  const bool momentum = cfg.adam.beta1 != 0.0;
  const double row_bytes = double(d_in) * 4.0 * 2.0;  // both matrices
  const double adam_bytes = row_bytes * (touched * (momentum ? 7.0 : 5.0) +
                                         (rows_all - touched) * (momentum ? 6.0 : 2.0));
  const double adam_s = (shard.split() ? sharded.times.adam : t_opt) / n;
  std::printf(
      "share of this machine's peak: encoder GEMM %.0f%% of sgemm; Adam + clip %.1f GB/s "
      "= %.0f%% of copy (%.0f MB moved per step)\n",
      peak.gemm_share(gemm_gflops), adam_bytes / adam_s * 1e-9,
      peak.copy_share(adam_bytes / adam_s * 1e-9), adam_bytes * 1e-6);
  // The sparse phases' bytes, counted by rows (fp32, d_in floats each), not measured traffic:
  // levels read one W_dec row per active entry and write each token's L level vectors; the
  // backward reads, per entry, one level vector and one sae_in row, and per touched latent its
  // W_dec row, both gradient rows (read + write) and its W_encT row (b_dec's input path).
  const double entries = double(ws.active.offsets.back());
  const double vec_rows = double(n_rows) * double(cfg.spec.n_levels());
  const double row_size = double(d_in) * 4.0;
  const double levels_bytes = row_size * (entries + vec_rows);
  const double backward_bytes =
      row_size *
      (entries * 2.0 + double(g.touched.size()) * (cfg.spec.apply_b_dec_to_input ? 6.0 : 5.0));
  std::printf(
      "sparse phases by row count: levels %.0f MB at %.1f GB/s, backward %.0f MB at %.1f GB/s "
      "(%.0f%% and %.0f%% of copy)\n",
      levels_bytes * 1e-6, levels_bytes / (t.levels / n) * 1e-9, backward_bytes * 1e-6,
      backward_bytes / (t.backward / n) * 1e-9,
      peak.copy_share(levels_bytes / (t.levels / n) * 1e-9),
      peak.copy_share(backward_bytes / (t.backward / n) * 1e-9));
  if (latents.split()) {
    // Buffers each rank puts into a collective per step (wire bytes depend on MPI's algorithm).
    const double k_aux = n_dead > 0 ? double(std::min(d_in / 2, n_dead)) : 0.0;
    std::printf(
        "into collectives per step by this rank: %.1f MB candidates (all-gather), %.1f MB "
        "level band sums (all-reduce), %.1f MB AuxK (all-gather + all-reduce), %.3f MB sums\n",
        cfg.spec.k * double(batch) * 8e-6,
        double(batch) * double(cfg.spec.n_levels()) * double(d_in) * 4e-6,
        n_dead > 0 ? double(batch) * (k_aux + double(d_in)) * 4e-6 : 0.0, double(d_in + 3) * 8e-6);
  }
  if (shard.split())
    std::printf(
        "sent per step by this rank: %.1f MB (reduce-scatter of gradient rows, "
        "all-gather of updated rows, biases) for %.1f MB of touched gradients (%zu rows "
        "of %lld); %.1f MB of masks\n",
        double(sharded.last_bytes_sent()) * 1e-6,
        double(g.touched.size()) * 2.0 * double(d_in) * 4e-6, g.touched.size(), (long long)d_sae,
        2.0 * double(d_sae) * 1e-6);
  std::fflush(stdout);
  dist::finalize();
  return 0;
}

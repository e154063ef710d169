// Gemma-2 forward throughput: to a layer (what SAE training needs) or to the logits, on random
// token ids, with the peak resident memory of the process.
//   build/release/bench/bench_gemma --model DIR --last-layer 12 [--bf16 [--bf16-matmul]]
//                                   [--threads 2]
#include <sys/resource.h>

#include <CLI/CLI.hpp>
#include <cstdio>
#include <random>

#include "bench_util.h"
#include "model/gemma2.h"
#include "ops/gemm_bf16.h"

using namespace sae;

int main(int argc, char** argv) {
  CLI::App app{"Gemma-2 forward benchmark"};
  std::string folder;
  int64_t prompts = 2, seq = 256, last_layer = -1;
  int threads = 0;
  bool bf16 = false, bf16_matmul = false;
  app.add_option("--model", folder, "Gemma-2 checkpoint folder")->required();
  app.add_option("--prompts", prompts, "Prompts per batch");
  app.add_option("--seq", seq, "Tokens per prompt");
  app.add_option("--last-layer", last_layer, "Stop after this layer (-1: all, with logits)");
  app.add_option("--threads", threads, "Threads (0: library default)");
  app.add_flag("--bf16", bf16, "Keep the weights in bf16");
  app.add_flag("--bf16-matmul", bf16_matmul, "With --bf16: multiply in bf16 (ops/gemm_bf16.h)");
  CLI11_PARSE(app, argc, argv);
  if (threads > 0) ops::set_num_threads(threads);
  bench::print_header(argc, argv);
  const bench::MachinePeak peak = bench::print_peak();

  double t0 = now_seconds();
  const model::Gemma2Config cfg = model::read_gemma2_config(folder);
  const bool to_end = last_layer < 0 || last_layer == cfg.num_layers - 1;
  if (to_end) last_layer = cfg.num_layers - 1;
  model::Gemma2 m = model::Gemma2::load(
      folder,
      {.last_layer = last_layer, .keep_bf16 = bf16, .bf16_matmul = bf16_matmul, .verbose = false});
  const double load_s = now_seconds() - t0;

  std::mt19937 rng(0);
  std::uniform_int_distribution<int32_t> tok(3, int32_t(cfg.vocab_size - 1));
  model::TokenBatch batch, warm;
  for (int64_t p = 0; p < prompts; ++p) {
    std::vector<int32_t> ids(static_cast<size_t>(seq));
    ids[0] = 2;  // BOS
    for (int64_t t = 1; t < seq; ++t) ids[size_t(t)] = tok(rng);
    batch.add(ids);
    if (p == 0) warm.add(std::span<const int32_t>(ids).first(16));
  }
  std::vector<float> logits;
  auto run = [&](const model::TokenBatch& b) {
    m.forward(b, last_layer, nullptr, nullptr, to_end ? &logits : nullptr);
  };
  run(warm);
  t0 = now_seconds();
  run(batch);
  const double s = now_seconds() - t0;
  rusage ru{};
  getrusage(RUSAGE_SELF, &ru);
  const std::string what = to_end ? "logits" : "layer " + std::to_string(last_layer);
  std::printf("sae.cpp, weights %s (%.2f GiB)%s\n", bf16 ? "bf16 kept" : "f32",
              double(m.weight_bytes()) / double(1 << 30),
              bf16_matmul ? (", bf16 matmuls: " + ops::bf16_gemm_path()).c_str() : "");
  std::printf(
      "forward to %s: %lld x %lld tokens in %.2f s = %.1f tokens/s; load %.1f s; peak "
      "RSS %.2f GiB\n",
      what.c_str(), (long long)prompts, (long long)seq, s, double(prompts * seq) / s, load_s,
      double(ru.ru_maxrss) / double(1 << 20));
  // The weight GEMMs' FLOPs per token (attention's QK and AV products not counted).
  const double qkv =
      double(cfg.hidden_size) * double(cfg.head_dim) * double(cfg.num_heads + 2 * cfg.num_kv_heads);
  const double per_layer = qkv + double(cfg.num_heads * cfg.head_dim) * cfg.hidden_size +
                           3.0 * double(cfg.hidden_size) * double(cfg.intermediate_size);
  const double flop_per_token =
      2.0 * (per_layer * double(last_layer + 1) +
             (to_end ? double(cfg.vocab_size) * double(cfg.hidden_size) : 0.0));
  const double gflops = flop_per_token * double(prompts * seq) / s * 1e-9;
  std::printf(
      "weight GEMMs at %.1f GFLOP/s = %.0f%% of this machine's sgemm peak (attention "
      "products not counted)\n",
      gflops, peak.gemm_share(gflops));
  return 0;
}

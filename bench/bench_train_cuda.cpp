// The training step on the GPU at the release's shape (d_in 2304, d_sae 32768, k 40, widths
// 128..32768, batch 4096), in each precision: time per step with the phase split (CUDA events),
// the encoder GEMM's TFLOP/s, and device memory in use. The batch is copied from page-locked
// host memory each step (the "batch in" phase), as in training from a host-side source.
//   build/release/bench/bench_train_cuda [--steps 20] [--dead 0] [--precision fp32,tf32,bf16]
//                                        [--preset gemma-2-2b-matryoshka-standard]
#include <cstdio>
#include <sstream>
#include <string>

#include "bench_util.h"
#include "core/device.h"
#include "core/rng.h"
#include "train/device_step.h"
#include "train/train_config.h"

using namespace sae;

int main(int argc, char** argv) {
  int64_t d_in = 2304, d_sae = 32768, batch = 4096, steps = 20, n_dead = 0;
  std::string preset_name = "gemma-2-2b-matryoshka-standard", precisions = "fp32,tf32,bf16";
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
    else if (a == "--precision")
      precisions = v;
    else {
      std::fprintf(stderr, "unknown option %s\n", a.c_str());
      return 2;
    }
  }
  bench::print_header(argc, argv);
  require_device(Device::Cuda);
  std::printf("device: %s\n", cuda_device_description().c_str());
  nlohmann::json j = train::preset(preset_name);
  j["sae"]["d_sae"] = d_sae;
  if (d_sae != 32768)
    j["sae"]["matryoshka_widths"] = {d_sae / 256, d_sae / 64, d_sae / 16, d_sae / 4, d_sae};
  j["training"]["batch_size"] = batch;
  j["training"]["total_tokens"] = batch * steps;
  j["data"] = {{"type", "synthetic"}};
  train::TrainConfig cfg = train::TrainConfig::from_json(j, "bench");
  cfg.spec.d_in = d_in;
  std::printf(
      "config: preset %s, d_in %lld, d_sae %lld, k %.0f, batch %lld, %lld dead latents "
      "(AuxK), Adam beta1 %.1f, %lld timed steps after 3 warm-up\n",
      preset_name.c_str(), (long long)d_in, (long long)d_sae, cfg.spec.k, (long long)batch,
      (long long)n_dead, cfg.adam.beta1, (long long)steps);
  train::TrainingSae sae(cfg.spec);
  sae.init(0, 0.1);
  train::Optimizer opt(sae, cfg.adam);
  std::vector<int64_t> since(size_t(d_sae), 0), counts(size_t(d_sae), 0);
  const int64_t window = 1000;
  for (int64_t q = 0; q < n_dead; ++q) since[size_t(q * (d_sae / n_dead))] = 1 << 30;
  std::vector<float> x(size_t(batch * d_in));
  Rng rng(1);
  for (auto& v : x) v = float(rng.normal());
  const double gemm_flop = 2.0 * double(batch) * double(d_in) * double(d_sae);

  std::printf("\n%-6s %9s %9s %9s %9s %9s %9s %9s %9s | %9s %10s %8s %9s\n", "prec", "batch in",
              "GEMM", "select", "levels", "backward", "AuxK", "Adam", "total", "no copy",
              "tokens/s", "TFLOP/s", "mem GiB");
  std::stringstream ss(precisions);
  std::string prec;
  while (std::getline(ss, prec, ',')) {
    train::DeviceTrainer dev(cfg.spec, cfg.adam, batch, prec);
    dev.upload(sae, opt, since, counts);
    std::copy(x.begin(), x.end(), dev.host_batch());
    for (int s = 0; s < 3; ++s) dev.step(1.0, 1e-4, s + 1, window, false);
    dev.enable_timing(true);
    dev.reset_times();
    const double t0 = now_seconds();
    for (int64_t s = 0; s < steps; ++s) dev.step(1.0, 1e-4, s + 4, window, false);
    const double wall_ms = (now_seconds() - t0) * 1e3 / double(steps);
    const auto& t = dev.times();
    const double n = double(t.steps);
    const double total =
        (t.upload + t.encoder_gemm + t.select + t.levels + t.backward + t.aux + t.optimizer) / n;
    const double no_copy = total - t.upload / n;
    std::printf("%-6s %9.3f %9.3f %9.3f %9.3f %9.3f %9.3f %9.3f %9.3f | %9.3f %10.0f %8.1f %9.1f\n",
                prec.c_str(), t.upload / n, t.encoder_gemm / n, t.select / n, t.levels / n,
                t.backward / n, t.aux / n, t.optimizer / n, total, no_copy,
                double(batch) / (wall_ms * 1e-3), gemm_flop / (t.encoder_gemm / n * 1e-3) * 1e-12,
                double(dev.device_bytes()) / double(1ull << 30));
    std::printf("%-6s wall %.3f ms/step (host loop, includes the per-step scalar read-back)\n",
                prec.c_str(), wall_ms);
  }
  std::printf(
      "(phase columns: GPU ms per step from CUDA events; 'no copy' = total without the "
      "host-to-device batch copy)\n");
  return 0;
}

// Inference on the GPU: sae::DeviceSae::encode at the release's shape (JumpReLU, d_in 2304,
// d_sae 32768, about 44 active latents per token), tokens/s from page-locked host activations
// to sparse codes on the host, in each precision; beside the CPU encode of the same SAE.
//   build/release/bench/bench_encode_cuda [--tokens 65536] [--cpu-tokens 4096]
#include <cuda_runtime_api.h>

#include <cstdio>
#include <string>

#include "bench_util.h"
#include "core/device.h"
#include "core/rng.h"
#include "sae/device_sae.h"

using namespace sae;

int main(int argc, char** argv) {
  int64_t d_in = 2304, d_sae = 32768, tokens = 65536, cpu_tokens = 4096;
  for (int i = 1; i + 1 < argc; i += 2) {
    std::string a = argv[i], v = argv[i + 1];
    if (a == "--tokens")
      tokens = std::stoll(v);
    else if (a == "--cpu-tokens")
      cpu_tokens = std::stoll(v);
    else if (a == "--d-sae")
      d_sae = std::stoll(v);
    else {
      std::fprintf(stderr, "unknown option %s\n", a.c_str());
      return 2;
    }
  }
  bench::print_header(argc, argv);
  require_device(Device::Cuda);
  std::printf("device: %s\n", cuda_device_description().c_str());
  SaeConfig cfg;
  cfg.architecture = Architecture::JumpReLU;
  cfg.d_in = d_in;
  cfg.d_sae = d_sae;
  Sae s(cfg);
  Rng rng(0);
  const float w = float(1.0 / std::sqrt(double(d_in)));  // pre-activations ~ N(0, 1)
  for (auto& v : s.W_enc) v = float(rng.normal()) * w;
  for (auto& v : s.W_dec) v = float(rng.normal()) * w;
  for (auto& v : s.threshold) v = 3.0f;  // P(N(0,1) > 3) * 32768 = 44 active
  float* x = nullptr;
  if (cudaMallocHost(reinterpret_cast<void**>(&x), size_t(tokens * d_in) * 4) != cudaSuccess)
    return 1;
  for (int64_t i = 0; i < tokens * d_in; ++i) x[i] = float(rng.normal());
  std::printf(
      "config: JumpReLU d_in %lld, d_sae %lld, %lld tokens from page-locked host memory\n\n",
      (long long)d_in, (long long)d_sae, (long long)tokens);
  std::printf("%-10s %12s %12s %8s\n", "encode", "ms", "tokens/s", "L0");
  for (const char* prec : {"fp32", "tf32", "bf16"}) {
    DeviceSae dev(s, prec);
    dev.encode(std::span<const float>(x, size_t(4096 * d_in)), 4096);  // warm-up
    const double t0 = now_seconds();
    const SparseCodes c = dev.encode(std::span<const float>(x, size_t(tokens * d_in)), tokens);
    const double dt = now_seconds() - t0;
    std::printf("cuda %-5s %12.1f %12.0f %8.2f\n", prec, dt * 1e3, double(tokens) / dt,
                double(c.nnz()) / double(tokens));
  }
  const double t0 = now_seconds();
  const SparseCodes c = s.encode(std::span<const float>(x, size_t(cpu_tokens * d_in)), cpu_tokens);
  const double dt = now_seconds() - t0;
  std::printf("cpu %-6s %12.1f %12.0f %8.2f   (%d threads, %lld tokens)\n", "fp32", dt * 1e3,
              double(cpu_tokens) / dt, double(c.nnz()) / double(cpu_tokens), ops::num_threads(),
              (long long)cpu_tokens);
  cudaFreeHost(x);
  return 0;
}

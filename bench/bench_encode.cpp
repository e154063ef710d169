// SAE inference speed at the release's shape: encode (dense encoder GEMM + selection) and
// sparse decode, for weights stored f32 and bf16, beside the raw sgemm rate of the same shape.
//   build/release/bench/bench_encode [--d-in 2304] [--d-sae 32768] [--batch 4096] [--iters 3]
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <random>
#include <string>

#include "bench_util.h"
#include "ops/gemm.h"
#include "sae/load.h"
#include "sae/save.h"

using namespace sae;

int main(int argc, char** argv) {
  int64_t d_in = 2304, d_sae = 32768, batch = 4096, iters = 3, target_l0 = 40;
  for (int i = 1; i + 1 < argc; i += 2) {
    std::string a = argv[i];
    int64_t v = std::stoll(argv[i + 1]);
    if (a == "--d-in")
      d_in = v;
    else if (a == "--d-sae")
      d_sae = v;
    else if (a == "--batch")
      batch = v;
    else if (a == "--iters")
      iters = v;
    else if (a == "--threads")
      ops::set_num_threads(int(v));
    else {
      std::fprintf(stderr, "unknown option %s\n", a.c_str());
      return 2;
    }
  }
  bench::print_header(argc, argv);
  const bench::MachinePeak peak = bench::print_peak();
  std::printf(
      "config: jumprelu SAE d_in %lld, d_sae %lld, batch %lld tokens, iters %lld, "
      "threshold set for L0 ~ %lld\n",
      (long long)d_in, (long long)d_sae, (long long)batch, (long long)iters, (long long)target_l0);

  // A JumpReLU SAE (the release's saved form) with Gaussian weights: pre-activations are about
  // N(0, 1) on N(0, 1) inputs, so a threshold at the (1 - L0/d_sae) quantile gives L0 ~ 40.
  SaeConfig cfg;
  cfg.architecture = Architecture::JumpReLU;
  cfg.d_in = d_in;
  cfg.d_sae = d_sae;
  cfg.json = nlohmann::ordered_json::object();
  Sae s(cfg);
  std::mt19937 rng(0);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  for (auto& w : s.W_enc) w = nd(rng) / std::sqrt(float(d_in));
  for (auto& w : s.W_dec) w = nd(rng) / std::sqrt(float(d_in));
  const float thr = 3.03f;  // P(N(0,1) > 3.03) ~ 40/32768
  for (auto& t : s.threshold) t = thr;
  std::vector<float> x(size_t(batch * d_in));
  for (auto& v : x) v = nd(rng);

  // Raw sgemm of the encoder shape.
  std::vector<float> c(size_t(batch * d_sae));
  ops::gemm(ops::Trans::No, ops::Trans::No, batch, d_sae, d_in, 1.0f, x.data(), d_in,
            s.W_enc.data(), d_sae, 0.0f, c.data(), d_sae);  // warm-up
  double t0 = now_seconds();
  for (int64_t i = 0; i < iters; ++i)
    ops::gemm(ops::Trans::No, ops::Trans::No, batch, d_sae, d_in, 1.0f, x.data(), d_in,
              s.W_enc.data(), d_sae, 0.0f, c.data(), d_sae);
  const double gemm_s = (now_seconds() - t0) / double(iters);
  const double flop = 2.0 * double(batch) * double(d_in) * double(d_sae);
  c = {};
  std::printf("\n%-34s %12s %12s %10s\n", "what", "ms/batch", "tokens/s", "GFLOP/s");
  std::printf("%-34s %12.1f %12.0f %10.1f   (%.0f%% of the sgemm peak)\n",
              "sgemm [B,d_in]x[d_in,d_sae]", gemm_s * 1e3, double(batch) / gemm_s,
              flop / gemm_s * 1e-9, peak.gemm_share(flop / gemm_s * 1e-9));

  for (DType dt : {DType::F32, DType::BF16}) {
    // Through the file: save in dtype, load back (weights become f32 in memory).
    const std::string dir = "/tmp/saecpp_bench_encode_" + std::string(dtype_name(dt));
    save_to_disk(s, dir, dt);
    double tl = now_seconds();
    LoadedSae l = load_from_disk(dir);
    const double load_s = now_seconds() - tl;
    SparseCodes codes = l.sae.encode(x, batch);  // warm-up
    t0 = now_seconds();
    for (int64_t i = 0; i < iters; ++i) codes = l.sae.encode(x, batch);
    const double enc_s = (now_seconds() - t0) / double(iters);
    t0 = now_seconds();
    std::vector<float> out;
    for (int64_t i = 0; i < iters; ++i) out = l.sae.decode(codes);
    const double dec_s = (now_seconds() - t0) / double(iters);
    const std::string tag = std::string(dtype_name(dt)) + " weights";
    std::printf(
        "%-34s %12.1f %12.0f %10.1f   (L0 %.1f, %.0f%% of time in sgemm, %.0f%% of the sgemm "
        "peak)\n",
        (tag + ": encode").c_str(), enc_s * 1e3, double(batch) / enc_s, flop / enc_s * 1e-9,
        double(codes.nnz()) / double(batch), 100.0 * gemm_s / enc_s,
        peak.gemm_share(flop / enc_s * 1e-9));
    std::printf("%-34s %12.1f %12.0f\n", (tag + ": sparse decode").c_str(), dec_s * 1e3,
                double(batch) / dec_s);
    std::printf("%-34s %12.1f\n", (tag + ": load from disk").c_str(), load_s * 1e3);
    std::filesystem::remove_all(dir);
  }
  return 0;
}

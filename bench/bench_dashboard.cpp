// The dashboard's costs beyond the model forward, at the release's SAE shape: per token, the
// one-pass latent statistics against the SAE encode they follow; per SAE, the fixed costs of
// the pages (logit effects over the vocabulary, nearest latents by decoder cosine).
//   build/release/bench/bench_dashboard [--d-in 2304] [--d-sae 32768] [--vocab 256000]
//                                       [--batch 1024] [--iters 3]
#include <cmath>
#include <cstdio>
#include <random>
#include <string>

#include "bench_util.h"
#include "eval/latent_stats.h"
#include "eval/logit_effects.h"
#include "ops/gemm.h"
#include "sae/sae.h"

using namespace sae;

int main(int argc, char** argv) {
  int64_t d_in = 2304, d_sae = 32768, vocab = 256000, batch = 1024, iters = 3;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string a = argv[i];
    const int64_t v = std::stoll(argv[i + 1]);
    if (a == "--d-in")
      d_in = v;
    else if (a == "--d-sae")
      d_sae = v;
    else if (a == "--vocab")
      vocab = v;
    else if (a == "--batch")
      batch = v;
    else if (a == "--iters")
      iters = v;
    else {
      std::fprintf(stderr, "unknown option %s\n", a.c_str());
      return 2;
    }
  }
  bench::print_header(argc, argv);
  bench::print_peak();
  std::printf("config: jumprelu SAE d_in %lld, d_sae %lld (L0 ~ 40), vocab %lld, batch %lld, "
              "iters %lld\n",
              (long long)d_in, (long long)d_sae, (long long)vocab, (long long)batch,
              (long long)iters);
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
  for (auto& t : s.threshold) t = 3.03f;  // P(N(0,1) > 3.03) ~ 40/32768
  std::vector<float> x(size_t(batch * d_in));
  for (auto& v : x) v = nd(rng);

  // Per token: encode, then the statistics of the same codes (as the dashboard's pass does).
  eval::LatentStatsConfig sc;
  sc.d_sae = d_sae;
  eval::LatentStats stats(sc);
  const std::vector<uint8_t> counted(size_t(batch), 1);
  SparseCodes codes = s.encode(x, batch);  // warm-up
  stats.add(codes, 0, counted);
  double enc = 0, st = 0;
  for (int64_t i = 0; i < iters; ++i) {
    for (auto& v : x) v = nd(rng);
    double t0 = now_seconds();
    codes = s.encode(x, batch);
    double t1 = now_seconds();
    stats.add(codes, (i + 1) * batch, counted);
    double t2 = now_seconds();
    enc += t1 - t0, st += t2 - t1;
  }
  enc /= double(iters), st /= double(iters);
  std::printf("\n%-40s %10s %12s\n", "per token", "ms/batch", "tokens/s");
  std::printf("%-40s %10.1f %12.0f   (L0 %.1f)\n", "SAE encode", enc * 1e3, double(batch) / enc,
              double(codes.nnz()) / double(batch));
  std::printf("%-40s %10.1f %12.0f   (%.1f%% of encode + statistics)\n",
              "latent statistics (LatentStats::add)", st * 1e3, double(batch) / st,
              100 * st / (enc + st));

  // Per SAE: logit effects of a block of 128 latents over the vocabulary, and the decoder
  // cosines of 128 latents against all; both scale linearly in d_sae.
  model::Weight unembed;
  unembed.rows = vocab;
  unembed.cols = d_in;
  unembed.f32.resize(size_t(vocab * d_in));
  for (auto& v : unembed.f32) v = nd(rng) * 0.02f;
  const std::vector<uint8_t> skip(size_t(vocab), 0);
  const int64_t block = 128;
  double t0 = now_seconds();
  const auto le = eval::logit_effects(s, unembed, skip, 0, block);
  const double logit_s = now_seconds() - t0;
  std::vector<float> cos(size_t(block * d_sae));
  t0 = now_seconds();
  ops::gemm(ops::Trans::No, ops::Trans::Yes, block, d_sae, d_in, 1.0f, s.W_dec.data(), d_in,
            s.W_dec.data(), d_in, 0.0f, cos.data(), d_sae);
  const double cos_s = now_seconds() - t0;
  const double blocks = double(d_sae) / double(block);
  std::printf("\n%-40s %10s %12s\n", "per SAE (all latents)", "s/block", "s (projected)");
  std::printf("%-40s %10.2f %12.0f   (%zu latents measured)\n",
              "logit effects (d_sae x vocab GEMM, top/hist)", logit_s, logit_s * blocks, le.size());
  std::printf("%-40s %10.2f %12.0f\n", "nearest latents (decoder cosines)", cos_s, cos_s * blocks);
  return 0;
}

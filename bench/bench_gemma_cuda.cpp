// Gemma-2-2b-shaped forward on the GPU with random bf16 weights (made in memory: no checkpoint
// to download or write): tokens/s to a layer, in bf16 and fp32, with device memory in use.
// Compare with bench/transformers_gemma_cuda.py on the same GPU and shape.
//   build/release/bench/bench_gemma_cuda [--prompts 4] [--seq 1024] [--last-layers 12,24]
//                                        [--precision bf16] [--reps 3]
//                                        [--kernels baseline,one-pass,fused,new]
//                                        [--attention-alone 1]
// --kernels: the forward's kernel sets to time, each over the same forward (DeviceGemma2::Kernels):
// baseline (two-pass attention, separate norms and adds), one-pass (the one-pass attention),
// fused (the post-norm, add and next norm in one kernel), new (both). The bf16 attention alone is
// timed first (--attention-alone 0: not): two-pass, and one-pass when a set uses it. fp32 runs its
// one attention kernel.
#include <omp.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <sstream>
#include <string>

#include "bench_util.h"
#include "core/device.h"
#include "core/dtype.h"
#include "core/error.h"
#include "model/device_gemma2.h"
#include "model/gemma2.h"
#include "ops/cuda/runtime.h"
#include "ops/cuda/transformer.h"

using namespace sae;
using namespace sae::model;

namespace {

// google/gemma-2-2b's config.json.
Gemma2Config gemma_2_2b() {
  Gemma2Config c;
  c.vocab_size = 256000, c.hidden_size = 2304, c.intermediate_size = 9216, c.num_layers = 26;
  c.num_heads = 8, c.num_kv_heads = 4, c.head_dim = 256, c.query_pre_attn_scalar = 256;
  c.attn_logit_softcap = 50.0, c.final_logit_softcap = 30.0, c.sliding_window = 4096;
  c.sliding.resize(26);
  for (int l = 0; l < 26; ++l) c.sliding[size_t(l)] = l % 2 == 0;
  return c;
}

// Uniform values of standard deviation `std` from a counter hash, in bf16.
Weight random_weight(int64_t rows, int64_t cols, uint64_t seed, float std) {
  Weight w;
  w.rows = rows, w.cols = cols;
  w.bf16.resize(size_t(rows * cols));
  const float a = std * 1.7320508f;
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < rows * cols; ++i) {
    uint64_t z = (uint64_t(i) + seed * 0x9E3779B97F4A7C15ull) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 31)) * 0x94D049BB133111EBull;
    z ^= z >> 29;
    const float u = float(z >> 40) / float(1ull << 24);  // [0, 1)
    w.bf16[size_t(i)] = f32_to_bf16((2.0f * u - 1.0f) * a);
  }
  return w;
}

Gemma2 random_model(int64_t last_layer) {
  Gemma2 m;
  m.cfg = gemma_2_2b();
  const int64_t H = m.cfg.hidden_size, I = m.cfg.intermediate_size;
  const int64_t nq = m.cfg.num_heads * m.cfg.head_dim, nkv = m.cfg.num_kv_heads * m.cfg.head_dim;
  m.embed = random_weight(m.cfg.vocab_size, H, 1, 0.02f);
  m.final_norm.assign(size_t(H), 0.0f);
  for (int64_t l = 0; l <= last_layer; ++l) {
    Gemma2Layer& L = m.layers.emplace_back();
    for (auto* n : {&L.input_norm, &L.post_attn_norm, &L.pre_ff_norm, &L.post_ff_norm})
      n->assign(size_t(H), 0.0f);
    const uint64_t s = 100 + uint64_t(l) * 8;
    L.q_proj = random_weight(nq, H, s, 0.02f);
    L.k_proj = random_weight(nkv, H, s + 1, 0.02f);
    L.v_proj = random_weight(nkv, H, s + 2, 0.02f);
    L.o_proj = random_weight(H, nq, s + 3, 0.02f);
    L.gate_proj = random_weight(I, H, s + 4, 0.02f);
    L.up_proj = random_weight(I, H, s + 5, 0.02f);
    L.down_proj = random_weight(H, I, s + 6, 0.02f);
  }
  return m;
}

// One layer's attention alone at the benchmark's shape, each bf16 kernel timed with CUDA events
// (best of reps), and the one-pass output against the two-pass one.
void time_attention_alone(const Gemma2Config& c, int64_t prompts, int64_t seq, int64_t reps,
                          bool one_pass) {
  const int64_t T = prompts * seq, nq = c.num_heads * c.head_dim, nkv = c.num_kv_heads * c.head_dim;
  std::vector<float> q(size_t(T * nq)), k(size_t(T * nkv)), v(size_t(T * nkv));
  uint64_t z = 12345;
  for (auto* x : {&q, &k, &v})
    for (float& e : *x) {  // uniform in [-2, 2): scores of std ~1.3 after the 1/16 scale
      z = z * 6364136223846793005ull + 1442695040888963407ull;
      e = 4.0f * float(z >> 40) / float(1ull << 24) - 2.0f;
    }
  std::vector<int32_t> start(static_cast<size_t>(T));
  for (int64_t t = 0; t < T; ++t) start[size_t(t)] = int32_t(t / seq * seq);
  cuda::Context ctx;
  cuda::DeviceBuffer<float> dq, dk, dv, dout(size_t(T * nq));
  cuda::DeviceBuffer<int32_t> dstart;
  cuda::upload(dq, std::span<const float>(q), ctx.stream(), "q");
  cuda::upload(dk, std::span<const float>(k), ctx.stream(), "k");
  cuda::upload(dv, std::span<const float>(v), ctx.stream(), "v");
  cuda::upload(dstart, std::span<const int32_t>(start), ctx.stream(), "prompt starts");
  cuda::DeviceBuffer<uint16_t> dout_b(size_t(T * nq));
  const cuda::AttentionDims dims{T,
                                 c.num_heads,
                                 c.num_kv_heads,
                                 c.head_dim,
                                 float(1.0 / std::sqrt(c.query_pre_attn_scalar)),
                                 float(*c.attn_logit_softcap),
                                 c.sliding_window};
  // Causal FLOPs of Q K^T and P V over the visible keys only.
  const double flops = 4.0 * double(c.num_heads) * double(c.head_dim) * double(prompts) *
                       double(seq) * double(seq + 1) / 2.0;
  cudaEvent_t e0, e1;
  SAE_CUDA(cudaEventCreate(&e0));
  SAE_CUDA(cudaEventCreate(&e1));
  // The two-pass kernel's output, the reference the one-pass kernel is compared with.
  cuda::attention_packed(ctx, dq.data(), dk.data(), dv.data(), dstart.data(), dims,
                         {dout.data(), nullptr}, true, cuda::TensorCoreAttention::TwoPass);
  const std::vector<float> two_pass = cuda::download(dout.data(), size_t(T * nq), ctx.stream());
  for (const auto tc : {cuda::TensorCoreAttention::TwoPass, cuda::TensorCoreAttention::OnePass}) {
    if (tc == cuda::TensorCoreAttention::OnePass && !one_pass) break;
    const char* kind = tc == cuda::TensorCoreAttention::OnePass ? "one-pass" : "two-pass";
    float best = 1e30f;
    for (int64_t r = 0; r <= reps; ++r) {  // the first is a warm-up
      SAE_CUDA(cudaEventRecord(e0, ctx.stream()));
      cuda::attention_packed(ctx, dq.data(), dk.data(), dv.data(), dstart.data(), dims,
                             {dout.data(), dout_b.data()}, true, tc);
      SAE_CUDA(cudaEventRecord(e1, ctx.stream()));
      SAE_CUDA(cudaEventSynchronize(e1));
      float ms = 0;
      SAE_CUDA(cudaEventElapsedTime(&ms, e0, e1));
      if (r > 0) best = std::min(best, ms);
    }
    const std::vector<float> got = cuda::download(dout.data(), size_t(T * nq), ctx.stream());
    std::string check;
    if (tc == cuda::TensorCoreAttention::OnePass) {
      double err = 0, ref = 0;
      for (size_t i = 0; i < got.size(); ++i)
        err += (double(got[i]) - two_pass[i]) * (double(got[i]) - two_pass[i]),
            ref += double(two_pass[i]) * two_pass[i];
      check = cat("; against two-pass: relative error norm ", std::sqrt(err / ref));
    }
    std::printf(
        "attention alone (%s, bf16): %lld x %lld tokens, one layer in %.3f ms = %.1f "
        "TFLOP/s%s\n",
        kind, (long long)prompts, (long long)seq, best, flops / (best * 1e-3) / 1e12,
        check.c_str());
    std::fflush(stdout);
  }
  SAE_CUDA(cudaEventDestroy(e0));
  SAE_CUDA(cudaEventDestroy(e1));
}

}  // namespace

int main(int argc, char** argv) {
  int64_t prompts = 4, seq = 1024, reps = 3, attention_alone = 1;
  std::string layers = "12,24", precisions = "bf16", kernel_sets = "baseline,one-pass,fused,new";
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string a = argv[i], v = argv[i + 1];
    if (a == "--prompts")
      prompts = std::stoll(v);
    else if (a == "--seq")
      seq = std::stoll(v);
    else if (a == "--last-layers")
      layers = v;
    else if (a == "--precision")
      precisions = v;
    else if (a == "--reps")
      reps = std::stoll(v);
    else if (a == "--kernels")
      kernel_sets = v;
    else if (a == "--attention-alone")
      attention_alone = std::stoll(v);
    else {
      std::fprintf(stderr, "unknown option %s\n", a.c_str());
      return 2;
    }
  }
  bench::print_header(argc, argv);
  require_device(Device::Cuda);
  std::printf("device: %s\n", cuda_device_description().c_str());
  std::vector<int64_t> last_layers;
  std::stringstream ls(layers);
  for (std::string l; std::getline(ls, l, ',');) last_layers.push_back(std::stoll(l));
  int64_t deepest = 0;
  for (int64_t l : last_layers) deepest = std::max(deepest, l);
  const auto t_make = std::chrono::steady_clock::now();
  const Gemma2 host = random_model(deepest);
  std::printf("random Gemma-2-2b-shaped weights, layers 0..%lld, made in %.1f s\n",
              (long long)deepest,
              std::chrono::duration<double>(std::chrono::steady_clock::now() - t_make).count());
  TokenBatch batch;
  for (int64_t p = 0; p < prompts; ++p) {
    std::vector<int32_t> ids(static_cast<size_t>(seq));
    ids[0] = 2;  // BOS
    for (int64_t t = 1; t < seq; ++t)
      ids[size_t(t)] = int32_t(3 + (p * 7919 + t * 104729) % 255990);
    batch.add(ids);
  }
  std::vector<std::pair<std::string, DeviceGemma2::Kernels>> sets;
  std::stringstream ks(kernel_sets);
  for (std::string k; std::getline(ks, k, ',');) {
    if (k != "baseline" && k != "one-pass" && k != "fused" && k != "new") {
      std::fprintf(stderr, "unknown --kernels %s (baseline, one-pass, fused or new)\n", k.c_str());
      return 2;
    }
    sets.push_back({k,
                    {.one_pass_attention = k == "one-pass" || k == "new",
                     .fused_add_norm = k == "fused" || k == "new"}});
  }
  bool any_one_pass = false;
  for (const auto& s : sets) any_one_pass = any_one_pass || s.second.one_pass_attention;
  if (attention_alone) time_attention_alone(host.cfg, prompts, seq, reps, any_one_pass);
  std::stringstream ps(precisions);
  for (std::string prec; std::getline(ps, prec, ',');) {
    DeviceGemma2 g(host, prec);
    for (const auto& [set_name, kernels] : sets) {
      g.set_kernels(kernels);
      for (int64_t last : last_layers) {
        g.forward(batch, last, nullptr);  // warm-up (allocations, cuBLAS heuristics)
        double best = 1e30;
        for (int64_t r = 0; r < reps; ++r) {
          const auto t0 = std::chrono::steady_clock::now();
          g.forward(batch, last, nullptr);  // synchronises at the end
          best = std::min(
              best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
        }
        std::printf(
            "sae.cpp %s forward (%s kernels) to layer %lld: %lld x %lld tokens in %.1f ms = "
            "%.0f tokens/s (best of %lld); weights %.2f GiB on the device\n",
            prec.c_str(), set_name.c_str(), (long long)last, (long long)prompts, (long long)seq,
            best * 1e3, double(prompts * seq) / best, (long long)reps,
            double(g.weight_bytes()) / (1 << 30));
        std::fflush(stdout);
      }
    }
  }
  return 0;
}

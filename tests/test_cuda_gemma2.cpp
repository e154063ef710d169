// Gemma-2 on the GPU against the CPU forward (itself checked against transformers): each
// non-GEMM kernel against its ops/ reference, then the whole forward on the tiny checkpoints at
// every hook point and in the logits, in fp32 (tight) and bf16 (the rounding of bf16 operands).
// Where no GPU is visible (or the build has no CUDA) every test skips with one line saying so.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <map>

#include "core/error.h"
#include "io/json_file.h"
#include "io/safetensors.h"
#include "model/device_gemma2.h"
#include "model/gemma2.h"
#include "model/tokenizer.h"
#include "ops/attention.h"
#include "ops/gelu.h"
#include "ops/gemm.h"
#include "ops/rms_norm.h"
#include "ops/rope.h"
#include "pipeline/activation_store.h"
#include "sae/load.h"
#include "sae/save.h"
#include "test_util.h"
#include "tiny_corpus.h"

#if SAECPP_HAS_CUDA
#include "ops/cuda/runtime.h"
#include "ops/cuda/transformer.h"
#endif

namespace sae::model {
namespace {

// bf16 arithmetic against an fp32 reference: the error's norm against the reference's, per
// tensor (single elements may add up several 8-bit roundings), and no element off by more than
// a quarter of the reference's scale. The measured figure is printed for the record.
void expect_close_in_norm(const std::vector<float>& got, const std::vector<float>& want,
                          double max_rel, const std::string& what) {
  ASSERT_EQ(got.size(), want.size()) << what;
  double err = 0, ref = 0, worst = 0, scale = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    const double d = double(got[i]) - want[i];
    err += d * d, ref += double(want[i]) * want[i];
    worst = std::max(worst, std::abs(d)), scale = std::max(scale, double(std::abs(want[i])));
  }
  const double rel = std::sqrt(err / std::max(ref, 1e-30));
  std::printf("%s: relative error norm %.2e, worst element %.2e of max %.2e\n", what.c_str(), rel,
              worst, scale);
  EXPECT_LE(rel, max_rel) << what;
  EXPECT_LE(worst, 0.25 * scale) << what;
}

// Bit for bit: the index of the first element that differs, -1 when none does.
int64_t first_difference(const std::vector<float>& a, const std::vector<float>& b) {
  if (a.size() != b.size()) return 0;
  for (size_t i = 0; i < a.size(); ++i)
    if (std::memcmp(&a[i], &b[i], sizeof(float)) != 0) return int64_t(i);
  return -1;
}

#if SAECPP_HAS_CUDA
template <class T>
cuda::DeviceBuffer<T> on_device(const std::vector<T>& host, const cuda::Context& ctx) {
  cuda::DeviceBuffer<T> d;
  cuda::upload(d, std::span<const T>(host), ctx.stream(), "test");
  return d;
}
#endif

TEST(CudaKernels, NormRopeGeluMatchTheirCpuReferences) {
  REQUIRE_GPU();
#if SAECPP_HAS_CUDA
  cuda::Context ctx;
  const int64_t rows = 37, d = 300;
  const auto x = test::random_vector(size_t(rows * d), 1, 3.0f);
  const auto w = test::random_vector(size_t(d), 2, 0.5f);
  std::vector<float> ref(x.size());
  ops::rms_norm_gemma(x.data(), w.data(), ref.data(), rows, d, 1e-6f);
  auto dx = on_device(x, ctx);
  auto dw = on_device(w, ctx);
  cuda::DeviceBuffer<float> dy(x.size());
  cuda::DeviceBuffer<uint16_t> dyb(x.size());
  cuda::rms_norm_gemma(ctx, dx.data(), dw.data(), rows, d, 1e-6f, {dy.data(), dyb.data()});
  test::expect_close(cuda::download(dy.data(), x.size(), ctx.stream()), ref, 1e-5, "rms_norm");
  const auto yb = cuda::download(dyb.data(), x.size(), ctx.stream());
  for (size_t i = 0; i < ref.size(); i += 97)
    EXPECT_EQ(yb[i], f32_to_bf16(cuda::download(dy.data(), x.size(), ctx.stream())[i])) << i;

  // The post-norm, residual add and next norm in one kernel: the bits of the three kernels it
  // replaces (and the CPU's formulas), with and without the next norm, at a width of more
  // than one value per thread and at Gemma-2-2b's.
  for (const int64_t width : {d, int64_t(2304)}) {
    SCOPED_TRACE(testing::Message() << "width " << width);
    const size_t n = size_t(rows * width);
    const auto y = test::random_vector(n, 11, 3.0f), h0 = test::random_vector(n, 12, 2.0f);
    const auto w_post = test::random_vector(size_t(width), 13, 0.5f);
    const auto w_next = test::random_vector(size_t(width), 14, 0.5f);
    std::vector<float> x_ref(n), h_ref(h0), xn_ref(n);
    ops::rms_norm_gemma(y.data(), w_post.data(), x_ref.data(), rows, width, 1e-6f);
    for (size_t i = 0; i < n; ++i) h_ref[i] += x_ref[i];
    ops::rms_norm_gemma(h_ref.data(), w_next.data(), xn_ref.data(), rows, width, 1e-6f);
    auto dy2 = on_device(y, ctx);
    auto dwp = on_device(w_post, ctx);
    auto dwn = on_device(w_next, ctx);
    auto dh3 = on_device(h0, ctx);  // the three kernels
    cuda::DeviceBuffer<float> dx3(n), dxn3(n);
    cuda::rms_norm_gemma(ctx, dy2.data(), dwp.data(), rows, width, 1e-6f, {dx3.data(), nullptr});
    cuda::add_into(ctx, dh3.data(), dx3.data(), int64_t(n));
    cuda::rms_norm_gemma(ctx, dh3.data(), dwn.data(), rows, width, 1e-6f, {dxn3.data(), nullptr});
    auto dh1 = on_device(h0, ctx);  // the fused one
    cuda::DeviceBuffer<float> dx1(n), dxn1(n);
    cuda::DeviceBuffer<uint16_t> dxnb1(n);
    cuda::post_norm_add_norm(ctx, dy2.data(), dwp.data(), dh1.data(), dwn.data(), rows, width,
                             1e-6f, dx1.data(), {dxn1.data(), dxnb1.data()});
    const auto down = [&](const cuda::DeviceBuffer<float>& b) {
      return cuda::download(b.data(), n, ctx.stream());
    };
    EXPECT_EQ(first_difference(down(dx1), down(dx3)), -1) << "x";
    EXPECT_EQ(first_difference(down(dh1), down(dh3)), -1) << "h";
    EXPECT_EQ(first_difference(down(dxn1), down(dxn3)), -1) << "next norm";
    test::expect_close(down(dh1), h_ref, 1e-5, "h against the CPU");
    test::expect_close(down(dxn1), xn_ref, 1e-5, "next norm against the CPU");
    const auto xnb = cuda::download(dxnb1.data(), n, ctx.stream());
    const auto xn1 = down(dxn1);
    for (size_t i = 0; i < n; i += 97) EXPECT_EQ(xnb[i], f32_to_bf16(xn1[i])) << i;
    // No next norm and no x: h alone, xn untouched.
    auto dh0 = on_device(h0, ctx);
    SAE_CUDA(cudaMemsetAsync(dxn1.data(), 0xFF, dxn1.bytes(), ctx.stream()));
    cuda::post_norm_add_norm(ctx, dy2.data(), dwp.data(), dh0.data(), nullptr, rows, width, 1e-6f,
                             nullptr, {dxn1.data(), nullptr});
    EXPECT_EQ(first_difference(down(dh0), down(dh3)), -1) << "h without the next norm";
    const auto untouched = cuda::download(
        reinterpret_cast<const uint32_t*>(static_cast<const float*>(dxn1.data())), n, ctx.stream());
    EXPECT_EQ(std::count(untouched.begin(), untouched.end(), 0xFFFFFFFFu), int64_t(n));
  }
  EXPECT_TRUE(cuda::fused_norm_fits(4096));
  EXPECT_FALSE(cuda::fused_norm_fits(4097));

  // RoPE at positions far into a long context (angles of thousands of radians).
  const int64_t tokens = 9, heads = 3, hd = 256;
  auto q = test::random_vector(size_t(tokens * heads * hd), 3);
  std::vector<int64_t> pos64 = {0, 1, 2, 7, 100, 1000, 4095, 5000, 8191};
  std::vector<int32_t> pos32(pos64.begin(), pos64.end());
  auto dq = on_device(q, ctx);
  auto dpos = on_device(pos32, ctx);
  ops::rope_half(q.data(), pos64.data(), tokens, heads, hd, 10000.0);
  cuda::rope_half(ctx, dq.data(), dpos.data(), tokens, heads, hd, 10000.0);
  test::expect_close(cuda::download(dq.data(), q.size(), ctx.stream()), q, 2e-5, "rope");

  const int64_t inter = 301;
  const auto gu = test::random_vector(size_t(tokens * 2 * inter), 4, 2.0f);
  std::vector<float> gref(size_t(tokens * inter));
  for (int64_t t = 0; t < tokens; ++t)
    for (int64_t i = 0; i < inter; ++i)
      gref[size_t(t * inter + i)] =
          ops::gelu_tanh(gu[size_t(t * 2 * inter + i)]) * gu[size_t(t * 2 * inter + inter + i)];
  auto dgu = on_device(gu, ctx);
  cuda::DeviceBuffer<float> dg(gref.size());
  cuda::gelu_mul(ctx, dgu.data(), tokens, inter, {dg.data(), nullptr});
  test::expect_close(cuda::download(dg.data(), gref.size(), ctx.stream()), gref, 1e-5, "gelu");
#endif
}

// Packed prompts of different lengths, GQA, soft-capping, a sliding window shorter than the
// prompts, head dims that are and are not multiples of the warp: against attention_causal run
// on each prompt alone. Both tensor-core kernels too (bf16), and against each other.
TEST(CudaKernels, PackedAttentionMatchesCpuPerPrompt) {
  REQUIRE_GPU();
#if SAECPP_HAS_CUDA
  cuda::Context ctx;
  struct Case {
    int64_t heads, kv, hd;
    float softcap;
    int64_t window;
  };
  for (const Case c :
       {Case{4, 2, 12, 50.0f, 0}, Case{4, 2, 12, 50.0f, 5}, Case{8, 4, 256, 50.0f, 0},
        Case{8, 4, 256, 50.0f, 100}, Case{3, 1, 40, 0.0f, 6}, Case{4, 2, 16, 50.0f, 5},
        Case{2, 2, 128, 0.0f, 70}, Case{4, 1, 64, 50.0f, 0}, Case{2, 1, 32, 0.0f, 0}}) {
    SCOPED_TRACE(testing::Message() << "heads " << c.heads << " kv " << c.kv << " hd " << c.hd
                                    << " window " << c.window);
    // Prompts shorter and longer than a 64-query tile, so that tiles straddle prompts, and one
    // of 5 key tiles (the one-pass kernel's running max changes from tile to tile).
    const std::vector<int64_t> lengths = {7, 1, 13, 30, 150, 64, 90, 300};
    int64_t T = 0;
    std::vector<int32_t> start;
    for (int64_t n : lengths) {
      for (int64_t i = 0; i < n; ++i) start.push_back(int32_t(T));
      T += n;
    }
    const int64_t nq = c.heads * c.hd, nkv = c.kv * c.hd;
    const auto q = test::random_vector(size_t(T * nq), 5, 2.0f);
    const auto k = test::random_vector(size_t(T * nkv), 6, 2.0f);
    const auto v = test::random_vector(size_t(T * nkv), 7);
    const float scale = 1.0f / std::sqrt(float(c.hd));
    std::vector<float> ref(size_t(T * nq));
    for (int64_t a = 0, s = 0; s < int64_t(lengths.size()); a += lengths[size_t(s)], ++s)
      ops::attention_causal(q.data() + a * nq, k.data() + a * nkv, v.data() + a * nkv,
                            ref.data() + a * nq,
                            {lengths[size_t(s)], c.heads, c.kv, c.hd, scale, c.softcap, c.window});
    auto dq = on_device(q, ctx);
    auto dk = on_device(k, ctx);
    auto dv = on_device(v, ctx);
    auto dstart = on_device(start, ctx);
    cuda::DeviceBuffer<float> dout(ref.size());
    const cuda::AttentionDims dims{T, c.heads, c.kv, c.hd, scale, c.softcap, c.window};
    cuda::attention_packed(ctx, dq.data(), dk.data(), dv.data(), dstart.data(), dims,
                           {dout.data(), nullptr});
    test::expect_close(cuda::download(dout.data(), ref.size(), ctx.stream()), ref, 1e-5,
                       "attention");
    if (!cuda::tensor_core_attention(c.hd)) continue;
    // bf16 operands on tensor cores, each kernel against the CPU and the two against each other
    // (the same roundings of q, k, v; P rounded after (two-pass) or before (one-pass) the
    // division by the row's sum).
    std::vector<float> by_kind[2];
    for (const auto kind :
         {cuda::TensorCoreAttention::TwoPass, cuda::TensorCoreAttention::OnePass}) {
      const std::string what =
          std::string(kind == cuda::TensorCoreAttention::OnePass ? "one-pass" : "two-pass") +
          " tensor-core attention hd " + std::to_string(c.hd);
      cuda::DeviceBuffer<uint16_t> dob(ref.size());
      SAE_CUDA(cudaMemsetAsync(dout.data(), 0xFF, dout.bytes(), ctx.stream()));  // NaN: unwritten
      cuda::attention_packed(ctx, dq.data(), dk.data(), dv.data(), dstart.data(), dims,
                             {dout.data(), dob.data()}, true, kind);
      const auto tc = cuda::download(dout.data(), ref.size(), ctx.stream());
      expect_close_in_norm(tc, ref, 2e-2, what);
      const auto tcb = cuda::download(dob.data(), ref.size(), ctx.stream());
      for (size_t i = 0; i < tc.size(); i += 61) EXPECT_EQ(tcb[i], f32_to_bf16(tc[i])) << what << i;
      by_kind[kind == cuda::TensorCoreAttention::OnePass] = tc;
    }
    expect_close_in_norm(by_kind[1], by_kind[0], 1e-2, "one-pass against two-pass");
  }
#endif
}

// Every hook point of every layer and the logits, for a packed batch of the golden prompts plus
// one longer than the sliding window.
struct Captured {
  std::map<std::pair<int, int64_t>, std::vector<float>> acts;
  std::vector<float> logits;
};

TokenBatch golden_batch(const std::string& name, const Gemma2Config& cfg) {
  auto prompts = read_json_file(test::golden("gemma2/" + name + "/prompts.json"))["prompts"];
  TokenBatch b;
  for (const auto& p : prompts) b.add(p.get<std::vector<int32_t>>());
  std::vector<int32_t> longer;
  for (int32_t i = 0; i < 23; ++i) longer.push_back(int32_t((i * 37 + 5) % cfg.vocab_size));
  b.add(longer);
  return b;
}

Captured cpu_run(const Gemma2& m, const TokenBatch& b) {
  Captured c;
  const int64_t H = m.cfg.hidden_size;
  m.forward(
      b, m.cfg.num_layers - 1,
      [&](HookPoint p, int64_t l, float* a, int64_t n) {
        c.acts[{int(p), l}].assign(a, a + n * H);
      },
      nullptr, &c.logits);
  return c;
}

// The hook only reads (hook_writes = false): the fused kernels may run.
Captured device_run(DeviceGemma2& g, const TokenBatch& b) {
  Captured c;
  const int64_t H = g.cfg().hidden_size;
  g.forward(
      b, g.cfg().num_layers - 1,
      [&](HookPoint p, int64_t l, float* a, int64_t n) {
        c.acts[{int(p), l}] = g.to_host(a, n * H);
      },
      &c.logits, false);
  return c;
}

void expect_identical_runs(const Captured& got, const Captured& want, const std::string& what) {
  ASSERT_EQ(got.acts.size(), want.acts.size()) << what;
  for (const auto& [key, acts] : want.acts)
    EXPECT_EQ(first_difference(got.acts.at(key), acts), -1)
        << what << " " << hook_name(HookPoint(key.first), key.second);
  EXPECT_EQ(first_difference(got.logits, want.logits), -1) << what << " logits";
}

// fp32: element by element within `rel`; bf16 (rel = 0): in norm, as expect_close_in_norm.
void expect_same_run(const Captured& got, const Captured& want, double rel,
                     const std::string& what) {
  ASSERT_EQ(got.acts.size(), want.acts.size()) << what;
  auto check = [&](const std::vector<float>& a, const std::vector<float>& b, const std::string& w) {
    if (rel > 0)
      test::expect_close(a, b, rel, w);
    else
      expect_close_in_norm(a, b, 3e-2, w);
  };
  for (const auto& [key, acts] : want.acts)
    check(got.acts.at(key), acts, what + " " + hook_name(HookPoint(key.first), key.second));
  check(got.logits, want.logits, what + " logits");
}

TEST(CudaGemma2, ForwardMatchesCpuAtEveryHookAndInTheLogits) {
  REQUIRE_GPU();
  for (const std::string name : {"gqa_window", "odd_bf16", "sharded"}) {
    SCOPED_TRACE(name);
    const Gemma2 m = Gemma2::load(test::golden("gemma2/" + name + "/model"), {.verbose = false});
    const TokenBatch b = golden_batch(name, m.cfg);
    const Captured want = cpu_run(m, b);
    DeviceGemma2 f32(m, "fp32");
    const Captured f32_run = device_run(f32, b);
    expect_same_run(f32_run, want, 2e-5, name + " fp32");
    // The post-norm, residual add and next norm in one kernel: the same bits.
    f32.set_kernels({.fused_add_norm = true});
    expect_identical_runs(device_run(f32, b), f32_run, name + " fp32, fused add and norm");
    // bf16: the CPU with the same bf16 weights is the reference; what remains is the rounding
    // of the activations that feed each GEMM and attention (8 significant bits) through a few
    // layers, compared in norm.
    const Gemma2 kept = Gemma2::load(test::golden("gemma2/" + name + "/model"),
                                     {.keep_bf16 = true, .verbose = false});
    DeviceGemma2 bf16(kept, "bf16");
    EXPECT_LT(bf16.weight_bytes(), f32.weight_bytes() * 6 / 10);
    const Captured want_bf16 = cpu_run(kept, b), bf16_run = device_run(bf16, b);
    expect_same_run(bf16_run, want_bf16, 0, name + " bf16");
    bf16.set_kernels({.fused_add_norm = true});
    expect_identical_runs(device_run(bf16, b), bf16_run, name + " bf16, fused add and norm");
    bf16.set_kernels({.one_pass_attention = true, .fused_add_norm = true});
    expect_same_run(device_run(bf16, b), want_bf16, 0, name + " bf16, one-pass attention, fused");
  }
}

// A hook that overwrites the activation (splicing an SAE in) changes what follows on the GPU
// exactly as on the CPU, with the fused kernels asked for too (a hook that may write turns
// them off).
TEST(CudaGemma2, HooksThatOverwriteSpliceAsOnTheCpu) {
  REQUIRE_GPU();
  const Gemma2 m = Gemma2::load(test::golden("gemma2/gqa_window/model"), {.verbose = false});
  const TokenBatch b = golden_batch("gqa_window", m.cfg);
  const int64_t H = m.cfg.hidden_size, L = m.cfg.num_layers;
  std::vector<float> cpu_logits, dev_logits;
  m.forward(
      b, L - 1,
      [&](HookPoint p, int64_t l, float* a, int64_t n) {
        if (p == HookPoint::AttnOut && l == 0)
          for (int64_t i = 0; i < n * H; ++i) a[i] *= 0.5f;
      },
      nullptr, &cpu_logits);
  DeviceGemma2 g(m, "fp32");
  g.set_kernels({.fused_add_norm = true});
  g.forward(
      b, L - 1,
      [&](HookPoint p, int64_t l, float* a, int64_t n) {
        if (p != HookPoint::AttnOut || l != 0) return;
        std::vector<float> host = g.to_host(a, n * H);
        for (float& v : host) v *= 0.5f;
#if SAECPP_HAS_CUDA
        SAE_CUDA(cudaMemcpyAsync(a, host.data(), host.size() * 4, cudaMemcpyHostToDevice,
                                 static_cast<cudaStream_t>(g.stream())));
#endif
      },
      &dev_logits);
  test::expect_close(dev_logits, cpu_logits, 2e-5, "spliced logits");
  std::vector<float> plain;
  m.forward(b, L - 1, nullptr, nullptr, &plain);
  double diff = 0;
  for (size_t i = 0; i < plain.size(); ++i)
    diff = std::max(diff, double(std::abs(plain[i] - dev_logits[i])));
  EXPECT_GT(diff, 1e-3) << "the splice changed the logits";
}

TEST(CudaGemma2, BadInputsAreClearErrors) {
  REQUIRE_GPU();
  const Gemma2 m =
      Gemma2::load(test::golden("gemma2/gqa_window/model"), {.last_layer = 0, .verbose = false});
  DeviceGemma2 g(m, "bf16");
  TokenBatch b;
  b.add(std::vector<int32_t>{1, 2, int32_t(m.cfg.vocab_size)});
  EXPECT_THROW(g.forward(b, 0, nullptr), Error);
  TokenBatch ok;
  ok.add(std::vector<int32_t>{1, 2, 3});
  try {
    g.forward(ok, 1, nullptr);
    ADD_FAILURE() << "layer 1 was not loaded";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("not loaded"), std::string::npos) << e.what();
  }
  std::vector<float> logits;
  EXPECT_THROW(g.forward(ok, 0, nullptr, &logits), Error) << "logits need the last layer";
  EXPECT_THROW(DeviceGemma2(m, "fp16"), Error);
}

// `sae activations` and `sae lm-loss` with --device cuda (fp32) give the CPU's numbers; without a
// GPU they say why before loading anything.
TEST(CudaGemma2, CliActivationsAndLmLossOnTheDevice) {
  test::TempDir dir;
  const std::string model = test::golden("gemma2/gqa_window/model");
  const std::string text = " --text 'The quick brown fox jumps over the lazy dog' --text 'Hello'";
  if (!cuda_compiled() || cuda_device_count() == 0) {
    for (const std::string& cmd : {"activations --model " + model + text + " -o " + (dir / "x"),
                                   "lm-loss --model " + model + text})
      for (const std::string& dev : {std::string(" --device cuda")}) {
        const auto r = test::run_cli(cmd + dev);
        EXPECT_EQ(r.exit_code, 1) << r.output;
        EXPECT_TRUE(r.output.find("no CUDA GPU") != std::string::npos ||
                    r.output.find("without CUDA") != std::string::npos)
            << r.output;
        EXPECT_EQ(r.output.find("gemma2:"), std::string::npos) << "checked before loading";
      }
    GTEST_SKIP() << "CUDA test skipped: no GPU is visible (the errors were checked)";
  }
  auto run = [&](const std::string& args) {
    const auto r = test::run_cli(args);
    EXPECT_EQ(r.exit_code, 0) << r.output;
    return r.output;
  };
  run("activations --model " + model + text + " --layers 0-2 -o " + (dir / "cpu.safetensors"));
  run("activations --model " + model + text + " --layers 0-2 --device cuda --precision fp32 -o " +
      (dir / "gpu.safetensors"));
  SafetensorsFile cpu(dir / "cpu.safetensors"), gpu(dir / "gpu.safetensors");
  for (int l = 0; l < 3; ++l) {
    const std::string name = "blocks." + std::to_string(l) + ".hook_resid_post";
    test::expect_close(gpu.read_f32(name), cpu.read_f32(name), 2e-5, name);
  }
  auto ce = [](const std::string& out) {
    return std::stod(out.substr(out.find("cross-entropy ") + 14));
  };
  const double c = ce(run("lm-loss --model " + model + text));
  EXPECT_NEAR(ce(run("lm-loss --model " + model + text + " --device cuda --precision fp32")), c,
              1e-4);
  EXPECT_NEAR(ce(run("lm-loss --model " + model + text + " --device cuda")), c, 5e-2) << "bf16";
}

// `sae eval <sae> --model --device cuda`: the activations, L0/EV and the CE-loss and KL scores
// with the SAE spliced in, all from the GPU forward, equal the CPU's (fp32).
TEST(CudaGemma2, CliEvalWithModelOnTheDevice) {
  REQUIRE_GPU();
  test::TempDir dir;
  const std::string model = test::golden("gemma2/gqa_window/model");
  SaeConfig c;
  c.architecture = Architecture::Standard;
  c.d_in = 64, c.d_sae = 128;
  c.json = nlohmann::ordered_json::object();
  c.json["metadata"] = {{"hook_name", "blocks.1.hook_resid_post"}};
  Sae sae(c);
  sae.W_enc = test::random_vector(sae.W_enc.size(), 11, 0.2f);
  sae.W_dec = test::random_vector(sae.W_dec.size(), 12, 0.2f);
  sae.b_enc = test::random_vector(sae.b_enc.size(), 13, 0.1f);
  save_to_disk(sae, dir / "sae");
  test::write_bytes(dir / "prompts.txt",
                    "Hello world!\nSparse autoencoders decompose the activations.\n");
  auto eval = [&](const std::string& extra) {
    const auto r = test::run_cli("eval " + (dir / "sae") + " --model " + model + " --text-file " +
                                 (dir / "prompts.txt") + " --json" + extra);
    EXPECT_EQ(r.exit_code, 0) << r.output;
    return nlohmann::json::parse(r.output.substr(r.output.find('{')));
  };
  const auto cpu = eval(""), gpu = eval(" --device cuda --precision fp32");
  EXPECT_NEAR(gpu["explained_variance"].get<double>(), cpu["explained_variance"].get<double>(),
              1e-4);
  EXPECT_NEAR(gpu["l0"].get<double>(), cpu["l0"].get<double>(), 0.05);
  for (const char* key : {"ce_clean", "ce_sae", "ce_zero_ablation", "kl_sae"})
    EXPECT_NEAR(gpu["lm_score"][key].get<double>(), cpu["lm_score"][key].get<double>(), 1e-3)
        << key;
  EXPECT_EQ(gpu["lm_score"]["n_predictions"], cpu["lm_score"]["n_predictions"]);
}

// DeviceGemma2::unembed: host rows times the tied embedding, in vocabulary slices (a vocabulary
// of 70000 takes three), against the host's GEMM; fp32 tight, bf16 in norm.
TEST(CudaGemma2, UnembedMatchesTheHost) {
  REQUIRE_GPU();
  Gemma2 m = Gemma2::load(test::golden("gemma2/gqa_window/model"), {.verbose = false});
  const int64_t H = m.cfg.hidden_size, V = 70000, n = 5;
  m.cfg.vocab_size = V;
  m.embed.rows = V;
  m.embed.f32 = test::random_vector(size_t(V * H), 31, 0.5f);
  m.embed.bf16.clear();
  const std::vector<float> rows = test::random_vector(size_t(n * H), 32, 1.0f);
  std::vector<float> want(size_t(n * V));
  ops::gemm(ops::Trans::No, ops::Trans::Yes, n, V, H, 1.0f, rows.data(), H, m.embed.f32.data(), H,
            0.0f, want.data(), V);
  DeviceGemma2 f32(m, "fp32");
  test::expect_close(f32.unembed(rows, n), want, 2e-5, "unembed fp32");
  DeviceGemma2 bf16(m, "bf16");
  expect_close_in_norm(bf16.unembed(rows, n), want, 1e-2, "unembed bf16");
  EXPECT_TRUE(f32.unembed({}, 0).empty());
}

// `sae dashboard --device cuda`: the forward, the encoder and the logit effects on the GPU give
// the CPU's dashboard (fp32): the same tokens and windows, each latent's firing count, top
// activations and logit tables (allowing a flip where f32 sums differ in their last bits);
// a bf16 forward runs too and says so.
TEST(CudaGemma2, DashboardOnTheDeviceEqualsTheCpus) {
  REQUIRE_GPU();
  test::TempDir dir;
  SaeConfig c;
  c.architecture = Architecture::TopK;
  c.d_in = 64, c.d_sae = 48, c.k = 6;
  c.json = nlohmann::ordered_json::object();
  c.json["metadata"] = {{"hook_name", "blocks.1.hook_resid_post"},
                        {"model_name", "tiny-gemma2"},
                        {"training_architecture_details", {{"matryoshka_widths", {16, 48}}}}};
  Sae sae(c);
  sae.W_enc = test::random_vector(sae.W_enc.size(), 41, 1.0f);
  sae.W_dec = test::random_vector(sae.W_dec.size(), 42, 0.1f);
  save_to_disk(sae, dir / "sae");
  test::write_bytes(dir / "docs.jsonl", test::tiny_corpus_jsonl());
  auto run = [&](const std::string& out, const std::string& extra) {
    const auto r = test::run_cli(
        "dashboard " + (dir / "sae") + " --model " + test::golden("gemma2/gqa_window/model") +
        " --dataset " + (dir / "docs.jsonl") +
        " --tokens 1500 --context-size 16 --holdout-every 3 -o " + (dir / out) + extra);
    EXPECT_EQ(r.exit_code, 0) << r.output;
    const std::string js = test::read_bytes(dir / (out + "/data/latents-000.js"));
    const std::string prefix = "saeDash.add(\"latents\", 0, ";
    EXPECT_EQ(js.rfind(prefix, 0), 0u);
    return std::pair{
        read_json_file(dir / (out + "/dashboard.json")),
        nlohmann::json::parse(js.substr(prefix.size(), js.rfind(");") - prefix.size()))};
  };
  const auto [cpu_run, cpu] = run("cpu", "");
  const auto [gpu_run, gpu] = run("gpu", " --device cuda --precision fp32");
  EXPECT_EQ(gpu_run["meta"]["device"], "cuda");
  EXPECT_EQ(gpu_run["meta"]["tokens"], cpu_run["meta"]["tokens"]);
  EXPECT_EQ(gpu_run["meta"]["windows"], cpu_run["meta"]["windows"]);
  int same_fires = 0, same_logits = 0;
  for (int f = 0; f < 48; ++f) {
    const auto &a = gpu[std::to_string(f)], &b = cpu[std::to_string(f)];
    const int64_t fa = a["fires"].get<int64_t>(), fb = b["fires"].get<int64_t>();
    EXPECT_LE(std::abs(fa - fb), 2) << "latent " << f;
    same_fires += fa == fb;
    same_logits += a["logits_pos"] == b["logits_pos"] && a["logits_neg"] == b["logits_neg"];
    // Values are written to 4 significant digits: a last-bit difference may round 1e-3 apart.
    EXPECT_NEAR(a["max"].get<double>(), b["max"].get<double>(), 2e-3 * b["max"].get<double>());
    EXPECT_LE(std::abs(int64_t(a["top"].size()) - int64_t(b["top"].size())), 2) << "latent " << f;
    for (size_t i = 0; i < std::min(a["top"].size(), b["top"].size()); ++i)
      EXPECT_NEAR(a["top"][i]["v"].get<double>(), b["top"][i]["v"].get<double>(),
                  2e-3 * b["top"][i]["v"].get<double>() + 1e-5)
          << "latent " << f << " rank " << i;
  }
  EXPECT_GE(same_fires, 46);
  EXPECT_GE(same_logits, 46);
  const auto [bf16_run, bf16] = run("bf16", " --device cuda");
  EXPECT_EQ(bf16_run["meta"]["forward_precision"], "bf16");
  EXPECT_EQ(bf16_run["meta"]["tokens"], cpu_run["meta"]["tokens"]);
  EXPECT_EQ(bf16.size(), 48u);
}

// The activation store on the GPU (rows in device memory, shuffled there) serves the CPU
// store's batches: the same windows, rows and permutation, through refills, from the fp32
// forward (equal to the CPU's at 2e-5); so do a GPU store that fills ahead (its forwards on
// the store's thread, on the GPU made current there, while the batches are read) and one whose
// rows are in pinned host memory.
TEST(CudaRelease, DeviceStoreServesTheCpuStoresBatches) {
  REQUIRE_GPU();
  test::TempDir dir;
  const std::string model = test::golden("gemma2/gqa_window/model");
  test::write_bytes(dir / "docs.jsonl", test::tiny_corpus_jsonl());
  data::CorpusConfig cc;
  cc.shards = {dir / "docs.jsonl"};
  cc.holdout_every = 0;
  const Gemma2 m = Gemma2::load(model, {.verbose = false});
  DeviceGemma2 g(m, "fp32");
  const Tokenizer tok(model + "/tokenizer.model");
  const std::vector<int32_t> special = {tok.bos_id(), tok.eos_id(), tok.pad_id()};
  pipeline::StoreConfig sc = test::tiny_store_config(tok);
  sc.seed = 5;
  const std::vector<int64_t> layers = {0, 2};
  const int64_t d = m.cfg.hidden_size, n = 20 * d;
  data::Corpus c_cpu(cc, data::Split::Train), c_gpu(cc, data::Split::Train),
      c_ahead(cc, data::Split::Train), c_host(cc, data::Split::Train);
  pipeline::WindowStream w_cpu(c_cpu, tok, sc.windows), w_gpu(c_gpu, tok, sc.windows),
      w_ahead(c_ahead, tok, sc.windows), w_host(c_host, tok, sc.windows);
  pipeline::ActivationStore cpu(m, w_cpu, HookPoint::ResidPost, layers, sc, special);
  pipeline::ActivationStore gpu(g, w_gpu, HookPoint::ResidPost, layers, sc, special);
  // The rows in pinned host memory that the GPU's kernels read and write across the bus.
  pipeline::ActivationStore host(g, w_host, HookPoint::ResidPost, layers, sc, special, true);
  EXPECT_EQ(host.device_bytes(), 0);
  EXPECT_EQ(host.pinned_host_bytes(), gpu.device_bytes());
  // A second model: the thread's forwards must not share buffers with the other store's.
  DeviceGemma2 g_ahead(m, "fp32");
  pipeline::ActivationStore ahead(g_ahead, w_ahead, HookPoint::ResidPost, layers, sc, special);
  ahead.fill_ahead();
  EXPECT_TRUE(gpu.on_device());
  EXPECT_GT(gpu.device_bytes(), 0);
  std::vector<std::vector<float>> want(2, std::vector<float>(size_t(n)));
  std::vector<const float*> view, view_ahead, view_host;
  for (int b = 0; b < 30; ++b) {  // 30 batches of 20: several refills of a 192-row buffer
    ASSERT_TRUE(cpu.next_batch({want[0].data(), want[1].data()}));
    ASSERT_TRUE(gpu.next_batch_view(view));
    ASSERT_TRUE(ahead.next_batch_view(view_ahead));
    ASSERT_TRUE(host.next_batch_view(view_host));
    ASSERT_EQ(view.size(), 2u);
    ASSERT_EQ(view_ahead.size(), 2u);
    for (int s = 0; s < 2; ++s) {
      const std::string what = "batch " + std::to_string(b) + " layer " + std::to_string(layers[s]);
      test::expect_close(g.to_host(view[size_t(s)], n), want[size_t(s)], 2e-5, what);
      // Read while the thread may be forwarding the next fill into other rows.
      std::vector<float> got(static_cast<size_t>(n));
#if SAECPP_HAS_CUDA
      SAE_CUDA(
          cudaMemcpy(got.data(), view_ahead[size_t(s)], size_t(n) * 4, cudaMemcpyDeviceToHost));
#endif
      test::expect_close(got, want[size_t(s)], 2e-5, what + " (filled ahead)");
      test::expect_close(g.to_host(view_host[size_t(s)], n), want[size_t(s)], 2e-5,
                         what + " (rows on the host)");
    }
  }
  EXPECT_EQ(gpu.tokens_forwarded(), cpu.tokens_forwarded());
  EXPECT_GE(ahead.tokens_forwarded(), cpu.tokens_forwarded());  // it reads ahead
}

// `sae release --device cuda` (the forward, the store and the SAE steps on the GPU; fp32) on the
// tiny model against the CPU release: the same layout, every SAE loads, held-out numbers close
// (the two train on the same batches; the steps differ in summation order), the plan and the
// measured peak printed; the forward overlapped with the steps or not, and the store's rows on
// the device or pinned on the host, give the same SAEs; a stop and --resume on the GPU finishes.
TEST(CudaRelease, ReleaseOnTheDeviceAgreesWithTheCpu) {
  REQUIRE_GPU();
  test::TempDir dir;
  const std::string model = test::golden("gemma2/gqa_window/model");
  test::write_bytes(dir / "docs.jsonl", test::tiny_corpus_jsonl());
  auto release = [&](const std::string& layers, const std::string& variants) {
    return "release --model " + model + " --dataset " + (dir / "docs.jsonl") + " --layers " +
           layers + " --variants " + variants +
           " --tokens 20000 --model-name tiny-gemma2 --context-size 16 "
           "--prompts-per-forward 4 --n-batches-in-buffer 4 --holdout-every 10 "
           "--heldout-tokens 512 --ce-windows 2 --log-every 50 --set sae.d_sae=64 --set sae.k=4 "
           "--set sae.matryoshka_widths=[16,64] --set training.batch_size=64 "
           "--set training.checkpoint_every_steps=50 --set optimizer.lr=3e-3 -o ";
  };
  const std::string args = release("0,2", "standard,snap");
  auto run = [&](const std::string& a) {
    const auto r = test::run_cli(a);
    EXPECT_EQ(r.exit_code, 0) << a << "\n" << r.output;
    return r.output;
  };
  run(args + (dir / "cpu"));
  const std::string log = run(args + (dir / "gpu") + " --device cuda --precision fp32");
  EXPECT_NE(log.find("GPU memory plan: model"), std::string::npos) << log;
  EXPECT_NE(log.find("GPU memory: peak"), std::string::npos) << log;
  const auto cpu = read_json_file(dir / "cpu/release.json");
  const auto gpu = read_json_file(dir / "gpu/release.json");
  EXPECT_EQ(gpu["device"]["forward"], "fp32");
  EXPECT_NE(test::read_bytes(dir / "gpu/README.md").find("trained on "), std::string::npos);
  EXPECT_FALSE(gpu["recipe"].contains("model_bf16_matmul"));
  EXPECT_EQ(gpu["tokens_forwarded"], cpu["tokens_forwarded"]);
  for (const std::string v : {"standard", "snap"})
    for (const std::string h : {"blocks.0.hook_resid_post", "blocks.2.hook_resid_post"}) {
      const auto& a = gpu["results"][v][h];
      const auto& b = cpu["results"][v][h];
      EXPECT_NEAR(a["explained_variance"].get<double>(), b["explained_variance"].get<double>(),
                  0.02)
          << v << " " << h;
      EXPECT_NEAR(a["l0"].get<double>(), b["l0"].get<double>(), 0.1 * b["l0"].get<double>());
      EXPECT_NEAR(a["ce_loss_score"].get<double>(), b["ce_loss_score"].get<double>(), 0.05);
      EXPECT_EQ(a["training_tokens"], b["training_tokens"]);
      EXPECT_NO_THROW(load_from_disk(dir / ("gpu/" + v + "/" + h)));
    }
  // The forward beside the SAE steps (the default) or between them: the same batches, so the
  // same SAEs bit for bit (the steps are deterministic on one GPU).
  EXPECT_NE(log.find("beside the SAE steps"), std::string::npos) << log;
  const std::string in_turn =
      run(args + (dir / "in_turn") + " --device cuda --precision fp32 --no-overlap");
  EXPECT_EQ(in_turn.find("beside the SAE steps"), std::string::npos) << in_turn;
  for (const std::string v : {"standard", "snap"})
    for (const std::string h : {"blocks.0.hook_resid_post", "blocks.2.hook_resid_post"}) {
      const std::string f = "/" + v + "/" + h + "/sae_weights.safetensors";
      EXPECT_TRUE(test::read_bytes(dir / ("in_turn" + f)) == test::read_bytes(dir / ("gpu" + f)))
          << v << " " << h << ": --no-overlap trained other weights";
    }
  // The store's rows in pinned host memory: the same batches, so the same SAEs.
  const std::string on_host =
      run(args + (dir / "on_host") + " --device cuda --precision fp32 --activation-store host");
  EXPECT_NE(on_host.find("in pinned host memory"), std::string::npos) << on_host;
  for (const std::string v : {"standard", "snap"}) {
    const std::string f = "/" + v + "/blocks.2.hook_resid_post/sae_weights.safetensors";
    EXPECT_TRUE(test::read_bytes(dir / ("on_host" + f)) == test::read_bytes(dir / ("gpu" + f)))
        << v << ": the host store trained other weights";
  }
  // Stopped and resumed on the GPU.
  run(args + (dir / "resumed") + " --device cuda --precision fp32 --stop-at-step 100");
  run(args + (dir / "resumed") + " --device cuda --precision fp32 --resume");
  const auto resumed = read_json_file(dir / "resumed/release.json");
  EXPECT_NEAR(
      resumed["results"]["snap"]["blocks.2.hook_resid_post"]["explained_variance"].get<double>(),
      gpu["results"]["snap"]["blocks.2.hook_resid_post"]["explained_variance"].get<double>(), 0.02);
  // bf16 forward: recorded as a bf16-matmul recipe (release-merge keeps it apart).
  run(release("2", "snap") + (dir / "bf16") + " --device cuda");
  EXPECT_EQ(read_json_file(dir / "bf16/release.json")["recipe"]["model_bf16_matmul"], true);
}

// An SAE that keeps diverging on the GPU (two outlier rows in layer 2's cache shards, one
// rollback allowed) is set aside as on the CPU: its device memory freed, the others finishing
// near the CPU release's, exit 2.
TEST(CudaRelease, AnSaeThatKeepsDivergingIsSetAsideOnTheDevice) {
  REQUIRE_GPU();
  test::TempDir dir;
  test::write_bytes(dir / "docs.jsonl", test::tiny_corpus_jsonl());
  const std::string args = test::diverging_release_args(dir / "docs.jsonl", dir / "cache");
  auto r = test::run_cli(args + (dir / "cpu"));
  ASSERT_EQ(r.exit_code, 2) << r.output;
  r = test::run_cli(args + (dir / "gpu") + " --device cuda --precision fp32");
  ASSERT_EQ(r.exit_code, 2) << r.output;
  EXPECT_NE(r.output.find("snap/blocks.2.hook_resid_post set aside at step "), std::string::npos)
      << r.output;
  const auto cpu = read_json_file(dir / "cpu/release.json");
  const auto gpu = read_json_file(dir / "gpu/release.json");
  for (const std::string variant : {"standard", "snap"}) {
    SCOPED_TRACE(variant);
    EXPECT_EQ(gpu["results"][variant]["blocks.2.hook_resid_post"]["failed"]["rollbacks"], 1);
    EXPECT_NEAR(
        gpu["results"][variant]["blocks.0.hook_resid_post"]["explained_variance"].get<double>(),
        cpu["results"][variant]["blocks.0.hook_resid_post"]["explained_variance"].get<double>(),
        0.02);
    EXPECT_NO_THROW(load_from_disk(dir / ("gpu/" + variant + "/blocks.0.hook_resid_post")));
  }
}

// `sae cache --device cuda` writes the CPU forward's shards (fp32), and records a bf16 forward
// as other activations (a bf16-matmul cache).
TEST(CudaRelease, CacheOnTheDeviceWritesTheCpuShards) {
  REQUIRE_GPU();
  test::TempDir dir;
  const std::string model = test::golden("gemma2/gqa_window/model");
  test::write_bytes(dir / "docs.jsonl", test::tiny_corpus_jsonl());
  const std::string args = "cache --model " + model + " --dataset " + (dir / "docs.jsonl") +
                           " --layers 0,2 --shard-tokens 1024 --context-size 16 "
                           "--prompts-per-forward 4 --holdout-every 0 --tokens 2048 -o ";
  const std::string cpu = dir / "cpu", gpu = dir / "gpu", bf16 = dir / "bf16";
  for (const auto& [out, extra] :
       {std::pair{cpu, ""}, std::pair{gpu, " --device cuda --precision fp32"},
        std::pair{bf16, " --device cuda"}}) {
    const auto r = test::run_cli(args + out + extra);
    ASSERT_EQ(r.exit_code, 0) << r.output;
  }
  for (const char* hook : {"blocks.0.hook_resid_post", "blocks.2.hook_resid_post"})
    for (const char* shard : {"shard-00000.safetensors", "shard-00001.safetensors"}) {
      SafetensorsFile a(gpu + "/" + hook + "/" + shard), b(cpu + "/" + hook + "/" + shard);
      test::expect_close(a.read_f32("activations"), b.read_f32("activations"), 2e-5, hook);
      EXPECT_EQ(a.read_i64("tokens"), b.read_i64("tokens"));
    }
  EXPECT_FALSE(read_json_file(gpu + "/cache.json").contains("bf16_matmul"));
  EXPECT_EQ(read_json_file(bf16 + "/cache.json")["bf16_matmul"], true);
}

// A release whose SAEs do not fit the GPU stops before allocating, saying what fits.
TEST(CudaRelease, PlanRefusesWhatDoesNotFit) {
  REQUIRE_GPU();
  test::TempDir dir;
  const std::string model = test::golden("gemma2/gqa_window/model");
  test::write_bytes(dir / "docs.jsonl", test::tiny_corpus_jsonl());
  const auto r = test::run_cli(
      "release --model " + model + " --dataset " + (dir / "docs.jsonl") +
      " --layers 0,2 --tokens 20000 --context-size 16 --device cuda --set sae.d_sae=268435456 "
      "--set sae.k=4 --set sae.matryoshka_widths=[16,268435456] -o " +
      (dir / "out"));
  EXPECT_EQ(r.exit_code, 1) << r.output;
  EXPECT_NE(r.output.find("not even one layer"), std::string::npos) << r.output;
  EXPECT_EQ(r.output.find("out of GPU memory"), std::string::npos) << r.output;
  EXPECT_FALSE(std::filesystem::exists(dir / "out/release.json"));
}

TEST(CudaGemma2, WithoutAGpuTheConstructorSaysWhy) {
  if (cuda_compiled() && cuda_device_count() > 0) GTEST_SKIP() << "a GPU is visible";
  const Gemma2 m =
      Gemma2::load(test::golden("gemma2/gqa_window/model"), {.last_layer = 0, .verbose = false});
  try {
    DeviceGemma2 g(m, "bf16");
    ADD_FAILURE() << "constructed without a GPU";
  } catch (const Error& e) {
    const std::string msg = e.what();
    EXPECT_TRUE(msg.find("CUDA") != std::string::npos || msg.find("GPU") != std::string::npos)
        << msg;
  }
}

// The kernel sets by name (SAECPP_FORWARD_KERNELS), checked in every build; on a GPU the
// constructor takes the variable and refuses a bad name.
TEST(CudaGemma2, KernelSetsByName) {
  using K = DeviceGemma2::Kernels;
  auto same = [](K a, K b) {
    return a.one_pass_attention == b.one_pass_attention && a.fused_add_norm == b.fused_add_norm;
  };
  EXPECT_TRUE(same(DeviceGemma2::kernels_named("baseline"), K{}));
  EXPECT_TRUE(same(DeviceGemma2::kernels_named("one-pass"), K{.one_pass_attention = true}));
  EXPECT_TRUE(same(DeviceGemma2::kernels_named("fused"), K{.fused_add_norm = true}));
  EXPECT_TRUE(same(DeviceGemma2::kernels_named("new"), K{true, true}));
  try {
    DeviceGemma2::kernels_named("fast");
    ADD_FAILURE() << "a bad name was taken";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("SAECPP_FORWARD_KERNELS"), std::string::npos) << e.what();
  }
  if (!cuda_compiled() || cuda_device_count() == 0) return;
  const Gemma2 m =
      Gemma2::load(test::golden("gemma2/gqa_window/model"), {.last_layer = 0, .verbose = false});
  setenv("SAECPP_FORWARD_KERNELS", "new", 1);
  EXPECT_TRUE(same(DeviceGemma2(m, "bf16").kernels(), K{true, true}));
  setenv("SAECPP_FORWARD_KERNELS", "fast", 1);
  EXPECT_THROW(DeviceGemma2(m, "bf16"), Error);
  unsetenv("SAECPP_FORWARD_KERNELS");
  EXPECT_TRUE(same(DeviceGemma2(m, "bf16").kernels(), K{}));
}

}  // namespace
}  // namespace sae::model

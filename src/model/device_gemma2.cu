// DeviceGemma2 (device_gemma2.h): Gemma2::forward step by step, on one stream. GEMMs through
// cuBLAS (ops/cuda/gemm.h), the rest through ops/cuda/transformer.h.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>

#include "core/device.h"
#include "core/dtype.h"
#include "core/error.h"
#include "model/device_gemma2.h"
#include "ops/cuda/gemm.h"
#include "ops/cuda/runtime.h"
#include "ops/cuda/transformer.h"

namespace sae::model {

using cuda::ActOut;
using cuda::DeviceBuffer;

namespace {

// A weight matrix [rows, cols] on the device, bf16 or fp32.
struct DeviceWeight {
  int64_t rows = 0, cols = 0;
  DeviceBuffer<uint16_t> bf16;
  DeviceBuffer<float> f32;

  cuda::Operand operand() const {
    return bf16.size() ? cuda::Operand{bf16.data(), true, cols}
                       : cuda::Operand{f32.data(), false, cols};
  }
  int64_t bytes() const { return int64_t(bf16.bytes() + f32.bytes()); }
};

// Host rows, in the device precision; `parts` are stacked by rows (e.g. gate over up).
DeviceWeight upload_weight(std::initializer_list<const Weight*> parts, bool bf16, cudaStream_t s,
                           const char* what) {
  DeviceWeight w;
  w.cols = (*parts.begin())->cols;
  for (const Weight* p : parts) {
    SAE_CHECK(p->cols == w.cols, "stacked weights differ in width");
    w.rows += p->rows;
  }
  const size_t n = size_t(w.rows * w.cols);
  if (bf16) {
    std::vector<uint16_t> host;
    host.reserve(n);
    for (const Weight* p : parts)
      if (!p->bf16.empty())
        host.insert(host.end(), p->bf16.begin(), p->bf16.end());
      else
        for (float v : p->f32) host.push_back(f32_to_bf16(v));
    cuda::upload(w.bf16, std::span<const uint16_t>(host), s, what);
  } else {
    std::vector<float> host;
    host.reserve(n);
    for (const Weight* p : parts)
      if (!p->f32.empty())
        host.insert(host.end(), p->f32.begin(), p->f32.end());
      else
        for (uint16_t v : p->bf16) host.push_back(bf16_to_f32(v));
    cuda::upload(w.f32, std::span<const float>(host), s, what);
  }
  return w;
}

struct DeviceLayer {
  DeviceBuffer<float> input_norm, post_attn_norm, pre_ff_norm, post_ff_norm;
  DeviceWeight q, k, v, o, gate_up, down;
};

}  // namespace

struct DeviceGemma2::Impl {
  Gemma2Config cfg;
  bool bf16 = true;
  cuda::Precision prec = cuda::Precision::Bf16;
  Kernels kernels;
  cuda::Context ctx;
  DeviceWeight embed;
  DeviceBuffer<float> final_norm;
  std::vector<DeviceLayer> layers;
  // Activations, grown to the largest batch seen.
  DeviceBuffer<int32_t> ids, pos, start;
  DeviceBuffer<float> h, x, proj, q, k, v, gu, logits;
  DeviceBuffer<float> att_f32, act_f32;     // GEMM operands in fp32 mode
  DeviceBuffer<uint16_t> xb, att_b, act_b;  // ... and in bf16 mode

  // The GEMM operand view of an activation [rows, cols] written through ActOut `o`.
  cuda::Operand operand(const ActOut& o, int64_t cols) const {
    return bf16 ? cuda::Operand{o.bf16, true, cols} : cuda::Operand{o.f32, false, cols};
  }
  ActOut act_out(DeviceBuffer<float>& f, DeviceBuffer<uint16_t>& b, size_t n, const char* what) {
    if (bf16) {
      b.resize(n, what);
      return {nullptr, b.data()};
    }
    f.resize(n, what);
    return {f.data(), nullptr};
  }
  // out (host, [T, vocab]) = a [T, hidden] @ embed^T, soft-capped at `cap` when cap > 0; in
  // slices of the vocabulary, so that the device's [T, slice] stays small. Synchronises.
  void project_vocab(const cuda::Operand& a, int64_t T, float cap, float* out) {
    const int64_t V = cfg.vocab_size, H = cfg.hidden_size, slice = 32768;
    logits.resize(size_t(T * std::min(V, slice)), "logits");
    for (int64_t r0 = 0; r0 < V; r0 += slice) {
      const int64_t n = std::min(V, r0 + slice) - r0;
      cuda::Operand w = embed.operand();
      w.data = bf16 ? static_cast<const void*>(embed.bf16.data() + r0 * H)
                    : static_cast<const void*>(embed.f32.data() + r0 * H);
      cuda::gemm(ctx, ops::Trans::No, ops::Trans::Yes, T, n, H, 1.0f, a, w, 0.0f, logits.data(), n,
                 prec);
      if (cap > 0) cuda::soft_cap(ctx, logits.data(), T * n, cap);
      SAE_CUDA(cudaMemcpy2DAsync(out + r0, size_t(V) * 4, logits.data(), size_t(n) * 4,
                                 size_t(n) * 4, size_t(T), cudaMemcpyDeviceToHost, ctx.stream()));
    }
    ctx.sync();
  }
  // y [T, w.rows] = a [T, w.cols] @ w^T
  void linear(const cuda::Operand& a, const DeviceWeight& w, float* y, int64_t T) {
    cuda::gemm(ctx, ops::Trans::No, ops::Trans::Yes, T, w.rows, w.cols, 1.0f, a, w.operand(), 0.0f,
               y, w.rows, prec);
  }
};

DeviceGemma2::DeviceGemma2(const Gemma2& host, const std::string& precision) {
  require_device(Device::Cuda);
  impl_ = std::make_unique<Impl>();
  Impl& m = *impl_;
  m.cfg = host.cfg;
  check_precision("gemma2", precision);
  m.bf16 = precision == "bf16";
  m.prec = m.bf16 ? cuda::Precision::Bf16 : cuda::Precision::Fp32;
  if (const char* env = std::getenv("SAECPP_FORWARD_KERNELS"); env && *env) {
    m.kernels = kernels_named(env);
    std::fprintf(stderr, "gemma2: forward kernels '%s' (SAECPP_FORWARD_KERNELS)\n", env);
  }
  const cudaStream_t s = m.ctx.stream();
  m.embed = upload_weight({&host.embed}, m.bf16, s, "embedding");
  cuda::upload(m.final_norm, std::span<const float>(host.final_norm), s, "final norm");
  for (const Gemma2Layer& L : host.layers) {
    DeviceLayer& d = m.layers.emplace_back();
    cuda::upload(d.input_norm, std::span<const float>(L.input_norm), s, "norm");
    cuda::upload(d.post_attn_norm, std::span<const float>(L.post_attn_norm), s, "norm");
    cuda::upload(d.pre_ff_norm, std::span<const float>(L.pre_ff_norm), s, "norm");
    cuda::upload(d.post_ff_norm, std::span<const float>(L.post_ff_norm), s, "norm");
    d.q = upload_weight({&L.q_proj}, m.bf16, s, "q_proj");
    d.k = upload_weight({&L.k_proj}, m.bf16, s, "k_proj");
    d.v = upload_weight({&L.v_proj}, m.bf16, s, "v_proj");
    d.o = upload_weight({&L.o_proj}, m.bf16, s, "o_proj");
    d.gate_up = upload_weight({&L.gate_proj, &L.up_proj}, m.bf16, s, "gate_proj + up_proj");
    d.down = upload_weight({&L.down_proj}, m.bf16, s, "down_proj");
  }
}

DeviceGemma2::~DeviceGemma2() = default;

const Gemma2Config& DeviceGemma2::cfg() const {
  return impl_->cfg;
}
int64_t DeviceGemma2::n_layers_loaded() const {
  return int64_t(impl_->layers.size());
}
void* DeviceGemma2::stream() const {
  return impl_->ctx.stream();
}

void DeviceGemma2::set_kernels(Kernels k) {
  impl_->kernels = k;
}

DeviceGemma2::Kernels DeviceGemma2::kernels() const {
  return impl_->kernels;
}

int64_t DeviceGemma2::weight_bytes() const {
  const Impl& m = *impl_;
  int64_t b = m.embed.bytes() + int64_t(m.final_norm.bytes());
  for (const DeviceLayer& d : m.layers)
    b += int64_t(d.input_norm.bytes() * 4) + d.q.bytes() + d.k.bytes() + d.v.bytes() + d.o.bytes() +
         d.gate_up.bytes() + d.down.bytes();
  return b;
}

std::vector<float> DeviceGemma2::to_host(const float* device_act, int64_t n) const {
  return cuda::download(device_act, size_t(n), impl_->ctx.stream());
}

void DeviceGemma2::to_device(const std::vector<float>& host, float* device_act) const {
  SAE_CUDA(cudaMemcpyAsync(device_act, host.data(), host.size() * sizeof(float),
                           cudaMemcpyHostToDevice, impl_->ctx.stream()));
  SAE_CUDA(cudaStreamSynchronize(impl_->ctx.stream()));
}

void DeviceGemma2::forward(const TokenBatch& batch, int64_t last_layer, const DeviceHookFn& hook,
                           std::vector<float>* logits, bool hook_writes) {
  Impl& m = *impl_;
  const Gemma2Config& c = m.cfg;
  const int64_t T = batch.n_tokens(), H = c.hidden_size, I = c.intermediate_size;
  const int64_t nq = c.num_heads * c.head_dim, nkv = c.num_kv_heads * c.head_dim;
  if (last_layer < 0 || last_layer >= c.num_layers) fail("forward", "last_layer", "out of range");
  if (last_layer >= int64_t(m.layers.size()))
    fail("forward", "last_layer",
         cat("layer ", last_layer, " was not loaded (loaded 0..", int64_t(m.layers.size()) - 1,
             ")"));
  if (logits && last_layer != c.num_layers - 1)
    fail("forward", "logits", "the logits need the model's last layer");
  const std::vector<int64_t> pos64 = check_batch(batch, c);
  std::vector<int32_t> pos(static_cast<size_t>(T)), start(static_cast<size_t>(T));
  for (int64_t t = 0; t < T; ++t)
    pos[size_t(t)] = int32_t(pos64[size_t(t)]), start[size_t(t)] = int32_t(t - pos64[size_t(t)]);

  const cuda::Context& ctx = m.ctx;
  const cudaStream_t s = ctx.stream();
  cuda::upload(m.ids, std::span<const int32_t>(batch.ids), s, "token ids");
  cuda::upload(m.pos, std::span<const int32_t>(pos), s, "positions");
  cuda::upload(m.start, std::span<const int32_t>(start), s, "prompt starts");
  m.h.resize(size_t(T * H), "residual stream");
  m.x.resize(size_t(T * H), "block output");
  m.proj.resize(size_t(T * H), "projection output");
  m.q.resize(size_t(T * nq), "q");
  m.k.resize(size_t(T * nkv), "k");
  m.v.resize(size_t(T * nkv), "v");
  m.gu.resize(size_t(T * 2 * I), "gate and up");
  const ActOut xn = m.act_out(m.act_f32, m.xb, size_t(T * std::max(H, I)), "normed input");
  const ActOut att = m.act_out(m.att_f32, m.att_b, size_t(T * nq), "attention output");
  float* h = m.h.data();
  float* x = m.x.data();
  const float eps = float(c.rms_norm_eps);

  cuda::embed_rows(ctx, m.ids.data(), T, m.embed.operand().data, m.bf16, H,
                   float(std::sqrt(double(H))), h);
  const bool fuse = m.kernels.fused_add_norm && !(hook && hook_writes) && cuda::fused_norm_fits(H);
  const auto attention = m.kernels.one_pass_attention ? cuda::TensorCoreAttention::OnePass
                                                      : cuda::TensorCoreAttention::TwoPass;
  float* x_for_hook = hook ? x : nullptr;  // the fused kernel writes x only for a hook
  bool xn_ready = false;  // xn already holds this layer's input norm (the last fused kernel)
  for (int64_t l = 0; l <= last_layer; ++l) {
    const DeviceLayer& L = m.layers[size_t(l)];
    if (hook) hook(HookPoint::ResidPre, l, h, T);
    // Attention block: h += post_attn_norm(o_proj(attn(rope(q), rope(k), v))).
    if (!xn_ready) cuda::rms_norm_gemma(ctx, h, L.input_norm.data(), T, H, eps, xn);
    m.linear(m.operand(xn, H), L.q, m.q.data(), T);
    m.linear(m.operand(xn, H), L.k, m.k.data(), T);
    m.linear(m.operand(xn, H), L.v, m.v.data(), T);
    cuda::rope_half(ctx, m.q.data(), m.pos.data(), T, c.num_heads, c.head_dim, c.rope_theta);
    cuda::rope_half(ctx, m.k.data(), m.pos.data(), T, c.num_kv_heads, c.head_dim, c.rope_theta);
    const cuda::AttentionDims dims{T,
                                   c.num_heads,
                                   c.num_kv_heads,
                                   c.head_dim,
                                   float(1.0 / std::sqrt(c.query_pre_attn_scalar)),
                                   c.attn_logit_softcap ? float(*c.attn_logit_softcap) : 0.0f,
                                   c.sliding[size_t(l)] ? c.sliding_window : 0};
    cuda::attention_packed(ctx, m.q.data(), m.k.data(), m.v.data(), m.start.data(), dims, att,
                           m.bf16, attention);
    m.linear(m.operand(att, nq), L.o, m.proj.data(), T);
    if (fuse) {  // the hook only reads: it sees x after h has taken it in
      cuda::post_norm_add_norm(ctx, m.proj.data(), L.post_attn_norm.data(), h, L.pre_ff_norm.data(),
                               T, H, eps, x_for_hook, xn);
      if (hook) hook(HookPoint::AttnOut, l, x, T);
    } else {
      cuda::rms_norm_gemma(ctx, m.proj.data(), L.post_attn_norm.data(), T, H, eps, {x, nullptr});
      if (hook) hook(HookPoint::AttnOut, l, x, T);
      cuda::add_into(ctx, h, x, T * H);
      cuda::rms_norm_gemma(ctx, h, L.pre_ff_norm.data(), T, H, eps, xn);
    }
    // MLP block: h += post_ff_norm(down(gelu(gate(x)) * up(x))), x = pre_ff_norm(h).
    m.linear(m.operand(xn, H), L.gate_up, m.gu.data(), T);
    cuda::gelu_mul(ctx, m.gu.data(), T, I, xn);
    m.linear(m.operand(xn, I), L.down, m.proj.data(), T);
    if (fuse) {  // and the next layer's input norm, when there is one
      const float* next_norm = l < last_layer ? m.layers[size_t(l + 1)].input_norm.data() : nullptr;
      cuda::post_norm_add_norm(ctx, m.proj.data(), L.post_ff_norm.data(), h, next_norm, T, H, eps,
                               x_for_hook, xn);
      xn_ready = next_norm != nullptr;
      if (hook) hook(HookPoint::MlpOut, l, x, T);
    } else {
      cuda::rms_norm_gemma(ctx, m.proj.data(), L.post_ff_norm.data(), T, H, eps, {x, nullptr});
      if (hook) hook(HookPoint::MlpOut, l, x, T);
      cuda::add_into(ctx, h, x, T * H);
    }
    if (hook) hook(HookPoint::ResidPost, l, h, T);
  }
  if (!logits) {
    ctx.sync();
    return;
  }
  cuda::rms_norm_gemma(ctx, h, m.final_norm.data(), T, H, eps, xn);
  logits->resize(size_t(T * c.vocab_size));
  m.project_vocab(m.operand(xn, H), T, c.final_logit_softcap ? float(*c.final_logit_softcap) : 0.0f,
                  logits->data());
}

std::vector<float> DeviceGemma2::unembed(std::span<const float> rows, int64_t n) {
  Impl& m = *impl_;
  const int64_t H = m.cfg.hidden_size;
  SAE_CHECK(int64_t(rows.size()) == n * H, "unembed: rows are not [n, hidden]");
  std::vector<float> out(size_t(n * m.cfg.vocab_size));
  if (n == 0) return out;
  const cudaStream_t s = m.ctx.stream();
  const ActOut a = m.act_out(m.act_f32, m.xb, size_t(n * H), "rows to unembed");
  if (m.bf16) {
    std::vector<uint16_t> b(rows.size());
    for (size_t i = 0; i < rows.size(); ++i) b[i] = f32_to_bf16(rows[i]);
    SAE_CUDA(cudaMemcpyAsync(a.bf16, b.data(), b.size() * 2, cudaMemcpyHostToDevice, s));
  } else {
    SAE_CUDA(cudaMemcpyAsync(a.f32, rows.data(), rows.size() * 4, cudaMemcpyHostToDevice, s));
  }
  m.project_vocab(m.operand(a, H), n, 0.0f, out.data());
  return out;
}

}  // namespace sae::model

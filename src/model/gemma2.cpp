#include "model/gemma2.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <map>
#include <memory>

#include "core/dtype.h"
#include "core/error.h"
#include "core/threads.h"
#include "io/json_file.h"
#include "io/safetensors.h"
#include "ops/attention.h"
#include "ops/cpu_kernels.h"
#include "ops/gemm.h"
#include "ops/gemm_bf16.h"
#include "ops/rms_norm.h"
#include "ops/rope.h"

namespace sae::model {

namespace fs = std::filesystem;

namespace {

// Tensor name -> the open shard holding it.
class Checkpoint {
 public:
  explicit Checkpoint(const std::string& folder) {
    const fs::path index = fs::path(folder) / "model.safetensors.index.json";
    if (fs::exists(index)) {
      auto j = read_json_file(index.string());
      if (!j.contains("weight_map") || !j["weight_map"].is_object())
        fail(index.string(), "weight_map", "missing");
      for (auto it = j["weight_map"].begin(); it != j["weight_map"].end(); ++it) {
        const std::string file = (fs::path(folder) / it.value().get<std::string>()).string();
        if (!files_.count(file)) {
          if (!fs::exists(file)) fail(index.string(), it.key(), cat("shard ", file, " is missing"));
          files_[file] = std::make_unique<SafetensorsFile>(file);
        }
        where_[it.key()] = files_[file].get();
      }
    } else {
      const std::string file = (fs::path(folder) / "model.safetensors").string();
      if (!fs::exists(file))
        fail(folder, "", "has neither model.safetensors nor model.safetensors.index.json");
      files_[file] = std::make_unique<SafetensorsFile>(file);
      for (const auto& t : files_[file]->tensors()) where_[t.name] = files_[file].get();
    }
  }
  std::vector<float> read(const std::string& name, std::vector<int64_t> shape) const {
    auto it = where_.find(name);
    if (it == where_.end())
      fail(files_.begin()->first, name, "tensor is missing from the checkpoint");
    return it->second->read_f32(name, shape);
  }

 private:
  std::map<std::string, std::unique_ptr<SafetensorsFile>> files_;
  std::map<std::string, SafetensorsFile*> where_;
};

}  // namespace

void TokenBatch::add(std::span<const int32_t> prompt) {
  ids.insert(ids.end(), prompt.begin(), prompt.end());
  starts.push_back(int64_t(ids.size()));
}

const float* Weight::rows_f32(int64_t r0, int64_t r1, std::vector<float>& scratch) const {
  if (bf16.empty()) return f32.data() + r0 * cols;
  const size_t n = size_t((r1 - r0) * cols);
  if (scratch.size() < n) scratch.resize(n);
  const uint16_t* src = bf16.data() + r0 * cols;
  float* dst = scratch.data();
#pragma omp parallel for schedule(static) num_threads(threads_for(double(n), 0.3))
  for (size_t i = 0; i < n; ++i) dst[i] = bf16_to_f32(src[i]);
  return dst;
}

int64_t gemma2_weight_bytes(const Gemma2Config& c, int64_t last_layer, bool bf16) {
  const int64_t H = c.hidden_size, q = c.num_heads * c.head_dim, kv = c.num_kv_heads * c.head_dim;
  const int64_t matrices = H * q * 2 + H * kv * 2 + 3 * H * c.intermediate_size;
  const int64_t per_layer = 4 * H * 4 + matrices * (bf16 ? 2 : 4);
  return c.vocab_size * H * (bf16 ? 2 : 4) + H * 4 + (last_layer + 1) * per_layer;
}

int64_t device_forward_bytes(const Gemma2Config& c, int64_t tokens, bool bf16, bool logits) {
  // The buffers device_gemma2.cu's forward sizes, in its order.
  const int64_t T = tokens, H = c.hidden_size, I = c.intermediate_size;
  const int64_t nq = c.num_heads * c.head_dim, nkv = c.num_kv_heads * c.head_dim;
  const int64_t op = bf16 ? 2 : 4;
  int64_t b = T * 4 * 3;                        // ids, positions, prompt starts
  b += T * H * 4 * 3 + T * (nq + 2 * nkv) * 4;  // residual, block output, projection; q k v
  b += T * 2 * I * 4;                           // gate and up
  b += T * std::max(H, I) * op + T * nq * op;   // normed input, attention output
  if (logits) b += T * std::min<int64_t>(c.vocab_size, 32768) * 4;
  return b + (int64_t(32) << 20);
}

int64_t Gemma2::weight_bytes() const {
  int64_t b = embed.bytes() + int64_t(final_norm.size()) * 4;
  for (const Gemma2Layer& L : layers)
    b += int64_t(L.input_norm.size() + L.post_attn_norm.size() + L.pre_ff_norm.size() +
                 L.post_ff_norm.size()) *
             4 +
         L.q_proj.bytes() + L.k_proj.bytes() + L.v_proj.bytes() + L.o_proj.bytes() +
         L.gate_proj.bytes() + L.up_proj.bytes() + L.down_proj.bytes();
  return b;
}

Gemma2 Gemma2::load(const std::string& folder, const Gemma2Options& opt) {
  Gemma2 m;
  m.cfg = read_gemma2_config(folder);
  if (opt.bf16_matmul && !opt.keep_bf16)
    fail(folder, "bf16_matmul", "needs the weights kept in bf16 (keep_bf16; --bf16)");
  m.bf16_matmul = opt.bf16_matmul;
  const Gemma2Config& c = m.cfg;
  const int64_t last = opt.last_layer < 0 ? c.num_layers - 1 : opt.last_layer;
  if (last >= c.num_layers)
    fail(folder, "last_layer",
         cat("layer ", last, " asked for, the model has ", c.num_layers, " (0..", c.num_layers - 1,
             ")"));
  if (opt.verbose)
    std::fprintf(stderr,
                 "gemma2: %lld layers (loading 0..%lld), hidden %lld, vocab %lld; weights need "
                 "%.2f GiB as %s%s\n",
                 (long long)c.num_layers, (long long)last, (long long)c.hidden_size,
                 (long long)c.vocab_size,
                 double(gemma2_weight_bytes(c, last, opt.keep_bf16)) / double(1 << 30),
                 opt.keep_bf16 ? "bf16" : "f32",
                 opt.bf16_matmul ? cat(", bf16 matmuls: ", ops::bf16_gemm_path()).c_str() : "");
  Checkpoint ck(folder);
  const int64_t H = c.hidden_size, q = c.num_heads * c.head_dim, kv = c.num_kv_heads * c.head_dim;
  const int64_t I = c.intermediate_size;
  auto matrix = [&](const std::string& name, int64_t rows, int64_t cols) {
    Weight w;
    w.rows = rows, w.cols = cols;
    std::vector<float> f = ck.read(name, {rows, cols});
    if (!opt.keep_bf16) {
      w.f32 = std::move(f);
    } else {
      w.bf16.resize(f.size());
      for (size_t i = 0; i < f.size(); ++i) w.bf16[i] = f32_to_bf16(f[i]);
    }
    return w;
  };
  m.embed = matrix("model.embed_tokens.weight", c.vocab_size, H);
  m.final_norm = ck.read("model.norm.weight", {H});
  for (int64_t l = 0; l <= last; ++l) {
    const std::string p = cat("model.layers.", l, ".");
    Gemma2Layer L;
    L.input_norm = ck.read(p + "input_layernorm.weight", {H});
    L.q_proj = matrix(p + "self_attn.q_proj.weight", q, H);
    L.k_proj = matrix(p + "self_attn.k_proj.weight", kv, H);
    L.v_proj = matrix(p + "self_attn.v_proj.weight", kv, H);
    L.o_proj = matrix(p + "self_attn.o_proj.weight", H, q);
    L.post_attn_norm = ck.read(p + "post_attention_layernorm.weight", {H});
    L.pre_ff_norm = ck.read(p + "pre_feedforward_layernorm.weight", {H});
    L.gate_proj = matrix(p + "mlp.gate_proj.weight", I, H);
    L.up_proj = matrix(p + "mlp.up_proj.weight", I, H);
    L.down_proj = matrix(p + "mlp.down_proj.weight", H, I);
    L.post_ff_norm = ck.read(p + "post_feedforward_layernorm.weight", {H});
    m.layers.push_back(std::move(L));
  }
  return m;
}

namespace {
// y [T, w.rows] = x [T, w.cols] @ W^T, W as stored by HF: in f32, or with bf16 products.
void linear(const float* x, const Weight& w, float* y, int64_t T, std::vector<float>& scratch,
            bool bf16_matmul) {
  if (bf16_matmul)
    ops::gemm_bf16_weights(T, w.rows, w.cols, x, w.bf16.data(), y, w.rows, scratch);
  else
    ops::gemm(ops::Trans::No, ops::Trans::Yes, T, w.rows, w.cols, 1.0f, x, w.cols,
              w.f32_data(scratch), w.cols, 0.0f, y, w.rows);
}
}  // namespace

std::string hook_name(HookPoint p, int64_t layer) {
  const char* n = p == HookPoint::ResidPre  ? "resid_pre"
                  : p == HookPoint::AttnOut ? "attn_out"
                  : p == HookPoint::MlpOut  ? "mlp_out"
                                            : "resid_post";
  return cat("blocks.", layer, ".hook_", n);
}

HookPoint parse_hook_kind(const std::string& kind) {
  if (kind == "resid_pre") return HookPoint::ResidPre;
  if (kind == "attn_out") return HookPoint::AttnOut;
  if (kind == "mlp_out") return HookPoint::MlpOut;
  if (kind == "resid_post") return HookPoint::ResidPost;
  fail("hook", kind, "unknown hook (resid_pre, attn_out, mlp_out, resid_post)");
}

std::pair<HookPoint, int64_t> parse_hook_name(const std::string& name) {
  const std::string prefix = "blocks.";
  const size_t dot = name.find(".hook_", prefix.size());
  if (name.rfind(prefix, 0) != 0 || dot == std::string::npos)
    fail("hook", name, "expected blocks.<layer>.hook_<resid_pre|attn_out|mlp_out|resid_post>");
  const std::string num = name.substr(prefix.size(), dot - prefix.size());
  if (num.empty() || num.find_first_not_of("0123456789") != std::string::npos)
    fail("hook", name, "bad layer number");
  return {parse_hook_kind(name.substr(dot + 6)), std::stoll(num)};
}

std::vector<int64_t> check_batch(const TokenBatch& batch, const Gemma2Config& c) {
  if (batch.n_tokens() == 0) fail("forward", "ids", "empty batch");
  std::vector<int64_t> pos(static_cast<size_t>(batch.n_tokens()));
  for (int64_t s = 0; s < batch.n_prompts(); ++s) {
    const int64_t a = batch.starts[size_t(s)], b = batch.starts[size_t(s + 1)];
    if (b <= a) fail("forward", "ids", cat("prompt ", s, " is empty"));
    if (b - a > c.max_position_embeddings)
      fail("forward", "ids",
           cat("prompt ", s, " has ", b - a,
               " tokens, longer than the context (max_position_embeddings = ",
               c.max_position_embeddings, ")"));
    for (int64_t t = a; t < b; ++t) pos[size_t(t)] = t - a;
  }
  for (int32_t id : batch.ids)
    if (id < 0 || id >= c.vocab_size)
      fail("forward", "ids", cat("token id ", id, " outside the vocabulary"));
  return pos;
}

void Gemma2::forward(std::span<const int32_t> ids, int64_t last_layer, const HookFn& hook,
                     std::vector<float>* final_hidden, std::vector<float>* logits) const {
  TokenBatch b;
  b.add(ids);
  forward(b, last_layer, hook, final_hidden, logits);
}

void Gemma2::forward(const TokenBatch& batch, int64_t last_layer, const HookFn& hook,
                     std::vector<float>* final_hidden, std::vector<float>* logits) const {
  const Gemma2Config& c = cfg;
  const int64_t T = batch.n_tokens(), H = c.hidden_size, I = c.intermediate_size;
  const int64_t nq = c.num_heads * c.head_dim, nkv = c.num_kv_heads * c.head_dim;
  if (last_layer < 0 || last_layer >= c.num_layers) fail("forward", "last_layer", "out of range");
  if (last_layer >= int64_t(layers.size()))
    fail("forward", "last_layer",
         cat("layer ", last_layer, " was not loaded (loaded 0..", int64_t(layers.size()) - 1, ")"));
  const std::vector<int64_t> pos = check_batch(batch, c);
  std::vector<float> h(size_t(T * H)), x(size_t(T * H)), q(size_t(T * nq)), k(size_t(T * nkv)),
      v(size_t(T * nkv)), att(size_t(T * nq)), gate(size_t(T * I)), up(size_t(T * I));
  std::vector<float> scratch;  // bf16 weights upcast here, one matrix at a time
  const ops::CpuKernels& kernels = ops::cpu_kernels();
  const float scale = float(std::sqrt(double(H)));  // the embedding normaliser, in f32
  for (int64_t t = 0; t < T; ++t) {
    const int32_t id = batch.ids[size_t(t)];
    const float* e = embed.rows_f32(id, id + 1, scratch);
    for (int64_t i = 0; i < H; ++i) h[size_t(t * H + i)] = e[i] * scale;
  }
  const float eps = float(c.rms_norm_eps);
  for (int64_t l = 0; l <= last_layer; ++l) {
    const Gemma2Layer& L = layers[size_t(l)];
    if (hook) hook(HookPoint::ResidPre, l, h.data(), T);
    // Attention block: h += post_attn_norm(attn(input_norm(h))).
    ops::rms_norm_gemma(h.data(), L.input_norm.data(), x.data(), T, H, eps);
    linear(x.data(), L.q_proj, q.data(), T, scratch, bf16_matmul);
    linear(x.data(), L.k_proj, k.data(), T, scratch, bf16_matmul);
    linear(x.data(), L.v_proj, v.data(), T, scratch, bf16_matmul);
    ops::rope_half(q.data(), pos.data(), T, c.num_heads, c.head_dim, c.rope_theta);
    ops::rope_half(k.data(), pos.data(), T, c.num_kv_heads, c.head_dim, c.rope_theta);
    for (int64_t s = 0; s < batch.n_prompts(); ++s) {
      const int64_t a = batch.starts[size_t(s)], n = batch.starts[size_t(s + 1)] - a;
      ops::AttentionShape shape{n,
                                c.num_heads,
                                c.num_kv_heads,
                                c.head_dim,
                                float(1.0 / std::sqrt(c.query_pre_attn_scalar)),
                                c.attn_logit_softcap ? float(*c.attn_logit_softcap) : 0.0f,
                                c.sliding[size_t(l)] ? c.sliding_window : 0};
      ops::attention_causal(q.data() + a * nq, k.data() + a * nkv, v.data() + a * nkv,
                            att.data() + a * nq, shape);
    }
    linear(att.data(), L.o_proj, x.data(), T, scratch, bf16_matmul);
    ops::rms_norm_gemma(x.data(), L.post_attn_norm.data(), x.data(), T, H, eps);
    if (hook) hook(HookPoint::AttnOut, l, x.data(), T);
    for (int64_t i = 0; i < T * H; ++i) h[size_t(i)] += x[size_t(i)];
    // MLP block: h += post_ff_norm(down(gelu(gate(x)) * up(x))), x = pre_ff_norm(h).
    ops::rms_norm_gemma(h.data(), L.pre_ff_norm.data(), x.data(), T, H, eps);
    linear(x.data(), L.gate_proj, gate.data(), T, scratch, bf16_matmul);
    linear(x.data(), L.up_proj, up.data(), T, scratch, bf16_matmul);
#pragma omp parallel for schedule(static) num_threads(threads_for(double(T * I), 1.0))
    for (int64_t t = 0; t < T; ++t)
      kernels.gelu_tanh_mul(gate.data() + t * I, up.data() + t * I, I);
    linear(gate.data(), L.down_proj, x.data(), T, scratch, bf16_matmul);
    ops::rms_norm_gemma(x.data(), L.post_ff_norm.data(), x.data(), T, H, eps);
    if (hook) hook(HookPoint::MlpOut, l, x.data(), T);
    for (int64_t i = 0; i < T * H; ++i) h[size_t(i)] += x[size_t(i)];
    if (hook) hook(HookPoint::ResidPost, l, h.data(), T);
  }
  if (last_layer != c.num_layers - 1 || (!final_hidden && !logits)) return;
  ops::rms_norm_gemma(h.data(), final_norm.data(), x.data(), T, H, eps);
  if (final_hidden) final_hidden->assign(x.begin(), x.end());
  if (logits) {
    const int64_t V = c.vocab_size;
    logits->resize(size_t(T * V));
    // The tied output projection: with bf16 products in one GEMM on the bf16 embedding; else in
    // slices of the vocabulary, so a bf16 embedding is never upcast whole (256000 x 2304 would
    // be 2.2 GiB).
    const int64_t slice = 16384;
    if (bf16_matmul)
      ops::gemm_bf16_weights(T, V, H, x.data(), embed.bf16.data(), logits->data(), V, scratch);
    for (int64_t r0 = 0; !bf16_matmul && r0 < V; r0 += slice) {
      const int64_t r1 = std::min(V, r0 + slice);
      ops::gemm(ops::Trans::No, ops::Trans::Yes, T, r1 - r0, H, 1.0f, x.data(), H,
                embed.rows_f32(r0, r1, scratch), H, 0.0f, logits->data() + r0, V);
    }
    if (c.final_logit_softcap) {
      const float cap = float(*c.final_logit_softcap);
#pragma omp parallel for schedule(static) num_threads(threads_for(double(T * V), 1.0))
      for (int64_t t = 0; t < T; ++t) kernels.soft_cap(logits->data() + t * V, V, cap);
    }
  }
}

}  // namespace sae::model

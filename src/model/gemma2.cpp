#include "model/gemma2.h"

#include <cmath>
#include <cstdio>
#include <filesystem>
#include <map>
#include <memory>

#include "core/error.h"
#include "io/json_file.h"
#include "io/safetensors.h"
#include "ops/attention.h"
#include "ops/gelu.h"
#include "ops/gemm.h"
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

int64_t Gemma2::weight_bytes() const {
  const Gemma2Config& c = cfg;
  const int64_t H = c.hidden_size, q = c.num_heads * c.head_dim, kv = c.num_kv_heads * c.head_dim;
  const int64_t per_layer = 4 * H + H * q * 2 + H * kv * 2 + 3 * H * c.intermediate_size;
  return 4 * (c.vocab_size * H + H + c.num_layers * per_layer);
}

Gemma2 Gemma2::load(const std::string& folder, bool verbose) {
  Gemma2 m;
  m.cfg = read_gemma2_config(folder);
  const Gemma2Config& c = m.cfg;
  if (verbose)
    std::fprintf(stderr,
                 "gemma2: %lld layers, hidden %lld, vocab %lld; weights need %.2f GiB as f32\n",
                 (long long)c.num_layers, (long long)c.hidden_size, (long long)c.vocab_size,
                 double(m.weight_bytes()) / double(1 << 30));
  Checkpoint ck(folder);
  const int64_t H = c.hidden_size, q = c.num_heads * c.head_dim, kv = c.num_kv_heads * c.head_dim;
  const int64_t I = c.intermediate_size;
  m.embed = ck.read("model.embed_tokens.weight", {c.vocab_size, H});
  m.final_norm = ck.read("model.norm.weight", {H});
  for (int64_t l = 0; l < c.num_layers; ++l) {
    const std::string p = cat("model.layers.", l, ".");
    Gemma2Layer L;
    L.input_norm = ck.read(p + "input_layernorm.weight", {H});
    L.q_proj = ck.read(p + "self_attn.q_proj.weight", {q, H});
    L.k_proj = ck.read(p + "self_attn.k_proj.weight", {kv, H});
    L.v_proj = ck.read(p + "self_attn.v_proj.weight", {kv, H});
    L.o_proj = ck.read(p + "self_attn.o_proj.weight", {H, q});
    L.post_attn_norm = ck.read(p + "post_attention_layernorm.weight", {H});
    L.pre_ff_norm = ck.read(p + "pre_feedforward_layernorm.weight", {H});
    L.gate_proj = ck.read(p + "mlp.gate_proj.weight", {I, H});
    L.up_proj = ck.read(p + "mlp.up_proj.weight", {I, H});
    L.down_proj = ck.read(p + "mlp.down_proj.weight", {H, I});
    L.post_ff_norm = ck.read(p + "post_feedforward_layernorm.weight", {H});
    m.layers.push_back(std::move(L));
  }
  return m;
}

namespace {
// y [T, out] = x [T, in] @ W^T, W [out, in] as stored by HF.
void linear(const float* x, const std::vector<float>& w, float* y, int64_t T, int64_t in,
            int64_t out) {
  ops::gemm(ops::Trans::No, ops::Trans::Yes, T, out, in, 1.0f, x, in, w.data(), in, 0.0f, y, out);
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

void Gemma2::forward(std::span<const int32_t> ids, int64_t last_layer, const HookFn& hook,
                     std::vector<float>* final_hidden, std::vector<float>* logits) const {
  const Gemma2Config& c = cfg;
  const int64_t T = int64_t(ids.size()), H = c.hidden_size, I = c.intermediate_size;
  const int64_t nq = c.num_heads * c.head_dim, nkv = c.num_kv_heads * c.head_dim;
  if (last_layer < 0 || last_layer >= c.num_layers) fail("forward", "last_layer", "out of range");
  if (T == 0) fail("forward", "ids", "empty prompt");
  if (T > c.max_position_embeddings)
    fail("forward", "ids",
         cat("prompt has ", T, " tokens, longer than the context (max_position_embeddings = ",
             c.max_position_embeddings, ")"));
  std::vector<float> h(size_t(T * H)), x(size_t(T * H)), q(size_t(T * nq)), k(size_t(T * nkv)),
      v(size_t(T * nkv)), att(size_t(T * nq)), gate(size_t(T * I)), up(size_t(T * I));
  std::vector<int64_t> pos(static_cast<size_t>(T));
  const float scale = float(std::sqrt(double(H)));  // the embedding normaliser, in f32
  for (int64_t t = 0; t < T; ++t) {
    pos[size_t(t)] = t;
    const int32_t id = ids[size_t(t)];
    if (id < 0 || id >= c.vocab_size)
      fail("forward", "ids", cat("token id ", id, " outside the vocabulary"));
    for (int64_t i = 0; i < H; ++i)
      h[size_t(t * H + i)] = embed[size_t(int64_t(id) * H + i)] * scale;
  }
  const float eps = float(c.rms_norm_eps);
  for (int64_t l = 0; l <= last_layer; ++l) {
    const Gemma2Layer& L = layers[size_t(l)];
    if (hook) hook(HookPoint::ResidPre, l, h.data(), T);
    // Attention block: h += post_attn_norm(attn(input_norm(h))).
    ops::rms_norm_gemma(h.data(), L.input_norm.data(), x.data(), T, H, eps);
    linear(x.data(), L.q_proj, q.data(), T, H, nq);
    linear(x.data(), L.k_proj, k.data(), T, H, nkv);
    linear(x.data(), L.v_proj, v.data(), T, H, nkv);
    ops::rope_half(q.data(), pos.data(), T, c.num_heads, c.head_dim, c.rope_theta);
    ops::rope_half(k.data(), pos.data(), T, c.num_kv_heads, c.head_dim, c.rope_theta);
    ops::AttentionShape s{T,
                          c.num_heads,
                          c.num_kv_heads,
                          c.head_dim,
                          float(1.0 / std::sqrt(c.query_pre_attn_scalar)),
                          c.attn_logit_softcap ? float(*c.attn_logit_softcap) : 0.0f,
                          c.sliding[size_t(l)] ? c.sliding_window : 0};
    ops::attention_causal(q.data(), k.data(), v.data(), att.data(), s);
    linear(att.data(), L.o_proj, x.data(), T, nq, H);
    ops::rms_norm_gemma(x.data(), L.post_attn_norm.data(), x.data(), T, H, eps);
    if (hook) hook(HookPoint::AttnOut, l, x.data(), T);
    for (int64_t i = 0; i < T * H; ++i) h[size_t(i)] += x[size_t(i)];
    // MLP block: h += post_ff_norm(down(gelu(gate(x)) * up(x))), x = pre_ff_norm(h).
    ops::rms_norm_gemma(h.data(), L.pre_ff_norm.data(), x.data(), T, H, eps);
    linear(x.data(), L.gate_proj, gate.data(), T, H, I);
    linear(x.data(), L.up_proj, up.data(), T, H, I);
    for (int64_t i = 0; i < T * I; ++i)
      gate[size_t(i)] = ops::gelu_tanh(gate[size_t(i)]) * up[size_t(i)];
    linear(gate.data(), L.down_proj, x.data(), T, I, H);
    ops::rms_norm_gemma(x.data(), L.post_ff_norm.data(), x.data(), T, H, eps);
    if (hook) hook(HookPoint::MlpOut, l, x.data(), T);
    for (int64_t i = 0; i < T * H; ++i) h[size_t(i)] += x[size_t(i)];
    if (hook) hook(HookPoint::ResidPost, l, h.data(), T);
  }
  if (last_layer != c.num_layers - 1 || (!final_hidden && !logits)) return;
  ops::rms_norm_gemma(h.data(), final_norm.data(), x.data(), T, H, eps);
  if (final_hidden) final_hidden->assign(x.begin(), x.end());
  if (logits) {
    logits->resize(size_t(T * c.vocab_size));
    linear(x.data(), embed, logits->data(), T, H, c.vocab_size);
    if (c.final_logit_softcap) {
      const float cap = float(*c.final_logit_softcap);
      for (float& z : *logits) z = std::tanh(z / cap) * cap;
    }
  }
}

}  // namespace sae::model

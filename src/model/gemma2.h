// Gemma-2 forward pass over ops/ kernels: weights from a Hugging Face checkpoint folder
// (model.safetensors or shards with model.safetensors.index.json, f32/bf16/f16 converted to
// f32), one sequence at a time, stopping after the last layer anyone needs.
#pragma once

#include <cstdint>
#include <functional>
#include <span>
#include <string>
#include <vector>

#include "model/gemma2_config.h"

namespace sae::model {

// TransformerLens hook points, named blocks.L.hook_<name>: the residual stream entering and
// leaving layer L, and what the attention and MLP blocks add to it (after their post-norms).
enum class HookPoint { ResidPre, AttnOut, MlpOut, ResidPost };
std::string hook_name(HookPoint p, int64_t layer);
// Parses "blocks.L.hook_resid_post" (and resid_pre, attn_out, mlp_out); throws otherwise.
std::pair<HookPoint, int64_t> parse_hook_name(const std::string& name);
HookPoint parse_hook_kind(const std::string& kind);  // "resid_post", ...

using HookFn = std::function<void(HookPoint point, int64_t layer, float* act, int64_t tokens)>;

struct Gemma2Layer {
  std::vector<float> input_norm, q_proj, k_proj, v_proj, o_proj, post_attn_norm;
  std::vector<float> pre_ff_norm, gate_proj, up_proj, down_proj, post_ff_norm;
};

class Gemma2 {
 public:
  // Reads config.json and the weights; prints the memory the weights need before allocating.
  static Gemma2 load(const std::string& folder, bool verbose = true);

  Gemma2Config cfg;
  std::vector<float> embed;       // [vocab, hidden] (tied: also the output projection)
  std::vector<float> final_norm;  // [hidden]
  std::vector<Gemma2Layer> layers;

  // Runs layers 0..last_layer on one sequence of token ids, calling `hook` at every hook
  // point with the activation [tokens, hidden]; the hook may overwrite it (splicing) and the
  // forward continues with what it wrote. When last_layer is the final layer and `logits` is
  // given, applies the final norm and writes soft-capped logits [T, vocab]; `final_hidden`
  // (optional) receives the normed final hidden states [T, hidden]. Prompts longer than
  // max_position_embeddings are rejected.
  void forward(std::span<const int32_t> ids, int64_t last_layer, const HookFn& hook,
               std::vector<float>* final_hidden = nullptr,
               std::vector<float>* logits = nullptr) const;

  int64_t weight_bytes() const;
};

}  // namespace sae::model

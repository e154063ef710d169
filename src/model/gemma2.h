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

  // Called with blocks.L.hook_resid_post: the residual stream after layer L, [tokens, hidden].
  using ResidHook = std::function<void(int64_t layer, const float* resid, int64_t tokens)>;

  // Runs layers 0..last_layer on one sequence of token ids. When last_layer is the final layer
  // and `logits` is given, applies the final norm and writes soft-capped logits [T, vocab];
  // `final_hidden` (optional) receives the normed final hidden states [T, hidden].
  void forward(std::span<const int32_t> ids, int64_t last_layer, const ResidHook& on_resid_post,
               std::vector<float>* final_hidden = nullptr,
               std::vector<float>* logits = nullptr) const;

  int64_t weight_bytes() const;
};

}  // namespace sae::model

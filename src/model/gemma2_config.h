// A Gemma-2 checkpoint's config.json (Hugging Face), checked against what the forward
// supports. transformers 4.x writes rope_theta; 5.x writes rope_parameters.rope_theta.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

namespace sae::model {

struct Gemma2Config {
  int64_t vocab_size = 0, hidden_size = 0, intermediate_size = 0, num_layers = 0;
  int64_t num_heads = 0, num_kv_heads = 0, head_dim = 0;
  double rms_norm_eps = 1e-6;
  double rope_theta = 10000.0;
  double query_pre_attn_scalar = 0;          // queries are scaled by its -1/2 power
  std::optional<double> attn_logit_softcap;  // null disables
  std::optional<double> final_logit_softcap;
  int64_t sliding_window = 0;
  int64_t max_position_embeddings = 8192;  // longest prompt accepted
  std::vector<bool> sliding;               // per layer: sliding-window attention
  bool tie_word_embeddings = true;
  std::string dtype = "float32";  // the checkpoint's declared dtype

  static Gemma2Config from_json(const nlohmann::json& j, const std::string& where);
};

// Reads <folder>/config.json; any model_type other than "gemma2" is rejected.
Gemma2Config read_gemma2_config(const std::string& folder);

}  // namespace sae::model

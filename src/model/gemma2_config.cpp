#include "model/gemma2_config.h"

#include <filesystem>

#include "core/error.h"
#include "io/json_file.h"

namespace sae::model {

namespace {

int64_t positive(const nlohmann::json& j, const char* key, const std::string& where) {
  if (!j.contains(key)) fail(where, key, "missing");
  if (!j[key].is_number_integer() || j[key].get<int64_t>() <= 0)
    fail(where, key, cat("must be a positive integer, got ", j[key].dump()));
  return j[key].get<int64_t>();
}

std::optional<double> softcap(const nlohmann::json& j, const char* key, const std::string& where) {
  if (!j.contains(key) || j[key].is_null()) return std::nullopt;
  if (!j[key].is_number() || !(j[key].get<double>() > 0))
    fail(where, key, "must be a positive number or null");
  return j[key].get<double>();
}

}  // namespace

Gemma2Config Gemma2Config::from_json(const nlohmann::json& j, const std::string& where) {
  if (!j.is_object()) fail(where, "", "config must be a JSON object");
  const std::string type = j.value("model_type", "");
  if (type != "gemma2")
    fail(where, "model_type", cat("\"", type, "\" is not supported (sae.cpp runs gemma2)"));
  Gemma2Config c;
  c.vocab_size = positive(j, "vocab_size", where);
  c.hidden_size = positive(j, "hidden_size", where);
  c.intermediate_size = positive(j, "intermediate_size", where);
  c.num_layers = positive(j, "num_hidden_layers", where);
  c.num_heads = positive(j, "num_attention_heads", where);
  c.num_kv_heads = positive(j, "num_key_value_heads", where);
  c.head_dim =
      j.contains("head_dim") ? positive(j, "head_dim", where) : c.hidden_size / c.num_heads;
  if (c.num_heads % c.num_kv_heads != 0)
    fail(where, "num_key_value_heads", "must divide num_attention_heads");
  c.rms_norm_eps = j.value("rms_norm_eps", 1e-6);
  if (j.contains("rope_parameters") && j["rope_parameters"].is_object()) {
    const auto& r = j["rope_parameters"];
    if (r.value("rope_type", "default") != "default")
      fail(where, "rope_parameters.rope_type", "only the default RoPE is supported");
    c.rope_theta = r.value("rope_theta", 10000.0);
  } else {
    c.rope_theta = j.value("rope_theta", 10000.0);
  }
  c.query_pre_attn_scalar = j.contains("query_pre_attn_scalar")
                                ? j["query_pre_attn_scalar"].get<double>()
                                : double(c.head_dim);
  c.attn_logit_softcap = softcap(j, "attn_logit_softcapping", where);
  c.final_logit_softcap = softcap(j, "final_logit_softcapping", where);
  c.sliding_window = j.contains("sliding_window") && !j["sliding_window"].is_null()
                         ? positive(j, "sliding_window", where)
                         : 0;
  if (j.contains("layer_types") && j["layer_types"].is_array()) {
    if (int64_t(j["layer_types"].size()) != c.num_layers)
      fail(where, "layer_types", "needs one entry per layer");
    for (const auto& t : j["layer_types"]) {
      if (t == "sliding_attention")
        c.sliding.push_back(true);
      else if (t == "full_attention")
        c.sliding.push_back(false);
      else
        fail(where, "layer_types", cat("unknown layer type ", t.dump()));
    }
  } else {  // transformers' default for Gemma-2: even layers slide
    for (int64_t l = 0; l < c.num_layers; ++l) c.sliding.push_back(l % 2 == 0);
  }
  const std::string act = j.value("hidden_activation", j.value("hidden_act", "gelu_pytorch_tanh"));
  if (act != "gelu_pytorch_tanh")
    fail(where, "hidden_activation", cat("\"", act, "\" is not supported (gelu_pytorch_tanh)"));
  c.tie_word_embeddings = j.value("tie_word_embeddings", true);
  if (!c.tie_word_embeddings)
    fail(where, "tie_word_embeddings",
         "untied output embeddings are not supported (Gemma-2 ties them)");
  if (j.contains("max_position_embeddings"))
    c.max_position_embeddings = positive(j, "max_position_embeddings", where);
  c.dtype = j.value("dtype", j.value("torch_dtype", "float32"));
  return c;
}

Gemma2Config read_gemma2_config(const std::string& folder) {
  const std::string path = (std::filesystem::path(folder) / "config.json").string();
  if (!std::filesystem::exists(path)) fail(path, "", "missing (not a Hugging Face model folder?)");
  return Gemma2Config::from_json(nlohmann::json::parse(read_json_file(path).dump()), path);
}

}  // namespace sae::model

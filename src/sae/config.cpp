#include "sae/config.h"

#include <set>

#include "core/error.h"
#include "io/json_file.h"

namespace sae {

using ojson = nlohmann::ordered_json;

std::string_view architecture_name(Architecture a) {
  switch (a) {
    case Architecture::Standard:
      return "standard";
    case Architecture::TopK:
      return "topk";
    case Architecture::JumpReLU:
      return "jumprelu";
  }
  return "?";
}

std::string_view input_norm_name(InputNorm n) {
  switch (n) {
    case InputNorm::None:
      return "none";
    case InputNorm::ExpectedAverageOnlyIn:
      return "expected_average_only_in";
    case InputNorm::ConstantNormRescale:
      return "constant_norm_rescale";
    case InputNorm::LayerNorm:
      return "layer_norm";
  }
  return "?";
}

namespace {

// SAELens's LLM_METADATA_KEYS: the flat keys of a pre-6.0 config that move into "metadata".
const std::set<std::string> kMetadataKeys = {
    "model_name",
    "hook_name",
    "model_class_name",
    "hook_head_index",
    "model_from_pretrained_kwargs",
    "prepend_bos",
    "exclude_special_tokens",
    "neuronpedia_id",
    "context_size",
    "seqpos_slice",
    "dataset_path",
    "sae_lens_version",
    "sae_lens_training_version",
    "hook_name_out",
    "hook_head_index_out",
    "hf_hook_name",
    "hf_hook_name_out",
};

// Major version of a "X.Y.Z…" string; -1 when absent or unparsable.
int major_version(const ojson& v) {
  if (!v.is_string()) return -1;
  const std::string s = v.get<std::string>();
  int major = 0;
  size_t i = 0;
  if (s.empty() || !std::isdigit(static_cast<unsigned char>(s[0]))) return -1;
  while (i < s.size() && std::isdigit(static_cast<unsigned char>(s[i])))
    major = major * 10 + (s[i++] - '0');
  return major;
}

// Mirrors sae_lens.loading.pretrained_sae_loaders.handle_pre_6_0_config, except that keys
// SAELens would drop are kept at the top level.
ojson convert_pre_6(const ojson& flat) {
  static const std::map<std::string, std::string> rename = {
      {"hook_point", "hook_name"},
      {"hook_point_head_index", "hook_head_index"},
      {"activation_fn_str", "activation_fn"},
  };
  ojson cfg = ojson::object();
  ojson meta = ojson::object();
  if (flat.contains("metadata") && flat["metadata"].is_object()) meta = flat["metadata"];
  for (auto it = flat.begin(); it != flat.end(); ++it) {
    if (it.key() == "metadata") continue;
    std::string key = rename.count(it.key()) ? rename.at(it.key()) : it.key();
    if (kMetadataKeys.count(key))
      meta[key] = it.value();
    else
      cfg[key] = it.value();
  }
  if (!meta.contains("prepend_bos")) meta["prepend_bos"] = true;
  if (!meta.contains("sae_lens_training_version")) meta["sae_lens_training_version"] = nullptr;
  if (!meta.contains("neuronpedia_id")) meta["neuronpedia_id"] = nullptr;
  if (!cfg.contains("apply_b_dec_to_input")) cfg["apply_b_dec_to_input"] = true;
  if (!cfg.contains("activation_fn")) cfg["activation_fn"] = "relu";
  if (!cfg.contains("architecture")) cfg["architecture"] = "standard";
  if (!cfg.contains("reshape_activations")) {
    std::string hook = meta.contains("hook_name") && meta["hook_name"].is_string()
                           ? meta["hook_name"].get<std::string>()
                           : "";
    cfg["reshape_activations"] = hook.find("hook_z") != std::string::npos ? "hook_z" : "none";
  }
  if (cfg["activation_fn"] == "topk" && cfg.contains("activation_fn_kwargs") &&
      cfg["activation_fn_kwargs"].is_object() && cfg["activation_fn_kwargs"].contains("k") &&
      !cfg["activation_fn_kwargs"]["k"].is_null()) {
    cfg["architecture"] = "topk";
    cfg["k"] = cfg["activation_fn_kwargs"]["k"];
  }
  if (cfg.contains("normalize_activations") && cfg["normalize_activations"].is_boolean())
    cfg["normalize_activations"] =
        cfg["normalize_activations"].get<bool>() ? "expected_average_only_in" : "none";
  if (!cfg.contains("normalize_activations") || cfg["normalize_activations"].is_null())
    cfg["normalize_activations"] = "none";
  if (!cfg.contains("device")) cfg["device"] = "cpu";
  // Now in the v6 layout; SAELens likewise stamps its own (>= 6) version on conversion.
  meta["sae_lens_version"] = "6.0.0";
  cfg["metadata"] = meta;
  return cfg;
}

int64_t get_positive_int(const ojson& j, const char* key, const std::string& where) {
  if (!j.contains(key)) fail(where, key, "missing");
  const auto& v = j[key];
  if (!v.is_number_integer() || v.get<int64_t>() <= 0)
    fail(where, key, cat("must be a positive integer, got ", v.dump()));
  return v.get<int64_t>();
}

bool get_bool(const ojson& j, const char* key, bool fallback, const std::string& where) {
  if (!j.contains(key) || j[key].is_null()) return fallback;
  if (!j[key].is_boolean()) fail(where, key, cat("must be true or false, got ", j[key].dump()));
  return j[key].get<bool>();
}

}  // namespace

SaeConfig SaeConfig::from_json(const ojson& j_in, const std::string& where) {
  if (!j_in.is_object()) fail(where, "", "config is not a JSON object");
  SaeConfig c;
  int version = major_version(j_in.value("sae_lens_version", ojson()));
  if (version < 0 && j_in.contains("metadata") && j_in["metadata"].is_object())
    version = major_version(j_in["metadata"].value("sae_lens_version", ojson()));
  c.converted_from_pre_6 = version < 6;
  c.json = c.converted_from_pre_6 ? convert_pre_6(j_in) : j_in;
  const ojson& j = c.json;

  if (!j.contains("architecture") || !j["architecture"].is_string())
    fail(where, "architecture", "missing or not a string");
  const std::string arch = j["architecture"].get<std::string>();
  if (arch == "standard")
    c.architecture = Architecture::Standard;
  else if (arch == "topk")
    c.architecture = Architecture::TopK;
  else if (arch == "jumprelu")
    c.architecture = Architecture::JumpReLU;
  else
    fail(where, "architecture",
         cat("unsupported architecture \"", arch, "\" (supported: standard, topk, jumprelu)"));

  c.d_in = get_positive_int(j, "d_in", where);
  c.d_sae = get_positive_int(j, "d_sae", where);
  if (c.d_sae > INT32_MAX) fail(where, "d_sae", "larger than 2^31-1 latents is not supported");

  if (j.contains("dtype") && !j["dtype"].is_null()) {
    if (!j["dtype"].is_string()) fail(where, "dtype", "must be a string");
    auto dt = dtype_from_torch_name(j["dtype"].get<std::string>());
    if (!dt) fail(where, "dtype", cat("unknown dtype ", j["dtype"].dump()));
    c.dtype = *dt;
  }
  c.apply_b_dec_to_input = get_bool(j, "apply_b_dec_to_input", true, where);

  std::string norm = "none";
  if (j.contains("normalize_activations") && !j["normalize_activations"].is_null()) {
    if (!j["normalize_activations"].is_string())
      fail(where, "normalize_activations", "must be a string");
    norm = j["normalize_activations"].get<std::string>();
  }
  if (norm == "none")
    c.normalize_activations = InputNorm::None;
  else if (norm == "expected_average_only_in")
    c.normalize_activations = InputNorm::ExpectedAverageOnlyIn;
  else if (norm == "constant_norm_rescale")
    c.normalize_activations = InputNorm::ConstantNormRescale;
  else if (norm == "layer_norm")
    c.normalize_activations = InputNorm::LayerNorm;
  else
    fail(where, "normalize_activations", cat("unsupported value \"", norm, "\""));

  if (j.contains("reshape_activations") && j["reshape_activations"].is_string() &&
      j["reshape_activations"] != "none")
    fail(where, "reshape_activations",
         cat("\"", j["reshape_activations"].get<std::string>(),
             "\" is not supported (pass activations already flattened to [tokens, d_in])"));

  if (c.architecture == Architecture::TopK) {
    c.k = j.contains("k") ? get_positive_int(j, "k", where) : 100;  // SAELens default
    if (c.k > c.d_sae) fail(where, "k", cat(c.k, " is larger than d_sae ", c.d_sae));
    c.rescale_acts_by_decoder_norm = get_bool(j, "rescale_acts_by_decoder_norm", false, where);
  }
  return c;
}

ojson SaeConfig::to_json() const {
  ojson j = json;
  j["architecture"] = architecture_name(architecture);
  j["d_in"] = d_in;
  j["d_sae"] = d_sae;
  j["dtype"] = dtype_torch_name(dtype);
  if (!j.contains("device")) j["device"] = "cpu";
  j["apply_b_dec_to_input"] = apply_b_dec_to_input;
  j["normalize_activations"] = input_norm_name(normalize_activations);
  if (!j.contains("reshape_activations")) j["reshape_activations"] = "none";
  if (architecture == Architecture::TopK) {
    j["k"] = k;
    j["rescale_acts_by_decoder_norm"] = rescale_acts_by_decoder_norm;
  } else {
    j.erase("k");
    j.erase("rescale_acts_by_decoder_norm");
  }
  if (!j.contains("metadata") || !j["metadata"].is_object()) j["metadata"] = ojson::object();
  // SAELens reads a config without a version >= 6 as a flat pre-6.0 one (and then drops
  // "metadata"), so a config written from scratch is marked with the v6 layout it has.
  if (!j["metadata"].contains("sae_lens_version") || j["metadata"]["sae_lens_version"].is_null())
    j["metadata"]["sae_lens_version"] = "6.0.0";
  return j;
}

std::string SaeConfig::metadata_string(const std::string& key) const {
  if (!json.contains("metadata") || !json["metadata"].is_object()) return "";
  const auto& m = json["metadata"];
  if (!m.contains(key) || m[key].is_null()) return "";
  return m[key].is_string() ? m[key].get<std::string>() : m[key].dump();
}

SaeConfig read_sae_config(const std::string& path) {
  return SaeConfig::from_json(read_json_file(path), path);
}

}  // namespace sae

// An SAE's cfg.json as SAELens 6 defines it. Pre-6.0 (flat) configs are converted on load the
// way SAELens's handle_pre_6_0_config does. Every field read is kept, so saving writes back
// what was loaded (plus what sae.cpp changed), in the v6 layout.
#pragma once

#include <cstdint>
#include <nlohmann/json.hpp>
#include <string>

#include "core/dtype.h"

namespace sae {

enum class Architecture { Standard, TopK, JumpReLU };
enum class InputNorm { None, ExpectedAverageOnlyIn, ConstantNormRescale, LayerNorm };

std::string_view architecture_name(Architecture a);  // "standard", "topk", "jumprelu"
std::string_view input_norm_name(InputNorm n);       // SAELens's normalize_activations value

struct SaeConfig {
  Architecture architecture = Architecture::Standard;
  int64_t d_in = 0;
  int64_t d_sae = 0;
  DType dtype = DType::F32;  // cfg "dtype": the dtype SAELens computes in
  bool apply_b_dec_to_input = true;
  InputNorm normalize_activations = InputNorm::None;
  int64_t k = 0;                              // topk only
  bool rescale_acts_by_decoder_norm = false;  // topk only
  bool converted_from_pre_6 = false;          // the file was a flat pre-6.0 config

  // The whole config as JSON (v6 layout). Typed fields above are written back into it by
  // to_json(); anything sae.cpp does not interpret is carried along untouched.
  nlohmann::ordered_json json;

  // `where` names the file in error messages.
  static SaeConfig from_json(const nlohmann::ordered_json& j, const std::string& where);
  nlohmann::ordered_json to_json() const;

  // metadata.<key> as a string ("" when absent or null); numbers are printed.
  std::string metadata_string(const std::string& key) const;
};

SaeConfig read_sae_config(const std::string& path);  // parses cfg.json

}  // namespace sae

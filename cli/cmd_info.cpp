// sae info <sae>: architecture, sizes, dtypes, threshold and decoder-norm statistics, metadata.
#include <algorithm>
#include <cstdio>
#include <iostream>
#include <numeric>

#include "commands.h"
#include "sae/load.h"

namespace sae::cli {

namespace {
nlohmann::ordered_json stats(const std::vector<float>& v) {
  if (v.empty()) return nullptr;
  auto [mn, mx] = std::minmax_element(v.begin(), v.end());
  double mean = std::accumulate(v.begin(), v.end(), 0.0) / double(v.size());
  return {{"min", *mn}, {"mean", mean}, {"max", *mx}};
}
}  // namespace

Runner add_info(CLI::App& app) {
  auto* cmd = app.add_subcommand(
      "info", "Describe an SAE: architecture, dims, dtype, thresholds, metadata");
  auto ref = std::make_shared<std::string>();
  auto json = std::make_shared<bool>(false);
  cmd->add_option("sae", *ref, "SAE folder or release:sae_id")->required();
  cmd->add_flag("--json", *json, "Print JSON instead of text");
  return [=] {
    LoadedSae l = load_sae_ref(*ref);
    const Sae& s = l.sae;
    nlohmann::ordered_json j;
    j["folder"] = l.folder;
    j["architecture"] = architecture_name(s.cfg.architecture);
    j["d_in"] = s.cfg.d_in;
    j["d_sae"] = s.cfg.d_sae;
    j["cfg_dtype"] = dtype_torch_name(s.cfg.dtype);
    j["stored_dtype"] = dtype_name(s.stored_dtype);
    j["apply_b_dec_to_input"] = s.cfg.apply_b_dec_to_input;
    j["normalize_activations"] = input_norm_name(s.cfg.normalize_activations);
    if (s.cfg.architecture == Architecture::TopK) {
      j["k"] = s.cfg.k;
      j["rescale_acts_by_decoder_norm"] = s.cfg.rescale_acts_by_decoder_norm;
    }
    if (!s.threshold.empty()) j["threshold"] = stats(s.threshold);
    j["decoder_norm"] = stats(s.decoder_norms());
    j["converted_from_pre_6_config"] = s.cfg.converted_from_pre_6;
    j["has_sparsity"] = l.sparsity.has_value();
    if (l.sparsity) {
      int64_t never =
          std::count_if(l.sparsity->begin(), l.sparsity->end(), [](float v) { return v <= -9.5f; });
      j["sparsity_log10"] = stats(*l.sparsity);
      j["latents_never_fired_in_training"] = never;
    }
    j["metadata"] = s.cfg.json.value("metadata", nlohmann::ordered_json::object());
    if (*json) {
      std::cout << j.dump(2) << "\n";
      return 0;
    }
    for (auto it = j.begin(); it != j.end(); ++it) {
      if (it.key() == "metadata") continue;
      std::cout << it.key() << ": " << (it->is_string() ? it->get<std::string>() : it->dump())
                << "\n";
    }
    std::cout << "metadata:\n";
    for (auto it = j["metadata"].begin(); it != j["metadata"].end(); ++it)
      std::cout << "  " << it.key() << ": "
                << (it->is_string() ? it->get<std::string>() : it->dump()) << "\n";
    return 0;
  };
}

}  // namespace sae::cli

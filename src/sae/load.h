// Loading SAEs in SAELens format: a folder, or a release / Hugging Face repo + SAE id.
#pragma once

#include <optional>
#include <string>
#include <vector>

#include "sae/sae.h"

namespace sae {

inline constexpr const char* kCfgFile = "cfg.json";
inline constexpr const char* kWeightsFile = "sae_weights.safetensors";
inline constexpr const char* kSparsityFile = "sparsity.safetensors";

struct LoadedSae {
  Sae sae;
  std::string folder;                          // where it was read from
  std::optional<std::vector<float>> sparsity;  // log10 firing frequency [d_sae], if present
};

// Reads cfg.json and sae_weights.safetensors (and sparsity.safetensors when present) from a
// folder. Every tensor's shape is checked against cfg.json; float dtypes are converted to f32.
LoadedSae load_from_disk(const std::string& folder);

// `release` is a local release folder, a SAELens release name (e.g.
// "gemma-2-2b-res-snap-matryoshka-dc") or a Hugging Face repo id ("org/name") found in the
// local HF cache. See resolve_pretrained() in sae/pretrained.h.
LoadedSae from_pretrained(const std::string& release, const std::string& sae_id);

// A CLI-style reference: a folder path, or "release:sae_id".
LoadedSae load_sae_ref(const std::string& ref);

}  // namespace sae

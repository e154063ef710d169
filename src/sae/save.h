// Writing SAEs in SAELens format: cfg.json + sae_weights.safetensors (+ sparsity.safetensors),
// each file written atomically.
#pragma once

#include <optional>
#include <string>
#include <vector>

#include "sae/sae.h"

namespace sae {

// dtype: the weights' on-disk dtype (F32, BF16 or F16); cfg.json "dtype" is set to match.
void save_to_disk(const Sae& sae, const std::string& folder, DType dtype = DType::F32,
                  const std::optional<std::vector<float>>& sparsity = std::nullopt);

}  // namespace sae

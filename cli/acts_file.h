// Activation files for the CLI: .npy or .safetensors, [tokens, d_in] (leading dims flattened).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace sae::cli {

struct Activations {
  std::vector<float> data;  // [n, d] f32
  int64_t n = 0, d = 0;
};

// `tensor` picks a tensor in a .safetensors file; empty means "activations" if present, else
// the file's only tensor. NaN/Inf values are rejected with the file, row and column.
Activations read_activations(const std::string& path, const std::string& tensor = "");

}  // namespace sae::cli

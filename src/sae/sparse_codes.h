// Sparse SAE codes in CSR form: token t's active latents are indices[offsets[t]..offsets[t+1]),
// sorted by latent index, with their (non-zero) values.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace sae {

struct SparseCodes {
  int64_t n_tokens = 0;
  int64_t d_sae = 0;
  std::vector<int64_t> offsets;  // n_tokens + 1
  std::vector<int32_t> indices;
  std::vector<float> values;
  // Per-token undoing of run-time input normalisation (constant_norm_rescale, layer_norm):
  // decode returns x_hat * out_scale + out_shift. Empty when the SAE does not normalise.
  std::vector<float> out_scale, out_shift;

  int64_t nnz() const { return int64_t(indices.size()); }
  std::vector<float> to_dense() const;  // [n_tokens, d_sae]
};

// Writes codes as safetensors: "indices" I32 [nnz], "values" F32 [nnz], "offsets" I64 [n+1]
// (plus "out_scale"/"out_shift" F32 [n] when present); metadata records d_sae.
void save_sparse_codes(const std::string& path, const SparseCodes& codes);
SparseCodes load_sparse_codes(const std::string& path);

}  // namespace sae

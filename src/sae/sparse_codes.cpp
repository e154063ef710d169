#include "sae/sparse_codes.h"

#include "core/error.h"
#include "io/safetensors.h"

namespace sae {

std::vector<float> SparseCodes::to_dense() const {
  std::vector<float> dense(size_t(n_tokens * d_sae), 0.0f);
  for (int64_t t = 0; t < n_tokens; ++t)
    for (int64_t e = offsets[size_t(t)]; e < offsets[size_t(t + 1)]; ++e)
      dense[size_t(t * d_sae + indices[size_t(e)])] = values[size_t(e)];
  return dense;
}

void save_sparse_codes(const std::string& path, const SparseCodes& c) {
  std::vector<TensorToWrite> t = {
      tensor_view("offsets", std::span<const int64_t>(c.offsets), {int64_t(c.offsets.size())}),
      tensor_view("indices", std::span<const int32_t>(c.indices), {c.nnz()}),
      tensor_view("values", std::span<const float>(c.values), {c.nnz()}),
  };
  if (!c.out_scale.empty()) {
    t.push_back(tensor_view("out_scale", std::span<const float>(c.out_scale), {c.n_tokens}));
    t.push_back(tensor_view("out_shift", std::span<const float>(c.out_shift), {c.n_tokens}));
  }
  write_safetensors(path, std::move(t),
                    {{"format", "sae.cpp sparse codes (CSR)"}, {"d_sae", std::to_string(c.d_sae)}});
}

SparseCodes load_sparse_codes(const std::string& path) {
  SafetensorsFile f(path);
  SparseCodes c;
  auto it = f.metadata().find("d_sae");
  if (it == f.metadata().end()) fail(path, "__metadata__.d_sae", "missing");
  c.d_sae = std::stoll(it->second);
  c.offsets = f.read_i64("offsets");
  if (c.offsets.empty() || c.offsets[0] != 0) fail(path, "offsets", "must start at 0");
  c.n_tokens = int64_t(c.offsets.size()) - 1;
  auto idx = f.read_i64("indices");
  c.values = f.read_f32("values");
  if (idx.size() != c.values.size() || int64_t(idx.size()) != c.offsets.back())
    fail(path, "indices", "length disagrees with values or offsets");
  for (size_t t = 1; t < c.offsets.size(); ++t)
    if (c.offsets[t] < c.offsets[t - 1]) fail(path, "offsets", "must be non-decreasing");
  c.indices.resize(idx.size());
  for (size_t i = 0; i < idx.size(); ++i) {
    if (idx[i] < 0 || idx[i] >= c.d_sae)
      fail(path, "indices", cat("index ", idx[i], " out of range"));
    c.indices[i] = int32_t(idx[i]);
  }
  if (f.has("out_scale")) {
    c.out_scale = f.read_f32("out_scale", {c.n_tokens});
    c.out_shift = f.read_f32("out_shift", {c.n_tokens});
  }
  return c;
}

}  // namespace sae

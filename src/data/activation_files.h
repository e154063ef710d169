// Activations from files: .npy or .safetensors shards of [tokens, d_in] (any float dtype),
// memory-mapped. The last `heldout_tokens` rows are held out; training batches draw the rest
// in a fresh seeded permutation each epoch.
#pragma once

#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "core/dtype.h"
#include "data/source.h"

namespace sae::data {

struct FilesConfig {
  std::vector<std::string> paths;
  std::string tensor;  // tensor name in .safetensors shards ("" = "activations" or the only one)
  int64_t heldout_tokens = 4096;
  uint64_t seed = 0;
  static FilesConfig from_json(const nlohmann::json& j, const std::string& where);
  nlohmann::json to_json() const;
};

class FileSource final : public ActivationSource {
 public:
  explicit FileSource(FilesConfig cfg);
  // An in-memory [rows, d_in] f32 array (not copied: it must outlive the source), with the
  // same held-out split and shuffling as files.
  FileSource(const float* data, int64_t rows, int64_t d_in, int64_t heldout_tokens, uint64_t seed);
  ~FileSource() override;

  int64_t d_in() const override { return d_in_; }
  void train_batch(int64_t index, int64_t batch, float* out) override;
  int64_t heldout_size(int64_t n) const override { return std::min(n, n_heldout_); }
  void heldout(int64_t n, float* out) override;
  std::string describe() const override;

 private:
  struct Shard;
  void read_row(int64_t row, float* out) const;
  const std::vector<int64_t>& permutation(int64_t epoch);

  FilesConfig cfg_;
  std::vector<std::unique_ptr<Shard>> shards_;
  std::vector<int64_t> shard_start_;  // first global row of each shard, plus the total
  int64_t d_in_ = 0, n_rows_ = 0, n_heldout_ = 0, n_train_ = 0;
  int64_t perm_epoch_ = -1;
  std::vector<int64_t> perm_;
};

}  // namespace sae::data

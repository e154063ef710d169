// Activation cache: text -> Gemma-2 -> the hook activations of several layers, written once to
// safetensors shards per layer, so SAEs can be trained (and retrained) from them later without
// the model (`sae train` with data.type = "files", whose reader shuffles over all rows).
//
//   out/cache.json                                 what, how far, where the corpus stood
//   out/blocks.L.hook_resid_post/shard-00000.safetensors   "activations" [n, d], "tokens" [n]
//
// Rows are the non-special tokens of the context windows, in corpus order, the same tokens in
// every layer's shard of one index. Shards appear whole (temp file + rename); cache.json is
// rewritten after each set of shards, so a killed job resumes after the last complete set.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "data/context_windows.h"
#include "data/corpus.h"
#include "io/safetensors.h"
#include "nlohmann/json.hpp"

namespace sae::pipeline {

struct CacheOptions {
  std::string model_dir;
  std::string output_dir = "out/cache";
  data::CorpusConfig corpus;
  std::vector<int64_t> layers;
  std::string hook = "resid_post";
  data::WindowConfig windows;
  int64_t prompts_per_forward = 8;
  int64_t total_tokens = 0;  // per layer (rounded down to whole shards)
  int64_t shard_tokens = 1 << 16;
  std::string model_name, model_id;  // recorded for what is trained from the cache
  std::string dtype = "f32";         // activations stored as f32 or bf16
  bool keep_bf16 = false;            // model weights kept in bf16
  bool bf16_matmul = false;          // ... and multiplied in bf16 (model::Gemma2Options)
  std::string device = "cpu";        // "cuda": the forward on the GPU (rows come to the host)
  std::string precision = "bf16";    // the GPU forward's: bf16 or fp32
  bool resume = false;
  int64_t stop_after_shards = 0;  // > 0: return after writing this many shard sets (slices)
};

// A cache read back (`sae release --from-cache`): its manifest, checked.
struct CacheManifest {
  std::string folder;
  nlohmann::json json;  // cache.json as written
  std::string hook;     // resid_post, ...
  std::vector<int64_t> layers;
  int64_t shards = 0, shard_tokens = 0, hidden_size = 0;
  std::string model_name, model_id;  // as `sae cache` resolved them ("" in older caches)
};
// Throws sae::Error naming cache.json and the field when it is missing or malformed.
CacheManifest read_cache_manifest(const std::string& folder);

// The rows of some of a cache's shards, for several layers, in the order given, a few at a time
// (memory-mapped: a shard is never read whole). Errors name the shard file and the tensor.
class CacheRows {
 public:
  CacheRows(const CacheManifest& c, std::vector<int64_t> layers, std::vector<int64_t> shards);
  // Up to max_rows next rows of each layer into dst[i] ([rows, d]); 0 when every shard is read.
  int64_t read(const std::vector<float*>& dst, int64_t max_rows);
  // The first shard (by index) not begun yet: where a resumed run continues.
  int64_t next_shard() const;
  int64_t rows_read() const { return rows_read_; }

 private:
  const CacheManifest& c_;
  std::vector<int64_t> layers_, shards_;
  size_t shard_pos_ = 0;                                // index into shards_ of the open shard
  int64_t row_ = 0;                                     // next row in it
  std::vector<std::unique_ptr<SafetensorsFile>> open_;  // per layer
  int64_t rows_read_ = 0;
};

// Bytes the cache will take on disk.
int64_t cache_bytes(const CacheOptions& opt, int64_t hidden_size);

// Writes (or continues) the cache. Returns false when stopped early (resume to continue).
bool write_activation_cache(const CacheOptions& opt, const std::atomic<bool>* stop = nullptr);

}  // namespace sae::pipeline

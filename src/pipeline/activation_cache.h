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
#include <string>
#include <vector>

#include "data/context_windows.h"
#include "data/corpus.h"

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
  std::string dtype = "f32";  // activations stored as f32 or bf16
  bool keep_bf16 = false;     // model weights kept in bf16
  bool resume = false;
  int64_t stop_after_shards = 0;  // > 0: return after writing this many shard sets (slices)
};

// Bytes the cache will take on disk.
int64_t cache_bytes(const CacheOptions& opt, int64_t hidden_size);

// Writes (or continues) the cache. Returns false when stopped early (resume to continue).
bool write_activation_cache(const CacheOptions& opt, const std::atomic<bool>* stop = nullptr);

}  // namespace sae::pipeline

// The release tests' corpus: 400 short documents (the tiny corpus's lines, numbered) as JSONL
// text, for test_release (compressed to .jsonl.zst) and test_cuda_gemma2 (plain .jsonl), and
// the small activation store both test on it.
#pragma once

#include <fstream>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "model/tokenizer.h"
#include "pipeline/activation_store.h"
#include "test_util.h"

namespace sae::test {

inline std::string tiny_corpus_jsonl() {
  std::ifstream in(test_dir() / "data/tiny_corpus.txt");
  std::vector<std::string> lines;
  for (std::string l; std::getline(in, l);)
    if (!l.empty()) lines.push_back(l);
  std::string jl;
  for (int i = 0; i < 400; ++i)
    jl +=
        nlohmann::json{{"text", lines[size_t(i) % lines.size()] + " " + std::to_string(i)}}.dump() +
        "\n";
  return jl;
}

// Windows of 16 tokens (BOS-separated), 3 per forward, a buffer of 4 forwards, batches of 20.
inline pipeline::StoreConfig tiny_store_config(const model::Tokenizer& tok) {
  pipeline::StoreConfig sc;
  sc.windows.context_size = 16;
  sc.windows.bos_id = tok.bos_id();
  sc.windows.separator_id = tok.bos_id();
  sc.prompts_per_forward = 3;
  sc.n_batches_in_buffer = 4;
  sc.batch_tokens = 20;
  return sc;
}

}  // namespace sae::test

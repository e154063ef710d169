// The release tests' corpus: 400 short documents (the tiny corpus's lines, numbered) as JSONL
// text, for test_release (compressed to .jsonl.zst) and test_cuda_gemma2 (plain .jsonl).
#pragma once

#include <fstream>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

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

}  // namespace sae::test

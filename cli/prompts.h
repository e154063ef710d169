// Prompts for the model commands: --text values and/or a file with one prompt per line.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace sae::cli {

std::vector<std::string> read_prompts(const std::vector<std::string>& texts,
                                      const std::string& file);
// Tokenised with <model_dir>/tokenizer.model, BOS first.
std::vector<std::vector<int32_t>> tokenize_prompts(const std::string& model_dir,
                                                   const std::vector<std::string>& texts);
// "0-24", "3,5,7", "1-3,8", checked against the model's layer count.
std::vector<int64_t> parse_layers(const std::string& spec, int64_t n_layers);

}  // namespace sae::cli

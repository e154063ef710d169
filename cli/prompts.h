// Values the model commands parse: prompts (--text values and/or a file with one prompt per
// line), layer lists and token counts.
#pragma once

#include <atomic>
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
// The same for any index in 0..n-1 (`what` names one in errors, `option` the flag).
std::vector<int64_t> parse_ranges(const std::string& option, const std::string& spec, int64_t n,
                                  const std::string& what);
// "750M", "2.5B", "64K", "20000" -> a count; `option` names the flag in errors.
int64_t parse_count(const std::string& option, const std::string& s);
// SIGINT / SIGTERM set the returned flag (long jobs checkpoint and stop when it is set).
const std::atomic<bool>& stop_on_signals();

}  // namespace sae::cli

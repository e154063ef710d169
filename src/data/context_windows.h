// Token documents -> context windows of exactly `context_size` tokens, with SAELens's
// semantics (concat_and_batch_sequences, begin_sequence_token_id None):
//  - packing (default): documents are concatenated; every window starts with BOS (unless the
//    document piece already does), a separator (BOS by default) goes between documents inside
//    a window unless the next document already starts with it; a document longer than the
//    room left continues in the next window, which again starts with BOS;
//  - truncation (disable_concat_sequences): one window per document, BOS + its first
//    context_size - 1 tokens; shorter documents are dropped.
#pragma once

#include <cstdint>
#include <deque>
#include <optional>
#include <span>
#include <vector>

namespace sae::data {

struct WindowConfig {
  int64_t context_size = 1024;
  bool prepend_bos = true;
  int32_t bos_id = 2;
  std::optional<int32_t> separator_id = 2;  // between packed documents (none: just concatenate)
  bool concat = true;                       // false: truncate each document instead
};

class ContextWindows {
 public:
  explicit ContextWindows(WindowConfig cfg);
  // Adds a document's tokens (no BOS needed: the windows add it).
  void add(std::span<const int32_t> doc);
  // The next complete window, if one is ready.
  bool pop(std::vector<int32_t>& window);
  int64_t ready() const { return int64_t(ready_.size()); }

 private:
  WindowConfig cfg_;
  std::vector<int32_t> cur_;  // the window being filled (empty: none started)
  bool started_ = false;
  std::deque<std::vector<int32_t>> ready_;
};

}  // namespace sae::data

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

// Where a window's token came from: its document (Document::index) and its position in that
// document's tokens; doc = -1 for a BOS or separator the windows added.
struct TokenOrigin {
  int64_t doc = -1;
  int32_t pos = 0;
};

class ContextWindows {
 public:
  explicit ContextWindows(WindowConfig cfg);
  // Adds a document's tokens (no BOS needed: the windows add it); `doc_index` is recorded in
  // the origins of its tokens.
  void add(std::span<const int32_t> doc, int64_t doc_index = -1);
  // The next complete window, if one is ready, and where each of its tokens came from.
  bool pop(std::vector<int32_t>& window, std::vector<TokenOrigin>* origins = nullptr);
  int64_t ready() const { return int64_t(ready_.size()); }

 private:
  WindowConfig cfg_;
  std::vector<int32_t> cur_;  // the window being filled (empty: none started)
  std::vector<TokenOrigin> cur_origins_;
  bool started_ = false;
  std::deque<std::vector<int32_t>> ready_;
  std::deque<std::vector<TokenOrigin>> ready_origins_;
};

}  // namespace sae::data

#include "data/context_windows.h"

#include <algorithm>

#include "core/error.h"

namespace sae::data {

ContextWindows::ContextWindows(WindowConfig cfg) : cfg_(cfg) {
  if (cfg_.context_size < 2) fail("context windows", "context_size", "must be at least 2");
}

void ContextWindows::add(std::span<const int32_t> doc) {
  const size_t cs = size_t(cfg_.context_size);
  if (doc.empty()) return;
  if (!cfg_.concat) {
    std::vector<int32_t> w;
    if (cfg_.prepend_bos && doc.size() + 1 >= cs && doc[0] != cfg_.bos_id) {
      w.push_back(cfg_.bos_id);
      w.insert(w.end(), doc.begin(), doc.begin() + std::min(doc.size(), cs - 1));
    } else {
      w.assign(doc.begin(), doc.begin() + std::min(doc.size(), cs));
    }
    if (w.size() == cs) ready_.push_back(std::move(w));
    return;
  }
  size_t offset = 0;
  while (offset < doc.size()) {
    if (!started_) {  // a new window: BOS first, unless the piece starts with it
      started_ = true;
      cur_.clear();
      if (cfg_.prepend_bos && doc[offset] != cfg_.bos_id) cur_.push_back(cfg_.bos_id);
    } else if (offset == 0 && cfg_.separator_id && doc[0] != *cfg_.separator_id) {
      cur_.push_back(*cfg_.separator_id);  // between documents
    }
    const size_t take = std::min(cs - std::min(cs, cur_.size()), doc.size() - offset);
    cur_.insert(cur_.end(), doc.begin() + offset, doc.begin() + offset + take);
    offset += take;
    if (cur_.size() >= cs) {
      cur_.resize(cs);
      ready_.push_back(std::move(cur_));
      cur_ = {};
      started_ = false;
    }
  }
}

bool ContextWindows::pop(std::vector<int32_t>& window) {
  if (ready_.empty()) return false;
  window = std::move(ready_.front());
  ready_.pop_front();
  return true;
}

}  // namespace sae::data

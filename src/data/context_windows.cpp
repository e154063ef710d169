#include "data/context_windows.h"

#include <algorithm>

#include "core/error.h"

namespace sae::data {

ContextWindows::ContextWindows(WindowConfig cfg) : cfg_(cfg) {
  if (cfg_.context_size < 2) fail("context windows", "context_size", "must be at least 2");
}

void ContextWindows::add(std::span<const int32_t> doc, int64_t doc_index) {
  const size_t cs = size_t(cfg_.context_size);
  if (doc.empty()) return;
  // Tokens [from, from + n) of the document, appended with their origins.
  auto append = [&](std::vector<int32_t>& w, std::vector<TokenOrigin>& o, size_t from, size_t n) {
    w.insert(w.end(), doc.begin() + from, doc.begin() + from + n);
    for (size_t i = 0; i < n; ++i) o.push_back({doc_index, int32_t(from + i)});
  };
  if (!cfg_.concat) {
    std::vector<int32_t> w;
    std::vector<TokenOrigin> o;
    if (cfg_.prepend_bos && doc.size() + 1 >= cs && doc[0] != cfg_.bos_id) {
      w.push_back(cfg_.bos_id);
      o.push_back({});
      append(w, o, 0, std::min(doc.size(), cs - 1));
    } else {
      append(w, o, 0, std::min(doc.size(), cs));
    }
    if (w.size() == cs) ready_.push_back(std::move(w)), ready_origins_.push_back(std::move(o));
    return;
  }
  size_t offset = 0;
  while (offset < doc.size()) {
    if (!started_) {  // a new window: BOS first, unless the piece starts with it
      started_ = true;
      cur_.clear();
      cur_origins_.clear();
      if (cfg_.prepend_bos && doc[offset] != cfg_.bos_id)
        cur_.push_back(cfg_.bos_id), cur_origins_.push_back({});
    } else if (offset == 0 && cfg_.separator_id && doc[0] != *cfg_.separator_id) {
      cur_.push_back(*cfg_.separator_id);  // between documents
      cur_origins_.push_back({});
    }
    const size_t take = std::min(cs - std::min(cs, cur_.size()), doc.size() - offset);
    append(cur_, cur_origins_, offset, take);
    offset += take;
    if (cur_.size() >= cs) {
      cur_.resize(cs);
      cur_origins_.resize(cs);
      ready_.push_back(std::move(cur_));
      ready_origins_.push_back(std::move(cur_origins_));
      cur_ = {};
      cur_origins_ = {};
      started_ = false;
    }
  }
}

bool ContextWindows::pop(std::vector<int32_t>& window, std::vector<TokenOrigin>* origins) {
  if (ready_.empty()) return false;
  window = std::move(ready_.front());
  ready_.pop_front();
  if (origins) *origins = std::move(ready_origins_.front());
  ready_origins_.pop_front();
  return true;
}

}  // namespace sae::data

#include "pipeline/activation_store.h"

#include <algorithm>
#include <cstring>
#include <numeric>

#include "core/clock.h"
#include "core/error.h"

namespace sae::pipeline {

std::vector<int64_t> checked_layers(std::vector<int64_t> layers, int64_t n_layers,
                                    const std::string& where) {
  if (layers.empty()) fail(where, "layers", "give at least one layer");
  std::sort(layers.begin(), layers.end());
  layers.erase(std::unique(layers.begin(), layers.end()), layers.end());
  for (int64_t l : layers)
    if (l < 0 || l >= n_layers)
      fail(where, "layers", cat("layer ", l, " is outside 0..", n_layers - 1));
  return layers;
}

std::vector<uint8_t> non_special(std::span<const int32_t> ids,
                                 const std::vector<int32_t>& special) {
  std::vector<uint8_t> keep(ids.size());
  for (size_t t = 0; t < ids.size(); ++t)
    keep[t] = std::find(special.begin(), special.end(), ids[t]) == special.end();
  return keep;
}

WindowStream::WindowStream(data::Corpus& corpus, const model::Tokenizer& tok,
                           data::WindowConfig cfg)
    : corpus_(corpus), tok_(tok), packer_(cfg) {}

bool WindowStream::next(std::vector<int32_t>& window, std::vector<data::TokenOrigin>* origins) {
  while (!packer_.pop(window, origins)) {
    if (!corpus_.next(doc_)) return false;
    if (doc_.tokenized)
      packer_.add(doc_.tokens, doc_.index);
    else
      packer_.add(tok_.encode(doc_.text, /*add_bos=*/false), doc_.index);
  }
  ++windows_;
  return true;
}

ActivationStore::ActivationStore(const model::Gemma2& m, WindowStream& windows,
                                 model::HookPoint point, std::vector<int64_t> layers,
                                 StoreConfig cfg, std::vector<int32_t> special)
    : m_(&m),
      windows_(&windows),
      point_(point),
      layers_(std::move(layers)),
      cfg_(cfg),
      special_(std::move(special)),
      d_(m.cfg.hidden_size),
      rng_(cfg.seed) {
  if (layers_.empty()) fail("activation store", "layers", "none asked for");
  fill_ = [this](const std::vector<float*>& dst) { return forward_once(dst); };
  allocate(cfg_.prompts_per_forward * cfg_.windows.context_size, layers_.size());
}

ActivationStore::ActivationStore(model::DeviceGemma2& m, WindowStream& windows,
                                 model::HookPoint point, std::vector<int64_t> layers,
                                 StoreConfig cfg, std::vector<int32_t> special)
    : dm_(&m),
      windows_(&windows),
      point_(point),
      layers_(std::move(layers)),
      cfg_(cfg),
      special_(std::move(special)),
      d_(m.cfg().hidden_size),
      rng_(cfg.seed) {
  if (layers_.empty()) fail("activation store", "layers", "none asked for");
  allocate(cfg_.prompts_per_forward * cfg_.windows.context_size, layers_.size());
}

ActivationStore::ActivationStore(RowFill fill, int64_t max_fill_rows, int64_t d, size_t n_layers,
                                 StoreConfig cfg)
    : cfg_(cfg), fill_(std::move(fill)), d_(d), rng_(cfg.seed) {
  if (n_layers == 0) fail("activation store", "layers", "none asked for");
  allocate(max_fill_rows, n_layers);
}

void ActivationStore::allocate(int64_t max_fill_rows, size_t n_layers) {
  capacity_ = cfg_.n_batches_in_buffer * cfg_.prompts_per_forward * cfg_.windows.context_size;
  if (capacity_ < 2 * cfg_.batch_tokens)
    fail("activation store", "n_batches_in_buffer",
         cat("the buffer (", capacity_, " tokens) must hold at least two training batches of ",
             cfg_.batch_tokens, " tokens"));
  // Room for a full buffer plus one fill's worth of overshoot.
  const int64_t rows = capacity_ + max_fill_rows;
  if (dm_)
    dev_rows_ = std::make_unique<DeviceRows>(n_layers, rows, d_, dm_->stream());
  else
    buf_.assign(n_layers, std::vector<float>(size_t(rows * d_)));
}

// The next prompts_per_forward windows and the positions of their tokens that reach the SAEs.
bool ActivationStore::next_window_batch(model::TokenBatch& batch, std::vector<int32_t>& kept) {
  std::vector<int32_t> w;
  for (int64_t p = 0; p < cfg_.prompts_per_forward && windows_->next(w); ++p) batch.add(w);
  if (batch.n_prompts() == 0) return false;
  const std::vector<uint8_t> keep =
      non_special(batch.ids, cfg_.exclude_special ? special_ : std::vector<int32_t>{});
  for (size_t t = 0; t < keep.size(); ++t)
    if (keep[t]) kept.push_back(int32_t(t));
  return true;
}

int64_t ActivationStore::forward_once(const std::vector<float*>& dst) {
  model::TokenBatch batch;
  std::vector<int32_t> kept;
  if (!next_window_batch(batch, kept)) return 0;
  const double t0 = now_seconds();
  m_->forward(batch, layers_.back(), [&](model::HookPoint p, int64_t l, float* a, int64_t) {
    auto it = std::find(layers_.begin(), layers_.end(), l);
    if (p != point_ || it == layers_.end()) return;
    float* out = dst[size_t(it - layers_.begin())];
    for (int32_t t : kept) std::memcpy(out, a + t * d_, size_t(d_) * 4), out += d_;
  });
  forward_seconds_ += now_seconds() - t0;
  tokens_forwarded_ += batch.n_tokens();
  return int64_t(kept.size());
}

int64_t ActivationStore::forward_once_on_device(int64_t at) {
  model::TokenBatch batch;
  std::vector<int32_t> kept;
  if (!next_window_batch(batch, kept)) return 0;
  const double t0 = now_seconds();
  dev_rows_->set_kept(kept);
  // The kept rows are gathered on the forward's stream before it moves on (forward() ends
  // with that stream synchronized).
  dm_->forward(batch, layers_.back(), [&](model::HookPoint p, int64_t l, float* a, int64_t) {
    auto it = std::find(layers_.begin(), layers_.end(), l);
    if (p != point_ || it == layers_.end()) return;
    dev_rows_->append_kept(size_t(it - layers_.begin()), at, a);
  });
  forward_seconds_ += now_seconds() - t0;
  tokens_forwarded_ += batch.n_tokens();
  return int64_t(kept.size());
}

void ActivationStore::refill() {
  std::vector<float*> dst(buf_.size());
  while (rows_ < capacity_ && !exhausted_) {
    int64_t added = 0;
    if (dev_rows_) {
      added = forward_once_on_device(rows_);
    } else {
      for (size_t i = 0; i < buf_.size(); ++i) dst[i] = buf_[i].data() + rows_ * d_;
      added = fill_(dst);
    }
    if (added == 0) exhausted_ = true;
    rows_ += added;
  }
  // Shuffle all rows with one permutation shared by the layers (the same on either device).
  std::vector<int64_t> perm(static_cast<size_t>(rows_));
  std::iota(perm.begin(), perm.end(), 0);
  std::shuffle(perm.begin(), perm.end(), rng_);
  if (dev_rows_) {
    dev_rows_->permute(perm);
  } else {
    std::vector<float> tmp(static_cast<size_t>(rows_ * d_));
    for (auto& b : buf_) {
      for (int64_t r = 0; r < rows_; ++r)
        std::memcpy(tmp.data() + r * d_, b.data() + perm[size_t(r)] * d_, size_t(d_) * 4);
      std::memcpy(b.data(), tmp.data(), size_t(rows_ * d_) * 4);
    }
  }
  // Serve the front, keep half a buffer to mix with the next fill (all of it at the end).
  const int64_t keep = exhausted_ ? 0 : capacity_ / 2;
  const int64_t n_batches = std::max<int64_t>(0, (rows_ - keep) / cfg_.batch_tokens);
  serve_begin_ = 0;
  serve_end_ = n_batches * cfg_.batch_tokens;
}

bool ActivationStore::advance() {
  if (serve_begin_ < serve_end_) return true;
  // Drop what was served, keep the rest at the front, fill up and shuffle again.
  if (dev_rows_)
    dev_rows_->move_front(serve_end_, rows_ - serve_end_);
  else
    for (auto& b : buf_)
      std::memmove(b.data(), b.data() + serve_end_ * d_, size_t((rows_ - serve_end_) * d_) * 4);
  rows_ -= serve_end_;
  serve_begin_ = serve_end_ = 0;
  refill();
  return serve_begin_ < serve_end_;
}

bool ActivationStore::next_batch(const std::vector<float*>& out) {
  const size_t n_layers = dev_rows_ ? layers_.size() : buf_.size();
  if (out.size() != n_layers) fail("activation store", "out", "one pointer per layer");
  if (!advance()) return false;
  for (size_t i = 0; i < n_layers; ++i)
    if (dev_rows_)  // a GPU store's batch through the host (module parallel's exchange)
      dev_rows_->to_host(i, serve_begin_, cfg_.batch_tokens, out[i]);
    else
      std::memcpy(out[i], buf_[i].data() + serve_begin_ * d_, size_t(cfg_.batch_tokens * d_) * 4);
  serve_begin_ += cfg_.batch_tokens;
  return true;
}

bool ActivationStore::next_batch_view(std::vector<const float*>& rows) {
  if (!advance()) return false;
  const size_t n_layers = dev_rows_ ? layers_.size() : buf_.size();
  rows.resize(n_layers);
  for (size_t i = 0; i < n_layers; ++i)
    rows[i] = dev_rows_ ? dev_rows_->row(i, serve_begin_) : buf_[i].data() + serve_begin_ * d_;
  if (dev_rows_) dev_rows_->sync();
  serve_begin_ += cfg_.batch_tokens;
  return true;
}

Heldout collect_heldout(const model::Gemma2& m, WindowStream& windows, model::HookPoint point,
                        const std::vector<int64_t>& layers, int64_t n_tokens,
                        const std::vector<int32_t>& special) {
  Heldout h;
  h.acts.resize(layers.size());
  const int64_t d = m.cfg.hidden_size;
  std::vector<int32_t> w;
  while (h.n < n_tokens && windows.next(w)) {
    h.windows.push_back(w);
    const std::vector<uint8_t> keep = non_special(w, special);
    int64_t added = 0;
    m.forward(w, layers.back(), [&](model::HookPoint p, int64_t l, float* a, int64_t n) {
      auto it = std::find(layers.begin(), layers.end(), l);
      if (p != point || it == layers.end()) return;
      auto& dst = h.acts[size_t(it - layers.begin())];
      added = 0;
      for (int64_t t = 0; t < n && h.n + added < n_tokens; ++t)
        if (keep[size_t(t)]) dst.insert(dst.end(), a + t * d, a + (t + 1) * d), ++added;
    });
    h.n += added;
  }
  return h;
}

Heldout collect_heldout(model::DeviceGemma2& m, WindowStream& windows, model::HookPoint point,
                        const std::vector<int64_t>& layers, int64_t n_tokens,
                        const std::vector<int32_t>& special) {
  Heldout h;
  h.acts.resize(layers.size());
  const int64_t d = m.cfg().hidden_size;
  std::vector<int32_t> w;
  while (h.n < n_tokens && windows.next(w)) {
    h.windows.push_back(w);
    const std::vector<uint8_t> keep = non_special(w, special);
    model::TokenBatch batch;
    batch.add(w);
    int64_t added = 0;
    m.forward(batch, layers.back(), [&](model::HookPoint p, int64_t l, float* a, int64_t n) {
      auto it = std::find(layers.begin(), layers.end(), l);
      if (p != point || it == layers.end()) return;
      const std::vector<float> host = m.to_host(a, n * d);
      auto& dst = h.acts[size_t(it - layers.begin())];
      added = 0;
      for (int64_t t = 0; t < n && h.n + added < n_tokens; ++t)
        if (keep[size_t(t)])
          dst.insert(dst.end(), host.begin() + t * d, host.begin() + (t + 1) * d), ++added;
    });
    h.n += added;
  }
  return h;
}

}  // namespace sae::pipeline

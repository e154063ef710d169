#include "pipeline/activation_store.h"

#include <algorithm>
#include <cstring>
#include <numeric>

#include "core/clock.h"
#include "core/device.h"
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
  allocate(cfg_.prompts_per_forward * cfg_.windows.context_size, layers_.size());
}

ActivationStore::ActivationStore(model::DeviceGemma2& m, WindowStream& windows,
                                 model::HookPoint point, std::vector<int64_t> layers,
                                 StoreConfig cfg, std::vector<int32_t> special, bool rows_on_host)
    : dm_(&m),
      windows_(&windows),
      point_(point),
      layers_(std::move(layers)),
      cfg_(cfg),
      special_(std::move(special)),
      d_(m.cfg().hidden_size),
      rng_(cfg.seed),
      cuda_device_(current_cuda_device()) {
  if (layers_.empty()) fail("activation store", "layers", "none asked for");
  allocate(cfg_.prompts_per_forward * cfg_.windows.context_size, layers_.size(), rows_on_host);
}

ActivationStore::ActivationStore(RowFill fill, int64_t max_fill_rows, int64_t d, size_t n_layers,
                                 StoreConfig cfg)
    : cfg_(cfg), fill_(std::move(fill)), d_(d), rng_(cfg.seed) {
  if (n_layers == 0) fail("activation store", "layers", "none asked for");
  allocate(max_fill_rows, n_layers);
}

ActivationStore::~ActivationStore() {
  stop_filling();
}

void ActivationStore::allocate(int64_t max_fill_rows, size_t n_layers, bool rows_on_host) {
  capacity_ = cfg_.n_batches_in_buffer * cfg_.prompts_per_forward * cfg_.windows.context_size;
  if (capacity_ < 2 * cfg_.batch_tokens)
    fail("activation store", "n_batches_in_buffer",
         cat("the buffer (", capacity_, " tokens) must hold at least two training batches of ",
             cfg_.batch_tokens, " tokens"));
  if (max_fill_rows < 1) fail("activation store", "max_fill_rows", "must be at least 1");
  // Room for a full buffer plus one fill's worth of overshoot.
  max_fill_ = max_fill_rows;
  total_ = capacity_ + max_fill_;
  if (dm_) {
    dev_rows_ = std::make_unique<DeviceRows>(n_layers, total_, d_, dm_->stream(), rows_on_host);
  } else {
    buf_.assign(n_layers, std::vector<float>(size_t(total_ * d_)));
    spare_.resize(size_t(total_ * d_));
  }
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

// A fill fits: it stops once kept + new rows reach capacity_, so before its last chunk
// kept + n_new_ < capacity_ and after it n_new_ < capacity_ - kept + max_fill_ = total_ - kept,
// the slots from rows_ to the end plus the served ones. The served ones free up as batches go.
void ActivationStore::wait_for_slots(int64_t n) {
  const int64_t need = std::min(serve_end_, rows_ + n_new_ + n - total_);
  if (need <= 0) return;
  std::unique_lock<std::mutex> lock(mu_);
  cv_.wait(lock, [&] { return consumed_ >= need || stopping_; });
  if (stopping_) throw Stopped{};
}

int64_t ActivationStore::fill_chunk() {
  const size_t n_layers = dev_rows_ ? layers_.size() : buf_.size();
  if (fill_) {  // a stream of rows: read into the slots, split where the ring wraps
    wait_for_slots(max_fill_);
    std::lock_guard<std::mutex> source(source_mu_);
    std::vector<float*> dst(n_layers);
    int64_t added = 0;
    const double t0 = now_seconds();
    while (added < max_fill_) {
      const int64_t at = slot(n_new_ + added), n = std::min(max_fill_ - added, total_ - at);
      for (size_t i = 0; i < n_layers; ++i) dst[i] = buf_[i].data() + at * d_;
      const int64_t got = fill_(dst, n);
      added += got;
      if (got < n) break;  // the rows ended
    }
    forward_seconds_ = forward_seconds_ + (now_seconds() - t0);
    return added;
  }
  model::TokenBatch batch;
  std::vector<int32_t> kept;
  {
    std::lock_guard<std::mutex> source(source_mu_);
    if (!next_window_batch(batch, kept)) return 0;
  }
  const int64_t n = int64_t(kept.size());
  wait_for_slots(n);
  const int64_t at = slot(n_new_), first_run = std::min(n, total_ - at);
  auto layer_of = [&](model::HookPoint p, int64_t l) -> int64_t {
    auto it = std::find(layers_.begin(), layers_.end(), l);
    return p != point_ || it == layers_.end() ? -1 : int64_t(it - layers_.begin());
  };
  const double t0 = now_seconds();
  if (dev_rows_) {
    dev_rows_->set_kept(kept);
    // The kept rows are gathered on the forward's stream before it moves on (forward() ends
    // with that stream synchronized).
    dm_->forward(
        batch, layers_.back(),
        [&](model::HookPoint p, int64_t l, float* a, int64_t) {
          const int64_t i = layer_of(p, l);
          if (i < 0) return;
          dev_rows_->append_kept(size_t(i), at, a, 0, first_run);
          if (n > first_run) dev_rows_->append_kept(size_t(i), 0, a, first_run, n - first_run);
        },
        nullptr, /*hook_writes=*/false);
  } else {
    m_->forward(batch, layers_.back(), [&](model::HookPoint p, int64_t l, float* a, int64_t) {
      const int64_t i = layer_of(p, l);
      if (i < 0) return;
      float* out = buf_[size_t(i)].data();
      for (int64_t r = 0; r < n; ++r)
        std::memcpy(out + slot(n_new_ + r) * d_, a + kept[size_t(r)] * d_, size_t(d_) * 4);
    });
  }
  forward_seconds_ = forward_seconds_ + (now_seconds() - t0);
  tokens_forwarded_ += batch.n_tokens();
  return n;
}

void ActivationStore::fill_round() {
  while (rows_ - serve_end_ + n_new_ < capacity_ && !exhausted_) {
    if (stopping_) throw Stopped{};
    const int64_t added = fill_chunk();
    if (added == 0) exhausted_ = true;
    n_new_ += added;
  }
}

void ActivationStore::shuffle_round() {
  // The rows in the order a plain buffer would hold them: the kept ones, then the new ones.
  std::vector<int64_t> order;
  order.reserve(size_t(rows_ - serve_end_ + n_new_));
  for (int64_t r = serve_end_; r < rows_; ++r) order.push_back(r);
  for (int64_t i = 0; i < n_new_; ++i) order.push_back(slot(i));
  rows_ = int64_t(order.size());
  n_new_ = 0;
  // Shuffle them with one permutation shared by the layers (the same on either device), and
  // gather them to the front in that order.
  std::vector<int64_t> perm(static_cast<size_t>(rows_));
  std::iota(perm.begin(), perm.end(), 0);
  std::shuffle(perm.begin(), perm.end(), rng_);
  for (int64_t& p : perm) p = order[size_t(p)];
  if (dev_rows_) {
    dev_rows_->permute(perm);
    dev_rows_->sync();
  } else {  // gathered into the spare, which becomes the layer's buffer (the rows past rows_
            // are free slots: what they held is not needed)
    for (auto& b : buf_) {
      for (int64_t r = 0; r < rows_; ++r)
        std::memcpy(spare_.data() + r * d_, b.data() + perm[size_t(r)] * d_, size_t(d_) * 4);
      b.swap(spare_);
    }
  }
  // Serve the front, keep half a buffer to mix with the next fill (all of it at the end).
  const int64_t keep = exhausted_ ? 0 : capacity_ / 2;
  const int64_t n_batches = std::max<int64_t>(0, (rows_ - keep) / cfg_.batch_tokens);
  serve_begin_ = 0;
  serve_end_ = n_batches * cfg_.batch_tokens;
  std::lock_guard<std::mutex> lock(mu_);
  consumed_ = 0;
}

void ActivationStore::release_served() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (consumed_ >= serve_begin_) return;
    consumed_ = serve_begin_;
  }
  cv_.notify_all();
}

void ActivationStore::begin_round() {
  if (position_) {  // the thread is idle: where the next fill begins
    std::lock_guard<std::mutex> source(source_mu_);
    round_position_ = position_();
  }
  {
    std::lock_guard<std::mutex> lock(mu_);
    round_ = Round::Pending;
    if (!ahead_) return;
    round_ = Round::Filling;
    if (!filler_.joinable()) filler_ = std::thread([this] { filler_main(); });
  }
  cv_.notify_all();
}

void ActivationStore::finish_round() {
  std::unique_lock<std::mutex> lock(mu_);
  if (stopping_) fail("activation store", "filling", "stopped: the store serves no more batches");
  if (round_ == Round::Pending) {  // filled here, between the batches
    lock.unlock();
    fill_round();
    return;
  }
  const double t0 = now_seconds();
  cv_.wait(lock, [&] { return round_ == Round::Done; });
  wait_seconds_ += now_seconds() - t0;
  if (fill_error_) std::rethrow_exception(std::exchange(fill_error_, nullptr));
}

void ActivationStore::filler_main() {
  try {
    if (dev_rows_) use_cuda_device(cuda_device_);  // CUDA's current device is per thread
  } catch (...) {
    std::lock_guard<std::mutex> lock(mu_);
    fill_error_ = std::current_exception();
  }
  std::unique_lock<std::mutex> lock(mu_);
  while (true) {
    cv_.wait(lock, [&] { return round_ == Round::Filling || stopping_; });
    if (stopping_) return;
    if (!fill_error_) {
      lock.unlock();
      try {
        fill_round();
      } catch (const Stopped&) {
        return;
      } catch (...) {
        lock.lock();
        fill_error_ = std::current_exception();
        lock.unlock();
      }
      lock.lock();
    }
    round_ = Round::Done;
    cv_.notify_all();
  }
}

int64_t ActivationStore::checkpoint_position() {
  if (!position_) fail("activation store", "position", "no position tracked (track_position)");
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (ahead_ && round_ != Round::Pending) return round_position_;
  }
  // Filled between the batches (only this thread begins rounds): nothing in flight.
  std::lock_guard<std::mutex> source(source_mu_);
  return position_();
}

void ActivationStore::fill_ahead() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    ahead_ = true;
    if (round_ != Round::Pending || stopping_) return;
  }
  begin_round();  // the pending fill goes to the thread now
}

void ActivationStore::stop_filling() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (!ahead_ && !filler_.joinable()) return;
    stopping_ = true;
  }
  cv_.notify_all();
  if (filler_.joinable()) filler_.join();
}

bool ActivationStore::advance() {
  release_served();
  if (serve_begin_ < serve_end_) return true;
  finish_round();
  shuffle_round();
  begin_round();
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
  release_served();  // copied out
  return true;
}

bool ActivationStore::next_batch_view(std::vector<const float*>& rows) {
  if (!advance()) return false;
  const size_t n_layers = dev_rows_ ? layers_.size() : buf_.size();
  rows.resize(n_layers);
  for (size_t i = 0; i < n_layers; ++i)
    rows[i] = dev_rows_ ? dev_rows_->row(i, serve_begin_) : buf_[i].data() + serve_begin_ * d_;
  serve_begin_ += cfg_.batch_tokens;  // its rows stay unwritten until the next call
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
    m.forward(
        batch, layers.back(),
        [&](model::HookPoint p, int64_t l, float* a, int64_t n) {
          auto it = std::find(layers.begin(), layers.end(), l);
          if (p != point || it == layers.end()) return;
          const std::vector<float> host = m.to_host(a, n * d);
          auto& dst = h.acts[size_t(it - layers.begin())];
          added = 0;
          for (int64_t t = 0; t < n && h.n + added < n_tokens; ++t)
            if (keep[size_t(t)])
              dst.insert(dst.end(), host.begin() + t * d, host.begin() + (t + 1) * d), ++added;
        },
        nullptr, /*hook_writes=*/false);
    h.n += added;
  }
  return h;
}

}  // namespace sae::pipeline

#include <optional>
#include <utility>

#include "core/device.h"
#include "core/error.h"
#include "ops/cuda/gather_rows.h"
#include "ops/cuda/runtime.h"
#include "pipeline/device_rows.h"

namespace sae::pipeline {

namespace {

// One layer's rows: device memory, or pinned host memory mapped into the device's address
// space, which the same kernels read and write across the bus (data() is the device address).
class LayerRows {
 public:
  LayerRows(size_t n, bool on_host, const char* what) {
    if (!on_host) {
      p_ = static_cast<float*>(cuda::device_alloc(n * 4, what));
      return;
    }
    if (cudaHostAlloc(&host_, n * 4, cudaHostAllocMapped | cudaHostAllocPortable) != cudaSuccess) {
      cudaGetLastError();
      fail(cat(what, ": could not pin ", double(n * 4) / double(1 << 30),
               " GiB of host memory for the activation store (cudaHostAlloc)"));
    }
    SAE_CUDA(cudaHostGetDevicePointer(reinterpret_cast<void**>(&p_), host_, 0));
  }
  LayerRows(LayerRows&& o) noexcept { *this = std::move(o); }
  LayerRows& operator=(LayerRows&& o) noexcept {
    std::swap(p_, o.p_), std::swap(host_, o.host_);
    return *this;
  }
  ~LayerRows() {
    if (host_)
      cudaFreeHost(host_);
    else if (p_)
      cudaFree(p_);
  }
  float* data() const { return p_; }

 private:
  float* p_ = nullptr;    // the device address
  void* host_ = nullptr;  // the pinned allocation (host rows only)
};

}  // namespace

struct DeviceRows::Impl {
  int64_t rows = 0, d = 0;
  bool on_host = false;
  cudaStream_t s = nullptr;
  // to_host's: the served rows are read while the forward's stream may be busy with the next
  // fill's forwards on the store's thread (which a copy queued there would wait for).
  cudaStream_t copy = nullptr;
  std::vector<LayerRows> buf;
  std::optional<LayerRows> spare;  // the target of a gather, then swapped with the layer's
  cuda::DeviceBuffer<int32_t> kept, perm;
  int64_t n_kept = 0;
};

DeviceRows::DeviceRows(size_t n_layers, int64_t rows, int64_t d, void* stream, bool on_host) {
  require_device(Device::Cuda);
  impl_ = std::make_unique<Impl>();
  Impl& m = *impl_;
  m.rows = rows, m.d = d, m.s = static_cast<cudaStream_t>(stream), m.on_host = on_host;
  SAE_CHECK(rows < (int64_t(1) << 31), "activation store rows must fit int32");
  for (size_t i = 0; i < n_layers; ++i)
    m.buf.emplace_back(size_t(rows * d), on_host, "activation store buffer (one layer)");
  m.spare.emplace(size_t(rows * d), on_host, "activation store buffer (spare layer)");
  SAE_CUDA(cudaStreamCreateWithFlags(&m.copy, cudaStreamNonBlocking));
}

DeviceRows::~DeviceRows() {
  if (!impl_) return;
  cudaStreamSynchronize(impl_->s);
  if (impl_->copy) cudaStreamDestroy(impl_->copy);
}

float* DeviceRows::row(size_t layer, int64_t r) {
  return impl_->buf[layer].data() + r * impl_->d;
}

void DeviceRows::set_kept(const std::vector<int32_t>& kept) {
  Impl& m = *impl_;
  m.n_kept = int64_t(kept.size());
  if (!kept.empty()) cuda::upload(m.kept, std::span<const int32_t>(kept), m.s, "kept positions");
}

void DeviceRows::append_kept(size_t layer, int64_t at, const float* device_act, int64_t first,
                             int64_t n) {
  Impl& m = *impl_;
  SAE_CHECK(first >= 0 && first + n <= m.n_kept, "kept rows out of range");
  SAE_CHECK(at >= 0 && at + n <= m.rows, "activation store overflow");
  if (n > 0) cuda::gather_rows(m.s, device_act, m.kept.data() + first, 0, n, m.d, row(layer, at));
}

void DeviceRows::permute(const std::vector<int64_t>& src) {
  Impl& m = *impl_;
  if (src.empty()) return;
  const std::vector<int32_t> p32(src.begin(), src.end());
  cuda::upload(m.perm, std::span<const int32_t>(p32), m.s, "store permutation");
  for (auto& b : m.buf) {
    cuda::gather_rows(m.s, b.data(), m.perm.data(), 0, int64_t(p32.size()), m.d, m.spare->data());
    std::swap(b, *m.spare);  // stream-ordered: the next gather reads the new contents
  }
}

void DeviceRows::to_host(size_t layer, int64_t first, int64_t n, float* host) {
  Impl& m = *impl_;
  SAE_CUDA(
      cudaMemcpyAsync(host, row(layer, first), size_t(n * m.d) * 4, cudaMemcpyDefault, m.copy));
  SAE_CUDA(cudaStreamSynchronize(m.copy));
}

void DeviceRows::sync() const {
  SAE_CUDA(cudaStreamSynchronize(impl_->s));
}

int64_t DeviceRows::bytes() const {
  const Impl& m = *impl_;
  return int64_t(m.buf.size() + 1) * m.rows * m.d * 4;
}

bool DeviceRows::on_host() const {
  return impl_->on_host;
}

}  // namespace sae::pipeline

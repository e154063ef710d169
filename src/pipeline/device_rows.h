// The activation store's rows in GPU memory (activation_store.h, when its model is a
// DeviceGemma2): one [rows, d] buffer per layer, filled by the forward's hooks, shuffled and
// compacted in place, and served as device pointers, so a release's SAE batches never leave the
// device. Every operation but to_host is queued on the forward's stream; sync() waits for them. In
// a build without CUDA the constructor throws a clear error.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

namespace sae::pipeline {

class DeviceRows {
 public:
  // on_host: the buffers in pinned host memory mapped for the device (when they do not fit on
  // it): the same operations and addresses for kernels, across the bus.
  DeviceRows(size_t n_layers, int64_t rows, int64_t d, void* stream, bool on_host = false);
  ~DeviceRows();
  DeviceRows(const DeviceRows&) = delete;
  DeviceRows& operator=(const DeviceRows&) = delete;

  // Row r of layer i (a device address).
  float* row(size_t layer, int64_t r);
  // The positions of the next forward's tokens that reach the SAEs (indices into its
  // [tokens, d] activations), then each hook's kept rows first..first+n-1 written to rows
  // at..at+n-1 of `layer`.
  void set_kept(const std::vector<int32_t>& kept);
  void append_kept(size_t layer, int64_t at, const float* device_act, int64_t first, int64_t n);
  // Rows [0, src.size()) of every layer become rows src[0], src[1], ... (one gather, the same
  // for every layer: the store's shuffle and compaction at once).
  void permute(const std::vector<int64_t>& src);
  // Rows [first, first + n) of `layer` into host memory (synchronous), on a stream of its own:
  // rows written by the operations above are read once sync() has returned after them.
  void to_host(size_t layer, int64_t first, int64_t n, float* host);
  void sync() const;
  // Memory held (the buffers and one spare layer for the out-of-place moves), on the device or
  // pinned on the host.
  int64_t bytes() const;
  bool on_host() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace sae::pipeline

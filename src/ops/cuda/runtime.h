// The CUDA runtime as the rest of the engine uses it: every CUDA and cuBLAS call checked and
// turned into sae::Error naming the call and file:line; device buffers owned by RAII
// (plain cudaMalloc, never managed memory); one stream and one cuBLAS handle per job.
#pragma once

#include <cublasLt.h>
#include <cublas_v2.h>
#include <cuda_runtime_api.h>

#include <cstdint>
#include <span>
#include <string>
#include <vector>

namespace sae::cuda {

[[noreturn]] void fail_cuda(const char* call, cudaError_t err, const char* file, int line);
[[noreturn]] void fail_cublas(const char* call, cublasStatus_t st, const char* file, int line);

#define SAE_CUDA(call)                                                                        \
  do {                                                                                        \
    const cudaError_t sae_err_ = (call);                                                      \
    if (sae_err_ != cudaSuccess) ::sae::cuda::fail_cuda(#call, sae_err_, __FILE__, __LINE__); \
  } while (0)
#define SAE_CUBLAS(call)                                            \
  do {                                                              \
    const cublasStatus_t sae_st_ = (call);                          \
    if (sae_st_ != CUBLAS_STATUS_SUCCESS)                           \
      ::sae::cuda::fail_cublas(#call, sae_st_, __FILE__, __LINE__); \
  } while (0)
// After a kernel launch: launch-configuration errors surface here, with the kernel's line.
#define SAE_CUDA_LAUNCHED() SAE_CUDA(cudaGetLastError())

// cudaMalloc with an out-of-memory message that says how much was asked and how much is free.
void* device_alloc(size_t bytes, const char* what);

// An owned device array of T (uninitialised). Moves, never copies.
template <class T>
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  explicit DeviceBuffer(size_t n, const char* what = "buffer") { resize(n, what); }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  DeviceBuffer(DeviceBuffer&& o) noexcept : p_(o.p_), n_(o.n_) { o.p_ = nullptr, o.n_ = 0; }
  DeviceBuffer& operator=(DeviceBuffer&& o) noexcept {
    if (this != &o) release(), p_ = o.p_, n_ = o.n_, o.p_ = nullptr, o.n_ = 0;
    return *this;
  }
  ~DeviceBuffer() { release(); }

  // Reallocates only when n exceeds the capacity (contents are then lost).
  void resize(size_t n, const char* what = "buffer") {
    if (n <= n_) return;
    release();
    p_ = static_cast<T*>(device_alloc(n * sizeof(T), what));
    n_ = n;
  }
  T* data() const { return p_; }
  size_t size() const { return n_; }
  size_t bytes() const { return n_ * sizeof(T); }

 private:
  void release() {
    if (p_) cudaFree(p_);
    p_ = nullptr;
    n_ = 0;
  }
  T* p_ = nullptr;
  size_t n_ = 0;
};

// Synchronous copies (the stream is synchronised first), for setup, checkpoints and tests.
template <class T>
void upload(DeviceBuffer<T>& dst, std::span<const T> src, cudaStream_t s, const char* what) {
  dst.resize(src.size(), what);
  SAE_CUDA(cudaMemcpyAsync(dst.data(), src.data(), src.size_bytes(), cudaMemcpyHostToDevice, s));
  SAE_CUDA(cudaStreamSynchronize(s));
}
// (src: any device address, mapped pinned host memory included: the kind is inferred.)
template <class T>
std::vector<T> download(const T* src, size_t n, cudaStream_t s) {
  std::vector<T> out(n);
  SAE_CUDA(cudaMemcpyAsync(out.data(), src, n * sizeof(T), cudaMemcpyDefault, s));
  SAE_CUDA(cudaStreamSynchronize(s));
  return out;
}

// A job's stream and its cuBLAS / cuBLASLt handles (bound to the stream).
class Context {
 public:
  Context();
  ~Context();
  Context(const Context&) = delete;
  Context& operator=(const Context&) = delete;
  cudaStream_t stream() const { return stream_; }
  cublasHandle_t blas() const { return blas_; }
  cublasLtHandle_t blas_lt() const { return lt_; }
  void sync() const;
  // cuBLASLt workspace (32 MiB, as recommended for Hopper).
  void* lt_workspace() const { return lt_ws_.data(); }
  size_t lt_workspace_bytes() const { return lt_ws_.bytes(); }

 private:
  cudaStream_t stream_ = nullptr;
  cublasHandle_t blas_ = nullptr;
  cublasLtHandle_t lt_ = nullptr;
  DeviceBuffer<uint8_t> lt_ws_;
};

// Free and total bytes of device memory (cudaMemGetInfo), for memory reports.
struct MemoryInfo {
  size_t free = 0, total = 0;
};
MemoryInfo memory_info();

}  // namespace sae::cuda

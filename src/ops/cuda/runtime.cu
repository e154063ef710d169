#include "ops/cuda/runtime.h"

#include "core/error.h"

namespace sae::cuda {

void fail_cuda(const char* call, cudaError_t err, const char* file, int line) {
  fail(cat(file, ":", line, ": CUDA error in ", call, ": ", cudaGetErrorName(err), " (",
           cudaGetErrorString(err), ")"));
}

void fail_cublas(const char* call, cublasStatus_t st, const char* file, int line) {
  fail(cat(file, ":", line, ": cuBLAS error in ", call, ": ", cublasGetStatusName(st), " (",
           cublasGetStatusString(st), ")"));
}

MemoryInfo memory_info() {
  MemoryInfo m;
  SAE_CUDA(cudaMemGetInfo(&m.free, &m.total));
  return m;
}

void* device_alloc(size_t bytes, const char* what) {
  void* p = nullptr;
  if (bytes == 0) bytes = 1;
  const cudaError_t err = cudaMalloc(&p, bytes);
  if (err == cudaErrorMemoryAllocation) {
    cudaGetLastError();
    size_t free = 0, total = 0;
    cudaMemGetInfo(&free, &total);
    fail(cat("out of GPU memory allocating ", what, ": asked for ", double(bytes) / (1 << 20),
             " MiB, ", double(free) / (1 << 20), " MiB free of ", double(total) / (1 << 20),
             " MiB"));
  }
  SAE_CUDA(err);
  return p;
}

Context::Context() {
  SAE_CUDA(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
  SAE_CUBLAS(cublasCreate(&blas_));
  SAE_CUBLAS(cublasSetStream(blas_, stream_));
  SAE_CUBLAS(cublasLtCreate(&lt_));
  lt_ws_.resize(size_t(32) << 20, "cuBLASLt workspace");
  SAE_CUBLAS(cublasSetWorkspace(blas_, lt_ws_.data(), lt_ws_.bytes()));
}

Context::~Context() {
  if (lt_) cublasLtDestroy(lt_);
  if (blas_) cublasDestroy(blas_);
  if (stream_) cudaStreamDestroy(stream_);
}

void Context::sync() const {
  SAE_CUDA(cudaStreamSynchronize(stream_));
}

}  // namespace sae::cuda

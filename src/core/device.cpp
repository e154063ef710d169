#include "core/device.h"

#include "core/error.h"

#if SAECPP_HAS_CUDA
#include <cuda_runtime_api.h>
#endif

namespace sae {

Device parse_device(const std::string& name, const std::string& where) {
  if (name == "cpu") return Device::Cpu;
  if (name == "cuda") return Device::Cuda;
  fail(where, "device", cat("unknown device '", name, "' (expected cpu or cuda)"));
}

const char* device_name(Device d) {
  return d == Device::Cuda ? "cuda" : "cpu";
}

bool cuda_compiled() {
  return SAECPP_HAS_CUDA != 0;
}

int cuda_device_count() {
#if SAECPP_HAS_CUDA
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no driver" error
    return 0;
  }
  return n;
#else
  return 0;
#endif
}

std::string cuda_device_description() {
#if SAECPP_HAS_CUDA
  if (cuda_device_count() == 0) return "no GPU visible";
  int dev = 0;
  cudaGetDevice(&dev);
  cudaDeviceProp p{};
  if (cudaGetDeviceProperties(&p, dev) != cudaSuccess) return "GPU (properties unavailable)";
  return cat(p.name, " (sm_", p.major, p.minor, ", ", p.multiProcessorCount, " SMs, ",
             double(p.totalGlobalMem) / double(1ull << 30), " GiB)");
#else
  return "not built with CUDA";
#endif
}

CudaMemory cuda_memory() {
  CudaMemory m;
#if SAECPP_HAS_CUDA
  if (cuda_device_count() > 0 && cudaMemGetInfo(&m.free, &m.total) != cudaSuccess) {
    cudaGetLastError();
    m = {};
  }
#endif
  return m;
}

int current_cuda_device() {
#if SAECPP_HAS_CUDA
  int dev = 0;
  if (cuda_device_count() == 0 || cudaGetDevice(&dev) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return dev;
#else
  return 0;
#endif
}

int use_cuda_device(int index) {
#if SAECPP_HAS_CUDA
  const int n = cuda_device_count();
  if (n == 0) return 0;
  const int dev = index % n;
  if (cudaSetDevice(dev) != cudaSuccess) {
    cudaGetLastError();
    fail(cat("cudaSetDevice(", dev, ") failed"));
  }
  return dev;
#else
  (void)index;
  return 0;
#endif
}

void require_device(Device d) {
  if (d == Device::Cpu) return;
  if (!cuda_compiled())
    fail(
        "--device cuda: this sae.cpp was built without CUDA (configure with -DSAECPP_CUDA=ON "
        "on a machine with the CUDA toolkit)");
  if (cuda_device_count() == 0)
    fail(
        "--device cuda: no CUDA GPU is visible to this process (check nvidia-smi and "
        "CUDA_VISIBLE_DEVICES)");
}

}  // namespace sae

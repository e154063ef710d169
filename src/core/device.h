// Where a job computes: the CPU engine, or the CUDA backend when it was built in.
#pragma once

#include <string>

namespace sae {

enum class Device { Cpu, Cuda };

// "cpu" or "cuda"; anything else throws sae::Error naming `where`.
Device parse_device(const std::string& name, const std::string& where);
const char* device_name(Device d);

// Whether this build has the CUDA backend, and how many GPUs the process can see (0 when not
// built with CUDA or no driver/GPU is present; never throws).
bool cuda_compiled();
int cuda_device_count();
// One line naming the GPU, for progress headers ("NVIDIA H200 (sm_90, 139.8 GiB)").
std::string cuda_device_description();
// Free and total bytes of the current GPU's memory (cudaMemGetInfo; zeros without a GPU).
struct CudaMemory {
  size_t free = 0, total = 0;
};
CudaMemory cuda_memory();
// Makes GPU `index % count` this process's device (before any CUDA work: one GPU per rank of a
// node). Returns the device chosen (0 without a GPU).
int use_cuda_device(int index);
// The calling thread's current GPU (CUDA keeps one per host thread; 0 without a GPU): a thread
// that works for a job passes it to use_cuda_device.
int current_cuda_device();
// Throws a clear error when device is Cuda and this build or machine cannot run it.
void require_device(Device d);

}  // namespace sae

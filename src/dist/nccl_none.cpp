// A build without NCCL (no CUDA, no MPI or no libnccl): NcclComm cannot be made.
#include "core/error.h"
#include "dist/nccl.h"

namespace sae::dist {

bool nccl_compiled() {
  return false;
}

struct NcclComm::Impl {};

NcclComm::NcclComm(Comm&) {
  fail(
      "this sae.cpp was built without NCCL (it needs CUDA, MPI and NCCL at configure time): the "
      "GPUs' activations go through host memory instead");
}
NcclComm::~NcclComm() = default;
void NcclComm::exchange(std::span<const DeviceSend>, std::span<const DeviceRecv>) {}
std::string NcclComm::describe() const {
  return "no NCCL";
}

}  // namespace sae::dist

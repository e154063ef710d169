#include "dist/nccl.h"

#include <cuda_runtime_api.h>
#include <nccl.h>

#include <cstring>
#include <vector>

#include "core/error.h"

namespace sae::dist {

namespace {

void check(ncclResult_t r, const char* call) {
  if (r != ncclSuccess) fail(cat("NCCL error in ", call, ": ", ncclGetErrorString(r)));
}
#define SAE_NCCL(call) check((call), #call)

}  // namespace

bool nccl_compiled() {
  return true;
}

struct NcclComm::Impl {
  ncclComm_t comm = nullptr;
  cudaStream_t stream = nullptr;
};

NcclComm::NcclComm(Comm& comm) : impl_(std::make_unique<Impl>()) {
  ncclUniqueId id{};
  if (comm.rank() == 0) SAE_NCCL(ncclGetUniqueId(&id));
  std::vector<uint8_t> bytes(sizeof id);
  std::memcpy(bytes.data(), &id, sizeof id);
  comm.broadcast(bytes, 0);
  std::memcpy(&id, bytes.data(), sizeof id);
  SAE_NCCL(ncclCommInitRank(&impl_->comm, comm.size(), id, comm.rank()));
  // Non-blocking: no implicit order with the legacy default stream either.
  const cudaError_t err = cudaStreamCreateWithFlags(&impl_->stream, cudaStreamNonBlocking);
  if (err != cudaSuccess) fail(cat("NCCL exchange: its stream: ", cudaGetErrorString(err)));
}

NcclComm::~NcclComm() {
  if (!impl_) return;
  if (impl_->stream) cudaStreamDestroy(impl_->stream);
  if (impl_->comm) ncclCommDestroy(impl_->comm);
}

void NcclComm::exchange(std::span<const DeviceSend> sends, std::span<const DeviceRecv> recvs) {
  const cudaStream_t s = impl_->stream;
  SAE_NCCL(ncclGroupStart());
  for (const DeviceSend& m : sends)
    SAE_NCCL(ncclSend(m.data, size_t(m.floats), ncclFloat, m.peer, impl_->comm, s));
  for (const DeviceRecv& m : recvs)
    SAE_NCCL(ncclRecv(m.data, size_t(m.floats), ncclFloat, m.peer, impl_->comm, s));
  SAE_NCCL(ncclGroupEnd());
  const cudaError_t err = cudaStreamSynchronize(s);
  if (err != cudaSuccess) fail(cat("NCCL exchange: ", cudaGetErrorString(err)));
}

std::string NcclComm::describe() const {
  int v = 0;
  ncclGetVersion(&v);
  return cat("NCCL ", v / 10000, ".", v / 100 % 100, ".", v % 100);
}

}  // namespace sae::dist

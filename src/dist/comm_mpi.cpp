// The communicator of an MPI launch: MPI_COMM_WORLD, errors returned rather than fatal so that
// a failure is reported with its rank before the job is aborted.
#include <mpi.h>

#include <algorithm>
#include <memory>

#include "core/error.h"
#include "dist/comm.h"

namespace sae::dist {

namespace {

void check(int rc, const char* what) {
  if (rc == MPI_SUCCESS) return;
  char msg[MPI_MAX_ERROR_STRING];
  int len = 0;
  MPI_Error_string(rc, msg, &len);
  fail(cat("MPI ", what, " failed: ", std::string(msg, size_t(len))));
}

class MpiComm final : public Comm {
 public:
  MpiComm() {
    MPI_Comm_rank(MPI_COMM_WORLD, &rank_);
    MPI_Comm_size(MPI_COMM_WORLD, &size_);
    char version[MPI_MAX_LIBRARY_VERSION_STRING];
    int len = 0;
    MPI_Get_library_version(version, &len);
    std::string v(version, size_t(len));
    transport_ = "MPI (" + v.substr(0, v.find_first_of(",\n")) + ")";
  }
  int rank() const override { return rank_; }
  int size() const override { return size_; }
  std::string transport() const override { return transport_; }
  void allreduce_sum(std::span<float> v) override { allreduce(v, MPI_FLOAT, MPI_SUM); }
  void allreduce_sum(std::span<double> v) override { allreduce(v, MPI_DOUBLE, MPI_SUM); }
  void allreduce_max(std::span<double> v) override { allreduce(v, MPI_DOUBLE, MPI_MAX); }
  void allreduce_or(std::span<uint8_t> v) override { allreduce(v, MPI_UINT8_T, MPI_BOR); }
  void allgather(std::span<const double> mine, std::span<double> all) override {
    SAE_CHECK(all.size() == mine.size() * size_t(size_), "allgather: ", all.size(),
              " != ", mine.size(), " x ", size_);
    check(MPI_Allgather(mine.data(), int(mine.size()), MPI_DOUBLE, all.data(), int(mine.size()),
                        MPI_DOUBLE, MPI_COMM_WORLD),
          "allgather");
  }
  void broadcast(std::span<uint8_t> bytes, int root) override {
    check(MPI_Bcast(bytes.data(), int(bytes.size()), MPI_BYTE, root, MPI_COMM_WORLD), "broadcast");
  }
  using Comm::broadcast;
  void barrier() override { check(MPI_Barrier(MPI_COMM_WORLD), "barrier"); }
  [[noreturn]] void abort(int code) override {
    MPI_Abort(MPI_COMM_WORLD, code);
    std::_Exit(code);  // MPI_Abort does not return; if it did, still end this rank
  }

 private:
  // MPI counts are int: a gradient of a wide SAE (1M latents x 2304 x 2) goes in pieces.
  template <class T>
  void allreduce(std::span<T> v, MPI_Datatype type, MPI_Op op) {
    constexpr size_t kPiece = size_t(1) << 30;
    for (size_t at = 0; at < v.size(); at += kPiece)
      check(MPI_Allreduce(MPI_IN_PLACE, v.data() + at, int(std::min(kPiece, v.size() - at)), type,
                          op, MPI_COMM_WORLD),
            "allreduce");
  }

  int rank_ = 0, size_ = 1;
  std::string transport_;
};

}  // namespace

std::unique_ptr<Comm> make_mpi_comm(int* argc, char*** argv) {
  int initialized = 0;
  MPI_Initialized(&initialized);
  if (!initialized) check(MPI_Init(argc, argv), "init");
  MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN);
  return std::make_unique<MpiComm>();
}

void finalize_mpi() {
  int finalized = 0;
  MPI_Finalized(&finalized);
  if (!finalized) MPI_Finalize();
}

}  // namespace sae::dist

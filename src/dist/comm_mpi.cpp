// The communicator of an MPI launch: MPI_COMM_WORLD, errors returned rather than fatal so that
// a failure is reported with its rank before the job is aborted.
#include <mpi.h>

#include <algorithm>
#include <memory>
#include <vector>

#include "core/error.h"
#include "core/threads.h"
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
  explicit MpiComm(MPI_Comm comm = MPI_COMM_WORLD) : comm_(comm) {
    MPI_Comm_rank(comm_, &rank_);
    MPI_Comm_size(comm_, &size_);
    char version[MPI_MAX_LIBRARY_VERSION_STRING];
    int len = 0;
    MPI_Get_library_version(version, &len);
    std::string v(version, size_t(len));
    transport_ = "MPI (" + v.substr(0, v.find_first_of(",\n")) + ")";
  }
  ~MpiComm() override {
    int finalized = 0;
    MPI_Finalized(&finalized);
    if (comm_ != MPI_COMM_WORLD && !finalized) MPI_Comm_free(&comm_);
  }
  MpiComm(const MpiComm&) = delete;
  MpiComm& operator=(const MpiComm&) = delete;
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
                        MPI_DOUBLE, comm_),
          "allgather");
  }
  // Pairwise exchange: in round k this rank sends rank (r + k)'s segment to it and adds what
  // rank (r - k) sends for its own. Each rank sends (N - 1)/N of the buffer, the least any
  // reduce-scatter can; measured faster here than Open MPI 4.1's MPI_Reduce_scatter, whose
  // reduction at 2 ranks ran at a fifth of the point-to-point bandwidth
  // (docs/distributed.md).
  void reduce_scatter_sum(std::span<const float> all, std::span<float> mine,
                          std::span<const int> counts) override {
    SAE_CHECK(counts.size() == size_t(size_) && mine.size() >= size_t(counts[size_t(rank_)]),
              "reduce_scatter: counts");
    std::vector<size_t> at(counts.size() + 1, 0);
    for (size_t r = 0; r < counts.size(); ++r) at[r + 1] = at[r] + size_t(counts[r]);
    const size_t n_mine = size_t(counts[size_t(rank_)]);
    std::copy_n(all.data() + at[size_t(rank_)], n_mine, mine.data());
    incoming_.resize(n_mine);
    for (int k = 1; k < size_; ++k) {
      const int to = (rank_ + k) % size_, from = (rank_ - k + size_) % size_;
      check(
          MPI_Sendrecv(all.data() + at[size_t(to)], counts[size_t(to)], MPI_FLOAT, to, 7,
                       incoming_.data(), int(n_mine), MPI_FLOAT, from, 7, comm_, MPI_STATUS_IGNORE),
          "sendrecv");
      float* out = mine.data();
      const float* in = incoming_.data();
#pragma omp parallel for simd schedule(static) num_threads(threads_for(double(n_mine), 0.2))
      for (size_t i = 0; i < n_mine; ++i) out[i] += in[i];
    }
  }
  void allgather(std::span<float> all, std::span<const int> counts) override {
    SAE_CHECK(counts.size() == size_t(size_), "allgatherv: counts");
    std::vector<int> displs(counts.size(), 0);
    for (size_t r = 1; r < counts.size(); ++r) displs[r] = displs[r - 1] + counts[r - 1];
    check(MPI_Allgatherv(MPI_IN_PLACE, 0, MPI_DATATYPE_NULL, all.data(), counts.data(),
                         displs.data(), MPI_FLOAT, comm_),
          "allgatherv");
  }
  void gather(std::span<const float> mine, std::span<float> all, std::span<const int> counts,
              int root) override {
    SAE_CHECK(counts.size() == size_t(size_) && mine.size() == size_t(counts[size_t(rank_)]),
              "gatherv: counts");
    std::vector<int> displs(counts.size(), 0);
    for (size_t r = 1; r < counts.size(); ++r) displs[r] = displs[r - 1] + counts[r - 1];
    check(MPI_Gatherv(mine.data(), int(mine.size()), MPI_FLOAT, all.data(), counts.data(),
                      displs.data(), MPI_FLOAT, root, comm_),
          "gatherv");
  }
  void alltoall(std::span<const float> send, std::span<const int> send_counts,
                std::span<float> recv, std::span<const int> recv_counts) override {
    SAE_CHECK(send_counts.size() == size_t(size_) && recv_counts.size() == size_t(size_),
              "alltoall: counts");
    std::vector<int> sd(size_t(size_), 0), rd(size_t(size_), 0);
    for (size_t r = 1; r < size_t(size_); ++r)
      sd[r] = sd[r - 1] + send_counts[r - 1], rd[r] = rd[r - 1] + recv_counts[r - 1];
    check(MPI_Alltoallv(send.data(), send_counts.data(), sd.data(), MPI_FLOAT, recv.data(),
                        recv_counts.data(), rd.data(), MPI_FLOAT, comm_),
          "alltoallv");
  }
  void broadcast(std::span<uint8_t> bytes, int root) override {
    check(MPI_Bcast(bytes.data(), int(bytes.size()), MPI_BYTE, root, comm_), "broadcast");
  }
  void barrier() override {
    check(MPI_Barrier(comm_), "barrier");
  }
  std::unique_ptr<Comm> split(int color) override {
    MPI_Comm sub = MPI_COMM_NULL;
    check(MPI_Comm_split(comm_, color, rank_, &sub), "comm_split");
    MPI_Comm_set_errhandler(sub, MPI_ERRORS_RETURN);
    auto out = std::make_unique<MpiComm>(sub);
    out->transport_ = transport_;
    return out;
  }
  [[noreturn]] void abort(int code) override {
    MPI_Abort(MPI_COMM_WORLD, code);  // the whole job, whichever group this rank is in
    std::_Exit(code);                 // MPI_Abort does not return; if it did, still end this rank
  }

 private:
  // MPI counts are int: a gradient of a wide SAE (1M latents x 2304 x 2) goes in pieces.
  template <class T>
  void allreduce(std::span<T> v, MPI_Datatype type, MPI_Op op) {
    constexpr size_t kPiece = size_t(1) << 30;
    for (size_t at = 0; at < v.size(); at += kPiece)
      check(MPI_Allreduce(MPI_IN_PLACE, v.data() + at, int(std::min(kPiece, v.size() - at)), type,
                          op, comm_),
            "allreduce");
  }

  MPI_Comm comm_;
  int rank_ = 0, size_ = 1;
  std::string transport_;
  std::vector<float> incoming_;  // reduce_scatter_sum's receive buffer
};

}  // namespace

std::unique_ptr<Comm> make_mpi_comm(int* argc, char*** argv) {
  int initialized = 0;
  MPI_Initialized(&initialized);
  // Funneled: other threads run beside the one that calls MPI (OpenMP's, the checkpoint
  // writer, the activation store's fill ahead), none of them calling it.
  int provided = 0;
  if (!initialized) check(MPI_Init_thread(argc, argv, MPI_THREAD_FUNNELED, &provided), "init");
  MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN);
  return std::make_unique<MpiComm>();
}

void finalize_mpi() {
  int finalized = 0;
  MPI_Finalized(&finalized);
  if (!finalized) MPI_Finalize();
}

}  // namespace sae::dist

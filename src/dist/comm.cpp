#include "dist/comm.h"

#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <memory>

#include "core/error.h"

namespace sae::dist {

namespace {

int env_int(const char* name) {
  const char* v = std::getenv(name);
  return v && *v ? std::atoi(v) : -1;
}

// One process: every collective is the identity.
class SingleProcess final : public Comm {
 public:
  int rank() const override { return 0; }
  int size() const override { return 1; }
  std::string transport() const override { return "single process"; }
  void allreduce_sum(std::span<float>) override {}
  void allreduce_sum(std::span<double>) override {}
  void allreduce_max(std::span<double>) override {}
  void allreduce_or(std::span<uint8_t>) override {}
  void allgather(std::span<const double> mine, std::span<double> all) override {
    std::copy(mine.begin(), mine.end(), all.begin());
  }
  void reduce_scatter_sum(std::span<const float> all, std::span<float> mine,
                          std::span<const int> counts) override {
    std::copy(all.begin(), all.begin() + counts[0], mine.begin());
  }
  void allgather(std::span<float>, std::span<const int>) override {}
  void gather(std::span<const float> mine, std::span<float> all, std::span<const int>,
              int) override {
    std::copy(mine.begin(), mine.end(), all.begin());
  }
  void alltoall(std::span<const float> send, std::span<const int> send_counts,
                std::span<float> recv, std::span<const int>) override {
    std::copy(send.begin(), send.begin() + send_counts[0], recv.begin());
  }
  void broadcast(std::span<uint8_t>, int) override {}
  void barrier() override {}
  std::unique_ptr<Comm> split(int) override { return std::make_unique<SingleProcess>(); }
  [[noreturn]] void abort(int code) override { std::exit(code); }
};

std::unique_ptr<Comm>& world_ptr() {
  static std::unique_ptr<Comm> w;
  return w;
}

}  // namespace

// In comm_mpi.cpp when this build has MPI, else in comm_no_mpi.cpp.
std::unique_ptr<Comm> make_mpi_comm(int* argc, char*** argv);
void finalize_mpi();

std::vector<std::string> allgather_strings(Comm& comm, const std::string& mine) {
  const std::vector<double> size = {double(mine.size())};
  std::vector<double> sizes(size_t(comm.size()));
  comm.allgather(size, sizes);
  std::vector<std::string> all(size_t(comm.size()));
  for (int r = 0; r < comm.size(); ++r) {
    std::string bytes = r == comm.rank() ? mine : std::string(size_t(sizes[size_t(r)]), '\0');
    comm.broadcast(std::span<uint8_t>(reinterpret_cast<uint8_t*>(bytes.data()), bytes.size()), r);
    all[size_t(r)] = std::move(bytes);
  }
  return all;
}

int local_rank(Comm& comm) {
  char host[256] = {};
  gethostname(host, sizeof host - 1);
  const std::vector<std::string> hosts = allgather_strings(comm, host);
  int local = 0;
  for (int r = 0; r < comm.rank(); ++r) local += hosts[size_t(r)] == hosts[size_t(comm.rank())];
  return local;
}

std::optional<Launch> launch_from_environment() {
  struct Source {
    const char *rank, *size, *launcher;
  };
  for (const Source& s :
       {Source{"OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "mpirun (Open MPI)"},
        Source{"PMI_RANK", "PMI_SIZE", "an MPI launcher (PMI)"},
        Source{"PMIX_RANK", "PMIX_SIZE", "an MPI launcher (PMIx)"},
        Source{"SLURM_PROCID", "SLURM_NTASKS", "srun"}}) {
    const int rank = env_int(s.rank), size = env_int(s.size);
    if (rank >= 0 && size > 1) return Launch{rank, size, s.launcher};
  }
  return std::nullopt;
}

void init(int* argc, char*** argv) {
  if (world_ptr()) return;
  if (const auto launch = launch_from_environment())
    world_ptr() = make_mpi_comm(argc, argv);  // throws in a build without MPI
  else
    world_ptr() = std::make_unique<SingleProcess>();
}

Comm& world() {
  if (!world_ptr()) world_ptr() = std::make_unique<SingleProcess>();
  return *world_ptr();
}

void finalize() {
  if (world_ptr() && world_ptr()->size() > 1) finalize_mpi();
}

int run_or_abort(const std::function<int()>& body, const char* program) {
  std::string what;
  try {
    return body();
  } catch (const std::exception& e) {
    what = e.what();
  }
  Comm& w = world();
  if (w.size() > 1) {
    std::fprintf(stderr, "%s: error (rank %d of %d): %s\n", program, w.rank(), w.size(),
                 what.c_str());
    std::fflush(stderr);
    w.abort(1);  // the other ranks may be waiting for this one in a collective
  }
  std::fprintf(stderr, "%s: error: %s\n", program, what.c_str());
  return 1;
}

}  // namespace sae::dist

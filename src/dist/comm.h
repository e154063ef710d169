// The processes of one job and what they share: a single process (the default), or the ranks
// of an MPI launch (mpirun, srun). Jobs ask world() for their rank and the collectives; none of
// them knows whether MPI is underneath (DESIGN.md section 1, dist/).
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <vector>

namespace sae::dist {

class Comm {
 public:
  virtual ~Comm() = default;
  virtual int rank() const = 0;
  virtual int size() const = 0;
  virtual std::string transport() const = 0;  // "single process", "MPI (Open MPI 4.1.4)"
  // Element-wise sums over the ranks, in place, the same result on every rank.
  virtual void allreduce_sum(std::span<float> v) = 0;
  virtual void allreduce_sum(std::span<double> v) = 0;
  virtual void allreduce_max(std::span<double> v) = 0;
  // Bitwise OR of byte masks (e.g. which latents fired on any rank).
  virtual void allreduce_or(std::span<uint8_t> v) = 0;
  // Every rank's `mine` (the same size on each), concatenated in rank order.
  virtual void allgather(std::span<const double> mine, std::span<double> all) = 0;
  // Rank r's segment of `all` (counts[r] floats, segments in rank order) summed over the ranks,
  // into `mine` (counts[rank] floats).
  virtual void reduce_scatter_sum(std::span<const float> all, std::span<float> mine,
                                  std::span<const int> counts) = 0;
  // In place: each rank's segment of `all` (counts[r] floats, in rank order) to every rank.
  virtual void allgather(std::span<float> all, std::span<const int> counts) = 0;
  // Every rank's `mine` (counts[rank] floats) into rank root's `all` (segments in rank order);
  // `all` is not touched on the other ranks.
  virtual void gather(std::span<const float> mine, std::span<float> all,
                      std::span<const int> counts, int root) = 0;
  // Personalised exchange: send_counts[q] floats of `send` (segments in rank order) go to rank
  // q; recv_counts[q] floats from rank q land in `recv` (segments in rank order).
  virtual void alltoall(std::span<const float> send, std::span<const int> send_counts,
                        std::span<float> recv, std::span<const int> recv_counts) = 0;
  virtual void broadcast(std::span<uint8_t> bytes, int root) = 0;
  virtual void barrier() = 0;
  // The ranks that give the same color, as a communicator of their own (ranks in this one's
  // order); a collective over this communicator.
  virtual std::unique_ptr<Comm> split(int color) = 0;
  // Ends every rank of the job now with this exit code (a failed rank must not leave the
  // others waiting in a collective).
  [[noreturn]] virtual void abort(int code) = 0;
};

// Every rank's string, in rank order (small metadata: sizes through allgather, then bytes).
std::vector<std::string> allgather_strings(Comm& comm, const std::string& mine);

// This rank's index among the ranks on its machine (same host name; in rank order): which of
// the machine's GPUs it takes. A collective.
int local_rank(Comm& comm);

// What the environment says of the launch: rank and size when an MPI launcher (Open MPI, MPICH,
// Slurm's srun) started this process as one of several, else nullopt.
struct Launch {
  int rank = 0, size = 1;
  std::string launcher;  // "mpirun (Open MPI)", "srun", ...
};
std::optional<Launch> launch_from_environment();

// Sets up the job's communicator once, before any other use: MPI when launched as several
// ranks (MPI_Init), else a single process. Throws sae::Error when launched as several ranks by
// a build without MPI.
void init(int* argc, char*** argv);
// The communicator init() chose (a single process when init() was not called).
Comm& world();
// Shuts MPI down cleanly at exit (MPI_Finalize); nothing for a single process.
void finalize();

// Runs a job's body on this rank; an exception becomes "error (rank r of N): ..." on stderr
// and, with several ranks, ends the whole job (abort) so that no rank hangs. Returns the exit
// code for main().
int run_or_abort(const std::function<int()>& body, const char* program);

}  // namespace sae::dist

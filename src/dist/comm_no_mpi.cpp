// A build without MPI: launched as several ranks, it refuses (running N copies of one job that
// all write the same files would be worse than not running).
#include <memory>

#include "core/error.h"
#include "dist/comm.h"

namespace sae::dist {

std::unique_ptr<Comm> make_mpi_comm(int*, char***) {
  const auto l = launch_from_environment();
  fail(cat("launched as rank ", l->rank, " of ", l->size, " by ", l->launcher,
           ", but this build of sae.cpp has no MPI (install libopenmpi-dev and rebuild, or run "
           "one process)"));
}

void finalize_mpi() {}

}  // namespace sae::dist

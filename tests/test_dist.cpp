// dist/: the job's ranks. One process by default; under mpirun, MPI collectives that give
// every rank the same answer, and a rank that fails ends the whole job instead of leaving the
// others waiting (the known hang of sparsify's module-parallel mode).
#include <gtest/gtest.h>

#include <chrono>

#include "dist/comm.h"
#include "test_util.h"

namespace sae {
namespace {

using test::EnvVar;

// mpirun as CI runs it: as root (Open MPI refuses root unless told), 2 ranks on 2 cores.
// Shared-memory single copy (CMA) is blocked in some containers: vader copies through its
// buffers instead. Under AddressSanitizer, what Open MPI itself never frees is not ours to
// report (the ranks inherit the environment).
std::string mpirun(int ranks) {
  return "env OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMP_NUM_THREADS=1 "
         "ASAN_OPTIONS=detect_leaks=0 " +
         std::string(SAECPP_MPIEXEC) + " -np " + std::to_string(ranks) +
         " --oversubscribe --mca btl_vader_single_copy_mechanism none ";
}

#define REQUIRE_MPI()                                                                 \
  do {                                                                                \
    if (std::string(SAECPP_MPIEXEC).empty()) GTEST_SKIP() << "this build has no MPI"; \
  } while (0)

TEST(Dist, OneProcessByDefault) {
  for (const char* v : {"OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE", "SLURM_NTASKS"})
    ASSERT_EQ(std::getenv(v), nullptr) << v << " is set: the test runs under a launcher";
  EXPECT_FALSE(dist::launch_from_environment());
  dist::Comm& w = dist::world();
  EXPECT_EQ(w.rank(), 0);
  EXPECT_EQ(w.size(), 1);
  std::vector<double> v = {1, 2};
  w.allreduce_sum(v);
  EXPECT_EQ(v, (std::vector<double>{1, 2}));
}

TEST(Dist, LaunchersAreReadFromTheEnvironment) {
  {
    EnvVar r("OMPI_COMM_WORLD_RANK", "1"), s("OMPI_COMM_WORLD_SIZE", "4");
    const auto l = dist::launch_from_environment();
    ASSERT_TRUE(l);
    EXPECT_EQ(l->rank, 1);
    EXPECT_EQ(l->size, 4);
  }
  {
    EnvVar r("SLURM_PROCID", "2"), s("SLURM_NTASKS", "3");
    const auto l = dist::launch_from_environment();
    ASSERT_TRUE(l);
    EXPECT_EQ(l->launcher, "srun");
  }
  EnvVar r("SLURM_PROCID", "0"), s("SLURM_NTASKS", "1");  // one task: not a parallel launch
  EXPECT_FALSE(dist::launch_from_environment());
}

// dist_ranks_main.cpp checks each collective, and BatchTopK over rows split across the ranks
// against the single-process selection on the whole batch (ties at the cut included).
TEST(Dist, CollectivesAndGlobalBatchTopKAgreeOnTwoAndThreeRanks) {
  REQUIRE_MPI();
  for (int n : {2, 3}) {
    const auto r = test::run_shell("timeout 120 " + mpirun(n) + SAECPP_DIST_RANKS);
    EXPECT_EQ(r.exit_code, 0) << r.output;
    for (int q = 0; q < n; ++q)
      EXPECT_NE(
          r.output.find("rank " + std::to_string(q) + " of " + std::to_string(n) + " ok (MPI"),
          std::string::npos)
          << r.output;
  }
}

TEST(Dist, AFailedRankEndsTheWholeJobNamingIt) {
  REQUIRE_MPI();
  const auto t0 = std::chrono::steady_clock::now();
  const auto r = test::run_shell("timeout 120 " + mpirun(2) + SAECPP_DIST_RANKS + " --fail-rank 1");
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  EXPECT_NE(r.exit_code, 0) << r.output;
  EXPECT_NE(r.exit_code, 124) << "the job hung until timeout killed it\n" << r.output;
  EXPECT_LT(s, 60.0);
  EXPECT_NE(r.output.find("error (rank 1 of 2): rank 1 fails on purpose"), std::string::npos)
      << r.output;
}

TEST(Dist, CliRefusesParallelJobsItCannotRunYet) {
  REQUIRE_MPI();
  test::TempDir dir;
  const auto r = test::run_shell("timeout 120 " + mpirun(2) + SAECPP_CLI +
                                 " train --preset hierarchy-snap -o " + (dir / "run"));
  EXPECT_NE(r.exit_code, 0) << r.output;
  EXPECT_NE(r.exit_code, 124) << r.output;
  EXPECT_NE(r.output.find("was launched as 2 ranks"), std::string::npos) << r.output;
  EXPECT_FALSE(std::filesystem::exists(dir / "run"));
  // A command that computes nothing runs on every rank as on one.
  const auto info = test::run_shell("timeout 120 " + mpirun(2) + SAECPP_CLI + " info " +
                                    test::golden("topk/sae"));
  EXPECT_EQ(info.exit_code, 0) << info.output;
}

}  // namespace
}  // namespace sae

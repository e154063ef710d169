// The thread count a process chooses, the threads a loop is worth, and the CLI's wait policy.
#include <gtest/gtest.h>
#include <omp.h>

#include <string>

#include "core/threads.h"
#include "test_util.h"

namespace sae {
namespace {

TEST(Threads, LoopsGetThreadsByTheirWork) {
  const int pool = omp_get_max_threads();
  EXPECT_EQ(threads_for(0, 1.0), 1);
  EXPECT_EQ(threads_for(100, 10.0), 1) << "1 us of work runs serially";
  EXPECT_EQ(threads_for(kMinNsPerThread * 1.9, 1.0), 1);
  EXPECT_EQ(threads_for(kMinNsPerThread * 2, 1.0), std::min(2, pool));
  EXPECT_EQ(threads_for(1e12, 1.0), pool) << "never more than the pool";
}

TEST(Threads, OmpNumThreadsWins) {
  ThreadInputs in{.omp_num_threads = 3,
                  .affinity_cpus = 8,
                  .online_cpus = 8,
                  .cgroup_cpus = 1.0,
                  .local_ranks = 4};
  const ThreadChoice c = choose_threads(in);
  EXPECT_EQ(c.threads, 3);
  EXPECT_EQ(c.reason, "OMP_NUM_THREADS=3");
}

TEST(Threads, AffinityMaskCappedByTheCgroupQuota) {
  ThreadInputs in;
  in.affinity_cpus = 8, in.online_cpus = 16;
  EXPECT_EQ(choose_threads(in).threads, 8);
  EXPECT_NE(choose_threads(in).reason.find("8 CPUs in the affinity mask"), std::string::npos);
  in.cgroup_cpus = 2.5;  // a quota of 2.5 CPUs: 2 threads never get throttled
  EXPECT_EQ(choose_threads(in).threads, 2);
  EXPECT_NE(choose_threads(in).reason.find("cgroup CPU quota 2.5"), std::string::npos);
  in.cgroup_cpus = 0.5;
  EXPECT_EQ(choose_threads(in).threads, 1) << "at least one thread";
}

TEST(Threads, UnboundRanksOnANodeShareIt) {
  ThreadInputs in;
  in.affinity_cpus = 16, in.online_cpus = 16, in.local_ranks = 4;
  EXPECT_EQ(choose_threads(in).threads, 4);
  EXPECT_NE(choose_threads(in).reason.find("shared by 4 processes"), std::string::npos);
  in.local_ranks = 32;
  EXPECT_EQ(choose_threads(in).threads, 1);
  // A launcher that bound each rank to its own CPUs: the mask is already the rank's share.
  ThreadInputs bound;
  bound.affinity_cpus = 4, bound.online_cpus = 16, bound.local_ranks = 4;
  EXPECT_EQ(choose_threads(bound).threads, 4);
}

TEST(Threads, CgroupQuotaFiles) {
  EXPECT_EQ(parse_cpu_max("max 100000\n"), std::nullopt);
  EXPECT_DOUBLE_EQ(parse_cpu_max("150000 100000\n").value(), 1.5);
  EXPECT_EQ(parse_cpu_max(""), std::nullopt);
  EXPECT_EQ(parse_cpu_max("garbage"), std::nullopt);
  EXPECT_EQ(parse_cfs_quota("-1\n", "100000\n"), std::nullopt);
  EXPECT_DOUBLE_EQ(parse_cfs_quota("200000\n", "100000\n").value(), 2.0);
  EXPECT_EQ(parse_cfs_quota("", ""), std::nullopt);
}

TEST(Threads, ThisProcessInputs) {
  const ThreadInputs in = read_thread_inputs();
  EXPECT_GE(in.affinity_cpus, 1);
  EXPECT_LE(in.affinity_cpus, in.online_cpus);
  EXPECT_GE(choose_threads(in).threads, 1);
}

// The CLI asks libgomp for a sleeping wait unless the user chose a policy (libgomp prints
// its settings with OMP_DISPLAY_ENV=VERBOSE; a passive wait spins 0 times).
TEST(Threads, CliChoosesAPassiveWaitUnlessTheUserDid) {
  auto r = test::run_cli_env("env -u OMP_WAIT_POLICY -u GOMP_SPINCOUNT OMP_DISPLAY_ENV=VERBOSE",
                             "eval no-such-sae x.npy");
  EXPECT_EQ(r.exit_code, 1);
  const size_t last = r.output.rfind("GOMP_SPINCOUNT = '");
  ASSERT_NE(last, std::string::npos) << r.output;
  EXPECT_EQ(r.output.substr(last, 21), "GOMP_SPINCOUNT = '0'\n") << r.output;
  EXPECT_NE(r.output.find("no-such-sae"), std::string::npos) << "the command still ran";

  r = test::run_cli_env("env -u GOMP_SPINCOUNT OMP_WAIT_POLICY=ACTIVE OMP_DISPLAY_ENV=VERBOSE",
                        "eval no-such-sae x.npy");
  EXPECT_NE(r.output.find("OMP_WAIT_POLICY = 'ACTIVE'"), std::string::npos) << r.output;
  EXPECT_EQ(r.output.find("GOMP_SPINCOUNT = '0'"), std::string::npos) << r.output;
}

TEST(Threads, JobsSayHowManyThreadsAndWhy) {
  test::TempDir dir;
  auto r = test::run_cli("demo --tokens 2000 -o " + (dir / "a"));
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("threads: 2 (OMP_NUM_THREADS=2)"), std::string::npos) << r.output;
  r = test::run_cli("--threads 1 demo --tokens 2000 -o " + (dir / "b"));
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("threads: 1 (--threads)"), std::string::npos) << r.output;
}

}  // namespace
}  // namespace sae

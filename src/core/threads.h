// How many threads this process uses, and how many a given loop is worth.
//
// Two rules keep threads from hurting when the machine is shared (another job, `ctest -j`,
// several MPI ranks on a node):
//  - the pool is sized by what the process may really use: OMP_NUM_THREADS when set, else the
//    CPUs in its affinity mask, capped by its cgroup CPU quota, shared among the MPI ranks
//    that run unbound on the same node;
//  - a loop wakes only as many threads as its work pays for. A parallel region costs a wake-up
//    and a barrier: microseconds on a quiet machine, but a whole scheduler slice when a sibling
//    thread has been descheduled by another process. Small loops therefore run serially.
#pragma once

#include <optional>
#include <string>

namespace sae {

// Nanoseconds of single-threaded work each woken thread should receive: chosen, not tuned;
// with it the tiny release beside a busy process took 1.00x its 1-thread time with 2 threads
// (bench/threads_under_load.py, docs/benchmarks.md).
inline constexpr double kMinNsPerThread = 50'000;

// Threads worth using for a loop of `items` iterations of about `ns_per_item` nanoseconds
// each: one per kMinNsPerThread of work, at least 1, at most the pool's size.
int threads_for(double items, double ns_per_item);

// What the default thread count is decided from; read_thread_inputs() fills it in from the
// environment, /proc and /sys, and tests fill it in by hand.
struct ThreadInputs {
  std::optional<int> omp_num_threads;  // OMP_NUM_THREADS (its first value), when set
  int affinity_cpus = 1;               // CPUs in this process's affinity mask
  int online_cpus = 1;                 // CPUs online on the machine
  std::optional<double> cgroup_cpus;   // the cgroup's CPU quota in CPUs (quota / period)
  int local_ranks = 1;                 // MPI (or srun) processes on this node
};

struct ThreadChoice {
  int threads = 1;
  std::string reason;  // e.g. "2 CPUs in the affinity mask, no cgroup CPU quota"
};

ThreadInputs read_thread_inputs();
ThreadChoice choose_threads(const ThreadInputs& in);

// The tightest CPU quota along a cgroup path, from the text of its cpu.max (v2: "max 100000" or
// "150000 100000") or its cfs_quota_us / cfs_period_us (v1). nullopt: no limit.
std::optional<double> parse_cpu_max(const std::string& text);
std::optional<double> parse_cfs_quota(const std::string& quota_us, const std::string& period_us);

}  // namespace sae

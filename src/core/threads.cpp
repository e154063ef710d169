#include "core/threads.h"

#include <omp.h>
#include <sched.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>

namespace sae {

int threads_for(double items, double ns_per_item) {
  const double n = items * ns_per_item / kMinNsPerThread;
  const int pool = omp_get_max_threads();
  return n >= double(pool) ? pool : std::max(1, int(n));
}

std::optional<double> parse_cpu_max(const std::string& text) {
  std::istringstream s(text);
  std::string quota;
  double period = 0;
  if (!(s >> quota >> period) || quota == "max" || period <= 0) return std::nullopt;
  char* end = nullptr;
  const double q = std::strtod(quota.c_str(), &end);
  if (end == quota.c_str() || q <= 0) return std::nullopt;
  return q / period;
}

std::optional<double> parse_cfs_quota(const std::string& quota_us, const std::string& period_us) {
  char* end = nullptr;
  const double q = std::strtod(quota_us.c_str(), &end);
  if (end == quota_us.c_str() || q <= 0) return std::nullopt;  // -1: no limit
  const double p = std::strtod(period_us.c_str(), &end);
  if (end == period_us.c_str() || p <= 0) return std::nullopt;
  return q / p;
}

namespace {

namespace fs = std::filesystem;

std::string read_text(const fs::path& p) {
  std::ifstream f(p);
  std::stringstream s;
  s << f.rdbuf();
  return s.str();
}

// The tightest quota from the process's cgroup up to the hierarchy's root (a parent's limit
// binds its children; inside a container the recorded path may not exist under the mount, and
// the walk then ends at the container's own root).
template <typename Read>
std::optional<double> tightest_along(const fs::path& root, const std::string& cg_path, Read read) {
  std::optional<double> best;
  fs::path p = root / fs::path(cg_path).relative_path();
  for (;;) {
    std::error_code ec;
    if (fs::is_directory(p, ec))
      if (auto q = read(p); q && (!best || *q < *best)) best = q;
    if (p == root || !p.has_parent_path() || p.parent_path() == p) break;
    p = p.parent_path();
    if (p.string().size() < root.string().size()) break;
  }
  return best;
}

std::optional<double> read_cgroup_cpus() {
  std::ifstream f("/proc/self/cgroup");
  std::optional<double> best;
  auto keep = [&](std::optional<double> q) {
    if (q && (!best || *q < *best)) best = q;
  };
  for (std::string line; std::getline(f, line);) {
    const size_t a = line.find(':'), b = line.find(':', a + 1);
    if (a == std::string::npos || b == std::string::npos) continue;
    const std::string controllers = line.substr(a + 1, b - a - 1), path = line.substr(b + 1);
    if (line.substr(0, a) == "0" && controllers.empty()) {  // cgroup v2
      keep(tightest_along("/sys/fs/cgroup", path, [](const fs::path& d) {
        return parse_cpu_max(read_text(d / "cpu.max"));
      }));
    } else if (("," + controllers + ",").find(",cpu,") != std::string::npos) {  // v1
      for (const char* mount : {"/sys/fs/cgroup/cpu", "/sys/fs/cgroup/cpu,cpuacct"})
        keep(tightest_along(mount, path, [](const fs::path& d) {
          return parse_cfs_quota(read_text(d / "cpu.cfs_quota_us"),
                                 read_text(d / "cpu.cfs_period_us"));
        }));
    }
  }
  return best;
}

std::optional<int> positive_int_env(const char* name) {
  const char* v = std::getenv(name);
  if (!v || !*v) return std::nullopt;
  char* end = nullptr;
  const long n = std::strtol(v, &end, 10);
  if (end == v || n <= 0 || n > 1 << 16) return std::nullopt;
  return int(n);
}

}  // namespace

ThreadInputs read_thread_inputs() {
  ThreadInputs in;
  in.omp_num_threads = positive_int_env("OMP_NUM_THREADS");  // "4,2": its first level
  cpu_set_t set;
  CPU_ZERO(&set);
  in.affinity_cpus = sched_getaffinity(0, sizeof(set), &set) == 0 ? CPU_COUNT(&set) : 1;
  in.online_cpus = int(std::max(1L, sysconf(_SC_NPROCESSORS_ONLN)));
  in.cgroup_cpus = read_cgroup_cpus();
  // Open MPI, MPICH/Hydra and Slurm each name the processes started on this node.
  for (const char* name :
       {"OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS", "SLURM_NTASKS_PER_NODE"})
    if (auto n = positive_int_env(name)) {
      in.local_ranks = *n;
      break;
    }
  return in;
}

ThreadChoice choose_threads(const ThreadInputs& in) {
  ThreadChoice c;
  if (in.omp_num_threads) {
    c.threads = *in.omp_num_threads;
    c.reason = "OMP_NUM_THREADS=" + std::to_string(c.threads);
    return c;
  }
  int n = std::max(1, in.affinity_cpus);
  c.reason = std::to_string(n) + " CPUs in the affinity mask";
  if (in.cgroup_cpus) {
    const int quota = std::max(1, int(std::floor(*in.cgroup_cpus + 1e-9)));
    std::ostringstream s;
    s << ", cgroup CPU quota " << *in.cgroup_cpus;
    c.reason += s.str();
    n = std::min(n, quota);
  } else {
    c.reason += ", no cgroup CPU quota";
  }
  // Ranks that a launcher bound to their own CPUs already see their share in the mask; ranks
  // left unbound all see the whole machine and split it.
  if (in.local_ranks > 1) {
    if (in.affinity_cpus >= in.online_cpus) {
      n = std::max(1, n / in.local_ranks);
      c.reason += ", shared by " + std::to_string(in.local_ranks) + " processes on this node";
    } else {
      c.reason += ", " + std::to_string(in.local_ranks) + " processes on this node, each bound";
    }
  }
  c.threads = n;
  return c;
}

}  // namespace sae

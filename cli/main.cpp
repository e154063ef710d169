// `sae`: load, inspect, run and evaluate sparse autoencoders in SAELens format.
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <exception>
#include <map>
#include <set>
#include <string>

#include "commands.h"
#include "core/error.h"
#include "core/threads.h"
#include "dist/comm.h"
#include "dist/nccl.h"
#include "ops/cpu_kernels.h"
#include "ops/gemm.h"
#include "ops/gemm_bf16.h"

namespace {

// Two settings the runtime reads only when the process image starts, given by re-executing
// once with them in the environment:
//  - libgomp's wait policy. Its default spins for milliseconds at every barrier and between
//    parallel regions, which takes the core from a sibling thread or from another process
//    (docs/threads.md); sae.cpp sizes its regions so that a sleeping wait costs nothing
//    measurable and asks for it (OMP_WAIT_POLICY=PASSIVE). A user's own OMP_WAIT_POLICY or
//    GOMP_SPINCOUNT is left alone.
//  - glibc's malloc advises transparent huge pages for large buffers (glibc.malloc.hugetlb=1;
//    Debian's kernels give them only on request): the training step's gathers of random 9 KB
//    rows miss the TLB far less (docs/benchmarks.md). A user's own GLIBC_TUNABLES is left alone.
// Commands that compute nothing (info, download, --help, --version) skip the second start-up.
void reexec_with_runtime_settings(int argc, char** argv) {
  const bool set_wait = !std::getenv("OMP_WAIT_POLICY") && !std::getenv("GOMP_SPINCOUNT");
  const bool set_tunables = !std::getenv("GLIBC_TUNABLES");
  if (!set_wait && !set_tunables) return;
  const char* command = nullptr;
  for (int i = 1; i < argc && !command; ++i) {
    const std::string a = argv[i];
    if (a == "--help" || a == "-h" || a == "--version") return;
    if (a == "--threads")
      ++i;
    else if (a[0] != '-')
      command = argv[i];
  }
  if (!command || std::string(command) == "info" || std::string(command) == "download") return;
  if (set_wait) ::setenv("OMP_WAIT_POLICY", "PASSIVE", 1);
  if (set_tunables) ::setenv("GLIBC_TUNABLES", "glibc.malloc.hugetlb=1", 1);
  ::execv("/proc/self/exe", argv);
  // No /proc (or exec refused): run on with the defaults.
}

// Commands that run long enough for their thread count to matter say how it was chosen.
const std::set<std::string> kJobs = {"train", "demo", "release", "cache", "dashboard"};
// The jobs that run over several ranks (the others refuse rather than run N copies).
const std::set<std::string> kParallelJobs = {"train", "release"};

// The command line on this rank.
int run_command(int argc, char** argv) {
  CLI::App app{
      "sae.cpp " SAECPP_VERSION
      " — sparse autoencoders in C++ (SAELens format).\n"
      "<sae> is an SAE folder (cfg.json + sae_weights.safetensors) or release:sae_id,\n"
      "e.g. gemma-2-2b-res-snap-matryoshka-dc:blocks.12.hook_resid_post (from the Hugging\n"
      "Face cache, downloaded on a miss) or path/to/release:snap/blocks.12.hook_resid_post."};
  app.require_subcommand(1);
  int threads = 0;
  app.add_option("--threads", threads,
                 "Threads for BLAS and OpenMP (default: OMP_NUM_THREADS, else the CPUs this "
                 "process may use: affinity mask, cgroup quota, MPI ranks on the node)");
  // The version, with what this build and this CPU chose (figures depend on both).
  app.set_version_flag("--version", [] {
    return sae::cat("sae.cpp " SAECPP_VERSION "\ncpu kernels: ", sae::ops::cpu_kernels_summary(),
                    "\nbf16 matmuls: ", sae::ops::bf16_gemm_path(),
                    "\ncuda: ", SAECPP_HAS_CUDA ? "compiled in" : "not built",
                    "\nnccl: ", sae::dist::nccl_compiled() ? "compiled in" : "not built");
  });

  std::map<CLI::App*, sae::cli::Runner> runners;
  for (auto add :
       {sae::cli::add_info, sae::cli::add_encode, sae::cli::add_eval, sae::cli::add_convert,
        sae::cli::add_train, sae::cli::add_demo, sae::cli::add_activations, sae::cli::add_lm_loss,
        sae::cli::add_release, sae::cli::add_release_merge, sae::cli::add_cache,
        sae::cli::add_download, sae::cli::add_dashboard, sae::cli::add_status}) {
    size_t before = app.get_subcommands({}).size();
    auto run = add(app);
    runners[app.get_subcommands({})[before]] = run;
  }
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  }
  // An error ends the command with status 1 (and, on several ranks, the whole job).
  return sae::dist::run_or_abort(
      [&] {
        const sae::dist::Comm& world = sae::dist::world();
        for (auto& [sub, run] : runners) {
          if (!sub->parsed()) continue;
          if (kJobs.count(sub->get_name()) && !kParallelJobs.count(sub->get_name()) &&
              world.size() > 1)
            sae::fail(sae::cat("`sae ", sub->get_name(), "` was launched as ", world.size(),
                               " ranks: only `sae train` (data parallel) and `sae release` "
                               "(module parallel) run over several ranks yet; run it as one "
                               "process"));
          const sae::ThreadChoice choice = threads > 0
                                               ? sae::ThreadChoice{threads, "--threads"}
                                               : sae::choose_threads(sae::read_thread_inputs());
          sae::ops::set_num_threads(choice.threads);
          if (kJobs.count(sub->get_name()) && world.rank() == 0)
            std::fprintf(stderr, "threads: %d (%s)%s\n", choice.threads, choice.reason.c_str(),
                         world.size() > 1 ? " on each rank" : "");
          return run();
        }
        return 1;
      },
      "sae");
}

}  // namespace

int main(int argc, char** argv) {
  reexec_with_runtime_settings(argc, argv);
  // Launched by mpirun or srun as one of several ranks: MPI (or, without it, a clear refusal).
  const int dist_rc = sae::dist::run_or_abort(
      [&] {
        sae::dist::init(&argc, &argv);
        sae::ops::cpu_kernels();  // a bad SAECPP_CPU is refused here, before any work
        return 0;
      },
      "sae");
  if (dist_rc != 0) return dist_rc;
  const int rc = run_command(argc, argv);
  sae::dist::finalize();
  return rc;
}

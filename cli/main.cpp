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
#include "ops/gemm.h"

namespace {

// libgomp reads its wait policy once, when it is loaded (before main). Its default spins for
// milliseconds at every barrier and between parallel regions, which takes the core from a
// sibling thread or from another process (docs/threads.md); sae.cpp sizes its regions so that
// a sleeping wait costs nothing measurable and asks for it. The policy can only be given to a
// fresh image, so the process re-executes itself once with it set. A user's own
// OMP_WAIT_POLICY or GOMP_SPINCOUNT is left alone.
// Commands that compute nothing (info, download, --help, --version) skip the second start-up.
void reexec_with_passive_wait(int argc, char** argv) {
  if (std::getenv("OMP_WAIT_POLICY") || std::getenv("GOMP_SPINCOUNT")) return;
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
  ::setenv("OMP_WAIT_POLICY", "PASSIVE", 1);
  ::execv("/proc/self/exe", argv);
  // No /proc (or exec refused): run on with the default policy.
}

// Commands that run long enough for their thread count to matter say how it was chosen.
const std::set<std::string> kJobs = {"train", "demo", "release", "cache"};

}  // namespace

int main(int argc, char** argv) {
  reexec_with_passive_wait(argc, argv);
  CLI::App app{"sae.cpp " SAECPP_VERSION
               " — sparse autoencoders in C++ (SAELens format).\n"
               "<sae> is an SAE folder (cfg.json + sae_weights.safetensors) or release:sae_id,\n"
               "e.g. gemma-2-2b-res-snap-matryoshka-dc:blocks.12.hook_resid_post (from the Hugging\n"
               "Face cache, downloaded on a miss) or path/to/release:snap/blocks.12.hook_resid_post."};
  app.require_subcommand(1);
  int threads = 0;
  app.add_option("--threads", threads,
                 "Threads for BLAS and OpenMP (default: OMP_NUM_THREADS, else the CPUs this "
                 "process may use: affinity mask, cgroup quota, MPI ranks on the node)");
  app.set_version_flag("--version", SAECPP_VERSION);

  std::map<CLI::App*, sae::cli::Runner> runners;
  for (auto add :
       {sae::cli::add_info, sae::cli::add_encode, sae::cli::add_eval, sae::cli::add_convert,
        sae::cli::add_train, sae::cli::add_demo, sae::cli::add_activations, sae::cli::add_lm_loss,
        sae::cli::add_release, sae::cli::add_release_merge, sae::cli::add_cache,
        sae::cli::add_download}) {
    size_t before = app.get_subcommands({}).size();
    auto run = add(app);
    runners[app.get_subcommands({})[before]] = run;
  }
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  }
  try {
    const sae::ThreadChoice choice = threads > 0 ? sae::ThreadChoice{threads, "--threads"}
                                                 : sae::choose_threads(sae::read_thread_inputs());
    sae::ops::set_num_threads(choice.threads);
    for (auto& [sub, run] : runners)
      if (sub->parsed()) {
        if (kJobs.count(sub->get_name()))
          std::fprintf(stderr, "threads: %d (%s)\n", choice.threads, choice.reason.c_str());
        return run();
      }
  } catch (const sae::Error& e) {
    std::fprintf(stderr, "sae: error: %s\n", e.what());
    return 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "sae: error: %s\n", e.what());
    return 1;
  }
  return 1;
}

// `sae`: load, inspect, run and evaluate sparse autoencoders in SAELens format.
#include <cstdio>
#include <exception>
#include <map>

#include "commands.h"
#include "core/error.h"
#include "ops/gemm.h"

int main(int argc, char** argv) {
  CLI::App app{"sae.cpp " SAECPP_VERSION
               " — sparse autoencoders in C++ (SAELens format).\n"
               "<sae> is an SAE folder (cfg.json + sae_weights.safetensors) or release:sae_id,\n"
               "e.g. gemma-2-2b-res-snap-matryoshka-dc:blocks.12.hook_resid_post (read from the\n"
               "Hugging Face cache) or path/to/release:snap/blocks.12.hook_resid_post."};
  app.require_subcommand(1);
  int threads = 0;
  app.add_option("--threads", threads, "Threads for BLAS and OpenMP (default: all cores)");
  app.set_version_flag("--version", SAECPP_VERSION);

  std::map<CLI::App*, sae::cli::Runner> runners;
  for (auto add :
       {sae::cli::add_info, sae::cli::add_encode, sae::cli::add_eval, sae::cli::add_convert,
        sae::cli::add_train, sae::cli::add_demo, sae::cli::add_activations, sae::cli::add_lm_loss,
        sae::cli::add_release, sae::cli::add_cache}) {
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
    sae::ops::set_num_threads(threads);
    for (auto& [sub, run] : runners)
      if (sub->parsed()) return run();
  } catch (const sae::Error& e) {
    std::fprintf(stderr, "sae: error: %s\n", e.what());
    return 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "sae: error: %s\n", e.what());
    return 1;
  }
  return 1;
}

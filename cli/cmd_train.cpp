// sae train: train a (Matryoshka) BatchTopK SAE from a JSON config, presets and overrides.
// sae demo: the built-in default job on the synthetic hierarchy.
#include <csignal>
#include <cstdio>
#include <iostream>

#include "commands.h"
#include "core/error.h"
#include "dist/comm.h"
#include "io/json_file.h"
#include "pipeline/hierarchy_demo.h"
#include "pipeline/source_factory.h"
#include "train/trainer.h"

namespace sae::cli {

namespace {
std::atomic<bool> g_stop{false};
void on_signal(int) {
  g_stop = true;
}
}  // namespace

Runner add_train(CLI::App& app) {
  auto* cmd =
      app.add_subcommand("train", "Train a batch-TopK (Matryoshka) SAE; see docs/training.md");
  struct Opts {
    std::string config, preset, output;
    std::vector<std::string> sets;
    std::string device, precision, parallel = "data";
    bool resume = false, print = false;
    int64_t stop_at_step = -1;
  };
  auto o = std::make_shared<Opts>();
  cmd->add_option("--config", o->config, "Training config (JSON)");
  cmd->add_option(
      "--preset", o->preset,
      "Start from a preset: gemma-2-2b-matryoshka-standard, gemma-2-2b-matryoshka-snap, "
      "saelens, hierarchy-batchtopk, hierarchy-standard, hierarchy-snap");
  cmd->add_option("--set", o->sets, "Override a field: section.key=value (repeatable)");
  cmd->add_option("-o,--output", o->output, "Output folder (output.dir)");
  cmd->add_option("--device", o->device, "cpu or cuda (training.device)")
      ->check(CLI::IsMember({"cpu", "cuda"}));
  cmd->add_option("--precision", o->precision,
                  "The encoder GEMM's operands: fp32, bf16 (CPU: oneDNN where the CPU has bf16 dot "
                  "products), or on cuda tf32")
      ->check(CLI::IsMember({"fp32", "tf32", "bf16"}));
  cmd->add_flag("--resume", o->resume, "Continue from <output>/checkpoint if present");
  cmd->add_option("--stop-at-step", o->stop_at_step,
                  "Checkpoint and exit 0 at this step (continue later with --resume)");
  cmd->add_option("--parallel", o->parallel,
                  "Under mpirun/srun: data (each rank steps on its rows of every batch) or "
                  "latents (each rank holds a block of the latents, for SAEs too wide for one "
                  "rank); docs/distributed.md")
      ->check(CLI::IsMember({"data", "latents"}));
  cmd->add_flag("--print-config", o->print, "Print the resolved config and exit");
  return [=] {
    if (o->preset.empty() && o->config.empty() && o->sets.empty()) {
      // Nothing to train yet: say how to start, with the presets, rather than which field of
      // an empty config is missing first.
      std::fprintf(stderr, "%s\nsae train: give --preset NAME or --config FILE. Presets:",
                   cmd->help().c_str());
      for (const std::string& name : train::preset_names())
        std::fprintf(stderr, " %s", name.c_str());
      std::fprintf(stderr, "\n");
      return 2;
    }
    nlohmann::json j = nlohmann::json::object();
    std::string where = "command line";
    if (!o->preset.empty()) j = train::preset(o->preset), where = "preset " + o->preset;
    if (!o->config.empty()) {
      train::merge_json(j, nlohmann::json::parse(read_json_file(o->config).dump()));
      where = o->config;
    }
    for (const auto& s : o->sets) train::apply_override(j, s);
    if (!o->output.empty()) j["output"]["dir"] = o->output;
    if (!o->device.empty()) j["training"]["device"] = o->device;
    if (!o->precision.empty()) j["training"]["precision"] = o->precision;
    train::TrainConfig cfg = train::TrainConfig::from_json(j, where);
    if (o->print) {
      std::cout << cfg.to_json().dump(2) << "\n";
      return 0;
    }
    auto source = pipeline::make_source(cfg.data, where);
    std::signal(SIGINT, on_signal);
    std::signal(SIGTERM, on_signal);
    train::Trainer trainer(
        cfg, *source, "train", &dist::world(),
        o->parallel == "latents" ? train::Parallel::Latents : train::Parallel::Data);
    if (trainer.run(o->resume, o->stop_at_step, &g_stop)) return 0;
    return g_stop ? 130 : 0;  // a signal, or --stop-at-step
  };
}

Runner add_demo(CLI::App& app) {
  auto* cmd = app.add_subcommand(
      "demo", "Default job: BatchTopK vs Matryoshka vs Matryoshka-snap on a synthetic hierarchy");
  auto o = std::make_shared<pipeline::DemoOptions>();
  cmd->add_option("-o,--output", o->output_dir, "Output folder (default out/demo)");
  cmd->add_option("--tokens", o->total_tokens, "Training tokens per variant (default: preset)");
  cmd->add_flag("--resume", o->resume, "Continue interrupted runs");
  cmd->add_option("--set", o->overrides, "Override a field of every variant: section.key=value");
  return [=] {
    pipeline::run_hierarchy_demo(*o);
    return 0;
  };
}

}  // namespace sae::cli

// The `sae` subcommands: each registers its options on the CLI11 app and runs when chosen.
#pragma once

#include <CLI/CLI.hpp>
#include <functional>
#include <string>

namespace sae::cli {

using Runner = std::function<int()>;

Runner add_info(CLI::App& app);
Runner add_encode(CLI::App& app);
Runner add_eval(CLI::App& app);
Runner add_convert(CLI::App& app);
Runner add_train(CLI::App& app);
Runner add_demo(CLI::App& app);
Runner add_activations(CLI::App& app);
Runner add_lm_loss(CLI::App& app);
Runner add_release(CLI::App& app);
Runner add_release_merge(CLI::App& app);
Runner add_cache(CLI::App& app);
Runner add_download(CLI::App& app);
Runner add_dashboard(CLI::App& app);
Runner add_status(CLI::App& app);

// --device / --precision of the commands that run the model (cmd_model.cpp); the help says
// what runs on the GPU and what the precision is of.
void add_device_options(
    CLI::App* cmd, std::string& device, std::string& precision,
    const std::string& on_gpu = "the model forward on the GPU",
    const std::string& precision_help =
        "On cuda: bf16 (bf16 weights and GEMM operands, fp32 accumulate) or fp32");

}  // namespace sae::cli

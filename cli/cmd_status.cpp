// sae status <folder>: where a training job or a release stands (step, speed, ETA, the last
// checkpoint and evaluation, rollbacks and resumes with other settings), read from its folder
// while it runs or after it stopped.
#include <cstdio>
#include <memory>

#include "commands.h"
#include "pipeline/job_status.h"

namespace sae::cli {

Runner add_status(CLI::App& app) {
  auto* cmd = app.add_subcommand(
      "status",
      "Where a `sae train`, `sae release` or `sae cache` job stands, from its folder (running or "
      "not): step, tokens/s, ETA, last checkpoint and evaluation, rollbacks, resumes with other "
      "settings");
  auto folder = std::make_shared<std::string>();
  auto json = std::make_shared<bool>(false);
  cmd->add_option("folder", *folder, "The job's output folder (-o of sae train, release, cache)")
      ->required();
  cmd->add_flag("--json", *json, "Print it as JSON");
  return [=] {
    const auto status = pipeline::job_status(*folder);
    std::printf("%s", *json ? (status.dump(2) + "\n").c_str()
                            : pipeline::describe_job_status(status).c_str());
    return 0;
  };
}

}  // namespace sae::cli

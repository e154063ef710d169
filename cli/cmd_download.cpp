// sae download <repo>: files of a Hugging Face repo into the shared cache (as huggingface-cli
// download does), printing the snapshot folder; what is cached already is not fetched again.
#include <cstdio>

#include "commands.h"
#include "hub/download.h"

namespace sae::cli {

Runner add_download(CLI::App& app) {
  auto* cmd = app.add_subcommand(
      "download",
      "Download files of a Hugging Face repo into the HF cache (HF_ENDPOINT, HF_TOKEN, "
      "HF_HUB_CACHE/HF_HOME, HF_HUB_OFFLINE as huggingface_hub reads them); prints the "
      "snapshot folder");
  auto req = std::make_shared<hub::SnapshotRequest>();
  cmd->add_option("repo", req->repo_id, "Repo id, e.g. google/gemma-2-2b")->required();
  cmd->add_option("--include", req->include,
                  "Only files matching this glob (repeatable; '*' crosses '/'), e.g. "
                  "'snap/blocks.12.hook_resid_post/*'");
  cmd->add_option("--revision", req->revision, "Branch, tag or commit (default main)");
  return [=] {
    std::printf("%s\n", hub::snapshot_download(*req).c_str());
    return 0;
  };
}

}  // namespace sae::cli

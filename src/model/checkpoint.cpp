#include "model/checkpoint.h"

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <vector>

#include "core/error.h"
#include "hub/cache.h"
#include "hub/download.h"

namespace sae::model {

namespace fs = std::filesystem;

namespace {

// A cached snapshot is complete when it has the config, the tokenizer and every weight file
// (the single file, or each shard the index names).
bool complete(const fs::path& dir) {
  if (!fs::exists(dir / "config.json") || !fs::exists(dir / "tokenizer.model")) return false;
  if (fs::exists(dir / "model.safetensors")) return true;
  std::ifstream in(dir / "model.safetensors.index.json");
  const auto index = nlohmann::json::parse(in, nullptr, false);
  if (!index.is_object() || !index.contains("weight_map")) return false;
  for (const auto& [_, shard] : index["weight_map"].items())
    if (!shard.is_string() || !fs::exists(dir / shard.get<std::string>())) return false;
  return true;
}

// .../models--org--name/snapshots/<commit>: the repo id of a folder inside the HF cache.
std::string repo_id_of_cache_folder(const fs::path& folder) {
  const fs::path snapshots = folder.parent_path(), repo = snapshots.parent_path();
  const std::string r = repo.filename().string();
  if (snapshots.filename() != "snapshots" || !r.starts_with("models--")) return "";
  const std::string id = r.substr(8);
  const size_t p = id.find("--");
  return p == std::string::npos ? id : id.substr(0, p) + "/" + id.substr(p + 2);
}

// The files of a Gemma-2 repo the engine reads (globs for hub::snapshot_download).
const std::vector<std::string>& checkpoint_files() {
  static const std::vector<std::string> files = {"config.json", "model.safetensors",
                                                 "model-*.safetensors",
                                                 "model.safetensors.index.json", "tokenizer.model"};
  return files;
}

}  // namespace

Checkpoint resolve_checkpoint(const std::string& spec, const std::string& revision) {
  Checkpoint c;
  if (fs::is_directory(spec)) {
    fs::path folder = fs::path(spec).lexically_normal();
    if (folder.filename().empty()) folder = folder.parent_path();  // "dir/" -> "dir"
    c.folder = spec;
    c.repo_id = repo_id_of_cache_folder(fs::absolute(folder));
    c.name = c.repo_id.empty() ? fs::absolute(folder).filename().string()
                               : c.repo_id.substr(c.repo_id.find('/') + 1);
    return c;
  }
  bool repo_id = spec.find('/') != std::string::npos;
  try {
    hub::check_repo_id(spec);
  } catch (const Error&) {
    repo_id = false;
  }
  if (!repo_id) fail(spec, "model", "no such folder, and not a Hugging Face repo id (org/name)");
  c.repo_id = spec;
  c.name = spec.substr(spec.find('/') + 1);
  if (auto snap = hub::cached_snapshot(spec, revision); snap && complete(*snap)) {
    c.folder = *snap;
    return c;
  }
  fs::path snap;
  try {
    snap = hub::snapshot_download(
        {.repo_id = spec, .revision = revision, .include = checkpoint_files()});
  } catch (const Error& e) {  // a mistyped folder reads as a repo id: say both
    fail(spec, "model", cat("no such folder; as a Hugging Face repo id: ", e.what()));
  }
  if (!complete(snap))
    fail(spec, "model",
         cat("the repository lacks a file a Gemma-2 checkpoint needs (config.json, "
             "tokenizer.model, model.safetensors or its index and shards): ",
             snap.string()));
  c.folder = snap.string();
  return c;
}

}  // namespace sae::model

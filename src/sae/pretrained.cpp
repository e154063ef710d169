#include "sae/pretrained.h"

#include <algorithm>
#include <cstdlib>
#include <filesystem>

#include "core/error.h"
#include "hub/cache.h"
#include "hub/download.h"
#include "hub/settings.h"

namespace sae {

namespace fs = std::filesystem;

const std::vector<PretrainedEntry>& pretrained_table() {
  static const std::vector<PretrainedEntry> table = {
#include "sae/pretrained_table.inc"
  };
  return table;
}

std::optional<PretrainedEntry> lookup_pretrained(const std::string& release,
                                                 const std::string& sae_id) {
  for (const auto& e : pretrained_table())
    if (e.release == release && e.sae_id == sae_id) return e;
  return std::nullopt;
}

namespace {

bool is_sae_folder(const fs::path& p) {
  return fs::exists(p / "cfg.json");
}

// <hub>/models--org--name/snapshots/<rev>/<path>: the snapshot refs/main names, else the most
// recently written one that holds the SAE, else downloaded from the Hub.
std::string find_in_hf_cache(const std::string& repo_id, const std::string& path) {
  hub::check_repo_id(repo_id);
  hub::check_repo_path(repo_id, path);
  const hub::RepoCache cache(hub::hub_cache_dir(), repo_id);
  if (auto main = hub::cached_snapshot(repo_id, "main");
      main && is_sae_folder(fs::path(*main) / path))
    return (fs::path(*main) / path).string();
  fs::path best;
  fs::file_time_type best_time{};
  std::error_code ec;
  for (const auto& snap : fs::directory_iterator(cache.dir() / "snapshots", ec)) {
    const fs::path cand = snap.path() / path;
    if (!is_sae_folder(cand)) continue;
    auto t = fs::last_write_time(snap.path());
    if (best.empty() || t > best_time) best = cand, best_time = t;
  }
  if (!best.empty()) return best.string();
  // Not cached: the SAE's folder from the Hub (cfg.json, the weights, sparsity if there).
  const fs::path snap =
      hub::snapshot_download({.repo_id = repo_id, .include = {path + "/*"}, .folder = path});
  if (!is_sae_folder(snap / path))
    fail(repo_id, path, "the Hub has this folder but no cfg.json in it: not a SAELens SAE");
  return (snap / path).string();
}

}  // namespace

std::vector<std::string> sae_ids_in_folder(const std::string& folder) {
  std::vector<std::string> ids;
  std::error_code ec;
  for (const auto& a : fs::directory_iterator(folder, ec)) {
    if (!a.is_directory() || a.path().filename().string().starts_with(".")) continue;
    if (is_sae_folder(a.path())) ids.push_back(a.path().filename().string());
    for (const auto& b : fs::directory_iterator(a.path(), ec))
      if (b.is_directory() && is_sae_folder(b.path()))
        ids.push_back(a.path().filename().string() + "/" + b.path().filename().string());
  }
  std::sort(ids.begin(), ids.end());
  return ids;
}

std::string some_sae_ids(const std::vector<std::string>& ids) {
  std::string out;
  for (size_t i = 0; i < ids.size() && i < 4; ++i) out += (i ? ", " : "") + ids[i];
  if (ids.size() > 4) out += cat(", ... (", ids.size(), " in all)");
  return out;
}

std::string resolve_pretrained(const std::string& release, const std::string& sae_id) {
  if (fs::is_directory(release)) {
    const fs::path p = fs::path(release) / sae_id;
    if (!is_sae_folder(p)) {
      const std::vector<std::string> ids = sae_ids_in_folder(release);
      fail(p.string(), "cfg.json",
           ids.empty() ? std::string("missing: no such SAE in this release folder")
                       : cat("missing: no such SAE in this release folder (it holds ",
                             some_sae_ids(ids), ")"));
    }
    return p.string();
  }
  bool known_release = false;
  for (const auto& e : pretrained_table()) known_release |= e.release == release;
  if (known_release) {
    auto e = lookup_pretrained(release, sae_id);
    if (!e) {
      std::string ids;
      int n = 0;
      for (const auto& x : pretrained_table())
        if (x.release == release && n++ < 5) ids += (ids.empty() ? "" : ", ") + x.sae_id;
      fail(release, "sae_id",
           cat("\"", sae_id, "\" is not in this release (valid ids: ", ids, ", ...)"));
    }
    return find_in_hf_cache(e->repo_id, e->path);
  }
  if (release.find('/') != std::string::npos) return find_in_hf_cache(release, sae_id);
  fail(release, "release",
       "is not a folder, a known SAELens release, or a Hugging Face repo id (org/name)");
}

}  // namespace sae

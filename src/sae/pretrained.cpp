#include "sae/pretrained.h"

#include <cstdlib>
#include <filesystem>
#include <fstream>

#include "core/error.h"

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

std::string hf_hub_cache_dir() {
  if (const char* v = std::getenv("HF_HUB_CACHE"); v && *v) return v;
  if (const char* v = std::getenv("HF_HOME"); v && *v) return (fs::path(v) / "hub").string();
  const char* home = std::getenv("HOME");
  return (fs::path(home ? home : ".") / ".cache" / "huggingface" / "hub").string();
}

namespace {

bool is_sae_folder(const fs::path& p) {
  return fs::exists(p / "cfg.json");
}

// <hub>/models--org--name/snapshots/<rev>/<path>, preferring the revision refs/main names.
std::string find_in_hf_cache(const std::string& repo_id, const std::string& path) {
  std::string mangled = "models--" + repo_id;
  for (size_t p = mangled.find('/'); p != std::string::npos; p = mangled.find('/', p))
    mangled.replace(p, 1, "--");
  const fs::path repo_dir = fs::path(hf_hub_cache_dir()) / mangled;
  const std::string hint =
      cat(" (download it with: huggingface-cli download ", repo_id, " --include '", path, "/*')");
  if (!fs::is_directory(repo_dir / "snapshots"))
    fail(repo_dir.string(), "", cat("repo ", repo_id, " is not in the Hugging Face cache", hint));

  std::ifstream ref(repo_dir / "refs" / "main");
  std::string main_rev;
  if (ref) std::getline(ref, main_rev);
  if (!main_rev.empty() && is_sae_folder(repo_dir / "snapshots" / main_rev / path))
    return (repo_dir / "snapshots" / main_rev / path).string();
  // Otherwise the most recently written snapshot that holds the SAE.
  fs::path best;
  fs::file_time_type best_time{};
  for (const auto& snap : fs::directory_iterator(repo_dir / "snapshots")) {
    const fs::path cand = snap.path() / path;
    if (!is_sae_folder(cand)) continue;
    auto t = fs::last_write_time(snap.path());
    if (best.empty() || t > best_time) best = cand, best_time = t;
  }
  if (best.empty())
    fail(repo_dir.string(), path, cat("no snapshot holds this SAE (cfg.json)", hint));
  return best.string();
}

}  // namespace

std::string resolve_pretrained(const std::string& release, const std::string& sae_id) {
  if (fs::is_directory(release)) {
    const fs::path p = fs::path(release) / sae_id;
    if (!is_sae_folder(p))
      fail(p.string(), "cfg.json", "missing: no such SAE in this release folder");
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

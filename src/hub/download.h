// Downloading from the Hugging Face Hub into the shared cache (hub/cache.h), the way
// huggingface_hub's hf_hub_download and snapshot_download do: a revision resolved to a commit,
// files listed from the tree API, each file's ETag and size read from a HEAD of its resolve URL,
// its bytes fetched (following the redirect to storage) into blobs/<etag>.incomplete under a
// per-blob lock, resumed with a byte range after a broken connection, checked (size, SHA-256 of
// LFS files, git blob id of the others) and only then renamed into place and linked.
//
// Settings come from the environment (hub/settings.h): HF_ENDPOINT, HF_TOKEN or the token file,
// HF_HUB_CACHE/HF_HOME, HF_HUB_OFFLINE=1 (the cache only), HF_HUB_DISABLE_PROGRESS_BARS.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace sae::hub {

struct RepoFile {
  std::string path;
  int64_t size = 0;
  std::string git_oid;     // git blob id
  std::string lfs_sha256;  // "" for a file stored in git
};

// Every file of the repo at a revision, under folder ("" = the whole repo).
std::vector<RepoFile> list_files(const std::string& repo_id, const std::string& revision,
                                 const std::string& folder = "");

// huggingface_hub's filter_repo_objects: fnmatch, where '*' also matches '/'; a pattern that
// ends in '/' means everything under that folder. No patterns: every path matches.
bool matches_any(const std::string& path, const std::vector<std::string>& patterns);

// One file: its path in the cache (snapshots/<commit>/<path>), downloaded on a miss.
std::string download_file(const std::string& repo_id, const std::string& path,
                          const std::string& revision = "main");

struct SnapshotRequest {
  std::string repo_id{};
  std::string revision = "main";
  std::vector<std::string> include{};  // globs (matches_any); empty = every file
  std::string folder{};                // list only this folder of the repo ("" = all of it)
};

// The files of a revision that match, each downloaded unless cached; returns the snapshot
// folder (snapshots/<commit>). Offline, or when the Hub cannot be reached, a cached snapshot
// that holds a match for every pattern is returned instead.
std::string snapshot_download(const SnapshotRequest& req);

// The snapshot folder the cache holds for a revision (refs/<revision>), or nullopt.
std::optional<std::string> cached_snapshot(const std::string& repo_id,
                                           const std::string& revision = "main");

}  // namespace sae::hub

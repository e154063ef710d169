// The Hugging Face cache layout, written exactly as huggingface_hub writes it so that files
// fetched by either tool are found by the other:
//   <cache>/models--<org>--<name>/blobs/<etag>                 the file's bytes
//   <cache>/models--<org>--<name>/snapshots/<commit>/<path>    relative symlink to the blob
//   <cache>/models--<org>--<name>/refs/<revision>              the commit a branch or tag named
//   <cache>/.locks/models--<org>--<name>/<etag>.lock           flock(2) while a blob is written
#pragma once

#include <filesystem>
#include <optional>
#include <string>

namespace sae::hub {

namespace fs = std::filesystem;

// "org/name" -> "models--org--name".
std::string repo_folder_name(const std::string& repo_id);

// A full 40-hex-digit commit id (what snapshots/ is keyed by).
bool is_commit_hash(const std::string& s);

// Throws sae::Error unless repo_id is "name" or "org/name" of the Hub's characters.
void check_repo_id(const std::string& repo_id);
// Throws sae::Error for a repo file path that could escape the snapshot folder (absolute,
// "..", backslashes, empty segments): a listing from a server is not trusted.
void check_repo_path(const std::string& repo_id, const std::string& path);

class RepoCache {
 public:
  RepoCache(const std::string& cache_dir, const std::string& repo_id);

  const fs::path& dir() const { return dir_; }
  fs::path snapshot(const std::string& commit) const { return dir_ / "snapshots" / commit; }
  fs::path pointer(const std::string& commit, const std::string& path) const {
    return snapshot(commit) / path;
  }
  fs::path blob(const std::string& etag) const { return dir_ / "blobs" / etag; }
  fs::path lock_file(const std::string& etag) const;

  // The commit a revision names here: the revision itself when it is a commit id, else
  // refs/<revision>; nullopt when the cache has never resolved it.
  std::optional<std::string> commit_for(const std::string& revision) const;
  // refs/<revision> = commit (atomically; nothing when revision is the commit itself).
  void write_ref(const std::string& revision, const std::string& commit) const;
  // snapshots/<commit>/<path> -> ../../blobs/<etag> (relative, as huggingface_hub links).
  void link(const std::string& commit, const std::string& path, const std::string& etag) const;
  // CACHEDIR.TAG in the cache root, so backup tools skip it (huggingface_hub writes it too).
  void tag_cache_dir() const;

 private:
  fs::path root_, dir_;
  std::string folder_;
};

// Holds flock(LOCK_EX) on a file (created if missing) for its lifetime: the lock
// huggingface_hub's filelock takes on the same path, so the two tools also exclude each other.
class FileLock {
 public:
  explicit FileLock(const fs::path& path);
  ~FileLock();
  FileLock(const FileLock&) = delete;
  FileLock& operator=(const FileLock&) = delete;

 private:
  int fd_ = -1;
};

}  // namespace sae::hub

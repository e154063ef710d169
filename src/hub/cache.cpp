#include "hub/cache.h"

#include <fcntl.h>
#include <sys/file.h>
#include <unistd.h>

#include <atomic>
#include <fstream>

#include "core/error.h"
#include "io/atomic_file.h"

namespace sae::hub {

std::string repo_folder_name(const std::string& repo_id) {
  std::string out = "models--" + repo_id;
  for (size_t p = out.find('/', 8); p != std::string::npos; p = out.find('/', p + 2))
    out.replace(p, 1, "--");
  return out;
}

bool is_commit_hash(const std::string& s) {
  if (s.size() != 40) return false;
  for (char c : s)
    if (!((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f'))) return false;
  return true;
}

void check_repo_id(const std::string& repo_id) {
  const size_t slash = repo_id.find('/');
  bool ok = !repo_id.empty() && repo_id.size() <= 96 &&
            repo_id.find('/', slash + 1) == std::string::npos && slash != 0 &&
            slash + 1 != repo_id.size() && repo_id.find("--") == std::string::npos &&
            repo_id.find("..") == std::string::npos && repo_id.front() != '.' &&
            repo_id.back() != '.';
  for (char c : repo_id)
    ok &=
        std::isalnum(static_cast<unsigned char>(c)) || c == '/' || c == '-' || c == '_' || c == '.';
  if (!ok) fail(repo_id, "repo_id", "is not a Hugging Face repo id (name or org/name)");
}

void check_repo_path(const std::string& repo_id, const std::string& path) {
  bool ok = !path.empty() && path.front() != '/' && path.back() != '/' &&
            path.find('\\') == std::string::npos && path.find('\0') == std::string::npos;
  for (size_t b = 0; ok && b <= path.size();) {
    size_t e = path.find('/', b);
    if (e == std::string::npos) e = path.size();
    const std::string seg = path.substr(b, e - b);
    ok = !seg.empty() && seg != "." && seg != "..";
    b = e + 1;
  }
  if (!ok) fail(repo_id, path, "is not a safe file path inside the repository (refused)");
}

RepoCache::RepoCache(const std::string& cache_dir, const std::string& repo_id)
    : root_(cache_dir),
      dir_(fs::path(cache_dir) / repo_folder_name(repo_id)),
      folder_(repo_folder_name(repo_id)) {}

fs::path RepoCache::lock_file(const std::string& etag) const {
  return root_ / ".locks" / folder_ / (etag + ".lock");
}

std::optional<std::string> RepoCache::commit_for(const std::string& revision) const {
  if (is_commit_hash(revision)) return revision;
  std::ifstream in(dir_ / "refs" / revision);
  std::string commit;
  if (in && std::getline(in, commit) && is_commit_hash(commit)) return commit;
  return std::nullopt;
}

void RepoCache::write_ref(const std::string& revision, const std::string& commit) const {
  if (revision == commit) return;
  const fs::path ref = dir_ / "refs" / revision;
  if (commit_for(revision) == commit) return;
  fs::create_directories(ref.parent_path());
  write_file_atomic(ref.string(), commit);  // no newline: huggingface_hub reads it verbatim
}

void RepoCache::link(const std::string& commit, const std::string& path,
                     const std::string& etag) const {
  const fs::path ptr = pointer(commit, path);
  fs::create_directories(ptr.parent_path());
  const fs::path target = blob(etag).lexically_relative(ptr.parent_path());
  std::error_code ec;
  if (fs::is_symlink(ptr, ec) && fs::read_symlink(ptr, ec) == target) return;
  // A new link under a unique name, renamed over the pointer: readers see the old or the new.
  static std::atomic<uint64_t> serial{0};
  const fs::path tmp = cat(ptr.string(), ".tmp.", ::getpid(), ".", serial++);
  fs::remove(tmp, ec);
  fs::create_symlink(target, tmp);
  fs::rename(tmp, ptr);
}

void RepoCache::tag_cache_dir() const {
  const fs::path tag = root_ / "CACHEDIR.TAG";
  if (fs::exists(tag)) return;
  std::ofstream(tag)
      << "Signature: 8a477f597d28d172789f06886806bc55\n"
         "# This file is a cache directory tag (Hugging Face cache, written by sae.cpp).\n"
         "# For information about cache directory tags, see:\n"
         "#\thttps://bford.info/cachedir/\n";
}

FileLock::FileLock(const fs::path& path) {
  fs::create_directories(path.parent_path());
  fd_ = ::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
  if (fd_ < 0) fail(path.string(), "", "cannot open the lock file");
  while (::flock(fd_, LOCK_EX) != 0)
    if (errno != EINTR) {
      ::close(fd_);
      fail(path.string(), "", "cannot lock");
    }
}

FileLock::~FileLock() {
  if (fd_ >= 0) ::close(fd_);  // closing releases the lock
}

}  // namespace sae::hub

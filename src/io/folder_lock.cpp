#include "io/folder_lock.h"

#include <fcntl.h>
#include <sys/file.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <ctime>

#include "core/error.h"

namespace sae {

namespace {

std::string read_all(int fd) {
  std::string s;
  char buf[512];
  for (off_t at = 0;;) {
    const ssize_t n = ::pread(fd, buf, sizeof buf, at);
    if (n <= 0) break;
    s.append(buf, size_t(n));
    at += n;
  }
  return s;
}

std::string describe(const nlohmann::json& h) {
  return cat(h.value("job", std::string("a process")), " (pid ", h.value("pid", int64_t(0)), " on ",
             h.value("host", std::string("?")), ", since ", h.value("started", std::string("?")),
             ")");
}

nlohmann::json holder_of(int fd) {
  nlohmann::json h = nlohmann::json::parse(read_all(fd), nullptr, false);
  return h.is_object() ? h : nlohmann::json::object();
}

}  // namespace

FolderLock::FolderLock(std::string path, const std::string& job) : path_(std::move(path)) {
  fd_ = ::open(path_.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
  if (fd_ < 0) fail(path_, "", cat("cannot open the folder's lock file: ", std::strerror(errno)));
  while (::flock(fd_, LOCK_EX | LOCK_NB) != 0) {
    if (errno == EINTR) continue;
    const int err = errno;
    const nlohmann::json h = holder_of(fd_);
    ::close(fd_);
    fd_ = -1;
    if (err == EWOULDBLOCK)
      fail(path_, "",
           cat("this folder is in use by ", describe(h),
               ": one job writes a folder at a time (wait for it, or stop it first)"));
    // A file system without locks (some FUSE mounts): the job runs, unguarded, and says so.
    std::fprintf(stderr,
                 "warning: %s: cannot lock the folder (%s): running without the check "
                 "that no other job writes it\n",
                 path_.c_str(), std::strerror(err));
    return;
  }
  char host[256] = {0};
  ::gethostname(host, sizeof host - 1);
  const std::time_t now = std::time(nullptr);
  char started[32];
  std::strftime(started, sizeof started, "%Y-%m-%dT%H:%M:%SZ", std::gmtime(&now));
  const std::string text =
      nlohmann::json{
          {"job", job}, {"pid", int64_t(::getpid())}, {"host", host}, {"started", started}}
          .dump() +
      "\n";
  // The holder's record, for whoever finds the folder locked (a plain write: the lock is ours).
  if (::ftruncate(fd_, 0) != 0 ||
      ::pwrite(fd_, text.data(), text.size(), 0) != ssize_t(text.size())) {
    const int err = errno;
    ::close(fd_);  // no destructor runs for a constructor that throws
    fd_ = -1;
    fail(path_, "", cat("cannot write the folder's lock file: ", std::strerror(err)));
  }
}

FolderLock::~FolderLock() {
  if (fd_ >= 0) ::close(fd_);  // closing releases the lock
}

std::optional<nlohmann::json> folder_lock_holder(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return std::nullopt;
  std::optional<nlohmann::json> held;
  if (::flock(fd, LOCK_SH | LOCK_NB) != 0) {
    if (errno == EWOULDBLOCK) held = holder_of(fd);
  }
  ::close(fd);  // a shared lock taken here goes with it
  return held;
}

}  // namespace sae

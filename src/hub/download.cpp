#include "hub/download.h"

#include <fcntl.h>
#include <fnmatch.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <optional>
#include <thread>

#include "core/error.h"
#include "hub/cache.h"
#include "hub/checksum.h"
#include "hub/http.h"
#include "hub/settings.h"

namespace sae::hub {

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

namespace {

// Tries of an API call (retried on 429, 5xx and broken connections) and of a file transfer
// (resumed after a broken connection): 1 + $SAECPP_HUB_RETRIES (default 5), waiting 0, 1, 2,
// 4, ... s between them.
int attempts() {
  const char* v = std::getenv("SAECPP_HUB_RETRIES");
  return 1 + (v && *v ? std::max(0, std::atoi(v)) : 5);
}

// urllib.parse.quote: everything but unreserved characters and `safe` percent-encoded.
std::string url_quote(const std::string& s, const std::string& safe) {
  static const char* hex = "0123456789ABCDEF";
  std::string out;
  for (unsigned char c : s) {
    if (std::isalnum(c) || c == '-' || c == '.' || c == '_' || c == '~' ||
        safe.find(char(c)) != std::string::npos)
      out += char(c);
    else
      out += '%', out += hex[c >> 4], out += hex[c & 15];
  }
  return out;
}

std::vector<std::string> auth_headers(const HubSettings& s) {
  if (s.token.empty()) return {};
  return {"Authorization: Bearer " + s.token};
}

std::string origin_of(const std::string& url) {  // "http://host:port" of a URL
  const size_t scheme = url.find("://");
  const size_t slash = url.find('/', scheme == std::string::npos ? 0 : scheme + 3);
  return slash == std::string::npos ? url : url.substr(0, slash);
}

// The Hub's JSON or text error body, shortened for a message.
std::string body_excerpt(const HttpResponse& r) {
  std::string msg = r.header("x-error-message");
  if (msg.empty() && !r.body.empty()) {
    const auto j = nlohmann::json::parse(r.body, nullptr, false);
    if (j.is_object() && j.contains("error") && j["error"].is_string())
      msg = j["error"].get<std::string>();
    else
      msg = r.body.substr(0, 200);
  }
  return msg;
}

// One error per way the Hub refuses, each saying what to do about it.
[[noreturn]] void fail_response(const HubSettings& s, const std::string& repo_id,
                                const std::string& what, const std::string& revision,
                                const HttpResponse& r) {
  const std::string code = r.header("x-error-code"), msg = body_excerpt(r);
  const std::string page = s.endpoint + "/" + repo_id;
  if (code == "GatedRepo")
    fail(repo_id, what,
         cat("gated repository (HTTP ", r.status, "): accept its licence at ", page,
             " with your Hugging Face account, then set HF_TOKEN to a token of that account (or "
             "run `hf auth login`)",
             s.token.empty() ? "; no token is set"
                             : cat("; the token from ", s.token_source, " has no access yet")));
  if (r.status == 401 && msg == "Invalid credentials in Authorization header")
    fail(repo_id, what,
         cat("the Hub refused the token from ", s.token_source,
             " (invalid credentials): set HF_TOKEN to a valid token"));
  if (code == "RevisionNotFound")
    fail(repo_id, what, cat("no revision \"", revision, "\" in this repository (", page, ")"));
  if (code == "EntryNotFound" || (r.status == 404 && code != "RepoNotFound" && !what.empty()))
    fail(repo_id, what, cat("no such file at revision ", revision, " (", page, ")"));
  if (code == "RepoNotFound" || r.status == 401 || r.status == 404)
    fail(repo_id, what,
         cat("repository not found at ", s.endpoint, " (HTTP ", r.status,
             "); if it is private or gated, set HF_TOKEN to a token with access",
             s.token.empty() ? "" : cat(" (the token from ", s.token_source, " was sent)")));
  fail(repo_id, what, cat("HTTP ", r.status, " from ", r.url, msg.empty() ? "" : ": ", msg));
}

bool retryable(long status) {
  return status == 429 || status / 100 == 5;
}

void wait_before_retry(int attempt) {  // 0 s, then 1, 2, 4, ... s, at most 32 s
  if (attempt > 0) std::this_thread::sleep_for(std::chrono::seconds(1 << std::min(attempt - 1, 5)));
}

// An API request retried on 429, 5xx and broken connections.
HttpResponse send_api(HttpRequest req) {
  const int tries = attempts();
  for (int attempt = 0;; ++attempt) {
    wait_before_retry(attempt);
    try {
      HttpResponse r = http_send(req);
      if (!retryable(r.status) || attempt + 1 == tries) return r;
    } catch (const TransferError& e) {
      if (attempt + 1 == tries || !e.transient) throw;
    }
  }
}

[[noreturn]] void fail_unreachable(const HubSettings& s, const std::string& repo_id,
                                   const TransferError& e) {
  fail(repo_id, "",
       cat("cannot reach the Hub at ", s.endpoint, ": ", e.what(), " (nothing usable in the cache ",
           s.cache_dir,
           "; HF_ENDPOINT sets another endpoint, HF_HUB_OFFLINE=1 uses the cache only)"));
}

std::string resolve_revision(const HubSettings& s, const std::string& repo_id,
                             const std::string& revision) {
  const HttpResponse r = send_api(
      {.url = cat(s.endpoint, "/api/models/", repo_id, "/revision/", url_quote(revision, "")),
       .headers = auth_headers(s)});
  if (r.status != 200) fail_response(s, repo_id, "", revision, r);
  const auto j = nlohmann::json::parse(r.body, nullptr, false);
  if (!j.is_object() || !j.contains("sha") || !j["sha"].is_string() ||
      !is_commit_hash(j["sha"].get<std::string>()))
    fail(repo_id, "sha", cat("the Hub's answer for revision ", revision, " has no commit id"));
  return j["sha"];
}

// `<url>; rel="next"` from a Link header, or "".
std::string next_page(const std::string& link) {
  const size_t rel = link.find("rel=\"next\"");
  if (rel == std::string::npos) return "";
  const size_t open = link.rfind('<', rel), close = link.find('>', open);
  return open == std::string::npos || close == std::string::npos || close > rel
             ? ""
             : link.substr(open + 1, close - open - 1);
}

std::vector<RepoFile> list_files(const HubSettings& s, const std::string& repo_id,
                                 const std::string& revision, const std::string& folder) {
  std::vector<RepoFile> files;
  std::string url = cat(s.endpoint, "/api/models/", repo_id, "/tree/", url_quote(revision, ""),
                        folder.empty() ? "" : "/" + url_quote(folder, ""), "?recursive=true");
  while (!url.empty()) {
    const HttpResponse r = send_api({.url = url, .headers = auth_headers(s)});
    if (r.status != 200) fail_response(s, repo_id, folder, revision, r);
    const auto page = nlohmann::json::parse(r.body, nullptr, false);
    if (!page.is_array()) fail(repo_id, folder, "the Hub's file listing is not a JSON array");
    for (const auto& e : page) {
      if (!e.is_object() || e.value("type", "") != "file") continue;
      RepoFile f;
      f.path = e.value("path", "");
      f.size = e.value("size", int64_t(0));
      f.git_oid = e.value("oid", "");
      if (e.contains("lfs") && e["lfs"].is_object()) f.lfs_sha256 = e["lfs"].value("oid", "");
      check_repo_path(repo_id, f.path);
      files.push_back(std::move(f));
    }
    url = next_page(r.header("link"));
    if (!url.empty() && origin_of(url) != origin_of(s.endpoint))  // the token stays on the Hub
      fail(repo_id, folder, cat("the file listing's next page is on another host: ", url));
  }
  return files;
}

// What the Hub says of one file at a revision: the HEAD of its resolve URL, following redirects
// that stay on the Hub's host (a renamed repo) but not the one to storage on another host,
// whose response carries the file's metadata (huggingface_hub does the same).
struct FileMeta {
  std::string commit, etag, url;
  int64_t size = -1;
};

FileMeta head_file(const HubSettings& s, const std::string& repo_id, const std::string& path,
                   const std::string& revision) {
  FileMeta m;
  m.url = cat(s.endpoint, "/", repo_id, "/resolve/", url_quote(revision, ""), "/",
              url_quote(path, "/"));
  HttpResponse r;
  for (int hop = 0;; ++hop) {
    r = send_api({.method = "HEAD", .url = m.url, .headers = auth_headers(s)});
    const std::string loc = r.header("location");
    const std::string target = loc.starts_with('/') ? origin_of(m.url) + loc : loc;
    if (r.status / 100 == 3 && origin_of(target) == origin_of(m.url) && hop < 5) {
      m.url = target;
      continue;
    }
    break;
  }
  if (r.status / 100 != 2 && r.status / 100 != 3) fail_response(s, repo_id, path, revision, r);
  m.commit = r.header("x-repo-commit");
  std::string etag = r.header("x-linked-etag");
  if (etag.empty()) etag = r.header("etag");
  if (etag.starts_with("W/")) etag.erase(0, 2);
  while (!etag.empty() && etag.front() == '"') etag.erase(0, 1);
  while (!etag.empty() && etag.back() == '"') etag.pop_back();
  m.etag = etag;
  std::string size = r.header("x-linked-size");
  if (size.empty() && r.status / 100 == 2) size = r.header("content-length");
  if (!size.empty()) {
    char* end = nullptr;
    m.size = std::strtoll(size.c_str(), &end, 10);
    if (*end != '\0' || m.size < 0)
      fail(repo_id, path, cat("the Hub sent a size of \"", size, "\""));
  }
  if (!is_commit_hash(m.commit) || m.etag.empty() ||
      m.etag.find_first_of("/\\") != std::string::npos || m.etag.starts_with('.'))
    fail(repo_id, path,
         cat("the answer from ", s.endpoint,
             " lacks the Hub's X-Repo-Commit or ETag headers: is HF_ENDPOINT a Hugging Face Hub?"));
  return m;
}

// A progress line on stderr: redrawn in place on a terminal; a line per file otherwise.
class ProgressLine {
 public:
  ProgressLine(std::string name, int64_t total, int64_t resumed_from, bool enabled)
      : name_(std::move(name)),
        total_(total),
        resumed_from_(resumed_from),
        enabled_(enabled),
        tty_(::isatty(2)),
        start_(Clock::now()) {}
  void update(int64_t done) {
    if (!enabled_ || !tty_ || Clock::now() - last_ < std::chrono::milliseconds(200)) return;
    last_ = Clock::now();
    const double rate = (done - resumed_from_) / seconds();
    const double eta = rate > 0 && total_ > 0 ? (total_ - done) / rate : 0;
    std::fprintf(stderr, "\r%s: %.1f/%.1f MB, %.1f MB/s, ETA %.0f s   ", name_.c_str(), done / 1e6,
                 total_ / 1e6, rate / 1e6, eta);
    std::fflush(stderr);
  }
  void finish(int64_t done) {
    if (!enabled_) return;
    std::fprintf(stderr, "%s%s: %.1f MB in %.1f s (%.1f MB/s%s)   \n", tty_ ? "\r" : "",
                 name_.c_str(), done / 1e6, seconds(), (done - resumed_from_) / 1e6 / seconds(),
                 resumed_from_ > 0 ? cat(", resumed at ", resumed_from_ / 1e6, " MB").c_str() : "");
  }

 private:
  double seconds() const {
    return std::max(1e-3, std::chrono::duration<double>(Clock::now() - start_).count());
  }
  std::string name_;
  int64_t total_, resumed_from_;
  bool enabled_, tty_;
  Clock::time_point start_, last_{};
};

// An open file descriptor, closed (after fsync) however the scope ends.
struct SyncedFd {
  int fd;
  explicit SyncedFd(int f) : fd(f) {}
  ~SyncedFd() {
    ::fsync(fd);
    ::close(fd);
  }
  SyncedFd(const SyncedFd&) = delete;
  SyncedFd& operator=(const SyncedFd&) = delete;
};

// Fetches a file's bytes into `incomplete`, resuming what is already there; returns when the
// server has sent it all. The caller holds the blob's lock.
void fetch(const HubSettings& s, const std::string& repo_id, const std::string& path,
           const FileMeta& m, const fs::path& incomplete) {
  const int tries = attempts();
  if (!fs::exists(incomplete) && !std::ofstream(incomplete))
    fail(incomplete.string(), "", "cannot create (is the cache folder writable?)");
  ProgressLine bar(cat(repo_id, "/", path), m.size, int64_t(fs::file_size(incomplete)), s.progress);
  for (int attempt = 0;; ++attempt) {
    int64_t have = int64_t(fs::file_size(incomplete));
    if (m.size >= 0 && have > m.size) fs::resize_file(incomplete, have = 0);
    if (m.size >= 0 && have == m.size) break;  // complete (an earlier run's): verify() checks it
    if (m.size > have) {
      const auto space = fs::space(incomplete.parent_path());
      if (space.available < uintmax_t(m.size - have))
        fail(incomplete.string(), "",
             cat("not enough disk space for ", repo_id, "/", path, ": ", (m.size - have) / 1e6,
                 " MB to download, ", space.available / 1e6, " MB free"));
    }
    std::optional<SyncedFd> file;
    if (const int fd = ::open(incomplete.c_str(), O_WRONLY | O_CREAT | O_CLOEXEC, 0644); fd >= 0)
      file.emplace(fd);
    else
      fail(incomplete.string(), "", "cannot open for writing");
    const int fd = file->fd;
    ::lseek(fd, have, SEEK_SET);
    int64_t written = have;
    bool first_chunk = true;
    HttpRequest req{.url = m.url,
                    .headers = auth_headers(s),
                    .follow_redirects = true,
                    .range_from = have > 0 ? have : -1};
    req.sink = [&](long status, std::string_view data) {
      if (first_chunk && status == 200 && have > 0) {  // the server ignored the range
        if (::ftruncate(fd, 0) != 0 || ::lseek(fd, 0, SEEK_SET) != 0)
          fail(incomplete.string(), "", "cannot truncate");
        written = 0;
      }
      first_chunk = false;
      for (size_t off = 0; off < data.size();) {
        const ssize_t n = ::write(fd, data.data() + off, data.size() - off);
        if (n < 0 && errno == EINTR) continue;
        if (n < 0) fail(incomplete.string(), "", "write failed (disk full?)");
        off += size_t(n), written += n;
      }
      bar.update(written);
    };
    try {
      const HttpResponse r = http_send(req);
      file.reset();
      if (r.status == 416) {  // the range is past the end: what we have is wrong, start over
        fs::resize_file(incomplete, 0);
        if (attempt + 1 < tries) continue;
      }
      if (retryable(r.status) && attempt + 1 < tries) {
        wait_before_retry(attempt + 1);
        continue;
      }
      if (r.status != 200 && r.status != 206) fail_response(s, repo_id, path, m.commit, r);
      if (r.status == 206) {  // "bytes <from>-<to>/<size>": it must start where we asked
        const std::string cr = r.header("content-range");
        if (!cr.starts_with(cat("bytes ", have, "-"))) {
          fs::resize_file(incomplete, 0);
          fail(repo_id, path, cat("the server answered a range request with ", cr));
        }
      }
      if (m.size < 0 || int64_t(fs::file_size(incomplete)) >= m.size) break;
      // A complete response that ends short of the size the Hub announced: resume.
      if (attempt + 1 == tries)
        fail(repo_id, path,
             cat("the server sent ", fs::file_size(incomplete), " of ", m.size,
                 " bytes (partial file kept in ", incomplete.string(), ")"));
    } catch (const TransferError& e) {
      file.reset();
      if (attempt + 1 == tries || !e.transient)
        fail(repo_id, path,
             cat("download broke after ", fs::file_size(incomplete), " of ", m.size,
                 " bytes: ", e.what(),
                 "; the same command resumes it (partial file: ", incomplete.string(), ")"));
      wait_before_retry(attempt);
    }
  }
  bar.finish(int64_t(fs::file_size(incomplete)));
}

// Size and digest against what the Hub announced; a file that fails is deleted.
void verify(const std::string& repo_id, const std::string& path, const FileMeta& m,
            const fs::path& file) {
  const int64_t size = int64_t(fs::file_size(file));
  std::string expected, got, kind;
  if (m.size >= 0 && size != m.size) {
    kind = "size", expected = std::to_string(m.size), got = std::to_string(size);
  } else if (m.etag.size() == 64) {  // an LFS file: its ETag is the SHA-256 of its bytes
    kind = "sha256", expected = m.etag, got = sha256_file_hex(file.string());
  } else if (m.etag.size() == 40) {  // a git file: its ETag is its git blob id
    kind = "git blob sha1", expected = m.etag, got = git_blob_sha1_file_hex(file.string());
  }
  if (expected == got) return;
  fs::remove(file);
  fail(repo_id, path,
       cat("downloaded file failed its check (", kind, " ", got, ", the Hub says ", expected,
           "): discarded; run the command again"));
}

// One file at a commit or branch into the cache; returns its snapshot path.
std::string download_one(const HubSettings& s, const RepoCache& cache, const std::string& repo_id,
                         const std::string& path, const std::string& revision) {
  const FileMeta m = head_file(s, repo_id, path, revision);
  const fs::path pointer = cache.pointer(m.commit, path);
  cache.write_ref(revision, m.commit);
  if (fs::exists(pointer)) return pointer.string();
  fs::create_directories(cache.blob(m.etag).parent_path());
  cache.tag_cache_dir();
  const FileLock lock(cache.lock_file(m.etag));
  const fs::path blob = cache.blob(m.etag);
  if (!fs::exists(blob)) {
    const fs::path incomplete = blob.string() + ".incomplete";
    fetch(s, repo_id, path, m, incomplete);
    verify(repo_id, path, m, incomplete);
    fs::rename(incomplete, blob);
  }
  cache.link(m.commit, path, m.etag);
  return pointer.string();
}

// The files of a snapshot folder, as repo paths.
std::vector<std::string> snapshot_files(const fs::path& snap) {
  std::vector<std::string> out;
  std::error_code ec;
  for (auto it = fs::recursive_directory_iterator(snap, ec); !ec && it != fs::end(it); ++it)
    if (fs::is_regular_file(it->path()))
      out.push_back(it->path().lexically_relative(snap).string());
  return out;
}

// A cached snapshot of the revision holding a match for every pattern (a literal path must be
// there itself), or nullopt.
std::optional<std::string> cached_match(const RepoCache& cache, const std::string& revision,
                                        const std::vector<std::string>& include) {
  const auto commit = cache.commit_for(revision);
  if (!commit || !fs::is_directory(cache.snapshot(*commit))) return std::nullopt;
  const auto files = snapshot_files(cache.snapshot(*commit));
  for (const auto& pat : include) {
    bool found = false;
    for (const auto& f : files) found = found || matches_any(f, {pat});
    if (!found) return std::nullopt;
  }
  return cache.snapshot(*commit).string();
}

}  // namespace

bool matches_any(const std::string& path, const std::vector<std::string>& patterns) {
  if (patterns.empty()) return true;
  for (std::string p : patterns) {
    if (p.ends_with('/')) p += '*';
    if (::fnmatch(p.c_str(), path.c_str(), 0) == 0) return true;
  }
  return false;
}

std::vector<RepoFile> list_files(const std::string& repo_id, const std::string& revision,
                                 const std::string& folder) {
  check_repo_id(repo_id);
  return list_files(hub_settings(), repo_id, revision, folder);
}

std::optional<std::string> cached_snapshot(const std::string& repo_id,
                                           const std::string& revision) {
  check_repo_id(repo_id);
  const RepoCache cache(hub_cache_dir(), repo_id);
  const auto commit = cache.commit_for(revision);
  if (!commit || !fs::is_directory(cache.snapshot(*commit))) return std::nullopt;
  return cache.snapshot(*commit).string();
}

std::string download_file(const std::string& repo_id, const std::string& path,
                          const std::string& revision) {
  check_repo_id(repo_id);
  check_repo_path(repo_id, path);
  const HubSettings s = hub_settings();
  const RepoCache cache(s.cache_dir, repo_id);
  if (const auto commit = cache.commit_for(revision); commit) {
    const fs::path pointer = cache.pointer(*commit, path);
    if (fs::exists(pointer) && (s.offline || is_commit_hash(revision))) return pointer.string();
  }
  if (s.offline)
    fail(repo_id, path,
         cat("not in the Hugging Face cache (", s.cache_dir, ", revision ", revision,
             ") and HF_HUB_OFFLINE=1 forbids downloading it"));
  try {
    return download_one(s, cache, repo_id, path, revision);
  } catch (const TransferError& e) {
    // The Hub is unreachable: a cached copy of the revision still serves, as in huggingface_hub.
    if (const auto commit = cache.commit_for(revision); commit)
      if (fs::exists(cache.pointer(*commit, path))) return cache.pointer(*commit, path).string();
    fail_unreachable(s, repo_id, e);
  }
}

std::string snapshot_download(const SnapshotRequest& req) {
  check_repo_id(req.repo_id);
  const HubSettings s = hub_settings();
  const RepoCache cache(s.cache_dir, req.repo_id);
  if (s.offline) {
    if (auto snap = cached_match(cache, req.revision, req.include)) return *snap;
    fail(req.repo_id, req.folder,
         cat("not in the Hugging Face cache (", s.cache_dir, ", revision ", req.revision,
             ") and HF_HUB_OFFLINE=1 forbids downloading it"));
  }
  std::string commit;
  std::vector<RepoFile> files;
  try {
    commit = resolve_revision(s, req.repo_id, req.revision);
    files = list_files(s, req.repo_id, commit, req.folder);
  } catch (const TransferError& e) {
    if (auto snap = cached_match(cache, req.revision, req.include)) {
      std::fprintf(stderr, "%s: the Hub is unreachable (%s); using the cached snapshot %s\n",
                   req.repo_id.c_str(), e.what(), snap->c_str());
      return *snap;
    }
    fail_unreachable(s, req.repo_id, e);
  }
  std::vector<std::string> wanted;
  for (const auto& f : files)
    if (matches_any(f.path, req.include)) wanted.push_back(f.path);
  if (wanted.empty())
    fail(req.repo_id, req.folder,
         cat("no file of revision ", req.revision, " matches the requested patterns"));
  for (const auto& path : wanted)
    if (!fs::exists(cache.pointer(commit, path))) download_one(s, cache, req.repo_id, path, commit);
  cache.write_ref(req.revision, commit);
  return cache.snapshot(commit).string();
}

}  // namespace sae::hub

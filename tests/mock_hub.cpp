#include "mock_hub.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <openssl/evp.h>
#include <sys/socket.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <stdexcept>

namespace sae::test {

namespace fs = std::filesystem;

namespace {

std::string digest_hex(const EVP_MD* md, const std::string& bytes) {
  unsigned char out[EVP_MAX_MD_SIZE];
  unsigned len = 0;
  EVP_Digest(bytes.data(), bytes.size(), out, &len, md, nullptr);
  static const char* hex = "0123456789abcdef";
  std::string s;
  for (unsigned i = 0; i < len; ++i) s += hex[out[i] >> 4], s += hex[out[i] & 15];
  return s;
}

std::string url_decode(const std::string& s) {
  std::string out;
  for (size_t i = 0; i < s.size(); ++i) {
    if (s[i] == '%' && i + 2 < s.size()) {
      out += char(std::stoi(s.substr(i + 1, 2), nullptr, 16));
      i += 2;
    } else {
      out += s[i];
    }
  }
  return out;
}

void send_all(int fd, const std::string& data) {
  for (size_t off = 0; off < data.size();) {
    const ssize_t n = ::send(fd, data.data() + off, data.size() - off, MSG_NOSIGNAL);
    if (n <= 0) return;
    off += size_t(n);
  }
}

struct Response {
  int status = 200;
  std::vector<std::pair<std::string, std::string>> headers{};
  std::string body{};
  int64_t content_length = -1;  // announced length when it differs from body.size()
};

const char* reason(int status) {
  switch (status) {
    case 200:
      return "OK";
    case 206:
      return "Partial Content";
    case 302:
      return "Found";
    case 307:
      return "Temporary Redirect";
    case 401:
      return "Unauthorized";
    case 403:
      return "Forbidden";
    case 404:
      return "Not Found";
    case 416:
      return "Range Not Satisfiable";
    default:
      return "Status";
  }
}

std::string head_of(const Response& r, bool head_request) {
  std::ostringstream os;
  os << "HTTP/1.1 " << r.status << " " << reason(r.status) << "\r\n";
  for (const auto& [k, v] : r.headers) os << k << ": " << v << "\r\n";
  os << "Content-Length: " << (r.content_length >= 0 ? r.content_length : int64_t(r.body.size()))
     << "\r\nConnection: close\r\n\r\n";
  (void)head_request;
  return os.str();
}

Response error(int status, const std::string& code, const std::string& message) {
  Response r{
      status,
      {{"X-Error-Code", code}, {"X-Error-Message", message}, {"Content-Type", "application/json"}}};
  r.body = nlohmann::json{{"error", message}}.dump();
  return r;
}

}  // namespace

std::string sha256_hex(const std::string& bytes) {
  return digest_hex(EVP_sha256(), bytes);
}
std::string git_blob_sha1_hex(const std::string& bytes) {
  return digest_hex(EVP_sha1(),
                    "blob " + std::to_string(bytes.size()) + std::string(1, '\0') + bytes);
}

MockHub::MockHub() {
  listen_fd_ = ::socket(AF_INET, SOCK_STREAM, 0);
  int one = 1;
  ::setsockopt(listen_fd_, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  addr.sin_port = 0;
  if (::bind(listen_fd_, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0 ||
      ::listen(listen_fd_, 64) != 0)
    throw std::runtime_error("mock hub: cannot listen on 127.0.0.1");
  socklen_t len = sizeof addr;
  ::getsockname(listen_fd_, reinterpret_cast<sockaddr*>(&addr), &len);
  port_ = ntohs(addr.sin_port);
  acceptor_ = std::thread([this] { serve(); });
}

MockHub::~MockHub() {
  stop_ = true;
  ::shutdown(listen_fd_, SHUT_RDWR);
  ::close(listen_fd_);
  acceptor_.join();
  for (auto& w : workers_) w.join();
}

std::string MockHub::endpoint() const {
  return "http://127.0.0.1:" + std::to_string(port_);
}

void MockHub::add_folder(MockRepo& repo, const std::string& folder, const std::string& prefix) {
  for (const auto& e : fs::recursive_directory_iterator(folder)) {
    if (!e.is_regular_file()) continue;
    std::ifstream in(e.path(), std::ios::binary);
    std::string bytes((std::istreambuf_iterator<char>(in)), {});
    const std::string path =
        (prefix.empty() ? "" : prefix + "/") + e.path().lexically_relative(folder).string();
    repo.files[path] = bytes;
    if (e.path().extension() == ".safetensors" || e.path().extension() == ".model")
      repo.lfs.insert(path);
  }
}

void MockHub::add_repo(const std::string& repo_id, MockRepo repo) {
  std::lock_guard lock(mu_);
  repos_[repo_id] = std::move(repo);
}
void MockHub::rename(const std::string& old_id, const std::string& new_id) {
  std::lock_guard lock(mu_);
  renamed_[old_id] = new_id;
}
void MockHub::drop_after(const std::string& path, int64_t bytes, int times) {
  std::lock_guard lock(mu_);
  drops_[path] = {bytes, times};
}
void MockHub::corrupt(const std::string& path) {
  std::lock_guard lock(mu_);
  corrupt_.insert(path);
}
void MockHub::slow(int ms_per_kib) {
  std::lock_guard lock(mu_);
  ms_per_kib_ = ms_per_kib;
}

std::vector<MockHub::Request> MockHub::requests() const {
  std::lock_guard lock(mu_);
  return log_;
}

int MockHub::count(const std::string& method, const std::string& target_prefix) const {
  int n = 0;
  for (const auto& r : requests()) n += r.method == method && r.target.starts_with(target_prefix);
  return n;
}

void MockHub::serve() {
  while (!stop_) {
    const int fd = ::accept(listen_fd_, nullptr, nullptr);
    if (fd < 0) {
      if (stop_) return;
      continue;
    }
    std::lock_guard lock(mu_);
    workers_.emplace_back([this, fd] {
      handle(fd);
      ::close(fd);
    });
  }
}

void MockHub::handle(int fd) {
  std::string in;
  char buf[4096];
  while (in.find("\r\n\r\n") == std::string::npos) {
    const ssize_t n = ::recv(fd, buf, sizeof buf, 0);
    if (n <= 0) return;
    in.append(buf, size_t(n));
  }
  std::istringstream lines(in.substr(0, in.find("\r\n\r\n")));
  std::string line, method, target, range, auth;
  std::getline(lines, line);
  std::istringstream(line) >> method >> target;
  while (std::getline(lines, line)) {
    if (!line.empty() && line.back() == '\r') line.pop_back();
    const size_t colon = line.find(':');
    if (colon == std::string::npos) continue;
    std::string name = line.substr(0, colon), value = line.substr(colon + 1);
    while (!value.empty() && value.front() == ' ') value.erase(0, 1);
    for (char& c : name) c = char(std::tolower(static_cast<unsigned char>(c)));
    if (name == "range") range = value;
    if (name == "authorization") auth = value;
  }
  {
    std::lock_guard lock(mu_);
    log_.push_back({method, target, range, auth});
  }
  const bool head = method == "HEAD";
  const std::string query =
      target.find('?') == std::string::npos ? "" : target.substr(target.find('?') + 1);
  const std::string path_part = target.substr(0, target.find('?'));

  // Splits "/a/b/c" into its raw segments.
  std::vector<std::string> seg;
  for (size_t b = 1; b <= path_part.size();) {
    size_t e = path_part.find('/', b);
    if (e == std::string::npos) e = path_part.size();
    seg.push_back(path_part.substr(b, e - b));
    b = e + 1;
  }
  auto join = [&](size_t from) {
    std::string out;
    for (size_t i = from; i < seg.size(); ++i) {
      if (i > from) out += '/';
      out += url_decode(seg[i]);
    }
    return out;
  };

  std::unique_lock lock(mu_);
  // Access to a repo: nullptr after writing the refusal into `r`.
  auto open_repo = [&](const std::string& id, Response& r) -> const MockRepo* {
    auto it = repos_.find(id);
    if (it == repos_.end()) {
      r = error(401, "RepoNotFound", "Repository not found");
      return nullptr;
    }
    if (it->second.gated && auth != "Bearer " + good_token) {
      r = auth.empty() ? error(401, "GatedRepo",
                               "Access to model " + id +
                                   " is restricted. You must have access "
                                   "to it and be authenticated to access it. Please log in.")
                       : error(403, "GatedRepo",
                               "Access to model " + id +
                                   " is restricted and you are not in the "
                                   "authorized list. Visit https://huggingface.co/" +
                                   id + " to ask for access.");
      return nullptr;
    }
    return &it->second;
  };

  Response r;
  if (seg.size() >= 6 && seg[0] == "api" && seg[1] == "models" && seg[4] == "revision") {
    const std::string id = seg[2] + "/" + seg[3], rev = join(5);
    if (const MockRepo* repo = open_repo(id, r)) {
      if (rev != "main" && rev != repo->commit) {
        r = error(404, "RevisionNotFound", "Invalid rev id: " + rev);
      } else {
        nlohmann::json sib = nlohmann::json::array();
        for (const auto& [p, _] : repo->files) sib.push_back({{"rfilename", p}});
        r.body = nlohmann::json{{"id", id}, {"sha", repo->commit}, {"siblings", sib}}.dump();
      }
    }
  } else if (seg.size() >= 6 && seg[0] == "api" && seg[1] == "models" && seg[4] == "tree") {
    const std::string id = seg[2] + "/" + seg[3], rev = url_decode(seg[5]), folder = join(6);
    if (const MockRepo* repo = open_repo(id, r)) {
      nlohmann::json all = nlohmann::json::array();
      for (const auto& [p, bytes] : repo->files) {
        if (!folder.empty() && !p.starts_with(folder + "/")) continue;
        nlohmann::json e = {{"type", "file"},
                            {"oid", git_blob_sha1_hex(bytes)},
                            {"size", bytes.size()},
                            {"path", p}};
        if (repo->lfs.count(p))
          e["lfs"] = {{"oid", sha256_hex(bytes)}, {"size", bytes.size()}, {"pointerSize", 134}};
        all.push_back(e);
      }
      if (rev != "main" && rev != repo->commit) {
        r = error(404, "RevisionNotFound", "Invalid rev id: " + rev);
      } else if (all.empty()) {
        r = error(404, "EntryNotFound", folder + " does not exist on \"" + rev + "\"");
      } else {
        size_t cursor = 0;
        if (auto c = query.find("cursor="); c != std::string::npos)
          cursor = std::stoul(query.substr(c + 7));
        nlohmann::json page = nlohmann::json::array();
        for (size_t i = cursor; i < all.size() && i < cursor + size_t(page_size); ++i)
          page.push_back(all[i]);
        r.body = page.dump();
        if (cursor + size_t(page_size) < all.size())
          r.headers.push_back({"Link", "<" + endpoint() + path_part + "?recursive=true&cursor=" +
                                           std::to_string(cursor + page_size) + ">; rel=\"next\""});
      }
    }
  } else if (seg.size() >= 5 && seg[2] == "resolve") {
    const std::string id = seg[0] + "/" + seg[1], rev = url_decode(seg[3]), path = join(4);
    if (auto ren = renamed_.find(id); ren != renamed_.end()) {
      r.status = 307;
      std::string rest;  // the raw path after /resolve/<rev>/
      for (size_t i = 4; i < seg.size(); ++i) {
        if (i > 4) rest += '/';
        rest += seg[i];
      }
      r.headers.push_back({"Location", "/" + ren->second + "/resolve/" + seg[3] + "/" + rest});
    } else if (const MockRepo* repo = open_repo(id, r)) {
      auto f = repo->files.find(path);
      if (rev != "main" && rev != repo->commit) {
        r = error(404, "RevisionNotFound", "Invalid rev id: " + rev);
      } else if (f == repo->files.end()) {
        r = error(404, "EntryNotFound", "Entry not found");
        r.headers.push_back({"X-Repo-Commit", repo->commit});
      } else if (repo->lfs.count(path)) {
        const std::string sha = sha256_hex(f->second);
        r.status = 302;
        r.headers = {{"X-Repo-Commit", repo->commit},
                     {"X-Linked-Etag", "\"" + sha + "\""},
                     {"X-Linked-Size", std::to_string(f->second.size())},
                     {"ETag", "\"" + git_blob_sha1_hex(sha) + "\""},
                     // Storage on another host name, as on the real Hub (its signed URLs need
                     // no token; clients follow only redirects that stay on the Hub's host).
                     {"Location",
                      "http://localhost:" + std::to_string(port_) + "/storage/" + id + "/" + sha}};
      } else {
        r.headers = {{"X-Repo-Commit", repo->commit},
                     {"ETag", "\"" + git_blob_sha1_hex(f->second) + "\""}};
        r.body = f->second;
      }
    }
  } else if (seg.size() == 4 && seg[0] == "storage") {
    // Storage is signed in reality: no token needed. Finds the file by its digest.
    const std::string id = seg[1] + "/" + seg[2], sha = seg[3];
    const MockRepo* repo = repos_.count(id) ? &repos_[id] : nullptr;
    std::string path, bytes;
    if (repo)
      for (const auto& [p, b] : repo->files)
        if (repo->lfs.count(p) && sha256_hex(b) == sha) path = p, bytes = b;
    if (path.empty()) {
      r = error(404, "EntryNotFound", "no such object");
    } else {
      if (corrupt_.count(path) && !bytes.empty()) bytes[bytes.size() / 2] ^= 0x5a;
      int64_t from = 0;
      if (range.starts_with("bytes=")) from = std::stoll(range.substr(6));
      if (from > int64_t(bytes.size()) || (from == int64_t(bytes.size()) && from > 0)) {
        r = error(416, "RangeNotSatisfiable", "range");
      } else {
        if (from > 0) {
          r.status = 206;
          r.headers.push_back({"Content-Range", "bytes " + std::to_string(from) + "-" +
                                                    std::to_string(bytes.size() - 1) + "/" +
                                                    std::to_string(bytes.size())});
        }
        r.body = bytes.substr(size_t(from));
        r.headers.push_back({"Accept-Ranges", "bytes"});
        auto drop = drops_.find(path);
        if (drop != drops_.end() && drop->second.second > 0 && !head) {
          drop->second.second--;
          const int64_t keep = std::max<int64_t>(0, drop->second.first - from);
          r.content_length = int64_t(r.body.size());
          r.body.resize(size_t(std::min<int64_t>(keep, int64_t(r.body.size()))));
        }
      }
    }
  } else {
    r = error(404, "NotFound", "no route");
  }
  const int ms_per_kib = ms_per_kib_;
  lock.unlock();

  send_all(fd, head_of(r, head));
  if (head) return;
  if (ms_per_kib > 0 && r.status / 100 == 2) {
    for (size_t off = 0; off < r.body.size(); off += 1024) {
      send_all(fd, r.body.substr(off, 1024));
      std::this_thread::sleep_for(std::chrono::milliseconds(ms_per_kib));
    }
  } else {
    send_all(fd, r.body);
  }
  // A dropped connection: fewer bytes than Content-Length, then close (the caller closes fd).
}

}  // namespace sae::test

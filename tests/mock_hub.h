// A local stand-in for the Hugging Face Hub, served on 127.0.0.1 (a free port) by a thread of
// the test: the endpoints and headers huggingface_hub relies on (revision and tree APIs with
// Link pagination, HEAD/GET of resolve URLs with X-Repo-Commit / X-Linked-Etag / X-Linked-Size,
// LFS files redirected to a storage URL that honours Range), and the faults a download meets:
// gated and missing repos, missing files and revisions, a renamed repo (relative redirect), a
// connection dropped mid-file, bytes that do not match their SHA-256.
#pragma once

#include <atomic>
#include <cstdint>
#include <map>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <vector>

namespace sae::test {

struct MockRepo {
  std::string commit{};                        // 40 hex digits
  std::map<std::string, std::string> files{};  // path -> bytes
  std::set<std::string> lfs{};                 // paths stored in LFS (redirected to storage)
  bool gated = false;                          // needs MockHub::good_token
};

class MockHub {
 public:
  MockHub();  // listening when it returns
  ~MockHub();
  MockHub(const MockHub&) = delete;
  MockHub& operator=(const MockHub&) = delete;

  std::string endpoint() const;  // "http://127.0.0.1:<port>"

  // Every file of a folder on disk (recursively), under `prefix` in the repo; *.safetensors in LFS.
  void add_folder(MockRepo& repo, const std::string& folder, const std::string& prefix);
  void add_repo(const std::string& repo_id, MockRepo repo);
  void rename(const std::string& old_id, const std::string& new_id);  // 307 to the new name

  // Faults on an LFS file's storage URL.
  void drop_after(const std::string& path, int64_t bytes, int times);  // close mid-body
  void corrupt(const std::string& path);                               // flip a byte
  void slow(int ms_per_kib);                                           // pace the storage

  struct Request {
    std::string method, target, range, authorization;
  };
  std::vector<Request> requests() const;
  int count(const std::string& method, const std::string& target_prefix) const;

  std::string good_token = "hf_mock_good_token";
  int page_size = 1000;  // tree API entries per page

 private:
  void serve();
  void handle(int fd);

  int listen_fd_ = -1, port_ = 0;
  std::atomic<bool> stop_{false};
  std::thread acceptor_;
  std::vector<std::thread> workers_;
  mutable std::mutex mu_;
  std::map<std::string, MockRepo> repos_;
  std::map<std::string, std::string> renamed_;
  std::map<std::string, std::pair<int64_t, int>> drops_;  // path -> (bytes, times left)
  std::set<std::string> corrupt_;
  int ms_per_kib_ = 0;
  std::vector<Request> log_;
};

std::string sha256_hex(const std::string& bytes);
std::string git_blob_sha1_hex(const std::string& bytes);

}  // namespace sae::test

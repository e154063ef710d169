#include "hub/http.h"

#include <curl/curl.h>

#include <cctype>
#include <memory>
#include <mutex>

namespace sae::hub {

namespace {

struct Transfer {
  const HttpRequest* req;
  HttpResponse* resp;
  CURL* curl;
  int64_t body_bytes = 0;
  bool to_sink = false;
  long status = 0;
  std::exception_ptr sink_error{};
};

size_t on_header(char* data, size_t size, size_t n, void* user) {
  auto* t = static_cast<Transfer*>(user);
  std::string_view line(data, size * n);
  if (line.starts_with("HTTP/")) {  // a new response (after a redirect): forget the last one
    t->resp->headers.clear();
    return size * n;
  }
  const size_t colon = line.find(':');
  if (colon == std::string_view::npos) return size * n;
  std::string name(line.substr(0, colon));
  for (char& c : name) c = char(std::tolower(static_cast<unsigned char>(c)));
  std::string_view value = line.substr(colon + 1);
  while (!value.empty() && std::isspace(static_cast<unsigned char>(value.front())))
    value.remove_prefix(1);
  while (!value.empty() && std::isspace(static_cast<unsigned char>(value.back())))
    value.remove_suffix(1);
  t->resp->headers[name] = std::string(value);
  return size * n;
}

size_t on_body(char* data, size_t size, size_t n, void* user) {
  auto* t = static_cast<Transfer*>(user);
  const size_t bytes = size * n;
  if (t->body_bytes == 0) {  // first bytes of the final response: decide where they go
    curl_easy_getinfo(t->curl, CURLINFO_RESPONSE_CODE, &t->status);
    t->to_sink = t->req->sink && t->status / 100 == 2;
  }
  t->body_bytes += int64_t(bytes);
  if (t->to_sink) {
    try {
      t->req->sink(t->status, std::string_view(data, bytes));
    } catch (...) {
      t->sink_error = std::current_exception();
      return 0;  // aborts the transfer
    }
  } else if (t->resp->body.size() < (1u << 20)) {  // error pages and API answers, not files
    t->resp->body.append(data, bytes);
  }
  return bytes;
}

struct CurlDeleter {
  void operator()(CURL* c) const { curl_easy_cleanup(c); }
};
struct SlistDeleter {
  void operator()(curl_slist* l) const { curl_slist_free_all(l); }
};

}  // namespace

bool http_available() {
  return true;
}

HttpResponse http_send(const HttpRequest& req) {
  static std::once_flag init;
  std::call_once(init, [] { curl_global_init(CURL_GLOBAL_DEFAULT); });

  std::unique_ptr<CURL, CurlDeleter> curl(curl_easy_init());
  if (!curl) throw TransferError("cannot start an HTTP transfer (curl_easy_init)");
  HttpResponse resp;
  Transfer t{&req, &resp, curl.get()};
  std::unique_ptr<curl_slist, SlistDeleter> headers;
  for (const auto& h : req.headers) headers.reset(curl_slist_append(headers.release(), h.c_str()));
  // The size the server reports must be the file's size: no transfer encoding.
  headers.reset(curl_slist_append(headers.release(), "Accept-Encoding: identity"));

  CURL* c = curl.get();
  char errbuf[CURL_ERROR_SIZE] = {};
  curl_easy_setopt(c, CURLOPT_URL, req.url.c_str());
  curl_easy_setopt(c, CURLOPT_HTTPHEADER, headers.get());
  curl_easy_setopt(c, CURLOPT_USERAGENT, "sae.cpp/" SAECPP_VERSION);
  curl_easy_setopt(c, CURLOPT_ERRORBUFFER, errbuf);
  curl_easy_setopt(c, CURLOPT_NOSIGNAL, 1L);
  curl_easy_setopt(c, CURLOPT_CONNECTTIMEOUT, 10L);
  // A stalled transfer (under 1 byte/s for 30 s) fails instead of hanging forever.
  curl_easy_setopt(c, CURLOPT_LOW_SPEED_LIMIT, 1L);
  curl_easy_setopt(c, CURLOPT_LOW_SPEED_TIME, 30L);
  curl_easy_setopt(c, CURLOPT_FOLLOWLOCATION, req.follow_redirects ? 1L : 0L);
  curl_easy_setopt(c, CURLOPT_MAXREDIRS, 10L);
  curl_easy_setopt(c, CURLOPT_HEADERFUNCTION, on_header);
  curl_easy_setopt(c, CURLOPT_HEADERDATA, &t);
  curl_easy_setopt(c, CURLOPT_WRITEFUNCTION, on_body);
  curl_easy_setopt(c, CURLOPT_WRITEDATA, &t);
  if (req.method == "HEAD") curl_easy_setopt(c, CURLOPT_NOBODY, 1L);
  const std::string range = req.range_from >= 0 ? std::to_string(req.range_from) + "-" : "";
  if (req.range_from >= 0) curl_easy_setopt(c, CURLOPT_RANGE, range.c_str());

  const CURLcode rc = curl_easy_perform(c);
  if (t.sink_error) std::rethrow_exception(t.sink_error);
  if (rc != CURLE_OK)
    throw TransferError(cat(req.url, ": ", errbuf[0] ? errbuf : curl_easy_strerror(rc)),
                        rc != CURLE_COULDNT_RESOLVE_HOST && rc != CURLE_COULDNT_RESOLVE_PROXY &&
                            rc != CURLE_UNSUPPORTED_PROTOCOL && rc != CURLE_URL_MALFORMAT);
  curl_easy_getinfo(c, CURLINFO_RESPONSE_CODE, &resp.status);
  char* effective = nullptr;
  curl_easy_getinfo(c, CURLINFO_EFFECTIVE_URL, &effective);
  resp.url = effective ? effective : req.url;
  return resp;
}

}  // namespace sae::hub

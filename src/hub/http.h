// HTTP(S) requests through libcurl, as the Hub client needs them: HEAD without following
// redirects (to read the Hub's X-* headers), GET that follows them into a sink, byte ranges,
// and transfer progress.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <string>
#include <string_view>
#include <vector>

#include "core/error.h"

namespace sae::hub {

struct HttpRequest {
  std::string method = "GET";  // GET or HEAD
  std::string url{};
  std::vector<std::string> headers{};  // "Name: value"
  bool follow_redirects = false;       // curl drops Authorization on a redirect to another host
  int64_t range_from = -1;             // >= 0: ask for bytes range_from.. (Range header)
  // Receives the body of a 2xx response with its status (200, or 206 for a range), else the
  // body is kept in HttpResponse::body.
  std::function<void(long status, std::string_view)> sink{};
};

struct HttpResponse {
  long status = 0;
  std::map<std::string, std::string> headers;  // of the last response, names in lower case
  std::string body;                            // unless a sink took it
  std::string url;                             // after redirects
  std::string header(const std::string& lower_name) const {
    auto it = headers.find(lower_name);
    return it == headers.end() ? std::string() : it->second;
  }
};

// The connection failed or broke before the response was complete (no such host, refused,
// timed out, dropped mid-body). transient is false where trying again cannot help soon (the
// host name does not resolve: no network, a typo).
class TransferError : public Error {
 public:
  explicit TransferError(const std::string& what, bool transient_ = true)
      : Error(what), transient(transient_) {}
  bool transient;
};

// True when this build has an HTTP client (libcurl); without it http_send throws.
bool http_available();

// Sends one request and returns the response, whatever its status. Throws TransferError.
HttpResponse http_send(const HttpRequest& req);

}  // namespace sae::hub

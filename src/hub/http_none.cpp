// The HTTP client of a build without libcurl: every request fails with how to get one.
#include "hub/http.h"

namespace sae::hub {

bool http_available() {
  return false;
}

HttpResponse http_send(const HttpRequest& req) {
  throw TransferError(cat(req.url,
                          ": this build of sae.cpp has no HTTP client (libcurl was not found "
                          "when it was built: apt install libcurl4-openssl-dev, then rebuild)"),
                      /*transient=*/false);
}

}  // namespace sae::hub

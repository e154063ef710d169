#include "core/memory.h"

#include <cstdio>
#include <cstring>

namespace sae {

namespace {
int64_t status_kib(const char* key, const char* file = "/proc/self/status") {
  std::FILE* f = std::fopen(file, "r");
  if (!f) return 0;
  char line[256];
  int64_t kib = 0;
  const size_t n = std::strlen(key);
  while (std::fgets(line, sizeof line, f))
    if (std::strncmp(line, key, n) == 0) {
      long long v = 0;
      if (std::sscanf(line + n, " %lld", &v) == 1) kib = v;
      break;
    }
  std::fclose(f);
  return kib;
}
}  // namespace

int64_t resident_bytes() {
  return status_kib("VmRSS:") * 1024;
}
int64_t peak_resident_bytes() {
  return status_kib("VmHWM:") * 1024;
}
int64_t available_host_bytes() {
  return status_kib("MemAvailable:", "/proc/meminfo") * 1024;
}

std::string fmt_bytes(double bytes) {
  char b[32];
  if (bytes >= double(1 << 30))
    std::snprintf(b, sizeof b, "%.2f GiB", bytes / double(1 << 30));
  else
    std::snprintf(b, sizeof b, "%.1f MiB", bytes / double(1 << 20));
  return b;
}

}  // namespace sae

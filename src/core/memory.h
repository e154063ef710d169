// Resident memory of this process (Linux /proc/self/status), for progress lines and the check
// of a memory plan against what was used; the memory the system has available.
#pragma once

#include <cstdint>
#include <string>

namespace sae {

int64_t resident_bytes();       // VmRSS now (0 where unknown)
int64_t peak_resident_bytes();  // VmHWM: the most so far
// MemAvailable (/proc/meminfo): what the system can give without swapping (0 where unknown).
int64_t available_host_bytes();

// "1.21 GiB" from a gibibyte up, else "12.3 MiB" (plans and progress lines).
std::string fmt_bytes(double bytes);

}  // namespace sae

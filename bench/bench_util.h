// What every benchmark prints first: the command line, the machine and the thread count.
#pragma once

#include <cstdio>
#include <fstream>
#include <string>

#include "core/clock.h"
#include "ops/gemm.h"

namespace sae::bench {

inline std::string cpu_model() {
  std::ifstream in("/proc/cpuinfo");
  std::string line;
  while (std::getline(in, line))
    if (line.rfind("model name", 0) == 0) return line.substr(line.find(':') + 2);
  return "unknown";
}

inline void print_header(int argc, char** argv) {
  std::printf("command:");
  for (int i = 0; i < argc; ++i) std::printf(" %s", argv[i]);
  std::printf("\nmachine: %s, %d threads (OpenMP/BLAS)\n", cpu_model().c_str(), ops::num_threads());
}

}  // namespace sae::bench

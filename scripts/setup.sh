#!/usr/bin/env bash
# Installs the Debian 12 packages sae.cpp builds and tests with. Idempotent, non-interactive.
# Usage: bash scripts/setup.sh   (as root, or with sudo available)
set -euo pipefail

packages=(
  build-essential cmake ninja-build pkg-config git
  libopenblas-dev        # BLAS (sgemm) for the encoder
  libopenblas-openmp-dev # ... built for OpenMP: one thread pool with our kernels (CMakeLists.txt)
  nlohmann-json3-dev     # cfg.json, safetensors headers
  libcli11-dev           # the `sae` command line
  libsentencepiece-dev   # Gemma tokenizer
  libzstd-dev            # .jsonl.zst corpora
  libsleef-dev           # vector tanh/exp for the CPU kernels (Gemma-2 GeGLU, soft-caps)
  libdnnl-dev            # oneDNN: bf16 GEMMs where the CPU has bf16 dot products (ops/gemm_bf16.h)
  ocl-icd-opencl-dev     # ... whose CMake config asks for OpenCL (only recommended by Debian)
  libopenmpi-dev openmpi-bin  # jobs over several ranks (mpirun, srun): dist/
  libcurl4-openssl-dev libssl-dev  # Hugging Face Hub downloads (HTTP, checksums)
  libgtest-dev libgmock-dev  # tests
  libbenchmark-dev       # micro-benchmarks in bench/
  pybind11-dev python3-dev python3-venv  # Python module
  clang-format
  chromium               # the dashboard pages' test (headless, from file://)
)

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done

if ((${#missing[@]})); then
  sudo=""
  [[ $(id -u) -ne 0 ]] && sudo="sudo"
  echo "setup: installing ${missing[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
else
  echo "setup: all packages present"
fi

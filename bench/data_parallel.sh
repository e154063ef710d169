#!/usr/bin/env bash
# Side by side in one run, on the same machine and cores: the release-shape training step as
# one process with all the cores, and data parallel over one rank per core (bench_train under
# mpirun). Issue 12's target: the ranks reach >= 90% of the one process's tokens/s.
# With --parallel latents the ranks split the latents instead of the rows.
#   bash bench/data_parallel.sh [ranks] [extra bench_train args, e.g. --steps 3]
set -euo pipefail
cd "$(dirname "$0")/.."
ranks=${1:-$(nproc)}
shift || true
# As root (CI, containers) Open MPI needs to be told; harmless otherwise.
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
# What the sae CLI sets for itself at start (cli/main.cpp): huge pages for large buffers.
export GLIBC_TUNABLES=glibc.malloc.hugetlb=1
echo "== 1 process x $ranks threads"
OMP_NUM_THREADS=$ranks build/release/bench/bench_train --threads "$ranks" "$@"
mode=data
[[ " $* " == *" --parallel latents "* ]] && mode=latent
echo "== $ranks ranks x 1 thread, $mode parallel"
mpirun -np "$ranks" --oversubscribe -x OMP_NUM_THREADS=1 -x GLIBC_TUNABLES \
  build/release/bench/bench_train --threads 1 "$@"

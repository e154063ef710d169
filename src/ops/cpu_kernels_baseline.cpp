// The kernel set compiled with the build's own flags (x86-64-v3 by default: the AVX2 path).
#define SAECPP_KERNEL_SET baseline
#include "ops/cpu_kernels_impl.inc"

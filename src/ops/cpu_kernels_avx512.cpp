// The AVX-512 kernel set (x86-64-v4: F, BW, DQ, VL with 512-bit vectors), compiled with those
// flags whatever the build's baseline; used only where the CPU reports them.
#define SAECPP_KERNEL_SET avx512
#include "ops/cpu_kernels_impl.inc"

// Dense matrix multiply, row-major f32: C = alpha * op(A) @ op(B) + beta * C.
// The fast path calls BLAS; the reference is a plain triple loop with double accumulation.
#pragma once

#include <cstdint>

namespace sae::ops {

enum class Trans : bool { No = false, Yes = true };

// op(A) is [m, k], op(B) is [k, n], C is [m, n]; lda/ldb/ldc are row strides of the stored
// matrices (as in cblas with CblasRowMajor).
void gemm(Trans ta, Trans tb, int64_t m, int64_t n, int64_t k, float alpha, const float* a,
          int64_t lda, const float* b, int64_t ldb, float beta, float* c, int64_t ldc);

void gemm_reference(Trans ta, Trans tb, int64_t m, int64_t n, int64_t k, float alpha,
                    const float* a, int64_t lda, const float* b, int64_t ldb, float beta, float* c,
                    int64_t ldc);

// Number of threads BLAS and OpenMP use (0 = leave the library default). OpenMP keeps the
// count per thread: a thread the process starts itself calls adopt_num_threads() first.
void set_num_threads(int n);
void adopt_num_threads();
int num_threads();

}  // namespace sae::ops

#include "ops/gemm.h"

#include <cblas.h>
#include <omp.h>

#include <atomic>

#include "core/threads.h"

namespace sae::ops {

namespace {
// Single-threaded sgemm time per multiply-add, roughly, for sizing the threads a GEMM is worth
// (measured 0.022 ns at 64x256x256 on the AVX-512 CI machine; rounded up for AVX2 machines).
constexpr double kNsPerMac = 0.03;
std::atomic<int> g_pool{0};  // the thread count set_num_threads chose; 0 = library default
}  // namespace

void gemm(Trans ta, Trans tb, int64_t m, int64_t n, int64_t k, float alpha, const float* a,
          int64_t lda, const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
  // OpenBLAS threads any GEMM above m*n*k = 262144, far below the size where a second thread
  // pays once another process competes for the cores; give it the threads this one is worth.
  // (Inside a parallel region it runs single-threaded on its own.)
  const int pool = omp_get_max_threads();
  const int want =
      omp_in_parallel() ? pool : threads_for(double(m) * double(n) * double(k), kNsPerMac);
  if (want < pool) openblas_set_num_threads(want);
  cblas_sgemm(CblasRowMajor, ta == Trans::Yes ? CblasTrans : CblasNoTrans,
              tb == Trans::Yes ? CblasTrans : CblasNoTrans, int(m), int(n), int(k), alpha, a,
              int(lda), b, int(ldb), beta, c, int(ldc));
  if (want < pool) openblas_set_num_threads(pool);
}

void gemm_reference(Trans ta, Trans tb, int64_t m, int64_t n, int64_t k, float alpha,
                    const float* a, int64_t lda, const float* b, int64_t ldb, float beta, float* c,
                    int64_t ldc) {
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < n; ++j) {
      double acc = 0;
      for (int64_t p = 0; p < k; ++p) {
        double av = ta == Trans::Yes ? a[p * lda + i] : a[i * lda + p];
        double bv = tb == Trans::Yes ? b[j * ldb + p] : b[p * ldb + j];
        acc += av * bv;
      }
      float prev = beta == 0.0f ? 0.0f : beta * c[i * ldc + j];
      c[i * ldc + j] = float(alpha * acc) + prev;
    }
}

void set_num_threads(int n) {
  if (n <= 0) return;
  g_pool = n;
  openblas_set_num_threads(n);
  omp_set_num_threads(n);
}

void adopt_num_threads() {
  if (const int n = g_pool; n > 0) omp_set_num_threads(n);
}

int num_threads() {
  return omp_get_max_threads();
}

}  // namespace sae::ops

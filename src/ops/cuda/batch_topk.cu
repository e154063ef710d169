#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>
#include <cub/device/device_radix_sort.cuh>
#include <cub/device/device_scan.cuh>

#include <algorithm>

#include "core/error.h"
#include "ops/cuda/batch_topk.h"
#include "ops/cuda/block_reduce.cuh"

namespace sae::cuda {

namespace {

constexpr int kThreads = 256;
// Radix select on the bits of positive floats (their order is the order of the floats): a
// coarse histogram of bits 30..19 over the whole matrix, then a fine one of bits 18..0 over
// the entries in the coarse bin that holds the cut. Non-positive values (and NaN) get key 0.
constexpr int kCoarseBits = 12, kFineBits = 19;
constexpr int kCoarseBins = 1 << kCoarseBits, kFineBins = 1 << kFineBits;

// state[] layout (unsigned ints on the device)
enum : int {
  kBin = 0,
  kKey,
  kAll,
  kMinKey,
  kNeedLo,
  kNeedHi,    // the exact (row-pass) path
  kFallback,  // 1: the exact path runs
  kBound,
  kCount,
  kTaken,
  kSampleBin,
  kSampleNeed,  // the candidate path
  kStateSize
};

__device__ __forceinline__ unsigned key_of(float v) {
  return v > 0.0f ? __float_as_uint(v) : 0u;
}

__device__ __forceinline__ float affine(float v, int64_t c, const float* bias, const float* scale) {
  if (bias) v += bias[c];
  if (scale) v *= scale[c];
  return v;
}

__global__ void k_coarse(const float* x, int64_t rows, int64_t cols, const float* bias,
                         const float* scale, const unsigned* state, unsigned long long* hist) {
  __shared__ unsigned sh[kCoarseBins];
  if (!state[kFallback]) return;
  for (int i = threadIdx.x; i < kCoarseBins; i += blockDim.x) sh[i] = 0;
  __syncthreads();
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const float* xr = x + r * cols;
    for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) {
      const unsigned k = key_of(affine(xr[c], c, bias, scale));
      if (k) atomicAdd(&sh[k >> kFineBits], 1u);
    }
  }
  __syncthreads();
  for (int i = threadIdx.x; i < kCoarseBins; i += blockDim.x)
    if (sh[i]) atomicAdd(&hist[i], (unsigned long long)sh[i]);
}

// One block of 1024 threads: the bin b of `hist` (searched from the top) that holds the
// need-th largest entry; *above = entries in bins above b. Returns -1 in *bin when the
// histogram holds fewer than `need` entries.
__device__ void find_bin(const unsigned long long* hist, int nbins, unsigned long long need,
                         int* bin, unsigned long long* above) {
  using Scan = cub::BlockScan<unsigned long long, 1024>;
  __shared__ typename Scan::TempStorage tmp;
  __shared__ int found;
  const int chunk = (nbins + 1023) / 1024;
  // Thread i owns bins [hi - chunk, hi), hi = nbins - i * chunk: thread 0 holds the top.
  const int hi = nbins - int(threadIdx.x) * chunk, lo = max(hi - chunk, 0);
  unsigned long long s = 0;
  for (int b = lo; b < hi; ++b) s += hist[b];
  unsigned long long before;
  Scan(tmp).ExclusiveSum(s, before);
  if (threadIdx.x == 0) found = 0;
  __syncthreads();
  if (hi > lo && before < need && need <= before + s) {
    unsigned long long cum = before;
    for (int b = hi - 1; b >= lo; --b) {
      if (cum + hist[b] >= need) {
        *bin = b;
        *above = cum;
        found = 1;
        break;
      }
      cum += hist[b];
    }
  }
  __syncthreads();
  if (threadIdx.x == 0 && !found) *bin = -1;
}

__global__ void __launch_bounds__(1024)
    k_find_coarse(const unsigned long long* hist, long long budget, unsigned* state) {
  __shared__ int bin;
  __shared__ unsigned long long above;
  if (!state[kFallback]) return;
  if (budget <= 0) {  // nothing is kept: a key no value reaches
    if (threadIdx.x == 0)
      state[kBin] = 0, state[kKey] = 0xFFFFFFFFu, state[kAll] = 1, state[kNeedLo] = 0,
      state[kNeedHi] = 0, state[kMinKey] = 0xFFFFFFFFu;
    return;
  }
  find_bin(hist, kCoarseBins, (unsigned long long)budget, &bin, &above);
  __syncthreads();
  if (threadIdx.x != 0) return;
  if (bin < 0) {  // fewer positives than the budget: keep them all (key > 0)
    state[kAll] = 1, state[kKey] = 0, state[kNeedLo] = 0, state[kNeedHi] = 0;
    return;
  }
  state[kAll] = 0;
  state[kBin] = unsigned(bin);
  const unsigned long long need = (unsigned long long)budget - above;  // ranks inside the bin
  state[kNeedLo] = unsigned(need & 0xFFFFFFFFu);
  state[kNeedHi] = unsigned(need >> 32);
}

__global__ void k_fine(const float* x, int64_t rows, int64_t cols, const float* bias,
                       const float* scale, const unsigned* state, unsigned long long* hist) {
  if (!state[kFallback] || state[kAll]) return;
  const unsigned bin = state[kBin];
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const float* xr = x + r * cols;
    for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) {
      const unsigned k = key_of(affine(xr[c], c, bias, scale));
      if (k && (k >> kFineBits) == bin) atomicAdd(&hist[k & (kFineBins - 1)], 1ull);
    }
  }
}

// The exact cut key T and how many entries equal to T are kept (need_eq); entries > T are all
// kept. In "all" mode T = 0 (every positive) and need_eq = 0.
__global__ void __launch_bounds__(1024)
    k_find_fine(const unsigned long long* hist, unsigned* state) {
  __shared__ int bin;
  __shared__ unsigned long long above;
  if (!state[kFallback] || state[kAll]) return;
  const unsigned long long need =
      (unsigned long long)state[kNeedLo] | ((unsigned long long)state[kNeedHi] << 32);
  find_bin(hist, kFineBins, need, &bin, &above);
  __syncthreads();
  if (threadIdx.x != 0) return;
  state[kKey] = (state[kBin] << kFineBits) | unsigned(bin);
  const unsigned long long need_eq = need - above;
  state[kNeedLo] = unsigned(need_eq & 0xFFFFFFFFu);
  state[kNeedHi] = unsigned(need_eq >> 32);
}

__global__ void k_row_counts(const float* x, int64_t cols, const float* bias, const float* scale,
                             const unsigned* state, int64_t* row_gt, int64_t* row_eq) {
  using Reduce = cub::BlockReduce<int, kThreads>;
  __shared__ typename Reduce::TempStorage tmp;
  if (!state[kFallback]) return;
  const unsigned T = state[kKey];
  const float* xr = x + int64_t(blockIdx.x) * cols;
  int gt = 0, eq = 0;
  for (int64_t c = threadIdx.x; c < cols; c += kThreads) {
    const unsigned k = key_of(affine(xr[c], c, bias, scale));
    gt += k > T;
    eq += k == T && T != 0;  // key 0 marks non-positive values: never kept as a tie
  }
  const int sgt = Reduce(tmp).Sum(gt);
  __syncthreads();
  const int seq = Reduce(tmp).Sum(eq);
  if (threadIdx.x == 0) row_gt[blockIdx.x] = sgt, row_eq[blockIdx.x] = seq;
}

__global__ void k_row_allowed(int64_t rows, const unsigned* state, const int64_t* row_gt,
                              const int64_t* row_eq, const int64_t* eq_before, int64_t* allowed,
                              int64_t* row_n) {
  const int64_t r = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (r > rows) return;
  if (!state[kFallback]) {  // keep the scans that follow harmless
    row_n[r] = 0;
    if (r < rows) allowed[r] = 0;
    return;
  }
  if (r == rows) {
    row_n[r] = 0;  // the exclusive scan's last entry becomes the total
    return;
  }
  const long long need_eq =
      (long long)((unsigned long long)state[kNeedLo] | ((unsigned long long)state[kNeedHi] << 32));
  const long long a = min(max(need_eq - (long long)eq_before[r], 0ll), (long long)row_eq[r]);
  allowed[r] = a;
  row_n[r] = row_gt[r] + a;
}

struct MinOp {
  __device__ unsigned operator()(unsigned a, unsigned b) const { return a < b ? a : b; }
};

__global__ void k_write(const float* x, int64_t cols, const float* bias, const float* scale,
                        unsigned* state, const int64_t* offsets, const int64_t* allowed,
                        const int64_t* row_eq, int32_t* out_cols, float* out_vals) {
  using Scan = cub::BlockScan<int, kThreads>;
  using Reduce = cub::BlockReduce<unsigned, kThreads>;
  __shared__ typename Scan::TempStorage tmp;
  __shared__ typename Reduce::TempStorage rtmp;
  if (!state[kFallback]) return;
  const unsigned T = state[kKey];
  const int64_t r = blockIdx.x;
  const float* xr = x + r * cols;
  const bool ties = row_eq[r] > 0;
  const int64_t n_allowed = allowed[r];
  int64_t pos = offsets[r], eq_seen = 0;
  unsigned min_key = 0xFFFFFFFFu;
  for (int64_t c0 = 0; c0 < cols; c0 += kThreads) {
    const int64_t c = c0 + threadIdx.x;
    float v = 0.0f;
    unsigned k = 0;
    if (c < cols) v = affine(xr[c], c, bias, scale), k = key_of(v);
    int sel = k > T;
    if (ties) {  // the row's first `allowed` entries equal to T, in column order
      const int eq = c < cols && k == T && T != 0;
      int eq_rank, eq_total;
      Scan(tmp).ExclusiveSum(eq, eq_rank, eq_total);
      __syncthreads();
      if (eq && eq_seen + eq_rank < n_allowed) sel = 1;
      eq_seen += eq_total;
    }
    if (__syncthreads_count(sel) == 0) continue;  // most tiles keep nothing
    int rank, total;
    Scan(tmp).ExclusiveSum(sel, rank, total);
    __syncthreads();
    if (sel) {
      out_cols[pos + rank] = int32_t(c);
      out_vals[pos + rank] = v;
      min_key = min(min_key, k);
    }
    pos += total;
  }
  const unsigned m = Reduce(rtmp).Reduce(min_key, MinOp{});
  if (threadIdx.x == 0 && m != 0xFFFFFFFFu) atomicMin(&state[kMinKey], m);
}

__global__ void k_copy_offsets(const unsigned* state, const int64_t* from, int64_t n, int64_t* to) {
  if (!state[kFallback]) return;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x)
    to[i] = from[i];
}

// ---- the candidate path: a bound for the cut from a sample of rows, one pass that collects the
// entries at or above it (few: about 1.25 budget), then the exact selection among those by two
// small radix sorts. The exact row-pass path above runs instead when the sample misled (fewer
// candidates than the budget) or the candidates overflow their buffer.

// Coarse (bits 30..19) or, with `coarse_bin` >= 0, fine (bits 18..7 inside that coarse bin)
// histogram of the sampled rows r = 0, stride, 2 stride, ...
__global__ void k_sample_hist(const float* x, int64_t rows, int64_t cols, int64_t stride,
                              const float* bias, const float* scale, const unsigned* state,
                              int fine, unsigned long long* hist) {
  __shared__ unsigned sh[kCoarseBins];
  if (fine && state[kSampleBin] == 0xFFFFFFFFu) return;
  const unsigned coarse_bin = fine ? state[kSampleBin] : 0;
  for (int i = threadIdx.x; i < kCoarseBins; i += blockDim.x) sh[i] = 0;
  __syncthreads();
  // blockIdx.y splits each sampled row into gridDim.y column ranges (more blocks, less
  // contention on each block's shared histogram).
  const int64_t span = (cols + gridDim.y - 1) / gridDim.y;
  const int64_t c_lo = blockIdx.y * span, c_hi = min(cols, c_lo + span);
  for (int64_t r = int64_t(blockIdx.x) * stride; r < rows; r += int64_t(gridDim.x) * stride) {
    const float* xr = x + r * cols;
    for (int64_t c = c_lo + threadIdx.x; c < c_hi; c += blockDim.x) {
      const unsigned k = key_of(affine(xr[c], c, bias, scale));
      if (!k) continue;
      if (!fine)
        atomicAdd(&sh[k >> kFineBits], 1u);
      else if ((k >> kFineBits) == coarse_bin)
        atomicAdd(&sh[(k >> 7) & (kCoarseBins - 1)], 1u);
    }
  }
  __syncthreads();
  for (int i = threadIdx.x; i < kCoarseBins; i += blockDim.x)
    if (sh[i]) atomicAdd(&hist[i], (unsigned long long)sh[i]);
}

// The rank in the sample that bounds the cut from below, with a margin (as the CPU's
// ops::batch_topk): expected * 1.25 + 4 sqrt(expected) + 16.
__global__ void __launch_bounds__(1024)
    k_sample_bound(const unsigned long long* hist, int fine, long long budget, long long rows,
                   long long sampled, unsigned* state) {
  __shared__ int bin;
  __shared__ unsigned long long above;
  if (!fine) {
    if (threadIdx.x == 0) {
      state[kMinKey] = 0xFFFFFFFFu;
      state[kCount] = 0;
      state[kFallback] = 0;
      state[kSampleBin] = 0xFFFFFFFFu;
      state[kBound] = budget <= 0 ? 0xFFFFFFFFu : 1u;  // 1: every positive value
    }
    if (budget <= 0) return;
    const double expected = double(budget) * double(sampled) / double(rows);
    const unsigned long long rank =
        (unsigned long long)ceil(expected * 1.25 + 4.0 * sqrt(expected) + 16.0);
    find_bin(hist, kCoarseBins, rank, &bin, &above);
    __syncthreads();
    if (threadIdx.x == 0 && bin >= 0) {
      state[kSampleBin] = unsigned(bin);
      state[kSampleNeed] = unsigned(rank - above);
      state[kBound] = unsigned(bin) << kFineBits;  // refined by the fine pass
    }
    return;
  }
  if (state[kSampleBin] == 0xFFFFFFFFu) return;
  find_bin(hist, kCoarseBins, state[kSampleNeed], &bin, &above);
  __syncthreads();
  if (threadIdx.x == 0 && bin >= 0)
    state[kBound] = (state[kSampleBin] << kFineBits) | (unsigned(bin) << 7);
}

// The pass over the matrix: affine update (written back when asked), candidates appended as
// (composite key, value). The composite key sorts by value descending, then flat index. A row's
// candidates gather in shared memory first, so the global counter sees one atomic per row.
constexpr int kRowCandidates = 512;

__global__ void k_collect(float* x, int64_t rows, int64_t cols, const float* bias,
                          const float* scale, bool write_back, unsigned* state, int idx_bits,
                          unsigned long long cap, unsigned long long* keys, float* vals) {
  __shared__ unsigned long long sh_keys[kRowCandidates];
  __shared__ float sh_vals[kRowCandidates];
  __shared__ unsigned sh_n, sh_base;
  const unsigned bound = state[kBound];
  auto emit = [&](int64_t r, int64_t c, float v) {
    const unsigned k = key_of(v);
    if (!k || k < bound) return;
    const unsigned long long key =
        ((unsigned long long)(0x7FFFFFFFu - k) << idx_bits) | (unsigned long long)(r * cols + c);
    const unsigned i = atomicAdd(&sh_n, 1u);
    if (i < kRowCandidates) {
      sh_keys[i] = key, sh_vals[i] = v;
    } else {  // a crowded row: straight to the global list
      const unsigned pos = atomicAdd(&state[kCount], 1u);
      if (pos < cap) keys[pos] = key, vals[pos] = v;
    }
  };
  const bool vec = cols % 4 == 0;
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    if (threadIdx.x == 0) sh_n = 0;
    __syncthreads();
    float* xr = x + r * cols;
    if (vec) {
      float4* x4 = reinterpret_cast<float4*>(xr);
      for (int64_t q = threadIdx.x; q < cols / 4; q += blockDim.x) {
        float4 v = x4[q];
        const int64_t c = q * 4;
        v.x = affine(v.x, c, bias, scale), v.y = affine(v.y, c + 1, bias, scale);
        v.z = affine(v.z, c + 2, bias, scale), v.w = affine(v.w, c + 3, bias, scale);
        if (write_back) x4[q] = v;
        emit(r, c, v.x), emit(r, c + 1, v.y), emit(r, c + 2, v.z), emit(r, c + 3, v.w);
      }
    } else {
      for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) {
        const float v = affine(xr[c], c, bias, scale);
        if (write_back) xr[c] = v;
        emit(r, c, v);
      }
    }
    __syncthreads();
    const unsigned n = min(sh_n, unsigned(kRowCandidates));
    if (threadIdx.x == 0 && n > 0) sh_base = atomicAdd(&state[kCount], n);
    __syncthreads();
    for (unsigned i = threadIdx.x; i < n; i += blockDim.x) {
      const unsigned long long pos = (unsigned long long)sh_base + i;
      if (pos < cap) keys[pos] = sh_keys[i], vals[pos] = sh_vals[i];
    }
    __syncthreads();
  }
}

// Decides the path and pads the unused candidate slots so they sort last.
__global__ void k_check(unsigned* state, long long budget, unsigned long long cap,
                        unsigned long long* keys) {
  const unsigned long long n = state[kCount];
  const bool ok = n <= cap && (n >= (unsigned long long)max(budget, 0ll) || state[kBound] <= 1u);
  if (blockIdx.x == 0 && threadIdx.x == 0) {
    state[kFallback] = ok ? 0 : 1;
    state[kTaken] = ok ? unsigned(min(n, (unsigned long long)max(budget, 0ll))) : 0;
  }
  for (unsigned long long i = n + blockIdx.x * blockDim.x + threadIdx.x; i < cap;
       i += (unsigned long long)gridDim.x * blockDim.x)
    keys[i] = ~0ull;
}

// The first `taken` candidates by value are the selection: their flat indices (padding after).
__global__ void k_take(unsigned* state, long long budget, int idx_bits,
                       const unsigned long long* keys, const float* vals,
                       unsigned long long* sel_idx, float* sel_vals) {
  const long long m = state[kTaken];
  const unsigned long long mask = (1ull << idx_bits) - 1;
  for (long long i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < budget;
       i += int64_t(gridDim.x) * blockDim.x) {
    if (i < m) {
      sel_idx[i] = keys[i] & mask;
      sel_vals[i] = vals[i];
      if (i == m - 1) state[kMinKey] = key_of(vals[i]);
    } else {
      sel_idx[i] = ~0ull;
    }
  }
}

// CSR from the selection sorted by flat index (= row-major order, columns ascending).
__global__ void k_fast_out(const unsigned* state, int64_t rows, int64_t cols,
                           const unsigned long long* idx, const float* vals, int64_t* offsets,
                           int32_t* out_cols, float* out_vals) {
  if (state[kFallback]) return;
  const int64_t m = state[kTaken];
  const int64_t tid = blockIdx.x * int64_t(blockDim.x) + threadIdx.x,
                stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = tid; i < m; i += stride) {
    out_cols[i] = int32_t(idx[i] % (unsigned long long)cols);
    out_vals[i] = vals[i];
  }
  for (int64_t r = tid; r <= rows; r += stride) {
    offsets[r] = cuda::lower_bound(idx, m, (unsigned long long)(r * cols));
  }
}

__global__ void k_min_selected(const unsigned* state, float* min_selected) {
  const unsigned m = state[kMinKey];
  *min_selected = m == 0xFFFFFFFFu ? 0.0f : __uint_as_float(m);
}

int grid_for_rows(int64_t rows) {
  int dev = 0, sms = 0;
  cudaGetDevice(&dev);
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  return int(std::max<int64_t>(1, std::min<int64_t>(rows, int64_t(sms) * 4)));
}

}  // namespace

void batch_topk(const Context& ctx, float* x, int64_t rows, int64_t cols, int64_t budget,
                const float* bias, const float* scale, bool write_back, DeviceRowSparse& out,
                BatchTopkScratch& ws, float* min_selected) {
  const cudaStream_t s = ctx.stream();
  const int64_t cap_out = std::max<int64_t>(budget, 1);
  out.offsets.resize(size_t(rows + 1), "BatchTopK offsets");
  out.cols.resize(size_t(cap_out), "BatchTopK columns");
  out.values.resize(size_t(cap_out), "BatchTopK values");
  ws.hist.resize(3 * kCoarseBins + kFineBins, "BatchTopK histograms");
  for (auto* b : {&ws.row_gt, &ws.row_eq, &ws.eq_before, &ws.row_allowed})
    b->resize(size_t(std::max<int64_t>(rows, 1)), "BatchTopK row counts");
  ws.row_n.resize(size_t(rows + 1), "BatchTopK row counts");
  ws.fb_offsets.resize(size_t(rows + 1), "BatchTopK row offsets");
  ws.state.resize(kStateSize, "BatchTopK state");
  int idx_bits = 1;
  while (idx_bits < 64 && (int64_t(1) << idx_bits) < rows * cols) ++idx_bits;
  SAE_CHECK(idx_bits <= 33, "BatchTopK over more than 2^33 entries");
  // Candidates: about 1.25 budget expected; room for twice that plus slack.
  const unsigned long long cap = (unsigned long long)(2 * cap_out + 65536);
  ws.cand_keys.resize(cap, "BatchTopK candidates");
  ws.cand_keys_sorted.resize(cap, "BatchTopK candidates");
  ws.cand_vals.resize(cap, "BatchTopK candidates");
  ws.cand_vals_sorted.resize(cap, "BatchTopK candidates");
  ws.sel_idx.resize(size_t(cap_out), "BatchTopK selection");
  ws.sel_idx_sorted.resize(size_t(cap_out), "BatchTopK selection");
  ws.sel_vals.resize(size_t(cap_out), "BatchTopK selection");
  ws.sel_vals_sorted.resize(size_t(cap_out), "BatchTopK selection");
  unsigned long long* sample_coarse = ws.hist.data();
  unsigned long long* sample_fine = sample_coarse + kCoarseBins;
  unsigned long long* coarse = sample_fine + kCoarseBins;
  unsigned long long* fine = coarse + kCoarseBins;
  unsigned* st = ws.state.data();
  SAE_CUDA(cudaMemsetAsync(ws.hist.data(), 0, ws.hist.bytes(), s));
  const int grid = grid_for_rows(rows);

  // ---- candidate path
  // 64 sampled rows: at the release shape 2M values, a bound within a few percent of the cut.
  const int64_t stride = std::max<int64_t>(1, rows / 64);
  const int64_t sampled = rows > 0 ? (rows + stride - 1) / stride : 0;
  const int sgrid = int(std::max<int64_t>(1, std::min<int64_t>(sampled, grid)));
  for (int fine_pass = 0; fine_pass < 2; ++fine_pass) {
    if (rows > 0) {
      const unsigned col_blocks = unsigned(std::clamp<int64_t>(cols / 2048, 1, 16));
      k_sample_hist<<<dim3(unsigned(sgrid), col_blocks), kThreads, 0, s>>>(
          x, rows, cols, stride, bias, scale, st, fine_pass,
          fine_pass ? sample_fine : sample_coarse);
      SAE_CUDA_LAUNCHED();
    }
    k_sample_bound<<<1, 1024, 0, s>>>(fine_pass ? sample_fine : sample_coarse, fine_pass,
                                      (long long)budget, (long long)std::max<int64_t>(rows, 1),
                                      (long long)sampled, st);
    SAE_CUDA_LAUNCHED();
  }
  if (rows > 0) {
    k_collect<<<grid, kThreads, 0, s>>>(x, rows, cols, bias, scale, write_back, st, idx_bits, cap,
                                        ws.cand_keys.data(), ws.cand_vals.data());
    SAE_CUDA_LAUNCHED();
  }
  k_check<<<int((cap + 255) / 256 < 1024 ? (cap + 255) / 256 : 1024), 256, 0, s>>>(
      st, (long long)budget, cap, ws.cand_keys.data());
  SAE_CUDA_LAUNCHED();
  size_t t_sort1 = 0, t_sort2 = 0;
  SAE_CUDA(cub::DeviceRadixSort::SortPairs(
      nullptr, t_sort1, ws.cand_keys.data(), ws.cand_keys_sorted.data(), ws.cand_vals.data(),
      ws.cand_vals_sorted.data(), (int64_t)cap, 0, idx_bits + 31, s));
  SAE_CUDA(cub::DeviceRadixSort::SortPairs(nullptr, t_sort2, ws.sel_idx.data(),
                                           ws.sel_idx_sorted.data(), ws.sel_vals.data(),
                                           ws.sel_vals_sorted.data(), cap_out, 0, idx_bits, s));
  size_t t_scan1 = 0, t_scan2 = 0;
  SAE_CUDA(cub::DeviceScan::ExclusiveSum(nullptr, t_scan1, ws.row_eq.data(), ws.eq_before.data(),
                                         std::max<int64_t>(rows, 1), s));
  SAE_CUDA(cub::DeviceScan::ExclusiveSum(nullptr, t_scan2, ws.row_n.data(), ws.fb_offsets.data(),
                                         rows + 1, s));
  ws.cub_temp.resize(std::max({t_sort1, t_sort2, t_scan1, t_scan2}), "BatchTopK scratch");
  size_t temp = ws.cub_temp.size();
  SAE_CUDA(cub::DeviceRadixSort::SortPairs(
      ws.cub_temp.data(), temp, ws.cand_keys.data(), ws.cand_keys_sorted.data(),
      ws.cand_vals.data(), ws.cand_vals_sorted.data(), (int64_t)cap, 0, idx_bits + 31, s));
  k_take<<<int(std::min<int64_t>((cap_out + 255) / 256, 1024)), 256, 0, s>>>(
      st, (long long)cap_out, idx_bits, ws.cand_keys_sorted.data(), ws.cand_vals_sorted.data(),
      ws.sel_idx.data(), ws.sel_vals.data());
  SAE_CUDA_LAUNCHED();
  temp = ws.cub_temp.size();
  SAE_CUDA(cub::DeviceRadixSort::SortPairs(ws.cub_temp.data(), temp, ws.sel_idx.data(),
                                           ws.sel_idx_sorted.data(), ws.sel_vals.data(),
                                           ws.sel_vals_sorted.data(), cap_out, 0, idx_bits, s));
  k_fast_out<<<int(std::min<int64_t>((std::max(cap_out, rows + 1) + 255) / 256, 1024)), 256, 0,
               s>>>(st, rows, cols, ws.sel_idx_sorted.data(), ws.sel_vals_sorted.data(),
                    out.offsets.data(), out.cols.data(), out.values.data());
  SAE_CUDA_LAUNCHED();

  // ---- exact row-pass path (only when k_check chose it; every kernel checks the flag).
  // x already holds the affine values when they were written back.
  const float* b2 = write_back ? nullptr : bias;
  const float* s2 = write_back ? nullptr : scale;
  if (rows > 0) {
    k_coarse<<<grid, kThreads, 0, s>>>(x, rows, cols, b2, s2, st, coarse);
    SAE_CUDA_LAUNCHED();
  }
  k_find_coarse<<<1, 1024, 0, s>>>(coarse, (long long)budget, st);
  SAE_CUDA_LAUNCHED();
  if (rows > 0) {
    k_fine<<<grid, kThreads, 0, s>>>(x, rows, cols, b2, s2, st, fine);
    SAE_CUDA_LAUNCHED();
  }
  k_find_fine<<<1, 1024, 0, s>>>(fine, st);
  SAE_CUDA_LAUNCHED();
  if (rows > 0) {
    k_row_counts<<<unsigned(rows), kThreads, 0, s>>>(x, cols, b2, s2, st, ws.row_gt.data(),
                                                     ws.row_eq.data());
    SAE_CUDA_LAUNCHED();
  }
  temp = ws.cub_temp.size();
  if (rows > 0)
    SAE_CUDA(cub::DeviceScan::ExclusiveSum(ws.cub_temp.data(), temp, ws.row_eq.data(),
                                           ws.eq_before.data(), rows, s));
  k_row_allowed<<<unsigned((rows + 1 + 255) / 256), 256, 0, s>>>(
      rows, st, ws.row_gt.data(), ws.row_eq.data(), ws.eq_before.data(), ws.row_allowed.data(),
      ws.row_n.data());
  SAE_CUDA_LAUNCHED();
  temp = ws.cub_temp.size();
  SAE_CUDA(cub::DeviceScan::ExclusiveSum(ws.cub_temp.data(), temp, ws.row_n.data(),
                                         ws.fb_offsets.data(), rows + 1, s));
  k_copy_offsets<<<int(std::min<int64_t>((rows + 1 + 255) / 256, 1024)), 256, 0, s>>>(
      st, ws.fb_offsets.data(), rows + 1, out.offsets.data());
  SAE_CUDA_LAUNCHED();
  if (rows > 0) {
    k_write<<<unsigned(rows), kThreads, 0, s>>>(x, cols, b2, s2, st, ws.fb_offsets.data(),
                                                ws.row_allowed.data(), ws.row_eq.data(),
                                                out.cols.data(), out.values.data());
    SAE_CUDA_LAUNCHED();
  }
  k_min_selected<<<1, 1, 0, s>>>(st, min_selected);
  SAE_CUDA_LAUNCHED();
}

// ---- per-row top-k ----------------------------------------------------------------------------

namespace {

// Order-preserving map of any float to unsigned.
__device__ __forceinline__ unsigned ordered(float v) {
  const unsigned u = __float_as_uint(v);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// One block per row: four 8-bit radix passes find the k-th largest key T and how many
// entries equal to T to keep; then the row's kept entries are written in column order.
__global__ void k_topk_rows(const float* x, int64_t cols, int64_t k, int32_t* indices,
                            float* values) {
  using Scan = cub::BlockScan<int, kThreads>;
  __shared__ typename Scan::TempStorage tmp;
  __shared__ unsigned hist[256];
  __shared__ unsigned prefix_sh;
  __shared__ long long need_sh;
  const int64_t r = blockIdx.x;
  const float* xr = x + r * cols;
  unsigned prefix = 0, mask = 0;
  long long need = k;  // rank still to find among the entries matching the prefix
  for (int shift = 24; shift >= 0; shift -= 8) {
    for (int i = threadIdx.x; i < 256; i += kThreads) hist[i] = 0;
    __syncthreads();
    for (int64_t c = threadIdx.x; c < cols; c += kThreads) {
      const unsigned u = ordered(xr[c]);
      if ((u & mask) == prefix) atomicAdd(&hist[(u >> shift) & 255u], 1u);
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      long long cum = 0;
      int d = 255;
      for (; d > 0; --d) {
        if (cum + hist[d] >= need) break;
        cum += hist[d];
      }
      prefix_sh = prefix | (unsigned(d) << shift);
      need_sh = need - cum;
    }
    __syncthreads();
    prefix = prefix_sh;
    need = need_sh;
    mask |= 255u << shift;
    __syncthreads();
  }
  const unsigned T = prefix;  // the k-th largest key; `need` entries equal to it are kept
  int64_t pos = r * k, eq_seen = 0;
  for (int64_t c0 = 0; c0 < cols; c0 += kThreads) {
    const int64_t c = c0 + threadIdx.x;
    unsigned u = 0;
    float v = 0.0f;
    if (c < cols) v = xr[c], u = ordered(v);
    const int eq = c < cols && u == T;
    int eq_rank, eq_total;
    Scan(tmp).ExclusiveSum(eq, eq_rank, eq_total);
    __syncthreads();
    const int sel = (c < cols && u > T) || (eq && eq_seen + eq_rank < need);
    eq_seen += eq_total;
    int rank, total;
    Scan(tmp).ExclusiveSum(sel, rank, total);
    __syncthreads();
    if (sel) indices[pos + rank] = int32_t(c), values[pos + rank] = v;
    pos += total;
  }
}

}  // namespace

void topk_rows(const Context& ctx, const float* x, int64_t rows, int64_t cols, int64_t k,
               int32_t* indices, float* values) {
  SAE_CHECK(k <= cols && k >= 0, "k ", k, " > cols ", cols);
  if (rows == 0 || k == 0) return;
  k_topk_rows<<<unsigned(rows), kThreads, 0, ctx.stream()>>>(x, cols, k, indices, values);
  SAE_CUDA_LAUNCHED();
}

}  // namespace sae::cuda

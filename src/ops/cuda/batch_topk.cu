#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>
#include <cub/device/device_scan.cuh>

#include "core/error.h"
#include "ops/cuda/batch_topk.h"

namespace sae::cuda {

namespace {

constexpr int kThreads = 256;
// Radix select on the bits of positive floats (their order is the order of the floats): a
// coarse histogram of bits 30..19 over the whole matrix, then a fine one of bits 18..0 over
// the entries in the coarse bin that holds the cut. Non-positive values (and NaN) get key 0.
constexpr int kCoarseBits = 12, kFineBits = 19;
constexpr int kCoarseBins = 1 << kCoarseBits, kFineBins = 1 << kFineBits;

// state[] layout (unsigned ints on the device)
enum : int { kBin = 0, kKey, kAll, kMinKey, kNeedLo, kNeedHi, kStateSize };

__device__ __forceinline__ unsigned key_of(float v) {
  return v > 0.0f ? __float_as_uint(v) : 0u;
}

__device__ __forceinline__ float affine(float v, int64_t c, const float* bias, const float* scale) {
  if (bias) v += bias[c];
  if (scale) v *= scale[c];
  return v;
}

__global__ void k_coarse(float* x, int64_t rows, int64_t cols, const float* bias,
                         const float* scale, bool write_back, unsigned long long* hist) {
  __shared__ unsigned sh[kCoarseBins];
  for (int i = threadIdx.x; i < kCoarseBins; i += blockDim.x) sh[i] = 0;
  __syncthreads();
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    float* xr = x + r * cols;
    for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) {
      const float v = affine(xr[c], c, bias, scale);
      if (write_back) xr[c] = v;
      const unsigned k = key_of(v);
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

__global__ void __launch_bounds__(1024) k_find_coarse(const unsigned long long* hist, long long budget, unsigned* state) {
  __shared__ int bin;
  __shared__ unsigned long long above;
  if (budget <= 0) {  // nothing is kept: a key no value reaches
    if (threadIdx.x == 0)
      state[kBin] = 0, state[kKey] = 0xFFFFFFFFu, state[kAll] = 1, state[kNeedLo] = 0,
      state[kNeedHi] = 0, state[kMinKey] = 0xFFFFFFFFu;
    return;
  }
  find_bin(hist, kCoarseBins, (unsigned long long)budget, &bin, &above);
  __syncthreads();
  if (threadIdx.x != 0) return;
  state[kMinKey] = 0xFFFFFFFFu;
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
  if (state[kAll]) return;
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
__global__ void __launch_bounds__(1024) k_find_fine(const unsigned long long* hist, unsigned* state) {
  __shared__ int bin;
  __shared__ unsigned long long above;
  if (state[kAll]) return;
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
  out.offsets.resize(size_t(rows + 1), "BatchTopK offsets");
  out.cols.resize(size_t(std::max<int64_t>(budget, 1)), "BatchTopK columns");
  out.values.resize(size_t(std::max<int64_t>(budget, 1)), "BatchTopK values");
  ws.hist.resize(kCoarseBins + kFineBins, "BatchTopK histograms");
  for (auto* b : {&ws.row_gt, &ws.row_eq, &ws.eq_before, &ws.row_allowed})
    b->resize(size_t(rows), "BatchTopK row counts");
  ws.row_n.resize(size_t(rows + 1), "BatchTopK row counts");
  ws.state.resize(kStateSize, "BatchTopK state");
  unsigned long long* coarse = ws.hist.data();
  unsigned long long* fine = coarse + kCoarseBins;
  SAE_CUDA(cudaMemsetAsync(coarse, 0, ws.hist.bytes(), s));
  const int grid = grid_for_rows(rows);
  if (rows > 0) {
    k_coarse<<<grid, kThreads, 0, s>>>(x, rows, cols, bias, scale, write_back, coarse);
    SAE_CUDA_LAUNCHED();
  }
  k_find_coarse<<<1, 1024, 0, s>>>(coarse, (long long)budget, ws.state.data());
  SAE_CUDA_LAUNCHED();
  // After a write-back, x already holds the affine values.
  const float* b2 = write_back ? nullptr : bias;
  const float* s2 = write_back ? nullptr : scale;
  if (rows > 0) {
    k_fine<<<grid, kThreads, 0, s>>>(x, rows, cols, b2, s2, ws.state.data(), fine);
    SAE_CUDA_LAUNCHED();
  }
  k_find_fine<<<1, 1024, 0, s>>>(fine, ws.state.data());
  SAE_CUDA_LAUNCHED();
  if (rows > 0) {
    k_row_counts<<<unsigned(rows), kThreads, 0, s>>>(x, cols, b2, s2, ws.state.data(),
                                                      ws.row_gt.data(), ws.row_eq.data());
    SAE_CUDA_LAUNCHED();
  }
  size_t temp = 0;
  SAE_CUDA(cub::DeviceScan::ExclusiveSum(nullptr, temp, ws.row_eq.data(), ws.eq_before.data(),
                                         rows, s));
  size_t temp2 = 0;
  SAE_CUDA(cub::DeviceScan::ExclusiveSum(nullptr, temp2, ws.row_n.data(), out.offsets.data(),
                                         rows + 1, s));
  ws.cub_temp.resize(std::max(temp, temp2), "BatchTopK scan scratch");
  temp = ws.cub_temp.size();
  if (rows > 0)
    SAE_CUDA(cub::DeviceScan::ExclusiveSum(ws.cub_temp.data(), temp, ws.row_eq.data(),
                                           ws.eq_before.data(), rows, s));
  k_row_allowed<<<unsigned((rows + 1 + 255) / 256), 256, 0, s>>>(
      rows, ws.state.data(), ws.row_gt.data(), ws.row_eq.data(), ws.eq_before.data(),
      ws.row_allowed.data(), ws.row_n.data());
  SAE_CUDA_LAUNCHED();
  temp = ws.cub_temp.size();
  SAE_CUDA(cub::DeviceScan::ExclusiveSum(ws.cub_temp.data(), temp, ws.row_n.data(),
                                         out.offsets.data(), rows + 1, s));
  if (rows > 0) {
    k_write<<<unsigned(rows), kThreads, 0, s>>>(x, cols, b2, s2, ws.state.data(),
                                                 out.offsets.data(), ws.row_allowed.data(),
                                                 ws.row_eq.data(), out.cols.data(),
                                                 out.values.data());
    SAE_CUDA_LAUNCHED();
  }
  k_min_selected<<<1, 1, 0, s>>>(ws.state.data(), min_selected);
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

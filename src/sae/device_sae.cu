// DeviceSae (device_sae.h): per batch, sae_in (run-time normalisation, b_dec) -> encoder GEMM
// (cuBLAS) -> selection (ReLU / JumpReLU threshold: a count pass, a scan and an ordered
// write per row; TopK: per-row radix select) -> CSR codes -> optional decode (one block per
// token gathering W_dec rows), mirroring sae.cpp step by step.
#include <cub/block/block_scan.cuh>
#include <cub/device/device_scan.cuh>

#include <algorithm>
#include <cmath>

#include "core/device.h"
#include "core/error.h"
#include "core/finite.h"
#include "ops/cuda/batch_topk.h"
#include "ops/cuda/block_reduce.cuh"
#include "ops/cuda/gemm.h"
#include "ops/cuda/runtime.h"
#include "sae/device_sae.h"

namespace sae {

using cuda::block_sum;
using cuda::DeviceBuffer;

namespace {

constexpr int kThreads = 256;

// mode 0: none, 1: constant_norm_rescale, 2: layer_norm (as Sae::sae_input).
__global__ void k_sae_input(const float* x, int64_t d, int mode, const float* b_dec, int apply,
                            float* sae_in, float* out_scale, float* out_shift, int* non_finite) {
  __shared__ double sh[32];
  const int64_t t = blockIdx.x;
  const float* xr = x + t * d;
  for (int64_t j = threadIdx.x; j < d; j += blockDim.x)
    if (!isfinite(xr[j])) *non_finite = 1;  // the host names the row and column
  float* s = sae_in + t * d;
  float mul = 1.0f, add = 0.0f, coeff = 1.0f;
  double mean = 0, denom_d = 1;
  if (mode == 1) {
    double ss = 0;
    for (int64_t j = threadIdx.x; j < d; j += blockDim.x) ss += double(xr[j]) * xr[j];
    ss = block_sum(ss, sh);
    coeff = float(sqrt(double(d)) / sqrt(ss));
    mul = 1.0f / coeff;
  } else if (mode == 2) {
    double m = 0;
    for (int64_t j = threadIdx.x; j < d; j += blockDim.x) m += xr[j];
    mean = block_sum(m, sh) / double(d);
    double var = 0;
    for (int64_t j = threadIdx.x; j < d; j += blockDim.x) var += (xr[j] - mean) * (xr[j] - mean);
    var = block_sum(var, sh);
    const double std_unbiased = sqrt(var / double(d - 1));
    denom_d = std_unbiased + 1e-5;
    mul = float(std_unbiased);
    add = float(mean);
  }
  const float denom = float(denom_d);
  for (int64_t j = threadIdx.x; j < d; j += blockDim.x) {
    float v = xr[j];
    if (mode == 1)
      v = xr[j] * coeff;
    else if (mode == 2)
      v = float(xr[j] - mean) / denom;
    if (apply) v -= b_dec[j];
    s[j] = v;
  }
  if (threadIdx.x == 0) out_scale[t] = mul, out_shift[t] = add;
}

__device__ __forceinline__ bool active(float v, const float* thr, int64_t c) {
  return v > 0.0f && (!thr || v > thr[c]);
}

__global__ void k_count(const float* pre, int64_t D, const float* b_enc, const float* thr,
                        int64_t* row_n) {
  using Scan = cub::BlockScan<int, kThreads>;
  __shared__ typename Scan::TempStorage tmp;
  const int64_t t = blockIdx.x;
  int n = 0;
  for (int64_t c = threadIdx.x; c < D; c += kThreads)
    n += active(pre[t * D + c] + b_enc[c], thr, c);
  int total;
  Scan(tmp).ExclusiveSum(n, n, total);
  if (threadIdx.x == 0) row_n[t] = total;
}

__global__ void k_write_active(const float* pre, int64_t D, const float* b_enc, const float* thr,
                               const int64_t* offsets, int32_t* idx, float* val) {
  using Scan = cub::BlockScan<int, kThreads>;
  __shared__ typename Scan::TempStorage tmp;
  const int64_t t = blockIdx.x;
  int64_t pos = offsets[t];
  for (int64_t c0 = 0; c0 < D; c0 += kThreads) {
    const int64_t c = c0 + threadIdx.x;
    float v = 0;
    int sel = 0;
    if (c < D) v = pre[t * D + c] + b_enc[c], sel = active(v, thr, c);
    if (__syncthreads_count(sel) == 0) continue;
    int rank, total;
    Scan(tmp).ExclusiveSum(sel, rank, total);
    __syncthreads();
    if (sel) idx[pos + rank] = int32_t(c), val[pos + rank] = v;
    pos += total;
  }
}

__global__ void k_bias_scale(float* pre, int64_t n, int64_t D, const float* b_enc,
                             const float* norms) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n * D;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t c = i % D;
    float v = pre[i] + b_enc[c];
    if (norms) v *= norms[c];
    pre[i] = v;
  }
}

// TopK: the positive values among each row's k (already in column order).
__global__ void k_topk_count(const float* top_v, int64_t n, int64_t k, int64_t* row_n) {
  const int64_t t = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (t >= n) return;
  int64_t c = 0;
  for (int64_t j = 0; j < k; ++j) c += top_v[t * k + j] > 0.0f;
  row_n[t] = c;
}

__global__ void k_topk_write(const int32_t* top_i, const float* top_v, int64_t n, int64_t k,
                             const int64_t* offsets, int32_t* idx, float* val) {
  const int64_t t = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (t >= n) return;
  int64_t pos = offsets[t];
  for (int64_t j = 0; j < k; ++j)
    if (top_v[t * k + j] > 0.0f) idx[pos] = top_i[t * k + j], val[pos] = top_v[t * k + j], ++pos;
}

// One block per token: x_hat = (b_dec + sum value * W_dec[i] [/ norm_i]) * scale + shift.
__global__ void k_decode(const int64_t* offsets, const int32_t* idx, const float* val,
                         const float* norms, const float* W_dec, const float* b_dec, int64_t d,
                         const float* out_scale, const float* out_shift, int renorm, float* x_hat) {
  const int64_t t = blockIdx.x;
  for (int64_t c = threadIdx.x; c < d; c += blockDim.x) {
    float r = b_dec[c];
    for (int64_t e = offsets[t]; e < offsets[t + 1]; ++e) {
      const float v = norms ? val[e] / norms[idx[e]] : val[e];
      r += v * W_dec[int64_t(idx[e]) * d + c];
    }
    x_hat[t * d + c] = renorm ? r * out_scale[t] + out_shift[t] : r;
  }
}

// One block per token: each Matryoshka level's squared error as train::evaluate computes it,
// ||x - (b_dec + sum over the token's entries with index < widths[i] of value * W_dec[index])||^2
// (the entries in their order; no normalisation, no decoder-norm scaling), for every level i.
__global__ void k_level_errors(const float* x, const int64_t* offsets, const int32_t* idx,
                               const float* val, const float* W_dec, const float* b_dec, int64_t d,
                               const int64_t* widths, int n_levels, double* out) {
  __shared__ double sh[32];
  const int64_t t = blockIdx.x, e0 = offsets[t], e1 = offsets[t + 1];
  for (int i = 0; i < n_levels; ++i) {
    double ss = 0;
    for (int64_t c = threadIdx.x; c < d; c += blockDim.x) {
      float r = b_dec[c];
      for (int64_t e = e0; e < e1; ++e)
        if (idx[e] < widths[i]) r += val[e] * W_dec[int64_t(idx[e]) * d + c];
      const float diff = x[t * d + c] - r;
      ss += double(diff) * diff;
    }
    ss = block_sum(ss, sh);
    if (threadIdx.x == 0) out[t * n_levels + i] = ss;
  }
}

__global__ void k_norms(const float* W, int64_t d, float* norms) {
  __shared__ double sh[32];
  const int64_t i = blockIdx.x;
  double s = 0;
  for (int64_t c = threadIdx.x; c < d; c += blockDim.x) s += double(W[i * d + c]) * W[i * d + c];
  s = block_sum(s, sh);
  if (threadIdx.x == 0) norms[i] = fmaxf(float(sqrt(s)), 1e-8f);
}

}  // namespace

struct DeviceSae::Impl {
  SaeConfig cfg;
  cuda::Precision prec;
  cuda::Context ctx;
  int64_t d, D, chunk;
  DeviceBuffer<float> W_enc, W_dec, b_enc, b_dec, thr, norms;
  DeviceBuffer<uint16_t> W_enc_bf16, in_bf16;
  DeviceBuffer<float> x[2], sae_in, pre, scale, shift, top_v, vals, x_hat;
  // The next chunk's host-to-device copy runs on its own stream while this one computes.
  cudaStream_t copy_stream = nullptr;
  cudaEvent_t copied[2] = {}, consumed[2] = {};
  DeviceBuffer<int32_t> top_i, idx;
  DeviceBuffer<int64_t> row_n, offsets, level_widths;
  DeviceBuffer<double> level_errors;
  DeviceBuffer<int> non_finite;
  DeviceBuffer<uint8_t> cub_temp;

  // Weights from host or device addresses (w: Sae's layouts; the copies infer their kind).
  Impl(const SaeConfig& c, const DeviceSaeWeights& w, const std::string& precision,
       int64_t chunk_tokens)
      : cfg(c), prec(cuda::parse_precision(precision, "encode")), d(c.d_in), D(c.d_sae) {
    chunk = chunk_tokens > 0 ? chunk_tokens : default_chunk_tokens(D);
    const cudaStream_t st = ctx.stream();
    auto copy_in = [&](DeviceBuffer<float>& dst, const float* src, int64_t n, const char* what) {
      dst.resize(size_t(n), what);
      SAE_CUDA(cudaMemcpyAsync(dst.data(), src, size_t(n) * 4, cudaMemcpyDefault, st));
    };
    copy_in(W_enc, w.W_enc, d * D, "W_enc");
    copy_in(W_dec, w.W_dec, D * d, "W_dec");
    copy_in(b_enc, w.b_enc, D, "b_enc");
    copy_in(b_dec, w.b_dec, d, "b_dec");
    if (cfg.architecture == Architecture::JumpReLU) copy_in(thr, w.threshold, D, "threshold");
    if (cfg.architecture == Architecture::TopK && cfg.rescale_acts_by_decoder_norm) {
      norms.resize(size_t(D), "decoder norms");
      k_norms<<<unsigned(D), kThreads, 0, st>>>(W_dec.data(), d, norms.data());
      SAE_CUDA_LAUNCHED();
    }
    if (prec == cuda::Precision::Bf16) {
      W_enc_bf16.resize(size_t(d * D), "bf16 W_enc");
      cuda::to_bf16(ctx, W_enc.data(), W_enc_bf16.data(), d * D);
    }
    x[0].resize(size_t(chunk * d), "batch");
    x[1].resize(size_t(chunk * d), "batch");
    SAE_CUDA(cudaStreamCreateWithFlags(&copy_stream, cudaStreamNonBlocking));
    for (int i = 0; i < 2; ++i) {
      SAE_CUDA(cudaEventCreateWithFlags(&copied[i], cudaEventDisableTiming));
      SAE_CUDA(cudaEventCreateWithFlags(&consumed[i], cudaEventDisableTiming));
    }
    sae_in.resize(size_t(chunk * d), "sae_in");
    if (prec == cuda::Precision::Bf16) in_bf16.resize(size_t(chunk * d), "bf16 sae_in");
    pre.resize(size_t(chunk * D), "pre-activations");
    scale.resize(size_t(chunk), "scale");
    shift.resize(size_t(chunk), "shift");
    row_n.resize(size_t(chunk + 1), "row counts");
    offsets.resize(size_t(chunk + 1), "offsets");
    non_finite.resize(1, "flag");
    size_t temp = 0;
    SAE_CUDA(
        cub::DeviceScan::ExclusiveSum(nullptr, temp, row_n.data(), offsets.data(), chunk + 1, st));
    cub_temp.resize(temp, "scan scratch");
    ctx.sync();
  }

  ~Impl() {
    if (copy_stream) cudaStreamSynchronize(copy_stream), cudaStreamDestroy(copy_stream);
    for (int i = 0; i < 2; ++i) {
      if (copied[i]) cudaEventDestroy(copied[i]);
      if (consumed[i]) cudaEventDestroy(consumed[i]);
    }
  }

  // Copies n tokens of host x into slot b once the chunk that used it has been read.
  void stage(const float* xh, int64_t n, int b) {
    SAE_CUDA(cudaStreamWaitEvent(copy_stream, consumed[b], 0));
    SAE_CUDA(
        cudaMemcpyAsync(x[b].data(), xh, size_t(n * d) * 4, cudaMemcpyHostToDevice, copy_stream));
    SAE_CUDA(cudaEventRecord(copied[b], copy_stream));
  }

  // Encodes the n <= chunk tokens staged in slot b (host copy xh, for error messages); appends
  // to codes (and x_hat when asked; and adds each level's squared error to level_sq_error when
  // level_widths holds the levels).
  void run(const float* xh, int b, int64_t n, SparseCodes& codes, std::vector<float>* xhat_out,
           std::vector<double>* level_sq_error) {
    const cudaStream_t st = ctx.stream();
    SAE_CUDA(cudaStreamWaitEvent(st, copied[b], 0));
    const float* xd = x[b].data();
    const int mode = cfg.normalize_activations == InputNorm::ConstantNormRescale ? 1
                     : cfg.normalize_activations == InputNorm::LayerNorm         ? 2
                                                                                 : 0;
    SAE_CUDA(cudaMemsetAsync(non_finite.data(), 0, sizeof(int), st));
    k_sae_input<<<unsigned(n), kThreads, 0, st>>>(xd, d, mode, b_dec.data(),
                                                  cfg.apply_b_dec_to_input, sae_in.data(),
                                                  scale.data(), shift.data(), non_finite.data());
    SAE_CUDA_LAUNCHED();
    const int n_levels = level_sq_error ? int(level_widths.size()) : 0;
    if (n_levels == 0) SAE_CUDA(cudaEventRecord(consumed[b], st));  // else the levels read it
    if (prec == cuda::Precision::Bf16) {
      cuda::to_bf16(ctx, sae_in.data(), in_bf16.data(), n * d);
      cuda::gemm(ctx, ops::Trans::No, ops::Trans::No, n, D, d, 1.0f, {in_bf16.data(), true, d},
                 {W_enc_bf16.data(), true, D}, 0.0f, pre.data(), D, prec);
    } else {
      cuda::gemm(ctx, ops::Trans::No, ops::Trans::No, n, D, d, 1.0f, {sae_in.data(), false, d},
                 {W_enc.data(), false, D}, 0.0f, pre.data(), D, prec);
    }
    const bool topk = cfg.architecture == Architecture::TopK;
    const int64_t k = topk ? cfg.k : 0;
    if (topk) {
      k_bias_scale<<<4096, kThreads, 0, st>>>(pre.data(), n, D, b_enc.data(),
                                              norms.size() ? norms.data() : nullptr);
      SAE_CUDA_LAUNCHED();
      top_i.resize(size_t(chunk * k), "top-k");
      top_v.resize(size_t(chunk * k), "top-k");
      cuda::topk_rows(ctx, pre.data(), n, D, k, top_i.data(), top_v.data());
      k_topk_count<<<unsigned((n + 255) / 256), 256, 0, st>>>(top_v.data(), n, k, row_n.data());
    } else {
      k_count<<<unsigned(n), kThreads, 0, st>>>(pre.data(), D, b_enc.data(),
                                                thr.size() ? thr.data() : nullptr, row_n.data());
    }
    SAE_CUDA_LAUNCHED();
    SAE_CUDA(cudaMemsetAsync(row_n.data() + n, 0, sizeof(int64_t), st));
    size_t temp = cub_temp.size();
    SAE_CUDA(cub::DeviceScan::ExclusiveSum(cub_temp.data(), temp, row_n.data(), offsets.data(),
                                           n + 1, st));
    std::vector<int64_t> off = cuda::download(offsets.data(), size_t(n + 1), st);
    if (cuda::download(non_finite.data(), 1, st)[0])  // the CPU check says where, and throws
      check_finite(std::span<const float>(xh, size_t(n * d)), n, d, "activations");
    const int64_t nnz = off.back();
    idx.resize(size_t(std::max<int64_t>(nnz, 1)), "codes");
    vals.resize(size_t(std::max<int64_t>(nnz, 1)), "codes");
    if (topk) {
      k_topk_write<<<unsigned((n + 255) / 256), 256, 0, st>>>(
          top_i.data(), top_v.data(), n, k, offsets.data(), idx.data(), vals.data());
    } else {
      k_write_active<<<unsigned(n), kThreads, 0, st>>>(pre.data(), D, b_enc.data(),
                                                       thr.size() ? thr.data() : nullptr,
                                                       offsets.data(), idx.data(), vals.data());
    }
    SAE_CUDA_LAUNCHED();
    const bool renorm = cfg.normalize_activations == InputNorm::ConstantNormRescale ||
                        cfg.normalize_activations == InputNorm::LayerNorm;
    if (xhat_out) {
      x_hat.resize(size_t(chunk * d), "reconstruction");
      k_decode<<<unsigned(n), kThreads, 0, st>>>(
          offsets.data(), idx.data(), vals.data(), norms.size() ? norms.data() : nullptr,
          W_dec.data(), b_dec.data(), d, scale.data(), shift.data(), renorm, x_hat.data());
      SAE_CUDA_LAUNCHED();
    }
    std::vector<double> errors;
    if (n_levels > 0) {
      level_errors.resize(size_t(chunk * n_levels), "level errors");
      k_level_errors<<<unsigned(n), kThreads, 0, st>>>(
          xd, offsets.data(), idx.data(), vals.data(), W_dec.data(), b_dec.data(), d,
          level_widths.data(), n_levels, level_errors.data());
      SAE_CUDA_LAUNCHED();
      SAE_CUDA(cudaEventRecord(consumed[b], st));
      errors.resize(size_t(n * n_levels));
      SAE_CUDA(cudaMemcpyAsync(errors.data(), level_errors.data(), errors.size() * 8,
                               cudaMemcpyDeviceToHost, st));
    }
    const size_t base = codes.indices.size();
    codes.indices.resize(base + size_t(nnz));
    codes.values.resize(base + size_t(nnz));
    SAE_CUDA(cudaMemcpyAsync(codes.indices.data() + base, idx.data(), size_t(nnz) * 4,
                             cudaMemcpyDeviceToHost, st));
    SAE_CUDA(cudaMemcpyAsync(codes.values.data() + base, vals.data(), size_t(nnz) * 4,
                             cudaMemcpyDeviceToHost, st));
    if (renorm) {
      const size_t b2 = codes.out_scale.size();
      codes.out_scale.resize(b2 + size_t(n));
      codes.out_shift.resize(b2 + size_t(n));
      SAE_CUDA(cudaMemcpyAsync(codes.out_scale.data() + b2, scale.data(), size_t(n) * 4,
                               cudaMemcpyDeviceToHost, st));
      SAE_CUDA(cudaMemcpyAsync(codes.out_shift.data() + b2, shift.data(), size_t(n) * 4,
                               cudaMemcpyDeviceToHost, st));
    }
    if (xhat_out) {
      const size_t b3 = xhat_out->size();
      xhat_out->resize(b3 + size_t(n * d));
      SAE_CUDA(cudaMemcpyAsync(xhat_out->data() + b3, x_hat.data(), size_t(n * d) * 4,
                               cudaMemcpyDeviceToHost, st));
    }
    const int64_t start = codes.offsets.back();
    for (int64_t t = 1; t <= n; ++t) codes.offsets.push_back(start + off[size_t(t)]);
    ctx.sync();
    for (int64_t t = 0; t < n; ++t)  // token by token: the host's order
      for (int i = 0; i < n_levels; ++i)
        (*level_sq_error)[size_t(i)] += errors[size_t(t * n_levels + i)];
  }

  SparseCodes encode(std::span<const float> xs, int64_t n, std::vector<float>* x_hat_out,
                     std::vector<double>* level_sq_error = nullptr) {
    if (int64_t(xs.size()) != n * d)
      fail("encode", "x", cat("has ", xs.size(), " values, expected ", n, " x d_in ", d));
    SparseCodes codes;
    codes.n_tokens = n;
    codes.d_sae = D;
    codes.offsets.push_back(0);
    if (x_hat_out) x_hat_out->clear();
    const int64_t n_chunks = (n + chunk - 1) / chunk;
    if (n_chunks > 0) stage(xs.data(), std::min(chunk, n), 0);
    for (int64_t i = 0; i < n_chunks; ++i) {
      const int64_t t0 = i * chunk, t1 = t0 + chunk;
      if (t1 < n) stage(xs.data() + t1 * d, std::min(chunk, n - t1), int((i + 1) % 2));
      run(xs.data() + t0 * d, int(i % 2), std::min(chunk, n - t0), codes, x_hat_out,
          level_sq_error);
    }
    return codes;
  }
};

DeviceSae::DeviceSae(const Sae& sae, const std::string& precision, int64_t chunk_tokens) {
  require_device(Device::Cuda);
  const bool jump = sae.cfg.architecture == Architecture::JumpReLU;
  impl_ = std::make_unique<Impl>(
      sae.cfg,
      DeviceSaeWeights{sae.W_enc.data(), sae.W_dec.data(), sae.b_enc.data(), sae.b_dec.data(),
                       jump ? sae.threshold.data() : nullptr},
      precision, chunk_tokens);
}
DeviceSae::DeviceSae(const SaeConfig& cfg, const DeviceSaeWeights& weights,
                     const std::string& precision, int64_t chunk_tokens) {
  require_device(Device::Cuda);
  impl_ = std::make_unique<Impl>(cfg, weights, precision, chunk_tokens);
}
DeviceSae::~DeviceSae() = default;
const SaeConfig& DeviceSae::cfg() const {
  return impl_->cfg;
}
SparseCodes DeviceSae::encode(std::span<const float> x, int64_t n) {
  return impl_->encode(x, n, nullptr);
}
SparseCodes DeviceSae::encode_decode(std::span<const float> x, int64_t n,
                                     std::vector<float>& x_hat) {
  return impl_->encode(x, n, &x_hat);
}
SparseCodes DeviceSae::encode_decode(std::span<const float> x, int64_t n, std::vector<float>& x_hat,
                                     std::span<const int64_t> widths,
                                     std::vector<double>& level_sq_error) {
  Impl& m = *impl_;
  for (int64_t w : widths)
    if (w < 1 || w > m.D)
      fail("encode_decode", "widths", cat("level width ", w, " outside [1, d_sae ", m.D, "]"));
  cuda::upload(m.level_widths, widths, m.ctx.stream(), "level widths");
  level_sq_error.assign(widths.size(), 0.0);
  return m.encode(x, n, &x_hat, &level_sq_error);
}

}  // namespace sae

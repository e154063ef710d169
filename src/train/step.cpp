#include "train/step.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>
#include <utility>

#include "core/clock.h"
#include "core/error.h"
#include "core/threads.h"
#include "ops/cpu_kernels.h"
#include "ops/gemm.h"
#include "ops/gemm_bf16.h"
#include "ops/select.h"
#include "train/data_parallel.h"
#include "train/global_batch_topk.h"

namespace sae::train {

// ---- Grads ----------------------------------------------------------------------------------

void Grads::resize(int64_t d_in, int64_t d_sae) {
  W_encT.assign(size_t(d_sae * d_in), 0.0f);
  W_dec.assign(size_t(d_sae * d_in), 0.0f);
  b_enc.assign(size_t(d_sae), 0.0f);
  b_dec.assign(size_t(d_in), 0.0f);
  row_touched.assign(size_t(d_sae), 0);
  touched.clear();
}

void Grads::clear() {
  const size_t d_in = b_dec.size();
#pragma omp parallel for schedule(static) \
    num_threads(threads_for(double(touched.size()) * double(d_in), 0.1))
  for (size_t i = 0; i < touched.size(); ++i) {
    const size_t j = size_t(touched[i]);
    std::memset(&W_encT[j * d_in], 0, d_in * sizeof(float));
    std::memset(&W_dec[j * d_in], 0, d_in * sizeof(float));
    row_touched[j] = 0;
  }
  touched.clear();
  std::fill(b_enc.begin(), b_enc.end(), 0.0f);
  std::fill(b_dec.begin(), b_dec.end(), 0.0f);
}

double Grads::squared_norm() const {
  const size_t d_in = b_dec.size();
  double s = 0;
#pragma omp parallel for schedule(static) reduction(+ : s) \
    num_threads(threads_for(double(touched.size()) * double(d_in), 0.5))
  for (size_t i = 0; i < touched.size(); ++i) {
    const size_t j = size_t(touched[i]);
    for (size_t c = 0; c < d_in; ++c)
      s += double(W_encT[j * d_in + c]) * W_encT[j * d_in + c] +
           double(W_dec[j * d_in + c]) * W_dec[j * d_in + c];
  }
  for (float v : b_enc) s += double(v) * v;
  for (float v : b_dec) s += double(v) * v;
  return s;
}

// ---- the step -------------------------------------------------------------------------------

namespace {

// This thread's share [begin, end) of d columns in a parallel region, in whole 64-byte lines.
std::pair<int64_t, int64_t> columns_of_thread(int64_t d) {
  const int64_t p = omp_get_thread_num(), n = omp_get_num_threads();
  const auto edge = [&](int64_t q) { return q == n ? d : d * q / n / 16 * 16; };
  return {edge(p), edge(p + 1)};
}

}  // namespace

StepResult forward_backward(const TrainingSae& sae, const float* x, int64_t B,
                            const std::vector<uint8_t>& dead, Grads& g, StepWorkspace& ws,
                            const BatchShard& shard, const LatentShard& latents) {
  const TrainSpec& sp = sae.spec;
  const bool lp = latents.split();  // latent parallel: D is this rank's latents
  if (lp && shard.split()) fail("a step cannot split both the batch and the latents over ranks");
  const int64_t lat0 = latents.begin();  // the whole SAE's number of this rank's latent 0
  const int64_t d = sp.d_in, D = sp.d_sae, L = sp.n_levels();
  // Every mean is over the whole batch (B_all rows), of which this rank holds B.
  const int64_t B_all = shard.split() ? shard.global_batch : B;
  const bool rescale = sp.rescale_acts_by_decoder_norm;
  const ops::CpuKernels& k = ops::cpu_kernels();
  StepResult res;
  res.level_loss.assign(size_t(L), 0.0);
  res.fired.assign(size_t(D), 0);

  // sae_in = x - b_dec; hidden_pre = (sae_in @ W_enc + b_enc) [* ||W_dec||]
  ws.sae_in.resize(size_t(B * d));
  ws.hidden_pre.resize(size_t(B * D));
#pragma omp parallel for schedule(static) num_threads(threads_for(double(B) * double(d), 0.3))
  for (int64_t t = 0; t < B; ++t)
    for (int64_t c = 0; c < d; ++c)
      ws.sae_in[size_t(t * d + c)] =
          x[t * d + c] - (sp.apply_b_dec_to_input ? sae.b_dec[size_t(c)] : 0.0f);
  double t0 = now_seconds();
  if (ws.bf16_encoder_gemm) {
    // W_encT changed in the last update: rounded again (its time counts as the GEMM's).
    ws.W_encT_bf16.resize(sae.W_encT.size());
    ops::round_to_bf16(sae.W_encT.data(), ws.W_encT_bf16.data(), int64_t(sae.W_encT.size()));
    ops::gemm_bf16_weights(B, D, d, ws.sae_in.data(), ws.W_encT_bf16.data(), ws.hidden_pre.data(),
                           D, ws.gemm_scratch);
  } else {
    ops::gemm(ops::Trans::No, ops::Trans::Yes, B, D, d, 1.0f, ws.sae_in.data(), d,
              sae.W_encT.data(), d, 0.0f, ws.hidden_pre.data(), D);
  }
  double t1 = now_seconds();
  ws.times.encoder_gemm += t1 - t0;
  std::vector<float> norms, inv_norms;
  if (rescale) {
    norms = sae.decoder_norms();
    inv_norms.resize(norms.size());
    for (size_t j = 0; j < norms.size(); ++j) inv_norms[j] = 1.0f / norms[j];
  }
  // The value a latent decodes with: hidden_pre / ||W_dec|| when rescaling (= pre), else pre.
  auto decode_value = [&](float hp, int64_t j) { return rescale ? hp * inv_norms[size_t(j)] : hp; };

  // hidden_pre = (pre + b_enc) [* norms], fused into BatchTopK's first pass, which keeps the
  // int(k * B) largest positive values across the batch.
  const int64_t budget = int64_t(sp.k * double(B_all));
  // hidden_pre itself is read again only by AuxK (dead latents), so it is written back only then.
  const bool aux_active = !dead.empty() && sp.aux_coefficient != 0.0;
  if (lp)
    global_batch_topk_columns(*latents.comm, ws.hidden_pre.data(), B, D, lat0, latents.width,
                              budget, ws.active, sae.b_enc.data(), rescale ? norms.data() : nullptr,
                              aux_active);
  else if (shard.split())
    global_batch_topk(*shard.comm, ws.hidden_pre.data(), B, D, budget, ws.active, sae.b_enc.data(),
                      rescale ? norms.data() : nullptr, aux_active);
  else
    ops::batch_topk(ws.hidden_pre.data(), B, D, budget, ws.active, sae.b_enc.data(),
                    rescale ? norms.data() : nullptr, aux_active);
  const auto& act = ws.active;
  res.n_active = act.offsets.back();
  res.min_selected = 0;
  if (res.n_active > 0) res.min_selected = *std::min_element(act.values.begin(), act.values.end());
  for (int32_t j : act.cols) res.fired[size_t(j)] = 1;
  t0 = now_seconds();
  ws.times.select += t0 - t1;

  // The Matryoshka level each latent first appears in.
  std::vector<int32_t> level_of(static_cast<size_t>(D));
  for (int64_t j = 0, lvl = 0; j < D; ++j) {
    while (lat0 + j >= sp.widths[size_t(lvl)]) ++lvl;
    level_of[size_t(j)] = int32_t(lvl);
  }

  // Dead latents, grouped as the AuxK loss uses them (one group, or one per level).
  std::vector<std::vector<int32_t>> aux_groups;
  if (!dead.empty() && sp.aux_coefficient != 0.0) {
    aux_groups.resize(size_t(sp.per_level_aux ? L : 1));
    for (int64_t j = 0; j < D; ++j)
      if (dead[size_t(j)])
        aux_groups[size_t(sp.per_level_aux ? level_of[size_t(j)] : 0)].push_back(int32_t(j)),
            res.n_dead++;
  }
  const int64_t n_aux = int64_t(aux_groups.size());
  // Per token vectors: L level gradients; one residual/gradient per aux group.
  ws.vecs.resize(size_t(B * L * d));
  ws.aux_vecs.resize(size_t(B * n_aux * d));
  auto vec = [&](int64_t t, int64_t i) { return ws.vecs.data() + (t * L + i) * d; };
  auto aux_vec = [&](int64_t t, int64_t a) { return ws.aux_vecs.data() + (t * n_aux + a) * d; };
  // The level whose residual an aux group fits: its own level, or the outer one.
  auto aux_level = [&](int64_t gi) { return sp.per_level_aux ? gi : L - 1; };

  // ---- levels: one sweep over each token's index-sorted active list ----
  if (lp) {
    // Latent parallel: first each level's band [w_{i-1}, w_i) of this rank's latents per token,
    // summed over the ranks; then the sweep adds whole bands instead of latents.
    std::fill(ws.vecs.begin(), ws.vecs.end(), 0.0f);
#pragma omp parallel for schedule(static) \
    num_threads(threads_for((double(res.n_active) + double(B * L)) * double(d), 0.3))
    for (int64_t t = 0; t < B; ++t)
      for (int64_t e = act.offsets[size_t(t)]; e < act.offsets[size_t(t + 1)]; ++e) {
        const int32_t j = act.cols[size_t(e)];
        k.axpy(decode_value(act.values[size_t(e)], j), &sae.W_dec[size_t(j) * size_t(d)],
               vec(t, level_of[size_t(j)]), d);
      }
    const double tx = now_seconds();
    latents.comm->allreduce_sum(std::span<float>(ws.vecs));
    ws.times.exchange += now_seconds() - tx;
  }
  const int n_threads = omp_get_max_threads();
  std::vector<double> level_sum(size_t(n_threads * L), 0.0), outer_sq(size_t(n_threads), 0.0);
  // Per token: the active latents' axpys, then L passes over d for the level gradients.
  const double sweep_items = (double(res.n_active) + double(B) * double(L + n_aux) * 3.0) * d;
#pragma omp parallel num_threads(threads_for(sweep_items, 0.3))
  {
    std::vector<float> r(static_cast<size_t>(d));
    double* my_sum = level_sum.data() + omp_get_thread_num() * L;
#pragma omp for schedule(static)
    for (int64_t t = 0; t < B; ++t) {
      std::copy(sae.b_dec.begin(), sae.b_dec.end(), r.begin());
      const float* xt = x + t * d;
      int64_t e = act.offsets[size_t(t)];
      const int64_t end = act.offsets[size_t(t + 1)];
      for (int64_t i = 0; i < L; ++i) {
        if (lp) k.axpy(1.0f, vec(t, i), r.data(), d);  // level i's band, all ranks' latents
        for (; !lp && e < end && act.cols[size_t(e)] < sp.widths[size_t(i)]; ++e) {
          const int32_t j = act.cols[size_t(e)];
          k.axpy(decode_value(act.values[size_t(e)], j), &sae.W_dec[size_t(j) * size_t(d)],
                 r.data(), d);
        }
        float* gi = vec(t, i);
        double ss = 0;
#pragma omp simd reduction(+ : ss)
        for (int64_t c = 0; c < d; ++c) {
          const float err = xt[c] - r[size_t(c)];
          gi[c] = err;
          ss += double(err) * err;
        }
        for (int64_t a = 0; a < n_aux; ++a)
          if (aux_level(a) == i) std::copy(gi, gi + d, aux_vec(t, a));  // detached residual
        // d R / d r for R = ||e||^2 (mse) or ||e||^p (l2), times c_i / B.
        double R, coef;
        const double w = sp.level_weight[size_t(i)] / double(B_all);
        if (sp.level_loss[size_t(i)] == LevelLoss::Mse) {
          R = ss;
          coef = -2.0 * w;
        } else {
          const double norm = std::sqrt(ss), p = sp.l2_power;
          R = std::pow(norm, p);
          coef = norm > 1e-12 ? -p * std::pow(norm, p - 2.0) * w : 0.0;  // guard ||e|| = 0
        }
        my_sum[i] += R;
        if (i == L - 1) outer_sq[size_t(omp_get_thread_num())] += ss;
#pragma omp simd
        for (int64_t c = 0; c < d; ++c) gi[c] = float(coef * gi[c]);
      }
      // Without detaching, latent j (first in level l) is in levels l..L-1: G_l = sum g_i.
      if (!sp.detach_levels)
        for (int64_t i = L - 2; i >= 0; --i) k.axpy(1.0f, vec(t, i + 1), vec(t, i), d);
    }
  }
  for (int th = 0; th < n_threads; ++th) {
    for (int64_t i = 0; i < L; ++i) res.level_loss[size_t(i)] += level_sum[size_t(th * L + i)];
    res.outer_sq_error += outer_sq[size_t(th)] / double(B_all);
  }
  for (int64_t i = 0; i < L; ++i) {
    res.level_loss[size_t(i)] /= double(B_all);
    res.loss += sp.level_weight[size_t(i)] * res.level_loss[size_t(i)];
  }

  t1 = now_seconds();
  ws.times.levels += t1 - t0;

  // ---- backward of the active latents, latent-major: each touched latent's W_dec row is read
  // once for all its entries, and its two gradient rows are finished by one thread while they
  // are in cache (their squared norm is taken there: the clip needs no pass of its own) ----
  const int64_t n_act = res.n_active;
  std::vector<int32_t> token_of(static_cast<size_t>(n_act));  // of each CSR entry
  for (int64_t t = 0; t < B; ++t)
    std::fill(token_of.begin() + act.offsets[size_t(t)],
              token_of.begin() + act.offsets[size_t(t + 1)], int32_t(t));
  // The entries grouped by latent (a counting sort; tokens ascending within a latent).
  std::vector<int64_t> start(size_t(D + 1), 0);
  for (int32_t j : act.cols) start[size_t(j + 1)]++;
  for (int64_t j = 0; j < D; ++j) start[size_t(j + 1)] += start[size_t(j)];
  std::vector<int64_t> by_latent(static_cast<size_t>(n_act));
  {
    std::vector<int64_t> fill(start.begin(), start.end() - 1);
    for (int64_t e = 0; e < n_act; ++e) by_latent[size_t(fill[size_t(act.cols[size_t(e)])]++)] = e;
  }
  auto touch = [&](int32_t j) {
    if (!g.row_touched[size_t(j)]) g.row_touched[size_t(j)] = 1, g.touched.push_back(j);
  };
  for (int64_t j = 0; j < D; ++j)
    if (start[size_t(j + 1)] > start[size_t(j)]) touch(int32_t(j));
  ws.row_sq.assign(size_t(D), 0.0);
#pragma omp parallel for schedule(dynamic, 16) \
    num_threads(threads_for(double(n_act) * 3.0 * double(d), 0.3))
  for (size_t q = 0; q < g.touched.size(); ++q) {
    const int32_t j = g.touched[q];
    const float* w_dec = &sae.W_dec[size_t(j) * size_t(d)];
    float* gw_dec = &g.W_dec[size_t(j) * size_t(d)];
    float* gw_enc = &g.W_encT[size_t(j) * size_t(d)];
    double gb = 0;
    for (int64_t s2 = start[size_t(j)]; s2 < start[size_t(j + 1)]; ++s2) {
      const int64_t e = by_latent[size_t(s2)];
      const int64_t t = token_of[size_t(e)];
      // d pre = <W_dec[j], G_level(t)>; dW_dec[j] += u G_level(t); dW_enc[j] += dpre sae_in[t]
      const float dp = k.dot_axpy(w_dec, vec(t, level_of[size_t(j)]),
                                  decode_value(act.values[size_t(e)], j), gw_dec, d);
      k.axpy(dp, ws.sae_in.data() + t * d, gw_enc, d);
      gb += dp;
    }
    g.b_enc[size_t(j)] += float(gb);
    ws.row_sq[size_t(j)] = k.sum_squares(gw_dec, d) + k.sum_squares(gw_enc, d);
  }
  t0 = now_seconds();
  ws.times.backward += t0 - t1;

  // ---- AuxK, dense over each group's dead latents (k_aux is a large share of them) ----
  // Per token, the top k_aux dead latents by hidden_pre (no ReLU) reconstruct the detached
  // residual without b_dec; loss aux_coefficient * min(n_dead / (d_in / 2), 1) * mean ||.||^2.
  const int64_t k_aux_max = d / 2;
  // Each group's size over the whole SAE (latent parallel: summed over the ranks).
  std::vector<double> group_size(static_cast<size_t>(n_aux));
  for (int64_t a = 0; a < n_aux; ++a) group_size[size_t(a)] = double(aux_groups[size_t(a)].size());
  if (lp && n_aux > 0) latents.comm->allreduce_sum(std::span<double>(group_size));
  for (int64_t a = 0; a < n_aux; ++a) {
    const auto& grp = aux_groups[size_t(a)];
    const int64_t n_g = int64_t(grp.size());  // this rank's (latent parallel) dead latents
    const int64_t n_all = int64_t(group_size[size_t(a)]);
    if (n_all == 0) continue;
    const int64_t k_aux = std::min(k_aux_max, n_all);
    const double scale = std::min(double(n_all) / double(k_aux_max), 1.0);
    const double w = sp.aux_coefficient * scale / double(B_all);
    // Gathered decoder rows of the group's latents.
    std::vector<float> wd(size_t(n_g * d));
#pragma omp parallel for schedule(static) num_threads(threads_for(double(n_g) * double(d), 0.1))
    for (int64_t q = 0; q < n_g; ++q)
      std::memcpy(&wd[size_t(q * d)], &sae.W_dec[size_t(grp[size_t(q)]) * size_t(d)],
                  size_t(d) * 4);
    // acts [B, n_g]: the selected dead latents' decode values, 0 elsewhere; sel marks them.
    std::vector<float> acts(size_t(B * n_g), 0.0f);
    std::vector<uint8_t> sel(size_t(B * n_g), 0);
    // Latent parallel: each rank's k_aux largest per token (padded with -inf) go to every rank,
    // which finds the token's cut among them; ties at the cut go to lower ranks' latents (lower
    // latent numbers), as the one-process stable top-k does.
    const int64_t k_loc = std::min(k_aux, n_g);
    std::vector<float> cand(lp ? size_t(B * k_aux * latents.comm->size()) : 0,
                            -std::numeric_limits<float>::infinity());
    float* my_cand = lp ? cand.data() + B * k_aux * latents.comm->rank() : nullptr;
#pragma omp parallel num_threads(threads_for(double(B) * double(n_g), 2.0))
    {
      std::vector<float> vals(static_cast<size_t>(n_g)), top_v(static_cast<size_t>(k_loc));
      std::vector<int32_t> top_i(static_cast<size_t>(k_loc));
#pragma omp for schedule(static)
      for (int64_t t = 0; t < B; ++t) {
        if (k_loc == 0) continue;
        const float* hp = ws.hidden_pre.data() + t * D;
        for (int64_t q = 0; q < n_g; ++q) vals[size_t(q)] = hp[grp[size_t(q)]];
        ops::topk_rows(vals.data(), 1, n_g, k_loc, top_i.data(), top_v.data());
        if (lp) {
          std::copy(top_v.begin(), top_v.end(), my_cand + t * k_aux);
          continue;
        }
        for (int64_t q = 0; q < k_loc; ++q) {
          const int32_t c = top_i[size_t(q)];
          acts[size_t(t * n_g + c)] = decode_value(top_v[size_t(q)], grp[size_t(c)]);
          sel[size_t(t * n_g + c)] = 1;
        }
      }
    }
    if (lp) {
      const int n_ranks = latents.comm->size(), me = latents.comm->rank();
      std::vector<int> counts(size_t(n_ranks), int(B * k_aux));
      const double tx = now_seconds();
      latents.comm->allgather(std::span<float>(cand), counts);
      ws.times.exchange += now_seconds() - tx;
#pragma omp parallel num_threads(threads_for(double(B) * double(n_g + k_aux * n_ranks), 2.0))
      {
        std::vector<float> all(size_t(k_aux * n_ranks)), sorted(all.size());
#pragma omp for schedule(static)
        for (int64_t t = 0; t < B; ++t) {
          for (int q = 0; q < n_ranks; ++q)
            std::copy_n(cand.data() + (int64_t(q) * B + t) * k_aux, k_aux, all.data() + q * k_aux);
          std::copy(all.begin(), all.end(), sorted.begin());
          std::nth_element(sorted.begin(), sorted.begin() + (k_aux - 1), sorted.end(),
                           std::greater<float>());
          const float cut = sorted[size_t(k_aux - 1)];
          int64_t room = k_aux;  // ties at the cut this rank may still take
          for (int q = 0; q < n_ranks * k_aux; ++q) room -= all[size_t(q)] > cut;
          for (int q = 0; q < me * k_aux; ++q) room -= all[size_t(q)] == cut;
          const float* hp = ws.hidden_pre.data() + t * D;
          for (int64_t q = 0; q < n_g; ++q) {
            const float v = hp[grp[size_t(q)]];
            if (v > cut || (v == cut && room-- > 0)) {
              acts[size_t(t * n_g + q)] = decode_value(v, grp[size_t(q)]);
              sel[size_t(t * n_g + q)] = 1;
            }
          }
        }
      }
    }
    // recon = acts @ wd; h = 2 w (recon - residual) overwrites the residual slot.
    // (Latent parallel: each rank's latents' part, summed over the ranks.)
    std::vector<float> recon(size_t(B * d), 0.0f);
    if (n_g > 0)
      ops::gemm(ops::Trans::No, ops::Trans::No, B, d, n_g, 1.0f, acts.data(), n_g, wd.data(), d,
                0.0f, recon.data(), d);
    if (lp) {
      const double tx = now_seconds();
      latents.comm->allreduce_sum(std::span<float>(recon));
      ws.times.exchange += now_seconds() - tx;
    }
    std::vector<float> h(size_t(B * d));
    double loss_sum = 0;
#pragma omp parallel for schedule(static) reduction(+ : loss_sum) \
    num_threads(threads_for(double(B) * double(d), 1.0))
    for (int64_t t = 0; t < B; ++t) {
      const float* resid = aux_vec(t, a);
      for (int64_t c = 0; c < d; ++c) {
        const float diff = recon[size_t(t * d + c)] - resid[c];
        loss_sum += double(diff) * diff;
        h[size_t(t * d + c)] = float(2.0 * w * diff);
      }
    }
    res.aux_loss += sp.aux_coefficient * scale * loss_sum / double(B_all);
    if (n_g == 0) continue;  // latent parallel: none of this group's dead latents are here
    // dpre = (h @ wd^T) on the selected entries; then the parameter gradients.
    std::vector<float> dpre(size_t(B * n_g));
    ops::gemm(ops::Trans::No, ops::Trans::Yes, B, n_g, d, 1.0f, h.data(), d, wd.data(), d, 0.0f,
              dpre.data(), n_g);
    for (size_t i = 0; i < dpre.size(); ++i)
      if (!sel[i]) dpre[i] = 0.0f;
    std::vector<float> gwd(size_t(n_g * d)), gwe(size_t(n_g * d));
    ops::gemm(ops::Trans::Yes, ops::Trans::No, n_g, d, B, 1.0f, acts.data(), n_g, h.data(), d, 0.0f,
              gwd.data(), d);
    ops::gemm(ops::Trans::Yes, ops::Trans::No, n_g, d, B, 1.0f, dpre.data(), n_g, ws.sae_in.data(),
              d, 0.0f, gwe.data(), d);
    for (int64_t q = 0; q < n_g; ++q) touch(grp[size_t(q)]);
#pragma omp parallel for schedule(static) \
    num_threads(threads_for(double(n_g) * double(2 * d + B), 0.5))
    for (int64_t q = 0; q < n_g; ++q) {
      const size_t j = size_t(grp[size_t(q)]);
      k.axpy(1.0f, &gwd[size_t(q * d)], &g.W_dec[j * size_t(d)], d);
      k.axpy(1.0f, &gwe[size_t(q * d)], &g.W_encT[j * size_t(d)], d);
      ws.row_sq[j] =
          k.sum_squares(&g.W_dec[j * size_t(d)], d) + k.sum_squares(&g.W_encT[j * size_t(d)], d);
      double gb = 0;
      for (int64_t t = 0; t < B; ++t) gb += dpre[size_t(t * n_g + q)];
      g.b_enc[j] += float(gb);
    }
  }
  res.loss += res.aux_loss;
  t1 = now_seconds();
  ws.times.aux += t1 - t0;

  // b_dec: every level's reconstruction includes it (G_0 sums the level gradients), and the
  // encoder input subtracts it: through sae_in = x - b_dec its gradient is minus the sum over
  // tokens of d(loss)/d(sae_in) = -sum_j dL/db_enc[j] W_enc[:, j] (pre = sae_in W_enc + b_enc),
  // one pass over the touched rows of W_encT; no per-token d(sae_in) is ever formed.
  // Threads own columns; sums in double, tokens and rows in order. Latent parallel: every rank
  // holds every G_0 (rank 0 adds them) and its own latents' rows; summed over the ranks below.
  std::vector<double> gbd(static_cast<size_t>(d), 0.0);
  const bool add_g0 = !lp || latents.comm->rank() == 0;
#pragma omp parallel num_threads( \
    threads_for((double(B) + double(g.touched.size())) * double(d), 0.5))
  {
    const auto [c0, c1] = columns_of_thread(d);
    double* acc = gbd.data();
    for (int64_t t = 0; add_g0 && t < B; ++t) {
      const float* g0 = vec(t, 0);
#pragma omp simd
      for (int64_t c = c0; c < c1; ++c) acc[c] += double(g0[c]);
    }
    if (sp.apply_b_dec_to_input)
      for (const int32_t j : g.touched) {
        const double gb = g.b_enc[size_t(j)];
        const float* w_enc = &sae.W_encT[size_t(j) * size_t(d)];
#pragma omp simd
        for (int64_t c = c0; c < c1; ++c) acc[c] -= gb * double(w_enc[c]);
      }
  }
  // The gradient's squared norm for the clip, from the rows' norms taken as they were finished.
  res.grad_squared_norm = 0;
  for (const int32_t j : g.touched) res.grad_squared_norm += ws.row_sq[size_t(j)];
  for (const float v : g.b_enc) res.grad_squared_norm += double(v) * v;
  if (lp) {
    // One sum for b_dec's gradient, the rows' norm and the counts; the smallest selected value
    // by a max of negations (a rank with none selected offers -inf).
    gbd.insert(gbd.end(), {res.grad_squared_norm, double(res.n_active), double(res.n_dead)});
    const double tx = now_seconds();
    latents.comm->allreduce_sum(std::span<double>(gbd));
    ws.times.exchange += now_seconds() - tx;
    res.grad_squared_norm = gbd[size_t(d)];
    res.n_dead = int64_t(gbd[size_t(d + 2)]);
    std::vector<double> neg_min = {res.n_active > 0 ? -res.min_selected
                                                    : -std::numeric_limits<double>::infinity()};
    latents.comm->allreduce_max(neg_min);
    res.n_active = int64_t(gbd[size_t(d + 1)]);
    res.min_selected = res.n_active > 0 ? -neg_min[0] : 0.0;
  }
  for (int64_t c = 0; c < d; ++c) g.b_dec[size_t(c)] = float(gbd[size_t(c)]);
  for (const float v : g.b_dec) res.grad_squared_norm += double(v) * v;
  ws.times.backward += now_seconds() - t1;
  if (shard.split()) {
    t1 = now_seconds();
    reduce_over_ranks(*shard.comm, res, g);
    res.grad_squared_norm = -1;  // the sum's norm is taken after the reduction (ShardedUpdate)
    ws.times.exchange += now_seconds() - t1;
  }
  return res;
}

// ---- the double-precision reference ---------------------------------------------------------

ReferenceParams reference_params(const TrainingSae& sae) {
  const int64_t d = sae.spec.d_in, D = sae.spec.d_sae;
  ReferenceParams p;
  p.W_enc.resize(size_t(d * D));
  for (int64_t j = 0; j < D; ++j)
    for (int64_t c = 0; c < d; ++c) p.W_enc[size_t(c * D + j)] = sae.W_encT[size_t(j * d + c)];
  p.W_dec.assign(sae.W_dec.begin(), sae.W_dec.end());
  p.b_enc.assign(sae.b_enc.begin(), sae.b_enc.end());
  p.b_dec.assign(sae.b_dec.begin(), sae.b_dec.end());
  return p;
}

namespace {

struct RefForward {
  std::vector<double> hp, u;  // hidden_pre, decoded value of selected entries (0 elsewhere)
  std::vector<double> norms;
};

RefForward ref_forward(const TrainSpec& sp, const ReferenceParams& p, const float* x, int64_t B) {
  const int64_t d = sp.d_in, D = sp.d_sae;
  RefForward f;
  f.norms.assign(size_t(D), 1.0);
  if (sp.rescale_acts_by_decoder_norm)
    for (int64_t j = 0; j < D; ++j) {
      double s = 0;
      for (int64_t c = 0; c < d; ++c) s += p.W_dec[size_t(j * d + c)] * p.W_dec[size_t(j * d + c)];
      f.norms[size_t(j)] = std::sqrt(s);
    }
  f.hp.assign(size_t(B * D), 0.0);
  for (int64_t t = 0; t < B; ++t)
    for (int64_t j = 0; j < D; ++j) {
      double pre = p.b_enc[size_t(j)];
      for (int64_t c = 0; c < d; ++c)
        pre += (x[t * d + c] - (sp.apply_b_dec_to_input ? p.b_dec[size_t(c)] : 0.0)) *
               p.W_enc[size_t(c * D + j)];
      f.hp[size_t(t * D + j)] = pre * f.norms[size_t(j)];
    }
  std::vector<int64_t> order;
  for (int64_t i = 0; i < B * D; ++i)
    if (f.hp[size_t(i)] > 0) order.push_back(i);
  std::stable_sort(order.begin(), order.end(),
                   [&](int64_t a, int64_t b) { return f.hp[size_t(a)] > f.hp[size_t(b)]; });
  const int64_t budget = int64_t(sp.k * double(B));
  if (int64_t(order.size()) > budget) order.resize(size_t(budget));
  f.u.assign(size_t(B * D), 0.0);
  for (int64_t i : order) f.u[size_t(i)] = f.hp[size_t(i)] / f.norms[size_t(i % D)];
  return f;
}

}  // namespace

ReferenceLoss reference_loss(const TrainSpec& sp, const ReferenceParams& p,
                             const ReferenceParams& frozen, const float* x, int64_t B,
                             const std::vector<uint8_t>& dead) {
  const int64_t d = sp.d_in, D = sp.d_sae, L = sp.n_levels();
  RefForward f = ref_forward(sp, p, x, B);
  RefForward ff = ref_forward(sp, frozen, x, B);
  ReferenceLoss out;
  out.level.assign(size_t(L), 0.0);
  for (double u : f.u) out.n_active += u != 0.0;
  // recon(level i) from latents [lo, w_i) of (f, params) plus the earlier levels from `base`.
  auto recon = [&](const RefForward& fw, const ReferenceParams& pp, int64_t t, int64_t lo,
                   int64_t hi, bool with_bias, std::vector<double>& r) {
    if (with_bias)
      for (int64_t c = 0; c < d; ++c) r[size_t(c)] += pp.b_dec[size_t(c)];
    for (int64_t j = lo; j < hi; ++j) {
      const double u = fw.u[size_t(t * D + j)];
      if (u != 0.0)
        for (int64_t c = 0; c < d; ++c) r[size_t(c)] += u * pp.W_dec[size_t(j * d + c)];
    }
  };
  std::vector<double> r(static_cast<size_t>(d));
  for (int64_t t = 0; t < B; ++t)
    for (int64_t i = 0; i < L; ++i) {
      std::fill(r.begin(), r.end(), 0.0);
      const int64_t lo = i == 0 ? 0 : sp.widths[size_t(i - 1)];
      if (sp.detach_levels && i > 0) {
        recon(ff, frozen, t, 0, lo, true, r);  // earlier levels: no gradient
        recon(f, p, t, lo, sp.widths[size_t(i)], false, r);
      } else {
        recon(f, p, t, 0, sp.widths[size_t(i)], true, r);
      }
      double ss = 0;
      for (int64_t c = 0; c < d; ++c)
        ss += (x[t * d + c] - r[size_t(c)]) * (x[t * d + c] - r[size_t(c)]);
      out.level[size_t(i)] +=
          (sp.level_loss[size_t(i)] == LevelLoss::Mse ? ss : std::pow(std::sqrt(ss), sp.l2_power)) /
          double(B);
    }
  for (int64_t i = 0; i < L; ++i) out.total += sp.level_weight[size_t(i)] * out.level[size_t(i)];

  if (!dead.empty() && sp.aux_coefficient != 0.0) {
    const int64_t n_groups = sp.per_level_aux ? L : 1, k_aux_max = d / 2;
    for (int64_t gi = 0; gi < n_groups; ++gi) {
      const int64_t lo = sp.per_level_aux && gi > 0 ? sp.widths[size_t(gi - 1)] : 0;
      const int64_t hi = sp.per_level_aux ? sp.widths[size_t(gi)] : D;
      const int64_t lvl = sp.per_level_aux ? gi : L - 1;
      std::vector<int64_t> grp;
      for (int64_t j = lo; j < hi; ++j)
        if (dead[size_t(j)]) grp.push_back(j);
      if (grp.empty()) continue;
      const int64_t k_aux = std::min<int64_t>(k_aux_max, int64_t(grp.size()));
      const double scale = std::min(double(grp.size()) / double(k_aux_max), 1.0);
      double sum = 0;
      for (int64_t t = 0; t < B; ++t) {
        std::vector<double> res(static_cast<size_t>(d), 0.0);  // detached residual of level lvl
        recon(ff, frozen, t, 0, sp.widths[size_t(lvl)], true, res);
        std::vector<int64_t> order = grp;
        std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) {
          return f.hp[size_t(t * D + a)] > f.hp[size_t(t * D + b)];
        });
        std::vector<double> rec(static_cast<size_t>(d), 0.0);
        for (int64_t q = 0; q < k_aux; ++q) {
          const int64_t j = order[size_t(q)];
          const double v = f.hp[size_t(t * D + j)] / f.norms[size_t(j)];
          for (int64_t c = 0; c < d; ++c) rec[size_t(c)] += v * p.W_dec[size_t(j * d + c)];
        }
        for (int64_t c = 0; c < d; ++c) {
          const double e = x[t * d + c] - res[size_t(c)];
          sum += (rec[size_t(c)] - e) * (rec[size_t(c)] - e);
        }
      }
      out.aux += sp.aux_coefficient * scale * sum / double(B);
    }
    out.total += out.aux;
  }
  return out;
}

}  // namespace sae::train

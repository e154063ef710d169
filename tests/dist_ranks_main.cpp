// Run under `mpirun -np N` by test_dist.cpp: each rank checks the collectives against what the
// ranks' inputs make them equal to, and prints "rank R ok". With --fail-rank R, rank R throws
// while the others wait in a barrier: the job must end (run_or_abort), not hang.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <memory>
#include <random>
#include <stdexcept>
#include <tuple>
#include <vector>

#include "core/error.h"
#include "dist/comm.h"
#include "max_relative_error.h"
#include "ops/batch_topk.h"
#include "train/data_parallel.h"
#include "train/global_batch_topk.h"
#include "train/latent_gather.h"
#include "train/optimizer.h"
#include "train/step.h"

// BatchTopK of a batch split by rows across the ranks equals the single-process selection on
// the whole batch, rows for rows, with many ties at the cut (values on a coarse grid).
void check_global_batch_topk(sae::dist::Comm& w) {
  const int64_t rows = 16, cols = 64, all_rows = rows * w.size(), budget = 3 * all_rows;
  std::mt19937 rng(1234);  // the same whole batch on every rank
  std::normal_distribution<float> normal;
  std::vector<float> whole(size_t(all_rows * cols)), bias(static_cast<size_t>(cols)),
      scale(static_cast<size_t>(cols));
  for (float& v : whole) v = std::round(normal(rng) * 4.0f) / 4.0f;
  for (float& v : bias) v = std::round(normal(rng) * 2.0f) / 8.0f;
  for (float& v : scale) v = 1.0f + float(rng() % 2);
  sae::ops::RowSparse want, got;
  std::vector<float> copy = whole;
  sae::ops::batch_topk(copy.data(), all_rows, cols, budget, want, bias.data(), scale.data());
  std::vector<float> mine(whole.begin() + w.rank() * rows * cols,
                          whole.begin() + (w.rank() + 1) * rows * cols);
  sae::train::global_batch_topk(w, mine.data(), rows, cols, budget, got, bias.data(), scale.data());
  const int64_t first = w.rank() * rows;
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t a = want.offsets[size_t(first + r)], b = want.offsets[size_t(first + r + 1)];
    SAE_CHECK(got.offsets[size_t(r + 1)] - got.offsets[size_t(r)] == b - a, "row ", r,
              ": selected count");
    for (int64_t e = 0; e < b - a; ++e) {
      SAE_CHECK(got.cols[size_t(got.offsets[size_t(r)] + e)] == want.cols[size_t(a + e)], "row ", r,
                ": column");
      SAE_CHECK(got.values[size_t(got.offsets[size_t(r)] + e)] == want.values[size_t(a + e)],
                "row ", r, ": value");
    }
  }
  int64_t total = got.offsets.back();
  std::vector<double> t = {double(total)};
  w.allreduce_sum(t);
  SAE_CHECK(int64_t(t[0]) == budget, "selected ", t[0], " of a budget of ", budget);
}

// The two specs both step checks use: 0, the MSE recipe with decoder-norm rescaling and one
// AuxK group; 1, snap-like L2 levels, detached levels and AuxK per level.
sae::train::TrainSpec step_spec(int variant, int64_t d_sae, std::vector<int64_t> widths) {
  using namespace sae::train;
  TrainSpec sp;
  sp.d_in = 16, sp.d_sae = d_sae, sp.k = 3;
  sp.widths = std::move(widths);
  if (variant == 0) {
    sp.level_loss.assign(3, LevelLoss::Mse);
    sp.level_weight = {1, 1, 1};
    sp.rescale_acts_by_decoder_norm = true;
  } else {
    sp.level_loss = {LevelLoss::L2, LevelLoss::L2, LevelLoss::Mse};
    sp.level_weight = {0.5, 1, 2};
    sp.detach_levels = true;
    sp.per_level_aux = true;
  }
  return sp;
}

// A batch [B, d] and a dead mask [D] from `seed`: the same on every rank.
std::pair<std::vector<float>, std::vector<uint8_t>> step_inputs(int64_t B, int64_t d, int64_t D,
                                                                uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal;
  std::vector<float> x(size_t(B * d));
  for (float& v : x) v = normal(rng);
  std::vector<uint8_t> dead(static_cast<size_t>(D));
  for (auto& v : dead) v = uint8_t(rng() % 3 == 0);
  return {x, dead};
}

// One data-parallel step (each rank: its rows of a global batch, uneven when the ranks do not
// divide it) equals the single-process step on the whole batch: losses, the selection's count
// and smallest value, the fired flags, the touched rows, every gradient, and the parameters
// after the optimizer's update, for both specs of step_spec.
void check_data_parallel_step(sae::dist::Comm& w) {
  using namespace sae::train;
  for (int variant = 0; variant < 2; ++variant) {
    const TrainSpec sp = step_spec(variant, 64, {8, 32, 64});
    TrainingSae sae(sp);
    sae.init(7, 0.1);
    const int64_t B = 7 * w.size() + 3, d = sp.d_in, D = sp.d_sae;
    const auto [x, dead] = step_inputs(B, d, D, 99);

    Grads g_one, g_dp;
    g_one.resize(d, D), g_dp.resize(d, D);
    StepWorkspace ws_one, ws_dp;
    const StepResult one = forward_backward(sae, x.data(), B, dead, g_one, ws_one);
    const BatchShard shard{&w, B};
    const int64_t first = shard.begin(B), rows = shard.end(B) - first;
    const StepResult dp =
        forward_backward(sae, x.data() + first * d, rows, dead, g_dp, ws_dp, shard);

    auto close = [](double a, double b) {
      return std::fabs(a - b) <= 1e-5 * std::max(1.0, std::fabs(a));
    };
    SAE_CHECK(close(one.loss, dp.loss), "variant ", variant, ": loss ", one.loss, " vs ", dp.loss);
    SAE_CHECK(close(one.aux_loss, dp.aux_loss), "variant ", variant, ": aux loss");
    SAE_CHECK(one.aux_loss > 0, "variant ", variant, ": AuxK did not run");
    SAE_CHECK(close(one.outer_sq_error, dp.outer_sq_error), "variant ", variant, ": sq error");
    for (size_t i = 0; i < one.level_loss.size(); ++i)
      SAE_CHECK(close(one.level_loss[i], dp.level_loss[i]), "variant ", variant, ": level ", i);
    SAE_CHECK(one.n_active == dp.n_active, "variant ", variant, ": n_active ", one.n_active, " vs ",
              dp.n_active);
    SAE_CHECK(one.min_selected == dp.min_selected, "variant ", variant, ": min selected");
    SAE_CHECK(one.fired == dp.fired, "variant ", variant, ": fired flags");
    SAE_CHECK(one.n_dead == dp.n_dead, "variant ", variant, ": dead count");
    std::vector<int32_t> t_one = g_one.touched;
    std::sort(t_one.begin(), t_one.end());
    SAE_CHECK(t_one == g_dp.touched, "variant ", variant, ": touched rows");
    // The update (with momentum in variant 0, without in 1): every rank ends with the
    // single-process parameters, and, once gathered, its moments.
    AdamConfig adam;
    adam.beta1 = variant == 0 ? 0.9 : 0.0;
    TrainingSae sae_one = sae, sae_dp = sae;
    Optimizer opt_one(sae_one, adam), opt_dp(sae_dp, adam);
    ShardedUpdate sharded(w, D, d);
    const double norm_one = opt_one.step(sae_one, g_one, 1e-2);
    const double norm_dp = sharded.step(sae_dp, opt_dp, g_dp, 1e-2);
    SAE_CHECK(close(norm_one, norm_dp), "variant ", variant, ": gradient norm ", norm_one, " vs ",
              norm_dp);
    for (auto [name, a, b] : {std::tuple{"W_encT", &sae_one.W_encT, &sae_dp.W_encT},
                              std::tuple{"W_dec", &sae_one.W_dec, &sae_dp.W_dec},
                              std::tuple{"b_enc", &sae_one.b_enc, &sae_dp.b_enc},
                              std::tuple{"b_dec", &sae_one.b_dec, &sae_dp.b_dec}}) {
      const double e = sae::test::max_relative_error(*a, *b);
      SAE_CHECK(e <= 1e-5, "variant ", variant, ": ", name, " after the update off by ", e);
    }
    SAE_CHECK(sae_dp.W_dec != sae.W_dec, "variant ", variant, ": the update changed nothing");
    sharded.gather_moments(opt_dp);
    SAE_CHECK(sae::test::max_relative_error(opt_one.v_W_encT, opt_dp.v_W_encT) <= 1e-5, "variant ",
              variant, ": second moment of W_encT");
    SAE_CHECK(sae::test::max_relative_error(opt_one.v_W_dec, opt_dp.v_W_dec) <= 1e-5, "variant ",
              variant, ": second moment of W_dec");
    if (variant == 0)
      SAE_CHECK(sae::test::max_relative_error(opt_one.m_W_dec, opt_dp.m_W_dec) <= 1e-5,
                "first moment of W_dec");
    SAE_CHECK(sharded.last_bytes_sent() > 0, "nothing exchanged");
  }
}

// BatchTopK of a matrix split by columns across the ranks (latent parallel) equals the
// single-process selection, with many ties at the cut that interleave across ranks in flat order.
void check_global_batch_topk_columns(sae::dist::Comm& w) {
  const int64_t rows = 24, all_cols = 61, budget = 2 * rows;  // uneven column blocks
  std::mt19937 rng(4321);
  std::normal_distribution<float> normal;
  std::vector<float> whole(size_t(rows * all_cols)), bias(static_cast<size_t>(all_cols));
  for (float& v : whole) v = std::round(normal(rng) * 2.0f) / 2.0f;
  for (float& v : bias) v = std::round(normal(rng)) / 4.0f;
  sae::ops::RowSparse want, got;
  std::vector<float> copy = whole;
  sae::ops::batch_topk(copy.data(), rows, all_cols, budget, want, bias.data());
  const int64_t c0 = all_cols * w.rank() / w.size(), c1 = all_cols * (w.rank() + 1) / w.size();
  std::vector<float> mine(size_t(rows * (c1 - c0)));
  for (int64_t r = 0; r < rows; ++r)
    std::copy(whole.begin() + r * all_cols + c0, whole.begin() + r * all_cols + c1,
              mine.begin() + r * (c1 - c0));
  sae::train::global_batch_topk_columns(w, mine.data(), rows, c1 - c0, c0, all_cols, budget, got,
                                        bias.data() + c0);
  int64_t ties_at_cut = 0;
  const float cut = *std::min_element(want.values.begin(), want.values.end());
  for (int64_t i = 0; i < rows * all_cols; ++i)
    ties_at_cut += whole[size_t(i)] + bias[size_t(i % all_cols)] == cut;
  SAE_CHECK(ties_at_cut > 1, "the test needs ties at the cut");
  for (int64_t r = 0; r < rows; ++r) {
    std::vector<std::pair<int32_t, float>> a, b;
    for (int64_t e = want.offsets[size_t(r)]; e < want.offsets[size_t(r + 1)]; ++e)
      if (want.cols[size_t(e)] >= c0 && want.cols[size_t(e)] < c1)
        a.emplace_back(want.cols[size_t(e)] - int32_t(c0), want.values[size_t(e)]);
    for (int64_t e = got.offsets[size_t(r)]; e < got.offsets[size_t(r + 1)]; ++e)
      b.emplace_back(got.cols[size_t(e)], got.values[size_t(e)]);
    SAE_CHECK(a == b, "columns split: row ", r, " selects other entries than one process");
  }
}

// One latent-parallel step (each rank: its block of latents, the whole batch) equals the
// single-process step: losses, counts, the smallest selected value, each rank's fired flags,
// touched rows and gradient rows, b_dec's gradient, the gradient norm, and the parameters after
// Adam. The same two specs as the data-parallel check, with d_sae not divisible by the ranks
// and Matryoshka bands that straddle the blocks.
void check_latent_parallel_step(sae::dist::Comm& w) {
  using namespace sae::train;
  for (int variant = 0; variant < 2; ++variant) {
    const TrainSpec sp = step_spec(variant, 67, {8, 30, 67});
    TrainingSae sae(sp);
    sae.init(7, 0.1);
    const int64_t B = 29, d = sp.d_in, D = sp.d_sae;
    const auto [x, dead] = step_inputs(B, d, D, 98);

    const LatentShard ls{&w, D};
    const int64_t j0 = ls.begin(), n = ls.count();
    TrainingSae part = sae.latents(j0, j0 + n);
    TrainingSae fresh(part.spec);  // init_rows gives the same rows as the whole SAE's init
    fresh.init_rows(7, 0.1, j0);
    SAE_CHECK(fresh.W_dec == part.W_dec && fresh.W_encT == part.W_encT, "init_rows at ", j0);

    Grads g_one, g_lp;
    g_one.resize(d, D), g_lp.resize(d, n);
    StepWorkspace ws_one, ws_lp;
    const StepResult one = forward_backward(sae, x.data(), B, dead, g_one, ws_one);
    const std::vector<uint8_t> my_dead(dead.begin() + j0, dead.begin() + j0 + n);
    const StepResult lp = forward_backward(part, x.data(), B, my_dead, g_lp, ws_lp, {}, ls);
    auto close = [](double a, double b) {
      return std::fabs(a - b) <= 1e-5 * std::max(1.0, std::fabs(a));
    };
    SAE_CHECK(close(one.loss, lp.loss), "variant ", variant, ": loss ", one.loss, " vs ", lp.loss);
    SAE_CHECK(one.aux_loss > 0 && close(one.aux_loss, lp.aux_loss), "variant ", variant,
              ": aux loss ", one.aux_loss, " vs ", lp.aux_loss);
    SAE_CHECK(close(one.outer_sq_error, lp.outer_sq_error), "variant ", variant, ": sq error");
    for (size_t i = 0; i < one.level_loss.size(); ++i)
      SAE_CHECK(close(one.level_loss[i], lp.level_loss[i]), "variant ", variant, ": level ", i);
    SAE_CHECK(one.n_active == lp.n_active, "variant ", variant, ": n_active");
    // A rank's encoder GEMM covers only its block's columns; BLAS may sum the tail columns of a
    // narrow block in another order (seen with OpenBLAS 0.3.21 at 3 ranks: a last-bit change).
    SAE_CHECK(close(one.min_selected, lp.min_selected), "variant ", variant, ": min selected ",
              one.min_selected, " vs ", lp.min_selected);
    SAE_CHECK(one.n_dead == lp.n_dead, "variant ", variant, ": dead count");
    SAE_CHECK(std::equal(lp.fired.begin(), lp.fired.end(), one.fired.begin() + j0), "variant ",
              variant, ": fired flags");
    SAE_CHECK(close(one.grad_squared_norm, lp.grad_squared_norm), "variant ", variant,
              ": gradient norm ", one.grad_squared_norm, " vs ", lp.grad_squared_norm);
    std::vector<int32_t> want_touched, got_touched = g_lp.touched;
    for (int32_t j : g_one.touched)
      if (j >= j0 && j < j0 + n) want_touched.push_back(j - int32_t(j0));
    std::sort(want_touched.begin(), want_touched.end());
    std::sort(got_touched.begin(), got_touched.end());
    SAE_CHECK(want_touched == got_touched, "variant ", variant, ": touched rows");
    const std::vector<float> want_rows(g_one.W_dec.begin() + j0 * d,
                                       g_one.W_dec.begin() + (j0 + n) * d);
    SAE_CHECK(sae::test::max_relative_error(want_rows, g_lp.W_dec) <= 1e-5, "variant ", variant,
              ": dW_dec rows");
    SAE_CHECK(sae::test::max_relative_error(g_one.b_dec, g_lp.b_dec) <= 1e-5, "variant ", variant,
              ": b_dec gradient");

    AdamConfig adam;
    adam.beta1 = variant == 0 ? 0.9 : 0.0;
    TrainingSae sae_one = sae;
    Optimizer opt_one(sae_one, adam), opt_lp(part, adam);
    opt_one.step(sae_one, g_one, 1e-2);
    opt_lp.apply(part, g_lp, 1e-2, std::sqrt(lp.grad_squared_norm));
    const TrainingSae want = sae_one.latents(j0, j0 + n);
    for (auto [name, a, b] : {std::tuple{"W_encT", &want.W_encT, &part.W_encT},
                              std::tuple{"W_dec", &want.W_dec, &part.W_dec},
                              std::tuple{"b_enc", &want.b_enc, &part.b_enc},
                              std::tuple{"b_dec", &want.b_dec, &part.b_dec}}) {
      const double e = sae::test::max_relative_error(*a, *b);
      SAE_CHECK(e <= 1e-5, "variant ", variant, ": latent parallel ", name,
                " after the update off by ", e);
    }
  }
}

int main(int argc, char** argv) {
  int fail_rank = -1;
  for (int i = 1; i + 1 < argc; ++i)
    if (std::strcmp(argv[i], "--fail-rank") == 0) fail_rank = std::atoi(argv[i + 1]);
  sae::dist::init(&argc, &argv);
  const int rc = sae::dist::run_or_abort(
      [&] {
        sae::dist::Comm& w = sae::dist::world();
        const int r = w.rank(), n = w.size();
        if (r == fail_rank) sae::fail(sae::cat("rank ", r, " fails on purpose"));
        if (fail_rank >= 0) {
          w.barrier();  // the failed rank never comes: only abort ends this
          return 0;
        }
        // Sums: rank r contributes r + 1 + i to entry i.
        std::vector<float> f(1000);
        std::vector<double> d(3);
        for (size_t i = 0; i < f.size(); ++i) f[i] = float(r + 1 + int(i));
        for (size_t i = 0; i < d.size(); ++i) d[i] = 0.5 * (r + 1) + double(i);
        w.allreduce_sum(f);
        w.allreduce_sum(d);
        const double ranks_sum = n * (n + 1) / 2.0;
        for (size_t i = 0; i < f.size(); ++i)
          SAE_CHECK(f[i] == float(ranks_sum + n * double(i)), "float sum at ", i, ": ", f[i]);
        for (size_t i = 0; i < d.size(); ++i)
          SAE_CHECK(d[i] == 0.5 * ranks_sum + n * double(i), "double sum at ", i);
        std::vector<double> m = {double(r), -double(r)};
        w.allreduce_max(m);
        SAE_CHECK(m[0] == n - 1 && m[1] == 0, "max");
        const std::vector<double> mine = {double(r), double(10 * r)};
        std::vector<double> all(2 * size_t(n));
        w.allgather(mine, all);
        for (int q = 0; q < n; ++q)
          SAE_CHECK(all[2 * q] == q && all[2 * q + 1] == 10 * q, "allgather from rank ", q);
        std::vector<uint8_t> bytes = {uint8_t(r), uint8_t(r + 1)};
        w.broadcast(bytes, n - 1);
        SAE_CHECK(bytes[0] == n - 1 && bytes[1] == n, "broadcast from the last rank");
        // Split into even and odd ranks: each group's collectives stay inside it.
        {
          const std::unique_ptr<sae::dist::Comm> sub = w.split(r % 2);
          int members = 0;
          double rank_sum = 0;
          for (int q = r % 2; q < n; q += 2) ++members, rank_sum += q;
          SAE_CHECK(sub->size() == members && sub->rank() == r / 2, "split: rank ", sub->rank(),
                    " of ", sub->size());
          std::vector<double> v = {double(r)};
          sub->allreduce_sum(v);
          SAE_CHECK(v[0] == rank_sum, "split: sum ", v[0], " over ranks of parity ", r % 2);
        }
        // Blocks of a per-latent array (uneven: 11 latents) to rank 0, in one round and in
        // rounds of a few rows each (what a 1M-latent SAE needs for MPI's int counts).
        {
          const sae::train::LatentShard shard{&w, 11};
          const int64_t len = 3;
          std::vector<float> mine;
          for (int64_t j = shard.begin(); j < shard.begin() + shard.count(); ++j)
            for (int64_t c = 0; c < len; ++c) mine.push_back(float(j * 10 + c));
          for (int64_t max_floats : {int64_t(1) << 30, int64_t(4)}) {
            const std::vector<float> all =
                sae::train::gather_latent_rows(shard, mine, len, max_floats);
            if (r != 0) {
              SAE_CHECK(all.empty(), "gather: only rank 0 holds the whole");
              continue;
            }
            SAE_CHECK(all.size() == size_t(11 * len), "gather: size ", all.size());
            for (int64_t i = 0; i < 11 * len; ++i)
              SAE_CHECK(all[size_t(i)] == float(i / len * 10 + i % len), "gather at ", i,
                        " (rounds of ", max_floats, " floats)");
          }
        }
        check_global_batch_topk(w);
        check_data_parallel_step(w);
        check_global_batch_topk_columns(w);
        check_latent_parallel_step(w);
        w.barrier();
        std::printf("rank %d of %d ok (%s)\n", r, n, w.transport().c_str());
        return 0;
      },
      "dist_ranks");
  sae::dist::finalize();
  return rc;
}

#include "eval/latent_stats.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "core/error.h"
#include "io/safetensors.h"
#include "nlohmann/json.hpp"

namespace sae::eval {

namespace {

// A random 64-bit value from (seed, latent, counter): splitmix64 of their mix.
uint64_t hash3(uint64_t seed, uint64_t a, uint64_t b) {
  uint64_t z = seed + 0x9e3779b97f4a7c15ull * (a + 1) + 0xbf58476d1ce4e5b9ull * (b + 1);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

// The smallest power of two strictly above v (> 0).
float power_of_two_above(float v) {
  int e = 0;
  std::frexp(v, &e);  // v = m 2^e, m in [0.5, 1)
  return std::ldexp(1.0f, e);
}

}  // namespace

LatentStats::LatentStats(LatentStatsConfig cfg) : cfg_(cfg) {
  const char* where = "latent stats";
  if (cfg_.d_sae <= 0) fail(where, "d_sae", "must be positive");
  if (cfg_.interval_bins < 2 || cfg_.interval_bins % 2)
    fail(where, "interval_bins", "must be even and at least 2");
  if (cfg_.hist_bins < 2 || cfg_.hist_bins % 2) fail(where, "hist_bins", "must be even");
  for (int v : {cfg_.top_k, cfg_.interval_samples, cfg_.quantile_groups, cfg_.quantile_samples,
                cfg_.cofire_slots})
    if (v < 1) fail(where, "sizes", "every per-latent size must be at least 1");
  const size_t d = size_t(cfg_.d_sae);
  fires_.assign(d, 0);
  sum1_.assign(d, 0), sum2_.assign(d, 0), sum3_.assign(d, 0), sum4_.assign(d, 0);
  max_.assign(d, 0), top_edge_.assign(d, 0);
  hist_.assign(d * size_t(cfg_.hist_bins), 0);
  heap_.resize(d * size_t(cfg_.top_k));
  heap_size_.assign(d, 0);
  interval_.resize(d * size_t(cfg_.interval_bins * cfg_.interval_samples));
  interval_seen_.assign(d * size_t(cfg_.interval_bins), 0);
  quantile_.resize(d * size_t(cfg_.quantile_groups * cfg_.quantile_samples));
  cofire_.resize(d * size_t(cfg_.cofire_slots));
  cofire_used_.assign(d, 0);
}

void LatentStats::add(const SparseCodes& codes, int64_t first_token,
                      std::span<const uint8_t> counted) {
  if (codes.d_sae != cfg_.d_sae)
    fail("latent stats", "d_sae",
         cat("codes have ", codes.d_sae, " latents, expected ", cfg_.d_sae));
  if (int64_t(counted.size()) != codes.n_tokens)
    fail("latent stats", "counted", "one flag per token expected");
  // Latent-major view of the batch (counting sort): each latent's tokens in token order, so
  // latents are independent and threads take whole latents.
  const size_t d = size_t(cfg_.d_sae);
  std::vector<int64_t> start(d + 1, 0);
  for (int64_t t = 0; t < codes.n_tokens; ++t) {
    if (!counted[size_t(t)]) continue;
    ++tokens_;
    for (int64_t e = codes.offsets[size_t(t)]; e < codes.offsets[size_t(t) + 1]; ++e)
      if (codes.values[size_t(e)] != 0) ++start[size_t(codes.indices[size_t(e)]) + 1];
  }
  for (size_t f = 0; f < d; ++f) start[f + 1] += start[f];
  std::vector<int64_t> entry(size_t(start[d]));  // index into codes.indices/values
  std::vector<int32_t> row(size_t(start[d]));
  {
    std::vector<int64_t> next(start.begin(), start.end() - 1);
    for (int64_t t = 0; t < codes.n_tokens; ++t) {
      if (!counted[size_t(t)]) continue;
      for (int64_t e = codes.offsets[size_t(t)]; e < codes.offsets[size_t(t) + 1]; ++e) {
        if (codes.values[size_t(e)] == 0) continue;
        const int64_t p = next[size_t(codes.indices[size_t(e)])]++;
        entry[size_t(p)] = e;
        row[size_t(p)] = int32_t(t);
      }
    }
  }
#pragma omp parallel for schedule(dynamic, 64)
  for (int64_t f = 0; f < int64_t(d); ++f)
    for (int64_t p = start[size_t(f)]; p < start[size_t(f) + 1]; ++p) {
      const int32_t t = row[size_t(p)];
      const int64_t b = codes.offsets[size_t(t)], e = codes.offsets[size_t(t) + 1];
      add_one(f, first_token + t, codes.values[size_t(entry[size_t(p)])],
              std::span<const int32_t>(codes.indices.data() + b, size_t(e - b)));
    }
}

void LatentStats::add_one(int64_t f, int64_t token, float v, std::span<const int32_t> fired_with) {
  const size_t F = size_t(f);
  const int64_t n = ++fires_[F];
  const double a = v;
  sum1_[F] += a, sum2_[F] += a * a, sum3_[F] += a * a * a, sum4_[F] += a * a * a * a;
  max_[F] = std::max(max_[F], v);
  const float av = std::abs(v);  // BatchTopK codes are positive; the grid is over |a|
  if (top_edge_[F] == 0) top_edge_[F] = power_of_two_above(av);
  while (av >= top_edge_[F]) double_grid(f);

  // Histogram and interval reservoir.
  const int hb = cfg_.hist_bins, ib = cfg_.interval_bins, S = cfg_.interval_samples;
  const int h = std::min(hb - 1, int(av / top_edge_[F] * float(hb)));
  ++hist_[F * size_t(hb) + size_t(h)];
  const int i = std::min(ib - 1, int(av / top_edge_[F] * float(ib)));
  const size_t bin = F * size_t(ib) + size_t(i);
  const int64_t seen = ++interval_seen_[bin];
  Slot* res = &interval_[bin * size_t(S)];
  if (seen <= S) {
    res[seen - 1] = {token, v};
  } else {
    const uint64_t r = hash3(cfg_.seed, uint64_t(f), uint64_t(seen) * 2) % uint64_t(seen);
    if (r < uint64_t(S)) res[r] = {token, v};
  }
  // Uniform reservoir of all firing activations (quantile groups).
  const int Q = cfg_.quantile_groups * cfg_.quantile_samples;
  Slot* q = &quantile_[F * size_t(Q)];
  if (n <= Q) {
    q[n - 1] = {token, v};
  } else {
    const uint64_t r = hash3(cfg_.seed, uint64_t(f), uint64_t(n) * 2 + 1) % uint64_t(n);
    if (r < uint64_t(Q)) q[r] = {token, v};
  }
  // Top-k: a min-heap on value (an equal value does not displace an earlier token).
  auto greater = [](const Slot& x, const Slot& y) { return x.value > y.value; };
  Slot* heap = &heap_[F * size_t(cfg_.top_k)];
  int32_t& hs = heap_size_[F];
  if (hs < cfg_.top_k) {
    heap[hs++] = {token, v};
    std::push_heap(heap, heap + hs, greater);
  } else if (v > heap[0].value) {
    std::pop_heap(heap, heap + hs, greater);
    heap[hs - 1] = {token, v};
    std::push_heap(heap, heap + hs, greater);
  }
  // Co-firing partners (Space-Saving).
  const int C = cfg_.cofire_slots;
  Partner* part = &cofire_[F * size_t(C)];
  int32_t& used = cofire_used_[F];
  for (int32_t g : fired_with) {
    if (g == int32_t(f)) continue;
    int found = -1;
    for (int s = 0; s < used && found < 0; ++s)
      if (part[s].latent == g) found = s;
    if (found >= 0) {
      ++part[found].count;
    } else if (used < C) {
      part[used++] = {g, 1, 0};
    } else {
      int m = 0;
      for (int s = 1; s < C; ++s)
        if (part[s].count < part[m].count) m = s;
      part[m] = {g, part[m].count + 1, part[m].count};
    }
  }
}

void LatentStats::double_grid(int64_t f) {
  const size_t F = size_t(f);
  top_edge_[F] *= 2;
  const int hb = cfg_.hist_bins, ib = cfg_.interval_bins, S = cfg_.interval_samples;
  int64_t* h = &hist_[F * size_t(hb)];
  for (int b = 0; b < hb / 2; ++b) h[b] = h[2 * b] + h[2 * b + 1];
  std::fill(h + hb / 2, h + hb, 0);
  // Interval b of the new grid holds old intervals 2b and 2b + 1: a sample of their union,
  // each old sample standing for seen/kept tokens of its own interval.
  int64_t* seen = &interval_seen_[F * size_t(ib)];
  Slot* res = &interval_[F * size_t(ib) * size_t(S)];
  std::vector<Slot> pool;
  std::vector<double> weight;
  for (int b = 0; b < ib / 2; ++b) {
    pool.clear(), weight.clear();
    for (int old : {2 * b, 2 * b + 1}) {
      const int64_t kept = std::min<int64_t>(seen[old], S);
      for (int64_t s = 0; s < kept; ++s) {
        pool.push_back(res[size_t(old * S + s)]);
        weight.push_back(double(seen[old]) / double(kept));
      }
    }
    const int64_t total = seen[2 * b] + seen[2 * b + 1];
    const size_t take = std::min(pool.size(), size_t(S));
    for (size_t j = 0; j < take; ++j) {  // weighted draws without replacement
      double w_sum = 0;
      for (size_t p = j; p < pool.size(); ++p) w_sum += weight[p];
      const double u = double(hash3(cfg_.seed, uint64_t(f), (uint64_t(total) << 8) + j) >> 11) *
                       0x1.0p-53 * w_sum;
      size_t pick = j;
      for (double acc = weight[j]; pick + 1 < pool.size() && acc <= u; acc += weight[++pick]) {
      }
      std::swap(pool[j], pool[pick]);
      std::swap(weight[j], weight[pick]);
      res[size_t(b * S) + j] = pool[j];
    }
    seen[b] = total;
  }
  std::fill(seen + ib / 2, seen + ib, 0);
}

LatentSummary LatentStats::summary(int64_t f) const {
  const size_t F = size_t(f);
  LatentSummary s;
  s.fires = fires_[F];
  if (s.fires == 0) return s;
  const double n = double(s.fires);
  s.max = max_[F];
  s.mean = sum1_[F] / n;
  s.mean_sq = sum2_[F] / n;
  const double m = s.mean, e2 = s.mean_sq, e3 = sum3_[F] / n, e4 = sum4_[F] / n;
  const double var = std::max(0.0, e2 - m * m);
  if (var > 1e-12 * std::max(e2, 1e-30)) {
    s.skew = (e3 - 3 * m * e2 + 2 * m * m * m) / std::pow(var, 1.5);
    s.kurtosis = (e4 - 4 * m * e3 + 6 * m * m * e2 - 3 * m * m * m * m) / (var * var) - 3;
  }
  auto by_value = [](const Example& x, const Example& y) {
    return x.value != y.value ? x.value > y.value : x.token < y.token;
  };
  const int hb = cfg_.hist_bins, ib = cfg_.interval_bins, S = cfg_.interval_samples;
  s.hist_width = top_edge_[F] / float(hb);
  s.hist.assign(&hist_[F * size_t(hb)], &hist_[F * size_t(hb)] + hb);
  while (!s.hist.empty() && s.hist.back() == 0) s.hist.pop_back();

  for (int32_t i = 0; i < heap_size_[F]; ++i) {
    const Slot& x = heap_[F * size_t(cfg_.top_k) + size_t(i)];
    s.top.push_back({x.token, x.value});
  }
  std::sort(s.top.begin(), s.top.end(), by_value);

  const float w = top_edge_[F] / float(ib);
  for (int b = ib - 1; b >= 0; --b) {
    const int64_t seen = interval_seen_[F * size_t(ib) + size_t(b)];
    if (seen == 0) continue;
    ExampleGroup g{w * float(b), w * float(b + 1), seen, {}};
    for (int64_t j = 0; j < std::min<int64_t>(seen, S); ++j) {
      const Slot& x = interval_[(F * size_t(ib) + size_t(b)) * size_t(S) + size_t(j)];
      g.examples.push_back({x.token, x.value});
    }
    std::sort(g.examples.begin(), g.examples.end(), by_value);
    s.intervals.push_back(std::move(g));
  }

  const int Q = cfg_.quantile_groups * cfg_.quantile_samples;
  std::vector<Example> sample;
  for (int64_t j = 0; j < std::min<int64_t>(s.fires, Q); ++j) {
    const Slot& x = quantile_[F * size_t(Q) + size_t(j)];
    sample.push_back({x.token, x.value});
  }
  std::sort(sample.begin(), sample.end(), by_value);  // highest first
  const int64_t groups = std::min<int64_t>(cfg_.quantile_groups, int64_t(sample.size()));
  for (int64_t g = 0; g < groups; ++g) {
    const size_t a = size_t(g) * sample.size() / size_t(groups);
    const size_t b = size_t(g + 1) * sample.size() / size_t(groups);
    ExampleGroup q{sample[b - 1].value, sample[a].value, s.fires / groups, {}};
    q.examples.assign(sample.begin() + long(a), sample.begin() + long(b));
    s.quantiles.push_back(std::move(q));
  }

  const Partner* part = &cofire_[F * size_t(cfg_.cofire_slots)];
  s.cofire.assign(part, part + cofire_used_[F]);
  std::sort(s.cofire.begin(), s.cofire.end(), [](const Partner& x, const Partner& y) {
    return x.count != y.count ? x.count > y.count : x.latent < y.latent;
  });
  return s;
}

namespace {

nlohmann::json config_json(const LatentStatsConfig& c) {
  return {{"d_sae", c.d_sae},
          {"top_k", c.top_k},
          {"interval_bins", c.interval_bins},
          {"interval_samples", c.interval_samples},
          {"quantile_groups", c.quantile_groups},
          {"quantile_samples", c.quantile_samples},
          {"hist_bins", c.hist_bins},
          {"cofire_slots", c.cofire_slots},
          {"seed", c.seed}};
}

// Copies tensor `name` of `f` into v, which must have its size already; dtype checked.
template <class T>
void read_into(const SafetensorsFile& f, const std::string& name, DType dtype, std::vector<T>& v) {
  const TensorInfo& t = f.info(name);
  if (t.dtype != dtype || t.numel() != int64_t(v.size()))
    fail(f.path(), name, cat("expected ", v.size(), " values of ", dtype_name(dtype)));
  std::memcpy(v.data(), f.bytes(t).data(), v.size() * sizeof(T));
}

}  // namespace

void LatentStats::save(const std::string& path) const {
  const int64_t n_heap = int64_t(heap_.size()), n_int = int64_t(interval_.size()),
                n_q = int64_t(quantile_.size()), n_co = int64_t(cofire_.size());
  std::vector<int64_t> heap_tok, int_tok, q_tok, co_count, co_error;
  std::vector<float> heap_val, int_val, q_val;
  std::vector<int32_t> co_lat;
  for (const Slot& x : heap_) heap_tok.push_back(x.token), heap_val.push_back(x.value);
  for (const Slot& x : interval_) int_tok.push_back(x.token), int_val.push_back(x.value);
  for (const Slot& x : quantile_) q_tok.push_back(x.token), q_val.push_back(x.value);
  for (const Partner& p : cofire_)
    co_lat.push_back(p.latent), co_count.push_back(p.count), co_error.push_back(p.error);
  const std::vector<int64_t> tokens = {tokens_};
  const int64_t d = cfg_.d_sae;
  write_safetensors(path,
                    {tensor_view("tokens", std::span<const int64_t>(tokens), {1}),
                     tensor_view("fires", std::span<const int64_t>(fires_), {d}),
                     tensor_view("sum1", std::span<const double>(sum1_), {d}),
                     tensor_view("sum2", std::span<const double>(sum2_), {d}),
                     tensor_view("sum3", std::span<const double>(sum3_), {d}),
                     tensor_view("sum4", std::span<const double>(sum4_), {d}),
                     tensor_view("max", std::span<const float>(max_), {d}),
                     tensor_view("top_edge", std::span<const float>(top_edge_), {d}),
                     tensor_view("hist", std::span<const int64_t>(hist_), {int64_t(hist_.size())}),
                     tensor_view("heap_token", std::span<const int64_t>(heap_tok), {n_heap}),
                     tensor_view("heap_value", std::span<const float>(heap_val), {n_heap}),
                     tensor_view("heap_size", std::span<const int32_t>(heap_size_), {d}),
                     tensor_view("interval_token", std::span<const int64_t>(int_tok), {n_int}),
                     tensor_view("interval_value", std::span<const float>(int_val), {n_int}),
                     tensor_view("interval_seen", std::span<const int64_t>(interval_seen_),
                                 {int64_t(interval_seen_.size())}),
                     tensor_view("quantile_token", std::span<const int64_t>(q_tok), {n_q}),
                     tensor_view("quantile_value", std::span<const float>(q_val), {n_q}),
                     tensor_view("cofire_latent", std::span<const int32_t>(co_lat), {n_co}),
                     tensor_view("cofire_count", std::span<const int64_t>(co_count), {n_co}),
                     tensor_view("cofire_error", std::span<const int64_t>(co_error), {n_co}),
                     tensor_view("cofire_used", std::span<const int32_t>(cofire_used_), {d})},
                    {{"latent_stats_config", config_json(cfg_).dump()}});
}

void LatentStats::load(const std::string& path) {
  const SafetensorsFile f(path);
  const auto meta = f.metadata().find("latent_stats_config");
  if (meta == f.metadata().end() || nlohmann::json::parse(meta->second) != config_json(cfg_))
    fail(path, "latent_stats_config", "holds statistics of another configuration");
  std::vector<int64_t> tokens(1), heap_tok(heap_.size()), int_tok(interval_.size()),
      q_tok(quantile_.size()), co_count(cofire_.size()), co_error(cofire_.size());
  std::vector<float> heap_val(heap_.size()), int_val(interval_.size()), q_val(quantile_.size());
  std::vector<int32_t> co_lat(cofire_.size());
  read_into(f, "tokens", DType::I64, tokens);
  read_into(f, "fires", DType::I64, fires_);
  read_into(f, "sum1", DType::F64, sum1_);
  read_into(f, "sum2", DType::F64, sum2_);
  read_into(f, "sum3", DType::F64, sum3_);
  read_into(f, "sum4", DType::F64, sum4_);
  read_into(f, "max", DType::F32, max_);
  read_into(f, "top_edge", DType::F32, top_edge_);
  read_into(f, "hist", DType::I64, hist_);
  read_into(f, "heap_token", DType::I64, heap_tok);
  read_into(f, "heap_value", DType::F32, heap_val);
  read_into(f, "heap_size", DType::I32, heap_size_);
  read_into(f, "interval_token", DType::I64, int_tok);
  read_into(f, "interval_value", DType::F32, int_val);
  read_into(f, "interval_seen", DType::I64, interval_seen_);
  read_into(f, "quantile_token", DType::I64, q_tok);
  read_into(f, "quantile_value", DType::F32, q_val);
  read_into(f, "cofire_latent", DType::I32, co_lat);
  read_into(f, "cofire_count", DType::I64, co_count);
  read_into(f, "cofire_error", DType::I64, co_error);
  read_into(f, "cofire_used", DType::I32, cofire_used_);
  tokens_ = tokens[0];
  for (size_t i = 0; i < heap_.size(); ++i) heap_[i] = {heap_tok[i], heap_val[i]};
  for (size_t i = 0; i < interval_.size(); ++i) interval_[i] = {int_tok[i], int_val[i]};
  for (size_t i = 0; i < quantile_.size(); ++i) quantile_[i] = {q_tok[i], q_val[i]};
  for (size_t i = 0; i < cofire_.size(); ++i) cofire_[i] = {co_lat[i], co_count[i], co_error[i]};
}

}  // namespace sae::eval

// What a release pays per SAE besides its training steps, at the seed's shape (d_in 2304, d_sae
// 32768, widths 128..32768, batch 4096, 16384 held-out tokens): the held-out evaluation (every
// training.eval_every_steps), the progress line's batch variance (every log step) and the
// checkpoint (every --checkpoint-minutes). Each on the host, as a CPU trainer does them, and,
// where a GPU is visible, as a GPU trainer does them now (the inference SAE made on the device
// and evaluated there through DeviceSae, the levels' errors included; the variance on the
// device; the checkpoint's state pulled from the device). Prints the cost per SAE and per round
// of the seed's 50 SAEs.
//   build/release/bench/bench_upkeep [--heldout 16384] [--host-eval 1] [--dir /tmp]
#include <cstdio>
#include <filesystem>
#include <string>

#include "bench_util.h"
#include "core/device.h"
#include "core/rng.h"
#include "eval/metrics.h"
#include "sae/device_sae.h"
#include "train/device_step.h"
#include "train/optimizer.h"
#include "train/train_config.h"
#include "train/trainer.h"

using namespace sae;

int main(int argc, char** argv) {
  int64_t heldout = 16384, host_eval = 1;
  std::string dir = "/tmp";
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string a = argv[i], v = argv[i + 1];
    if (a == "--heldout")
      heldout = std::stoll(v);
    else if (a == "--host-eval")
      host_eval = std::stoll(v);
    else if (a == "--dir")
      dir = v;
    else {
      std::fprintf(stderr, "unknown option %s\n", a.c_str());
      return 2;
    }
  }
  bench::print_header(argc, argv);
  nlohmann::json j = train::preset("gemma-2-2b-matryoshka-standard");
  j["data"] = {{"type", "synthetic"}};
  const train::TrainConfig cfg = train::TrainConfig::from_json(j, "bench");
  train::TrainSpec spec = cfg.spec;
  spec.d_in = 2304;
  const int64_t d = spec.d_in, D = spec.d_sae, B = cfg.batch_size;
  std::printf("config: d_in %lld, d_sae %lld, %zu levels, batch %lld, %lld held-out tokens\n",
              (long long)d, (long long)D, spec.widths.size(), (long long)B, (long long)heldout);
  train::TrainingSae sae(spec);
  sae.init(0, 0.1);
  sae.threshold = 0.3;  // pre-activations of std ~0.1 (decoder rows of norm 0.1): ~3 sigma
  double t0 = now_seconds();
  const Sae inference = sae.to_inference(1.0, true, nlohmann::ordered_json::object());
  const double to_inference_s = now_seconds() - t0;
  Rng rng(3);
  std::vector<float> x(size_t(heldout * d)), batch(size_t(B * d));
  for (auto& v : x) v = float(rng.normal());
  for (auto& v : batch) v = float(rng.normal());
  const double n_saes = 50;
  auto report = [&](const char* what, double s) {
    std::printf("%-44s %9.3f s per SAE  %9.1f s per round of %.0f SAEs\n", what, s, s * n_saes,
                n_saes);
  };

  // The inference SAE from the training state (transposed, norms folded): every evaluation does
  // this on the host, a GPU trainer's after pulling the weights from the device.
  report("inference SAE from the training state", to_inference_s);
  // The progress line's batch variance on the host (a CPU trainer; a GPU trainer did this too,
  // after copying the batch to the host, until it moved to the device).
  t0 = now_seconds();
  const double host_var = train::sum_sq_deviation(batch.data(), B, d);
  report("batch variance, host", now_seconds() - t0);

  {  // the host's share of the device's evaluation: the metrics from the codes and x_hat
    const SparseCodes codes = inference.encode(
        {x.data(), size_t(std::min<int64_t>(heldout, 1024) * d)}, std::min<int64_t>(heldout, 1024));
    SparseCodes all = codes;  // the first 1024 tokens' codes repeated: only the sums' cost matters
    all.n_tokens = heldout;
    all.offsets.assign(1, 0);
    all.indices.clear(), all.values.clear();
    for (int64_t t = 0; t < heldout; ++t) {
      const int64_t s0 = codes.offsets[size_t(t % 1024)], s1 = codes.offsets[size_t(t % 1024 + 1)];
      all.indices.insert(all.indices.end(), codes.indices.begin() + s0, codes.indices.begin() + s1);
      all.values.insert(all.values.end(), codes.values.begin() + s0, codes.values.begin() + s1);
      all.offsets.push_back(int64_t(all.indices.size()));
    }
    const std::vector<float> x_hat(x.size(), 0.5f);
    t0 = now_seconds();
    MetricsAccumulator acc(d, D);
    acc.add_batch(x, x_hat, all);
    const Metrics m = acc.finish();
    report("metrics sums on the host (of the device's)", now_seconds() - t0);
    std::printf("  (L0 %.2f)\n", m.l0);
  }

  if (host_eval) {
    t0 = now_seconds();
    const train::EvalResult r = train::evaluate(inference, spec.widths, x.data(), heldout);
    report("evaluation, host (train::evaluate)", now_seconds() - t0);
    std::printf("  L0 %.2f, EV %.4f\n", r.metrics.l0, r.metrics.explained_variance);
  }

  // A checkpoint, as the release writes them beside the steps: the state taken (what the steps
  // pause for: on the CPU a copy into host memory) and written (on the writer's thread).
  {
    const train::Optimizer opt(sae, cfg.adam);  // Adam's beta1 = 0: no first moment
    t0 = now_seconds();
    train::CheckpointData c;
    c.output_dir = (std::filesystem::path(dir) / "bench_upkeep").string();
    c.d_in = d, c.d_sae = D, c.threshold = sae.threshold, c.state = {{"step", 0}};
    c.W_encT = sae.W_encT, c.W_dec = sae.W_dec, c.b_enc = sae.b_enc, c.b_dec = sae.b_dec;
    c.v_W_encT = opt.v_W_encT, c.v_W_dec = opt.v_W_dec, c.v_b_enc = opt.v_b_enc;
    c.v_b_dec = opt.v_b_dec;
    c.steps_since_fired.assign(size_t(D), 0), c.window_counts.assign(size_t(D), 0);
    report("checkpoint: state taken (host copy)", now_seconds() - t0);
    t0 = now_seconds();  // again into the same arrays: their pages already mapped
    c.W_encT.assign(sae.W_encT.begin(), sae.W_encT.end());
    c.W_dec.assign(sae.W_dec.begin(), sae.W_dec.end());
    c.v_W_encT.assign(opt.v_W_encT.begin(), opt.v_W_encT.end());
    c.v_W_dec.assign(opt.v_W_dec.begin(), opt.v_W_dec.end());
    report("checkpoint: state taken (into recycled arrays)", now_seconds() - t0);
    t0 = now_seconds();
    train::write_checkpoint(c);
    const double s = now_seconds() - t0;
    const double bytes =
        double(std::filesystem::file_size(c.output_dir + "/checkpoint/state.safetensors"));
    std::filesystem::remove_all(c.output_dir);
    report("checkpoint write (write_checkpoint)", s);
    std::printf("  %.2f GB per SAE at %.2f GB/s to %s\n", bytes * 1e-9, bytes * 1e-9 / s,
                dir.c_str());
  }

  if (cuda_device_count() == 0) {
    std::printf("no GPU visible: the device's evaluation and variance are not measured\n");
    return 0;
  }
  std::printf("device: %s\n", cuda_device_description().c_str());
  {
    train::DeviceTrainer dev(spec, cfg.adam, B, "bf16");
    const train::Optimizer opt(sae, cfg.adam);
    dev.upload(sae, opt, std::vector<int64_t>(size_t(D), 0), std::vector<int64_t>(size_t(D), 0));
    std::copy(batch.begin(), batch.end(), dev.host_batch());
    dev.step(1.0, 0.0, 1, 1000, false);   // the batch on the device, as after a step
    double v = dev.batch_sq_deviation();  // a warm-up
    t0 = now_seconds();
    for (int r = 0; r < 10; ++r) v = dev.batch_sq_deviation();
    report("batch variance, device", (now_seconds() - t0) / 10);
    std::printf("  relative difference to the host's: %.2e\n", std::abs(v - host_var) / host_var);
  }
  {  // a GPU trainer's pause per SAE in a checkpoint: its state pulled into host memory, fresh
     // (the first of a round) or the arrays of a written checkpoint (CheckpointWriter's spares)
    train::DeviceTrainer dev(spec, cfg.adam, B, "bf16");
    dev.upload(sae, train::Optimizer(sae, cfg.adam), std::vector<int64_t>(size_t(D), 0),
               std::vector<int64_t>(size_t(D), 0));
    train::TrainingSae host(spec);
    train::Optimizer o(host, cfg.adam);
    std::vector<int64_t> since, counts;
    for (int r = 0; r < 3; ++r) {  // the first pays the warm-ups
      if (r < 2)
        for (auto* v : {&host.W_encT, &host.W_dec, &o.v_W_encT, &o.v_W_dec})
          std::vector<float>().swap(*v);
      t0 = now_seconds();
      dev.download(host, &o, &since, &counts);
      if (r == 1) report("checkpoint: state pulled from the device", now_seconds() - t0);
      if (r == 2) report("  the same into recycled arrays", now_seconds() - t0);
    }
  }
  // A GPU trainer's evaluation: the inference SAE made on the device from the training state
  // (DeviceTrainer::inference_sae), then encoded, decoded and scored there. Beside it, the
  // host's inference SAE uploaded (what the trainer would do after pulling its weights).
  const double sq_dev = train::sum_sq_deviation(x.data(), heldout, d);
  {
    train::DeviceTrainer dev(spec, cfg.adam, B, "bf16");
    const train::Optimizer opt(sae, cfg.adam);
    dev.upload(sae, opt, {}, {});
    for (int r = 0; r < 2; ++r) {  // the first pays the warm-ups
      t0 = now_seconds();
      const auto made = dev.inference_sae(1.0, true, sae.inference_config({}));
      const train::EvalResult e = train::evaluate(*made, spec.widths, x.data(), heldout, sq_dev);
      if (r == 1) {
        report("evaluation, device (inference SAE made there)", now_seconds() - t0);
        std::printf("  L0 %.2f, EV %.4f\n", e.metrics.l0, e.metrics.explained_variance);
      }
    }
  }
  t0 = now_seconds();
  DeviceSae uploaded(inference, "fp32");
  const train::EvalResult e = train::evaluate(uploaded, spec.widths, x.data(), heldout, sq_dev);
  report("evaluation, device (host's SAE uploaded)", now_seconds() - t0);
  std::printf("  L0 %.2f, EV %.4f (plus the weights' download and to_inference above)\n",
              e.metrics.l0, e.metrics.explained_variance);
  return 0;
}

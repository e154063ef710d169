// The training loop: resume is bit-identical, configs are strict, the saved SAE reproduces
// the training-time codes, and the loss choice behaves as the snap-loss argument predicts.
#include <gtest/gtest.h>
#include <unistd.h>

#include <cmath>
#include <functional>
#include <limits>
#include <tuple>

#include "core/error.h"
#include "core/finite.h"
#include "core/rng.h"
#include "data/synthetic.h"
#include "io/folder_lock.h"
#include "io/json_file.h"
#include "io/npy.h"
#include "io/safetensors.h"
#include "pipeline/job_status.h"
#include "sae/load.h"
#include "test_util.h"
#include "train/checkpoint_writer.h"
#include "train/trainer.h"

namespace sae::train {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;

TEST(Trainer, KillAndResumeIsBitIdentical) {
  test::TempDir dir;
  auto run = [&](const std::string& out, int64_t stop_at, double beta1 = 0.9) {
    json j = test::tiny_trainer_config(out);
    j["optimizer"]["adam_beta1"] = beta1;
    TrainConfig cfg = TrainConfig::from_json(j, "test");
    data::SyntheticSource src(data::SyntheticConfig::from_json(cfg.data, "test"));
    Trainer t(cfg, src, "test");
    bool finished = t.run(false, stop_at);
    if (!finished) {  // a fresh process resumes from the checkpoint
      Trainer t2(cfg, src, "test");
      EXPECT_TRUE(t2.run(true));
      return std::make_pair(t2.sae().W_dec, t2.sae().threshold);
    }
    return std::make_pair(t.sae().W_dec, t.sae().threshold);
  };
  auto a = run(dir / "straight", -1);
  auto b = run(dir / "killed", 23);  // between checkpoints: resumes from the stop's checkpoint
  EXPECT_EQ(a.first, b.first);
  EXPECT_EQ(a.second, b.second);
  for (const char* f : {"sae/sae_weights.safetensors", "sae/sparsity.safetensors", "sae/cfg.json"})
    EXPECT_EQ(test::read_bytes(dir / (std::string("straight/") + f)),
              test::read_bytes(dir / (std::string("killed/") + f)))
        << f;
  // Without momentum (the release recipe) no first moment is kept, and resume is as exact.
  auto c = run(dir / "straight0", -1, 0.0);
  auto e = run(dir / "killed0", 23, 0.0);
  EXPECT_EQ(c.first, e.first);
  EXPECT_EQ(c.second, e.second);
  EXPECT_NE(c.first, a.first);
  SafetensorsFile ckpt(dir / "killed0/checkpoint/state.safetensors");
  EXPECT_FALSE(ckpt.has("m_W_encT"));
  EXPECT_TRUE(ckpt.has("v_W_encT"));
  // The log holds progress and eval records with the fields the progress line shows, and the
  // checkpoints on the schedule (steps 15 and 30; the final one is not on the schedule).
  std::ifstream log(dir / "straight/log.jsonl");
  std::string line;
  int evals = 0, steps = 0;
  std::vector<int64_t> checkpoints;
  while (std::getline(log, line)) {
    json r = json::parse(line);
    if (r.contains("eval")) {
      ++evals;
      EXPECT_TRUE(r["eval"].contains("explained_variance"));
    } else if (r.contains("checkpoint")) {
      checkpoints.push_back(r["checkpoint"].get<int64_t>());
    } else {
      ++steps;
      EXPECT_TRUE(r.contains("tokens_per_s") && r.contains("l0") && r.contains("loss"));
    }
  }
  EXPECT_EQ(evals, 4);  // steps 10, 20, 30 and the final one
  EXPECT_EQ(steps, 4);
  EXPECT_EQ(checkpoints, (std::vector<int64_t>{15, 30}));
}

// run() writes the checkpoints on its schedule on a thread while the steps go on; on every
// step the writer cannot keep up and the steps wait for it. The SAE ends bit for bit as a run
// that never checkpointed, straight or stopped (the checkpoint being written at the stop is
// the one it resumes from) and resumed; each checkpoint has its log record.
TEST(Trainer, RunWritesItsCheckpointsBesideTheSteps) {
  test::TempDir dir;
  auto make = [&](const std::string& out, int64_t every) {
    json j = test::tiny_trainer_config(out);
    j["training"]["checkpoint_every_steps"] = every;
    return TrainConfig::from_json(j, "test");
  };
  auto final_weights = [&](const std::string& out) {
    return test::read_bytes(out + "/sae/sae_weights.safetensors");
  };
  auto checkpoint_records = [&](const std::string& out, const TrainConfig& cfg) {
    std::vector<int64_t> steps;
    std::ifstream log(out + "/log.jsonl");
    for (std::string line; std::getline(log, line);) {
      const json r = json::parse(line);
      if (!r.contains("checkpoint")) continue;
      steps.push_back(r["checkpoint"].get<int64_t>());
      EXPECT_EQ(r["bytes"].get<int64_t>(), Trainer::planned_checkpoint_bytes(cfg, 24)) << line;
      EXPECT_LE(r["paused_s"].get<double>(), r["seconds"].get<double>() + 1e-6) << line;
    }
    return steps;
  };
  const TrainConfig none = make(dir / "none", 0);
  data::SyntheticSource src(data::SyntheticConfig::from_json(none.data, "test"));
  ASSERT_TRUE(Trainer(none, src, "test").run(false));
  EXPECT_TRUE(checkpoint_records(dir / "none", none).empty());

  const TrainConfig every = make(dir / "every", 1);
  ASSERT_TRUE(Trainer(every, src, "test").run(false));
  EXPECT_EQ(final_weights(dir / "none"), final_weights(dir / "every"));
  std::vector<int64_t> all;
  for (int64_t s = 1; s < 40; ++s) all.push_back(s);
  EXPECT_EQ(checkpoint_records(dir / "every", every), all);
  EXPECT_EQ(read_json_file(dir / "every/checkpoint/state.json")["step"], 40);  // finish()'s

  const TrainConfig stopped = make(dir / "stopped", 1);
  EXPECT_FALSE(Trainer(stopped, src, "test").run(false, 23));
  EXPECT_EQ(read_json_file(dir / "stopped/checkpoint/state.json")["step"], 23);
  std::vector<int64_t> to_23(all.begin(), all.begin() + 23);
  EXPECT_EQ(checkpoint_records(dir / "stopped", stopped), to_23);
  ASSERT_TRUE(Trainer(stopped, src, "test").run(true));
  EXPECT_EQ(final_weights(dir / "none"), final_weights(dir / "stopped"));
  EXPECT_EQ(checkpoint_records(dir / "stopped", stopped), all);
}

// A step whose loss turns NaN or infinite stops the run with an error that says why (bad data,
// with the value's place, or divergence) before anything of it is logged or saved: the last
// checkpoint stays as it was, and resuming from it on clean data ends at the SAE of a run that
// never met the bad batch.
TEST(Trainer, NonFiniteStepStopsWithTheLastCheckpointIntact) {
  test::TempDir dir;
  auto run_spoiled = [&](const std::string& out, std::function<void(float*, int64_t)> spoil,
                         int64_t max_rollbacks = 3) {
    json j = test::tiny_trainer_config(out);
    j["training"]["max_rollbacks"] = max_rollbacks;
    const TrainConfig cfg = TrainConfig::from_json(j, "test");
    data::SyntheticSource clean(data::SyntheticConfig::from_json(cfg.data, "test"));
    test::SpoiledSource spoiled(clean, 17, std::move(spoil));  // the 18th step's batch on
    try {
      Trainer(cfg, spoiled, "test").run(false);
    } catch (const Error& e) {
      return std::string(e.what());
    }
    ADD_FAILURE() << "the run ended without an error";
    return std::string();
  };
  const std::string nan = run_spoiled(dir / "nan", [](float* x, int64_t) { x[5 * 24 + 3] = NAN; });
  EXPECT_NE(nan.find("test: step 18: the loss is nan"), std::string::npos) << nan;
  EXPECT_NE(nan.find(") holds nan at row 5, column 3: bad activations"), std::string::npos) << nan;
  EXPECT_NE(nan.find("the checkpoint of step 15 is intact"), std::string::npos) << nan;
  // On disk: the checkpoint of step 15, finite, and no record past it in the log.
  EXPECT_EQ(read_json_file(dir / "nan/checkpoint/state.json")["step"], 15);
  SafetensorsFile ckpt(dir / "nan/checkpoint/state.safetensors");
  for (const char* t : {"W_encT", "W_dec", "b_enc", "b_dec", "v_W_encT", "v_W_dec"}) {
    const std::vector<float> v = ckpt.read_f32(t);
    EXPECT_EQ(first_non_finite(v), -1) << t;
  }
  std::ifstream log(dir / "nan/log.jsonl");
  for (std::string line; std::getline(log, line);) {
    const json r = json::parse(line);
    EXPECT_LE(r.value("step", r.value("checkpoint", int64_t(0))), 15) << line;
  }
  // Resumed on clean data: the SAE of a clean run, bit for bit.
  const TrainConfig resumed =
      TrainConfig::from_json(test::tiny_trainer_config(dir / "nan"), "test");
  data::SyntheticSource clean(data::SyntheticConfig::from_json(resumed.data, "test"));
  ASSERT_TRUE(Trainer(resumed, clean, "test").run(true));
  const TrainConfig straight =
      TrainConfig::from_json(test::tiny_trainer_config(dir / "clean"), "test");
  ASSERT_TRUE(Trainer(straight, clean, "test").run(false));
  EXPECT_EQ(test::read_bytes(dir / "nan/sae/sae_weights.safetensors"),
            test::read_bytes(dir / "clean/sae/sae_weights.safetensors"));

  // Values finite in the batch but too large for f32 arithmetic: a divergence, so said (with
  // rollbacks off: training.max_rollbacks = 0).
  auto huge = [](float* x, int64_t n) {
    for (int64_t i = 0; i < n; ++i) x[i] = x[i] < 0 ? -1e30f : 1e30f;
  };
  const std::string diverged = run_spoiled(dir / "huge", huge, 0);
  EXPECT_NE(diverged.find("test: step 18: the loss is "), std::string::npos) << diverged;
  EXPECT_NE(diverged.find(") is finite (largest magnitude 4.2946e+30), so the training diverged "
                          "(a lower optimizer.lr"),
            std::string::npos)
      << diverged;
  EXPECT_EQ(read_json_file(dir / "huge/checkpoint/state.json")["step"], 15);
  // Diverging on every batch from the 18th: rolled back three times (steps 18, 19, 20, each to
  // the checkpoint of step 15), then stopped at the fourth with that checkpoint intact.
  const std::string again = run_spoiled(dir / "again", huge);
  EXPECT_NE(again.find("test: step 21: the loss is "), std::string::npos) << again;
  EXPECT_NE(again.find("so the training diverged again after 3 rollbacks "
                       "(training.max_rollbacks = 3)"),
            std::string::npos)
      << again;
  EXPECT_NE(again.find("the checkpoint of step 15 is intact"), std::string::npos) << again;
  EXPECT_EQ(read_json_file(dir / "again/checkpoint/state.json")["step"], 15);
  // Before the first checkpoint there is nothing to roll back to.
  json early_cfg = test::tiny_trainer_config(dir / "early");
  const TrainConfig early = TrainConfig::from_json(early_cfg, "test");
  data::SyntheticSource src(data::SyntheticConfig::from_json(early.data, "test"));
  test::SpoiledSource spoiled(src, 5, huge, 6);
  try {
    Trainer(early, spoiled, "test").run(false);
    ADD_FAILURE() << "diverged before any checkpoint and went on";
  } catch (const Error& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find("test: step 6: "), std::string::npos) << msg;
    EXPECT_NE(msg.find("no checkpoint yet: run it again from the start"), std::string::npos) << msg;
  }
}

// A step that diverges on a finite batch (here one batch of values too large for f32, as an
// outlier in real activations can be) rolls the SAE back to its last checkpoint and skips the
// batches since: the run ends, the skip is in the log, the checkpoints and the done line, and a
// run stopped after the rollback resumes to the same SAE bit for bit.
TEST(Trainer, DivergenceRollsBackToTheLastCheckpointAndSkipsOn) {
  test::TempDir dir;
  auto huge = [](float* x, int64_t n) {
    for (int64_t i = 0; i < n; ++i) x[i] = x[i] < 0 ? -1e30f : 1e30f;
  };
  auto run = [&](const std::string& out, int64_t stop_at, bool resume, bool spoil) {
    const TrainConfig cfg = TrainConfig::from_json(test::tiny_trainer_config(out), "test");
    data::SyntheticSource clean(data::SyntheticConfig::from_json(cfg.data, "test"));
    test::SpoiledSource spoiled(clean, 17, huge, spoil ? 18 : 17);  // the 18th step's batch
    Trainer t(cfg, spoiled, "test");
    const bool done = t.run(resume, stop_at);
    return std::tuple{done, t.rollbacks().size(), t.skipped_steps(),
                      t.final_eval().metrics.explained_variance};
  };
  const auto [done, rollbacks, skipped, ev] = run(dir / "rolled", -1, false, true);
  ASSERT_TRUE(done);
  EXPECT_EQ(rollbacks, 1u);
  EXPECT_EQ(skipped, 3);  // batches 16, 17 and 18 (its own)
  // The log: one rollback record, and the steps in order (none logged twice past it).
  std::vector<json> records;
  std::ifstream log(dir / "rolled/log.jsonl");
  for (std::string line; std::getline(log, line);) records.push_back(json::parse(line));
  int64_t n_rollbacks = 0, last_step = 0;
  for (const json& r : records) {
    if (r.contains("rollback")) {
      ++n_rollbacks;
      EXPECT_EQ(r["rollback"]["step"], 18);
      EXPECT_EQ(r["rollback"]["to_step"], 15);
      EXPECT_EQ(r["rollback"]["skipped_steps"], 3);
      EXPECT_NE(r["rollback"]["why"].get<std::string>().find("the loss is "), std::string::npos);
    }
    if (r.contains("step")) {
      EXPECT_GE(r["step"].get<int64_t>(), last_step) << r;
      last_step = r["step"].get<int64_t>();
    }
  }
  EXPECT_EQ(n_rollbacks, 1);
  EXPECT_EQ(last_step, 40);
  // The final state: 40 steps, 37 updates, the rollback recorded; every tensor finite.
  const json state = read_json_file(dir / "rolled/checkpoint/state.json");
  EXPECT_EQ(state["step"], 40);
  EXPECT_EQ(state["optimizer_updates"], 37);
  EXPECT_EQ(state["rollbacks"], json::parse(R"([{"step": 18, "to_step": 15}])"));
  SafetensorsFile weights(dir / "rolled/sae/sae_weights.safetensors");
  for (const char* t : {"W_enc", "W_dec", "b_enc", "b_dec"})
    EXPECT_EQ(first_non_finite(weights.read_f32(t)), -1) << t;
  // It trained on: close to a run that never met the bad batch.
  const auto clean = run(dir / "clean", -1, false, false);
  ASSERT_TRUE(std::get<0>(clean));
  EXPECT_EQ(std::get<1>(clean), 0u);
  EXPECT_GT(ev, std::get<3>(clean) - 0.05) << ev << " vs " << std::get<3>(clean);
  // Stopped at 25 (its checkpoint holds the rollback) and resumed: the same SAE, bit for bit.
  EXPECT_FALSE(std::get<0>(run(dir / "stopped", 25, false, true)));
  const auto resumed = run(dir / "stopped", -1, true, true);
  ASSERT_TRUE(std::get<0>(resumed));
  EXPECT_EQ(std::get<1>(resumed), 1u);
  EXPECT_EQ(std::get<2>(resumed), 3);
  EXPECT_EQ(test::read_bytes(dir / "stopped/sae/sae_weights.safetensors"),
            test::read_bytes(dir / "rolled/sae/sae_weights.safetensors"));
  // training.max_rollbacks is checked.
  json bad = test::tiny_trainer_config(dir / "bad");
  bad["training"]["max_rollbacks"] = -1;
  try {
    TrainConfig::from_json(bad, "bad.json");
    ADD_FAILURE() << "max_rollbacks -1 accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("training.max_rollbacks"), std::string::npos) << e.what();
  }
}

// A run resumed with other settings than its checkpoint's records what changed and from which
// step (the log, every later checkpoint), through a later plain resume and a rollback alike;
// bookkeeping (the log cadence) and the output folder are not changes.
TEST(Trainer, ResumeWithOtherSettingsIsRecorded) {
  test::TempDir dir;
  auto huge = [](float* x, int64_t n) {
    for (int64_t i = 0; i < n; ++i) x[i] = x[i] < 0 ? -1e30f : 1e30f;
  };
  auto run = [&](double lr, int64_t log_every, int64_t stop_at, bool resume) {
    json j = test::tiny_trainer_config(dir / "run");
    j["optimizer"]["lr"] = lr;
    j["training"]["log_every_steps"] = log_every;
    const TrainConfig cfg = TrainConfig::from_json(j, "test");
    data::SyntheticSource clean(data::SyntheticConfig::from_json(cfg.data, "test"));
    test::SpoiledSource spoiled(clean, 31, huge, 32);  // step 32 diverges
    Trainer t(cfg, spoiled, "test");
    t.run(resume, stop_at);
    return t.config_changes();
  };
  EXPECT_EQ(run(3e-3, 10, 20, false), json::array());
  const json want = {
      {{"step", 20}, {"changed", {{"optimizer.lr", {{"from", 3e-3}, {"to", 1e-3}}}}}}};
  EXPECT_EQ(run(1e-3, 5, 30, true), want);
  EXPECT_EQ(run(1e-3, 5, -1, true), want);  // the same settings again: nothing new
  const json state = read_json_file(dir / "run/checkpoint/state.json");
  EXPECT_EQ(state["config_changes"], want);
  EXPECT_EQ(state["rollbacks"], json::parse(R"([{"step": 32, "to_step": 30}])"));
  int64_t records = 0;
  std::ifstream log(dir / "run/log.jsonl");
  for (std::string line; std::getline(log, line);)
    if (json::parse(line).contains("resumed_with_changes")) {
      ++records;
      EXPECT_EQ(json::parse(line)["resumed_with_changes"], want[0]) << line;
    }
  EXPECT_EQ(records, 1);
  // What counts: nested keys, keys only on one side; not output.dir or bookkeeping.
  json a = test::tiny_trainer_config(dir / "a"), b = test::tiny_trainer_config(dir / "b");
  b["data"]["n_roots"] = 10;
  b["data"]["extra"] = {1, 2};
  b["training"]["threads"] = 1;
  b["training"]["checkpoint_every_steps"] = 3;
  EXPECT_EQ(config_changes(a, b), nlohmann::ordered_json::parse(
                                      R"({"data.extra": {"from": null, "to": [1, 2]},
                    "data.n_roots": {"from": 12, "to": 10}})"));
  EXPECT_TRUE(config_changes(a, a).empty());
}

// `sae status` of a training folder: stopped after a rollback, then finished.
TEST(Trainer, StatusOfItsFolder) {
  test::TempDir dir;
  auto huge = [](float* x, int64_t n) {
    for (int64_t i = 0; i < n; ++i) x[i] = x[i] < 0 ? -1e30f : 1e30f;
  };
  const TrainConfig cfg = TrainConfig::from_json(test::tiny_trainer_config(dir / "run"), "test");
  data::SyntheticSource clean(data::SyntheticConfig::from_json(cfg.data, "test"));
  test::SpoiledSource spoiled(clean, 17, huge, 18);
  ASSERT_FALSE(Trainer(cfg, spoiled, "test").run(false, 25));
  auto s = pipeline::job_status(dir / "run");
  EXPECT_EQ(s["kind"], "train");
  EXPECT_EQ(s["finished"], false);
  EXPECT_EQ(s["step"], 25);
  EXPECT_EQ(s["total_steps"], 40);
  EXPECT_EQ(s["tokens"], 25 * 128);
  EXPECT_EQ(s["total_tokens"], 40 * 128);
  EXPECT_EQ(s["progress"]["step"], 20);  // logged every 10 steps
  EXPECT_GE(s["progress"]["seconds_ago"].get<double>(), 0.0);
  EXPECT_EQ(s["checkpoint"]["step"], 25);
  EXPECT_GT(s["checkpoint"]["bytes"].get<int64_t>(), 0);
  EXPECT_EQ(s["eval"]["step"], 20);
  EXPECT_EQ(s["rollbacks"], nlohmann::ordered_json::parse(R"([{"step": 18, "to_step": 15}])"));
  EXPECT_EQ(s["running"], false);
  EXPECT_FALSE(s.contains("eta_seconds"));  // stopped: no time left to tell
  std::string text = pipeline::describe_job_status(s);
  EXPECT_NE(text.find(": step 25 of 40 (62%), 3200 of 5120 tokens; not running"), std::string::npos)
      << text;
  {
    // While a process holds the folder (as a running job does): it is running, with an ETA,
    // and a second job on the folder stops before writing anything.
    FolderLock running(dir / "run/.lock", "the test");
    s = pipeline::job_status(dir / "run");
    EXPECT_EQ(s["running"]["pid"], int64_t(::getpid()));
    EXPECT_EQ(s["running"]["job"], "the test");
    EXPECT_GT(s["eta_seconds"].get<double>(), 0.0);
    EXPECT_NE(pipeline::describe_job_status(s).find("; running: the test, pid "),
              std::string::npos);
    const std::string log_before = test::read_bytes(dir / "run/log.jsonl");
    try {
      Trainer(cfg, spoiled, "test").run(true);
      ADD_FAILURE() << "a second job ran on a folder in use";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(".lock: this folder is in use by the test (pid " +
                                           std::to_string(::getpid())),
                std::string::npos)
          << e.what();
    }
    EXPECT_EQ(test::read_bytes(dir / "run/log.jsonl"), log_before);
  }
  EXPECT_NE(text.find("rolled back at step 18 to step 15"), std::string::npos) << text;
  EXPECT_NE(text.find("last checkpoint: step 25"), std::string::npos) << text;
  ASSERT_TRUE(Trainer(cfg, spoiled, "test").run(true));
  s = pipeline::job_status(dir / "run");
  EXPECT_EQ(s["finished"], true);
  EXPECT_EQ(s["step"], 40);
  EXPECT_FALSE(s.contains("eta_seconds"));
  text = pipeline::describe_job_status(s);
  EXPECT_NE(text.find("finished (sae/ written)"), std::string::npos) << text;
  // Extended to 50 steps and stopped at 45: the total is the run's now, not config.json's.
  json longer = test::tiny_trainer_config(dir / "run");
  longer["training"]["total_tokens"] = 128 * 50;
  EXPECT_FALSE(Trainer(TrainConfig::from_json(longer, "test"), spoiled, "test").run(true, 45));
  s = pipeline::job_status(dir / "run");
  EXPECT_EQ(s["total_steps"], 50);
  EXPECT_EQ(s["step"], 45);
  EXPECT_EQ(s["finished"], false);
  // Stopped by a divergence (rollbacks off): the error, no ETA.
  json off = test::tiny_trainer_config(dir / "off");
  off["training"]["max_rollbacks"] = 0;
  const TrainConfig off_cfg = TrainConfig::from_json(off, "test");
  EXPECT_THROW(Trainer(off_cfg, spoiled, "test").run(false), Error);
  s = pipeline::job_status(dir / "off");
  EXPECT_EQ(s["error"]["step"], 18);
  EXPECT_FALSE(s.contains("eta_seconds"));
  text = pipeline::describe_job_status(s);
  EXPECT_NE(text.find("stopped by an error at step 18: the loss is "), std::string::npos) << text;
  {  // run again (the folder held): the old error is not this run's
    FolderLock again(dir / "off/.lock", "the test");
    EXPECT_FALSE(pipeline::job_status(dir / "off").contains("error"));
  }
  // Not a job's folder.
  EXPECT_THROW(pipeline::job_status(dir / "run/sae"), Error);
  EXPECT_THROW(pipeline::job_status(dir / "nothing"), Error);
}

// A checkpoint holding NaN (written before each step was checked, or damaged) is refused on
// resume, naming the file and the tensor, rather than trained on as NaN.
TEST(Trainer, ResumeRefusesANonFiniteCheckpoint) {
  test::TempDir dir;
  const TrainConfig cfg = TrainConfig::from_json(test::tiny_trainer_config(dir / "run"), "test");
  data::SyntheticSource src(data::SyntheticConfig::from_json(cfg.data, "test"));
  ASSERT_FALSE(Trainer(cfg, src, "test").run(false, 20));
  test::patch_f32(dir / "run/checkpoint/state.safetensors", "v_W_dec", 17, NAN);
  try {
    Trainer(cfg, src, "test").run(true);
    ADD_FAILURE() << "resumed from a NaN state";
  } catch (const Error& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find("state.safetensors: v_W_dec: element 17 is nan: the checkpoint holds a "
                       "state that had diverged"),
              std::string::npos)
        << msg;
  }
}

TEST(Trainer, SavedSaeLoadsAndReproducesTrainingCodes) {
  test::TempDir dir;
  json j = test::tiny_trainer_config(dir / "run");
  j["sae"]["rescale_acts_by_decoder_norm"] = true;
  TrainConfig cfg = TrainConfig::from_json(j, "test");
  data::SyntheticSource src(data::SyntheticConfig::from_json(cfg.data, "test"));
  Trainer t(cfg, src, "test");
  ASSERT_TRUE(t.run(false));
  EXPECT_NE(t.input_scale(), 1.0);
  LoadedSae l = load_from_disk(dir / "run/sae");
  EXPECT_EQ(l.sae.cfg.architecture, Architecture::JumpReLU);
  ASSERT_TRUE(l.sparsity.has_value());
  // Inference pre-activations on raw x equal training hidden_pre on s * x.
  const TrainingSae& ts = t.sae();
  const int64_t d = ts.spec.d_in, D = ts.spec.d_sae, n = 64;
  std::vector<float> x(size_t(n * d));
  src.train_batch(1000, n, x.data());
  std::vector<float> pre(size_t(n * D));
  l.sae.pre_activations(x.data(), n, pre.data(), nullptr, nullptr);
  const auto norms = ts.decoder_norms();
  std::vector<float> want(size_t(n * D));
  for (int64_t r = 0; r < n; ++r)
    for (int64_t jj = 0; jj < D; ++jj) {
      double h = ts.b_enc[size_t(jj)];
      for (int64_t c = 0; c < d; ++c)
        h += (x[size_t(r * d + c)] * t.input_scale() - ts.b_dec[size_t(c)]) *
             ts.W_encT[size_t(jj * d + c)];
      want[size_t(r * D + jj)] = float(h * norms[size_t(jj)]);
    }
  test::expect_close(pre, want, 1e-5, "folded pre-activations");
  for (float th : l.sae.threshold) EXPECT_FLOAT_EQ(th, float(ts.threshold));
}

// training.checkpoint_every_minutes: a checkpoint whenever that much time has passed since the
// last (here: every step), besides or instead of the step cadence; 0 is off; bad values refused.
TEST(Trainer, CheckpointsOnTheClock) {
  test::TempDir dir;
  for (const double minutes : {1e-7, 0.0}) {
    const std::string out = dir / (minutes > 0 ? "clock" : "off");
    json j = test::tiny_trainer_config(out);
    j["training"]["checkpoint_every_steps"] = 0;
    j["training"]["checkpoint_every_minutes"] = minutes;
    const TrainConfig cfg = TrainConfig::from_json(j, "test");
    EXPECT_EQ(cfg.to_json()["training"]["checkpoint_every_minutes"].get<double>(), minutes);
    data::SyntheticSource src(data::SyntheticConfig::from_json(cfg.data, "test"));
    Trainer t(cfg, src, "test");
    t.begin(false);
    std::vector<float> x(size_t(cfg.batch_size * t.sae().spec.d_in));
    for (int64_t step = 1; step <= 3; ++step) {
      src.train_batch(t.step(), cfg.batch_size, x.data());
      t.train_step(x.data());
      const std::string state = out + "/checkpoint/state.json";
      if (minutes > 0)
        EXPECT_EQ(read_json_file(state)["step"], step);
      else
        EXPECT_FALSE(fs::exists(state)) << "step " << step;
    }
  }
  json bad = test::tiny_trainer_config(dir / "bad");
  bad["training"]["checkpoint_every_minutes"] = -1;
  try {
    (void)TrainConfig::from_json(bad, "cfg.json");
    ADD_FAILURE() << "a negative period was accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("training.checkpoint_every_minutes"), std::string::npos)
        << e.what();
  }
}

// A checkpoint taken by checkpoint_data and written on the writer's thread is the checkpoint
// save_checkpoint writes (the same tensors, bit for bit), with and without Adam's first moment;
// the trainer goes on from the same state either way; a write that fails is raised by the next
// call (naming the folder) and drops what was queued; a writer destroyed with a state queued
// writes it first, and one whose write fails neither hangs nor crashes.
TEST(Trainer, CheckpointsWrittenOnAnotherThreadAreSaveCheckpointsFiles) {
  test::TempDir dir;
  for (const double beta1 : {0.0, 0.9}) {
    SCOPED_TRACE(beta1);
    auto trainer = [&](const std::string& out) {
      json j = test::tiny_trainer_config(out);
      j["training"]["checkpoint_every_steps"] = 0;
      j["optimizer"]["adam_beta1"] = beta1;
      return TrainConfig::from_json(j, "test");
    };
    const std::string a_dir = dir / ("sync" + std::to_string(int(beta1 * 10)));
    const std::string b_dir = dir / ("thread" + std::to_string(int(beta1 * 10)));
    const TrainConfig ca = trainer(a_dir), cb = trainer(b_dir);
    data::SyntheticSource src(data::SyntheticConfig::from_json(ca.data, "test"));
    Trainer a(ca, src, "a"), b(cb, src, "b");
    a.begin(false), b.begin(false);
    std::vector<float> x(size_t(ca.batch_size * a.sae().spec.d_in));
    auto step_both = [&] {
      src.train_batch(a.step(), ca.batch_size, x.data());
      std::vector<float> y = x;
      a.train_step(x.data());
      b.train_step(y.data());
    };
    auto expect_same_checkpoints = [&](int64_t step) {
      EXPECT_EQ(test::read_bytes(a_dir + "/checkpoint/state.safetensors"),
                test::read_bytes(b_dir + "/checkpoint/state.safetensors"));
      const auto sa = read_json_file(a_dir + "/checkpoint/state.json");
      const auto sb = read_json_file(b_dir + "/checkpoint/state.json");
      for (const char* key : {"step", "optimizer_updates", "input_scale", "window_steps"})
        EXPECT_EQ(sa[key], sb[key]) << key;
      EXPECT_EQ(sb["step"], step);
      EXPECT_FALSE(fs::exists(b_dir + "/checkpoint.tmp"));
    };
    for (int i = 0; i < 7; ++i) step_both();
    a.save_checkpoint();
    const int64_t bytes = Trainer::planned_checkpoint_bytes(cb, a.sae().spec.d_in);
    {
      CheckpointWriter writer(bytes);                   // room for one state, queued or spare
      EXPECT_TRUE(writer.take_spare().W_encT.empty());  // none yet
      CheckpointData c = b.checkpoint_data();
      EXPECT_EQ(c.bytes(), bytes);
      EXPECT_EQ(b.checkpoint_step(), 7);
      EXPECT_TRUE(writer.has_room(c.bytes()));
      writer.submit(std::move(c));
      for (int i = 0; i < 3; ++i) step_both();  // training goes on meanwhile
      writer.wait();
      EXPECT_TRUE(writer.idle());
      expect_same_checkpoints(7);
      // The written state comes back as a spare: the next is taken into its arrays.
      CheckpointData spare = writer.take_spare();
      ASSERT_EQ(spare.bytes(), bytes);
      const float* mapped = spare.W_encT.data();
      a.save_checkpoint();
      c = b.checkpoint_data(std::move(spare));
      EXPECT_EQ(c.W_encT.data(), mapped);
      writer.submit(std::move(c));
      writer.wait();
      expect_same_checkpoints(10);
    }
    {  // a writer destroyed with a state queued (a job ending by an error) writes it first
      CheckpointWriter going(bytes);
      step_both();
      a.save_checkpoint();
      going.submit(b.checkpoint_data());
    }
    expect_same_checkpoints(11);
    EXPECT_EQ(a.sae().W_dec, b.sae().W_dec);  // taking the states changed nothing
    EXPECT_EQ(a.sae().W_encT, b.sae().W_encT);
  }

  // A folder that cannot be made: the error reaches the caller, and the queue behind it goes.
  test::write_bytes(dir / "plain_file", "x");
  CheckpointData bad;
  bad.output_dir = dir / "plain_file/sae";
  bad.d_in = 2, bad.d_sae = 1;
  CheckpointWriter writer(1 << 20);
  writer.submit(bad);
  writer.submit(bad);
  try {
    writer.wait();
    ADD_FAILURE() << "a failed write was not raised";
  } catch (const std::exception& e) {
    EXPECT_NE(std::string(e.what()).find("plain_file"), std::string::npos) << e.what();
  }
  EXPECT_TRUE(writer.idle());  // raised once; the second was dropped with it
  {
    CheckpointWriter dropped(1 << 20);
    for (int i = 0; i < 3; ++i) dropped.submit(bad);
  }  // joined: the first write fails on its thread, and the rest are dropped with it
}

// to_inference at shapes that leave partial tiles (its transpose runs in 64 x 64 tiles over
// threads): every weight as the element-by-element formula gives it, bit for bit.
TEST(Trainer, InferenceSaeFoldsTheScaleAndNormsAtOddShapes) {
  TrainSpec spec;
  spec.d_in = 130, spec.d_sae = 301, spec.k = 6, spec.widths = {19, 301};
  spec.level_loss = {LevelLoss::Mse, LevelLoss::Mse}, spec.level_weight = {1, 1};
  for (const bool rescale : {false, true}) {
    spec.rescale_acts_by_decoder_norm = rescale;
    TrainingSae t(spec);
    Rng rng(3);
    for (auto* v : {&t.W_encT, &t.W_dec, &t.b_enc, &t.b_dec})
      for (auto& w : *v) w = float(rng.normal());
    t.threshold = 0.7;
    const double s = 1.7;
    const Sae got = t.to_inference(s, true, nlohmann::ordered_json::object());
    const std::vector<float> n = t.decoder_norms();
    const int64_t d = spec.d_in, D = spec.d_sae;
    for (int64_t j = 0; j < D; ++j) {
      const double nj = n[size_t(j)];
      for (int64_t c = 0; c < d; ++c) {
        ASSERT_EQ(got.W_enc[size_t(c * D + j)], float(double(t.W_encT[size_t(j * d + c)]) * s * nj))
            << j << "," << c;
        ASSERT_EQ(got.W_dec[size_t(j * d + c)],
                  float(double(t.W_dec[size_t(j * d + c)]) / (nj * s)))
            << j << "," << c;
      }
      EXPECT_EQ(got.b_enc[size_t(j)], float(double(t.b_enc[size_t(j)]) * nj));
      EXPECT_EQ(got.threshold[size_t(j)], float(rescale ? t.threshold : t.threshold * nj));
    }
    for (int64_t c = 0; c < d; ++c)
      EXPECT_EQ(got.b_dec[size_t(c)], float(double(t.b_dec[size_t(c)]) / s));
  }
}

// training.precision = bf16 on the CPU: the encoder GEMM on bf16 operands (said at start),
// ending near the fp32 run on the synthetic hierarchy; tf32 (a GPU format) is refused there.
TEST(Trainer, Bf16EncoderGemmOnTheCpu) {
  test::TempDir dir;
  double ev[2] = {0, 0};
  for (int bf16 = 0; bf16 < 2; ++bf16) {
    json j = test::tiny_trainer_config(dir / (bf16 ? "bf16" : "fp32"));
    j["training"]["total_tokens"] = 128 * 300;
    j["training"]["precision"] = bf16 ? "bf16" : "fp32";
    TrainConfig cfg = TrainConfig::from_json(j, "test");
    data::SyntheticSource src(data::SyntheticConfig::from_json(cfg.data, "test"));
    Trainer t(cfg, src);
    t.print_progress = false;
    ASSERT_TRUE(t.run(false));
    ev[bf16] = t.final_eval().metrics.explained_variance;
  }
  EXPECT_GT(ev[0], 0.5);
  EXPECT_NEAR(ev[1], ev[0], 0.02);
  json j = test::tiny_trainer_config(dir / "tf32");
  j["training"]["precision"] = "tf32";
  TrainConfig cfg = TrainConfig::from_json(j, "test");
  data::SyntheticSource src(data::SyntheticConfig::from_json(cfg.data, "test"));
  try {
    Trainer t(cfg, src);
    FAIL() << "tf32 accepted on the CPU";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("training.precision"), std::string::npos) << e.what();
  }
}

TEST(TrainConfig, StrictAndClear) {
  auto err = [](const json& j) {
    try {
      TrainConfig::from_json(j, "cfg.json");
    } catch (const Error& e) {
      return std::string(e.what());
    }
    return std::string("no error");
  };
  json good = test::tiny_trainer_config("/tmp/x");
  EXPECT_EQ(err(good), "no error");
  json j = good;
  j["sae"]["d_sea"] = 3;
  EXPECT_EQ(err(j), "cfg.json: sae.d_sea: unknown field");
  j = good;
  j["optimiser"] = json::object();
  EXPECT_NE(err(j).find("cfg.json: optimiser: unknown section"), std::string::npos);
  j = good;
  j["loss"]["level_losses"] = {"mse", "huber", "mse"};
  EXPECT_NE(err(j).find("loss.level_losses"), std::string::npos);
  j = good;
  j["optimizer"]["lr_scheduler"] = "exponential";
  EXPECT_NE(err(j).find("optimizer.lr_scheduler"), std::string::npos);
  j = good;
  j.erase("data");
  EXPECT_NE(err(j).find("data.type"), std::string::npos);
  j = good;
  j["data"]["n_rooots"] = 3;
  TrainConfig c = TrainConfig::from_json(j, "cfg.json");
  EXPECT_THROW(data::SyntheticConfig::from_json(c.data, "cfg.json"), Error);
  // Widths without the final d_sae get it appended, as SAELens does; snap = l2 inner, mse outer.
  j = good;
  j["sae"]["matryoshka_widths"] = {8, 24};
  c = TrainConfig::from_json(j, "cfg.json");
  EXPECT_EQ(c.spec.widths, (std::vector<int64_t>{8, 24, 48}));
  EXPECT_EQ(c.spec.level_loss,
            (std::vector<LevelLoss>{LevelLoss::L2, LevelLoss::L2, LevelLoss::Mse}));
  // balance_beta: c_i = beta^(n - i).
  j["loss"]["balance_beta"] = 0.5;
  c = TrainConfig::from_json(j, "cfg.json");
  EXPECT_EQ(c.spec.level_weight, (std::vector<double>{0.25, 0.5, 1.0}));
  // Overrides parse JSON values and create sections.
  apply_override(j, "optimizer.lr=0.5");
  apply_override(j, "output.metadata.model_name=gemma-2-2b");
  EXPECT_EQ(j["optimizer"]["lr"], 0.5);
  EXPECT_EQ(j["output"]["metadata"]["model_name"], "gemma-2-2b");
}

TEST(TrainConfig, PresetsResolve) {
  for (const auto& name : preset_names()) {
    json j = preset(name);
    if (!j.contains("data")) j["data"] = {{"type", "synthetic"}};
    if (!j["sae"].contains("d_sae")) j["sae"]["d_sae"] = 4096;
    if (!j["training"].contains("total_tokens")) j["training"]["total_tokens"] = 1 << 20;
    EXPECT_NO_THROW(TrainConfig::from_json(j, name)) << name;
  }
  TrainConfig snap = TrainConfig::from_json(
      [] {
        json j = preset("gemma-2-2b-matryoshka-snap");
        j["data"] = {{"type", "synthetic"}};
        return j;
      }(),
      "p");
  EXPECT_EQ(snap.spec.widths, (std::vector<int64_t>{128, 512, 2048, 8192, 32768}));
  EXPECT_EQ(snap.spec.level_loss.back(), LevelLoss::Mse);
  EXPECT_EQ(snap.spec.level_loss.front(), LevelLoss::L2);
  EXPECT_EQ(snap.adam.beta1, 0.0);
  EXPECT_EQ(snap.lr.lr, 1e-4);
  EXPECT_TRUE(snap.spec.per_level_aux);
  EXPECT_EQ(snap.checkpoint_every_steps, 1000);
  EXPECT_EQ(snap.checkpoint_every_minutes, 0.0);
}

// On a GPU the checkpoint cadence is the clock's unless steps are given (a step takes
// milliseconds there): 30 minutes, or the minutes given; steps given are kept as given.
TEST(TrainConfig, OnTheGpuAnUnsetCheckpointCadenceIsTheClocks) {
  auto cfg = [](const std::string& device, const json& training) {
    json j = preset("gemma-2-2b-matryoshka-snap");
    j["data"] = {{"type", "synthetic"}};
    j["training"]["device"] = device;
    j["training"].update(training);
    return TrainConfig::from_json(j, "p");
  };
  const TrainConfig gpu = cfg("cuda", json::object());
  EXPECT_EQ(gpu.checkpoint_every_steps, 0);
  EXPECT_EQ(gpu.checkpoint_every_minutes, 30.0);
  EXPECT_EQ(gpu.to_json()["training"]["checkpoint_every_minutes"], 30.0);
  const TrainConfig steps = cfg("cuda", {{"checkpoint_every_steps", 500}});
  EXPECT_EQ(steps.checkpoint_every_steps, 500);
  EXPECT_EQ(steps.checkpoint_every_minutes, 0.0);
  const TrainConfig minutes = cfg("cuda", {{"checkpoint_every_minutes", 5}});
  EXPECT_EQ(minutes.checkpoint_every_steps, 0);
  EXPECT_EQ(minutes.checkpoint_every_minutes, 5.0);
  const TrainConfig cpu = cfg("cpu", json::object());
  EXPECT_EQ(cpu.checkpoint_every_steps, 1000);
  EXPECT_EQ(cpu.checkpoint_every_minutes, 0.0);
}

TEST(LrSchedule, Shapes) {
  LrSchedule s;
  s.lr = 1.0;
  s.warm_up_steps = 4;
  EXPECT_DOUBLE_EQ(s.at(0, 100), 0.25);
  EXPECT_DOUBLE_EQ(s.at(3, 100), 1.0);
  EXPECT_DOUBLE_EQ(s.at(50, 100), 1.0);
  s.name = "cosine";
  s.lr_end = 0.1;
  s.warm_up_steps = 0;
  EXPECT_DOUBLE_EQ(s.at(0, 100), 1.0);
  EXPECT_NEAR(s.at(50, 100), 0.55, 1e-12);
  s.name = "linear";
  EXPECT_NEAR(s.at(50, 100), 0.55, 1e-12);
  s.name = "constant";
  s.decay_steps = 20;
  EXPECT_DOUBLE_EQ(s.at(79, 100), 1.0);
  EXPECT_NEAR(s.at(90, 100), 0.5, 1e-12);
}

// One latent, data = parent, or parent + child (child present 30% of the time), b_dec held at
// zero. MSE pulls the latent toward the child (the principal direction); the unsquared L2
// ("snap") loss leaves it on the parent.
double toy_cos_to_parent(LevelLoss loss) {
  TrainSpec sp;
  sp.d_in = 8;
  sp.d_sae = 1;
  sp.k = 1;
  sp.widths = {1};
  sp.level_loss = {loss};
  sp.level_weight = {1};
  sp.aux_coefficient = 0;
  TrainingSae sae(sp);
  sae.init(3, 0.1);
  std::vector<float> parent(8, 0.0f), child(8, 0.0f);
  parent[0] = 1;
  child[1] = 1;
  Optimizer opt(sae, AdamConfig{});
  Grads g;
  g.resize(8, 1);
  StepWorkspace ws;
  Rng rng(7);
  const int64_t B = 256;
  std::vector<float> x(size_t(B * 8));
  for (int step = 0; step < 3000; ++step) {
    for (int64_t t = 0; t < B; ++t) {
      const bool c = rng.uniform() < 0.3;
      for (int i = 0; i < 8; ++i)
        x[size_t(t * 8 + i)] = parent[size_t(i)] + (c ? child[size_t(i)] : 0.0f);
    }
    g.clear();
    forward_backward(sae, x.data(), B, {}, g, ws);
    opt.step(sae, g, step < 2000 ? 1e-2 : 1e-3);
    std::fill(sae.b_dec.begin(), sae.b_dec.end(), 0.0f);
  }
  const auto n = sae.decoder_norms();
  return sae.W_dec[0] / n[0];
}

TEST(SnapToy, L2PutsTheLatentOnTheParentMseBlendsInTheChild) {
  const double l2 = toy_cos_to_parent(LevelLoss::L2);
  const double mse = toy_cos_to_parent(LevelLoss::Mse);
  std::printf("toy cos(latent, parent): l2 %.6f, mse %.6f\n", l2, mse);
  EXPECT_GT(l2, 0.999) << "l2 latent should sit on the parent";
  EXPECT_LT(mse, 0.99) << "mse latent should lean toward the child";
}

}  // namespace
}  // namespace sae::train

namespace sae::train {
namespace {

TEST(TrainCli, TrainsFromActivationFilesAndRejectsBadConfig) {
  test::TempDir dir;
  // Activation shards written from the synthetic source.
  std::vector<float> x = test::synthetic_rows(3000);
  write_npy(dir / "a.npy", DType::F32, {2000, 24},
            {reinterpret_cast<const uint8_t*>(x.data()), 2000 * 24 * 4});
  write_npy(dir / "b.npy", DType::F32, {1000, 24},
            {reinterpret_cast<const uint8_t*>(x.data() + 2000 * 24), 1000 * 24 * 4});
  json cfg = {
      {"sae", {{"d_sae", 32}, {"k", 3}, {"matryoshka_widths", {8, 32}}}},
      {"loss", {{"level_losses", "snap"}}},
      {"training", {{"total_tokens", 256 * 30}, {"batch_size", 256}, {"eval_tokens", 500}}},
      {"data",
       {{"type", "files"}, {"paths", {dir / "a.npy", dir / "b.npy"}}, {"heldout_tokens", 500}}}};
  test::write_bytes(dir / "cfg.json", cfg.dump());
  auto r = test::run_cli("train --config " + (dir / "cfg.json") + " -o " + (dir / "run"));
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("tok/s"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("activation files: 2 shard(s), 3000 tokens of d_in 24 (500 held out)"),
            std::string::npos)
      << r.output;
  LoadedSae l = load_from_disk(dir / "run/sae");
  EXPECT_EQ(l.sae.cfg.d_sae, 32);
  EXPECT_TRUE(fs::exists(dir / "run/eval.json"));

  auto bad = test::run_cli("train --config " + (dir / "cfg.json") + " --set sae.bogus=1 -o " +
                           (dir / "bad"));
  EXPECT_EQ(bad.exit_code, 1);
  EXPECT_NE(bad.output.find("cfg.json: sae.bogus: unknown field"), std::string::npos) << bad.output;
  EXPECT_FALSE(fs::exists(dir / "bad"));
  auto missing = test::run_cli("train --config " + (dir / "cfg.json") +
                               " --set 'data.paths=[\"nope.npy\"]' -o " + (dir / "bad"));
  EXPECT_EQ(missing.exit_code, 1);
  EXPECT_NE(missing.output.find("nope.npy"), std::string::npos) << missing.output;
  // A NaN in a shard (a damaged file): refused when its row is read, naming the file, the row
  // within it and the column, before any SAE state is written.
  x[size_t(1500 * 24 + 7)] = NAN;
  write_npy(dir / "c.npy", DType::F32, {1000, 24},
            {reinterpret_cast<const uint8_t*>(x.data() + 1000 * 24), 1000 * 24 * 4});
  auto damaged =
      test::run_cli("train --config " + (dir / "cfg.json") + " --set 'data.paths=[\"" +
                    (dir / "a.npy") + "\", \"" + (dir / "c.npy") + "\"]' -o " + (dir / "damaged"));
  EXPECT_EQ(damaged.exit_code, 1);
  EXPECT_NE(damaged.output.find("c.npy: row 500, column 7: activation is nan"), std::string::npos)
      << damaged.output;
  EXPECT_FALSE(fs::exists(dir / "damaged/checkpoint"));

  // Nothing to train from: the usage and the presets, not the first missing field.
  auto bare = test::run_cli("train -o " + (dir / "bare"));
  EXPECT_EQ(bare.exit_code, 2);
  EXPECT_NE(bare.output.find("--preset"), std::string::npos) << bare.output;
  EXPECT_NE(bare.output.find("gemma-2-2b-matryoshka-snap"), std::string::npos) << bare.output;
  EXPECT_EQ(bare.output.find("missing"), std::string::npos) << bare.output;
  EXPECT_FALSE(fs::exists(dir / "bare"));
}

}  // namespace
}  // namespace sae::train

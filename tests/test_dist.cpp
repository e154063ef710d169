// dist/: the job's ranks. One process by default; under mpirun, MPI collectives that give
// every rank the same answer, and a rank that fails ends the whole job instead of leaving the
// others waiting (the known hang of sparsify's module-parallel mode).
#include <gtest/gtest.h>

#include <chrono>
#include <cmath>
#include <fstream>

#include "io/json_file.h"
#include "io/npy.h"
#include "io/safetensors.h"

#include "dist/comm.h"
#include "max_relative_error.h"
#include "test_util.h"

namespace sae {
namespace {

using test::EnvVar;

using test::mpirun;

TEST(Dist, OneProcessByDefault) {
  for (const char* v : {"OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE", "SLURM_NTASKS"})
    ASSERT_EQ(std::getenv(v), nullptr) << v << " is set: the test runs under a launcher";
  EXPECT_FALSE(dist::launch_from_environment());
  dist::Comm& w = dist::world();
  EXPECT_EQ(w.rank(), 0);
  EXPECT_EQ(w.size(), 1);
  std::vector<double> v = {1, 2};
  w.allreduce_sum(v);
  EXPECT_EQ(v, (std::vector<double>{1, 2}));
}

TEST(Dist, LaunchersAreReadFromTheEnvironment) {
  {
    EnvVar r("OMPI_COMM_WORLD_RANK", "1"), s("OMPI_COMM_WORLD_SIZE", "4");
    const auto l = dist::launch_from_environment();
    ASSERT_TRUE(l);
    EXPECT_EQ(l->rank, 1);
    EXPECT_EQ(l->size, 4);
  }
  {
    EnvVar r("SLURM_PROCID", "2"), s("SLURM_NTASKS", "3");
    const auto l = dist::launch_from_environment();
    ASSERT_TRUE(l);
    EXPECT_EQ(l->launcher, "srun");
  }
  EnvVar r("SLURM_PROCID", "0"), s("SLURM_NTASKS", "1");  // one task: not a parallel launch
  EXPECT_FALSE(dist::launch_from_environment());
}

// dist_ranks_main.cpp checks each collective, and BatchTopK over rows split across the ranks
// against the single-process selection on the whole batch (ties at the cut included).
TEST(Dist, CollectivesAndGlobalBatchTopKAgreeOnTwoAndThreeRanks) {
  REQUIRE_MPI();
  for (int n : {2, 3}) {
    const auto r = test::run_shell("timeout 120 " + mpirun(n) + SAECPP_DIST_RANKS);
    EXPECT_EQ(r.exit_code, 0) << r.output;
    for (int q = 0; q < n; ++q)
      EXPECT_NE(
          r.output.find("rank " + std::to_string(q) + " of " + std::to_string(n) + " ok (MPI"),
          std::string::npos)
          << r.output;
  }
}

TEST(Dist, AFailedRankEndsTheWholeJobNamingIt) {
  REQUIRE_MPI();
  const auto t0 = std::chrono::steady_clock::now();
  const auto r = test::run_shell("timeout 120 " + mpirun(2) + SAECPP_DIST_RANKS + " --fail-rank 1");
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  EXPECT_NE(r.exit_code, 0) << r.output;
  EXPECT_NE(r.exit_code, 124) << "the job hung until timeout killed it\n" << r.output;
  EXPECT_LT(s, 60.0);
  EXPECT_NE(r.output.find("error (rank 1 of 2): rank 1 fails on purpose"), std::string::npos)
      << r.output;
}

// The synthetic hierarchy, small: batch 256, AuxK from step 20 on (dead latents appear).
std::string train_args(const std::string& out, int64_t steps) {
  return " train --preset hierarchy-snap --set training.batch_size=256 --set "
         "training.total_tokens=" +
         std::to_string(256 * steps) +
         " --set training.log_every_steps=50 --set training.eval_every_steps=0 --set "
         "training.eval_tokens=4096 --set loss.dead_feature_window=20 -o " +
         out;
}

// The bar: after one step the parameters within 1e-5 relative of one process; after
// 300 steps the held-out EV within 0.002 and L0 within 1%. Rank 0 alone writes the log.
TEST(Dist, DataParallelTrainingEqualsOneProcess) {
  REQUIRE_MPI();
  test::TempDir dir;
  for (int64_t steps : {1, 300}) {
    const std::string one = dir / ("one" + std::to_string(steps)),
                      two = dir / ("two" + std::to_string(steps));
    const auto r1 = test::run_shell("env OMP_NUM_THREADS=1 timeout 300 " + std::string(SAECPP_CLI) +
                                    train_args(one, steps));
    ASSERT_EQ(r1.exit_code, 0) << r1.output;
    const auto r2 =
        test::run_shell("timeout 300 " + mpirun(2) + SAECPP_CLI + train_args(two, steps));
    ASSERT_EQ(r2.exit_code, 0) << r2.output;
    EXPECT_NE(r2.output.find("data parallel over 2 ranks"), std::string::npos) << r2.output;
    SafetensorsFile a(one + "/sae/sae_weights.safetensors"),
        b(two + "/sae/sae_weights.safetensors");
    for (const char* name : {"W_enc", "W_dec", "b_enc", "b_dec"}) {
      const double e = sae::test::max_relative_error(a.read_f32(name), b.read_f32(name));
      if (steps == 1)
        EXPECT_LE(e, 1e-5) << name;
      else
        EXPECT_LE(e, 1e-3) << name;  // 300 steps of rounding; the bar is on EV and L0 below
    }
    const auto ea = read_json_file(one + "/eval.json"), eb = read_json_file(two + "/eval.json");
    EXPECT_NEAR(eb["explained_variance"].get<double>(), ea["explained_variance"].get<double>(),
                0.002);
    EXPECT_NEAR(eb["l0"].get<double>(), ea["l0"].get<double>(), 0.01 * ea["l0"].get<double>());
    EXPECT_EQ(test::read_bytes(one + "/log.jsonl").size() > 0, true);
    // One progress line per 50 steps and the final one: written once, by rank 0.
    std::ifstream log(two + "/log.jsonl");
    int lines = 0;
    for (std::string l; std::getline(log, l);) ++lines;
    EXPECT_EQ(lines, steps == 1 ? 2 : 7) << "progress and eval records";
  }
}

// A rank killed by a signal ends the whole job (mpirun notices, the other rank is stopped: no
// hang), and the same command with --resume finishes it from the last checkpoint, to the same
// SAE as a run that was never interrupted.
TEST(Dist, AKilledRankEndsTrainingAndResumeFinishesIt) {
  REQUIRE_MPI();
  test::TempDir dir;
  const std::string args =
      train_args(dir / "run", 1500) + " --set training.checkpoint_every_steps=100";
  const std::string script = dir / "kill.sh";
  // The ranks are mpirun's children (found through /proc: no procps needed); the last one dies.
  std::ofstream(script) << mpirun(2) << SAECPP_CLI << args << " > " << (dir / "run.log")
                        << " 2>&1 &\n"
                        << "mp=$!\n"
                        << "for i in $(seq 1200); do [ -f " << (dir / "run/checkpoint/state.json")
                        << " ] && break; sleep 0.05; done\n"
                        << "ranks=''\n"
                        << "for p in /proc/[0-9]*; do\n"
                        << "  [ \"$(cut -d' ' -f4 $p/stat 2>/dev/null)\" = \"$mp\" ] && "
                           "ranks=\"$ranks ${p#/proc/}\"\n"
                        << "done\n"
                        << "t0=$(date +%s%N)\n"
                        << "kill -KILL ${ranks##* }\n"
                        << "wait $mp; rc=$?\n"
                        << "echo \"ranks $(echo $ranks | wc -w) rc $rc ms $(( ($(date +%s%N) - "
                           "t0) / 1000000 ))\"\n";
  const auto killed = test::run_shell("timeout 120 bash " + script);
  ASSERT_EQ(killed.exit_code, 0) << killed.output;
  int ranks = 0, rc = 0, ms = 0;
  ASSERT_EQ(std::sscanf(killed.output.c_str(), "ranks %d rc %d ms %d", &ranks, &rc, &ms), 3)
      << killed.output;
  EXPECT_EQ(ranks, 2) << "mpirun's children are the ranks";
  EXPECT_NE(rc, 0) << test::read_bytes(dir / "run.log");
  EXPECT_LT(ms, 60000);
  EXPECT_FALSE(std::filesystem::exists(dir / "run/sae")) << "killed before the end";
  ASSERT_TRUE(std::filesystem::exists(dir / "run/checkpoint/state.json"));

  const auto resumed =
      test::run_shell("timeout 300 " + mpirun(2) + SAECPP_CLI + args + " --resume");
  ASSERT_EQ(resumed.exit_code, 0) << resumed.output;
  EXPECT_NE(resumed.output.find("resuming from step"), std::string::npos) << resumed.output;
  const auto straight =
      test::run_shell("timeout 300 " + mpirun(2) + SAECPP_CLI + train_args(dir / "straight", 1500) +
                      " --set training.checkpoint_every_steps=100");
  ASSERT_EQ(straight.exit_code, 0) << straight.output;
  for (const char* f : {"sae/sae_weights.safetensors", "sae/sparsity.safetensors"})
    EXPECT_EQ(test::read_bytes(dir / (std::string("run/") + f)),
              test::read_bytes(dir / (std::string("straight/") + f)))
        << f;
}

// Latent parallel (--parallel latents), 2 and 3 ranks (3 does not divide the 128 latents):
// the same bar as data parallel against one process; the log written once.
TEST(Dist, LatentParallelTrainingEqualsOneProcess) {
  REQUIRE_MPI();
  test::TempDir dir;
  for (int64_t steps : {1, 300}) {
    const std::string one = dir / ("one" + std::to_string(steps));
    const auto r1 = test::run_shell("env OMP_NUM_THREADS=1 timeout 300 " + std::string(SAECPP_CLI) +
                                    train_args(one, steps));
    ASSERT_EQ(r1.exit_code, 0) << r1.output;
    const auto ea = read_json_file(one + "/eval.json");
    SafetensorsFile a(one + "/sae/sae_weights.safetensors");
    for (int ranks : {2, 3}) {
      const std::string lp = dir / ("lp" + std::to_string(ranks) + "_" + std::to_string(steps));
      const auto r = test::run_shell("timeout 300 " + mpirun(ranks) + SAECPP_CLI +
                                     train_args(lp, steps) + " --parallel latents");
      ASSERT_EQ(r.exit_code, 0) << r.output;
      EXPECT_NE(r.output.find("latent parallel over " + std::to_string(ranks) + " ranks"),
                std::string::npos)
          << r.output;
      SafetensorsFile b(lp + "/sae/sae_weights.safetensors");
      for (const char* name : {"W_enc", "W_dec", "b_enc", "b_dec", "threshold"}) {
        const double e = sae::test::max_relative_error(a.read_f32(name), b.read_f32(name));
        EXPECT_LE(e, steps == 1 ? 1e-5 : 1e-3) << name << " at " << ranks << " ranks";
      }
      const auto eb = read_json_file(lp + "/eval.json");
      EXPECT_NEAR(eb["explained_variance"].get<double>(), ea["explained_variance"].get<double>(),
                  0.002);
      EXPECT_NEAR(eb["l0"].get<double>(), ea["l0"].get<double>(), 0.01 * ea["l0"].get<double>());
      EXPECT_EQ(eb["dead_latents"], ea["dead_latents"]);
      std::ifstream log(lp + "/log.jsonl");
      int lines = 0;
      for (std::string l; std::getline(log, l);) ++lines;
      EXPECT_EQ(lines, steps == 1 ? 2 : 7) << "progress and eval records";
      EXPECT_EQ(test::read_bytes(lp + "/sae/cfg.json"), test::read_bytes(one + "/sae/cfg.json"));
    }
  }
}

// A latent-parallel checkpoint is the whole SAE's: a run stopped under 2 ranks resumes under 3
// (another split of the latents) and as one process, and ends where one process ends.
TEST(Dist, LatentParallelCheckpointResumesOnAnyNumberOfRanks) {
  REQUIRE_MPI();
  test::TempDir dir;
  const auto straight = test::run_shell("env OMP_NUM_THREADS=1 timeout 300 " +
                                        std::string(SAECPP_CLI) + train_args(dir / "one", 300));
  ASSERT_EQ(straight.exit_code, 0) << straight.output;
  SafetensorsFile want(dir / "one/sae/sae_weights.safetensors");
  const auto ea = read_json_file(dir / "one/eval.json");
  for (int resume_ranks : {3, 1}) {
    const std::string run = dir / ("run" + std::to_string(resume_ranks));
    const auto first =
        test::run_shell("timeout 300 " + mpirun(2) + SAECPP_CLI + train_args(run, 300) +
                        " --parallel latents --stop-at-step 150");
    ASSERT_EQ(first.exit_code, 0) << first.output;
    ASSERT_FALSE(std::filesystem::exists(run + "/sae")) << "stopped before the end";
    const std::string launch = resume_ranks == 1 ? "env OMP_NUM_THREADS=1 " : mpirun(resume_ranks);
    // On 3 ranks also a checkpoint after every step on rank 0's clock (a collective each time):
    // the same SAE at the end.
    const auto rest = test::run_shell(
        "timeout 300 " + launch + SAECPP_CLI + train_args(run, 300) +
        (resume_ranks > 1 ? " --parallel latents --set training.checkpoint_every_minutes=1e-7"
                          : "") +
        " --resume");
    ASSERT_EQ(rest.exit_code, 0) << rest.output;
    EXPECT_NE(rest.output.find("resuming from step 150"), std::string::npos) << rest.output;
    SafetensorsFile got(run + "/sae/sae_weights.safetensors");
    for (const char* name : {"W_enc", "W_dec", "b_enc", "b_dec"})
      EXPECT_LE(sae::test::max_relative_error(want.read_f32(name), got.read_f32(name)), 1e-3)
          << name << ", resumed on " << resume_ranks;
    const auto eb = read_json_file(run + "/eval.json");
    EXPECT_NEAR(eb["explained_variance"].get<double>(), ea["explained_variance"].get<double>(),
                0.002);
    EXPECT_NEAR(eb["l0"].get<double>(), ea["l0"].get<double>(), 0.01 * ea["l0"].get<double>());
  }
}

// A divergence under several ranks of one SAE (one row of finite 1e30s overflows the step):
// every rank rolls back together to the checkpoint rank 0 wrote, skips the same batches and
// trains on, data or latent parallel; the SAE ends near the one-process run's, which rolls back
// at the same step.
TEST(Dist, DivergenceRollsBackEveryRankTogether) {
  REQUIRE_MPI();
  test::TempDir dir;
  std::vector<float> x = test::synthetic_rows(6000);
  for (int64_t c = 0; c < 24; ++c) x[size_t(2500 * 24 + c)] = c % 2 ? -1e30f : 1e30f;
  write_npy(dir / "acts.npy", DType::F32, {6000, 24},
            {reinterpret_cast<const uint8_t*>(x.data()), x.size() * 4});
  const nlohmann::json cfg = {
      {"sae", {{"d_sae", 32}, {"k", 3}, {"matryoshka_widths", {8, 32}}}},
      {"loss", {{"level_losses", "snap"}}},
      {"training",
       {{"total_tokens", 256 * 20},
        {"batch_size", 256},
        {"eval_tokens", 500},
        {"eval_every_steps", 0},
        {"log_every_steps", 5},
        {"checkpoint_every_steps", 4}}},
      {"data", {{"type", "files"}, {"paths", {dir / "acts.npy"}}, {"heldout_tokens", 500}}}};
  test::write_bytes(dir / "cfg.json", cfg.dump());
  auto rollback_of = [](const std::string& run) {
    std::ifstream log(run + "/log.jsonl");
    std::vector<nlohmann::json> found;
    for (std::string l; std::getline(log, l);)
      if (const auto rec = nlohmann::json::parse(l); rec.contains("rollback"))
        found.push_back(
            {{"step", rec["rollback"]["step"]}, {"to_step", rec["rollback"]["to_step"]}});
    return found;
  };
  const std::string one = dir / "one";
  const auto r1 = test::run_shell("env OMP_NUM_THREADS=1 timeout 300 " + std::string(SAECPP_CLI) +
                                  " train --config " + (dir / "cfg.json") + " -o " + one);
  ASSERT_EQ(r1.exit_code, 0) << r1.output;
  const auto want = rollback_of(one);
  ASSERT_EQ(want.size(), 1u) << r1.output;
  SafetensorsFile a(one + "/sae/sae_weights.safetensors");
  const auto ea = read_json_file(one + "/eval.json");
  for (const std::string mode : {"", " --parallel latents"}) {
    SCOPED_TRACE(mode);
    const std::string run = dir / (mode.empty() ? "data" : "latents");
    const auto r = test::run_shell("timeout 300 " + mpirun(2) + SAECPP_CLI + " train --config " +
                                   (dir / "cfg.json") + " -o " + run + mode);
    ASSERT_EQ(r.exit_code, 0) << r.output;
    EXPECT_EQ(rollback_of(run), want);
    const size_t said = r.output.find("the training diverged. Rolled back to the checkpoint");
    ASSERT_NE(said, std::string::npos) << r.output;
    EXPECT_EQ(r.output.find("the training diverged. Rolled back", said + 1), std::string::npos)
        << "said once, by rank 0";
    EXPECT_NE(r.output.find("done: 20 steps (" +
                            std::to_string(want[0]["step"].get<int64_t>() -
                                           want[0]["to_step"].get<int64_t>()) +
                            " skipped by 1 rollback)"),
              std::string::npos)
        << r.output;
    SafetensorsFile b(run + "/sae/sae_weights.safetensors");
    for (const char* name : {"W_enc", "W_dec", "b_enc", "b_dec"})
      EXPECT_LE(sae::test::max_relative_error(a.read_f32(name), b.read_f32(name)), 1e-3) << name;
    EXPECT_NEAR(read_json_file(run + "/eval.json")["explained_variance"].get<double>(),
                ea["explained_variance"].get<double>(), 0.002);
  }
}

TEST(Dist, CliRefusesParallelJobsItCannotRunYet) {
  REQUIRE_MPI();
  test::TempDir dir;
  const auto r = test::run_shell("timeout 120 " + mpirun(2) + SAECPP_CLI +
                                 " demo --tokens 10000 -o " + (dir / "run"));
  EXPECT_NE(r.exit_code, 0) << r.output;
  EXPECT_NE(r.exit_code, 124) << r.output;
  EXPECT_NE(r.output.find("was launched as 2 ranks"), std::string::npos) << r.output;
  EXPECT_FALSE(std::filesystem::exists(dir / "run"));
  // A command that computes nothing runs on every rank as on one.
  const auto info = test::run_shell("timeout 120 " + mpirun(2) + SAECPP_CLI + " info " +
                                    test::golden("topk/sae"));
  EXPECT_EQ(info.exit_code, 0) << info.output;
}

}  // namespace
}  // namespace sae

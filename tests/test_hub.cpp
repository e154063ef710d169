// The Hugging Face Hub client against a local mock of the Hub (mock_hub.h): the cache layout
// huggingface_hub writes, downloads on a cache miss, and every way a download can go wrong
// ending in the right file or a clear error, never a half file in the cache.
#include <gtest/gtest.h>

#include <chrono>
#include <thread>

#include "core/error.h"
#include "hub/cache.h"
#include "hub/download.h"
#include "hub/settings.h"
#include "mock_hub.h"
#include "model/checkpoint.h"
#include "model/gemma2_config.h"
#include "sae/load.h"
#include "sae/pretrained.h"
#include "test_util.h"

namespace sae {
namespace {

namespace fs = std::filesystem;
using test::EnvVar;

const std::string kRepo = "chanind/gemma-2-2b-batch-topk-matryoshka-saes-w-32k-l0-40";
const std::string kCommit = "1f2e3d4c5b6a79881f2e3d4c5b6a79881f2e3d4c";
const std::string kSae = "snap/blocks.12.hook_resid_post";
const std::string kWeights = kSae + "/sae_weights.safetensors";
const std::string kGemma = "google/gemma-2-2b";
const std::string kGemmaCommit = "c5ebcd40d208330abc697524c919956e692655cf";

std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "(no error)";
}

bool has(const std::string& text, const std::string& part) {
  return text.find(part) != std::string::npos;
}

// Every file under a folder whose name says it is unfinished.
int incomplete_files(const fs::path& dir) {
  int n = 0;
  if (!fs::exists(dir)) return 0;
  for (const auto& e : fs::recursive_directory_iterator(dir))
    n += e.path().string().find(".incomplete") != std::string::npos;
  return n;
}

class Hub : public ::testing::Test {
 protected:
  Hub()
      : endpoint_("HF_ENDPOINT", hub.endpoint()),
        cache_env_("HF_HUB_CACHE", (home.path / "hub").string()),
        home_env_("HF_HOME", home.path.string()),
        token_("HF_TOKEN", std::nullopt),
        legacy_token_("HUGGING_FACE_HUB_TOKEN", std::nullopt),
        token_path_("HF_TOKEN_PATH", std::nullopt),
        offline_("HF_HUB_OFFLINE", std::nullopt),
        transformers_offline_("TRANSFORMERS_OFFLINE", std::nullopt),
        quiet_("HF_HUB_DISABLE_PROGRESS_BARS", "1") {
    test::MockRepo saes{.commit = kCommit};
    hub.add_folder(saes, test::golden("jumprelu/sae"), kSae);
    hub.add_folder(saes, test::golden("topk/sae"), "standard/blocks.12.hook_resid_post");
    saes.files["README.md"] = "# Matryoshka SAEs\n";
    hub.add_repo(kRepo, saes);

    test::MockRepo gemma{.commit = kGemmaCommit, .gated = true};
    hub.add_folder(gemma, test::golden("gemma2/sharded/model"), "");
    gemma.files["gemma-2-2b.gguf"] = std::string(1 << 16, 'g');  // never needed by sae.cpp
    gemma.lfs.insert("gemma-2-2b.gguf");
    hub.add_repo(kGemma, gemma);
  }

  fs::path cache() const { return home.path / "hub"; }
  hub::RepoCache repo_cache(const std::string& id = kRepo) const {
    return hub::RepoCache(cache().string(), id);
  }
  std::string served(const std::string& path, const std::string& id = kRepo) {
    test::MockRepo r;
    hub.add_folder(r, test::golden(id == kRepo ? "jumprelu/sae" : "gemma2/sharded/model"),
                   id == kRepo ? kSae : "");
    return r.files.at(path);
  }

  test::TempDir home;
  test::MockHub hub;
  EnvVar endpoint_, cache_env_, home_env_, token_, legacy_token_, token_path_, offline_,
      transformers_offline_, quiet_;
};

TEST_F(Hub, SaeFromAnEmptyCacheLandsInHuggingFaceHubsLayout) {
  const std::string folder = resolve_pretrained(kRepo, kSae);
  const hub::RepoCache c = repo_cache();
  EXPECT_EQ(fs::path(folder), c.snapshot(kCommit) / kSae);
  const LoadedSae l = load_from_disk(folder);
  EXPECT_EQ(l.sae.cfg.d_sae, 64);
  EXPECT_TRUE(l.sparsity.has_value());

  // Each file: a relative symlink to blobs/<etag>, the etag being the SHA-256 of an LFS file
  // and the git blob id of the others; refs/main holds the commit with no newline.
  for (const char* name : {"cfg.json", "sae_weights.safetensors", "sparsity.safetensors"}) {
    const fs::path ptr = fs::path(folder) / name;
    ASSERT_TRUE(fs::is_symlink(ptr)) << ptr;
    const std::string bytes = test::read_bytes(ptr.string());
    EXPECT_EQ(bytes, test::read_bytes(test::golden(std::string("jumprelu/sae/") + name)));
    const std::string etag = std::string(name).ends_with(".safetensors")
                                 ? test::sha256_hex(bytes)
                                 : test::git_blob_sha1_hex(bytes);
    EXPECT_EQ(fs::read_symlink(ptr), fs::path("../../../../blobs") / etag) << name;
    EXPECT_TRUE(fs::is_regular_file(c.blob(etag)));
  }
  EXPECT_EQ(test::read_bytes((c.dir() / "refs" / "main").string()), kCommit);
  EXPECT_TRUE(fs::exists(cache() / "CACHEDIR.TAG"));
  EXPECT_FALSE(fs::exists(c.snapshot(kCommit) / "standard"));  // only what was asked for
  EXPECT_FALSE(fs::exists(c.snapshot(kCommit) / "README.md"));
  EXPECT_EQ(incomplete_files(cache()), 0);

  // Cached now: the release name and the repo id resolve with no request at all.
  const size_t before = hub.requests().size();
  EXPECT_EQ(resolve_pretrained("gemma-2-2b-res-snap-matryoshka-dc", "blocks.12.hook_resid_post"),
            folder);
  EXPECT_EQ(resolve_pretrained(kRepo, kSae), folder);
  EXPECT_EQ(hub.requests().size(), before);
}

TEST_F(Hub, CommandLineInfoAndDownloadFromAnEmptyCache) {
  const std::string env = "HF_ENDPOINT=" + hub.endpoint() + " HF_HUB_CACHE=" + cache().string() +
                          " HF_HOME=" + home.path.string() + " HF_HUB_DISABLE_PROGRESS_BARS=1";
  // The README's example, against the mock.
  auto r = test::run_cli_env("env " + env, "info " + kRepo + ":" + kSae);
  EXPECT_EQ(r.exit_code, 0) << r.output;
  EXPECT_TRUE(has(r.output, "architecture: jumprelu")) << r.output;

  r = test::run_cli_env("env " + env,
                        "download " + kRepo + " --include 'standard/*' --include README.md");
  EXPECT_EQ(r.exit_code, 0) << r.output;
  const fs::path snap = repo_cache().snapshot(kCommit);
  EXPECT_TRUE(has(r.output, snap.string())) << r.output;
  EXPECT_TRUE(fs::exists(snap / "standard/blocks.12.hook_resid_post/cfg.json"));
  EXPECT_TRUE(fs::exists(snap / "README.md"));

  r = test::run_cli_env("env " + env, "download " + kRepo + " --include 'nothing/*'");
  EXPECT_NE(r.exit_code, 0);
  EXPECT_TRUE(has(r.output, "no file of revision main matches")) << r.output;
}

TEST_F(Hub, CachedFileIsRevalidatedWithOneHeadAndNoTransfer) {
  const std::string p = hub::download_file(kRepo, "README.md");
  EXPECT_EQ(test::read_bytes(p), "# Matryoshka SAEs\n");
  const int heads = hub.count("HEAD", "/"), gets = hub.count("GET", "/");
  EXPECT_EQ(hub::download_file(kRepo, "README.md"), p);  // a branch: asks for its commit again
  EXPECT_EQ(hub.count("HEAD", "/"), heads + 1);
  EXPECT_EQ(hub.count("GET", "/"), gets);
  const size_t before = hub.requests().size();
  EXPECT_EQ(hub::download_file(kRepo, "README.md", kCommit), p);  // a commit: no request
  EXPECT_EQ(hub.requests().size(), before);
}

TEST_F(Hub, GatedRepoNeedsAToken) {
  std::string e = error_of([] { model::resolve_checkpoint(kGemma); });
  EXPECT_TRUE(has(e, "no such folder; as a Hugging Face repo id")) << e;
  EXPECT_TRUE(has(e, "gated repository")) << e;
  EXPECT_TRUE(has(e, "accept its licence at " + hub.endpoint() + "/" + kGemma)) << e;
  EXPECT_TRUE(has(e, "HF_TOKEN")) << e;
  EXPECT_TRUE(has(e, "no token is set")) << e;
  {
    EnvVar bad("HF_TOKEN", "hf_not_accepted");
    e = error_of([] { model::resolve_checkpoint(kGemma); });
    EXPECT_TRUE(has(e, "the token from $HF_TOKEN has no access yet")) << e;
  }
  EXPECT_FALSE(fs::exists(repo_cache(kGemma).dir() / "snapshots"));

  // The token file huggingface-cli login writes ($HF_HOME/token).
  test::write_bytes(home / "token", hub.good_token + "\n");
  const model::Checkpoint ck = model::resolve_checkpoint(kGemma);
  EXPECT_EQ(ck.repo_id, kGemma);
  EXPECT_EQ(ck.name, "gemma-2-2b");
  EXPECT_EQ(fs::path(ck.folder), repo_cache(kGemma).snapshot(kGemmaCommit));
  EXPECT_EQ(model::read_gemma2_config(ck.folder).num_layers,
            model::read_gemma2_config(test::golden("gemma2/sharded/model")).num_layers);
  EXPECT_FALSE(fs::exists(fs::path(ck.folder) / "gemma-2-2b.gguf"));  // only what the engine reads
  EXPECT_TRUE(fs::exists(fs::path(ck.folder) / "model-00004-of-00004.safetensors"));
  bool sent = false;  // the token goes to the Hub, never to storage on another host
  for (const auto& r : hub.requests()) {
    sent |= r.authorization == "Bearer " + hub.good_token;
    if (r.target.starts_with("/storage/")) {
      EXPECT_EQ(r.authorization, "") << r.target;
    }
  }
  EXPECT_TRUE(sent);
  // A folder in the cache knows its repo; a folder elsewhere is named by itself.
  EXPECT_EQ(model::resolve_checkpoint(ck.folder).repo_id, kGemma);
  const model::Checkpoint local = model::resolve_checkpoint(test::golden("gemma2/sharded/model"));
  EXPECT_EQ(local.repo_id, "");
  EXPECT_EQ(local.name, "model");
  e = error_of([] { model::resolve_checkpoint("no/such/folder"); });
  EXPECT_TRUE(has(e, "no such folder, and not a Hugging Face repo id")) << e;
}

TEST_F(Hub, MissingRepoFileRevisionAndFolderEachSaySo) {
  std::string e = error_of([] { hub::download_file("someone/no-such-repo", "cfg.json"); });
  EXPECT_TRUE(has(e, "repository not found")) << e;
  e = error_of([] { hub::download_file(kRepo, "snap/blocks.99.hook_resid_post/cfg.json"); });
  EXPECT_TRUE(has(e, "no such file at revision main")) << e;
  e = error_of([] { hub::snapshot_download({.repo_id = kRepo, .revision = "v9"}); });
  EXPECT_TRUE(has(e, "no revision \"v9\"")) << e;
  e = error_of([] { resolve_pretrained(kRepo, "snap/blocks.99.hook_resid_post"); });
  EXPECT_TRUE(has(e, "snap/blocks.99.hook_resid_post")) << e;
  e = error_of([] { hub::download_file("not a repo", "x"); });
  EXPECT_TRUE(has(e, "is not a Hugging Face repo id")) << e;
  EXPECT_FALSE(fs::exists(repo_cache().dir() / "snapshots"));
}

TEST_F(Hub, DroppedConnectionIsResumedWithARange) {
  hub.drop_after(kWeights, 3000, 1);
  const std::string p = hub::download_file(kRepo, kWeights);
  EXPECT_EQ(test::read_bytes(p), served(kWeights));
  int ranged = 0;
  for (const auto& r : hub.requests())
    ranged += r.target.starts_with("/storage/") && r.range == "bytes=3000-";
  EXPECT_EQ(ranged, 1);
  EXPECT_EQ(incomplete_files(cache()), 0);
}

TEST_F(Hub, BrokenDownloadLeavesNoHalfFileAndTheNextRunResumes) {
  hub.drop_after(kWeights, 3000, 1);
  {
    EnvVar no_retries("SAECPP_HUB_RETRIES", "0");
    const std::string e = error_of([] { hub::download_file(kRepo, kWeights); });
    EXPECT_TRUE(has(e, "download broke after 3000 of")) << e;
    EXPECT_TRUE(has(e, "the same command resumes it")) << e;
  }
  const std::string etag = test::sha256_hex(served(kWeights));
  const hub::RepoCache c = repo_cache();
  EXPECT_FALSE(fs::exists(c.pointer(kCommit, kWeights)));
  EXPECT_FALSE(fs::exists(c.blob(etag)));
  EXPECT_EQ(fs::file_size(c.blob(etag).string() + ".incomplete"), 3000u);

  EXPECT_EQ(test::read_bytes(hub::download_file(kRepo, kWeights)), served(kWeights));
  EXPECT_EQ(hub.requests().back().range, "bytes=3000-");
  EXPECT_EQ(incomplete_files(cache()), 0);
}

TEST_F(Hub, WrongChecksumIsDiscarded) {
  hub.corrupt(kWeights);
  const std::string e = error_of([] { hub::download_file(kRepo, kWeights); });
  EXPECT_TRUE(has(e, "failed its check (sha256")) << e;
  EXPECT_TRUE(has(e, "discarded")) << e;
  const hub::RepoCache c = repo_cache();
  EXPECT_FALSE(fs::exists(c.pointer(kCommit, kWeights)));
  EXPECT_FALSE(fs::exists(c.blob(test::sha256_hex(served(kWeights)))));
  EXPECT_EQ(incomplete_files(cache()), 0);
}

TEST_F(Hub, ConcurrentDownloadsOfOneBlobTransferItOnce) {
  hub.slow(5);  // ~9 KiB: ~45 ms of transfer, long enough for both to want it at once
  std::string a, b;
  std::thread t1([&] { a = hub::download_file(kRepo, kWeights); });
  std::thread t2([&] { b = hub::download_file(kRepo, kWeights); });
  t1.join();
  t2.join();
  EXPECT_EQ(a, b);
  EXPECT_EQ(test::read_bytes(a), served(kWeights));
  EXPECT_EQ(hub.count("GET", "/storage/"), 1);
}

TEST_F(Hub, ConcurrentProcessesShareTheCacheWithoutCorruptingIt) {
  hub.slow(5);
  const std::string env = "env HF_ENDPOINT=" + hub.endpoint() +
                          " HF_HUB_CACHE=" + cache().string() + " HF_HOME=" + home.path.string() +
                          " HF_HUB_DISABLE_PROGRESS_BARS=1";
  test::CliResult a{}, b{};
  std::thread t1([&] { a = test::run_cli_env(env, "download " + kRepo + " --include 'snap/*'"); });
  std::thread t2([&] { b = test::run_cli_env(env, "download " + kRepo + " --include 'snap/*'"); });
  t1.join();
  t2.join();
  EXPECT_EQ(a.exit_code, 0) << a.output;
  EXPECT_EQ(b.exit_code, 0) << b.output;
  EXPECT_EQ(test::read_bytes(repo_cache().pointer(kCommit, kWeights).string()), served(kWeights));
  EXPECT_EQ(hub.count("GET", "/storage/"), 2);  // each of the two LFS files once
  EXPECT_EQ(incomplete_files(cache()), 0);
}

TEST_F(Hub, OfflineReadsTheCacheAndNeverTheNetwork) {
  {
    EnvVar offline("HF_HUB_OFFLINE", "1");
    const std::string e = error_of([] { resolve_pretrained(kRepo, kSae); });
    EXPECT_TRUE(has(e, "HF_HUB_OFFLINE=1")) << e;
    EXPECT_TRUE(hub.requests().empty());
  }
  test::write_bytes(home / "token", hub.good_token);
  const std::string sae = resolve_pretrained(kRepo, kSae);
  const std::string model = model::resolve_checkpoint(kGemma).folder;
  const size_t before = hub.requests().size();
  EnvVar offline("HF_HUB_OFFLINE", "true");
  EXPECT_EQ(resolve_pretrained(kRepo, kSae), sae);
  EXPECT_EQ(model::resolve_checkpoint(kGemma).folder, model);
  EXPECT_EQ(hub::download_file(kRepo, kSae + "/cfg.json"), sae + "/cfg.json");
  EXPECT_EQ(hub.requests().size(), before);
}

TEST_F(Hub, UnreachableHubFallsBackToTheCache) {
  const std::string cached = hub::download_file(kRepo, "README.md");
  EnvVar gone("HF_ENDPOINT", "http://127.0.0.1:1");
  EnvVar no_retries("SAECPP_HUB_RETRIES", "0");
  EXPECT_EQ(hub::download_file(kRepo, "README.md"), cached);
  const std::string e = error_of([] { hub::download_file(kRepo, kWeights); });
  EXPECT_TRUE(has(e, "cannot reach the Hub at http://127.0.0.1:1")) << e;
  EXPECT_TRUE(has(e, "HF_HUB_OFFLINE=1")) << e;
}

TEST_F(Hub, AHostThatDoesNotResolveFailsAtOnce) {       // no network: no 31 s of retries
  EnvVar nowhere("HF_ENDPOINT", "http://hub.invalid");  // .invalid never resolves (RFC 2606)
  const auto t0 = std::chrono::steady_clock::now();
  const std::string e = error_of([] { resolve_pretrained(kRepo, kSae); });
  EXPECT_TRUE(has(e, "cannot reach the Hub at http://hub.invalid")) << e;
  EXPECT_LT(std::chrono::steady_clock::now() - t0, std::chrono::seconds(10));
}

TEST_F(Hub, PathsThatEscapeTheSnapshotAreRefused) {
  test::MockRepo evil{.commit = kCommit};
  evil.files["../../../escaped.txt"] = "x";
  evil.files["ok.txt"] = "y";
  hub.add_repo("evil/repo", evil);
  const std::string e = error_of([] { hub::snapshot_download({.repo_id = "evil/repo"}); });
  EXPECT_TRUE(has(e, "not a safe file path")) << e;
  EXPECT_FALSE(fs::exists(home.path / "escaped.txt"));
  EXPECT_FALSE(fs::exists(cache() / "escaped.txt"));
  for (const char* bad : {"/etc/passwd", "a/../b", "a//b", "a\\b", "", "a/"})
    EXPECT_THROW(hub::check_repo_path("r/x", bad), Error) << bad;
  EXPECT_NO_THROW(hub::check_repo_path("r/x", "snap/blocks.0.hook_resid_post/cfg.json"));
}

TEST_F(Hub, ListingFollowsPagesAndFiltersLikeHuggingfaceHub) {
  hub.page_size = 2;
  const auto files = hub::list_files(kRepo, "main");
  EXPECT_EQ(files.size(), 6u);  // 3 + 2 SAE files and the README, 2 to a page
  EXPECT_EQ(hub.count("GET", "/api/models/" + kRepo + "/tree/"), 3);
  for (const auto& f : files)
    if (f.path.ends_with(".safetensors")) {
      EXPECT_EQ(f.lfs_sha256.size(), 64u) << f.path;
    }
  // fnmatch as filter_repo_objects uses it: '*' crosses '/', a trailing '/' is a folder.
  EXPECT_TRUE(hub::matches_any("snap/blocks.12.hook_resid_post/cfg.json", {"*.json"}));
  EXPECT_TRUE(hub::matches_any("snap/blocks.12.hook_resid_post/cfg.json", {"snap/"}));
  EXPECT_FALSE(hub::matches_any("standard/x/cfg.json", {"snap/*"}));
  EXPECT_TRUE(hub::matches_any("anything", {}));
}

TEST_F(Hub, RenamedRepoIsFollowed) {
  hub.rename("chanind/old-name", kRepo);
  EXPECT_EQ(test::read_bytes(hub::download_file("chanind/old-name", "README.md")),
            "# Matryoshka SAEs\n");
}

TEST_F(Hub, SettingsFromTheEnvironment) {
  EnvVar ep("HF_ENDPOINT", "https://hub.example.org/");
  EXPECT_EQ(hub::hub_settings().endpoint, "https://hub.example.org");
  EXPECT_EQ(hub::hub_settings().token, "");
  test::write_bytes(home / "token", "  hf_from_file \n");
  EXPECT_EQ(hub::hub_settings().token, "hf_from_file");
  EXPECT_EQ(hub::hub_settings().token_source, home / "token");
  {
    test::write_bytes(home / "other", "hf_other");
    EnvVar path("HF_TOKEN_PATH", home / "other");
    EXPECT_EQ(hub::hub_settings().token, "hf_other");
  }
  EnvVar env_token("HF_TOKEN", "hf_env");
  EXPECT_EQ(hub::hub_settings().token, "hf_env");
  EXPECT_EQ(hub::hub_settings().token_source, "$HF_TOKEN");
  for (const char* yes : {"1", "true", "YES", "On"}) {
    EnvVar off("HF_HUB_OFFLINE", yes);
    EXPECT_TRUE(hub::hub_settings().offline) << yes;
  }
  EnvVar no("HF_HUB_OFFLINE", "0");
  EXPECT_FALSE(hub::hub_settings().offline);
  EXPECT_EQ(hub::repo_folder_name("google/gemma-2-2b"), "models--google--gemma-2-2b");
  EXPECT_EQ(hub::repo_folder_name("gpt2"), "models--gpt2");
}

}  // namespace
}  // namespace sae

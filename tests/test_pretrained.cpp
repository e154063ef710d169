// Release names and the Hugging Face cache layout.
#include <gtest/gtest.h>

#include <cstdlib>

#include "core/error.h"
#include "hub/settings.h"
#include "sae/load.h"
#include "sae/pretrained.h"
#include "test_util.h"

namespace sae {
namespace {

namespace fs = std::filesystem;

TEST(Pretrained, MatryoshkaReleasesMapLikeSaeLens) {
  auto e = lookup_pretrained("gemma-2-2b-res-snap-matryoshka-dc", "blocks.12.hook_resid_post");
  ASSERT_TRUE(e);
  EXPECT_EQ(e->repo_id, "chanind/gemma-2-2b-batch-topk-matryoshka-saes-w-32k-l0-40");
  EXPECT_EQ(e->path, "snap/blocks.12.hook_resid_post");
  auto s = lookup_pretrained("gemma-2-2b-res-matryoshka-dc", "blocks.0.hook_resid_post");
  ASSERT_TRUE(s);
  EXPECT_EQ(s->path, "standard/blocks.0.hook_resid_post");
  int layers = 0;
  for (const auto& x : pretrained_table()) layers += x.release == "gemma-2-2b-res-matryoshka-dc";
  EXPECT_EQ(layers, 25);
  EXPECT_FALSE(lookup_pretrained("gemma-2-2b-res-matryoshka-dc", "blocks.25.hook_resid_post"));
}

using test::EnvVar;

TEST(Pretrained, HubCacheDirPrecedence) {  // as huggingface_hub's constants.py reads them
  EnvVar home("HOME", "/home/someone");
  EnvVar xdg("XDG_CACHE_HOME", std::nullopt), legacy("HUGGINGFACE_HUB_CACHE", std::nullopt);
  EnvVar cache("HF_HUB_CACHE", std::nullopt), hf_home("HF_HOME", std::nullopt);
  EXPECT_EQ(hub::hub_cache_dir(), "/home/someone/.cache/huggingface/hub");
  EnvVar xdg2("XDG_CACHE_HOME", "/xdg");
  EXPECT_EQ(hub::hub_cache_dir(), "/xdg/huggingface/hub");
  EnvVar hf_home2("HF_HOME", "~/hf");
  EXPECT_EQ(hub::hub_cache_dir(), "/home/someone/hf/hub");
  EnvVar legacy2("HUGGINGFACE_HUB_CACHE", "/old/hub");
  EXPECT_EQ(hub::hub_cache_dir(), "/old/hub");
  EnvVar cache2("HF_HUB_CACHE", "/fast/hub");
  EXPECT_EQ(hub::hub_cache_dir(), "/fast/hub");
}

TEST(Pretrained, ResolvesReleaseNameInHfCache) {
  test::TempDir dir;
  EnvVar cache_env("HF_HUB_CACHE", dir.path.string());
  const fs::path repo =
      dir.path / "models--chanind--gemma-2-2b-batch-topk-matryoshka-saes-w-32k-l0-40";
  const std::string commit = "0123456789abcdef0123456789abcdef01234567";
  const fs::path sae = repo / "snapshots" / commit / "snap" / "blocks.12.hook_resid_post";
  fs::create_directories(sae);
  fs::create_directories(repo / "refs");
  test::write_bytes((repo / "refs" / "main").string(), commit);
  for (auto& f : fs::directory_iterator(test::golden("jumprelu/sae")))
    fs::copy(f.path(), sae / f.path().filename());

  EXPECT_EQ(resolve_pretrained("gemma-2-2b-res-snap-matryoshka-dc", "blocks.12.hook_resid_post"),
            sae.string());
  LoadedSae l = from_pretrained("gemma-2-2b-res-snap-matryoshka-dc", "blocks.12.hook_resid_post");
  EXPECT_TRUE(l.sparsity.has_value());
  EXPECT_EQ(l.sae.cfg.d_sae, 64);
  // The repo id works too, with the in-repo path as the SAE id.
  EXPECT_EQ(resolve_pretrained("chanind/gemma-2-2b-batch-topk-matryoshka-saes-w-32k-l0-40",
                               "snap/blocks.12.hook_resid_post"),
            sae.string());
  // Through the CLI's release:sae_id form.
  auto r = test::run_cli("info gemma-2-2b-res-snap-matryoshka-dc:blocks.12.hook_resid_post");
  EXPECT_EQ(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("architecture: jumprelu"), std::string::npos) << r.output;
  // A layer not cached, offline: the error says so (online it is downloaded: test_hub.cpp).
  EnvVar offline("HF_HUB_OFFLINE", "1");
  try {
    resolve_pretrained("gemma-2-2b-res-snap-matryoshka-dc", "blocks.3.hook_resid_post");
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("HF_HUB_OFFLINE=1"), std::string::npos) << e.what();
  }
}

TEST(Pretrained, LocalReleaseFolderAndErrors) {
  test::TempDir dir;
  fs::create_directories(dir.path / "rel" / "standard");
  fs::copy(test::golden("topk/sae"), dir.path / "rel" / "standard" / "blocks.0.hook_resid_post");
  LoadedSae l = from_pretrained(dir / "rel", "standard/blocks.0.hook_resid_post");
  EXPECT_EQ(l.sae.cfg.k, 8);
  EXPECT_THROW(from_pretrained(dir / "rel", "standard/blocks.1.hook_resid_post"), Error);
  EXPECT_THROW(resolve_pretrained("no-such-release", "x"), Error);
  EXPECT_THROW(resolve_pretrained("gemma-2-2b-res-matryoshka-dc", "blocks.99.hook_resid_post"),
               Error);
}

}  // namespace
}  // namespace sae

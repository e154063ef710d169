// Gemma-2 config.json and tokenizer.model (issue 4 groundwork), against the files and ids that
// scripts/make_gemma_goldens.py made with transformers and the sentencepiece package.
#include <gtest/gtest.h>

#include "core/error.h"
#include "io/json_file.h"
#include "model/gemma2_config.h"
#include "model/tokenizer.h"
#include "test_util.h"

namespace sae::model {
namespace {

using json = nlohmann::json;

TEST(Gemma2Config, TinyCheckpointsFromTransformers5) {
  Gemma2Config c = read_gemma2_config(test::golden("gemma2/gqa_window/model"));
  EXPECT_EQ(c.hidden_size, 64);
  EXPECT_EQ(c.num_heads, 4);
  EXPECT_EQ(c.num_kv_heads, 2);
  EXPECT_EQ(c.head_dim, 16);
  EXPECT_EQ(c.sliding_window, 6);
  EXPECT_EQ(c.sliding, (std::vector<bool>{true, false, true}));
  EXPECT_EQ(c.rope_theta, 10000.0);
  EXPECT_EQ(c.attn_logit_softcap, 50.0);
  EXPECT_EQ(c.final_logit_softcap, 30.0);
  Gemma2Config odd = read_gemma2_config(test::golden("gemma2/odd_bf16/model"));
  EXPECT_EQ(odd.query_pre_attn_scalar, 20.0);
  EXPECT_EQ(odd.dtype, "bfloat16");
}

TEST(Gemma2Config, RealGemma2_2bConfigFromTransformers4) {
  // google/gemma-2-2b config.json as published (transformers 4.42 layout, rope_theta flat).
  json j = json::parse(R"({"architectures": ["Gemma2ForCausalLM"], "attention_bias": false,
    "attention_dropout": 0.0, "attn_logit_softcapping": 50.0, "bos_token_id": 2,
    "cache_implementation": "hybrid", "eos_token_id": 1, "final_logit_softcapping": 30.0,
    "head_dim": 256, "hidden_act": "gelu_pytorch_tanh", "hidden_activation": "gelu_pytorch_tanh",
    "hidden_size": 2304, "initializer_range": 0.02, "intermediate_size": 9216,
    "max_position_embeddings": 8192, "model_type": "gemma2", "num_attention_heads": 8,
    "num_hidden_layers": 26, "num_key_value_heads": 4, "pad_token_id": 0,
    "query_pre_attn_scalar": 256, "rms_norm_eps": 1e-06, "rope_theta": 10000.0,
    "sliding_window": 4096, "torch_dtype": "float32", "transformers_version": "4.42.4",
    "use_cache": true, "vocab_size": 256000})");
  Gemma2Config c = Gemma2Config::from_json(j, "config.json");
  EXPECT_EQ(c.num_layers, 26);
  EXPECT_EQ(c.head_dim, 256);
  EXPECT_EQ(c.query_pre_attn_scalar, 256.0);
  EXPECT_TRUE(c.sliding[0]);
  EXPECT_FALSE(c.sliding[1]);
  EXPECT_TRUE(c.sliding[24]);
  EXPECT_EQ(c.dtype, "float32");
}

TEST(Gemma2Config, BadConfigsNameTheField) {
  json j = read_json_file(test::golden("gemma2/gqa_window/model/config.json"));
  auto err = [](const json& x) {
    try {
      Gemma2Config::from_json(x, "config.json");
    } catch (const Error& e) {
      return std::string(e.what());
    }
    return std::string("no error");
  };
  json k = j;
  k["model_type"] = "llama";
  EXPECT_EQ(err(k), "config.json: model_type: \"llama\" is not supported (sae.cpp runs gemma2)");
  k = j;
  k.erase("hidden_size");
  EXPECT_EQ(err(k), "config.json: hidden_size: missing");
  k = j;
  k["num_key_value_heads"] = 3;
  EXPECT_NE(err(k).find("num_key_value_heads"), std::string::npos);
  EXPECT_THROW(read_gemma2_config("/nonexistent"), Error);
}

TEST(Tokenizer, MatchesSentencepiecePackage) {
  Tokenizer tok(test::golden("gemma2/gqa_window/model/tokenizer.model"));
  EXPECT_EQ(tok.bos_id(), 2);
  EXPECT_EQ(tok.eos_id(), 1);
  EXPECT_EQ(tok.pad_id(), 0);
  json want = read_json_file(test::golden("gemma2/tokenizer.json"));
  for (size_t i = 0; i < want["texts"].size(); ++i) {
    const std::string text = want["texts"][i].get<std::string>();
    auto ids = tok.encode(text);
    EXPECT_EQ(ids, want["ids"][i].get<std::vector<int32_t>>()) << text;
    EXPECT_EQ(tok.decode(ids), text);  // BOS skipped; byte fallback round-trips
  }
  EXPECT_EQ(tok.encode("abc", false).front() != tok.bos_id(), true);
  EXPECT_TRUE(tok.is_special(tok.bos_id()));
}

TEST(Tokenizer, MissingOrCorruptModel) {
  test::TempDir dir;
  EXPECT_THROW(Tokenizer(dir / "nope.model"), Error);
  test::write_bytes(dir / "bad.model", "not a sentencepiece model");
  try {
    Tokenizer t(dir / "bad.model");
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("bad.model"), std::string::npos);
  }
}

}  // namespace
}  // namespace sae::model

// Parity on the real default model: SmolLM2-135M-Instruct (Q4_1 GGUF, installed into models/ by
// scripts/setup-model.sh). transformers loaded the same file through its gguf integration
// (float32, eager attention, CPU) and generated greedily for a few conversations and raw prompts
// (tools/make_smollm2_reference.py, tests/data/smollm2_reference.json). kvcache must produce the
// same ids, token for token. The prompt ids come from transformers' tokenizer until kvcache has
// its own.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "kvcache/generation/generate.hpp"
#include "kvcache/model/llama.hpp"
#include "test_util.hpp"

#ifndef KVCACHE_DEFAULT_MODEL_PATH
#error "KVCACHE_DEFAULT_MODEL_PATH must name the default model's GGUF file"
#endif

namespace kvcache {
namespace {

const LlamaModel& default_model() {
  static const LlamaModel model = LlamaModel::from_gguf(KVCACHE_DEFAULT_MODEL_PATH);
  return model;
}

TEST(SmolLM2, GreedyIdsEqualTransformers) {
  ASSERT_TRUE(std::filesystem::exists(KVCACHE_DEFAULT_MODEL_PATH))
      << KVCACHE_DEFAULT_MODEL_PATH << " is missing: run scripts/setup-model.sh";
  std::ifstream in(std::string(KVCACHE_TEST_DATA_DIR) + "/smollm2_reference.json");
  const nlohmann::json reference = nlohmann::json::parse(in);
  const LlamaModel& model = default_model();
  EXPECT_EQ(model.config().vocab_size, 49152);
  EXPECT_EQ(model.config().num_hidden_layers, 30);
  EXPECT_TRUE(model.config().tie_word_embeddings);

  GenerationConfig config;
  config.max_new_tokens = reference["max_new_tokens"].get<std::int64_t>();
  config.eos_token_ids = reference["eos_token_ids"].get<std::vector<std::int64_t>>();
  for (const auto& c : reference["cases"]) {
    const auto prompt = c["input_ids"].get<std::vector<std::int64_t>>();
    const auto want = c["new_tokens"].get<std::vector<std::int64_t>>();
    auto [ids, mask] = left_pad({prompt}, 0);
    const GenerateResult result = generate(model, ids, mask, config);
    EXPECT_EQ(result.new_tokens[0], want)
        << c["name"].get<std::string>() << ": transformers wrote " << c["text"].get<std::string>();
  }
}

}  // namespace
}  // namespace kvcache

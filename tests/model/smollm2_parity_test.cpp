// Parity on the real default model: SmolLM2-135M-Instruct (Q4_1 GGUF, installed into models/ by
// scripts/setup-model.sh). transformers loaded the same file through its gguf integration
// (float32, eager attention, CPU) and generated greedily for a few conversations and raw prompts
// (tools/make_smollm2_reference.py, tests/data/smollm2_reference.json). kvcache must produce the
// same ids, token for token — and, from text, the same prompt ids through its own chat template
// and tokenizer, and the same answer text.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "kvcache/generation/generate.hpp"
#include "kvcache/model/gguf.hpp"
#include "kvcache/model/llama.hpp"
#include "kvcache/tokenizer/chat_template.hpp"
#include "kvcache/tokenizer/tokenizer.hpp"
#include "test_util.hpp"

#ifndef KVCACHE_DEFAULT_MODEL_PATH
#error "KVCACHE_DEFAULT_MODEL_PATH must name the default model's GGUF file"
#endif

namespace kvcache {
namespace {

const LlamaModel& default_model() {
  // float32: every weight dequantized exactly, as transformers loads the file.
  static const LlamaModel model =
      LlamaModel::from_gguf(KVCACHE_DEFAULT_MODEL_PATH, {.dtype = DType::kFloat32});
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

// Text to text: kvcache's chat template and tokenizer give transformers' prompt ids, and the
// answer decodes to transformers' text.
TEST(SmolLM2, PromptsFromTextEqualTransformers) {
  ASSERT_TRUE(std::filesystem::exists(KVCACHE_DEFAULT_MODEL_PATH))
      << KVCACHE_DEFAULT_MODEL_PATH << " is missing: run scripts/setup-model.sh";
  std::ifstream in(std::string(KVCACHE_TEST_DATA_DIR) + "/smollm2_reference.json");
  const nlohmann::json reference = nlohmann::json::parse(in);
  const Tokenizer tokenizer = Tokenizer::from_gguf(GgufFile::open(KVCACHE_DEFAULT_MODEL_PATH));
  ASSERT_TRUE(tokenizer.chat_template().has_value());
  const ChatTemplate chat = ChatTemplate::parse(*tokenizer.chat_template());
  for (const auto& c : reference["cases"]) {
    std::string prompt;
    if (c.contains("messages")) {
      std::vector<ChatMessage> messages;
      for (const auto& m : c["messages"]) {
        messages.push_back({m["role"].get<std::string>(), m["content"].get<std::string>()});
      }
      prompt = chat.apply(messages, /*add_generation_prompt=*/true);
    } else {
      prompt = c["raw_text"].get<std::string>();
    }
    const std::string name = c["name"].get<std::string>();
    EXPECT_EQ(prompt, c["prompt"].get<std::string>()) << name;
    EXPECT_EQ(tokenizer.encode(prompt), c["input_ids"].get<std::vector<std::int64_t>>()) << name;
    EXPECT_EQ(tokenizer.decode(c["new_tokens"].get<std::vector<std::int64_t>>()),
              c["text"].get<std::string>())
        << name;
  }
}

}  // namespace
}  // namespace kvcache

// Parity on the real default model: SmolLM2-135M-Instruct (Q4_1 GGUF, installed into models/ by
// scripts/setup-model.sh). transformers loaded the same file through its gguf integration
// (float32, eager attention, CPU) and generated greedily for a few conversations and raw prompts
// (tools/make_smollm2_reference.py, tests/data/smollm2_reference.json). kvcache must produce the
// same ids, token for token — and, from text, the same prompt ids through its own chat template
// and tokenizer, and the same answer text.
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "kvcache/cache/dynamic_cache.hpp"
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

// The default holding (no dtype): the Q4_1 layers and the Q8_0 embedding stay blocks — 96.6 MB,
// not 538 MB — and the quantized kernels (x rounded to int8 per block for decode, bfloat16 tiles
// for prefill) stay close to the exact model: on every reference case, after the prefill and after
// the next decode step, no logit moves by more than 1.0 (seen: at most 0.41 and 0.88, against
// logits up to 38), and the greedy choice is the exact model's or scores within 0.5 of it there
// (one case, "capital", has its first two candidates 0.26 apart in the exact model, and which one
// wins depends on rounding: with AMX the quantized pick agrees, with the AVX-512 or portable
// path it takes the other). Whole answers drift apart after a few tokens on some prompts (the
// first 4 to all 64 tokens agree, by case), as llama.cpp's quantized kernels do too.
TEST(SmolLM2, QuantizedBlocksStayCloseToTheExactModel) {
  ASSERT_TRUE(std::filesystem::exists(KVCACHE_DEFAULT_MODEL_PATH))
      << KVCACHE_DEFAULT_MODEL_PATH << " is missing: run scripts/setup-model.sh";
  const LlamaModel blocks = LlamaModel::from_gguf(KVCACHE_DEFAULT_MODEL_PATH);
  EXPECT_LT(blocks.weight_bytes(), 100'000'000u);  // 92 MiB of blocks, as the file holds them
  const LlamaModel& exact = default_model();
  EXPECT_GT(exact.weight_bytes(), 500'000'000u);
  std::ifstream in(std::string(KVCACHE_TEST_DATA_DIR) + "/smollm2_reference.json");
  const nlohmann::json reference = nlohmann::json::parse(in);
  // How far below the exact model's best logit the exact model scores `q`'s greedy choice.
  auto choice_gap = [](const Tensor& q, const Tensor& exact) {
    const float* e = exact.data_as<float>();
    return static_cast<double>(e[argmax_last(exact)[0]] - e[argmax_last(q)[0]]);
  };
  auto max_diff = [](const Tensor& a, const Tensor& b) {
    double d = 0;
    for (std::int64_t i = 0; i < a.numel(); ++i)
      d = std::max(d,
                   static_cast<double>(std::fabs(a.data_as<float>()[i] - b.data_as<float>()[i])));
    return d;
  };
  for (const auto& c : reference["cases"]) {
    const std::string name = c["name"].get<std::string>();
    const auto [ids, mask] = left_pad({c["input_ids"].get<std::vector<std::int64_t>>()}, 0);
    DynamicCache<> cache_q, cache_f;
    // One forward of `input` through both models, each on its own cache, compared.
    auto step = [&](const Tensor& input, const char* what) {
      const Tensor q =
          blocks.forward({.input_ids = input, .past_key_values = &cache_q, .logits_to_keep = 1});
      const Tensor f =
          exact.forward({.input_ids = input, .past_key_values = &cache_f, .logits_to_keep = 1});
      EXPECT_LE(choice_gap(q, f), 0.5) << name << ", " << what;
      EXPECT_LT(max_diff(q, f), 1.0) << name << ", " << what;
    };
    step(ids, "prefill");
    Tensor next = Tensor::empty({1, 1}, DType::kInt64);
    next.data_as<std::int64_t>()[0] = c["new_tokens"][0].get<std::int64_t>();
    step(next, "decode step");
  }
}

}  // namespace
}  // namespace kvcache

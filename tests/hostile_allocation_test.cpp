// Allocation failure through the public entry points (issue #10): generate(), LlamaModel's
// loaders and forward(), GgufFile::open, ModelConfig's loaders, the tokenizer's loaders, encode,
// decode and the chat template, each run with its 1st, 2nd, ... allocation failing until the call
// makes fewer allocations than the one that fails. Every failure must be a kvcache::Error saying
// "out of memory" (never a std::bad_alloc or another exception type, and never an abort: a
// std::bad_alloc inside an OpenMP region, or an allocation that fails in nlohmann_json's noexcept
// destructor, would end this program through std::terminate); where the call succeeds it must
// give what it gives unarmed.
//
// generate() does not promise to leave a caller's cache as it was (see its documentation): the
// test checks what it does promise, that every layer keeps the tokens it held, that a layer
// holds the failed call's tokens only if every layer before it does, and that crop(past) returns
// a DynamicCache to what it held (lengths and contents).
//
// Inputs are small so that every sweep stays short: a random two-layer model (as the generation
// tests make it), the tiny GGUF and safetensors checkpoints and the tiny SmolLM tokenizer in
// tests/data. A call that makes more than kMaxRuns allocations is swept at kMaxRuns evenly spread
// N (every N up to the first kDenseRuns, then a stride), so the program runs in seconds.
//
// A program of its own: it replaces the global operator new (tests/fail_nth_allocation.hpp).
#include <gtest/gtest.h>

#include <climits>
#include <cstdint>
#include <cstdio>
#include <functional>
#include <string>
#include <vector>

#include "fail_nth_allocation.hpp"
#include "kvcache/cache/dynamic_cache.hpp"
#include "kvcache/generation/generate.hpp"
#include "kvcache/model/config.hpp"
#include "kvcache/model/gguf.hpp"
#include "kvcache/model/llama.hpp"
#include "kvcache/tokenizer/chat_template.hpp"
#include "kvcache/tokenizer/tokenizer.hpp"
#include "test_util.hpp"

#ifndef KVCACHE_TEST_DATA_DIR
#error "KVCACHE_TEST_DATA_DIR must be defined by the build"
#endif

namespace kvcache {
namespace {

using testing::FailNthAllocation;

const std::string kData = KVCACHE_TEST_DATA_DIR;
constexpr long kDenseRuns = 400;  // every N up to this one is run
constexpr long kMaxRuns = 900;    // runs per sweep at most

// How many allocations f() makes (counted, none failing).
long allocations_of(const std::function<void()>& f) {
  FailNthAllocation count(LONG_MAX);
  f();
  return count.allocations();
}

struct SweepResult {
  long allocations = 0;  // made by the call unarmed
  long failures = 0;     // runs that threw (each checked)
};

// Runs `call` with its Nth allocation failing for the N the cap allows (see the top of the file);
// each failure must be a kvcache::Error saying "out of memory", and `after_failure` then checks
// what the call left. A run whose failing allocation was never reached (the call made fewer) must
// succeed, and `after_success` checks its result. `call` does nothing but the library call (its
// arguments are made before, by `setup` when each run needs fresh ones, and its result is moved
// out), so that every allocation it makes is the library's.
SweepResult sweep(const std::string& name, const std::function<void()>& call,
                  const std::function<void()>& after_failure = {},
                  const std::function<void()>& after_success = {},
                  const std::function<void()>& setup = {}) {
  SCOPED_TRACE(name);
  SweepResult result;
  if (setup) setup();
  result.allocations = allocations_of(call);
  EXPECT_GT(result.allocations, 0) << name << " allocates nothing: the sweep tests nothing";
  const long n_max = result.allocations + 1;  // the last run reaches no failing allocation
  const long stride = n_max <= kMaxRuns ? 1
                                        : (n_max - kDenseRuns + (kMaxRuns - kDenseRuns) - 1) /
                                              (kMaxRuns - kDenseRuns);
  for (long n = 1; n <= n_max; n += n < kDenseRuns ? 1 : stride) {
    std::string failure;  // what went wrong, reported after disarming (gtest allocates)
    bool threw = false, reached = false;
    if (setup) setup();
    {
      FailNthAllocation arm(n);
      try {
        call();
      } catch (const Error& e) {
        threw = true;
        if (std::string(e.what()).find("out of memory") == std::string::npos)
          failure = std::string("a kvcache::Error that does not say out of memory: ") + e.what();
      } catch (const std::bad_alloc&) {
        threw = true;
        failure = "std::bad_alloc escaped";
      } catch (const std::exception& e) {
        threw = true;
        failure = std::string("another exception escaped: ") + e.what();
      } catch (...) {
        threw = true;
        failure = "a non-std exception escaped";
      }
      reached = arm.allocations() >= n;
    }
    EXPECT_TRUE(failure.empty()) << name << ", allocation " << n << " failing: " << failure;
    if (threw) {
      ++result.failures;
      EXPECT_TRUE(reached) << name << " threw at N = " << n << " without reaching it";
      if (after_failure) after_failure();
    } else if (after_success) {
      after_success();
    }
    if (::testing::Test::HasFailure()) break;  // one broken N says enough
    if (!reached) break;                       // the call made fewer than n allocations
  }
  EXPECT_GT(result.failures, 0) << name;
  std::printf("  %s: %ld allocations, %ld runs failed\n", name.c_str(), result.allocations,
              result.failures);
  return result;
}

LlamaModel tiny_model() {
  const ModelConfig c = testing::tiny_llama_config();
  return LlamaModel::from_weights(c, random_llama_weights(c, 7));
}

Tensor ids_tensor(const std::vector<std::int64_t>& ids) {
  Tensor t = Tensor::empty({1, static_cast<std::int64_t>(ids.size())}, DType::kInt64);
  for (std::size_t i = 0; i < ids.size(); ++i) t.data_as<std::int64_t>()[i] = ids[i];
  return t;
}

// What a DynamicCache holds: each layer's length and contents (copied out).
struct Snapshot {
  std::vector<std::int64_t> lengths;
  std::vector<std::vector<double>> contents;
  bool operator==(const Snapshot&) const = default;
};

Snapshot snapshot(const DynamicCache<>& cache) {
  Snapshot s;
  for (const auto& [k, v] : cache.to_legacy_cache()) {
    s.lengths.push_back(k.size(2));
    s.contents.push_back(testing::to_doubles(k));
    s.contents.push_back(testing::to_doubles(v));
  }
  return s;
}

TEST(HostileAllocation, GenerateWithItsOwnCache) {
  const LlamaModel model = tiny_model();
  const Tensor ids = ids_tensor({3, 14, 15, 92, 65});
  const GenerationConfig config{.max_new_tokens = 4};
  const auto want = generate(model, ids, Tensor(), config).new_tokens;
  std::vector<std::vector<std::int64_t>> got;
  sweep(
      "generate", [&] { got = generate(model, ids, Tensor(), config).new_tokens; }, {},
      [&] { EXPECT_EQ(got, want); });
}

TEST(HostileAllocation, GenerateWithACallersCacheKeepsWhatItHeld) {
  const LlamaModel model = tiny_model();
  const std::int64_t layers = model.config().num_hidden_layers;
  // The caller's cache holds a conversation of 3 tokens; generate() continues it with 4 more.
  DynamicCache<> base;
  (void)model.forward({.input_ids = ids_tensor({5, 6, 7}), .past_key_values = &base});
  const std::int64_t past = base.get_seq_length();
  ASSERT_EQ(past, 3);
  const Snapshot before = snapshot(base);
  const Tensor ids = ids_tensor({8, 9, 10, 11});
  const GenerationConfig config{.max_new_tokens = 3};
  DynamicCache<> reference = base.clone();
  const auto want = generate(model, ids, Tensor(), config, &reference).new_tokens;
  const Snapshot done = snapshot(reference);

  DynamicCache<> cache;
  std::vector<std::vector<std::int64_t>> got;
  sweep(
      "generate with a cache",
      [&] { got = generate(model, ids, Tensor(), config, &cache).new_tokens; },
      [&] {
        const Snapshot after = snapshot(cache);
        ASSERT_EQ(static_cast<std::int64_t>(after.lengths.size()), layers);
        for (std::int64_t l = 0; l < layers; ++l) {
          EXPECT_GE(after.lengths[l], past) << "layer " << l;
          if (l > 0) {
            EXPECT_LE(after.lengths[l], after.lengths[l - 1]) << "layer " << l;
          }
        }
        cache.crop(past);
        EXPECT_EQ(snapshot(cache), before) << "crop(past) after a failed generate()";
      },
      [&] {
        EXPECT_EQ(got, want);
        EXPECT_EQ(snapshot(cache), done);
      },
      [&] { cache = base.clone(); });
}

TEST(HostileAllocation, ForwardPrefillAndDecode) {
  const LlamaModel model = tiny_model();
  // 40 tokens: n_rep x q_len = 80 query rows per kv head take the prefill path of the attention;
  // the decode path (a cache of 40 and one token) runs in the generate tests.
  std::vector<std::int64_t> prompt;
  for (std::int64_t i = 0; i < 40; ++i) prompt.push_back((i * 31 + 3) % 97);
  const Tensor ids = ids_tensor(prompt);
  const std::vector<double> want = testing::to_doubles(model.forward({.input_ids = ids}));
  const ForwardArgs prefill{.input_ids = ids};
  Tensor got;
  sweep(
      "forward", [&] { got = model.forward(prefill); }, {},
      [&] { EXPECT_EQ(testing::to_doubles(got), want); });
  DynamicCache<> cache;
  (void)model.forward({.input_ids = ids, .past_key_values = &cache});
  const Snapshot before = snapshot(cache);
  const ForwardArgs step{
      .input_ids = ids_tensor({4}), .past_key_values = &cache, .use_cache = false};
  sweep(
      "forward, a decode step, not storing", [&] { got = model.forward(step); },
      [&] { EXPECT_EQ(snapshot(cache), before); });
}

TEST(HostileAllocation, ModelLoaders) {
  const ModelConfig c = testing::tiny_llama_config();
  const auto weights = random_llama_weights(c, 11);
  ModelConfig copy;  // from_weights takes the config by value: the copy is made unarmed
  sweep(
      "LlamaModel::from_weights", [&] { (void)LlamaModel::from_weights(std::move(copy), weights); },
      {}, {}, [&] { copy = c; });
  const std::string checkpoint = kData + "/llama_gqa", config = checkpoint + "/config.json";
  sweep("ModelConfig::from_file", [&] { (void)ModelConfig::from_file(config); });
  sweep("LlamaModel::from_pretrained", [&] { (void)LlamaModel::from_pretrained(checkpoint); });
}

TEST(HostileAllocation, GgufLoaders) {
  const std::string blocks = kData + "/gguf/smollm2_blocks.gguf";
  sweep("GgufFile::open", [&] { (void)GgufFile::open(blocks); });
  const std::string tiny = kData + "/gguf/tiny_q4_k_m.gguf";
  const GgufFile file = GgufFile::open(tiny);
  sweep("ModelConfig::from_gguf", [&] { (void)ModelConfig::from_gguf(file); });
  sweep("LlamaModel::from_gguf", [&] { (void)LlamaModel::from_gguf(tiny); });
}

TEST(HostileAllocation, TokenizerLoadEncodeDecodeAndChatTemplate) {
  // tiny_smollm: tokenizer.json and tokenizer_config.json (special tokens, the chat template).
  const std::string dir = kData + "/tokenizer/tiny_smollm";
  const std::string json = dir + "/tokenizer.json";
  sweep("Tokenizer::from_json_file", [&] { (void)Tokenizer::from_json_file(json); });
  sweep("Tokenizer::from_pretrained", [&] { (void)Tokenizer::from_pretrained(dir); });

  const Tokenizer tokenizer = Tokenizer::from_pretrained(dir);
  const std::string text = "Hello world, h\xc3\xa9llo <|im_start|>user 12345 don't\n\ttabs";
  const std::vector<std::int64_t> want_ids = tokenizer.encode(text);
  std::vector<std::int64_t> ids;
  sweep(
      "Tokenizer::encode", [&] { ids = tokenizer.encode(text); }, {},
      [&] { EXPECT_EQ(ids, want_ids); });
  const std::string want_text = tokenizer.decode(want_ids);
  std::string decoded;
  sweep(
      "Tokenizer::decode", [&] { decoded = tokenizer.decode(want_ids); }, {},
      [&] { EXPECT_EQ(decoded, want_text); });

  ASSERT_TRUE(tokenizer.chat_template().has_value());
  const std::vector<ChatMessage> messages = {{.role = "user", .content = "What is 2 + 2?"},
                                             {.role = "assistant", .content = "4."},
                                             {.role = "user", .content = "And 3 + 3?"}};
  const ChatTemplateOptions options = ChatTemplateOptions::from_tokenizer(tokenizer);
  const std::string& chat_template = *tokenizer.chat_template();
  const std::string want_prompt = apply_chat_template(messages, true, chat_template, options);
  std::string prompt;
  ChatTemplateOptions copy;  // apply_chat_template takes the options by value: copied unarmed
  sweep(
      "apply_chat_template",
      [&] { prompt = apply_chat_template(messages, true, chat_template, std::move(copy)); }, {},
      [&] { EXPECT_EQ(prompt, want_prompt); }, [&] { copy = options; });
}

}  // namespace
}  // namespace kvcache

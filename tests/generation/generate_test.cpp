// generate() and the hand-written loop over any cache: a prefilled prompt cache (dynamic, static,
// sink, quantized) cloned and continued two ways at once (each continuation equal to a fresh
// run), StaticCache equal to DynamicCache token for token (random models from both loaders' paths,
// a transformers fixture, the default GGUF model where installed; there also sink and quantized
// caches that keep every token in full precision), GenerationConfig::cache_implementation, and
// the errors of sizes that cannot be held.
#include "kvcache/generation/generate.hpp"

#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <functional>
#include <limits>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <vector>

#include "generation/prompt_reuse.hpp"
#include "kvcache/cache/static_cache.hpp"
#include "kvcache/model/llama.hpp"
#include "kvcache/model/safetensors.hpp"
#include "test_util.hpp"

#ifndef KVCACHE_TEST_DATA_DIR
#error "KVCACHE_TEST_DATA_DIR must name tests/data"
#endif

namespace kvcache {
namespace {

using testing::expect_clones_are_independent;
using testing::kPrompt;
using testing::prefill;
using testing::to_doubles;

ModelConfig tiny_config() { return testing::tiny_llama_config(); }

const LlamaModel& tiny_model() {
  static const LlamaModel model = LlamaModel::from_weights(
      tiny_config(), random_llama_weights(tiny_config(), 3, DType::kFloat32, 0.3f));
  return model;
}

// Each cache kind through generation/prompt_reuse.hpp's scenario (8 prompt tokens, then 6 steps).
TEST(PromptReuse, ClonedDynamicCachesContinueIndependently) {
  expect_clones_are_independent<DynamicCache<>>(tiny_model(), [] { return DynamicCache<>(); });
}

TEST(PromptReuse, ClonedStaticCachesContinueIndependently) {
  expect_clones_are_independent<StaticCache<>>(tiny_model(), [] { return StaticCache<>(1, 32); });
}

TEST(PromptReuse, ClonedSinkCachesContinueIndependently) {
  // A window of 10: the clones evict (and re-rotate the kept keys) from the third step on.
  const SinkCacheOptions options{.window_length = 10,
                                 .num_sink_tokens = 4,
                                 .rope_inv_freq = RotaryEmbedding(tiny_config().rope).inv_freq()};
  expect_clones_are_independent<SinkCache<>>(tiny_model(), [&] { return SinkCache<>(options); });
}

TEST(PromptReuse, ClonedQuantizedCachesContinueIndependently) {
  // Blocks of 8 tokens past a residual of 2: the clones flush their first block at the second step.
  const QuantizedCacheOptions options{.nbits = 4, .group_size = 8, .residual_length = 2};
  expect_clones_are_independent<QuantizedCache<>>(tiny_model(),
                                                  [&] { return QuantizedCache<>(options); });
}

TEST(PromptReuse, GenerateOnClonesOfOnePromptEqualsFreshGenerations) {
  const LlamaModel& model = tiny_model();
  DynamicCache<> prompt_cache;
  prefill(model, prompt_cache);
  for (const std::vector<std::int64_t>& turn :
       {std::vector<std::int64_t>{20, 21, 22}, std::vector<std::int64_t>{40, 41}}) {
    DynamicCache<> cache = prompt_cache.clone();
    auto [turn_ids, unused] = left_pad({turn}, 0);
    const Tensor mask = ones_mask(1, 8 + static_cast<std::int64_t>(turn.size()));
    const GenerateResult reused = generate(model, turn_ids, mask, {.max_new_tokens = 8}, &cache);
    // From scratch: the prompt and the turn in one prefill.
    std::vector<std::int64_t> whole = kPrompt;
    whole.insert(whole.end(), turn.begin(), turn.end());
    auto [ids, whole_mask] = left_pad({whole}, 0);
    const GenerateResult fresh = generate(model, ids, whole_mask, {.max_new_tokens = 8});
    EXPECT_EQ(reused.new_tokens, fresh.new_tokens);
    EXPECT_EQ(prompt_cache.get_seq_length(), 8);
  }
}

// --- StaticCache and DynamicCache agree ----------------------------------------------------------

TEST(StaticGeneration, GreedyTokensEqualDynamicOnALeftPaddedBatch) {
  const LlamaModel& model = tiny_model();
  auto [ids, mask] = left_pad({{11, 12, 13}, {21, 22, 23, 24, 25}}, 0);
  GenerationConfig config{.max_new_tokens = 16};
  const GenerateResult dynamic = generate(model, ids, mask, config);
  config.cache_implementation = "static";
  const GenerateResult fixed = generate(model, ids, mask, config);
  EXPECT_EQ(fixed.new_tokens, dynamic.new_tokens);
  EXPECT_EQ(fixed.cache_length, 5 + 15);
  EXPECT_EQ(fixed.cache_bytes, dynamic.cache_bytes);  // the filled slots, not the capacity
  // With EOS: a finished row emits pad in both.
  config.eos_token_ids = {dynamic.new_tokens[0][3]};
  config.pad_token_id = 96;
  const GenerateResult fixed_eos = generate(model, ids, mask, config);
  config.cache_implementation = "dynamic";
  EXPECT_EQ(fixed_eos.new_tokens, generate(model, ids, mask, config).new_tokens);
  // A StaticCache passed in, sized exactly (the last token needs no slot), then reused after a
  // reset for a second generation.
  StaticCache<> cache(2, 5 + 16 - 1);
  EXPECT_EQ(generate(model, ids, mask, {.max_new_tokens = 16}, &cache).new_tokens,
            dynamic.new_tokens);
  EXPECT_EQ(cache.get_seq_length(), 5 + 15);
  cache.reset();
  EXPECT_EQ(generate(model, ids, mask, {.max_new_tokens = 16}, &cache).new_tokens,
            dynamic.new_tokens);
}

TEST(StaticGeneration, SampledTokensEqualDynamic) {
  const LlamaModel& model = tiny_model();
  auto [ids, mask] = left_pad({{5, 6, 7}}, 0);
  GenerationConfig config{
      .max_new_tokens = 12, .do_sample = true, .temperature = 1.3f, .top_p = 0.9f, .seed = 9};
  const auto dynamic = generate(model, ids, mask, config).new_tokens;
  config.cache_implementation = "static";
  EXPECT_EQ(generate(model, ids, mask, config).new_tokens, dynamic);
}

TEST(StaticGeneration, HandWrittenLoopEqualsDynamicLogits) {
  const LlamaModel& model = tiny_model();
  auto [ids, mask] = left_pad({{3, 14, 15, 92, 65, 35}, {89, 79, 32}}, 0);
  DynamicCache<> dynamic;
  StaticCache<> fixed(2, 6 + 10);
  std::vector<std::int64_t> cache_position = make_cache_position(0, ids.size(1));
  Tensor step_ids = ids;
  for (int step = 0; step < 10; ++step) {
    const Tensor a = model.forward({.input_ids = step_ids,
                                    .attention_mask = mask,
                                    .cache_position = cache_position,
                                    .past_key_values = &dynamic,
                                    .logits_to_keep = 1});
    const Tensor b = model.forward({.input_ids = step_ids,
                                    .attention_mask = mask,
                                    .cache_position = cache_position,
                                    .past_key_values = &fixed,
                                    .logits_to_keep = 1});
    EXPECT_EQ(to_doubles(a), to_doubles(b)) << "step " << step;
    const auto next = argmax_last(a);
    step_ids = token_column(next);
    mask = extend_attention_mask(mask);
    cache_position = {cache_position.back() + 1};
  }
  EXPECT_EQ(fixed.get_seq_length(), dynamic.get_seq_length());
  EXPECT_EQ(fixed.get_max_cache_shape(), 16);
}

TEST(StaticGeneration, UseCacheFalseWorksAndLeavesTheCacheAlone) {
  const LlamaModel& model = tiny_model();
  auto [ids, mask] = left_pad({{4, 8, 15, 16}}, 0);
  StaticCache<> cache(1, 8);
  model.forward({.input_ids = ids, .attention_mask = mask, .past_key_values = &cache});
  const Tensor step = token_column({23});
  const Tensor grown = extend_attention_mask(mask);
  const auto peek = to_doubles(model.forward(
      {.input_ids = step, .attention_mask = grown, .past_key_values = &cache, .use_cache = false}));
  EXPECT_EQ(cache.get_seq_length(), 4);
  const auto real = to_doubles(
      model.forward({.input_ids = step, .attention_mask = grown, .past_key_values = &cache}));
  EXPECT_EQ(cache.get_seq_length(), 5);
  EXPECT_EQ(peek, real);
}

TEST(StaticGeneration, FixtureFromSafetensorsMatchesTransformersAndDynamic) {
  // The safetensors loader's path, on a transformers fixture: generate() with a StaticCache gives
  // transformers' generate() tokens, as the DynamicCache does.
  const std::string dir = std::string(KVCACHE_TEST_DATA_DIR) + "/llama_gqa";
  const LlamaModel model = LlamaModel::from_pretrained(dir);
  const SafetensorsFile expected = SafetensorsFile::open(dir + "/expected.safetensors");
  std::ifstream json_in(dir + "/expected.json");
  const nlohmann::json meta = nlohmann::json::parse(json_in);
  const Tensor input_ids = cpu::clone(expected.tensor("input_ids"));
  const Tensor mask = cpu::clone(expected.tensor("attention_mask"));
  const Tensor want = expected.tensor("generate_tokens");
  GenerationConfig config{.max_new_tokens = want.size(1)};
  if (meta.contains("eos_token_id") && !meta["eos_token_id"].is_null())
    config.eos_token_ids = {meta["eos_token_id"].get<std::int64_t>()};
  config.pad_token_id = meta.value("pad_token_id", std::int64_t{0});
  const GenerateResult dynamic = generate(model, input_ids, mask, config);
  config.cache_implementation = "static";
  const GenerateResult fixed = generate(model, input_ids, mask, config);
  EXPECT_EQ(fixed.new_tokens, dynamic.new_tokens);
  ASSERT_EQ(fixed.new_tokens.size(), static_cast<std::size_t>(want.size(0)));
  for (const auto& row : fixed.new_tokens)
    ASSERT_EQ(row.size(), static_cast<std::size_t>(want.size(1)));
  const auto flat = to_doubles(want);
  for (std::int64_t b = 0; b < want.size(0); ++b)
    for (std::int64_t j = 0; j < want.size(1); ++j)
      EXPECT_EQ(fixed.new_tokens[static_cast<std::size_t>(b)][static_cast<std::size_t>(j)],
                static_cast<std::int64_t>(flat[static_cast<std::size_t>(b * want.size(1) + j)]))
          << "row " << b << ", token " << j;
}

// The default model (scripts/setup-model.sh), for the GGUF loader's path with quantized weights;
// nullopt where it is not installed.
std::optional<LlamaModel> default_gguf_model() {
  const std::string path = KVCACHE_DEFAULT_MODEL_PATH;
  if (!std::filesystem::exists(path)) return std::nullopt;
  return LlamaModel::from_gguf(path);
}

// generate() on the default model: 6 prompt tokens and 12 new ones, the cache `config` names.
GenerateResult generate_on_default_gguf(const LlamaModel& model, GenerationConfig config) {
  auto [ids, mask] = left_pad({{1, 9690, 28, 940, 314, 597}}, 0);
  config.max_new_tokens = 12;
  return generate(model, ids, mask, config);
}

TEST(StaticGeneration, DefaultGgufModelMatchesDynamic) {
  const std::optional<LlamaModel> model = default_gguf_model();
  if (!model) GTEST_SKIP() << "no default model (scripts/setup-model.sh)";
  const GenerateResult dynamic = generate_on_default_gguf(*model, {});
  const GenerateResult fixed = generate_on_default_gguf(*model, {.cache_implementation = "static"});
  EXPECT_EQ(fixed.new_tokens, dynamic.new_tokens);
  EXPECT_EQ(fixed.cache_length, dynamic.cache_length);
}

// --- cache_implementation and make_generation_cache ------------------------------------------

TEST(CacheImplementation, MakesEachKind) {
  const LlamaModel& model = tiny_model();
  const auto dynamic = make_generation_cache<cpu::Backend>(model, "dynamic", 2, 40);
  ASSERT_NE(dynamic_cast<DynamicCache<>*>(dynamic.get()), nullptr);
  EXPECT_EQ(dynamic->get_max_cache_shape(), -1);
  const auto fixed = make_generation_cache<cpu::Backend>(model, "static", 2, 40);
  auto* as_static = dynamic_cast<StaticCache<>*>(fixed.get());
  ASSERT_NE(as_static, nullptr);
  EXPECT_EQ(as_static->get_max_cache_shape(), 40);
  EXPECT_EQ(as_static->max_batch_size(), 2);
  EXPECT_EQ(as_static->num_layers(), 2);  // allocated up front, every layer
  EXPECT_EQ(as_static->capacity_bytes(), 2u * 2 * 2 * 2 * 40 * 16 * 4);
  EXPECT_KVCACHE_ERROR(make_generation_cache<cpu::Backend>(model, "paged", 1, 4),
                       "\"quantized\" or \"offloaded\", got \"paged\"");
  // The offloaded cache keeps a GPU model's cache in host memory: not for a CPU model.
  EXPECT_KVCACHE_ERROR(make_generation_cache<cpu::Backend>(model, "offloaded", 1, 4),
                       "the offloaded cache keeps a GPU model's cache in host memory");
  if (cuda::device_count() == 0) {
    EXPECT_KVCACHE_ERROR(OffloadedCache(), "OffloadedCache");
  }
  const auto sink = make_generation_cache<cpu::Backend>(model, "sink", 1, 4);
  ASSERT_NE(dynamic_cast<SinkCache<>*>(sink.get()), nullptr);
  const auto quant = make_generation_cache<cpu::Backend>(model, "quantized", 1, 4);
  ASSERT_NE(dynamic_cast<QuantizedCache<>*>(quant.get()), nullptr);
  EXPECT_KVCACHE_ERROR(make_generation_cache<cuda::Backend>(model, "static", 1, 4),
                       "expected a model on cuda");
  EXPECT_KVCACHE_ERROR(make_generation_cache<cpu::Backend>(model, "static", 0, 4),
                       "expected batch >= 1");
}

TEST(CacheImplementation, UnknownNamesAreRejected) {
  const LlamaModel& model = tiny_model();
  auto [ids, mask] = left_pad({{1, 2, 3}}, 0);
  GenerationConfig config{.max_new_tokens = 4};
  for (const char* name : {"", "Static", "sliding_window", "Quantized"}) {
    config.cache_implementation = name;
    EXPECT_KVCACHE_ERROR(generate(model, ids, mask, config), std::string("got \"") + name + "\"");
    DynamicCache<> cache;  // also when a cache is passed
    EXPECT_KVCACHE_ERROR(generate(model, ids, mask, config, &cache), "cache_implementation");
    EXPECT_EQ(cache.num_layers(), 0);
  }
}

TEST(CacheImplementation, SlidingNeedsAModelWithSlidingLayers) {
  // "sliding" (transformers' "sliding_window") on a model whose layers all attend in full is an
  // error before anything runs; the window fixtures generate over it (parity_test.cpp).
  const LlamaModel& model = tiny_model();
  EXPECT_KVCACHE_ERROR(make_generation_cache<cpu::Backend>(model, "sliding", 1, 8),
                       "expected a model with sliding-window layers");
  auto [ids, mask] = left_pad({{1, 2, 3}}, 0);
  GenerationConfig config{.max_new_tokens = 4};
  config.cache_implementation = "sliding";
  EXPECT_KVCACHE_ERROR(generate(model, ids, mask, config), "all attend in full");
  const LlamaModel windowed =
      LlamaModel::from_pretrained(std::string(KVCACHE_TEST_DATA_DIR) + "/mistral_window");
  const auto cache = make_generation_cache<cpu::Backend>(windowed, "sliding", 1, 4);
  ASSERT_NE(dynamic_cast<DynamicCache<>*>(cache.get()), nullptr);
}

TEST(CacheImplementation, DefaultGgufModelSinkAndQuantizedMatchDynamic) {
  // The GGUF loader's path through the "sink" and "quantized" kinds, sized so that neither drops
  // nor quantizes a token of the 6 + 12: their tokens must then be the dynamic cache's.
  const std::optional<LlamaModel> model = default_gguf_model();
  if (!model) GTEST_SKIP() << "no default model (scripts/setup-model.sh)";
  const GenerateResult dynamic = generate_on_default_gguf(*model, {});
  GenerationConfig config{.cache_implementation = "sink"};
  config.cache_config.window_length = 6 + 12 + 1;  // longer than every token: nothing evicted
  const GenerateResult sink = generate_on_default_gguf(*model, config);
  EXPECT_EQ(sink.new_tokens, dynamic.new_tokens);
  EXPECT_EQ(sink.cache_length, dynamic.cache_length);
  config.cache_implementation = "quantized";
  config.cache_config.residual_length = 6 + 12;  // every token stays in the residual
  const GenerateResult quantized = generate_on_default_gguf(*model, config);
  EXPECT_EQ(quantized.new_tokens, dynamic.new_tokens);
  EXPECT_EQ(quantized.cache_length, dynamic.cache_length);
}

// --- sizes that cannot be held (issue #10) ---------------------------------------------------

TEST(GenerateLimits, TooSmallAStaticCacheIsAnErrorBeforeTheFirstToken) {
  const LlamaModel& model = tiny_model();
  auto [ids, mask] = left_pad({{1, 2, 3}}, 0);
  StaticCache<> cache(1, 3 + 6 - 2);  // one slot short for 6 new tokens
  int calls = 0;
  EXPECT_KVCACHE_ERROR(generate(model, ids, mask, {.max_new_tokens = 6}, &cache,
                                [&](std::int64_t, std::int64_t, std::int64_t) {
                                  ++calls;
                                  return true;
                                }),
                       "expected the cache to hold past + prompt_len + max_new_tokens - 1 = 0 + "
                       "3 + 6 - 1 = 8 tokens, but it holds at most 7");
  EXPECT_EQ(calls, 0);
  EXPECT_EQ(cache.get_seq_length(), 0);
  EXPECT_EQ(generate(model, ids, mask, {.max_new_tokens = 5}, &cache).new_tokens[0].size(), 5u);
}

TEST(GenerateLimits, PromptPlusMaxNewTokensOverflowIsAnError) {
  const LlamaModel& model = tiny_model();
  auto [ids, mask] = left_pad({{1, 2, 3}}, 0);
  const std::int64_t max = std::numeric_limits<std::int64_t>::max();
  for (const char* kind : {"dynamic", "static"}) {
    GenerationConfig config{.max_new_tokens = max};
    config.cache_implementation = kind;
    config.allow_past_context = true;  // the sizes, not the context length, are tested here
    EXPECT_KVCACHE_ERROR(generate(model, ids, mask, config),
                         "past + prompt_len + max_new_tokens of 3 + 9223372036854775807 does not "
                         "fit in 64 bits");
    config.max_new_tokens = max - 3;  // fits, but a static cache of that size does not
    if (std::string(kind) == "static") {
      EXPECT_KVCACHE_ERROR(generate(model, ids, mask, config), "StaticCache");
    }
  }
  // A cache already holding tokens: past + prompt + max_new_tokens.
  DynamicCache<> cache;
  generate(model, ids, mask, {.max_new_tokens = 2}, &cache);
  EXPECT_KVCACHE_ERROR(generate(model, ids, extend_attention_mask(ones_mask(1, 4), 3),
                                {.max_new_tokens = max - 6, .allow_past_context = true}, &cache),
                       "does not fit in 64 bits");
  EXPECT_EQ(cache.get_seq_length(), 4);
}

TEST(GenerateLimits, HugeMaxNewTokensWithADynamicCacheDoesNotAllocateItUpFront) {
  // 10^12 new tokens, stopped by the callback after three: the dynamic cache reserves a bounded
  // number of slots and grows as it goes; a static cache of that size is a clear error.
  const LlamaModel& model = tiny_model();
  auto [ids, mask] = left_pad({{1, 2, 3}}, 0);
  GenerationConfig config{.max_new_tokens = 1'000'000'000'000, .allow_past_context = true};
  const GenerateResult result =
      generate(model, ids, mask, config, nullptr,
               [](std::int64_t, std::int64_t, std::int64_t step) { return step < 2; });
  EXPECT_EQ(result.new_tokens[0].size(), 3u);
  EXPECT_LT(result.cache_bytes, 1u << 20);
  config.max_new_tokens = 10'000'000'000'000;
  config.cache_implementation = "static";
  EXPECT_KVCACHE_ERROR(generate(model, ids, mask, config),
                       "StaticCache: out of memory: the storage of every layer needs");
}

// --- the context length (issue #10) ------------------------------------------------------------

// Counts the tokens the callback sees (0: generation never started).
struct CountingCallback {
  int calls = 0;
  TokenCallback get() {
    return [this](std::int64_t, std::int64_t, std::int64_t) {
      ++calls;
      return true;
    };
  }
};

TEST(GenerateContextLength, PassingItIsAnErrorBeforeTheFirstToken) {
  const LlamaModel& model = tiny_model();  // max_position_embeddings 256
  ASSERT_EQ(model.config().max_position_embeddings, 256);
  auto [ids, mask] = left_pad({{1, 2, 3}}, 0);
  for (const char* kind : {"dynamic", "static", "quantized"}) {
    SCOPED_TRACE(kind);
    GenerationConfig config{.max_new_tokens = 254};  // 3 + 254 = 257 > 256
    config.cache_implementation = kind;
    CountingCallback counter;
    EXPECT_KVCACHE_ERROR(generate(model, ids, mask, config, nullptr, counter.get()),
                         "generate: expected past + prompt_len + max_new_tokens = 0 + 3 + 254 = "
                         "257 to stay within the model's context length of 256 "
                         "(max_position_embeddings), got 1 position(s) past it; set "
                         "GenerationConfig::allow_past_context");
    EXPECT_EQ(counter.calls, 0);
  }
  // Exactly the context length is allowed.
  const GenerateResult full = generate(model, ids, mask, {.max_new_tokens = 253});
  EXPECT_EQ(full.new_tokens[0].size(), 253u);
  EXPECT_EQ(full.cache_length, 255);
}

TEST(GenerateContextLength, APassedCacheCountsWhatItHolds) {
  const LlamaModel& model = tiny_model();
  auto [ids, mask] = left_pad({{1, 2, 3}}, 0);
  DynamicCache<> cache;
  generate(model, ids, mask, {.max_new_tokens = 2}, &cache);  // holds 3 + 2 - 1 = 4
  ASSERT_EQ(cache.get_seq_length(), 4);
  const Tensor more = extend_attention_mask(ones_mask(1, 4), 3);
  CountingCallback counter;
  EXPECT_KVCACHE_ERROR(generate(model, ids, more, {.max_new_tokens = 250}, &cache, counter.get()),
                       "= 4 + 3 + 250 = 257 to stay within the model's context length of 256");
  EXPECT_EQ(counter.calls, 0);
  EXPECT_EQ(cache.get_seq_length(), 4);  // untouched
  EXPECT_EQ(generate(model, ids, more, {.max_new_tokens = 249}, &cache).cache_length, 4 + 3 + 248);
}

TEST(GenerateContextLength, AllowPastContextGeneratesPastItWithTheSameTokensBefore) {
  const LlamaModel& model = tiny_model();
  auto [ids, mask] = left_pad({{5, 6, 7}, {8, 9}}, 0);
  const GenerateResult within = generate(model, ids, mask, {.max_new_tokens = 253});
  GenerationConfig config{.max_new_tokens = 300, .allow_past_context = true};
  const GenerateResult past = generate(model, ids, mask, config);
  ASSERT_EQ(past.new_tokens.size(), 2u);
  for (std::size_t row = 0; row < 2; ++row) {
    ASSERT_EQ(past.new_tokens[row].size(), 300u);
    // The opt-in changes nothing about the tokens inside the context: they are the same.
    EXPECT_EQ(
        std::vector<std::int64_t>(past.new_tokens[row].begin(), past.new_tokens[row].begin() + 253),
        within.new_tokens[row])
        << "row " << row;
  }
  EXPECT_EQ(past.cache_length, 3 + 300 - 1);
  config.cache_implementation = "static";
  EXPECT_EQ(generate(model, ids, mask, config).new_tokens, past.new_tokens);
}

TEST(GenerateContextLength, ASinkCacheCountsThePositionsItGives) {
  const LlamaModel& model = tiny_model();
  auto [ids, mask] = left_pad({{1, 2, 3}}, 0);
  // A window of 16: every token's position stays below 16, so 300 new tokens are inside 256.
  GenerationConfig config{.max_new_tokens = 300};
  config.cache_implementation = "sink";
  config.cache_config.window_length = 16;
  EXPECT_EQ(generate(model, ids, mask, config).new_tokens[0].size(), 300u);
  // A window wider than the context: positions reach min(3 + 300, 300) = 300.
  config.cache_config.window_length = 300;
  EXPECT_KVCACHE_ERROR(generate(model, ids, mask, config),
                       "= 0 + 3 + 300 = 303 (positions in a SinkCache: 300) to stay within the "
                       "model's context length of 256");
  SinkCache<> sink(SinkCacheOptions{.window_length = 300, .num_sink_tokens = 4});
  config.max_new_tokens = 254;
  EXPECT_KVCACHE_ERROR(generate(model, ids, mask, config, &sink),
                       "(positions in a SinkCache: 257)");
  EXPECT_EQ(sink.get_seq_length(), 0);
  config.allow_past_context = true;
  EXPECT_EQ(generate(model, ids, mask, config, &sink).new_tokens[0].size(), 254u);
}

}  // namespace
}  // namespace kvcache

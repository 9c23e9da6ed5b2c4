// The Llama-family model on random weights: the properties a cached forward pass must have
// (decode with the cache equals recomputation without it; left padding changes nothing for the
// real tokens), generate()'s contract (greedy equals the hand-written loop, EOS rows emit pad,
// seeded sampling repeats), and clear errors for bad input. Parity with transformers itself is
// checked on fixtures in parity_test.cpp.
#include "kvcache/model/llama.hpp"

#include <gtest/gtest.h>

#include "kvcache/generation/generate.hpp"
#include "test_util.hpp"

namespace kvcache {
namespace {

using testing::to_doubles;

ModelConfig tiny_config(const std::string& arch = "LlamaForCausalLM") {
  return testing::tiny_llama_config(arch);
}

LlamaModel tiny_model(const ModelConfig& c, std::uint64_t seed = 1) {
  return LlamaModel::from_weights(c, random_llama_weights(c, seed, DType::kFloat32, 0.3f));
}

// Logits [1, 1, vocab] of row b's last position as doubles.
std::vector<double> row_logits(const Tensor& logits, std::int64_t b) {
  const std::int64_t pos = logits.size(1) - 1;
  return to_doubles(logits.slice(0, b, b + 1).slice(1, pos, pos + 1));
}

TEST(Llama, DecodeWithCacheEqualsRecomputation) {
  for (const char* arch : {"LlamaForCausalLM", "Qwen2ForCausalLM"}) {
    const ModelConfig c = tiny_config(arch);
    const LlamaModel model = tiny_model(c);
    // Two rows, the second left-padded by three.
    const std::vector<std::vector<std::int64_t>> prompts = {{3, 14, 15, 92, 65, 35}, {89, 79, 32}};
    auto [ids, mask] = left_pad(prompts, 0);
    DynamicCache<> cache;
    std::vector<std::int64_t> cache_position = make_cache_position(0, ids.size(1));
    Tensor step_ids = ids;
    std::vector<std::vector<std::int64_t>> full = prompts;
    for (int step = 0; step < 6; ++step) {
      const Tensor logits = model.forward({.input_ids = step_ids,
                                           .attention_mask = mask,
                                           .cache_position = cache_position,
                                           .past_key_values = &cache,
                                           .logits_to_keep = 1});
      // Without a cache: the whole sequence so far in one pass.
      auto [full_ids, full_mask] = left_pad(full, 0);
      const Tensor fresh =
          model.forward({.input_ids = full_ids, .attention_mask = full_mask, .logits_to_keep = 1});
      for (std::int64_t b = 0; b < 2; ++b) {
        const auto err = testing::compare(row_logits(logits, b), row_logits(fresh, b));
        EXPECT_LT(err.max_abs, 2e-5) << arch << " step " << step << " row " << b;
      }
      const auto next = argmax_last(logits);
      for (std::size_t b = 0; b < 2; ++b) full[b].push_back(next[b]);
      step_ids = token_column(next);
      mask = extend_attention_mask(mask);
      cache_position = {cache_position.back() + 1};
    }
    EXPECT_EQ(cache.get_seq_length(), 6 + 5);
  }
}

TEST(Llama, LeftPaddingChangesNothingForRealTokens) {
  const ModelConfig c = tiny_config();
  const LlamaModel model = tiny_model(c);
  auto [padded_ids, padded_mask] = left_pad({{1, 2, 3, 4, 5, 6, 7}, {40, 41, 42}}, 0);
  auto [alone_ids, alone_mask] = left_pad({{40, 41, 42}}, 0);
  const Tensor padded = model.forward({.input_ids = padded_ids, .attention_mask = padded_mask});
  const Tensor alone = model.forward({.input_ids = alone_ids, .attention_mask = alone_mask});
  // Row 1's last three positions against the row on its own.
  const auto a = to_doubles(padded.slice(0, 1, 2).slice(1, 4, 7));
  const auto b = to_doubles(alone);
  EXPECT_LT(testing::compare(a, b).max_abs, 2e-5);
  for (double x : to_doubles(padded)) ASSERT_FALSE(std::isnan(x));  // padded positions too
}

// Rows of three lengths in one left-padded prefill (the CPU then runs the projections on the real
// tokens only): every row's logits at its real positions, the keys and values it leaves in the
// cache and the decode step after it equal the row run on its own; the padding slots hold zeros.
TEST(Llama, LeftPaddedRowsOfThreeLengthsEqualEachRowAlone) {
  const ModelConfig c = tiny_config();
  const LlamaModel model = tiny_model(c);
  const std::vector<std::vector<std::int64_t>> prompts = {
      {1, 2, 3, 4, 5, 6, 7}, {40, 41, 42}, {9, 8, 7, 6, 5}};
  auto [ids, mask] = left_pad(prompts, 0);
  DynamicCache<> cache;
  const Tensor padded =
      model.forward({.input_ids = ids, .attention_mask = mask, .past_key_values = &cache});
  const Tensor next = token_column({11, 12, 13});
  const Tensor step = model.forward({.input_ids = next,
                                     .attention_mask = extend_attention_mask(mask),
                                     .cache_position = {7},
                                     .past_key_values = &cache});
  const auto legacy = cache.to_legacy_cache();
  for (std::int64_t b = 0; b < 3; ++b) {
    const auto n = static_cast<std::int64_t>(prompts[static_cast<std::size_t>(b)].size());
    auto [one_ids, one_mask] = left_pad({prompts[static_cast<std::size_t>(b)]}, 0);
    DynamicCache<> own;
    const Tensor alone =
        model.forward({.input_ids = one_ids, .attention_mask = one_mask, .past_key_values = &own});
    EXPECT_LT(testing::compare(to_doubles(padded.slice(0, b, b + 1).slice(1, 7 - n, 7)),
                               to_doubles(alone))
                  .max_abs,
              2e-5)
        << "row " << b;
    const auto own_legacy = own.to_legacy_cache();
    for (std::size_t l = 0; l < legacy.size(); ++l) {
      for (int kv = 0; kv < 2; ++kv) {
        const Tensor& held = kv == 0 ? legacy[l].first : legacy[l].second;
        const Tensor& mine = kv == 0 ? own_legacy[l].first : own_legacy[l].second;
        const Tensor row = held.slice(0, b, b + 1);
        EXPECT_LT(testing::compare(to_doubles(row.slice(2, 7 - n, 7)), to_doubles(mine)).max_abs,
                  2e-5)
            << "row " << b << ", layer " << l << (kv == 0 ? " keys" : " values");
        for (double x : to_doubles(row.slice(2, 0, 7 - n))) ASSERT_EQ(x, 0.0);
      }
    }
    const Tensor own_step = model.forward({.input_ids = token_column({11 + b}),
                                           .attention_mask = extend_attention_mask(one_mask),
                                           .cache_position = {n},
                                           .past_key_values = &own});
    EXPECT_LT(testing::compare(row_logits(step, b), row_logits(own_step, 0)).max_abs, 2e-5)
        << "decode step, row " << b;
  }
}

TEST(Llama, LogitsToKeep) {
  const LlamaModel model = tiny_model(tiny_config());
  auto [ids, mask] = left_pad({{1, 2, 3, 4, 5}}, 0);
  const Tensor all = model.forward({.input_ids = ids, .attention_mask = mask});
  const Tensor last2 =
      model.forward({.input_ids = ids, .attention_mask = mask, .logits_to_keep = 2});
  EXPECT_EQ(all.shape_string(), "[1, 5, 97]");
  EXPECT_EQ(last2.shape_string(), "[1, 2, 97]");
  EXPECT_LT(testing::compare(to_doubles(last2), to_doubles(all.slice(1, 3, 5))).max_abs, 1e-6);
}

TEST(Llama, UseCacheFalseLeavesTheCacheAlone) {
  const LlamaModel model = tiny_model(tiny_config());
  auto [ids, mask] = left_pad({{4, 8, 15, 16}}, 0);
  DynamicCache<> cache;
  model.forward({.input_ids = ids, .attention_mask = mask, .past_key_values = &cache});
  const Tensor step = token_column({23});
  const Tensor grown = extend_attention_mask(mask);
  const auto peek = to_doubles(model.forward(
      {.input_ids = step, .attention_mask = grown, .past_key_values = &cache, .use_cache = false}));
  EXPECT_EQ(cache.get_seq_length(), 4);  // not updated
  const auto real = to_doubles(
      model.forward({.input_ids = step, .attention_mask = grown, .past_key_values = &cache}));
  EXPECT_EQ(cache.get_seq_length(), 5);
  EXPECT_LT(testing::compare(peek, real).max_abs, 1e-6);  // same attention over past + new
}

TEST(Llama, SixteenBitWeightsMatchTheirFloat32Widening) {
  for (DType dtype : {DType::kBFloat16, DType::kFloat16}) {
    const ModelConfig c = tiny_config();
    const auto weights = random_llama_weights(c, 3, dtype, 0.3f);
    const LlamaModel kept = LlamaModel::from_weights(c, weights);  // bf16 held, widened per product
    const LlamaModel widened = LlamaModel::from_weights(c, weights, {.dtype = DType::kFloat32});
    auto [ids, mask] = left_pad({{7, 8, 9, 10}}, 0);
    const auto a = to_doubles(kept.forward({.input_ids = ids, .attention_mask = mask}));
    const auto b = to_doubles(widened.forward({.input_ids = ids, .attention_mask = mask}));
    EXPECT_LT(testing::compare(a, b).max_abs, 1e-5);
    EXPECT_LT(kept.weight_bytes(), widened.weight_bytes());
    // Decode-sized batches take the GEMV path: the same check with one and three rows.
    for (const auto& rows : {std::vector<std::vector<std::int64_t>>{{7}}, {{7}, {8}, {9}}}) {
      auto [ids1, mask1] = left_pad(rows, 0);
      EXPECT_LT(testing::compare(
                    to_doubles(kept.forward({.input_ids = ids1, .attention_mask = mask1})),
                    to_doubles(widened.forward({.input_ids = ids1, .attention_mask = mask1})))
                    .max_abs,
                1e-5)
          << dtype_name(dtype);
    }
  }
}

// Greedy decoding on 16-bit weights held as stored gives the tokens of the same weights widened
// to float32 at load: one prompt (the one-group GEMV), seven prompts of different lengths decoding
// together (the tiled batch GEMV, its prefill of 56 rows too) and three prompts of up to 45 tokens
// (a prefill of 135 rows: the GEMM over widened panels). The MLP's 56 features make `in` no
// multiple of 16 for down_proj.
TEST(Llama, SixteenBitWeightsDecodeTheTokensOfTheirFloat32Widening) {
  ModelConfig c = tiny_config();
  c.intermediate_size = 56;
  auto prompt = [](std::int64_t length, std::int64_t first) {
    std::vector<std::int64_t> ids;
    for (std::int64_t i = 0; i < length; ++i) ids.push_back((first + 7 * i) % 97);
    return ids;
  };
  std::vector<std::vector<std::vector<std::int64_t>>> batches = {{prompt(6, 5)}, {}, {}};
  for (std::int64_t b = 0; b < 7; ++b) batches[1].push_back(prompt(3 + b % 6, 11 * b + 1));
  for (const std::int64_t length : {45, 40, 30}) batches[2].push_back(prompt(length, length));
  for (DType dtype : {DType::kBFloat16, DType::kFloat16}) {
    const auto weights = random_llama_weights(c, 7, dtype, 0.3f);
    const LlamaModel kept = LlamaModel::from_weights(c, weights);
    const LlamaModel widened = LlamaModel::from_weights(c, weights, {.dtype = DType::kFloat32});
    ASSERT_LT(kept.weight_bytes(), widened.weight_bytes());
    for (const auto& prompts : batches) {
      auto [ids, mask] = left_pad(prompts, 0);
      const GenerateResult a = generate(kept, ids, mask, {.max_new_tokens = 12});
      const GenerateResult b = generate(widened, ids, mask, {.max_new_tokens = 12});
      EXPECT_EQ(a.new_tokens, b.new_tokens)
          << dtype_name(dtype) << ", " << prompts.size() << " prompts";
    }
  }
}

TEST(Generate, GreedyEqualsTheCustomLoopAndEosRowsEmitPad) {
  const LlamaModel model = tiny_model(tiny_config());
  auto [ids, mask] = left_pad({{11, 12, 13}, {21, 22, 23, 24, 25}}, 0);
  const GenerateResult greedy = generate(model, ids, mask, {.max_new_tokens = 8});
  ASSERT_EQ(greedy.new_tokens.size(), 2u);
  ASSERT_EQ(greedy.new_tokens[0].size(), 8u);
  EXPECT_EQ(greedy.cache_length, 5 + 7);  // the last token is never fed back
  EXPECT_GT(greedy.cache_bytes, 0u);

  // Hand-written loop, as the seed writes it.
  DynamicCache<> cache;
  std::vector<std::int64_t> pos = make_cache_position(0, 5);
  Tensor step = ids, m = mask;
  for (int i = 0; i < 8; ++i) {
    const auto next = argmax_last(model.forward({.input_ids = step,
                                                 .attention_mask = m,
                                                 .cache_position = pos,
                                                 .past_key_values = &cache,
                                                 .logits_to_keep = 1}));
    EXPECT_EQ(next[0], greedy.new_tokens[0][static_cast<std::size_t>(i)]);
    EXPECT_EQ(next[1], greedy.new_tokens[1][static_cast<std::size_t>(i)]);
    step = token_column(next);
    m = extend_attention_mask(m);
    pos = {pos.back() + 1};
  }

  // Row 0 stops at its third token: afterwards it emits the pad id while row 1 goes on.
  const std::int64_t eos = greedy.new_tokens[0][2];
  const GenerateResult stopped =
      generate(model, ids, mask, {.max_new_tokens = 8, .eos_token_ids = {eos}, .pad_token_id = 96});
  for (std::size_t i = 0; i < stopped.new_tokens[0].size(); ++i) {
    EXPECT_EQ(stopped.new_tokens[0][i], i <= 2 ? greedy.new_tokens[0][i] : 96) << i;
  }
}

TEST(Generate, SeededSamplingRepeatsAndTopKOneIsGreedy) {
  const LlamaModel model = tiny_model(tiny_config());
  auto [ids, mask] = left_pad({{5, 6, 7}}, 0);
  const GenerationConfig sample{
      .max_new_tokens = 10, .do_sample = true, .temperature = 1.5f, .top_p = 0.9f, .seed = 42};
  const auto a = generate(model, ids, mask, sample).new_tokens;
  const auto b = generate(model, ids, mask, sample).new_tokens;
  EXPECT_EQ(a, b);
  GenerationConfig other = sample;
  other.seed = 43;
  EXPECT_NE(generate(model, ids, mask, other).new_tokens, a);  // 10 tokens at temperature 1.5
  const auto top1 =
      generate(model, ids, mask, {.max_new_tokens = 10, .do_sample = true, .top_k = 1, .seed = 7})
          .new_tokens;
  EXPECT_EQ(top1, generate(model, ids, mask, {.max_new_tokens = 10}).new_tokens);
}

TEST(Generate, StreamingCallbackSeesEveryTokenAndCanStop) {
  const LlamaModel model = tiny_model(tiny_config());
  auto [ids, mask] = left_pad({{5, 6, 7}}, 0);
  std::vector<std::int64_t> seen;
  const auto result = generate(model, ids, mask, {.max_new_tokens = 10}, nullptr,
                               [&](std::int64_t, std::int64_t token, std::int64_t step) {
                                 seen.push_back(token);
                                 return step < 3;  // stop after the fourth token
                               });
  EXPECT_EQ(seen.size(), 4u);
  EXPECT_EQ(seen, result.new_tokens[0]);
}

// cuda_graph asks for CUDA graphs on the GPU; on the CPU it changes nothing: the same tokens, no
// step replayed from a graph, with a fresh cache and with the caller's.
TEST(Generate, CudaGraphOptionIsIgnoredOnTheCpu) {
  const LlamaModel model = tiny_model(tiny_config());
  auto [ids, mask] = left_pad({{11, 12, 13}, {21, 22, 23, 24, 25}}, 0);
  for (bool sample : {false, true}) {
    GenerationConfig on{.max_new_tokens = 12,
                        .do_sample = sample,
                        .temperature = 0.8f,
                        .top_k = 20,
                        .top_p = 0.9f,
                        .seed = 7,
                        .cuda_graph = true};
    GenerationConfig off = on;
    off.cuda_graph = false;
    const GenerateResult with = generate(model, ids, mask, on);
    const GenerateResult without = generate(model, ids, mask, off);
    EXPECT_EQ(with.new_tokens, without.new_tokens) << "sample " << sample;
    ASSERT_EQ(with.new_tokens.size(), 2u);
    EXPECT_EQ(with.new_tokens[0].size(), 12u);
    EXPECT_EQ(with.decode_steps, 11);
    EXPECT_EQ(with.graph_steps, 0);
    EXPECT_EQ(without.graph_steps, 0);
    EXPECT_EQ(with.cache_length, 5 + 11);
  }
  DynamicCache<> cache;
  const GenerateResult turn = generate(model, ids, mask, {.max_new_tokens = 12}, &cache);
  EXPECT_EQ(turn.graph_steps, 0);
  EXPECT_EQ(cache.get_seq_length(), 5 + 11);
}

TEST(Llama, BadInputIsAClearErrorAndLeavesTheCache) {
  const LlamaModel model = tiny_model(tiny_config());
  auto [ids, mask] = left_pad({{1, 2, 3}}, 0);
  DynamicCache<> cache;
  model.forward({.input_ids = ids, .attention_mask = mask, .past_key_values = &cache});
  const std::vector<double> before = to_doubles(cache.to_legacy_cache()[0].first);
  std::vector<std::int64_t> bad = {1, 200};
  EXPECT_KVCACHE_ERROR(
      model.forward({.input_ids = Tensor::from_blob(bad.data(), {1, 2}, DType::kInt64),
                     .past_key_values = &cache}),
      "expected token ids in [0, 97) (the vocabulary), got 200");
  EXPECT_KVCACHE_ERROR(
      model.forward(
          {.input_ids = token_column({4}), .attention_mask = mask, .past_key_values = &cache}),
      "expected attention_mask [batch, past + new] = [1, 4], got [1, 3]");
  EXPECT_EQ(cache.get_seq_length(), 3);
  EXPECT_EQ(to_doubles(cache.to_legacy_cache()[0].first), before);
}

TEST(Llama, MistralPastItsWindowEqualsRecomputation) {
  ModelConfig c = tiny_config("MistralForCausalLM");
  c.sliding_window = 6;  // no layer_types: every layer slides
  const LlamaModel model = tiny_model(c);
  ModelConfig unwindowed = c;
  unwindowed.sliding_window.reset();
  const LlamaModel full_attention = tiny_model(unwindowed);  // the same weights, no window
  ASSERT_EQ(c.sliding_windows(), (std::vector<std::int64_t>{6, 6}));
  const std::vector<std::vector<std::int64_t>> prompts = {{3, 14, 15, 92, 65, 35, 8, 9, 79},
                                                          {89, 79, 32, 38}};
  auto [ids, mask] = left_pad(prompts, 0);
  DynamicCache<> sliding(DynamicCacheOptions{.sliding_windows = c.sliding_windows()});
  DynamicCache<> full;  // full layers: the model's window alone must give the same
  std::vector<std::int64_t> cache_position = make_cache_position(0, ids.size(1));
  Tensor step_ids = ids;
  std::vector<std::vector<std::int64_t>> sequence = prompts;
  double window_effect = 0;
  for (int step = 0; step < 12; ++step) {
    const ForwardArgs args{.input_ids = step_ids,
                           .attention_mask = mask,
                           .cache_position = cache_position,
                           .logits_to_keep = 1};
    ForwardArgs over_sliding = args, over_full = args;
    over_sliding.past_key_values = &sliding;
    over_full.past_key_values = &full;
    const Tensor a = model.forward(over_sliding);
    const Tensor b = model.forward(over_full);
    // Without a cache: the whole sequence so far in one pass (a prompt longer than the window).
    auto [seq_ids, seq_mask] = left_pad(sequence, 0);
    const Tensor fresh =
        model.forward({.input_ids = seq_ids, .attention_mask = seq_mask, .logits_to_keep = 1});
    const Tensor unwindowed_logits = full_attention.forward(
        {.input_ids = seq_ids, .attention_mask = seq_mask, .logits_to_keep = 1});
    for (std::int64_t r = 0; r < 2; ++r) {
      EXPECT_LT(testing::compare(row_logits(a, r), row_logits(fresh, r)).max_abs, 2e-5)
          << "step " << step << " row " << r;
      EXPECT_LT(testing::compare(row_logits(b, r), row_logits(fresh, r)).max_abs, 2e-5)
          << "step " << step << " row " << r;
      window_effect = std::max(
          window_effect,
          testing::compare(row_logits(fresh, r), row_logits(unwindowed_logits, r)).max_abs);
    }
    const auto next = argmax_last(a);
    for (std::size_t r = 0; r < 2; ++r) sequence[r].push_back(next[r]);
    step_ids = token_column(next);
    mask = extend_attention_mask(mask);
    cache_position = {cache_position.back() + 1};
  }
  EXPECT_GT(window_effect, 1e-3) << "the window must change the result, or this tests nothing";
  EXPECT_EQ(sliding.get_seq_length(), 9 + 11);  // the 12th token needs no pass
  EXPECT_LT(sliding.nbytes(), full.nbytes());
}

TEST(Llama, ASlidingCacheLayerUnderAFullAttentionLayerIsAnError) {
  const LlamaModel model = tiny_model(tiny_config());  // no window
  DynamicCache<> cache(DynamicCacheOptions{.sliding_windows = {0, 4}, .sliding_spare_slots = 1});
  auto [ids, mask] = left_pad({{1, 2, 3, 4, 5}}, 0);
  model.forward({.input_ids = ids, .attention_mask = mask, .past_key_values = &cache});
  const std::vector<double> before = to_doubles(cache.to_legacy_cache()[0].first);
  // Layer 1 keeps slots [1, 5) only; full attention at slot 5 needs them all. Refused before
  // layer 0 changes.
  EXPECT_KVCACHE_ERROR(model.forward({.input_ids = token_column({6}),
                                      .attention_mask = extend_attention_mask(mask),
                                      .past_key_values = &cache}),
                       "layer 1 attends over every earlier slot (no sliding window), but the "
                       "cache's layer holds keys from slot 2 only");
  EXPECT_EQ(cache.get_seq_length(0), 5);
  EXPECT_EQ(to_doubles(cache.to_legacy_cache()[0].first), before);
}

TEST(Llama, MissingWeightsAreNamed) {
  const ModelConfig c = tiny_config();
  auto weights = random_llama_weights(c, 1);
  std::erase_if(weights,
                [](const auto& w) { return w.first == "model.layers.1.mlp.up_proj.weight"; });
  EXPECT_KVCACHE_ERROR(
      LlamaModel::from_weights(c, weights),
      "expected tensor 'model.layers.1.mlp.up_proj.weight', which the checkpoint does not hold");
  auto wrong = random_llama_weights(c, 1);
  wrong[0].second = Tensor::zeros({5, 5}, DType::kFloat32);
  EXPECT_KVCACHE_ERROR(LlamaModel::from_weights(c, wrong),
                       "expected 'model.embed_tokens.weight' shaped [97, 32], got [5, 5]");
}

}  // namespace
}  // namespace kvcache

// The prompt-reuse check of issue #9, shared by the CPU suite (generation/generate_test.cpp) and
// the GPU one (backend/graph_cuda_test.cpp): one prompt prefilled once, cloned twice, the two
// continuations interleaved step by step, each against the same continuation on a fresh cache. It
// runs on any cache of either backend; the model's device must be the cache's.
#pragma once

#include <gtest/gtest.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <vector>

#include "kvcache/generation/generate.hpp"
#include "kvcache/model/llama.hpp"
#include "test_util.hpp"

namespace kvcache::testing {

/// The prompt every prompt-reuse test prefills (token ids below the tiny models' vocabularies).
inline const std::vector<std::int64_t> kPrompt = {3, 14, 15, 92, 65, 35, 89, 79};

/// Logits [batch, q_len, vocab] as doubles, read back from the GPU where they live there.
inline std::vector<double> logits_doubles(const Tensor& logits) {
  return to_doubles(logits.device() == Device::kCuda ? cuda::to_host(logits) : logits);
}

/// Feeds `tokens` one at a time after what `cache` holds (mask all ones), returning each step's
/// last-position logits.
template <CacheBackend B>
std::vector<std::vector<double>> step_logits(const LlamaModel& model, Cache<B>& cache,
                                             const std::vector<std::int64_t>& tokens) {
  std::vector<std::vector<double>> out;
  for (std::int64_t token : tokens) {
    const std::int64_t past = cache.get_seq_length();
    out.push_back(logits_doubles(model.forward({.input_ids = token_column({token}),
                                                .attention_mask = ones_mask(1, past + 1),
                                                .cache_position = make_cache_position(past, 1),
                                                .past_key_values = &cache})));
  }
  return out;
}

/// Prefills kPrompt into `cache`.
template <CacheBackend B>
void prefill(const LlamaModel& model, Cache<B>& cache) {
  auto [ids, mask] = left_pad({kPrompt}, 0);
  model.forward({.input_ids = ids, .attention_mask = mask, .past_key_values = &cache});
}

/// The scenario: kPrompt prefilled once into make()'s cache, cloned twice (C::clone()
/// and Cache<B>::clone()), two continuations interleaved step by step; each must equal the same
/// continuation run on a fresh cache (a shared-storage copy made them overwrite each other's
/// slots: wrong tokens from the second step on), and the prompt cache still serves a third.
template <class C>
void expect_clones_are_independent(const LlamaModel& model, const std::function<C()>& make) {
  using B = typename C::Backend;
  const std::vector<std::int64_t> first = {7, 8, 9, 10, 11, 12}, second = {50, 51, 52, 53, 54, 55};
  std::vector<std::vector<double>> fresh_first, fresh_second;
  {
    C a = make(), b = make();
    prefill(model, a);
    prefill(model, b);
    fresh_first = step_logits(model, a, first);
    fresh_second = step_logits(model, b, second);
  }
  C prompt_cache = make();
  prefill(model, prompt_cache);
  C one = prompt_cache.clone();
  std::unique_ptr<Cache<B>> two = static_cast<const Cache<B>&>(prompt_cache).clone();
  for (std::size_t i = 0; i < first.size(); ++i) {
    const auto got_first = step_logits(model, one, {first[i]});
    const auto got_second = step_logits(model, *two, {second[i]});
    EXPECT_LT(compare(got_first[0], fresh_first[i]).max_abs, 1e-6) << "step " << i;
    EXPECT_LT(compare(got_second[0], fresh_second[i]).max_abs, 1e-6) << "step " << i;
  }
  EXPECT_EQ(one.get_seq_length(), 8 + 6);
  EXPECT_EQ(two->get_seq_length(), 8 + 6);
  // The prompt cache itself is untouched and serves a third conversation.
  EXPECT_EQ(prompt_cache.get_seq_length(), 8);
  EXPECT_LT(compare(step_logits(model, prompt_cache, first)[5], fresh_first[5]).max_abs, 1e-6);
}

}  // namespace kvcache::testing

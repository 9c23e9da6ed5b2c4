// Parity with transformers, the oracle. Each fixture under tests/data (made by
// tools/make_reference.py: transformers in float32, eager attention, on the CPU) holds a small
// random checkpoint and what transformers computed with it over a left-padded batch: the cache
// after prefill, the last-position logits of each step of the seed's DynamicCache loop, the
// greedy tokens of that loop, and generate()'s tokens. Here kvcache runs the same loop and the same
// generate() and must agree: tokens exactly, logits within 1e-4 relative, cached keys and values
// at real (non-padding) positions within float32 rounding.
//
// One test body for both backends: each fixture runs on the CPU and, where a GPU is usable, on the
// GPU with float32 weights (the exact mode: cuBLAS in true float32, float32 caches), with a
// DynamicCache of that backend — the seed's loop unchanged, only the cache type and the load
// option differ. Without a GPU the CUDA instances skip.
//
// The sliding-window fixtures (mistral_window, qwen2_window: expected.json has sliding_layers) run
// past their window, on both backends. The loop runs twice: over a DynamicCache made from the
// model's config (sliding layers for sliding layers, as transformers' DynamicCache(config) makes
// them; what such a layer keeps after the prefill must be exactly what transformers keeps), and
// over a plain DynamicCache (full layers; the model's window rule alone must give the same
// tokens). generate() builds the first kind by itself; cache_implementation "sliding" (sliding
// layers from the first step) and "static" (full-length layers) must give the same tokens too.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <functional>
#include <nlohmann/json.hpp>
#include <tuple>

#include "kvcache/backend/cuda.hpp"
#include "kvcache/generation/generate.hpp"
#include "kvcache/model/llama.hpp"
#include "kvcache/model/safetensors.hpp"
#include "test_util.hpp"

#ifndef KVCACHE_TEST_DATA_DIR
#error "KVCACHE_TEST_DATA_DIR must name tests/data"
#endif

namespace kvcache {
namespace {

using testing::to_doubles;

// A tensor's elements on the host, wherever it lives.
Tensor on_host(const Tensor& t) { return t.device() == Device::kCuda ? cuda::to_host(t) : t; }

std::vector<std::vector<std::int64_t>> rows_of(const Tensor& t) {
  std::vector<std::vector<std::int64_t>> rows;
  const auto flat = to_doubles(t);
  for (std::int64_t b = 0; b < t.size(0); ++b) {
    rows.emplace_back();
    for (std::int64_t j = 0; j < t.size(1); ++j)
      rows.back().push_back(
          static_cast<std::int64_t>(flat[static_cast<std::size_t>(b * t.size(1) + j)]));
  }
  return rows;
}

// Largest |a − e| over the row, relative to the row's largest |e| (logits are compared as rows).
double relative_row_error(const std::vector<double>& a, const std::vector<double>& e) {
  double diff = 0, scale = 1e-6;
  for (std::size_t i = 0; i < e.size(); ++i) {
    diff = std::max(diff, std::abs(a[i] - e[i]));
    scale = std::max(scale, std::abs(e[i]));
  }
  return diff / scale;
}

struct LoopResult {
  std::vector<std::vector<std::int64_t>> tokens;
  double worst_logits = 0;
};

// The seed's loop over `cache`, checking the cache after prefill against what transformers kept
// (prefill_keys.L / prefill_values.L: the whole prompt, or a sliding layer's last window - 1
// tokens). kept_like_transformers: the cache must keep exactly that many tokens per layer; else it
// may keep more (a full layer under a sliding one), and its last ones are compared.
// (Results through an out-parameter: the ASSERTs return early.)
template <class B>
void run_seed_loop(const LlamaModel& model, const SafetensorsFile& expected, Cache<B>& cache,
                   bool kept_like_transformers, const std::function<LegacyCache()>& legacy_of,
                   LoopResult& result) {
  const ModelConfig& c = model.config();
  const Tensor input_ids = cpu::clone(expected.tensor("input_ids"));
  Tensor mask = cpu::clone(expected.tensor("attention_mask"));
  const auto loop_tokens = rows_of(expected.tensor("loop_tokens"));
  const Tensor step_logits = expected.tensor("step_logits");  // [steps, batch, vocab]
  const std::int64_t batch = input_ids.size(0), prompt = input_ids.size(1);
  const auto new_tokens = static_cast<std::int64_t>(loop_tokens[0].size());
  const std::int64_t logit_steps = step_logits.size(0);

  std::vector<std::int64_t> cache_position = make_cache_position(0, prompt);
  Tensor step_ids = input_ids;
  result = {};
  result.tokens.resize(static_cast<std::size_t>(batch));
  for (std::int64_t step = 0; step < new_tokens; ++step) {
    const Tensor logits = model.forward({.input_ids = step_ids,
                                         .attention_mask = mask,
                                         .cache_position = cache_position,
                                         .past_key_values = &cache,
                                         .logits_to_keep = 1});
    if (step == 0) {
      // The cache after prefill, at the slots the mask marks real.
      const LegacyCache legacy = legacy_of();
      double worst = 0;
      for (std::int64_t l = 0; l < c.num_hidden_layers; ++l) {
        for (const char* side : {"keys", "values"}) {
          const Tensor want =
              expected.tensor(std::string("prefill_") + side + "." + std::to_string(l));
          const Tensor got =
              on_host(std::string(side) == "keys" ? legacy[static_cast<std::size_t>(l)].first
                                                  : legacy[static_cast<std::size_t>(l)].second);
          const std::int64_t kept =
              want.size(2);  // transformers' layer keeps slots [prompt - kept, prompt)
          if (kept_like_transformers) {
            ASSERT_EQ(got.shape_string(), want.shape_string()) << side << " of layer " << l;
          } else {
            ASSERT_EQ(got.size(2), prompt) << side << " of layer " << l;
          }
          const std::int64_t got_from = got.size(2) - kept;
          for (std::int64_t b = 0; b < batch; ++b)
            for (std::int64_t j = 0; j < kept; ++j) {
              if (mask.data_as<std::int64_t>()[b * prompt + prompt - kept + j] == 0) continue;
              const auto g =
                  to_doubles(got.slice(0, b, b + 1).slice(2, got_from + j, got_from + j + 1));
              const auto w = to_doubles(want.slice(0, b, b + 1).slice(2, j, j + 1));
              for (std::size_t i = 0; i < g.size(); ++i)
                worst = std::max(worst, std::abs(g[i] - w[i]) / std::max(1.0, std::abs(w[i])));
            }
        }
      }
      EXPECT_LT(worst, 1e-5) << "cache after prefill";
    }
    EXPECT_EQ(logits.device(), B::kDevice);
    const auto next = argmax_last(logits);
    if (step < logit_steps) {
      const Tensor host_logits = on_host(logits);
      for (std::int64_t b = 0; b < batch; ++b) {
        const auto got = to_doubles(host_logits.slice(0, b, b + 1));
        const auto want = to_doubles(step_logits.slice(0, step, step + 1).slice(1, b, b + 1));
        result.worst_logits = std::max(result.worst_logits, relative_row_error(got, want));
      }
    }
    for (std::int64_t b = 0; b < batch; ++b)
      result.tokens[static_cast<std::size_t>(b)].push_back(next[static_cast<std::size_t>(b)]);
    step_ids = token_column(next);
    mask = extend_attention_mask(mask);
    cache_position = {cache_position.back() + 1};
  }
}

template <class B>
void expect_parity(const std::string& fixture) {
  const std::string dir = std::string(KVCACHE_TEST_DATA_DIR) + "/" + fixture;
  ASSERT_TRUE(std::filesystem::exists(dir + "/expected.json"))
      << "missing fixture " << dir << " (make it with tools/make_reference.py)";
  std::ifstream json_in(dir + "/expected.json");
  const nlohmann::json meta = nlohmann::json::parse(json_in);
  const SafetensorsFile expected = SafetensorsFile::open(dir + "/expected.safetensors");
  LoadOptions load;
  if constexpr (B::kDevice == Device::kCuda)
    load = {.dtype = DType::kFloat32, .device = Device::kCuda};
  const LlamaModel model = LlamaModel::from_pretrained(dir, load);
  const ModelConfig& c = model.config();

  const Tensor input_ids = cpu::clone(expected.tensor("input_ids"));
  const auto loop_tokens = rows_of(expected.tensor("loop_tokens"));
  const auto new_tokens = static_cast<std::int64_t>(loop_tokens[0].size());
  const bool windowed = meta.contains("sliding_layers");

  // The seed's loop: over a DynamicCache of the model's layer kinds (transformers'
  // DynamicCache(config); for a fixture without sliding layers, a plain DynamicCache). The
  // existing mistral fixture (window 64, never passed) gets sliding layers too, on either
  // backend.
  DynamicCache<B> cache({.sliding_windows = c.sliding_windows()});
  LoopResult loop;
  run_seed_loop<B>(
      model, expected, cache, true, [&] { return cache.to_legacy_cache(); }, loop);
  const double worst_logits = loop.worst_logits;
  EXPECT_LT(worst_logits, 1e-4) << "step logits, relative to each row's largest";
  EXPECT_EQ(loop.tokens, loop_tokens) << "greedy tokens of the seed's loop";
  if (windowed) {
    ASSERT_TRUE(cache.has_sliding_layers());
    // Over full layers the model's window alone must give the same: a plain DynamicCache.
    DynamicCache<B> full;
    LoopResult over_full;
    run_seed_loop<B>(
        model, expected, full, false, [&] { return full.to_legacy_cache(); }, over_full);
    EXPECT_LT(over_full.worst_logits, 1e-4) << "step logits over full layers";
    EXPECT_EQ(over_full.tokens, loop_tokens) << "greedy tokens over full layers";
    EXPECT_LT(cache.nbytes(), full.nbytes()) << "the sliding layers keep fewer tokens";
  }

  // generate(), with the fixture's EOS and pad settings.
  GenerationConfig config{.max_new_tokens = new_tokens};
  if (meta.contains("eos_token_id") && !meta["eos_token_id"].is_null()) {
    config.eos_token_ids = {meta["eos_token_id"].get<std::int64_t>()};
  }
  config.pad_token_id = meta.value("pad_token_id", std::int64_t{0});
  const GenerateResult result =
      generate(model, input_ids, cpu::clone(expected.tensor("attention_mask")), config);
  EXPECT_EQ(result.new_tokens, rows_of(expected.tensor("generate_tokens"))) << "generate()";
  if (windowed) {
    // generate()'s own cache had sliding layers (it runs past the window): it keeps fewer tokens
    // than it has seen. The StaticCache below keeps full-length layers (on the GPU its decode step
    // replays from a CUDA graph, the window applied by the replayed attention).
    const std::int64_t seen = input_ids.size(1) + new_tokens - 1;
    EXPECT_EQ(result.cache_length, seen);
    const std::size_t full_bytes =
        static_cast<std::size_t>(2 * c.num_hidden_layers * input_ids.size(0) *
                                 c.num_key_value_heads * seen * c.head_dim * 4);
    EXPECT_LT(result.cache_bytes, full_bytes) << "generate() built sliding layers";
    GenerationConfig sliding = config;
    sliding.cache_implementation = "sliding";
    const GenerateResult over_rings =
        generate(model, input_ids, cpu::clone(expected.tensor("attention_mask")), sliding);
    EXPECT_EQ(over_rings.new_tokens, rows_of(expected.tensor("generate_tokens")))
        << "generate() with cache_implementation \"sliding\"";
    EXPECT_LT(over_rings.cache_bytes, full_bytes) << "\"sliding\" built sliding layers";
    GenerationConfig fixed = config;
    fixed.cache_implementation = "static";
    EXPECT_EQ(
        generate(model, input_ids, cpu::clone(expected.tensor("attention_mask")), fixed).new_tokens,
        rows_of(expected.tensor("generate_tokens")))
        << "generate() over a StaticCache (full-length layers)";
  }
  std::printf("[ parity   ] %s on %s: %lld steps, max relative logit error %.2e\n", fixture.c_str(),
              std::string(device_name(B::kDevice)).c_str(), static_cast<long long>(new_tokens),
              worst_logits);
}

class Parity : public ::testing::TestWithParam<std::tuple<const char*, Device>> {};

TEST_P(Parity, MatchesTransformers) {
  const auto [fixture, device] = GetParam();
  if (device == Device::kCpu) return expect_parity<cpu::Backend>(fixture);
  if (cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device";
  expect_parity<cuda::Backend>(fixture);
}

INSTANTIATE_TEST_SUITE_P(
    Fixtures, Parity,
    ::testing::Combine(::testing::Values("llama_mha", "llama_gqa", "qwen2_bias", "mistral",
                                         "llama_tied_bf16", "llama_sharded", "llama3_rope",
                                         "llama_v4_config", "llama_long", "llama_eos"),
                       ::testing::Values(Device::kCpu, Device::kCuda)),
    [](const auto& info) {
      return std::string(std::get<0>(info.param)) + "_" +
             std::string(device_name(std::get<1>(info.param)));
    });

// Past their window, on both backends: the seed's loop and generate() over sliding cache layers
// (kernel by kernel), generate() over a StaticCache (on the GPU, replayed from a CUDA graph).
INSTANTIATE_TEST_SUITE_P(WindowFixtures, Parity,
                         ::testing::Combine(::testing::Values("mistral_window", "qwen2_window"),
                                            ::testing::Values(Device::kCpu, Device::kCuda)),
                         [](const auto& info) {
                           return std::string(std::get<0>(info.param)) + "_" +
                                  std::string(device_name(std::get<1>(info.param)));
                         });

}  // namespace
}  // namespace kvcache

// The strong-guarantee loop of the allocation-failure programs (issue #10), for a cache of either
// backend: a cache kind made with a few tokens in every layer, the cache operations, and the loop
// that runs one operation with the Nth allocation failing for N = 1, 2, ... (the failing allocator
// of tests/fail_nth_allocation.hpp, which the including program arms). After each failure the
// cache must be as it was (lengths and contents, read back through a probe update on every layer)
// and the failure a kvcache::Error; where the operation succeeds it must have done exactly what it
// does without a failing allocator. Included by cache/allocation_failure_test.cpp (the CPU kinds)
// and cache/allocation_failure_cuda_test.cpp (the CUDA kinds, OffloadedCache among them).
#pragma once

#include <gtest/gtest.h>

#include <functional>
#include <memory>
#include <new>
#include <ostream>
#include <random>
#include <string>
#include <vector>

#include "fail_nth_allocation.hpp"
#include "kvcache/attention/mask.hpp"
#include "kvcache/backend/cuda.hpp"
#include "kvcache/cache/cache.hpp"
#include "kvcache/cache/dynamic_cache.hpp"
#include "kvcache/cache/quantized_cache.hpp"
#include "kvcache/cache/sink_cache.hpp"
#include "kvcache/cache/static_cache.hpp"
#include "test_util.hpp"

namespace kvcache::testing {

constexpr std::int64_t kBatch = 2, kHeads = 2, kHeadDim = 8;
constexpr int kLayers = 2;
constexpr long kMaxAllocations = 20000;  // a loop that passes this is a failure of its own

// Random states [batch, heads, q_len, head_dim] float32 from a seed.
template <class Backend>
Tensor states(std::int64_t batch, std::int64_t q_len, unsigned seed) {
  std::mt19937 rng(seed);
  Tensor host = random_tensor({batch, kHeads, q_len, kHeadDim}, DType::kFloat32, rng);
  if constexpr (Backend::kDevice == Device::kCuda) {
    return cuda::to_device(host);
  } else {
    return host;
  }
}

// Appends q_len tokens to every layer (a new layer when layer == num_layers()).
template <class Backend>
void append(Cache<Backend>& cache, int layer, std::int64_t batch, std::int64_t q_len,
            unsigned seed) {
  const std::vector<std::int64_t> position =
      make_cache_position(cache.get_seq_length(layer), q_len);
  cache.update(states<Backend>(batch, q_len, seed), states<Backend>(batch, q_len, seed + 1), layer,
               {.cache_position = position});
}

// A tensor of the backend's device as doubles (device tensors are copied to the host first).
template <class Backend>
std::vector<double> host_doubles(const Tensor& t) {
  if constexpr (Backend::kDevice == Device::kCuda) {
    return to_doubles(cuda::to_host(t));
  } else {
    return to_doubles(t);
  }
}

// What a cache holds, read through the public API: every layer's length, then the keys and values
// one more (fixed) token's update() returns for each layer: all it holds plus the token. The probe
// changes the cache, so it runs last.
struct Probe {
  std::vector<std::int64_t> lengths;
  std::vector<std::vector<double>> contents;
  bool operator==(const Probe&) const = default;
};

inline void PrintTo(const Probe& p, std::ostream* os) {
  *os << "lengths [";
  for (std::int64_t n : p.lengths) *os << " " << n;
  *os << " ], " << p.contents.size() << " key/value tensors";
  if (!p.contents.empty() && !p.contents[0].empty())
    *os << " (first value " << p.contents[0][0] << ")";
}

template <class Backend>
Probe probe(Cache<Backend>& cache, std::int64_t batch) {
  Probe p;
  for (int l = 0; l < cache.num_layers(); ++l) p.lengths.push_back(cache.get_seq_length(l));
  for (int l = 0; l < cache.num_layers(); ++l) {
    const std::vector<std::int64_t> position = make_cache_position(cache.get_seq_length(l), 1);
    auto [k, v] = cache.update(states<Backend>(batch, 1, 900 + static_cast<unsigned>(l)),
                               states<Backend>(batch, 1, 950 + static_cast<unsigned>(l)), l,
                               {.cache_position = position});
    p.contents.push_back(host_doubles<Backend>(k));
    p.contents.push_back(host_doubles<Backend>(v));
  }
  return p;
}

// A cache kind under test: how to make one holding `tokens` tokens in each of its layers.
template <class Backend>
struct Kind {
  std::string name;
  std::function<std::unique_ptr<Cache<Backend>>()> make_empty;
  std::int64_t tokens = 5;
  bool adds_layers = true;  // false: its layers are fixed up front (a new one is an error)
  std::unique_ptr<Cache<Backend>> make() const {
    std::unique_ptr<Cache<Backend>> cache = make_empty();
    for (int l = 0; l < kLayers; ++l) append(*cache, l, kBatch, tokens, 10 + 2 * l);
    return cache;
  }
};

// One cache call. bind() makes the call's inputs from the (unarmed) cache, so that only the
// library's own allocations are counted, and returns the call.
template <class Backend>
struct Operation {
  std::string name;
  std::function<std::function<void()>(Cache<Backend>&)> bind;
  std::int64_t batch_after = kBatch;  // the batch the probe uses after a successful call
};

// update(layer) with q_len new tokens.
template <class Backend>
Operation<Backend> update_op(std::string name, int layer, std::int64_t q_len, unsigned seed) {
  return {std::move(name), [=](Cache<Backend>& c) -> std::function<void()> {
            const int l = layer < 0 ? c.num_layers() : layer;
            const Tensor k = states<Backend>(kBatch, q_len, seed),
                         v = states<Backend>(kBatch, q_len, seed + 1);
            auto position = std::make_shared<const std::vector<std::int64_t>>(
                make_cache_position(c.get_seq_length(l), q_len));
            return [&c, k, v, l, position] { c.update(k, v, l, {.cache_position = *position}); };
          }};
}

template <class Backend>
std::vector<Operation<Backend>> operations() {
  return {
      update_op<Backend>("update (40 tokens, layer 1: the layer grows)", 1, 40, 300),
      update_op<Backend>("update (1 token, layer 0)", 0, 1, 400),
      update_op<Backend>("update (a new layer)", -1, 2, 500),
      {"crop(4)", [](Cache<Backend>& c) { return std::function<void()>([&c] { c.crop(4); }); }},
      {"crop(-1)", [](Cache<Backend>& c) { return std::function<void()>([&c] { c.crop(-1); }); }},
      {"reorder_cache({1, 0})",
       [](Cache<Backend>& c) { return std::function<void()>([&c] {
                                 c.reorder_cache({1, 0});
                               }); }},
      {"batch_repeat_interleave(2)",
       [](Cache<Backend>& c) {
         return std::function<void()>([&c] { c.batch_repeat_interleave(2); });
       },
       2 * kBatch},
      {"batch_select_indices({1})",
       [](Cache<Backend>& c) {
         return std::function<void()>([&c] { c.batch_select_indices({1}); });
       },
       1},
      {"reset", [](Cache<Backend>& c) { return std::function<void()>([&c] { c.reset(); }); }},
      {"clone", [](Cache<Backend>& c) { return std::function<void()>([&c] { (void)c.clone(); }); }},
  };
}

// Runs `op` on a fresh cache with allocation N failing, N = 1, 2, ... Returns how many runs failed.
template <class Backend>
long expect_strong_guarantee(const Kind<Backend>& kind, const Operation<Backend>& op) {
  const Probe before = probe(*kind.make(), kBatch);
  std::unique_ptr<Cache<Backend>> done = kind.make();
  op.bind (*done)();  // unarmed: what the operation does
  const Probe after = probe(*done, op.batch_after);
  long failures = 0;
  for (long n = 1; n <= kMaxAllocations; ++n) {
    std::unique_ptr<Cache<Backend>> cache = kind.make();
    const std::function<void()> call = op.bind(*cache);
    std::string error;
    bool threw = false;
    long made = 0;
    {
      FailNthAllocation arm(n);
      try {
        call();
      } catch (const Error& e) {
        threw = true;
        error = e.what();
      } catch (const std::bad_alloc&) {
        threw = true;
        error = "std::bad_alloc";
      }
      made = arm.allocations();
    }
    const std::string where = kind.name + ", " + op.name + ", allocation " + std::to_string(n);
    if (!threw) {
      // Either no Nth allocation came (done), or its failure was absorbed: then the result must be
      // the operation's own all the same.
      EXPECT_EQ(probe(*cache, op.batch_after), after) << where << ": succeeded differently";
      if (made < n) return failures;
      continue;
    }
    ++failures;
    EXPECT_NE(error, "std::bad_alloc") << where << ": expected a kvcache::Error";
    EXPECT_EQ(probe(*cache, kBatch), before) << where << ": the cache changed (" << error << ")";
  }
  ADD_FAILURE() << kind.name << ", " << op.name << ": still allocating after " << kMaxAllocations;
  return failures;
}

// The cache kinds both backends have, each made with a few tokens in every layer: DynamicCache
// (full layers, and a sliding layer 0 of window 4), StaticCache with its layers up front, SinkCache
// and QuantizedCache (the CPU program adds the lazy StaticCache, the CUDA one OffloadedCache). The
// CUDA program includes quantized_cache_cuda.hpp for QuantizedCache<cuda::Backend>.
template <class Backend>
std::vector<Kind<Backend>> shared_kinds() {
  const std::string on = Backend::kDevice == Device::kCuda ? "<cuda>" : "";
  std::vector<float> inv_freq;
  for (int i = 0; i < kHeadDim / 2; ++i) inv_freq.push_back(1.0f / (1.0f + static_cast<float>(i)));
  return {
      {"DynamicCache" + on, [] { return std::make_unique<DynamicCache<Backend>>(); }},
      {"DynamicCache" + on + " (sliding layer 0, window 4)",
       [] {
         return std::make_unique<DynamicCache<Backend>>(
             DynamicCacheOptions{.sliding_windows = {4}});
       }},
      {"StaticCache" + on + " (up front)",
       [] {
         return std::make_unique<StaticCache<Backend>>(StaticCacheOptions{.max_batch_size = 4,
                                                                          .max_cache_len = 64,
                                                                          .num_layers = kLayers,
                                                                          .num_kv_heads = kHeads,
                                                                          .head_dim = kHeadDim});
       },
       5, false},
      {"SinkCache" + on + " (window 7, 2 sinks)",
       [inv_freq] {
         return std::make_unique<SinkCache<Backend>>(
             SinkCacheOptions{.window_length = 7, .num_sink_tokens = 2, .rope_inv_freq = inv_freq});
       }},
      {"QuantizedCache" + on + " (4 bits, groups of 4, residual 4)",
       [] {
         return std::make_unique<QuantizedCache<Backend>>(
             QuantizedCacheOptions{.nbits = 4, .group_size = 4, .residual_length = 4});
       },
       11},
  };
}

}  // namespace kvcache::testing

// The strong guarantee under allocation failure (issue #10): every cache operation (update of a
// layer held and of a new one, crop, reorder_cache, the batch operations, reset, clone,
// to_legacy_cache and from_legacy_cache) run with the Nth allocation failing, for N = 1, 2, ...
// until the operation makes fewer than N allocations. After each failure the cache must be as it
// was (lengths and contents, read back through a probe update on every layer) and the failure a
// kvcache::Error; where the operation succeeds it must have done exactly what it does without a
// failing allocator. DynamicCache (full and sliding layers), StaticCache (lazy and up front),
// SinkCache and QuantizedCache are run; OffloadedCache is GPU only.
//
// The failing allocator (tests/fail_nth_allocation.hpp) is this program's replacement of the
// global operator new (every form): armed it fails exactly the Nth allocation counted from arming.
// Cache storage comes through it too (Tensor::empty allocates with the aligned operator new).
// That is why this is a program of its own: its allocator is no other test's.
#include <gtest/gtest.h>

#include <atomic>
#include <cstdlib>
#include <functional>
#include <memory>
#include <new>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include "fail_nth_allocation.hpp"
#include "kvcache/attention/mask.hpp"
#include "kvcache/cache/dynamic_cache.hpp"
#include "kvcache/cache/quantized_cache.hpp"
#include "kvcache/cache/sink_cache.hpp"
#include "kvcache/cache/static_cache.hpp"
#include "test_util.hpp"

namespace kvcache {
namespace {

using testing::FailNthAllocation;
using testing::random_tensor;
using testing::to_doubles;
using CpuCache = Cache<cpu::Backend>;

constexpr std::int64_t kBatch = 2, kHeads = 2, kHeadDim = 8;
constexpr int kLayers = 2;
constexpr long kMaxAllocations = 20000;  // a loop that passes this is a failure of its own

// Random states [batch, heads, q_len, head_dim] float32 from a seed.
Tensor states(std::int64_t batch, std::int64_t q_len, unsigned seed) {
  std::mt19937 rng(seed);
  return random_tensor({batch, kHeads, q_len, kHeadDim}, DType::kFloat32, rng);
}

// Appends q_len tokens to every layer (a new layer when layer == num_layers()).
void append(CpuCache& cache, int layer, std::int64_t batch, std::int64_t q_len, unsigned seed) {
  const std::vector<std::int64_t> position =
      make_cache_position(cache.get_seq_length(layer), q_len);
  cache.update(states(batch, q_len, seed), states(batch, q_len, seed + 1), layer,
               {.cache_position = position});
}

// What a cache holds, read through the public API: every layer's length, then the keys and values
// one more (fixed) token's update() returns for each layer: all it holds plus the token. The probe
// changes the cache, so it runs last.
struct Probe {
  std::vector<std::int64_t> lengths;
  std::vector<std::vector<double>> contents;
  bool operator==(const Probe&) const = default;
};

void PrintTo(const Probe& p, std::ostream* os) {
  *os << "lengths [";
  for (std::int64_t n : p.lengths) *os << " " << n;
  *os << " ], " << p.contents.size() << " key/value tensors";
  if (!p.contents.empty() && !p.contents[0].empty())
    *os << " (first value " << p.contents[0][0] << ")";
}

Probe probe(CpuCache& cache, std::int64_t batch) {
  Probe p;
  for (int l = 0; l < cache.num_layers(); ++l) p.lengths.push_back(cache.get_seq_length(l));
  for (int l = 0; l < cache.num_layers(); ++l) {
    const std::vector<std::int64_t> position = make_cache_position(cache.get_seq_length(l), 1);
    auto [k, v] = cache.update(states(batch, 1, 900 + static_cast<unsigned>(l)),
                               states(batch, 1, 950 + static_cast<unsigned>(l)), l,
                               {.cache_position = position});
    p.contents.push_back(to_doubles(k));
    p.contents.push_back(to_doubles(v));
  }
  return p;
}

// A cache kind under test: how to make one holding `tokens` tokens in each of its layers.
struct Kind {
  std::string name;
  std::function<std::unique_ptr<CpuCache>()> make_empty;
  std::int64_t tokens = 5;
  bool adds_layers = true;  // false: its layers are fixed up front (a new one is an error)
  std::unique_ptr<CpuCache> make() const {
    std::unique_ptr<CpuCache> cache = make_empty();
    for (int l = 0; l < kLayers; ++l) append(*cache, l, kBatch, tokens, 10 + 2 * l);
    return cache;
  }
};

std::vector<float> inv_freq() {
  std::vector<float> f;
  for (int i = 0; i < kHeadDim / 2; ++i) f.push_back(1.0f / (1.0f + static_cast<float>(i)));
  return f;
}

std::vector<Kind> kinds() {
  return {
      {"DynamicCache", [] { return std::make_unique<DynamicCache<>>(); }},
      {"DynamicCache (sliding layer 0, window 4)",
       [] {
         return std::make_unique<DynamicCache<>>(DynamicCacheOptions{.sliding_windows = {4}});
       }},
      {"StaticCache (lazy)", [] { return std::make_unique<StaticCache<>>(4, 64); }},
      {"StaticCache (up front)",
       [] {
         return std::make_unique<StaticCache<>>(StaticCacheOptions{.max_batch_size = 4,
                                                                   .max_cache_len = 64,
                                                                   .num_layers = kLayers,
                                                                   .num_kv_heads = kHeads,
                                                                   .head_dim = kHeadDim});
       },
       5, false},
      {"SinkCache (window 7, 2 sinks)",
       [] {
         return std::make_unique<SinkCache<>>(SinkCacheOptions{
             .window_length = 7, .num_sink_tokens = 2, .rope_inv_freq = inv_freq()});
       }},
      {"QuantizedCache (4 bits, groups of 4, residual 4)",
       [] {
         return std::make_unique<QuantizedCache<>>(
             QuantizedCacheOptions{.nbits = 4, .group_size = 4, .residual_length = 4});
       },
       11},
  };
}

// One cache call. bind() makes the call's inputs from the (unarmed) cache, so that only the
// library's own allocations are counted, and returns the call.
struct Operation {
  std::string name;
  std::function<std::function<void()>(CpuCache&)> bind;
  std::int64_t batch_after = kBatch;  // the batch the probe uses after a successful call
};

// update(layer) with q_len new tokens.
Operation update_op(std::string name, int layer, std::int64_t q_len, unsigned seed) {
  return {std::move(name), [=](CpuCache& c) -> std::function<void()> {
            const int l = layer < 0 ? c.num_layers() : layer;
            const Tensor k = states(kBatch, q_len, seed), v = states(kBatch, q_len, seed + 1);
            auto position = std::make_shared<const std::vector<std::int64_t>>(
                make_cache_position(c.get_seq_length(l), q_len));
            return [&c, k, v, l, position] { c.update(k, v, l, {.cache_position = *position}); };
          }};
}

std::vector<Operation> operations() {
  return {
      update_op("update (40 tokens, layer 1: the layer grows)", 1, 40, 300),
      update_op("update (1 token, layer 0)", 0, 1, 400),
      update_op("update (a new layer)", -1, 2, 500),
      {"crop(4)", [](CpuCache& c) { return std::function<void()>([&c] { c.crop(4); }); }},
      {"crop(-1)", [](CpuCache& c) { return std::function<void()>([&c] { c.crop(-1); }); }},
      {"reorder_cache({1, 0})",
       [](CpuCache& c) { return std::function<void()>([&c] {
                           c.reorder_cache({1, 0});
                         }); }},
      {"batch_repeat_interleave(2)",
       [](CpuCache& c) { return std::function<void()>([&c] { c.batch_repeat_interleave(2); }); },
       2 * kBatch},
      {"batch_select_indices({1})",
       [](CpuCache& c) { return std::function<void()>([&c] { c.batch_select_indices({1}); }); }, 1},
      {"reset", [](CpuCache& c) { return std::function<void()>([&c] { c.reset(); }); }},
      {"clone", [](CpuCache& c) { return std::function<void()>([&c] { (void)c.clone(); }); }},
  };
}

// Runs `op` on a fresh cache with allocation N failing, N = 1, 2, ... Returns how many runs failed.
long expect_strong_guarantee(const Kind& kind, const Operation& op) {
  const Probe before = probe(*kind.make(), kBatch);
  std::unique_ptr<CpuCache> done = kind.make();
  op.bind (*done)();  // unarmed: what the operation does
  const Probe after = probe(*done, op.batch_after);
  long failures = 0;
  for (long n = 1; n <= kMaxAllocations; ++n) {
    std::unique_ptr<CpuCache> cache = kind.make();
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

// Where an allocation's pointer escapes, so the compiler cannot elide the allocation.
void* volatile g_escape = nullptr;

TEST(CacheAllocationFailure, TheAllocatorFailsTheNthAllocationOnly) {
  {
    std::vector<void*> held;
    held.reserve(3);
    FailNthAllocation arm(2);
    for (int i = 1; i <= 3; ++i) {
      try {
        void* p = ::operator new(16);
        g_escape = p;
        held.push_back(p);
      } catch (const std::bad_alloc&) {
        held.push_back(nullptr);
      }
    }
    EXPECT_EQ(arm.allocations(), 3);
    ASSERT_EQ(held.size(), 3u);
    EXPECT_NE(held[0], nullptr);
    EXPECT_EQ(held[1], nullptr);
    EXPECT_NE(held[2], nullptr);
    for (void* p : held) ::operator delete(p);
  }
  // Tensor storage comes through it too (the aligned operator new), as a kvcache::Error.
  FailNthAllocation arm(1);
  EXPECT_KVCACHE_ERROR(Tensor::empty({4, 1024}, DType::kFloat32), "out of memory");
}

TEST(CacheAllocationFailure, EveryOperationOfEveryCacheKeepsTheStrongGuarantee) {
  for (const Kind& kind : kinds()) {
    long total = 0;
    for (const Operation& op : operations()) {
      if (!kind.adds_layers && op.name == "update (a new layer)") continue;
      SCOPED_TRACE(kind.name + ", " + op.name);
      const long failures = expect_strong_guarantee(kind, op);
      total += failures;
      // Updates that grow or add storage allocate: the loop must have failed some of them.
      // A new layer allocates its storage, and a DynamicCache layer regrows for 40 more tokens:
      // the loop must have failed some of their allocations.
      const bool allocates =
          op.name == "update (a new layer)" ||
          (kind.name.starts_with("DynamicCache") && op.name.starts_with("update (40"));
      if (allocates) {
        EXPECT_GT(failures, 0);
      }
    }
    EXPECT_GT(total, 10) << kind.name << ": the failing allocator was barely reached";
  }
}

TEST(CacheAllocationFailure, ToLegacyCacheAndFromLegacyCacheFailCleanly) {
  for (bool sliding : {false, true}) {
    SCOPED_TRACE(sliding ? "sliding layer 0" : "full layers");
    const DynamicCacheOptions options{.sliding_windows = sliding ? std::vector<std::int64_t>{4}
                                                                 : std::vector<std::int64_t>{}};
    const Kind kind{"DynamicCache",
                    [&] { return std::make_unique<DynamicCache<>>(DynamicCacheOptions(options)); }};
    const Probe before = probe(*kind.make(), kBatch);
    // A sliding layer rebuilt from the legacy format counts the tokens it keeps as all it has
    // seen, so the rebuilt cache is compared with one rebuilt unarmed.
    const Probe rebuilt_unarmed =
        probe(*std::make_unique<DynamicCache<>>(DynamicCache<>::from_legacy_cache(
                  static_cast<DynamicCache<>&>(*kind.make()).to_legacy_cache(), options)),
              kBatch);
    long failures = 0;
    bool finished = false;
    for (long n = 1; n <= kMaxAllocations && !finished; ++n) {
      std::unique_ptr<CpuCache> cache = kind.make();
      auto& dynamic = static_cast<DynamicCache<>&>(*cache);
      const LegacyCache legacy = dynamic.to_legacy_cache();
      std::vector<std::vector<double>> legacy_before;
      for (const auto& [k, v] : legacy) {
        legacy_before.push_back(to_doubles(k));
        legacy_before.push_back(to_doubles(v));
      }
      std::optional<DynamicCache<>> rebuilt;
      std::string error;
      DynamicCacheOptions rebuilt_options = options;
      {
        FailNthAllocation arm(n);
        try {
          (void)dynamic.to_legacy_cache();
          rebuilt.emplace(DynamicCache<>::from_legacy_cache(legacy, std::move(rebuilt_options)));
        } catch (const Error& e) {
          error = e.what();
        } catch (const std::bad_alloc&) {
          error = "std::bad_alloc";
        }
        finished = rebuilt && arm.allocations() < n;
      }
      std::vector<std::vector<double>> legacy_after;
      for (const auto& [k, v] : legacy) {
        legacy_after.push_back(to_doubles(k));
        legacy_after.push_back(to_doubles(v));
      }
      EXPECT_EQ(legacy_after, legacy_before) << "allocation " << n;
      EXPECT_EQ(probe(*cache, kBatch), before) << "allocation " << n;
      if (rebuilt) {
        EXPECT_EQ(probe(*rebuilt, kBatch), rebuilt_unarmed) << "allocation " << n;
      } else {
        ++failures;
        EXPECT_NE(error, "std::bad_alloc") << "allocation " << n << ": expected a kvcache::Error";
      }
    }
    EXPECT_TRUE(finished);
    EXPECT_GT(failures, 2);
  }
}

}  // namespace
}  // namespace kvcache

// The strong guarantee under allocation failure (issue #10): every cache operation (update of a
// layer held and of a new one, crop, reorder_cache, the batch operations, reset, clone,
// to_legacy_cache and from_legacy_cache) run with the Nth allocation failing, for N = 1, 2, ...
// until the operation makes fewer than N allocations (the loop: cache/allocation_failure.hpp).
// After each failure the cache must be as it was and the failure a kvcache::Error; where the
// operation succeeds it must have done exactly what it does without a failing allocator.
// DynamicCache (full and sliding layers), StaticCache (lazy and up front), SinkCache and
// QuantizedCache are run here; the CUDA kinds and OffloadedCache in
// cache/allocation_failure_cuda_test.cpp.
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

#include "cache/allocation_failure.hpp"
#include "kvcache/cache/dynamic_cache.hpp"
#include "kvcache/cache/quantized_cache.hpp"
#include "kvcache/cache/sink_cache.hpp"
#include "kvcache/cache/static_cache.hpp"
#include "test_util.hpp"

namespace kvcache {
namespace {

using testing::FailNthAllocation;
using testing::kBatch;
using testing::kMaxAllocations;
using testing::Probe;
using testing::to_doubles;
using CpuCache = Cache<cpu::Backend>;
using Kind = testing::Kind<cpu::Backend>;
using Operation = testing::Operation<cpu::Backend>;

// The kinds both backends have, and the StaticCache that makes its layers as they come.
std::vector<Kind> kinds() {
  std::vector<Kind> all = testing::shared_kinds<cpu::Backend>();
  all.insert(all.begin() + 2,
             {"StaticCache (lazy)", [] { return std::make_unique<StaticCache<>>(4, 64); }});
  return all;
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
    for (const Operation& op : testing::operations<cpu::Backend>()) {
      if (!kind.adds_layers && op.name == "update (a new layer)") continue;
      SCOPED_TRACE(kind.name + ", " + op.name);
      const long failures = testing::expect_strong_guarantee(kind, op);
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
    const Probe before = testing::probe(*kind.make(), kBatch);
    // A sliding layer rebuilt from the legacy format counts the tokens it keeps as all it has
    // seen, so the rebuilt cache is compared with one rebuilt unarmed.
    const Probe rebuilt_unarmed =
        testing::probe(*std::make_unique<DynamicCache<>>(DynamicCache<>::from_legacy_cache(
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
      EXPECT_EQ(testing::probe(*cache, kBatch), before) << "allocation " << n;
      if (rebuilt) {
        EXPECT_EQ(testing::probe(*rebuilt, kBatch), rebuilt_unarmed) << "allocation " << n;
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

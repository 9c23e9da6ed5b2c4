// The strong guarantee under allocation failure on the GPU (issue #10): the loop of
// cache/allocation_failure.hpp over the CUDA caches, OffloadedCache among them. A cache of the
// CUDA backend allocates in three places: host memory (operator new, for its bookkeeping), device
// memory (cudaMallocAsync) and page-locked host memory (cudaMallocHost, OffloadedCache's layers).
// The failing allocator of tests/fail_nth_allocation.hpp replaces operator new; the backend's
// fault-injection hook (cuda::detail::set_allocation_fault_hook) sends the two CUDA allocations
// through the same counter, so "the Nth allocation" counts all three kinds and each is failed in
// turn. A program of its own, as the CPU one is; every test skips where no GPU is usable (CI).
#include <gtest/gtest.h>

#include <memory>
#include <string>
#include <vector>

#include "cache/allocation_failure.hpp"
#include "kvcache/backend/cuda.hpp"
#include "kvcache/cache/dynamic_cache.hpp"
#include "kvcache/cache/offloaded_cache.hpp"
#include "kvcache/cache/quantized_cache.hpp"
#include "kvcache/cache/quantized_cache_cuda.hpp"
#include "kvcache/cache/sink_cache.hpp"
#include "kvcache/cache/static_cache.hpp"
#include "test_util.hpp"

namespace kvcache {
namespace {

using testing::FailNthAllocation;
using Kind = testing::Kind<cuda::Backend>;

// The backend's allocations counted with operator new's: the hook fails the armed Nth one.
bool fail_this_allocation() { return testing::this_one_fails(); }

class CudaAllocationFailure : public ::testing::Test {
 protected:
  void SetUp() override {
    if (cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device";
    cuda::detail::set_allocation_fault_hook(&fail_this_allocation);
  }
  void TearDown() override { cuda::detail::set_allocation_fault_hook(nullptr); }
};

// OffloadedCache (growing, and with its capacity reserved up front), then the kinds both backends
// have.
std::vector<Kind> kinds() {
  std::vector<Kind> all = {
      {"OffloadedCache", [] { return std::make_unique<OffloadedCache>(); }},
      {"OffloadedCache (capacity 8 reserved)",
       [] {
         return std::make_unique<OffloadedCache>(OffloadedCacheOptions{.initial_capacity = 8});
       }},
  };
  for (Kind& kind : testing::shared_kinds<cuda::Backend>()) all.push_back(std::move(kind));
  return all;
}

TEST_F(CudaAllocationFailure, TheHookFailsDeviceAndPinnedAllocationsAsKvcacheErrors) {
  {
    FailNthAllocation arm(1);  // the device memory itself
    EXPECT_KVCACHE_ERROR(cuda::empty({4, 256}, DType::kFloat32), "cudaErrorMemoryAllocation");
  }
  {
    FailNthAllocation arm(1);  // the page-locked host memory itself
    EXPECT_KVCACHE_ERROR(cuda::empty_pinned({4, 256}, DType::kFloat32),
                         "cudaErrorMemoryAllocation");
  }
  // Each allocation's owner (a shared_ptr control block, from operator new) comes after the
  // memory: its failure frees the memory and is a kvcache::Error too, never a std::bad_alloc.
  {
    FailNthAllocation arm(2);
    EXPECT_KVCACHE_ERROR(cuda::empty({4, 256}, DType::kFloat32), "out of memory");
  }
  {
    FailNthAllocation arm(2);
    EXPECT_KVCACHE_ERROR(cuda::empty_pinned({4, 256}, DType::kFloat32), "out of memory");
  }
  // Unarmed, both succeed.
  EXPECT_TRUE(cuda::empty({4, 256}, DType::kFloat32).defined());
  EXPECT_TRUE(cuda::empty_pinned({4, 256}, DType::kFloat32).defined());
}

TEST_F(CudaAllocationFailure, EveryOperationOfEveryCudaCacheKeepsTheStrongGuarantee) {
  for (const Kind& kind : kinds()) {
    long total = 0;
    for (const auto& op : testing::operations<cuda::Backend>()) {
      if (!kind.adds_layers && op.name == "update (a new layer)") continue;
      SCOPED_TRACE(kind.name + ", " + op.name);
      const long failures = testing::expect_strong_guarantee(kind, op);
      total += failures;
      // A new layer allocates its storage: the loop must have failed some of its allocations.
      if (op.name == "update (a new layer)") {
        EXPECT_GT(failures, 0);
      }
    }
    EXPECT_GT(total, 10) << kind.name << ": the failing allocator was barely reached";
  }
}

}  // namespace
}  // namespace kvcache

// What memory a device has left, and the check made before the library's large allocations
// (issue #10): a model or a cache that cannot fit fails with a kvcache::Error naming the bytes it
// needs and the bytes there are, before it allocates most of it, instead of being killed by the
// kernel's out-of-memory killer half-way (Linux overcommits: a large allocation "succeeds" and the
// process dies when it touches the pages) or failing on the GPU after filling it.
//
// Checked: the weights a model holds (LlamaModel's loaders, before the first weight is converted;
// LoadOptions::max_memory caps them, as transformers' max_memory does), a StaticCache's whole
// storage before its first layer, make_generation_cache's reservation for every layer, and every
// cache allocation of kLargeAllocation bytes or more (a DynamicCache's growth, a batch operation's
// new storage). The figure is what is free when the check runs: other processes can take memory
// after it, so an allocation can still fail later (then as a kvcache::Error too, or on Linux the
// out-of-memory killer for pages touched after the check).
#pragma once

#include <cstdint>
#include <string_view>

#if __has_include(<unistd.h>)
#include <unistd.h>  // sysconf: the machine's memory (physical_memory_bytes)
#endif

#include "kvcache/tensor.hpp"

namespace kvcache {

/// Bytes a new allocation can take on `device` now. CPU: MemAvailable + SwapFree from
/// /proc/meminfo (memory the kernel can hand out without killing anything), or the physical memory
/// where /proc cannot be read. CUDA: the current device's free memory plus what kvcache's memory
/// pool holds unused. 0 when it cannot be told (no GPU, or a library built without CUDA); the
/// checks below then pass.
std::uint64_t available_memory(Device device);

namespace detail {

/// The machine's physical memory in bytes, or 0 where it cannot be told.
inline std::uint64_t physical_memory_bytes() {
#if defined(_SC_PHYS_PAGES) && defined(_SC_PAGESIZE)
  const long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGESIZE);
  if (pages > 0 && page > 0)
    return static_cast<std::uint64_t>(pages) * static_cast<std::uint64_t>(page);
#endif
  return 0;
}

/// Cache allocations this large or larger are checked against available_memory() first (reading
/// /proc/meminfo costs microseconds; an allocation this size costs milliseconds to touch).
inline constexpr std::uint64_t kLargeAllocation = std::uint64_t{64} << 20;

/// Throws kvcache::Error "<where>: out of memory: <what> needs <bytes> bytes (<GiB>) on <device>,
/// and <available> are available (<source>)" unless `bytes` fits in what `device` has available
/// and, when `limit` > 0, in `limit` (then named as the caller's limit). Allocates nothing unless
/// it throws.
void require_memory(Device device, std::uint64_t bytes, std::string_view where,
                    std::string_view what, std::uint64_t limit = 0);

}  // namespace detail
}  // namespace kvcache

// A failing allocator for the allocation-failure programs (issue #10): this header replaces the
// global operator new (every form) and operator delete. Disarmed it is malloc / aligned_alloc;
// armed (FailNthAllocation) it fails exactly the Nth allocation counted from arming, and no other,
// so the library's own error message (which allocates) can be built. Tensor storage comes
// through it too: Tensor::empty allocates with the aligned operator new. Memory that the library
// or a third-party header takes with malloc directly (Eigen's aligned_malloc, the OpenMP
// runtime) is not counted.
//
// Include it in exactly one source file of a program, and only in a program of its own (its
// allocator is no other test's): the replacements are ordinary (non-inline) definitions.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstddef>
#include <cstdlib>
#include <new>

namespace kvcache::testing {

// 0: disarmed. Otherwise the 1-based index (counted from arming) of the allocation that fails.
inline std::atomic<long> g_fail_at{0};
inline std::atomic<long> g_allocations{0};  // allocations since arming

inline bool this_one_fails() {
  const long at = g_fail_at.load(std::memory_order_relaxed);
  if (at == 0) return false;
  return g_allocations.fetch_add(1, std::memory_order_relaxed) + 1 == at;
}

inline void* allocate(std::size_t n) noexcept {
  if (this_one_fails()) return nullptr;
  return std::malloc(n == 0 ? 1 : n);
}

inline void* allocate_aligned(std::size_t n, std::align_val_t align) noexcept {
  if (this_one_fails()) return nullptr;
  const auto a = std::max(static_cast<std::size_t>(align), sizeof(void*));
  const std::size_t rounded = n == 0 ? a : (n + a - 1) / a * a;  // aligned_alloc's size rule
  return std::aligned_alloc(a, rounded);
}

// Arms the allocator for its lifetime: allocation number `n` from now fails (a huge `n` only
// counts: allocations() then says how many the armed code made).
class FailNthAllocation {
 public:
  explicit FailNthAllocation(long n) {
    g_allocations.store(0);
    g_fail_at.store(n);
  }
  ~FailNthAllocation() { g_fail_at.store(0); }
  FailNthAllocation(const FailNthAllocation&) = delete;
  FailNthAllocation& operator=(const FailNthAllocation&) = delete;
  long allocations() const { return g_allocations.load(); }
};

}  // namespace kvcache::testing

// They free what malloc / aligned_alloc gave (GCC cannot see that the pair matches).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmismatched-new-delete"
#endif
void* operator new(std::size_t n) {
  if (void* p = ::kvcache::testing::allocate(n)) return p;
  throw std::bad_alloc();
}
void* operator new[](std::size_t n) {
  if (void* p = ::kvcache::testing::allocate(n)) return p;
  throw std::bad_alloc();
}
void* operator new(std::size_t n, const std::nothrow_t&) noexcept {
  return ::kvcache::testing::allocate(n);
}
void* operator new[](std::size_t n, const std::nothrow_t&) noexcept {
  return ::kvcache::testing::allocate(n);
}
void* operator new(std::size_t n, std::align_val_t a) {
  if (void* p = ::kvcache::testing::allocate_aligned(n, a)) return p;
  throw std::bad_alloc();
}
void* operator new[](std::size_t n, std::align_val_t a) {
  if (void* p = ::kvcache::testing::allocate_aligned(n, a)) return p;
  throw std::bad_alloc();
}
void* operator new(std::size_t n, std::align_val_t a, const std::nothrow_t&) noexcept {
  return ::kvcache::testing::allocate_aligned(n, a);
}
void* operator new[](std::size_t n, std::align_val_t a, const std::nothrow_t&) noexcept {
  return ::kvcache::testing::allocate_aligned(n, a);
}
void operator delete(void* p) noexcept { std::free(p); }
void operator delete[](void* p) noexcept { std::free(p); }
void operator delete(void* p, std::size_t) noexcept { std::free(p); }
void operator delete[](void* p, std::size_t) noexcept { std::free(p); }
void operator delete(void* p, const std::nothrow_t&) noexcept { std::free(p); }
void operator delete[](void* p, const std::nothrow_t&) noexcept { std::free(p); }
void operator delete(void* p, std::align_val_t) noexcept { std::free(p); }
void operator delete[](void* p, std::align_val_t) noexcept { std::free(p); }
void operator delete(void* p, std::size_t, std::align_val_t) noexcept { std::free(p); }
void operator delete[](void* p, std::size_t, std::align_val_t) noexcept { std::free(p); }
void operator delete(void* p, std::align_val_t, const std::nothrow_t&) noexcept { std::free(p); }
void operator delete[](void* p, std::align_val_t, const std::nothrow_t&) noexcept { std::free(p); }

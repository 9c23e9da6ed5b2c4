// Errors of the public API. Every check that can fail because of what a caller passed throws
// kvcache::Error with a message that names what was expected, what came, and where. The library
// never calls exit() or abort(), and a call that throws leaves caches as they were.
#pragma once

#include <new>
#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>

namespace kvcache {

/// The one exception type the library throws for bad input or a failed backend call.
class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

namespace detail {

// Joins the pieces of a message with operator<<, so checks can name sizes and shapes inline.
template <class... Parts>
std::string concat(Parts&&... parts) {
  std::ostringstream out;
  (out << ... << std::forward<Parts>(parts));
  return out.str();
}

[[noreturn]] inline void throw_error(const char* file, int line, const std::string& message) {
  std::string where(file);
  if (auto slash = where.find_last_of('/'); slash != std::string::npos)
    where = where.substr(slash + 1);
  throw Error(message + " [" + where + ":" + std::to_string(line) + "]");
}

}  // namespace detail
}  // namespace kvcache

/// Throws kvcache::Error built from the message parts when `cond` is false.
/// Usage: KVCACHE_CHECK(a == b, "update: expected head_dim ", a, ", got ", b);
#define KVCACHE_CHECK(cond, ...)                                                                  \
  do {                                                                                            \
    if (!(cond)) [[unlikely]] {                                                                   \
      ::kvcache::detail::throw_error(__FILE__, __LINE__, ::kvcache::detail::concat(__VA_ARGS__)); \
    }                                                                                             \
  } while (false)

/// Throws kvcache::Error unconditionally.
#define KVCACHE_FAIL(...) \
  ::kvcache::detail::throw_error(__FILE__, __LINE__, ::kvcache::detail::concat(__VA_ARGS__))

namespace kvcache::detail {

/// Runs f() and reports a std::bad_alloc from it as a kvcache::Error "<where>: out of memory".
/// Every public entry point that allocates runs its body through it (the cache operations, the
/// loaders, forward(), generate(), the tokenizer), so that running out of memory anywhere below
/// is one kvcache::Error naming the call; a kvcache::Error from inside passes unchanged. The cache
/// operations allocate before they commit, so a cache is then as it was (the allocation-failure
/// tests fail every allocation of every call in turn). Building the message allocates too: under
/// memory so short that this fails as well, the std::bad_alloc of that leaves instead.
template <class F>
decltype(auto) out_of_memory_as_error(const char* where, F&& f) {
  try {
    return std::forward<F>(f)();
  } catch (const std::bad_alloc&) {
    KVCACHE_FAIL(where, ": out of memory");
  }
}

}  // namespace kvcache::detail

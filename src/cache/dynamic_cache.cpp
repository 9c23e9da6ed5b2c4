// Explicit instantiations of the header templates for the CPU backend, so users of the common
// types do not compile them in every translation unit.
#include "kvcache/cache/dynamic_cache.hpp"
#include "kvcache/backend/cpu.hpp"

namespace kvcache {
template class DynamicCache<cpu::Backend>;
}  // namespace kvcache

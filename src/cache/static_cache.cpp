// Explicit instantiations of StaticCache: the CPU one, so users of the common type do not compile
// it in every translation unit, and the CUDA one, so every build (with or without nvcc, whose
// absence leaves cuda::Backend's functions as throwing stubs) checks that it compiles.
#include "kvcache/cache/static_cache.hpp"

#include "kvcache/backend/cpu.hpp"
#include "kvcache/backend/cuda.hpp"

namespace kvcache {
template class StaticCache<cpu::Backend>;
template class StaticCache<cuda::Backend>;
}  // namespace kvcache

// Explicit instantiations of the header templates: DynamicCache for the CPU backend, so users of
// the common types do not compile them in every translation unit, and SlidingWindowLayer for both
// backends, so every build (with or without nvcc, whose absence leaves cuda::Backend's functions
// as throwing stubs) checks that the ring compiles for the GPU too.
#include "kvcache/cache/dynamic_cache.hpp"

#include "kvcache/backend/cpu.hpp"
#include "kvcache/backend/cuda.hpp"
#include "kvcache/cache/sliding_window_layer.hpp"

namespace kvcache {
template class DynamicCache<cpu::Backend>;
template class SlidingWindowLayer<cpu::Backend>;
template class SlidingWindowLayer<cuda::Backend>;
}  // namespace kvcache
